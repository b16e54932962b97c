"""Tests for genkernel.analysis.spectral and genkernel.analysis.neighbors."""

import numpy as np
import pytest
import scipy.stats
import torch

from genkernel.analysis.neighbors import euclidean_neighbors, kernel_neighbors, label_purity
from genkernel.analysis.spectral import (
    KernelEigensystem,
    default_ridge,
    eigendecompose,
    kernel_target_alignment,
    nystrom_extend,
    operator_eigenvalues,
    out_of_span_residual,
    path_kernel_gram,
    spearman_with_interval,
    target_energy_curve,
    top_k_target_energy,
)


def _features(n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ eigendecompose


def test_eigendecompose_reconstructs_and_is_orthonormal():
    f = _features(30, 5)
    k = f @ f.T
    sys_ = eigendecompose(k)
    lam, u = sys_.eigenvalues, sys_.eigenvectors
    assert lam.dtype == torch.float64 and u.shape == (30, 30)
    assert torch.all(lam[:-1] >= lam[1:])
    assert torch.all(lam >= 0)
    assert torch.allclose(u.T @ u, torch.eye(30, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(u @ torch.diag(lam) @ u.T, k, atol=1e-10)
    # rank 5: 25 eigenvalues are rounding noise, some negative ones were clipped
    assert sys_.min_raw_eigenvalue <= 0.0
    assert sys_.min_raw_eigenvalue > -1e-10
    assert torch.allclose(operator_eigenvalues(sys_), lam / 30)


def test_eigendecompose_symmetrizes_and_accepts_float32():
    f = _features(10, 10, seed=1)
    k = f @ f.T + 0.1 * torch.eye(10, dtype=torch.float64)
    noisy = k + 1e-9 * torch.triu(torch.ones(10, 10, dtype=torch.float64), 1)
    sys_ = eigendecompose(noisy.float())
    assert sys_.eigenvalues.dtype == torch.float64
    assert sys_.num_clipped == 0 and sys_.min_raw_eigenvalue == 0.0
    ref = np.linalg.eigvalsh(0.5 * (noisy + noisy.T).float().double().numpy())[::-1]
    assert np.allclose(sys_.eigenvalues.numpy(), ref, rtol=1e-10)


def test_eigendecompose_bad_input():
    with pytest.raises(ValueError, match="square"):
        eigendecompose(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        eigendecompose(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        eigendecompose(torch.diag(torch.tensor([1.0, -0.5])))
    with pytest.raises(TypeError):
        eigendecompose("not a matrix")
    with pytest.raises(ValueError, match="psd_tol"):
        eigendecompose(torch.eye(2), psd_tol=-1.0)


# ------------------------------------------------------------------ Nyström


def test_nystrom_matches_exact_eigenfunctions_on_union():
    # Rank-r kernel K(x, x') = f(x)·f(x'). The operator T on the training sample has
    # eigenfunctions φ_i(x) = f(x)ᵀ w_i / sqrt(λ_i), with C w_i = (λ_i / N) w_i for the
    # feature second moment C = FᵀF / N (||w_i|| = 1): exact, computed in feature space.
    n, m, r = 40, 15, 4
    f_all = _features(n + m, r, seed=3)
    f_tr, f_te = f_all[:n], f_all[n:]
    sys_ = eigendecompose(f_tr @ f_tr.T)
    phi_te = nystrom_extend(sys_, f_te @ f_tr.T)
    assert phi_te.shape == (m, r)  # k=None keeps exactly the r non-negligible eigenvalues

    mu, w = np.linalg.eigh((f_tr.T @ f_tr).numpy() / n)
    mu, w = mu[::-1], w[:, ::-1]
    lam = n * mu
    exact_union = f_all.numpy() @ w / np.sqrt(lam)  # [N + M, r]
    nys_union = np.concatenate([sys_.eigenvectors[:, :r].numpy(), phi_te.numpy()], axis=0)
    for i in range(r):
        sign = np.sign(exact_union[:, i] @ nys_union[:, i])
        assert np.allclose(sign * nys_union[:, i], exact_union[:, i], atol=1e-8, rtol=0)
    assert np.allclose(sys_.eigenvalues[:r].numpy(), lam, rtol=1e-10)

    # on the training inputs the extension reproduces the eigenvectors
    phi_tr = nystrom_extend(sys_, f_tr @ f_tr.T, k=r)
    assert torch.allclose(phi_tr, sys_.eigenvectors[:, :r], atol=1e-10)
    # "l2": orthonormal in the empirical measure
    phi_l2 = nystrom_extend(sys_, f_tr @ f_tr.T, k=r, normalization="l2")
    assert torch.allclose(phi_l2.T @ phi_l2 / n, torch.eye(r, dtype=torch.float64), atol=1e-10)


def test_nystrom_bad_input():
    f = _features(10, 3)
    sys_ = eigendecompose(f @ f.T)
    with pytest.raises(ValueError, match="only 3 eigenvalues"):
        nystrom_extend(sys_, torch.zeros(2, 10), k=5)
    with pytest.raises(ValueError, match="shape"):
        nystrom_extend(sys_, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="normalization"):
        nystrom_extend(sys_, torch.zeros(2, 10), normalization="unit")
    with pytest.raises(TypeError, match="KernelEigensystem"):
        nystrom_extend(f @ f.T, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="no eigenvalue"):
        nystrom_extend(eigendecompose(torch.zeros(4, 4)), torch.zeros(1, 4))


# ------------------------------------------------------------------ energy and alignment


def test_target_energy_curve_monotone_to_one():
    f = _features(25, 6, seed=4)
    sys_ = eigendecompose(f @ f.T)
    y = torch.sin(torch.arange(25, dtype=torch.float64))
    curve = target_energy_curve(sys_, y)
    assert curve.shape == (25,)
    assert torch.all(curve[1:] >= curve[:-1] - 1e-15)
    assert abs(float(curve[-1]) - 1.0) < 1e-12
    assert top_k_target_energy(sys_, y, 0) == 0.0
    assert top_k_target_energy(sys_, y, 3) == pytest.approx(float(curve[2]))
    # a target in the span of the top eigenvector has all its energy there
    u1 = sys_.eigenvectors[:, 0]
    assert top_k_target_energy(sys_, 3.0 * u1, 1) == pytest.approx(1.0, abs=1e-12)
    # matrix targets: energy of [y, 2y] equals energy of y
    ymat = torch.stack([y, 2 * y], dim=1)
    assert torch.allclose(target_energy_curve(sys_, ymat), curve, atol=1e-12)
    with pytest.raises(ValueError, match="0 <= k"):
        top_k_target_energy(sys_, y, 26)
    with pytest.raises(ValueError, match="zero"):
        target_energy_curve(sys_, torch.zeros(25))
    with pytest.raises(ValueError, match="shape"):
        target_energy_curve(sys_, torch.ones(24))


def test_kernel_target_alignment():
    y = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    k = torch.outer(y, y)
    assert kernel_target_alignment(k, y) == pytest.approx(1.0, abs=1e-12)
    assert kernel_target_alignment(7.5 * k, y) == pytest.approx(1.0, abs=1e-12)
    assert kernel_target_alignment(k, -3 * y) == pytest.approx(1.0, abs=1e-12)
    f = _features(4, 2, seed=5)
    k2 = f @ f.T
    a = kernel_target_alignment(k2, y)
    assert kernel_target_alignment(100.0 * k2, y) == pytest.approx(a, rel=1e-12)
    ref = float((k2 * torch.outer(y, y)).sum() / (k2.norm() * (y @ y)))
    assert a == pytest.approx(ref, rel=1e-12)
    # matrix targets: K = Y Yᵀ is perfectly aligned
    ymat = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2])).double()
    assert kernel_target_alignment(ymat @ ymat.T, ymat) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="zero"):
        kernel_target_alignment(torch.zeros(4, 4), y)
    with pytest.raises(ValueError, match="shape"):
        kernel_target_alignment(k, torch.ones(3))


# ------------------------------------------------------------------ out-of-span residual


def test_out_of_span_residual():
    n, r = 20, 5
    f = torch.zeros(n, r + 1, dtype=torch.float64)
    f[:, :r] = _features(n, r, seed=6)  # training features span the first r coordinates
    gram = f @ f.T
    test = torch.zeros(3, r + 1, dtype=torch.float64)
    test[0, :r] = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0])  # in the span
    test[1, r] = 2.0  # orthogonal to the span
    test[2, 0], test[2, r] = 1.0, 1.0  # half in, half out
    cross = test @ f.T
    self_k = (test**2).sum(dim=1)
    res = out_of_span_residual(gram, cross, self_k, ridge=1e-10)
    assert res.dtype == torch.float64 and res.shape == (3,)
    assert abs(float(res[0])) < 1e-6
    assert float(res[1]) == pytest.approx(1.0, abs=1e-12)
    assert float(res[2]) == pytest.approx(0.5, abs=1e-6)
    # default ridge is relative to tr(K)/N: scale-free
    r1 = out_of_span_residual(gram, cross, self_k)
    r2 = out_of_span_residual(1e3 * gram, 1e3 * cross, 1e3 * self_k)
    assert torch.allclose(r1, r2, atol=1e-10)
    assert default_ridge(gram) == pytest.approx(1e-6 * float(gram.trace()) / n)


