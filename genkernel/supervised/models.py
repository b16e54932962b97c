"""Small models for the base experiments: MLPs with smooth activations and a small convnet.

Smooth activations (tanh, SiLU, softplus) keep the ledger's quadrature accurate; ReLU kinks make
the one-step residual large. No BatchNorm: per-example gradients need examples to be independent
(GroupNorm instead).
"""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU, "softplus": nn.Softplus, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    """The activation module called ``name``; a clear error names the supported ones."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def mlp(in_dim: int, hidden: tuple[int, ...] | list[int], out_dim: int, *, act: str = "tanh") -> nn.Sequential:
    """``in_dim → hidden... → out_dim`` fully connected network with ``act`` between layers."""
    if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
        raise ValueError(f"layer widths must be positive: in={in_dim}, hidden={list(hidden)}, out={out_dim}")
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), activation(act)]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class SmallConvNet(nn.Sequential):
    """Two 3×3 conv blocks (GroupNorm, smooth activation, 2×2 average pooling) and a linear head.

    Input ``[B, in_channels, size, size]`` (size divisible by 4), output ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, size: int = 16, width: int = 16, act: str = "silu"):
        if size % 4:
            raise ValueError(f"image size must be divisible by 4 (two 2×2 poolings), got {size}")
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(4 if width % 4 == 0 else 1, width),
            activation(act),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(4 if width % 4 == 0 else 1, 2 * width),
            activation(act),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (size // 4) ** 2, num_classes),
        )
