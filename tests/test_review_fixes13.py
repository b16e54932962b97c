"""Review fixes: probe-group checks of the GAN interaction statistic, fractional-timestep samplers'
kept states, a locality band that covers every bin, per-parameter-group learning rates in the
logs, one logged point per (name, step) at the end of training, and 64-bit sketch seeds."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch import nn

from genkernel.core.engine.projections import ParameterProjection, project_parameter, projection_block
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler, reverse_sample, tiny_unet
from genkernel.gan.metrics import own_minus_others
from genkernel.logging import LoggingCallback

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def ring(n, seed=0):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


class Record:
    def __init__(self):
        self.rows = []

    def __call__(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def points(self):
        return collections.Counter((key, step) for step, metrics in self.rows for key in metrics)


# ------------------------------------------------------------------------------------------
# 1. own_minus_others: probe groups checked against the shares' columns
# ------------------------------------------------------------------------------------------
def test_own_minus_others_refuses_probe_groups_outside_the_shares_columns():
    shares = torch.rand(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    good = torch.tensor([0, 1, 2, 2, 0, 1])
    reference = own_minus_others(shares, good, 3)
    # by hand: own share minus the mean over the other occupied probe groups of their mean share from column a
    matrix = torch.stack([shares[good == g].mean(0) for g in range(3)])  # [probe group, source group]
    by_hand = torch.stack([shares[m, good[m]] - torch.stack([matrix[b, good[m]] for b in range(3) if b != good[m]]).mean()
                           for m in range(6)])
    torch.testing.assert_close(reference, by_hand, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"group ids in \[0, 3\).*from 0 to 3"):
        own_minus_others(shares, torch.tensor([0, 1, 2, 3, 0, 1]), 3)  # was a bare IndexError
    with pytest.raises(ValueError, match=r"from -1 to 2"):
        own_minus_others(shares, torch.tensor([0, 1, -1, 2, 0, 1]), 3)  # was a RuntimeError from gather
    with pytest.raises(ValueError, match="3 group columns but num_groups=4"):
        own_minus_others(shares, good, 4)  # was a silent number (the extra group read as empty)
    with pytest.raises(ValueError, match="3 group columns but num_groups=2"):
        own_minus_others(shares, torch.tensor([0, 1, 1, 0, 0, 1]), 2)  # was a silent number (column 2 ignored)
    with pytest.raises(ValueError, match=r"probe_groups must be \[M\] with one group id per row \(6\)"):
        own_minus_others(shares, good[:5], 3)
    with pytest.raises(ValueError, match="integer group ids"):
        own_minus_others(shares, good.to(F64), 3)


# ------------------------------------------------------------------------------------------
# 2. reverse_sample: a kept state is at the integer timestep of its key, or refused
# ------------------------------------------------------------------------------------------
class Seen(nn.Module):
    """The denoiser, recording every (state, timestep) the sampler evaluates it at."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.net(x, t).sample


def _euler(scheduler, spacing):
    from diffusers import EulerDiscreteScheduler

    config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}  # no defaults list
    sampler = EulerDiscreteScheduler.from_config({**config, "timestep_spacing": spacing})
    assert sampler.config.timestep_spacing == spacing
    return sampler


def test_a_fractional_timestep_sampler_keeps_only_states_at_integer_timesteps():
    torch.manual_seed(0)
    model = Seen(tiny_unet(8, 1, channels=(8, 8), attention=False, norm_num_groups=4).double())
    scheduler = make_scheduler(50)
    euler = _euler(scheduler, "linspace")  # timesteps 49, 39.2, 29.4, 19.6, 9.8, 0
    # keep=[20] snapped to 19.6, kept under the key 19: kernels at (state, 19) were not the model the sampler ran
    with pytest.raises(ValueError, match=r"fractional timestep 19\.6.*DDPMScheduler or DDIMScheduler"):
        reverse_sample(model, scheduler, (2, 1, 8, 8), num_inference_steps=6, sampler=euler, keep=[20])
    from genkernel.diffusion import retrieval_attribution  # its stages are kept states: refused the same way

    with pytest.raises(ValueError, match=r"stages\) asks for t=20.*fractional timestep 19\.6"):
        retrieval_attribution(model, scheduler, torch.randn(3, 1, 8, 8, dtype=F64), num_samples=2, stages=[20],
                              num_inference_steps=6, sampler=euler, top_k=1)
    # its integer-valued steps are kept exactly: the state the model got, at the key's own timestep
    model.calls.clear()
    _, kept = reverse_sample(model, scheduler, (2, 1, 8, 8), num_inference_steps=6, sampler=euler, keep=[49, 0])
    assert sorted(kept) == [0, 49]
    for key, state in kept.items():
        (t,) = [t for x, t in model.calls if torch.equal(x, state)]
        assert t.tolist() == [float(key)] * 2
    # "leading" spacing (integer timesteps) keeps every step it is asked for, as before
    model.calls.clear()
    _, kept = reverse_sample(model, scheduler, (2, 1, 8, 8), num_inference_steps=6, sampler=_euler(scheduler, "leading"),
                             keep=[40, 24])
    for key, state in kept.items():
        (t,) = [t for x, t in model.calls if torch.equal(x, state)]
        assert t.tolist() == [float(key)] * 2


