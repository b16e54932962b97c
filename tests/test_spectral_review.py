"""Review tests for genkernel.analysis.spectral and genkernel.analysis.kernel_stats: brute-force
references on tiny matrices, invariances, and inputs that used to give silent wrong numbers."""

import numpy as np
import pytest
import torch

from genkernel.analysis.kernel_stats import (
    block_auc,
    centered_alignment,
    class_block_means,
    kernel_distance,
    within_between_gap,
)
from genkernel.analysis.spectral import (
    default_ridge,
    eigendecompose,
    kernel_target_alignment,
    nystrom_extend,
    out_of_span_residual,
    path_kernel_gram,
    spearman_with_interval,
    target_energy_curve,
    top_k_target_energy,
)


def _rbf(a, b, ls=1.0):
    return np.exp(-((a[:, None] - b[None, :]) ** 2) / (2 * ls**2))


# ------------------------------------------------------------------ Nyström


def _circle(n=6):
    t = 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def test_nystrom_refuses_a_k_that_splits_equal_eigenvalues():
    # Rotation-invariant kernel on 6 points of a circle: λ_2 = λ_3 exactly. The "second eigenfunction"
    # used to be an arbitrary member of that eigenspace: 0.2498 or 0.0447 at the same test point for
    # two orders of the training inputs.
    x = _circle()
    gram = np.exp(x @ x.T)
    xt = np.array([[1.0, 0.3], [-0.2, 0.9]])
    cross = np.exp(xt @ x.T)
    orders = [np.arange(6), np.array([0, 2, 4, 1, 3, 5]), np.array([5, 3, 1, 0, 4, 2])]
    systems = [eigendecompose(gram[q][:, q]) for q in orders]
    lam = systems[0].eigenvalues.numpy()
    assert lam[1] == pytest.approx(lam[2], rel=1e-12) and lam[0] > lam[1] * 1.5
    for system, q in zip(systems, orders):
        with pytest.raises(ValueError, match="k=1 or k=3"):
            nystrom_extend(system, cross[:, q], k=2)
    # the block's ends are defined: φ_1 up to sign, and the length of the block's part of φ(x)
    phis = [nystrom_extend(s, cross[:, q], k=3).numpy() for s, q in zip(systems, orders)]
    for phi in phis[1:]:
        np.testing.assert_allclose(np.abs(phi[:, 0]), np.abs(phis[0][:, 0]), rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(phi[:, 1:3], axis=1), np.linalg.norm(phis[0][:, 1:3], axis=1),
                                   rtol=1e-10)


