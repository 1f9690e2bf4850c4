"""A sweep's ``results.json`` (kind ``carve.sweep``, written by ``carve sweep``) for people: a Markdown table of the
points with the Pareto-optimal ones marked, and a matplotlib plot of accuracy against measured latency with the front
drawn through them."""

from __future__ import annotations

import math
from pathlib import Path


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sweep_doc(doc: dict, where: str) -> None:
    """A sweep's results.json at the door: the sections and, per finished point, the fields the table and the plot
    read, with their types; one line naming the file and the field (issue 21)."""
    from carve.pipeline.errors import CarveError

    def bad(what: str) -> CarveError:
        return CarveError(f"{where}: {what}", hint="render the results.json `carve sweep` wrote, unedited")

    s, obj, summary = doc.get("sweep"), doc.get("objective"), doc.get("summary")
    if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("model"), str):
        raise bad("`sweep` must name the sweep and its model (`sweep.name`, `sweep.model`)")
    if not isinstance(obj, dict) or obj.get("accuracy") not in ("top1", "top1_agreement"):
        raise bad("`objective.accuracy` must be top1 or top1_agreement")
    if not (obj.get("latency_ms_reference") is None or _num(obj["latency_ms_reference"])):
        raise bad("`objective.latency_ms_reference` must be a number")
    if not isinstance(summary, dict) or not all(_num(summary.get(k)) for k in ("points", "ok", "failed")):
        raise bad("`summary` must count points, ok and failed")
    points = doc.get("points")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise bad("`points` must be a list of point records")
    for i, p in enumerate(points):
        if not isinstance(p.get("id"), str) or p.get("status") not in ("ok", "failed"):
            raise bad(f"points[{i}] needs an `id` and a `status` (ok or failed)")
        if p["status"] == "ok":
            _check_done_point(p, f"points[{i}]", bad)


