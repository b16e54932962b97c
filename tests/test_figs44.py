"""Every finite number is drawn at its own colour or the colour bar says it is not; every grey cell is named.

Checked on the saved PNG's pixels (read back at the cells' centres) and on matplotlib's artists (an image's norm,
a colour bar's ``extend`` and label), against references written apart from genkernel (a colour map applied by
hand to the data's own range):

- a normalized kernel with entries above 1 (float32 rounding, a kernel that is no cosine) is drawn on a scale that
  reaches them, and the colour bar says so; the scale ended at 1 and drew 1.5 in 1's colour;
- the GAN coupling figure's colour bar names a missing cell of the measured panel it stands beside;
- a ±inf cell (drawn grey by imshow, as a NaN) is named on the colour bar and in the page's caption, which names
  grey cells wherever a figure has them (and only there);
- a heat map's value beyond its scale (a negative traffic share under a scale from 0) extends the colour bar;
- ``logging.matrix_image`` draws a constant matrix mid-map, a negative-only one over its own range, and refuses a
  cell size below 1;
- an error bar of an infinite estimate, or of an interval a rounding narrower than its estimate, is drawn (or left
  out) instead of losing the whole figure, and an estimate outside its interval is refused by name.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors
import matplotlib.image as mimage
import matplotlib.pyplot as plt
import numpy as np
import pytest

GREY = mcolors.to_rgba("0.45")  # the heat maps' colour of a missing cell, written apart from genkernel


def _pixels(fig, ax, cells, path):
    """The RGB (0..1) of the saved PNG at the centres of ``cells`` [(row, column)] of ``ax``'s image."""
    fig.savefig(path, dpi=fig.dpi)
    picture = mimage.imread(path)[..., :3]
    height = picture.shape[0]
    out = []
    for row, col in cells:
        x, y = ax.transData.transform((col, row))
        out.append(picture[int(round(height - y)), int(round(x))])
    return np.array(out)


def _bar_label(fig):
    """The labels of the figure's colour bars (their axes' y label), joined."""
    return " | ".join(ax.get_ylabel() for ax in fig.axes if ax.get_ylabel())


def test_class_kernels_with_entries_above_one_are_drawn_on_a_scale_that_reaches_them(tmp_path):
    """A "normalized" kernel with an entry of 1.5 (no cosine: a sketched or non-cosine path kernel) and one of 1.0:
    the shared scale reaches 1.5, the saved PNG draws the two cells in different colours, each the colour the image
    gives its value, and the colour bar says the entries go above 1. Fails on the old code: the scale ended at 1, so
    1.5 was drawn in 1's colour (the same pixels), with "neither" on the colour bar's extend and nothing in its label."""
    from genkernel.plotting.figures import plot_class_kernels

    init = np.full((4, 4), 0.2)
    np.fill_diagonal(init, 1.0)
    final = init.copy()
    final[0, 1] = final[1, 0] = 1.5
    fig = plot_class_kernels(init, final, 2, dataset="d", gaps={"init": 0.1, "final": 0.2})
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 2
    finite_max = max(float(np.max(k)) for k in (init, final))
    for ax in images:
        norm = ax.images[0].norm
        assert norm.vmax >= finite_max and norm.vmin <= np.percentile(init, 1)  # the drawn range holds the data
    ax = images[1]
    high, one = _pixels(fig, ax, [(0, 1), (0, 0)], tmp_path / "kernels.png")
    assert not np.allclose(high, one, atol=2 / 255)
    expected = ax.images[0].to_rgba(np.array([[1.5, 1.0]]))[0, :, :3]
    np.testing.assert_allclose([high, one], expected, atol=2 / 255)
    assert "entries above 1 (to 1.5)" in _bar_label(fig)
    plt.close(fig)


def test_a_kernel_a_float32_rounding_above_one_keeps_the_plain_colour_bar_label():
    """An entry of 1 + 6e-8 (float32's rounding of a cosine of 1) widens the scale to it without calling the kernel no
    cosine. Fails on the old code by the scale (it ended at 1, below the entry); the label's part cannot fail there
    (the old label never named entries above 1)."""
    from genkernel.plotting.figures import plot_printed_digits

    kernel = np.full((4, 4), 0.3, dtype=np.float32)
    np.fill_diagonal(kernel, np.float32(1.0) + np.float32(6e-8))
    fig = plot_printed_digits(kernel, kernel, np.eye(2), 1, np.zeros((2, 2, 3, 3)), accuracy=0.5,
                              gaps={"init": 0.1, "final": 0.1})
    assert "k̂ (shared scale)" in _bar_label(fig) and "above 1" not in _bar_label(fig)
    assert all(ax.images[0].norm.vmax >= float(kernel.max()) for ax in fig.axes[:2])
    plt.close(fig)


