"""Second read of DDPMTrainer(vae=): the latents against diffusers' own lines, written by hand here.

Faults (these tests fail on 39b8214): a bfloat16 denoiser beside a float32 VAE encoded its images after rounding
them to bfloat16 (the scripts cast ``pixel_values`` to the VAE's dtype only); a VAE whose config has per-channel
``latents_mean``/``latents_std`` (Playground v2.5's, which SDXL's pipelines encode as ``(z − μ) · scale / σ`` and
decode back) was encoded and decoded without them; image-space probes on a latent trainer ran without an
error when the VAE keeps the images' channel count; an encoder that failed (out of memory) lost its batch;
Sana's AutoencoderDC (``encode`` gives ``latent``) was refused.
Coverage: diffusers' ``AutoencoderTiny`` (no posterior), a checkpoint written while a DataLoader's batch is
handed back, a checkpoint written before ``vae=`` existed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from test_failed_step_retry import RefusesOnce

F64 = torch.float64
T = 50
SCALE = 0.5
LATENTS_MEAN, LATENTS_STD = (0.3, -0.2), (2.0, 0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_vae(latent_channels=2, **config):
    """A tiny AutoencoderKL: 3-channel 8×8 images to ``latent_channels``-channel 4×4 latents (float64)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                        latent_channels=latent_channels, norm_num_groups=2, sample_size=8, scaling_factor=SCALE,
                        **config).double()
    return vae.requires_grad_(False)


def make_unet(channels=2):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=4, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).double()


def images(n=12):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64) * 2 - 1


class StepInputs(TrainerCallback):
    def __init__(self):
        self.clean, self.targets = [], []

    def on_step_end(self, trainer, step):
        self.clean.append(step.info["clean"].clone())
        self.targets.append(step.targets.clone())


def generator_of(run):
    """A copy of ``run``'s generator as it stands (the draws a step makes, replayed by hand)."""
    copy = torch.Generator()
    copy.set_state(run.generator.get_state())
    return copy


def test_a_bfloat16_denoiser_beside_a_float32_vae_encodes_the_images_in_float32():
    """Fault (silent): the images were cast to the denoiser's bfloat16 before the float32 VAE saw them (the
    scripts: ``vae.encode(pixel_values.to(vae.dtype))``), moving the posterior's mean by up to 1.5e-3 on latents
    of ~0.5: 14 of the step's 128 bfloat16 latents one step (0.0039) off. The step's latents equal the
    posterior of the float32 images, drawn by hand, exactly."""
    vae = make_vae().float()
    data = images().float()
    run = DDPMTrainer(make_unet().to(torch.bfloat16), make_scheduler(T), data, vae=vae, batch_size=4, shuffle=False,
                      seed=3, progress=False)
    draws = generator_of(run)
    latents = run.next_batch()["clean"]  # (the step's draws, without the bfloat16 UNet's slow CPU forward)
    posterior = vae.encode(data[:4]).latent_dist  # (shuffle=False: rows 0..3)
    xi = torch.randn(posterior.mean.shape, generator=draws, dtype=F64)
    by_hand = ((posterior.mean.double() + posterior.std.double() * xi) * SCALE).to(torch.bfloat16)
    assert latents.dtype == torch.bfloat16
    torch.testing.assert_close(latents, by_hand, rtol=0, atol=0)


