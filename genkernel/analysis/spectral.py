"""Spectral tools for path kernels: generalization and the null space.

docs/generalization.md, "The null space". Given the N x N Gram matrix of a
(path) kernel over the training inputs, these functions

- eigen-decompose it (:func:`eigendecompose`),
- extend its eigenvectors to eigenfunctions at new inputs (:func:`nystrom_extend`),
- measure how much of a target lies in the top-k eigenspace (:func:`top_k_target_energy`,
  :func:`target_energy_curve`) and how well kernel and target align
  (:func:`kernel_target_alignment`),
- measure, for each test input, the part of its kernel feature outside the span the operator
  can reach (:func:`out_of_span_residual`), and correlate it with the test error
  (:func:`spearman_with_interval`),
- assemble the path kernel from checkpoint kernels (:func:`path_kernel_gram`).

Conventions. Kernels are symmetric PSD. The integral operator on the training sample is

    (T g)(x) = (1/N) Σ_n K(x, x_n) g(x_n),                                             (T)

so if K u = λ u for the Gram matrix K[n, m] = K(x_n, x_m), the operator eigenvalue is λ / N.
All functions accept torch tensors (any float dtype, any device) or array-likes and compute in
float64 on the CPU with scipy; tensors they return are torch float64 on the CPU (except
:func:`path_kernel_gram`, which keeps the kernels' common dtype: the rounding floor of the
other functions is read from the input's dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.stats
import torch
from torch import Tensor


__all__ = [
    "KernelEigensystem",
    "eigendecompose",
    "operator_eigenvalues",
    "nystrom_extend",
    "top_k_target_energy",
    "target_energy_curve",
    "kernel_target_alignment",
    "default_ridge",
    "out_of_span_residual",
    "spearman_with_interval",
    "path_kernel_gram",
]


# --------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------


def _to_numpy(x, name: str) -> np.ndarray:
    """Return `x` as a float64 numpy array (a copy when it came from torch).

    Raises:
        TypeError: when `x` is not a tensor or an array-like of real numbers.
        ValueError: when it holds NaN or infinity.
    """
    if isinstance(x, Tensor):
        if x.is_complex():
            raise TypeError(f"{name} is a complex tensor; pass a real-valued tensor.")
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        # np.asarray(complex, dtype=float64) only warns and drops the imaginary part: refuse instead
        if np.iscomplexobj(x):
            raise TypeError(f"{name} holds complex numbers; pass real values.")
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must be a torch.Tensor or an array-like of real numbers, "
                f"got {type(x).__name__}."
            ) from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries; clean the input first.")
    return arr


def _input_eps(x) -> float:
    """Machine epsilon of the input's floating dtype (float64's for anything else, e.g. lists)."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return float(torch.finfo(x.dtype).eps)
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def _square(gram, name: str = "gram") -> np.ndarray:
    """Return `gram` as a float64 numpy [N, N] array, raising on a non-square shape."""
    k = _to_numpy(gram, name)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty square matrix [N, N], got shape {tuple(k.shape)}; "
            "pass the Gram matrix of the training inputs."
        )
    return k


def _symmetric(k: np.ndarray, x, name: str = "gram") -> np.ndarray:
    """Return (K + Kᵀ)/2, raising when K is asymmetric beyond rounding of the input's dtype.

    Rounding (accumulation order of a float32 Gram, a GPU matmul) leaves a relative asymmetry
    ‖K − Kᵀ‖_F / ‖K‖_F near eps; a kernel that is not symmetric at all (a square [M, N] cross
    kernel with M = N, a kernel weighted by per-example loss derivatives, a momentum path
    kernel) typically leaves one of 1e-3 or more. Symmetrizing such a matrix silently would
    change its eigenvalues and every number derived from them.

    Raises:
        ValueError: when ‖K − Kᵀ‖_F > max(1e-5, 4 sqrt(eps)) ‖K‖_F (eps of the input's dtype; 1e-5 leaves
            room for a float32 kernel cast to float64).
    """
    norm = float(np.linalg.norm(k))
    asym = float(np.linalg.norm(k - k.T))
    tol = max(1e-5, 4.0 * math.sqrt(_input_eps(x)))
    if asym > tol * norm:
        raise ValueError(
            f"{name} is not symmetric: ‖K − Kᵀ‖_F / ‖K‖_F = {asym / norm:.3e} exceeds the rounding "
            f"tolerance {tol:.1e}. Pass the Gram matrix of the training inputs (a cross kernel "
            "[M, N] between test and training inputs is not one, even when M = N); for a kernel "
            "that is asymmetric by construction, pass its symmetric part (K + K.T) / 2 explicitly "
            "if that is the kernel to analyse."
        )
    return 0.5 * (k + k.T)


