"""Loading, preparing and saving models: the exporter's traps, external data, bad files, atomic writes."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from graphs import G

import carve as P
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import from_proto, load, save
from carve.pipeline.runtime import ort as ortutil


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_folds_the_option_a_pad_subgraph_and_keeps_bn(tiny_resnet_onnx):
    raw = onnx.load(tiny_resnet_onnx)
    assert any(n.op_type in ("ConstantOfShape", "Constant") for n in raw.graph.node)
    m = load(tiny_resnet_onnx)
    ops = {n.op_type for n in m.graph.node}
    assert "Constant" not in ops and "ConstantOfShape" not in ops
    pad = next(n for n in m.graph.node if n.op_type == "Pad")
    assert list(m.array(pad.input[1])) == [0, 4, 0, 0, 0, 4, 0, 0]
    assert "BatchNormalization" in ops


def test_prepare_preserves_outputs_bit_for_bit(tiny_resnet_onnx):
    m = load(tiny_resnet_onnx)
    feeds = ortutil.random_feeds(m, batch=3)
    (a,) = ortutil.run(tiny_resnet_onnx, feeds)
    (b,) = ortutil.run(m, feeds)
    assert np.array_equal(a, b)


def test_identity_of_initializer_is_unshared():
    g = G()
    w = g.weight(4, 3, 3, 3)
    ids = [g.op("Identity", [w]) for _ in range(2)]
    a = g.op("Conv", ["x", ids[0]], channels=4, kernel_shape=[3, 3], pads=[1] * 4)
    b = g.op("Conv", ["x", ids[1]], channels=4, kernel_shape=[3, 3], pads=[1] * 4)
    m = from_proto(g.model([g.add(a, b)]))
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]  # each conv has its private copy now
    assert not any(n.op_type == "Identity" for n in m.graph.node)


def test_shape_of_static_dims_is_folded():
    g = G(dynamic_batch=False)
    a = g.conv("x", 4)
    s = g.op("Shape", [a])
    r = g.op("Reshape", [a, s])
    m = from_proto(g.model([r]))
    assert not any(n.op_type == "Shape" for n in m.graph.node)


def test_old_opset_is_refused_with_a_hint():
    g = G(opset=9)
    p = g.model([g.conv("x", 4)])
    with pytest.raises(CarveError, match="opset 9.*opset 11 and newer"):
        from_proto(p)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a model", bytes(range(256)) * 10])
def test_not_onnx(tmp_path, content):
    f = tmp_path / "bad.onnx"
    f.write_bytes(content)
    with pytest.raises(CarveError, match="bad.onnx"):
        load(f)


def test_truncated_file(tmp_path, tiny_resnet_onnx):
    data = tiny_resnet_onnx.read_bytes()
    f = tmp_path / "cut.onnx"
    f.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CarveError, match="cut.onnx"):
        load(f)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CarveError, match="no such file"):
        load(tmp_path / "nope.onnx")
    with pytest.raises(CarveError, match="is a directory"):
        load(tmp_path)


def test_external_data_round_trip_and_missing_data(tmp_path, tiny_resnet_onnx):
    m = load(tiny_resnet_onnx)
    out = save(m, tmp_path / "ext.onnx", external_data=True)
    (data,) = tmp_path.glob("ext.onnx.*.data")  # a name unique to the content (issue 21: pairs replaced whole)
    m2 = load(out)
    assert m2.external_data
    feeds = ortutil.random_feeds(m)
    assert np.array_equal(ortutil.run(m, feeds)[0], ortutil.run(m2, feeds)[0])
    # a model loaded with external data is saved with external data
    save(m2, tmp_path / "ext2.onnx")
    assert len(list(tmp_path.glob("ext2.onnx.*.data"))) == 1
    data.unlink()
    with pytest.raises(CarveError, match=r"ext\.onnx\.[0-9a-f]{16}\.data.*missing"):
        load(out)


def test_save_refuses_to_overwrite_the_input(tmp_path, tiny_resnet_onnx):
    src = tmp_path / "m.onnx"
    src.write_bytes(tiny_resnet_onnx.read_bytes())
    before = digest(src)
    m = load(src)
    with pytest.raises(CarveError, match="never overwrites its input"):
        save(m, src)
    with pytest.raises(CarveError, match="never overwrites its input"):
        save(m, tmp_path / "." / "m.onnx")
    assert digest(src) == before


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path, tiny_resnet_onnx):
    m = load(tiny_resnet_onnx)
    save(m, tmp_path / "a.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]
    with pytest.raises(CarveError, match="does not exist"):
        save(m, tmp_path / "missing_dir" / "a.onnx")
    with pytest.raises(CarveError, match="is a directory"):
        save(m, tmp_path)


def test_unwritable_location_is_a_clear_error(tiny_resnet_onnx):
    m = load(tiny_resnet_onnx)
    with pytest.raises(CarveError, match="could not write|not writable"):
        save(m, "/proc/carve_test.onnx")


def test_dynamic_batch_survives(tiny_resnet_onnx):
    m = load(tiny_resnet_onnx)
    a = P.analyse(m)
    pruned = P.prune(m, P.plan(a, 0.5))
    for batch in (1, 5):
        feeds = ortutil.random_feeds(pruned, batch=batch)
        assert ortutil.run(pruned, feeds)[0].shape == (batch, 10)
