"""EDM (Karras et al. 2022, diffusers' EDMEulerScheduler) in the diffusion objective, trainer,
sampler and noise-level analyzer.

Every check is against something independent of the code under test: diffusers' own
``add_noise``, ``precondition_inputs``, ``precondition_outputs`` and Euler step; the EDM loss
weighting (σ² + σ_d²) / (σ σ_d)² written out; bins recomputed in log-SNR space; a ledger recomputed
by per-example autograd with SGD written out by hand, in a loop written the way diffusers' SDXL
DreamBooth script writes its EDM-style training; sampling that must land on the data point when
the model is the exact denoiser.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genkernel.diffusion import (
    DDPMTrainer,
    MLPDenoiser,
    NoiseLevelAnalyzer,
    make_edm_scheduler,
    make_flow_scheduler,
    make_scheduler,
    noisy_input,
    retrieval_attribution,
    reverse_sample,
    training_target,
)
from genkernel.diffusion.objectives import NoiseBins, check_prediction_type, check_timesteps, training_levels
from genkernel.diffusion.trainer import make_sampler
from test_diffusion import step_adding_midpoint_contributions

from test_flow_matching import flow_mlp as edm_mlp, ring as flow_ring

F64 = torch.float64
T = 50
SIGMA_DATA = 0.5

pytestmark = pytest.mark.usefixtures("one_thread")




def ring(n, seed=0):
    return flow_ring(n, seed, radius=0.5)


def weighting(scheduler, sigmas):
    """The EDM loss weight λ(σ) = (σ² + σ_d²) / (σ σ_d)² (= 1 / c_out²)."""
    data = scheduler.config.sigma_data
    return (sigmas**2 + data**2) / (sigmas * data) ** 2


SETTINGS = [("karras", "epsilon"), ("exponential", "v_prediction")]


# ------------------------------------------------------------------------------------------
# the objective against diffusers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, prediction", SETTINGS)
def test_the_objective_is_diffusers_weighted_edm_loss_and_its_euler_step_follows_it(schedule, prediction):
    scheduler = make_edm_scheduler(T, sigma_schedule=schedule, prediction_type=prediction)
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(6, 3, 4, 4, generator=gen, dtype=F64), torch.randn(6, 3, 4, 4, generator=gen, dtype=F64)
    index = torch.tensor([0, 1, 17, 30, 48, 49])
    t = scheduler.timesteps[index]
    sigmas = scheduler.sigmas[index].to(F64).reshape(-1, 1, 1, 1)
    noisy = scheduler.add_noise(x, noise, t)
    # the network's input: diffusers' precondition_inputs of add_noise
    assert torch.allclose(noisy_input(scheduler, x, noise, t), scheduler.precondition_inputs(noisy, sigmas),
                          rtol=1e-12, atol=1e-12)
    # the plain MSE of the network output F against our target is the weighted EDM loss of D, per example
    target = training_target(scheduler, x, noise, t)
    for seed in range(3):
        output = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        denoised = scheduler.precondition_outputs(noisy, output, sigmas)
        edm = (weighting(scheduler, sigmas) * (denoised - x) ** 2).mean(dim=(1, 2, 3))
        ours = ((output - target) ** 2).mean(dim=(1, 2, 3))
        assert torch.allclose(ours, edm, rtol=1e-12, atol=0)
    # the target is the output that makes D the clean input
    assert torch.allclose(scheduler.precondition_outputs(noisy, target, sigmas), x, rtol=0, atol=1e-12)
    assert check_prediction_type(scheduler) == prediction
    # The sampler's Euler step with the exact output moves x + σ_i ε to x + σ_{i+1} ε: our level is the
    # sampler's timestep, σ = exp(4t), and the state it gives the model is our noisy input.
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(8)
    state = x + float(sampler.sigmas[0]) * noise
    for i, level in enumerate(sampler.timesteps):
        levels = level.repeat(6)
        given = sampler.scale_model_input(state, level)
        assert torch.allclose(given, noisy_input(scheduler, x, noise, levels), rtol=1e-5, atol=1e-6)
        state = sampler.step(training_target(scheduler, x, noise, levels), level, state).prev_sample
        assert torch.allclose(state, x + float(sampler.sigmas[i + 1]) * noise, rtol=1e-5, atol=1e-5)


def test_training_levels_are_the_levels_diffusers_edm_training_draws_whatever_set_timesteps_did():
    scheduler = make_edm_scheduler(T)
    grid, sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
    scheduler.set_timesteps(7)  # a sampling grid replaces timesteps and sigmas on the object
    levels, log_snr = training_levels(scheduler)
    # diffusers' SDXL EDM training: scheduler.timesteps[randint(0, T)], i.e. grid[:T]; ascending t here
    assert levels.dtype == torch.float32 and torch.equal(levels, grid[:T].flip(0))
    assert torch.allclose(log_snr, 2 * torch.log(SIGMA_DATA / sigmas[:T].to(F64)).flip(0), rtol=1e-14, atol=0)
    assert bool((log_snr[1:] < log_snr[:-1]).all())
    # a level is c_noise = ¼ ln σ, diffusers' precondition_noise
    assert torch.allclose(levels.to(F64), 0.25 * torch.log(sigmas[:T].to(F64)).flip(0), rtol=0, atol=1e-6)


def test_levels_out_of_range_indices_and_sigmas_are_refused():
    scheduler = make_edm_scheduler(T)
    low, high = float(scheduler.timesteps[-1]), float(scheduler.timesteps[0])
    x = torch.zeros(2, 2)
    check_timesteps(torch.tensor([low, high], dtype=F64), scheduler)  # both ends, in float64 too
    check_timesteps(torch.tensor([low - 1e-6, high + 1e-6], dtype=F64), scheduler)  # float32 rounding of ¼ ln σ
    # beyond the grid's σ range (an unclamped continuous σ) up to 10 σ_max: levels, booked to the end bins
    top = 0.25 * math.log(10 * 80.0)
    check_timesteps(torch.tensor([low - 3.0, top], dtype=F64), scheduler)
    for bad in (torch.tensor([top + 0.01, 0.0]), torch.tensor([math.nan, 0.0]), torch.tensor([-math.inf, 0.0])):
        with pytest.raises(ValueError, match="¼ ln σ.*not sigmas or indices"):
            noisy_input(scheduler, x, x, bad)
    with pytest.raises(TypeError, match="grid indices"):
        noisy_input(scheduler, x, x, torch.tensor([3, 10]))
    # Sigmas in place of timesteps: σ > ¼ ln σ always, and the levels drawn uniformly from the grid
    # have σ above the highest level accepted, ¼ ln(10 σ_max), this often, so a stream of sigmas is
    # refused within a few examples.
    above = float((scheduler.sigmas[:T] > top).double().mean())
    assert 0.5 < above < 0.7
    sigmas = scheduler.sigmas[torch.randint(0, T, (8,), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="not sigmas"):
        check_timesteps(sigmas, scheduler)
    with pytest.raises(ValueError, match="prediction_type"):
        make_edm_scheduler(T, prediction_type="sample")


# ------------------------------------------------------------------------------------------
# bins
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_log_snr_bins_are_equal_widths_of_log_snr_and_hold_every_level(schedule):
    scheduler = make_edm_scheduler(T, sigma_schedule=schedule)
    num_bins = 6
    bins = NoiseBins(scheduler, num_bins)
    levels, log_snr = training_levels(scheduler)
    bounds = torch.linspace(float(log_snr.max()), float(log_snr.min()), num_bins + 1, dtype=F64)
    # independent: the bin of t is the number of inner boundaries at or above its log SNR 2 ln(σ_d / σ)
    low, high = float(scheduler.timesteps[-1]), float(scheduler.timesteps[0])
    t = torch.cat([low + (high - low) * torch.rand(3000, generator=torch.Generator().manual_seed(1), dtype=F64),
                   torch.tensor([low, high], dtype=F64), levels.double()])
    lam = 2 * (math.log(SIGMA_DATA) - 4 * t)
    expected = (bounds[1:-1][None, :] >= lam[:, None]).sum(1)
    got = bins(t)
    far = (lam[:, None] - bounds[1:-1][None, :]).abs().min(1).values > 1e-9  # not on a boundary
    assert torch.equal(got[far], expected[far]) and far.sum() > 2990
    assert bool((got >= 0).all()) and bool((got < num_bins).all())
    assert set(bins(levels).tolist()) == set(range(num_bins))  # every bin holds grid levels
    # the edges are the boundaries' levels, equal widths of log SNR (and of t: log SNR is linear in t)
    assert bins.edges[0] == low and bins.edges[-1] == high
    assert torch.allclose(bins.log_snr[1:-1], bounds[1:-1], rtol=0, atol=1e-12)
    widths = bins.edges[2:-1] - bins.edges[1:-2]
    assert torch.allclose(widths, widths[:1].expand_as(widths), rtol=1e-12)
    assert bins.centers.dtype == torch.float32
    middles = 2 * (math.log(SIGMA_DATA) - 4 * bins.centers.double())
    assert torch.allclose(middles, (bounds[:-1] + bounds[1:]) / 2, rtol=0, atol=1e-5)
    timestep = NoiseBins(scheduler, num_bins, "timestep")
    assert torch.allclose(timestep.edges, torch.linspace(low, high, num_bins + 1, dtype=F64), rtol=0, atol=1e-15)


def test_ddpm_and_flow_bins_are_unchanged():
    """Coverage (passes on the code before EDM): the values NoiseBins gave at that commit."""
    expected = {
        (make_scheduler(20), "log_snr"): ([0, 1, 3, 8, 20], [0, 1, 4, 12]),
        (make_scheduler(20, rescale_betas_zero_snr=True), "log_snr"): ([0, 1, 4, 14, 20], [0, 1, 8, 17]),
        (make_scheduler(20, "squaredcos_cap_v2", "v_prediction"), "log_snr"): ([0, 7, 17, 19, 20], [2, 13, 18, 19]),
        (make_flow_scheduler(20), "log_snr"): (
            [0.0, 3.732109937267415, 9.999999999999998, 16.267890062732583, 20.0],
            [1.980100154876709, 6.477108478546143, 13.522891998291016, 18.019899368286133]),
        (make_flow_scheduler(20, shift=3.0), "log_snr"): (
            [0.0, 8.153393460246544, 14.999999653351956, 18.579211948490943, 20.0],
            [4.958473205566406, 11.792922019958496, 17.2464656829834, 19.293323516845703]),
        (make_flow_scheduler(20), "timestep"): ([0.0, 5.0, 10.0, 15.0, 20.0], [2.5, 7.5, 12.5, 17.5]),
    }
    for (scheduler, spacing), (edges, centers) in expected.items():
        bins = NoiseBins(scheduler, 4, spacing)
        assert bins.edges.tolist() == edges and bins.centers.tolist() == centers
    flow = NoiseBins(make_flow_scheduler(20, shift=3.0), 4)
    assert flow.log_snr.tolist() == [3.69165336259242, 0.7472144850675768, -2.197224392457267, -5.141663269982113,
                                     -math.inf]


# ------------------------------------------------------------------------------------------
# the analyzer's ledger against brute force, in a loop written like diffusers' SDXL EDM script
# ------------------------------------------------------------------------------------------
def edm_loss(scheduler, model, x0, noise, indices, weighted):
    """Per-example loss ``[B]`` as train_dreambooth_lora_sdxl.py --do_edm_style_training builds it with an
    EDM scheduler (unweighted: that script sets no weighting for EDM schedulers), or weighted by the EDM
    paper's λ(σ): returns ``(losses, timesteps)``."""
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].to(F64)[:, None]
    noisy = scheduler.add_noise(x0, noise, timesteps)
    model_input = scheduler.precondition_inputs(noisy, sigmas)
    denoised = scheduler.precondition_outputs(noisy, model(model_input, timesteps), sigmas)
    weight = weighting(scheduler, sigmas) if weighted else 1.0
    return (weight * (denoised - x0) ** 2).mean(dim=1), timesteps


