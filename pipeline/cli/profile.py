"""``carve profile MODEL -o model.lut.json``: measure a latency table on one engine: for each prunable channel group,
the latency of the layers it touches at candidate widths (the hardware's staircase), validated on whole pruned models.
``carve prune --target-latency ... --lut model.lut.json`` plans with it (docs/latency.md)."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import non_negative_int, positive_float, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure a latency table (latency of each group vs width)", description=__doc__)
    p.add_argument("model", help="ONNX file to profile")
    p.add_argument("-o", "--output", help="where to write the table (JSON); it is cached either way")
    p.add_argument("--backend", default="ort", help="ort | trt | torch-cuda | torch-cpu (default ort)")
    p.add_argument("--device", default="cpu", help="ort: cpu | cuda | tensorrt execution provider (default cpu)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="engine precision (default fp32)")
    p.add_argument("--step", type=positive_int, default=8, help="candidate widths: multiples of N near the top (8)")
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds per measurement (default 7)")
    p.add_argument(
        "--min-round-ms", type=positive_float, default=5.0, help="each engine's share of a round (default 5 ms)"
    )
    p.add_argument(
        "--validate",
        type=non_negative_int,
        default=3,
        metavar="N",
        help="whole pruned models measured to state the error (3)",
    )
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="CPU timing: auto (the thread's CPU time with one thread, else wall clock), wall or cpu",
    )
    p.add_argument("--no-cache", dest="cache", action="store_false", help="measure even when a cached table fits")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from carve.pipeline.cli._common import console
    from carve.pipeline.cli._progress import describe
    from carve.pipeline.config import from_args
    from carve.pipeline.graph import check_output_path, load
    from carve.pipeline.measure.backends import get
    from carve.pipeline.measure.profile import ProfileSettings, profile

    if args.output:
        check_output_path(args.output, args.model)
    get(args.backend).require()
    settings = from_args(ProfileSettings, args)
    model = load(args.model)
    con = console(args.quiet or args.json)
    with con.status("profiling...", spinner="dots") as spin:
        table = profile(model, settings, progress=lambda *a, **info: spin.update(describe(*a, **info)))
    if args.output:
        table.save(args.output)
    if args.json:
        print(json.dumps(table.to_json(), indent=1))
        return 0
    prof = table.profile
    con.print(
        f"{args.model}: {prof.get('groups')} prunable groups, {prof.get('subgraphs_timed')} distinct subgraphs, "
        f"{prof.get('candidates_timed')} widths timed in {prof.get('seconds')} s ({prof.get('clock')} clock, "
        f"{prof.get('rounds')} interleaved rounds each); whole model {table.model_ms:.3f} ms. Each group's layers "
        "(producers, per-channel ops, consumers) timed alone, as a fraction of the whole model's time: groups share "
        "layers and a cut-out subgraph has its own overhead, so these overlap and need not sum to 100%"
    )
    for g in table.groups:
        if g.measured_as is not None:
            continue
        fast = sorted({sum(g.candidates[i]) for i in g.fast()}, reverse=True)
        con.print(
            f"  group {g.group} ({sum(g.slices)} ch; its layers alone {g.share * table.model_ms:.3f} ms = "
            f"{g.share:.1%} of the whole model's time): fast widths "
            f"{', '.join(map(str, fast[:12]))}{' ...' if len(fast) > 12 else ''}"
        )
    err = table.error
    if err.get("points"):
        pts = "; ".join(f"{p['predicted']:.3f} predicted vs {p['measured']:.3f} measured" for p in err["points"])
        con.print(f"validation on whole pruned models: {pts}; stated error {table.stated_error:.1%}")
    if args.output:
        con.print(f"wrote {args.output}")
    return 0
