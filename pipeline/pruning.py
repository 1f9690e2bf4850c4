"""The whole pruning flow, shared by ``carve prune``, the Python API and recipes:

    analyse -> plan (criterion + allocator, ratio or MAC/param target) -> [fuse exact] -> [lsq refit]
    -> [bias correction | BN re-estimation] -> surgery -> verification

Repairs work on a *working* copy of the model whose removed consumer columns are zeroed, so verification is always
the same statement: the pruned model equals the (repaired) working model in ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CarveError
from .graph import Model


@dataclass
class PruneOptions:
    criterion: str = "l1"
    ratio: float = 0.5
    target_macs: float | None = None
    target_params: float | None = None
    allocator: str = "uniform"
    round_to: int = 1
    keep_min: int = 1
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    criterion_options: dict[str, Any] = field(default_factory=dict)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    fuse: str | None = None  # "exact" | "lsq"
    repair: str | None = None  # "bias" | "bn"
    ridge: float = 1e-3
    fuse_gate: float = 1e-3
    verify: bool = True

    def check(self, calib: Any) -> None:
        if self.fuse not in (None, "exact", "lsq"):
            raise CarveError(f"--fuse must be exact or lsq, got {self.fuse!r}")
        if self.repair not in (None, "bias", "bn"):
            raise CarveError(f"--repair must be bias or bn, got {self.repair!r}")
        if (self.fuse == "lsq" or self.repair) and calib is None:
            what = "--fuse lsq" if self.fuse == "lsq" else f"--repair {self.repair}"
            raise CarveError(f"{what} needs calibration data", hint="give --calib FILE.npz | FOLDER | digits")


def prune_model(
    model: Model,
    opts: PruneOptions,
    *,
    calib: Any = None,
    command: str | None = None,
    inplace: bool = False,
    progress=None,
) -> tuple[Model, dict]:
    """Prune ``model`` as ``opts`` says; returns the pruned model and a summary (also stored in its metadata)."""
    from .channels import analyse
    from .planning import plan
    from .rewrite import ensure_biases
    from .surgery import prune, zero_removed

    opts.check(calib)
    if not inplace:
        model = model.copy()
    if opts.fuse == "lsq" or opts.repair == "bias":
        ensure_biases(model)  # the refit's intercept needs a bias that is cut with its layer
    analysis = analyse(model)
    p = plan(
        analysis,
        criterion=opts.criterion,
        ratio=opts.ratio,
        round_to=opts.round_to,
        keep_min=opts.keep_min,
        exclude=opts.exclude,
        allocator=opts.allocator,
        seed=opts.seed,
        calib=calib,
        criterion_options=opts.criterion_options,
        target_macs=opts.target_macs,
        target_params=opts.target_params,
        **opts.allocator_options,
    )
    repairs: dict[str, Any] = {}
    work = None
    if opts.fuse == "exact":
        from plugins.passes.fuse import fuse_exact

        work, details, n = fuse_exact(model, p, gate=opts.fuse_gate)
        repairs["fused_channels"] = n
    if opts.fuse == "lsq" or opts.repair:
        from plugins.passes.reconstruct import reconstruct

        work = work if work is not None else zero_removed(model, p)
        for method in [m for m in ("lsq" if opts.fuse == "lsq" else None, opts.repair) if m]:
            work, details, stats = reconstruct(
                model, p, calib, method=method, ridge=opts.ridge, working=work, progress=progress
            )
            repairs[method] = len(details)
    reference = (zero_removed(work, p) if work is not None else zero_removed(model, p)) if opts.verify else None
    base = work if work is not None else model
    pruned = prune(base, p, command=command, inplace=True)
    import json

    summary = json.loads(pruned.metadata()["carve.prune"])
    if repairs:
        summary["repairs"] = repairs
    if calib is not None:
        summary["calibration"] = calib.describe()
    if reference is not None:
        from .ortutil import verify_equal

        summary["verify"] = verify_equal(reference, pruned)
    from .surgery import record

    record(pruned, "prune", summary, command=command, replace_last=True)
    return pruned, summary


def options_dict(opts: PruneOptions) -> dict:
    return asdict(opts)
