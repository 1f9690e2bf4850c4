"""The PyTorch runner is graph-safe by construction, proven without a GPU.

* Every zoo model and every graph the runner tests build goes through ``torch.compile(..., fullgraph=True)``: a graph
  break fails the test, and so does a host read that Dynamo kept in the graph (it captures ``.item()``/``.tolist()`` as
  data-dependent values in full-graph mode): the backend (:class:`Strict`) inspects the captured graph, then runs it
  eagerly. Dynamo's trace is where a host read, a data-dependent shape or an unsupported construct shows, and that
  does not depend on the backend, while inductor's C++ code generation would cost minutes per model on a 2-core
  machine. Two graphs also go through ``"aot_eager"`` (AOTAutograd's functional trace, what inductor consumes).
* A static program runs on the ``meta`` device under a ``TorchDispatchMode`` that sees every ATen call: a host read
  (``item``/``_local_scalar_dense``), a tensor made from host data (``lift_fresh``) or any tensor that is not on the
  model's device (a CPU constant, a copy to the host) fails the test. This is the CPU proof of what a CUDA graph
  capture needs, and a control shows the tracer catches each of those.
* What cannot be made static is refused with the node's name; the dynamic mode still runs it, and keeps one program per
  input signature (varying batch sizes, gradients, capture).
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
import torch
from graphs import G
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto
from test_property import cnn
from test_torchrun import CASES, case_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import carve as P
from carve import models
from carve.pipeline.graph import from_proto
from carve.pipeline.runtime import ort as ortutil
from carve.pipeline.runtime.torch_graph import DataDependent, TorchGraph

aten = torch.ops.aten
HOST_OPS = {aten._local_scalar_dense, aten.item, aten.lift_fresh, aten.lift_fresh_copy}


class HostTraffic(TorchDispatchMode):
    """Records every ATen call that reads a value to the host, makes a tensor from host data, or touches a tensor that
    is not on ``device``."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.calls = 0
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        if func.overloadpacket in HOST_OPS:
            self.bad.append(f"{func}: host read / tensor from host data")
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.bad.append(f"{func}: a {t.device} input")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.bad.append(f"{func}: a {t.device} output")
        return out


def input_shape(model, batch: int = 2) -> tuple[int, ...]:
    return tuple(s for s in ortutil.input_specs(model.proto, batch)[model.input_names[0]][0])


def assert_no_host_traffic(model, batch: int = 2) -> None:
    tg = TorchGraph(model, trainable=False).eval().to("meta")
    x = torch.zeros(input_shape(model, batch), device="meta")
    sg = tg.static(x)
    with HostTraffic("meta") as trace, torch.no_grad():
        sg(x)
    assert trace.calls > 0
    assert not trace.bad, trace.bad[:5]


class Strict:
    """A torch.compile backend that looks at the graph Dynamo captured before handing it on (``"eager"`` runs it as
    captured, ``"aot_eager"`` through AOTAutograd). In full-graph mode Dynamo keeps ``.item()`` / ``.tolist()`` in the
    graph as data-dependent values instead of breaking it, so "no graph break" alone would let a host read through:
    this backend refuses any host read, device-to-host copy or data-dependent assertion in the graph."""

    HOST_METHODS = {"item", "tolist", "cpu", "numpy"}

    def __init__(self, delegate: str = "eager") -> None:
        self.delegate = delegate
        self.graphs = 0
        self.bad: list[str] = []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        for node in gm.graph.nodes:
            target = str(node.target)
            if node.op == "call_method" and node.target in self.HOST_METHODS:
                self.bad.append(f"{node.target}() in the graph")
            if node.op == "call_function" and ("_local_scalar_dense" in target or "_assert_scalar" in target):
                self.bad.append(f"{target}: a data-dependent value")
            if node.op == "call_method" and node.target == "to" and "cpu" in str(node.args[1:]) + str(node.kwargs):
                self.bad.append("a copy to the host")
        if self.delegate == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.delegate)(gm, example_inputs)