# ------------------------------------------------------------------------------------------
# 3. a locality band that covers every bin is refused when the analyzer is built
# ------------------------------------------------------------------------------------------
def test_a_band_covering_every_bin_is_refused_at_construction():
    scheduler = make_scheduler(100)
    for bins, band in ((3, 2), (3, 7), (4, 3)):
        with pytest.raises(ValueError, match=f"band={band} covers all num_bins={bins} bins"):
            NoiseLevelAnalyzer(scheduler, ring(8), num_bins=bins, num_probes=4, kernel_points=2, band=band)
    NoiseLevelAnalyzer(scheduler, ring(8), num_bins=3, num_probes=4, kernel_points=2, band=1)  # fine
    # with 2 bins every band but 0 covers both: the analyzer is kept (its other measures), its
    # locality flagged: measured = control = 1
    torch.manual_seed(0)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(8), num_bins=2, num_probes=4, kernel_points=2, snapshot_every=0,
                                  progress=False)
    DDPMTrainer(MLPDenoiser(hidden=8, depth=2, time_dim=4).double(), scheduler, ring(16), batch_size=8, progress=False,
                callbacks=[analyzer]).train(1)
    traffic = analyzer.locality()["traffic"]
    assert traffic["measured"] == pytest.approx(1.0) and traffic["control"] == pytest.approx(1.0)
    assert traffic["held"] is False and "holds all 2 bins" in traffic["why"]


# ------------------------------------------------------------------------------------------
# 4. and 5. logging: every parameter group's rate; one point per (name, step)
# ------------------------------------------------------------------------------------------
def test_every_parameter_groups_learning_rate_is_logged():
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=8, depth=2, time_dim=4).double()
    params = list(model.parameters())
    optimizer = torch.optim.Adam([{"params": params[:2], "lr": 1e-3}, {"params": params[2:], "lr": 5e-3}])
    log = Record()
    DDPMTrainer(model, make_scheduler(100), ring(16), batch_size=8, optimizer=optimizer, log=log, progress=False).train(2)
    for _, metrics in log.rows:
        assert metrics["lr"] == 1e-3 and metrics["lr/group1"] == 5e-3
    single = Record()
    DDPMTrainer(MLPDenoiser(hidden=8, depth=2, time_dim=4).double(), make_scheduler(100), ring(16), batch_size=8,
                lr=2e-3, log=single, progress=False).train(1)
    assert [m for _, m in single.rows if "lr" in m][0].keys() == {"loss", "lr"}  # one group: the key as before
    from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

    generator = MLPGenerator(latent_dim=2, hidden=8, out_dim=2)
    g_params = list(generator.parameters())
    g_optimizer = torch.optim.Adam([{"params": g_params[:2], "lr": 1e-3}, {"params": g_params[2:], "lr": 4e-3}])
    gan = Record()
    GANTrainer(generator, MLPDiscriminator(in_dim=2, hidden=8), torch.randn(32, 2), batch_size=16, g_optimizer=g_optimizer,
               log=gan).train(1)
    rates = {key: value for _, metrics in gan.rows for key, value in metrics.items() if key.startswith("lr")}
    assert rates == {"lr/generator": 1e-3, "lr/generator/group1": 4e-3, "lr/discriminator": pytest.approx(rates["lr/discriminator"])}
    direct = Record()
    LoggingCallback(direct).log_step(3, lr=[0.1, 0.2, 0.3], phase="generator")
    assert direct.rows == [(3, {"lr/generator": 0.1, "lr/generator/group1": 0.2, "lr/generator/group2": 0.3})]


