"""What the figure functions draw is what they were given: matrices in the labelled order, colour scales
shared where panels are compared and centred at 0 where diverging, interval bars from the interval's ends,
nothing non-positive on a log axis, images in their value range, and inputs a figure would mislabel refused."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _image_array(im) -> np.ndarray:
    return np.ma.filled(np.ma.asarray(im.get_array()).astype(float), np.nan)


def _bar_segments(container) -> list[np.ndarray]:
    """The error-bar segments of an errorbar container, one [2, 2] array (or an empty one) per point."""
    if not container.lines[2]:  # drawn without xerr / yerr
        return []
    (bars,) = container.lines[2]
    return [np.asarray(s) for s in bars.get_segments()]


# -- diffusion ------------------------------------------------------------------------------------
def _diffusion_report(traffic, share, levels, kappa=None):
    return {"matrices": {"traffic": traffic, "share": share, "kappa": kappa or [1.0] * len(traffic)},
            "config": {"probe_levels": levels, "band": 1}, "tracked_steps": 2, "residual": {"relative_residual": 1e-6}}


def test_matrix_evolution_panels_share_one_colour_scale():
    """Snapshots of one matrix over training are compared by eye: each panel had its own top
    (0.5 at the first, 0.9 at the second), so the same colour meant 0.5 in one and 0.9 in the other."""
    from genkernel.plotting.diffusion import plot_matrix_evolution

    history = [{"tracked_step": 1, "global_step": 10, "traffic_matrix": [[0.5, 0.1], [0.2, 0.3]]},
               {"tracked_step": 2, "global_step": 20, "traffic_matrix": [[0.9, 0.1], [None, 0.3]]}]
    report = _diffusion_report([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [3, 40])
    report["locality_over_training"] = history
    fig = plot_matrix_evolution(report)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2
    assert [im.get_clim() for im in images] == [(0.0, 0.9), (0.0, 0.9)]
    for im, row in zip(images, history):  # each panel draws its own snapshot, rows in order
        expected = np.array([[np.nan if v is None else v for v in r] for r in row["traffic_matrix"]])
        assert np.allclose(_image_array(im), expected, equal_nan=True)
    assert [a.get_title() for a in fig.axes if a.get_images()] == ["traffic share, step 10", "traffic share, step 20"]


def test_noise_matrix_refuses_levels_that_do_not_label_its_rows():
    """Three rows and two probe levels: the rows were drawn with the first two labelled, the third unlabelled."""
    from genkernel.plotting.diffusion import plot_noise_matrices

    report = _diffusion_report([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [3, 40])
    with pytest.raises(ValueError, match="probe_levels"):
        plot_noise_matrices(report)


def test_an_all_zero_net_share_matrix_is_drawn_white():
    """A diverging limit of 0 made vmin = vmax = 0, and matplotlib maps every value to the bottom
    of the map: a matrix of zeros was drawn deep blue, as if strongly negative."""
    from genkernel.plotting.diffusion import plot_noise_matrices
    from genkernel.plotting.gan import plot_coupling

    report = _diffusion_report([[0.7, 0.3], [0.2, 0.8]], [[0.0, 0.0], [0.0, 0.0]], [3, 40])
    fig = plot_noise_matrices(report)
    images = [im for ax in fig.axes for im in ax.get_images()]  # traffic, then net share
    assert len(images) == 2
    assert float(images[1].norm(0.0)) == pytest.approx(0.5)
    fig, ax = plt.subplots()
    im = plot_coupling(ax, np.zeros((3, 3)), title="net", diverging=True)
    assert float(im.norm(0.0)) == pytest.approx(0.5)
    im = plot_coupling(ax, np.zeros((3, 3)), title="net", diverging=True, limit=0.0)
    assert float(im.norm(0.0)) == pytest.approx(0.5)


def test_average_reports_refuses_runs_with_other_probe_levels():
    """Row i of each run's matrix is its i-th probe level: with other levels the mean mixed levels
    and drew them under the first run's labels."""
    from genkernel.plotting.diffusion import average_reports

    a = _diffusion_report([[0.6, 0.4], [0.2, 0.8]], [[1.0, 0.0], [0.0, 1.0]], [3, 40])
    b = _diffusion_report([[0.8, 0.2], [0.4, 0.6]], [[1.0, 0.0], [0.0, 1.0]], [40, 3])
    with pytest.raises(ValueError, match="probe_levels"):
        average_reports([a, b])
    c = _diffusion_report([[0.8, 0.2], [0.4, 0.6]], [[1.0, 0.0], [0.0, 1.0]], [3, 40])
    mean = average_reports([a, c])
    assert np.allclose(mean["matrices"]["traffic"], [[0.7, 0.3], [0.3, 0.7]])


