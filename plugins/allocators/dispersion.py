"""Dispersion allocation: per-layer pruning rates from kernel dispersion (SFP, Information Sciences 2024, art. 121418).

SFP gives each layer a sparsity from its Kernel Dispersion: a layer whose kernels are alike (low dispersion) is
redundant and can lose more. Reconstruction (papers.md section 5): KD_g = mean pairwise cosine distance of the
BN-folded filters of a group (averaged over its producers, weighted by their widths), and

    r_g = clip(ratio * (mean_g KD_g / KD_g) ** beta, 0, max_rate)

Inside each slice the lowest-scored units go, as in ``uniform``. With ``--target-macs`` the base ``ratio`` is found by
bisection.
"""

from __future__ import annotations

import weakref

import numpy as np

from carve.pipeline.graph.bn import folded_filters
from carve.pipeline.graph.channels import ChannelAnalysis, Kind
from carve.pipeline.pruning.allocator import Allocation, Allocator, allocators, remove_by_rate
from carve.pipeline.pruning.scoring import kernel_dispersion

# this plugin's own memo: KD per group of an analysis, dropped with the analysis
_dispersion: weakref.WeakKeyDictionary[ChannelAnalysis, np.ndarray] = weakref.WeakKeyDictionary()


def group_dispersion(analysis: ChannelAnalysis) -> np.ndarray:
    """KD per group (NaN for groups without filters, e.g. input or pad-only groups)."""
    if analysis in _dispersion:
        return _dispersion[analysis]
    num = np.zeros(len(analysis.groups))
    den = np.zeros(len(analysis.groups))
    for src in analysis.producers((Kind.OUT,)):
        if src.count < 2:
            continue
        g = int(analysis.unit_group[analysis.source_units(src)[0]])
        num[g] += src.count * kernel_dispersion(folded_filters(analysis, src))
        den[g] += src.count
    kd = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    _dispersion[analysis] = kd
    return kd


def group_rates(analysis: ChannelAnalysis, frozen: np.ndarray, ratio: float, beta: float, max_rate: float):
    kd = group_dispersion(analysis)
    prunable = np.array([bool((~frozen[g.units]).any()) for g in analysis.groups])
    ok = prunable & np.isfinite(kd) & (kd > 0)
    mean = float(kd[ok].mean()) if ok.any() else 1.0
    rates = np.full(len(kd), ratio)
    rates[ok] = ratio * (mean / kd[ok]) ** beta
    return np.clip(rates, 0.0, max_rate)


@allocators.register("dispersion")
class Dispersion(Allocator):
    description = "per-group rates from kernel dispersion (SFP): alike kernels lose more"
    options = {"beta": 1.0, "max_rate": 0.95}

    def allocate(self, job: Allocation) -> np.ndarray:
        rates = group_rates(job.analysis, job.frozen, job.ratio, float(self.opts["beta"]), float(self.opts["max_rate"]))
        return remove_by_rate(job, rates)
