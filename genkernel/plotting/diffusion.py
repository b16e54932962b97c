"""Figures of the diffusion analyzer (docs/diffusion.md). Each function returns a Figure.

Inputs are the plain numbers of :meth:`NoiseLevelAnalyzer.report` (nested lists are fine) and a
:class:`~genkernel.diffusion.retrieval.RetrievalResult`, so figures can be redrawn from JSON. A heat map's
missing number (NaN, None in the JSON) is drawn grey, its colour bar then saying "grey: no value"; an interval
that carries a ``why`` (refused: too few probe levels or control partitions, a band covering every bin) is not
drawn.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .arrays import (clip_extend, colour_limit, colour_range, drawn_interval, error_lengths, float_array as _arr,
                     heat_colormap, no_value_note)

__all__ = [
    "average_reports",
    "plot_noise_matrices",
    "plot_locality_over_training",
    "plot_kernel_decay",
    "plot_retrieval",
    "plot_overview",
    "plot_matrix_evolution",
    "seeds_phrase",
]


def _step(row: dict) -> Any:
    """The x value of a snapshot: its global training step when known, else its tracked step."""
    return row["global_step"] if row.get("global_step") is not None else row.get("tracked_step")


def average_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One report for the figures of several runs (seeds): the first run's, with its noise × noise
    matrices replaced by their mean over the runs (``seeds_averaged`` says how many) and its relative
    residual by the largest over the runs (None, drawn as n/a, when a run has none): a figure of the
    seeds' mean states the worst seed's residual, as the recipes' ledger claim reads it, not seed 0's.

    A cell missing (NaN, None) in some runs is the mean of the runs that have it: ``seeds_per_cell``
    ``{key: counts}`` (each matrix's shape) says over how many, and the figures' titles say how many
    cells rest on fewer than ``seeds_averaged`` runs (:func:`seeds_phrase`); a cell no run has stays NaN."""
    if len(reports) == 1:
        return reports[0]
    levels = [list(rep["config"]["probe_levels"]) for rep in reports]
    for i, other in enumerate(levels[1:], start=1):
        if other != levels[0]:
            raise ValueError(f"run {i} has probe_levels {other}, run 0 {levels[0]}: the matrices' rows are probe levels, "
                             "so only runs at the same probe levels (same order) can be averaged; draw them separately")
    out = dict(reports[0])
    residuals = [rep["residual"]["relative_residual"] for rep in reports]
    worst = None if any(r is None or not np.isfinite(r) for r in residuals) else max(residuals)
    out["residual"] = {**reports[0]["residual"], "relative_residual": worst}
    mats, counts = {}, {}
    for key in reports[0]["matrices"]:
        stack = [_arr(rep["matrices"][key]) for rep in reports if key in rep["matrices"]]
        if any(m.shape != stack[0].shape for m in stack):
            raise ValueError(f"matrices[{key!r}] differ in shape between the runs ({[m.shape for m in stack]}): "
                             "runs with other bins cannot be averaged")
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (a cell no run has: "mean of empty slice", NaN)
            mats[key] = np.nanmean(np.stack(stack), axis=0).tolist()
        # (a mean that ignores a seed's NaN was titled "mean of N seeds" and recorded without a word)
        counts[key] = np.isfinite(np.stack(stack)).sum(axis=0).tolist()
    out["matrices"] = mats
    out["seeds_averaged"] = len(reports)
    out["seeds_per_cell"] = counts
    return out


def seeds_phrase(report: dict[str, Any], keys: Sequence[str]) -> str:
    """"mean of N seeds" for a report of :func:`average_reports`, with how many cells of the matrices ``keys`` are
    the mean of fewer seeds (a seed has no value there; ``seeds_per_cell``); "" for one run's report."""
    seeds = report.get("seeds_averaged")
    if not seeds:
        return ""
    per_cell = report.get("seeds_per_cell") or {}
    fewer = sum(int(((c > 0) & (c < seeds)).sum()) for key in keys if key in per_cell
                for c in [np.asarray(per_cell[key], dtype=np.int64)])
    return f"mean of {seeds} seeds" + (f" ({fewer} cell{'s' if fewer != 1 else ''} of fewer: a seed has no value there)"
                                       if fewer else "")


