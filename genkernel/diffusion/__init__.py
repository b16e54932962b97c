"""Diffusion: a DDPM trainer on diffusers parts and the noise-level path-kernel analyzer.

Public API::

    from genkernel.diffusion import (
        DDPMTrainer, make_scheduler, make_optimizer,           # training
        MLPDenoiser, tiny_unet, BinnedDenoiser, TimeIgnoringDenoiser,
        NoiseLevelAnalyzer,                                     # the ledger split by noise level
        state_kernel, make_states, retrieval_attribution,       # kernel structure, stage-wise attribution
    )

See :mod:`genkernel.diffusion.analyzer` for the user-loop example and DESIGN.md section 3.
"""

from .analyzer import NoiseLevelAnalyzer, train_with_window
from .kernels import make_states, state_kernel
from .locality import band_mask, band_total, compare, kernel_locality, level_average, mean_interval
from .models import BinnedDenoiser, MLPDenoiser, TimeIgnoringDenoiser, freeze_attention_key_biases, sinusoidal_embedding, tiny_unet
from .objectives import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    bin_centers,
    bin_edges,
    check_prediction_type,
    check_timesteps,
    diffusion_loss,
    loss_weight,
    make_scheduler,
    noisy_input,
    timestep_bins,
    training_target,
)
from .retrieval import RetrievalResult, retrieval_attribution
from .trainer import OPTIMIZERS, DDPMTrainer, make_optimizer, reverse_sample

__all__ = [
    "train_with_window",
    "BETA_SCHEDULES", "BinnedDenoiser", "DDPMTrainer", "MLPDenoiser", "NoiseLevelAnalyzer", "OPTIMIZERS",
    "PREDICTION_TYPES", "RetrievalResult", "TimeIgnoringDenoiser", "band_mask", "band_total", "bin_centers",
    "bin_edges", "check_prediction_type", "check_timesteps", "compare", "diffusion_loss",
    "freeze_attention_key_biases", "kernel_locality", "level_average", "loss_weight", "make_optimizer",
    "make_scheduler", "make_states", "mean_interval", "noisy_input", "retrieval_attribution", "reverse_sample",
    "sinusoidal_embedding", "state_kernel", "timestep_bins", "tiny_unet", "training_target",
]
