"""Review of the learned-variance feature (genkernel.diffusion.learned_variance): the hybrid loss of a float32,
bfloat16 or float16 model against guided-diffusion's formulas in float64 (the decoder's bins in the tails of the
normal, the 1e-12 floor float16 cannot hold), a zero-terminal-SNR schedule (ε-prediction refused, v-prediction
exact at ᾱ_{T−1} = 0), λ's checks, group_state="factored" on the hybrid loss, and respaced learned-range
sampling against IDDPM's respaced process written by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from genkernel.core import PathKernelTracker
from genkernel.diffusion import DDPMTrainer, HybridLoss, make_scheduler
from genkernel.diffusion.learned_variance import _discretized_gaussian_log_likelihood, training_loss
from genkernel.diffusion.trainer import reverse_sample
from test_ddpm_trainer import ring
from test_learned_variance import VarianceMLP, hybrid_batch, probes_and_batches, reference_hybrid_loss
from test_trainer_ema import assert_ledger_adds_up

T = 40
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(shape, seed=0):
    """Data on the 256-level grid of [−1, 1] (the decoder's bins), both edges included."""
    levels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    levels.view(-1)[:2] = torch.tensor([0, 255])
    return levels.to(F64) / 127.5 - 1


def test_the_decoders_tail_bins_keep_their_mass_in_float32():
    # a value 5.5 to 7 standard deviations from the mean (a bin of mass 2e-8 .. 1e-12, above the floor): torch's
    # float32 ndtr gives 0 there, which the floor turned into log 1e-12 = −27.6 whatever the distance
    log_scale = torch.full((8,), -4.0, dtype=F64)
    std = float(torch.exp(log_scale[0]))
    x = torch.zeros(8, dtype=F64)
    z = torch.tensor([5.5, 6.0, 6.5, 6.9, -5.5, -6.0, -6.5, -6.9], dtype=F64)
    mean = x - z * std  # z > 0: the bin lies above the mean; z < 0: below it
    high, low = (x - mean + 1 / 255) / std, (x - mean - 1 / 255) / std
    expected = np.log(np.where(low > 0, norm.sf(low) - norm.sf(high), norm.cdf(high) - norm.cdf(low)))
    assert expected.min() > np.log(1e-12)
    got = _discretized_gaussian_log_likelihood(x.float(), mean.float(), log_scale.float())
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)
    # the edge bins' tails as well: x = ±1 with the mean 6 standard deviations inside
    edges = torch.tensor([-1.0, 1.0], dtype=F64)
    inside = edges - torch.tensor([-6.0, 6.0], dtype=F64) * std
    got = _discretized_gaussian_log_likelihood(edges.float(), inside.float(), log_scale[:2].float())
    expected = np.log([norm.cdf((-1 - inside[0].item() + 1 / 255) / std), norm.sf((1 - inside[1].item() - 1 / 255) / std)])
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_a_low_precision_model_gets_guided_diffusions_hybrid_loss(dtype, rtol):
    # outputs, targets and inputs rounded to the model's dtype; the loss against the float64 reference on those
    # same rounded values: only the loss's own arithmetic differs (float16: the floor 1e-12 underflowed to 0,
    # an infinite decoder NLL at t = 0; float32 and bfloat16: bins 5 to 7 standard deviations out floored)
    scheduler = make_scheduler(T, prediction_type="sample", variance_type="learned_range")
    clean = pixels((8, 1, 4, 4))
    timesteps = torch.tensor([0, 0, 0, 0, 1, 2, 20, 39])
    target, noisy = hybrid_batch(scheduler, clean, timesteps, seed=2)
    generator = torch.Generator().manual_seed(3)
    mean_part = target + 0.05 * torch.randn(target.shape, generator=generator, dtype=F64)
    variance_part = torch.rand(target.shape, generator=generator, dtype=F64) * 2 - 1
    outputs = torch.cat([mean_part, variance_part], dim=1).to(dtype).requires_grad_()
    rounded = tuple(a.to(dtype) for a in (target, clean, noisy))
    losses = HybridLoss(scheduler)(outputs, (*rounded, timesteps))
    assert losses.dtype == dtype
    expected = reference_hybrid_loss(outputs.double(), *(a.double() for a in rounded), timesteps, scheduler, "sample")
    torch.testing.assert_close(losses.double(), expected, rtol=rtol, atol=0)
    losses.sum().backward()
    assert bool(torch.isfinite(outputs.grad.double()).all())


