"""Small models for the base experiments: MLPs with smooth activations and a small convnet.

Smooth activations (tanh, SiLU, softplus) keep the ledger's quadrature accurate; ReLU kinks make
the one-step residual large. No BatchNorm: per-example gradients need examples to be independent
(GroupNorm instead).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU, "softplus": nn.Softplus, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    """The activation module called ``name``; a clear error names the supported ones."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def mlp(in_dim: int, hidden: tuple[int, ...] | list[int], out_dim: int, *, act: str = "tanh") -> nn.Sequential:
    """``in_dim → hidden... → out_dim`` fully connected network with ``act`` between layers
    (``hidden``: a sequence of widths, ``()`` for none)."""
    if isinstance(hidden, numbers.Integral) or not isinstance(hidden, Iterable):
        raise TypeError(f"hidden must be a sequence of layer widths (e.g. [{hidden!r}] for one hidden layer), got "
                        f"{type(hidden).__name__}")
    hidden = tuple(hidden)  # (a generator would be used up by the check below and build no hidden layer)
    widths = [in_dim, *hidden, out_dim]
    if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in widths):
        raise TypeError(f"layer widths must be ints: in={in_dim!r}, hidden={list(hidden)!r}, out={out_dim!r}")
    if any(w < 1 for w in widths):
        raise ValueError(f"layer widths must be positive: in={in_dim}, hidden={list(hidden)}, out={out_dim}")
    in_dim, out_dim, hidden = int(in_dim), int(out_dim), tuple(int(h) for h in hidden)
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
        sizes = {"in_channels": in_channels, "num_classes": num_classes, "size": size, "width": width}
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in sizes.values()):
            raise ValueError(f"SmallConvNet needs positive ints, got {sizes}")
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
