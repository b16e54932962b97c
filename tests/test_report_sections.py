"""The HTML page draws what the summary reads: the EMA weights' matrices and locality, the noise
level × class traffic of a conditional model, and a GAN's comparison grouping and EMA ledger. Before,
these numbers were only in the page's JSON section (docs/summaries.md did not list them either)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel.data import gaussian_ring, ring_mode_centers
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.report import figures as fg
from genkernel.report import render_report, summarize
from genkernel.report.html import _fmt

pytestmark = pytest.mark.usefixtures("one_thread")


def _ring(n: int, seed: int = 0) -> torch.Tensor:
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def _section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 4)
    return page[start:end]


@pytest.fixture(scope="module")
def conditional_diffusion():
    torch.manual_seed(0)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    analyzer = NoiseLevelAnalyzer(scheduler, _ring(16, 1), num_bins=4, num_probes=8, kernel_points=2, progress=False,
                                  num_classes=3)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    DDPMTrainer(model, scheduler, _ring(64), batch_size=16, callbacks=[analyzer], progress=False, ema=average,
                labels=torch.arange(64) % 3).train(3)
    return analyzer


def test_the_page_draws_the_ema_weights_and_the_level_class_traffic(conditional_diffusion):
    state = conditional_diffusion.state_dict()
    (summary,) = summarize(state)["states"].values()
    page = render_report(state, animate=False)
    ema = _section(page, "The EMA weights")
    assert ema.count("<img") == 1  # the EMA's own noise-level matrices
    for kind in ("traffic", "share"):
        assert _fmt(summary["ema"]["locality"][kind]["difference"]) in ema
    assert _fmt(summary["ema"]["start_share_mean"]) in ema
    assert _section(page, "Noise level × class").count("<img") == 1


def test_the_level_class_figure_draws_the_summarys_matrix(conditional_diffusion):
    (summary,) = summarize(conditional_diffusion.state_dict())["states"].values()
    level_class = summary["level_class_traffic"]
    figure = fg.level_class_figure(level_class, summary["settings"]["probe_levels"], summary["settings"]["num_bins"])
    drawn = np.asarray(figure.axes[0].images[0].get_array(), dtype=float)
    expected = np.array([[np.nan if v is None else v for v in row] for row in level_class["matrix"]])
    assert drawn.shape == (len(summary["settings"]["probe_levels"]), 4 * 3)
    np.testing.assert_array_equal(drawn, expected)
    # a line between bins, none inside a bin's classes
    assert sorted(line.get_xdata()[0] for line in figure.axes[0].lines) == [2.5, 5.5, 8.5]


def test_the_page_draws_a_gans_comparison_grouping_and_its_ema_ledger():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    data, _ = gaussian_ring(256, radius=2.0, std=0.05, seed=0)
    G, D = MLPGenerator(2, 2, hidden=16), MLPDiscriminator(2, hidden=16)
    analyzer = GANKernelAnalyzer(G, D, torch.randn(12, 2, generator=torch.Generator().manual_seed(1)), grouping="mode",
                                 comparison="nearest_mode", mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
                                 num_groups=8, controls=2, window=3, eval_every=1, track_discriminator=False)
    GANTrainer(G, D, data, batch_size=32, callbacks=[analyzer], ema=EMAModel(G.parameters(), decay=0.9)).train(4)
    state = analyzer.state_dict()
    (summary,) = summarize(state)["states"].values()
    page = render_report(state, animate=False)
    section = _section(page, "The comparison grouping")
    assert section.count("<img") == 1
    spatial = summary["coupling_whole_run"]["spatial"]
    assert _fmt(spatial["traffic_interaction_minus_control"]["difference"]) in section
    for kind, result in summary["coupling_whole_run"]["geometry_minus_spatial"].items():
        assert f"{kind}: geometry − comparison" in section and _fmt(result["estimate"]) in section
    ema = _section(page, "The EMA generator's ledger")
    assert f"<td>steps</td><td>{summary['ema']['ledger']['steps']}</td>" in ema
