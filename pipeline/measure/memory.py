"""Peak memory of loading and running a model, measured in a fresh process.

``python -m carve.pipeline.measure.memory '{"model": "m.onnx", "backend": "ort", "batch": 8, ...}'`` imports what it
needs, notes its resident memory, builds an engine (ONNX Runtime's CPU arena disabled so the peak is the model's, not
the allocator's high-water mark), runs it a few times and prints JSON: the peak resident memory above that baseline
(VmHWM - VmRSS before loading, from /proc/self/status), plus the memory figures the engine reports (engine size, device
memory). A fresh process per measurement keeps one model's allocations out of the other's figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_here(
    model: str, backend: str, batch: int, threads: int, precision: str, device: str, options: dict | None = None
) -> dict:
    """``options``: further EngineConfig fields (cuda_graphs, channels_last, compile, provider_options), so the engine
    measured here is built as the timed one was."""
    from carve.pipeline.measure.backends import EngineConfig, build

    base = _status("VmRSS:")
    engine = build(
        backend,
        model,
        EngineConfig(
            batch=batch, threads=threads, precision=precision, device=device, memory_arena=False, **(options or {})
        ),
    )
    for _ in range(3):
        engine.run()
    peak = _status("VmHWM:")
    out = {"backend": backend, "batch": batch, **engine.memory()}
    if base is not None and peak is not None:
        out["peak_rss_bytes"] = peak - base
    return out


def measure_in_fresh_process(
    model: str | Path,
    backend: str = "ort",
    batch: int = 1,
    threads: int = 1,
    precision: str = "fp32",
    device: str = "cpu",
    timeout: float = 600,
    options: dict | None = None,
) -> dict:
    spec = {
        "model": str(model),
        "backend": backend,
        "batch": batch,
        "threads": threads,
        "precision": precision,
        "device": device,
        "options": options or {},
    }
    cmd = [sys.executable, "-m", "carve.pipeline.measure.memory", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.strip().startswith("hint:")]
        return {"error": (lines or ["failed"])[-1][:300]}  # the exception's line, not a hint under it
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    """The child: one argument, the measurement as JSON (model, backend, batch, threads, precision, device and
    further EngineConfig fields as ``options``)."""
    spec = json.loads(sys.argv[1])
    # import before the baseline so that library code is not counted as the model's memory
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401

    import carve.pipeline.measure.backends  # noqa: F401

    keys = ("model", "backend", "batch", "threads", "precision", "device", "options")
    print(json.dumps(measure_here(*(spec[k] for k in keys))))


if __name__ == "__main__":
    main()
