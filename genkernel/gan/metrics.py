"""Numbers the GAN analyzer reports besides the ledgers: alignment cosines, mode coverage, the push
field, the interaction statistic of a coupling matrix and intervals pooled over windows.

Coupling matrices and own-group shares are read from the ledgers by :mod:`genkernel.core.grouping`.

All functions are pure (tensors in, tensors or floats out) and float64.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..stats import MIN_UNITS, Interval, few_units, mean_interval  # (few_units, MIN_UNITS: re-exported)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[M]`` cosine between rows of ``a`` and ``b`` (flattened per row); NaN where either is zero.

    Each row is scaled to unit length before the product, so rows of any size (1e-200, 1e200) give
    their cosine, not NaN from an under- or overflowing ‖a‖·‖b‖. Rows of a different length are
    refused: broadcasting one against the other gave numbers that are no cosine (|cos| > 1)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"cosine takes two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"cosine takes [M, ...] rows, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.detach().reshape(a.shape[0], -1).to(device="cpu", dtype=torch.float64)
    b = b.detach().reshape(b.shape[0], -1).to(device="cpu", dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine compares rows of equal size, got {tuple(a.shape)} and {tuple(b.shape)} (rows × "
                         "flattened entries): pass the same number of rows, each of the same number of entries")

    def unit(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # by the largest entry first: ‖·‖ of 1e-200s underflows to 0, of 1e200s overflows to inf
        scale = rows.abs().amax(dim=1, keepdim=True)
        nonzero = (scale > 0).squeeze(1)
        rows = rows / torch.where(scale > 0, scale, torch.ones_like(scale))
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300), nonzero

    (ua, ka), (ub, kb) = unit(a), unit(b)
    cos = (ua * ub).sum(dim=1)
    return torch.where(ka & kb, cos, torch.full_like(cos, float("nan")))


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, std: float, sigmas: float = 3.0) -> dict[str, float]:
    """Mode coverage of samples: modes with at least one sample within the radius, and the share of samples within
    it of some mode ("high quality"). Both matter: a diffuse generator can hit every mode with few samples on any.

    The radius is ``sigmas``·std in 2-D; in D dimensions the one that holds the same share of an isotropic Gaussian
    mode's own samples (std · sqrt of χ²_D's quantile at 1 − exp(−sigmas²/2), 98.9 % at 3 sigmas). A fixed
    sigmas·std held a perfect generator's samples less the more dimensions: 0.656 of them in 8, 0.096 in 16 and
    none in 64 (its mode missed)."""
    _check_radius(std, "std", "the modes' standard deviation")
    _check_radius(sigmas, "sigmas", "how many std from a mode a sample counts as on it")
    if not isinstance(samples, torch.Tensor) or samples.dim() == 0 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty [N, ...] tensor, got {tuple(getattr(samples, 'shape', ()))}: "
                         "the share of samples on a mode is undefined without samples")
    flat = samples.detach().to("cpu", torch.float64).reshape(samples.shape[0], -1)  # either may be on a GPU
    centers = torch.as_tensor(centers.detach() if isinstance(centers, torch.Tensor) else centers, dtype=torch.float64)
    centers = centers.to("cpu")
    if centers.dim() != 2 or centers.shape[0] == 0 or centers.shape[1] != flat.shape[1]:
        raise ValueError(f"centers must be [K, {flat.shape[1]}] (K ≥ 1 modes in the samples' {flat.shape[1]} "
                         f"coordinates), got {tuple(centers.shape)}")
    # Distances as sqrt(Σ (x − μ)²), not by the matrix-product expansion cdist uses from 25 rows on,
    # whose rounding put a sample at exactly sigmas·std from a mode outside it.
    d = torch.cdist(flat, centers, compute_mode="donot_use_mm_for_euclid_dist")
    near = d <= coverage_radius(std, sigmas, flat.shape[1])
    hit = near.any(dim=0)
    return {
        "modes_hit": int(hit.sum()),
        "num_modes": int(centers.shape[0]),
        "quality_share": float(near.any(dim=1).to(torch.float64).mean()),
        "mode_counts": near.sum(dim=0).tolist(),
    }




def coverage_radius(std: float, sigmas: float, dim: int) -> float:
    """The distance from a mode's centre within which :func:`mode_coverage` counts a sample on it: ``sigmas``·std
    in 2-D (exactly), in ``dim`` dimensions std times the root of χ²_dim's quantile at the share
    1 − exp(−sigmas²/2) that radius holds of a 2-D isotropic Gaussian's samples."""
    if dim == 2:
        return sigmas * std
    from scipy.stats import chi2

    # The tail exp(−sigmas²/2), not the share 1 − tail: from sigmas ≈ 8.6 the share rounds to 1 and χ²'s quantile
    # there is inf (every sample on every mode, silently).
    tail = math.exp(-sigmas * sigmas / 2)
    if tail == 0.0:
        raise ValueError(f"sigmas={sigmas} leaves a mode's share outside the radius, exp(-sigmas^2/2), below the "
                         f"smallest float in {dim} dimensions: the radius would hold every sample; pass sigmas <= 38")
    return std * math.sqrt(float(chi2.isf(tail, dim)))