def test_out_of_span_residual_bad_input():
    gram = torch.eye(3, dtype=torch.float64)
    cross = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="ridge"):
        out_of_span_residual(gram, cross, torch.ones(2), ridge=0.0)
    with pytest.raises(ValueError, match="shape"):
        out_of_span_residual(gram, torch.ones(2, 4), torch.ones(2), ridge=1e-3)
    with pytest.raises(ValueError, match="self_kernel"):
        out_of_span_residual(gram, cross, torch.ones(3), ridge=1e-3)
    with pytest.raises(ValueError, match="> 0"):
        out_of_span_residual(gram, cross, torch.tensor([1.0, 0.0]), ridge=1e-3)
    with pytest.raises(ValueError, match="positive definite"):
        out_of_span_residual(-gram, cross, torch.ones(2), ridge=1e-3)


# ------------------------------------------------------------------ Spearman


def test_spearman_with_interval():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(60, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(60, generator=g, dtype=torch.float64)
    rho, (lo, hi) = spearman_with_interval(a, b)
    assert rho == pytest.approx(scipy.stats.spearmanr(a.numpy(), b.numpy()).statistic)
    assert lo <= rho <= hi
    assert 0.0 < lo < hi < 1.0
    assert spearman_with_interval(a, b) == (rho, (lo, hi))  # seeded: reproducible
    rho90, (lo90, hi90) = spearman_with_interval(a, b, confidence=0.5)
    assert lo <= lo90 <= hi90 <= hi
    with pytest.raises(ValueError, match="equal length"):
        spearman_with_interval(a, b[:-1])
    with pytest.raises(ValueError, match="constant"):
        spearman_with_interval(a, torch.ones(60))
    with pytest.raises(ValueError, match="confidence"):
        spearman_with_interval(a, b, confidence=1.5)
    with pytest.raises(ValueError, match="at least 3"):
        spearman_with_interval(a[:2], b[:2])


# ------------------------------------------------------------------ path kernel


def test_path_kernel_gram():
    k1 = torch.eye(3)
    k2 = torch.ones(3, 3, dtype=torch.float64)
    out = path_kernel_gram([k1, k2], [0.1, 0.2])
    assert out.dtype == torch.float64
    assert torch.allclose(out, 0.1 * torch.eye(3, dtype=torch.float64) + 0.2 * k2)
    cross = path_kernel_gram([torch.ones(2, 5)] * 3, [1.0, 2.0, 3.0])
    assert cross.dtype == torch.float32  # float32 kernels keep float32 (their rounding floor)
    assert torch.allclose(cross, 6.0 * torch.ones(2, 5))
    with pytest.raises(ValueError, match="step sizes"):
        path_kernel_gram([k1, k2], [0.1])
    with pytest.raises(ValueError, match="shape"):
        path_kernel_gram([k1, torch.ones(3, 4)], [0.1, 0.1])
    with pytest.raises(ValueError, match="empty"):
        path_kernel_gram([], [])
    with pytest.raises(TypeError):
        path_kernel_gram(torch.stack([k1, k1]), [0.1, 0.1])
    with pytest.raises(ValueError, match="not finite"):
        path_kernel_gram([k1], [float("nan")])


# ------------------------------------------------------------------ neighbours


def _brute_force_top_k(rows: np.ndarray, k: int) -> np.ndarray:
    # decreasing value, ties by increasing index
    return np.array([sorted(range(len(r)), key=lambda j: (-r[j], j))[:k] for r in rows])


def test_kernel_neighbors_match_brute_force_with_ties():
    g = torch.Generator().manual_seed(8)
    rows = torch.randint(0, 5, (12, 30), generator=g).double()  # many ties
    idx = kernel_neighbors(rows, 7)
    assert idx.dtype == torch.long and idx.shape == (12, 7)
    assert np.array_equal(idx.numpy(), _brute_force_top_k(rows.numpy(), 7))
    rows_c = torch.randn(12, 30, generator=g)
    ref = np.argsort(-rows_c.double().numpy(), axis=1, kind="stable")[:, :5]
    assert np.array_equal(kernel_neighbors(rows_c, 5).numpy(), ref)


def test_kernel_neighbors_exclude_self():
    f = _features(8, 3, seed=9)
    gram = f @ f.T
    idx = kernel_neighbors(gram, 3, exclude=torch.arange(8))
    assert not (idx == torch.arange(8)[:, None]).any()
    masked = gram.clone()
    masked.fill_diagonal_(-float("inf"))
    assert np.array_equal(idx.numpy(), _brute_force_top_k(masked.numpy(), 3))
    with pytest.raises(ValueError, match="k must satisfy"):
        kernel_neighbors(gram, 8, exclude=torch.arange(8))
    with pytest.raises(ValueError, match="shape"):
        kernel_neighbors(gram, 2, exclude=torch.arange(7))


def test_euclidean_neighbors_match_brute_force():
    g = torch.Generator().manual_seed(10)
    pts = torch.randint(0, 3, (40, 2), generator=g).double()  # lattice: ties
    anchors = torch.randint(0, 3, (6, 2), generator=g).double()
    idx = euclidean_neighbors(anchors, pts, 9)
    d = ((anchors[:, None, :] - pts[None, :, :]) ** 2).sum(-1).numpy()
    assert np.array_equal(idx.numpy(), _brute_force_top_k(-d, 9))
    with pytest.raises(ValueError, match="features"):
        euclidean_neighbors(anchors, torch.zeros(40, 3), 2)
    with pytest.raises(ValueError, match="k must satisfy"):
        euclidean_neighbors(anchors, pts, 41)


def test_label_purity():
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    idx = torch.tensor([[0, 1, 5], [0, 2, 4], [2, 3, 0], [1, 1, 1]])
    pur = label_purity(idx, labels)
    assert pur.dtype == torch.float64
    assert torch.allclose(pur, torch.tensor([1.0, 1 / 3, 2 / 3, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="outside"):
        label_purity(torch.tensor([[0, 6]]), labels)
    with pytest.raises(TypeError, match="integer"):
        label_purity(torch.tensor([[0.0, 1.0]]), labels)
    with pytest.raises(ValueError, match="labels"):
        label_purity(idx, labels[None])
    with pytest.raises(TypeError):
        kernel_neighbors(np.ones((2, 2)), 1)
    with pytest.raises(ValueError, match="NaN"):
        kernel_neighbors(torch.tensor([[1.0, float("nan")]]), 1)


def test_eigensystem_is_dataclass():
    sys_ = eigendecompose(torch.eye(2))
    assert isinstance(sys_, KernelEigensystem) and sys_.size == 2


def test_spearman_interval_leaves_out_undefined_resamples():
    # Tied values (here three levels each) make a few resamples constant on one side; such a resample
    # has no rank correlation. The interval used to be refused as soon as one of them occurred.
    a = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    b = np.array([1.0, 2.0, 1.0, 2.0, 3.0, 3.0])
    rho, (lo, hi) = spearman_with_interval(a, b, n_boot=400, seed=3)
    rows = np.random.default_rng(3).integers(0, 6, size=(400, 6))
    ref = []
    for r in rows:  # brute force: every resample, constant sides left out
        if np.ptp(a[r]) > 0 and np.ptp(b[r]) > 0:
            ref.append(scipy.stats.spearmanr(a[r], b[r]).statistic)
    assert 0 < 400 - len(ref) <= 10  # some, but fewer than the 2.5% tail, are undefined
    assert rho == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-15)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])), abs=1e-12)
    # Without ties the resamples and percentiles are scipy.stats.bootstrap's (method="percentile").
    g = np.random.default_rng(1)
    x = g.normal(size=12)
    z = x + g.normal(size=12)
    boot = scipy.stats.bootstrap((np.arange(12),), lambda i: scipy.stats.spearmanr(x[i], z[i]).statistic,
                                 vectorized=False, n_resamples=300, method="percentile",
                                 random_state=np.random.default_rng(5))
    _, (lo, hi) = spearman_with_interval(x, z, n_boot=300, seed=5)
    assert (lo, hi) == pytest.approx((boot.confidence_interval.low, boot.confidence_interval.high), abs=1e-12)
    # One error among ten: a third of the resamples hold no error; that is refused with the reason.
    with pytest.raises(ValueError, match="resamples have a constant a or b"):
        spearman_with_interval(np.arange(10.0), np.eye(10)[3])


