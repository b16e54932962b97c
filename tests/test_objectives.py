"""Training objectives and model configurations against diffusers' definitions, explicit formulas and the papers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.diffusion.models import BinnedDenoiser, MLPDenoiser
from genkernel.diffusion.objectives import (
    PREDICTION_TYPES,
    NoiseBins,
    bin_centers,
    bin_edges,
    diffusion_loss,
    loss_weight,
    make_scheduler,
    noisy_input,
    timestep_bins,
    training_target,
)
from genkernel.gan.losses import (
    PENALTY,
    REAL,
    DiscriminatorLoss,
    DiscriminatorObjective,
    GeneratorLoss,
    discriminator_losses,
    generator_losses,
)
from genkernel.gan.models import MLPDiscriminator

F64 = torch.float64


def _batch(n=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)


# -- the DDPM objective ------------------------------------------------------------------------

@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_noisy_input_and_target_match_the_formulas_and_what_the_step_inverts(beta_schedule, prediction_type):
    scheduler = make_scheduler(1000, beta_schedule, prediction_type)
    clean, noise = _batch()
    t = torch.tensor([0, 1, 500, 998, 999])
    a = scheduler.alphas_cumprod.to(F64)[t][:, None]
    z = noisy_input(scheduler, clean, noise, t)
    assert torch.allclose(z, a.sqrt() * clean + (1 - a).sqrt() * noise, rtol=1e-6, atol=1e-6)
    y = training_target(scheduler, clean, noise, t)
    expected = {"epsilon": noise, "sample": clean, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * clean}
    assert torch.allclose(y, expected[prediction_type], rtol=1e-6, atol=1e-6)
    # a model that outputs the target exactly makes the scheduler's step recover x0 (t < 990: at the last levels
    # sqrt(ᾱ_t) < 0.01 amplifies the float32 schedule's rounding in the epsilon inversion)
    scheduler.set_timesteps(1000)
    for i in range(3):
        out = scheduler.step(y[i:i + 1], int(t[i]), z[i:i + 1])
        assert torch.allclose(out.pred_original_sample, clean[i:i + 1], atol=1e-5)


@pytest.mark.parametrize("bad", [torch.tensor([-1, 0, 1, 2, 3]), torch.tensor([1000, 0, 1, 2, 3])])
def test_noisy_input_and_target_refuse_timesteps_outside_the_schedule(bad):
    # t = -1 read ᾱ_{T-1} (diffusers indexes alphas_cumprod with it): a silently wrong input
    scheduler = make_scheduler(1000, prediction_type="v_prediction")
    clean, noise = _batch()
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        noisy_input(scheduler, clean, noise, bad)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        training_target(scheduler, clean, noise, bad)


def test_noisy_input_refuses_float_timesteps_and_a_timestep_count_other_than_the_batch():
    scheduler = make_scheduler(1000)
    clean, noise = _batch(n=1)
    with pytest.raises(TypeError, match="integer timesteps"):
        noisy_input(scheduler, clean, noise, torch.tensor([1.5]))
    # t of length 3 broadcast against a batch of 1 and returned three rows
    with pytest.raises(ValueError, match="one timestep per example"):
        noisy_input(scheduler, clean, noise, torch.tensor([1, 2, 3]))


def test_the_loss_and_its_weight_are_the_per_example_mean_over_values():
    outputs, targets = _batch(4, 6)
    outputs = outputs.requires_grad_()
    loss = diffusion_loss(outputs.reshape(4, 2, 3), targets.reshape(4, 2, 3))
    assert loss.shape == (4,)
    assert torch.allclose(loss, ((outputs - targets) ** 2).sum(dim=1) / 6)
    (grad,) = torch.autograd.grad(loss.sum(), outputs)
    assert torch.allclose(loss_weight(outputs, targets), grad)


@pytest.mark.parametrize("target_shape", [(4,), (4, 1), (8, 3)])
def test_the_loss_refuses_targets_that_would_broadcast_or_split_across_examples(target_shape):
    # a target [B] broadcast against outputs [B, D] and gave a loss with no error
    outputs = torch.randn(4, 6)
    targets = torch.randn(target_shape)
    with pytest.raises(ValueError, match="same number of values per example"):
        diffusion_loss(outputs, targets)
    with pytest.raises(ValueError, match="same number of values per example"):
        loss_weight(outputs, targets)


# -- bins ------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,num_bins", [(1000, 10), (1000, 7), (10, 3), (7, 7), (100, 1)])
def test_equal_width_bins_put_every_timestep_in_exactly_one_bin(total, num_bins):
    t = torch.arange(total)
    edges, bins = bin_edges(num_bins, total), timestep_bins(t, num_bins, total)
    assert edges[0] == 0 and edges[-1] == total and bool((edges[1:] > edges[:-1]).all())
    inside = (t[:, None] >= edges[None, :-1]) & (t[:, None] < edges[None, 1:])  # [T, G]
    assert bool((inside.sum(dim=1) == 1).all()) and torch.equal(inside.long().argmax(dim=1), bins)
    assert torch.equal(bins, torch.div(t * num_bins, total, rounding_mode="floor"))  # floor(t G / T), as documented
    assert torch.equal(timestep_bins(bin_centers(num_bins, total), num_bins, total), torch.arange(num_bins))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_log_snr_bins_cover_every_timestep_once(beta_schedule):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    bins = NoiseBins(scheduler, 10)
    t = torch.arange(1000)
    edges = bins.edges
    assert edges[0] == 0 and edges[-1] == 1000 and bool((edges[1:] > edges[:-1]).all())
    inside = (t[:, None] >= edges[None, :-1]) & (t[:, None] < edges[None, 1:])
    assert torch.equal(inside.long().argmax(dim=1), bins(t)) and bool((inside.sum(dim=1) == 1).all())
    a = scheduler.alphas_cumprod.to(F64)
    snr = torch.log(a / (1 - a))
    assert torch.allclose(bins.log_snr, torch.cat([snr[edges[:-1]], snr[-1:]]))
    assert torch.equal(bins(bins.centers), torch.arange(10))


def test_log_snr_bins_of_a_zero_terminal_snr_schedule_span_its_finite_log_snr():
    # rescale_betas_zero_snr=True: ᾱ_{T-1} = 0, log SNR -inf there. Spread over the bins, the -inf put
    # timesteps 0..990 of 1000 in bin 0 and one timestep in each other bin.
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    a = scheduler.alphas_cumprod.to(F64)
    snr = torch.log(a / (1 - a))
    width = float(snr[0] - snr[-2]) / 10  # the finite range: t = 0 .. T-2
    expected = ((snr[0] - snr) / width).floor().clamp(max=9).long()  # -inf (t = T-1) -> the last bin
    bins = NoiseBins(scheduler, 10)
    assert torch.equal(bins(torch.arange(1000)), expected)
    assert torch.equal(bins(bins.centers), torch.arange(10))


def test_bins_refuse_timesteps_outside_the_schedule_instead_of_clamping():
    # t = -1 went to bin 0 and t = 1000 to bin 9, float t was truncated
    scheduler = make_scheduler(1000)
    for bins in (NoiseBins(scheduler, 10), lambda t: timestep_bins(t, 10, 1000)):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
            bins(torch.tensor([-1, 5]))
        with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
            bins(torch.tensor([1000]))
        with pytest.raises(TypeError, match="integer timesteps"):
            bins(torch.tensor([1.7]))
    with pytest.raises(ValueError, match="num_bins must be an int"):
        bin_edges(0, 10)
    with pytest.raises(ValueError, match="num_bins must be an int"):
        bin_edges(20, 10)


# -- denoisers -------------------------------------------------------------------------------

def test_binned_denoiser_refuses_edges_that_do_not_partition_the_timesteps():
    for edges in ([0, 30, 20, 60, 100], [5, 30, 50, 70, 100], [0, 25, 50, 75, 90]):
        with pytest.raises(ValueError, match="edges must increase strictly from 0 to num_train_timesteps=100"):
            BinnedDenoiser(4, 100, edges=torch.tensor(edges), hidden=4, depth=1)


def test_denoisers_refuse_float_timesteps_and_an_odd_time_embedding():
    torch.manual_seed(0)
    model = MLPDenoiser(2, hidden=8, depth=1).to(F64)
    x = torch.randn(3, 2, dtype=F64)
    assert model(x, torch.tensor([0, 1, 999])).dtype == F64
    with pytest.raises(TypeError, match="integer timesteps"):
        model(x, torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(TypeError, match="timesteps must be integers"):
        model(x, 2.5)
    with pytest.raises(ValueError, match="time_dim must be an even number"):
        MLPDenoiser(2, time_dim=7)


def test_the_ddpm_cifar10_unet_computes_the_original_models_function():
    from genkernel.diffusion.configs import ddpm_cifar10_unet

    model = ddpm_cifar10_unet(seed=0)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # Ho et al. 2020: 35.7M
    # the timestep embedding of the original code: [sin | cos] of t · exp(−log(10000) i / (half − 1))
    t = torch.tensor([0, 1, 17, 999])
    half = 64
    args = t[:, None].double() * torch.exp(-math.log(10000) * torch.arange(half, dtype=F64) / (half - 1))
    expected = torch.cat([torch.sin(args), torch.cos(args)], dim=1).float()
    assert torch.allclose(model.time_proj(t), expected, atol=1e-4)
    # GroupNorm eps 1e-6 everywhere (tf.contrib.layers.group_norm's)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    # downsampling: a stride-2 3×3 convolution with TF "SAME" padding (nothing before, one row/column after)
    down = model.down_blocks[0].downsamplers[0]
    x = torch.randn(1, 128, 32, 32)
    with torch.no_grad():
        assert torch.allclose(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2),
                              atol=1e-5)
    assert [type(b).__name__ for b in model.down_blocks] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                             "DownBlock2D"]  # attention at 16×16


# -- GAN losses ------------------------------------------------------------------------------

def test_gan_losses_match_the_explicit_formulas():
    s = torch.tensor([-30.0, -2.0, 0.0, 0.5, 3.0, 40.0], dtype=F64)
    roles = torch.tensor([0, 1, 2, 0, 1, 2])
    real, pen = roles == REAL, roles == PENALTY
    assert torch.allclose(generator_losses("nonsaturating", s), torch.log1p(torch.exp(-s)))
    assert torch.equal(generator_losses("hinge", s), -s) and torch.equal(generator_losses("wgan-gp", s), -s)
    expected = {
        "nonsaturating": torch.where(real, torch.log1p(torch.exp(-s)), torch.log1p(torch.exp(s))),
        "hinge": torch.where(real, torch.clamp(1 - s, min=0), torch.clamp(1 + s, min=0)),
        "wgan-gp": torch.where(real, -s, s),
    }
    for kind, want in expected.items():
        got = discriminator_losses(kind, s, roles, gp_weight=10.0)
        assert torch.allclose(got, torch.where(pen, 10.0 * (s - 1) ** 2, want)), kind


def test_the_gradient_penalty_is_each_examples_own_input_gradient_norm():
    torch.manual_seed(0)
    d = MLPDiscriminator(2, hidden=8, depth=2).to(F64)
    objective = DiscriminatorObjective(d, penalty=True)
    x = torch.randn(5, 2, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(d(x).sum(), x)
    norms = objective.input_gradient_norm(x)
    assert torch.allclose(norms, (g.pow(2).sum(dim=1) + 1e-12).sqrt())
    alone = torch.stack([objective.input_gradient_norm(x[i:i + 1])[0] for i in range(5)])
    assert torch.allclose(norms, alone)


def test_the_gradient_penalty_refuses_batchnorm_in_training_mode():
    torch.manual_seed(0)
    d = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.SiLU(), nn.Linear(4, 1))
    objective = DiscriminatorObjective(d, penalty=True)
    roles = torch.tensor([1, 2, 2, 0])
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        objective(torch.randn(4, 2), roles)
    d.eval()  # running statistics: per-example again
    assert objective(torch.randn(4, 2), roles).shape == (4, 1)


def test_gan_losses_refuse_a_negative_penalty_weight_and_scores_of_another_batch():
    with pytest.raises(ValueError, match="gp_weight must be a finite number >= 0"):
        DiscriminatorLoss("wgan-gp", gp_weight=-10.0)
    with pytest.raises(ValueError, match="gp_weight must be a finite number >= 0"):
        discriminator_losses("wgan-gp", torch.zeros(2), torch.tensor([1, 2]), gp_weight=float("nan"))

    class Patches(nn.Module):  # a patch D whose [B, 2] scores were flattened to [2B]
        def forward(self, x):
            return x.reshape(-1)

    with pytest.raises(ValueError, match="one value per example"):
        GeneratorLoss(Patches())(torch.randn(3, 2))
    with pytest.raises(ValueError, match="one value per example"):
        DiscriminatorObjective(Patches())(torch.randn(3, 2), torch.tensor([0, 1, 1]))