def test_an_epsilon_model_on_a_zero_terminal_snr_schedule_is_refused_with_the_fix():
    # ᾱ_{T−1} = 0: x̂_0 = (z − sqrt(1 − ᾱ) ε̂) / sqrt(ᾱ) divides by 0 (an infinite loss, NaN gradients at t = T − 1)
    zero_snr = make_scheduler(T, variance_type="learned_range", rescale_betas_zero_snr=True)
    assert float(zero_snr.alphas_cumprod[-1]) == 0.0
    with pytest.raises(ValueError, match="v_prediction"):
        HybridLoss(zero_snr)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DDPMTrainer(VarianceMLP(), zero_snr, ring(8), batch_size=4, progress=False)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_the_hybrid_loss_is_exact_at_the_zero_snr_level(prediction_type):
    scheduler = make_scheduler(T, prediction_type=prediction_type, variance_type="learned_range",
                               rescale_betas_zero_snr=True)
    clean = pixels((4, 1, 4, 4), seed=5)
    timesteps = torch.tensor([T - 1, T - 2, 1, 0])
    target, noisy = hybrid_batch(scheduler, clean, timesteps, seed=6)
    generator = torch.Generator().manual_seed(7)
    outputs = torch.cat([target + 0.1 * torch.randn(target.shape, generator=generator, dtype=F64),
                         torch.rand(target.shape, generator=generator, dtype=F64) * 2 - 1], dim=1).requires_grad_()
    losses = HybridLoss(scheduler)(outputs, (target, clean, noisy, timesteps))
    expected = reference_hybrid_loss(outputs, target, clean, noisy, timesteps, scheduler, prediction_type)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)
    losses.sum().backward()
    assert bool(torch.isfinite(outputs.grad).all())


def test_vlb_weight_takes_real_numbers_and_refuses_a_bool():
    scheduler = make_scheduler(T, variance_type="learned_range")
    assert training_loss(scheduler, np.float32(0.5)).vlb_weight == 0.5
    assert training_loss(scheduler, 0).vlb_weight == 0.0
    for bad in (True, float("nan"), -0.1, "1"):
        with pytest.raises(ValueError, match="vlb_weight must be"):
            HybridLoss(scheduler, bad)


def test_the_factored_group_state_splits_the_hybrid_loss_as_the_graph_does():
    scheduler = make_scheduler(T, prediction_type="v_prediction", variance_type="learned_range")
    probes, batches = probes_and_batches(scheduler, ring(8), 3)
    ledgers = {}
    for name, options in (("graph", dict(group_state="dense", gradient_route="graph")), ("factored", dict(group_state="factored"))):
        model = VarianceMLP()
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-2), HybridLoss(scheduler), probes,
                                    num_groups=2, **options)
        for inputs, targets in batches:
            tracker.step(inputs, targets, groups=torch.arange(8) % 2)
        ledgers[name] = tracker.ledger
        assert_ledger_adds_up(tracker.ledger)
    scale = float(ledgers["graph"].contributions.abs().max())
    torch.testing.assert_close(ledgers["factored"].contributions, ledgers["graph"].contributions, rtol=0, atol=1e-12 * scale)


