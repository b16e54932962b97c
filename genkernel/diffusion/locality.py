"""Kernel locality across noise levels (docs/diffusion.md, "Locality: the claim and how it is measured").

:func:`kernel_locality`: within-band minus outside-band mean of k̂ per point, with a level-label
permutation control, and the decay profile of k̂ with |Δbin|. Plain tensor arithmetic on a
kernel matrix; the ledger-side locality (traffic and net shares within a band) is read with the
grouping layer (:func:`genkernel.core.grouping.band_total`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.grouping import measured_minus_control

__all__ = ["kernel_locality"]


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
    - ``locality``: :func:`~genkernel.core.grouping.measured_minus_control` of, per clean input x, mean over its levels s of
      [mean k̂ within w bins of s − mean k̂ outside], against the same statistic after randomly
      permuting the level labels of the other states (averaged over ``num_permutations``).
    """
    n, levels = num_points, level_bins.numel()
    # A summary of an [n·L, n·L] matrix: on the CPU, wherever the kernel was computed.
    k = kernel.detach().to("cpu", torch.float64).reshape(n, levels, n, levels)
    level_bins = level_bins.cpu()
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
    return {"by_distance": by_distance, "by_distance_same_input": same, "locality": measured_minus_control(measured, control)}
