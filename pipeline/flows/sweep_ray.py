"""Sweeps on a Ray cluster (``carve sweep ... --ray auto``); Ray is the optional extra ``pip install "carve[ray]"``.

How a point runs on Ray (https://docs.ray.io: tasks, actors, scheduling strategies):

- **Build** is a Ray task with a resource request: ``num_cpus=1``, plus ``num_gpus=1`` when the sweep measures on a
  GPU (``bench.backend`` trt / torch-cuda, or ``device: cuda``). It prunes, repairs, fine-tunes and evaluates as
  ``carve run`` does (:func:`carve.pipeline.flows.sweep.build_point`) in a temporary folder of the node and returns the
  original and final models as bytes with the run report: nothing stays on the node's disk.
- **Timing** goes through one ``Timer`` actor per sweep (a sweep has one device kind: its ``bench`` section). An actor
  lives on one node and runs one call at a time, so every point is measured on the same machine and never two at
  once. The CPU timer is pinned to the driver's node (a node-affinity strategy, soft, so a driver without room still
  gets one) and reserves the CPUs it measures with, so Ray schedules no build task on them; the GPU timer asks for a
  GPU and Ray picks one GPU node.
- The **driver** writes the models and records (``points/<id>.json``, ``models/<id>.onnx``) as each point comes back,
  exactly as the local executor does, so ``--resume`` and ``results.json`` are the same.

Every node needs carve (and the data files the sweep names, at the same paths) installed; ``local`` starts a
one-machine cluster here.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carve.pipeline.errors import CarveError
from carve.pipeline.flows.sweep import Point, Sweep, build_point, from_threads, record_failed, record_ok, time_point

INSTALL_HINT = 'pip install "carve[ray]"'


def import_ray():
    try:
        import ray
    except ImportError:
        raise CarveError("`ray` needs Ray, which is not installed", hint=INSTALL_HINT) from None
    return ray


def _build(sweep: Sweep, point: Point):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return build_point(sweep, point)


class Timer:
    """Measures points one at a time, on the node it was placed on."""

    def time(self, sweep: Sweep, built) -> dict:
        return time_point(sweep, built)

    def node(self) -> str:
        import socket

        return socket.gethostname()


def _cause(exc: BaseException) -> BaseException | str:
    """The user's error inside a RayTaskError (its `cause`), else the Ray error's first line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


@dataclass
class RayExecutor:
    """``address``: ``auto`` (a running cluster), ``local`` (start one on this machine) or ``ray://HOST:PORT``."""

    address: str = "auto"

    def connect(self) -> None:
        ray = import_ray()
        if ray.is_initialized():
            return
        # this checkout's packages for the workers of a cluster started here (a remote cluster has carve installed)
        root = str(Path(__file__).resolve().parents[2])
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}}
        try:
            if self.address == "local":
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
                ray.init(num_cpus=cores, runtime_env=env, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CarveError(
                f"`ray={self.address}`: cannot connect ({msg})",
                hint="start one with `ray start --head`, or give `ray=local`",
            ) from None

    def run(self, sweep: Sweep, points: list[Point], started, finished) -> None:
        if not points:
            return
        ray = import_ray()
        self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        gpu = 1 if sweep.gpu else 0
        timer_cpus = max(from_threads(sweep.bench.get("threads", 1)))
        timer_opts: dict[str, Any] = {"num_cpus": timer_cpus, "num_gpus": gpu, "max_concurrency": 1}
        if not gpu:
            node = ray.get_runtime_context().get_node_id()
            timer_opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        timer = ray.remote(Timer).options(**timer_opts).remote()
        build = ray.remote(_build).options(num_cpus=1, num_gpus=gpu, max_retries=0)
        # keep as many builds in flight as the cluster runs at once, so `running` means running
        cpus = int(ray.cluster_resources().get("CPU", 1))
        width = max(1, cpus - timer_cpus)
        if gpu:
            width = min(width, max(1, int(ray.cluster_resources().get("GPU", 1))))
        queue = list(points)
        builds: dict[Any, tuple[Point, float]] = {}
        timings: dict[Any, tuple[Point, Any, float]] = {}
        try:
            while queue or builds or timings:
                while queue and len(builds) < width:
                    p = queue.pop(0)
                    builds[build.remote(sweep, p)] = (p, time.perf_counter())
                    started(p)
                ready, _ = ray.wait([*builds, *timings], num_returns=1)
                ref = ready[0]
                if ref in builds:
                    p, t0 = builds.pop(ref)
                    try:
                        built = ray.get(ref)  # the models come back to the driver
                    except Exception as exc:
                        finished(p, record_failed(sweep, p, _cause(exc), time.perf_counter() - t0), None)
                        continue
                    timings[timer.time.remote(sweep, built)] = (p, built, t0)
                else:
                    p, built, t0 = timings.pop(ref)
                    try:
                        bench = ray.get(ref)
                    except Exception as exc:
                        finished(p, record_failed(sweep, p, _cause(exc), time.perf_counter() - t0), None)
                        continue
                    finished(p, record_ok(sweep, built, bench, time.perf_counter() - t0), built.final)
        finally:
            ray.kill(timer)
            sys.stdout.flush()