def _per_level_run(seed, levels, rows):
    report = _diffusion_report([[1.0]] * len(levels), [[1.0]] * len(levels), levels)
    report.update(locality_over_training=[], kernel=[], locality={"per_level": [
        {"level": lv, "traffic": {"difference": d, "interval": iv}} for lv, (d, iv) in zip(levels, rows)]})
    return {"seed": seed, "report": report}


def test_per_level_locality_bars_are_the_intervals_and_levels_must_agree():
    """Coverage of the bars (low to high, no bar where the interval is missing) and of the level ticks;
    runs with other probe levels were drawn at the same x under the last run's labels."""
    from genkernel.plotting.diffusion import plot_locality_over_training

    run = _per_level_run(0, [3, 40, 90], [(0.1, [0.05, 0.3]), (-0.2, [None, None]), (0.0, [-0.1, 0.02])])
    fig = plot_locality_over_training(run["report"], runs=[run])
    ax = fig.axes[3]
    (container,) = ax.containers
    segments = _bar_segments(container)
    assert np.allclose(segments[0][:, 1], [0.05, 0.3]) and segments[1].size == 0 and np.allclose(segments[2][:, 1], [-0.1, 0.02])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "40", "90"]
    other = _per_level_run(1, [3, 50, 90], [(0.1, [0.0, 0.2])] * 3)
    with pytest.raises(ValueError, match="probe levels"):
        plot_locality_over_training(run["report"], runs=[run, other])


def test_noise_sample_images_are_drawn_in_zero_one_channels_last():
    """Coverage: a [3, H, W] image in [-1, 1] is drawn as (x + 1) / 2, channels last."""
    from types import SimpleNamespace

    from genkernel.plotting.diffusion import plot_retrieval

    torch.manual_seed(0)
    samples = torch.rand(2, 3, 4, 5) * 2 - 1
    train = torch.rand(2, 3, 4, 5) * 2 - 1
    fig = plot_retrieval(SimpleNamespace(samples=samples), train, images=True,
                         quality={"noise": True, "score": 0.9, "limit": 0.5})
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 4
    drawn = _image_array(images[0])
    assert drawn.shape == (4, 5, 3)
    assert np.allclose(drawn, ((samples[0] + 1) / 2).permute(1, 2, 0).numpy(), atol=1e-7)
    assert images[0].get_clim() == (0, 1)


# -- GAN ------------------------------------------------------------------------------------------
def test_gan_window_bars_come_from_the_interval_and_a_missing_one_draws_none():
    """A window without an interval was drawn with a zero-length bar: as if its estimate were exact."""
    from genkernel.plotting.gan import plot_coverage_and_coupling

    def window(steps, estimate, interval):
        return {"steps": steps, "statistics": {"geometry": {"traffic": {"interaction_minus_control": {
            "estimate": estimate, "interval": interval}}}}}

    fig, ax = plt.subplots()
    plot_coverage_and_coupling(ax, [], [window([0, 9], 0.2, [0.1, 0.35]), window([10, 19], -0.1, [None, None])])
    (container,) = ax.containers
    data = container.lines[0].get_xydata()
    assert np.allclose(data, [[4.5, 0.2], [14.5, -0.1]])
    segments = _bar_segments(container)
    assert np.allclose(segments[0], [[4.5, 0.1], [4.5, 0.35]])
    assert segments[1].size == 0