def _check_done_point(p: dict, at: str, bad) -> None:
    a, sp = p.get("point"), p.get("speedup")
    if not isinstance(a, dict) or not all(k in a for k in ("criterion", "allocator", "target_kind", "repair")):
        raise bad(f"{at}.point must give criterion, allocator, target_kind, target, repair, finetune_epochs")
    if not _num(a.get("target")) or not _num(a.get("finetune_epochs")):
        raise bad(f"{at}.point.target and finetune_epochs must be numbers")
    if not isinstance(sp, dict) or not all(_num(sp.get(k)) for k in ("median", "ci_low", "ci_high")):
        raise bad(f"{at}.speedup needs median, ci_low and ci_high as numbers")
    for k in ("macs_ratio", "params_ratio", "latency_ms"):
        if not _num(p.get(k)):
            raise bad(f"{at}.{k} must be a number, not {p.get(k)!r}")
    for k in ("top1", "top1_agreement", "top1_original"):
        if not (p.get(k) is None or _num(p[k])):
            raise bad(f"{at}.{k} must be a number or null")
    if not isinstance(p.get("measured", ""), str):
        raise bad(f"{at}.measured must be text")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def to_markdown(doc: dict, *, title: str = "carve sweep") -> str:
    s, obj, summary = doc["sweep"], doc["objective"], doc["summary"]
    acc = obj["accuracy"]
    out = [f"# {title}", ""]
    if doc.get("command"):
        out += [f"`{doc['command']}`", ""]
    out += [
        f"Sweep `{s['name']}` on `{s['model']}`: {summary['points']} points, {summary['ok']} done, "
        f"{summary['failed']} failed ({s.get('executor', 'local')} executor). Pareto-optimal points (higher "
        f"{acc}, lower latency) are marked **\\***.",
        "",
        "| | point | criterion | allocator | target | repair | fine-tune epochs | precision | MACs | params | top-1 | "
        "agreement | latency ms (reference / speed-up) | own A/B: original, pruned ms (medians) | "
        "speed-up: median of paired ratios (95% CI) |",
        "|" + "---|" * 15,
    ]
    ok = [p for p in doc["points"] if p["status"] == "ok"]
    ok.sort(key=lambda p: p["latency_ms"])
    for p in ok:
        a, sp = p["point"], p["speedup"]
        star = "**\\***" if p.get("pareto") else ""
        out.append(
            f"| {star} | `{p['id']}` | {a['criterion']} | {a['allocator']} | "
            f"{a['target_kind']} {a['target']:g} | {a['repair']} | {a['finetune_epochs']:g} | "
            f"{'INT8' if a.get('quantize', 'none') == 'int8' else 'FP32'} | {p['macs_ratio']:.1%} | "
            f"{p['params_ratio']:.1%} | {_pct(p.get('top1'))} | {_pct(p.get('top1_agreement'))} | "
            f"{p['latency_ms']:.4g} | {_ms(p.get('latency_ms_original'))}, {_ms(p.get('latency_ms_measured'))} "
            f"({p.get('clock') or 'wall'} clock) | {sp['median']:.2f}x ({sp['ci_low']:.2f}-{sp['ci_high']:.2f}) |"
        )
    first = ok[0] if ok else None
    if first:
        orig = first.get("top1_original")
        out += [
            "",
            f"Measured on {first['measured']}; the original model: top-1 {_pct(orig)}, "
            f"{obj['latency_ms_reference']:.4g} ms. {obj['note']} (each speed-up comes from rounds interleaved with "
            "the original, so points measured at different times on a busy machine stay comparable).",
        ]
    failed = [p for p in doc["points"] if p["status"] != "ok"]
    if failed:
        out += ["", "## Failed points", ""] + [f"- `{p['id']}`: {p['error']}" for p in failed]
    env = doc.get("environment")
    if env:
        out += ["", "## Environment", "", "; ".join(f"{k}: {v}" for k, v in env.items() if not isinstance(v, dict))]
    return "\n".join(out) + "\n"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def plots(doc: dict, directory: str | Path) -> list[Path]:
    """``pareto.png``: accuracy against latency, every point, the front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    acc = doc["objective"]["accuracy"]
    ok = [p for p in doc["points"] if p["status"] == "ok" and p.get(acc) is not None]
    if not ok:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rest = [p for p in ok if not p.get("pareto")]
    front = sorted((p for p in ok if p.get("pareto")), key=lambda p: p["latency_ms"])
    ax.scatter([p["latency_ms"] for p in rest], [p[acc] * 100 for p in rest], c="gray", s=18, label="point")
    ax.scatter(
        [p["latency_ms"] for p in front], [p[acc] * 100 for p in front], c="tab:red", s=30, label="Pareto-optimal"
    )
    ax.step([p["latency_ms"] for p in front], [p[acc] * 100 for p in front], where="post", c="tab:red", lw=1, alpha=0.7)
    labels = [
        ax.annotate(p["id"], (p["latency_ms"], p[acc] * 100), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for p in front
    ]
    ref, orig = doc["objective"].get("latency_ms_reference"), ok[0].get(f"{acc}_original")
    if ref and orig is not None:
        ax.scatter([ref], [orig * 100], marker="*", c="black", s=60, label="original")
    ax.set_xlabel(f"latency (ms, {ok[0]['measured']})")
    ax.set_ylabel(f"{acc.replace('_', ' ')} (%)")
    ax.set_title(doc["sweep"]["name"], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    separate_labels(fig, labels)
    p = directory / "pareto.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [p]


def separate_labels(fig, labels: list, *, step: float = 7.0, tries: int = 12) -> None:
    """Move point labels apart where they overlap: each label in turn is shifted (in points: up, down, further up,
    ...) until its box overlaps no label placed before it and stays inside the figure."""
    renderer = fig.canvas.get_renderer()
    fig_box = fig.bbox
    placed = []
    for label in labels:
        x0, y0 = label.xyann
        for k in range(tries + 1):
            dy = step * ((k + 1) // 2) * (1 if k % 2 else -1) if k else 0.0
            label.xyann = (x0, y0 + dy)
            box = label.get_window_extent(renderer)
            inside = box.y0 >= fig_box.y0 and box.y1 <= fig_box.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
        placed.append(label.get_window_extent(renderer))