@pytest.mark.parametrize("weighted", [False, True], ids=["sdxl_unweighted", "edm_weighted"])
@pytest.mark.parametrize("schedule, prediction", SETTINGS)
def test_ledger_of_an_sdxl_style_edm_loop_matches_brute_force_and_adds_up(schedule, prediction, weighted):
    scheduler = make_edm_scheduler(T, sigma_schedule=schedule, prediction_type=prediction)
    num_bins, lr = 4, 2e-2
    model, reference = edm_mlp(), edm_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(12, seed=5), num_bins=num_bins, num_probes=8, controls=0,
                                  kernel_points=2, progress=False)
    analyzer.bind(model, optimizer)
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        x0, noise = ring(8, seed=int(torch.randint(0, 10**6, (1,), generator=gen))), torch.randn(8, 2, generator=gen, dtype=F64)
        indices = torch.randint(0, scheduler.config.num_train_timesteps, (8,), generator=gen)
        losses, timesteps = edm_loss(scheduler, model, x0, noise, indices, weighted)
        analyzer.observe(losses, timesteps)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        batches.append((x0, noise, indices))
    # brute force: per-example autograd of the same loss, SGD by hand, bins from log SNR recomputed
    params = list(reference.parameters())
    z_probe, s_probe = analyzer.probes(torch.zeros((), dtype=F64))[:2]
    bounds = torch.linspace(float(training_levels(scheduler)[1].max()), float(training_levels(scheduler)[1].min()),
                            num_bins + 1, dtype=F64)
    expected = torch.zeros(z_probe.shape[0], num_bins, z_probe.shape[1], dtype=F64)
    for x0, noise, indices in batches:
        lam = 2 * torch.log(SIGMA_DATA / scheduler.sigmas[indices].to(F64))
        bins = (bounds[1:-1][None, :] >= lam[:, None]).sum(1)
        updates = [[torch.zeros_like(p) for p in params] for _ in range(num_bins)]
        for n in range(x0.shape[0]):
            loss = edm_loss(scheduler, reference, x0[n : n + 1], noise[n : n + 1], indices[n : n + 1], weighted)[0].sum()
            for u, g in zip(updates[int(bins[n])], torch.autograd.grad(loss, params)):
                u -= lr * g / x0.shape[0]
        step_adding_midpoint_contributions(reference, updates, (z_probe, s_probe), expected)
    ours = analyzer.contributions
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    # the bins add up to the probes' real change (the midpoint rule's residual in float64)
    assert analyzer.residual()["relative_residual"] < 1e-3
    assert int(torch.tensor(analyzer.bin_counts).sum()) == 24
    # the probes are the network inputs at real levels (the bin centres, some negative)
    assert analyzer.probe_timesteps.dtype == torch.float32 and float(analyzer.probe_timesteps.min()) < 0


