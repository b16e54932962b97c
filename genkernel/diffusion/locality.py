"""Locality summaries and their intervals (DESIGN.md sections 2 and 3).

Everything here is plain tensor arithmetic on ledger summaries; nothing touches a model.

- :func:`band_mask`: which training-level bins lie within w bins of each probe's level.
- :func:`band_total`: a probe's share (or traffic share) within the band.
- :func:`level_average`: average probes at the same level -> the noise × noise matrix.
- :func:`compare`: "measured minus control" with a 95 % t-interval over probes (or points).
- :func:`kernel_locality`: within-band minus outside-band mean of k̂ per point, with a
  level-label permutation control, and the decay profile of k̂ with |Δbin|.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["band_mask", "band_total", "level_average", "mean_interval", "compare", "kernel_locality"]


def band_mask(probe_bins: torch.Tensor, num_bins: int, band: int) -> torch.Tensor:
    """``[M, G]`` True where |g − bin(probe)| <= band."""
    if band < 0:
        raise ValueError(f"band must be >= 0 bins, got {band}")
    g = torch.arange(num_bins, device=probe_bins.device)
    return (g[None, :] - probe_bins[:, None]).abs() <= band


def band_total(matrix: torch.Tensor, probe_bins: torch.Tensor, band: int) -> torch.Tensor:
    """``[M]`` Σ over the band of ``matrix [M, G]`` (NaN rows stay NaN)."""
    mask = band_mask(probe_bins, matrix.shape[1], band).to(matrix.dtype)
    return (matrix * mask).sum(dim=1)


def level_average(matrix: torch.Tensor, probe_levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """``[L, ...]`` mean of ``matrix [M, ...]`` over the probes at each level (NaN-aware)."""
    out = torch.full((num_levels, *matrix.shape[1:]), float("nan"), dtype=torch.float64)
    for level in range(num_levels):
        rows = matrix[probe_levels == level].to(torch.float64)
        if rows.shape[0]:
            out[level] = rows.nanmean(dim=0)
    return out


def mean_interval(values: torch.Tensor, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)``: Student-t interval of the mean of the finite ``values``."""
    from scipy import stats

    v = values[torch.isfinite(values)].to(torch.float64)
    n = int(v.numel())
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n == 1:
        return mean, math.nan, math.nan, 1
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(v.std(unbiased=True)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def compare(measured: torch.Tensor, control: torch.Tensor, *, confidence: float = 0.95) -> dict[str, Any]:
    """Paired "measured minus control" over probes: means, the difference's interval, held.

    ``held`` is True when the whole interval of the difference lies above zero (localized beyond
    the control), False otherwise (including an undefined interval).
    """
    diff = measured.to(torch.float64) - control.to(torch.float64)
    mean, low, high, n = mean_interval(diff, confidence)
    return {
        "measured": float(measured[torch.isfinite(measured)].double().mean()) if n else math.nan,
        "control": float(control[torch.isfinite(control)].double().mean()) if n else math.nan,
        "difference": mean,
        "interval": [low, high],
        "confidence": confidence,
        "n": n,
        "held": bool(n > 1 and math.isfinite(low) and low > 0),
    }


def kernel_locality(
    kernel: torch.Tensor,
    num_points: int,
    level_bins: torch.Tensor,
    band: int,
    *,
    num_permutations: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Kernel locality from k̂ between states of ``num_points`` clean inputs at L levels.

    Args:
        kernel: ``[n·L, n·L]`` normalized kernel, rows point-major (state i·L + a).
        level_bins: ``[L]`` the noise-level bin of each level.
        band: w, in bins.

    Returns a dict with, over pairs of *different* clean inputs (x ≠ x'):

    - ``by_distance``: mean k̂ at every |Δbin| = 0 … G−1 (NaN where no pair has that distance),
    - ``by_distance_same_input``: the same for x = x' (same clean input and noise, two levels),
    - ``locality``: :func:`compare` of, per clean input x, mean over its levels s of
      [mean k̂ within w bins of s − mean k̂ outside], against the same statistic after randomly
      permuting the level labels of the other states (averaged over ``num_permutations``).
    """
    n, levels = num_points, level_bins.numel()
    k = kernel.to(torch.float64).reshape(n, levels, n, levels)
    dist = (level_bins[:, None] - level_bins[None, :]).abs()  # [L, L]
    num_bins = int(level_bins.max()) + 1
    other = ~torch.eye(n, dtype=torch.bool)
    by_distance, same = [], []
    for delta in range(num_bins):
        sel = dist == delta
        if sel.any():
            pairs = k.permute(0, 2, 1, 3)[other][:, sel]  # [n(n-1), #]
            by_distance.append(float(pairs.mean()))
            diag = torch.stack([k[i, :, i, :][sel] for i in range(n)])
            same.append(float(diag.mean()))
        else:
            by_distance.append(math.nan)
            same.append(math.nan)

    def statistic(kk: torch.Tensor, col_bins: torch.Tensor) -> torch.Tensor:
        # kk [n, L, n, L]; col_bins [n, L] bins of the column states -> [n], one value per point i.
        d = (level_bins[:, None, None] - col_bins[None, :, :]).abs()  # [L, n, L]
        keep = other[:, None, :, None]  # [n, 1, n, 1]: x' != x
        inside = ((d <= band)[None] & keep).to(torch.float64)  # [n, L, n, L]
        outside = ((d > band)[None] & keep).to(torch.float64)
        n_in, n_out = inside.sum(dim=(2, 3)), outside.sum(dim=(2, 3))  # [n, L]
        mean_in = (kk * inside).sum(dim=(2, 3)) / n_in.clamp_min(1)
        mean_out = (kk * outside).sum(dim=(2, 3)) / n_out.clamp_min(1)
        valid = (n_in > 0) & (n_out > 0)
        per_level = torch.where(valid, mean_in - mean_out, torch.full_like(mean_in, math.nan))
        return per_level.nanmean(dim=1)

    measured = statistic(k, level_bins[None, :].expand(n, levels))
    generator = torch.Generator().manual_seed(seed)
    control = torch.zeros(n, dtype=torch.float64)
    for _ in range(num_permutations):
        perm = torch.stack([level_bins[torch.randperm(levels, generator=generator)] for _ in range(n)])
        control += statistic(k, perm) / num_permutations
    return {"by_distance": by_distance, "by_distance_same_input": same, "locality": compare(measured, control)}
