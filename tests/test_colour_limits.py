"""One colour-limit rule for every heat map (plotting.arrays.colour_limit): measured and control
panels share a scale, non-finite values and missing matrices are skipped, and an all-zero matrix gets
the limit 1.0, never vmin = vmax = 0 (matplotlib then draws every value at the map's bottom)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from genkernel.plotting.arrays import colour_limit  # noqa: E402
from genkernel.plotting.diffusion import plot_noise_matrices  # noqa: E402
from genkernel.plotting.gan import shared_limit  # noqa: E402
from genkernel.report.figures import noise_matrix_figure  # noqa: E402


def test_the_limit_is_the_largest_finite_value_of_all_matrices():
    a = [[0.1, float("nan")], [0.4, float("inf")]]
    b = torch.tensor([[0.2, -3.0]])
    assert colour_limit(a, b) == 0.4
    assert colour_limit(a, b, absolute=True) == 3.0
    assert colour_limit(a, None, b) == 0.4  # a missing control is skipped
    assert colour_limit([[None, 0.25]]) == 0.25  # how the JSON writes NaN


@pytest.mark.parametrize("absolute", [False, True])
def test_no_positive_value_gives_one(absolute):
    assert colour_limit(np.zeros((3, 3)), absolute=absolute) == 1.0
    assert colour_limit([[float("nan")]], absolute=absolute) == 1.0
    assert colour_limit(absolute=absolute) == 1.0
    assert colour_limit(None, absolute=absolute) == 1.0
    assert colour_limit([[-2.0]]) == 1.0  # a sequential map has no negative end


def test_the_gan_plot_limit_is_the_same_rule():
    for mats in ([np.zeros((2, 2))], [[[0.3, -0.5]], [[0.1, float("inf")]]], [[[float("nan")]]]):
        for diverging in (False, True):
            assert shared_limit(*mats, diverging=diverging) == colour_limit(*mats, absolute=diverging)


def _matrices(traffic_scale):
    traffic = (traffic_scale * np.ones((2, 3))).tolist()
    share = [[0.5, -0.25, 0.0], [0.0, 0.0, 0.0]]
    return {"traffic": traffic, "traffic_control": traffic, "share": share, "share_control": share,
            "kappa": [1.0, math.nan]}


def _limits(fig):
    return [tuple(float(v) for v in im.get_clim()) for ax in fig.axes for im in ax.get_images()]


def test_an_all_zero_traffic_matrix_is_drawn_on_zero_to_one_in_the_recipe_figure():
    # before: the recipe figure's traffic panels had vmin = vmax = 0
    report = {"matrices": _matrices(0.0), "config": {"probe_levels": [10, 500]},
              "residual": {"relative_residual": 1e-9}, "tracked_steps": 3}
    fig = plot_noise_matrices(report)
    try:
        limits = _limits(fig)
    finally:
        plt.close(fig)
    assert limits == [(0.0, 1.0), (0.0, 1.0), (-0.5, 0.5), (-0.5, 0.5)]  # traffic, its control, shares


def test_an_all_zero_traffic_matrix_is_drawn_on_zero_to_one_on_the_report_page():
    # before: the report page's traffic panels had vmin = vmax = 0
    summary = {"matrices": _matrices(0.0), "settings": {"probe_levels": [10, 500]}}
    limits = _limits(noise_matrix_figure(summary))
    assert limits == [(0.0, 1.0), (0.0, 1.0), (-0.5, 0.5), (-0.5, 0.5)]
    summary = {"matrices": _matrices(0.2), "settings": {"probe_levels": [10, 500]}}
    assert _limits(noise_matrix_figure(summary)) == [(0.0, 0.2), (0.0, 0.2), (-0.5, 0.5), (-0.5, 0.5)]
