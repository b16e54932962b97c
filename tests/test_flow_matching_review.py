"""Review of flow matching in the diffusion package, in the set-ups people run: diffusers' SD3/FLUX
training loops (logit-normal / mode / uniform timestep sampling, SD3 loss weightings, AdamW, gradient
accumulation, clipping by global norm, an EMA), a class-conditional UNet2DModel trained by the
DDPMTrainer, continuous-time levels (t = 0 and t = T included) on a short schedule with more bins
than grid levels, and a resumed checkpoint.

Every ledger is checked against an independent float64 brute force: per-example autograd, bins
recomputed in log-SNR space from the scheduler's grid, AdamW (per-bin first moments, the shared
second moment, decoupled decay in the rest), clipping and the EMA's split written out by hand, and
contributions ⟨∇f(θ_mid), u_g⟩ at the midpoint of every step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_flow_scheduler

from test_flow_matching import flow_mlp, ring

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")




def log_snr_bins(scheduler, num_bins, spacing="log_snr"):
    """The bin of a level t, recomputed: equal widths of λ = 2 log((1 − σ)/σ), σ = t/T, between the
    finite extremes of the grid (scheduler.timesteps / T); a level joins the bin after every inner
    boundary at or above its λ. ``spacing="timestep"``: floor(t G / T), t = T in the last."""
    total = scheduler.config.num_train_timesteps

    def lam(t):
        sigma = t.double() / total
        return 2 * (torch.log1p(-sigma) - torch.log(sigma))

    grid = lam(scheduler.timesteps)
    finite = grid[torch.isfinite(grid)]
    bounds = torch.linspace(float(finite.max()), float(finite.min()), num_bins + 1, dtype=F64)
    if spacing == "timestep":
        return lambda t: (t.double() * num_bins / total).floor().long().clamp(max=num_bins - 1)
    return lambda t: (lam(t)[:, None] <= bounds[None, 1:-1]).sum(dim=1)


def brute_force_adamw(model, steps, probes, num_groups, *, lr, weight_decay=0.0, clip=math.inf, ema_decay=None,
                      betas=(0.9, 0.999), eps=1e-8):
    """The ledger ``[M, G, d]`` (and the EMA's) of AdamW steps, recomputed by hand.

    ``steps``: per optimizer step a list of examples ``(inputs tuple, target, coefficient c_n, group)``
    whose loss is Σ_n c_n mean((f(inputs) − target)²); ``probes``: ``(z [M, ...], s [M], *conditioning)``."""

    def mse(inputs, target):
        def loss_of(module):
            out = module(*inputs)
            return ((getattr(out, "sample", out) - target) ** 2).mean()
        return loss_of

    closures = [[(mse(inputs, target), c, g) for inputs, target, c, g in examples] for examples in steps]
    return brute_force_adamw_of_losses(model, closures, probes, num_groups, lr=lr, weight_decay=weight_decay,
                                       clip=clip, ema_decays=None if ema_decay is None else [ema_decay] * len(steps),
                                       betas=betas, eps=eps)


def brute_force_adamw_of_losses(model, steps, probes, num_groups, *, lr, weight_decay=0.0, clip=math.inf,
                                ema_decays=None, betas=(0.9, 0.999), eps=1e-8):
    """:func:`brute_force_adamw` of any per-example losses: ``steps``, per optimizer step a list of
    ``(loss closure(model) -> scalar, coefficient c_n, group)``; ``ema_decays``: the EMA's decay at every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    ema = copy.deepcopy(model)
    ema_params = [p for p in ema.parameters() if p.requires_grad]
    rows = num_groups + 1  # the groups, then the rest (decoupled weight decay)

    def outputs(module, m):
        out = module(*(x[m : m + 1] for x in probes))
        return getattr(out, "sample", out).reshape(-1)

    num_probes, dim = probes[0].shape[0], outputs(model, 0).numel()
    total = torch.zeros(num_probes, num_groups, dim, dtype=F64)
    ema_total = torch.zeros_like(total)
    first = [[torch.zeros_like(p) for p in params] for _ in range(num_groups)]
    second = [torch.zeros_like(p) for p in params]
    moved = [[torch.zeros_like(p) for p in params] for _ in range(rows)]  # D_g: θ − θ_0 per row
    offset = [[torch.zeros_like(p) for p in params] for _ in range(rows)]  # E_g: θ̄ − θ̄_0 per row

    def push(module, module_params, updates, into):
        start = [p.detach().clone() for p in module_params]
        delta = [sum(u[i] for u in updates) for i in range(len(module_params))]
        with torch.no_grad():
            for p, a, d in zip(module_params, start, delta):
                p.copy_(a + 0.5 * d)
        for m in range(num_probes):
            out = outputs(module, m)
            for j in range(dim):
                jac = torch.autograd.grad(out[j], module_params, retain_graph=True)
                for g in range(num_groups):
                    into[m, g, j] += sum((a * u).sum() for a, u in zip(jac, updates[g]))
        with torch.no_grad():
            for p, a, d in zip(module_params, start, delta):
                p.copy_(a + d)

    for k, examples in enumerate(steps, 1):
        grads = [[torch.zeros_like(p) for p in params] for _ in range(num_groups)]
        for loss_of, c, g in examples:
            for acc, grad in zip(grads[g], torch.autograd.grad(loss_of(model), params)):
                acc += c * grad
        full = [sum(grads[g][i] for g in range(num_groups)) for i in range(len(params))]
        norm = float(torch.sqrt(sum((f**2).sum() for f in full)))
        scale = min(1.0, clip / (norm + 1e-6))
        full = [f * scale for f in full]
        first = [[betas[0] * m + (1 - betas[0]) * scale * x for m, x in zip(first[g], grads[g])]
                 for g in range(num_groups)]
        second = [betas[1] * v + (1 - betas[1]) * f * f for v, f in zip(second, full)]
        denom = [torch.sqrt(v / (1 - betas[1] ** k)) + eps for v in second]
        updates = [[-lr * m / (1 - betas[0] ** k) / d for m, d in zip(first[g], denom)] for g in range(num_groups)]
        updates.append([-lr * weight_decay * p.detach() for p in params])
        push(model, params, updates, total)
        if ema_decays is not None:
            ema_decay = ema_decays[k - 1]
            moved = [[a + u for a, u in zip(moved[g], updates[g])] for g in range(rows)]
            steps_ema = [[(1 - ema_decay) * (a - e) for a, e in zip(moved[g], offset[g])] for g in range(rows)]
            push(ema, ema_params, steps_ema, ema_total)
            offset = [[e + s for e, s in zip(offset[g], steps_ema[g])] for g in range(rows)]
    return total, ema_total, model, ema


def close(ours, expected, rtol):
    gap = float((ours - expected).abs().max())
    return gap <= rtol * float(expected.abs().max()), gap


def record_batches(trainer):
    """The list every batch ``trainer`` draws from now on is appended to (its ``next_batch`` wrapped)."""
    batches, draw = [], trainer.next_batch
    trainer.next_batch = lambda: batches.append(draw()) or batches[-1]
    return batches


def assert_the_run_is_the_brute_force(analyzer, params, ema_params, brute_force, example_bins, num_bins):
    """The tracked run against :func:`brute_force_adamw`'s ``(total, ema_total, model, ema)``: the weights
    and the EMA's to 1e-13, the ledger and the EMA ledger to 1e-9 of their largest contribution, the bins'
    counts those of ``example_bins`` (every example's bin), and a small residual."""
    expected, expected_ema, reference, reference_ema = brute_force
    assert all(torch.allclose(p, q, rtol=0, atol=1e-13) for p, q in zip(params, reference.parameters()))
    assert all(torch.allclose(p, q, rtol=0, atol=1e-13) for p, q in zip(ema_params, reference_ema.parameters()))
    ok, gap = close(analyzer.contributions, expected, 1e-9)
    assert ok, gap
    ok, gap = close(analyzer.ema_ledgers["level"].contributions.cpu(), expected_ema, 1e-9)
    assert ok, gap
    counts = torch.tensor(analyzer.bin_counts).sum(dim=0)
    assert torch.equal(counts, torch.bincount(torch.tensor(example_bins), minlength=num_bins))
    assert analyzer.residual()["relative_residual"] < 1e-3


# ------------------------------------------------------------------------------------------
# timesteps passed as sigmas in loops of small batches (FLUX's scripts give the model t / 1000)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,accumulation", [(1, 1), (2, 2), (3, 1)])
def test_sigmas_in_small_batches_are_refused_by_the_fourth_example(batch, accumulation):
    """A batch of 4 sigmas was refused, 1 to 3 booked every example to bin 0 without an error."""
    scheduler = make_flow_scheduler(1000)
    model = flow_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(8), num_bins=4, num_probes=4, controls=0, kernel_points=2,
                                  progress=False)
    analyzer.bind(model, optimizer)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="look like sigmas"):
        for _ in range(4):
            for _ in range(accumulation):
                sigmas = torch.rand(batch, generator=gen, dtype=F64)
                losses = (model(ring(batch), sigmas) ** 2).mean(dim=1)  # FLUX: timestep = timesteps / 1000
                analyzer.observe(losses, sigmas)
                (losses.mean() / accumulation).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert analyzer.ledger.steps * batch * accumulation < 4


