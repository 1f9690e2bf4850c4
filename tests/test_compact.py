"""Every written model holds no initializer no node reads, no ``value_info`` for a tensor the graph lacks and no opset
import of an unused domain (issue 25 item 9): random graphs with dead parts injected, random pruned CNNs, the zoo, and
the third-party export that showed it (torchvision's ShuffleNetV2 through `carve prune`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import export_torch
from graphs import analyse_proto, if_model, manual_plan, random_removal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from strategies import cnn

import carve as P
from carve.pipeline.graph import from_proto
from carve.pipeline.graph.compact import compact
from carve.pipeline.runtime import ort as ortutil


def dead_parts(path) -> dict:
    """What :func:`compact` would still remove from the file at ``path`` (empty when the file is clean)."""
    removed = compact(onnx.load(str(path)))
    return {k: v for k, v in vars(removed).items() if v}


def inject_dead_parts(proto: onnx.ModelProto, rng: np.random.Generator, n: int) -> set[str]:
    """Add ``n`` initializers nothing reads, stale value_info and an unused opset import; return the dead names."""
    names = set()
    for k in range(n):
        name = f"dead_{k}"
        arr = rng.standard_normal((k + 1, 2)).astype(np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))
        proto.graph.value_info.append(helper.make_tensor_value_info(f"gone_{k}", TensorProto.FLOAT, [k + 1]))
        names.add(name)
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return names


def test_save_removes_dead_parts_and_keeps_what_a_subgraph_reads(tmp_path):
    proto = if_model(condition_from_data=True)
    # a constant only the If's branches read (from the enclosing scope) is used, not dead
    outer = "outer_scale"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), outer))
    then = next(a.g for n in proto.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    relu = then.node[0]
    relu.output[0] = "t_pre"
    then.node.append(helper.make_node("Mul", ["t_pre", outer], ["t"]))
    dead = inject_dead_parts(proto, np.random.default_rng(0), 3)
    model = from_proto(proto)
    feeds = ortutil.random_feeds(model, batch=2, seed=0)
    before = ortutil.run(model, feeds)
    out = P.save(model, tmp_path / "m.onnx")
    written = onnx.load(str(out))
    inits = {t.name for t in written.graph.initializer}
    assert outer in inits and not (dead & inits)
    assert not any(v.name.startswith("gone_") for v in written.graph.value_info)
    assert [o.domain for o in written.opset_import] == [""]
    assert dead_parts(out) == {}
    assert not (dead & set(model.init))  # the index forgot them too
    after = ortutil.run(P.load(out), feeds)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(proto=cnn(), seed=st.integers(0, 1000), p=st.floats(0.0, 0.9), n_dead=st.integers(0, 3))
def test_written_random_cnns_hold_nothing_unused_and_compute_the_same(proto, seed, p, n_dead, tmp_path_factory):
    rng = np.random.default_rng(seed)
    model, an = analyse_proto(proto)
    pruned = P.prune(model, manual_plan(an, random_removal(an, rng, p)))
    inject_dead_parts(pruned.proto, rng, n_dead)
    feeds = ortutil.random_feeds(pruned, batch=2, seed=seed)
    before = ortutil.run(pruned, feeds)
    out = P.save(pruned, tmp_path_factory.mktemp("compact") / "p.onnx")
    assert dead_parts(out) == {}
    for a, b in zip(before, ortutil.run(P.load(out), feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detector", "mobilenet_v3_small", "resnet20", "unet", "vgg16_bn"])
def test_pruned_zoo_models_are_written_clean(name, zoo_dir, tmp_path):
    m = P.load(zoo_dir / f"{name}.onnx")
    pruned = P.prune(m, P.plan(P.analyse(m), 0.5, widths=P.Widths(round_to=8)))
    assert dead_parts(P.save(pruned, tmp_path / "p.onnx")) == {}


@pytest.mark.slow
def test_a_pruned_shufflenet_export_has_no_unused_initializer(tmp_path):
    """torchvision's ShuffleNetV2, exported as a user would: its channel shuffles' shape constants are left unread
    by pruning, and ONNX Runtime warned for each one when the result was loaded."""
    torchvision = pytest.importorskip("torchvision", reason="the zoo extra (torchvision) is not installed")
    net = torchvision.models.shufflenet_v2_x0_5().eval()
    src = export_torch(net, tmp_path / "shufflenet.onnx", shape=(1, 3, 64, 64))
    out = tmp_path / "p.onnx"
    cmd = [sys.executable, "-m", "carve", "prune", str(src), "-o", str(out), "--ratio", "0.5", "--no-measure"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert dead_parts(out) == {}
    # ONNX Runtime's default log level shows its warnings on stderr, as a user sees them
    load = f"import onnxruntime as o; o.InferenceSession({str(out)!r}, providers=['CPUExecutionProvider'])"
    proc = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert proc.returncode == 0 and "Removing initializer" not in proc.stderr, proc.stderr
