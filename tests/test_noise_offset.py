"""DDPMTrainer's offset noise and input perturbation, as diffusers' text-to-image scripts draw them
(``--noise_offset``, ``--input_perturbation``): the step's noisy input and target equal the scripts' lines
written by hand with diffusers' own ``add_noise`` / ``get_velocity``; a run resumes bit for bit; a checkpoint
of another setting and a perturbation without one meaning (flow matching) are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, make_flow_scheduler, make_scheduler
from test_resume import assert_resumes_bit_for_bit

F64 = torch.float64
T = 50
OFFSET, PERTURBATION = 0.1, 0.2

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvDenoiser(nn.Module):
    """``model(x_t, t)`` on images ``[B, 2, 4, 4]``: a convolution shifted by a learned function of t."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.time = nn.Linear(1, 2)
        self.double()

    def forward(self, x, t):
        return self.conv(x) + self.time(t.to(x.dtype)[:, None] / T)[:, :, None, None]


class StepInputs(TrainerCallback):
    def __init__(self):
        self.noisy, self.targets = [], []

    def on_step_end(self, trainer, step):
        self.noisy.append(step.inputs[0].clone())
        self.targets.append(step.targets.clone())


def images(n=24):
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)


def trainer(*callbacks, scheduler=None, **kwargs):
    settings = dict(noise_offset=OFFSET, input_perturbation=PERTURBATION)
    settings.update(kwargs)
    return DDPMTrainer(ConvDenoiser(), make_scheduler(T) if scheduler is None else scheduler, images(), batch_size=6,
                       lr=1e-2, progress=False, callbacks=list(callbacks), **settings)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_steps_inputs_and_targets_are_the_scripts_offset_and_perturbed_noise(prediction_type):
    recorder = StepInputs()
    ours = trainer(recorder, scheduler=make_scheduler(T, prediction_type=prediction_type))
    ours.train(4)
    twin = trainer(scheduler=make_scheduler(T, prediction_type=prediction_type), noise_offset=0.0,
                   input_perturbation=0.0)  # the same batches, timesteps and noise; the scripts' draws by hand after it
    scheduler = twin.scheduler
    for step in range(4):
        batch = twin.next_batch()
        x, t = batch["clean"], batch["timesteps"]
        offset = torch.randn(6, 2, 1, 1, generator=twin.generator, dtype=F64)
        perturbation = torch.randn(6, 2, 4, 4, generator=twin.generator, dtype=F64)
        noise = batch["noise"] + OFFSET * offset  # train_text_to_image.py: noise += noise_offset * randn(B, C, 1, 1)
        noisy = scheduler.add_noise(x, noise + PERTURBATION * perturbation, t)  # add_noise(latents, new_noise, t)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x, noise, t)
        torch.testing.assert_close(recorder.noisy[step], noisy, rtol=0, atol=1e-12)
        torch.testing.assert_close(recorder.targets[step], target, rtol=0, atol=1e-12)
        assert not torch.allclose(recorder.noisy[step], scheduler.add_noise(x, noise, t))  # (the input is perturbed)


def test_the_offset_alone_is_in_input_and_target_and_draws_one_value_per_channel():
    recorder = StepInputs()
    ours = trainer(recorder, input_perturbation=0.0)
    ours.train(2)
    twin = trainer(noise_offset=0.0, input_perturbation=0.0)
    for step in range(2):
        batch = twin.next_batch()
        noise = batch["noise"] + OFFSET * torch.randn(6, 2, 1, 1, generator=twin.generator, dtype=F64)
        torch.testing.assert_close(recorder.targets[step], noise, rtol=0, atol=0)
        torch.testing.assert_close(recorder.noisy[step], twin.scheduler.add_noise(batch["clean"], noise, batch["timesteps"]),
                                   rtol=0, atol=1e-12)
    # nothing else drawn: the generator stands where the twin's hand draws left it
    assert torch.equal(ours.generator.get_state(), twin.generator.get_state())


def test_offset_noise_under_flow_matching_is_in_the_velocity_target():
    recorder = StepInputs()
    flow = make_flow_scheduler(T, shift=3.0)
    trainer(recorder, scheduler=flow, input_perturbation=0.0).train(2)
    twin = trainer(scheduler=make_flow_scheduler(T, shift=3.0), noise_offset=0.0, input_perturbation=0.0)
    for step in range(2):
        batch = twin.next_batch()
        noise = batch["noise"] + OFFSET * torch.randn(6, 2, 1, 1, generator=twin.generator, dtype=F64)
        torch.testing.assert_close(recorder.targets[step], noise - batch["clean"], rtol=0, atol=1e-15)
        sigma = (batch["timesteps"].to(F64) / T)[:, None, None, None]
        torch.testing.assert_close(recorder.noisy[step], (1 - sigma) * batch["clean"] + sigma * noise, rtol=0, atol=1e-12)


def test_a_run_with_offset_noise_and_input_perturbation_resumes_bit_for_bit(tmp_path):
    assert_resumes_bit_for_bit(trainer, tmp_path, 6, 3)
    with pytest.raises(ValueError, match="noise_offset"):
        trainer(noise_offset=0.05).resume(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="input_perturbation"):
        trainer(input_perturbation=0.0).resume(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_offset=-0.1), "noise_offset must be a finite number >= 0"),
    (dict(noise_offset=float("nan")), "noise_offset must be a finite number >= 0"),
    (dict(input_perturbation=True), "input_perturbation must be a finite number >= 0"),
    (dict(scheduler=make_flow_scheduler(T)), "input_perturbation is the DDPM scripts'"),
])
def test_bad_noise_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer(**kwargs)