def test_eigenfunctions_do_not_change_sign_with_the_order_of_the_training_inputs():
    # LAPACK's eigenvector sign flipped φ_i for 45 of 100 (order, eigenfunction) pairs of one RBF kernel
    rng = np.random.default_rng(9)
    x = np.sort(rng.uniform(-3, 3, 30))
    xt = np.array([0.3, 1.7])
    ref_system = eigendecompose(_rbf(x, x))
    ref = nystrom_extend(ref_system, _rbf(xt, x), k=5).numpy()
    u = ref_system.eigenvectors.numpy()
    assert np.all(u.sum(axis=0)[:5] > 0)
    for _ in range(10):
        p = rng.permutation(30)
        system = eigendecompose(_rbf(x[p], x[p]))
        np.testing.assert_allclose(nystrom_extend(system, _rbf(xt, x[p]), k=5).numpy(), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(system.eigenvectors.numpy()[:, :5], u[p, :5], atol=1e-12)


def test_nystrom_with_k_none_leaves_out_a_block_that_the_cut_runs_through():
    # λ_2 and λ_3 equal up to rounding (1e-15 apart), rtol between them: the old default returned φ_2
    # alone, one arbitrary member of the block's eigenspace
    gram = np.diag([1.0, 2e-10, 2e-10 - 1e-15, 0.5e-10])
    system = eigendecompose(gram)
    phi = nystrom_extend(system, np.ones((1, 4)), rtol=2e-10 - 5e-16)
    assert phi.shape == (1, 1)
    np.testing.assert_allclose(phi.numpy(), [[1.0]], rtol=1e-12)
    with pytest.raises(ValueError, match="k=1 or k=3"):
        nystrom_extend(system, np.ones((1, 4)), k=2)


def test_nystrom_float32_cross_kernel_against_a_float64_gram_keeps_only_genuine_eigenfunctions():
    # float64 RBF Gram, N = 40, eigenvalues down to 1e-15 λ_1. A float32 cross kernel's rounding
    # (~1e-7 relative) divided by λ_i ~ 4e-10 λ_1 gave columns off by 1.35 against a column scale of
    # 0.33; the old rule counted usable eigenvalues from the Gram's dtype only (16 columns).
    rng = np.random.default_rng(4)
    x = np.sort(rng.uniform(-3, 3, 40))
    xt = rng.uniform(-3, 3, 5)
    system = eigendecompose(_rbf(x, x))
    exact = nystrom_extend(system, _rbf(xt, x)).numpy()
    rounded = nystrom_extend(system, torch.from_numpy(_rbf(xt, x)).float()).numpy()
    lam = system.eigenvalues.numpy()
    cut = 40 * float(torch.finfo(torch.float32).eps)
    assert rounded.shape[1] == int(np.sum(lam > cut * lam[0])) < exact.shape[1]
    err = np.abs(rounded - exact[:, : rounded.shape[1]]).max(axis=0)
    scale = np.abs(exact[:, : rounded.shape[1]]).max(axis=0)
    assert np.all(err <= 1e-2 * scale)
    with pytest.raises(ValueError, match="rounding floor"):
        nystrom_extend(system, torch.from_numpy(_rbf(xt, x)).float(), k=rounded.shape[1] + 1)


def test_nystrom_matches_the_brute_force_formula():
    # coverage: φ = K_cross U_k / λ_k, and φ = U_k on the training inputs
    rng = np.random.default_rng(0)
    f = rng.standard_normal((7, 7))
    gram = f @ f.T
    lam, u = np.linalg.eigh(gram)
    lam, u = lam[::-1], u[:, ::-1]
    system = eigendecompose(gram)
    ft = rng.standard_normal((3, 7))
    phi = nystrom_extend(system, ft @ f.T, k=4).numpy()
    signs = np.sign(np.sum(u[:, :4] * system.eigenvectors.numpy()[:, :4], axis=0))
    np.testing.assert_allclose(phi, (ft @ f.T @ u[:, :4] / lam[:4]) * signs, rtol=1e-9, atol=1e-12)
    on_train = nystrom_extend(system, gram, k=7, normalization="l2").numpy()
    np.testing.assert_allclose(on_train, system.eigenvectors.numpy() * np.sqrt(7), atol=1e-9)


# ------------------------------------------------------------------ out-of-span residual


def test_out_of_span_residual_refuses_a_self_kernel_from_another_kernel():
    # A normalized self kernel (or one 10x too small) with a raw cross kernel gave r = -9 silently.
    rng = np.random.default_rng(0)
    f, ft = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    gram, cross, self_k = f @ f.T, ft @ f.T, (ft**2).sum(1)
    r = out_of_span_residual(gram, cross, self_k).numpy()
    assert np.all(r >= 0) and np.all(r < 1e-4)  # rank 3 features: every test feature lies in the span
    with pytest.raises(ValueError, match="same kernel as gram"):
        out_of_span_residual(gram, cross, 0.1 * self_k)
    with pytest.raises(ValueError, match="same kernel as gram"):
        out_of_span_residual(gram, cross, np.ones(4))  # a normalized self kernel


def test_out_of_span_residual_accepts_float32_rounding_and_matches_brute_force():
    # float32 RBF kernels: r at training points is 0 up to rounding (|r| ~ 1e-7, some negative), not refused
    rng = np.random.default_rng(2)
    x = np.sort(rng.uniform(-3, 3, 200))
    xt = np.concatenate([x[::4], rng.uniform(-4, 4, 20)])
    r32 = out_of_span_residual(torch.from_numpy(_rbf(x, x, 3.0)).float(), torch.from_numpy(_rbf(xt, x, 3.0)).float(),
                               torch.ones(len(xt))).numpy()
    assert np.all(np.abs(r32[:50]) < 1e-5)
    # brute force on a tiny kernel with an explicit ridge
    gram, cross = _rbf(x[:6], x[:6]), _rbf(xt[50:53], x[:6])
    ref = 1.0 - np.einsum("mn,nm->m", cross, np.linalg.solve(gram + 1e-3 * np.eye(6), cross.T))
    np.testing.assert_allclose(out_of_span_residual(gram, cross, np.ones(3), ridge=1e-3).numpy(), ref, rtol=1e-10)
    # scale-free with the default ridge
    np.testing.assert_allclose(out_of_span_residual(5 * gram, 5 * cross, 5 * np.ones(3)).numpy(),
                               out_of_span_residual(gram, cross, np.ones(3)).numpy(), rtol=1e-8)


def test_out_of_span_residual_of_a_float32_rank_deficient_gram_is_not_refused():
    # Rank-5 features, N = 600, float32 Gram: its rounding leaves eigenvalues near -1.3e-6 tr(K)/N, and the
    # old default ridge 1e-6 tr(K)/N left K + λI indefinite ("not PSD at this scale") although
    # eigendecompose accepts the same Gram. The default ridge now sits at the rounding floor N * eps.
    rng = np.random.default_rng(7)
    n = 600
    f = np.zeros((n, 6), dtype=np.float32)
    f[:, :5] = rng.standard_normal((n, 5))
    ft = np.zeros((3, 6), dtype=np.float32)
    ft[0, :5] = rng.standard_normal(5)  # in the span
    ft[1, 5] = 2.0  # orthogonal to it
    ft[2, 0], ft[2, 5] = 1.0, 1.0  # half in, half out
    f32, ft32 = torch.from_numpy(f), torch.from_numpy(ft)
    gram = f32 @ f32.T
    eigendecompose(gram)  # accepted: PSD up to float32 rounding
    r = out_of_span_residual(gram, ft32 @ f32.T, (ft32**2).sum(1)).numpy()
    np.testing.assert_allclose(r, [0.0, 1.0, 0.5], atol=1e-4)
    eps = float(torch.finfo(torch.float32).eps)
    assert default_ridge(gram) == pytest.approx(n * eps * float(gram.double().trace()) / n, rel=1e-6)
    assert default_ridge(gram.double()) == pytest.approx(1e-6 * float(gram.double().trace()) / n, rel=1e-12)


def test_path_kernel_of_float32_checkpoint_kernels_keeps_float32_for_the_rounding_floor():
    # Three float32 Grams of rank-6 features over 200 inputs: summed and returned as float64, the path
    # kernel was refused by eigendecompose as "not PSD" (eigenvalue -6.1e-7 against 32.9, float32 rounding
    # read against float64's floor).
    rng = np.random.default_rng(8)
    grams = []
    for _ in range(3):
        f = torch.from_numpy(rng.standard_normal((200, 6)).astype(np.float32))
        grams.append(f @ f.T)
    path = path_kernel_gram(grams, [0.1, 0.1, 0.1])
    assert path.dtype == torch.float32
    ref = sum(0.1 * g.double() for g in grams)
    torch.testing.assert_close(path.double(), ref.float().double(), rtol=0, atol=0)  # summed in float64
    system = eigendecompose(path)
    assert int(np.sum(system.eigenvalues.numpy() > system.rounding_floor * float(system.eigenvalues[0]))) == 18
    # torch's promotion: a float64 kernel in the list makes the sum float64; lists and numpy float64 too
    assert path_kernel_gram([grams[0], grams[1].double()], [1.0, 1.0]).dtype == torch.float64
    assert path_kernel_gram([np.eye(2), [[1.0, 0.0], [0.0, 1.0]]], [1.0, 1.0]).dtype == torch.float64
    assert path_kernel_gram([np.eye(2, dtype=np.float32)], [1.0]).dtype == torch.float32


# ------------------------------------------------------------------ bootstrap seed


def test_spearman_interval_needs_an_int_seed_and_leaves_global_rngs_alone():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(20), rng.standard_normal(20)
    with pytest.raises(TypeError, match="seed must be an int"):
        spearman_with_interval(a, b, seed=None)  # used to draw from OS entropy: an irreproducible interval
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = spearman_with_interval(a, b, seed=3, n_boot=200)
    assert first == spearman_with_interval(a, b, seed=np.int64(3), n_boot=200)
    assert np.array_equal(np_state, np.random.get_state()[1]) and torch.equal(torch_state, torch.get_rng_state())


# ------------------------------------------------------------------ eigen-decomposition, energy, alignment


def test_eigendecompose_tiny_kernels_match_numpy():
    # coverage: 1x1 and 2x2 kernels
    for k in ([[2.0]], [[0.0]], [[2.0, 1.0], [1.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]):
        system = eigendecompose(k)
        np.testing.assert_allclose(system.eigenvalues.numpy(), np.linalg.eigvalsh(k)[::-1], atol=1e-15)
    with pytest.raises(ValueError, match="positive semi-definite"):
        eigendecompose([[0.0, 1.0], [1.0, 0.0]])  # zero diagonal, indefinite


def test_target_energy_and_alignment_brute_force_and_invariances():
    # coverage: E(k) = Σ_{i<=k} ‖u_iᵀY‖² / ‖Y‖_F², A = ⟨K, YYᵀ⟩ / (‖K‖ ‖YYᵀ‖), both permutation invariant
    rng = np.random.default_rng(3)
    f = rng.standard_normal((9, 9))
    gram, y = f @ f.T, rng.standard_normal((9, 2))
    u = np.linalg.eigh(gram)[1][:, ::-1]
    ref = np.cumsum(np.sum((u.T @ y) ** 2, axis=1)) / np.sum(y**2)
    np.testing.assert_allclose(target_energy_curve(eigendecompose(gram), y).numpy(), ref, rtol=1e-10)
    p = rng.permutation(9)
    for k in (1, 4, 9):
        assert top_k_target_energy(eigendecompose(gram[p][:, p]), y[p], k) == pytest.approx(ref[k - 1], rel=1e-10)
    a = np.sum(gram * (y @ y.T)) / (np.linalg.norm(gram) * np.linalg.norm(y @ y.T))
    assert kernel_target_alignment(gram, y) == pytest.approx(a, rel=1e-12)
    assert kernel_target_alignment(3 * gram[p][:, p], -2 * y[p]) == pytest.approx(a, rel=1e-12)


# ------------------------------------------------------------------ kernel_stats


def test_kernel_stats_refuse_complex_input():
    # torch cast complex -> float64 dropped the imaginary part without a word; numpy only warned
    gram = torch.tensor([[2, 1, 0], [1, 2, 1], [0, 1, 2]], dtype=torch.complex128)
    with pytest.raises(TypeError, match="gram is complex"):
        centered_alignment(gram, [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="y is complex"):
        centered_alignment(np.eye(3) + 1, np.array([1 + 1j, 2, 3]))
    with pytest.raises(TypeError, match="complex"):
        kernel_distance(torch.eye(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        block_auc(np.eye(3, dtype=complex), [0, 0, 1])


def test_centered_alignment_refuses_a_float32_kernel_constant_up_to_its_rounding():
    # Features equal up to float32 rounding: the centered part of the float32 Gram (2e-8 relative) is
    # float32 rounding, above the float64 floor, and gave an alignment of -0.0187 for y and for -y alike.
    rng = np.random.default_rng(1)
    n = 50
    g = torch.from_numpy(rng.standard_normal((1, 3000)).astype(np.float32)).repeat(n, 1)
    g = g * (1 + 1e-7 * torch.from_numpy(rng.standard_normal((n, 1)).astype(np.float32)))
    y = torch.from_numpy(rng.standard_normal(n))
    with pytest.raises(ValueError, match="gram is constant"):
        centered_alignment(g @ g.T, y)
    # a genuine float32 kernel is accepted and agrees with its float64 value to float32 accuracy
    f = rng.standard_normal((n, 5))
    k64 = f @ f.T
    assert centered_alignment(torch.from_numpy(k64).float(), y) == pytest.approx(centered_alignment(k64, y), abs=1e-5)


def test_centered_alignment_brute_force_and_invariances():
    # coverage: Cortes et al.: ⟨HKH, HYYᵀH⟩ / (‖HKH‖ ‖HYYᵀH‖), invariant to offsets, scaling and order
    rng = np.random.default_rng(3)
    n = 9
    f = rng.standard_normal((n, 4))
    gram, y = f @ f.T, rng.standard_normal((n, 2))
    h = np.eye(n) - 1.0 / n
    kc, lc = h @ gram @ h, h @ y @ y.T @ h
    ref = np.sum(kc * lc) / (np.linalg.norm(kc) * np.linalg.norm(lc))
    assert centered_alignment(gram, y) == pytest.approx(ref, rel=1e-12)
    p = rng.permutation(n)
    assert centered_alignment(7 * gram[p][:, p] + 3.0, 2 * y[p] + 5) == pytest.approx(ref, rel=1e-10)


def test_block_statistics_match_brute_force_loops():
    # coverage: pairs (i, j), i != j, of a square kernel; AUC with ties ½; invariances
    rng = np.random.default_rng(3)
    n = 9
    f = rng.standard_normal((n, 4))
    k = f @ f.T
    k = k / np.sqrt(np.outer(np.diag(k), np.diag(k)))
    k[0, 1] = k[1, 0] = k[2, 3] = k[3, 2] = 0.25  # ties
    lab = np.array([0, 0, 1, 2, 1, 0, 2, 1, 1])
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    w = [k[i, j] for i, j in pairs if lab[i] == lab[j]]
    b = [k[i, j] for i, j in pairs if lab[i] != lab[j]]
    auc = np.mean([1.0 if s > t else 0.5 if s == t else 0.0 for s in w for t in b])
    d = np.sqrt(np.clip(2 - 2 * k, 0, None))
    dw = np.mean([d[i, j] for i, j in pairs if lab[i] == lab[j]])
    db = np.mean([d[i, j] for i, j in pairs if lab[i] != lab[j]])
    res = block_auc(k, lab)
    assert res.auc == pytest.approx(auc, rel=1e-12) and res.distance_ratio == pytest.approx(db / dw, rel=1e-12)
    gap = within_between_gap(k, lab)
    assert gap.gap == pytest.approx(np.mean(w) - np.mean(b), rel=1e-12)
    classes, means = class_block_means(k, lab)
    for a in range(3):
        for c in range(3):
            vals = [k[i, j] for i, j in pairs if lab[i] == a and lab[j] == c]
            assert means[a, c] == pytest.approx(np.mean(vals), rel=1e-12)
    p = rng.permutation(n)
    assert block_auc(k[p][:, p], lab[p]).auc == pytest.approx(auc, rel=1e-12)
    assert block_auc(np.exp(5 * k), lab).auc == pytest.approx(auc, rel=1e-12)  # increasing transform
    assert within_between_gap(k[p][:, p], torch.from_numpy(lab[p])).gap == pytest.approx(gap.gap, rel=1e-12)
