"""The sweep's figures: the front's 2-D projections (PNG) and 3-D view (HTML), and the
hypervolume history (PNG). matplotlib and plotly only; no Ray, Optuna or MLflow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainables.contract import COMPLETED, OBJECTIVES, TRIAL_ID


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


def plot_front(trials_df: Any, front_df: Any, out: Path) -> list[Path]:
    """2-D projections (PNG) and an interactive 3-D front (HTML)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = trials_df[trials_df["status"] == COMPLETED] if len(trials_df) else trials_df
    if not len(done):
        return []
    paths = []
    names = list(OBJECTIVES)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (i, j) in zip(axes, ((0, 1), (0, 2), (1, 2))):
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

    import plotly.graph_objects as go

    hover = [f"{t}<br>bits={b}" for t, b in zip(done[TRIAL_ID], done.get("config.bits", [""] * len(done)))]
    on = done["pareto"].astype(bool) if "pareto" in done else [False] * len(done)
    fig3 = go.Figure()
    for flag, colour, label in ((False, "lightgray", "dominated"), (True, "crimson", "Pareto front")):
        sel = done[on == flag]
        fig3.add_trace(go.Scatter3d(
            x=sel[names[0]], y=sel[names[1]], z=sel[names[2]], mode="markers", name=label,
            marker={"size": 5, "color": colour},
            text=[h for h, o in zip(hover, on) if o == flag], hoverinfo="text+x+y+z",
        ))
    fig3.update_layout(scene={"xaxis_title": names[0], "yaxis_title": names[1], "zaxis_title": names[2]},
                       title="brsearch Pareto front (3-D)")
    html = out / "pareto_front_3d.html"
    fig3.write_html(str(html), include_plotlyjs=True)
    paths.append(html)
    return paths
