"""The front you can see: the 3-D front and the parallel-coordinates view of every trial (front
highlighted, infeasible shaded), and several sweeps' fronts in one plot, written by
search.tracking's views and opened in a real headless browser (chromium; those tests skip where
it is not installed). The sweep-made versions on a parent run are checked in tests/test_pick.py."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from _browser import chromium, probe

from search.tracking import compare_figure, front_figures, front_views

OBJ3 = ("clean_acc", "robust_acc", "size_kib")
needs_browser = pytest.mark.skipif(chromium() is None, reason="no chromium (apt-get install chromium)")


def _table() -> pd.DataFrame:
    """12 trials: 4 on the front, 3 dominated, 2 infeasible, 2 stopped early, 1 failed."""
    rows = []
    kinds = ["front"] * 4 + ["dominated"] * 3 + ["infeasible"] * 2 + ["stopped"] * 2 + ["failed"]
    for i, kind in enumerate(kinds):
        v = (0.3 + 0.05 * i, 0.6 - 0.04 * i, 4.0 + i)
        if kind == "failed":
            v = (math.nan, math.nan, math.nan)
        rows.append({"trial_id": f"t{i:02d}", "status": {"stopped": "stopped", "failed": "failed"}.get(kind, "completed"),
                     "clean_acc": v[0], "robust_acc": v[1], "size_kib": v[2], "config.bits": 2.0,
                     "pareto": kind == "front", "feasible": kind in ("front", "dominated")})
    return pd.DataFrame(rows)


def test_views_classify_every_trial_and_orient_minimized_axes(tmp_path):
    front3d, par = front_figures(_table(), OBJ3)
    counts = {t.name.split(" (")[0]: len(t.x) for t in front3d.data}
    assert counts == {"stopped early": 2, "infeasible": 2, "dominated": 3, "Pareto front": 4}
    assert all(t.type == "scatter3d" for t in front3d.data)
    (lines,) = par.data
    assert lines.type == "parcoords" and len(lines.line.color) == 11  # the failed trial has no values
    dims = {d.label: d for d in lines.dimensions}
    lo, hi = dims["size_kib (lower is better)"].range
    assert lo > hi  # minimized: the axis runs downwards, so up is better on every axis
    lo, hi = dims["clean_acc (higher is better)"].range
    assert lo < hi
    kind = list(dims["kind"].values)
    assert kind.count(3) == 4 and kind.count(1) == 2  # 4 on the front, 2 infeasible (shaded)
    assert "1 failed trial(s)" in par.layout.title.text
    paths = front_views(_table(), tmp_path, OBJ3)
    assert [p.name for p in paths] == ["pareto_front_3d.html", "parallel_coordinates.html"]
    assert all(p.stat().st_size > 1e6 for p in paths)  # plotly.js inside: the files open offline


def test_two_and_four_objectives():
    t = _table()
    two, _ = front_figures(t, ("clean_acc", "size_kib"))
    assert {d.type for d in two.data} == {"scatter"}
    t["channel_sparsity"] = [0.1 * (i % 5) for i in range(len(t))]
    four, par = front_figures(t, (*OBJ3, "channel_sparsity"))
    assert {d.type for d in four.data} == {"scatter3d"}
    assert all(len(d.marker.size) == len(d.x) for d in four.data)  # the fourth as marker size
    assert len(par.data[0].dimensions) == 4 + 2  # objectives, bits, kind
    assert front_figures(t[t["status"] == "failed"], OBJ3) is None


def test_compare_rings_the_combined_front():
    a = pd.DataFrame({"trial_id": ["a1", "a2"], "clean_acc": [0.9, 0.5], "robust_acc": [0.1, 0.5], "size_kib": [10, 10]})
    b = pd.DataFrame({"trial_id": ["b1", "b2"], "clean_acc": [0.8, 0.5], "robust_acc": [0.05, 0.5],
                      "size_kib": [20, 5]})  # b1: dominated by a1; b2 dominates a2 (smaller)
    fig = compare_figure({"A": a, "B": b}, OBJ3)
    names = {t.name: len(t.x) for t in fig.data}
    assert names == {"A (2)": 2, "B (2)": 2, "combined front (2)": 2}
    ringed = sorted(t.split("<br>")[0] for t in fig.data[-1].text)
    assert ringed == ["trial a1", "trial b2"]


@needs_browser
@pytest.mark.slow
def test_views_render_in_a_browser(tmp_path):
    paths = front_views(_table(), tmp_path, OBJ3)
    front3d, par = probe(paths[0]), probe(paths[1])
    assert front3d["errors"] == [] and par["errors"] == []
    assert "WebGL is not supported" not in front3d["text"]
    (p3,), (pp,) = front3d["plots"], par["plots"]
    assert sorted(t["n"] for t in p3["traces"]) == [2, 2, 3, 4] and p3["canvases"] >= 1
    assert [t["n"] for t in pp["traces"]] == [11] and pp["svg"] >= 1
    # the probe can fail: a page with a script error reports it
    bad = tmp_path / "bad.html"
    bad.write_text(paths[1].read_text().replace("</body>", "<script>null.x = 1;</script></body>"))
    assert probe(bad)["errors"]