def test_optimizer_weighting_draws_both_kernels_on_the_one_scale_of_its_colour_bar():
    """The plain kernel holds −1.5 and a NaN, the preconditioned one 2.0: both panels share one norm that reaches
    −1.5 and 2.0 (one colour bar stands for both), and the bar names the grey cell of the panel without a bar.
    Fails on the old code: both scales were ±1 (−1.5 and 2.0 drawn at its ends) and the bar had no label."""
    from genkernel.plotting.figures import plot_optimizer_weighting

    plain = np.array([[1.0, -1.5], [0.2, math.nan]])
    pre = np.array([[1.0, 0.5], [2.0, 0.1]])
    x = np.array([0.0, 1.0])
    fig = plot_optimizer_weighting({"sgd": x}, x, 0.5, {"plain": plain, "preconditioned": pre},
                                   {"first_order": {"share": 0.9, "interval": [0.8, 1.0]}}, {"rho": 0.5})
    norms = [ax.images[0].norm for ax in fig.axes if ax.images]
    assert len(norms) == 2
    assert [(n.vmin, n.vmax) for n in norms] == [(-1.5, 2.0)] * 2
    assert "grey: no value" in _bar_label(fig) and "entries above 1 (to 2)" in _bar_label(fig)
    plt.close(fig)


def _windows(measured_nan: bool):
    traffic = [[0.6, 0.4], [0.3, 0.7]]
    measured = [[0.6, math.nan], [0.3, 0.7]] if measured_nan else traffic
    return [[{"steps": [0, 4], "statistics": {"geometry": {
        "traffic": {"matrix": measured, "matrix_control": traffic},
        "net": {"matrix": [[0.5, -0.2], [0.1, 0.4]], "matrix_control": [[0.5, -0.2], [0.1, 0.4]]}}}}]]


def test_the_gan_coupling_figures_colour_bar_names_a_missing_cell_of_the_measured_panel():
    """A NaN only in the measured traffic matrix (its colour bar sits beside the control panel): the traffic bar
    says "grey: no value", the net share's does not. Fails on the old code: the note read the control panel only."""
    from genkernel.plotting.gan import coupling_figure

    fig = coupling_figure(_windows(True), ["m0", "m1"], None, title="t")
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bars == ["traffic share; grey: no value", "net share"]
    fig_clean = coupling_figure(_windows(False), ["m0", "m1"], None, title="t")
    assert [ax.get_ylabel() for ax in fig_clean.axes if ax.get_label() == "<colorbar>"] == ["traffic share", "net share"]
    plt.close("all")


def test_an_infinite_cell_is_grey_and_named_on_the_colour_bar_and_in_the_pages_caption(tmp_path):
    """A +inf traffic share is painted in the grey of a missing cell (read from the PNG) and the colour bar says
    grey means no value or ±inf; the page's caption for that figure names grey cells, and says nothing of grey for
    a ledger without them. Fails on the old code: the note read NaN only (the bar had no label) and no caption
    mentioned grey cells."""
    from genkernel.report import figures as fg
    from genkernel.report import html

    ledger = {"traffic_shares": [[0.5, math.inf], [0.2, 0.8]], "net_shares": [[0.7, 0.3], [-0.2, 1.2]],
              "kappa": [1.0, 1.5], "probe_relative_residual": [1e-6, 1e-6]}
    fig = fg.ledger_figure(ledger)
    ax = fig.axes[0]
    (cell,) = _pixels(fig, ax, [(0, 1)], tmp_path / "ledger.png")
    np.testing.assert_allclose(cell, GREY[:3], atol=2 / 255)
    assert "grey: no value or ±inf" in _bar_label(fig)
    page = html._figure(fg.ledger_figure(ledger), "per-probe ledger")
    assert "<figcaption>" in page and "Grey cells have no value" in page and "±inf" in page
    clean = {**ledger, "traffic_shares": [[0.5, 0.5], [0.2, 0.8]]}
    page = html._figure(fg.ledger_figure(clean), "per-probe ledger", "A caption.")
    assert "A caption.</figcaption>" in page and "Grey" not in page and "grey" not in page
    page = html._figure(fg.noise_matrix_figure({"settings": {"probe_levels": [1.0]}, "matrices": {
        "traffic": [[0.5, None]], "share": [[0.1, 0.2]]}}), "noise", "Rows: probe level.")
    assert "Rows: probe level. Grey cells have no value (NaN, None in the JSON)" in page
    plt.close("all")


def test_a_value_below_a_heat_maps_scale_extends_its_colour_bar():
    """A negative traffic share under the sequential scale from 0 is drawn at the scale's bottom: the colour bar
    extends there ("min"); a passed limit below the largest value extends it at the top. Fails on the old code:
    every colour bar's extend was "neither", so a clipped value read as the scale's end."""
    from genkernel.plotting.gan import plot_coupling
    from genkernel.report import figures as fg

    ledger = {"traffic_shares": [[-0.2, 1.2], [0.2, 0.8]], "net_shares": [[0.7, 0.3], [-0.2, 1.2]],
              "kappa": [1.0, 1.5], "probe_relative_residual": [1e-6, 1e-6]}
    fig = fg.ledger_figure(ledger)
    extends = [ax.images[0].colorbar.extend for ax in fig.axes if ax.images]
    assert extends == ["min", "neither"]
    _, ax = plt.subplots()
    image = plot_coupling(ax, [[0.2, 0.9], [0.4, 0.5]], title="t", limit=0.5, colorbar="traffic share")
    assert image.colorbar.extend == "max"
    plt.close("all")


