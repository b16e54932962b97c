"""A second read of ``DDPMTrainer(dream=p)`` and ``ControlNetDenoiser``, against diffusers' scripts.

ControlNet: ``train_controlnet.py`` (and the SDXL script) load the UNet with ``from_pretrained`` (eval mode),
freeze it and call ``controlnet.train()`` only: the frozen UNet never runs in train mode. The trainer's
``model.train()`` must not switch the frozen UNet's dropout on (a fault this file found: the ControlNet's
weights after two steps were 4e-3 off the script's loop for a UNet with dropout 0.5).

DREAM (coverage): the corrected inputs equal ``compute_dream_and_update_latents`` with offset noise, input
perturbation, dropped prompts and an uneven last micro-batch; under bf16 autocast the correction reads the
prediction as accelerate hands it to the script (the bf16 output cast to float32), bit for bit; with
BatchNorm and dropout a refused step restores the buffers the DREAM forward advanced.
"""

from __future__ import annotations

import copy

import pytest
import torch

from genkernel.diffusion import ControlNetDenoiser, DDPMTrainer, make_scheduler
from test_failed_step_retry import RefusesOnce
from test_controlnet import Seen, controlnet_from, cross_attention_unet, train_as_the_script
from test_controlnet import data as conditioning_data

F64 = torch.float64
T, N, L, D = 50, 12, 3, 6

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# ControlNet: the frozen UNet stays in eval mode, as the scripts leave it
# ------------------------------------------------------------------------------------------
def controlnet_pair(unet_dropout):
    """A frozen UNet (in eval mode, as ``from_pretrained`` returns it) with dropout, and a ControlNet from it whose
    zero convolutions are given weights (so the residuals steer the UNet from the first step)."""
    unet = cross_attention_unet(dropout=unet_dropout).requires_grad_(False).eval()
    return unet, controlnet_from(unet)


