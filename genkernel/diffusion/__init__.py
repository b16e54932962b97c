"""Diffusion: a DDPM (flow-matching and EDM) trainer on diffusers parts and the noise-level path-kernel analyzer.

Public API::

    from genkernel.diffusion import (
        DDPMTrainer, make_scheduler, make_flow_scheduler,               # training (DDPM, flow matching
        make_edm_scheduler,                                             # or EDM)
        make_optimizer, reverse_sample,                                 # and sampling
        MLPDenoiser, tiny_unet, BinnedDenoiser, TimeIgnoringDenoiser,  # denoisers (and sanity models)
        NoiseLevelAnalyzer, train_with_window,                          # the ledger split by noise level
        state_kernel, make_states, kernel_locality, locality_per_input, # kernel structure across levels
        retrieval_attribution,                                          # stage-wise attribution
        diffusion_loss, training_target, noisy_input, timestep_bins,    # the objective, for user loops
        LogitNormal, ModeDensity, LogNormal, MinSNR, SD3Weighting,      # the trainer's level densities
    )                                                                   # and loss weightings

See :mod:`genkernel.diffusion.analyzer` for the user-loop example and docs/diffusion.md.
Plumbing (argument checks, schedule constants) stays importable from its module.
"""

from .analyzer import NoiseLevelAnalyzer, train_with_window
from .kernels import make_states, state_kernel
from .learned_variance import HybridLoss
from .locality import kernel_locality, locality_per_input
from .models import (
    BinnedDenoiser, ControlNetDenoiser, MLPDenoiser, PositionalInputs, TimeIgnoringDenoiser, freeze_attention_key_biases, tiny_unet,
)
from .objectives import (
    bin_centers, bin_edges, diffusion_loss, loss_weight, make_edm_scheduler, make_flow_scheduler, make_scheduler, noisy_input,
    timestep_bins,
    training_target,
)
from .retrieval import RetrievalResult, retrieval_attribution
from .timestep_sampling import LogitNormal, LogNormal, MinSNR, ModeDensity, SD3Weighting
from .trainer import DDPMTrainer, make_optimizer, reverse_sample

__all__ = [
    "BinnedDenoiser", "ControlNetDenoiser", "DDPMTrainer", "HybridLoss", "LogNormal", "LogitNormal", "MLPDenoiser", "MinSNR", "ModeDensity", "NoiseLevelAnalyzer", "PositionalInputs", "RetrievalResult", "SD3Weighting",
    "TimeIgnoringDenoiser",
    "bin_centers", "bin_edges", "diffusion_loss", "freeze_attention_key_biases", "kernel_locality", "locality_per_input",
    "loss_weight",
    "make_edm_scheduler", "make_flow_scheduler", "make_optimizer", "make_scheduler", "make_states", "noisy_input", "retrieval_attribution", "reverse_sample",
    "state_kernel", "timestep_bins", "tiny_unet", "train_with_window", "training_target",
]
