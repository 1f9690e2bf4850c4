"""Dispersion allocation: per-layer pruning rates from kernel dispersion (SFP, Information Sciences 2024, art. 121418).

SFP gives each layer a sparsity from its Kernel Dispersion: a layer whose kernels are alike (low dispersion) is
redundant and can lose more. Reconstruction (papers.md section 5): KD_g = mean pairwise cosine distance of the
BN-folded filters of a group (averaged over its producers, weighted by their widths), and

    r_g = clip(ratio * (mean_g KD_g / KD_g) ** beta, 0, max_rate)

Inside each slice the lowest-scored units go, as in ``uniform``. With ``--target-macs`` the base ``ratio`` is found by
bisection.
"""

from __future__ import annotations

import numpy as np

from pipeline.graph.bn import folded_filters
from pipeline.graph.channels import ChannelAnalysis, Kind
from pipeline.pruning.allocator import allocators, remove_by_rate
from plugins.criteria.simfp import kernel_dispersion


def group_dispersion(analysis: ChannelAnalysis) -> np.ndarray:
    """KD per group (NaN for groups without filters, e.g. input or pad-only groups)."""
    if "dispersion" in analysis.cache:
        return analysis.cache["dispersion"]
    num = np.zeros(len(analysis.groups))
    den = np.zeros(len(analysis.groups))
    for src in analysis.producers((Kind.OUT,)):
        if src.count < 2:
            continue
        g = int(analysis.unit_group[analysis.source_units(src)[0]])
        num[g] += src.count * kernel_dispersion(folded_filters(analysis, src))
        den[g] += src.count
    kd = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    analysis.cache["dispersion"] = kd
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
def dispersion(
    analysis: ChannelAnalysis,
    scores: np.ndarray,
    frozen: np.ndarray,
    *,
    ratio: float,
    round_to: int = 1,
    keep_min: int = 1,
    beta: float = 1.0,
    max_rate: float = 0.95,
) -> np.ndarray:
    """Per-group rates from kernel dispersion (SFP): alike kernels lose more."""
    rates = group_rates(analysis, frozen, ratio, beta, max_rate)
    return remove_by_rate(analysis, scores, frozen, rates, round_to=round_to, keep_min=keep_min)
