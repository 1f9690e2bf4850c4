"""Fine-tuning options as recipes write them: a mapping of :class:`~carve.pipeline.training.finetune.FinetuneOptions`
fields plus the ``teacher`` choice, read the same way by the ``finetune`` and ``gradual`` passes."""

from __future__ import annotations

from typing import Any

from carve.pipeline.config import from_mapping
from carve.pipeline.errors import CarveError
from carve.pipeline.training.finetune import FinetuneOptions


def finetune_options(options: dict[str, Any], where: str) -> tuple[FinetuneOptions, str]:
    """FinetuneOptions from a recipe mapping, plus its ``teacher`` choice (original | none)."""
    options = dict(options)
    teacher = str(options.pop("teacher", "original"))
    if teacher not in ("original", "none"):
        raise CarveError(f"{where}: teacher must be original or none, got {teacher!r}")
    return from_mapping(FinetuneOptions, options, where=where), teacher