def test_a_frozen_unets_dropout_stays_off_as_train_controlnet_leaves_it():
    """train_controlnet.py calls ``controlnet.train()`` and never ``unet.train()``: its frozen UNet (loaded in eval
    mode) runs without dropout. Two AdamW steps of the trainer equal that loop on the trainer's draws (1e-12,
    float64), and the UNet is in eval mode after ``train``. (Before the fix the trainer's ``model.train()`` put the
    UNet in train mode: dropout 0.5 in the frozen UNet, the ControlNet's weights 4e-3 off the script's.)"""
    seen = Seen()
    unet, controlnet = controlnet_pair(unet_dropout=0.5)
    latents, prompts, controls = conditioning_data()
    run = DDPMTrainer(ControlNetDenoiser(unet, controlnet), make_scheduler(T), latents, conditional="embeddings",
                      embeddings=(prompts, controls), batch_size=4, progress=False, callbacks=[seen],
                      optimizer=torch.optim.AdamW(controlnet.parameters(), lr=1e-3))
    run.train(2)
    script_controlnet = train_as_the_script(*controlnet_pair(unet_dropout=0.5), seen)
    for p, q in zip(run.model.controlnet.parameters(), script_controlnet.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
    assert not run.model.unet.training and run.model.controlnet.training


def test_a_unet_trained_beside_the_controlnet_follows_the_trainers_mode():
    """coverage (the fix's bound): a UNet with trainable parameters is not the scripts' frozen one: it trains in
    train mode (its dropout on), as the trainer's other models do, and ``eval()`` puts both in eval mode."""
    unet, controlnet = controlnet_pair(unet_dropout=0.5)
    unet.requires_grad_(True)
    model = ControlNetDenoiser(unet, controlnet).train()
    assert model.unet.training and model.controlnet.training
    model.eval()
    assert not model.unet.training and not model.controlnet.training


def test_guided_sampling_keeps_the_control_image_in_the_unconditional_rows():
    """coverage: ``trainer.sample(..., embeddings=(prompts, controls), guidance_scale=w)`` with ``null_embedding=(e0,
    None)`` calls the model once on [conditional; unconditional] rows whose control images are the samples' own in
    both halves and whose prompts are the null in the second, as StableDiffusionControlNetPipeline's guidance
    duplicates the image (``image = torch.cat([image] * 2)``) beside the negative and the positive prompts."""
    unet, controlnet = controlnet_pair(unet_dropout=0.0)
    latents, prompts, controls = conditioning_data()
    null = torch.zeros(L, D, dtype=F64)
    run = DDPMTrainer(ControlNetDenoiser(unet, controlnet), make_scheduler(T), latents, conditional="embeddings",
                      embeddings=(prompts, controls), class_dropout=0.5, null_embedding=(null, None), batch_size=4,
                      progress=False, optimizer=torch.optim.AdamW(controlnet.parameters(), lr=1e-3))
    run.train(1)
    calls = []
    forward = run.model.forward

    def recording(z, t, e, c):
        output = forward(z, t, e, c)
        calls.append((z, t, e, c, output))
        return output

    run.model.forward = recording
    run.sample(2, embeddings=(prompts[:2], controls[:2]), guidance_scale=3.0, num_inference_steps=1)
    (z, t, e, c, output), = calls
    assert torch.equal(c, torch.cat([controls[:2], controls[:2]]))
    assert torch.equal(e, torch.cat([prompts[:2], null.expand(2, L, D)]))
    assert torch.equal(z[:2], z[2:]) and torch.equal(t[:2], t[2:])


# ------------------------------------------------------------------------------------------
# DREAM against diffusers' compute_dream_and_update_latents
# ------------------------------------------------------------------------------------------
def test_dream_with_offset_perturbation_dropped_prompts_and_an_uneven_micro_batch_is_diffusers():
    """coverage: batch 5 in 2 micro-batches (3 + 2 rows), noise_offset, input_perturbation and prompts dropped to
    a null embedding. The first step's (z', y') are ``compute_dream_and_update_latents`` of an uncorrected twin's
    draws: its noise ε with the offset and without the perturbation (the scripts' ``noise``, the target), its
    perturbed noisy input, and the prompts the model was given (the dropped ones null), as the scripts' DREAM
    forward sees the prompt its captions were emptied to. 1e-12: the twin's forward runs the 5 rows at once."""
    from diffusers.training_utils import compute_dream_and_update_latents

    latents, prompts, _ = conditioning_data()
    before = cross_attention_unet()
    settings = dict(conditional="embeddings", embeddings=prompts, class_dropout=0.5,
                    null_embedding=torch.zeros(L, D, dtype=F64), noise_offset=0.1, input_perturbation=0.2,
                    batch_size=5, micro_batches=2, lr=1e-3, seed=4, progress=False)
    dream, plain = Seen(), Seen()
    DDPMTrainer(copy.deepcopy(before), make_scheduler(T), latents, dream=1.0, callbacks=[dream], **settings).train(1)
    DDPMTrainer(copy.deepcopy(before), make_scheduler(T), latents, callbacks=[plain], **settings).train(1)
    z, t, e = plain.inputs[0]
    assert not torch.equal(plain.targets[0], z)  # (the perturbation: the noisy input is not made from the target's ε)
    assert any(torch.equal(row, torch.zeros(L, D, dtype=F64)) for row in e)  # (a dropped prompt among the rows)
    scheduler = make_scheduler(T)
    # (its coefficients in float64, as the trainer's for a float64 model: diffusers' function takes sqrt(1 - ᾱ_t) in
    # the scheduler's float32, 1e-6 relative off)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(F64)
    noisy, target = compute_dream_and_update_latents(before, scheduler, t, plain.noise[0], z, plain.targets[0], e, 1.0)
    torch.testing.assert_close(dream.inputs[0][0], noisy, rtol=0, atol=1e-12)
    torch.testing.assert_close(dream.targets[0], target, rtol=0, atol=1e-12)
    assert float((dream.targets[0] - plain.targets[0]).abs().max()) > 1e-3  # (a correction that did something)


def test_dream_under_bf16_autocast_reads_the_prediction_as_accelerate_gives_it_to_the_script():
    """coverage: mixed_precision="bf16" (a float32 UNet under autocast): the correction equals
    ``compute_dream_and_update_latents`` of a UNet called as accelerate's prepared model is (autocast to bf16,
    the output cast to float32), bit for bit."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import compute_dream_and_update_latents

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    data = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(1))

    class AcceleratePrepared(torch.nn.Module):
        """accelerate's mixed-precision forward: autocast, then ``convert_outputs_to_fp32``."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, *_):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = self.model(sample, timestep)
            output.sample = output.sample.float()
            return output

    dream, plain = Seen(), Seen()
    settings = dict(batch_size=4, lr=1e-3, seed=3, progress=False, mixed_precision="bf16")
    DDPMTrainer(copy.deepcopy(unet), make_scheduler(T), data, dream=1.0, callbacks=[dream], **settings).train(1)
    DDPMTrainer(copy.deepcopy(unet), make_scheduler(T), data, callbacks=[plain], **settings).train(1)
    z, t = plain.inputs[0]
    noisy, target = compute_dream_and_update_latents(AcceleratePrepared(unet), make_scheduler(T), t, plain.noise[0], z,
                                                     plain.targets[0], None, 1.0)
    assert noisy.dtype == torch.float32 and torch.equal(dream.inputs[0][0], noisy)
    assert torch.equal(dream.targets[0], target)


class BatchNormDenoiser(torch.nn.Module):
    """A denoiser with BatchNorm (running statistics, a buffer the DREAM forward advances) and dropout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.3)
        self.out = torch.nn.Conv2d(4, 2, 3, padding=1)
        self.double()

    def forward(self, z, t):
        h = self.conv(z) + (t.to(z.dtype) / T).view(-1, 1, 1, 1)
        return self.out(self.drop(torch.relu(self.norm(h))))


def test_a_refused_dream_step_restores_the_buffers_its_dream_forward_advanced():
    """coverage: BatchNorm and dropout, batch 5 in 2 micro-batches: a step refused after its DREAM forward (which
    moved the running statistics and drew dropout) hands everything back, so the run continued equals the straight
    run, parameters and buffers bit for bit."""
    data = torch.randn(N, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    settings = dict(dream=1.0, micro_batches=2, batch_size=5, lr=1e-3, seed=3, progress=False)
    straight = DDPMTrainer(BatchNormDenoiser(), make_scheduler(T), data, **settings)
    straight.train(3)
    run = DDPMTrainer(BatchNormDenoiser(), make_scheduler(T), data, callbacks=[RefusesOnce(2)], **settings)
    run.train(1)
    with pytest.raises(RuntimeError, match="refused"):
        run.train(1)
    run.train(2)
    assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), straight.model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(run.model.buffers(), straight.model.buffers()))