def test_plot_coupling_refuses_a_non_square_matrix_and_draws_rows_as_probe_groups():
    """A [2, 3] matrix got the rows' two ticks on its three columns; the square case is coverage:
    row a (probe group) is drawn at y = a, column b at x = b, with the labels in that order."""
    from genkernel.plotting.gan import plot_coupling

    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="square"):
        plot_coupling(ax, np.ones((2, 3)), title="t")
    m = np.array([[0.5, 0.1, 0.0], [0.2, 0.7, np.nan], [0.0, 0.3, 0.9]])
    im = plot_coupling(ax, m, ["mode 0", "mode 1", "mode 2"], title="t")
    assert np.allclose(_image_array(im), m, equal_nan=True) and im.get_clim() == (0, 0.9)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["m0", "m1", "m2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["m0", "m1", "m2"]
    assert ax.yaxis_inverted()  # row 0 at the top, as the ticks read
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    assert texts[(0, 1)] == "0.20" and texts[(1, 0)] == "0.10" and (2, 1) not in texts  # NaN: no number
    with pytest.raises(ValueError, match="labels"):
        plot_coupling(ax, m, ["a", "b"], title="t")


def test_sample_grid_draws_images_in_zero_one_and_refuses_other_shapes():
    """A [B, H, W] batch was drawn as one image of B channels; a NumPy batch raised AttributeError."""
    from genkernel.plotting.gan import plot_sample_grid

    torch.manual_seed(0)
    images = torch.rand(3, 1, 4, 4) * 2 - 1
    fig, ax = plt.subplots()
    plot_sample_grid(ax, images.numpy(), nrow=3)
    drawn = _image_array(ax.get_images()[0])
    for i in range(3):  # make_grid: padding 2, image i at columns 2 + 6 i
        tile = drawn[2:6, 2 + 6 * i:6 + 6 * i]
        assert np.allclose(tile, ((images[i, 0] + 1) / 2).numpy()[..., None].repeat(3, -1), atol=1e-7)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        plot_sample_grid(ax, images[:, 0])
    with pytest.raises(ValueError, match="channels"):
        plot_sample_grid(ax, torch.zeros(2, 2, 4, 4))


# -- base figures ---------------------------------------------------------------------------------
def test_scatter_labels_refuses_labels_other_than_plus_minus_one():
    """Labels {0, 1}: the 0 class was silently left out of the figure."""
    from genkernel.plotting.core import scatter_labels

    fig, ax = plt.subplots()
    points = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    with pytest.raises(ValueError, match=r"±1"):
        scatter_labels(ax, points, np.array([0, 1, 1]))
    scatter_labels(ax, points, np.array([1, -1, 1]))
    drawn = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert np.allclose(drawn["y = +1"], points[[0, 2]]) and np.allclose(drawn["y = -1"], points[[1]])


def test_class_kernels_refuse_blocks_that_do_not_tile_the_kernel():
    """n = 10 with 4 per class: ticks named classes 0, 1 and the last two rows were nobody's."""
    from genkernel.plotting.figures import plot_class_kernels, plot_printed_digits

    k = np.eye(10)
    with pytest.raises(ValueError, match="per_class"):
        plot_class_kernels(k, k, 4, dataset="toy", gaps={"init": 0.0, "final": 0.0})
    with pytest.raises(ValueError, match="shape"):
        plot_class_kernels(np.eye(8), np.eye(12), 4, dataset="toy", gaps={"init": 0.0, "final": 0.0})
    with pytest.raises(ValueError, match="per_class"):
        plot_printed_digits(np.eye(12), np.eye(12), np.zeros((10, 10)), 4, np.zeros((2, 3, 2, 2)), accuracy=0.5,
                            gaps={"init": 0.0, "final": 0.0})


def test_class_kernel_scale_ignores_nan_and_marks_what_it_clips():
    """A NaN entry made the shared range NaN (the map lost its centre); values below the shared
    1st-percentile low end are drawn at that end, and the colour bar must say so (extend="min")."""
    from genkernel.plotting.figures import plot_class_kernels, shared_range

    rng = np.random.default_rng(0)
    kernel = np.clip(rng.normal(0.4, 0.3, (40, 40)), -0.9, 1.0)
    kernel[3, 5] = np.nan
    low, high = shared_range(kernel)
    assert low == pytest.approx(np.nanpercentile(kernel, 1)) and high == 1.0
    fig = plot_class_kernels(kernel, kernel, 10, dataset="toy", gaps={"init": 0.1, "final": 0.2})
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2
    assert all(im.norm.vmin == pytest.approx(low) and float(im.norm(0.0)) == pytest.approx(0.5) for im in images)
    assert np.isnan(_image_array(images[0])[3, 5])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2", "3"]
    assert np.allclose(fig.axes[0].get_xticks(), [4.5, 14.5, 24.5, 34.5])
    bars = [im.colorbar for im in images if im.colorbar is not None]
    assert len(bars) == 1 and bars[0].extend == "min"


def test_null_space_log_axes_show_every_point():
    """A zero out-of-span part or a zero error sat at 0 on a log axis: the point was not drawn."""
    from genkernel.plotting.figures import plot_null_space

    x_test = np.linspace(-4, 4, 9)
    residual = np.array([0.0, 1e-3, 1e-2, 0.1, 0.2, 0.3, 1e-20, 0.5, 1.0])
    error = np.array([1e-3, 0.0, 0.1, 0.2, 0.1, 0.3, 0.4, 0.5, 0.6])
    fig = plot_null_space(np.array([1.0, 0.5, 0.0]), np.array([0.5, 0.9, 1.0]), np.linspace(-3, 3, 5), x_test,
                          np.sin(x_test), np.sin(x_test), residual, error, rho=0.5, interval=[0.1, 0.9])
    ax = fig.axes[3]
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert offsets.shape == (9, 2) and (offsets > 0).all()
    assert "floor" in ax.get_xlabel() or "floor" in ax.get_ylabel()
    twin = [a for a in fig.axes if a.get_yscale() == "log" and a is not ax and a.lines]
    assert any((line.get_ydata() > 0).all() and "1e-16" in a.get_ylabel() for a in twin for line in a.lines)


def test_optimizer_weighting_bars_are_the_interval_ends():
    """Coverage: the gap row's bar is [1 − high, 1 − low] of the first-order share; each term's bar is
    its interval; row labels read top to bottom in the decomposition's order."""
    from genkernel.plotting.figures import plot_optimizer_weighting

    x = np.array([0.3, -0.2, 0.1])
    decomposition = {"first_order": {"share": 0.9, "interval": [0.85, 0.97]},
                     "second_order": {"share": 0.05, "interval": [0.01, 0.08]},
                     "noise": {"share": -0.01, "interval": [None, None]}}
    fig = plot_optimizer_weighting({"sgd": np.array([1.0, 2.0, 3.0])}, x, 0.0,
                                   {"plain": np.eye(3), "preconditioned": np.eye(3)}, decomposition, {"rho": 0.5})
    ax = fig.axes[3]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ys = ax.get_yticks()
    rows = dict(zip(labels, ys))
    assert labels == ["gap: 1 − first order", "second_order", "noise"] and rows["gap: 1 − first order"] > rows["noise"]
    bars = {}
    for c in ax.containers:
        (x0, y0), = c.lines[0].get_xydata()
        bars[y0] = (x0, _bar_segments(c))
    x0, (seg,) = bars[rows["gap: 1 − first order"]]
    assert x0 == pytest.approx(0.1) and np.allclose(seg[:, 0], [0.03, 0.15])
    x0, (seg,) = bars[rows["second_order"]]
    assert x0 == pytest.approx(0.05) and np.allclose(seg[:, 0], [0.01, 0.08])
    x0, segs = bars[rows["noise"]]
    assert x0 == pytest.approx(-0.01) and (not segs or segs[0].size == 0)
    first = [x for x in fig.axes[0].lines if x.get_label() == "sgd"][0]
    assert np.allclose(first.get_xdata(), [-0.2, 0.1, 0.3]) and np.allclose(first.get_ydata(), [2.0, 3.0, 1.0])


def test_noise_matrix_columns_are_ticked_at_whole_bins():
    """Automatic ticks on a 2-bin matrix read -0.5, 0.0, 0.5, ...: a "bin 0.5" that is no bin."""
    from genkernel.plotting.diffusion import plot_noise_matrices

    for bins in (2, 3, 20):
        traffic = np.full((2, bins), 1.0 / bins)
        fig = plot_noise_matrices(_diffusion_report(traffic.tolist(), np.zeros((2, bins)).tolist(), [3, 40]))
        ax = fig.axes[0]
        lo, hi = sorted(ax.get_xlim())
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() and 0 <= t < bins for t in ticks)
        assert ticks[0] == 0 and ticks[-1] == bins - 1
        plt.close(fig)


