"""The machine a measurement ran on: CPU, governor, library versions, GPU and driver (``nvidia-smi``) where present.
Reports carry it so a number can be traced to where it was measured."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from carve.pipeline.measure.backends.trt import tensorrt_version
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.version import __version__


def environment(cfg: MeasureConfig | None = None) -> dict:
    import numpy
    import onnx

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    except OSError:
        env["cpu"] = platform.processor()
    gov = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if gov.exists():
        env["cpu_governor"] = gov.read_text().strip()
    env["carve"] = __version__
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    trt = tensorrt_version()
    if trt:
        env["tensorrt"] = trt
    try:
        q = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if q.returncode == 0 and q.stdout.strip():
            env["nvidia_smi"] = q.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return env
