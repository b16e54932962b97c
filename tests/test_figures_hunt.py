"""Figures draw what their titles and their recipes' JSON say (black box: the numbers are read back from the
Figure's artists and rendered pixels): a missing value on a heat map is not drawn in the colour of 0, panels
drawn from one seed among aggregate ones name it, a title's number is the one the JSON reports, titles name
the seed that was run, and an interval the statistics refuse is not drawn as an exact bar."""

from __future__ import annotations

import argparse
import copy
import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _pixels(fig) -> np.ndarray:
    """The rendered figure as an RGB array in [0, 1] (row 0 at the top)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255.0


def _cell_colour(fig, pixels, ax, row: int, col: int) -> np.ndarray:
    """The colour drawn inside heat-map cell (row, col) of ``ax`` (imshow's data coordinates), near its corner:
    a number written at the cell's centre would be read instead."""
    x, y = ax.transData.transform((col - 0.38, row - 0.38))
    return pixels[int(round(pixels.shape[0] - y)), int(round(x))]


def _apart(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# -- heat maps: a missing value is not a zero ------------------------------------------------------------
def test_a_missing_entry_of_a_heat_map_is_not_drawn_in_the_colour_of_zero_or_of_the_top():
    """A NaN cell (a GAN group without probes, a probe level or probe without a value; None in the JSON) was
    left transparent, i.e. drawn in the axes' white: on the diverging maps (RdBu_r, coolwarm) that is within
    0.04 (RdBu_r) / 0.14 (coolwarm) of the colour of 0, so "no value" read as "no share"; on magma it sat
    0.25 from the top colour. The smoke gan_ring2d run draws five of its eight geometry groups so.

    Fails on the old code: the NaN cell's colour lies within 0.04 / 0.14 of the zero cell's (0.25 of the top)."""
    from genkernel.plotting import diffusion, gan
    from genkernel.plotting.figures import plot_class_kernels
    from genkernel.report import figures as report

    nan = math.nan
    # plot_coupling, diverging (net shares) and not (traffic): rows 2 has no probes
    net = np.array([[0.6, 0.0, 0.4], [0.2, 0.8, -0.3], [nan, nan, nan]])
    fig, axes = plt.subplots(1, 2)
    gan.plot_coupling(axes[0], net, title="net", diverging=True)
    traffic = np.array([[1.0, 0.0, 0.0], [0.2, 0.8, 0.0], [nan, nan, nan]])
    gan.plot_coupling(axes[1], traffic, title="traffic")
    px = _pixels(fig)
    assert _apart(_cell_colour(fig, px, axes[0], 2, 0), _cell_colour(fig, px, axes[0], 0, 1)) > 0.25
    assert _apart(_cell_colour(fig, px, axes[1], 2, 0), _cell_colour(fig, px, axes[1], 0, 0)) > 0.3  # vs the top, 1.0

    # the diffusion recipes' noise × noise net shares: level 1 without a value
    report_ = {"matrices": {"traffic": [[0.5, 0.5], [0.3, 0.7]], "share": [[0.4, 0.0], [None, None]], "kappa": [1.0, 1.0]},
               "config": {"probe_levels": [5, 50], "band": 1}, "tracked_steps": 2, "residual": {"relative_residual": 1e-6}}
    fig = diffusion.plot_noise_matrices(report_)
    ax = fig.axes[1]  # net share (no control panels)
    px = _pixels(fig)
    assert _apart(_cell_colour(fig, px, ax, 1, 0), _cell_colour(fig, px, ax, 0, 1)) > 0.25

    # the report page's ledger figure (coolwarm net shares): probe 1 did not move
    ledger = {"traffic_shares": [[0.5, 0.5], [nan, nan]], "net_shares": [[0.7, 0.0], [nan, nan]],
              "kappa": [1.0, nan], "probe_relative_residual": [1e-6, nan]}
    fig = report.ledger_figure(ledger)
    ax = fig.axes[1]
    px = _pixels(fig)
    assert _apart(_cell_colour(fig, px, ax, 1, 0), _cell_colour(fig, px, ax, 0, 1)) > 0.25

    # a normalized kernel on the diverging (blue-white-red) scale: entry (0, 3) NaN, (0, 2) zero
    k = np.array([[1.0, 0.5, 0.0, nan], [0.5, 1.0, -0.4, 0.2], [0.0, -0.4, 1.0, 0.3], [nan, 0.2, 0.3, 1.0]])
    fig = plot_class_kernels(k, k, 2, dataset="toy", gaps={"init": 0.1, "final": 0.1})
    ax = fig.axes[0]
    px = _pixels(fig)
    assert _apart(_cell_colour(fig, px, ax, 0, 3), _cell_colour(fig, px, ax, 0, 2)) > 0.25


# -- diffusion: panels of one seed among aggregate figures name it ----------------------------------------
@pytest.fixture(scope="module")
def two_reports():
    """A tiny DDPM NoiseLevelAnalyzer's report (seed 0), a second run's (the same, its locality history and
    kernel checkpoints shifted: another seed's numbers), and the first analyzer's saved state."""
    from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    angle = torch.rand(64, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=8, snapshot_every=2, kernel_points=2,
                                  kernel_every=2, progress=False)
    DDPMTrainer(MLPDenoiser(hidden=8, depth=2, time_dim=8).double(), scheduler, data, batch_size=16,
                callbacks=[analyzer], progress=False).train(6)
    first = analyzer.report()
    other = copy.deepcopy(first)
    for row in other["locality_over_training"]:
        for kind in ("traffic", "share"):
            if isinstance(row.get(kind), dict) and row[kind].get("measured") is not None:
                row[kind]["measured"] += 0.25
    for entry in other["kernel"]:
        entry["by_distance"] = [None if v is None else v - 0.5 for v in entry["by_distance"]]
    other["matrices"]["traffic"] = (np.asarray(first["matrices"]["traffic"], dtype=float) * 0.5).tolist()
    return first, other, analyzer.state_dict()  # (the first run's saved state, for the report page)


def test_locality_panels_over_training_drawn_from_the_first_seed_say_so(two_reports):
    """Over several seeds the locality figure's panels over training (traffic, net share, kernel) draw the
    first seed's history alone (the per-level panel draws every seed, with a legend), and the overview's
    kernel-decay and entropy panels the first seed's, beside a traffic matrix averaged over the seeds;
    none of them said which, and write_diffusion_outputs' docstring said the locality panels show every
    seed. Now ``run_label`` names the seed in those panels' titles and the overview's matrix says "mean of N
    seeds"; the lines are still the first seed's numbers.

    Fails on the old code: plot_locality_over_training and plot_overview take no ``run_label`` (TypeError),
    and the titles name no seed."""
    from genkernel.plotting import diffusion as plots

    first, other, _ = two_reports
    runs = [{"seed": 0, "report": first}, {"seed": 1, "report": other}]
    averaged = plots.average_reports([first, other])
    fig = plots.plot_locality_over_training(averaged, runs=runs, run_label="seed 0 of 2")
    axes = fig.axes
    for ax in axes[:3]:
        assert "seed 0 of 2" in ax.get_title(), ax.get_title()
    assert "seed 0 of 2" not in axes[3].get_title()  # every seed, with a legend
    assert {"seed 0", "seed 1"} <= {t.get_text() for t in axes[3].get_legend().get_texts()}
    measured = [row["traffic"]["measured"] for row in first["locality_over_training"]
                if isinstance(row.get("traffic"), dict) and "control" in row["traffic"]]
    (line,) = [ln for ln in axes[0].get_lines() if ln.get_label() == "measured"]
    assert np.allclose(line.get_ydata(), measured)  # the first seed's numbers, as the label says

    retrieval = {"stages": [90, 50, 0], "mean_entropy": [0.9, 0.8, 0.5]}
    fig = plots.plot_overview(averaged, retrieval, claims={}, run_label="seed 0 of 2")
    axes = fig.axes
    assert "mean of 2 seeds" in axes[0].get_title()
    drawn = np.asarray(axes[0].get_images()[0].get_array(), dtype=float)
    expected = (np.asarray(first["matrices"]["traffic"], dtype=float) + np.asarray(other["matrices"]["traffic"])) / 2
    assert np.allclose(drawn, expected)
    assert "seed 0 of 2" in axes[2].get_title() and "seed 0 of 2" in axes[3].get_title()
    kernel_lines = [ln.get_ydata() for ln in axes[2].get_lines()]
    assert np.allclose(kernel_lines[0], np.asarray(first["kernel"][0]["by_distance"], dtype=float), equal_nan=True)
    # one run: nothing to tell apart
    fig = plots.plot_overview(first, retrieval, claims={})
    assert "seed" not in fig.axes[2].get_title() and "mean of" not in fig.axes[0].get_title()


def test_the_recipe_passes_the_first_seed_label_to_the_locality_and_overview_figures(tmp_path, monkeypatch):
    """Fails on the old code: write_diffusion_outputs passed no run label to plot_locality_over_training and
    plot_overview, and the JSON named no first-seed panels."""
    from genkernel.plotting import diffusion as plots
    from recipes import common
    from test_recipes_kernels_review import _fake_run

    drawn = {}

    def stub(name):
        def draw(report=None, *args, run_label=None, **kwargs):
            drawn[name] = run_label
            return plt.figure(figsize=(1, 1))
        return draw

    for name in ("plot_noise_matrices", "plot_locality_over_training", "plot_kernel_decay", "plot_matrix_evolution",
                 "plot_retrieval", "plot_overview"):
        monkeypatch.setattr(plots, name, stub(name))
    runs = [_fake_run(seed, [0.5, 0.6]) for seed in (3, 4, 5)]
    for i, run in enumerate(runs):
        run["report"]["config"]["probe_levels"] = [0, 10]
        run["report"]["matrices"] = {"traffic": [[1.0 + i, 2.0], [3.0, 4.0]]}
        run.update(retrieval={"stages": [0, 1]}, final_loss=0.1, timing={})
    args = argparse.Namespace(out_dir=str(tmp_path), mode="smoke", seed=3, device="cpu")
    s = {"warmup_steps": 1, "window_steps": 1, "num_probes": 2, "num_bins": 2, "controls": 2}
    payload = common.write_diffusion_outputs("toy", args, s, common.Timer(), runs, None, torch.zeros(2, 2), images=False)
    assert drawn["plot_locality_over_training"] == "seed 3 of 3" and drawn["plot_overview"] == "seed 3 of 3"
    assert set(payload["results"]["first_seed_panels"]) == {"toy_locality.png", "toy.png"}


# -- null space: the title's numbers are the JSON's and the run's -----------------------------------------
def test_null_space_figure_states_the_json_operator_error_and_the_seed_it_ran(tmp_path, monkeypatch):
    """The spectrum panel's note gave the kernel machine's relative error as the mean over seeds, which is
    neither the JSON's ``domingos_relative_error`` (the worst seed, as the claim reads it) nor the drawn
    run's; the scatter's title said "seed 0" whatever ``--seed`` ran. (Smoke run shrunk further; one seed's
    error set to 5 so that the mean, the worst and the first seed's differ.)

    Fails on the old code: the note says 2.6 or so (the mean) where the JSON says 5, and the title "seed 0"."""
    import recipes.experiments.null_space as ns

    monkeypatch.setattr(ns, "pick", lambda mode, **k: dict(n_train=6, n_test=8, width=4, lr=0.02, steps=8, checkpoints=2,
                                                           extent=1.5, top_k=2, seeds=2))
    real_run, real_plot = ns.run_seed, ns.plot_null_space
    figures = []

    def run_seed(seed, s, device, *, keep):
        out = real_run(seed, s, device, keep=keep)
        if not keep:
            out["domingos_relative_error"] = 5.0
        return out

    def plot(*args, **kwargs):
        figures.append(real_plot(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(ns, "run_seed", run_seed)
    monkeypatch.setattr(ns, "plot_null_space", plot)
    payload = ns.main(["--smoke", "--seed", "3", "--out-dir", str(tmp_path)])
    results = payload["results"]
    assert results["domingos_relative_error"] == 5.0 and payload["seed"] == 3
    (fig,) = figures
    note = re.search(r"rel\. error ([0-9.e+-]+)\)", fig.axes[0].get_title())
    assert note is not None and float(note.group(1)) == pytest.approx(results["domingos_relative_error"], rel=0.05)
    scatter = fig.axes[3].get_title()
    assert scatter.startswith("seed 3:") and f"{results['spearman_seed0_over_test_points']:.2f}" in scatter


# -- figures name the seed that was run -------------------------------------------------------------------
def test_base_figures_name_the_seed_they_draw():
    """The tangent-SVM, tangent-embedding and printed-digit figures said "seed 0" in their titles whatever
    run they were given (``--seed 3`` drew seed 3's run under "seed 0").

    Fails on the old code: the functions take no ``seed`` (TypeError); their titles hard-code "seed 0"."""
    from genkernel.plotting.figures import plot_printed_digits, plot_tangent_embedding, plot_tangent_svm

    g = np.linspace(-1, 1, 5)
    gx, gy = np.meshgrid(g, g)
    panel = {"grid_x": gx, "grid_y": gy, "tangent_scores": gx, "rbf_scores": gy, "x_test": np.zeros((2, 2)),
             "y_test": np.array([1, -1]), "tangent_acc": 1.0, "rbf_acc": 0.5, "tangent_C": 1.0, "rbf_C": 1.0, "rbf_gamma": 1.0}
    fig = plot_tangent_svm({"circle": panel}, seed=3)
    assert fig._suptitle.get_text().startswith("seed 3;")
    fig = plot_tangent_embedding([{"coords": np.zeros((2, 2)), "labels": np.array([0, 1]), "seen": [0], "title": "t"}],
                                 method="MDS", seed=3)
    assert "seed 3" in fig._suptitle.get_text() and "seed 0" not in fig._suptitle.get_text()
    k = np.eye(4)
    fig = plot_printed_digits(k, k, np.eye(2, dtype=int), 1, np.zeros((2, 2, 3, 3)), accuracy=1.0,
                              gaps={"init": 0.0, "final": 0.0}, seed=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("confusion" in t and "(seed 3)" in t for t in titles) and not any("seed 0" in t for t in titles)


def test_the_tangent_svm_recipe_names_its_seed(tmp_path, monkeypatch):
    """Fails on the old code: ``--seed 3`` drew the first run (seed 3) under the title "seed 0". (run_task is
    replaced by a stand-in returning fixed accuracies: the check is on what reaches the figure.)"""
    import recipes.experiments.tangent_svm as ts

    g = np.linspace(-1, 1, 5)
    gx, gy = np.meshgrid(g, g)
    seeds = []

    def run_task(task, a, s, seed, device, *, panel):
        seeds.append(seed)
        acc = 0.9 + 0.01 * (seed % 3)
        result = {"seed": seed, "tangent_svm_test_accuracy": acc, "rbf_svm_test_accuracy": 0.8,
                  "tangent_svm_init_test_accuracy": 0.7, "network_test_accuracy": acc, "tangent_minus_rbf": acc - 0.8,
                  "tangent_minus_tangent_init": acc - 0.7, "tangent_svm_train_accuracy": 1.0, "rbf_svm_train_accuracy": 1.0,
                  "tuning": {}, "final_train_loss": 0.1, "num_tangent_features": 3}
        drawn = {"grid_x": gx, "grid_y": gy, "tangent_scores": gx, "rbf_scores": gy, "x_test": np.zeros((2, 2)),
                 "y_test": np.array([1, -1]), "tangent_acc": acc, "rbf_acc": 0.8, "tangent_C": 1.0, "rbf_C": 1.0,
                 "rbf_gamma": 1.0}
        return result, (drawn if panel else None)

    titles = []
    real_plot = ts.plot_tangent_svm

    def plot(*args, **kwargs):
        fig = real_plot(*args, **kwargs)
        titles.append(fig._suptitle.get_text())
        return fig

    monkeypatch.setattr(ts, "run_task", run_task)
    monkeypatch.setattr(ts, "plot_tangent_svm", plot)
    payload = ts.main(["--smoke", "--seed", "3", "--out-dir", str(tmp_path)])
    assert seeds[0] == 3 and payload["seed"] == 3
    assert titles and titles[0].startswith("seed 3;")


# -- GAN windows: an interval the statistics refuse is not drawn ------------------------------------------
def test_a_window_interval_the_statistics_refuse_draws_no_bar():
    """With two probe groups the interaction statistic (own share minus the other group's from the same source)
    is the same for both groups, since each row of shares sums to 1: its interval over the groups has zero
    width, and the statistics refuse it ("why": too few probe groups). The window panel drew it as a
    zero-length bar, an exact estimate (the smoke gan_ring2d run draws such bars). A window whose interval
    stands keeps its bar.

    Fails on the old code: the refused interval is drawn as a bar from 0.49 to 0.49."""
    from genkernel.plotting.gan import plot_window_statistics

    def window(steps, estimate, interval, why=None):
        result = {"difference": estimate, "interval": interval, "n": 2 if why else 6, **({"why": why} if why else {})}
        return {"steps": steps, "statistics": {"geometry": {"traffic": {"interaction_minus_control": result}}}}

    windows = [window([0, 3], 0.49, [0.49 - 1e-15, 0.49 + 1e-15], why="2 independent unit(s) (probe groups); needs 4"),
               window([4, 7], 0.2, [0.1, 0.35])]
    fig, ax = plt.subplots()
    plot_window_statistics(ax, [windows], kind="traffic")
    (container,) = ax.containers  # the geometry statistic's (the windows have no other)
    x = np.asarray(container.lines[0].get_xdata(), dtype=float)
    assert np.allclose(np.asarray(container.lines[0].get_ydata(), dtype=float), [0.49, 0.2])
    (bars,) = container.lines[2]
    segments = [np.asarray(s) for s in bars.get_segments()]
    drawn = {round(float(s[0, 0]), 6): s for s in segments if s.size and np.isfinite(s).all()}
    assert round(float(x[1]), 6) in drawn and np.allclose(drawn[round(float(x[1]), 6)][:, 1], [0.1, 0.35])
    assert round(float(x[0]), 6) not in drawn  # the refused interval: no bar


def test_the_report_shades_no_window_interval_the_statistics_refuse():
    """The report page's window figure shaded every window's interval, also one the statistics refuse ("why":
    too few probe groups), as the recipes' window panel drew its bar.

    Fails on the old code: the refused window's interval [0, 1] is shaded (the band reaches 1)."""
    from genkernel.report.figures import gan_windows_figure

    def row(end, difference, interval, why=None):
        result = {"difference": difference, "interval": interval, **({"why": why} if why else {})}
        return {"steps": [end - 3, end], "traffic_interaction_minus_control": result,
                "net_interaction_minus_control": result, "kappa_median": 1.5, "collapsed": False}

    windows = [row(4, 0.5, [0.0, 1.0], why="2 independent unit(s) (probe groups)"), row(8, 0.2, [0.15, 0.25]),
               row(12, 0.2, [0.15, 0.25])]
    fig = gan_windows_figure(windows)
    ax = fig.axes[0]
    shaded = [p.vertices for c in ax.collections for p in c.get_paths() if len(p.vertices)]
    tops = [float(np.nanmax(v[:, 1])) for v in shaded if np.isfinite(v).any()]
    assert tops and max(tops) == pytest.approx(0.25)  # the two windows with an interval, not the refused one


def test_the_report_animation_labels_its_rows_by_probe_level(two_reports, monkeypatch):
    """The report page's GIF of the noise × noise matrix over the run labelled its y axis "probe level" with
    the row numbers 0, 1, 2, 3 (MaxNLocator), while the rows are the levels t=1, 5, 20, 63 (the still
    matrices beside it say so): "probe level 1" was the row of t=5.

    Fails on the old code: matrix_animation takes no row labels (TypeError), and the page passes none."""
    import genkernel.report.figures as fg
    from genkernel.report import render_report, summarize

    made = []

    class Recorded(fg.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    frames = [{"label": f"step {i}", "traffic": [[0.5, 0.5], [0.2 * i, 1 - 0.2 * i]], "share": [[0.1, -0.1], [0.0, i]]}
              for i in range(2)]
    keys = [("traffic", "traffic", False), ("share", "net share", True)]
    monkeypatch.setattr(fg, "Figure", Recorded)
    assert fg.matrix_animation(frames, keys=keys, xlabel="training bin", ylabel="probe level", rows=["t=1", "t=5"])
    for ax in made[-1].axes[:2]:
        assert ax.get_ylabel() == "probe level"
        assert [(float(v), t.get_text()) for v, t in zip(ax.get_yticks(), ax.get_yticklabels())] == [(0.0, "t=1"), (1.0, "t=5")]
    with pytest.raises(ValueError, match="row labels"):
        fg.matrix_animation(frames, keys=keys, xlabel="x", ylabel="y", rows=["t=1"])
    monkeypatch.undo()

    passed = {}

    def stub(frames, **kwargs):
        passed.update(kwargs)
        return b"GIF89a"

    monkeypatch.setattr(fg, "matrix_animation", stub)
    monkeypatch.setattr(fg, "png", lambda figure, dpi=110: b"PNG")  # (the figures' pixels are not read here)
    state = two_reports[2]
    render_report(state)
    levels = summarize(state)["states"]["(top level)"]["settings"]["probe_levels"]
    assert passed["rows"] == [f"t={t:g}" for t in levels] and passed["ylabel"] == "probe level"


def test_the_gan_page_does_not_say_no_beside_an_interval_above_zero(monkeypatch):
    """With two geometry groups the coupling statistic's interval over the probe groups has zero width (each row of
    shares sums to 1, so both groups give the same value) and the statistics refuse it ("why": too few probe
    groups): held is False. The page's table showed "[0.104, 0.104]" beside "above 0: no", the header naming what
    the cell did not hold; now the column is "held" and says why.

    Fails on the old code: the cell reads "no" under the header "above 0"."""
    import html
    import re

    from genkernel.data.toy2d import gaussian_ring
    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
    from genkernel.report import render_report, summarize

    torch.manual_seed(0)
    data, _ = gaussian_ring(128, std=0.05)
    G, D = MLPGenerator(2, 2, hidden=8), MLPDiscriminator(2, hidden=8)
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(12, 2), num_groups=2, window=4, eval_every=2)
    GANTrainer(G, D, data, latent_dim=2, batch_size=16, callbacks=[analyzer]).train(4)
    state = analyzer.state_dict()
    result = summarize(state)["states"]["(top level)"]["coupling_whole_run"]["traffic_interaction_minus_control"]
    low, high = result["interval"]
    # the case in point: a zero-width interval by construction, undefined (None ends, with its own why) since the
    # statistics say so rather than return a rounding-wide one
    assert result["held"] is False and result.get("why") and (low is None and high is None or high - low < 1e-9)
    import genkernel.report.figures as fg

    monkeypatch.setattr(fg, "png", lambda figure, dpi=110: b"PNG")  # (the figures' pixels are not read here)
    page = html.unescape(render_report(state, animate=False))
    section = page[page.index("Coupling over the whole run"):]
    header = re.sub(r"<[^>]+>", "|", re.search(r"<tr>(.*?)</tr>", section).group(1))
    row = re.search(r"<tr><td>traffic: own − others' share</td>(.*?)</tr>", section)
    cells = re.findall(r"<td>(.*?)</td>", row.group(1))
    assert header.rstrip("|").split("|")[-1].startswith("held")
    assert cells[-1].startswith("no: ") and "probe groups" in cells[-1]


def test_the_noise_retrieval_figure_names_its_seed_and_draws_an_unscalable_score():
    """Where the first seed's samples are noise the retrieval figure shows them with a note, but dropped the
    run label the other first-seed figures carry; and a score that cannot be scaled (+inf when held-out data
    are no nearer the training set than the training inputs are to one another; saved as None) raised
    TypeError formatting None, after the whole run.

    Fails on the old code: TypeError for the None score; no seed in the note."""
    from genkernel.plotting.diffusion import plot_retrieval

    train = torch.zeros(4, 2)
    for score in (None, 0.93):
        fig = plot_retrieval(None, train, images=False, quality={"score": score, "limit": 0.5, "noise": True},
                             run_label="seed 0 of 3")
        texts = [t.get_text() for ax in fig.axes for t in ax.texts] + ([fig._suptitle.get_text()] if fig._suptitle else [])
        note = " ".join(texts)
        assert "retrieval not shown" in note and "seed 0 of 3" in note
        assert ("0.93" in note) if score is not None else ("cannot be scaled" in note)
