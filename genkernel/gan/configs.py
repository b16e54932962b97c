"""GANs of the sizes people train, built offline with random weights (nothing downloads).

:func:`dcgan64_generator` and :func:`dcgan64_discriminator` are the DCGAN of Radford et al. (2016)
at 64×64, as in PyTorch's ``examples/dcgan``: transposed convolutions with BatchNorm and ReLU in
the generator (latents ``[B, nz, 1, 1]``), strided convolutions with BatchNorm and LeakyReLU in the
discriminator, which ends in a Sigmoid (its output is a probability: use
``GeneratorLoss(D, output="probability")``). BatchNorm stays in training mode during training: a
tracker takes its group gradients from the training graph, where that is exact. Upstream's loop shows D
a real batch and a generated batch in two forwards, each normalized by its own statistics:
``GANTrainer(..., output="probability", discriminator_batches="separate")`` trains so.
``weights_init`` is the example's N(0, 0.02) initialization.

``seed=`` (an int; a float or bool is refused): each builder then calls ``torch.manual_seed(seed)``
before drawing its weights, which reseeds the caller's global (CPU and CUDA) generator too, as
upstream's ``manualSeed`` does: draws made after the call continue from that seed. Sizes (``nz``,
``ngf``, ``ndf``, ``nc``, ``num_classes``, ``embed_dim``) must be positive ints (0 built a network that
ignores its input or its class, or has no parameters). Inputs of another size are refused (ValueError): images other than
64×64 (a strided convolution crops a 65×65 image silently, and a 96×96 one gave 9 scores per
example), latents other than ``[B, nz, 1, 1]`` (``[B, nz, 2, 2]`` gave 80×80 images).

:func:`cdcgan64_generator` and :func:`cdcgan64_discriminator` are its class-conditional form (a
cDCGAN), G(z, y) and D(x, y) with ``y`` a ``LongTensor[B]`` of classes, for
``GANTrainer(..., labels=, num_classes=)`` and ``GANKernelAnalyzer(..., probe_classes=)``: as usual
cDCGANs do, G concatenates a learned class embedding to its latents, and D stacks a learned
64×64 class map onto its input as one more channel.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..core.adapter import positive_int, seed_weights


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        positive_int(value, name)


def _check_side(x: torch.Tensor, side: int, what: str, expected: str) -> None:
    """Refuse an input whose last two dimensions are not ``side × side``: the strided convolutions
    would crop a larger odd side silently (65×65 ran as 64×64) or end on a map larger than 1×1
    (96×96 gave 9 scores per example, flattened into the batch)."""
    if x.dim() < 3 or tuple(x.shape[-2:]) != (side, side):
        raise ValueError(f"{what} takes {expected}, got an input of shape {tuple(x.shape)}: resize or crop the "
                         f"images to {side}×{side}")


class _WholeNetwork(nn.Sequential):
    """An ``nn.Sequential`` whose forward checks the input of the whole network; a slice (``D[2:]``,
    which starts inside it) is a plain ``nn.Sequential`` without the check."""

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        return nn.Sequential(OrderedDict(item._modules)) if isinstance(idx, slice) else item


class DCGAN64Generator(_WholeNetwork):
    """DCGAN's 64×64 generator (an ``nn.Sequential``: layers, indices and state-dict keys as upstream's)
    that refuses latents other than ``[B, nz, 1, 1]``: a larger latent map (``[B, nz, 2, 2]``) made
    80×80 images without a word."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() < 3 or tuple(z.shape[-2:]) != (1, 1):
            raise ValueError(
                f"the DCGAN generator takes latents [B, nz, 1, 1], got shape {tuple(z.shape)}; reshape them, "
                "e.g. z[:, :, None, None] for z [B, nz]"
            )
        return super().forward(z)


class DCGAN64Discriminator(_WholeNetwork):
    """DCGAN's 64×64 discriminator (an ``nn.Sequential``, as upstream's) that refuses images other
    than 64×64 (see :func:`_check_side`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_side(x, 64, "the DCGAN discriminator", "64×64 images [B, nc, 64, 64]")
        return super().forward(x)


def weights_init(module: nn.Module) -> None:
    """DCGAN's initialization: convolution weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0
    (as upstream, a convolution's bias is left as PyTorch drew it; DCGAN's convolutions have none)."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def dcgan64_generator(nz: int = 100, ngf: int = 64, nc: int = 3, *, seed: int | None = None) -> nn.Module:
    """G: ``[B, nz, 1, 1] -> [B, nc, 64, 64]`` in [-1, 1] (3.6M parameters at the defaults).
    ``seed``: ``torch.manual_seed(seed)`` first (the global generator's state is changed)."""
    _check_sizes(nz=nz, ngf=ngf, nc=nc)
    seed_weights(seed)
    model = DCGAN64Generator(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )
    model.apply(weights_init)
    return model


