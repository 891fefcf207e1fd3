"""The sweep's figures: the front's 2-D projections (PNG), the hypervolume history (PNG), and the
interactive views (HTML, plotly): the front in 3-D and every trial in parallel coordinates, and
several sweeps' fronts in one plot (`search.pick --compare`). matplotlib and plotly only; no Ray,
Optuna or MLflow.

Why plotly and not optuna.visualization (which builds both views from a study): the sweep's
front is not the study's. The study holds early-stopped trials as PRUNED and knows nothing of the
floors, so `plot_pareto_front` would recompute a different front and could not shade the
infeasible trials; trials.parquet has each trial's `pareto` and `feasible` as the sweep decided
them, and these views draw exactly that with the same plotly figures Optuna would make."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainables.contract import COMPLETED, DIRECTIONS, MAXIMIZE, OBJECTIVES, TRIAL_ID

FRONT_3D_FILE = "pareto_front_3d.html"
PARALLEL_FILE = "parallel_coordinates.html"
#: a trial's class in the views, drawn in this order (the front last, on top), with its colour
KINDS = {"stopped early": "#d9d9d9", "infeasible": "#fdd0a2", "dominated": "#6baed6", "Pareto front": "#d62728"}


def plot_hypervolume(history: list[Any], out: Path, reference: tuple[float, ...]) -> Path:
    """hypervolume.png: the parent run's `hypervolume` metric history (MLflow Metric objects,
    step = training epochs consumed by the sweep so far) as a step curve; `reference` is the
    hypervolume's reference point, named on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((m.step, m.timestamp, m.value) for m in history)
    xs, ys = [0] + [p[0] for p in pts], [0.0] + [p[2] for p in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.step(xs, ys, where="post", color="crimson")
    ax.plot(xs[1:], ys[1:], "o", color="crimson", ms=4, label="a trial completed")
    ax.set_xlabel("training epochs consumed (all trials)")
    ax.set_ylabel(f"hypervolume (reference {tuple(reference)})")
    ax.set_title("brsearch: hypervolume of the front")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "hypervolume.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_front(trials_df: Any, front_df: Any, out: Path, objectives: Sequence[str] = OBJECTIVES) -> list[Path]:
    """2-D projections (PNG) of the first three objectives, and the interactive views (`front_views`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = trials_df[trials_df["status"] == COMPLETED] if len(trials_df) else trials_df
    if not len(done):
        return []
    paths = []
    names = list(objectives)
    pairs = [(i, j) for i in range(min(3, len(names))) for j in range(i + 1, min(3, len(names)))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    axes = axes[0]
    for ax, (i, j) in zip(axes, pairs):
        ax.scatter(done[names[i]], done[names[j]], c="lightgray", edgecolors="gray", label="dominated")
        if len(front_df):
            ax.scatter(front_df[names[i]], front_df[names[j]], c="crimson", label="Pareto front")
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("brsearch: Pareto front of the fully quantized models")
    fig.tight_layout()
    png = out / "pareto_front_2d.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    paths.append(png)

    return paths + front_views(trials_df, out, objectives)


def trial_kinds(trials_df: Any, objectives: Sequence[str]) -> tuple[Any, list[str]]:
    """(the trials with finite objective values, each one's kind: a key of KINDS). A completed
    trial is on the front, dominated (feasible) or infeasible (below a floor); a stopped one
    holds the objectives of its last rung. Failed trials have none and are left out."""
    import numpy as np

    df = trials_df.copy()
    vals = df[list(objectives)].apply(lambda c: c.astype(float)).to_numpy() if len(df) else np.zeros((0, len(objectives)))
    df = df[np.isfinite(vals).all(axis=1)] if len(df) else df
    kinds = []
    for _, r in df.iterrows():
        if r.get("status") != COMPLETED:
            kinds.append("stopped early")
        elif bool(r.get("pareto", False)):
            kinds.append("Pareto front")
        elif bool(r.get("feasible", True)):
            kinds.append("dominated")
        else:
            kinds.append("infeasible")
    return df, kinds


def _label(m: str) -> str:
    return f"{m} ({'higher' if DIRECTIONS.get(m, MAXIMIZE) == MAXIMIZE else 'lower'} is better)"


def _hover(df: Any, objectives: Sequence[str]) -> list[str]:
    bits = df["config.bits"] if "config.bits" in df else [None] * len(df)
    return [f"trial {t}" + (f", {b:g} bits" if isinstance(b, (int, float)) else "") + "<br>"
            + "<br>".join(f"{m} = {float(r[m]):.4g}" for m in objectives)
            for t, b, (_, r) in zip(df[TRIAL_ID], bits, df.iterrows())]


def _scatter(go: Any, df: Any, objectives: Sequence[str], **kw: Any) -> Any:
    """One plotly trace of `df`'s points: 3-D over the first three objectives (a fourth as marker
    size), 2-D over two."""
    names = list(objectives)
    text = _hover(df, names)
    if len(names) >= 3:
        marker = dict(kw.pop("marker", {}))
        if len(names) == 4 and len(df):
            v = df[names[3]].astype(float)
            lo, hi = float(v.min()), float(v.max())
            good = (v - lo) / (hi - lo) if hi > lo else v * 0 + 0.5
            if DIRECTIONS.get(names[3], MAXIMIZE) != MAXIMIZE:
                good = 1 - good
            marker["size"] = list(4 + 8 * good)
        return go.Scatter3d(x=df[names[0]], y=df[names[1]], z=df[names[2]], mode="markers", text=text,
                            hoverinfo="text", marker=marker, **kw)
    return go.Scatter(x=df[names[0]], y=df[names[1]], mode="markers", text=text, hoverinfo="text", **kw)


def _axes_layout(objectives: Sequence[str], title: str) -> dict[str, Any]:
    names = list(objectives)
    if len(names) >= 3:
        scene = {"xaxis_title": _label(names[0]), "yaxis_title": _label(names[1]), "zaxis_title": _label(names[2])}
        extra = f"; marker size: {names[3]}, larger is better" if len(names) == 4 else ""
        return {"scene": scene, "title": title + extra}
    return {"xaxis_title": _label(names[0]), "yaxis_title": _label(names[1]), "title": title}


def front_figures(trials_df: Any, objectives: Sequence[str] = OBJECTIVES) -> tuple[Any, Any] | None:
    """(the front among all trials, every trial in parallel coordinates) as plotly figures; None
    when no trial has objective values. The front view is 3-D over the first three objectives (a
    fourth as marker size) or 2-D for two; the parallel coordinates colour each trial's line by
    its kind (front, dominated, infeasible, stopped early) and orient every axis so that up is
    better."""
    import plotly.graph_objects as go

    df, kinds = trial_kinds(trials_df, objectives)
    if not len(df):
        return None
    names = list(objectives)
    left_out = len(trials_df) - len(df)
    note = f" ({left_out} failed trial(s) without objectives not shown)" if left_out else ""
    fig = go.Figure()
    for kind, colour in KINDS.items():
        sel = df[[k == kind for k in kinds]]
        if len(sel):
            fig.add_trace(_scatter(go, sel, names, name=f"{kind} ({len(sel)})",
                                   marker={"size": 6, "color": colour, "opacity": 1.0 if kind == "Pareto front" else 0.6}))
    fig.update_layout(**_axes_layout(names, f"brsearch: Pareto front among {len(df)} trials{note}"))

    code = {k: i for i, k in enumerate(KINDS)}
    colours = list(KINDS.values())
    scale = [[i / (len(colours) - 1), c] for i, c in enumerate(colours)]
    dims = []
    for m in names:
        v = df[m].astype(float)
        lo, hi = float(v.min()), float(v.max())
        pad = (hi - lo) * 0.02 or 0.01
        rng = [lo - pad, hi + pad] if DIRECTIONS.get(m, MAXIMIZE) == MAXIMIZE else [hi + pad, lo - pad]
        dims.append({"label": _label(m), "values": list(v), "range": rng})
    if "config.bits" in df and df["config.bits"].notna().all():
        dims.append({"label": "bits", "values": list(df["config.bits"].astype(float))})
    dims.append({"label": "kind", "values": [code[k] for k in kinds], "range": [0, len(KINDS) - 1],
                 "tickvals": list(range(len(KINDS))), "ticktext": list(KINDS)})
    par = go.Figure(go.Parcoords(line={"color": [code[k] for k in kinds], "colorscale": scale, "cmin": 0,
                                       "cmax": len(KINDS) - 1}, dimensions=dims))
    counts = ", ".join(f"{sum(k == kind for k in kinds)} {kind}" for kind in KINDS)
    par.update_layout(title=f"brsearch: every trial ({counts}){note}", margin={"l": 80, "r": 80})
    return fig, par


def front_views(trials_df: Any, out: Path, objectives: Sequence[str] = OBJECTIVES) -> list[Path]:
    """pareto_front_3d.html and parallel_coordinates.html (`front_figures`), self-contained (plotly.js
    inside, so they open offline and as MLflow artifacts); the paths written, none when no trial
    has objective values."""
    figs = front_figures(trials_df, objectives)
    if figs is None:
        return []
    paths = [out / FRONT_3D_FILE, out / PARALLEL_FILE]
    for fig, path in zip(figs, paths):
        fig.write_html(str(path), include_plotlyjs=True)
    return paths


def compare_figure(fronts: Mapping[str, Any], objectives: Sequence[str]) -> Any:
    """Several sweeps' fronts (name -> front table) in one plotly figure over their common
    objectives; the points no other sweep's point dominates (the combined front) are ringed."""
    import numpy as np
    import plotly.graph_objects as go

    from search.front import non_dominated_mask

    names = list(objectives)
    allpts = [(s, i) for s, df in fronts.items() for i in range(len(df))]
    sign = np.array([1.0 if DIRECTIONS.get(m, MAXIMIZE) == MAXIMIZE else -1.0 for m in names])
    stacked = np.vstack([fronts[s][names].to_numpy(dtype=float) for s in fronts]) if allpts else np.zeros((0, len(names)))
    best = non_dominated_mask(stacked * sign) if len(stacked) else np.zeros(0, dtype=bool)
    fig = go.Figure()
    for s, df in fronts.items():
        fig.add_trace(_scatter(go, df, names, name=f"{s} ({len(df)})", marker={"size": 6}))
    combined = [fronts[s].iloc[[i]] for (s, i), on in zip(allpts, best) if on]
    if combined:
        import pandas as pd

        both = pd.concat(combined)
        fig.add_trace(_scatter(go, both, names, name=f"combined front ({len(both)})",
                               marker={"size": 11, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": "black"}}))
    fig.update_layout(**_axes_layout(names, f"brsearch: the fronts of {', '.join(fronts)}"))
    return fig


def compare_fronts(fronts: Mapping[str, Any], objectives: Sequence[str], path: Path) -> Path:
    """`compare_figure` as a self-contained HTML file at `path`."""
    compare_figure(fronts, objectives).write_html(str(path), include_plotlyjs=True)
    return path
