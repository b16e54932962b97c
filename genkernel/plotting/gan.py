"""Figures of the GAN analyzer (matplotlib; the ``plot_*`` functions draw on a given ``Axes``, the
``*_figure`` functions build a whole figure).

Inputs are plain tensors / lists from :class:`genkernel.gan.GANKernelAnalyzer` and its ``report()``
(strict JSON: a None entry, how the report writes NaN, is drawn as a gap in a curve, grey in a heat map). Figures that summarize
several runs take one list of windows per seed and show every window of every seed: nothing is
chosen by looking at the numbers first. Measured and control matrices share one colour scale, and
every colour that carries meaning has a colour bar or a legend.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

from .arrays import clip_extend, colour_limit, error_lengths, float_array as _np, heat_colormap, no_value_note


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)


def plot_discriminator_field(ax, points, push, real=None, fake=None, centers=None, *, title="discriminator push field −w"):
    """Quiver of the unit push directions −w = −∇_x ℓ_G(D(x)) on ``points [N, 2]``, colour = log10 ‖w‖,
    with real (grey) and generated (red) samples and the mode centres (black crosses)."""
    p, v = _np(points), _np(push)
    mag = np.log10(np.linalg.norm(v, axis=1) + 1e-12)
    u = _unit(v)
    q = ax.quiver(p[:, 0], p[:, 1], u[:, 0], u[:, 1], mag, cmap="viridis", angles="xy", scale=28, width=0.004)
    bar = ax.figure.colorbar(q, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("log10 ‖w‖ (push strength)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    if real is not None:
        r = _np(real)
        ax.scatter(r[:, 0], r[:, 1], s=3, c="0.5", alpha=0.4, label="real")
    if fake is not None:
        f = _np(fake)
        ax.scatter(f[:, 0], f[:, 1], s=3, c="tab:red", alpha=0.6, label="generated")
    if centers is not None:
        c = _np(centers)
        ax.scatter(c[:, 0], c[:, 1], marker="x", c="k", s=25, label="modes")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper right")
    return q


def plot_probe_field(ax, samples, vectors, centers=None, *, title: str, color="tab:blue"):
    """Arrows ``vectors [M, 2]`` (unit length) at probe samples ``[M, 2]``."""
    x, v = _np(samples), _unit(_np(vectors))
    if centers is not None:
        c = _np(centers)
        ax.scatter(c[:, 0], c[:, 1], marker="x", c="k", s=25)
    ax.scatter(x[:, 0], x[:, 1], s=6, c="0.3")
    ax.quiver(x[:, 0], x[:, 1], v[:, 0], v[:, 1], color=color, angles="xy", scale=18, width=0.005)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def shared_limit(*matrices, diverging: bool = False) -> float:
    """One colour limit for several matrices (the largest finite value, or |value| when diverging),
    so that measured and control heat maps are read on the same scale; 1.0 when none is positive
    (:func:`genkernel.plotting.arrays.colour_limit`)."""
    return colour_limit(*matrices, absolute=diverging)


def plot_coupling(ax, matrix, labels: Sequence[str] | None = None, *, title: str, diverging: bool = False, fmt="{:.2f}",
                  limit: float | None = None, colorbar: str | None = None, shared_with: Sequence[Any] = ()):
    """Heat map of a ``[G, G]`` coupling matrix (rows: probe group a, columns: source group b).

    ``limit``: the colour scale's end (pass :func:`shared_limit` of the matrices shown side by side);
    default this matrix's own. ``colorbar``: a label draws a colour bar with it, which says "grey: no value"
    where a cell is missing and extends where a value lies beyond the scale (drawn at its end's colour).
    ``shared_with``: the other matrices drawn on this scale without a colour bar of their own (the measured
    panel beside the control one that carries it): the bar's note and extend speak for them too."""
    m = _np(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a coupling matrix is square [G, G] (rows: probe group, columns: source group, one grouping); "
                         f"got shape {m.shape}")
    if labels is not None and len(labels) != m.shape[0]:
        raise ValueError(f"{len(labels)} labels for a [{m.shape[0]}, {m.shape[0]}] coupling matrix: pass one label per group")
    lim = limit if limit is not None else shared_limit(m, diverging=diverging)
    # a passed limit of 0 gives vmin = vmax, where matplotlib draws every value at the map's bottom
    lim = lim if lim > 0 else 1.0
    # a None / NaN entry (a group without probes) in grey: left transparent it was the white of a zero net share
    # (and next to magma's near-white top)
    if diverging:
        im = ax.imshow(m, cmap=heat_colormap("RdBu_r"), vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(m, cmap=heat_colormap("magma"), vmin=0, vmax=lim)
    if colorbar:
        # (a value beyond a passed limit, or a negative traffic share, is drawn at the scale's end: the bar extends)
        bar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03,
                                 extend=clip_extend(im.norm.vmin, im.norm.vmax, m, *shared_with))
        # (the grey of a missing entry is named where there is one, in this panel or a panel the bar speaks for: the
        # note read this matrix only, so a NaN of the measured panel, whose bar sits beside the control, had none)
        bar.set_label("; ".join(t for t in (colorbar, no_value_note(m, *shared_with)) if t), fontsize=7)
        bar.ax.tick_params(labelsize=6)
    g = m.shape[0]
    if g <= 10:
        for i in range(g):
            for j in range(g):
                if np.isfinite(m[i, j]):
                    light = (not diverging) and m[i, j] < 0.6 * float(im.norm.vmax)
                    ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=5,
                            color="w" if light else "k")
    ticks = list(range(g))
    short = [str(i) for i in ticks] if labels is None else [str(s).replace("mode ", "m") for s in labels]
    ax.set_xticks(ticks, short, fontsize=6)
    ax.set_yticks(ticks, short, fontsize=6)
    ax.set_xlabel("source group b (training latents)", fontsize=7)
    ax.set_ylabel("probe group a", fontsize=7)
    ax.set_title(title, fontsize=9)
    return im