# ------------------------------------------------------------------------------------------
# the trainer, the sampler, schedules that differ
# ------------------------------------------------------------------------------------------
def train(steps, *, analyzer=None, checkpoint_dir=None, scheduler=None):
    trainer = DDPMTrainer(edm_mlp(), scheduler or make_edm_scheduler(T), ring(64), batch_size=16, lr=1e-2,
                          progress=False, callbacks=[] if analyzer is None else [analyzer], checkpoint_dir=checkpoint_dir)
    trainer.train(steps)
    return trainer


def test_the_trainer_draws_grid_levels_trains_the_edm_loss_and_is_unchanged_under_the_analyzer():
    bare = train(4)
    analyzer = NoiseLevelAnalyzer(make_edm_scheduler(T), ring(16, seed=1), num_bins=4, num_probes=8, controls=1,
                                  kernel_points=2, progress=False)
    tracked = train(4, analyzer=analyzer)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert bare.losses == tracked.losses
    assert analyzer.residual()["relative_residual"] < 1e-3 and analyzer.ledger.steps == 4
    batch = bare.next_batch()
    scheduler = bare.scheduler
    assert batch["timesteps"].dtype == torch.float32
    assert set(batch["timesteps"].tolist()) <= set(scheduler.timesteps[:T].tolist())
    # the batch is diffusers' EDM training: input c_in (x + σ ε), and MSE(F, target) = λ(σ) MSE(D, x)
    indices = [scheduler.timesteps.tolist().index(v) for v in batch["timesteps"].tolist()]
    sigmas = scheduler.sigmas[indices].to(F64)[:, None]
    noisy = scheduler.add_noise(batch["clean"], batch["noise"], batch["timesteps"])
    assert torch.allclose(batch["noisy"], scheduler.precondition_inputs(noisy, sigmas), rtol=1e-12, atol=1e-12)
    output = bare.model(batch["noisy"], batch["timesteps"]).detach()
    edm = (weighting(scheduler, sigmas) * (scheduler.precondition_outputs(noisy, output, sigmas) - batch["clean"]) ** 2)
    assert torch.allclose(((output - batch["target"]) ** 2).mean(1), edm.mean(1), rtol=1e-10, atol=0)


