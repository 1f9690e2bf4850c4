"""``carve inspect MODEL``: per-layer channels, params, MACs, group and whether each layer is prunable (or why not)."""

from __future__ import annotations

import argparse
import json

from carve.pipeline.cli._common import add_input_shape_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show layers, channel groups and what can be pruned", description=__doc__)
    p.add_argument("model", help="ONNX file")
    p.add_argument("--groups", action="store_true", help="also list the coupled channel groups")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--attention",
        choices=["heads", "width"],
        default="heads",
        help="the units of an attention: whole heads (default) or per-head widths (as `carve prune --attention`)",
    )
    p.add_argument(
        "--conv-groups",
        choices=["whole", "width"],
        default="whole",
        help="the units of a grouped conv: whole groups (default) or equal widths in every group (as `carve prune`)",
    )
    add_input_shape_arg(p)
    p.set_defaults(func=run)


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from carve.pipeline.cli._common import console
    from carve.pipeline.errors import warn
    from carve.pipeline.graph import load
    from carve.pipeline.graph.channels import analyse
    from carve.pipeline.graph.overview import overview
    from carve.pipeline.graph.shapes import unknown_conv_outputs

    model = load(args.model, input_shape=args.input_shape)
    info = overview(model, analyse(model, attention=args.attention, conv_groups=args.conv_groups))
    unknown = unknown_conv_outputs(model)
    info["summary"]["unknown_output_sizes"] = unknown
    if unknown:
        warn(
            f"{args.model}: the output size of {len(unknown)} layer(s) is unknown (first: {unknown[0]!r}): their MACs "
            "are not counted; give the input size with --input-shape CxHxW"
        )
    if args.json:
        print(json.dumps({"model": args.model, **info}, indent=1))
        return 0
    con = console()
    t = Table(title=f"{args.model}: layers", title_justify="left", show_lines=False, pad_edge=False)
    for col, just in (
        ("node", "left"),
        ("op", "left"),
        ("in", "right"),
        ("out", "right"),
        ("kernel", "left"),
        ("params", "right"),
        ("MACs", "right"),
        ("group", "right"),
        ("prunable", "right"),
        ("status", "left"),
    ):
        t.add_column(col, justify=just, overflow="fold")
    for r in info["layers"]:
        status = r["status"] if not r["reason"] else f"{r['status']}: {r['reason']}"
        t.add_row(
            r["node"],
            r["op"],
            str(r["cin"] if r["cin"] is not None else "?"),
            str(r["cout"]),
            r["kernel"],
            _si(r["params"]),
            _si(r["macs"]),
            f"G{r['group']}",
            f"{r['prunable']}/{r['cout']}",
            status,
        )
    con.print(t)
    if args.groups:
        g = Table(title="channel groups (a unit couples channels that are removed together)", title_justify="left")
        for col in ("group", "width", "slices", "prunable", "members", "frozen because", "inexact because"):
            g.add_column(col, overflow="fold")
        for r in info["groups"]:
            members = ", ".join(r["members"][:4]) + (f" (+{len(r['members']) - 4})" if len(r["members"]) > 4 else "")
            more = f" (+{len(r['slices']) - 8})" if len(r["slices"]) > 8 else ""
            slices = "/".join(map(str, r["slices"][:8])) + more
            g.add_row(
                f"G{r['id']}",
                str(r["width"]),
                slices,
                str(r["prunable"]),
                members,
                r["reason"],
                r["inexact"],
            )
        con.print(g)
    s = info["summary"]
    con.print(
        f"{s['nodes']} nodes, opset {s['opset']}, {_si(s['params'])} params, {_si(s['macs'])} MACs/sample; "
        f"{s['prunable_channels']}/{s['channels']} output channels prunable ({100 * s['prunable_fraction']:.1f}%) "
        f"in {s['groups']} groups"
    )
    con.print(
        f"MACs in prunable layers: {_si(s['macs_prunable'])} ({100 * s['macs_prunable_fraction']:.1f}%)"
        + (
            f"; {s['inexact_groups']} group(s) normalised by LayerNorm: removing their channels is not exact "
            "(`--groups` says where)"
            if s["inexact_groups"]
            else ""
        )
    )
    if s["frozen_reasons"]:
        con.print("frozen units by reason: " + "; ".join(f"{k} ({v})" for k, v in s["frozen_reasons"].items()))
    return 0