def test_a_vae_with_per_channel_latent_statistics_encodes_and_decodes_as_sdxl_pipelines():
    """Fault (silent): ``latents_mean``/``latents_std`` in the VAE's config were ignored, so the denoiser learnt
    latents that SDXL's pipelines decode as ``z · σ / scale + μ`` (the step's latents up to 1.26 off here, every
    one of them). Now each step's
    latents are ``(posterior.sample() − μ) · scale / σ`` (SDXL img2img's line, written by hand), encode() the
    mean so normalized, and decode() the pipelines' inverse; half the statistics, or both with a shift_factor,
    are refused."""
    vae = make_vae(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    mean, std = (torch.tensor(v, dtype=F64).view(1, 2, 1, 1) for v in (LATENTS_MEAN, LATENTS_STD))
    recorder = StepInputs()
    run = DDPMTrainer(make_unet(), make_scheduler(T), images(), vae=vae, batch_size=4, shuffle=False, seed=3,
                      progress=False, callbacks=[recorder])
    draws = generator_of(run)
    run.train(1)
    latents = (vae.encode(images()[:4]).latent_dist.sample(generator=draws) - mean) * SCALE / std
    torch.testing.assert_close(recorder.clean[0], latents, rtol=0, atol=1e-12)
    probes = (vae.encode(images(3)).latent_dist.mean - mean) * SCALE / std
    torch.testing.assert_close(run.encode(images(3)), probes, rtol=0, atol=1e-12)
    torch.testing.assert_close(run.decode(probes), vae.decode(probes * std / SCALE + mean).sample, rtol=0, atol=1e-12)
    assert run.latent_coder.config()["latents_std"] == list(LATENTS_STD)
    with pytest.raises(ValueError, match="latents_mean without latents_std.*both"):
        DDPMTrainer(make_unet(), make_scheduler(T), images(), vae=make_vae(latents_mean=LATENTS_MEAN), progress=False)
    with pytest.raises(ValueError, match="shift_factor.*latents_mean"):
        DDPMTrainer(make_unet(), make_scheduler(T), images(), progress=False,
                    vae=make_vae(shift_factor=0.1, latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD))


def test_image_probes_on_a_latent_trainer_are_refused_naming_encode():
    """Fault (silent): a VAE with 3 latent channels (LDM's f4) and a 3-channel UNet ran the analyzer on 3×8×8
    image probes beside 3×4×4 training latents without an error. Now refused before the first update, naming
    trainer.encode; probes from it are taken."""
    run = DDPMTrainer(make_unet(3), make_scheduler(T), images(), vae=make_vae(latent_channels=3), batch_size=4,
                      seed=3, progress=False)
    settings = dict(num_bins=2, num_probes=4, controls=1, kernel_points=2, progress=False)
    run.callbacks.append(NoiseLevelAnalyzer(run.scheduler, images(4), **settings))
    with pytest.raises(ValueError, match=r"latents shaped \(3, 4, 4\).*\(3, 8, 8\).*trainer\.encode\(probe_images\)"):
        run.train(1)
    assert run.global_step == 0
    run.callbacks[-1] = NoiseLevelAnalyzer(run.scheduler, run.encode(images(4)), **settings)
    run.train(1)
    assert run.callbacks[-1].ledger.steps == 1


def fail_encode_once(vae, call):
    """Make ``vae.encode`` raise on its ``call``-th call from now (an out-of-memory error in the encoder's
    forward), once."""
    encode, calls = vae.encode, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("out of memory in the encoder")
        return encode(*args, **kwargs)

    vae.encode = failing
    return vae


@pytest.mark.parametrize("tensor_data", [True, False])
def test_an_encoder_that_fails_hands_its_images_back(tensor_data):
    """Fault (resume/continuation): an encoder failing inside next_batch (out of memory, an interrupt in the VAE's
    forward) lost its batch: Tensor data's cursor (and a new epoch's permutation) stayed advanced and a
    DataLoader's batch counted as trained on, so the run continued (or a checkpoint written then resumed)
    without it. Now the images are handed back: continued, the run is the straight one bit for bit."""
    data = (lambda: images()) if tensor_data else loader
    settings = dict(batch_size=4) if tensor_data else {}
    straight = DDPMTrainer(make_unet(), make_scheduler(T), data(), vae=make_vae(), seed=3, progress=False, **settings)
    straight.train(3)
    run = DDPMTrainer(make_unet(), make_scheduler(T), data(), vae=make_vae(), seed=3, progress=False, **settings)
    fail_encode_once(run.latent_coder.vae, 2)
    run.train(1)
    with pytest.raises(RuntimeError, match="out of memory"):
        run.train(1)
    assert run.global_step == 1
    run.train(2)
    assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), straight.model.parameters()))


