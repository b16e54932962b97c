"""Mended faults (brief "mend"): counts of what measured − control drops, the GAN recipe's pooled difference on the
analyzer's rules, shares() without an interval where the seeds give no spread, the seeds' mean of the diffusion
figures with its per-cell counts, NaN kernel cells in grey, the GAN window panel's seed legend, one name for a
kernel record in the report's figure and table, and the GPU check's memory ratio and rotated orders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# -- 1. measured − control: what it drops ---------------------------------------------------------------------------
def test_measured_minus_control_counts_the_probes_and_clusters_it_drops():
    """Five probe groups of three probes; group 4 has no finite value (e.g. probes whose output did not move) and one
    probe of group 0 neither. The interval is over the 4 groups left (brute force: the mean of their means of the
    finite differences), and the result says so: 4 probes and 1 of 5 clusters dropped.

    Fails on the old code: no "dropped", "clusters" or "clusters_dropped" (n went from 5 to 4 without a word)."""
    from genkernel.core.grouping import between_partitions, measured_minus_control

    g = torch.arange(5).repeat_interleave(3)
    gen = torch.Generator().manual_seed(0)
    measured = torch.randn(15, generator=gen, dtype=F64) + 0.5
    controls = torch.randn(2, 15, generator=gen, dtype=F64)
    measured[g == 4] = math.nan
    measured[0] = math.nan
    result = measured_minus_control(measured, controls, clusters=g)
    diff = (measured - controls.mean(0)).numpy()
    means = [np.nanmean(diff[(g == u).numpy()]) for u in range(4)]
    assert result["difference"] == pytest.approx(float(np.mean(means)), rel=1e-12)
    assert result["n"] == 4 and result["dropped"] == 4
    assert result["clusters"] == 5 and result["clusters_dropped"] == 1
    unclustered = measured_minus_control(measured, controls)
    assert unclustered["n"] == 11 and unclustered["dropped"] == 4 and "clusters" not in unclustered
    full = measured_minus_control(controls[0] + 1.0, controls, clusters=g)
    assert full["dropped"] == 0 and full["clusters_dropped"] == 0
    # one level's probes judged over the partitions: the probes without a value in every partition are counted
    level = between_partitions(measured[:6], torch.randn(4, 6, generator=gen, dtype=F64))
    assert level["dropped"] == 1 and level["n"] == 4


# -- 8. the GAN recipe on the analyzer's rules ---------------------------------------------------------------------
def _window(values, geometry, spatial, step=0):
    stat = lambda v, groups: {"probe_groups": list(map(int, groups)),  # noqa: E731
                              **{k: {"per_probe": {"interaction_minus_control": list(v)}, "interaction_minus_control": None}
                                 for k in ("traffic", "net")}}
    return {"steps": [step, step], "collapsed": False, "kappa_median": 1.0,
            "statistics": {"geometry": stat(values, geometry), "spatial": stat([0.0] * len(values), spatial),
                           "geometry_minus_spatial": {k: {"per_probe": list(values)} for k in ("traffic", "net")}}}


def test_gan_recipe_pools_geometry_minus_spatial_two_way_as_the_analyzer():
    """The recipe's pooled geometry − spatial interval is the analyzer's (genkernel.stats.two_way_interval over both
    groupings), and it keeps the analyzer's nominal rate on a null where the probes' spatial groups carry the
    difference: 4 geometry × 4 spatial groups, 16 probes, 6 windows pooled, 200 null runs. Clustered by geometry
    group alone (the old code) it held 11.7 % of 1000 such runs at a nominal 2.5 % (now 2.2 %).

    Fails on the old code: its interval is the geometry-only one (other ends), and it held far more than 12 of 200."""
    from genkernel.stats import two_way_interval
    from recipes.experiments import gan_ring2d as recipe

    rng = np.random.default_rng(0)
    geometry = np.arange(16) % 4
    spatial = rng.integers(0, 4, 16)
    values = rng.normal(size=16) + 0.3
    run = {"seed": 0, "report": {"windows": [_window(values, geometry, spatial)]}}
    pooled = recipe.coupling_numbers(run, "traffic")["difference"]
    expected = two_way_interval(values, geometry, spatial)
    assert (pooled.estimate, pooled.low, pooled.high, pooled.n) == pytest.approx(
        (expected.estimate, expected.low, expected.high, expected.n), rel=1e-12)

    held = 0
    for _ in range(200):
        spatial = rng.integers(0, 4, 16)
        a, b = rng.normal(size=4), rng.normal(size=4)
        windows = [_window(b[spatial] + 0.3 * a[geometry] + 0.5 * rng.normal(size=16), geometry, spatial, w)
                   for w in range(6)]
        held += recipe.coupling_numbers({"seed": 0, "report": {"windows": windows}}, "traffic")["difference"].above(0.0)
    assert held <= 12  # nominal 2.5 %: 5 expected (the old code: about 23)


def test_gan_recipe_needs_the_analyzers_four_probe_groups():
    """One run whose statistics rest on 3 probe groups (clearly positive) is not held: the analyzer's window claims
    need MIN_PROBE_GROUPS = 4 (over three groups the interaction claim held 4-5 % of null runs at a nominal 2.5 %).

    Fails on the old code: _units_ok took 3 units, so the recipe held the coupling claim the analyzer refuses."""
    from genkernel.stats import MIN_PROBE_GROUPS
    from recipes.experiments import gan_ring2d as recipe

    rng = np.random.default_rng(1)
    geometry, spatial = np.arange(12) % 3, (np.arange(12) // 4) % 3
    windows = [_window(1.0 + 0.2 * rng.normal(size=12), geometry, spatial, w) for w in range(3)]
    rows = [{"cos_formula": 1.0, "cos_kernel_field": 0.9, "cos_local_push": 0.5}] * 3
    run = {"seed": 0, "report": {"windows": windows, "alignment": rows, "generator": {"relative_residual": 0.0},
                                 "discriminator": {"relative_residual": 0.0}},
           "convergence": {"converged": True, "why": ""}}
    core = recipe.claim_core([run], grouping_word="pushed-to mode")
    for kind in ("traffic", "net"):
        entry = core[f"coupling_{kind}"]
        assert entry["geometry"].above(0.0) and entry["interval"].n == 3
        assert entry["held"] is False and f"fewer than {MIN_PROBE_GROUPS} probe groups" in entry["why_not_held"]


# -- 2. shares() without spread ------------------------------------------------------------------------------------
def _decomposition(change, first, deterministic, ito):
    from genkernel.analysis.stochastic import ExpectedOutputDecomposition

    return ExpectedOutputDecomposition(change=change, first_order=first, deterministic=deterministic, ito=ito,
                                       realized_second_order=deterministic.clone(), ito_stderr=torch.zeros_like(ito),
                                       ledger_residual=change - first, seeds=list(range(change.shape[0])))


@pytest.mark.parametrize("method", ["jackknife-t", "percentile"])
def test_shares_give_no_interval_where_the_seeds_give_no_spread(method):
    """Seeds whose terms differ by rounding alone (a full batch: every batch order takes the same steps; here rows
    equal up to one ulp) are one replicate: no interval, and a why; an Itô term that is exactly 0 in every seed of
    seeds that do vary has equal leave-one-out shares: no interval either (as genkernel.stats.mean_interval reads
    values without spread). Seeds that vary keep their interval.

    Fails on the old code: the jackknife-t interval was zero-width ([0.7032, 0.7032], [0.0, 0.0]: a share claimed
    with no uncertainty) or rounding-wide, and the percentile method gave NaN where the jackknife gave a point."""
    gen = torch.Generator().manual_seed(0)
    r, m = 5, 7
    row = torch.randn(1, m, generator=gen, dtype=F64).repeat(r, 1)
    change = row * (1 + torch.tensor([0, 1, -1, 2, 0], dtype=F64)[:, None] * 2.0**-52)
    same = _decomposition(change, 0.7 * row, 0.2 * row, torch.zeros(r, m, dtype=F64)).shares(method=method)
    for key, entry in same.items():
        assert all(math.isnan(v) for v in entry["interval"]), (key, entry)
        assert "rounding alone" in entry["why"] and math.isfinite(entry["share"])
    assert same["deterministic"]["share"] == pytest.approx(0.2, rel=1e-12)

    varied = row + 0.3 * torch.randn(r, m, generator=gen, dtype=F64)
    shares = _decomposition(varied, 0.7 * varied, 0.2 * row + 0.05 * torch.randn(r, m, generator=gen, dtype=F64),
                            torch.zeros(r, m, dtype=F64)).shares(method=method)
    assert shares["ito"]["share"] == 0.0 and all(math.isnan(v) for v in shares["ito"]["interval"])
    assert "equal" in shares["ito"]["why"]
    low, high = shares["deterministic"]["interval"]
    assert low < shares["deterministic"]["share"] < high and "why" not in shares["deterministic"]


# -- 4. the diffusion figures' mean over seeds ---------------------------------------------------------------------
def test_averaged_reports_say_how_many_seeds_each_cell_rests_on():
    """A cell missing in one of two seeds is that seed's neighbour's value alone: the record counts the seeds per
    cell and both figures' titles say how many cells rest on fewer than "mean of 2 seeds".

    Fails on the old code: no seeds_per_cell, and the titles said "mean of 2 seeds" of a one-seed cell."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.diffusion import average_reports, plot_noise_matrices, plot_overview

    def report(traffic):
        return {"matrices": {"traffic": traffic, "share": [[1.0, 0.0], [0.0, 1.0]], "kappa": [1.0, 1.0]},
                "config": {"probe_levels": [3, 40], "band": 1}, "tracked_steps": 2,
                "residual": {"relative_residual": 1e-6},
                "kernel": [], "locality_over_training": []}

    mean = average_reports([report([[0.6, 0.4], [0.2, 0.8]]), report([[0.8, 0.2], [None, 0.6]])])
    assert mean["seeds_per_cell"]["traffic"] == [[2, 2], [1, 2]] and mean["seeds_per_cell"]["share"] == [[2, 2], [2, 2]]
    assert np.allclose(mean["matrices"]["traffic"], [[0.7, 0.3], [0.2, 0.7]])
    title = plot_noise_matrices(mean)._suptitle.get_text()
    assert "mean of 2 seeds (1 cell of fewer" in title
    overview = plot_overview(mean)
    assert "mean of 2 seeds (1 cell of fewer" in overview.axes[0].get_title()
    plt.close("all")
    whole = average_reports([report([[0.6, 0.4], [0.2, 0.8]]), report([[0.8, 0.2], [0.4, 0.6]])])
    assert "of fewer" not in plot_noise_matrices(whole)._suptitle.get_text()
    plt.close("all")


