"""Where a zoo model's weights come from: trained checkpoints in ../shared, training on digits, a file, or random."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from carve.pipeline.data.shared import missing_reason, shared_dir
from carve.pipeline.errors import CarveError

from .registry import ModelSpec


def shared_checkpoint(spec: ModelSpec) -> Path | None:
    if not spec.trained or not spec.trained.startswith("shared:"):
        return None
    base = shared_dir()
    if base is None:
        return None
    hits = sorted((base / "models" / "cifar10").glob(spec.trained.split(":", 1)[1]))
    return hits[0] if hits else None


def load_state(model: nn.Module, path: Path) -> None:
    """Load a checkpoint (a state dict, or {"state_dict": ...}; keys may carry a ``module.`` prefix), strictly."""
    try:
        # data only: a .th/.pt file is user-supplied bytes, and a pickle can run code as it loads (issue 21)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CarveError(
            f"{path}: not a readable PyTorch checkpoint, or not data only ({first[:160]})",
            hint="carve reads weights with torch.load(weights_only=True); save a plain state_dict (tensors only)",
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CarveError(f"{path}: no state dict inside")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    # older checkpoints lack BatchNorm's num_batches_tracked (a training counter that inference never reads)
    for k in [k for k in own if k.endswith("num_batches_tracked") and k not in state]:
        state[k] = own[k]
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        what = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"shape mismatch at {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}"
        )
        raise CarveError(f"{path}: does not fit this model ({what})")
    model.load_state_dict(state)


def with_weights(spec: ModelSpec, model: nn.Module, weights: str) -> tuple[nn.Module, str, list[str]]:
    """Apply ``weights`` ("auto", "random" or a path); returns the model, where the weights came from, warnings."""
    warnings: list[str] = []
    if weights == "random":
        return model, "random", warnings
    if weights != "auto":
        load_state(model, Path(weights))
        return model, str(weights), warnings
    if spec.trained == "digits":
        from .train import lenet5_digits

        trained, metrics = lenet5_digits()
        model.load_state_dict(trained.state_dict())
        return model, f"trained on digits (test accuracy {metrics['test_acc']:.3f})", warnings
    if spec.trained and spec.trained.startswith("cache:"):
        from .train import trained_in_cache

        return trained_in_cache(spec, model, warnings)
    ckpt = shared_checkpoint(spec)
    if ckpt is not None:
        load_state(model, ckpt)
        return model, f"trained: {ckpt.name}", warnings
    if spec.trained:
        warnings.append(f"trained weights not found ({missing_reason('models', 'cifar10')}); random weights used")
    return model, "random", warnings
