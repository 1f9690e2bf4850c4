"""Reports: the JSON documents carve writes (``carve bench``, ``carve eval``, ``carve run``), rendered as Markdown and
plots for people.

Every document has ``schema_version`` and ``kind`` (docs/report-schema.md). :func:`load_report` checks them and
refuses what it cannot read. :func:`to_markdown` renders each known section with its own renderer
(:data:`SECTIONS`); a section it does not know is shown as JSON rather than dropped, so a newer producer never loses
information in an older renderer. :func:`plots` draws latency distributions and speed-ups with their intervals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from carve.pipeline.errors import CarveError

SCHEMA_VERSION = 1


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CarveError(f"{path}: no such report")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CarveError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise CarveError(f"{path}: not a carve report (no schema_version)")
    version = doc["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CarveError(f"{path}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise CarveError(
            f"{path}: schema version {doc['schema_version']} is newer than this carve understands ({SCHEMA_VERSION})",
            hint="upgrade carve",
        )
    return doc


def merge(docs: list[dict]) -> dict:
    """Several reports as one (e.g. a bench report and an eval report of the same models)."""
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": "+".join(d.get("kind", "?") for d in docs)}
    for d in docs:
        for k, v in d.items():
            if k in ("schema_version", "kind"):
                continue
            if k == "accuracy" and "accuracy" in out:
                out.setdefault("accuracy_more", []).append(v)
            else:
                out.setdefault(k, v)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def render_models(doc: dict) -> list[str]:
    m = doc["models"]
    lines = ["| | model | params | MACs | ONNX size |", "|---|---|---|---|---|"]
    for key, label in (("a", "A (baseline)"), ("b", "B (candidate)")):
        r = m[key]
        lines.append(f"| {label} | `{r['name']}` | {r['params']:,} | {r['macs']:,} | {r['onnx_bytes'] / 1e6:.2f} MB |")
    return lines


def render_results(doc: dict) -> list[str]:
    lines = [
        "| backend | batch | threads | A median (p90, p99) ms | B median (p90, p99) ms | speed-up (95% CI) | "
        "MAC ratio | efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        a, b, s = r["a"], r["b"], r["speedup"]
        eff = f"{r['speedup_efficiency']:.2f}" if r.get("speedup_efficiency") is not None else "-"
        mac = f"{r['mac_ratio']:.3f}" if r.get("mac_ratio") is not None else "-"
        lines.append(
            f"| {r['backend']} {r['device']} {r['precision']} | {r['batch']} | {r['threads']} | "
            f"{_fmt_ms(a['median_ms'])} ({_fmt_ms(a['p90_ms'])}, {_fmt_ms(a['p99_ms'])}) | "
            f"{_fmt_ms(b['median_ms'])} ({_fmt_ms(b['p90_ms'])}, {_fmt_ms(b['p99_ms'])}) | "
            f"**{s['median']:.2f}x** ({s['ci_low']:.2f}-{s['ci_high']:.2f}) | {mac} | {eff} |"
        )
    applied = sorted({engine_settings(r["a"].get("engine", {})) for r in doc["results"]} - {""})
    lines.append("")
    if applied:
        lines.append("Engine settings as applied (A and B alike): " + " / ".join(applied) + ".")
        lines.append("")
    lines.append(
        "Speed-up = time(A) / time(B), median of per-round ratios over interleaved rounds, with a bootstrap "
        "confidence interval. The MAC ratio is MACs(B)/MACs(A): a static count, not a speed-up; efficiency = "
        "speed-up x MAC ratio (1.0 = the speed-up the MAC reduction promises)."
    )
    return lines


def engine_settings(info: dict) -> str:
    """What an engine's info() says it ran with, in a few words (only what it reports: nothing is assumed)."""
    parts = []
    if "providers" in info:
        parts.append(info["providers"][0])
    if "cuda_graphs" in info:
        parts.append("CUDA graphs" if info["cuda_graphs"] else "no CUDA graphs")
        if "cuda_graphs_fallback" in info:
            parts[-1] += f" ({info['cuda_graphs_fallback']})"
    if info.get("channels_last"):
        parts.append("channels_last")
    if info.get("compile"):
        parts.append(f"torch.compile {info['compile']}")
    if info.get("program") == "dynamic":
        parts.append(f"dynamic program ({info.get('dynamic_reason', '')})")
    if info.get("fp16_graph"):
        parts.append("FP16 graph")
    if info.get("fp32_fallback_ops"):
        parts.append(f"FP32 fallback for {', '.join(info['fp32_fallback_ops'])}")
    return ", ".join(parts)