def plot_alignment(ax, alignment: list[dict], *, title="alignment of each step's ΔG(z')"):
    """Curves over generator steps of the mean cosines recorded by the analyzer."""
    if not alignment:
        return
    steps = [row["step"] for row in alignment]
    series = [
        ("cos_formula", "ledger (kernel machine, optimizer weights)", "k"),
        ("cos_kernel_field", "plain kernel-smoothed field −Σ c K w", "tab:blue"),
        ("cos_local_push", "local push −w(z')", "tab:orange"),
        ("cos_nearest_mode", "direction to nearest real mode", "tab:green"),
    ]
    for key, label, color in series:
        if key in alignment[0]:
            ax.plot(steps, _np([row[key] for row in alignment]), label=label, color=color, lw=1.2)
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("tracked generator step (the analyzer's count, not the loop's iteration)", fontsize=7)
    ax.set_ylabel("mean cosine over probes", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower left")


def plot_coverage_and_coupling(ax, coverage: list[dict], windows: list[dict], *, title="coverage vs cross-group coupling",
                               kind: str = "traffic"):
    """Modes hit (fraction) and share of samples on a mode over training, beside every window's
    geometry interaction statistic minus its permutation controls (clustered interval)."""
    if coverage:
        steps = [c["step"] for c in coverage]
        ax.plot(steps, [c["modes_hit"] / c["num_modes"] for c in coverage], color="tab:green", label="modes hit (fraction)")
        ax.plot(steps, [c["quality_share"] for c in coverage], color="tab:olive", label="samples on a mode (within the coverage radius)")
    rows = [w for w in windows if _stat(w, "geometry", kind) is not None]
    if rows:
        _errorbars(ax, rows, lambda w: _stat(w, "geometry", kind), 0.0, "tab:purple",
                   f"own-group {kind} interaction − control")
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set_xlabel("tracked generator step (the analyzer's count, not the loop's iteration)", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)


def _stat(window: dict, partition: str, kind: str) -> dict | None:
    """A window's interval dict: ``partition`` "geometry" / "spatial" (interaction − control) or
    "geometry_minus_spatial"; None where the window does not have it."""
    stats = window.get("statistics") or {}
    if partition == "geometry_minus_spatial":
        return (stats.get(partition) or {}).get(kind)
    return ((stats.get(partition) or {}).get(kind) or {}).get("interaction_minus_control")


def _estimate_and_interval(result: dict) -> tuple[float, float, float]:
    estimate = result.get("difference", result.get("estimate"))
    low, high = result.get("interval", [result.get("low"), result.get("high")]) or [None, None]
    nan = float("nan")
    return (nan if estimate is None else estimate), (nan if low is None else low), (nan if high is None else high)


def _errorbars(ax, windows: list[dict], pick, offset: float, color: str, label: str | None, marker: str = "o") -> None:
    mids, est, lo, hi = [], [], [], []
    for w in windows:
        result = pick(w)
        if result is None:
            continue
        e, low, high = _estimate_and_interval(result)
        if result.get("why"):
            # an interval the statistics refuse (too few probe groups, "why"): no bar. With two probe groups the
            # interaction statistic is the same for both (each row sums to 1), so its interval has zero width and
            # was drawn as an exact estimate
            low = high = math.nan
        mids.append(0.5 * (w["steps"][0] + w["steps"][1]) + offset)
        est.append(e)
        # no interval: no bar (NaN), not a zero-length one, which would read as an exact estimate
        lo.append(low)
        hi.append(high)
    if mids:
        # (error_lengths: NaN, no bar, where an end or the estimate is not finite; an infinite one raised in errorbar)
        ax.errorbar(mids, est, yerr=error_lengths(est, lo, hi), fmt=marker, color=color, ms=3.5, lw=1, capsize=2,
                    label=label)


WINDOW_SERIES = (
    ("geometry", "geometry: interaction − control", "tab:blue"),
    ("spatial", "spatial (D-independent): interaction − control", "tab:orange"),
    ("geometry_minus_spatial", "geometry − spatial", "k"),
)
SEED_MARKERS = "osD^v<>p*h"


def plot_window_statistics(ax, windows_per_seed: Sequence[Sequence[dict]], *, kind: str = "traffic", title: str | None = None,
                           seeds: Sequence[Any] | None = None):
    """Every window of every seed: the geometry and the spatial partition's interaction statistic
    minus control, and their difference, each with its interval (clustered by probe group; none where
    the statistics refuse one, e.g. too few probe groups). Colour: the statistic; marker: the seed, both in
    the legend (``seeds``: the seeds' names, one per entry of ``windows_per_seed``; default "run 1", "run 2", ...)."""
    from matplotlib.lines import Line2D

    if seeds is not None and len(seeds) != len(windows_per_seed):
        raise ValueError(f"seeds names {len(seeds)} seeds for {len(windows_per_seed)} seeds' windows: give one per seed")
    span = max((w["steps"][1] - w["steps"][0] + 1 for ws in windows_per_seed for w in ws), default=1)
    shift = 0.12 * span
    for i, windows in enumerate(windows_per_seed):
        marker = SEED_MARKERS[i % len(SEED_MARKERS)]
        for j, (partition, label, color) in enumerate(WINDOW_SERIES):
            _errorbars(ax, list(windows), lambda w, p=partition: _stat(w, p, kind), (j - 1) * shift, color,
                       label if i == 0 else None, marker)
    ax.axhline(0, color="0.6", lw=0.7)
    ax.set_xlabel("generator step (window centre)", fontsize=7)
    ax.set_ylabel(f"{kind} share difference", fontsize=7)
    count = len(windows_per_seed)
    ax.set_title(title or f"every window, {kind} ({count} seed{'s' if count != 1 else ''}; marker = seed)", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    if count > 1:
        # (the markers said "marker = seed" with no key: which marker was which seed was nowhere)
        for i in range(count):
            handles.append(Line2D([], [], color="0.35", marker=SEED_MARKERS[i % len(SEED_MARKERS)], linestyle="none",
                                  markersize=4))
            names.append(f"seed {seeds[i]}" if seeds is not None else f"run {i + 1}")
    ax.legend(handles, names, fontsize=6, loc="best")


def average_window_matrices(windows_per_seed: Sequence[Sequence[dict]], partition: str, key: str) -> np.ndarray | None:
    """``[G, G]`` entry-wise mean (NaN ignored) of ``statistics[partition][kind][matrix]`` over every
    window of every seed; ``key`` is "traffic_matrix", "traffic_matrix_control", "net_matrix" or
    "net_matrix_control". None when no window has it."""
    kind, _, which = key.partition("_")
    mats = []
    for windows in windows_per_seed:
        for w in windows:
            entry = (((w.get("statistics") or {}).get(partition) or {}).get(kind) or {}).get(which)
            if entry is not None:
                mats.append(_np(entry))
    if not mats:
        return None
    stack = np.stack(mats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # entries no window has: NaN, drawn as gaps
        return np.nanmean(stack, axis=0)


def coupling_figure(windows_per_seed: Sequence[Sequence[dict]], labels: Sequence[str], spatial_labels: Sequence[str] | None,
                    *, title: str, seeds: Sequence[Any] | None = None):
    """The coupling matrices averaged over every window and seed, measured beside control on one colour
    scale (rows: geometry, then spatial), and every window's statistics for traffic and net shares
    (:func:`plot_window_statistics`, ``seeds`` naming the seeds in its legend)."""
    import matplotlib.pyplot as plt

    partitions = [("geometry", labels)] + ([("spatial", spatial_labels)] if spatial_labels is not None else [])
    fig, axes = plt.subplots(len(partitions) + 1, 4, figsize=(17, 4.2 * (len(partitions) + 1)))
    for row, (partition, names) in enumerate(partitions):
        mats = {k: average_window_matrices(windows_per_seed, partition, k)
                for k in ("traffic_matrix", "traffic_matrix_control", "net_matrix", "net_matrix_control")}
        t_lim = shared_limit(mats["traffic_matrix"], mats["traffic_matrix_control"])
        n_lim = shared_limit(mats["net_matrix"], mats["net_matrix_control"], diverging=True)
        # (the control panel's colour bar is the pair's: it names the measured panel's grey cells too)
        panels = [("traffic_matrix", "traffic share, measured", False, t_lim, None, None),
                  ("traffic_matrix_control", "traffic share, permutation controls", False, t_lim, "traffic share",
                   "traffic_matrix"),
                  ("net_matrix", "net share, measured", True, n_lim, None, None),
                  ("net_matrix_control", "net share, permutation controls", True, n_lim, "net share", "net_matrix")]
        for col, (key, what, diverging, lim, bar, beside) in enumerate(panels):
            ax = axes[row, col]
            if mats[key] is None:
                ax.set_axis_off()
                continue
            if bar is None and mats[key + "_control"] is None:
                # no control panel to carry the pair's colour bar: the measured panel carries its own (its colours
                # were read against no scale)
                bar = "traffic share" if key.startswith("traffic") else "net share"
            plot_coupling(ax, mats[key], names, title=f"{partition}: {what}", diverging=diverging, limit=lim,
                          colorbar=bar, shared_with=[mats[beside]] if beside and mats[beside] is not None else ())
    plot_window_statistics(axes[-1, 0], windows_per_seed, kind="traffic", seeds=seeds)
    plot_window_statistics(axes[-1, 1], windows_per_seed, kind="net", seeds=seeds)
    for ax in axes[-1, 2:]:
        ax.set_axis_off()
    axes[-1, 2].text(0.0, 0.95, COUPLING_NOTE, fontsize=7.5, va="top", ha="left", wrap=True, transform=axes[-1, 2].transAxes)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


COUPLING_NOTE = (
    "Matrices: mean over every window of every seed\n(probe groups at each window's start).\n\n"
    "interaction = own-group share − the other probe\ngroups' mean share from the same source group\n"
    "(removes source-group strength);\n− control: minus the same statistic under label\npermutations on the same steps.\n\n"
    "spatial: a grouping that ignores D (nearest mode /\nk-means of z): coupling from G's smoothness alone.\n"
    "geometry − spatial > 0: coupling the discriminator's\ngeometry explains beyond smoothness.\n\n"
    "Intervals: 95 %, clustered by probe group."
)


def sample_figure(panels: Sequence[tuple[str, object]], *, nrow: int = 8, title: str | None = None, scale: float = 0.42):
    """A readable sample sheet: one large panel per ``(title, images [B, C, H, W] in [-1, 1])``,
    side by side, each a grid with ``nrow`` images per row, drawn at a size where a 16×16 image is
    several millimetres wide."""
    import matplotlib.pyplot as plt

    rows = max(math.ceil(int(images.shape[0]) / nrow) for _, images in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * nrow * scale + 0.4, rows * scale + 0.9), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels):
        plot_sample_grid(ax, images, nrow=nrow, title=name)
        ax.title.set_fontsize(10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_sample_grid(ax, images, *, nrow: int = 8, title: str = "samples"):
    """A torchvision grid of ``images [B, C, H, W]`` (C = 1 or 3; Tensor or array) in [-1, 1]."""
    import torch
    from torchvision.utils import make_grid

    images = torch.as_tensor(images.detach().cpu() if hasattr(images, "detach") else np.asarray(images))
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W] (one channel axis, even for grey images: x[:, None]); "
                         f"got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images have {images.shape[1]} channels (shape {tuple(images.shape)}): a sample grid draws "
                         "1 (grey) or 3 (RGB) channels, channels first")
    grid = make_grid((images.float() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0).clamp(0, 1)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)


__all__ = [
    "plot_discriminator_field", "plot_probe_field", "plot_coupling", "plot_alignment",
    "plot_coverage_and_coupling", "plot_sample_grid", "plot_window_statistics", "shared_limit",
    "average_window_matrices", "coupling_figure", "sample_figure",
]
