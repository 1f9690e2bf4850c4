"""The examples of docs/architecture.md's "Adding a plugin" run as written: each is extracted from the Markdown (the
``python`` block after an ``<!-- example: NAME -->`` marker), run with ``model`` a loaded model, and what it made is
checked: the plugin is registered and its result is what the example says. The registries are restored after each
example, so the plugins it registers do not leak into other tests."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import REPO

import carve as P
from carve.pipeline.passes import passes
from carve.pipeline.pruning.allocator import allocators
from carve.pipeline.pruning.criterion import criteria
from carve.pipeline.pruning.repair import repairs

DOC = REPO / "docs" / "architecture.md"
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```python\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    return dict(EXAMPLE.findall(DOC.read_text()))


@pytest.fixture
def run_example(tiny_resnet_onnx):
    """Run an example on the tiny ResNet with every registry restored afterwards; returns its namespace."""
    registries = [criteria, allocators, repairs, passes]
    for r in registries:
        r.names()  # load the built-ins first, so restoring does not unload them
    saved = [dict(r._items) for r in registries]

    def run(name: str) -> dict:
        ns = {"model": P.load(tiny_resnet_onnx), "__name__": f"docs_example_{name}"}
        exec(compile(examples()[name], f"{DOC}:{name}", "exec"), ns)
        return ns

    yield run
    for r, items in zip(registries, saved):
        r._items.clear()
        r._items.update(items)


def test_every_kind_has_an_example_of_about_ten_lines():
    found = examples()
    assert set(found) == {"criterion", "allocator", "repair", "pass"}
    for name, code in found.items():
        body = [ln for ln in code.splitlines() if ln.strip() and not ln.startswith(("import", "from"))]
        assert len(body) <= 16, f"the {name} example has {len(body)} lines of code"


def test_criterion_example(run_example):
    ns = run_example("criterion")
    assert "max_abs" in criteria
    p = ns["p"]
    assert p.criterion == "max_abs" and p.removed.any()
    an, equal = p.analysis, 0
    for src in an.producers():  # a unit scores the sum of its filters' max |w| (one filter: exactly that)
        expected = np.abs(an.filters(src).astype(np.float64)).max(axis=1)
        got = p.scores[an.source_units(src)]
        assert (got >= expected - 1e-9).all()
        equal += int(np.allclose(got, expected))
    assert equal > 0


def test_allocator_example(run_example):
    ns = run_example("allocator")
    assert "deeper_more" in allocators
    from carve.pipeline.graph.cost import model_cost

    model, p = ns["model"], ns["p"]
    pruned = P.prune(model, p)
    assert model_cost(pruned).macs <= 0.7 * model_cost(model).macs * 1.02  # the MAC target, reached by bisection


def test_repair_example(run_example):
    ns = run_example("repair")
    report = ns["report"]
    assert report.repairs == {"norm_keep": report.repairs["norm_keep"]} and report.repairs["norm_keep"] > 0
    assert report.channels_removed > 0
    # on the working model (removed columns zeroed), each consumer's weight gets back the norm it had
    from carve.pipeline.graph.consumers import consumer_columns, weight_matrix
    from carve.pipeline.graph.surgery import zero_removed

    model = ns["model"]
    plan = P.plan(P.analyse(model), 0.3)
    cols = consumer_columns(plan)
    working = zero_removed(model, plan)
    repaired = repairs.get("norm_keep")().apply(model, plan, working).model
    assert cols
    for name, (weight, axis, _) in cols.items():
        node = model.nodes[name]
        full = np.linalg.norm(weight_matrix(model, node, weight, axis))
        np.testing.assert_allclose(np.linalg.norm(weight_matrix(repaired, node, weight, axis)), full, rtol=1e-5)


def test_pass_example(run_example):
    ns = run_example("pass")
    result = ns["result"]
    assert not result.changed and result.summary == {"dropped": 0}  # exported models carry no doc strings
    model = ns["model"]
    model.graph.node[0].doc_string = "from the exporter"
    again = passes.get("strip_docs")()(model)
    assert again.changed and again.summary == {"dropped": 1}
    assert not any(n.doc_string for n in again.model.graph.node)
    np.testing.assert_equal(len(again.model.graph.node), len(model.graph.node))