def test_an_edm_checkpoint_resumes_exactly_and_a_ddpm_or_flow_one_is_refused(tmp_path):
    straight = train(4)
    first = train(2, checkpoint_dir=tmp_path / "edm")
    first.save_checkpoint()
    resumed = DDPMTrainer(edm_mlp(), make_edm_scheduler(T), ring(64), batch_size=16, lr=1e-2, progress=False,
                          checkpoint_dir=tmp_path / "edm")
    resumed.resume()
    resumed.train(2)
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters()))
    assert straight.losses == resumed.losses
    for other in (make_scheduler(T), make_flow_scheduler(T)):
        model = edm_mlp() if other.config.get("shift") else MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
        trainer = DDPMTrainer(model, other, ring(64), batch_size=16, lr=1e-2, progress=False, checkpoint_dir=tmp_path / "other")
        trainer.train(1)
        trainer.save_checkpoint()
        edm = DDPMTrainer(edm_mlp(), make_edm_scheduler(T), ring(64), batch_size=16, lr=1e-2, progress=False,
                          checkpoint_dir=tmp_path / "other")
        with pytest.raises(ValueError, match="noise_schedule"):
            edm.resume()
    # and an EDM checkpoint with another σ_d
    other = DDPMTrainer(edm_mlp(), make_edm_scheduler(T, sigma_data=1.0), ring(64), batch_size=16, lr=1e-2,
                        progress=False, checkpoint_dir=tmp_path / "edm")
    with pytest.raises(ValueError, match="noise_schedule"):
        other.resume()


