"""Kernel locality across noise levels (docs/diffusion.md, "Locality: the claim and how it is measured").

:func:`kernel_locality`: within-band minus outside-band mean of k̂ per point, with a level-label
permutation control, and the decay profile of k̂ with |Δbin|. Plain tensor arithmetic on a
kernel matrix; the ledger-side locality (traffic and net shares within a band) is read with the
grouping layer (:func:`genkernel.core.grouping.band_total`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..core.adapter import seeded_generator
from ..core.grouping import measured_minus_control

__all__ = ["kernel_locality", "locality_per_input", "locality_pseudo_values"]


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
    - ``by_distance_same_input``: the same for x = x' (same clean input and noise, two different
      levels: a state's k̂ with itself, 1, is left out; NaN at 0 when no bin holds two levels),
    - ``locality``: :func:`~genkernel.core.grouping.measured_minus_control` of, per clean input x, mean over its levels s of
      [mean k̂ within w bins of s − mean k̂ outside], against the same statistic after randomly
      permuting x's own level labels (each level s of x read as another level π(s) of the same
      set; the other states keep theirs; averaged over ``num_permutations``). Permuting x's labels
      keeps, over its levels, the same columns inside and outside the band, so a kernel with no
      |Δbin| structure, k̂ = c + h(s) + h(t) (some levels more similar to every state than
      others), has locality exactly equal to its control. Permuting the other states' labels
      instead moved those columns across the band edge, and such a kernel held (difference 0.0099,
      interval [0.0073, 0.0125] for h peaked at the middle levels, 8 inputs, 6 bins, band 1); its
      interval is a delete-one-input jackknife (``method`` "jackknife-t"), not a t-interval over the
      per-input values: those share kernel entries (k̂(x, x') enters x's value and x''s), so they
      are dependent, and the t-interval over them held in 6.5-9 % of 200 null kernels at a nominal
      2.5 %. The jackknife drops an input with every entry it enters. With fewer than 3 inputs
      there is no jackknife: the interval is [NaN, NaN], ``held`` False and ``why`` says so; likewise
      (difference NaN) when no level has states outside the band (band >= the span of the bins), and
      when the pseudo-values differ by rounding alone (a kernel whose locality is exactly its control's).
      The permutation control cancels level effects that add (k̂ = c + h(s) + h(t)) but not ones that
      multiply: k̂ = c·g(s)·g(t), every state most alike the levels of largest g (lower noise, say), has
      no |Δbin| structure, yet the rows' scale g(s) pairs with the band's mean around s and the
      difference held. So the same difference is also taken with each state's entries to the other
      inputs' states standardized (centred, unit spread: such a kernel's rows become one row, its
      difference exactly its control's), reported under ``"standardized"``, and ``held`` needs both.
    """
    n = num_points
    level_bins = _check_levels(level_bins, band, num_permutations)
    k = _point_major(kernel, num_points, level_bins)
    levels = level_bins.numel()
    dist = (level_bins[:, None] - level_bins[None, :]).abs()  # [L, L]
    num_bins = int(level_bins.max()) + 1
    other = ~torch.eye(n, dtype=torch.bool)
    two_levels = ~torch.eye(levels, dtype=torch.bool)  # x = x': a state against itself (k̂ = 1) is no pair of levels
    by_distance, same = [], []
    for delta in range(num_bins):
        sel = dist == delta
        if sel.any():
            pairs = k.permute(0, 2, 1, 3)[other][:, sel]  # [n(n-1), #]
            by_distance.append(float(pairs.mean()))
        else:
            by_distance.append(math.nan)
        sel_same = sel & two_levels
        if sel_same.any():
            diag = torch.stack([k[i, :, i, :][sel_same] for i in range(n)])
            same.append(float(diag.mean()))
        else:
            same.append(math.nan)

    locality = _jackknifed(_Differences(k, level_bins, band, num_permutations, seed))
    # The same on each row state's entries standardized (centred and scaled over the other inputs' states): a kernel
    # whose states differ only in how strongly they go with every level, k̂ = c·g(s)·g(t) (lower-noise states more
    # alike whatever the level), has no |Δbin| structure, yet its raw difference exceeds the control (the rows' scale
    # g(s) pairs with the band's mean around s: held at [0.049, 0.061] for g falling from 1 to 0.2, 5 inputs); its
    # standardized rows are one row repeated, whose difference is exactly its control's. The locality holds only
    # where both do.
    scaled = _jackknifed(_Differences(_standardized_rows(k), level_bins, band, num_permutations, seed))
    locality["standardized"] = {key: scaled[key] for key in ("difference", "interval", "held", "why") if key in scaled}
    if locality["held"] and not scaled["held"]:
        locality["held"] = False
        locality["why"] = ("the excess within the band is the states' scale, not their distance: with each state's "
                           "entries standardized over the other inputs' states the difference is "
                           f"{scaled['difference']:.3g}, interval [{scaled['interval'][0]:.3g}, {scaled['interval'][1]:.3g}]"
                           + (f" ({scaled['why']})" if scaled.get("why") else "") + ", not above its control: a kernel "
                           "k̂ = c·g(s)·g(t), in which every state is most alike the levels of largest g, exceeds this "
                           "control without |Δbin| structure")
    return {"by_distance": by_distance, "by_distance_same_input": same, "locality": locality}