def render_memory(doc: dict) -> list[str]:
    mem = doc["memory"]
    lines = ["| model | batch | peak RSS above baseline | engine | device memory |", "|---|---|---|---|---|"]
    for key in ("a", "b"):
        for batch, m in mem.get(key, {}).items():
            if "error" in m:
                lines.append(f"| {key.upper()} | {batch} | error: {m['error']} | | |")
                continue
            rss = f"{m['peak_rss_bytes'] / 2**20:.1f} MiB" if "peak_rss_bytes" in m else "-"
            eng = f"{m['engine_bytes'] / 2**20:.1f} MiB" if "engine_bytes" in m else "-"
            dev = f"{m['device_memory_bytes'] / 2**20:.1f} MiB" if "device_memory_bytes" in m else "-"
            lines.append(f"| {key.upper()} | {batch} | {rss} | {eng} | {dev} |")
    return lines


def render_agreement(doc: dict) -> list[str]:
    a = doc["agreement"]
    if not a.get("samples"):
        return ["no agreement measured"]
    top = f", top-1 agreement {a['top1_agreement']:.1%}" if "top1_agreement" in a else ""
    return [
        f"On {a['samples']} {a['inputs']} inputs: max |diff| {a['max_abs']:.3g} "
        f"({a['max_rel']:.2%} of A's output scale), cosine {a['cosine']:.4f}{top}."
    ]


def _acc_line(name: str, r: dict) -> str:
    parts = [f"`{name}`"]
    if "top1" in r:
        parts.append(f"top-1 {r['top1']:.2%}, top-5 {r['top5']:.2%}")
    if "reference" in r:
        ref = r["reference"]
        parts.append(f"agreement with the reference {ref['top1_agreement']:.2%} (KL {ref['kl_mean']:.4f})")
    return f"- {': '.join([parts[0], '; '.join(parts[1:])])} on {r.get('samples', '?')} samples"


def render_accuracy(doc: dict) -> list[str]:
    acc = doc["accuracy"]
    if "original" in acc or "final" in acc:  # carve run
        return [_acc_line(k, v) for k, v in acc.items()]
    lines = [_acc_line(acc.get("model", "model"), acc)]
    for more in doc.get("accuracy_more", []):
        lines.append(_acc_line(more.get("model", "model"), more))
    return lines


def render_passes(doc: dict) -> list[str]:
    lines = ["| pass | exact | changed | seconds | output error (max rel.) |", "|---|---|---|---|---|"]
    for p in doc["passes"]:
        err = f"{p['error']['max_rel']:.2e}" if p.get("error") else "-"
        lines.append(f"| {p['pass']} | {'yes' if p['exact'] else 'no'} | {p['changed']} | {p['seconds']} | {err} |")
    return lines


def render_cost(doc: dict) -> list[str]:
    c = doc["cost"]
    return [
        f"params {c['params_before']:,} -> {c['params_after']:,} ({c['params_ratio']:.1%}); "
        f"MACs {c['macs_before']:,} -> {c['macs_after']:,} ({c['macs_ratio']:.1%}; a MAC ratio, not a speed-up)"
    ]


def render_thresholds(doc: dict) -> list[str]:
    t = doc["thresholds"]
    if t["passed"]:
        return [f"all thresholds met: {t['limits']}"]
    return [f"- NOT MET: {f}" for f in t["failures"]]


