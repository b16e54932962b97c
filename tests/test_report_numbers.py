"""What the report pages, the text summary and the figures show equals what the numbers say:
claim numbers not rounded onto their limits, interval units named as computed, whole-number row
ticks on numbered rows, a run without controls shows its own share, kernel colours symmetric in |k̂|."""

from __future__ import annotations

import html
import math
import re

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def diffusion_state():
    from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    angle = torch.rand(64, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=8, snapshot_every=3, kernel_points=2,
                                  progress=False)
    DDPMTrainer(MLPDenoiser(hidden=8, depth=2, time_dim=8).double(), scheduler, data, batch_size=16,
                callbacks=[analyzer], progress=False).train(6)
    return analyzer.state_dict(), analyzer.report()


@pytest.fixture(scope="module")
def gan_state():
    from genkernel.data.toy2d import gaussian_ring
    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    data, _ = gaussian_ring(128, std=0.05)
    G, D = MLPGenerator(2, 2, hidden=8), MLPDiscriminator(2, hidden=8)
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(12, 2), num_groups=3, window=4, eval_every=2)
    GANTrainer(G, D, data, latent_dim=2, batch_size=16, callbacks=[analyzer]).train(4)
    return analyzer.state_dict()


def test_the_text_summary_never_rounds_a_claims_number_onto_its_limit():
    """format_summary showed a mean cosine of 0.98996 as "0.99" beside "≥ 0.99 … not held" and a residual
    of 0.0010004 as "0.001" beside "below 0.001 … not held" (the HTML page shows 0.98996 and 0.0010004)."""
    from genkernel.report import format_summary

    cases = [(0.98996, 0.99), (0.990004, 0.99), (0.0010004, 1e-3), (0.00099951, 1e-3), (0.49999, 0.5)]
    claims = [{"statement": f"at or above {limit}", "held": value >= limit, "value": value,
               "interval": [value - 1e-7, value + 1e-7]} for value, limit in cases]
    summary = {"source": "x", "states": {"k": {"kind": "ledger", "format": "genkernel.PathKernelLedger/1",
                                                "claims": claims, "notes": []}}}
    lines = [line for line in format_summary(summary).splitlines() if "claim [" in line]
    assert len(lines) == len(claims)
    for line, claim in zip(lines, claims):
        limit = float(claim["statement"].split()[-1])
        value, low, high = (float(x) for x in re.search(r": (\S+) \[(\S+), (\S+)\]$", line).groups())
        assert (value >= limit) == claim["held"] and value == pytest.approx(claim["value"], rel=1e-3)
        assert (low >= limit) == (claim["interval"][0] >= limit) and (high >= limit) == (claim["interval"][1] >= limit)


def test_locality_intervals_are_named_by_the_units_they_are_over(diffusion_state):
    """The overall interval is over probe levels (clustered; n counts levels), a level's over the control
    partitions: the page's caption and the per-level panel said "over probes"."""
    from genkernel.plotting.diffusion import plot_locality_over_training
    from genkernel.report import render_report, summarize

    state, report = diffusion_state
    (summary,) = summarize(state)["states"].values()
    loc = summary["locality"]
    assert loc["traffic"]["n"] == len(summary["settings"]["probe_levels"]) < summary["settings"]["num_probes"]
    assert {row["traffic"]["units"] for row in loc["per_level"]} == {"control partitions"}
    caption = re.search(r"Share of each probe's traffic[^<]*", html.unescape(render_report(state, animate=False))).group(0)
    assert "over the probe levels" in caption and "control partitions" in caption and "over probes" not in caption
    fig = plot_locality_over_training(report)
    assert "control partitions" in fig.axes[3].get_title() and "its probes" not in fig.axes[3].get_title()
    matplotlib.pyplot.close(fig)


def _visible_ticks(ax, axis):
    low, high = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
    return [t for t in ticks if low <= t <= high]


