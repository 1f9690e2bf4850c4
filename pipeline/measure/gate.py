"""The CI gate: fail when a change makes the model measurably slower.

Rules, per measured configuration (backend, batch, threads) of a bench report:

1. **Slow-down**: fail when the *upper* end of the speed-up's confidence interval is below ``1 - max_slowdown``: the
   candidate is slower than the baseline model by more than the allowance, with confidence. Noise alone does not fail
   it: for two copies of one model the interval straddles 1.
2. **Minimum speed-up** (optional): fail when the upper end is below ``min_speedup`` (a pruned model that must pay off).
3. **Baseline report** (optional, e.g. the one stored from main): fail when the candidate's speed-up falls below the
   baseline's by more than ``tolerance`` (default ``max_slowdown``), again on the upper end of its interval.
   Configurations only one report has are listed, not judged.

A report too thin to decide is refused (:class:`~carve.pipeline.errors.CarveError`; ``carve gate`` exits 2), never
passed: results that are not a list of configurations, a speed-up that is not a finite positive number, an interval that
does not contain its median, or fewer than :data:`MIN_ROUNDS` interleaved rounds (with 2 rounds, two copies of one model
"fail" about one run in five; with 10, the interval is wide enough that noise alone fails well under 1%; see
docs/reliability.md).

:func:`evaluate` returns the verdict and a Markdown summary suitable for a CI job summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from carve.pipeline.errors import CarveError

DEFAULT_MAX_SLOWDOWN = 0.05
MIN_ROUNDS = 10


@dataclass
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        head = "### carve gate: passed" if self.passed else "### carve gate: FAILED"
        lines = [
            head,
            "",
            "| configuration | speed-up (95% CI) | must reach | baseline | verdict |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            base = f"{r['baseline']:.2f}x" if r.get("baseline") is not None else "-"
            lines.append(
                f"| {r['config']} | {r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) | "
                f"{r['threshold']:.2f}x | {base} | {'pass' if r['ok'] else '**fail**'} |"
            )
        for f in self.failures:
            lines.append(f"\n- {f}")
        for n in self.notes:
            lines.append(f"\n- note: {n}")
        return "\n".join(lines) + "\n"


def _key(r: dict) -> tuple:
    return (r.get("backend"), r.get("device"), r.get("precision"), r.get("batch"), r.get("threads"))


def _label(r: dict) -> str:
    return f"{r.get('backend')} {r.get('device')} {r.get('precision')} batch {r.get('batch')}, {r.get('threads')} thr"


def _speedup(r: dict, what: str) -> tuple[float, float, float]:
    """(median, low, high) of a result's speed-up, refused unless finite, positive, ordered and from enough rounds."""
    s = r.get("speedup")
    values = [s.get(k) for k in ("median", "ci_low", "ci_high")] if isinstance(s, dict) else []
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        # a number, not a boolean or a string that float() would take ("true" is not a speed-up)
        raise CarveError(f"{what}: result {_label(r)} has no usable speed-up (median, ci_low, ci_high as numbers)")
    med, lo, hi = (float(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in (med, lo, hi)):
        raise CarveError(f"{what}: result {_label(r)}: speed-up {med} ({lo}-{hi}) is not a finite positive number")
    if not lo <= med <= hi:
        raise CarveError(
            f"{what}: result {_label(r)}: the interval {lo:.3g}-{hi:.3g} does not contain its median {med:.3g}"
        )
    rounds = r.get("rounds")
    if rounds is None and isinstance(s.get("round_ratios"), list):
        rounds = len(s["round_ratios"])
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < MIN_ROUNDS:
        got = "an unknown number of" if rounds is None else f"only {rounds!r}"
        raise CarveError(
            f"{what}: result {_label(r)} was measured over {got} interleaved rounds; the gate needs at least "
            f"{MIN_ROUNDS} to tell a slow-down from noise",
            hint=f"rerun `carve bench ... --rounds {MIN_ROUNDS}` or more (default 20)",
        )
    return med, lo, hi


def _results(report: dict, what: str) -> list[dict]:
    if not isinstance(report, dict):
        raise CarveError(f"{what}: not a report (a JSON object)")
    results = report.get("results")
    if not results:
        raise CarveError(f"{what}: the report has no latency results to judge (is it a `carve bench` report?)")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise CarveError(f"{what}: `results` must be a list of measured configurations")
    for i, r in enumerate(results):  # the configuration that labels a result: plain values (issue 21)
        for k in ("backend", "device", "precision"):
            if r.get(k) is not None and not isinstance(r[k], str):
                raise CarveError(f"{what}: results[{i}].{k} must be a name, not {r[k]!r}")
        for k in ("batch", "threads"):
            v = r.get(k)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise CarveError(f"{what}: results[{i}].{k} must be a positive whole number, not {v!r}")
    return results


def evaluate(
    report: dict,
    *,
    max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
    min_speedup: float | None = None,
    baseline: dict | None = None,
    tolerance: float | None = None,
) -> GateResult:
    results = _results(report, "report")
    if not 0 <= max_slowdown < 1:
        raise CarveError(f"`max_slowdown` must be in [0, 1), got {max_slowdown}")
    if tolerance is not None and not 0 <= tolerance < 1:
        raise CarveError(f"`tolerance` must be in [0, 1), got {tolerance}")
    if min_speedup is not None and not (math.isfinite(min_speedup) and min_speedup > 0):
        raise CarveError(f"`min_speedup` must be a positive number, got {min_speedup}")
    tolerance = max_slowdown if tolerance is None else tolerance
    base = {}
    if baseline is not None:
        for b in _results(baseline, "baseline"):
            base[_key(b)] = _speedup(b, "baseline")[0]
    out = GateResult(True)
    for r in results:
        med, lo, hi = _speedup(r, "report")
        threshold = 1 - max_slowdown
        reasons = []
        if hi < threshold:
            reasons.append(f"{_label(r)}: B is slower than A ({med:.2f}x, CI up to {hi:.2f}x < {threshold:.2f}x)")
        if min_speedup is not None:
            threshold = max(threshold, min_speedup)
            if hi < min_speedup:
                reasons.append(
                    f"{_label(r)}: speed-up {med:.2f}x (CI up to {hi:.2f}x) is below the required {min_speedup:.2f}x"
                )
        bmed = base.get(_key(r))
        if bmed is not None:
            floor = bmed * (1 - tolerance)
            if hi < floor:
                reasons.append(
                    f"{_label(r)}: speed-up {med:.2f}x (CI up to {hi:.2f}x) lost more than "
                    f"{tolerance:.0%} of the baseline's {bmed:.2f}x"
                )
        elif baseline is not None:
            out.notes.append(f"{_label(r)} is not in the baseline report")
        out.rows.append(
            {
                "config": _label(r),
                "median": med,
                "low": lo,
                "high": hi,
                "threshold": threshold,
                "baseline": bmed,
                "ok": not reasons,
            }
        )
        out.failures += reasons
    out.passed = not out.failures
    return out


def parse_fraction(text: str) -> float:
    """``5%`` or ``0.05``."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise CarveError(f"not a fraction: {text!r} (use 5% or 0.05)") from None
    if not math.isfinite(value):
        raise CarveError(f"not a fraction: {text!r} (use 5% or 0.05)")
    return value
