"""Where the shared data and trained weights live (CIFAR-10 arrays, CIFAR ResNet weights).

They are never part of the repository. The location is ``$CARVE_SHARED`` when set, else ``../shared`` beside the
checkout. Callers that need a file get ``None`` when it is absent and decide (tests skip with the reason, the zoo falls
back to random weights and says so).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "CARVE_SHARED"


def shared_dir() -> Path | None:
    env = os.environ.get(ENV)
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    p = Path(__file__).resolve().parents[2].parent / "shared"  # <repo>/../shared
    return p if p.is_dir() else None


def shared_file(*parts: str) -> Path | None:
    base = shared_dir()
    if base is None:
        return None
    p = base.joinpath(*parts)
    return p if p.exists() else None


def missing_reason(*parts: str) -> str:
    """A sentence for a skip or a warning: which file is missing and how to point carve at it."""
    where = shared_dir()
    rel = "/".join(parts)
    if where is None:
        return f"shared data not found (set ${ENV} or put it at ../shared beside the checkout); needs {rel}"
    return f"{where / rel} is missing"


def data_input(source: str | os.PathLike | None) -> str | os.PathLike | None:
    """A data source as the file it reads, for the output-overlap check: ``shared:PATH`` resolved under
    ``$CARVE_SHARED`` (None when absent), anything else as given."""
    if isinstance(source, str) and source.startswith("shared:"):
        return shared_file(*[p for p in source[len("shared:") :].split("/") if p])
    return source