# -- 3, 5, 6: figures ----------------------------------------------------------------------------------------------
def test_kernel_image_draws_nan_cells_grey_on_every_scale():
    """A NaN kernel entry is grey (no colour of the map) on the plain diverging scale (vmax <= 0) and on viridis, and a
    data-range low end (vmin=None) ignores it.

    Fails on the old code: those branches left NaN transparent (the white of k̂ = 0 on RdBu_r), and vmin=None
    took np.percentile of a kernel with a NaN: a NaN low end."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.arrays import NO_VALUE_COLOUR
    from genkernel.plotting.figures import _kernel_image
    from matplotlib.colors import to_rgba

    for kernel, options in ((np.array([[-0.5, -0.2], [np.nan, -1.0]]), dict(vmin=-1.0, vmax=0.0)),
                            (np.array([[0.9, 0.6], [np.nan, 1.0]]), dict(vmin=0.5)),
                            (np.array([[0.9, 0.6], [np.nan, 1.0]]), dict(vmin=None))):
        fig, ax = plt.subplots()
        image = _kernel_image(ax, kernel, "k", **options)
        assert tuple(image.cmap.get_bad()) == to_rgba(NO_VALUE_COLOUR), options
        assert math.isfinite(image.norm.vmin) and image.norm.vmin == pytest.approx(options["vmin"] or
                                                                                   np.nanpercentile(kernel, 1))
        plt.close(fig)


def test_window_statistics_legend_names_each_seeds_marker():
    """Several seeds are drawn with one marker each: the legend names them (seed ids when given).

    Fails on the old code: the legend held the three statistics only ("marker = seed" with no key)."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import SEED_MARKERS, plot_window_statistics

    def window(step, value):
        entry = {"difference": value, "interval": [value - 0.1, value + 0.1], "n": 4, "held": False}
        return {"steps": [step, step + 4], "statistics": {
            "geometry": {"traffic": {"interaction_minus_control": entry}},
            "spatial": {"traffic": {"interaction_minus_control": entry}},
            "geometry_minus_spatial": {"traffic": entry}}}

    windows = [[window(1, 0.2), window(6, 0.3)], [window(1, 0.1), window(6, 0.25)]]
    fig, ax = plt.subplots()
    plot_window_statistics(ax, windows, kind="traffic", seeds=[3, 7])
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[-2:] == ["seed 3", "seed 7"]
    assert [h.get_marker() for h in legend.legend_handles[-2:]] == list(SEED_MARKERS[:2])
    plt.close(fig)
    fig, ax = plt.subplots()
    plot_window_statistics(ax, windows, kind="traffic")
    assert [t.get_text() for t in ax.get_legend().get_texts()][-2:] == ["run 1", "run 2"]
    plt.close(fig)
    with pytest.raises(ValueError, match="one per seed"):
        plot_window_statistics(plt.subplots()[1], windows, seeds=[3])
    plt.close("all")


