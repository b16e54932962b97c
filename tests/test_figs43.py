"""The figures draw a missing number, a refused interval and a constant matrix honestly.

Checked on the artists matplotlib produced (a colour map's "bad" colour, the rgba of a NaN cell, an image's
colour limits, the segments of an errorbar, the polygons of a fill_between), not on pixels:

- every heat map (sequential as well as diverging) draws a NaN cell in the grey of
  :data:`genkernel.plotting.arrays.NO_VALUE_COLOUR` and its colour bar says so; viridis left it transparent,
  i.e. white, a colour beside the scale that read as a value;
- the report's locality figure draws no interval that carries a ``why`` (a refused claim), as the GAN figures;
- a constant normalized kernel (all ones) is drawn in one colour in every panel, the colour its colour bar
  gives it, not at the map's bottom.
"""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

GREY = mcolors.to_rgba("0.45")  # NO_VALUE_COLOUR, written apart from genkernel


def _nan_rgba(image):
    """The rgba the image gives a NaN entry (what a NaN cell is painted with)."""
    return tuple(float(v) for v in image.to_rgba(np.array([[np.nan]]))[0, 0])


def _summary(levels=(1.0, 5.0, 9.0)):
    """A report summary with traffic shares that have a NaN cell (a probe level whose output did not change)."""
    traffic = [[0.5, 0.3, 0.2], [math.nan, math.nan, math.nan], [0.1, 0.2, 0.7]]
    share = [[0.6, 0.2, 0.2], [math.nan, math.nan, math.nan], [-0.1, 0.3, 0.8]]
    return {"settings": {"probe_levels": list(levels)},
            "matrices": {"traffic": traffic, "traffic_control": traffic, "share": share, "share_control": share,
                         "kappa": [1.0, math.nan, 2.0], "residual": [1e-6, math.nan, 1e-5]}}


def test_the_reports_sequential_heat_maps_draw_a_nan_cell_grey_and_their_colour_bar_says_so():
    """noise_matrix_figure's traffic panels (viridis) paint a NaN cell in the diverging panels' grey, and every
    panel's colour bar reads "grey: no value". Fails on the old code: viridis's bad colour was transparent
    (0, 0, 0, 0), i.e. the axes' white, and the colour bars had no label."""
    from genkernel.report import figures as fg

    fig = fg.noise_matrix_figure(_summary())
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    for ax in panels:
        image = ax.images[0]
        assert tuple(image.cmap.get_bad()) == GREY, ax.get_title()
        assert _nan_rgba(image) == GREY, ax.get_title()
        # a finite cell keeps the map's own colour
        assert _nan_rgba(image) != tuple(image.to_rgba(np.array([[0.0]]))[0, 0])
    labels = [ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_label() == "<colorbar>"]
    assert labels == ["grey: no value"] * 4


def test_the_reports_colour_bar_names_no_grey_where_every_cell_has_a_value():
    """A ledger without NaN shares gets no "grey: no value" on its colour bars (the label's condition: the old
    code labelled no colour bar, so this part cannot fail there), and both its maps, the sequential traffic one
    too, hold the grey for a NaN. Fails on the old code by the latter: viridis's bad colour was transparent."""
    from genkernel.report import figures as fg

    ledger = {"traffic_shares": [[0.5, 0.5], [0.2, 0.8]], "net_shares": [[0.7, 0.3], [-0.2, 1.2]],
              "kappa": [1.0, 1.5], "probe_relative_residual": [1e-6, 1e-6]}
    fig = fg.ledger_figure(ledger)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and all(ax.get_ylabel() == "" for ax in bars)
    assert all(tuple(ax.images[0].cmap.get_bad()) == GREY for ax in fig.axes if ax.images)


