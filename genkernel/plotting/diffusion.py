"""Figures of the diffusion analyzer (DESIGN.md section 3). Each function returns a Figure.

Inputs are the plain numbers of :meth:`NoiseLevelAnalyzer.report` (nested lists are fine) and a
:class:`~genkernel.diffusion.retrieval.RetrievalResult`, so figures can be redrawn from JSON.
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .arrays import float_array as _arr

__all__ = [
    "plot_noise_matrices",
    "plot_locality_over_training",
    "plot_kernel_decay",
    "plot_retrieval",
    "plot_overview",
    "plot_matrix_evolution",
]


def _step(row: dict) -> Any:
    """The x value of a snapshot: its global training step when known, else its tracked step."""
    return row["global_step"] if row.get("global_step") is not None else row.get("tracked_step")


def _heat(ax, matrix, levels, title, *, diverging=False, kappa=None):
    m = _arr(matrix)
    if diverging:
        lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    else:
        im = ax.imshow(m, cmap="viridis", vmin=0, origin="lower", aspect="auto")
    ax.set_xlabel("training level t (bin)")
    ax.set_ylabel("probe level s (timestep)")
    ax.set_yticks(range(len(levels)))
    ax.set_yticklabels([str(v) for v in levels], fontsize=7)
    ax.set_title(title, fontsize=9)
    if kappa is not None:
        for i, k in enumerate(_arr(kappa)):
            if np.isfinite(k):
                ax.text(m.shape[1] - 0.5, i, f" κ={k:.1f}", va="center", ha="left", fontsize=6, clip_on=False)
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.12 if kappa is not None else 0.04)


def plot_noise_matrices(report: dict[str, Any]) -> plt.Figure:
    """Noise × noise matrices: traffic and net shares (rows: probe level; columns: training bin),
    measured and permutation control, with κ per level beside the net shares."""
    mats, levels = report["matrices"], report["config"]["probe_levels"]
    has_control = "traffic_control" in mats
    fig, axes = plt.subplots(2, 2 if has_control else 1, figsize=(10 if has_control else 5.5, 8), squeeze=False)
    _heat(axes[0, 0], mats["traffic"], levels, "traffic share T(s, t) (normalized per probe)")
    _heat(axes[1, 0], mats["share"], levels, "net share ⟨C, Δf⟩/‖Δf‖² (κ: cancellation)", diverging=True, kappa=mats["kappa"])
    if has_control:
        _heat(axes[0, 1], mats["traffic_control"], levels, "traffic, permutation control")
        _heat(axes[1, 1], mats["share_control"], levels, "net share, permutation control", diverging=True)
    fig.suptitle(f"Which training noise level moved the denoiser at each probe level "
                 f"({report['tracked_steps']} tracked steps, residual {report['residual']['relative_residual']:.1e})", fontsize=10)
    fig.tight_layout()
    return fig


def _locality_series(history: Sequence[dict], key: str):
    xs, meas, ctrl, lo, hi = [], [], [], [], []
    for row in history:
        entry = row.get(key)
        if not isinstance(entry, dict) or "control" not in entry:
            continue
        xs.append(_step(row))
        meas.append(entry["measured"])
        ctrl.append(entry["control"])
        interval = entry["interval"] or [None, None]
        lo.append(np.nan if interval[0] is None else entry["control"] + interval[0])
        hi.append(np.nan if interval[1] is None else entry["control"] + interval[1])
    return [np.array(v, dtype=float) for v in (xs, meas, ctrl, lo, hi)]


def plot_locality_over_training(report: dict[str, Any], ax_row=None) -> plt.Figure:
    """Traffic, net-share and kernel locality over training, each beside its permutation control.
    The shaded band is control + the 95 % interval of (measured − control) over probes."""
    history, kernels = report["locality_over_training"], report["kernel"]
    band = report["config"]["band"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in ((axes[0], "traffic", "traffic locality"), (axes[1], "share", "net-share locality")):
        xs, meas, ctrl, lo, hi = _locality_series(history, key)
        if xs.size:
            ax.plot(xs, meas, "o-", label="measured")
            ax.plot(xs, ctrl, "s--", color="grey", label="permutation control")
            ax.fill_between(xs, lo, hi, color="C0", alpha=0.2, label="control + 95% CI of difference")
        ax.set_title(f"{title} (share within ±{band} bins of s)", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    xs, meas, ctrl, lo, hi = _locality_series(
        [{"tracked_step": k["tracked_step"], "global_step": _step(k), "locality": k["locality"]} for k in kernels],
        "locality",
    )
    ax = axes[2]
    if xs.size:
        ax.plot(xs, meas, "o-", label="measured (within − outside)")
        ax.plot(xs, ctrl, "s--", color="grey", label="level-label permutation")
        ax.fill_between(xs, lo, hi, color="C0", alpha=0.2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"kernel locality: mean k̂ within ±{band} bins minus outside", fontsize=9)
    ax.set_xlabel("training step (kernel checkpoints)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_kernel_decay(report: dict[str, Any]) -> plt.Figure:
    """Mean normalized gradient kernel k̂((x, s), (x', t)) against |bin(s) − bin(t)| at each
    checkpoint; dashed: the same clean input and noise at two levels."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    kernels = report["kernel"]
    cmap = plt.get_cmap("viridis")
    for i, entry in enumerate(kernels):
        colour = cmap(i / max(1, len(kernels) - 1))
        d = np.arange(len(entry["by_distance"]))
        step = _step(entry)
        ax.plot(d, _arr(entry["by_distance"]), "o-", color=colour, label=f"step {step}: x ≠ x'")
        ax.plot(d, _arr(entry["by_distance_same_input"]), "--", color=colour, alpha=0.7, label=f"step {step}: x = x'")
    ax.set_xlabel("|bin(s) − bin(t)|")
    ax.set_ylabel("mean k̂")
    sketch = report["config"].get("kernel_sketch")
    ax.set_title("gradient-kernel similarity across noise levels" + (f" (sketch V={sketch})" if sketch else " (exact)"), fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_retrieval(result, train_data, *, images: bool, top: int = 3) -> plt.Figure:
    """Stage-wise attribution: for each sample (rows) and reverse stage s (column blocks), the
    current sample x_s and its ``top`` training examples by k̂ at θ_T; entropy per stage below."""
    stages = result.stages.tolist()
    num_samples = result.states.shape[1]
    if images:
        cols = len(stages) * (1 + top)
        fig = plt.figure(figsize=(1.0 * cols, 1.05 * num_samples + 2.2))
        grid = fig.add_gridspec(num_samples + 2, cols)
        for i in range(num_samples):
            for k, s in enumerate(stages):
                ax = fig.add_subplot(grid[i, k * (1 + top)])
                ax.imshow(_image(result.states[k, i]), cmap="gray", vmin=0, vmax=1)
                ax.set_axis_off()
                if i == 0:
                    ax.set_title(f"x_s, s={s}", fontsize=6)
                for j in range(top):
                    ax = fig.add_subplot(grid[i, k * (1 + top) + 1 + j])
                    n = int(result.top_indices[k, i, j])
                    ax.imshow(_image(train_data[n]), cmap="gray", vmin=0, vmax=1)
                    ax.set_axis_off()
                    ax.set_title(f"k̂={float(result.kernel[k, i, n]):.2f}", fontsize=5)
        ax = fig.add_subplot(grid[num_samples:, :])
    else:
        fig = plt.figure(figsize=(3.0 * len(stages), 5.8))
        grid = fig.add_gridspec(2, len(stages), height_ratios=[2, 1])
        data = train_data.detach().cpu().numpy()
        for k, s in enumerate(stages):
            ax = fig.add_subplot(grid[0, k])
            ax.scatter(data[:, 0], data[:, 1], s=3, c="lightgrey")
            states = result.states[k].numpy()
            for i in range(num_samples):
                idx = result.top_indices[k, i, :top].numpy()
                ax.scatter(data[idx, 0], data[idx, 1], s=14, color=f"C{i % 10}", marker="x")
                ax.scatter(states[i, 0], states[i, 1], s=22, color=f"C{i % 10}", edgecolor="k")
            ax.set_title(f"s={s}: x_s (dots), top-{top} k̂ (x)", fontsize=8)
            ax.set_aspect("equal", adjustable="datalim")
        ax = fig.add_subplot(grid[1, :])
    entropy = result.entropy.numpy()
    ax.plot(stages, np.nanmean(entropy, axis=1), "o-", color="k", label="mean")
    for i in range(num_samples):
        ax.plot(stages, entropy[:, i], "-", alpha=0.3)
    ax.invert_xaxis()
    ax.set_xlabel("reverse step s (sampling runs left to right)")
    ax.set_ylabel("entropy / log N")
    ax.set_title("retrieval entropy: broad averaging (1) vs few neighbours (0)", fontsize=8)
    fig.tight_layout()
    return fig


def _image(x):
    a = x.detach().cpu().float()
    a = (a.clamp(-1, 1) + 1) / 2  # images are trained in [-1, 1]
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def plot_overview(report: dict[str, Any], retrieval_json: dict[str, Any] | None = None) -> plt.Figure:
    """One-page summary: traffic matrix, locality vs control, kernel decay, retrieval entropy."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    _heat(axes[0], report["matrices"]["traffic"], report["config"]["probe_levels"], "traffic share (rows: probe level s)")
    loc = report["locality"]
    names, meas, ctrl, errs = [], [], [], []
    for key in ("traffic", "share"):
        if "control" in loc[key]:
            names.append(key)
            meas.append(loc[key]["measured"])
            ctrl.append(loc[key]["control"])
            low, high = loc[key]["interval"]
            errs.append(0 if low is None else (high - low) / 2)
    if report["kernel"]:
        k = report["kernel"][-1]["locality"]
        names.append("kernel")
        meas.append(k["measured"])
        ctrl.append(k["control"])
        low, high = k["interval"]
        errs.append(0 if low is None else (high - low) / 2)
    x = np.arange(len(names))
    axes[1].bar(x - 0.2, meas, 0.4, label="measured", yerr=errs, capsize=3)
    axes[1].bar(x + 0.2, ctrl, 0.4, color="grey", label="control")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(names)
    axes[1].set_title(f"locality (±{report['config']['band']} bins), error bar: 95% CI of difference", fontsize=8)
    axes[1].legend(fontsize=7)
    for i, entry in enumerate(report["kernel"]):
        step = _step(entry)
        axes[2].plot(_arr(entry["by_distance"]), "o-", label=f"step {step}")
    axes[2].set_xlabel("|Δ bin|")
    axes[2].set_title("mean k̂ across noise levels", fontsize=9)
    axes[2].legend(fontsize=7)
    if retrieval_json is not None:
        axes[3].plot(retrieval_json["stages"], _arr(retrieval_json["mean_entropy"]), "o-")
        axes[3].invert_xaxis()
        axes[3].set_xlabel("reverse step s")
        axes[3].set_title("retrieval entropy / log N", fontsize=9)
    else:
        axes[3].set_axis_off()
    fig.tight_layout()
    return fig


def plot_matrix_evolution(report: dict[str, Any], *, max_panels: int = 5) -> plt.Figure:
    """Traffic matrices (rows: probe level; columns: training bin) at ledger snapshots: how the
    noise × noise structure of the corrections builds up over the tracked window."""
    history = [row for row in report["locality_over_training"] if "traffic_matrix" in row]
    if len(history) > max_panels:
        picks = np.linspace(0, len(history) - 1, max_panels).round().astype(int)
        history = [history[i] for i in picks]
    fig, axes = plt.subplots(1, max(1, len(history)), figsize=(3.4 * max(1, len(history)), 3.3), squeeze=False)
    levels = report["config"]["probe_levels"]
    for ax, row in zip(axes[0], history):
        step = _step(row)
        _heat(ax, row["traffic_matrix"], levels, f"traffic share, step {step}")
    fig.tight_layout()
    return fig
