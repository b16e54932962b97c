"""Toy data sets in two dimensions and in one dimension.

Every generator is deterministic for a given ``seed``: the same seed gives the same
tensors, bit for bit, on the same machine. ``seed`` is an ``int`` in [0, 2**64) or a
:class:`torch.Generator` (which is then advanced). torch's generator keeps 32 bits of a
seed, so a seed of 2**32 or more is first hashed (SHA-256) to 32 bits: seed and
seed + 2**32 give different data. Points are computed in float64 and
cast to ``dtype`` (float32 by default), so the geometric constraints below hold to the
rounding of ``dtype``.

Functions
---------
gaussian_ring, ring_mode_centers
    Mixture of Gaussians on a circle (the usual "8 Gaussians" GAN/diffusion test set).
gaussian_grid, grid_mode_centers
    Mixture of Gaussians on a square grid (the usual "25 Gaussians").
two_moons
    scikit-learn's two interleaving half circles.
circle_task
    The paper's Figure 1 classification task: +1 on the unit circle, -1 inside a disk.
ellipse_task
    Figure 3's task: +1 on the ellipse a*x1^2 + x2^2 = 1, -1 inside a*x1^2 + x2^2 <= level.
regression_1d
    1-D regression targets of Figure 2: sin x and the square wave sign(sin x).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import numpy as np
import torch

from ..core.adapter import seeded_generator

__all__ = [
    "gaussian_ring",
    "ring_mode_centers",
    "gaussian_grid",
    "grid_mode_centers",
    "two_moons",
    "circle_task",
    "ellipse_task",
    "regression_1d",
]

SeedLike = Union[int, torch.Generator]


# ----------------------------------------------------------------------------------------
# validation helpers (shared by the other modules of genkernel.data)
# ----------------------------------------------------------------------------------------
def _check_int(value, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as a Python int >= ``minimum``, or raise TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}); pass e.g. {name}={max(minimum, 1)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass a larger {name}")
    return value


def _check_float(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Return ``value`` as a finite Python float, or raise TypeError / ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}; pass a finite {name}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}; pass a positive {name}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}; pass a non-negative {name}")
    return value


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    return dtype


def _generator(seed: Optional[SeedLike], name: str = "seed") -> torch.Generator:
    """A CPU torch.Generator from an int seed (or the generator itself)."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU torch.Generator, got one on {seed.device}; "
                             "pass torch.Generator().manual_seed(...)")
        return seed
    if seed is None or isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int or a torch.Generator, got {type(seed).__name__} ({seed!r}); "
                        f"pass e.g. {name}=0")
    return seeded_generator(seed, name)


def _int_seed(gen: torch.Generator) -> int:
    """Draw an int seed (for numpy / scikit-learn) from a torch generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen).item())


def _uniform(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64)


def _balanced_ids(n: int, num: int, gen: torch.Generator) -> torch.Tensor:
    """n ids in 0..num-1, counts differing by at most one, in random order."""
    ids = torch.arange(n, dtype=torch.long) % num
    return ids[torch.randperm(n, generator=gen)]


# ----------------------------------------------------------------------------------------
# mixtures of Gaussians
# ----------------------------------------------------------------------------------------
def ring_mode_centers(num_modes: int = 8, radius: float = 2.0, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centres of the ring mixture.

    Returns a Tensor[num_modes, 2] of ``dtype``: centre m is
    ``radius * (cos(2*pi*m/num_modes), sin(2*pi*m/num_modes))`` (mode 0 on the +x axis,
    counter-clockwise).
    """
    num_modes = _check_int(num_modes, "num_modes")
    radius = _check_float(radius, "radius", positive=True)
    _check_dtype(dtype)
    angles = 2.0 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    return (radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)).to(dtype)