def test_a_real_lowest_level_among_others_is_not_taken_for_sigmas():
    scheduler = make_flow_scheduler(1000)  # shift 1: the grid's lowest level is t = 1 (σ = 1/T)
    model = flow_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(8), num_bins=4, num_probes=4, controls=0, kernel_points=2,
                                  progress=False)
    analyzer.bind(model, optimizer)
    for t in ([1.0], [1.0, 1.0], [500.0], [1.0], [1.0, 1.0], [730.0]):  # never 4 in a row
        timesteps = torch.tensor(t)
        losses = (model(ring(len(t)), timesteps) ** 2).mean(dim=1)
        analyzer.observe(losses, timesteps)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert analyzer.ledger.steps == 6


# ------------------------------------------------------------------------------------------
# coverage: the ledgers of the loops people run, against brute force
# ------------------------------------------------------------------------------------------
def density(scheme, n, gen):
    """diffusers' compute_density_for_timestep_sampling."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    u = torch.rand(n, generator=gen)
    if scheme == "mode":
        return 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sd3_weighting(scheme, sigmas):
    """diffusers' compute_loss_weighting_for_sd3."""
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


@pytest.mark.parametrize("pass_weights", [False, True])
def test_an_sd3_loop_with_adamw_accumulation_clipping_weighting_and_ema_matches_brute_force(pass_weights):
    T, num_bins, lr, weight_decay, clip, decay, batch, accumulation = 1000, 5, 1e-2, 1e-2, 0.5, 0.7, 4, 2
    scheduler = make_flow_scheduler(T, shift=3.0)
    model, reference = flow_mlp(), flow_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(12, seed=5), num_bins=num_bins, num_probes=6, controls=0,
                                  kernel_points=2, progress=False)
    analyzer.bind(model, optimizer, ema=ema)
    bin_of = log_snr_bins(scheduler, num_bins)
    gen = torch.Generator().manual_seed(3)
    steps = []
    for k, (sampling, weighting) in enumerate([("logit_normal", "sigma_sqrt"), ("mode", "cosmap"), ("uniform", "none")]):
        examples = []
        for a in range(accumulation):
            x0, noise = ring(batch, seed=100 * k + a), torch.randn(batch, 2, generator=gen, dtype=F64)
            indices = (density(sampling, batch, gen) * T).long().clamp(max=T - 1)
            if k == 0 and a == 0:
                indices[:2] = torch.tensor([0, T - 1])  # t = T (σ = 1) and the least noisy level
            timesteps = scheduler.timesteps[indices]
            sigmas = scheduler.sigmas[indices].to(F64)[:, None]
            noisy = (1.0 - sigmas) * x0 + sigmas * noise
            target = noise - x0
            w = sd3_weighting(weighting, sigmas)
            if pass_weights:  # the weighting as c_n of Σ c_n ℓ_n
                losses = ((model(noisy, timesteps) - target) ** 2).mean(dim=1)
                c = w[:, 0] / (batch * accumulation)
                analyzer.observe(losses, timesteps, weights=c)
                (losses * c).sum().backward()
            else:  # the weighting inside the per-example loss, as the SD3 script writes it
                losses = (w * (model(noisy, timesteps) - target) ** 2).mean(dim=1)
                analyzer.observe(losses, timesteps)
                (losses.mean() / accumulation).backward()
            bins = bin_of(timesteps)
            # either way the step's loss is Σ_n c_n mean((f − y)²) with c_n = w_n / (B · accumulation)
            examples += [((noisy[n : n + 1], timesteps[n : n + 1]), target[n : n + 1], float(w[n]) / (batch * accumulation),
                          int(bins[n])) for n in range(batch)]
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(decay).add_(p, alpha=1 - decay)
        steps.append(examples)
    analyzer.stop()
    probes = analyzer.probes(torch.zeros((), dtype=F64))
    brute_force = brute_force_adamw(reference, steps, probes, num_bins, lr=lr, weight_decay=weight_decay, clip=clip,
                                    ema_decay=decay)
    # measured: ledgers 2e-16 and 1e-16 relative
    assert_the_run_is_the_brute_force(analyzer, model.parameters(), ema.parameters(), brute_force,
                                      [e[3] for s in steps for e in s], num_bins)


