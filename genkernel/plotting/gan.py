"""Figures of the GAN analyzer (matplotlib; every function draws on a given ``Axes``).

Inputs are plain tensors / lists from :class:`genkernel.gan.GANKernelAnalyzer` and its ``report()``
(strict JSON: a None entry, how the report writes NaN, is drawn as a gap).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .arrays import float_array as _np


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)


def plot_discriminator_field(ax, points, push, real=None, fake=None, centers=None, *, title="discriminator push field −w"):
    """Quiver of the unit push directions −w = −∇_x ℓ_G(D(x)) on ``points [N, 2]``, colour = log10 ‖w‖,
    with real (grey) and generated (red) samples and the mode centres (black crosses)."""
    p, v = _np(points), _np(push)
    mag = np.log10(np.linalg.norm(v, axis=1) + 1e-12)
    u = _unit(v)
    q = ax.quiver(p[:, 0], p[:, 1], u[:, 0], u[:, 1], mag, cmap="viridis", angles="xy", scale=28, width=0.004)
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


def plot_coupling(ax, matrix, labels: Sequence[str] | None = None, *, title: str, diverging: bool = False, fmt="{:.2f}"):
    """Heat map of a ``[G, G]`` coupling matrix (rows: probe group a, columns: source group b)."""
    m = _np(matrix)
    finite = m[np.isfinite(m)]
    if diverging:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=float(finite.max()) if finite.size else 1.0)
    g = m.shape[0]
    if g <= 10:
        for i in range(g):
            for j in range(g):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=5, color="w" if not diverging else "k")
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
    ax.set_xlabel("generator step", fontsize=7)
    ax.set_ylabel("mean cosine over probes", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower left")


def plot_coverage_and_coupling(ax, coverage: list[dict], windows: list[dict], *, title="coverage vs cross-group coupling"):
    """Modes hit (fraction) and share of samples on a mode over training, beside the own-group traffic
    share minus its permutation control per window (with its interval)."""
    if coverage:
        steps = [c["step"] for c in coverage]
        ax.plot(steps, [c["modes_hit"] / c["num_modes"] for c in coverage], color="tab:green", label="modes hit (fraction)")
        ax.plot(steps, [c["quality_share"] for c in coverage], color="tab:olive", label="samples within 3σ of a mode")
    if windows and "traffic_own_minus_control" in windows[0]:
        mids = _np([0.5 * (w["steps"][0] + w["steps"][1]) for w in windows])
        d = [w["traffic_own_minus_control"] for w in windows]
        mean = _np([x["difference"] for x in d])
        interval = _np([x["interval"] if x.get("interval") is not None else [None, None] for x in d]).reshape(-1, 2)
        ax.errorbar(mids, mean, yerr=[mean - interval[:, 0], interval[:, 1] - mean],
                    fmt="o-", color="tab:purple", ms=3, lw=1, label="own-group traffic − control")
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set_xlabel("generator step", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)


def plot_sample_grid(ax, images, *, nrow: int = 8, title: str = "samples"):
    """A torchvision grid of ``images [B, C, H, W]`` in [-1, 1]."""
    from torchvision.utils import make_grid

    grid = make_grid((images.detach().float().cpu() + 1) / 2, nrow=nrow, padding=1, pad_value=1.0).clamp(0, 1)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)


__all__ = [
    "plot_discriminator_field", "plot_probe_field", "plot_coupling", "plot_alignment",
    "plot_coverage_and_coupling", "plot_sample_grid",
]
