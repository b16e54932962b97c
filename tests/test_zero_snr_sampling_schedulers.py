"""A sampling scheduler with rescale_betas_zero_snr=True is read as DDPMScheduler reads the same config.

Before: diffusers' Euler, EulerAncestral, DPM-Solver and UniPC schedulers set ᾱ_{T-1} = 2**-24 for their sampling
where the rescaled schedule, and DDPMScheduler of the same config (what diffusers' training scripts train with),
have 0. The bins and the trainer's inputs read the scheduler's own: every inner log-SNR bin edge moved ([0, 9, 82,
...] for [0, 8, 67, ...]) and the noisy input at t = 999 kept 2.4e-4 of the signal, silently (a helper's hunt)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from genkernel.diffusion.objectives import NoiseBins, noisy_input, training_levels  # noqa: E402


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_zero_snr_sampling_schedulers_bin_and_noise_as_ddpm_of_their_config(name):
    """The bins' edges, the levels' log SNR and the noisy input at every level are DDPMScheduler's of the same
    config, bit for bit (add_noise's)."""
    scheduler = getattr(diffusers, name)(num_train_timesteps=1000, rescale_betas_zero_snr=True,
                                         beta_schedule="scaled_linear")
    ddpm = diffusers.DDPMScheduler.from_config(scheduler.config)
    assert float(scheduler.alphas_cumprod[-1]) > 0 and float(ddpm.alphas_cumprod[-1]) == 0.0  # (the setting)
    assert torch.equal(NoiseBins(scheduler, 10).edges, NoiseBins(ddpm, 10).edges)
    assert torch.equal(training_levels(scheduler)[1], training_levels(ddpm)[1])
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 500, 998, 999])
    assert torch.equal(noisy_input(scheduler, clean, noise, t), ddpm.add_noise(clean, noise, t))


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_min_snr_weights_and_refuses_as_ddpm_of_their_config(name):
    """MinSNR reads DDPMScheduler's ᾱ of the config too: with epsilon prediction it is refused as DDPMScheduler's
    (SNR 0 at the last level; before: accepted, SNR 6e-8 there), and v-prediction's weights are DDPMScheduler's bit
    for bit (before: 6.0e-8 at t = 999 for DDPMScheduler's 0)."""
    from genkernel.diffusion.timestep_sampling import MinSNR

    for kind in ("epsilon", "v_prediction"):
        scheduler = getattr(diffusers, name)(num_train_timesteps=1000, rescale_betas_zero_snr=True,
                                             beta_schedule="scaled_linear", prediction_type=kind)
        ddpm = diffusers.DDPMScheduler.from_config(scheduler.config)
        if kind == "epsilon":
            with pytest.raises(ValueError, match="divides by SNR, which is 0 at the last"):
                MinSNR(5.0).check(ddpm)
            with pytest.raises(ValueError, match="divides by SNR, which is 0 at the last"):
                MinSNR(5.0).check(scheduler)
        else:
            MinSNR(5.0).check(scheduler)
            t = torch.tensor([0, 500, 998, 999])
            assert torch.equal(MinSNR(5.0).weights(scheduler, t), MinSNR(5.0).weights(ddpm, t))
            assert float(MinSNR(5.0).weights(ddpm, t)[-1]) == 0.0