@pytest.mark.parametrize("spacing", ["log_snr", "timestep"])
def test_continuous_time_levels_with_both_ends_on_a_short_schedule_with_empty_bins(spacing):
    """σ ~ U(0, 1) off the grid, σ = 0 and σ = 1 exactly, T = 10 with 10 bins (some hold no grid
    level), float64 levels given to the model: the ledger is the brute force's."""
    T, num_bins, lr, batch = 10, 10, 1e-2, 6
    scheduler = make_flow_scheduler(T, shift=3.0)
    model, reference = flow_mlp(), flow_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(12, seed=5), num_bins=num_bins, bin_spacing=spacing, num_probes=5,
                                  controls=0, kernel_points=2, band=1, progress=False)
    analyzer.bind(model, optimizer)
    bin_of = log_snr_bins(scheduler, num_bins, spacing)
    assert torch.equal(analyzer.bins(analyzer.levels), bin_of(analyzer.levels))  # probes as observe bins them
    gen = torch.Generator().manual_seed(4)
    steps = []
    for k in range(3):
        x0, noise = ring(batch, seed=k), torch.randn(batch, 2, generator=gen, dtype=F64)
        sigmas = torch.rand(batch, generator=gen, dtype=F64)
        if k == 0:
            sigmas[:2] = torch.tensor([0.0, 1.0])
        timesteps = sigmas * T
        noisy = (1 - sigmas[:, None]) * x0 + sigmas[:, None] * noise
        losses = ((model(noisy, timesteps) - (noise - x0)) ** 2).mean(dim=1)
        analyzer.observe(losses, timesteps)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        bins = bin_of(timesteps)
        steps.append([((noisy[n : n + 1], timesteps[n : n + 1]), (noise - x0)[n : n + 1], 1 / batch, int(bins[n]))
                      for n in range(batch)])
    assert int(bin_of(torch.tensor([0.0]))) == 0 and int(bin_of(torch.tensor([float(T)]))) == num_bins - 1
    expected, _, reference, _ = brute_force_adamw(reference, steps, analyzer.probes(torch.zeros((), dtype=F64)),
                                                  num_bins, lr=lr)
    ok, gap = close(analyzer.contributions, expected, 1e-9)  # measured: 2e-15 relative
    assert ok, gap
    counts = torch.tensor(analyzer.bin_counts).sum(dim=0)
    assert torch.equal(counts, torch.bincount(torch.tensor([e[3] for s in steps for e in s]), minlength=num_bins))


