"""Review of the trainer's timestep densities and loss weightings (genkernel.diffusion.timestep_sampling).

What must hold beyond tests/test_timestep_sampling.py: a checkpoint written before densities existed
(a uniform, unweighted run) is refused by a trainer built with another density or weighting; a
log-normal σ density that draws levels check_timesteps refuses (σ > 10 σ_max) is refused when the
trainer is built; draws beyond the EDM grid's σ range are booked to the end bins and the ledger still
matches per-example SGD by hand; a weighted, conditional DataLoader run with AdamW and clipping
trains bit-identically with and without the analyzer; SD3's mode density stays in [0, 1] at the ends
of its scale range; Min-SNR with x-prediction on a cosine schedule is min(SNR, γ).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_flow_scheduler, make_scheduler
from genkernel.diffusion.timestep_sampling import MODE_SCALE_MAX, LogitNormal, LogNormal, MinSNR, ModeDensity
from test_flow_matching import brute_force_sgd, flow_mlp, ring
from test_timestep_sampling import SCHEDULERS, T, trainer

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def edm_analyzer():
    return NoiseLevelAnalyzer(SCHEDULERS["edm"](), ring(12, seed=5), num_bins=4, num_probes=6, controls=1,
                              kernel_points=2)


# ------------------------------------------------------------------------------------------
# checkpoints written before the densities existed
# ------------------------------------------------------------------------------------------
def test_an_older_checkpoint_is_a_uniform_unweighted_run_and_another_density_or_weighting_refuses_it(tmp_path):
    old = trainer("flow", optimizer="adam", lr=1e-2)
    old.train(2)
    state = old.state_dict()
    for key in ("timestep_density", "loss_weighting"):  # what a checkpoint before f624f83 records
        del state["config"][key]
    # the run it continues could only have drawn uniformly, unweighted: a trainer built so resumes it exactly
    straight = trainer("flow", optimizer="adam", lr=1e-2)
    straight.train(4)
    resumed = trainer("flow", optimizer="adam", lr=1e-2)
    resumed.load_state_dict(state)
    resumed.train(2)
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters()))
    assert straight.losses == resumed.losses
    # one with SD3's density or weighting would mix two runs, as a saved "uniform" one refuses it
    for density, weighting, setting in [("logit_normal", "none", "timestep_density"),
                                        ("uniform", "cosmap", "loss_weighting")]:
        other = trainer("flow", density, weighting, optimizer="adam", lr=1e-2)
        before = [p.clone() for p in other.model.parameters()]
        with pytest.raises(ValueError, match=setting):
            other.load_state_dict(state)
        assert all(torch.equal(p, q) for p, q in zip(before, other.model.parameters())) and other.global_step == 0


# ------------------------------------------------------------------------------------------
# EDM's log-normal σ and the analyzer's accepted range ¼ ln(10 σ_max)
# ------------------------------------------------------------------------------------------
def test_a_log_normal_density_that_draws_beyond_the_accepted_levels_is_refused_at_construction():
    """ln σ ~ N(0, 3²) exceeds ln(10 σ_max) = ln 800 for 1.3% of the draws; check_timesteps refuses such levels
    (in noisy_input, with or without the analyzer), so the run stopped at a random step (the first, here) with
    a message about sigmas passed in place of levels, after its generator had moved on."""
    wide = LogNormal(mean=0.0, std=3.0)
    with pytest.raises(ValueError, match=r"LogNormal\(mean=0.0, std=3.0\) draws σ > 800 .*probability 0.0129"):
        trainer("edm", wide)
    with pytest.raises(ValueError, match=r"LogNormal\(mean=4.0, std=1.0\) draws σ > 800"):
        trainer("edm", LogNormal(mean=4.0, std=1.0))
    # the EDM paper's P_mean = -1.2, P_std = 1.2 (σ > 800 once in 4·10^10 draws) and EDM2's are accepted,
    # and train under the analyzer
    for density in (LogNormal(), LogNormal(mean=-0.4, std=1.0)):
        accepted = trainer("edm", density, callbacks=[edm_analyzer()])
        accepted.train(2)
        assert accepted.global_step == 2 and accepted.callbacks[0].residual()["steps"] == 2


@pytest.mark.parametrize("density, beyond", [
    (LogNormal(mean=-6.5, std=1.0), "below"),  # σ < σ_min = 0.002 for 60% of the draws
    (LogNormal(mean=3.8, std=0.45), "above"),  # σ > σ_max = 80 for 10%; σ > 800 once in 10^10
])
def test_levels_beyond_the_edm_grid_are_booked_to_the_end_bins_and_the_ledger_matches_brute_force(density, beyond):
    """coverage: the continuous σ the EDM paper draws, outside the grid's range, through the analyzer and summary."""
    from genkernel.report import summarize

    steps, lr, num_bins = 3, 5e-2, 4
    analyzer = edm_analyzer()
    run = trainer("edm", density, lr=lr, callbacks=[analyzer])
    run.train(steps)
    twin = trainer("edm", density, lr=lr)
    batches = [twin.next_batch() for _ in range(steps)]
    low, high = (float(x) for x in (analyzer.levels.min(), analyzer.levels.max()))
    drawn = torch.cat([b["timesteps"] for b in batches]).double()
    outside = drawn < low if beyond == "below" else drawn > high
    assert int(outside.sum()) >= 3
    bins = analyzer.bins(torch.cat([b["timesteps"] for b in batches]))
    assert set(bins[outside].tolist()) == {0 if beyond == "below" else num_bins - 1}
    counts = torch.stack([torch.bincount(analyzer.bins(b["timesteps"]), minlength=num_bins) for b in batches])
    assert analyzer.bin_counts == counts.tolist()
    expected = brute_force_sgd(flow_mlp(),
                               [(b["noisy"], b["timesteps"], b["target"], torch.full((16,), 1 / 16, dtype=F64))
                                for b in batches],
                               analyzer.probes(torch.zeros((), dtype=F64))[:2], analyzer.bins, num_bins, lr)
    assert torch.allclose(analyzer.contributions, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    (summary,) = summarize(analyzer.state_dict())["states"].values()
    assert torch.equal(torch.as_tensor(summary["bin_counts_total"]), counts.sum(0))


# ------------------------------------------------------------------------------------------
# a weighted conditional DataLoader run with AdamW and clipping, float32
# ------------------------------------------------------------------------------------------
class LabelledMLP(nn.Module):
    """An MLP denoiser plus a class embedding: ``forward(x [B, 2], t [B], y [B]) -> [B, 2]``."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.base = MLPDenoiser(hidden=16, depth=2, time_dim=8).to(dtype)
        self.embed = nn.Embedding(3, 2).to(dtype)

    def forward(self, x, t, y):
        return self.base(x, t) + self.embed(y)


def labelled_run(analyzed, dtype=torch.float32, steps=5):
    scheduler = make_scheduler(T, prediction_type="epsilon", beta_schedule="squaredcos_cap_v2")
    data = ring(40).to(dtype)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.arange(40) % 3), batch_size=12,
                                         shuffle=True, generator=torch.Generator().manual_seed(1))  # last batch: 4
    callbacks = [NoiseLevelAnalyzer(scheduler, ring(12, seed=5).to(dtype), probe_conditioning=torch.arange(12) % 3,
                                    num_classes=3, num_bins=4, num_probes=6, controls=1, kernel_points=2)] if analyzed else []
    run = DDPMTrainer(LabelledMLP(dtype), scheduler, loader, optimizer="adamw", lr=1e-2, max_grad_norm=0.5,
                      conditional=True, timestep_density=ModeDensity(scale=0.5), loss_weighting=MinSNR(gamma=2.0),
                      progress=False, callbacks=callbacks)
    run.train(steps)
    return run, (callbacks[0] if callbacks else None)


def test_a_weighted_conditional_loader_run_trains_unchanged_under_the_analyzer_and_logs_what_it_minimizes():
    """coverage: float32 weights, the partial last batch's B, class labels, AdamW and clipping."""
    bare, _ = labelled_run(False)
    tracked, analyzer = labelled_run(True)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert bare.losses == tracked.losses
    assert analyzer.residual()["relative_residual"] < 1e-3
    assert [sum(c) for c in analyzer.bin_counts] == [12, 12, 12, 4, 12]
    # the logged loss is Σ c_n ℓ_n with c_n = min(SNR, γ) / SNR / B at the step's own B
    probe, twin = labelled_run(False, steps=0)[0], labelled_run(False, steps=0)[0]
    for step in range(5):
        batch = twin.next_batch()  # the batch probe.train_step() draws next
        size = batch["clean"].shape[0]
        snr = probe.scheduler.alphas_cumprod.double()[batch["timesteps"]]
        snr = snr / (1 - snr)
        assert torch.allclose(batch["weights"].double(), snr.clamp(max=2.0) / snr / size, rtol=1e-6, atol=0)
        with torch.no_grad():
            per_example = ((probe.model(batch["noisy"], batch["timesteps"], batch["labels"]) - batch["target"]) ** 2)
        logged = probe.train_step()
        assert logged == pytest.approx(float((per_example.mean(1) * batch["weights"]).double().sum()), rel=1e-5)
        assert logged == bare.losses[step]


# ------------------------------------------------------------------------------------------
# SD3's mode density at the ends of its scale range; Min-SNR with x-prediction
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [-1.0, 0.0, 1.29, MODE_SCALE_MAX])
def test_the_mode_density_is_a_density_on_the_unit_interval_over_its_whole_scale_range(scale):
    """coverage: u' = 1 − u − s (cos²(πu/2) − 1 + u) is decreasing from 1 to 0 for s in [−1, 2/(π − 2)], so the
    grid index (u'·T) stays in [0, T] (T only where u' rounds to 1: the least-noise level after the clamp)."""
    density = ModeDensity(scale=scale)
    u = density._u(200_000, torch.Generator().manual_seed(0))
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0
    grid = torch.linspace(0, 1, 10001, dtype=F64)
    exact = 1 - grid - scale * (torch.cos(math.pi * grid / 2) ** 2 - 1 + grid)
    assert bool((exact.diff() <= 1e-12).all()) and float(exact[0]) == 1.0 and abs(float(exact[-1])) < 1e-15
    levels = torch.arange(T)
    drawn = density.draw(make_scheduler(T), levels, 200_000, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, levels.flip(0)[(u * T).long().clamp(max=T - 1)])
    # the mode's mass: the fraction drawn from the noisier half against ∫ of u' over [0, ½] by the CDF
    # P(u' > ½) = P(u < u*(½)) with u* the root of u'(u) = ½
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        value = 1 - mid - scale * (math.cos(math.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = (mid, hi) if value > 0.5 else (lo, mid)
    assert abs(float((u > 0.5).double().mean()) - lo) < 5 * math.sqrt(0.25 / 200_000)


def test_min_snr_with_x_prediction_on_a_cosine_schedule_is_min_snr_gamma_in_float64():
    """coverage: w = min(SNR, γ) (the paper's x-prediction weight), finite down to the clipped last β."""
    scheduler = make_scheduler(T, prediction_type="sample", beta_schedule="squaredcos_cap_v2")
    alphas = scheduler.alphas_cumprod.double()
    snr = alphas / (1 - alphas)
    weights = MinSNR(gamma=5.0).weights(scheduler, torch.arange(T))
    assert weights.dtype == torch.float32 and bool(torch.isfinite(weights).all())
    assert torch.allclose(weights.double(), snr.clamp(max=5.0), rtol=1e-5, atol=0)
    assert float(weights[0]) == 5.0 and float(weights[-1]) < 1e-5


# ------------------------------------------------------------------------------------------
# float16 models: c_n = w / B where w itself overflows float16
# ------------------------------------------------------------------------------------------
def test_a_float16_models_coefficients_are_w_over_b_where_w_alone_overflows_float16():
    """SD3's "sigma_sqrt" w = σ⁻² is 10⁶ at the least-noise level σ = 1/1000 of a T = 1000 grid: w cast to
    float16 first was inf, so c_n = inf (a NonFiniteError "non-finite gradient" at the step, and an infinite
    coefficient for the ledger); w / B = 62500 fits. (The step Σ c_n ℓ_n over such a batch still exceeds
    float16's 65504 unless the losses are small: diffusers computes this loss in float32.)"""
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8, time_input="continuous").half()
    scheduler = make_flow_scheduler(1000)
    least_noise = LogitNormal(mean=9.0, std=0.3)  # u = sigmoid(9 ± 1) > 0.999: the last grid index
    run = DDPMTrainer(model, scheduler, ring(64).half(), batch_size=16, optimizer="sgd", lr=1e-9,
                      timestep_density=least_noise, loss_weighting="sigma_sqrt", progress=False)
    batch = run.next_batch()
    sigma = batch["timesteps"].double() / 1000
    assert float(sigma.min()) == pytest.approx(1e-3, rel=1e-6)
    assert batch["weights"].dtype == torch.float16
    assert torch.equal(batch["weights"], (sigma ** -2 / 16).half())
    assert float(batch["weights"].max()) == pytest.approx(62500, rel=1e-3)
