"""Independent review of EDM (diffusers' EDMEulerScheduler) in the noise-level analyzer, in loops
people write: the EDM paper's continuous σ (ln σ ~ N(P_mean, P_std), clamped into the scheduler's
range, levels between grid points), AdamW with weight decay, gradient accumulation, clipping by global
norm, diffusers' EMAModel, per-example weights; SDXL-style grid levels on short schedules.

Every ledger is checked against a float64 brute force written here: per-example autograd of the
loss the loop trained (the EDM paper's λ(σ) ‖D − x‖² with D built by hand from c_skip, c_out, c_in),
bins recomputed from log SNR = 2 ln(σ_d / σ), AdamW, clipping and the EMA's update written out, and
contributions ⟨∇f(θ_mid), u_g⟩ at the midpoint of every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from genkernel.diffusion import NoiseLevelAnalyzer, make_edm_scheduler

from test_flow_matching import flow_mlp as edm_mlp, ring as flow_ring
from test_flow_matching_review import (
    assert_a_resumed_run_continues_the_ledgers_bit_for_bit, assert_the_run_is_the_brute_force, brute_force_adamw_of_losses,
    record_batches, tiny_class_unet,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def ring(n, seed=0):
    return flow_ring(n, seed, radius=0.5)




def edm_example_loss(model, x0, noise, sigma, t, sigma_data, prediction="epsilon"):
    """λ(σ) mean((D − x)²) of one example, D = c_skip z + c_out F(c_in z, t), written from the EDM paper."""
    s = math.sqrt(sigma**2 + sigma_data**2)
    c_in, c_skip, c_out = 1 / s, sigma_data**2 / s**2, sigma * sigma_data / s * (1 if prediction == "epsilon" else -1)
    z = x0 + sigma * noise
    denoised = c_skip * z + c_out * model(c_in * z, t)
    return (s**2 / (sigma * sigma_data) ** 2) * ((denoised - x0) ** 2).mean()


def edm_bins(scheduler, num_bins):
    """Bin of a σ: equal widths of λ = 2 ln(σ_d / σ) between the extremes over the T levels training draws
    (scheduler.sigmas[:T]); a σ joins the bin after every inner boundary at or above its λ."""
    T, data = scheduler.config.num_train_timesteps, scheduler.config.sigma_data
    lam_grid = 2 * torch.log(data / scheduler.sigmas[:T].to(F64))
    bounds = torch.linspace(float(lam_grid.max()), float(lam_grid.min()), num_bins + 1, dtype=F64)
    return lambda sigma: int((2 * math.log(data / sigma) <= bounds[1:-1]).sum())


def close(ours, expected, rtol):
    gap = float((ours - expected).abs().max())
    return gap <= rtol * float(expected.abs().max()), gap / float(expected.abs().max())


@pytest.mark.parametrize("t_dtype", [torch.float32, F64])
@pytest.mark.parametrize("pass_weights", [False, True])
def test_a_continuous_sigma_loop_with_adamw_accumulation_clipping_weights_and_ema_matches_brute_force(
        t_dtype, pass_weights):
    from diffusers.training_utils import EMAModel

    T, num_bins, lr, weight_decay, clip, batch, accumulation, data = 1000, 5, 1e-2, 1e-2, 0.5, 4, 2, 0.5
    scheduler = make_edm_scheduler(T, sigma_data=data)
    sigma_min, sigma_max = scheduler.config.sigma_min, scheduler.config.sigma_max
    model, reference = edm_mlp(), edm_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMAModel(model.parameters(), decay=0.9)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(12, seed=5), num_bins=num_bins, num_probes=6, controls=0,
                                  kernel_points=2, progress=False)
    analyzer.bind(model, optimizer, ema=ema)
    bin_of = edm_bins(scheduler, num_bins)
    gen = torch.Generator().manual_seed(3)
    steps, decays = [], []
    for k in range(3):
        examples = []
        for a in range(accumulation):
            x0, noise = ring(batch, seed=100 * k + a), torch.randn(batch, 2, generator=gen, dtype=F64)
            sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch, generator=gen, dtype=F64)).clamp(sigma_min, sigma_max)
            if k == 0 and a == 0:
                sigma[:2] = torch.tensor([sigma_min, sigma_max])  # both ends of the range
            t = (0.25 * torch.log(sigma.to(t_dtype)))  # the level the model is given, in the user's dtype
            c = 1 + torch.rand(batch, generator=gen, dtype=F64)  # per-example weights
            losses = torch.stack([edm_example_loss(model, x0[n : n + 1], noise[n : n + 1], float(sigma[n]), t[n : n + 1], data)
                                  for n in range(batch)])
            coef = c / (batch * accumulation)
            if pass_weights:
                analyzer.observe(losses, t, weights=coef)
                (losses * coef).sum().backward()
            else:
                losses = losses * c
                analyzer.observe(losses, t)
                (losses.mean() / accumulation).backward()
            for n in range(batch):
                loss_of = (lambda x, e, s, tt: lambda m: edm_example_loss(m, x, e, s, tt, data))(
                    x0[n : n + 1], noise[n : n + 1], float(sigma[n]), t[n : n + 1])
                examples.append((loss_of, float(coef[n]), bin_of(float(sigma[n]))))
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        decays.append(ema.cur_decay_value)
        steps.append(examples)
    analyzer.stop()
    probes = analyzer.probes(torch.zeros((), dtype=F64))
    # the probes: c_in (x + σ ε) at σ = exp(4 s), s the middle of each bin's log-SNR range (as float32)
    lam_grid = 2 * torch.log(data / scheduler.sigmas[:T].to(F64))
    bounds = torch.linspace(float(lam_grid.max()), float(lam_grid.min()), num_bins + 1, dtype=F64)
    centers = ((math.log(data) - (bounds[:-1] + bounds[1:]) / 4) / 4).to(torch.float32)
    assert torch.equal(probes[1], centers[torch.arange(6) % num_bins])
    sigma = torch.exp(4 * probes[1].to(F64))[:, None]
    z = (analyzer.probe_clean + sigma * analyzer.probe_noise) / torch.sqrt(sigma**2 + data**2)
    assert torch.allclose(probes[0], z, rtol=1e-15, atol=1e-15)
    brute_force = brute_force_adamw_of_losses(reference, steps, probes, num_bins, lr=lr, weight_decay=weight_decay,
                                              clip=clip, ema_decays=decays)
    assert_the_run_is_the_brute_force(analyzer, model.parameters(), ema.shadow_params, brute_force,
                                      [e[2] for s in steps for e in s], num_bins)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_class_conditional_unet_trained_by_the_trainer_matches_brute_force_per_level_and_class(prediction):
    from genkernel.diffusion import DDPMTrainer

    T, num_bins, classes, lr, clip, batch, data = 20, 4, 3, 1e-3, 0.3, 6, 0.7
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(24, 1, 4, 4, generator=gen, dtype=F64)
    labels = torch.arange(24) % classes
    probe, probe_labels = torch.randn(4, 1, 4, 4, generator=gen, dtype=F64), torch.arange(4) % classes

    def scheduler():
        return make_edm_scheduler(T, sigma_data=data, sigma_schedule="exponential", prediction_type=prediction)

    def trainer(callbacks=()):
        return DDPMTrainer(tiny_class_unet(0, classes), scheduler(), images, labels=labels, conditional=True,
                           batch_size=batch, lr=lr, max_grad_norm=clip, progress=False, callbacks=list(callbacks))

    analyzer = NoiseLevelAnalyzer(scheduler(), probe, num_bins=num_bins, num_probes=2, controls=1, kernel_points=2,
                                  probe_conditioning=probe_labels, num_classes=classes, progress=False)
    tracked = trainer([analyzer])
    batches = record_batches(tracked)
    tracked.train(2)
    grid = scheduler()
    bin_of = edm_bins(grid, num_bins)
    steps = []
    for b in batches:
        # the level must be one the training grid draws; σ from diffusers' own grid at that level
        index = [(grid.timesteps == t).nonzero().item() for t in b["timesteps"]]
        assert max(index) < T
        sigmas = grid.sigmas[index].to(F64)

        def loss_of(n, sigma):
            x0, noise, t, y = b["clean"][n : n + 1], b["noise"][n : n + 1], b["timesteps"][n : n + 1], b["labels"][n : n + 1]
            s = math.sqrt(sigma**2 + data**2)
            c_out = sigma * data / s * (1 if prediction == "epsilon" else -1)
            z = x0 + sigma * noise
            return lambda m: (s**2 / (sigma * data) ** 2) * (
                (data**2 / s**2 * z + c_out * m(z / s, t, y).sample - x0) ** 2).mean()

        steps.append([(loss_of(n, float(sigmas[n])), 1 / batch, bin_of(float(sigmas[n])) * classes + int(b["labels"][n]))
                      for n in range(batch)])
    expected, _, reference, _ = brute_force_adamw_of_losses(tiny_class_unet(0, classes), steps,
                                                  analyzer.probes(torch.zeros((), dtype=F64)), num_bins * classes,
                                                  lr=lr, clip=clip)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(tracked.model.parameters(), reference.parameters()))
    ok, gap = close(analyzer.ledgers["level_class"].contributions.cpu(), expected, 1e-8)
    assert ok, gap
    by_level = expected.reshape(expected.shape[0], num_bins, classes, -1).sum(dim=2)
    ok, gap = close(analyzer.contributions, by_level, 1e-8)
    assert ok, gap
    # the control partition splits the same updates: its groups add up to the same total
    ok, gap = close(analyzer.ledgers["control_0"].contributions.cpu().sum(dim=1), by_level.sum(dim=1), 1e-8)
    assert ok, gap


def test_a_resumed_edm_run_continues_the_ledgers_bit_for_bit(tmp_path):
    assert_a_resumed_run_continues_the_ledgers_bit_for_bit(
        lambda: make_edm_scheduler(50, sigma_data=0.7, prediction_type="v_prediction"), ring, tmp_path)


@pytest.mark.parametrize("change", [dict(sigma_min=0.003), dict(sigma_max=100.0), dict(rho=5.0), dict(sigma_data=1.0),
                                    dict(sigma_schedule="exponential"), dict(prediction_type="v_prediction"),
                                    dict(num_train_timesteps=40)])
def test_a_saved_edm_analyzer_or_trainer_of_another_schedule_is_refused(change, tmp_path):
    from genkernel.diffusion import DDPMTrainer

    base = dict(num_train_timesteps=20)

    def analyzer(scheduler):
        return NoiseLevelAnalyzer(scheduler, ring(8), num_bins=4, num_probes=4, controls=0, kernel_points=2,
                                  progress=False)

    saved = analyzer(make_edm_scheduler(**base))
    model = edm_mlp()
    saved.bind(model, torch.optim.SGD(model.parameters(), lr=0.1))
    saved.step(ring(8), torch.randn(8, 2, dtype=F64), saved.scheduler.timesteps[:8])
    state = saved.state_dict()
    other = make_edm_scheduler(**{**base, **change})
    with pytest.raises(ValueError):
        analyzer(other).load_state_dict(state)
    with pytest.raises(ValueError):  # the analyzer of one schedule on a trainer of another
        DDPMTrainer(edm_mlp(), other, ring(16), batch_size=8, lr=1e-2, progress=False,
                    callbacks=[analyzer(make_edm_scheduler(**base))]).train(1)
    trainer = DDPMTrainer(edm_mlp(), make_edm_scheduler(**base), ring(16), batch_size=8, lr=1e-2, progress=False,
                          checkpoint_dir=tmp_path)
    trainer.train(1)
    trainer.save_checkpoint()
    with pytest.raises(ValueError):
        DDPMTrainer(edm_mlp(), other, ring(16), batch_size=8, lr=1e-2, progress=False, checkpoint_dir=tmp_path).resume()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_levels_at_the_ends_of_the_range_are_booked_not_refused(dtype):
    """A mixed-precision loop giving the model float16 / bfloat16 levels: ¼ ln σ_max = 1.09551 (grid index 0,
    drawn by SDXL-style training) is 1.09570 in float16, and a continuous σ clamped to σ_min has
    ¼ ln σ_min = -1.55365 → -1.55469 in bfloat16. Both were refused as 'sigmas or indices' (1e-5 slack)."""
    T, num_bins, data = 50, 5, 0.5
    scheduler = make_edm_scheduler(T, sigma_data=data)
    model = edm_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(8, seed=5), num_bins=num_bins, num_probes=5, controls=0,
                                  kernel_points=2, progress=False)
    analyzer.bind(model, optimizer)
    lam_grid = 2 * torch.log(data / scheduler.sigmas[:T].to(F64))
    bounds = torch.linspace(float(lam_grid.max()), float(lam_grid.min()), num_bins + 1, dtype=F64)
    sigma_min, sigma_max = scheduler.config.sigma_min, scheduler.config.sigma_max
    expected = torch.zeros(num_bins, dtype=torch.long)
    for k, sigma in enumerate(([sigma_max, 1.0, 0.1], [sigma_min, 3.0, 0.01], scheduler.sigmas[[0, 7, 20]].tolist())):
        sigma = torch.tensor(sigma, dtype=F64)
        t = (0.25 * torch.log(sigma.float())).to(dtype)
        x0, noise = ring(3, seed=k), torch.randn(3, 2, generator=torch.Generator().manual_seed(k), dtype=F64)
        s = torch.sqrt(sigma**2 + data**2)[:, None]
        out = model((x0 + sigma[:, None] * noise) / s, t.to(F64))
        losses = ((out - (sigma[:, None] * x0 / data - data * noise) / s) ** 2).mean(dim=1)
        analyzer.observe(losses, t)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        lam = 2 * math.log(data) - 8 * t.to(F64)  # the level the model was given
        expected += torch.bincount((lam[:, None] <= bounds[None, 1:-1]).sum(dim=1), minlength=num_bins)
    assert analyzer.ledger.steps == 3
    assert torch.equal(torch.tensor(analyzer.bin_counts).sum(dim=0), expected)
    assert expected[0] >= 1 and expected[-1] >= 2  # both ends were booked


def test_an_unclamped_continuous_sigma_is_a_level_booked_to_the_end_bins():
    """The EDM paper's ln σ ~ N(−1.2, 1.2) is not clamped (NVlabs' training loop draws it so); with diffusers'
    σ range one draw in ~6·10^4 falls outside [0.002, 80], and the run stopped there (a clamp added to pass
    the check would have changed the training). Such σ, up to 10 σ_max, are levels of the end bins."""
    from genkernel.diffusion.objectives import NoiseBins, check_timesteps

    scheduler = make_edm_scheduler(50)
    bins = NoiseBins(scheduler, 5)
    t = 0.25 * torch.log(torch.tensor([0.0015, 1e-6, 0.5, 95.0, 790.0]))
    assert check_timesteps(t, scheduler) is t
    got = bins(t)
    assert got[0] == got[1] == 0 and got[3] == got[4] == 4
    with pytest.raises(ValueError, match=r"at most 1\.67.*not sigmas or indices"):
        check_timesteps(0.25 * torch.log(torch.tensor([0.5, 900.0])), scheduler)


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_timestep_bins_are_equal_widths_of_the_level_over_the_whole_sigma_range(schedule):
    from genkernel.diffusion.objectives import NoiseBins

    T, num_bins = 20, 7
    scheduler = make_edm_scheduler(T, sigma_schedule=schedule, sigma_data=1.3)
    bins = NoiseBins(scheduler, num_bins, spacing="timestep")
    low, high = 0.25 * math.log(0.002), 0.25 * math.log(80.0)
    sigma = torch.exp(torch.empty(5000, dtype=F64).uniform_(math.log(0.002), math.log(80.0),
                                                         generator=torch.Generator().manual_seed(0)))
    t = 0.25 * torch.log(sigma)
    expected = ((t - low) / (high - low) * num_bins).floor().long().clamp(0, num_bins - 1)
    assert torch.equal(bins(t), expected)
    assert torch.equal(bins(scheduler.timesteps), ((0.25 * torch.log(scheduler.sigmas[: T + 1].to(F64)) - low)
                                                   / (high - low) * num_bins).floor().long().clamp(0, num_bins - 1))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_reverse_sampling_and_retrieval_states_match_an_euler_sampler_written_by_hand(prediction):
    """The EDM Euler step written out (D = c_skip x + c_out F(c_in x, t), x ← x + (σ' − σ)(x − D)/σ): the
    samples and the kept states c_in x_t equal reverse_sample's, and retrieval's kernel is the model's
    Jacobian product at those states against training inputs c_in (x + σ ε) built here."""
    from genkernel.diffusion import retrieval_attribution, reverse_sample
    from genkernel.diffusion.kernels import state_kernel

    T, steps, data = 50, 8, 0.7
    scheduler = make_edm_scheduler(T, sigma_data=data, prediction_type=prediction, sigma_schedule="exponential")
    model = edm_mlp(3)
    samples, kept = reverse_sample(model, scheduler, (3, 2), num_inference_steps=steps, seed=4,
                                   keep=[1.2, 0.0, -0.31, -2.0])
    # by hand: Karras/exponential σ's of diffusers' sampling grid are its business; take them from it
    from diffusers import EDMEulerScheduler

    grid = EDMEulerScheduler.from_config(scheduler.config)
    grid.set_timesteps(steps)
    sigmas = grid.sigmas.to(F64)
    x = torch.randn((3, 2), generator=torch.Generator().manual_seed(4), dtype=F64) * math.sqrt(80.0**2 + 1)
    states = {}
    for i in range(steps):
        sigma, t = float(sigmas[i]), grid.timesteps[i]
        s = math.sqrt(sigma**2 + data**2)
        c_out = sigma * data / s * (1 if prediction == "epsilon" else -1)
        states[float(t)] = x / s
        with torch.no_grad():
            denoised = data**2 / s**2 * x + c_out * model(x / s, t.repeat(3))
        x = x + (float(sigmas[i + 1]) - sigma) * (x - denoised) / sigma
    assert torch.allclose(samples, x, rtol=1e-5, atol=1e-6)  # diffusers' step computes in float32
    levels = grid.timesteps.tolist()
    wanted = sorted({min(levels, key=lambda v: abs(v - w)) for w in (1.2, 0.0, -0.31, -2.0)}, reverse=True)
    assert sorted(kept, reverse=True) == wanted
    for level, state in kept.items():
        assert torch.allclose(state, states[level], rtol=1e-5, atol=1e-6)
    train = ring(6, seed=9)
    result = retrieval_attribution(model, scheduler, train, num_samples=3, stages=[1.0, -0.31], seed=4,
                                   num_inference_steps=steps, top_k=2)
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(4 + 7), dtype=F64)
    for k, level in enumerate(result.stages.tolist()):
        sigma = math.exp(4 * level)
        z = (train + sigma * noise) / math.sqrt(sigma**2 + data**2)
        t = torch.full((6,), level, dtype=torch.float32)
        expected = state_kernel(model, (kept[level], torch.full((3,), level, dtype=torch.float32)), (z, t))
        assert torch.allclose(result.kernel[k], expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


def test_a_resumed_sdxl_style_user_loop_continues_the_ledgers_bit_for_bit(tmp_path):
    """Coverage: save the analyzer, the model and AdamW mid-run, reload into fresh objects, continue."""
    T = 10  # 10 bins over 10 grid levels: some bins hold none
    scheduler = make_edm_scheduler(T, sigma_data=1.3, prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    batches = [(ring(6, seed=10 + k), torch.randn(6, 2, generator=gen, dtype=F64), torch.randint(0, T, (6,), generator=gen))
               for k in range(6)]

    def loop(analyzer, model, optimizer, steps):
        for x0, noise, indices in steps:
            t, sigma = scheduler.timesteps[indices], scheduler.sigmas[indices].to(F64)[:, None]
            z = scheduler.add_noise(x0, noise, t)
            denoised = scheduler.precondition_outputs(z, model(scheduler.precondition_inputs(z, sigma), t), sigma)
            losses = ((denoised - x0) ** 2).mean(dim=1)
            analyzer.observe(losses, t)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    def make_analyzer():
        return NoiseLevelAnalyzer(scheduler, ring(8, seed=3), num_bins=T, num_probes=5, controls=1, kernel_points=2,
                                  band=2, progress=False)

    model = edm_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    straight = make_analyzer()
    straight.bind(model, optimizer)
    loop(straight, model, optimizer, batches)
    model = edm_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    first = make_analyzer()
    first.bind(model, optimizer)
    loop(first, model, optimizer, batches[:3])
    first.save(tmp_path / "analyzer.pt")
    torch.save((model.state_dict(), optimizer.state_dict()), tmp_path / "run.pt")
    model = edm_mlp(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    weights, state = torch.load(tmp_path / "run.pt")
    model.load_state_dict(weights)
    optimizer.load_state_dict(state)
    resumed = make_analyzer()
    resumed.load(tmp_path / "analyzer.pt")
    resumed.bind(model, optimizer, start_step=3)
    loop(resumed, model, optimizer, batches[3:])
    for name, ledger in straight.ledgers.items():
        assert torch.equal(ledger.contributions, resumed.ledgers[name].contributions), name
    assert straight.bin_counts == resumed.bin_counts


@pytest.mark.parametrize("T, schedule, prediction, data, weighted", [
    (10, "exponential", "v_prediction", 1.3, False), (20, "karras", "epsilon", 0.5, True)])
def test_an_sdxl_style_loop_on_a_short_schedule_with_a_bin_per_level_matches_brute_force(T, schedule, prediction, data,
                                                                                         weighted):
    """scheduler.timesteps[indices], add_noise, precondition_inputs/outputs (diffusers'), AdamW and clipping;
    num_bins = T, so some bins hold no grid level."""
    lr, clip, batch = 1e-2, 0.3, 6
    scheduler = make_edm_scheduler(T, sigma_schedule=schedule, prediction_type=prediction, sigma_data=data)
    model, reference = edm_mlp(), edm_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(10, seed=5), num_bins=T, num_probes=5, controls=0,
                                  kernel_points=2, band=2, progress=False)
    analyzer.bind(model, optimizer)
    bin_of = edm_bins(scheduler, T)

    def loss(m, x0, noise, indices):
        t, sigma = scheduler.timesteps[indices], scheduler.sigmas[indices].to(F64)[:, None]
        z = scheduler.add_noise(x0, noise, t)
        denoised = scheduler.precondition_outputs(z, m(scheduler.precondition_inputs(z, sigma), t), sigma)
        weight = (sigma**2 + data**2) / (sigma * data) ** 2 if weighted else 1.0
        return (weight * (denoised - x0) ** 2).mean(dim=1), t

    gen = torch.Generator().manual_seed(1)
    steps = []
    for k in range(3):
        x0, noise = ring(batch, seed=k), torch.randn(batch, 2, generator=gen, dtype=F64)
        indices = torch.randint(0, T, (batch,), generator=gen)
        losses, t = loss(model, x0, noise, indices)
        analyzer.observe(losses, t)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        steps.append([((lambda x, e, i: lambda m: loss(m, x, e, i)[0].sum())(x0[n : n + 1], noise[n : n + 1], indices[n : n + 1]),
                       1 / batch, bin_of(float(scheduler.sigmas[indices[n]]))) for n in range(batch)])
    analyzer.stop()
    expected, _, reference, _ = brute_force_adamw_of_losses(reference, steps, analyzer.probes(torch.zeros((), dtype=F64)), T,
                                                  lr=lr, weight_decay=0.05, clip=clip)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-13) for p, q in zip(model.parameters(), reference.parameters()))
    ok, gap = close(analyzer.contributions, expected, 1e-9)
    assert ok, gap
    counts = torch.tensor(analyzer.bin_counts).sum(dim=0)
    assert torch.equal(counts, torch.bincount(torch.tensor([e[2] for s in steps for e in s]), minlength=T))