def test_null_space_regions_follow_the_training_range():
    """Inside/outside was |x| ≤ π whatever the training inputs: with inputs on [-1, 1] a test point
    at 2 was drawn as 'inside the training range'."""
    from genkernel.plotting.figures import plot_null_space

    x_test = np.array([-3.0, -2.0, -0.5, 0.0, 0.5, 2.0, 3.0])
    args = (np.array([1.0, 0.1]), np.array([0.5, 1.0]), np.linspace(-1, 1, 5), x_test, np.sin(x_test), np.sin(x_test),
            np.linspace(0.1, 0.7, 7), np.linspace(0.2, 0.8, 7))
    fig = plot_null_space(*args, rho=0.5, interval=[0.1, 0.9], train_range=(-1, 1))
    drawn = {c.get_label(): c.get_offsets()[:, 0] for c in fig.axes[3].collections}
    assert np.allclose(drawn["inside the training range"], np.linspace(0.1, 0.7, 7)[[2, 3, 4]])
    assert np.allclose(drawn["outside"], np.linspace(0.1, 0.7, 7)[[0, 1, 5, 6]])
    with pytest.raises(ValueError, match="train_range"):
        plot_null_space(*args[:2], np.linspace(-4, 4, 5), *args[3:], rho=0.5, interval=[0.1, 0.9])


