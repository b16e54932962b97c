"""Figure functions for the paper's base experiments (Figures 2–5, optimizer weighting, null space).

Each function takes plain arrays (numpy or torch) and returns a matplotlib Figure; the recipes
save it. No backend is chosen here (scripts and tests choose; without a display matplotlib
falls back to Agg), so ``plt.show()`` keeps working in a notebook that imports this module.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from .arrays import clip_extend, colour_range, float_array as _np, heat_colormap, no_value_note

__all__ = [
    "plot_regression_kernels",
    "plot_class_kernels",
    "plot_tangent_svm",
    "plot_tangent_embedding",
    "plot_printed_digits",
    "plot_optimizer_weighting",
    "plot_null_space",
]


def _kernel_image(ax, kernel, title: str, *, vmin=-1.0, vmax=1.0, boundaries: Sequence[int] = (),
                  ticks: Sequence[float] = (), ticklabels: Sequence[str] = (), line_width: float = 0.3):
    k = _np(kernel)
    if vmin is None:  # data range: a trained normalized kernel often lies within [0.5, 1]
        # (non-finite entries ignored: np.percentile of a kernel with one NaN is NaN, with a −inf it can be −inf,
        # a colour scale of nothing)
        # (at most vmax: a constant kernel, e.g. all ones, has its 1st percentile at its top)
        finite = k[np.isfinite(k)]
        vmin = min(float(np.percentile(finite, 1)), float(vmax)) if finite.size else -1.0
    # vmin = vmax (a constant kernel): widened about the value, which is then drawn at the map's middle and reads
    # as itself on the colour bar; left equal, every cell was drawn at the map's bottom, as the scale's minimum
    vmin, vmax = colour_range(vmin, vmax)
    if vmin < 0 < vmax:
        # A diverging map must put its white at k̂ = 0: on a plain [vmin, 1] scale with vmin > −1 the
        # white would sit at (vmin + 1) / 2 and a positive similarity would be drawn as "none".
        # The blue half of the map is cut to the depth |vmin| / vmax: stretched over the whole blue half, a low
        # end of −0.03 drew k̂ = −0.03 as deep a blue as k̂ = 1 a red (a colour's depth is |k̂| / vmax either side).
        import matplotlib
        from matplotlib.colors import ListedColormap, TwoSlopeNorm

        depth = min(1.0, -vmin / vmax)
        x = np.linspace(0.0, 1.0, 256)
        # (a NaN entry in grey: left transparent it was the white of k̂ = 0)
        cmap = heat_colormap(ListedColormap(matplotlib.colormaps["RdBu_r"](np.where(x < 0.5, 0.5 - depth * (0.5 - x), x))))
        im = ax.imshow(k, cmap=cmap, norm=TwoSlopeNorm(vcenter=0.0, vmin=vmin, vmax=vmax), interpolation="nearest")
    else:
        # (a NaN entry in grey here too: transparent, it was the white of k̂ = 0 on RdBu_r)
        im = ax.imshow(k, cmap=heat_colormap("RdBu_r" if vmin < 0 else "viridis"), vmin=vmin, vmax=vmax,
                       interpolation="nearest")
    for b in boundaries:
        ax.axhline(b - 0.5, color="w" if vmin >= 0 else "k", lw=line_width)
        ax.axvline(b - 0.5, color="w" if vmin >= 0 else "k", lw=line_width)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    if len(ticks):
        ax.set_xticklabels(list(ticklabels), fontsize=6)
        ax.set_yticklabels(list(ticklabels), fontsize=6)
    return im


def shared_range(*kernels, low_percentile: float = 1.0) -> tuple[float, float]:
    """One colour range ``(vmin, vmax)`` for several normalized kernels: from the lowest of their ``low_percentile``
    percentiles of the finite entries (NaN and ±inf ignored; the entries below it are drawn at the scale's bottom,
    which the colour bar's ``extend`` shows) to 1, or to the largest finite entry where one lies above 1 (panels
    compared by eye must share their scale). Kernels whose percentiles all reach the top (all-ones kernels: every
    input alike) give 1 ± 0.1 (:func:`~.arrays.colour_range`), so a k̂ of 1 is drawn at the map's middle and reads
    as 1 on the colour bar: the range (1, 1) drew it at the map's bottom, as the scale's minimum.

    The top is never below a finite entry: a cosine is at most 1, but a float32 kernel's rounding, a sketched or a
    preconditioned kernel, or a path kernel that is no cosine can exceed it, and the scale that ended at 1 drew every
    such entry in 1's colour with nothing on the colour bar saying so (an entry of 5 read as 1).

    Raises ValueError where no kernel has a finite entry."""
    finite = [k[np.isfinite(k)] for k in (_np(k) for k in kernels)]
    finite = [v for v in finite if v.size]
    if not finite:
        raise ValueError("shared_range: no kernel has a finite entry (all NaN or ±inf): there is no scale to draw; "
                         "check the kernels passed")
    top = max(1.0, max(float(v.max()) for v in finite))
    low = min(float(np.percentile(v, low_percentile)) for v in finite)
    return colour_range(min(low, top), top)


def kernel_range(*kernels) -> tuple[float, float]:
    """The colour range ``(vmin, vmax)`` of normalized kernels drawn whole: −1..1, widened to the kernels' finite
    entries beyond it (NaN and ±inf ignored; see :func:`shared_range` for why a "normalized" kernel can exceed 1),
    so every finite entry is drawn at its own colour. The range ±1 it replaces drew an entry of 5 in 1's colour
    with nothing saying so."""
    finite = [k[np.isfinite(k)] for k in (_np(k) for k in kernels)]
    finite = [v for v in finite if v.size]
    low = min([-1.0] + [float(v.min()) for v in finite])
    high = max([1.0] + [float(v.max()) for v in finite])
    return low, high


def kernel_label(label: str, *kernels) -> str:
    """A kernel image's colour-bar label: ``label``, then "entries above 1" where a finite entry of ``kernels``
    exceeds a cosine's 1 beyond float32 rounding (these kernels are no cosines, and the scale was widened to them:
    :func:`shared_range`), then the grey note of ``kernels`` (:func:`~.arrays.no_value_note`)."""
    finite = [k[np.isfinite(k)] for k in (_np(k) for k in kernels)]
    top = max([float(v.max()) for v in finite if v.size], default=-np.inf)
    parts = [label, f"entries above 1 (to {top:.3g}): no cosine" if top > 1.0 + 1e-6 else "", no_value_note(*kernels)]
    return "; ".join(p for p in parts if p)


def _block_ticks(init_kernel, final_kernel, block: int, what: str) -> int:
    """The kernels' common size n, checked square, equal and tiled by blocks of ``block`` rows."""
    shapes = [_np(k).shape for k in (init_kernel, final_kernel)]
    if shapes[0] != shapes[1] or len(shapes[0]) != 2 or shapes[0][0] != shapes[0][1]:
        raise ValueError(f"init and final kernels must be square and of one shape; got shapes {shapes[0]} and {shapes[1]}")
    n = shapes[0][0]
    if block < 1 or n % block:
        raise ValueError(f"a {n} × {n} kernel is not tiled by {what} = {block}: the block ticks and boundaries "
                         "would name the wrong rows; pass the kernels of whole blocks")
    return n