def assert_compiles_whole(model, batch: int = 2, backend: str = "eager") -> None:
    """torch.compile(fullgraph=True) of the static program: one graph, no host read in it, and the same outputs as
    ONNX Runtime."""
    torch._dynamo.reset()
    feeds = ortutil.random_feeds(model, batch=batch, seed=1)
    x = torch.from_numpy(feeds[model.input_names[0]])
    sg = TorchGraph(model, trainable=False).eval().static(x)
    strict = Strict(backend)
    compiled = torch.compile(sg, backend=strict, fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = compiled(x)
    assert strict.graphs == 1 and not strict.bad, strict.bad
    out = out if isinstance(out, tuple) else (out,)
    for ref, o in zip(ortutil.run(model, feeds), out):
        np.testing.assert_allclose(o.numpy(), ref, atol=1e-4 * max(float(np.abs(ref).max()), 1e-3))
    torch._dynamo.reset()


# -- graphs whose shapes are computed in the graph (Shape arithmetic the exporter writes for dynamic batch) -----------


def shape_math() -> onnx.ModelProto:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape / ConstantOfShape / Range / Slice / Tile / Expand with a
    dynamic batch (canonicalisation cannot fold them), plus Pad, Resize and Clip whose arguments are float
    initializers."""
    g = G((2, 4, 8, 8))
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    shape = g.op("Shape", ["x"])
    batch = g.op("Gather", [shape, g.const(np.array(0, np.int64))], axis=0)
    n = g.op("Unsqueeze", [batch, i64(0)])
    h = g.op("Gather", [shape, i64(2)], axis=0)
    fill = g.op(
        "ConstantOfShape",
        [g.op("Concat", [n, i64(4, 1, 1)], axis=0)],
        value=onnx.numpy_helper.from_array(np.array([0.5], np.float32)),
    )
    ramp = g.op("Range", [g.const(np.array(0, np.int64)), batch, g.const(np.array(1, np.int64))])
    ramp = g.op("Reshape", [g.op("Cast", [ramp], to=TensorProto.FLOAT), i64(-1, 1, 1, 1)])
    y = g.op("Add", [g.op("Mul", ["x", ramp]), fill])
    y = g.op("Slice", [y, i64(1), h, i64(2), i64(2)])  # rows 1..H-1 step 2, H taken from Shape
    y = g.op("Pad", [y, i64(0, 0, 1, 0, 0, 0, 0, 1), g.const(np.array(-0.25, np.float32))], mode="constant")
    y = g.op("Resize", [y, "", g.const(np.array([1, 1, 2, 1], np.float32))], mode="nearest")
    y = g.op("Clip", [y, g.const(np.float32(-1.0)), g.const(np.float32(1.5))])
    y = g.op("Tile", [y, g.op("Concat", [i64(1, 1), i64(1), i64(2)], axis=0)])
    y = g.op("Expand", [y, g.op("Concat", [n, i64(4, 1, 1)], axis=0)])
    flat = g.op("Reshape", [y, g.op("Concat", [n, i64(-1)], axis=0)])
    return g.model([flat])


def data_dependent() -> onnx.ModelProto:
    """A reshape target computed from the activations: only the data decides it (here it always comes out [-1, 16])."""
    g = G((2, 4, 8, 8))
    total = g.op("ReduceSum", ["x"], keepdims=0)
    target = g.op("Add", [g.op("Mul", [total, g.const(np.float32(0.0))]), g.const(np.array([-1, 16], np.float32))])
    return g.model([g.op("Reshape", ["x", g.op("Cast", [target], to=TensorProto.INT64)])])


def graphs() -> dict:
    out = {f"case:{k}": lambda k=k: case_model(k) for k in sorted(CASES)}
    out["shape_math"] = lambda: from_proto(shape_math())
    return out


GRAPHS = graphs()


def test_shape_math_survives_loading_and_runs_like_ort():
    m = from_proto(shape_math())
    ops = {n.op_type for n in m.graph.node}
    assert {"Shape", "ConstantOfShape", "Range", "Reshape", "Expand", "Tile"} <= ops  # not folded away
    tg = TorchGraph(m)
    assert not any(k in tg.param_of for k in tg.consts)
    pad_value = next(n for n in m.graph.node if n.op_type == "Pad").input[2]
    assert pad_value in tg.consts and pad_value not in tg.param_of  # an argument, not a parameter
    for batch in (2, 3):
        feeds = ortutil.random_feeds(m, batch=batch, seed=batch)
        ref = ortutil.run(m, feeds)[0]
        with torch.no_grad():
            out = tg(torch.from_numpy(feeds["x"])).numpy()
            again = tg(torch.from_numpy(feeds["x"])).numpy()  # the replayed program
        np.testing.assert_allclose(out, ref, atol=1e-5)
        np.testing.assert_array_equal(again, out)
    assert len(tg._programs) == 2


@pytest.mark.parametrize("name", models.available())
def test_zoo_static_program_has_no_host_traffic(name, zoo_dir):
    assert_no_host_traffic(P.load(zoo_dir / f"{name}.onnx"))


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_test_graphs_have_no_host_traffic(name):
    assert_no_host_traffic(GRAPHS[name]())


def test_tiny_resnet_has_no_host_traffic(tiny_resnet_onnx):
    assert_no_host_traffic(P.load(tiny_resnet_onnx))


def test_the_checks_catch_host_reads_host_constants_and_copies():
    """Controls: each check fails on what it must catch (a device-to-host copy shows as a CPU output on a GPU; meta
    tensors refuse it before any ATen call, so it is not shown here)."""
    cases = {
        "item": (lambda x: x * float(x.sum().item()), "cpu"),
        "host constant": (lambda x: x + torch.tensor(1.0), "meta"),
        "host-to-device copy": (lambda x: x + torch.ones(3).to(x.device), "meta"),
    }
    for what, (fn, device) in cases.items():
        x = torch.zeros(2, 3, device=device)
        # meta tensors refuse to be read (the call was seen first)
        with HostTraffic(device) as trace, contextlib.suppress(NotImplementedError, RuntimeError):
            fn(x)
        assert trace.bad, what
    # .tolist() reads memory without an ATen call the tracer could see; the compile check refuses it (and .item())
    for fn in (lambda x: x.reshape(*x[0, :1].long().tolist(), -1), lambda x: x * x.sum().item()):
        torch._dynamo.reset()
        strict = Strict()
        torch.compile(fn, backend=strict, fullgraph=True)(torch.ones(2, 3))
        assert strict.bad
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", models.available())
def test_zoo_models_compile_without_graph_breaks(name, zoo_dir):
    assert_compiles_whole(P.load(zoo_dir / f"{name}.onnx"), batch=1)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_test_graphs_compile_without_graph_breaks(name):
    assert_compiles_whole(GRAPHS[name]())


def test_tiny_resnet_compiles_through_aot_autograd(tiny_resnet_onnx):
    assert_compiles_whole(P.load(tiny_resnet_onnx), backend="aot_eager")
    assert_compiles_whole(from_proto(shape_math()), backend="aot_eager")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(proto=cnn())
def test_random_cnns_static_programs_match_ort_without_host_traffic(proto):
    m = from_proto(proto)
    feeds = ortutil.random_feeds(m, batch=2, seed=3)
    x = torch.from_numpy(feeds["x"])
    sg = TorchGraph(m, trainable=False).static(x)
    with torch.no_grad():
        out = sg(x)
    out = out if isinstance(out, tuple) else (out,)
    for ref, o in zip(ortutil.run(m, feeds), out):
        np.testing.assert_allclose(o.numpy(), ref, atol=1e-4 * max(float(np.abs(ref).max()), 1e-3))
    assert_no_host_traffic(m)


# -- what cannot be static, and the dynamic mode -----------------------------------------------------------------------


def test_data_dependent_shapes_are_refused_for_static_builds_and_run_dynamically():
    m = from_proto(data_dependent())
    tg = TorchGraph(m)
    with pytest.raises(DataDependent, match=r"Reshape 'reshape\d+': its target shape is tensor 'cast\d+_out'.*data"):
        tg.static((2, 4, 8, 8))
    feeds = ortutil.random_feeds(m, batch=2)
    with torch.no_grad():
        out = tg(torch.from_numpy(feeds["x"])).numpy()
    np.testing.assert_allclose(out, ortutil.run(m, feeds)[0], atol=1e-6)
    assert not tg._programs  # read back from the data: never replayed


def test_static_graph_is_for_one_input_shape(tiny_resnet_onnx):
    sg = TorchGraph(P.load(tiny_resnet_onnx)).static((2, 3, 16, 16))
    with pytest.raises(P.CarveError, match=r"built for inputs \[\(2, 3, 16, 16\)\], got \[\(3, 3, 16, 16\)\]"):
        sg(torch.zeros(3, 3, 16, 16))
    with pytest.raises(P.CarveError, match="cannot be moved"):
        sg.to(torch.float64)


def test_dynamic_mode_keeps_a_program_per_batch_size_with_gradients(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    tg = TorchGraph(m)
    w = next(n for n in m.graph.node if n.op_type == "Conv").input[1]
    for batch in (4, 3, 4, 3):  # a training loop's full batches and its last, smaller one
        feeds = ortutil.random_feeds(m, batch=batch, seed=batch)
        x = torch.from_numpy(feeds["input"])
        tg.zero_grad(set_to_none=True)
        logits = tg(x)
        np.testing.assert_allclose(logits.detach().numpy(), ortutil.run(m, feeds)[0], atol=1e-4)
        torch.nn.functional.cross_entropy(logits, torch.arange(batch) % 10).backward()
        assert tg.parameter(w).grad is not None and float(tg.parameter(w).grad.abs().sum()) > 0
    assert len(tg._programs) == 2
    tg.to(torch.float64)  # moving the module drops the recorded constants
    assert not tg._programs


def test_capture_from_a_replayed_program(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    conv = next(n for n in m.graph.node if n.op_type == "Conv").output[0]
    tg = TorchGraph(m)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first, cap1 = tg(x, capture=[conv])
        second, cap2 = tg(x, capture=[conv])
    torch.testing.assert_close(cap1[conv], cap2[conv])
    torch.testing.assert_close(first, second)
    with pytest.raises(P.CarveError, match="no tensor named 'nope'"):
        tg(x, capture=["nope"])


def test_batch_statistics_mode_trains_batchnorm_like_torch():
    g = G((4, 3, 6, 6))
    y = g.bn(g.conv("x", 5))
    m = from_proto(g.model([y]))
    tg = TorchGraph(m)
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    ref = torch.nn.BatchNorm2d(5, momentum=0.1)
    with torch.no_grad():
        for attr, i in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
            getattr(ref, attr).copy_(tg.parameter(bn.input[i]))
    tg.batch_statistics = True
    x = torch.randn(4, 3, 6, 6)
    for batch in (4, 3):
        out = tg(x[:batch])
        with torch.no_grad():
            c = torch.nn.functional.conv2d(x[:batch], tg.parameter(conv.input[1]), tg.parameter(conv.input[2]), 1, 1)
        torch.testing.assert_close(out, ref.train()(c))
    torch.testing.assert_close(tg.parameter(bn.input[3]), ref.running_mean)
    torch.testing.assert_close(tg.parameter(bn.input[4]), ref.running_var)
    tg.batch_statistics = False
    with torch.no_grad():
        torch.testing.assert_close(
            tg(x),
            ref.eval()(torch.nn.functional.conv2d(x, tg.parameter(conv.input[1]), tg.parameter(conv.input[2]), 1, 1)),
        )


def test_static_builds_run_exported_silu_as_one_kernel(zoo_dir):
    m = P.load(zoo_dir / "efficientnet_b0.onnx")
    tg = TorchGraph(m, trainable=False).eval()
    feeds = ortutil.random_feeds(m, batch=2, seed=5)
    x = torch.from_numpy(feeds["input"])
    sg = tg.static(x)
    silu = sum(1 for s in sg.program.steps if s[0] is torch.nn.functional.silu)
    sigmoids = sum(1 for n in m.graph.node if n.op_type == "Sigmoid")
    assert 0 < silu < sigmoids  # the SE gates' sigmoids feed a broadcast Mul: they stay
    assert len(sg.program.steps) == len(m.graph.node) - silu
    with torch.no_grad():
        np.testing.assert_allclose(sg(x).numpy(), ortutil.run(m, feeds)[0], atol=1e-4)
        np.testing.assert_allclose(tg(x).numpy(), ortutil.run(m, feeds)[0], atol=1e-4)  # dynamic: every node kept
    assert len(tg._programs[next(iter(tg._programs))].steps) == len(m.graph.node)
