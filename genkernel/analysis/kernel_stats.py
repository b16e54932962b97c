"""Summaries of a kernel matrix against labels: class-block means, within-minus-between gaps,
the scale-free block AUC, centered kernel–target alignment and kernel distances (docs/summaries.md, "Kernel structure"). The
kernel's locality across noise levels per clean input is :func:`genkernel.diffusion.locality_per_input`.

Absolute gaps (within − between) grow when every similarity falls and the spread widens, so a
claim that training sharpened class blocks uses :func:`block_auc` (the probability that a
within-class pair is more similar than a between-class pair: invariant to any increasing
transformation of the kernel) before and after.

All functions take torch tensors or array-likes and return float64 results on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .spectral import kernel_target_alignment

__all__ = [
    "BlockAUC", "BlockGap", "block_auc", "centered_alignment", "class_block_means", "kernel_distance",
    "within_between_gap",
]


def _real(x, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array; complex input is refused (a cast would drop the imaginary part,
    silently for a torch tensor)."""
    if (x.is_complex() if isinstance(x, torch.Tensor) else np.iscomplexobj(x)):
        raise TypeError(f"{name} is complex; pass real values (e.g. the real part, if that is the kernel meant)")
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a torch.Tensor or an array-like of real numbers, got {type(x).__name__}") from exc


def _eps(x) -> float:
    """Machine epsilon of ``x``'s floating dtype (float64's for anything else, e.g. lists or integers)."""
    if isinstance(x, torch.Tensor):
        return float(torch.finfo(x.dtype).eps) if x.is_floating_point() else float(np.finfo(np.float64).eps)
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def _matrix(kernel, name: str = "kernel") -> np.ndarray:
    k = _real(kernel, name)
    if k.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix [M, N], got shape {tuple(k.shape)}")
    if not np.all(np.isfinite(k)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return k


def _labels(labels, n: int, name: str) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"{name} must have one label per kernel {'row' if 'row' in name else 'column'}: shape [{n}], got {tuple(lab.shape)}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class ids, got dtype {lab.dtype}")
    return lab.astype(np.int64)


def _labelled_pairs(kernel, row_labels, col_labels, exclude_diagonal: bool | None):
    """The checked kernel and labels of :func:`class_block_means` and its kin.

    Returns ``(k [M, N] float64, rows [M], cols [N] int64 labels, mask [M, N] bool)``: ``mask``
    marks the pairs that count (all, less the diagonal when it is excluded: by default exactly
    when ``col_labels`` is None, a square kernel over one set)."""
    k = _matrix(kernel)
    m, n = k.shape
    rows = _labels(row_labels, m, "row_labels")
    same = col_labels is None
    if same and m != n:
        raise ValueError(f"kernel is {m}×{n}: pass col_labels for a non-square kernel")
    cols = rows if same else _labels(col_labels, n, "col_labels")
    exclude = same if exclude_diagonal is None else exclude_diagonal
    mask = np.ones_like(k, dtype=bool)
    if exclude:
        np.fill_diagonal(mask, False)
    return k, rows, cols, mask


def _split_pairs(kernel, row_labels, col_labels, exclude_diagonal: bool | None):
    """:func:`_labelled_pairs` plus ``within`` and ``between`` ([M, N] bool: the counted pairs with
    equal and with different labels); raises when either is empty."""
    k, rows, cols, mask = _labelled_pairs(kernel, row_labels, col_labels, exclude_diagonal)
    eq = rows[:, None] == cols[None, :]
    within, between = eq & mask, ~eq & mask
    if not within.any() or not between.any():
        raise ValueError("need both same-label and different-label pairs to compare within and between")
    return k, rows, within, between


