"""GANs of the sizes people train, built offline with random weights (nothing downloads).

:func:`dcgan64_generator` and :func:`dcgan64_discriminator` are the DCGAN of Radford et al. (2016)
at 64×64, as in PyTorch's ``examples/dcgan``: transposed convolutions with BatchNorm and ReLU in
the generator (latents ``[B, nz, 1, 1]``), strided convolutions with BatchNorm and LeakyReLU in the
discriminator, which ends in a Sigmoid (its output is a probability: use
``GeneratorLoss(D, output="probability")``). BatchNorm stays in training mode during training: a
tracker takes its group gradients from the training graph, where that is exact.
``weights_init`` is the example's N(0, 0.02) initialization.
"""

from __future__ import annotations

import torch
from torch import nn


def weights_init(module: nn.Module) -> None:
    """DCGAN's initialization: convolutions N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def dcgan64_generator(nz: int = 100, ngf: int = 64, nc: int = 3, *, seed: int | None = None) -> nn.Module:
    """G: ``[B, nz, 1, 1] -> [B, nc, 64, 64]`` in [-1, 1] (3.6M parameters at the defaults)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )
    model.apply(weights_init)
    return model


def dcgan64_discriminator(ndf: int = 64, nc: int = 3, *, seed: int | None = None) -> nn.Module:
    """D: ``[B, nc, 64, 64] -> [B]`` probabilities (2.8M parameters at the defaults)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(), nn.Flatten(0),
    )
    model.apply(weights_init)
    return model


__all__ = ["dcgan64_discriminator", "dcgan64_generator", "weights_init"]