def test_report_names_a_kernel_record_alike_in_figure_and_table():
    """θ₀ recorded without a global step (tracked step 0) has one name in the report's kernel figure and its table.

    Fails on the old code: the figure said "initialization", the table "tracked step 0" (and no checkpoint_label)."""
    from genkernel.report import figures as fg

    entries = [{"tracked_step": 0, "global_step": None}, {"tracked_step": 3, "global_step": 30},
               {"tracked_step": None, "global_step": 0}, {"tracked_step": 0, "global_step": 12},
               {"tracked_step": 5, "global_step": None}]
    names = [fg.checkpoint_label(e) for e in entries]
    assert names == ["tracked step 0", "step 30", "initialization", "step 12", "tracked step 5"]
    summary = {"kernel": [{**e, "by_distance": [1.0, 0.5]} for e in entries]}
    figure = fg.kernel_figure(summary)
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == names


# -- 7. the GPU check ----------------------------------------------------------------------------------------------
def test_gpu_check_rotates_the_order_of_its_interleaved_steps():
    """The diffusion section's interleaved steps rotate their order each round, as the benchmarks' harness does: no
    trainer always runs first.

    Fails on the old code: bare always ran first, analyzed second."""
    from recipes.benchmarks import gpu_check

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def train(self, steps):
            calls.append(self.name)

    times = gpu_check._interleaved_steps(torch.device("cpu"), {"bare": Fake("bare"), "analyzed": Fake("analyzed")},
                                         4, deadline=float("inf"))
    assert [len(v) for v in times.values()] == [4, 4]
    assert calls == ["bare", "analyzed", "analyzed", "bare", "bare", "analyzed", "analyzed", "bare"]
