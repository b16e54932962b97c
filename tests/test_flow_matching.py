"""Flow matching (rectified flow, diffusers' FlowMatchEulerDiscreteScheduler) in the diffusion
objective, trainer, sampler and noise-level analyzer.

Every check is against something independent of the code under test: diffusers' own sigmas,
``scale_noise`` and Euler step; bins recomputed in log-SNR space; a ledger recomputed by
per-example autograd with SGD written out by hand, in a loop written the way diffusers' SD3
training script writes it; sampling that must land on the data point when the model is the
exact velocity field.
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
    make_flow_scheduler,
    make_scheduler,
    noisy_input,
    retrieval_attribution,
    reverse_sample,
    training_target,
)
from genkernel.diffusion.objectives import NoiseBins, check_prediction_type, training_levels
from genkernel.diffusion.trainer import make_sampler
from test_diffusion import step_adding_midpoint_contributions

F64 = torch.float64
T = 100

pytestmark = pytest.mark.usefixtures("one_thread")


def flow_mlp(seed=0):
    """A small float64 MLP denoiser of real levels (flow matching's t = σ·T, EDM's ¼ ln σ)."""
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=16, depth=2, time_dim=8, time_input="continuous").double()


def ring(n, seed=0, radius=2.0):
    """``n`` float64 points ``[n, 2]`` uniform on a circle of ``radius``."""
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 * math.pi
    return radius * torch.stack([angle.cos(), angle.sin()], dim=1)


# ------------------------------------------------------------------------------------------
# the objective against diffusers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_objective_is_diffusers_flow_and_its_euler_step_follows_it(shift):
    scheduler = make_flow_scheduler(T, shift=shift)
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 3, 4, 4, generator=gen)
    index = torch.tensor([0, 5, 37, 50, 98, 99])
    t = scheduler.timesteps[index]
    sigma = scheduler.sigmas[index].reshape(-1, 1, 1, 1)
    # diffusers' SD3 training script: noisy = (1 - σ) x + σ ε, target = noise - x
    assert torch.allclose(noisy_input(scheduler, x, noise, t), (1 - sigma) * x + sigma * noise, atol=1e-6)
    assert torch.allclose(noisy_input(scheduler, x, noise, t), scheduler.scale_noise(x, t, noise), atol=1e-6)
    assert torch.equal(training_target(scheduler, x, noise, t), noise - x)
    assert check_prediction_type(scheduler) == "flow"
    # The sampler's Euler step with the true velocity moves z_t to z_t' of the same (x, ε): our
    # level t is the sampler's, σ = t / T.
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(8)
    x64, e64 = x.double(), noise.double()
    for i, level in enumerate(sampler.timesteps):
        z = noisy_input(scheduler, x64, e64, level.repeat(6))
        moved = sampler.step(training_target(scheduler, x64, e64, level.repeat(6)), level, z).prev_sample
        following = x64 if i + 1 == len(sampler.timesteps) else noisy_input(
            scheduler, x64, e64, sampler.timesteps[i + 1].repeat(6))
        assert torch.allclose(moved, following, atol=1e-5)


def test_training_levels_are_the_constructors_grid_whatever_set_timesteps_did():
    scheduler = make_flow_scheduler(T, shift=3.0)
    grid = scheduler.timesteps.clone()
    scheduler.set_timesteps(7)  # a sampling grid replaces timesteps and sigmas on the object
    levels, log_snr = training_levels(scheduler)
    assert torch.equal(levels, grid.flip(0))
    sigma = levels.double() / T
    assert torch.allclose(log_snr[:-1], torch.log(((1 - sigma) / sigma) ** 2)[:-1], rtol=1e-12)
    assert bool((log_snr[1:] <= log_snr[:-1]).all()) and log_snr[-1] == -math.inf  # σ = 1 at t = T


def test_bad_levels_and_dynamic_shifting_are_refused():
    scheduler = make_flow_scheduler(T)
    x = torch.zeros(2, 2)
    for bad in (torch.tensor([-0.5, 3.0]), torch.tensor([3.0, T + 0.5]), torch.tensor([math.nan, 1.0])):
        with pytest.raises(ValueError, match=r"\[0, 100\]"):
            noisy_input(scheduler, x, x, bad)
    with pytest.raises(TypeError, match="real timesteps"):
        noisy_input(scheduler, x, x, torch.tensor([True, False]))
    from diffusers import FlowMatchEulerDiscreteScheduler
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        NoiseBins(FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, use_dynamic_shifting=True), 4)
    with pytest.raises(ValueError, match="shift"):
        make_flow_scheduler(T, shift=0.0)


# ------------------------------------------------------------------------------------------
# bins
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_log_snr_bins_are_equal_widths_of_log_snr_over_any_real_level(shift):
    scheduler = make_flow_scheduler(T, shift=shift)
    num_bins = 6
    bins = NoiseBins(scheduler, num_bins)
    levels, log_snr = training_levels(scheduler)
    finite = log_snr[torch.isfinite(log_snr)]
    bounds = torch.linspace(float(finite.max()), float(finite.min()), num_bins + 1, dtype=F64)
    # independent: the bin of t is the number of inner boundaries at or above its log SNR
    t = torch.cat([torch.rand(3000, generator=torch.Generator().manual_seed(1), dtype=F64) * T,
                   torch.tensor([0.0, T], dtype=F64), levels.double()])
    sigma = t / T
    lam = 2 * (torch.log1p(-sigma) - torch.log(sigma))
    expected = (lam[:, None] <= bounds[None, 1:-1]).sum(dim=1)
    assert torch.equal(bins(t), expected)
    got = bins(levels)
    assert bool((got[1:] >= got[:-1]).all()) and int(got[0]) == 0 and int(got[-1]) == num_bins - 1
    assert torch.equal(bins(bins.centers), torch.arange(num_bins))
    widths = bins.log_snr[1:-1].diff()
    assert torch.allclose(widths, widths.mean().expand_as(widths), rtol=1e-9)


def test_timestep_bins_are_equal_widths_of_t():
    bins = NoiseBins(make_flow_scheduler(T), 4, "timestep")
    t = torch.tensor([0.0, 24.99, 25.0, 49.9, 50.0, 74.0, 75.0, 100.0])
    assert bins(t).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert bins.centers.tolist() == [12.5, 37.5, 62.5, 87.5]


# ------------------------------------------------------------------------------------------
# the analyzer's ledger against brute force, in a loop written like diffusers' SD3 script
# ------------------------------------------------------------------------------------------
def brute_force_sgd(model, batches, probes, bin_of, num_bins, lr):
    """Per-example autograd and SGD by hand: contributions ``[M, G, d]`` (midpoint rule). ``batches``:
    ``(z, t, target, c)`` with c ``[B]`` the examples' coefficients in the step's loss Σ c_n ℓ_n; ``lr``
    one rate, or one per step (a schedule's)."""
    params = list(model.parameters())
    z_probe, s_probe = probes
    total = torch.zeros(z_probe.shape[0], num_bins, z_probe.shape[1], dtype=F64)
    rates = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(batches)
    for (z, t, target, coefficients), lr in zip(batches, rates, strict=True):
        bins = bin_of(t)
        updates = [[torch.zeros_like(p) for p in params] for _ in range(num_bins)]
        for n in range(z.shape[0]):
            loss = ((model(z[n : n + 1], t[n : n + 1]) - target[n : n + 1]) ** 2).mean()
            for u, g in zip(updates[int(bins[n])], torch.autograd.grad(loss, params)):
                u -= lr * float(coefficients[n]) * g
        step_adding_midpoint_contributions(model, updates, probes, total)
    return total


def test_ledger_of_an_sd3_style_loop_matches_brute_force_and_adds_up():
    scheduler = make_flow_scheduler(T, shift=3.0)
    num_bins, lr = 4, 5e-2
    model, reference = flow_mlp(), flow_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(12, seed=5), num_bins=num_bins, num_probes=8, controls=0,
                                  kernel_points=2)
    analyzer.bind(model, optimizer)
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        x0, noise = ring(8, seed=int(torch.randint(0, 10**6, (1,), generator=gen))), torch.randn(8, 2, generator=gen, dtype=F64)
        # compute_density_for_timestep_sampling("logit_normal"), then the grid's timesteps and sigmas
        u = torch.sigmoid(torch.randn(8, generator=gen))
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].to(F64)[:, None]
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        target = noise - x0
        losses = ((model(noisy, timesteps) - target) ** 2).mean(dim=1)
        analyzer.observe(losses, timesteps)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        batches.append((noisy, timesteps, target, torch.full((8,), 1 / 8, dtype=F64)))
    expected = brute_force_sgd(reference, batches, analyzer.probes(torch.zeros((), dtype=F64))[:2], analyzer.bins,
                               num_bins, lr)
    ours = analyzer.contributions
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    # the bins add up to the probes' real change (the midpoint rule's residual in float64)
    assert analyzer.residual()["relative_residual"] < 1e-3
    assert int(torch.tensor(analyzer.bin_counts).sum()) == 24