def test_numbered_rows_get_whole_number_ticks(gan_state):
    """The coupling matrices' "probe's group" axis and the GIF's "probe level" axis read −0.5, 0.0, 0.5, …:
    rows that do not exist."""
    from unittest import mock

    import matplotlib.figure

    from genkernel.report import figures as fg
    from genkernel.report import summarize

    (summary,) = summarize(gan_state)["states"].values()
    fig = fg.coupling_figure(summary["coupling_whole_run"])
    fig.draw_without_rendering()
    for ax in [a for a in fig.axes if a.images]:
        rows = ax.images[0].get_array().shape[0]
        ticks = _visible_ticks(ax, "y")
        assert ticks and all(float(t).is_integer() and 0 <= t < rows for t in ticks), ticks
    drawn = {}
    original = matplotlib.figure.Figure.draw_without_rendering

    def keep(self):
        original(self)
        drawn["fig"] = self

    frames = [{"label": f"frame {i}", "m": np.arange(12.0).reshape(4, 3) * (i + 1)} for i in range(2)]
    with mock.patch.object(matplotlib.figure.Figure, "draw_without_rendering", keep):
        assert fg.matrix_animation(frames, keys=[("m", "m", False)], xlabel="training bin", ylabel="probe level")
    ax = drawn["fig"].axes[0]
    for axis, size in (("y", 4), ("x", 3)):
        ticks = _visible_ticks(ax, axis)
        assert ticks and all(float(t).is_integer() and 0 <= t < size for t in ticks), (axis, ticks)


def test_a_gan_page_without_controls_shows_the_own_share(gan_state):
    """Without control partitions the summary's own-group shares were in the text summary only: the page's
    coupling section showed κ and "control partitions 0", no number of the coupling itself."""
    import copy

    from genkernel.report import render_report, summarize

    state = copy.deepcopy(gan_state)
    ledgers = state["g_tracker"]["ledgers"]
    state["g_tracker"]["ledgers"] = {k: v for k, v in ledgers.items() if not k.startswith("control_")}
    state["config"]["controls"] = 0
    (summary,) = summarize(state)["states"].values()
    coupling = summary["coupling_whole_run"]
    section = render_report(state, animate=False).split("Coupling over the whole run")[1].split("<h2>")[0]
    cells = [html.unescape(c) for c in re.findall(r"<td>([^<]*)</td>", section)]
    for key in ("traffic_own", "net_own"):
        assert f"{coupling[key]:.3g}" in cells, (key, cells)


def test_kernel_colours_are_as_deep_for_minus_k_as_for_plus_k():
    """On a shared range [−0.03, 1] the blue half was stretched over [−0.03, 0]: k̂ = −0.03 was drawn as
    deep a blue as k̂ = 1 a red. A colour's distance from white must depend on |k̂| alone."""
    from genkernel.plotting.figures import plot_class_kernels

    rng = np.random.default_rng(0)
    kernel = 0.6 + 0.3 * rng.random((20, 20))
    kernel[:2, 10:] = -0.03  # 10 % of the entries: the shared 1st-percentile low end is −0.03
    fig = plot_class_kernels(kernel, kernel, 10, dataset="toy", gaps={"init": 0.0, "final": 0.0})
    image = next(im for ax in fig.axes for im in ax.get_images())
    assert image.norm.vmin == pytest.approx(-0.03) and float(image.norm(0.0)) == pytest.approx(0.5)

    def colour(value):
        return np.asarray(image.cmap(image.norm(np.array([value]))))[0, :3]

    def depth(value):  # distance from the map's centre colour (RdBu's near-white)
        return float(np.abs(colour(value) - colour(0.0)).sum())

    for v in (0.01, 0.02, 0.03):  # the colour map's 256 levels: equal to within one level's step
        assert depth(-v) == pytest.approx(depth(v), abs=0.05)
    assert depth(-0.03) < 0.25 * depth(1.0)
    matplotlib.pyplot.close(fig)


def test_the_overview_draws_a_net_share_claim_without_a_value(diffusion_state):
    """A net-share claim whose value is None (every level NaN; the claims write NaN as None) made plot_overview
    raise TypeError (formatting None with :.2g)."""
    from genkernel.plotting.diffusion import plot_overview

    _, report = diffusion_state
    fig = plot_overview(report, None, claims={"share_locality": {"value": None, "interval": [None, None],
                                                                 "measured": True, "held": False}})
    assert any("net share − control n/a" in ax.get_title() for ax in fig.axes)
    matplotlib.pyplot.close(fig)