def plot_regression_kernels(panels: dict[str, dict]) -> plt.Figure:
    """Figure 2 (a–d). ``panels[kind]`` holds ``x_train [N], y_train [N], x_test [M], y_true [M],
    y_pred [M], kernel [N, N]`` (normalized, at the last step), ``steps``, ``alignment`` (dict of
    init/final centered alignment)."""
    kinds = list(panels)
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 7.5))
    axes = np.asarray(axes).reshape(2, len(kinds))
    letters = "abcdefgh"
    for j, kind in enumerate(kinds):
        p = panels[kind]
        ax = axes[0, j]
        ax.plot(_np(p["x_test"]), _np(p["y_true"]), "k-", lw=1.2, label="ground truth")
        ax.plot(_np(p["x_test"]), _np(p["y_pred"]), "C3--", lw=1.5, label="network")
        ax.plot(_np(p["x_train"]), _np(p["y_train"]), "o", ms=2.5, color="C0", label="training points")
        ax.set_title(f"({letters[2 * j]}) {kind}: prediction vs ground truth", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        # the panel is labelled "sorted by x": draw the kernel's rows and columns in that order
        # (a kernel over unsorted inputs was drawn in their order under that label)
        x_train, kernel = _np(p["x_train"]).reshape(-1), _np(p["kernel"])
        if kernel.shape != (x_train.size, x_train.size):
            raise ValueError(f"{kind}: kernel of shape {kernel.shape} for {x_train.size} training inputs: pass the "
                             "[N, N] kernel over x_train")
        order = np.argsort(x_train, kind="stable")
        # (−1..1 widened to entries beyond it: the fixed ±1 drew them at its ends, with nothing saying so)
        vmin, vmax = kernel_range(kernel)
        im = _kernel_image(
            axes[1, j], kernel[np.ix_(order, order)],
            f"({letters[2 * j + 1]}) normalized kernel after {p['steps']} steps\n"
            f"centered alignment {p['alignment']['init']:.2f} → {p['alignment']['final']:.2f}", vmin=vmin, vmax=vmax,
        )
        axes[1, j].set_xlabel("training inputs, sorted by x", fontsize=8)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046, label=kernel_label("", kernel))
    fig.tight_layout()
    return fig


