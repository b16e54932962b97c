"""DDPMTrainer(dream=p): DREAM (Zhou et al. 2024), diffusers' text-to-image scripts' ``--dream_training``.

Before each step the model's own no-grad prediction ε̂ corrects the noisy input and the target,
z' = z + sqrt(1 − ᾱ_t) δ, y' = ε + δ, δ = sqrt(1 − ᾱ_t)^p (ε − ε̂), and the step trains on (z', y').
The step's inputs equal diffusers' ``compute_dream_and_update_latents`` bit for bit (float32); three steps
with micro-batches equal a loop written by hand (float64); an analyzer's ledgers add up and training is bit
for bit without it; with dropout, a refused step draws its DREAM forward's dropout again, and a run resumes
bit for bit; schedulers and models DREAM does not define are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_flow_scheduler, make_scheduler
from test_failed_step_retry import RefusesOnce
from test_resume import assert_resumes_bit_for_bit
from test_trainer_vae import assert_booked_as_trained_bare

F64 = torch.float64
T = 50

pytestmark = pytest.mark.usefixtures("one_thread")


def make_unet(dtype=F64, dropout=0.0, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, dropout=dropout).to(dtype)


def data(n=12, dtype=F64):
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)


class StepRecord(TrainerCallback):
    """Each step's noisy input, target, timesteps and noise, as the step trains on them."""

    def __init__(self):
        self.noisy, self.targets, self.timesteps, self.noise, self.extra = [], [], [], [], []

    def on_step_end(self, trainer, step):
        self.noisy.append(step.inputs[0].clone())
        self.targets.append(step.targets.clone())
        self.timesteps.append(step.info["timesteps"].clone())
        self.noise.append(step.info["noise"].clone())
        self.extra.append(tuple(t.clone() for t in step.inputs[2:]))


def trainer(*callbacks, model=None, **kwargs):
    settings = dict(batch_size=4, lr=1e-3, seed=3, progress=False)
    settings.update(kwargs)
    return DDPMTrainer(make_unet() if model is None else model, make_scheduler(T), settings.pop("data", data()),
                       callbacks=list(callbacks), **settings)


