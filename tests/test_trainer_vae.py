"""DDPMTrainer(vae=): latent diffusion with a frozen VAE between the images and the denoiser.

Each step encodes its images and draws one latent per image from the posterior, as diffusers' text-to-image
scripts do (``vae.encode(x).latent_dist.sample() * scaling_factor``): the step's latents, noisy inputs and
targets equal that line written by hand with diffusers' own posterior (float64, to 1e-12); an analyzer
booking in latent space adds up and does not disturb training; a run resumes bit for bit and a failed step
draws the same latents again; micro-batches encode in chunks with the whole batch's draw; sampling gives
latents, decoded by the VAE; a checkpoint of another VAE and images the VAE cannot encode are refused.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from test_failed_step_retry import RefusesOnce
from test_resume import assert_resumes_bit_for_bit

F64 = torch.float64
T = 50
SCALE, SHIFT = 0.5, 0.1

pytestmark = pytest.mark.usefixtures("one_thread")


def make_vae(seed=0, shift=None):
    """A tiny AutoencoderKL: 3-channel 8×8 images to 2-channel 4×4 latents (float64)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), latent_channels=2,
                        norm_num_groups=2, sample_size=8, scaling_factor=SCALE, shift_factor=shift).double()
    return vae.requires_grad_(False)


def make_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=4, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).double()


def images(n=12):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64) * 2 - 1


class StepInputs(TrainerCallback):
    def __init__(self):
        self.clean, self.noisy, self.targets = [], [], []

    def on_step_end(self, trainer, step):
        self.clean.append(step.info["clean"].clone())
        self.noisy.append(step.inputs[0].clone())
        self.targets.append(step.targets.clone())


def trainer(*callbacks, data=None, vae=None, **kwargs):
    settings = dict(batch_size=4) if data is None or isinstance(data, torch.Tensor) else {}
    settings.update(kwargs)
    return DDPMTrainer(make_unet(), make_scheduler(T), images() if data is None else data,
                       vae=make_vae() if vae is None else vae, lr=1e-3, seed=3, progress=False,
                       callbacks=list(callbacks), **settings)


def analyzer_for(run):
    return NoiseLevelAnalyzer(run.scheduler, run.encode(images(4)), num_bins=2, num_probes=4, controls=1,
                              kernel_points=2, progress=False)


@pytest.mark.parametrize("shift", [None, SHIFT])
def test_each_steps_latents_are_the_scripts_posterior_draw_times_the_scaling_factor(shift):
    """The latents of step k are (vae.encode(x).latent_dist.sample(generator) − shift) · scale with the trainer's
    generator where the scripts use the global RNG: drawn first, then the levels and the noise (an unlatent
    twin of the trainer draws the same batches)."""
    recorder = StepInputs()
    vae = make_vae(shift=shift)
    run = trainer(recorder, vae=vae)
    run.train(3)
    twin = DDPMTrainer(make_unet(), make_scheduler(T), images(), batch_size=4, lr=1e-3, seed=3, progress=False)
    for step in range(3):
        # the twin's permutation, then the posterior's draw from the same generator, then the levels and noise
        index = twin._order[twin._cursor : twin._cursor + 4] if twin._order.numel() else None
        if index is None or twin._cursor + 4 > twin._order.numel():
            twin._order, twin._cursor = torch.randperm(12, generator=twin.generator), 0
            index = twin._order[:4]
        twin._cursor += 4
        posterior = vae.encode(images()[index]).latent_dist
        latents = (posterior.sample(generator=twin.generator) - (shift or 0.0)) * SCALE
        t = torch.randint(0, T, (4,), generator=twin.generator)
        noise = torch.randn(latents.shape, generator=twin.generator, dtype=F64)
        torch.testing.assert_close(recorder.clean[step], latents, rtol=0, atol=1e-12)
        torch.testing.assert_close(recorder.noisy[step], run.scheduler.add_noise(latents, noise, t), rtol=0, atol=1e-12)
        torch.testing.assert_close(recorder.targets[step], noise, rtol=0, atol=1e-12)
    assert run.sample_shape == (2, 4, 4)


def assert_booked_as_trained_bare(analyzed, bare, analyzer, steps):
    """``analyzed`` (with ``analyzer`` attached) and ``bare`` trained ``steps`` steps each end with the same
    weights, bit for bit, and every ledger of the analyzer adds up: contributions + rest + residual = Δf."""
    analyzed.train(steps)
    bare.train(steps)
    assert all(torch.equal(p, q) for p, q in zip(analyzed.model.parameters(), bare.model.parameters()))
    for name, ledger in analyzer.ledgers.items():
        total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
        torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12 * float(ledger.delta.abs().max()), msg=name)
    assert analyzer.ledger.steps == steps and float(analyzer.ledger.delta.abs().max()) > 0