class ExactDenoiser(nn.Module):
    """The network whose EDM denoiser D is the one data point x0: F = (x0 − c_skip z) / c_out, with z and
    σ recovered from its input c_in z and level t = ¼ ln σ."""

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0 = nn.Parameter(x0.clone())
        self.sign = 1.0 if prediction == "epsilon" else -1.0

    def forward(self, given, t):
        sigma = torch.exp(4 * t.to(F64))[:, None]
        scale = torch.sqrt(sigma**2 + SIGMA_DATA**2)
        z = given.to(F64) * scale
        c_skip, c_out = SIGMA_DATA**2 / scale**2, self.sign * sigma * SIGMA_DATA / scale
        return ((self.x0 - c_skip * z) / c_out).to(given.dtype)


@pytest.mark.parametrize("schedule, prediction", SETTINGS)
def test_euler_sampling_with_the_exact_denoiser_lands_on_the_data_point(schedule, prediction):
    x0 = torch.tensor([0.7, -1.3], dtype=F64)
    scheduler = make_edm_scheduler(T, sigma_schedule=schedule, prediction_type=prediction)
    samples, kept = reverse_sample(ExactDenoiser(x0, prediction), scheduler, (5, 2), num_inference_steps=6, keep=[0.0])
    assert torch.allclose(samples, x0.expand(5, 2), rtol=0, atol=1e-5)
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(6)
    nearest = min(sampler.timesteps.tolist(), key=lambda v: abs(v - 0.0))
    assert list(kept) == [nearest]  # kept at the sampler's own float level
    # the kept state is what the model was given there: c_in x_t, of scale about 1
    assert float(kept[nearest].std()) < 10


