"""Figure functions for the paper's base experiments (Figures 2–5, optimizer weighting, null space).

Each function takes plain arrays (numpy or torch) and returns a matplotlib Figure; the recipes
save it. The Agg backend is used, so nothing needs a display.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .arrays import float_array as _np  # noqa: E402

__all__ = [
    "plot_regression_kernels",
    "plot_class_kernels",
    "plot_tangent_svm",
    "plot_tangent_embedding",
    "plot_printed_digits",
    "plot_optimizer_weighting",
    "plot_null_space",
]


def _kernel_image(ax, kernel, title: str, *, vmin=-1.0, vmax=1.0, boundaries: Sequence[int] = ()):
    k = _np(kernel)
    if vmin is None:  # data range: a trained normalized kernel often lies within [0.5, 1]
        vmin = float(np.percentile(k, 1))
    im = ax.imshow(k, cmap="RdBu_r" if vmin < 0 else "viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    for b in boundaries:
        ax.axhline(b - 0.5, color="k", lw=0.3)
        ax.axvline(b - 0.5, color="k", lw=0.3)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


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
        im = _kernel_image(
            axes[1, j], p["kernel"],
            f"({letters[2 * j + 1]}) normalized kernel after {p['steps']} steps\n"
            f"centered alignment {p['alignment']['init']:.2f} → {p['alignment']['final']:.2f}",
        )
        axes[1, j].set_xlabel("training inputs, sorted by x", fontsize=8)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046)
    fig.tight_layout()
    return fig


def plot_class_kernels(init_kernel, final_kernel, per_class: int, *, dataset: str, gaps: dict[str, float]) -> plt.Figure:
    """Figure 2 (e–h): normalized kernels over class-ordered images at initialization and after
    training, with class-block boundaries every ``per_class`` rows."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
    n = _np(init_kernel).shape[0]
    bounds = list(range(per_class, n, per_class))
    im = _kernel_image(axes[0], init_kernel, f"{dataset}: initialization\nwithin − between = {gaps['init']:.3f}",
                       vmin=None, boundaries=bounds)
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    im = _kernel_image(axes[1], final_kernel, f"{dataset}: after training\nwithin − between = {gaps['final']:.3f}",
                       vmin=None, boundaries=bounds)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    return fig


def _decision(ax, grid_x, grid_y, scores, x, y, title: str):
    ax.contourf(grid_x, grid_y, _np(scores), levels=[-1e9, 0, 1e9], colors=["#cfe0f3", "#f6d3cf"], alpha=0.9)
    ax.contour(grid_x, grid_y, _np(scores), levels=[0], colors="k", linewidths=0.8)
    x, y = _np(x), _np(y)
    ax.scatter(x[y > 0, 0], x[y > 0, 1], s=3, c="C3", label="+1")
    ax.scatter(x[y <= 0, 0], x[y <= 0, 1], s=3, c="C0", label="−1")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("auto")


