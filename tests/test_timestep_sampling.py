"""Timestep densities and loss weightings of the trainer (genkernel.diffusion.timestep_sampling).

What must hold: the trainer draws what diffusers' training scripts draw (SD3's logit-normal and mode
densities over the grid, the EDM paper's log-normal σ) from its own generator, weighs losses as they
weigh them (Min-SNR-γ, SD3's sigma_sqrt and cosmap), the ledger books the weighted step exactly
(per-example autograd with SGD by hand), training is unchanged by the analyzer, a checkpoint
resumes the draws exactly and refuses another density or weighting, and a density or weighting
that does not apply to the scheduler is refused with a message naming the alternatives.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

from genkernel.diffusion import (
    DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_edm_scheduler, make_flow_scheduler, make_scheduler,
)
from genkernel.diffusion.timestep_sampling import (
    LogitNormal, LogNormal, MinSNR, ModeDensity, SD3Weighting, _GridDensity, make_loss_weighting,
    make_timestep_density,
)
from test_flow_matching import brute_force_sgd, flow_mlp, ring

F64 = torch.float64
T = 40

pytestmark = pytest.mark.usefixtures("one_thread")


def ddpm_mlp(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=16, depth=2, time_dim=8).double()


SCHEDULERS = {
    "ddpm": lambda: make_scheduler(T, prediction_type="v_prediction"),
    "flow": lambda: make_flow_scheduler(T, shift=3.0),
    "edm": lambda: make_edm_scheduler(T),
}
MODELS = {"ddpm": ddpm_mlp, "flow": flow_mlp, "edm": flow_mlp}


def trainer(process, density="uniform", weighting="none", *, optimizer="sgd", lr=5e-2, callbacks=(), **kwargs):
    return DDPMTrainer(MODELS[process](), SCHEDULERS[process](), ring(64), batch_size=16, optimizer=optimizer, lr=lr,
                       timestep_density=density, loss_weighting=weighting, progress=False, callbacks=callbacks,
                       **kwargs)


# ------------------------------------------------------------------------------------------
# the draws and weights against diffusers' scripts
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", ["ddpm", "flow", "edm"])
@pytest.mark.parametrize("density, script_args", [
    (LogitNormal(), {"logit_mean": 0.0, "logit_std": 1.0}),
    (LogitNormal(mean=0.5, std=0.6), {"logit_mean": 0.5, "logit_std": 0.6}),
    (ModeDensity(scale=1.29), {"mode_scale": 1.29}),
])
def test_sd3_densities_draw_the_scripts_timesteps_from_the_trainers_generator(process, density, script_args):
    run = trainer(process, density, shuffle=False, seed=3)
    batch = run.next_batch()
    # diffusers' SD3 script, from the same generator: u, then scheduler.timesteps[(u * T).long()], then the noise
    generator = torch.Generator().manual_seed(3)
    scheme = "mode" if isinstance(density, ModeDensity) else "logit_normal"
    u = compute_density_for_timestep_sampling(scheme, 16, generator=generator, **script_args)
    expected = SCHEDULERS[process]().timesteps[(u * T).long()]
    assert torch.equal(batch["timesteps"], expected.to(batch["timesteps"].dtype))
    assert torch.equal(batch["noise"], torch.randn(16, 2, generator=generator, dtype=F64))


def test_grid_draws_put_u_near_zero_at_the_most_noise_and_clamp_u_one_to_the_grid():
    class Fixed(_GridDensity):
        def _u(self, batch_size, generator):
            return torch.tensor([0.0, 1e-9, 0.5, 1.0 - 1e-7, 1.0])  # u = 1: diffusers would index past the grid

    levels = torch.arange(T)  # least noise first
    drawn = Fixed().draw(make_scheduler(T), levels, 5, torch.Generator())
    assert drawn.tolist() == [T - 1, T - 1, T // 2 - 1, 0, 0]


def test_edm_log_normal_levels_are_a_quarter_of_a_normal_log_sigma():
    density = LogNormal(mean=-1.2, std=1.2)
    generator = torch.Generator().manual_seed(7)
    levels = density.draw(make_edm_scheduler(T), None, 20000, generator)
    again = 0.25 * (-1.2 + 1.2 * torch.randn(20000, generator=torch.Generator().manual_seed(7), dtype=F64))
    assert levels.dtype == torch.float32 and torch.equal(levels, again.float())
    log_sigma = 4 * levels.double()
    # 20000 draws: the mean's standard error is 1.2 / 141 = 0.0085, the std's 0.006
    assert abs(float(log_sigma.mean()) + 1.2) < 0.035 and abs(float(log_sigma.std()) - 1.2) < 0.025
    # continuous and unclamped: levels beyond the grid's σ range on both sides (σ_min 0.002, σ_max 80)
    assert float(log_sigma.min()) < math.log(0.002) and len(set(levels.tolist())) > 19000


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_are_diffusers_text_to_image_formula_and_the_step_minimizes_them(prediction):
    scheduler = make_scheduler(T, prediction_type=prediction)
    timesteps = torch.arange(T)
    # diffusers' train_text_to_image.py with --snr_gamma 5
    snr = compute_snr(scheduler, timesteps)
    script = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction == "epsilon":
        script = script / snr
    elif prediction == "v_prediction":
        script = script / (snr + 1)
    assert torch.equal(MinSNR(gamma=5.0).weights(scheduler, timesteps), script)
    run = DDPMTrainer(ddpm_mlp(), scheduler, ring(64), batch_size=16, optimizer="sgd", lr=5e-2, loss_weighting="min_snr",
                      progress=False)
    batch = run.next_batch()
    assert torch.equal(batch["weights"], (MinSNR().weights(scheduler, batch["timesteps"]) / 16).to(F64))
    twin = DDPMTrainer(ddpm_mlp(), scheduler, ring(64), batch_size=16, optimizer="sgd", lr=5e-2,
                       loss_weighting="min_snr", progress=False)
    loss = twin.train_step()
    # the logged loss is the script's: the mean over the batch of w_n times the per-example MSE
    with torch.no_grad():
        per_example = ((ddpm_mlp()(batch["noisy"], batch["timesteps"]) - batch["target"]) ** 2).mean(dim=1)
    assert loss == pytest.approx(float((per_example * batch["weights"] * 16).mean()), rel=1e-12)
    assert abs(loss - float(per_example.mean())) > 1e-3  # (the weighting changes it)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_sd3_weightings_are_compute_loss_weighting_for_sd3_at_the_grids_sigmas(scheme):
    scheduler = make_flow_scheduler(T, shift=3.0)
    indices = torch.arange(T)
    expected = compute_loss_weighting_for_sd3(scheme, scheduler.sigmas[indices].double())
    ours = SD3Weighting(scheme).weights(scheduler, scheduler.timesteps[indices])
    # σ = t / T in float64 against the scheduler's float32 sigmas
    assert torch.allclose(ours.double(), expected.double(), rtol=2e-6, atol=0)


# ------------------------------------------------------------------------------------------
# the ledger books the weighted step; training unchanged; checkpoints
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process, density, weighting", [
    ("ddpm", "logit_normal", "min_snr"),
    ("flow", "logit_normal", "cosmap"),
    ("flow", ModeDensity(), "sigma_sqrt"),
    ("edm", "log_normal", "none"),
])
def test_the_ledger_of_a_weighted_run_matches_brute_force_and_training_is_unchanged(process, density, weighting):
    steps, lr, num_bins = 3, 5e-2, 4
    bare = trainer(process, density, weighting, lr=lr)
    bare.train(steps)
    analyzer = NoiseLevelAnalyzer(SCHEDULERS[process](), ring(12, seed=5), num_bins=num_bins, num_probes=6,
                                  controls=1, kernel_points=2)
    tracked = trainer(process, density, weighting, lr=lr, callbacks=[analyzer])
    tracked.train(steps)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert bare.losses == tracked.losses
    # the batches both ran on, from a third trainer's generator (same seed), and SGD by hand
    twin = trainer(process, density, weighting, lr=lr)
    batches = [twin.next_batch() for _ in range(steps)]
    assert all("weights" in b for b in batches) == (weighting != "none")
    batches = [(b["noisy"], b["timesteps"], b["target"], b.get("weights", torch.full((16,), 1 / 16, dtype=F64)))
               for b in batches]
    expected = brute_force_sgd(MODELS[process](), batches, analyzer.probes(torch.zeros((), dtype=F64))[:2],
                               analyzer.bins, num_bins, lr)
    ours = analyzer.contributions
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert analyzer.residual()["relative_residual"] < 1e-3


def test_a_weighted_run_resumes_exactly_and_another_density_or_weighting_is_refused(tmp_path):
    straight = trainer("flow", "logit_normal", "cosmap", optimizer="adam", lr=1e-2)
    straight.train(4)
    first = trainer("flow", "logit_normal", "cosmap", optimizer="adam", lr=1e-2, checkpoint_dir=tmp_path)
    first.train(2)
    first.save_checkpoint()
    resumed = trainer("flow", "logit_normal", "cosmap", optimizer="adam", lr=1e-2, checkpoint_dir=tmp_path)
    assert resumed.resume()
    resumed.train(2)
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters()))
    assert straight.losses == resumed.losses
    for density, weighting, setting in [(LogitNormal(std=0.5), "cosmap", "timestep_density"),
                                        ("uniform", "cosmap", "timestep_density"),
                                        ("logit_normal", "sigma_sqrt", "loss_weighting"),
                                        ("logit_normal", "none", "loss_weighting")]:
        other = trainer("flow", density, weighting, optimizer="adam", lr=1e-2, checkpoint_dir=tmp_path)
        with pytest.raises(ValueError, match=setting):
            other.resume()


def test_the_default_uniform_unweighted_run_is_the_one_before_densities_existed():
    """The defaults draw exactly as the trainer always drew: levels[randint(0, T)] and no weights."""
    run = trainer("ddpm", shuffle=False, seed=4)
    batch = run.next_batch()
    generator = torch.Generator().manual_seed(4)
    assert torch.equal(batch["timesteps"], torch.randint(0, T, (16,), generator=generator))
    assert "weights" not in batch and run.build_step(batch).weights is None


# ------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process, density, weighting, message", [
    ("ddpm", "log_normal", "none", "log_normal.*edm.*not ddpm"),
    ("flow", "log_normal", "none", "log_normal.*logit_normal"),
    ("flow", "uniform", "min_snr", "min_snr.*not flow_matching.*sigma_sqrt"),
    ("edm", "uniform", "min_snr", "min_snr.*already weighted"),
    ("ddpm", "uniform", "cosmap", "cosmap.*not ddpm.*min_snr"),
    ("edm", "uniform", "sigma_sqrt", "sigma_sqrt.*not edm"),
    ("ddpm", "gaussian", "none", "timestep_density must be one of"),
    ("ddpm", "uniform", "snr", "loss_weighting must be one of"),
])
def test_a_density_or_weighting_that_does_not_apply_is_refused(process, density, weighting, message):
    with pytest.raises(ValueError, match=message):
        trainer(process, density, weighting)


def test_min_snr_with_epsilon_on_a_zero_terminal_snr_schedule_is_refused():
    scheduler = make_scheduler(T, prediction_type="epsilon", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR.*v_prediction"):
        DDPMTrainer(ddpm_mlp(), scheduler, ring(64), loss_weighting="min_snr", progress=False)
    v_scheduler = make_scheduler(T, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    weights = MinSNR().weights(v_scheduler, torch.arange(T))
    assert bool(torch.isfinite(weights).all()) and float(weights[-1]) == 0.0


@pytest.mark.parametrize("build, message", [
    (lambda: LogitNormal(std=0.0), "std must be positive"),
    (lambda: LogitNormal(mean=math.nan), "mean must be a finite number"),
    (lambda: ModeDensity(scale=2.0), r"scale must lie in \[-1, 2/\(π − 2\)"),
    (lambda: LogNormal(std=-1.0), "std must be positive"),
    (lambda: MinSNR(gamma=0), "gamma must be positive"),
    (lambda: SD3Weighting("logit_normal"), "'sigma_sqrt' or 'cosmap'"),
    (lambda: make_timestep_density(LogitNormal), "timestep_density must be one of"),
    (lambda: make_loss_weighting(None), "loss_weighting must be one of"),
])
def test_bad_parameters_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()