def plot_class_kernels(init_kernel, final_kernel, per_class: int, *, dataset: str, gaps: dict[str, float],
                       aucs: dict[str, float] | None = None) -> plt.Figure:
    """Figure 2 (e–h): normalized kernels over class-ordered images at initialization and after
    training, on one colour scale, with class-block boundaries every ``per_class`` rows and the
    class at each block's centre. Titles give the block AUC (scale-free) and the absolute gap."""
    fig = plt.figure(figsize=(10, 4.6))
    n = _block_ticks(init_kernel, final_kernel, per_class, "per_class")
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.05])
    bounds = list(range(per_class, n, per_class))
    ticks = [per_class * (c + 0.5) - 0.5 for c in range(n // per_class)]
    vmin, vmax = shared_range(init_kernel, final_kernel)
    for i, (key, kernel, when) in enumerate((("init", init_kernel, "initialization"), ("final", final_kernel, "after training"))):
        auc = "" if aucs is None else f"block AUC {aucs[key]:.3f}, "
        im = _kernel_image(fig.add_subplot(grid[0, i]), kernel, f"{dataset}: {when}\n{auc}within − between {gaps[key]:.3f}",
                           vmin=vmin, vmax=vmax, boundaries=bounds, ticks=ticks,
                           ticklabels=[str(c) for c in range(len(ticks))], line_width=0.6)
    fig.colorbar(im, cax=fig.add_subplot(grid[0, 2]), extend=clip_extend(vmin, vmax, init_kernel, final_kernel),
                 label=kernel_label("k̂ (shared scale)", init_kernel, final_kernel))
    fig.tight_layout()
    return fig


def _decision(ax, grid_x, grid_y, scores, x, y, title: str):
    from matplotlib.patches import Patch

    ax.contourf(grid_x, grid_y, _np(scores), levels=[-1e9, 0, 1e9], colors=["#cfe0f3", "#f6d3cf"], alpha=0.9)
    ax.contour(grid_x, grid_y, _np(scores), levels=[0], colors="k", linewidths=0.8)
    x, y = _np(x), _np(y)
    ax.scatter(x[y > 0, 0], x[y > 0, 1], s=3, c="C3", label="test point, +1")
    ax.scatter(x[y <= 0, 0], x[y <= 0, 1], s=3, c="C0", label="test point, −1")
    ax.set_title(title, fontsize=8)
    ax.set_aspect("equal")  # the geometry is the point: an ellipse must not be drawn as a circle
    ax.set_xlim(float(np.min(grid_x)), float(np.max(grid_x)))
    ax.set_ylim(float(np.min(grid_y)), float(np.max(grid_y)))
    ax.tick_params(labelsize=6)
    return [Patch(color="#f6d3cf", label="predicted +1"), Patch(color="#cfe0f3", label="predicted −1")]


def _g(value, spec: str = "g") -> str:
    """A tuned hyperparameter for a title; "?" when it was not given (formatting "?" with :g raised)."""
    return "?" if value is None else format(float(value), spec)


def plot_tangent_svm(panels: dict[str, dict], *, seed: int = 0) -> plt.Figure:
    """Figure 3. ``panels[task]`` holds ``grid_x, grid_y [G, G']``, ``tangent_scores``,
    ``rbf_scores`` (decision functions), ``x_test [M, 2]``, ``y_test [M]``, ``tangent_acc``,
    ``rbf_acc`` and the tuned ``tangent_C``, ``rbf_C``, ``rbf_gamma``. Equal aspect: each task's
    columns are as wide as its data. ``seed``: the run drawn, named in the title."""
    tasks = list(panels)
    widths = [float(np.ptp(_np(panels[t]["grid_x"]))) / float(np.ptp(_np(panels[t]["grid_y"]))) for t in tasks]
    widths = [max(w, 0.35) for w in widths]  # room for the titles
    fig = plt.figure(figsize=(3.2 * sum(widths) + 2.5, 8.2))
    grid = fig.add_gridspec(2, len(tasks), width_ratios=widths)
    letters = "abcd"
    handles = None
    for j, task in enumerate(tasks):
        p = panels[task]
        handles = _decision(fig.add_subplot(grid[0, j]), p["grid_x"], p["grid_y"], p["tangent_scores"], p["x_test"], p["y_test"],
                            f"({letters[j]}) {task}: linear SVM on\ntangent features (C={_g(p.get('tangent_C'))})\n"
                            f"test accuracy {p['tangent_acc']:.3f}")
        ax = fig.add_subplot(grid[1, j])
        _decision(ax, p["grid_x"], p["grid_y"], p["rbf_scores"], p["x_test"], p["y_test"],
                  f"({letters[j + 2]}) {task}: RBF SVM on inputs\n(C={_g(p.get('rbf_C'))}, γ={_g(p.get('rbf_gamma'), '.3g')})\n"
                  f"test accuracy {p['rbf_acc']:.3f}")
        if j == 0:
            points = ax.get_legend_handles_labels()[0]
    fig.legend(handles=handles + points, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"seed {seed}; C and γ tuned by cross-validation; equal aspect", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def plot_tangent_embedding(panels: list[dict], *, method: str, seed: int = 0) -> plt.Figure:
    """Figure 4. Each panel: ``coords [N, 2]``, ``labels [N]``, ``seen`` (classes trained on),
    ``title``. Seen classes are drawn as filled dots, unseen as crosses. ``seed``: the run drawn,
    named in the title."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("tab10")
    for ax, p in zip(axes, panels):
        c, lab = _np(p["coords"]), np.asarray(p["labels"])
        for k in np.unique(lab):
            sel = lab == k
            seen = k in set(p["seen"])
            ax.scatter(c[sel, 0], c[sel, 1], s=7 if seen else 10, color=cmap(int(k) % 10),
                       marker="o" if seen else "x", lw=0.6, label=str(int(k)))
        ax.set_title(p["title"], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, markerscale=1.5, ncol=2, loc="best", title="digit (o seen, x unseen)", title_fontsize=6)
    fig.suptitle(f"tangent features embedded with {method} (distances from the normalized gradient kernel; seed {seed})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_printed_digits(init_kernel, final_kernel, confusion, per_class: int, examples, *, accuracy: float,
                        gaps: dict[str, float], aucs: dict[str, float] | None = None, seed: int = 0) -> plt.Figure:
    """Figure 5: interleaved handwritten/printed kernels (blocks of ``per_class``: hand 0, printed 0,
    hand 1, ...) at init and after training on one colour scale, large enough that the blocks show
    (thick lines between digits, thin between the two domains of a digit, the digit at each pair
    of blocks); the confusion matrix on printed digits and a strip of examples. ``seed``: the run
    drawn, named in the confusion panel's title."""
    pair = 2 * per_class
    n = _block_ticks(init_kernel, final_kernel, pair, "2 · per_class")
    fig = plt.figure(figsize=(15, 12))
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.04], height_ratios=[1.35, 1])
    ticks = [pair * (d + 0.5) - 0.5 for d in range(n // pair)]
    vmin, vmax = shared_range(init_kernel, final_kernel)
    for i, (key, kernel, title) in enumerate((("init", init_kernel, "(a) initialization"),
                                               ("final", final_kernel, "(b) after training on handwritten digits"))):
        ax = fig.add_subplot(grid[0, i])
        auc = "" if aucs is None else f"block AUC (hand×printed) {aucs[key]:.3f}, "
        im = _kernel_image(ax, kernel, f"{title}\n{auc}same − different digit {gaps[key]:.3f}", vmin=vmin, vmax=vmax,
                           boundaries=list(range(pair, n, pair)), ticks=ticks,
                           ticklabels=[str(d) for d in range(len(ticks))], line_width=1.2)
        for b in range(per_class, n, pair):  # hand | printed inside each digit
            ax.axhline(b - 0.5, color="w", lw=0.4, ls=":")
            ax.axvline(b - 0.5, color="w", lw=0.4, ls=":")
        ax.set_xlabel("digit (each: handwritten block, then printed block)", fontsize=8)
    fig.colorbar(im, cax=fig.add_subplot(grid[0, 2]), extend=clip_extend(vmin, vmax, init_kernel, final_kernel),
                 label=kernel_label("k̂ (shared scale)", init_kernel, final_kernel))
    ax = fig.add_subplot(grid[1, 0])
    conf = _np(confusion)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion must be square [classes, classes] (rows: true digit, columns: predicted); got {conf.shape}")
    ax.imshow(conf, cmap="Blues", vmin=0)  # counts: white at 0
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            if conf[i, j]:
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("printed digit", fontsize=8)
    ax.set_xticks(range(conf.shape[1]))
    ax.set_yticks(range(conf.shape[0]))
    ax.tick_params(labelsize=7)
    ax.set_title(f"(c) confusion on printed digits (seed {seed})\naccuracy {accuracy:.3f}", fontsize=9)
    ax = fig.add_subplot(grid[1, 1])
    ex = _np(examples)
    strip = np.concatenate([np.concatenate(list(row), axis=1) for row in ex], axis=0)
    ax.imshow(strip, cmap="gray_r")
    ax.set_title("examples, top: handwritten, bottom: printed", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_optimizer_weighting(weights: dict[str, np.ndarray], x_train, probe_x, kernels: dict[str, np.ndarray],
                             decomposition: dict[str, dict], correlations: dict[str, float]) -> plt.Figure:
    """Optimizer weighting and the expected-output decomposition.

    Args:
        weights: per optimizer, ``[N]`` per-example contribution at one probe (net, normalized).
        x_train: ``[N]`` 1-D training inputs (x axis); probe_x: the probe's input.
        kernels: "plain" and "preconditioned" (Adam's) normalized kernels probes × train.
        decomposition: term name -> {"share", "interval"} from the stochastic decomposition.
        correlations: label -> rank correlation, shown in the title.
    """
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    x = _np(x_train)
    order = np.argsort(x)
    for i, (name, w) in enumerate(weights.items()):
        axes[0].plot(x[order], _np(w)[order], "-o", ms=2.5, lw=1, label=name, color=f"C{i}")
    axes[0].axvline(float(probe_x), color="k", ls=":", lw=1)
    axes[0].set_xlabel("training input x_n", fontsize=8)
    axes[0].set_ylabel("C(x*, n) / |Δf(x*)|", fontsize=8)
    axes[0].set_title("per-example contribution at the probe x* (dotted)\n"
                      + ", ".join(f"{k} {v:.2f}" for k, v in correlations.items()), fontsize=8)
    axes[0].legend(fontsize=7)
    # one colour bar for both kernels: one scale, −1..1 widened to entries beyond it (each panel's own, or ±1 with
    # an entry beyond it, drew a colour the bar beside them gave another value)
    vmin, vmax = kernel_range(kernels["plain"], kernels["preconditioned"])
    _kernel_image(axes[1], kernels["plain"], "normalized kernel J Jᵀ at θ_T (probes × train)", vmin=vmin, vmax=vmax)
    im = _kernel_image(axes[2], kernels["preconditioned"], "Adam-preconditioned J P Jᵀ at θ_T", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=axes[2], fraction=0.046,
                 label=kernel_label("k̂ (both panels)", kernels["plain"], kernels["preconditioned"]))
    # The first-order share sits near 1, the others near 0: the panel shows what the first-order
    # ledger leaves (1 − first order) and the terms that explain it, on a linear axis (points and
    # interval bars, no bars on a log axis); the first-order share is in the title.
    first = decomposition.get("first_order")
    names = [k for k in decomposition if k != "first_order"]
    rows = []
    if first is not None:
        lo, hi = first["interval"]
        rows.append(("gap: 1 − first order", 1 - first["share"], 1 - hi, 1 - lo))
    rows += [(k, decomposition[k]["share"], *decomposition[k]["interval"]) for k in names]
    ys = np.arange(len(rows))[::-1]
    for yv, (label, value, low, high) in zip(ys, rows):
        color = "k" if label.startswith("gap") else f"C{names.index(label) % 10 if label in names else 0}"
        err = None if low is None or high is None or not np.isfinite([low, high]).all() else [[value - low], [high - value]]
        axes[3].errorbar([value], [yv], xerr=err, fmt="o", color=color, capsize=3, ms=4)
    axes[3].set_yticks(ys)
    axes[3].set_yticklabels([r[0] for r in rows], fontsize=7)
    axes[3].axvline(0.0, color="k", lw=0.5)
    axes[3].set_xlabel("share of the mean output change (95% interval over seeds)", fontsize=7)
    title = "plain SGD, mean over batch orders"
    if first is not None:
        title += f"\nfirst-order ledger: {first['share']:.3f} [{first['interval'][0]:.3f}, {first['interval'][1]:.3f}]"
    axes[3].set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def plot_null_space(spectrum, energy_curve, x_train, x_test, y_test, pred_test, residual, error, *,
                    rho: float, interval: Sequence[float] | None, eigenfunctions=None, distance=None,
                    by_region: dict | None = None, operator_error: float | None = None,
                    train_range: Sequence[float] = (-np.pi, np.pi), seed: int = 0) -> plt.Figure:
    """Generalization and the null space: spectrum, top-k target energy, predictions with the
    out-of-span part r(x), and error against r(x) (inside the training range ``train_range``, the
    interval the training inputs were drawn from and the regions of ``by_region``: filled; outside:
    open), with the Spearman correlations per region beside the distance baseline. ``seed``: the
    run drawn, named in the title; ``operator_error``: the kernel machine's relative error the
    spectrum's note states (pass the number the JSON reports)."""
    low_x, high_x = (float(v) for v in train_range)
    xs = _np(x_train).reshape(-1)
    if xs.size and (xs.min() < low_x or xs.max() > high_x):
        raise ValueError(f"training inputs span [{xs.min():.3g}, {xs.max():.3g}], outside train_range "
                         f"[{low_x:.3g}, {high_x:.3g}]: test points there would be drawn as 'outside'; pass the "
                         "interval the training inputs were drawn from as train_range")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.3))
    s = _np(spectrum)
    floor = max(float(s.max()), 1e-300) * 1e-16  # below this: rounding (shown at the floor)
    axes[0].semilogy(np.arange(1, s.size + 1), np.clip(s, floor, None), ".-", ms=3)
    axes[0].set_xlabel("index i (values below 1e-16 × largest shown at that floor)", fontsize=8)
    note = "" if operator_error is None else f"\n(checkpoint operator: its kernel machine misses the change, rel. error {operator_error:.2g})"
    axes[0].set_title("spectrum of the checkpoint path-kernel operator (λ_i / N)" + note, fontsize=8)
    e = _np(energy_curve)
    axes[1].plot(np.arange(1, e.size + 1), e, ".-", ms=3)
    axes[1].set_xscale("log")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_xlabel("k", fontsize=8)
    axes[1].set_title("share of target energy in the top-k eigenspace", fontsize=9)
    xt = _np(x_test)
    order = np.argsort(xt)
    axes[2].plot(xt[order], _np(y_test)[order], "k-", lw=1, label="target")
    axes[2].plot(xt[order], _np(pred_test)[order], "C3--", lw=1.2, label="network")
    axes[2].plot(_np(x_train), np.full(len(_np(x_train)), axes[2].get_ylim()[0]), "|", color="C0", label="training inputs")
    if eigenfunctions is not None:
        ef = _np(eigenfunctions)
        for i in range(min(3, ef.shape[1])):
            axes[2].plot(xt[order], ef[order, i] / (np.abs(ef[:, i]).max() + 1e-300), lw=0.6, alpha=0.6,
                         color=f"C{4 + i}", label=f"Nyström eigenfunction {i + 1} (scaled)")
    ax2 = axes[2].twinx()
    ax2.semilogy(xt[order], np.clip(_np(residual)[order], 1e-16, None), "C2-", lw=1)
    ax2.set_ylabel("out-of-span part r(x) (log, green; below 1e-16 at 1e-16)", fontsize=8, color="C2")
    axes[2].legend(fontsize=6, loc="upper left")
    axes[2].set_title("test predictions, eigenfunctions, and r(x) (green, right axis)", fontsize=8)
    inside = (xt >= low_x) & (xt <= high_x)
    # log axes: a zero r(x) or error was not drawn at all (and the points are what ρ is computed on);
    # values below 1e-16 are drawn at that floor, as the axis labels say
    r, err = np.clip(_np(residual), 1e-16, None), np.clip(_np(error), 1e-16, None)
    axes[3].scatter(r[inside], err[inside], s=9, color="C0", label="inside the training range")
    axes[3].scatter(r[~inside], err[~inside], s=12, facecolors="none", edgecolors="C1", label="outside")
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("out-of-span part r(x) (below 1e-16: at that floor)", fontsize=8)
    axes[3].set_ylabel("test error |f(x) − y(x)| (floor 1e-16)", fontsize=8)
    # test points on a grid are strongly correlated: an interval over them (a bootstrap of the points) is too
    # narrow; interval=None draws ρ alone, the intervals over seeds are in by_region and the claims
    title = (f"seed {seed}: Spearman ρ = {rho:.2f} over the test points" if interval is None
             else f"seed {seed}: Spearman ρ = {rho:.2f}  [{interval[0]:.2f}, {interval[1]:.2f}] (test points)")
    if by_region:
        title += "\nmean over seeds, ρ(r, err) vs ρ(distance to training, err):\n" + "; ".join(
            f"{k} {v['rho_residual']:.2f} vs {v['rho_distance']:.2f}" for k, v in by_region.items())
    axes[3].set_title(title, fontsize=7)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    return fig