def tiny_class_unet(seed=0, classes=3):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False, dropout=0.0,
                       num_class_embeds=classes).double()


def test_a_class_conditional_unet_trained_by_the_trainer_matches_brute_force_per_level_and_class():
    T, num_bins, classes, lr, clip, batch = 100, 4, 3, 1e-3, 0.3, 6
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(24, 1, 4, 4, generator=gen, dtype=F64)
    labels = torch.arange(24) % classes
    probe, probe_labels = torch.randn(4, 1, 4, 4, generator=gen, dtype=F64), torch.arange(4) % classes

    def trainer(callbacks=()):
        return DDPMTrainer(tiny_class_unet(0, classes), make_flow_scheduler(T, shift=3.0), data, labels=labels,
                           conditional=True, batch_size=batch, lr=lr, max_grad_norm=clip, progress=False,
                           callbacks=list(callbacks))

    bare = trainer()
    bare.train(2)
    scheduler = make_flow_scheduler(T, shift=3.0)
    analyzer = NoiseLevelAnalyzer(scheduler, probe, num_bins=num_bins, num_probes=2, controls=1, kernel_points=2,
                                  probe_conditioning=probe_labels, num_classes=classes, progress=False)
    tracked = trainer([analyzer])
    batches = record_batches(tracked)
    tracked.train(2)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    bin_of = log_snr_bins(scheduler, num_bins)
    steps = []
    for b in batches:
        groups = bin_of(b["timesteps"]) * classes + b["labels"]
        steps.append([((b["noisy"][n : n + 1], b["timesteps"][n : n + 1], b["labels"][n : n + 1]),
                       b["target"][n : n + 1], 1 / batch, int(groups[n])) for n in range(batch)])
    expected, _, reference, _ = brute_force_adamw(tiny_class_unet(0, classes), steps,
                                                  analyzer.probes(torch.zeros((), dtype=F64)), num_bins * classes,
                                                  lr=lr, clip=clip)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(tracked.model.parameters(), reference.parameters()))
    ours = analyzer.ledgers["level_class"].contributions.cpu()
    ok, gap = close(ours, expected, 1e-8)  # measured: 1.5e-10 relative (a UNet's rounding)
    assert ok, gap
    by_level = expected.reshape(expected.shape[0], num_bins, classes, -1).sum(dim=2)
    ok, gap = close(analyzer.contributions, by_level, 1e-8)
    assert ok, gap