def iddpm_respaced_sample(model, scheduler, use_timesteps, n, seed=0, max_log_betas=None):
    """IDDPM's respaced learned-range sampling (SpacedDiffusion): the process on ᾱ at ``use_timesteps`` (ascending)
    with its own β'_i = 1 − ᾱ'_i / ᾱ'_{i−1}, clipped posterior variance β̃'_i, log Σ = u log β'_i + (1 − u) log β̃'_i,
    the model called at the original timestep, no noise at the last step; the draws as reverse_sample's. The tables
    are the scheduler's float32 ᾱ and float32 arithmetic on them, as diffusers' step has them (IDDPM: float64).
    ``max_log_betas``: another log β'_i to interpolate towards (the original β_t, to show the test tells them apart)."""
    ac = scheduler.alphas_cumprod[use_timesteps]
    prev = torch.cat([torch.ones(1), ac[:-1]])
    beta = 1 - ac / prev
    posterior = beta * (1 - prev) / (1 - ac)
    log_posterior = torch.cat([posterior[1:2], posterior[1:]]).log()
    log_beta = beta.log() if max_log_betas is None else max_log_betas
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=F64)
    with torch.no_grad():
        for i in reversed(range(len(use_timesteps))):
            out = model(x, torch.full((n,), use_timesteps[i]))
            eps, v = out[:, :2], out[:, 2:]
            x0 = (x - (1 - ac[i]).sqrt() * eps) / ac[i].sqrt()
            mean = (prev[i].sqrt() * beta[i] / (1 - ac[i])) * x0 + ((1 - beta[i]).sqrt() * (1 - prev[i]) / (1 - ac[i])) * x
            frac = (v + 1) / 2
            log_variance = frac * log_beta[i] + (1 - frac) * log_posterior[i]
            noise = torch.randn(n, 2, generator=generator, dtype=F64)
            x = mean + (torch.exp(0.5 * log_variance) * noise if i > 0 else 0)
    return x


def test_respaced_learned_range_sampling_is_iddpms_respaced_process():
    # diffusers' learned-range step interpolates between the respaced β̃' and β' (current_beta_t), as IDDPM's
    # SpacedDiffusion does: 8 of 40 steps, "leading" spacing [35, 30, ..., 0]
    scheduler = make_scheduler(T, variance_type="learned_range")
    model = VarianceMLP(seed=4)
    samples, _ = reverse_sample(model, scheduler, (5, 2), num_inference_steps=8)
    use = list(range(0, T, 5))
    expected = iddpm_respaced_sample(model, scheduler, use, 5)
    torch.testing.assert_close(samples, expected, rtol=0, atol=1e-12)
    # interpolating towards the original β_t instead of β'_t samples otherwise by far more than that
    original = iddpm_respaced_sample(model, scheduler, use, 5, max_log_betas=scheduler.betas[use].log())
    assert float((original - expected).abs().max()) > 1e-2


def test_an_observed_loop_of_the_hybrid_loss_books_what_analyzer_step_books():
    from genkernel.diffusion import NoiseLevelAnalyzer
    from genkernel.diffusion.objectives import training_target

    scheduler = make_scheduler(T, prediction_type="v_prediction", variance_type="learned_range")
    batches = [(ring(8, seed=10 + k), torch.randint(0, T, (8,), generator=torch.Generator().manual_seed(k)))
               for k in range(3)]
    batches[0][1][0] = 0  # the decoder term in the first step
    noises = [torch.randn(8, 2, generator=torch.Generator().manual_seed(20 + k), dtype=F64) for k in range(3)]
    runs = {}
    for kind in ("observe", "step"):
        model = VarianceMLP()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        analyzer = NoiseLevelAnalyzer(scheduler, ring(16, seed=3), num_bins=4, num_probes=6, kernel_points=3,
                                      progress=False)
        analyzer.bind(model, optimizer)
        loss = HybridLoss(scheduler)
        for (clean, t), noise in zip(batches, noises):
            if kind == "step":
                analyzer.step(clean, noise, t)
                continue
            noisy = scheduler.add_noise(clean, noise, t)
            losses = loss(model(noisy, t), (training_target(scheduler, clean, noise, t), clean, noisy, t))
            analyzer.observe(losses, t)
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
        assert_ledger_adds_up(analyzer.tracker.ledger)
        runs[kind] = (analyzer.contributions, [p.detach().clone() for p in model.parameters()])
    for mine, theirs in zip(runs["observe"][1], runs["step"][1]):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    scale = float(runs["step"][0].abs().max())
    torch.testing.assert_close(runs["observe"][0], runs["step"][0], rtol=0, atol=1e-10 * scale)