def _jackknifed(differences: "_Differences") -> dict[str, Any]:
    """:func:`kernel_locality`'s ``locality`` entry for the kernel ``differences.k [n, L, n, L]``: measured − control
    over the inputs, with its delete-one-input jackknife-t interval (or none, and why)."""
    k, band = differences.k, differences.band
    n = k.shape[0]
    measured, control = differences(torch.arange(n))
    # (the control is the mean of num_permutations relabellings: "controls" counts those, not the one averaged row)
    locality = {**measured_minus_control(measured, control), "controls": len(differences.perms)}
    pseudo = differences.pseudo_values()
    finite = torch.isfinite(pseudo)
    m = int(finite.sum())
    spread = float(pseudo[finite].std(unbiased=True)) if m >= 3 else math.nan
    # Pseudo-values that differ by rounding alone (n·D − (n − 1)·D₋ᵢ of means of k̂ entries: ~n·eps·max|k̂|) give no
    # standard error: an interval of their width about a rounding residue held on kernels whose locality is exactly
    # their control's ([1.50e-17, 1.97e-17] for k̂ = 0.2 + 0.1·(h(s) + h(t)), 5 inputs; [3.1e-33, 3.1e-33] for a
    # constant k̂), as mean_interval refuses values without spread.
    rounding = 64 * n * torch.finfo(torch.float64).eps * float(k.abs().max())
    if m >= 3 and math.isfinite(locality["difference"]) and spread > rounding:
        # The jackknife-t interval: a t-interval over the pseudo-values, about the plain estimate.
        from scipy import stats as scipy_stats

        half = float(scipy_stats.t.ppf(0.5 + locality["confidence"] / 2, m - 1)) * spread / math.sqrt(m)
        low, high = locality["difference"] - half, locality["difference"] + half
        locality.update(interval=[low, high], method="jackknife-t", n=m, held=bool(low > 0.0))
    else:
        # No jackknife (fewer than 3 inputs, or no finite statistic): the t-interval over the per-input
        # values, which share kernel entries, is no valid interval (with 2 inputs it held on unstructured kernels).
        locality.update(interval=[math.nan, math.nan], method="jackknife-t", n=m, held=False)
        span = int(differences.level_bins.max() - differences.level_bins.min())
        if band >= span:
            locality["why"] = (f"no state lies outside the band: the levels' bins are at most {span} apart and band={band}; "
                               f"pass band < {span}")
        elif n < 3:
            locality["why"] = f"{n} clean input(s): the jackknife interval needs at least 3 (kernel points)"
        elif m >= 3 and math.isfinite(locality["difference"]):
            locality["why"] = (f"the jackknife pseudo-values differ by rounding alone (spread {spread:.2g}; no spread "
                               f"over the inputs beyond {rounding:.2g}): the standard error is unknown, not 0, and the "
                               f"difference {locality['difference']:.2g} is rounding")
    return locality


def _standardized_rows(k: torch.Tensor) -> torch.Tensor:
    """``k [n, L, n, L]`` with each row state's entries to the other inputs' states centred and scaled to unit
    spread (its entries to its own input's states, which no statistic here reads, left as they are); a row with
    no spread is all zeros."""
    n = k.shape[0]
    other = (~torch.eye(n, dtype=torch.bool))[:, None, :, None].expand_as(k)  # [n, L, n, L]: x' != x
    count = other.sum(dim=(2, 3), keepdim=True)
    mean = (k * other).sum(dim=(2, 3), keepdim=True) / count
    spread = (((k - mean) * other).square().sum(dim=(2, 3), keepdim=True) / count).sqrt()
    tiny = spread <= 64 * torch.finfo(torch.float64).eps * k.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-300)
    return torch.where(other, torch.where(tiny, torch.zeros_like(k), (k - mean) / spread.clamp_min(1e-300)), k)


