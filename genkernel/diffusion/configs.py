"""Denoisers of the sizes people train, built offline with random weights (nothing downloads).

- :func:`ddpm_cifar10_unet`: the DDPM CIFAR-10 model (Ho et al. 2020; diffusers'
  ``google/ddpm-cifar10-32`` configuration): ``UNet2DModel`` at 32×32×3, block widths
  128-256-256-256, two residual layers per block, self-attention at the 16×16 resolution, dropout
  0.1; about 35.7M parameters.
- :func:`mnist_unet`: a smaller UNet for 28×28 (or 32×32) grey images: widths 32-64-64, attention
  at the lowest resolution; about 1.1M parameters.

``seed=`` (an int; a float or bool is refused): the builder calls ``torch.manual_seed(seed)`` before
drawing the weights, which reseeds the caller's global generator too (draws after the call continue
from that seed), as :mod:`genkernel.gan.configs` does. ``dropout`` must be in [0, 1).

Use them with :class:`~genkernel.diffusion.DDPMTrainer` or your own loop; the cost of analysing
them is estimated before a run by :func:`genkernel.core.cost.estimate_cost`, which trackers and
analyzers call at construction.
"""

from __future__ import annotations

import numbers

from torch import nn

from ..core.adapter import positive_int, seed_weights

from .models import freeze_attention_key_biases

CONFIGS = ("ddpm_cifar10", "mnist")


def ddpm_cifar10_unet(*, dropout: float = 0.1, seed: int | None = None) -> nn.Module:
    """The DDPM CIFAR-10 ``UNet2DModel`` (35.7M parameters), random weights.

    ``dropout``: 0.1 as in the original model (a tracker takes its group gradients from the
    training graph, so dropout in training mode is exact); 0.0 for per-example routes.
    """
    dropout = _dropout(dropout)
    seed_weights(seed)
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=dropout,
        norm_num_groups=32,
        attention_head_dim=None,
        # the original model's function, not only its sizes (google/ddpm-cifar10-32's config; diffusers'
        # defaults differ and would load those weights silently into another network): timestep embedding
        # [sin | cos] with frequencies exp(−log(10000)·i/(half − 1)), GroupNorm eps 1e-6 (tf.contrib's), and
        # stride-2 downsampling convolutions with TF "SAME" padding (0 before, 1 after)
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        downsample_padding=0,
    )
    freeze_attention_key_biases(model)
    return model


def mnist_unet(*, sample_size: int = 28, dropout: float = 0.0, seed: int | None = None) -> nn.Module:
    """A smaller ``UNet2DModel`` for 28×28 (or 32×32) grey images, random weights.

    ``sample_size``: a multiple of 4 (two stride-2 downsamplings: 28 -> 14 -> 7); another side
    (30) is refused here rather than failing in the forward at a skip connection (15 != 16)."""
    if positive_int(sample_size, "sample_size") % 4:
        raise ValueError(f"mnist_unet's sample_size must be a multiple of 4 (it halves the side twice), got "
                         f"{sample_size}; pad or resize the images to 28 or 32")
    dropout = _dropout(dropout)
    seed_weights(seed)
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        dropout=dropout,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    freeze_attention_key_biases(model)
    return model


def denoiser_config(name: str, **kwargs) -> nn.Module:
    """The denoiser called ``name`` (one of :data:`CONFIGS`)."""
    builders = {"ddpm_cifar10": ddpm_cifar10_unet, "mnist": mnist_unet}
    if name not in builders:
        raise ValueError(f"unknown denoiser configuration {name!r}; choose one of {CONFIGS}")
    return builders[name](**kwargs)


def _dropout(dropout: float) -> float:
    # torch.nn.Dropout takes True as p = 1 (every residual branch zeroed) without a word
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}; pass e.g. dropout=0.1 or 0.0")
    return float(dropout)


__all__ = ["CONFIGS", "ddpm_cifar10_unet", "denoiser_config", "mnist_unet"]