def check_coverage(std: Any, sigmas: Any, dim: int) -> float:
    """The radius :func:`mode_coverage` will use in ``dim`` dimensions; ValueError naming the argument where ``std``
    or ``sigmas`` is not a finite number > 0, or ``sigmas`` is so large that the radius holds every sample: the
    analyzer checks its settings with it when it is built, not at its first coverage."""
    _check_radius(std, "std", "the modes' standard deviation")
    _check_radius(sigmas, "sigmas", "how many std from a mode a sample counts as on it")
    return coverage_radius(float(std), float(sigmas), dim)


def _check_radius(value: Any, name: str, what: str) -> None:
    """ValueError unless ``value`` is a finite real number > 0 (a negative or NaN radius counts no
    sample as on a mode, silently; 0 only samples exactly on a centre)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if isinstance(value, bool) or not (0 < number < math.inf):
        raise ValueError(f"{name} must be a finite number > 0 ({what}), got {value!r}")


def push_field(loss_fn, samples: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, ...]`` the discriminator's push −w = −∇_x ℓ_G(D(x)) at arbitrary samples (e.g. a grid);
    a conditional GAN's −∇_x ℓ_G(D(x, y_n)) with ``classes`` a ``LongTensor[N]``.

    ``loss_fn`` is the generator loss ``loss_fn(samples, classes) -> [N]``. D runs in its current mode;
    when ``loss_fn`` has a ``.discriminator`` (a :class:`~genkernel.gan.GeneratorLoss`) its buffers
    (running statistics, spectral norm's u, v) are written back after, so nothing about training
    changes (``with frozen(D, modes="eval")`` evaluates it in eval mode instead).
    """
    from .passes import preserved

    with torch.enable_grad(), preserved(getattr(loss_fn, "discriminator", None)):
        x = samples.detach().clone().requires_grad_(True)
        (w,) = torch.autograd.grad(loss_fn(x, classes).sum(), x)
    return -w.detach()


# -- coupling statistics ----------------------------------------------------------------------
def _check_shares(shares: torch.Tensor, probe_groups: torch.Tensor, num_groups: int) -> None:
    """Raise ValueError unless ``shares`` is ``[M, num_groups]`` and ``probe_groups`` is ``[M]`` of
    integer ids in [0, num_groups): the source groups (columns) and the probes' own groups are the
    same partition, so a probe's own share is ``shares[m, probe_groups[m]]``."""
    from ..core.grouping import check_probe_groups

    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if shares.dim() != 2:
        raise ValueError(f"shares must be [M, G] (probes × source groups), got {tuple(shares.shape)}")
    if shares.shape[1] != num_groups:
        raise ValueError(f"shares has {shares.shape[1]} group columns but num_groups={num_groups}: the columns are "
                         f"the source groups, the same partition as the probes' groups; pass num_groups={shares.shape[1]} "
                         f"or the shares of the partition whose groups the probes carry")
    check_probe_groups(probe_groups, shares.shape[0], num_groups)


