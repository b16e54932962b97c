"""Built-in GAN models: MLPs for 2-D mixtures and a small DCGAN-style pair for 16×16 images.

Every model treats the examples of a batch independently (no BatchNorm in training mode), so
per-example gradients are defined, and uses smooth activations by default (SiLU, softplus):
ReLU kinks break the quadrature of the exact one-step identity (docs/gan.md).
(The analyzer also follows your own models with BatchNorm in training mode: it takes group
gradients from training's graph.) Discriminators may use spectral norm
(``torch.nn.utils.parametrizations.spectral_norm``); its power iteration advances in every
training-mode forward of D (both players' steps), and analysis passes through D run on copies of
its buffers, so they never advance it (:mod:`genkernel.gan.passes`).

Shapes: generators map latents ``[B, latent_dim]`` to samples ``[B, 2]`` or ``[B, C, 16, 16]``
(images in [-1, 1], tanh output); discriminators map samples to scores ``[B, 1]``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from ..core.adapter import positive_int

ACTIVATIONS = {"silu": nn.SiLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


def activation(name: str) -> nn.Module:
    """The activation module called ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)} (smooth ones: silu, softplus, tanh)")
    return ACTIVATIONS[name]()


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        positive_int(value, key)


def _maybe_sn(layer: nn.Module, use: bool) -> nn.Module:
    return _spectral_norm(layer) if use else layer


class MLPGenerator(nn.Module):
    """G: ``[B, latent_dim] -> [B, out_dim]``, ``depth`` hidden layers of ``hidden`` units."""

    def __init__(self, latent_dim: int = 2, out_dim: int = 2, *, hidden: int = 64, depth: int = 3, act: str = "silu"):
        super().__init__()
        _check_positive(latent_dim=latent_dim, out_dim=out_dim, hidden=hidden, depth=depth)
        self.latent_dim = latent_dim
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation(act)]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """D: ``[B, in_dim] -> [B, 1]`` scores (logits for the non-saturating loss).

    ``spectral_norm=True`` wraps every linear layer in spectral norm (one power iteration per
    training-mode forward).
    """

    def __init__(self, in_dim: int = 2, *, hidden: int = 64, depth: int = 3, act: str = "silu", spectral_norm: bool = False):
        super().__init__()
        _check_positive(in_dim=in_dim, hidden=hidden, depth=depth)
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [_maybe_sn(nn.Linear(width, hidden), spectral_norm), activation(act)]
            width = hidden
        layers.append(_maybe_sn(nn.Linear(width, 1), spectral_norm))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class DCGenerator(nn.Module):
    """G: ``[B, latent_dim] -> [B, channels, 16, 16]`` in [-1, 1].

    Linear to ``4×4×(2·width)``, then two (nearest upsample, 3×3 conv, GroupNorm, act) blocks to
    16×16 and a 3×3 conv with tanh. GroupNorm normalizes each example on its own.
    """

    def __init__(self, latent_dim: int = 32, channels: int = 1, *, width: int = 32, act: str = "silu", groups: int = 8):
        super().__init__()
        _check_positive(latent_dim=latent_dim, channels=channels, width=width, groups=groups)
        if width % groups:
            raise ValueError(f"width ({width}) must be a multiple of the GroupNorm groups ({groups})")
        self.latent_dim = latent_dim
        self.width = width
        self.project = nn.Sequential(nn.Linear(latent_dim, 2 * width * 16), activation(act))
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),  # a bias before GroupNorm has zero gradient
            nn.GroupNorm(groups, width),
            activation(act),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.GroupNorm(groups, width),
            activation(act),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z):
        h = self.project(z).reshape(z.shape[0], 2 * self.width, 4, 4)
        return self.body(h)


class DCDiscriminator(nn.Module):
    """D: ``[B, channels, 16, 16] -> [B, 1]``: two stride-2 4×4 convs (16→8→4), act, linear. Another
    image size is refused (ValueError).

    ``spectral_norm=True`` (default) normalizes every layer; no BatchNorm.
    """

    def __init__(self, channels: int = 1, *, width: int = 32, act: str = "silu", spectral_norm: bool = True):
        super().__init__()
        _check_positive(channels=channels, width=width)
        self.net = nn.Sequential(
            _maybe_sn(nn.Conv2d(channels, width, 4, stride=2, padding=1), spectral_norm),
            activation(act),
            _maybe_sn(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), spectral_norm),
            activation(act),
            nn.Flatten(),
            _maybe_sn(nn.Linear(2 * width * 16, 1), spectral_norm),
        )

    def forward(self, x):
        # the stride-2 convolutions map a 17×17 image to 8×8 as a 16×16 one (its last row and column
        # silently cropped); other sides fail later with a matrix-shape error that does not say why
        if x.dim() < 3 or tuple(x.shape[-2:]) != (16, 16):
            raise ValueError(
                f"DCDiscriminator takes 16×16 images [B, channels, 16, 16], got an input of shape {tuple(x.shape)}: "
                "resize or crop them to 16×16"
            )
        return self.net(x)


__all__ = ["MLPGenerator", "MLPDiscriminator", "DCGenerator", "DCDiscriminator", "ACTIVATIONS", "activation"]