@pytest.mark.parametrize("detail_preservation", [1.0, 0.5])
def test_the_steps_inputs_are_diffusers_dream_correction_bit_for_bit(detail_preservation):
    """A cross-attention UNet in float32 (the text-to-image scripts' set-up): the first step's noisy input and
    target are what ``compute_dream_and_update_latents`` makes of an uncorrected twin's (DREAM draws nothing
    from the trainer's generator, so the twin draws the same batch, levels and noise)."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import compute_dream_and_update_latents

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=6,
                                attention_head_dim=2, norm_num_groups=4)
    before = copy.deepcopy(unet)
    prompts = torch.randn(12, 3, 6, generator=torch.Generator().manual_seed(2))
    kwargs = dict(data=data(dtype=torch.float32), embeddings=prompts, conditional="embeddings")
    dream, plain = StepRecord(), StepRecord()
    trainer(dream, model=unet, dream=detail_preservation, **kwargs).train(1)
    trainer(plain, model=copy.deepcopy(before), **kwargs).train(1)
    noisy, target = compute_dream_and_update_latents(
        before, make_scheduler(T), plain.timesteps[0], plain.noise[0], plain.noisy[0], plain.targets[0],
        plain.extra[0][0], detail_preservation)
    assert torch.equal(dream.noisy[0], noisy) and torch.equal(dream.targets[0], target)
    assert not torch.equal(noisy, plain.noisy[0])  # (a correction that did something)


def test_three_steps_in_micro_batches_equal_a_loop_written_by_hand():
    """float64, Adam, micro_batches=2 (DREAM's forward runs per micro-batch, the update on the whole batch): the
    weights after three steps equal a loop that corrects each step's draws by the paper's formula."""
    run = trainer(dream=1.0, micro_batches=2)
    draws = StepRecord()
    trainer(draws).train(3)  # the draws: the batch order, the levels and the noise do not depend on the weights
    model = make_unet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    alphas = make_scheduler(T).alphas_cumprod.to(F64)
    for step in range(3):
        z, t, eps = draws.noisy[step], draws.timesteps[step], draws.noise[step]
        spread = (1 - alphas[t]).sqrt().reshape(-1, 1, 1, 1)
        with torch.no_grad():
            delta = spread * (eps - model(z, t).sample)
        z, y = z + spread * delta, eps + delta
        optimizer.zero_grad()
        ((model(z, t).sample - y) ** 2).mean(dim=(1, 2, 3)).mean().backward()
        optimizer.step()
    run.train(3)
    for p, q in zip(run.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_an_analyzer_books_the_corrected_steps_and_training_is_bit_for_bit_without_it():
    run = trainer(dream=1.0)
    analyzer = NoiseLevelAnalyzer(run.scheduler, data(4), num_bins=2, num_probes=4, controls=1, kernel_points=2,
                                  progress=False)
    run.callbacks.append(analyzer)
    assert_booked_as_trained_bare(run, trainer(dream=1.0), analyzer, 3)
    assert analyzer.step_losses == {"mse, on DREAM-corrected inputs and targets (p = 1)": 3}


def test_with_dropout_the_analyzer_draws_nothing_the_dream_and_training_forwards_draw():
    """Dropout 0.3: the masks of the DREAM forward and of the training forward come from the global RNG; the
    analyzer's passes (at bind, the cost estimate's count of the model among them) fork it, so a run with the
    analyzer attached trains bit for bit as one without (each built and trained from the same global state)."""
    runs = []
    for attached in (True, False):
        run = trainer(model=make_unet(dropout=0.3), dream=1.0)  # (make_unet seeds the global RNG)
        if attached:
            run.callbacks.append(NoiseLevelAnalyzer(run.scheduler, data(4), num_bins=2, num_probes=4, controls=1,
                                                    kernel_points=2, progress=False))
        run.train(3)
        runs.append(run)
    assert all(torch.equal(p, q) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()))
    assert runs[0].callbacks[0].ledger.steps == 3


def test_with_dropout_a_refused_step_draws_its_dream_forwards_dropout_again():
    """The DREAM forward draws dropout from the global RNG before the step: a step refused after it hands the
    draws back (the global RNG to before that forward), so the run continued equals the straight run."""
    straight = trainer(model=make_unet(dropout=0.3), dream=1.0)
    straight.train(3)
    run = trainer(RefusesOnce(2), model=make_unet(dropout=0.3), dream=1.0)
    run.train(1)
    with pytest.raises(RuntimeError, match="refused"):
        run.train(1)
    run.train(2)
    assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), straight.model.parameters()))


def test_a_dropout_run_resumes_bit_for_bit_and_a_checkpoint_without_dream_is_refused(tmp_path):
    assert_resumes_bit_for_bit(lambda **kw: trainer(model=make_unet(dropout=0.3), dream=1.0, **kw), tmp_path,
                               total=4, stop=2)
    with pytest.raises(ValueError, match="dream: saved 1.0, here None"):
        trainer().resume(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("case, match", [
    (dict(dream=-1.0), "finite number >= 0"),
    (dict(dream=float("nan")), "finite number >= 0"),
    (dict(dream=True), "finite number >= 0"),
    (dict(scheduler=make_scheduler(T, prediction_type="v_prediction")), "prediction_type 'v_prediction'"),
    (dict(scheduler=make_flow_scheduler(T)), "flow_matching"),
    (dict(scheduler=make_scheduler(T, variance_type="learned_range")), "predicts its variance"),
])
def test_what_dream_does_not_define_is_refused(case, match):
    scheduler = case.pop("scheduler", make_scheduler(T))
    with pytest.raises(ValueError, match=match):
        DDPMTrainer(make_unet(), scheduler, data(), batch_size=4, progress=False, **{"dream": 1.0, **case})