def dcgan64_discriminator(ndf: int = 64, nc: int = 3, *, seed: int | None = None) -> nn.Module:
    """D: ``[B, nc, 64, 64] -> [B]`` probabilities (2.8M parameters at the defaults).
    ``seed``: ``torch.manual_seed(seed)`` first (the global generator's state is changed)."""
    _check_sizes(ndf=ndf, nc=nc)
    seed_weights(seed)
    model = DCGAN64Discriminator(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(), nn.Flatten(0),
    )
    model.apply(weights_init)
    return model


class ConditionalGenerator64(nn.Module):
    """G(z, y): latents ``[B, nz]`` (or ``[B, nz, 1, 1]``) and classes ``LongTensor[B]`` ->
    ``[B, nc, 64, 64]`` in [-1, 1]: DCGAN's generator on ``[z, embed(y)]`` (``nz + embed_dim`` input
    channels at 1×1). ``latent_dim`` = nz and ``num_classes`` are attributes (the trainer and the
    analyzer read them)."""

    def __init__(self, num_classes: int, nz: int = 100, ngf: int = 64, nc: int = 3, *, embed_dim: int | None = None):
        super().__init__()
        _check_sizes(num_classes=num_classes, nz=nz)
        embed_dim = num_classes if embed_dim is None else embed_dim
        _check_sizes(embed_dim=embed_dim)
        self.latent_dim, self.num_classes = nz, num_classes
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.net = dcgan64_generator(nz + embed_dim, ngf, nc)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z.reshape(z.shape[0], -1), self.embed(y)], dim=1)
        return self.net(h[:, :, None, None])


class ConditionalDiscriminator64(nn.Module):
    """D(x, y): images ``[B, nc, 64, 64]`` and classes ``LongTensor[B]`` -> ``[B]`` probabilities:
    DCGAN's discriminator on ``nc + 1`` channels, the last a learned 64×64 map of the class
    (``nn.Embedding(num_classes, 64·64)``). Ends in a Sigmoid: use ``output="probability"``."""

    def __init__(self, num_classes: int, ndf: int = 64, nc: int = 3):
        super().__init__()
        _check_sizes(num_classes=num_classes, ndf=ndf, nc=nc)
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, 64 * 64)
        self.net = dcgan64_discriminator(ndf, nc + 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_side(x, 64, "the conditional DCGAN discriminator", "64×64 images [B, nc, 64, 64] (its class map is 64×64)")
        return self.net(torch.cat([x, self.embed(y).view(-1, 1, 64, 64).to(x)], dim=1))


def cdcgan64_generator(num_classes: int, nz: int = 100, ngf: int = 64, nc: int = 3, *, embed_dim: int | None = None,
                       seed: int | None = None) -> ConditionalGenerator64:
    """The conditional DCGAN's G(z, y) (:class:`ConditionalGenerator64`, DCGAN's initialization; ``seed``:
    ``torch.manual_seed(seed)`` first, the global generator's state is changed)."""
    seed_weights(seed)
    return ConditionalGenerator64(num_classes, nz, ngf, nc, embed_dim=embed_dim)


def cdcgan64_discriminator(num_classes: int, ndf: int = 64, nc: int = 3, *,
                           seed: int | None = None) -> ConditionalDiscriminator64:
    """The conditional DCGAN's D(x, y) (:class:`ConditionalDiscriminator64`, DCGAN's initialization; ``seed``:
    ``torch.manual_seed(seed)`` first, the global generator's state is changed)."""
    seed_weights(seed)
    return ConditionalDiscriminator64(num_classes, ndf, nc)


__all__ = ["dcgan64_discriminator", "dcgan64_generator", "weights_init", "cdcgan64_generator", "cdcgan64_discriminator",
           "ConditionalGenerator64", "ConditionalDiscriminator64", "DCGAN64Generator", "DCGAN64Discriminator"]
