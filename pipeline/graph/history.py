"""What carve did to a model, recorded in the model itself: ``metadata_props`` ``carve.history`` (a JSON list of
steps: what, with which carve, by which command, when, and the step's summary), ``carve.version`` and
``carve.<step>`` (the last summary of each step). A deployed file explains itself.

The time recorded is now, or ``SOURCE_DATE_EPOCH`` when set (the reproducible-builds convention): two identical runs
then write byte-identical files."""

from __future__ import annotations

import json
import os
import time

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.version import __version__


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
        "command": _utf8(command) if command else "python API",
        "time": timestamp(),
        "summary": summary,
    }
    history.append(entry)
    values = {"carve.version": __version__, "carve.history": json.dumps(history), f"carve.{step}": json.dumps(summary)}
    if command:
        values["carve.command"] = _utf8(command)
    for key, value in values.items():
        if key in props:
            props[key].value = value
        else:
            p = model.proto.metadata_props.add()
            p.key, p.value = key, value


def _utf8(text: str) -> str:
    """Protobuf strings must be UTF-8: undecodable file-name bytes (surrogate escapes) become backslash escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def timestamp() -> str:
    """UTC now, or ``SOURCE_DATE_EPOCH`` (seconds since 1970) when set, as ``YYYY-MM-DDTHH:MM:SSZ``."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None or epoch == "":
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))
    except (ValueError, OverflowError, OSError):
        raise CarveError(
            f"SOURCE_DATE_EPOCH={epoch!r} is not a time", hint="set it to whole seconds since 1970, e.g. 1700000000"
        ) from None


def history(model: Model) -> list[dict]:
    """The recorded steps (empty for a model carve never wrote)."""
    text = model.metadata().get("carve.history")
    return json.loads(text) if text else []
