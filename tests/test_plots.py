"""The report's plots say what they show: batch sizes as integers on the speed-up plot, Pareto labels that do not
overlap (issue 25 item 8). Constructed reports, so nothing is measured."""

from __future__ import annotations

import itertools

import pytest
from conftest import bench_report


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, captured (with their file names) before they are closed."""
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig

    def capture(self, fname, *args, **kwargs):
        saved[str(fname).rsplit("/", 1)[-1]] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return saved


def test_the_speedup_plot_labels_batches_as_integers(tmp_path, figures):
    from carve.pipeline.measure.report import plots

    doc = bench_report([(1.5, 1.4, 1.6), (1.6, 1.5, 1.7), (1.4, 1.3, 1.5), (1.5, 1.4, 1.6)])
    for r, batch in zip(doc["results"], (1, 2, 4, 8)):
        r.update(batch=batch, a={"samples_ms": [2.0, 2.1, 2.2]}, b={"samples_ms": [1.3, 1.4, 1.5]}, mac_ratio=0.5)
    doc["models"] = {"a": {"name": "a"}, "b": {"name": "b"}}
    plots(doc, tmp_path)
    ax = figures["speedup.png"].axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["1", "2", "4", "8"]
    assert not ax.get_xaxis().get_minor_ticks() or not any(t.label1.get_text() for t in ax.xaxis.get_minor_ticks())


def test_pareto_labels_do_not_overlap(tmp_path, figures):
    from carve.pipeline.measure.report import plots

    # a dense front: close latencies and accuracies, long ids, as a sweep of one criterion over many targets gives
    points = [
        {
            "id": f"l1-knapsack-macs{t:.2f}-lsq-e0",
            "status": "ok",
            "pareto": True,
            "latency_ms": 0.090 + 0.0005 * k,
            "top1": 0.90 + 0.001 * k,
            "top1_original": 0.97,
            "measured": "wall clock, median",
        }
        for k, t in enumerate([0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65])
    ]
    doc = {
        "kind": "carve.sweep",
        "sweep": {"name": "dense"},
        "objective": {"accuracy": "top1", "latency_ms_reference": 0.2},
        "points": points,
    }
    plots(doc, tmp_path)
    fig = figures["pareto.png"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed after saving
    labels = [t for t in fig.axes[0].texts if t.get_text().startswith("l1-")]
    assert len(labels) == len(points)
    boxes = [t.get_window_extent(renderer) for t in labels]
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (labels[i].get_text(), labels[j].get_text())
