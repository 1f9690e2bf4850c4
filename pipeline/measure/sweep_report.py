"""A sweep's ``results.json`` (kind ``carve.sweep``, written by ``carve sweep``) for people: a Markdown table of the
points with the Pareto-optimal ones marked, and a matplotlib plot of accuracy against measured latency with the front
drawn through them."""

from __future__ import annotations

from pathlib import Path


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