def sketch_jackknife(leave_one_out: torch.Tensor, num_points: int, level_bins: torch.Tensor, band: int, *,
                     num_permutations: int = 20, seed: int = 0) -> dict[str, Any]:
    """The sketch's own standard error of each number :func:`kernel_locality` reads off a sketched kernel.

    Args:
        leave_one_out: ``[V, n·L, n·L]`` the normalized kernel estimated without each of its V output
            directions (:func:`~genkernel.diffusion.kernels.state_kernel`'s ``errors["leave_one_out"]``).
        num_points, level_bins, band, num_permutations, seed: as :func:`kernel_locality` (the same
            permutations for every leave-one-out kernel, so that the control's own noise is not counted).

    Returns ``{"by_distance": [G], "by_distance_same_input": [G], "locality": float}``: the delete-one jackknife
    standard error over the V directions of each (NaN where the number itself is NaN). The error of a mean of
    kernel entries is the spread of that mean over the leave-one-out kernels, not the largest entry's error: the
    entries' errors partly cancel in it (the largest off-diagonal entry's overstated ``by_distance``'s 2-20 times).
    The locality interval is over clean inputs and holds none of this.
    """
    from .kernels import jackknife_error

    values = [kernel_locality(k, num_points, level_bins, band, num_permutations=num_permutations, seed=seed)
              for k in leave_one_out]
    by_distance = jackknife_error(torch.tensor([v["by_distance"] for v in values], dtype=torch.float64))
    same = jackknife_error(torch.tensor([v["by_distance_same_input"] for v in values], dtype=torch.float64))
    locality = jackknife_error(torch.tensor([v["locality"]["difference"] for v in values], dtype=torch.float64))
    return {"by_distance": by_distance.tolist(), "by_distance_same_input": same.tolist(), "locality": float(locality)}


