"""Grouped convolutions (issue 22 item 4): a grouped, non-depthwise Conv is pruned by whole groups (the default,
``conv_groups="whole"``: a group's inputs and outputs are one unit, ``group`` shrinks) or by equal widths in every
group (``"width"``: one position of every group is a unit, ``group`` stays), with its producers and consumers;
depthwise stays as it was. Property: on random graphs of the pattern (ResNeXt/RegNet bottlenecks, stacked grouped
convs of different group counts, SE, depthwise), every plan in either mode prunes to a valid model equal to the
reference in ONNX Runtime. Real exports: timm's RegNetX/RegNetY/ResNeXt built from config (skipped without timm)."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from graphs import G, assert_exact, manual_plan, random_removal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carve.pipeline import graph as cgraph
from carve.pipeline.graph.channels import analyse
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.graph.overview import prunable_macs
from carve.pipeline.graph.surgery import prune
from carve.pipeline.pruning.prune import PruneOptions, prune_model

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _groups(model) -> dict[str, int]:
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}


@st.composite
def grouped_net(draw):
    """A stem, then bottlenecks 1x1 -> grouped 3x3 -> 1x1 (with a residual, an SE, or a second grouped conv of another
    group count), a depthwise conv now and then, and a classifier head."""
    g = G((1, 3, 6, 6), seed=draw(st.integers(0, 2**16)), opset=17)
    x = g.relu(g.conv("x", draw(st.sampled_from([4, 6, 8]))))
    for _ in range(draw(st.integers(1, 3))):
        c = g.channels[x]
        groups = draw(st.sampled_from([2, 3, 4]))
        width = groups * draw(st.integers(1, 3))
        h = g.relu(g.conv(x, width, 1))
        h = g.conv(h, groups * draw(st.integers(1, 3)), 3, group=groups, bias=draw(st.booleans()))
        h = g.relu(g.bn(h) if draw(st.booleans()) else h)
        kind = draw(st.sampled_from(["res", "se", "stack", "plain", "dw"]))
        if kind == "se":
            h = g.se(h)
        elif kind == "stack":
            h = g.relu(g.conv(h, g.channels[h], 3, group=g.channels[h] // groups if draw(st.booleans()) else 1))
        elif kind == "dw":
            h = g.relu(g.dw(h))
        h = g.conv(h, c, 1)
        x = g.relu(g.add(x, h)) if kind == "res" else g.relu(h)
    return g.model([g.head(x, classes=3)])


@settings(max_examples=30, **SETTINGS)
@given(grouped_net(), st.sampled_from(["width", "whole"]), st.integers(0, 2**16))
def test_random_grouped_plans_are_exact(proto, mode, seed):
    model = cgraph.from_proto(proto)
    an = analyse(model, conv_groups=mode)
    grouped = {n: g for n, g in _groups(model).items() if g > 1}
    rng = np.random.default_rng(seed)
    for p in (0.3, 0.6):
        removed = random_removal(an, rng, p)
        pruned = assert_exact(model, manual_plan(an, removed))
        after = _groups(pruned)
        for name, g in grouped.items():
            w = model.array(model.nodes[name].input[1])
            if mode == "width" or w.shape[1] == 1:  # equal widths keep the group count, as depthwise convs do theirs
                assert after[name] == g or w.shape[1] == 1
            else:
                assert after[name] <= g


def test_grouped_conv_is_prunable_in_both_modes():
    g = G((1, 3, 6, 6), seed=1)
    x = g.relu(g.conv("x", 8, 1))
    x = g.relu(g.conv(x, 12, 3, group=4))
    model = cgraph.from_proto(g.model([g.head(x)]))
    for mode, expect_group in (("width", 4), ("whole", 2)):
        an = analyse(model, conv_groups=mode)
        conv = next(n for n, gr in _groups(model).items() if gr == 4)
        assert prunable_macs(an) >= model_cost(model).nodes[conv].macs
        assert not an.unit_frozen[an.unit_of[an.tensors[model.nodes[conv].output[0]].ids]].any()
        report = prune_model(model, PruneOptions(ratio=0.5, round_to=1, conv_groups=mode, measure=False))
        assert report.verify is not None and report.verify.max_abs_diff < 1e-4
        assert _groups(report.model)[conv] == expect_group
        w = report.model.array(report.model.nodes[conv].input[1])
        assert w.shape[0] % expect_group == 0 and w.shape[0] < 12


def test_whole_groups_remove_a_zero_group_without_changing_anything():
    g = G((1, 3, 6, 6), seed=2)
    x = g.relu(g.conv("x", 6, 1))
    x = g.conv(x, 6, 3, group=3, bias=False)
    proto = g.model([g.head(g.relu(x))])
    conv = [n for n in proto.graph.node if n.op_type == "Conv"][1]
    w = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[2:4] = 0  # group 1's outputs are zero: removing that group is a no-op
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    model = cgraph.from_proto(proto)
    an = analyse(model, conv_groups="whole")
    out_units = np.unique(an.unit_of[an.tensors[conv.output[0]].ids])
    assert len(out_units) == 3
    removed = np.zeros(an.n_units, dtype=bool)
    removed[an.unit_of[an.tensors[conv.output[0]].ids[2]]] = True
    pruned = prune(model, manual_plan(an, removed))
    assert _groups(pruned)[conv.name] == 2
    from carve.pipeline.runtime import ort as ortutil

    feeds = ortutil.random_feeds(model, batch=2, seed=0)
    np.testing.assert_allclose(ortutil.run(pruned, feeds)[0], ortutil.run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_grouped_conv_transpose_is_refused_by_name():
    g = G((1, 4, 4, 4), seed=3)
    x = g.relu(g.conv("x", 6, 1))
    w = g.weight(6, 2, 2, 2)
    y = g.op("ConvTranspose", [x, w], channels=4, group=2, kernel_shape=[2, 2], strides=[2, 2])
    model = cgraph.from_proto(g.model([g.head(g.relu(y))]))
    an = analyse(model)
    reasons = [r for rs in an.unit_reasons.values() for r in rs]
    node = next(n.name for n in model.graph.node if n.op_type == "ConvTranspose")
    assert any(f"grouped ConvTranspose {node!r} (group=2)" in r for r in reasons), reasons


def test_unknown_conv_groups_mode_is_refused():
    g = G((1, 3, 4, 4))
    model = cgraph.from_proto(g.model([g.head(g.conv("x", 4, 1))]))
    with pytest.raises(Exception, match="unknown conv_groups mode 'half'"):
        analyse(model, conv_groups="half")


def test_cli_conv_groups(tmp_path):
    g = G((1, 3, 6, 6), seed=4)
    x = g.relu(g.conv("x", 8, 1))
    x = g.relu(g.conv(x, 8, 3, group=4))
    src, dst = tmp_path / "g.onnx", tmp_path / "p.onnx"
    onnx.save(g.model([g.head(x)]), str(src))
    cmd = [sys.executable, "-m", "carve", "prune", str(src), "-o", str(dst), "--ratio", "0.5"]
    cmd += ["--round-to", "1", "--no-measure"]
    for extra, group in (([], 2), (["--conv-groups", "width"], 4)):  # whole groups (the default), equal widths
        res = subprocess.run([*cmd, *extra], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        groups = [a.i for n in onnx.load(str(dst)).graph.node for a in n.attribute if a.name == "group"]
        assert group in groups and {2, 4} - {group} & set(groups) == set(), groups
    bad = subprocess.run([*cmd, "--conv-groups", "half"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


TIMM = {"regnetx_002": 0.95, "regnety_004": 0.95, "resnext26ts": 0.95}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_grouped_exports(name):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    import torch

    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=5).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 3, 64, 64),), f, opset_version=17, dynamo=False, input_names=["x"])
    model = cgraph.from_proto(onnx.load_from_string(f.getvalue()))
    for mode in ("width", "whole"):
        an = analyse(model, conv_groups=mode)
        share = prunable_macs(an) / model_cost(model).macs
        assert share >= TIMM[name], f"{mode}: {share:.1%} prunable; frozen: {an.summary()['frozen_reasons']}"
    report = prune_model(model, PruneOptions(ratio=0.5, round_to=1, measure=False))
    assert report.macs_ratio < 0.6 and report.verify is not None


def test_equal_widths_refuse_a_latency_table():
    g = G((1, 3, 6, 6), seed=5)
    x = g.relu(g.conv(g.relu(g.conv("x", 8, 1)), 8, 3, group=4))
    model = cgraph.from_proto(g.model([g.head(x)]))
    opts = PruneOptions(target_macs=None, target_latency=0.5, conv_groups="width", measure=False)
    with pytest.raises(Exception, match="`conv_groups=width` cannot use"):
        prune_model(model, opts, latency=object())