def test_the_reports_animation_draws_a_nan_cell_grey_on_its_sequential_panel(monkeypatch):
    """matrix_animation's traffic panel (viridis) paints NaN grey and says so on its colour bar. Fails on the old
    code: transparent there, the GIF's white background."""
    from genkernel.report import figures as fg

    made = []

    class Recording(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(fg, "Figure", Recording)
    frames = [{"label": "a", "t": [[0.2, math.nan], [0.5, 0.5]], "n": [[0.1, -0.1], [0.3, 0.0]]},
              {"label": "b", "t": [[0.3, 0.7], [0.4, 0.6]], "n": [[0.2, -0.2], [0.1, 0.1]]}]
    assert fg.matrix_animation(frames, keys=[("t", "traffic", False), ("n", "net", True)], xlabel="x", ylabel="y")
    (fig,) = made
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    assert all(_nan_rgba(image) == GREY for image in images)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert labels == ["grey: no value", ""]  # the traffic frames have a NaN, the net ones none


def test_the_diffusion_figures_sequential_heat_maps_draw_a_nan_cell_grey():
    """plot_noise_matrices' traffic panels (viridis) paint NaN in the same grey as its net-share panels. Fails on
    the old code: viridis's transparent bad colour."""
    from genkernel.plotting.diffusion import plot_noise_matrices

    summary = _summary()
    report = {"config": {"probe_levels": summary["settings"]["probe_levels"]}, "matrices": summary["matrices"],
              "tracked_steps": 3, "residual": {"relative_residual": None}}
    fig = plot_noise_matrices(report)
    try:
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(images) == 4
        assert all(_nan_rgba(image) == GREY for image in images)
        labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert labels == ["grey: no value"] * 4
    finally:
        plt.close(fig)


def _locality_summary(why: bool):
    """A locality summary whose per-level and over-training intervals are finite (of rounding width, as a covering
    band gives) and, with ``why``, refused."""
    reason = {"why": "band=4 holds all 6 bins around this level's bin 1"} if why else {}

    def result(difference):
        return {"difference": difference, "interval": [difference - 1e-3, difference + 1e-3], "held": False, **reason}

    per_level = [{"level": t, "bin": i, "traffic": result(0.01 * (i + 1)), "share": result(0.02 * (i + 1))}
                 for i, t in enumerate((1.0, 5.0, 9.0))]
    history = [{"global_step": s, "tracked_step": s, "traffic": result(0.01 * s), "share": result(0.02 * s)}
               for s in (1, 2, 3)]
    return {"settings": {"probe_levels": [1.0, 5.0, 9.0]},
            "matrices": {"kappa": [1.0, 1.2, 1.4], "residual": [1e-6, 1e-6, 1e-6]},
            "locality": {"band": 4, "per_level": per_level}, "locality_over_training": history}


def _finite_bars(ax) -> int:
    """How many errorbar segments the axes holds with finite ends (a NaN bar is not drawn)."""
    count = 0
    for container in ax.containers:
        for collection in container.lines[2]:
            # (a NaN bar's segment comes back empty)
            count += sum(bool(np.asarray(seg).size and np.isfinite(seg).all()) for seg in collection.get_segments())
    return count


def _shaded_vertices(ax) -> int:
    """How many vertices the fill_between polygons of the axes hold (none: nothing shaded)."""
    return sum(len(path.vertices) for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")
               for path in c.get_paths())


def test_the_locality_figure_draws_no_interval_that_carries_a_why_and_keeps_the_numbers():
    """A refused interval (``why``: a covering band, here finite and 2e-3 wide) gets no errorbar on the per-level
    panel and no shading over training, as gan_windows_figure leaves it out; the same intervals without a why
    are drawn (6 bars, shaded bands), and the summary is not changed. Fails on the old code: the refused
    intervals were drawn (6 finite bars and two shaded bands)."""
    from genkernel.report import figures as fg

    drawn = fg.locality_figure(_locality_summary(why=False))
    assert _finite_bars(drawn.axes[0]) == 6
    assert _shaded_vertices(drawn.axes[1]) > 0

    summary = _locality_summary(why=True)
    before = copy.deepcopy(summary)
    refused = fg.locality_figure(summary)
    assert _finite_bars(refused.axes[0]) == 0
    assert _shaded_vertices(refused.axes[1]) == 0
    # the points are still drawn, and the intervals' numbers stay in the summary (the JSON)
    points = [line for line in refused.axes[1].get_lines() if line.get_marker() == "o"]
    assert len(points) == 2 and all(np.isfinite(line.get_ydata()).all() for line in points)
    assert summary == before


@pytest.mark.filterwarnings("ignore:No artists with labels found")  # (the kernel panel: no checkpoints here)
def test_the_diffusion_locality_figure_draws_no_interval_that_carries_a_why():
    """plot_locality_over_training: a snapshot's refused interval is not shaded and a level's refused interval
    not barred. Fails on the old code: both were drawn."""
    from genkernel.plotting.diffusion import plot_locality_over_training

    def entry(why):
        return {"measured": 0.6, "control": 0.5, "difference": 0.1, "interval": [0.099, 0.101],
                **({"why": "2 independent unit(s) (probe levels)"} if why else {})}

    def report(why):
        history = [{"global_step": s, "tracked_step": s, "traffic": entry(why), "share": entry(why)} for s in (1, 2, 3)]
        per_level = [{"level": t, "traffic": {"difference": 0.1, "interval": [0.05, 0.15],
                                              **({"why": "2 control partition(s)"} if why else {})}} for t in (1, 9)]
        return {"locality_over_training": history, "kernel": [], "config": {"band": 1},
                "locality": {"per_level": per_level}}

    drawn = plot_locality_over_training(report(False))
    refused = plot_locality_over_training(report(True))
    try:
        assert _shaded_vertices(drawn.axes[0]) > 0 and _shaded_vertices(drawn.axes[1]) > 0
        assert _finite_bars(drawn.axes[3]) == 2
        assert _shaded_vertices(refused.axes[0]) == 0 and _shaded_vertices(refused.axes[1]) == 0
        assert _finite_bars(refused.axes[3]) == 0
    finally:
        plt.close(drawn)
        plt.close(refused)


def test_a_constant_kernel_is_drawn_in_the_colour_its_colour_bar_gives_its_value_in_every_panel():
    """shared_range of all-ones kernels is 1 ± 0.1 (matplotlib's own widening of a single-valued colour bar), and
    plot_class_kernels draws k̂ = 1 in one colour in both panels, the middle of the map, as its colour bar reads
    it. Fails on the old code: shared_range gave (1, 1), the initialization panel drew every cell at viridis's
    bottom (the scale's minimum) while the colour bar, made from the other panel, widened that one's scale alone,
    so one value had two colours."""
    from genkernel.plotting.figures import plot_class_kernels, shared_range

    ones = np.ones((4, 4))
    assert shared_range(ones, ones) == pytest.approx((0.9, 1.1))
    fig = plot_class_kernels(ones, ones, 2, dataset="toy", gaps={"init": 0.0, "final": 0.0})
    try:
        images = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(images) == 2
        for image in images:
            low, high = image.get_clim()
            assert low < 1.0 < high and 1.0 - low == pytest.approx(high - 1.0)
            assert float(image.norm(1.0)) == pytest.approx(0.5)
        colours = {tuple(image.to_rgba(np.array([[1.0]]))[0, 0]) for image in images}
        assert len(colours) == 1
        # the colour bar's scale is the panels' scale (it moved neither), so k̂ = 1 reads as 1 on it
        bar = images[-1].colorbar
        assert bar is not None and bar.ax.get_ylim() == pytest.approx(images[0].get_clim())
        assert tuple(matplotlib.colormaps["viridis"](0.0)) not in colours
    finally:
        plt.close(fig)


def test_a_kernel_image_with_its_range_from_the_data_draws_a_constant_kernel_mid_scale():
    """_kernel_image with ``vmin=None`` (the range from the data) widens a constant kernel's range, and an inverted
    range is refused by colour_range with a ValueError that says so. Fails on the old code: vmin = vmax = 1, a
    norm that maps every value to the map's bottom (and colour_range did not exist)."""
    from genkernel.plotting.figures import _kernel_image

    fig, ax = plt.subplots()
    try:
        image = _kernel_image(ax, np.ones((3, 3)), "constant", vmin=None, vmax=1.0)
        low, high = image.get_clim()
        assert low < 1.0 < high
        assert float(image.norm(1.0)) == pytest.approx(0.5)
    finally:
        plt.close(fig)
    from genkernel.plotting.arrays import colour_range

    assert colour_range(0.0, 0.0) == pytest.approx((-0.1, 0.1))
    assert colour_range(0.2, 0.7) == (0.2, 0.7)
    with pytest.raises(ValueError, match="inverted"):
        colour_range(1.0, 0.5)
