"""Issue 21, class 4, latency tables: every table carve reads (``--lut`` and the cache under ``$CARVE_CACHE``) gets a
schema check at the door. A bad ``--lut`` is exit 1 with one line naming the file and the field; a bad cached table
is measured again (with a warning), never fatal."""

from __future__ import annotations

import json
import math

import pytest

from carve.pipeline.cli import main

MUTATIONS = {
    "model_ms missing": lambda d: d.pop("model_ms"),
    "model_ms zero": lambda d: d.update(model_ms=0),
    "model_ms string": lambda d: d.update(model_ms="fast"),
    "model_ms 1e400": lambda d: d.update(model_ms=math.inf),
    "nan ratio": lambda d: d["groups"][0]["ratio"].__setitem__(0, math.nan),
    "negative ratio": lambda d: d["groups"][0]["ratio"].__setitem__(0, -1.0),
    "ratio too short": lambda d: d["groups"][0]["ratio"].pop(),
    "empty candidates": lambda d: d["groups"][0].update(candidates=[], ratio=[]),
    "candidate too wide": lambda d: d["groups"][0]["candidates"].__setitem__(
        0, [10**6] * len(d["groups"][0]["slices"])
    ),
    "candidate of strings": lambda d: d["groups"][0]["candidates"].__setitem__(0, ["a"]),
    "share string": lambda d: d["groups"][0].update(share="big"),
    "group missing a field": lambda d: d["groups"][0].pop("slices"),
    "group unknown field": lambda d: d["groups"][0].update(colour="red"),
    "groups a mapping": lambda d: d.update(groups={}),
    "threads a string": lambda d: d["key"].update(threads="1"),
    "batch a list": lambda d: d["key"].update(batch=[1]),
    "key missing": lambda d: d.pop("key"),
    "interactions bad": lambda d: d.update(interactions=[[0, 1]]),
    "scale zero": lambda d: d.update(scale=0),
    "boolean share": lambda d: d["groups"][0].update(share=True),
    "absurd ratio": lambda d: d["groups"][0]["ratio"].__setitem__(0, 2**63),  # found by the fuzz suite: exit 3
    "absurd model_ms": lambda d: d.update(model_ms=1e300),
}


@pytest.fixture
def table(tmp_path, staircase_backend, latency_cache):
    from test_latency import staircase_net

    import carve as P

    net = tmp_path / "net.onnx"
    P.save(staircase_net(), net)
    lut = tmp_path / "net.lut.json"
    args = ["profile", str(net), "--backend", staircase_backend, "--rounds", "2", "--min-round-ms", "1"]
    assert main([*args, "-o", str(lut), "-q"]) == 0
    return net, lut


def _one_error(err: str) -> str:
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    return errors[0]


def test_every_broken_table_given_as_lut_is_one_line(table, tmp_path, staircase_backend, capsys):
    net, lut = table
    good = json.loads(lut.read_text())
    for name, mutate in MUTATIONS.items():
        doc = json.loads(json.dumps(good))
        mutate(doc)
        bad = tmp_path / "bad.lut.json"
        bad.write_text(json.dumps(doc))
        args = ["prune", str(net), "-o", str(tmp_path / "x.onnx"), "--target-latency", "0.7", "--lut", str(bad)]
        try:
            rc = main([*args, "--backend", staircase_backend])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 1, (name, err)
        assert str(bad) in _one_error(err), name
        assert not (tmp_path / "x.onnx").exists(), name


def test_an_onnx_file_given_as_a_table_is_one_line(table, tmp_path, staircase_backend, capsys):
    net, _ = table
    rc = main(["prune", str(net), "-o", str(tmp_path / "x.onnx"), "--target-latency", "0.7", "--lut", str(net)])
    assert rc == 1 and "not a readable latency table" in _one_error(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["nan ratio", "model_ms zero", "empty candidates", "threads a string", "garbage"])
def test_a_damaged_cached_table_is_measured_again(table, latency_cache, staircase_backend, capsys, name):
    net, lut = table
    (cached,) = latency_cache.glob("*.json")
    if name == "garbage":
        cached.write_bytes(b"\x00\xff not json")
    else:
        doc = json.loads(cached.read_text())
        MUTATIONS[name](doc)
        cached.write_text(json.dumps(doc))
    args = ["profile", str(net), "--backend", staircase_backend, "--rounds", "2", "--min-round-ms", "1"]
    rc = main([*args, "-o", str(lut.with_name("again.json")), "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "damaged cached latency table" in err and "measured again" in err, err
    assert json.loads(cached.read_text())["model_ms"] > 0  # the cache holds a good table again


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "0"])
def test_profile_min_round_ms_must_be_a_positive_time(table, capsys, value):
    net, _ = table
    with pytest.raises(SystemExit) as exc:
        main(["profile", str(net), "--min-round-ms", value])
    assert exc.value.code == 2 and "--min-round-ms" in _one_error(capsys.readouterr().err)
