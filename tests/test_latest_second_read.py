"""A second read of the latest changes (mixed-dtype tolerance, clustered locality interval, GAN coverage radius,
zero-terminal-SNR schedulers): each test pins a fault of the code as it stood after them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan.metrics import coverage_radius, mode_coverage
from genkernel.report import summarize
from genkernel.supervised import mse_loss


# -- GAN mode coverage: the radius beyond ~8.6 sigmas ---------------------------------------------------------------
def test_coverage_radius_stays_finite_where_the_share_rounds_to_one():
    """At sigmas = 9 the share 1 - exp(-40.5) rounds to 1.0 and chi2.ppf(1.0) is inf: in any dimension but 2 every
    sample counted as on every mode (before: quality_share 1.0 for samples 1000 std from the only mode, in 3-D; in
    2-D, 0.0). The radius is chi2.isf of the tail: in 1-D the root of sf = erfc(r / sqrt 2) = exp(-sigmas^2/2)."""
    assert math.isfinite(coverage_radius(1.0, 9.0, 3))
    far = torch.full((100, 3), 1000.0, dtype=torch.float64)
    assert mode_coverage(far, torch.zeros(1, 3), 1.0, sigmas=9.0)["quality_share"] == 0.0
    r = coverage_radius(1.0, 9.0, 1)
    assert math.log(math.erfc(r / math.sqrt(2))) == pytest.approx(-40.5, rel=1e-9)
    assert coverage_radius(1.0, 9.0, 2) == 9.0  # 2-D: sigmas*std exactly, as before


# -- the tracker's tolerance: a frozen parameter the forward never reads ---------------------------------------------
class Float64WithSpare(nn.Module):
    """A float64 model that also holds a frozen float32 layer its forward never reads (a spare head)."""

    def __init__(self, spare: bool):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 8).double(), nn.Linear(8, 2).double()
        if spare:
            self.spare = nn.Linear(4, 4).float().requires_grad_(False)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_an_unused_frozen_float32_layer_does_not_loosen_a_float64_models_checks():
    """A loop whose backward weighs the examples 3e-6 otherwise than observe() was told is refused by a float64
    model's 1e-10 checks (the model without the spare layer: the control). Before: with a frozen float32 layer the
    forward never reads, rtol was 1e-5 and the same step was accepted, its ledger off by that weighting, silently."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64)
    w = 1 + 3e-6 * torch.randn(12, generator=g, dtype=torch.float64)
    for spare in (False, True):
        model = Float64WithSpare(spare)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        tracker = PathKernelTracker(model, opt, mse_loss, x[:4], num_groups=3)
        assert tracker.rtol == 1e-10, spare
        losses = mse_loss(model(x), y)
        tracker.observe(losses, torch.arange(12) % 3)
        (losses * w).mean().backward()
        with pytest.raises(LedgerCheckError, match="do not add up to the real gradient"):
            opt.step()


# -- the diffusion locality interval: probe levels listed twice -----------------------------------------------------
def test_the_locality_interval_of_repeated_probe_levels_is_the_summarys():
    """probe_levels=[50, 50, 10, 80]: the analyzer clustered by its level index (4 clusters, two of them t=50) and the
    saved-state summary by distinct level (3), so locality() and the summary gave other intervals and differences of
    the same ledgers (before: n 4 against 3, traffic difference 0.0376 against 0.0501; before the clustering both
    took the 6 probes alike)."""
    torch.manual_seed(0)
    angle = torch.rand(64, dtype=torch.float64) * 2 * math.pi
    data = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    scheduler = make_scheduler(100)
    model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=4, num_probes=6, snapshot_every=2, kernel_points=2,
                                  progress=False, probe_levels=[50, 50, 10, 80], band=1)
    DDPMTrainer(model, scheduler, data, batch_size=8, callbacks=[analyzer], progress=False).train(3)
    mine = analyzer.locality()
    (summary,) = summarize(analyzer)["states"].values()
    for key in ("traffic", "share"):
        ours, theirs = mine[key], summary["locality"][key]
        assert ours["n"] == theirs["n"] == 3, key
        assert ours["difference"] == pytest.approx(theirs["difference"], rel=1e-9, abs=1e-12), key
        assert ours["interval"] == pytest.approx(theirs["interval"], rel=1e-9, abs=1e-12), key


# -- zero-terminal-SNR samplers: read as DDPMScheduler reads their config --------------------------------------------
@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_a_zero_terminal_snr_sampler_shares_ddpms_noise_schedule(name):
    """vp_alphas_cumprod reads these schedulers' 2**-24 at T-1 as DDPMScheduler's 0 (the bins, the inputs), but
    same_noise_schedule compared the raw tables: make_sampler refused the class on a DDPM-trained zero-SNR run, and a
    run trained with it refused its own default DDPMScheduler sampler (before: ValueError 'does not use the training
    scheduler's noise schedule' both ways)."""
    import diffusers
    from diffusers import DDPMScheduler

    from genkernel.diffusion.trainer import make_sampler

    cls = getattr(diffusers, name)
    ddpm = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert type(make_sampler(ddpm, cls)) is cls
    other = cls.from_config(ddpm.config)
    assert float(other.alphas_cumprod[-1]) == 2.0**-24  # (its own, for its sampling)
    assert type(make_sampler(other)) is DDPMScheduler
