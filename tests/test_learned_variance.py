"""Denoisers that predict their variance (IDDPM's learned range, DiT's learn_sigma): the hybrid loss against an
independent float64 reference of guided-diffusion's formulas, the trainer's step against a hand-written DiT-style
step, the ledger exact on it by every route with training unchanged, sampling as diffusers samples such a model
(DDPM with the variance, other samplers and guidance with the mean), and clear errors for a model and a scheduler
that disagree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from genkernel.core import PathKernelTracker
from genkernel.diffusion import DDPMTrainer, HybridLoss, NoiseLevelAnalyzer, make_scheduler, retrieval_attribution
from genkernel.diffusion.learned_variance import mean_channels, predicts_variance
from genkernel.diffusion.models import MLPDenoiser
from genkernel.diffusion.trainer import make_sampler, reverse_sample
from test_ddpm_trainer import params_equal, ring, small_mlp
from test_trainer_ema import assert_ledger_adds_up

T = 40
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def learned(prediction_type="epsilon"):
    return make_scheduler(T, prediction_type=prediction_type, variance_type="learned_range")


class VarianceMLP(nn.Module):
    """``model(x_t, t[, y])`` -> ``[B, 4]`` for 2-D points: the mean prediction and the variance values (a class
    embedding shifts x_t when ``num_classes`` is given)."""

    def __init__(self, num_classes=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.mean = MLPDenoiser(hidden=16, depth=2, time_dim=8)
        self.variance = MLPDenoiser(hidden=8, depth=1, time_dim=8)
        self.embed = None if num_classes is None else nn.Embedding(num_classes, 2)
        self.double()

    def forward(self, x_t, t, y=None):
        if self.embed is not None:
            x_t = x_t + self.embed(y)
        return torch.cat([self.mean(x_t, t), torch.tanh(self.variance(x_t, t))], dim=1)


def unet(out_channels=2, seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).double()


def images(n=16, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1


def reference_hybrid_loss(outputs, target, clean, noisy, timesteps, scheduler, prediction_type, vlb_weight=1.0):
    """guided-diffusion's ``training_losses`` for learned_range (MSE + vb), per example, in numpy float64 with scipy's
    normal CDF: q's posterior from the betas, p's mean from the predicted x_0, log-variance interpolated between
    the clipped posterior variance and β_t, KL for t > 0, the discretized decoder NLL at t = 0, in bits."""
    ac = scheduler.alphas_cumprod.double().numpy()
    prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1 - ac / prev
    posterior = beta * (1 - prev) / (1 - ac)
    log_posterior = np.log(np.concatenate([[posterior[1]], posterior[1:]]))
    out, target, clean, noisy = (a.detach().numpy() for a in (outputs, target, clean, noisy))
    c = target.shape[1]
    losses = []
    for i, t in enumerate(timesteps.tolist()):
        mean_part, v = out[i, :c], out[i, c:]
        mse = ((mean_part - target[i]) ** 2).mean()
        if prediction_type == "epsilon":
            x0 = (noisy[i] - np.sqrt(1 - ac[t]) * mean_part) / np.sqrt(ac[t])
        elif prediction_type == "sample":
            x0 = mean_part
        else:
            x0 = np.sqrt(ac[t]) * noisy[i] - np.sqrt(1 - ac[t]) * mean_part
        c1 = beta[t] * np.sqrt(prev[t]) / (1 - ac[t])
        c2 = (1 - prev[t]) * np.sqrt(1 - beta[t]) / (1 - ac[t])
        model_mean, true_mean = c1 * x0 + c2 * noisy[i], c1 * clean[i] + c2 * noisy[i]
        frac = (v + 1) / 2
        log_var = frac * np.log(beta[t]) + (1 - frac) * log_posterior[t]
        if t > 0:
            kl = 0.5 * (-1 + log_var - log_posterior[t] + np.exp(log_posterior[t] - log_var)
                        + (true_mean - model_mean) ** 2 * np.exp(-log_var))
            vb = kl.mean() / np.log(2)
        else:
            x, std = clean[i], np.exp(0.5 * log_var)
            high, low = (x - model_mean + 1 / 255) / std, (x - model_mean - 1 / 255) / std
            # a bin's mass from the tail it lies in (no difference of two CDFs near 1)
            mass = np.where(low > 0, norm.sf(low) - norm.sf(high), norm.cdf(high) - norm.cdf(low))
            log_p = np.where(x < -0.999, np.log(np.maximum(norm.cdf(high), 1e-12)),
                             np.where(x > 0.999, np.log(np.maximum(norm.sf(low), 1e-12)),
                                      np.log(np.maximum(mass, 1e-12))))
            vb = -log_p.mean() / np.log(2)
        losses.append(mse + vlb_weight * vb)
    return torch.tensor(losses, dtype=F64)


def hybrid_batch(scheduler, clean, timesteps, seed=1):
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    kind = scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": clean, "v_prediction": scheduler.get_velocity(clean, noise, timesteps)}[kind]
    return target, noisy


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_hybrid_loss_is_guided_diffusions_at_every_level_including_the_decoder_at_t0(prediction_type):
    scheduler = learned(prediction_type)
    clean = images(6)
    clean[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.0], dtype=F64)  # the edge bins of the decoder
    timesteps = torch.tensor([0, 0, 1, 7, 20, T - 1])
    target, noisy = hybrid_batch(scheduler, clean, timesteps)
    outputs = unet()(noisy, timesteps).sample
    for weight in (1.0, 0.25):
        loss = HybridLoss(scheduler, vlb_weight=weight)(outputs, (target, clean, noisy, timesteps))
        expected = reference_hybrid_loss(outputs, target, clean, noisy, timesteps, scheduler, prediction_type, weight)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)


def test_the_bound_trains_the_variance_channels_alone_and_the_mse_the_mean_channels():
    # Eq. 16 stops the gradient of L_vlb at the mean: d loss / d mean channels is the MSE's, whatever λ is, and the
    # variance channels' gradient scales with λ
    scheduler = learned()
    clean = ring(8)
    timesteps = torch.tensor([0, 1, 3, 9, 15, 22, 30, 39])
    target, noisy = hybrid_batch(scheduler, clean, timesteps)
    outputs = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(2)).mul(0.5).requires_grad_()
    grads = {}
    for weight in (0.0, 1.0, 3.0):
        loss = HybridLoss(scheduler, vlb_weight=weight)(outputs, (target, clean, noisy, timesteps))
        grads[weight] = torch.autograd.grad(loss.sum(), outputs)[0]
    mse_grad = 2 * (outputs[:, :2] - target).detach() / 2
    for weight in grads:
        torch.testing.assert_close(grads[weight][:, :2], mse_grad, rtol=1e-12, atol=1e-15)
    assert float(grads[0.0][:, 2:].abs().max()) == 0.0 and float(grads[1.0][:, 2:].abs().max()) > 0
    torch.testing.assert_close(grads[3.0][:, 2:], 3 * grads[1.0][:, 2:], rtol=1e-12, atol=0)


def dit_style_step(model, optimizer, scheduler, clean, timesteps, noise):
    """One step as DiT's train.py takes it (guided-diffusion's training_losses, learn_sigma, MSE loss type), written
    out in torch: frozen_out = cat(ε̂.detach(), v), loss = mean(mse + vb)."""
    ac = scheduler.alphas_cumprod.to(F64)
    prev = torch.cat([torch.ones(1, dtype=F64), ac[:-1]])
    beta = 1 - ac / prev
    posterior = beta * (1 - prev) / (1 - ac)
    log_posterior = torch.cat([posterior[1:2], posterior[1:]]).log()
    noisy = scheduler.add_noise(clean, noise, timesteps)
    out = model(noisy, timesteps)
    eps, v = out[:, :2], out[:, 2:]
    mse = ((eps - noise) ** 2).mean(dim=1)
    at = lambda table: table[timesteps][:, None]  # noqa: E731
    x0 = (noisy - (1 - at(ac)).sqrt() * eps.detach()) / at(ac).sqrt()
    c1, c2 = at(beta) * at(prev).sqrt() / (1 - at(ac)), (1 - at(prev)) * (1 - at(beta)).sqrt() / (1 - at(ac))
    model_mean, true_mean = c1 * x0 + c2 * noisy, c1 * clean + c2 * noisy
    log_var = (v + 1) / 2 * at(beta).log() + (1 - (v + 1) / 2) * at(log_posterior)
    kl = 0.5 * (-1 + log_var - at(log_posterior) + (at(log_posterior) - log_var).exp()
                + (true_mean - model_mean) ** 2 * (-log_var).exp())
    assert bool((timesteps > 0).all())  # (the decoder term is tested against the reference above)
    vb = kl.mean(dim=1) / math.log(2)
    optimizer.zero_grad()
    (mse + vb).mean().backward()
    optimizer.step()


def test_the_trainer_takes_the_step_dits_training_script_takes():
    scheduler = learned()
    data = ring(8)
    run = DDPMTrainer(VarianceMLP(), scheduler, data, batch_size=8, optimizer="sgd", lr=0.05, shuffle=False,
                      progress=False, seed=1)
    # the trainer's own draws, redrawn from its generator's start (the data in order: no permutation drawn)
    generator = torch.Generator().manual_seed(1)
    timesteps = torch.randint(0, T, (8,), generator=generator)
    noise = torch.randn(8, 2, generator=generator, dtype=F64)
    assert bool((timesteps > 0).all())  # seed 1 draws no t = 0 (the decoder term is tested above)
    by_hand = VarianceMLP()
    dit_style_step(by_hand, torch.optim.SGD(by_hand.parameters(), lr=0.05), scheduler, data, timesteps, noise)
    run.train(1)
    for mine, theirs in zip(run.model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    assert not params_equal(run.model, VarianceMLP())


def test_the_analyzer_books_the_hybrid_step_exactly_and_training_is_unchanged():
    scheduler = learned()
    data = images(16)
    bare = DDPMTrainer(unet(), scheduler, data, batch_size=8, progress=False, seed=1)
    bare.train(3)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:8], num_bins=4, num_probes=8, controls=1, progress=False)
    run = DDPMTrainer(unet(), scheduler, data, batch_size=8, progress=False, seed=1, callbacks=[analyzer])
    run.train(3)
    assert params_equal(run.model, bare.model)
    assert analyzer.tracker.ledger.steps == 3
    assert_ledger_adds_up(analyzer.tracker.ledger)


def probes_and_batches(scheduler, data, num_batches):
    """4 probe states of ``data`` and ``num_batches`` batches ``((z, t), (y, x_0, z, t))`` of all of it, at eight
    levels (t = 0 among them) in a shuffled order, from one seeded generator."""
    generator = torch.Generator().manual_seed(3)
    probe_t = torch.randint(0, T, (4,), generator=generator)
    noise = torch.randn((4, *data.shape[1:]), generator=generator, dtype=F64)
    probes = (scheduler.add_noise(data[:4], noise, probe_t), probe_t)
    batches = []
    for _ in range(num_batches):
        timesteps = torch.tensor([0, 3, 9, 17, 21, 30, 35, 39])[torch.randperm(8, generator=generator)]
        target, noisy = hybrid_batch(scheduler, data, timesteps, seed=int(torch.randint(0, 99, (1,), generator=generator)))
        batches.append(((noisy, timesteps), (target, data, noisy, timesteps)))
    return probes, batches


@pytest.mark.parametrize("route", ["example", "factored"])
def test_every_gradient_route_splits_the_hybrid_loss_as_the_graph_does(route):
    scheduler = learned()
    probes, batches = probes_and_batches(scheduler, images(8), 2)
    ledgers = {}
    for name in ("graph", route):
        model = unet()
        tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), 1e-3), HybridLoss(scheduler), probes,
                                    num_groups=2, gradient_route=name)
        for inputs, targets in batches:
            tracker.step(inputs, targets, groups=torch.arange(8) % 2)
        ledgers[name] = tracker.ledger
        assert_ledger_adds_up(tracker.ledger)
    scale = float(ledgers["graph"].contributions.abs().max())
    torch.testing.assert_close(ledgers[route].contributions, ledgers["graph"].contributions, rtol=0, atol=1e-10 * scale)


def test_a_conditional_dit_with_learned_sigma_trains_under_the_analyzer_with_guidance():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                            num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=3).double()
    for module in model.modules():  # its LabelEmbedding drops labels itself: class_dropout draws them instead
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    data = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    labels = torch.arange(12) % 2
    scheduler = learned()
    analyzer = NoiseLevelAnalyzer(scheduler, data[:4], num_bins=3, num_probes=4, controls=0, progress=False,
                                  probe_conditioning=labels[:4], kernel_sketch=2)
    run = DDPMTrainer(model, scheduler, data, labels=labels, conditional=True, class_dropout=0.2, null_class=2,
                      batch_size=6, progress=False, callbacks=[analyzer])
    run.train(2)
    assert_ledger_adds_up(analyzer.tracker.ledger)
    samples, _ = run.sample(3, labels=torch.tensor([0, 1, 0]), guidance_scale=2.0, num_inference_steps=5)
    assert samples.shape == (3, 1, 4, 4) and bool(torch.isfinite(samples).all())


def sample_by_hand(model, scheduler, labels=None, scale=1.0, seed=0):
    """DDPM ancestral sampling with diffusers' learned-range step on the whole output; under guidance the mean
    channels guided and the conditional variance kept (DiT's forward_with_cfg), in two separate passes."""
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(T)
    generator = torch.Generator().manual_seed(seed)
    n = 5 if labels is None else labels.shape[0]
    x = torch.randn(n, 2, generator=generator, dtype=F64)
    with torch.no_grad():
        for t in sampler.timesteps:
            timestep = t.repeat(n)
            if labels is None:
                out = model(x, timestep)
            else:
                conditional, unconditional = model(x, timestep, labels), model(x, timestep, torch.full_like(labels, 2))
                guided = unconditional[:, :2] + scale * (conditional[:, :2] - unconditional[:, :2])
                out = torch.cat([guided, conditional[:, 2:]], dim=1)
            x = sampler.step(out, t, x, generator=generator).prev_sample
    return x


def test_ddpm_sampling_steps_with_the_learned_variance():
    scheduler = learned()
    model = VarianceMLP(seed=4)
    samples, _ = reverse_sample(model, scheduler, (5, 2))
    torch.testing.assert_close(samples, sample_by_hand(model, scheduler), rtol=0, atol=1e-12)
    # the variance channels matter: the same means with the variance at either end of its range sample otherwise
    with torch.no_grad():
        model.variance.out.bias.fill_(50.0)  # tanh -> 1: β_t
    high, _ = reverse_sample(model, scheduler, (5, 2))
    assert float((high - samples).abs().max()) > 1e-3


def test_guided_sampling_guides_the_mean_and_keeps_the_conditional_variance():
    scheduler = learned()
    data, labels = ring(12), torch.arange(12) % 2
    run = DDPMTrainer(VarianceMLP(num_classes=3), scheduler, data, labels=labels, conditional=True, class_dropout=0.3,
                      null_class=2, batch_size=6, lr=1e-2, progress=False)
    run.train(3)
    wanted = torch.tensor([0, 1, 1, 0, 1])
    samples, _ = run.sample(5, labels=wanted, guidance_scale=3.0)
    run.model.eval()
    torch.testing.assert_close(samples, sample_by_hand(run.model, scheduler, wanted, 3.0), rtol=0, atol=1e-12)


class MeanOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, t):
        return self.model(x_t, t)[:, :2]