def plot_tangent_svm(panels: dict[str, dict]) -> plt.Figure:
    """Figure 3. ``panels[task]`` holds ``grid_x, grid_y [G, G]``, ``tangent_scores``,
    ``rbf_scores [G, G]`` (decision functions), ``x_test [M, 2]``, ``y_test [M]``,
    ``tangent_acc``, ``rbf_acc``."""
    tasks = list(panels)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7.8))
    axes = np.asarray(axes).reshape(2, len(tasks))
    letters = "abcd"
    for j, task in enumerate(tasks):
        p = panels[task]
        _decision(axes[0, j], p["grid_x"], p["grid_y"], p["tangent_scores"], p["x_test"], p["y_test"],
                  f"({letters[j]}) {task}: linear SVM on tangent features\ntest accuracy {p['tangent_acc']:.3f}")
        _decision(axes[1, j], p["grid_x"], p["grid_y"], p["rbf_scores"], p["x_test"], p["y_test"],
                  f"({letters[j + 2]}) {task}: RBF SVM on raw inputs\ntest accuracy {p['rbf_acc']:.3f}")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def plot_tangent_embedding(panels: list[dict], *, method: str) -> plt.Figure:
    """Figure 4. Each panel: ``coords [N, 2]``, ``labels [N]``, ``seen`` (classes trained on),
    ``title``. Seen classes are drawn as filled dots, unseen as crosses."""
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
    axes[-1].legend(fontsize=6, markerscale=1.5, ncol=2, loc="best", title="digit (o seen, x unseen)", title_fontsize=6)
    fig.suptitle(f"tangent features embedded with {method} (distances from the normalized gradient kernel)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_printed_digits(init_kernel, final_kernel, confusion, per_class: int, examples, *, accuracy: float,
                        gaps: dict[str, float]) -> plt.Figure:
    """Figure 5: interleaved handwritten/printed kernels (blocks of ``per_class``) at init and after
    training, the confusion matrix on printed digits, and a strip of printed examples."""
    fig = plt.figure(figsize=(16, 4.6))
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.8])
    n = _np(init_kernel).shape[0]
    bounds = list(range(per_class, n, per_class))
    ax = fig.add_subplot(grid[0, 0])
    im = _kernel_image(ax, init_kernel, f"(a) initialization (blocks: hand 0, printed 0, hand 1, ...)\n"
                       f"within − cross digit (hand×printed) {gaps['init']:.3f}", vmin=None, boundaries=bounds)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(grid[0, 1])
    im = _kernel_image(ax, final_kernel, f"(b) after training\nwithin − cross digit (hand×printed) {gaps['final']:.3f}",
                       vmin=None, boundaries=bounds)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(grid[0, 2])
    conf = _np(confusion)
    ax.imshow(conf, cmap="Blues")
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            if conf[i, j]:
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("printed digit", fontsize=8)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.tick_params(labelsize=6)
    ax.set_title(f"(c) confusion on printed digits\naccuracy {accuracy:.3f}", fontsize=9)
    ax = fig.add_subplot(grid[0, 3])
    ex = _np(examples)
    strip = np.concatenate([np.concatenate(list(row), axis=1) for row in ex], axis=0)
    ax.imshow(strip, cmap="gray_r")
    ax.set_title("top: handwritten, bottom: printed", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_optimizer_weighting(weights: dict[str, np.ndarray], x_train, probe_x, kernels: dict[str, np.ndarray],
                             decomposition: dict[str, dict], correlations: dict[str, float]) -> plt.Figure:
    """Optimizer weighting and the expected-output decomposition.

    Args:
        weights: per optimizer, ``[N]`` per-example contribution at one probe (net, normalized).
        x_train: ``[N]`` 1-D training inputs (x axis); probe_x: the probe's input.
        kernels: "plain" and "adam-preconditioned" normalized kernels probes × train.
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
    _kernel_image(axes[1], kernels["plain"], "normalized kernel J Jᵀ at θ_T (probes × train)")
    im = _kernel_image(axes[2], kernels["preconditioned"], "Adam-preconditioned J P Jᵀ at θ_T")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    names = list(decomposition)
    shares = [decomposition[k]["share"] for k in names]
    lo = [decomposition[k]["share"] - decomposition[k]["interval"][0] for k in names]
    hi = [decomposition[k]["interval"][1] - decomposition[k]["share"] for k in names]
    axes[3].bar(range(len(names)), shares, yerr=[lo, hi], color=[f"C{i}" for i in range(len(names))], capsize=3)
    axes[3].set_xticks(range(len(names)))
    axes[3].set_xticklabels(names, rotation=25, fontsize=7, ha="right")
    axes[3].set_yscale("symlog", linthresh=1e-3)
    axes[3].axhline(1.0, color="k", lw=0.5, ls=":")
    axes[3].set_title("plain SGD, mean over batch orders:\nshare of the mean output change", fontsize=8)
    fig.tight_layout()
    return fig


def plot_null_space(spectrum, energy_curve, x_train, x_test, y_test, pred_test, residual, error, *,
                    rho: float, interval: Sequence[float], eigenfunctions=None) -> plt.Figure:
    """Generalization and the null space: spectrum, top-k target energy, predictions with the
    out-of-span part r(x), and error against r(x)."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    s = _np(spectrum)
    floor = max(float(s.max()), 1e-300) * 1e-16  # below this: rounding (shown at the floor)
    axes[0].semilogy(np.arange(1, s.size + 1), np.clip(s, floor, None), ".-", ms=3)
    axes[0].set_xlabel("index i (values below 1e-16 × largest shown at that floor)", fontsize=8)
    axes[0].set_title("spectrum of the path-kernel operator (λ_i / N)", fontsize=9)
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
    ax2 = axes[2].twinx()
    ax2.semilogy(xt[order], np.clip(_np(residual)[order], 1e-16, None), "C2-", lw=1, label="r(x)")
    ax2.set_ylabel("out-of-span part r(x) (log)", fontsize=8, color="C2")
    if eigenfunctions is not None:
        ef = _np(eigenfunctions)
        for i in range(min(3, ef.shape[1])):
            axes[2].plot(xt[order], ef[order, i] / (np.abs(ef[:, i]).max() + 1e-300), lw=0.6, alpha=0.5, color=f"C{4 + i}")
    axes[2].legend(fontsize=7, loc="upper left")
    axes[2].set_title("test predictions and out-of-span part (Nyström eigenfunctions faint)", fontsize=8)
    axes[3].scatter(_np(residual), _np(error), s=8)
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("out-of-span part r(x)", fontsize=8)
    axes[3].set_ylabel("test error |f(x) − y(x)|", fontsize=8)
    axes[3].set_title(f"Spearman ρ = {rho:.2f}  [{interval[0]:.2f}, {interval[1]:.2f}]", fontsize=9)
    fig.tight_layout()
    return fig