def test_timesteps_passed_as_sigmas_are_refused():
    scheduler = make_flow_scheduler(1000)
    model = flow_mlp()
    analyzer = NoiseLevelAnalyzer(scheduler, ring(8), num_bins=4, num_probes=4, controls=0, kernel_points=2)
    analyzer.bind(model, torch.optim.SGD(model.parameters(), lr=0.1))
    sigmas = torch.rand(8, generator=torch.Generator().manual_seed(0))
    losses = (model(ring(8), sigmas * 1000) ** 2).mean(dim=1)
    with pytest.raises(ValueError, match="look like sigmas"):
        analyzer.observe(losses, sigmas)


# ------------------------------------------------------------------------------------------
# the trainer, the sampler, schedules that differ
# ------------------------------------------------------------------------------------------
def train(steps, *, analyzer=None, checkpoint_dir=None, model=None):
    trainer = DDPMTrainer(model or flow_mlp(), make_flow_scheduler(T, shift=3.0), ring(64), batch_size=16, lr=1e-2,
                          progress=False, callbacks=[] if analyzer is None else [analyzer], checkpoint_dir=checkpoint_dir)
    trainer.train(steps)
    return trainer


def test_the_trainer_draws_grid_levels_and_trains_unchanged_under_the_analyzer():
    bare = train(4)
    analyzer = NoiseLevelAnalyzer(make_flow_scheduler(T, shift=3.0), ring(16, seed=1), num_bins=4, num_probes=8,
                                  controls=1, kernel_points=2)
    tracked = train(4, analyzer=analyzer)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert bare.losses == tracked.losses
    assert analyzer.residual()["relative_residual"] < 1e-3 and analyzer.ledger.steps == 4
    batch = bare.next_batch()
    grid = set(training_levels(bare.scheduler)[0].tolist())
    assert batch["timesteps"].dtype == torch.float32 and set(batch["timesteps"].tolist()) <= grid
    assert torch.equal(batch["target"], batch["noise"] - batch["clean"])