def test_a_resumed_flow_run_continues_the_ledgers_bit_for_bit(tmp_path):
    assert_a_resumed_run_continues_the_ledgers_bit_for_bit(lambda: make_flow_scheduler(100, shift=3.0), ring, tmp_path)


def assert_a_resumed_run_continues_the_ledgers_bit_for_bit(scheduler, data, tmp_path):
    """Four AdamW steps (decay, clipping) of the trainer with an analyzer, straight and as 2 + 2 resumed from a
    checkpoint in fresh objects: every ledger and the bin counts equal bit for bit. ``scheduler()`` builds
    the scheduler; ``data(n, seed=)`` the points."""
    def analyzer():
        return NoiseLevelAnalyzer(scheduler(), data(16, seed=1), num_bins=4, num_probes=8, controls=1,
                                  kernel_points=2, snapshot_every=2, progress=False)

    def trainer(callback, checkpoint_dir=None):
        return DDPMTrainer(flow_mlp(), scheduler(), data(64), batch_size=16, lr=1e-2, optimizer="adamw",
                           weight_decay=1e-2, max_grad_norm=0.5, progress=False, callbacks=[callback],
                           checkpoint_dir=checkpoint_dir)

    straight = analyzer()
    trainer(straight).train(4)
    first = trainer(analyzer(), tmp_path)
    first.train(2)
    first.save_checkpoint()
    resumed = analyzer()
    again = trainer(resumed, tmp_path)
    again.resume()
    again.train(2)
    for name, ledger in straight.ledgers.items():
        assert torch.equal(ledger.contributions, resumed.ledgers[name].contributions), name
    assert straight.bin_counts == resumed.bin_counts


# ------------------------------------------------------------------------------------------
# a saved analyzer loaded into another noise process with the same bins
# ------------------------------------------------------------------------------------------
def test_a_saved_analyzer_is_refused_by_an_analyzer_of_another_noise_process_or_shift():
    """Timestep bins are the same ranges of [0, T) for DDPM and flow matching, and for every shift:
    a state of one loaded into the other silently, and its ledgers went on under the other schedule."""
    from genkernel.diffusion import make_scheduler

    def analyzer(scheduler):
        return NoiseLevelAnalyzer(scheduler, ring(8), num_bins=4, bin_spacing="timestep", num_probes=4,
                                  probe_levels=torch.tensor([10, 40, 60, 90]), controls=0, kernel_points=2,
                                  progress=False)

    saved = analyzer(make_flow_scheduler(100, shift=3.0))
    model = flow_mlp()
    saved.bind(model, torch.optim.SGD(model.parameters(), lr=0.1))
    saved.step(ring(8), torch.randn(8, 2, dtype=F64), torch.full((8,), 50.0))
    state = saved.state_dict()
    analyzer(make_flow_scheduler(100, shift=3.0)).load_state_dict(state)  # the same schedule loads
    with pytest.raises(ValueError, match="noise_schedule"):
        analyzer(make_flow_scheduler(100, shift=1.0)).load_state_dict(state)
    with pytest.raises(ValueError, match="noise_process"):
        analyzer(make_scheduler(100)).load_state_dict(state)
