"""The Pareto front of a sweep: the points no other point beats on both accuracy (higher is better) and latency (lower
is better).

A point *dominates* another when it is at least as accurate and at least as fast, and strictly better in one of the
two. The Pareto-optimal points are those nothing dominates; two identical points are both optimal (neither strictly
beats the other). Points without both numbers (failed points, points without a measurement) take no part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` = (accuracy, latency) dominates ``b``: no worse in both, strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_ids(points: Iterable[Mapping[str, Any]], accuracy: str, latency: str) -> list[str]:
    """Ids of the Pareto-optimal points (``point[accuracy]`` up, ``point[latency]`` down), fastest first."""
    scored = [
        (p["id"], (float(p[accuracy]), float(p[latency])))
        for p in points
        if p.get(accuracy) is not None and p.get(latency) is not None
    ]
    front = [(pid, s) for pid, s in scored if not any(dominates(o, s) for _, o in scored)]
    return [pid for pid, _ in sorted(front, key=lambda t: (t[1][1], -t[1][0], t[0]))]


def mark_pareto(points: list[dict], accuracy: str, latency: str) -> list[str]:
    """Set ``pareto`` on every point (True on the front) and return the front's ids."""
    front = pareto_ids(points, accuracy, latency)
    on = set(front)
    for p in points:
        p["pareto"] = p["id"] in on
    return front
