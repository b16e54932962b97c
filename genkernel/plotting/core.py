"""Figure functions for the core experiments (kernel neighbourhoods, decision regions)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

LABEL_COLORS = {1: "tab:red", -1: "tab:blue"}


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def scatter_labels(ax, points, labels, *, size=4, alpha=0.35) -> None:
    """Training points coloured by their ±1 label."""
    points, labels = _np(points), _np(labels)
    if labels.shape != (points.shape[0],):
        raise ValueError(f"labels of shape {labels.shape} for {points.shape[0]} points: pass one label per point")
    unknown = sorted(set(np.unique(labels).tolist()) - set(LABEL_COLORS))
    if unknown:
        # a point whose label is no key of LABEL_COLORS was left out of the figure
        raise ValueError(f"labels must be ±1 (got {unknown[:5]}); map {{0, 1}} labels with 2 * y - 1")
    for value, color in LABEL_COLORS.items():
        mask = labels == value
        ax.scatter(points[mask, 0], points[mask, 1], s=size, c=color, alpha=alpha, label=f"y = {value:+d}")
    ax.set_aspect("equal")


def plot_decision_regions(ax, grid_x, grid_y, scores, points, labels, title: str) -> None:
    """Sign of ``scores [H, W]`` on the grid, with the training points on top."""
    ax.contourf(_np(grid_x), _np(grid_y), _np(scores), levels=[-1e9, 0, 1e9], colors=["#c6dbef", "#fcbba1"], alpha=0.8)
    ax.contour(_np(grid_x), _np(grid_y), _np(scores), levels=[0], colors="k", linewidths=0.8)
    scatter_labels(ax, points, labels, size=3, alpha=0.5)
    from matplotlib.patches import Patch

    handles = ax.get_legend_handles_labels()[0] + [Patch(color="#fcbba1", label="predicted +1"),
                                                    Patch(color="#c6dbef", label="predicted −1")]
    ax.legend(handles=handles, fontsize=6, loc="lower left", framealpha=0.8)
    ax.set_title(title, fontsize=9)


def plot_neighborhoods(ax, points, labels, anchors, neighbor_idx, purity, title: str) -> None:
    """Each anchor (×) with its neighbourhood highlighted in its own colour, purity in the legend."""
    points, labels, anchors, neighbor_idx, purity = map(_np, (points, labels, anchors, neighbor_idx, purity))
    ax.scatter(points[:, 0], points[:, 1], s=2, c="0.85")
    colors = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink"]
    for a, (anchor, idx) in enumerate(zip(anchors, neighbor_idx)):
        color = colors[a % len(colors)]
        ax.scatter(points[idx, 0], points[idx, 1], s=7, c=color, alpha=0.8,
                   label=f"({anchor[0]:.2f}, {anchor[1]:.2f}) purity {purity[a]:.2f}")
        ax.scatter([anchor[0]], [anchor[1]], marker="x", s=70, c="k", linewidths=2)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower left", framealpha=0.8)


def circle_neighborhoods_figure(panels: dict) -> plt.Figure:
    """Figure 1: data, decision regions, Euclidean and kernel neighbourhoods at three stages."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    axes = axes.ravel()
    scatter_labels(axes[0], panels["points"], panels["labels"])
    axes[0].set_title("(a) data: +1 on the circle, −1 inside r² ≤ 0.8", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    plot_decision_regions(axes[1], *panels["decision"], panels["points"], panels["labels"], "(b) SGD decision regions")
    for ax, (title, idx, purity) in zip(axes[2:], panels["neighborhoods"]):
        plot_neighborhoods(ax, panels["points"], panels["labels"], panels["anchors"], idx, purity, title)
    fig.tight_layout()
    return fig