def test_complex_inputs_are_refused_not_truncated():
    # np.asarray(complex, dtype=float64) only warns and silently drops the imaginary part.
    with pytest.raises(TypeError, match="complex"):
        kernel_target_alignment(np.array([[1 + 1j, 0], [0, 1]]), [1.0, 2.0])
    with pytest.raises(TypeError, match="complex"):
        eigendecompose([[2.0, 0.5j], [-0.5j, 1.0]])
    with pytest.raises(TypeError, match="complex"):
        top_k_target_energy(eigendecompose(np.eye(2)), [1.0, 1j], 1)


def test_path_kernel_accepts_numpy_step_sizes():
    k1, k2 = np.eye(3), np.ones((3, 3))
    out = path_kernel_gram([k1, k2], np.linspace(0.5, 0.25, 2))
    assert np.allclose(out.numpy(), 0.5 * k1 + 0.25 * k2, rtol=0, atol=1e-15)


def test_float32_gram_of_rank_deficient_features_is_not_called_indefinite():
    # N = 50 > P = 10 features in float32: the stored Gram has eigenvalues near -2e-6 (relative 2e-7, its own
    # float32 rounding), which the float64 tolerance 1e-8 used to refuse as "not positive semi-definite".
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 10, generator=g)
    gram = feats @ feats.T
    system = eigendecompose(gram)
    ref = np.linalg.eigvalsh(gram.double().numpy())[::-1]
    assert system.min_raw_eigenvalue < 0 and system.num_clipped > 0
    assert np.allclose(system.eigenvalues.numpy()[:10], ref[:10], rtol=1e-12, atol=0)
    assert np.all(system.eigenvalues.numpy()[10:] <= 1e-5 * ref[0])
    # the same matrix in float64 is held to psd_tol, and a clearly indefinite float32 matrix is still refused
    with pytest.raises(ValueError, match="not positive semi-definite"):
        eigendecompose(gram.double())
    with pytest.raises(ValueError, match="not positive semi-definite"):
        eigendecompose(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


# ------------------------------------------------------------------ review: asymmetric kernels, float32 noise, ties


def test_square_cross_and_asymmetric_kernels_are_refused_not_symmetrized():
    # A cross kernel between 20 test and 20 training inputs (M = N) and a kernel weighted by per-example loss
    # derivatives K(x_i, x_n) = φ_i·φ_n ℓ'_n are square but not symmetric; their symmetric parts are positive
    # definite, so they used to be symmetrized silently: eigenvalues of (K + Kᵀ)/2, not of K.
    rng = np.random.default_rng(0)
    f = rng.standard_normal((20, 30))
    cross = (f + 0.05 * rng.standard_normal(f.shape)) @ f.T
    weighted = f @ f.T * rng.uniform(0.9, 1.1, 20)[None, :]
    for k in (cross, weighted):
        with pytest.raises(ValueError, match="not symmetric"):
            eigendecompose(k)
        with pytest.raises(ValueError, match="not symmetric"):
            out_of_span_residual(k, f[:2] @ f.T, np.ones(2))
    # rounding-level asymmetry is still removed, in float64 and float32
    gram = f @ f.T
    noisy = gram + 1e-12 * np.abs(gram).max() * rng.standard_normal(gram.shape)
    ref = np.linalg.eigvalsh(0.5 * (noisy + noisy.T))[::-1]
    assert np.allclose(eigendecompose(noisy).eigenvalues.numpy(), ref, rtol=1e-12, atol=0)
    g32 = torch.tensor(gram, dtype=torch.float32)
    g32 = g32 + 1e-6 * g32.abs().max() * torch.randn(20, 20, generator=torch.Generator().manual_seed(0))
    eigendecompose(g32)


def test_alignment_of_an_asymmetric_kernel_is_the_documented_formula():
    # ⟨K, yyᵀ⟩ / (‖K‖_F ‖y‖²) with K as given: symmetrizing first shrank ‖K‖_F and overstated A
    # (0.1256 against 0.1169 here).
    rng = np.random.default_rng(0)
    f = rng.standard_normal((20, 5))
    k = f @ f.T * rng.uniform(0.2, 3.0, 20)[None, :]
    y = rng.standard_normal(20)
    ref = float(y @ k @ y / (np.linalg.norm(k) * (y @ y)))
    assert kernel_target_alignment(k, y) == pytest.approx(ref, rel=1e-12)
    ymat = rng.standard_normal((20, 3))
    ref_mat = float(np.sum(k * (ymat @ ymat.T)) / (np.linalg.norm(k) * np.linalg.norm(ymat @ ymat.T)))
    assert kernel_target_alignment(k, ymat) == pytest.approx(ref_mat, rel=1e-12)


def test_nystrom_of_a_float32_rank_deficient_gram_keeps_only_genuine_eigenfunctions():
    # Rank 4 in float32: the other 36 eigenvalues are float32 rounding (~1e-8 λ_1, above rtol = 1e-10), and
    # dividing the cross kernel's own rounding by them gave 19 extra O(0.2) columns that are no eigenfunction.
    rng = np.random.default_rng(0)
    f, f_te = rng.standard_normal((40, 4)), rng.standard_normal((6, 4))
    exact = nystrom_extend(eigendecompose(f @ f.T), f_te @ f.T)
    assert exact.shape == (6, 4)
    system = eigendecompose(torch.tensor(f @ f.T, dtype=torch.float32))
    phi = nystrom_extend(system, torch.tensor(f_te @ f.T, dtype=torch.float32))
    assert phi.shape == (6, 4)
    assert system.rounding_floor == pytest.approx(40 * float(torch.finfo(torch.float32).eps))
    for i in range(4):
        sign = float(torch.sign(phi[:, i] @ exact[:, i]))
        assert torch.allclose(sign * phi[:, i], exact[:, i], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rounding floor"):
        nystrom_extend(system, torch.tensor(f_te @ f.T, dtype=torch.float32), k=5)


def test_top_k_energy_inside_a_block_of_equal_eigenvalues_is_refused():
    # Rank 5, N = 30: for k = 10 the "top-10 eigenspace" held 5 arbitrary null-space directions, and the
    # energy changed with the order of the training inputs (0.25, 0.18, 0.12 for three orders).
    rng = np.random.default_rng(1)
    f = rng.standard_normal((30, 5))
    y = rng.standard_normal(30)
    q = np.linalg.qr(f)[0]
    in_span = float(np.sum((q.T @ y) ** 2) / (y @ y))
    for _ in range(3):
        p = rng.permutation(30)
        system = eigendecompose(f[p] @ f[p].T)
        assert top_k_target_energy(system, y[p], 5) == pytest.approx(in_span, rel=1e-10)
        assert top_k_target_energy(system, y[p], 30) == pytest.approx(1.0, abs=1e-12)
        for k in (6, 10, 29):
            with pytest.raises(ValueError, match="k=5 or k=30"):
                top_k_target_energy(system, y[p], k)
    # equally spaced points on a circle under an RBF kernel: eigenvalues in exact pairs
    t = 2 * np.pi * np.arange(16) / 16
    x = np.stack([np.cos(t), np.sin(t)], axis=1)
    system = eigendecompose(np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 0.5))
    assert top_k_target_energy(system, np.sin(3 * t), 3) >= 0.0
    with pytest.raises(ValueError, match="k=1 or k=3"):
        top_k_target_energy(system, np.sin(3 * t), 2)