def test_a_checkpoint_from_before_the_feature_resumes_a_fixed_variance_run_and_not_a_learned_one():
    from test_ddpm_trainer import params_equal
    from genkernel.diffusion.models import MLPDenoiser

    def model():
        torch.manual_seed(0)
        return MLPDenoiser(hidden=8, depth=1, time_dim=8).double()

    fixed = make_scheduler(T)
    straight = DDPMTrainer(model(), fixed, ring(16), batch_size=8, progress=False)
    straight.train(4)
    first = DDPMTrainer(model(), fixed, ring(16), batch_size=8, progress=False)
    first.train(2)
    state = first.state_dict()
    del state["config"]["learned_variance"]  # as the trainer wrote it before learned variances
    again = DDPMTrainer(model(), fixed, ring(16), batch_size=8, progress=False)
    again.load_state_dict(state)
    again.train(2)
    assert params_equal(again.model, straight.model)
    # a learned-variance run never wrote such a checkpoint (its loss did not exist): refused, the key named
    learned_run = DDPMTrainer(VarianceMLP(), make_scheduler(T, variance_type="learned_range"), ring(16), batch_size=8,
                              progress=False)
    with pytest.raises(ValueError, match="learned_variance"):
        learned_run.load_state_dict(state)


# -- reverse_sample: a learned-range model's channels checked first; no learned noise on a last step to x_0 --------



class MeanOnlyConditional(nn.Module):
    """A C-channel model (no variance channels) with a class embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = VarianceMLP(num_classes=3)

    def forward(self, x_t, t, y=None):
        return self.inner(x_t, t, y)[:, :2]


def test_a_model_without_variance_channels_is_refused_at_learned_range_sampling_with_the_fix():
    # diffusers' learned-range step took the C channels as a mean with no variance: a TypeError on None; under
    # guidance the variance split at channel 0 returned the conditional output unguided before that
    scheduler = make_scheduler(T, variance_type="learned_range")
    model = MeanOnlyConditional()
    with pytest.raises(ValueError, match="out_channels=4"):
        reverse_sample(model, scheduler, (2, 2), num_inference_steps=4, conditioning=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out_channels=4"):
        reverse_sample(model, scheduler, (2, 2), num_inference_steps=4, conditioning=torch.tensor([0, 1]),
                       guidance_scale=2.0, null_conditioning=torch.tensor([2, 2]))


def test_a_trailing_last_step_adds_no_learned_noise_as_iddpms_last_step():
    from diffusers import DDPMScheduler

    scheduler = make_scheduler(T, variance_type="learned_range")
    sampler = DDPMScheduler.from_config(scheduler.config, timestep_spacing="trailing")  # [39, 34, ..., 4]
    model = VarianceMLP(seed=4)
    with torch.no_grad():
        model.variance.out.bias.fill_(50.0)  # u -> 1: the noise diffusers added at t = 4 had variance β'_4 = 1 − ᾱ_4
    samples, _ = reverse_sample(model, scheduler, (5, 2), sampler=sampler, num_inference_steps=8)
    expected = iddpm_respaced_sample(model, scheduler, list(range(4, T, 5)), 5)
    # diffusers floors the last step's zero variance at 1e-20: noise of std 1e-10 remains
    torch.testing.assert_close(samples, expected, rtol=0, atol=1e-9)


def test_dpm_solver_gets_the_mean_channels_not_its_first_three():
    # make_sampler copies variance_type='learned_range' into DPMSolverMultistepScheduler's config, whose
    # learned variance_type keeps model_output[:, :3]: given the whole 2C output it took 2 means and a variance
    # (a bare shape error for 2-D points; a 1-channel image grew a second channel); it gets the mean channels
    from diffusers import DPMSolverMultistepScheduler
    from test_learned_variance import MeanOnly

    scheduler = make_scheduler(T, variance_type="learned_range")
    model = VarianceMLP(seed=5)
    samples, _ = reverse_sample(model, scheduler, (5, 2), sampler=DPMSolverMultistepScheduler, num_inference_steps=8)
    expected, _ = reverse_sample(MeanOnly(model), make_scheduler(T), (5, 2), sampler=DPMSolverMultistepScheduler,
                                 num_inference_steps=8)
    torch.testing.assert_close(samples, expected, rtol=0, atol=0)
