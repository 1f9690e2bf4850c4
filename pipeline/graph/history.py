"""What carve did to a model, recorded in the model itself: ``metadata_props`` ``carve.history`` (a JSON list of
steps: what, with which carve, by which command, when, and the step's summary), ``carve.version`` and
``carve.<step>`` (the last summary of each step). A deployed file explains itself."""

from __future__ import annotations

import json
import time

from pipeline.graph.model import Model
from pipeline.version import __version__


def record(model: Model, step: str, summary: dict, *, command: str | None = None, replace_last: bool = False) -> None:
    """Append a step to the model's ``carve.history`` metadata and refresh ``carve.version`` / ``carve.<step>``.

    ``replace_last`` overwrites the last history entry (a step that completes its own summary)."""
    props = {p.key: p for p in model.proto.metadata_props}
    history = json.loads(props["carve.history"].value) if "carve.history" in props else []
    if replace_last and history and history[-1]["step"] == step:
        history.pop()
    entry = {
        "step": step,
        "carve": __version__,
        "command": command or "python API",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": summary,
    }
    history.append(entry)
    values = {"carve.version": __version__, "carve.history": json.dumps(history), f"carve.{step}": json.dumps(summary)}
    if command:
        values["carve.command"] = command
    for key, value in values.items():
        if key in props:
            props[key].value = value
        else:
            p = model.proto.metadata_props.add()
            p.key, p.value = key, value


def history(model: Model) -> list[dict]:
    """The recorded steps (empty for a model carve never wrote)."""
    text = model.metadata().get("carve.history")
    return json.loads(text) if text else []