def render_environment(doc: dict) -> list[str]:
    e = doc["environment"]
    keys = ["cpu", "logical_cpus", "gpu", "nvidia_smi", "cpu_governor", "onnxruntime", "tensorrt", "torch", "carve"]
    return ["; ".join(f"{k}: {e[k]}" for k in keys if k in e)]


SECTIONS: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "recipe": ("Recipe", lambda d: [f"`{d['recipe']['name']}`: {d['recipe']['model']} -> {d['recipe']['output']}"]),
    "models": ("Models", render_models),
    "passes": ("Passes", render_passes),
    "cost": ("Cost", render_cost),
    "results": ("Latency", render_results),
    "memory": ("Memory", render_memory),
    "agreement": ("Agreement", render_agreement),
    "by_op": ("Time by op type", lambda d: _by_op_table(d)),
    "accuracy": ("Accuracy", render_accuracy),
    "thresholds": ("Thresholds", render_thresholds),
    "environment": ("Environment", render_environment),
}


def _by_op_table(doc: dict) -> list[str]:
    from carve.pipeline.measure.op_profile import by_op_table

    return by_op_table(doc)


SKIP = {"schema_version", "kind", "created", "command", "settings", "accuracy_more"}


def to_markdown(doc: dict, *, title: str = "carve report") -> str:
    if doc.get("kind") == "carve.sweep":  # a sweep's results.json has its own layout
        from carve.pipeline.measure import sweep_report

        return sweep_report.to_markdown(doc, title=title)
    out = [f"# {title}", ""]
    if doc.get("command"):
        out += [f"`{doc['command']}`", ""]
    for key, (heading, render) in SECTIONS.items():
        if key in doc:
            try:
                lines = render(doc)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError):
                # a malformed or foreign section is shown as it is, never dropped and never a crash
                lines = ["(not in the form carve writes; shown as stored)", "", "```json"]
                lines += [json.dumps(doc[key], indent=1, default=str)[:4000], "```"]
            out += [f"## {heading}", "", *lines, ""]
    for key, value in doc.items():
        if key not in SECTIONS and key not in SKIP:
            out += [f"## {key}", "", "```json", json.dumps(value, indent=1, default=str)[:4000], "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# plots


def plots(doc: dict, directory: str | Path) -> list[Path]:
    """PNG plots: latency distributions of A and B per configuration, and speed-up with its interval per batch (for
    a sweep: accuracy against latency with the Pareto front)."""
    if doc.get("kind") == "carve.sweep":
        from carve.pipeline.measure import sweep_report

        return sweep_report.plots(doc, directory)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    results = doc.get("results", [])
    if not results:
        return written
    names = (doc["models"]["a"]["name"], doc["models"]["b"]["name"])
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results) + 1, 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        data = [r["a"]["samples_ms"], r["b"]["samples_ms"]]
        ax.violinplot(data, showmedians=True)
        ax.set_xticks([1, 2], [f"A\n{names[0]}", f"B\n{names[1]}"], fontsize=7)
        ax.set_title(f"{r['backend']} b{r['batch']} t{r['threads']}", fontsize=9)
        ax.set_ylabel("latency (ms)")
    fig.tight_layout()
    p = directory / "latency.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    mac_label = "1 / MAC ratio (not measured)"
    for threads in sorted({r["threads"] for r in results}):
        rs = sorted((r for r in results if r["threads"] == threads), key=lambda r: r["batch"])
        x = [r["batch"] for r in rs]
        y = [r["speedup"]["median"] for r in rs]
        err = [
            [r["speedup"]["median"] - r["speedup"]["ci_low"] for r in rs],
            [r["speedup"]["ci_high"] - r["speedup"]["median"] for r in rs],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=f"{threads} thread(s), measured")
        if rs and rs[0].get("mac_ratio"):
            ax.plot(x, [1 / r["mac_ratio"] for r in rs], ls=":", color="gray", label=mac_label)
            mac_label = None  # the MAC line is the same for every thread count: label it once
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speed-up of B over A")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = directory / "speedup.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    return written