def test_a_flow_checkpoint_resumes_exactly_and_a_ddpm_one_is_refused(tmp_path):
    straight = train(4)
    first = train(2, checkpoint_dir=tmp_path)
    first.save_checkpoint()
    resumed = DDPMTrainer(flow_mlp(), make_flow_scheduler(T, shift=3.0), ring(64), batch_size=16, lr=1e-2,
                          progress=False, checkpoint_dir=tmp_path)
    resumed.resume()
    resumed.train(2)
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters()))
    ddpm = DDPMTrainer(MLPDenoiser(hidden=16, depth=2, time_dim=8).double(), make_scheduler(T, prediction_type="epsilon"),
                       ring(64), batch_size=16, lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="noise_schedule|prediction_type"):
        ddpm.resume()


class ExactVelocity(nn.Module):
    """The flow's velocity field when the data is one point x0: v(z, t) = (z − x0) / σ."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = nn.Parameter(x0.clone())

    def forward(self, z, t):
        return (z - self.x0) / (t.to(z.dtype) / T)[:, None]


def test_euler_sampling_with_the_exact_velocity_lands_on_the_data_point():
    x0 = torch.tensor([0.7, -1.3], dtype=F64)
    scheduler = make_flow_scheduler(T, shift=3.0)
    samples, kept = reverse_sample(ExactVelocity(x0), scheduler, (5, 2), num_inference_steps=6, keep=[60.0])
    assert torch.allclose(samples, x0.expand(5, 2), atol=1e-5)
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(6)
    nearest = min(sampler.timesteps.tolist(), key=lambda v: abs(v - 60.0))
    assert list(kept) == [nearest]  # kept at the sampler's own float level


def test_schedules_of_another_kind_or_shift_are_refused():
    flow, shifted, ddpm = make_flow_scheduler(T), make_flow_scheduler(T, shift=3.0), make_scheduler(T)
    with pytest.raises(ValueError, match="noise schedule"):
        make_sampler(flow, type(ddpm))
    with pytest.raises(ValueError, match="noise schedule"):
        make_sampler(ddpm, type(flow))
    for analyzer_scheduler, trainer_scheduler in ((flow, shifted), (ddpm, flow), (flow, ddpm)):
        analyzer = NoiseLevelAnalyzer(analyzer_scheduler, ring(8), num_bins=4, num_probes=4, kernel_points=2)
        model = flow_mlp() if trainer_scheduler is not ddpm else MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
        trainer = DDPMTrainer(model, trainer_scheduler, ring(32), batch_size=8, progress=False, callbacks=[analyzer])
        with pytest.raises(ValueError, match="another noise schedule"):
            trainer.train(1)


def test_denoisers_take_real_levels_only_when_built_for_them():
    x = torch.zeros(3, 2, dtype=F64)
    assert flow_mlp()(x, torch.tensor([0.5, 10.25, 99.0])).shape == (3, 2)
    with pytest.raises(TypeError, match="time_input='continuous'"):
        MLPDenoiser(hidden=8, depth=1, time_dim=4).double()(x, torch.tensor([0.5, 10.25, 99.0]))
    with pytest.raises(ValueError, match="time_input"):
        MLPDenoiser(time_input="float")


def test_retrieval_reads_the_kernel_at_the_samplers_float_levels():
    scheduler = make_flow_scheduler(T, shift=3.0)
    trainer = train(3)
    result = retrieval_attribution(trainer.model, scheduler, ring(10, seed=4), num_samples=3, stages=[80.0, 20.0],
                                   num_inference_steps=5, top_k=2)
    sampler = make_sampler(scheduler)
    sampler.set_timesteps(5)
    levels = sampler.timesteps.tolist()
    expected = sorted({min(levels, key=lambda v: abs(v - s)) for s in (80.0, 20.0)}, reverse=True)
    assert result.stages.tolist() == expected and result.kernel.shape == (2, 3, 10)
    assert torch.isfinite(result.kernel).all()


def test_a_saved_flow_analyzer_is_summarized_at_its_real_levels(tmp_path):
    import json

    from genkernel.report import format_summary, render_report, summarize
    from genkernel.plotting.diffusion import plot_noise_matrices

    analyzer = NoiseLevelAnalyzer(make_flow_scheduler(T, shift=3.0), ring(16, seed=1), num_bins=4, num_probes=8,
                                  controls=1, kernel_points=2, snapshot_every=2)
    train(4, analyzer=analyzer)
    mine = analyzer.report()
    path = tmp_path / "analyzer.pt"
    analyzer.save(path)
    (summary,) = summarize(path)["states"].values()
    json.dumps(summary, allow_nan=False)
    levels = sorted(mine["config"]["probe_levels"])
    assert any(not float(v).is_integer() for v in levels)  # real levels, not truncated to integers
    assert summary["settings"]["probe_levels"] == levels
    assert summary["settings"]["bin_edges"] == pytest.approx(analyzer.bins.edges.tolist(), rel=1e-15)
    assert [r["level"] for r in summary["locality"]["per_level"]] == levels
    assert [r["level"] for r in mine["locality"]["per_level"]] == mine["config"]["probe_levels"][:4]
    for key in ("traffic", "share", "traffic_control", "share_control"):
        expected = torch.tensor(mine["matrices"][key], dtype=F64)[torch.tensor(mine["config"]["probe_levels"][:4]).argsort()]
        got = torch.tensor([[math.nan if v is None else v for v in row] for row in summary["matrices"][key]], dtype=F64)
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14, equal_nan=True), key
    names = [g["name"] for g in summary["top_groups_by_level"][0]["top_groups"]]
    assert all("." in name for name in names if not name.startswith("bin 0 ")) and "100" in format_summary(summarize(path))
    assert "t=" in render_report(path, animate=False)
    plot_noise_matrices(mine)