def test_other_samplers_get_the_mean_channels_as_diffusers_dit_pipeline_gives_them():
    from diffusers import DDIMScheduler

    scheduler = learned()
    model = VarianceMLP(seed=5)
    samples, _ = reverse_sample(model, scheduler, (5, 2), sampler=DDIMScheduler, num_inference_steps=8)
    expected, _ = reverse_sample(MeanOnly(model), make_scheduler(T), (5, 2), sampler=DDIMScheduler, num_inference_steps=8)
    torch.testing.assert_close(samples, expected, rtol=0, atol=0)


def test_a_model_and_a_scheduler_that_disagree_about_the_variance_are_refused_with_the_fix():
    data = images(8)
    # a learned-sigma model under a fixed variance: named at the first step, not as a bare shape mismatch
    run = DDPMTrainer(unet(out_channels=2), make_scheduler(T), data, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        run.train(1)
    # a fixed-variance model under learned_range: the channels to build it with
    run = DDPMTrainer(unet(out_channels=1), learned(), data, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="out_channels=2"):
        run.train(1)
    with pytest.raises(ValueError, match="learned_range"):
        DDPMTrainer(unet(), make_scheduler(T, variance_type="learned"), data, progress=False)
    with pytest.raises(ValueError, match="variance is fixed|leave vlb_weight"):
        DDPMTrainer(unet(out_channels=1), make_scheduler(T), data, vlb_weight=0.5, progress=False)
    with pytest.raises(ValueError, match="vlb_weight must be"):
        DDPMTrainer(unet(), learned(), data, vlb_weight=-1.0, progress=False)
    # a learned-range sampler cannot read a variance a fixed-variance model does not predict
    with pytest.raises(ValueError, match="predicts none"):
        reverse_sample(unet(out_channels=1), make_scheduler(T), (2, 1, 8, 8), sampler=learned(), num_inference_steps=2)


def test_guided_retrieval_of_a_learned_variance_model_is_refused():
    scheduler = learned()
    model = VarianceMLP(num_classes=3)
    with pytest.raises(ValueError, match="guidance_scale=1"):
        retrieval_attribution(model, scheduler, ring(6), num_samples=2, conditioning=torch.tensor([0, 1]),
                              train_conditioning=torch.arange(6) % 2, guidance_scale=2.0,
                              null_conditioning=torch.tensor([2, 2]))


def test_a_resume_with_another_vlb_weight_is_refused_and_the_same_resumes_bit_for_bit(tmp_path):
    scheduler = learned()
    straight = DDPMTrainer(VarianceMLP(), scheduler, ring(16), batch_size=8, progress=False)
    straight.train(4)
    first = DDPMTrainer(VarianceMLP(), scheduler, ring(16), batch_size=8, progress=False, checkpoint_dir=tmp_path)
    first.train(2)
    first.save_checkpoint()
    other = DDPMTrainer(VarianceMLP(), scheduler, ring(16), batch_size=8, progress=False, checkpoint_dir=tmp_path,
                        vlb_weight=0.5)
    with pytest.raises(ValueError, match="learned_variance"):
        other.resume()
    again = DDPMTrainer(VarianceMLP(), scheduler, ring(16), batch_size=8, progress=False, checkpoint_dir=tmp_path)
    assert again.resume()
    again.train(2)
    assert params_equal(again.model, straight.model)


def test_predicts_variance_reads_the_schedulers_variance_type():
    assert predicts_variance(learned()) and not predicts_variance(make_scheduler(T))
    with pytest.raises(ValueError, match="out_channels=4"):
        mean_channels(torch.zeros(3, 2), 2)


def test_the_automatic_kernel_sketch_counts_the_variance_channels_as_outputs():
    # 6×6 grey images: 36 inputs, 72 outputs per state with the variance: above the 64 the exact kernel is kept for
    diffusers = pytest.importorskip("diffusers")
    data = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    sketches = {}
    for scheduler, channels in ((make_scheduler(T), 1), (learned(), 2)):
        torch.manual_seed(0)
        model = diffusers.UNet2DModel(sample_size=6, in_channels=1, out_channels=channels, block_out_channels=(4, 8),
                                      layers_per_block=1, norm_num_groups=2, down_block_types=("DownBlock2D",) * 2,
                                      up_block_types=("UpBlock2D",) * 2).double()
        analyzer = NoiseLevelAnalyzer(scheduler, data[:2], num_bins=3, num_probes=2, controls=0, progress=False,
                                      kernel_points=2)
        sketches[channels] = analyzer.kernel_structure(model)["sketch"]
    assert sketches == {1: None, 2: 8}


def test_the_report_names_the_loss_each_tracked_step_trained_with_and_keeps_it_across_a_resume(tmp_path):
    """Before: the report said nothing of the loss, so a hybrid run read like an MSE run."""
    from genkernel.diffusion.analyzer import OBSERVED_LOSS
    from genkernel.report import summarize

    data = ring(32)
    kinds = {}
    for name, scheduler, model, weight in (("hybrid", learned(), VarianceMLP(), 0.25),
                                           ("mse", make_scheduler(T), small_mlp(), 1.0)):
        analyzer = NoiseLevelAnalyzer(scheduler, data[:4], num_bins=3, num_probes=4, controls=0, progress=False)
        trainer = DDPMTrainer(model, scheduler, data, batch_size=8, progress=False, seed=1, callbacks=[analyzer],
                              vlb_weight=weight, checkpoint_dir=tmp_path / name)
        trainer.train(3)
        trainer.save_checkpoint()
        kinds[name] = analyzer.report()["config"]["step_losses"]
        resumed_analyzer = NoiseLevelAnalyzer(scheduler, data[:4], num_bins=3, num_probes=4, controls=0, progress=False)
        fresh = {"hybrid": VarianceMLP, "mse": small_mlp}[name]()
        resumed = DDPMTrainer(fresh, scheduler, data, batch_size=8, progress=False, seed=1, callbacks=[resumed_analyzer],
                              vlb_weight=weight, checkpoint_dir=tmp_path / name)
        assert resumed.resume()
        resumed.train(1)
        assert resumed_analyzer.report()["config"]["step_losses"] == {k: v + 1 for k, v in kinds[name].items()}
        (summary,) = summarize(resumed_analyzer.state_dict())["states"].values()
        assert summary["settings"]["step_losses"] == resumed_analyzer.report()["config"]["step_losses"]
    assert kinds == {"hybrid": {"hybrid: MSE + λ·L_vlb (λ = 0.25)": 3}, "mse": {"mse": 3}}

    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = make_scheduler(T)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:4], num_bins=3, num_probes=4, controls=0, progress=False)
    analyzer.bind(model, optimizer)
    for seed in range(2):
        noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
        timesteps = torch.randint(0, T, (8,), generator=torch.Generator().manual_seed(seed))
        losses = (model(scheduler.add_noise(data[:8], noise, timesteps), timesteps) - noise).pow(2).mean(1)
        analyzer.observe(losses, timesteps)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    assert analyzer.report()["config"]["step_losses"] == {OBSERVED_LOSS: 2}


def test_a_schedule_without_noise_at_a_level_is_refused_naming_it():
    """beta_start = 0 leaves ᾱ_0 = 1, where the posterior q(x_{t-1} | x_t, x_0) has no variance: HybridLoss refuses
    it at construction, naming the timesteps and the fix (before: the trainer stopped at its first step with a
    NonFiniteError naming examples)."""
    import diffusers

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=0.0, beta_end=0.02,
                                        variance_type="learned_range")
    with pytest.raises(ValueError, match=r"no noise at timesteps \[0\].*beta_start > 0"):
        HybridLoss(scheduler)