def _heat(ax, matrix, levels, title, *, diverging=False, kappa=None, vmin=None, vmax=None):
    m = _arr(matrix)
    if m.ndim != 2 or m.shape[0] != len(levels):
        raise ValueError(f"a matrix of shape {m.shape} drawn with {len(levels)} probe_levels: its rows must be the "
                         "probe levels, one row per level in config['probe_levels'] order")
    if diverging:
        lim = vmax if vmax is not None else colour_limit(m, absolute=True)
        # a limit of 0 (an all-zero matrix) gave vmin = vmax = 0, where matplotlib draws every value
        # at the map's bottom: zeros looked strongly negative
        lim = lim if lim > 0 else 1.0
        # a NaN cell (a level or bin without a value) in grey: left transparent it was the white of 0
        im = ax.imshow(m, cmap=heat_colormap("RdBu_r"), vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    else:
        # grey for NaN here too (on viridis, transparent, it was the axes' white: a colour beside the scale read as a
        # value). vmax None: the matrix's colour_limit, as the report's heat maps (matplotlib's autoscale gave an
        # all-zero or all-NaN matrix the range 0..0, which the colour bar widened to −0.1..0.1: half a scale of
        # negative traffic); colour_range widens a single-valued range passed in the same way for every panel
        low = 0.0 if vmin is None else vmin
        top = vmax if vmax is not None else max(colour_limit(m), low)
        low, top = colour_range(low, top)
        im = ax.imshow(m, cmap=heat_colormap("viridis"), vmin=low, vmax=top, origin="lower", aspect="auto")
    ax.set_xlabel("training level t (bin)")
    # columns are bins 0, 1, ...: ticks at whole bins only (automatic ticks put "0.5" between bins)
    ax.set_xticks(range(m.shape[1]) if m.shape[1] <= 12 else np.unique(np.linspace(0, m.shape[1] - 1, 7).round().astype(int)))
    ax.set_ylabel("probe level s (timestep)")
    ax.set_yticks(range(len(levels)))
    ax.set_yticklabels([f"{v:g}" for v in levels], fontsize=7)
    ax.set_title(title, fontsize=9)
    if kappa is not None:
        for i, k in enumerate(_arr(kappa)):
            if np.isfinite(k):
                ax.text(m.shape[1] - 0.5, i, f" κ={k:.1f}", va="center", ha="left", fontsize=6, clip_on=False)
    # (a value beyond the scale, e.g. a negative traffic share below its 0 or one above a passed vmax, is drawn at the
    # scale's end: the bar extends there, which it did not)
    bar = plt.colorbar(im, ax=ax, fraction=0.046, pad=0.12 if kappa is not None else 0.04,
                       extend=clip_extend(im.norm.vmin, im.norm.vmax, m))
    bar.set_label(no_value_note(m), fontsize=7)


def plot_noise_matrices(report: dict[str, Any]) -> plt.Figure:
    """Noise × noise matrices: traffic and net shares (rows: probe level; columns: training bin),
    measured and permutation control on one colour scale per row, with κ per level beside the net
    shares (mean over seeds when ``report`` averages several)."""
    mats, levels = report["matrices"], report["config"]["probe_levels"]
    has_control = "traffic_control" in mats
    fig, axes = plt.subplots(2, 2 if has_control else 1, figsize=(10 if has_control else 5.5, 8), squeeze=False)
    traffic_max = colour_limit(mats["traffic"], mats.get("traffic_control"))
    share_max = colour_limit(mats["share"], mats.get("share_control"), absolute=True)
    _heat(axes[0, 0], mats["traffic"], levels, "traffic share T(s, t) (normalized per probe)", vmin=0, vmax=traffic_max)
    _heat(axes[1, 0], mats["share"], levels, "net share ⟨C, Δf⟩/‖Δf‖² (κ: cancellation)", diverging=True,
          kappa=mats["kappa"], vmax=share_max)
    if has_control:
        _heat(axes[0, 1], mats["traffic_control"], levels, "traffic, permutation control (same scale)", vmin=0,
              vmax=traffic_max)
        _heat(axes[1, 1], mats["share_control"], levels, "net share, permutation control (same scale)", diverging=True,
              vmax=share_max)
    seeds = seeds_phrase(report, ("traffic", "share", "traffic_control", "share_control", "kappa"))
    residual = _sci(report['residual']['relative_residual'])
    fig.suptitle(f"Which training noise level moved the denoiser at each probe level "
                 f"({report['tracked_steps']} tracked steps, "
                 + (f"{seeds}, largest residual {residual}" if seeds else f"residual {residual}") + ")",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _sci(value) -> str:
    """A number in the report's JSON (None: NaN, e.g. the residual of a run whose output did not change)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1e}"


def _locality_series(history: Sequence[dict], key: str):
    """``xs, measured, control, low, high`` float arrays of the snapshots with ``key``; the band's ends are NaN
    (nothing shaded) where the interval is missing or carries a ``why`` (refused: too few units, a covering band),
    as the GAN figures leave a refused interval out: a finite one of rounding width read as an exact estimate."""
    kept = [row for row in history if isinstance(row.get(key), dict) and "control" in row[key]]
    entries = [row[key] for row in kept]
    xs = np.array([_step(row) for row in kept], dtype=float)
    meas = np.array([entry["measured"] for entry in entries], dtype=float)
    ctrl = np.array([entry["control"] for entry in entries], dtype=float)
    low, high = drawn_interval(entries)  # (NaN where refused or missing: nothing shaded)
    return [xs, meas, ctrl, ctrl + low, ctrl + high]


def plot_locality_over_training(report: dict[str, Any], ax_row=None, *, runs: Sequence[dict] | None = None,
                                claims: dict | None = None, run_label: str | None = None) -> plt.Figure:
    """Traffic, net-share and kernel locality over training, each beside its permutation control,
    with the sanity models as reference lines (per-bin parameters: band share 1 by construction;
    the time-blind denoiser's measured value; θ₀ is the kernel's first checkpoint), and the
    locality per probe level (measured − control with its interval, per seed): an average over
    levels can hide a sign flip between them. The shaded band is control + the 95 % interval of
    (measured − control) over probes; an interval that carries a ``why`` (refused) is neither shaded nor barred.

    The first three panels draw ``report``'s own history and kernel checkpoints (one run: of several
    seeds, the report the caller passes, e.g. :func:`average_reports`' first run's); ``run_label``
    (e.g. "seed 0 of 3") goes in their titles. The per-level panel draws every run of ``runs``."""
    suffix = f", {run_label}" if run_label else ""
    history, kernels = report["locality_over_training"], report["kernel"]
    band = report["config"]["band"]
    runs = list(runs or [])
    reference = runs[0].get("reference") if runs else None
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.9))
    for ax, key, title in ((axes[0], "traffic", "traffic locality"), (axes[1], "share", "net-share locality")):
        xs, meas, ctrl, lo, hi = _locality_series(history, key)
        if xs.size:
            ax.plot(xs, meas, "o-", label="measured")
            ax.plot(xs, ctrl, "s--", color="grey", label="permutation control")
            ax.fill_between(xs, lo, hi, color="C0", alpha=0.2, label="control + 95% CI of difference")
        if key == "traffic":
            ax.axhline(1.0, color="C2", lw=1, ls=":", label="per-bin parameters (1 by construction)")
        if reference is not None and "locality" in reference and "control" in reference["locality"].get(key, {}):
            ax.axhline(reference["locality"][key]["measured"], color="C3", lw=1, ls="-.",
                       label="time-blind denoiser, end of window")
        measured = (claims or {}).get(f"{key}_locality", {}).get("measured", True)
        ax.set_title(f"{title} (share within ±{band} bins of s){suffix}"
                     + ("" if measured else "\nNOT MEASURED: window mostly pre-window state"), fontsize=8)
        ax.set_xlabel("training step")
        ax.legend(fontsize=6)
    xs, meas, ctrl, lo, hi = _locality_series(
        [{"tracked_step": k["tracked_step"], "global_step": _step(k), "locality": k["locality"]} for k in kernels],
        "locality",
    )
    ax = axes[2]
    if xs.size:
        ax.plot(xs, meas, "o-", label="measured (within − outside); first point θ₀")
        ax.plot(xs, ctrl, "s--", color="grey", label="level-label permutation")
        ax.fill_between(xs, lo, hi, color="C0", alpha=0.2)
    kernel_claim = (claims or {}).get("kernel_locality", {})
    if kernel_claim.get("time_blind") is not None:
        ax.axhline(kernel_claim["time_blind"], color="C3", lw=1, ls="-.", label="time-blind denoiser at θ_T (− control)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"kernel locality: mean k̂ within ±{band} bins minus outside{suffix}", fontsize=8)
    ax.set_xlabel("training step (kernel checkpoints)")
    ax.legend(fontsize=6)
    ax = axes[3]
    levels = None
    for i, run in enumerate(runs or [{"report": report}]):
        rows = run["report"]["locality"].get("per_level", [])
        if not rows:
            continue
        mine = [row["level"] for row in rows]
        if levels is not None and mine != levels:
            raise ValueError(f"run {i} has per-level locality at probe levels {mine}, an earlier run at {levels}: the "
                             "per-level panel draws level j of every run at one x; pass runs with the same probe levels")
        levels = mine
        diff = np.array([row["traffic"]["difference"] for row in rows], dtype=float)
        # no bar where the interval is refused ("why": fewer than three control partitions, a band covering every bin)
        low, high = drawn_interval([row["traffic"] for row in rows])
        x = np.arange(len(rows)) + 0.12 * (i - (len(runs) - 1) / 2 if runs else 0)
        ax.errorbar(x, diff, yerr=error_lengths(diff, low, high), fmt="o", capsize=2, ms=3, color=f"C{i % 10}",
                    label=f"seed {run.get('seed', i)}")
    if reference is not None and "locality" in reference and reference["locality"].get("per_level"):
        rows = reference["locality"]["per_level"]
        if levels is not None and [row["level"] for row in rows] != levels:
            raise ValueError(f"the reference's per-level locality is at probe levels {[row['level'] for row in rows]}, "
                             f"the runs' at {levels}: pass a reference run at the same probe levels")
        ax.plot(np.arange(len(rows)), [row["traffic"]["difference"] for row in rows], "x--", color="C3",
                label="time-blind denoiser")
    if levels is not None:
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels([str(v) for v in levels], fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("probe level s (timestep, log-SNR bin centres)")
    ax.set_ylabel("traffic within band − control")
    ax.set_title("traffic locality per probe level (95% CI over the control partitions)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_kernel_decay(report: dict[str, Any], *, reference: dict | None = None, run_label: str | None = None
                      ) -> plt.Figure:
    """Mean normalized gradient kernel k̂((x, s), (x', t)) against |bin(s) − bin(t)| at each
    checkpoint (the first is θ₀); dashed: the same clean input and noise at two levels; grey
    dash-dot: the time-blind denoiser at θ_T (its decay comes from the inputs alone). ``run_label``
    (e.g. "seed 0 of 3") goes in the title: the run drawn, where the figure sits among seed-averaged ones."""
    fig, ax = plt.subplots(figsize=(6, 4))
    kernels = report["kernel"]
    cmap = plt.get_cmap("viridis")
    for i, entry in enumerate(kernels):
        colour = cmap(i / max(1, len(kernels) - 1))
        d = np.arange(len(entry["by_distance"]))
        step = _step(entry)
        ax.plot(d, _arr(entry["by_distance"]), "o-", color=colour, label=f"step {step}: x ≠ x'")
        ax.plot(d, _arr(entry["by_distance_same_input"]), "--", color=colour, alpha=0.7, label=f"step {step}: x = x'")
    if reference is not None and reference.get("kernel_by_distance") is not None:
        values = _arr(reference["kernel_by_distance"])
        ax.plot(np.arange(len(values)), values, "-.", color="0.4", label="time-blind denoiser, θ_T: x ≠ x'")
    ax.set_xlabel("|bin(s) − bin(t)|")
    ax.set_ylabel("mean k̂")
    sketch = report["config"].get("kernel_sketch")
    ax.set_title("gradient-kernel similarity across noise levels" + (f" (sketch V={sketch})" if sketch else " (exact)")
                 + (f", {run_label}" if run_label else ""), fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_retrieval(result, train_data, *, images: bool, top: int = 3, quality: dict | None = None,
                   entropy=None, stages=None, run_label: str | None = None) -> plt.Figure:
    """Stage-wise attribution: for each sample (rows) and reverse stage s (column blocks), the
    current sample x_s and its ``top`` training examples by k̂ at θ_T; entropy per stage below.

    Retrieval is shown only where the samples are not noise (``quality["noise"]`` False: their
    distance to the training set is nearer held-out data's than the training inputs' own spread): otherwise the figure shows the final samples beside
    training inputs and says why the retrieval is left out. ``result`` None (runs read back from
    JSON): the entropy curve only, from ``entropy [K, S]`` and ``stages``. ``run_label`` as in
    :func:`plot_kernel_decay` (in the entropy panel's title, or the noise figure's)."""
    if quality is not None and quality.get("noise"):
        return _noise_samples_figure(result, train_data, images=images, quality=quality, run_label=run_label)
    if result is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _entropy_panel(ax, np.asarray(stages), _arr(entropy), run_label)
        fig.tight_layout()
        return fig
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
    _entropy_panel(ax, np.asarray(stages), result.entropy.numpy(), run_label)
    fig.tight_layout()
    return fig


def _entropy_panel(ax, stages: np.ndarray, entropy: np.ndarray, run_label: str | None = None) -> None:
    ax.plot(stages, np.nanmean(entropy, axis=1), "o-", color="k", label="mean over samples")
    for i in range(entropy.shape[1]):
        ax.plot(stages, entropy[:, i], "-", alpha=0.3, label="one sample" if i == 0 else None)
    ax.invert_xaxis()
    ax.set_xlabel("reverse step s (sampling runs left to right)")
    ax.set_ylabel("entropy / log N")
    ax.set_title("retrieval entropy: broad averaging (1) vs few neighbours (0)" + (f", {run_label}" if run_label else ""),
                 fontsize=8)
    ax.legend(fontsize=6)


def _noise_samples_figure(result, train_data, *, images: bool, quality: dict, run_label: str | None = None) -> plt.Figure:
    """The final samples next to training inputs, and why retrieval is not shown (``run_label``: the run drawn)."""
    score = quality.get("score")
    if score is not None and np.isfinite(score):
        where = (f"their distance to the training set is {score:.2f} of the way from held-out data's (0) to the "
                 f"training inputs' distance to one another (1), above {quality['limit']:g}")
    else:  # +inf or NaN, saved as None: formatting it raised TypeError after the whole run
        where = ("their distance to the training set cannot be scaled (held-out data lie no nearer the training set than "
                 "the training inputs lie to one another, or too few training inputs), counted as noise")
    why = f"samples are still noise: {where}: retrieval not shown" + (f" ({run_label})" if run_label else "")
    if result is None:
        fig, ax = plt.subplots(figsize=(7, 2))
        ax.set_axis_off()
        ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=9, wrap=True)
        return fig
    samples = result.samples
    if images:
        n = min(8, samples.shape[0], train_data.shape[0])
        fig, axes = plt.subplots(2, max(n, 1), figsize=(1.3 * max(n, 1) + 1, 3.4), squeeze=False)
        for j in range(axes.shape[1]):
            for i, (row, label) in enumerate(((samples, "generated"), (train_data, "training"))):
                ax = axes[i, j]
                ax.set_axis_off()
                if j < n:
                    ax.imshow(_image(row[j]), cmap="gray", vmin=0, vmax=1)
                if j == 0:
                    ax.set_title(label, fontsize=7, loc="left")
    else:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        data = train_data.detach().cpu().numpy()
        ax.scatter(data[:, 0], data[:, 1], s=3, c="lightgrey", label="training")
        ax.scatter(samples[:, 0], samples[:, 1], s=12, c="C3", label="generated")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=7)
    fig.suptitle(why, fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.85))
    return fig


def _image(x):
    a = x.detach().cpu().float()
    a = (a.clamp(-1, 1) + 1) / 2  # images are trained in [-1, 1]
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def plot_overview(report: dict[str, Any], retrieval_json: dict[str, Any] | None = None, *,
                  claims: dict | None = None, run_label: str | None = None) -> plt.Figure:
    """One-page summary: traffic matrix, the locality claims (value with its interval, baseline as
    a cross; "not measured" where the settings cannot answer), kernel decay, retrieval entropy.

    The traffic matrix is ``report``'s (the mean over seeds when it averages several: its title says
    so); the kernel-decay and entropy panels draw ``report``'s own kernel checkpoints and
    ``retrieval_json``, one run's: ``run_label`` (e.g. "seed 0 of 3") goes in their titles."""
    suffix = f", {run_label}" if run_label else ""
    seeds = seeds_phrase(report, ("traffic",))
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.9))
    _heat(axes[0], report["matrices"]["traffic"], report["config"]["probe_levels"],
          "traffic share (rows: probe level s)" + (f", {seeds}" if seeds else ""))
    names = ("traffic_locality", "kernel_locality", "retrieval_broad_to_narrow")  # net shares: own scale, in the note
    ax = axes[1]
    for i, key in enumerate(names):
        c = (claims or {}).get(key)
        if c is None:
            continue
        value, interval = c.get("value"), c.get("interval") or [None, None]
        if c.get("measured") is False:
            ax.text(i, 0, "not\nmeasured", ha="center", va="center", fontsize=7, color="0.4")
            continue
        if value is None:
            continue
        # no interval: no bar (NaN), not a zero-length one, which would read as an exact value
        low = np.nan if interval[0] is None else interval[0]
        high = np.nan if interval[1] is None else interval[1]
        ax.errorbar([i], [value], yerr=[v.reshape(1) for v in error_lengths(value, low, high)], fmt="o", capsize=3,
                    color="C2" if c.get("held") else "C3", label="held" if c.get("held") else "not held")
        base = (c.get("baseline") or {}).get("value")
        if base is not None:
            ax.plot([i], [base], "x", color="k", label="baseline (θ₀ / null)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=6)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(["traffic − control", "kernel, θ_T − θ₀", "retrieval, θ_T − θ₀"], fontsize=7)
    share = (claims or {}).get("share_locality")
    note = "" if share is None else (
        "\nnet share − control: not measured" if share.get("measured") is False else
        "\nnet share − control n/a (no level had a value)" if share.get("value") is None else
        f"\nnet share − control {share['value']:.2g} [{_fmt_interval(share.get('interval'))}] (κ in the tens: unstable)")
    ax.set_title(f"claims (±{report['config']['band']} bins): value, 95% CI, baseline" + note, fontsize=7)
    for i, entry in enumerate(report["kernel"]):
        step = _step(entry)
        axes[2].plot(_arr(entry["by_distance"]), "o-", label=f"step {step}")
    axes[2].set_xlabel("|Δ bin|")
    axes[2].set_title(f"mean k̂ across noise levels (first: θ₀){suffix}", fontsize=9)
    axes[2].legend(fontsize=7)
    if retrieval_json is not None:
        axes[3].plot(retrieval_json["stages"], _arr(retrieval_json["mean_entropy"]), "o-")
        axes[3].invert_xaxis()
        axes[3].set_xlabel("reverse step s")
        measured = (claims or {}).get("retrieval_broad_to_narrow", {}).get("measured", True)
        axes[3].set_title(f"retrieval entropy / log N{suffix}" + ("" if measured else "\n(samples are noise: not measured)"),
                          fontsize=9)
    else:
        axes[3].set_axis_off()
    fig.tight_layout()
    return fig


def _fmt_interval(interval) -> str:
    if not interval or any(v is None for v in interval):
        return "—"
    return f"{interval[0]:.2g}, {interval[1]:.2g}"


def plot_matrix_evolution(report: dict[str, Any], *, max_panels: int = 5, run_label: str | None = None) -> plt.Figure:
    """Traffic matrices (rows: probe level; columns: training bin) at ledger snapshots: how the
    noise × noise structure of the corrections builds up over the tracked window. ``run_label`` as in
    :func:`plot_kernel_decay`."""
    history = [row for row in report["locality_over_training"] if "traffic_matrix" in row]
    if len(history) > max_panels:
        picks = np.linspace(0, len(history) - 1, max_panels).round().astype(int)
        history = [history[i] for i in picks]
    fig, axes = plt.subplots(1, max(1, len(history)), figsize=(3.4 * max(1, len(history)), 3.3), squeeze=False)
    levels = report["config"]["probe_levels"]
    # panels compared by eye over training: one colour scale for all (each panel's own top made the
    # same colour mean 0.5 in one panel and 0.9 in the next)
    top = colour_limit(*[row["traffic_matrix"] for row in history])
    for ax, row in zip(axes[0], history):
        step = _step(row)
        _heat(ax, row["traffic_matrix"], levels, f"traffic share, step {step}" + (f", {run_label}" if run_label else ""),
              vmin=0, vmax=top)
    fig.tight_layout()
    return fig