def gaussian_ring(
    n: int,
    *,
    num_modes: int = 8,
    radius: float = 2.0,
    std: float = 0.02,
    seed: SeedLike = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture of ``num_modes`` isotropic Gaussians with centres evenly spaced on a circle.

    Modes are equally represented (counts differ by at most one) and appear in random order.

    Returns
    -------
    points : Tensor[n, 2] of ``dtype`` (float32 by default)
        ``ring_mode_centers(num_modes, radius)[mode_ids] + std * N(0, I)``.
    mode_ids : LongTensor[n]
        The mode each point was drawn from, in ``0..num_modes-1``.
    """
    return _sample_mixture(ring_mode_centers(num_modes, radius, dtype=torch.float64), n, std, seed, dtype)


def grid_mode_centers(side: int = 5, spacing: float = 2.0, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centres of the grid mixture.

    Returns a Tensor[side*side, 2] of ``dtype``: the points ``((i - (side-1)/2) * spacing,
    (j - (side-1)/2) * spacing)`` for i, j in 0..side-1, centred on the origin; mode
    ``i * side + j`` has x index i and y index j.
    """
    side = _check_int(side, "side")
    spacing = _check_float(spacing, "spacing", positive=True)
    _check_dtype(dtype)
    coords = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2.0) * spacing
    gx, gy = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).to(dtype)


def gaussian_grid(
    n: int,
    *,
    side: int = 5,
    spacing: float = 2.0,
    std: float = 0.05,
    seed: SeedLike = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture of ``side*side`` isotropic Gaussians on a square grid centred on the origin.

    Modes are equally represented (counts differ by at most one) and appear in random order.

    Returns
    -------
    points : Tensor[n, 2] of ``dtype``
        ``grid_mode_centers(side, spacing)[mode_ids] + std * N(0, I)``.
    mode_ids : LongTensor[n]
        In ``0..side*side-1``.
    """
    return _sample_mixture(grid_mode_centers(side, spacing, dtype=torch.float64), n, std, seed, dtype)


def _sample_mixture(centers: torch.Tensor, n: int, std: float, seed: SeedLike, dtype: torch.dtype):
    """``(points [n, 2], mode_ids [n])``: balanced modes in random order plus std·N(0, I) noise."""
    n = _check_int(n, "n")
    std = _check_float(std, "std", nonnegative=True)
    _check_dtype(dtype)
    gen = _generator(seed)
    mode_ids = _balanced_ids(n, centers.shape[0], gen)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return (centers[mode_ids] + std * noise).to(dtype), mode_ids


# ----------------------------------------------------------------------------------------
# classification tasks
# ----------------------------------------------------------------------------------------
def two_moons(
    n: int,
    *,
    noise: float = 0.1,
    seed: SeedLike = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's ``make_moons``: two interleaving half circles, shuffled.

    Returns
    -------
    points : Tensor[n, 2] of ``dtype``
        x in about [-1, 2], y in about [-0.5, 1] (plus Gaussian noise of std ``noise``).
    labels : LongTensor[n]
        0 for the upper moon, 1 for the lower moon (n//2 or n - n//2 each).
    """
    from sklearn.datasets import make_moons

    n = _check_int(n, "n", minimum=2)
    noise = _check_float(noise, "noise", nonnegative=True)
    _check_dtype(dtype)
    gen = _generator(seed)
    x, y = make_moons(n_samples=n, noise=noise, shuffle=True, random_state=_int_seed(gen))
    return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype), torch.from_numpy(np.asarray(y)).long()


def _shuffle_pair(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, shuffle: bool):
    if not shuffle:
        return x, y
    perm = torch.randperm(x.shape[0], generator=gen)
    return x[perm], y[perm]