def _targets(y, n: int, name: str = "y") -> np.ndarray:
    """Return targets as a float64 [N, d] array (a vector [N] becomes [N, 1])."""
    arr = _to_numpy(y, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(
            f"{name} must have shape [N] or [N, d] with N = {n}, got {tuple(arr.shape)}; "
            "pass one target row per training input, in Gram-matrix order."
        )
    if not np.any(arr):
        raise ValueError(f"{name} is identically zero; energy and alignment are undefined.")
    return arr


# --------------------------------------------------------------------------------------------
# eigen-decomposition
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelEigensystem:
    """Eigen-decomposition of a symmetric PSD Gram matrix, K = U diag(λ) Uᵀ.

    Attributes:
        eigenvalues: Tensor[N] float64, descending, non-negative (tiny negative ones clipped).
        eigenvectors: Tensor[N, N] float64; column i is u_i, columns orthonormal, signed so
            that Σ_n u_i[n] > 0 (or Σ_n u_i[n]³ > 0 when |Σ_n u_i[n]| <= 1e-8): a convention
            that does not change with the order of the training inputs (LAPACK's sign does).
            Inside a block of equal eigenvalues only the block's span is defined.
        min_raw_eigenvalue: the most negative eigenvalue found before clipping (0.0 when none
            was negative): a measure of how far the input was from PSD.
        num_clipped: how many negative eigenvalues were set to 0.
        rounding_floor: N * eps of the input's dtype, the relative level (against λ_1) below
            which eigenvalues are rounding of the input rather than properties of the kernel
            (N * 1.2e-7 for a float32 Gram; below 1e-10 for float64 with N < 4.5e5). Such
            eigenvalues have no eigenfunction (:func:`nystrom_extend`).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    min_raw_eigenvalue: float
    num_clipped: int
    rounding_floor: float = 0.0

    @property
    def size(self) -> int:
        """N, the number of training inputs."""
        return int(self.eigenvalues.shape[0])


def eigendecompose(gram, *, psd_tol: float = 1e-8) -> KernelEigensystem:
    """Eigen-decompose a symmetric PSD Gram matrix.

    Args:
        gram: Tensor[N, N], the kernel on the training inputs.
        psd_tol: negative eigenvalues with |λ| <= tol * max|λ| are rounding and are clipped
            to 0; a more negative eigenvalue means the matrix is not PSD and raises. tol is
            max(psd_tol, N * eps) with eps the machine epsilon of the input's dtype: a float32
            Gram of rank-deficient features has negative eigenvalues near N * 1.2e-7 * max|λ|
            from its own rounding (for float64 input tol = psd_tol for any N < 10⁷).

    Returns:
        KernelEigensystem with eigenvalues [N] (descending, >= 0) and eigenvectors [N, N]
        (orthonormal columns), plus the most negative raw eigenvalue and the clip count.

    Raises:
        ValueError: non-square or non-finite input, input asymmetric beyond rounding
            (‖K − Kᵀ‖_F > max(1e-5, 4 sqrt(eps)) ‖K‖_F, e.g. a square cross kernel), or an
            eigenvalue below -tol * max|λ|.

    Algorithm:
        1. Refuse asymmetry beyond rounding; symmetrize, K ← (K + Kᵀ)/2 (removes asymmetric
           rounding from accumulation).
        2. scipy.linalg.eigh gives ascending eigenpairs; reverse them to descending; fix each
           eigenvector's sign (Σ u > 0, else Σ u³ > 0).
        3. Record the most negative eigenvalue; clip negatives within tolerance to 0.
    """
    if not (isinstance(psd_tol, (int, float)) and math.isfinite(psd_tol) and psd_tol >= 0):
        raise ValueError(f"psd_tol must be a finite number >= 0, got {psd_tol!r}.")
    k = _square(gram)
    floor = k.shape[0] * _input_eps(gram)
    tol = max(float(psd_tol), floor)
    # 1. symmetrize
    k = _symmetric(k, gram)
    # 2. eigh, descending
    vals, vecs = scipy.linalg.eigh(k)
    vals = vals[::-1].copy()
    vecs = vecs[:, ::-1].copy()
    # sign convention (LAPACK's sign flipped with the order of the training inputs, for 45 of 100
    # eigenfunctions over 20 orders of one RBF kernel): Σ_n u[n] > 0, or Σ_n u[n]³ > 0 when that sum
    # is below 1e-8; both sums are invariant to permuting the inputs
    total, cubes = vecs.sum(axis=0), (vecs**3).sum(axis=0)
    flip = np.where(np.abs(total) > 1e-8, total < 0, cubes < -1e-8)
    vecs[:, flip] *= -1.0
    # 3. clip within tolerance
    scale = float(np.max(np.abs(vals)))
    min_raw = float(min(vals[-1], 0.0))
    negative = vals < 0
    if min_raw < -tol * scale:
        raise ValueError(
            f"gram is not positive semi-definite: eigenvalue {min_raw:.3e} against largest "
            f"|eigenvalue| {scale:.3e} (relative tolerance {tol:g}). Check that the kernel "
            "is a Gram matrix of features with non-negative step sizes, or raise psd_tol. A kernel "
            "computed in float32 and cast to float64 has float32 rounding: pass it as float32, "
            "whose rounding floor (N * 1.2e-7) this tolerance then uses."
        )
    vals[negative] = 0.0
    return KernelEigensystem(
        eigenvalues=torch.from_numpy(vals),
        eigenvectors=torch.from_numpy(vecs),
        min_raw_eigenvalue=min_raw,
        num_clipped=int(np.count_nonzero(negative)),
        rounding_floor=float(floor),
    )


def operator_eigenvalues(system: KernelEigensystem) -> Tensor:
    """Eigenvalues of the integral operator (T) on the training sample.

    Returns:
        Tensor[N] float64, μ_i = λ_i / N, descending.
    """
    _check_system(system)
    return system.eigenvalues / system.size


def _check_system(system) -> None:
    if not isinstance(system, KernelEigensystem):
        raise TypeError(
            f"expected a KernelEigensystem, got {type(system).__name__}; "
            "build one with eigendecompose(gram)."
        )


def _split_block(system: KernelEigensystem, k: int) -> tuple[int, int] | None:
    """The block of equal eigenvalues that k splits, as (first k, last k) of its valid ends.

    λ_k and λ_{k+1} count as equal when they differ by at most the tie level, max(rounding floor,
    max(N, 64) * eps of float64) * λ_1; a chain of such gaps is one block. Returns None when
    λ_k > λ_{k+1} beyond it (or k is 0 or N), else (start, end): k=start and k=end don't split it.
    """
    n = system.size
    if not 0 < k < n:
        return None
    lam = system.eigenvalues.numpy()
    floor = max(float(system.rounding_floor), max(n, 64) * float(np.finfo(np.float64).eps))
    tie = floor * max(float(lam[0]), 0.0)
    gaps = lam[:-1] - lam[1:]  # gaps[i] = λ_{i+1} − λ_{i+2} (1-based), >= 0
    if gaps[k - 1] > tie:
        return None
    start = k - 1
    while start > 0 and gaps[start - 1] <= tie:
        start -= 1
    end = k
    while end < n - 1 and gaps[end] <= tie:
        end += 1
    return start, end + 1


def _num_usable(eigenvalues: np.ndarray, rtol: float) -> int:
    """Number of eigenvalues with λ_i > rtol * λ_1 (eigenvalues descending)."""
    top = eigenvalues[0]
    if top <= 0:
        return 0
    return int(np.count_nonzero(eigenvalues > rtol * top))


# --------------------------------------------------------------------------------------------
# Nyström extension
# --------------------------------------------------------------------------------------------


def nystrom_extend(
    system: KernelEigensystem,
    cross_kernel,
    *,
    k: int | None = None,
    rtol: float = 1e-10,
    normalization: str = "vector",
) -> Tensor:
    """Extend the Gram eigenvectors to eigenfunctions of the operator (T) at new inputs.

    With K u_i = λ_i u_i and the operator eigenvalue μ_i = λ_i / N, the eigenfunction
    equation φ_i = (1/μ_i) T φ_i evaluated at any x gives the Nyström formula

        φ_i(x) = (1/λ_i) Σ_n K(x, x_n) u_i[n].                                         (Ny)

    Normalisation ("vector", the default): φ_i(x_n) = u_i[n] on the training inputs, i.e.
    the restriction of φ_i to the sample is the unit-norm Gram eigenvector, so the empirical
    L2 norm is (1/N) Σ_n φ_i(x_n)² = 1/N. With normalization="l2" the result is multiplied by
    sqrt(N) so that (1/N) Σ_n φ_i(x_n)² = 1 (orthonormal in L2 of the empirical measure).

    Which eigenvalues are usable: (Ny) divides by λ_i, so an eigenfunction is only defined
    for λ_i > max(rtol, rounding floor) * λ_1 (λ_1 the largest). The rounding floor is N * eps of
    the coarser of the Gram's and the cross kernel's dtypes; it matters for float32 input: a
    rank-deficient float32 Gram has eigenvalues near 1e-8 λ_1 that are rounding noise, and
    dividing the cross kernel's own rounding by them gives O(1) values that belong to no
    eigenfunction; so does a float32 cross kernel against small genuine eigenvalues of a
    float64 Gram. With k=None every usable eigenfunction is returned (less a block of equal
    eigenvalues that the cut runs through); an explicit k larger than the number usable raises.

    Equal eigenvalues (up to the tie level of :func:`top_k_target_energy`): a k that splits a
    block of them raises, as the eigenfunctions inside a block are an arbitrary basis of its
    eigenspace (they change with the order of the training inputs). Columns of a block that k
    keeps whole are such a basis too: their span, not each column, is the defined quantity.

    Args:
        system: from :func:`eigendecompose` on the training Gram matrix.
        cross_kernel: Tensor[M, N], cross_kernel[m, n] = K(x'_m, x_n) between the new inputs
            and the training inputs (same kernel, same training order as the Gram matrix).
        k: number of leading eigenfunctions (1 <= k <= usable count), or None for all usable.
        rtol: relative eigenvalue threshold of the usable rule above.
        normalization: "vector" or "l2", see above.

    Returns:
        Tensor[M, k] float64, column i is φ_i at the M new inputs.

    Raises:
        TypeError / ValueError: wrong types, shapes, k out of range, k splitting a block of
            equal eigenvalues, no usable eigenvalue.

    Algorithm:
        1. Count usable eigenvalues, λ_i > max(rtol, rounding floor) * λ_1; settle k; refuse a
           k that splits a block of equal eigenvalues.
        2. φ = K_cross U_k diag(1/λ_k)                                                 (Ny)
        3. Multiply by sqrt(N) for normalization="l2".
    """
    _check_system(system)
    if normalization not in ("vector", "l2"):
        raise ValueError(f'normalization must be "vector" or "l2", got {normalization!r}.')
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a finite number > 0, got {rtol!r}.")
    n = system.size
    cross = _to_numpy(cross_kernel, "cross_kernel")
    if cross.ndim != 2 or cross.shape[1] != n:
        raise ValueError(
            f"cross_kernel must have shape [M, N] with N = {n} training inputs, got "
            f"{tuple(cross.shape)}; rows are new inputs, columns the training inputs."
        )
    lam = system.eigenvalues.numpy()
    vecs = system.eigenvectors.numpy()
    # 1. usable eigenvalues: above rtol and the rounding floors of the Gram's and the cross
    #    kernel's dtypes (a float32 cross kernel's rounding divided by a small eigenvalue of a
    #    float64 Gram is as much noise as the Gram's own rounding would be)
    cross_floor = n * _input_eps(cross_kernel)
    floor = max(float(system.rounding_floor), cross_floor)
    cut = max(float(rtol), floor)
    usable = _num_usable(lam, cut)
    if usable == 0:
        raise ValueError(
            f"the Gram matrix has no eigenvalue above max(rtol, rounding floor) * largest "
            f"(= {cut:.1e} * largest): the kernel is zero, or its dtype is too coarse for N = {n} "
            "(pass float64 kernels); there are no eigenfunctions."
        )
    explicit = k is not None
    if k is None:
        k = usable
        block = _split_block(system, k)
        if block is not None and block[0] > 0:
            # the cut runs through a block of equal eigenvalues: the block is not usable as a whole
            k = block[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int or None, got {type(k).__name__}.")
    if not 1 <= k <= usable:
        raise ValueError(
            f"k={k} but only {usable} eigenvalues exceed max(rtol, rounding floor) * largest "
            f"(rtol={rtol:g}, rounding floor N * eps of the Gram's and the cross kernel's "
            f"dtypes = {floor:.1e}); eigenfunctions of negligible eigenvalues are not "
            f"defined. Use k <= {usable}, lower rtol if those eigenvalues are genuine, or pass "
            "a float64 Gram matrix and cross kernel when the floor is the float32 one."
        )
    block = _split_block(system, k)
    if block is not None:
        start, end = block
        raise ValueError(
            f"k={k}{'' if explicit else ' (all usable)'} splits a block of equal eigenvalues "
            f"(λ_{start + 1} .. λ_{end} equal up to "
            "rounding, e.g. a pair of a rotation-invariant kernel): an eigenfunction inside the "
            "block is an arbitrary member of its eigenspace and changes with the order of the "
            f"training inputs. Use k={start} or k={end} (the block's ends)."
        )
    # 2. Nyström formula
    phi = (cross @ vecs[:, :k]) / lam[:k]
    # 3. normalisation
    if normalization == "l2":
        phi = phi * math.sqrt(n)
    return torch.from_numpy(np.ascontiguousarray(phi))


# --------------------------------------------------------------------------------------------
# target energy and alignment
# --------------------------------------------------------------------------------------------


def target_energy_curve(system: KernelEigensystem, y) -> Tensor:
    """Share of target energy in the top-k eigenspace, for every k.

    E(k) = Σ_{i<=k} ‖u_iᵀ Y‖² / ‖Y‖_F², with Y = y as [N, 1] for a vector target.

    Args:
        system: from :func:`eigendecompose`.
        y: Tensor[N] or [N, d], targets in Gram-matrix order (not identically zero).

    Returns:
        Tensor[N] float64; entry k-1 is E(k). Non-decreasing, last entry 1 (up to rounding).
        Inside a block of equal eigenvalues (e.g. the null space) the split of energy between
        the block's eigenvectors is arbitrary; E at the block's end is not.

    Algorithm:
        1. Project: P = Uᵀ Y, [N, d].
        2. Per-eigenvector energy e_i = ‖P[i]‖² / ‖Y‖_F²; E = cumulative sum of e.
    """
    _check_system(system)
    yy = _targets(y, system.size)
    proj = system.eigenvectors.numpy().T @ yy
    energy = np.sum(proj**2, axis=1) / np.sum(yy**2)
    return torch.from_numpy(np.cumsum(energy))


def top_k_target_energy(system: KernelEigensystem, y, k: int) -> float:
    """Share of target energy in the top-k eigenspace, Σ_{i<=k} ⟨u_i, y⟩² / ‖y‖².

    For y of shape [N, d], ⟨u_i, y⟩² is ‖u_iᵀ Y‖² and ‖y‖² is ‖Y‖_F².

    The top-k eigenspace is only defined when λ_k > λ_{k+1}: a k inside a block of equal
    eigenvalues (the null space of a rank-deficient kernel, a pair of a rotation-invariant
    kernel) would count an arbitrary part of the block, which changes with the order of the
    training inputs. Such a k raises; eigenvalues count as equal when they differ by at most
    the rounding floor (N * eps of the Gram's dtype, :class:`KernelEigensystem`; at least
    64 * eps of float64) times λ_1.

    Args:
        system: from :func:`eigendecompose`.
        y: Tensor[N] or [N, d].
        k: 0 <= k <= N (k = 0 gives 0.0), not inside a block of equal eigenvalues.

    Returns:
        float in [0, 1].

    Raises:
        TypeError / ValueError: k not an int, out of range, or inside a block of equal
            eigenvalues (the message names the block's ends, the nearest valid k).
    """
    _check_system(system)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}.")
    if not 0 <= k <= system.size:
        raise ValueError(f"k must satisfy 0 <= k <= N = {system.size}, got {k}.")
    curve = target_energy_curve(system, y)  # validates y first
    block = _split_block(system, k)
    if block is not None:
        start, end = block
        raise ValueError(
            f"k={k} splits a block of equal eigenvalues (λ_{start + 1} .. λ_{end} equal up to "
            "rounding, e.g. the null space of a rank-deficient kernel): the "
            "top-k eigenspace is not defined there, and its energy depends on the arbitrary "
            f"basis inside the block. Use k={start} or k={end} (the block's ends)."
        )
    return 0.0 if k == 0 else float(curve[k - 1])


def kernel_target_alignment(gram, y) -> float:
    """Kernel-target alignment A(K, y) = ⟨K, Y Yᵀ⟩_F / (‖K‖_F ‖Y Yᵀ‖_F).

    For a vector target ‖y yᵀ‖_F = ‖y‖², which is ⟨K, yyᵀ⟩ / (‖K‖_F ‖y‖²) of docs/generalization.md.
    For Y of shape [N, d] the normaliser is ‖Y Yᵀ‖_F (= ‖YᵀY‖_F), which makes A the cosine
    between K and Y Yᵀ: A = 1 exactly when K is a positive multiple of Y Yᵀ. (‖Y‖_F² would
    overstate the normaliser for d > 1, e.g. by sqrt(C) for balanced one-hot labels.)
    Uncentered (no centering of K or Y): subtract column means first if that is wanted.
    K is used as given (not symmetrized): for an asymmetric K, e.g. a kernel weighted by
    per-example loss derivatives, ‖K‖_F of its symmetric part would be smaller than ‖K‖_F
    and overstate A.

    Args:
        gram: Tensor[N, N].
        y: Tensor[N] or [N, d], not identically zero.

    Returns:
        float in [-1, 1]; invariant to positive scaling of K and to any scaling of y.

    Algorithm:
        1. ⟨K, Y Yᵀ⟩ = Σ_j y_jᵀ K y_j = tr(Yᵀ K Y).
        2. ‖Y Yᵀ‖_F = ‖Yᵀ Y‖_F (d x d, cheap); divide by ‖K‖_F times it.
    """
    k = _square(gram)
    yy = _targets(y, k.shape[0])
    norm_k = float(np.linalg.norm(k))
    if norm_k == 0.0:
        raise ValueError("gram is identically zero; alignment is undefined.")
    inner = float(np.trace(yy.T @ k @ yy))
    norm_yy = float(np.linalg.norm(yy.T @ yy))
    return inner / (norm_k * norm_yy)


# --------------------------------------------------------------------------------------------
# out-of-span residual
# --------------------------------------------------------------------------------------------


def default_ridge(gram, relative: float = 1e-6) -> float:
    """Default ridge for :func:`out_of_span_residual`: λ = max(relative, N * eps) * tr(K) / N.

    tr(K)/N is the mean self-similarity k(x_n, x_n), so the ridge is scale-free: the residual
    is unchanged when the kernel is multiplied by a constant. eps is the machine epsilon of the
    Gram's dtype, so N * eps is the rounding floor of :class:`KernelEigensystem` (below 1e-6
    for float64 with N < 4.5e9, so there λ = relative * tr(K) / N). A float32 Gram of
    rank-deficient features has negative eigenvalues from its own rounding, about −2e-6 tr(K)/N
    for N = 1500 (measured): with λ = 1e-6 tr(K)/N, K + λI was not positive definite for
    N >= 600 and the residual refused a kernel that :func:`eigendecompose` accepts.

    Returns:
        float > 0.
    """
    if not (isinstance(relative, (int, float)) and math.isfinite(relative) and relative > 0):
        raise ValueError(f"relative must be a finite number > 0, got {relative!r}.")
    k = _square(gram)
    mean_diag = float(np.trace(k)) / k.shape[0]
    if not mean_diag > 0:
        raise ValueError(
            f"gram has non-positive trace ({mean_diag * k.shape[0]:.3e}); a PSD kernel with "
            "any non-zero feature has positive trace. Pass an explicit ridge > 0."
        )
    return max(float(relative), k.shape[0] * _input_eps(gram)) * mean_diag


def out_of_span_residual(gram, cross, self_kernel, *, ridge: float | None = None) -> Tensor:
    """Share of each test input's kernel feature outside the span of the training features.

    r(x) = 1 − k_xᵀ (K + λI)⁻¹ k_x / k(x, x),                                        (R)

    with k_x = [K(x, x_1), ..., K(x, x_N)]. For λ → 0 this is 1 − ‖P φ(x)‖² / ‖φ(x)‖², with
    P the projector onto the span of the training features φ(x_n): 0 for a test input whose
    feature lies in that span, 1 for one orthogonal to it, and within [0, 1] for any PSD
    kernel (Schur complement). The ridge makes the solve well-posed when K is singular and
    biases r upward by O(λ / λ_min_nonzero).

    Args:
        gram: Tensor[N, N], kernel on the training inputs.
        cross: Tensor[M, N], cross[m, n] = K(x'_m, x_n).
        self_kernel: Tensor[M], self_kernel[m] = K(x'_m, x'_m) > 0.
        ridge: λ > 0. None (default) uses :func:`default_ridge`, λ = max(1e-6, N * eps) * tr(K)/N
            (eps of the Gram's dtype: 1e-6 * tr(K)/N for float64).

    Returns:
        Tensor[M] float64, r at each test input.

    Raises:
        ValueError: shapes disagree, gram asymmetric beyond rounding (see
            :func:`eigendecompose`), ridge <= 0, a self-kernel value <= 0, K + λI not
            positive definite (K far from PSD: raise the ridge or check the kernel), or some
            r < −max(1e-4, 16 eps of the inputs' coarsest dtype): cross and self_kernel not
            from the same PSD kernel as gram (rounding leaves |r| < 1e-6 at r ≈ 0 for float32
            kernels; a normalized self kernel with a raw cross kernel gives r of order −1).

    Algorithm:
        1. Refuse asymmetry beyond rounding; symmetrize K; λ = ridge or default_ridge(gram).
        2. Cholesky of K + λI (scipy.linalg.cho_factor).
        3. A = (K + λI)⁻¹ K_crossᵀ by cho_solve; q_m = Σ_n K_cross[m, n] A[n, m].
        4. r = 1 − q / k(x, x)                                                          (R);
           refuse r below −tolerance (values in [−tolerance, 0) are rounding, returned as is).
    """
    k = _square(gram)
    n = k.shape[0]
    kc = _to_numpy(cross, "cross")
    if kc.ndim != 2 or kc.shape[1] != n:
        raise ValueError(
            f"cross must have shape [M, N] with N = {n}, got {tuple(kc.shape)}; rows are test "
            "inputs, columns training inputs."
        )
    m = kc.shape[0]
    kxx = _to_numpy(self_kernel, "self_kernel")
    if kxx.shape != (m,):
        raise ValueError(
            f"self_kernel must have shape [M] with M = {m} (one K(x, x) per row of cross), "
            f"got {tuple(kxx.shape)}."
        )
    bad = np.flatnonzero(kxx <= 0)
    if bad.size:
        raise ValueError(
            f"self_kernel must be > 0 (K(x, x) = ‖φ(x)‖²); test inputs {bad[:10].tolist()} have "
            "K(x, x) <= 0, their residual is undefined. Drop them."
        )
    # 1. ridge (from the input, whose dtype sets the rounding floor)
    k = _symmetric(k, gram)
    if ridge is None:
        lam = default_ridge(gram)
    else:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.floating)):
            raise TypeError(f"ridge must be a float or None, got {type(ridge).__name__}.")
        if not (math.isfinite(ridge) and ridge > 0):
            raise ValueError(
                f"ridge must be a finite number > 0, got {ridge!r}; a good default is "
                "default_ridge(gram) (ridge=None)."
            )
        lam = float(ridge)
    # 2. Cholesky
    try:
        factor = scipy.linalg.cho_factor(k + lam * np.eye(n), lower=True, check_finite=False)
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            f"K + {lam:.3e} I is not positive definite; the kernel is not PSD at this scale "
            f"(gram dtype {getattr(gram, 'dtype', type(gram).__name__)}). Pass a larger ridge, "
            "a float64 Gram matrix if its rounding is the cause, or check the Gram matrix."
        ) from exc
    # 3. quadratic forms k_xᵀ (K + λI)⁻¹ k_x
    sol = scipy.linalg.cho_solve(factor, kc.T, check_finite=False)  # [N, M]
    quad = np.einsum("mn,nm->m", kc, sol)
    # 4. residual; r < 0 beyond rounding breaks the Schur complement bound r >= 0 of a PSD
    #    kernel: cross and self_kernel do not come from the same kernel as gram
    r = 1.0 - quad / kxx
    neg_tol = max(1e-4, 16.0 * max(_input_eps(gram), _input_eps(cross), _input_eps(self_kernel)))
    worst = int(np.argmin(r))
    if r[worst] < -neg_tol:
        raise ValueError(
            f"out-of-span residual r = {r[worst]:.3e} < 0 at test input {worst} (tolerance "
            f"{neg_tol:.0e}): k_xᵀ (K + λI)⁻¹ k_x exceeds K(x, x), impossible for one PSD kernel. "
            "cross and self_kernel must come from the same kernel as gram (e.g. not a normalized "
            "self kernel with a raw cross kernel, or kernels at different checkpoints)."
        )
    return torch.from_numpy(r)


# --------------------------------------------------------------------------------------------
# rank correlation with a bootstrap interval
# --------------------------------------------------------------------------------------------


def spearman_with_interval(
    a, b, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Spearman rank correlation with a percentile bootstrap interval over pairs.

    Args:
        a, b: Tensor[M] each (e.g. out-of-span residual and test error), M >= 3.
        confidence: interval level in (0, 1).
        n_boot: number of bootstrap resamples (>= 100).
        seed: int, seed of the numpy generator that draws the resamples (the global RNGs are
            not touched; None is refused, as it would make the interval irreproducible).

    Returns:
        (rho, (lo, hi)): rho from scipy.stats.spearmanr on all pairs; lo, hi the
        (1−confidence)/2 and (1+confidence)/2 percentiles (linear interpolation, as
        scipy.stats.bootstrap's "percentile" method, with the same resamples) of rho over
        resamples of the M pairs drawn with replacement. A resample whose a or b is constant has
        no rank correlation and is left out (with tied values, e.g. 0/1 errors, some are).

    Raises:
        TypeError: seed not an int.
        ValueError: shapes differ, M < 3, a or b constant, bad confidence or n_boot, or more
            than (1−confidence)/2 of the resamples undefined (then even the interval's tail
            could consist of them).

    Algorithm:
        1. Draw resample rows, integers in [0, M) of shape [n_boot, M], from default_rng(seed).
        2. rho of each resample; NaN where a side is constant.
        3. Refuse when the NaN share exceeds (1−confidence)/2; else the percentiles of the rest.
    """
    x = _to_numpy(a, "a")
    z = _to_numpy(b, "b")
    if x.ndim != 1 or z.ndim != 1 or x.shape != z.shape:
        raise ValueError(f"a and b must be 1-D of equal length, got {x.shape} and {z.shape}.")
    if x.shape[0] < 3:
        raise ValueError(f"need at least 3 pairs for a rank correlation, got {x.shape[0]}.")
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        # seed=None would draw the resamples from fresh OS entropy: an interval nobody can reproduce
        raise TypeError(f"seed must be an int (the resamples must be reproducible), got {seed!r}.")
    if np.all(x == x[0]) or np.all(z == z[0]):
        raise ValueError("a or b is constant; the rank correlation is undefined.")
    m = x.shape[0]
    rho = _spearman(x, z)
    # 1. the resamples scipy.stats.bootstrap draws from the same seed (one [n_boot, M] block)
    rows = np.random.default_rng(seed).integers(0, m, size=(int(n_boot), m))
    # 2. rank correlation per resample
    rhos = np.array([_spearman(x[r], z[r]) for r in rows])
    defined = rhos[np.isfinite(rhos)]
    # 3. undefined resamples are left out, unless they could fill a whole tail of the interval
    tail = (1.0 - confidence) / 2.0
    undefined = 1.0 - defined.size / rhos.size
    if undefined > tail:
        raise ValueError(
            f"{undefined:.1%} of the bootstrap resamples have a constant a or b (no rank correlation), more than "
            f"the interval's tail of {tail:.1%}: a or b is nearly constant. Use more pairs or a lower confidence."
        )
    lo, hi = np.percentile(defined, [100.0 * tail, 100.0 * (1.0 - tail)])
    return rho, (float(lo), float(hi))


def _spearman(x: np.ndarray, z: np.ndarray) -> float:
    """Spearman's rho of paired samples (NaN when one side is constant)."""
    if np.all(x == x[0]) or np.all(z == z[0]):
        return float("nan")
    return float(scipy.stats.spearmanr(x, z).statistic)


# --------------------------------------------------------------------------------------------
# path kernel
# --------------------------------------------------------------------------------------------


def path_kernel_gram(kernels: Sequence, step_sizes: Sequence[float]) -> Tensor:
    """Path kernel over stated checkpoints, K^p = Σ_k η_k K_{θ_k}.

    Args:
        kernels: list of S kernel matrices, each Tensor[N, N] (Gram) or Tensor[M, N] (cross),
            all of the same shape, evaluated at checkpoints θ_1..θ_S.
        step_sizes: list of S floats η_k (the step size, or step size times the number of
            steps a checkpoint stands for).

    Returns:
        Tensor of the kernels' shape, summed in float64 and returned in the kernels' common
        dtype (torch's promotion: float64 unless every kernel is float32 or coarser). The
        spectral tools read the rounding floor from the dtype: float32 checkpoint kernels summed
        and returned as float64 were refused by :func:`eigendecompose` as "not PSD" (their
        float32 rounding, -2e-8 λ_1 for 200 inputs of rank 6, read against float64's floor),
        as :meth:`genkernel.supervised.checkpoint_kernels.CheckpointKernels.path_kernel` also avoids.

    Raises:
        TypeError / ValueError: empty lists, unequal lengths, shapes, non-finite step sizes.

    Algorithm:
        1. Validate; convert each kernel to float64, noting its dtype.
        2. Accumulate Σ_k η_k K_k; cast to the common dtype.
    """
    if isinstance(kernels, Tensor) or not isinstance(kernels, Sequence):
        raise TypeError(
            "kernels must be a list of Tensor[N, N] or Tensor[M, N] (one per checkpoint); "
            "for a stacked tensor pass list(stacked)."
        )
    if isinstance(step_sizes, Tensor):
        step_sizes = step_sizes.detach().cpu().reshape(-1).tolist()
    elif isinstance(step_sizes, np.ndarray):  # e.g. np.linspace: a numpy array is no Sequence
        step_sizes = step_sizes.reshape(-1).tolist()
    if not isinstance(step_sizes, Sequence):
        raise TypeError("step_sizes must be a list of floats, one per kernel.")
    if len(kernels) == 0:
        raise ValueError("kernels is empty; pass at least one checkpoint kernel.")
    if len(kernels) != len(step_sizes):
        raise ValueError(
            f"got {len(kernels)} kernels but {len(step_sizes)} step sizes; pass one step size "
            "per checkpoint kernel."
        )
    # 1. validate
    mats = [_to_numpy(km, f"kernels[{i}]") for i, km in enumerate(kernels)]
    shape = mats[0].shape
    if len(shape) != 2:
        raise ValueError(f"kernels[0] must be 2-D ([N, N] or [M, N]), got shape {shape}.")
    for i, km in enumerate(mats):
        if km.shape != shape:
            raise ValueError(
                f"kernels[{i}] has shape {km.shape} but kernels[0] has {shape}; all "
                "checkpoint kernels must be over the same inputs."
            )
    etas = []
    for i, eta in enumerate(step_sizes):
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
            raise TypeError(f"step_sizes[{i}] must be a float, got {type(eta).__name__}.")
        if not math.isfinite(eta):
            raise ValueError(f"step_sizes[{i}] = {eta!r} is not finite.")
        etas.append(float(eta))
    # 2. accumulate
    out = np.zeros(shape, dtype=np.float64)
    for eta, km in zip(etas, mats):
        out += eta * km
    dtype = torch.float64
    for i, km in enumerate(kernels):
        d = _float_dtype(km)
        dtype = d if i == 0 else torch.promote_types(dtype, d)
    return torch.from_numpy(out).to(dtype)


def _float_dtype(x) -> torch.dtype:
    """The torch floating dtype of `x` (float64 for non-float tensors, lists, integer arrays)."""
    if isinstance(x, Tensor):
        return x.dtype if x.is_floating_point() else torch.float64
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating):
        return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}.get(dtype, torch.float64)
    return torch.float64
