"""The fuzz suite at full size (issue 11): random CNNs x random commands and random corruptions of valid models, each
held to carve's promises by the oracle in tests/fuzzing.py (exit 0 with a verified model, or exit 1/2 with one line;
never exit 3, a traceback, a NaN model or a changed input). The cases are Hypothesis's, generated from a fixed seed
(no shrinking: every case runs once and is counted). Outcomes are written to benchmarks/fuzz.json.

    python tools/fuzz.py                          # 300 pipeline + 300 corruption + 1400 file cases, 50 kills
                                                  # per writer -> benchmarks/fuzz.json
    python tools/fuzz.py --pipelines 50 --corruptions 50 --files 100 --kills 5 -o /tmp/fuzz.json

The third family (issue 21, tests/fuzzing_files.py) mutates the other files carve reads: fine-tuning data,
checkpoints and teachers, sweep and recipe YAML (alias bombs, huge grids), latency tables, gate and report JSON. A case
that runs longer than 30 s is counted as a hang (a broken promise). ``--kills N`` SIGKILLs every writer (a model with
and without external data, a report, a sweep record, a checkpoint) at N random instants each; every time the file
must be the old version or the new one, whole.
    python tools/fuzz.py --markdown               # also print the summary table
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tools")]

from benchio import document, table, write  # noqa: E402

HANG_SECONDS = 30.0


def run(pipelines: int, corruptions: int, seed: int, workdir: Path, log, files: int = 0) -> dict:
    from fuzzing import BrokenPromise, cnn, commands, corrupt_commands, fresh, run_corruption, run_pipeline
    from fuzzing import corruptions as damages
    from fuzzing_files import file_cases, run_file_case
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    results: dict[str, list] = {"pipeline": [], "corruption": [], "files": []}
    broken: list[dict] = []

    def record(family: str, what: dict, fn) -> None:
        t0 = time.perf_counter()
        try:
            outcome = fn()
            kind, message = outcome.kind, outcome.message
        except BrokenPromise as exc:
            kind, message = "BROKEN", str(exc)[:2000]
            broken.append({"family": family, **what, "message": message})
        except Exception as exc:  # the oracle itself failed: count it as broken, with where
            kind, message = "BROKEN", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
            broken.append({"family": family, **what, "message": message})
        seconds = time.perf_counter() - t0
        if seconds > HANG_SECONDS and kind != "BROKEN":
            kind, message = "BROKEN", f"hang: {seconds:.0f} s (> {HANG_SECONDS:.0f} s)"
            broken.append({"family": family, **what, "message": message})
        results[family].append({**what, "outcome": kind, "message": message, "seconds": seconds})
        n = len(results[family])
        log(f"{family} {n}: {kind}{': ' + message.splitlines()[0][:120] if message else ''}")

    common = dict(
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    @hseed(seed)
    @settings(max_examples=max(1, pipelines), **common)  # 0: the case is defined, never run
    @given(proto=cnn(), command=commands(), data_seed=st.integers(0, 1000))
    def pipeline_case(proto, command, data_seed):
        what = {"command": command[0], "args": command[1:]}
        record("pipeline", what, lambda: run_pipeline(proto, command, fresh(workdir / "p"), data_seed))

    @hseed(seed + 1)
    @settings(max_examples=max(1, corruptions), **common)
    @given(proto=cnn(), damage=damages(), command=corrupt_commands())
    def corruption_case(proto, damage, command):
        kind, s = damage
        what = {"corruption": kind, "corruption_seed": s, "command": command}
        record("corruption", what, lambda: run_corruption(proto, kind, s, command, fresh(workdir / "c")))

    @hseed(seed + 2)
    @settings(max_examples=max(1, files), **common)
    @given(case=file_cases())
    def file_case(case):
        surface, s = case
        what = {"surface": surface, "case_seed": s}
        record("files", what, lambda: run_file_case(surface, s, fresh(workdir / "f"), workdir))

    if pipelines:
        pipeline_case()
    if corruptions:
        corruption_case()
    if files:
        from fuzzing_files import base

        base(workdir)  # the valid files the cases mutate, made before any case is timed
        file_case()
    return {"results": results, "broken": broken}


def kills(times: int, seed: int, workdir: Path, log) -> dict:
    """Every writer SIGKILLed at ``times`` random instants (tests/test_reliability_writers.py): old or new, whole."""
    import random

    from conftest import _tiny_resnet, export_torch
    from test_reliability_writers import WRITERS, kill_at_random

    src = export_torch(_tiny_resnet(), workdir / "tiny.onnx")
    out = {}
    for kind in WRITERS:
        folder = workdir / f"kill-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            struck = kill_at_random(kind, src, folder, random.Random(seed), times)
            out[kind] = {"kills": times, "file_existed": struck, "whole": struck, "broken": 0}
        except AssertionError as exc:
            out[kind] = {"kills": times, "broken": 1, "message": str(exc)[:500]}
        out[kind]["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"kills {kind}: {out[kind]}")
    return out


def summarise(raw: dict) -> dict:
    out: dict = {}
    for family, rows in raw["results"].items():
        outcomes = collections.Counter(r["outcome"] for r in rows)
        by = collections.defaultdict(collections.Counter)
        key = {"pipeline": "command", "corruption": "corruption", "files": "surface"}[family]
        for r in rows:
            by[r[key]][r["outcome"]] += 1
        messages = collections.Counter(
            re.sub(r"\S*carve-fuzz-\w+/(base|[pcf])/", "", r["message"]).split("\n")[0][:90]
            for r in rows
            if r["outcome"] in ("user error", "usage error")
        )
        out[family] = {
            "cases": len(rows),
            "outcomes": dict(outcomes.most_common()),
            f"by_{key}": {k: dict(v) for k, v in sorted(by.items())},
            "median_seconds": round(sorted(r["seconds"] for r in rows)[len(rows) // 2], 3) if rows else None,
            "frequent_errors": dict(messages.most_common(15)),
        }
    return out


def markdown(doc: dict) -> str:
    rows = []
    for family in ("pipeline", "corruption", "files"):
        s = doc["families"].get(family)
        if not s:
            continue
        o = s["outcomes"]
        rows.append(
            [
                family,
                s["cases"],
                o.get("verified", 0),
                o.get("unchanged", 0) + o.get("verdict", 0),
                o.get("user error", 0),
                o.get("usage error", 0),
                o.get("BROKEN", 0),
            ]
        )
    head = ["family", "cases", "verified model", "exit 0, nothing written", "exit 1", "exit 2", "broken promise"]
    lines = table(head, rows)
    lines.append("")
    lines.append(
        f"{doc['cases']} cases in {doc['seconds']} s (seed {doc['seed']}); broken promises: {len(doc['broken'])}; "
        f"longest case {doc.get('longest_case_seconds', '-')} s"
    )
    k = doc.get("kills") or {}
    if k:
        lines.append("")
        lines += table(
            ["writer", "SIGKILLs", "file there after the kill", "whole (old or new)", "broken"],
            [[w, v["kills"], v.get("file_existed", "-"), v.get("whole", "-"), v["broken"]] for w, v in k.items()],
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", type=int, default=300)
    p.add_argument("--corruptions", type=int, default=300)
    p.add_argument("--files", type=int, default=1400, help="cases of the files family (issue 21)")
    p.add_argument("--kills", type=int, default=50, help="random SIGKILLs per writer (0: none)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "fuzz.json"))
    p.add_argument("--markdown", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="carve-fuzz-") as tmp:
        log = (lambda m: None) if a.quiet else (lambda m: print(m, flush=True))
        raw = run(a.pipelines, a.corruptions, a.seed, Path(tmp), log, a.files)
        killed = kills(a.kills, a.seed, Path(tmp), log) if a.kills else {}
    families = summarise(raw)
    rows = [r for rows in raw["results"].values() for r in rows]
    doc = document(
        "fuzz",
        started,
        seed=a.seed,
        cases=sum(f["cases"] for f in families.values()),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        families=families,
        longest_case_seconds=round(max((r["seconds"] for r in rows), default=0.0), 1),
        inputs_changed=sum("changed its inputs" in b["message"] for b in raw["broken"]),
        exit_3=sum("exit 3" in b["message"] for b in raw["broken"]),
        hangs=sum(b["message"].startswith("hang:") for b in raw["broken"]),
        kills=killed,
        broken=raw["broken"],
    )
    write(doc, a.output, markdown, a.markdown)
    print(markdown(doc) if not a.markdown else "", end="")
    return 1 if raw["broken"] or any(v["broken"] for v in killed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