def test_an_analyzer_in_latent_space_adds_up_and_training_is_bit_for_bit_without_it():
    run = trainer()
    analyzer = analyzer_for(run)
    run.callbacks.append(analyzer)
    assert_booked_as_trained_bare(run, trainer(), analyzer, 3)


def test_a_run_resumes_bit_for_bit_from_tensor_data_and_from_a_dataloader(tmp_path):
    assert_resumes_bit_for_bit(lambda **kw: trainer(**kw), tmp_path / "tensor", total=5, stop=2)
    loader = lambda: DataLoader(TensorDataset(images()), batch_size=4, shuffle=True,  # noqa: E731
                                generator=torch.Generator().manual_seed(5))
    _, resumed = assert_resumes_bit_for_bit(lambda **kw: trainer(data=loader(), **kw), tmp_path / "loader",
                                            total=5, stop=2)
    assert resumed.sample_shape == (2, 4, 4) and resumed.input_shape == (3, 8, 8)


@pytest.mark.parametrize("tensor_data", [True, False])
def test_a_step_refused_before_its_update_draws_the_same_latents_again(tensor_data):
    """The batch handed back holds the images (its latents are drawn again from the rewound generator): the run
    continued after the refusal is the straight one."""
    data = (lambda: images()) if tensor_data else (lambda: DataLoader(TensorDataset(images()), batch_size=4))
    straight = trainer(data=data())
    straight.train(3)
    refusing = RefusesOnce(2)
    run = trainer(refusing, data=data())
    run.train(1)
    with pytest.raises(RuntimeError, match="refused"):
        run.train(1)
    run.train(2)
    assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), straight.model.parameters()))


def test_micro_batches_encode_in_chunks_and_draw_the_whole_batchs_latents():
    """micro_batches=2: the VAE runs on two chunks; the latents (one draw for the batch) and the update equal
    micro_batches=1's to float64 rounding."""
    whole, micro = StepInputs(), StepInputs()
    a, b = trainer(whole), trainer(micro, micro_batches=2)
    a.train(2)
    b.train(2)
    for x, y in zip(whole.clean, micro.clean):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_samples_are_latents_and_save_samples_writes_their_decoded_images(tmp_path):
    run = trainer()
    run.train(1)
    latents, _ = run.sample(3, num_inference_steps=5)
    assert latents.shape == (3, 2, 4, 4)
    decoded = run.decode(latents)
    by_hand = run.latent_coder.vae.decode(latents / SCALE).sample
    torch.testing.assert_close(decoded, by_hand, rtol=0, atol=1e-12)
    saved = run.save_samples(tmp_path / "grid.png", num_samples=3, num_inference_steps=5)
    torch.testing.assert_close(saved, decoded, rtol=0, atol=0)
    assert torch.equal(torch.load(tmp_path / "grid.pt"), saved) and (tmp_path / "grid.png").is_file()
    # the probes' latents: the posterior's mean, scaled, nothing drawn
    torch.testing.assert_close(run.encode(images(2)), run.latent_coder.vae.encode(images(2)).latent_dist.mean * SCALE,
                               rtol=0, atol=1e-12)


def test_a_checkpoint_of_another_vae_is_refused(tmp_path):
    trainer(checkpoint_dir=tmp_path, checkpoint_every=1).train(1)
    other = trainer(vae=make_vae(seed=1))
    with pytest.raises(ValueError, match="vae"):
        other.resume(tmp_path / "checkpoint.pt")
    assert other.global_step == 0


def test_what_a_vae_cannot_encode_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="3 channels, the batch has 2.*without vae="):
        DDPMTrainer(make_unet(), make_scheduler(T), torch.zeros(8, 2, 4, 4, dtype=F64), vae=make_vae(), progress=False)
    vae = make_vae()
    vae.register_to_config(scaling_factor=None)
    with pytest.raises(ValueError, match="scaling_factor"):
        trainer(vae=vae)
    with pytest.raises(TypeError, match="encode\\(\\) and decode\\(\\)"):
        trainer(vae=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no vae="):
        DDPMTrainer(make_unet(), make_scheduler(T), torch.zeros(8, 2, 4, 4, dtype=F64), progress=False).decode(
            torch.zeros(1, 2, 4, 4, dtype=F64))


def test_the_vae_encodes_in_eval_mode_and_keeps_its_own_mode():
    """A VAE with dropout left in training mode drew from the global RNG inside each step's encode: a step drawn
    again after a failure encoded other latents. Encoded in eval mode (as frozen), its mode restored after."""
    vae = make_vae()
    vae.encoder.mid_block.resnets[0].dropout.p = 0.5  # (a VAE trained with dropout, left in training mode)
    vae.train()
    run = trainer(vae=vae)
    before = torch.get_rng_state()
    latents = run.encode(images(2))
    assert torch.equal(torch.get_rng_state(), before) and vae.training
    torch.testing.assert_close(latents, run.encode(images(2)), rtol=0, atol=0)
