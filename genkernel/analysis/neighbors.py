"""Nearest neighbours by kernel similarity or Euclidean distance, and neighbourhood purity.

Used to compare the geometry a gradient kernel induces with input-space geometry: the
k most similar training inputs of each anchor under the kernel, the k nearest under the
Euclidean metric, and how label-pure each neighbourhood is.

Ties are broken by index (the lower training index first), so results are deterministic and
identical on every device. Returned tensors live on the CPU.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["kernel_neighbors", "euclidean_neighbors", "label_purity"]


def _check_k(k, n: int) -> int:
    # numbers.Integral: a Python int or a NumPy integer (e.g. k computed with NumPy)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}.")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= N = {n}, got {k}; pick k in that range.")
    return int(k)


def _real_matrix(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}; flatten each example first "
                         "(x.reshape(len(x), -1)).")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued and numeric, got dtype {x.dtype}.")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite entries; clean the input first.")
    return x


def _smallest_k_stable(keys: Tensor, k: int) -> Tensor:
    """Indices of the k smallest entries per row; equal keys keep ascending index order."""
    order = torch.sort(keys, dim=1, stable=True).indices
    return order[:, :k].contiguous()


def kernel_neighbors(kernel_rows: Tensor, k: int, *, exclude: Tensor | None = None) -> Tensor:
    """The k most similar training inputs of each anchor under a kernel.

    Args:
        kernel_rows: Tensor[A, N], kernel_rows[a, n] = k(anchor_a, x_n) (raw or normalized).
        k: neighbours per anchor (a Python or NumPy int), 1 <= k <= N (N − 1 when `exclude` is given).
        exclude: optional LongTensor[A]; exclude[a] is a training index left out of anchor a's
            neighbours (the anchor itself when anchors are training inputs), −1 for none.

    Returns:
        LongTensor[A, k]; row a lists training indices by decreasing similarity, equal
        similarities in increasing index order (stable).

    Raises:
        TypeError / ValueError: non-tensor, wrong shape, NaN, k out of range, bad `exclude`.

    Algorithm:
        1. Keys = −similarity (negation is exact), excluded entries set to +inf.
        2. Stable ascending sort per row; keep the first k.
    """
    rows = _real_matrix(kernel_rows, "kernel_rows")
    a, n = rows.shape
    keys = -rows
    if exclude is not None:
        ex = _index_vector(exclude, a, n, "exclude", allow_minus_one=True)
        hit = ex >= 0
        keys[hit.nonzero().squeeze(1), ex[hit]] = float("inf")
        k = _check_k(k, n - 1 if bool(hit.any()) else n)
    else:
        k = _check_k(k, n)
    return _smallest_k_stable(keys, k)


def euclidean_neighbors(anchors: Tensor, points: Tensor, k: int) -> Tensor:
    """The k nearest points of each anchor in Euclidean distance.

    Args:
        anchors: Tensor[A, D].
        points: Tensor[N, D].
        k: 1 <= k <= N.

    Returns:
        LongTensor[A, k]; row a lists point indices by increasing distance, equal distances
        in increasing index order (stable).

    Algorithm:
        1. Exact float64 pairwise distances (torch.cdist without the matmul shortcut, so
           equal distances compare equal).
        2. Stable ascending sort per row; keep the first k.
    """
    anc = _real_matrix(anchors, "anchors")
    pts = _real_matrix(points, "points")
    if anc.shape[1] != pts.shape[1]:
        raise ValueError(
            f"anchors have D = {anc.shape[1]} features but points have D = {pts.shape[1]}; "
            "flatten both the same way."
        )
    if anc.shape[1] == 0:  # every distance would be 0: the "nearest" points would be the first k indices
        raise ValueError("anchors and points have D = 0 features: there is no distance to rank by; pass [A, D] and "
                         "[N, D] with D >= 1.")
    k = _check_k(k, pts.shape[0])
    dist = torch.cdist(anc, pts, compute_mode="donot_use_mm_for_euclid_dist")
    return _smallest_k_stable(dist, k)


def label_purity(neighbor_idx: Tensor, labels: Tensor) -> Tensor:
    """Share of the majority label in each neighbourhood.

    Args:
        neighbor_idx: LongTensor[A, k], indices into `labels` (from the functions above).
        labels: Tensor[N] of discrete labels (integers, or any exactly comparable values).

    Returns:
        Tensor[A] float64, purity[a] = max_c #{j : labels[neighbor_idx[a, j]] = c} / k, in
        [1/k, 1].

    An index listed twice in a row counts twice (the formula is over positions j); the neighbour
    functions above never list one twice.

    Raises:
        TypeError / ValueError: non-tensors, wrong shapes, non-integer or out-of-range indices, NaN labels.

    Algorithm:
        1. Gather the neighbours' labels, L[a, j] = labels[neighbor_idx[a, j]].
        2. Count, per neighbour j, how many neighbours share its label; take the row maximum
           and divide by k.
    """
    if not isinstance(neighbor_idx, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("neighbor_idx and labels must be torch.Tensors.")
    if neighbor_idx.dim() != 2 or neighbor_idx.shape[1] == 0:
        raise ValueError(
            f"neighbor_idx must be [A, k] with k >= 1, got {tuple(neighbor_idx.shape)}."
        )
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}.")
    if neighbor_idx.dtype.is_floating_point or neighbor_idx.is_complex() or \
            neighbor_idx.dtype == torch.bool:
        raise TypeError(f"neighbor_idx must be an integer tensor, got {neighbor_idx.dtype}.")
    if (labels.is_floating_point() or labels.is_complex()) and not bool(torch.isfinite(labels).all()):
        # NaN equals nothing, itself included: a neighbourhood of NaN labels would count no majority at all
        raise ValueError("labels contain NaN or infinite entries; give every example a finite label.")
    idx = neighbor_idx.detach().cpu().long()
    n = labels.shape[0]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(
            f"neighbor_idx has entries outside [0, {n}); it must index into labels."
        )
    # 1. gather
    lab = labels.detach().cpu()[idx]  # [A, k]
    # 2. majority share
    same = (lab[:, :, None] == lab[:, None, :]).sum(dim=2)  # [A, k]
    return same.max(dim=1).values.to(torch.float64) / idx.shape[1]


def _index_vector(x, a: int, n: int, name: str, *, allow_minus_one: bool) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a LongTensor[A], got {type(x).__name__}.")
    if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}.")
    if x.shape != (a,):
        raise ValueError(f"{name} must have shape [A] = [{a}], got {tuple(x.shape)}.")
    x = x.detach().cpu().long()
    low = -1 if allow_minus_one else 0
    if x.numel() and (int(x.min()) < low or int(x.max()) >= n):
        raise ValueError(f"{name} entries must lie in [{low}, {n}), got {x.tolist()[:10]}...")
    return x