def test_printed_digit_confusion_is_drawn_as_given_from_zero_and_must_be_square():
    """Counts drawn with their own minimum as white: a matrix whose every cell is ≥ 2 drew 2 as 'none'.
    A [10, 9] confusion was ticked 0–9 on both axes."""
    from genkernel.plotting.figures import plot_printed_digits

    rng = np.random.default_rng(0)
    confusion = rng.integers(2, 9, (10, 10))
    k = np.eye(40)
    fig = plot_printed_digits(k, k, confusion, 2, rng.random((2, 3, 4, 4)), accuracy=0.5, gaps={"init": 0.0, "final": 0.0})
    ax = [a for a in fig.axes if a.get_xlabel() == "predicted"][0]
    (im,) = ax.get_images()
    assert np.array_equal(_image_array(im), confusion) and im.get_clim() == (0, confusion.max())
    assert ax.get_ylabel() == "printed digit"
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    assert texts[(3, 1)] == str(confusion[1, 3])  # text at (column j, row i) is confusion[i, j]
    with pytest.raises(ValueError, match="square"):
        plot_printed_digits(k, k, confusion[:, :9], 2, rng.random((2, 3, 4, 4)), accuracy=0.5,
                            gaps={"init": 0.0, "final": 0.0})


def test_regression_kernel_is_drawn_in_the_sorted_order_its_label_states():
    """The panel says "training inputs, sorted by x": a kernel over unsorted inputs was drawn in their order."""
    from genkernel.plotting.figures import plot_regression_kernels

    x = np.array([0.4, -1.0, 2.0, 0.0])
    kernel = np.cos(x[:, None] - x[None, :])  # k(x_i, x_j), in the inputs' order
    panel = {"x_train": x, "y_train": np.sin(x), "x_test": np.linspace(-1, 2, 5), "y_true": np.zeros(5),
             "y_pred": np.zeros(5), "kernel": kernel, "steps": 3, "alignment": {"init": 0.1, "final": 0.5}}
    fig = plot_regression_kernels({"sin": panel})
    (im,) = [im for ax in fig.axes for im in ax.get_images()]
    xs = np.sort(x)
    assert np.allclose(_image_array(im), np.cos(xs[:, None] - xs[None, :]))
    assert float(im.norm(0.0)) == pytest.approx(0.5) and im.get_clim() == (-1.0, 1.0)
    with pytest.raises(ValueError, match="kernel of shape"):
        plot_regression_kernels({"sin": {**panel, "kernel": kernel[:3, :3]}})


