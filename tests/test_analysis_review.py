"""Review of the kernel-statistics analyses (kernel_stats, neighbors, embedding, optimizer_kernels)
against brute-force float64 references: explicit sums over pairs, Adam's update by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from genkernel import tangent_features
from genkernel.analysis.embedding import embed_2d
from genkernel.analysis.kernel_stats import centered_alignment, kernel_distance
from genkernel.analysis.optimizer_kernels import adaptive_preconditioner, preconditioned_kernel


def _centered_alignment_by_hand(k: np.ndarray, y: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, yc = h @ k @ h, h @ y.reshape(n, -1)
    yy = yc @ yc.T
    return float(np.sum(kc * yy) / (np.linalg.norm(kc) * np.linalg.norm(yy)))


def test_centered_alignment_refuses_a_constant_kernel_or_target():
    rng = np.random.default_rng(0)
    y = rng.normal(size=7)
    features = rng.normal(size=(7, 3))
    gram = features @ features.T
    reference = _centered_alignment_by_hand(gram, y)
    # agreement, invariance to scale and to a constant offset of K and y
    assert centered_alignment(gram, y) == pytest.approx(reference, abs=1e-12)
    assert centered_alignment(3.7 * gram + 5.0, 2.0 * y - 1.0) == pytest.approx(reference, abs=1e-12)
    # a constant kernel (a network whose only live parameter is the output bias: K = 11ᵀ) has no
    # centered part; the old code returned rounding noise as an alignment (-0.054 here)
    with pytest.raises(ValueError, match="gram is constant"):
        centered_alignment(np.full((7, 7), 0.3), y)
    with pytest.raises(ValueError, match="y is constant"):
        centered_alignment(gram, np.full(7, 0.1))  # old: -5.5e-18, a number for a 0/0


def test_kernel_distance_refuses_a_raw_kernel():
    rng = np.random.default_rng(1)
    a, x = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    raw = 10.0 * a @ x.T  # 3 anchors × 5 inputs, not normalized: entries above 1 became distance 0
    with pytest.raises(ValueError, match="outside \\[-1, 1\\]"):
        kernel_distance(raw)
    with pytest.raises(ValueError, match="outside \\[-1, 1\\]"):
        kernel_distance(x @ x.T, same_set=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    reference = np.array([[np.linalg.norm(a[i] - x[j]) for j in range(5)] for i in range(3)])
    assert np.allclose(kernel_distance(a @ x.T), reference, atol=1e-12)


def _two_group_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def test_adam_groups_with_different_learning_rates_scale_the_preconditioner():
    model = _two_group_model()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam([
        {"params": model[0].parameters(), "lr": 1e-3, "eps": 1e-3, "betas": (0.9, 0.99)},
        {"params": model[2].parameters(), "lr": 1e-1},
    ], lr=1e-2)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # the old code returned P without η_g: J P Jᵀ weighed the 1e-3 group like the 1e-1 group
    with pytest.raises(ValueError, match="scale_by_lr=True"):
        adaptive_preconditioner(model, opt)
    scaled = adaptive_preconditioner(model, opt, scale_by_lr=True)
    # step 1: m̂ = g, so the real update is exactly −diag(η_g/(sqrt(v̂)+ε)) g
    torch.testing.assert_close(after - before, -scaled * grad, rtol=1e-12, atol=1e-15)
    # hand-rolled second moment per group (own β2, ε) after three more steps
    v = {id(p): (1 - opt.param_groups[0 if i < 2 else 1]["betas"][1]) * p.grad.detach() ** 2
         for i, p in enumerate(model.parameters())}
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        for g in opt.param_groups:
            for p in g["params"]:
                v[id(p)] = g["betas"][1] * v[id(p)] + (1 - g["betas"][1]) * p.grad.detach() ** 2
        opt.step()
    expected = []
    for g in opt.param_groups:
        for p in g["params"]:
            expected.append((g["lr"] / ((v[id(p)] / (1 - g["betas"][1] ** 4)).sqrt() + g["eps"])).reshape(-1))
    torch.testing.assert_close(adaptive_preconditioner(model, opt, scale_by_lr=True), torch.cat(expected),
                               rtol=1e-12, atol=0.0)
    # the kernel with the scaled diagonal gives a probe's change to first order: J(probe) Δθ
    phi = tangent_features(model, x, output_index=0).double()
    k = preconditioned_kernel(model, x[:2], x, scaled)
    torch.testing.assert_close(k, phi[:2] @ (scaled[:, None] * phi.T), rtol=1e-12, atol=1e-15)


def test_adaptive_preconditioner_names_a_parameter_that_never_had_a_gradient():
    model = _two_group_model()
    x = torch.randn(6, 2, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        model[0].bias.grad = None  # a branch switched off: PyTorch's Adam skips it and keeps no state
        opt.step()
    # the old message said the optimizer had not taken a step yet
    with pytest.raises(ValueError, match="'0.bias' has no optimizer state"):
        adaptive_preconditioner(model, opt)
    model[0].bias.requires_grad_(False)
    assert adaptive_preconditioner(model, opt).shape == (8 + 4 + 1,)  # 0.weight, 2.weight, 2.bias


def test_preconditioned_kernel_refuses_a_nan_or_negative_preconditioner():
    model = _two_group_model()
    x = torch.randn(3, 2, dtype=torch.float64)
    n = sum(p.numel() for p in model.parameters())
    for bad in (torch.full((n,), float("nan")), -torch.ones(n)):  # old: NaN or ±9e307 kernels
        with pytest.raises(ValueError, match="NaN, infinite or negative"):
            preconditioned_kernel(model, x, x, bad, normalize=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        preconditioned_kernel(model, x, x, np.ones(n))


def test_embed_2d_names_the_rounding_of_cdist_distances():
    x = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = torch.cdist(x, x)  # matmul shortcut: diagonal ~1e-8, not 0
    with pytest.raises(ValueError, match="donot_use_mm_for_euclid_dist"):
        embed_2d(d)
    exact = torch.cdist(x[:8], x[:8], compute_mode="donot_use_mm_for_euclid_dist").requires_grad_()
    coords, _ = embed_2d(exact, method="tsne")  # old: numpy() on a tensor that requires grad
    assert coords.shape == (8, 2) and np.all(np.isfinite(coords))


def test_block_auc_distance_ratio_is_nan_for_a_raw_kernel():
    from genkernel.analysis.kernel_stats import block_auc

    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 0, 1, 1, 1])
    features = rng.normal(size=(6, 3)) + 2.0 * labels[:, None]
    raw = features @ features.T  # entries up to ~60: sqrt(2 − 2k) clipped most of them to distance 0
    got = block_auc(raw, labels)
    assert np.isnan(got.distance_ratio)  # old: a finite ratio of clipped zeros
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert block_auc(3.0 * raw + 1.0, labels).auc == got.auc  # the AUC itself stays scale-free
    normalized = block_auc(unit @ unit.T, labels)
    within = [np.linalg.norm(unit[i] - unit[j]) for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]]
    between = [np.linalg.norm(unit[i] - unit[j]) for i in range(6) for j in range(6) if labels[i] != labels[j]]
    assert normalized.distance_ratio == pytest.approx(np.mean(between) / np.mean(within), rel=1e-7)


def test_neighbors_accept_a_numpy_integer_k_and_agree_with_brute_force():
    from genkernel.analysis.neighbors import euclidean_neighbors, kernel_neighbors

    g = torch.Generator().manual_seed(4)
    points = torch.randint(-2, 3, (9, 2), generator=g).double() * 0.5  # many equal distances
    gram = (points @ points.T).float()  # ties, float32
    k = np.int64(4)  # e.g. k = np.ceil(0.4 * N).astype(int); old: TypeError
    by_kernel = kernel_neighbors(gram, k, exclude=torch.arange(9))
    by_distance = euclidean_neighbors(points, points, k)
    for a in range(9):
        sims = sorted((-float(gram[a, j]), j) for j in range(9) if j != a)
        assert by_kernel[a].tolist() == [j for _, j in sims[:4]]
        dists = sorted((float(torch.sqrt(((points[a] - points[j]) ** 2).sum())), j) for j in range(9))
        assert by_distance[a].tolist() == [j for _, j in dists[:4]]
    with pytest.raises(TypeError, match="k must be an int"):
        kernel_neighbors(gram, np.float64(4.0))
    with pytest.raises(ValueError, match="at least 2 examples"):
        centered_alignment(np.zeros((0, 0)), np.zeros(0))  # old: numpy's "cannot reshape array of size 0"