def test_schedules_of_another_kind_or_sigma_range_are_refused():
    from diffusers import DDPMScheduler

    edm, wider, ddpm, flow = make_edm_scheduler(T), make_edm_scheduler(T, sigma_max=120.0), make_scheduler(T), \
        make_flow_scheduler(T)
    with pytest.raises(ValueError, match="noise schedule"):
        make_sampler(edm, DDPMScheduler)
    with pytest.raises(ValueError, match="noise schedule"):
        make_sampler(edm, wider)
    for analyzer_scheduler, trainer_scheduler in ((edm, wider), (ddpm, edm), (edm, ddpm), (edm, flow),
                                                  (edm, make_edm_scheduler(T, sigma_data=1.0)),
                                                  (edm, make_edm_scheduler(T, prediction_type="v_prediction"))):
        analyzer = NoiseLevelAnalyzer(analyzer_scheduler, ring(8), num_bins=4, num_probes=4, kernel_points=2,
                                      progress=False)
        model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double() if trainer_scheduler is ddpm else edm_mlp()
        trainer = DDPMTrainer(model, trainer_scheduler, ring(32), batch_size=8, progress=False, callbacks=[analyzer])
        with pytest.raises(ValueError, match="another noise schedule"):
            trainer.train(1)


def test_a_saved_edm_analyzer_is_refused_by_an_analyzer_of_another_noise_process():
    def analyzer(scheduler, levels):
        return NoiseLevelAnalyzer(scheduler, ring(8), num_bins=4, bin_spacing="timestep", num_probes=4,
                                  probe_levels=levels, controls=0, kernel_points=2, progress=False)

    edm = make_edm_scheduler(T)
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5])
    saved = analyzer(edm, levels)
    model = edm_mlp()
    saved.bind(model, torch.optim.SGD(model.parameters(), lr=0.1))
    saved.step(ring(8), torch.randn(8, 2, dtype=F64), edm.timesteps[:8])
    state = saved.state_dict()
    analyzer(make_edm_scheduler(T), levels).load_state_dict(state)  # the same schedule loads
    with pytest.raises(ValueError, match="noise_schedule"):
        analyzer(make_edm_scheduler(T, sigma_data=1.0), levels).load_state_dict(state)
    # another process, with the saved bin edges and probe levels forced equal: refused for the process
    for other in (make_scheduler(T), make_flow_scheduler(T)):
        there = analyzer(other, torch.tensor([1, 2, 3, 4]) if other.config.get("shift") is None else
                         torch.tensor([1.0, 2.0, 3.0, 4.0]))
        forced = {**state, "config": {**state["config"], "bin_edges": there.bins.edges.tolist(),
                                      "probe_timesteps": there.probe_timesteps.tolist()}}
        with pytest.raises(ValueError, match="noise_process"):
            there.load_state_dict(forced)