def test_matrix_image_draws_a_constant_matrix_mid_map_and_a_negative_one_over_its_range():
    """Against viridis applied by hand: a constant matrix is drawn at the map's middle (matplotlib's widened range),
    a negative-only matrix with vmin=0 (a traffic image's call) spans the map from its smallest to its largest value,
    an entry above a passed vmax is not drawn at vmax's colour, NaN and ±inf are mid grey, and cell=0 is refused.
    Fails on the old code: the constant and the negative-only matrices were drawn all in the map's bottom colour,
    the entry above vmax in vmax's, and cell=0 gave an empty image."""
    from genkernel.logging import matrix_image

    viridis = matplotlib.colormaps["viridis"]

    def rgb(t):
        return np.round(np.asarray(viridis(t))[:3] * 255).astype(np.uint8)

    constant = matrix_image(np.full((2, 3), 0.25), cell=1)
    # (within one of the map's 256 steps of its middle: 0.5 of a widened range is 0.5 up to a rounding)
    assert (np.abs(constant.astype(int) - rgb(0.5).astype(int)) <= 3).all()
    assert (np.abs(constant.astype(int) - rgb(0.0).astype(int)) > 40).any()
    negative = matrix_image(np.array([[-0.5, -0.3, -0.1]]), vmin=0.0, cell=1)[0]
    np.testing.assert_array_equal(negative, [rgb(0.0), rgb(0.5), rgb(1.0)])
    above = matrix_image(np.array([[0.0, 0.5, 2.0]]), vmin=0.0, vmax=1.0, cell=1)[0]
    np.testing.assert_array_equal(above, [rgb(0.0), rgb(0.25), rgb(1.0)])
    odd = matrix_image(np.array([[math.nan, math.inf, -math.inf, 1.0, 3.0]]), cell=2)
    assert odd.shape == (2, 10, 3) and (odd[:, :6] == 128).all()
    with pytest.raises(ValueError, match="cell"):
        matrix_image(np.eye(2), cell=0)
    with pytest.raises(ValueError, match="vmin"):
        matrix_image(np.eye(2), vmin=1.0, vmax=0.0)


def test_error_bars_of_an_infinite_estimate_or_a_rounding_narrow_interval_are_drawn_without_losing_the_figure():
    """The report's locality figure with an infinite difference at one level, and the GAN window statistics with an
    interval whose low end lies 3e-17 above its estimate (a zero-width interval summed in another order): both
    figures are drawn, the finite bars at their lengths, the infinite one left out. An estimate outside its interval
    beyond rounding is refused by name. Fails on the old code: matplotlib raised "'yerr' must not contain negative
    values" in both figures, and for the outside estimate."""
    from genkernel.plotting.gan import plot_window_statistics
    from genkernel.report import figures as fg

    def result(difference, low, high):
        return {"difference": difference, "interval": [low, high], "measured": 0.5, "control": 0.4, "n": 4}

    per_level = [{"level": 1.0, "traffic": result(0.1, 0.05, 0.2), "share": result(0.1, 0.0, 0.3)},
                 {"level": 2.0, "traffic": result(math.inf, 0.0, 1.0), "share": result(0.2, 0.1, 0.3)}]
    summary = {"settings": {"probe_levels": [1.0, 2.0]}, "locality": {"band": 1, "per_level": per_level},
               "matrices": {"kappa": [1.0, 2.0], "residual": [1e-6, 1e-6]}}
    fig = fg.locality_figure(summary)
    bars = fig.axes[0].containers[0]  # the traffic series: one bar drawn (0.05 below, 0.1 above), one left out
    segments = bars.lines[2][0].get_segments()
    lengths = sorted(float(abs(s[1, 1] - s[0, 1])) for s in map(np.asarray, segments)
                     if s.shape == (2, 2) and np.isfinite(s).all())
    assert lengths == pytest.approx([0.15])
    estimate = 0.1 - 0.3  # -0.19999999999999998
    windows = [[{"steps": [0, 4], "statistics": {"geometry": {"traffic": {"interaction_minus_control": {
        "difference": estimate, "interval": [-0.2 + 3e-17, -0.2 + 3e-17], "n": 5}}}}}]]
    _, ax = plt.subplots()
    plot_window_statistics(ax, windows)
    assert len(ax.containers) == 1
    from genkernel.plotting.arrays import error_lengths

    with pytest.raises(ValueError, match="outside its interval"):
        error_lengths(1.0, 1.5, 2.0)
    plt.close("all")