def locality_per_input(kernel: torch.Tensor, num_points: int, level_bins: torch.Tensor, band: int, *,
                       num_permutations: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel locality per clean input, with its permutation control: the per-input values that
    :func:`kernel_locality` averages, kept so that two checkpoints (θ₀ and θ_T) can be paired input
    by input.

    Args:
        kernel: ``[n·L, n·L]`` normalized kernel, rows point-major (state i·L + a), as
            :func:`genkernel.diffusion.make_states` orders them.
        level_bins: ``[L]`` the noise-level bin of each level; band: w, in bins.

    Returns:
        ``(measured [n], control [n])`` float64: per clean input x, the mean over its levels s of
        [mean k̂ to states of other inputs within w bins of s − mean k̂ to those outside], and the
        same with x's own level labels permuted (mean over ``num_permutations``; see
        :func:`kernel_locality`). The
        values share kernel entries, so do not treat them as independent: intervals over inputs
        use :func:`locality_pseudo_values`.
    """
    level_bins = _check_levels(level_bins, band, num_permutations)
    k = _point_major(kernel, num_points, level_bins)
    return _Differences(k, level_bins, band, num_permutations, seed)(torch.arange(num_points))


LOCALITY_ROWS = ("raw", "standardized")


def locality_pseudo_values(kernel: torch.Tensor, num_points: int, level_bins: torch.Tensor, band: int, *,
                           num_permutations: int = 20, seed: int = 0, rows: str = "raw") -> torch.Tensor:
    """``[n]`` delete-one-input jackknife pseudo-values of :func:`kernel_locality`'s statistic
    (mean over inputs of locality minus its permutation control): n·D − (n − 1)·D₍₋ᵢ₎, with D₍₋ᵢ₎ the
    statistic over the other inputs alone. Their mean is the jackknife estimate of D, and a
    t-interval over them is the jackknife interval; unlike the per-input values, which share
    kernel entries, they can be treated as independent. Pseudo-values of two kernels on the same
    inputs (θ₀ and θ_T) subtract into those of the difference.

    ``rows``: "raw" (the kernel as it is) or "standardized": each state's entries to the other inputs'
    states centred and scaled to unit spread first, :func:`kernel_locality`'s ``"standardized"`` difference,
    which a kernel whose states differ only in scale (k̂ = c·g(s)·g(t)) does not pass."""
    if rows not in LOCALITY_ROWS:
        raise ValueError(f"rows must be one of {LOCALITY_ROWS}, got {rows!r}")
    level_bins = _check_levels(level_bins, band, num_permutations)
    k = _point_major(kernel, num_points, level_bins)
    if rows == "standardized":
        k = _standardized_rows(k)
    return _Differences(k, level_bins, band, num_permutations, seed).pseudo_values()


def _check_levels(level_bins: Any, band: Any, num_permutations: Any) -> torch.Tensor:
    """``level_bins`` as a CPU LongTensor ``[L]`` (a list is fine) after checking it and the band
    (a non-negative int) and the number of permutations (a positive int: the control is their mean)."""
    level_bins = torch.as_tensor(level_bins).cpu()
    if level_bins.dim() != 1 or level_bins.numel() == 0 or level_bins.is_floating_point() or level_bins.dtype == torch.bool:
        raise TypeError(f"level_bins must be the integer bin of each level, a 1-D LongTensor [L], got "
                        f"{level_bins.dtype} {tuple(level_bins.shape)}")
    if int(level_bins.min()) < 0:
        raise ValueError(f"level_bins must be bin indices >= 0, got {level_bins.tolist()}")
    if isinstance(band, bool) or not isinstance(band, numbers.Integral) or band < 0:
        raise ValueError(f"band must be a non-negative int (bins), got {band!r}")
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, numbers.Integral) or num_permutations < 1:
        raise ValueError(f"num_permutations must be a positive int (the control is their mean), got {num_permutations!r}")
    return level_bins.long()


def _point_major(kernel: torch.Tensor, num_points: int, level_bins: torch.Tensor) -> torch.Tensor:
    """``kernel`` ``[n·L, n·L]`` as float64 ``[n, L, n, L]`` on the CPU (a summary of a matrix runs
    there, wherever the kernel was computed)."""
    n, levels = num_points, level_bins.numel()
    if kernel.shape != (n * levels, n * levels):
        raise ValueError(f"kernel must be [n·L, n·L] = [{n * levels}, {n * levels}] for {n} inputs at {levels} levels, "
                         f"got {tuple(kernel.shape)}")
    k = kernel.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(k).all()):
        # A NaN entry would drop the levels it enters from their inputs' means (nanmean) and leave a
        # finite locality over the rest, read as if computed from the whole kernel.
        bad = (~torch.isfinite(k)).nonzero()[:5].tolist()
        raise ValueError(f"kernel has non-finite entries (rows, columns {bad}, ...): the locality of a kernel "
                         "with NaN or inf entries is not defined; recompute it (float64 model, finite inputs)")
    return k.reshape(n, levels, n, levels)


class _Differences:
    """Per-input locality and its permutation control over any subset of the inputs of ``k``
    ``[n, L, n, L]``, with the permutations drawn once (so every subset sees the same ones). A
    permutation ``[n, L]`` relabels each input's own (row) states; the columns keep their bins."""

    def __init__(self, k: torch.Tensor, level_bins: torch.Tensor, band: int, num_permutations: int, seed: int):
        self.k, self.level_bins, self.band = k, level_bins, band
        n, levels = k.shape[0], k.shape[1]
        generator = seeded_generator(seed)
        self.perms = [torch.stack([level_bins[torch.randperm(levels, generator=generator)] for _ in range(n)])
                      for _ in range(num_permutations)]

    def statistic(self, kk: torch.Tensor, row_bins: torch.Tensor) -> torch.Tensor:
        """kk ``[m, L, m, L]``; row_bins ``[m, L]`` the bins the row states are read at -> ``[m]``, per
        input i the mean over its levels of [mean k̂ within the band − mean k̂ outside], other inputs
        only. The columns keep their own bins."""
        d = (row_bins[:, :, None, None] - self.level_bins[None, None, None, :]).abs()  # [m, L, 1, L]
        keep = (~torch.eye(kk.shape[0], dtype=torch.bool))[:, None, :, None]  # [m, 1, m, 1]: x' != x
        inside = ((d <= self.band) & keep).to(torch.float64)  # [m, L, m, L]
        outside = ((d > self.band) & keep).to(torch.float64)
        n_in, n_out = inside.sum(dim=(2, 3)), outside.sum(dim=(2, 3))  # [m, L]
        mean_in = (kk * inside).sum(dim=(2, 3)) / n_in.clamp_min(1)
        mean_out = (kk * outside).sum(dim=(2, 3)) / n_out.clamp_min(1)
        valid = (n_in > 0) & (n_out > 0)
        per_level = torch.where(valid, mean_in - mean_out, torch.full_like(mean_in, math.nan))
        return per_level.nanmean(dim=1)

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(measured ``[m]``, control ``[m]``) over the inputs ``points`` alone."""
        kk = self.k[points][:, :, points]
        measured = self.statistic(kk, self.level_bins[None, :].expand(points.numel(), -1))
        control = sum(self.statistic(kk, perm[points]) for perm in self.perms) / max(len(self.perms), 1)
        return measured, control

    def pseudo_values(self) -> torch.Tensor:
        n = self.k.shape[0]
        if n < 3:
            return torch.full((n,), math.nan, dtype=torch.float64)
        measured, control = self(torch.arange(n))
        whole = float((measured - control).nanmean())
        out = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            m, c = self(torch.cat([torch.arange(i), torch.arange(i + 1, n)]))
            out[i] = n * whole - (n - 1) * float((m - c).nanmean())
        return out