def test_retrieval_and_the_summary_read_edm_states_at_real_levels(tmp_path):
    import json

    from genkernel.report import summarize

    scheduler = make_edm_scheduler(T)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(16, seed=1), num_bins=4, num_probes=8, controls=1,
                                  kernel_points=2, snapshot_every=2, progress=False)
    trainer = train(4, analyzer=analyzer)
    result = retrieval_attribution(trainer.model, scheduler, ring(10, seed=4), num_samples=3, stages=[0.8, -1.0],
                                   num_inference_steps=5, top_k=2)
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(5)
    levels = sampler.timesteps.tolist()
    expected = sorted({min(levels, key=lambda v: abs(v - s)) for s in (0.8, -1.0)}, reverse=True)
    assert result.stages.tolist() == pytest.approx(expected, rel=1e-7) and result.kernel.shape == (2, 3, 10)
    assert torch.isfinite(result.kernel).all()
    default = retrieval_attribution(trainer.model, scheduler, ring(10, seed=4), num_samples=2, num_stages=2,
                                    num_inference_steps=5, top_k=2)
    assert default.stages.tolist() == pytest.approx([levels[0], levels[-1]], rel=1e-7)
    mine = analyzer.report()
    path = tmp_path / "analyzer.pt"
    analyzer.save(path)
    (summary,) = summarize(path)["states"].values()
    json.dumps(summary, allow_nan=False)
    probe_levels = sorted(mine["config"]["probe_levels"])
    assert min(probe_levels) < 0 and any(not float(v).is_integer() for v in probe_levels)
    assert summary["settings"]["probe_levels"] == probe_levels
    assert summary["settings"]["bin_edges"] == pytest.approx(analyzer.bins.edges.tolist(), rel=1e-15)
    assert [r["level"] for r in summary["locality"]["per_level"]] == probe_levels
    names = [g["name"] for g in summary["top_groups_by_level"][0]["top_groups"]]
    assert any("-1.554" in name for name in names if name.startswith("bin 0 "))


def test_a_tiny_unet_trained_on_edm_by_the_trainer_is_unchanged_by_the_analyzer_and_its_ledger_adds_up():
    from genkernel.diffusion import tiny_unet

    def run(analyzer):
        torch.manual_seed(3)
        model = tiny_unet(8, 1, channels=(8, 16), attention=False).double()
        images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=F64) * SIGMA_DATA
        trainer = DDPMTrainer(model, make_edm_scheduler(T, sigma_schedule="exponential", prediction_type="v_prediction"),
                              images, batch_size=4, lr=1e-2, optimizer="sgd", progress=False,
                              callbacks=[] if analyzer is None else [analyzer])
        trainer.train(2)
        return trainer

    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64) * SIGMA_DATA
    analyzer = NoiseLevelAnalyzer(make_edm_scheduler(T, sigma_schedule="exponential", prediction_type="v_prediction"),
                                  images, num_bins=3, num_probes=2, controls=0, kernel_points=2, progress=False)
    bare, tracked = run(None), run(analyzer)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert bare.losses == tracked.losses
    assert analyzer.ledger.steps == 2 and analyzer.residual()["relative_residual"] < 1e-3


def test_edm_schedulers_of_another_grid_are_refused_for_training_and_sampling():
    """EDMDPMSolverMultistepScheduler has the same preconditioning but another grid (T points and a final
    σ = 0 among its sigmas): read as EDMEulerScheduler's, its levels would include σ = 0 (log SNR +inf)."""
    from diffusers import EDMDPMSolverMultistepScheduler

    solver = EDMDPMSolverMultistepScheduler(num_train_timesteps=T)
    with pytest.raises(ValueError, match="EDMEulerScheduler"):
        NoiseBins(solver, 4)
    with pytest.raises(ValueError, match="noise schedule"):
        make_sampler(make_edm_scheduler(T), EDMDPMSolverMultistepScheduler)
