"""The report's figures, drawn from a :func:`~genkernel.report.summary.summarize_state` summary.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so no backend is
chosen or needed (the PNG and GIF bytes come from Agg). :func:`png` and :func:`matrix_animation`
turn them into bytes for the page.

In every heat map a missing number (NaN, None in the JSON: e.g. the shares of a probe whose output did not
change) is drawn grey (:data:`~genkernel.plotting.arrays.NO_VALUE_COLOUR`, on sequential and diverging maps
alike), and the colour bar then says "grey: no value" (the page's caption too: :func:`no_value_caption`); a value
beyond a colour scale is drawn at its end and the colour bar extends there. An interval the statistics refuse (it
carries a ``why``: too few units, a band that covers every bin) is not drawn; its numbers stay in the summary.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..plotting.arrays import (  # (None, as JSON writes NaN, reads NaN)
    clip_extend, colour_limit, drawn_interval as _drawn_interval, error_lengths as _error_lengths,
    float_array as _array, heat_colormap, no_value_note,
)

__all__ = [
    "alignment_figure", "checkpoint_label", "coupling_figure", "gan_windows_figure", "group_shares_figure", "kernel_figure",
    "ledger_figure", "locality_figure", "matrix_animation", "no_value_caption", "noise_matrix_figure", "png",
]


def png(figure: Figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _heatmap(fig: Figure, ax: Any, matrix: Any, title: str, *, diverging: bool, limit: float | None = None,
             rows: Sequence[Any] | None = None, xlabel: str = "", ylabel: str = "") -> None:
    values = _array(matrix)
    if values.ndim != 2:
        raise ValueError(f"{title}: a heatmap needs a [rows, columns] matrix, got shape {values.shape}")
    if rows is not None and len(rows) != values.shape[0]:
        # the labels would name other rows than they sit beside, silently
        raise ValueError(f"{title}: {len(rows)} row labels for a matrix of {values.shape[0]} rows (shape "
                         f"{values.shape}): the summary's levels and matrices disagree")
    # a NaN cell (a probe or group without a value) in grey on either map: left transparent it was near coolwarm's 0,
    # and on viridis the axes' white, a colour beside the scale that read as a value
    if diverging:
        bound = limit if limit is not None else colour_limit(values, absolute=True)
        image = ax.imshow(values, cmap=heat_colormap("coolwarm"), vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(values, cmap=heat_colormap("viridis"), vmin=0.0,
                          vmax=limit if limit is not None else colour_limit(values), aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks(range(values.shape[1]))
    if rows is not None:
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    else:  # rows are numbered groups or probes: whole numbers only (automatic ticks put "0.5" between rows)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    # (a value beyond the scale, e.g. below a traffic map's 0, is drawn at its end's colour: the bar extends there)
    bar = fig.colorbar(image, ax=ax, shrink=0.8, extend=clip_extend(image.norm.vmin, image.norm.vmax, values))
    bar.set_label(no_value_note(values), fontsize=7)


def heat_map_values(figure: Figure) -> list[np.ndarray]:
    """The matrices the heat maps (images) of ``figure`` draw, as float arrays: a NaN or ±inf entry as it was passed
    (imshow masks both, and draws both grey), any other masked cell NaN."""
    out = []
    for ax in figure.axes:
        for image in ax.images:
            data = image.get_array()
            values = np.array(np.ma.getdata(data), dtype=np.float64)
            values[np.ma.getmaskarray(data) & np.isfinite(values)] = np.nan
            out.append(values)
    return out


def no_value_caption(*matrices: Any) -> str:
    """The sentence a figure's caption on the page adds where some cell of ``matrices`` (None entries skipped; None
    inside read as NaN) is drawn grey, "" where none is: the colour bar's "grey: no value" is small print beside the
    scale, and the caption said nothing, so a reader saw grey cells with no explanation where one reads first."""
    note = no_value_note(*matrices)
    if not note:
        return ""
    what = "no value (NaN, None in the JSON" + (", or ±inf" if "inf" in note else "") + ")"
    return (f"Grey cells have {what}: e.g. a probe whose output did not change, or a group without probes; "
            "grey is no colour of the scale.")


def noise_matrix_figure(summary: Mapping[str, Any]) -> Figure:
    """Noise × noise matrices: traffic and net shares, measured and control (rows: probe level)."""
    mats = summary["matrices"]
    levels = summary["settings"]["probe_levels"]
    panels = [("traffic", "traffic share, measured", False), ("traffic_control", "traffic share, control", False),
              ("share", "net share, measured", True), ("share_control", "net share, control", True)]
    panels = [p for p in panels if p[0] in mats]
    fig = Figure(figsize=(3.3 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    traffic_max = colour_limit(mats.get("traffic"), mats.get("traffic_control"))
    share_max = colour_limit(mats.get("share"), mats.get("share_control"), absolute=True)
    for ax, (key, title, diverging) in zip(axes, panels):
        _heatmap(fig, ax, mats[key], title, diverging=diverging, limit=share_max if diverging else traffic_max,
                 rows=[f"t={t:g}" for t in levels], xlabel="training bin", ylabel="probe level")
    return fig


def locality_figure(summary: Mapping[str, Any]) -> Figure:
    """Locality per probe level (measured minus control with intervals) and, when snapshots exist,
    over training; κ and the residual per level. An interval that carries a ``why`` (refused: too few probe
    levels or control partitions, a band that covers every bin) is not drawn, as in :func:`gan_windows_figure`:
    its point is, and its numbers stay in the summary."""
    loc = summary["locality"]
    history = summary.get("locality_over_training") or []
    ncols = 3 if history else 2
    fig = Figure(figsize=(4.0 * ncols, 3.2), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    ax = axes[0]
    per_level = loc.get("per_level") or []
    if per_level:
        x = np.arange(len(per_level))
        for offset, kind, colour in ((-0.12, "traffic", "C0"), (0.12, "share", "C1")):
            mid = np.array([_nan(r[kind].get("difference")) for r in per_level])
            low, high = _drawn_interval([r[kind] for r in per_level])
            ax.errorbar(x + offset, mid, yerr=_error_lengths(mid, low, high), fmt="o", color=colour, capsize=3,
                        label="traffic" if kind == "traffic" else "net share")
        ax.set_xticks(x, [f"t={r['level']:g}" for r in per_level])
        ax.legend(fontsize=7)
    else:
        why = "no locality band recorded" if loc["band"] is None else "no control partition"
        ax.text(0.5, 0.5, f"{why}:\nno measured-minus-control", ha="center", va="center", fontsize=8)
    ax.axhline(0.0, color="grey", lw=0.8)
    within = "(band unknown)" if loc["band"] is None else f"within {loc['band']} bin(s)"
    ax.set_title(f"locality {within}: measured − control", fontsize=9)
    ax.set_xlabel("probe level", fontsize=8)
    ax.tick_params(labelsize=7)
    if history:
        ax = axes[1]
        steps = [row.get("global_step") if row.get("global_step") is not None else row["tracked_step"] for row in history]
        for kind, colour in (("traffic", "C0"), ("share", "C1")):
            rows = [row.get(kind) or {} for row in history]
            mid = np.array([_nan(r.get("difference")) for r in rows])
            low, high = _drawn_interval(rows)
            ax.plot(steps, mid, "o-", color=colour, ms=3, label="traffic" if kind == "traffic" else "net share")
            ax.fill_between(steps, low, high, color=colour, alpha=0.2)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title("locality over training (measured − control)", fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    ax = axes[-1]
    mats = summary["matrices"]
    levels = summary["settings"]["probe_levels"]
    x = np.arange(len(levels))
    ax.bar(x - 0.2, _array(mats["kappa"]), width=0.4, color="C2")
    ax.set_ylabel("κ (mean over the level's probes)", fontsize=8)
    ax.set_xticks(x, [f"t={t:g}" for t in levels])
    twin = ax.twinx()
    residual = _array(mats["residual"])
    twin.bar(x + 0.2, np.where(np.isfinite(residual) & (residual > 0), residual, np.nan), width=0.4, color="C3", label="relative residual")
    if np.isfinite(residual).any() and np.nanmax(residual) > 0:
        twin.set_yscale("log")
    twin.set_ylabel("relative residual", fontsize=8)
    ax.set_title("κ and residual per probe level", fontsize=9)
    ax.tick_params(labelsize=7)
    twin.tick_params(labelsize=7)
    return fig


def checkpoint_label(entry: Mapping[str, Any]) -> str:
    """A kernel record's name, the same in the report's figure and its table: "step G" by its global step G
    ("initialization" at global step 0: no training step yet), else "tracked step t" ("tracked step 0": θ₀, where
    tracking began, which a loop without a step counter cannot tell from the initialization), "before tracking"
    when it has neither (a record taken before the tracked window). The figure called θ₀ without a global step
    "initialization" and the table "tracked step 0"; "step None" named no step."""
    step, tracked = entry.get("global_step"), entry.get("tracked_step")
    if step is not None:
        return "initialization" if step == 0 else f"step {step}"
    return "before tracking" if tracked is None else f"tracked step {tracked}"


def kernel_figure(summary: Mapping[str, Any]) -> Figure | None:
    """Normalized-kernel similarity against |Δbin| at every kernel checkpoint."""
    kernel = [k for k in summary.get("kernel") or [] if k.get("by_distance")]
    if not kernel:
        return None
    fig = Figure(figsize=(7.0, 3.0), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, entry in enumerate(kernel):
        label = checkpoint_label(entry)
        colour = f"C{i % 10}"
        axes[0].plot(_array(entry["by_distance"]), "o-", ms=3, color=colour, label=label)
        if entry.get("by_distance_same_input"):
            axes[1].plot(_array(entry["by_distance_same_input"]), "o-", ms=3, color=colour, label=label)
    axes[0].set_title("k̂ between different inputs", fontsize=9)
    axes[1].set_title("k̂ of one input at two levels", fontsize=9)
    for ax in axes:
        ax.set_xlabel("|Δ bin|", fontsize=8)
        ax.set_ylabel("mean normalized kernel", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_lines():
            ax.legend(fontsize=7)
    if not axes[1].get_lines():
        axes[1].text(0.5, 0.5, "not recorded", ha="center", va="center", fontsize=8, transform=axes[1].transAxes)
    return fig


def ledger_figure(ledger: Mapping[str, Any], title: str = "") -> Figure:
    """One ledger: traffic and net shares per probe and group, κ and the residual per probe."""
    fig = Figure(figsize=(11.0, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    _heatmap(fig, axes[0], ledger["traffic_shares"], f"{title}traffic share", diverging=False,
             limit=colour_limit(ledger["traffic_shares"]), xlabel="group", ylabel="probe")
    _heatmap(fig, axes[1], ledger["net_shares"], f"{title}net share", diverging=True,
             limit=colour_limit(ledger["net_shares"], absolute=True), xlabel="group", ylabel="probe")
    ax = axes[2]
    kappa = _array(ledger["kappa"])
    ax.plot(kappa, "o", ms=3, color="C2", label="κ")
    ax.set_xlabel("probe", fontsize=8)
    ax.set_ylabel("κ", fontsize=8)
    twin = ax.twinx()
    residual = _array(ledger["probe_relative_residual"])
    twin.plot(np.where(residual > 0, residual, np.nan), "x", ms=3, color="C3", label="relative residual")
    if np.isfinite(residual).any() and np.nanmax(residual) > 0:
        twin.set_yscale("log")
    twin.set_ylabel("relative residual", fontsize=8)
    ax.set_title(f"{title}κ (dots) and residual (crosses) per probe", fontsize=9)
    ax.tick_params(labelsize=7)
    twin.tick_params(labelsize=7)
    return fig


def group_shares_figure(ledgers: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Mean traffic and net share per group, one panel per ledger."""
    fig = Figure(figsize=(4.2 * len(ledgers), 3.0), layout="constrained")
    axes = fig.subplots(1, len(ledgers), squeeze=False)[0]
    for ax, (name, ledger) in zip(axes, ledgers.items()):
        x = np.arange(len(ledger["group_names"]))
        ax.bar(x - 0.2, _array(ledger["mean_traffic_shares"]), width=0.4, label="traffic share")
        ax.bar(x + 0.2, _array(ledger["mean_net_shares"]), width=0.4, label="net share")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(x, [_plain(n) for n in ledger["group_names"]], rotation=30, ha="right")
        ax.set_title(f"{_plain(name)}: mean over probes (median κ {_fmt(ledger.get('median_kappa'))})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return fig


def coupling_figure(coupling: Mapping[str, Any], groups: str = "geometry") -> Figure:
    """GAN coupling matrices over the run: traffic and net shares, measured and control; ``groups``
    names the partition ("geometry", or "comparison" for the discriminator-independent grouping)."""
    panels = [("traffic_matrix", "traffic share, measured", False), ("traffic_matrix_control", "traffic share, control", False),
              ("net_matrix", "net share, measured", True), ("net_matrix_control", "net share, control", True)]
    panels = [p for p in panels if coupling.get(p[0]) is not None]
    fig = Figure(figsize=(3.3 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    traffic_max = colour_limit(coupling.get("traffic_matrix"), coupling.get("traffic_matrix_control"))
    net_max = colour_limit(coupling.get("net_matrix"), coupling.get("net_matrix_control"), absolute=True)
    for ax, (key, title, diverging) in zip(axes, panels):
        _heatmap(fig, ax, coupling[key], title, diverging=diverging, limit=net_max if diverging else traffic_max,
                 xlabel=f"training {groups} group", ylabel="probe's group")
    return fig


def level_class_figure(level_class: Mapping[str, Any], levels: Sequence[float], num_bins: int) -> Figure:
    """Traffic share per probe level (rows) and training group bin·C + class (columns), with a
    line between bins: where a conditional model's corrections come from by noise level and class."""
    values = _array(level_class["matrix"])
    if values.ndim != 2 or num_bins < 1 or values.shape[1] % num_bins:
        # the bin lines would fall between other columns than the bins', silently
        raise ValueError(f"level_class matrix of shape {values.shape} does not split into {num_bins} bins of "
                         "bin · C + class columns: the summary's num_bins and matrix disagree")
    classes = max(values.shape[1] // num_bins, 1)
    fig = Figure(figsize=(max(4.0, 0.25 * values.shape[1] + 2.0), 3.2), layout="constrained")
    ax = fig.subplots()
    _heatmap(fig, ax, level_class["matrix"], "traffic share by noise bin and class", diverging=False,
             limit=colour_limit(level_class["matrix"]),
             rows=[f"t={t:g}" for t in levels], xlabel=f"training group: bin · {classes} + class", ylabel="probe level")
    for edge in range(1, num_bins):
        ax.axvline(edge * classes - 0.5, color="white", lw=0.8)
    return fig


def gan_windows_figure(windows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Own share minus the other probe groups' share from the same source (measured − control,
    intervals clustered by probe group; none shaded where the statistics refuse one) and κ per coupling window."""
    rows = [w for w in windows if w.get("traffic_interaction_minus_control")]
    if not rows:
        return None
    fig = Figure(figsize=(8.0, 3.0), layout="constrained")
    axes = fig.subplots(1, 2)
    x = [w["loop_steps"][1] if w.get("loop_steps") else w["steps"][1] for w in rows]
    for kind, colour in (("traffic", "C0"), ("net", "C1")):
        results = [w.get(f"{kind}_interaction_minus_control") or {} for w in rows]
        mid = np.array([_nan(r.get("difference")) for r in results])
        # an interval the statistics refuse ("why": too few probe groups) is not shaded: with two groups it has zero
        # width (each row of shares sums to 1), an exact-looking estimate
        low, high = _drawn_interval(results)
        axes[0].plot(x, mid, "o-", ms=3, color=colour, label="traffic" if kind == "traffic" else "net share")
        axes[0].fill_between(x, low, high, color=colour, alpha=0.2)
    collapsed = [xi for xi, w in zip(x, rows) if w.get("collapsed")]
    if collapsed:
        axes[0].plot(collapsed, [0.0] * len(collapsed), "kx", label="collapsed window")
    axes[0].axhline(0.0, color="grey", lw=0.8)
    axes[0].set_title("own − others' share per window: measured − control", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].plot(x, [_nan(w.get("kappa_median")) for w in rows], "o-", ms=3, color="C2")
    axes[1].set_yscale("log")
    axes[1].set_title("median κ per window", fontsize=9)
    for ax in axes:
        ax.set_xlabel("generator step (window end)", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


def alignment_figure(alignment: Sequence[Mapping[str, Any]], coverage: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Alignment cosines of ΔG at the evaluation steps, and mode coverage where measured."""
    if not alignment:
        return None
    ncols = 2 if coverage else 1
    fig = Figure(figsize=(4.6 * ncols, 3.0), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    x = [row.get("loop_step", row.get("step")) for row in alignment]
    keys = [k for k in alignment[0] if k.startswith("cos_")]
    for i, key in enumerate(keys):
        axes[0].plot(x, [_nan(row.get(key)) for row in alignment], "o-", ms=3, color=f"C{i}", label=key[4:].replace("_", " "))
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].axhline(0.0, color="grey", lw=0.8)
    axes[0].set_title("cosines of the generator's change at the probes", fontsize=9)
    axes[0].set_xlabel("generator step", fontsize=8)
    axes[0].legend(fontsize=6)
    axes[0].tick_params(labelsize=7)
    if coverage:
        ax = axes[1]
        cx = [row.get("loop_step", row.get("step", i)) for i, row in enumerate(coverage)]
        numeric = [k for k, v in coverage[0].items() if isinstance(v, (int, float)) and k not in ("step", "loop_step")]
        for i, key in enumerate(numeric[:4]):
            ax.plot(cx, [_nan(row.get(key)) for row in coverage], "o-", ms=3, color=f"C{i}", label=key.replace("_", " "))
        ax.set_title("mode coverage", fontsize=9)
        ax.set_xlabel("generator step", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    return fig


def matrix_animation(frames: Sequence[Mapping[str, Any]], *, keys: Sequence[tuple[str, str, bool]],
                     xlabel: str, ylabel: str, fps: float = 2.0, dpi: int = 80,
                     rows: Sequence[Any] | None = None) -> bytes | None:
    """An animated GIF (matplotlib's ``PillowWriter``) of matrices over the run.

    ``frames``: ``[{"label": str, key: matrix, ...}]``; ``keys``: ``(key, title, diverging)`` per
    panel. Colour scales are fixed over the frames so the change is visible. ``rows``: a label per
    row (e.g. the probe levels "t=…"); without them the rows are numbered 0, 1, … (right where the
    rows are numbered groups; beside the label "probe level" a row number read as a level). None
    for < 2 frames.
    """
    from matplotlib.animation import FuncAnimation, PillowWriter

    if len(frames) < 2:
        return None
    for key, title, _ in keys:
        shapes = {_array(f[key]).shape for f in frames}
        if len(shapes) > 1:
            # set_data keeps the first frame's extent: another shape would be drawn stretched over it
            raise ValueError(f"matrix_animation: the frames' {key!r} matrices ({title}) differ in shape "
                             f"{sorted(shapes)}: every frame needs the same rows and columns")
        if rows is not None and len(rows) != _array(frames[0][key]).shape[0]:
            raise ValueError(f"matrix_animation: {len(rows)} row labels for {key!r} matrices of "
                             f"{_array(frames[0][key]).shape[0]} rows: the labels would name other rows")
    fig = Figure(figsize=(3.6 * len(keys), 3.3), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    images, limits = [], []
    for ax, (key, title, diverging) in zip(axes, keys):
        if diverging:
            bound = colour_limit(*[f[key] for f in frames], absolute=True)
            image = ax.imshow(_array(frames[0][key]), cmap=heat_colormap("coolwarm"), vmin=-bound, vmax=bound, aspect="auto")
        else:
            # (NaN in grey here too: on viridis it was the figure's white)
            image = ax.imshow(_array(frames[0][key]), cmap=heat_colormap("viridis"), vmin=0.0,
                              vmax=colour_limit(*[f[key] for f in frames]), aspect="auto")
        # (the scale spans every frame's finite values: an extend here would mean a frame's value beyond it)
        bar = fig.colorbar(image, ax=ax, shrink=0.8,
                           extend=clip_extend(image.norm.vmin, image.norm.vmax, *[f[key] for f in frames]))
        bar.set_label(no_value_note(*[f[key] for f in frames]), fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # columns are numbered: whole numbers only
        if rows is not None:
            ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        images.append(image)
        limits.append(key)
    caption = fig.suptitle(frames[0]["label"], fontsize=10)
    fig.set_dpi(dpi)
    fig.draw_without_rendering()  # lay the figure out once; every frame keeps that layout
    fig.set_layout_engine("none")

    def draw(i: int) -> list[Any]:
        for image, key in zip(images, limits):
            image.set_data(_array(frames[i][key]))
        caption.set_text(frames[i]["label"])
        return [*images, caption]

    animation = FuncAnimation(fig, draw, frames=len(frames), blit=False)
    handle, path = tempfile.mkstemp(suffix=".gif")
    os.close(handle)
    try:
        animation.save(path, writer=PillowWriter(fps=fps), dpi=dpi)
        with open(path, "rb") as gif:
            return gif.read()
    finally:
        os.unlink(path)


def _plain(text: Any) -> str:
    """A user-given name drawn as written: matplotlib reads text between two ``$`` as mathtext (a
    partition named "cost $x$" would be typeset, one named "$\\frac$" would fail to draw)."""
    return str(text).replace("$", r"\$")


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}"