def test_tangent_svm_titles_without_tuned_hyperparameters():
    """The fallback "?" for a missing C was formatted with :g, which raises on a string."""
    from genkernel.plotting.figures import plot_tangent_svm

    g = np.linspace(-1, 1, 6)
    gx, gy = np.meshgrid(g, g)
    panel = {"grid_x": gx, "grid_y": gy, "tangent_scores": gx, "rbf_scores": gy, "x_test": np.array([[0.5, 0.5], [-0.5, 0.2]]),
             "y_test": np.array([1, -1]), "tangent_acc": 0.9, "rbf_acc": 0.8}
    fig = plot_tangent_svm({"ring": panel})
    titles = [ax.get_title() for ax in fig.axes]
    assert any("(C=?)" in t and "accuracy 0.900" in t for t in titles)
    assert any("(C=?, γ=?)" in t and "accuracy 0.800" in t for t in titles)
    fig = plot_tangent_svm({"ring": {**panel, "tangent_C": 0.5, "rbf_C": 10.0, "rbf_gamma": 0.123456}})
    titles = [ax.get_title() for ax in fig.axes]
    assert any("(C=0.5)" in t for t in titles) and any("(C=10, γ=0.123)" in t for t in titles)


def test_overview_claim_bars_are_the_intervals_and_a_missing_one_draws_none():
    """A claim without an interval was drawn with a zero-length bar at its value: as if exact."""
    from genkernel.plotting.diffusion import plot_overview

    report = _diffusion_report([[0.7, 0.3], [0.2, 0.8]], [[1.0, 0.0], [0.0, 1.0]], [3, 40])
    report["kernel"] = [{"tracked_step": 0, "global_step": 0, "by_distance": [0.9, 0.5]}]
    claims = {"traffic_locality": {"value": 0.2, "interval": [0.1, 0.4], "held": True},
              "kernel_locality": {"value": 0.05, "interval": None, "held": False}}
    fig = plot_overview(report, None, claims=claims)
    ax = fig.axes[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["traffic − control", "kernel, θ_T − θ₀", "retrieval, θ_T − θ₀"]
    bars = {tuple(c.lines[0].get_xydata()[0]): _bar_segments(c) for c in ax.containers}
    assert np.allclose(bars[(0.0, 0.2)][0], [[0.0, 0.1], [0.0, 0.4]])
    assert all(seg.size == 0 for seg in bars[(1.0, 0.05)])