def circle_task(
    n: int,
    *,
    radius_sq_inner: float = 0.8,
    seed: SeedLike = 0,
    shuffle: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The circle classification task of the paper's Figure 1.

    ``n // 2`` points with label +1 lie on the unit circle x1^2 + x2^2 = 1 (angle uniform in
    [0, 2*pi)); ``n - n // 2`` points with label -1 are uniform (by area) in the disk
    x1^2 + x2^2 <= ``radius_sq_inner``. With ``shuffle=False`` the +1 points come first.
    (Figure 3's isotropic task, inner disk 0.9, is ``ellipse_task(n, a=1.0, level=0.9)``
    or ``circle_task(n, radius_sq_inner=0.9)``.)

    Returns
    -------
    X : Tensor[n, 2] of ``dtype``
    y : Tensor[n] of ``dtype`` with values in {-1., +1.}
    """
    n = _check_int(n, "n", minimum=2)
    r2 = _check_float(radius_sq_inner, "radius_sq_inner", positive=True)
    if r2 >= 1.0:
        raise ValueError(f"radius_sq_inner must be < 1 so the inner disk stays inside the unit circle, got {r2}")
    return ellipse_task(n, a=1.0, level=r2, seed=seed, shuffle=shuffle, dtype=dtype)


def ellipse_task(
    n: int,
    *,
    a: float = 100.0,
    level: float = 0.9,
    seed: SeedLike = 0,
    shuffle: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anisotropic ellipse task of the paper's Figure 3 (with ``a=1`` the circle task).

    ``n // 2`` points with label +1 lie on the ellipse a*x1^2 + x2^2 = 1, at
    ``(cos t / sqrt(a), sin t)`` with t uniform in [0, 2*pi) (the image of uniform points on
    the unit circle under the map x1 -> x1/sqrt(a)); ``n - n // 2`` points with label -1 are
    uniform (by area) inside a*x1^2 + x2^2 <= ``level``. With ``shuffle=False`` the +1 points
    come first.

    Returns
    -------
    X : Tensor[n, 2] of ``dtype``
    y : Tensor[n] of ``dtype`` with values in {-1., +1.}
    """
    n = _check_int(n, "n", minimum=2)
    a = _check_float(a, "a", positive=True)
    level = _check_float(level, "level", positive=True)
    if level >= 1.0:
        raise ValueError(f"level must be < 1 so the -1 region lies strictly inside the +1 ellipse, got {level}")
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
    _check_dtype(dtype)
    gen = _generator(seed)
    n_pos, n_neg = n // 2, n - n // 2
    sx = 1.0 / math.sqrt(a)
    t = 2.0 * math.pi * _uniform(n_pos, gen)
    pos = torch.stack([sx * torch.cos(t), torch.sin(t)], dim=1)
    phi = 2.0 * math.pi * _uniform(n_neg, gen)
    rad = torch.sqrt(level * _uniform(n_neg, gen))
    neg = torch.stack([sx * rad * torch.cos(phi), rad * torch.sin(phi)], dim=1)
    X = torch.cat([pos, neg]).to(dtype)
    y = torch.cat([torch.ones(n_pos, dtype=dtype), -torch.ones(n_neg, dtype=dtype)])
    return _shuffle_pair(X, y, gen, shuffle)


# ----------------------------------------------------------------------------------------
# 1-D regression
# ----------------------------------------------------------------------------------------
_REGRESSION_KINDS = ("sin", "square")


def regression_1d(
    kind: str,
    n: int,
    *,
    seed: SeedLike = 0,
    grid: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D regression targets on [-pi, pi] (the paper's Figure 2).

    ``kind="sin"``: y = sin x. ``kind="square"``: the square wave y = sign(sin x) on
    [-pi, pi], i.e. sign(x): +1 on (0, pi], -1 on [-pi, 0), and 0 exactly at x = 0 (the
    jump's midpoint, the value the Fourier series converges to). The ends ±pi keep the value
    of their own side in every dtype (rounded to float32 they lie just outside [-pi, pi],
    where sign(sin x) would give them the other side's value).

    x is ``n`` points uniform on [-pi, pi] sorted ascending (``grid=False``, uses ``seed``),
    or ``torch.linspace(-pi, pi, n)`` (``grid=True``, no randomness).

    Returns
    -------
    x : Tensor[n, 1] of ``dtype``
    y : Tensor[n, 1] of ``dtype``
    """
    if not isinstance(kind, str) or kind not in _REGRESSION_KINDS:
        raise ValueError(f"kind must be one of {_REGRESSION_KINDS}, got {kind!r}")
    n = _check_int(n, "n")
    if not isinstance(grid, bool):
        raise TypeError(f"grid must be a bool, got {grid!r}")
    _check_dtype(dtype)
    if grid:
        if seed is not None:
            _generator(seed)  # unused on the grid, but a bad seed is refused rather than accepted silently
        x = torch.linspace(-math.pi, math.pi, n, dtype=torch.float64)
    else:
        gen = _generator(seed)
        x, _ = torch.sort(-math.pi + 2.0 * math.pi * _uniform(n, gen))
    # round x to the output dtype first so that y is exactly the target at the returned x
    x = x.to(dtype).to(torch.float64)
    if kind == "sin":
        y = torch.sin(x)
    else:
        # sign(x), not sign(sin x): float32(pi) > pi, so sign(sin x) gave +1 at the grid's -pi and -1 at
        # its +pi, the opposite side's values (R² 0.98 for the exact square wave on a 400-point grid).
        y = torch.sign(x)
    return x.to(dtype)[:, None], y.to(dtype)[:, None]