def test_coverage_autoencoder_tiny_draws_nothing_and_its_latents_are_the_encoders():
    """Coverage: diffusers' AutoencoderTiny (``encode`` gives ``latents``, no posterior; config scaling_factor 1,
    shift 0): each step's latents are ``vae.encode(x).latents · scaling_factor`` and the step's levels and noise
    are the generator's first draws after the permutation (nothing drawn for the latents); decode() is
    ``vae.decode(z / scaling_factor).sample``."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4), latent_channels=2,
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).double().requires_grad_(False)
    tiny.register_to_config(scaling_factor=SCALE)
    recorder = StepInputs()
    run = DDPMTrainer(make_unet(), make_scheduler(T), images(), vae=tiny, batch_size=4, seed=3, progress=False,
                      callbacks=[recorder])
    draws = generator_of(run)
    run.train(1)
    rows = torch.randperm(12, generator=draws)[:4]
    torch.randint(0, T, (4,), generator=draws)
    noise = torch.randn(4, 2, 4, 4, generator=draws, dtype=F64)
    torch.testing.assert_close(recorder.clean[0], tiny.encode(images()[rows]).latents * SCALE, rtol=0, atol=1e-12)
    torch.testing.assert_close(recorder.targets[0], noise, rtol=0, atol=0)
    latents = run.encode(images(2))
    torch.testing.assert_close(run.decode(latents), tiny.decode(latents / SCALE).sample, rtol=0, atol=1e-12)


def test_sanas_autoencoder_dc_trains_on_its_encoders_latents():
    """Fault (unclear refusal): diffusers' AutoencoderDC (Sana's DC-AE; ``encode`` gives ``latent``, singular)
    was refused with a TypeError, though Sana's training script encodes with it
    (``vae.encode(x).latent * vae.config.scaling_factor``). Now each step's latents are that line, nothing drawn,
    and decode() is ``vae.decode(z / scaling_factor).sample``."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    dc = AutoencoderDC(latent_channels=2, attention_head_dim=2, encoder_block_out_channels=(4, 8),
                       decoder_block_out_channels=(4, 8), encoder_layers_per_block=(1, 1),
                       decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                       decoder_qkv_multiscales=((), ()), scaling_factor=SCALE).double().requires_grad_(False)
    recorder = StepInputs()
    run = DDPMTrainer(make_unet(), make_scheduler(T), images(), vae=dc, batch_size=4, shuffle=False, seed=3,
                      progress=False, callbacks=[recorder])
    draws = generator_of(run)
    run.train(1)
    torch.randint(0, T, (4,), generator=draws)
    torch.testing.assert_close(recorder.clean[0], dc.encode(images()[:4]).latent * SCALE, rtol=0, atol=1e-12)
    torch.testing.assert_close(recorder.targets[0], torch.randn(4, 2, 4, 4, generator=draws, dtype=F64), rtol=0, atol=0)
    latents = run.encode(images(2))
    torch.testing.assert_close(run.decode(latents), dc.decode(latents / SCALE).sample, rtol=0, atol=1e-12)


def loader():
    return DataLoader(TensorDataset(images()), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))


def test_coverage_a_checkpoint_written_while_a_batch_is_handed_back_resumes_to_the_straight_run(tmp_path):
    """Coverage: a DataLoader run whose second step is refused (its images handed back) and checkpointed at
    once, resumed in a new trainer, trains on to the straight run's weights bit for bit."""
    straight = DDPMTrainer(make_unet(), make_scheduler(T), loader(), vae=make_vae(), seed=3, progress=False)
    straight.train(3)
    refusing = DDPMTrainer(make_unet(), make_scheduler(T), loader(), vae=make_vae(), seed=3, progress=False,
                           callbacks=[RefusesOnce(2)])
    refusing.train(1)
    with pytest.raises(RuntimeError, match="refused"):
        refusing.train(1)
    refusing.save_checkpoint(tmp_path / "held.pt")
    resumed = DDPMTrainer(make_unet(), make_scheduler(T), loader(), vae=make_vae(), seed=3, progress=False)
    assert resumed.resume(tmp_path / "held.pt") and resumed.global_step == 1
    resumed.train(2)
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), straight.model.parameters()))


def test_coverage_a_checkpoint_from_before_vae_resumes_without_it_and_is_refused_with_it(tmp_path):
    """Coverage: a DataLoader checkpoint as 8d3e0b9 wrote it (no config "vae", no "input_shape") resumes a
    trainer without vae= bit for bit, and a trainer with one is refused naming vae."""
    pixels = lambda: DataLoader(TensorDataset(torch.randn(12, 2, 4, 4, generator=torch.Generator().manual_seed(2),  # noqa: E731
                                                          dtype=F64)), batch_size=4)
    straight = DDPMTrainer(make_unet(), make_scheduler(T), pixels(), seed=3, progress=False)
    straight.train(1)
    state = straight.state_dict()
    del state["config"]["vae"], state["iterable"]["input_shape"]
    torch.save(state, tmp_path / "old.pt")
    straight.train(2)
    resumed = DDPMTrainer(make_unet(), make_scheduler(T), pixels(), seed=3, progress=False)
    assert resumed.resume(tmp_path / "old.pt") and resumed.input_shape == (2, 4, 4)
    resumed.train(2)
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), straight.model.parameters()))
    latent = DDPMTrainer(make_unet(), make_scheduler(T), DataLoader(TensorDataset(images()), batch_size=4),
                         vae=make_vae(), seed=3, progress=False)
    with pytest.raises(ValueError, match="vae: saved None"):
        latent.resume(tmp_path / "old.pt")