def class_block_means(kernel, row_labels, col_labels=None, *, exclude_diagonal: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean kernel value in every (row class, column class) block.

    Args:
        kernel: ``[M, N]`` kernel matrix (e.g. a normalized gradient kernel).
        row_labels: ``[M]`` integer classes of the rows.
        col_labels: ``[N]`` classes of the columns; None for a square kernel over the same inputs.
        exclude_diagonal: leave out k(x, x) (self-similarity, 1 for a normalized kernel); default
            True exactly when ``col_labels`` is None.

    Returns:
        ``(classes [C], means [C, C])``, classes sorted ascending; a block without entries is NaN.
    """
    k, rows, cols, mask = _labelled_pairs(kernel, row_labels, col_labels, exclude_diagonal)
    classes = np.union1d(rows, cols)
    means = np.full((classes.size, classes.size), np.nan)
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            block = mask & (rows[:, None] == a) & (cols[None, :] == b)
            if block.any():
                means[i, j] = k[block].mean()
    return classes, means


@dataclass
class BlockGap:
    """Within-class minus between-class kernel mean.

    Attributes:
        gap: mean over entries with equal labels minus mean over entries with different labels.
        within, between: the two means.
        per_class: ``[C]`` per row class: its within mean minus its between mean (for intervals).
        classes: ``[C]`` the row classes.
    """

    gap: float
    within: float
    between: float
    per_class: np.ndarray
    classes: np.ndarray


def within_between_gap(kernel, row_labels, col_labels=None, *, exclude_diagonal: bool | None = None) -> BlockGap:
    """Mean k over same-label pairs minus mean over different-label pairs (see :class:`BlockGap`).

    Arguments as :func:`class_block_means`; for a square kernel over one set the diagonal (self
    pairs) is excluded by default.
    """
    k, rows, same, different = _split_pairs(kernel, row_labels, col_labels, exclude_diagonal)
    within = float(k[same].mean())
    between = float(k[different].mean())
    classes = np.unique(rows)
    per_class = []
    for c in classes:
        r = rows == c
        w = same[r]
        b = different[r]
        per_class.append(k[r][w].mean() - k[r][b].mean() if w.any() and b.any() else np.nan)
    return BlockGap(within - between, within, between, np.asarray(per_class, dtype=np.float64), classes)


@dataclass
class BlockAUC:
    """Scale-free separation of class blocks.

    Attributes:
        auc: P(k of a same-label pair > k of a different-label pair), ties counting ½, over all
            such pairs (Mann–Whitney U / (n_within · n_between)). 0.5: no block structure.
        per_class: ``[C]`` the same over the pairs of each row class's rows (for per-class views).
        classes: ``[C]`` the row classes.
        distance_ratio: mean between-label over mean within-label distance sqrt(2 − 2k) (for a
            normalized kernel; > 1 when same-label pairs are closer). NaN for a kernel with
            entries outside [−1, 1] (beyond 1e-4): a raw kernel, for which sqrt(2 − 2k) is no distance.
    """

    auc: float
    per_class: np.ndarray
    classes: np.ndarray
    distance_ratio: float


def _auc(within: np.ndarray, between: np.ndarray) -> float:
    """Mann–Whitney AUC of ``within`` against ``between`` (ties ½)."""
    from scipy.stats import rankdata

    if within.size == 0 or between.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([within, between]))
    u = ranks[: within.size].sum() - within.size * (within.size + 1) / 2.0
    return float(u / (within.size * between.size))


def block_auc(kernel, row_labels, col_labels=None, *, exclude_diagonal: bool | None = None) -> BlockAUC:
    """Block AUC of a kernel against labels (see :class:`BlockAUC`); arguments as
    :func:`within_between_gap` (self pairs of a square kernel over one set are left out)."""
    k, rows, same, different = _split_pairs(kernel, row_labels, col_labels, exclude_diagonal)
    classes = np.unique(rows)
    per_class = np.array([_auc(k[rows == c][same[rows == c]], k[rows == c][different[rows == c]])
                          for c in classes], dtype=np.float64)
    if np.abs(k).max() > 1.0 + 1e-4:
        # not normalized (|k̂| <= 1 by Cauchy–Schwarz): entries above 1 would be clipped to distance 0
        ratio = math.nan
    else:
        d = np.sqrt(np.clip(2.0 - 2.0 * k, 0.0, None))
        d_within, d_between = float(d[same].mean()), float(d[different].mean())
        # within-label distance 0 (every same-label pair at k = 1): the ratio is +inf, or NaN when the
        # between-label distance is 0 too; never a huge finite number
        ratio = d_between / d_within if d_within > 0 else (math.inf if d_between > 0 else math.nan)
    return BlockAUC(_auc(k[same], k[different]), per_class, classes, ratio)


def centered_alignment(gram, y) -> float:
    """Centered kernel–target alignment: :func:`kernel_target_alignment` of H K H and H y with
    H = I − 11ᵀ/N (Cortes et al. 2012), so that a constant offset in K or y does not count.

    Args:
        gram: ``[N, N]`` kernel over the training inputs.
        y: ``[N]`` or ``[N, d]`` targets (one-hot for classes).

    Returns:
        float in [−1, 1].

    Raises:
        TypeError: complex K or y.
        ValueError: when K or y is constant (up to rounding): its centered part is zero, so the
            alignment is 0/0 (centering leaves only rounding noise, which would give an arbitrary
            number in [−1, 1]). "Up to rounding": ‖H K H‖_F <= max(1e-12, 16 N eps₆₄, 16 eps) ‖K‖_F
            with eps that of K's dtype (1.9e-6 for float32: a float32 kernel whose centered part is
            smaller is its own rounding; pass a float64 kernel), and likewise for y.
    """
    k = _matrix(gram, "gram")
    if k.shape[0] != k.shape[1] or k.shape[0] < 2:
        raise ValueError(f"gram must be square over at least 2 examples (centering one leaves nothing), got {k.shape}")
    yy = _real(y, "y")
    if yy.ndim not in (1, 2) or yy.shape[0] != k.shape[0]:
        # a reshape would silently regroup e.g. a [C, N] (transposed) or [2N] target into [N, ·] rows
        raise ValueError(f"y must be [N] or [N, d] with N = {k.shape[0]} (one row per gram row), got shape {yy.shape}")
    yy = yy.reshape(k.shape[0], -1)
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    kc = h @ k @ h
    yc = yy - yy.mean(axis=0, keepdims=True)
    # Centering a constant matrix leaves rounding noise of relative size ~ n·eps (measured up to
    # 4e-16 for n <= 2000), not zeros; below this floor the centered part is noise. A float32 (or
    # coarser) input carries its own rounding, ~eps of its dtype relative per entry: the float32 Gram
    # of features equal up to 1e-3 had a centered part of 1.6e-7–3.6e-7 relative, of which
    # 0.8e-7–3.4e-7 was float32 rounding; 16 eps of the input's dtype is the floor there.
    floor = max(1e-12, 16 * n * np.finfo(np.float64).eps)
    floor_k, floor_y = max(floor, 16 * _eps(gram)), max(floor, 16 * _eps(y))
    if np.linalg.norm(kc) <= floor_k * np.linalg.norm(k):
        raise ValueError(
            "gram is constant (every entry equal, up to rounding, e.g. a network whose only live "
            "parameter is an output bias): its centered part is zero and centered alignment is undefined"
            + (f" (‖HKH‖_F / ‖K‖_F <= {floor_k:.1e}, the rounding of its dtype {gram.dtype}: a float64 kernel "
               "may resolve a smaller centered part)" if floor_k > floor else "")
        )
    if np.linalg.norm(yc) <= floor_y * np.linalg.norm(yy):
        raise ValueError(
            "y is constant (every example has the same target): its centered part is zero and centered "
            "alignment is undefined; use targets that vary over the examples"
        )
    return kernel_target_alignment(kc, yc)


def kernel_distance(normalized_kernel, *, same_set: bool | None = None) -> np.ndarray:
    """Distances between unit-norm tangent features, d = sqrt(max(0, 2 − 2 k̂)), ``[M, N]``.

    Args:
        normalized_kernel: ``[M, N]`` normalized kernel (k̂(x, x) = 1).
        same_set: whether rows and columns are the same inputs (then the matrix is made exactly
            symmetric and its diagonal exactly 0, what t-SNE/UMAP/silhouette expect). None: True
            for a square symmetric kernel (within 1e-4) whose diagonal is 1 (within 1e-4; or 0, a
            zero-gradient example), False for a non-square one; another square kernel (e.g. M
            anchors × N = M other inputs) is refused unless ``same_set`` is given, as symmetrizing
            it would mix d(a_i, x_j) with d(a_j, x_i) and zero d(a_i, x_i).

    Raises:
        ValueError: an entry outside [−1, 1] (beyond 1e-4 of rounding): a raw, unnormalized kernel,
            whose entries above 1 would all be clipped to distance 0.
    """
    k = _matrix(normalized_kernel, "normalized_kernel")
    if k.size and np.abs(k).max() > 1.0 + 1e-4:
        # Cauchy–Schwarz: |k̂(x, x')| <= 1 for every normalized kernel, square or not
        raise ValueError(
            f"normalized_kernel has entries outside [-1, 1] (largest |k| = {np.abs(k).max():.4g}): it is not "
            "normalized; pass gradient_kernel(..., normalize=True) or genkernel.normalize_kernel(k, diag1, diag2)"
        )
    square = k.shape[0] == k.shape[1]
    if same_set is None:
        if square:
            diag = np.diag(k)
            unit_diagonal = bool(np.all((np.abs(diag - 1.0) <= 1e-4) | (diag == 0.0)))
            if not unit_diagonal or (k.size and np.abs(k - k.T).max() > 1e-4):  # 0×0: nothing to compare
                raise ValueError(
                    f"kernel is a square {k.shape[0]}×{k.shape[1]} matrix that is not a normalized kernel over one set "
                    "(diagonal 1, symmetric): pass same_set=False for a kernel between two sets of inputs, or "
                    "same_set=True for one set"
                )
        same_set = square
    if same_set and not square:
        raise ValueError(f"same_set=True needs a square kernel, got {k.shape[0]}×{k.shape[1]}")
    d = np.sqrt(np.clip(2.0 - 2.0 * k, 0.0, None))
    if same_set:
        d = 0.5 * (d + d.T)
        np.fill_diagonal(d, 0.0)
    return d
