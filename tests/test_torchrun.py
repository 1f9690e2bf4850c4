"""The ONNX -> PyTorch runner computes what ONNX Runtime computes, on the zoo and on single ops, when it records a
program, when it replays it and as a static program; gradients flow into the initializers and write back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphs import G

import carve as P
from carve import models
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import from_proto
from carve.pipeline.runtime import ort as ortutil
from carve.pipeline.runtime.torch_graph import TorchGraph


def compare(model, batch=2, seed=0, rtol=1e-4):
    feeds = ortutil.random_feeds(model, batch=batch, seed=seed)
    ref = ortutil.run(model, feeds)
    tg = TorchGraph(model)
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        runs = [tg(**inputs), tg(**inputs), tg.static(*inputs.values())(*inputs.values())]  # record, replay, static
    for out in runs:
        out = out if isinstance(out, tuple) else (out,)
        for a, b in zip(ref, out):
            np.testing.assert_allclose(b.numpy(), a, rtol=0, atol=rtol * max(float(np.abs(a).max()), 1e-4))


@pytest.mark.parametrize("name", models.available())
def test_zoo_models_match_ort(name, zoo_dir):
    compare(P.load(zoo_dir / f"{name}.onnx"))


def one_op(build, opset=17, shape=(1, 4, 8, 8)):
    g = G(shape, opset=opset)
    y = build(g)
    return from_proto(g.model([y]))


CASES = {
    "lrn": lambda g: g.op("LRN", ["x"], size=3, alpha=1e-3, beta=0.75, bias=1.0),
    "instance_norm": lambda g: g.op("InstanceNormalization", ["x", g.weight(4), g.weight(4)]),
    "pad_reflect": lambda g: g.op("Pad", ["x", g.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))], mode="reflect"),
    "pad_edge": lambda g: g.op("Pad", ["x", g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="edge"),
    "slice_negative_step": lambda g: g.op(
        "Slice",
        [
            "x",
            g.const(np.array([-1], np.int64)),
            g.const(np.array([-100], np.int64)),
            g.const(np.array([3], np.int64)),
            g.const(np.array([-2], np.int64)),
        ],
    ),
    "conv_asymmetric_pads": lambda g: g.op(
        "Conv", ["x", g.weight(3, 4, 3, 3)], kernel_shape=[3, 3], pads=[0, 1, 2, 1], strides=[2, 1]
    ),
    "conv_same_upper": lambda g: g.op(
        "Conv", ["x", g.weight(3, 4, 3, 3)], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"
    ),
    "conv_dilated_grouped": lambda g: g.op(
        "Conv", ["x", g.weight(6, 2, 3, 3)], kernel_shape=[3, 3], group=2, dilations=[2, 2], pads=[2, 2, 2, 2]
    ),
    "conv_transpose": lambda g: g.op(
        "ConvTranspose",
        ["x", g.weight(4, 3, 3, 3), g.weight(3)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        output_padding=[1, 1],
    ),
    "maxpool_ceil_pads": lambda g: g.op(
        "MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1
    ),
    "avgpool_include_pad": lambda g: g.op(
        "AveragePool", ["x"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1
    ),
    "avgpool_exclude_pad": lambda g: g.op("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
    "resize_linear_align": lambda g: g.op(
        "Resize",
        ["x", "", g.const(np.array([1, 1, 2, 2], np.float32))],
        mode="linear",
        coordinate_transformation_mode="align_corners",
    ),
    "resize_nearest_sizes": lambda g: g.op(
        "Resize",
        ["x", "", "", g.const(np.array([2, 4, 16, 12], np.int64))],
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    ),
    "split_num_outputs": lambda g: g.op(
        "Concat", list(g.op("Split", ["x"], outputs=2, axis=1, num_outputs=2))[::-1], axis=1
    ),
    "softmax_axis1": lambda g: g.op("Softmax", ["x"], axis=1),
    "reduce_max": lambda g: g.op("ReduceMax", ["x", g.const(np.array([1, 3], np.int64))], keepdims=0),
    "tile_expand_where": lambda g: g.op(
        "Where",
        [
            g.op("Greater", ["x", g.const(np.float32(0))]),
            g.op("Tile", ["x", g.const(np.array([1, 1, 1, 1], np.int64))]),
            g.op("Expand", [g.const(np.float32(-1)), g.const(np.array([1, 4, 1, 8], np.int64))]),
        ],
    ),
    "activations": lambda g: g.op(
        "Add",
        [
            g.op("Elu", ["x"], alpha=0.5),
            g.op(
                "Add",
                [g.op("Selu", ["x"]), g.op("Add", [g.op("Softplus", ["x"]), g.op("HardSigmoid", ["x"], alpha=0.3)])],
            ),
        ],
    ),
    "gelu_erf": lambda g: g.op("Mul", [g.op("Erf", ["x"]), g.op("Gelu", ["x"])]),
    "reshape_transpose": lambda g: g.op(
        "Transpose", [g.op("Reshape", ["x", g.const(np.array([0, 2, 2, -1], np.int64))])], perm=[0, 2, 1, 3]
    ),
}


def case_model(case: str):
    opset = 20 if case == "gelu_erf" else 18 if case in ("split_num_outputs", "reduce_max") else 17
    return one_op(CASES[case], opset=opset, shape=(2, 4, 8, 8))


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_ops_match_ort(case):
    compare(case_model(case))


def test_gemm_attributes_and_opset11_softmax():
    g = G((3, 5), opset=11)
    y = g.op(
        "Gemm",
        [g.op("Transpose", ["x"], perm=[1, 0]), g.weight(4, 5), g.weight(4)],
        transA=1,
        transB=1,
        alpha=0.5,
        beta=2.0,
    )
    compare(from_proto(g.model([g.op("Softmax", [y], axis=1)])), batch=3)


def test_gradients_flow_and_write_back(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    tg = TorchGraph(m)
    x = torch.randn(4, 3, 16, 16)
    loss = torch.nn.functional.cross_entropy(tg(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    w = next(n for n in m.graph.node if n.op_type == "Conv").input[1]
    grad = tg.parameter(w).grad
    assert grad is not None and float(grad.abs().sum()) > 0
    with torch.no_grad():
        tg.parameter(w).sub_(0.5 * grad)
    tg.write_back(m)
    np.testing.assert_allclose(m.array(w), tg.parameter(w).detach().numpy())
    with torch.no_grad():
        ref = tg(x).numpy()
    np.testing.assert_allclose(ortutil.run(m, {"input": x.numpy()})[0], ref, atol=1e-4 * np.abs(ref).max())


def test_capture_returns_intermediates(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    conv = next(n for n in m.graph.node if n.op_type == "Conv").output[0]
    out, cap = TorchGraph(m)(torch.randn(1, 3, 16, 16), capture=[conv])
    assert cap[conv].shape == (1, 8, 16, 16) and out.shape == (1, 10)


def test_unsupported_op_is_named():
    g = G()
    y = g.op("DepthToSpace", [g.conv("x", 4)], blocksize=2)
    with pytest.raises(CarveError, match="does not support op DepthToSpace") as err:
        TorchGraph(from_proto(g.model([y])))
    assert "supported ops: Abs" in str(err.value)


def test_initializer_names_that_sanitise_alike_stay_distinct():
    g = G((1, 4, 2, 2))
    a = g.op("Add", ["x", g.const(np.ones((1, 4, 1, 1), np.float32), "w.")])  # names "w.1" ...
    b = g.op("Mul", [a, g.const(np.full((1, 4, 1, 1), 3.0, np.float32), "w_")])  # ... and "w_2": both "p_w_N"?
    g.inits[-1].name, g.nodes[-1].input[1] = "w_1", "w_1"
    m = from_proto(g.model([b]), prepare_graph=False)
    tg = TorchGraph(m)
    assert len(tg.params) == 2 and len(set(tg.param_of.values())) == 2
    compare(m, batch=1)