def own_minus_others(shares: torch.Tensor, probe_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[M]`` the interaction statistic: each probe's share from its own group a, minus the mean over
    the *other* probe groups a' ≠ a of their (probe-averaged) share from the same source group a.

    ``shares [M, G]`` are per-probe traffic or net shares of a partition, ``probe_groups [M]`` the
    probes' own groups. Own share minus control is confounded by source-group strength: when a
    source group pushes every probe hard, its whole column of the coupling matrix is large and every
    probe's own entry in it too. Subtracting the same column's entries of the other probe groups
    removes that: what is left is how much *more* a group's training latents move its own probes
    than they move the others. NaN for a probe whose column has no other occupied probe group.
    """
    from ..core.grouping import average_by_probe_group, own_share

    _check_shares(shares, probe_groups, num_groups)
    groups = probe_groups.to(torch.long).cpu()
    shares = shares.to(torch.float64).cpu()
    matrix = average_by_probe_group(shares, groups, num_groups)  # [G, G], NaN rows for empty probe groups
    columns = matrix.T[groups].clone()  # [M, G]: columns[m, a'] = matrix[a', group(m)]
    columns[torch.arange(groups.shape[0]), groups] = float("nan")
    finite = torch.isfinite(columns)
    count = finite.sum(dim=1)
    others = torch.where(finite, columns, torch.zeros_like(columns)).sum(dim=1) / count.clamp_min(1)
    others = torch.where(count > 0, others, torch.full_like(others, float("nan")))
    return own_share(shares, groups) - others


def pooled_interval(values: Sequence[Sequence[float | None]], clusters: Sequence[Sequence[int]]) -> Interval:
    """Student-t interval of per-probe values pooled over several windows of one run, clustered by
    probe group: probes that share a group (in any window; the grouping is fitted once and keeps its
    meaning) are one unit, so 64 probes in 2 groups count as 2 values, not 64."""
    values, clusters = [list(row) for row in values], [list(row) for row in clusters]
    if len(values) != len(clusters) or any(len(v) != len(c) for v, c in zip(values, clusters)):
        raise ValueError(
            f"values and clusters must pair up window by window, one probe group per value: got windows of "
            f"{[len(v) for v in values]} values and of {[len(c) for c in clusters]} labels (flattened, a label "
            "would be read against another window's probe)")
    flat = np.asarray([np.nan if v is None else float(v) for row in values for v in row], dtype=np.float64)
    labels = np.asarray([int(c) for row in clusters for c in row])
    if flat.size == 0:
        return mean_interval(flat)
    return mean_interval(flat, clusters=labels)


def image_coverage(samples: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, held_out: torch.Tensor,
                   *, quantile: float = 0.95) -> dict[str, Any]:
    """Mode coverage of image samples, by nearest neighbours (the image analogue of :func:`mode_coverage`).

    A sample's class is that of its nearest training image (Euclidean, pixels); it is *on the data*
    when that distance is at most the ``quantile`` of held-out real images' nearest-training
    distances. Returns ``{"modes_hit", "num_modes", "quality_share", "mode_counts", "threshold", "classes"}``:
    classes with at least one on-data sample, the number of distinct training labels, the share of
    on-data samples, on-data samples per class (in the order of ``classes``, the sorted distinct
    training labels: any integers, e.g. {3, 7}), the distance threshold. Noise samples are far from
    every training image: no class is hit.
    """
    def flat(x, name):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty [N, ...] tensor of images, got "
                             f"{tuple(getattr(x, 'shape', ())) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()

    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be a number in [0, 1] (of held-out images' nearest-training distances), got {quantile!r}")
    base = flat(train, "train")
    if not isinstance(train_labels, torch.Tensor) or train_labels.numel() != base.shape[0]:
        raise ValueError(f"train_labels must hold one label per training image ({base.shape[0]}), got "
                         f"{tuple(getattr(train_labels, 'shape', ()))}")
    if train_labels.is_floating_point() or train_labels.is_complex() or train_labels.dtype == torch.bool:
        raise ValueError(f"train_labels must be integer class labels, got dtype {train_labels.dtype}")
    labels = train_labels.reshape(-1).long().cpu()
    held_flat, sample_flat = flat(held_out, "held_out"), flat(samples, "samples")
    for name, rows in (("held_out", held_flat), ("samples", sample_flat)):
        if rows.shape[1] != base.shape[1]:
            raise ValueError(f"{name} have {rows.shape[1]} pixels per image but the training images {base.shape[1]}")

    def nearest_training(rows):
        # cdist's matrix-product expansion (|x|² + |t|² − 2x·t, from 25 rows on) finds the nearest image fast,
        # but its rounding is ~1e-6 in the distance: an image's own copy came out 8.9e-7 away, and a held-out
        # image offered as a sample fell outside the threshold its own distance set. The distance to the nearest
        # image is recomputed as ‖x − t‖, so one image gives one distance wherever it is compared.
        nearest = torch.cdist(rows, base).argmin(dim=1)
        return (rows - base[nearest]).norm(dim=1), nearest

    held, _ = nearest_training(held_flat)
    threshold = float(torch.quantile(held, quantile))
    distance, nearest = nearest_training(sample_flat)
    near = distance <= threshold
    classes, index = torch.unique(labels, sorted=True, return_inverse=True)  # labels need not be 0..C-1
    counts = torch.bincount(index[nearest][near], minlength=classes.shape[0])
    return {"modes_hit": int((counts > 0).sum()), "num_modes": int(classes.shape[0]),
            "quality_share": float(near.to(torch.float64).mean()), "mode_counts": counts.tolist(), "threshold": threshold,
            "classes": classes.tolist()}


def converged(coverage: dict[str, Any], *, modes_fraction: float = 0.75, quality: float = 0.5,
              modes: str = "modes", on: str = "on a mode") -> tuple[bool, str]:
    """Did the GAN converge enough for claims about a trained GAN? ``(ok, why)`` from a coverage record
    (:func:`mode_coverage` or :func:`image_coverage`): at least ``modes_fraction`` of the modes hit
    *and* at least ``quality`` of the samples on a mode (a diffuse generator hits every mode with few
    samples on any). ``modes`` and ``on`` name them in ``why`` (e.g. "classes", "on the data")."""
    hit, total, share = coverage["modes_hit"], coverage["num_modes"], coverage["quality_share"]
    need = math.ceil(round(modes_fraction * total, 9))  # 0.28 * 25 is 7.000000000000001 in floats: 7 modes, not 8
    ok = hit >= need and share >= quality
    why = (f"{hit} of {total} {modes} hit and {100 * share:.0f}% of samples {on} at the end; a converged GAN needs at "
           f"least {need} {modes} and {100 * quality:.0f}%")
    return ok, why


__all__ = ["MIN_UNITS", "few_units", "converged", "cosine", "coverage_radius", "image_coverage", "mode_coverage", "own_minus_others", "pooled_interval", "push_field"]