def test_the_analysis_is_written_once_per_step_when_training_ends():
    scheduler = make_scheduler(100)
    for track_steps in (None, (1, 2)):  # train end at an analysis step; a tracked window's last step
        torch.manual_seed(0)
        model = MLPDenoiser(hidden=8, depth=2, time_dim=4).double()
        analyzer = NoiseLevelAnalyzer(scheduler, ring(8), num_bins=3, num_probes=6, snapshot_every=0, kernel_points=2,
                                      progress=False, track_steps=track_steps)
        log = Record()
        trainer = DDPMTrainer(model, scheduler, ring(32), batch_size=8, progress=False,
                              callbacks=[analyzer, LoggingCallback(log, analyzer=analyzer, every=1, analysis_every=2)])
        trainer.train(4)
        trainer.train(0)  # no step: the end of training again at the same step
        points = log.points()
        assert max(points.values()) == 1, {k: n for k, n in points.items() if n > 1}
        analysed = sorted(step for (key, step) in points if key == "ledger/steps")
        assert analysed == ([2, 4] if track_steps is None else [2])


# ------------------------------------------------------------------------------------------
# 6. sketch seeds: all 64 bits count; seeds in [0, 2**32) draw the very R they always did
# ------------------------------------------------------------------------------------------
def _old_block(seed, i, j, k, columns, kind):
    value = (seed * 1_000_003 + i) * 1_000_033 + j  # the generator seed as before, modulo 2**64 past its range
    generator = torch.Generator().manual_seed(value if -(2**63) <= value < 2**64 else value % 2**64)
    if kind == "gaussian":
        s = torch.randn((columns, k), generator=generator, dtype=F64)
    else:
        s = torch.randint(0, 2, (columns, k), generator=generator).to(F64) * 2 - 1
    return s / math.sqrt(k)


def test_sketch_seeds_differing_by_a_multiple_of_2_to_the_32_give_different_projections():
    for kind in ("rademacher", "gaussian"):
        for seed in (0, 5, 4321, 2**32 - 1):  # today's R, bit for bit
            assert torch.equal(projection_block(seed, 1, 2, 4, 50, kind, F64), _old_block(seed, 1, 2, 4, 50, kind))
        for a, b in ((5, 5 + 2**32), (0, 2**32), (-1, 2**32 - 1), (20240101, 20240101 + 3 * 2**32), (1, 2**32 + 1)):
            ra, rb = projection_block(a, 1, 0, 4, 256, kind, F64), projection_block(b, 1, 0, 4, 256, kind, F64)
            assert not torch.equal(ra, rb)  # were equal: torch's generator reads 32 bits of its seed
            correlation = (ra * rb).sum(0) / (ra.norm(dim=0) * rb.norm(dim=0))  # ~ 1/16 apart when independent
            assert float(correlation.abs().max()) < 0.25  # and not correlated: independent columns
            if kind == "rademacher":
                assert set((rb * 2).abs().unique().tolist()) == {1.0}  # still ±1/sqrt(k)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert not torch.equal(project_parameter(x, 0, 8, seed=7), project_parameter(x, 0, 8, seed=7 + 2**40))
    # the Kronecker factors of a matrix parameter
    shapes = {"w": (6, 5), "b": (6,)}
    same = [ParameterProjection(shapes, 4, seed=s).factors("w", F64) for s in (3, 3)]
    assert all(torch.equal(u, v) for u, v in zip(*same))
    far = [ParameterProjection(shapes, 4, seed=s).factors("w", F64) for s in (3, 3 + 2**32)]
    assert not any(torch.equal(u, v) for u, v in zip(*far))
    # any int: seeds past 64 bits and negative ones differ from the seed 2**32 (or 2**64) away
    for a, b in ((2**70, 0), (2**70, 2**70 + 2**64), (-(2**40), 0), (-1, 2**64 - 1), (-(2**100), 2**100)):
        assert not torch.equal(project_parameter(x, 0, 8, seed=a), project_parameter(x, 0, 8, seed=b))
