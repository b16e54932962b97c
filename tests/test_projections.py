"""Random projections: unbiasedness, norm preservation, determinism (genkernel.core.engine.projections).

Statistical tests are seeded (so deterministic) and their tolerances come from the variances
in the module docstring: 5 standard deviations of the estimator, a bound a correct
implementation exceeds with probability below 1e-6 under the normal approximation.
"""

import math

import pytest
import torch
from torch import nn

from genkernel.core.engine.kernels import gradient_kernel, tangent_features
from genkernel.core.engine.projections import (
    GENERATION_BLOCK, expected_relative_error, project_gradients, project_parameter, sketched_gradient_kernel,
    sketched_tangent_features,
)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_are_unbiased(kind):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 300, generator=g, dtype=torch.float64)  # two vectors u, v; P = 300
    k, seeds = 16, 400
    est = torch.stack([project_parameter(u, 0, k, seed=s, kind=kind) for s in range(seeds)])  # [S, 2, k]
    inner = (est[:, 0] * est[:, 1]).sum(1)
    exact = float(u[0] @ u[1])
    # Var of one estimate (Gaussian; Rademacher is at most this): (|u|²|v|² + <u,v>²) / k.
    sd = math.sqrt((float(u[0] @ u[0]) * float(u[1] @ u[1]) + exact**2) / k / seeds)
    assert abs(float(inner.mean()) - exact) < 5 * sd
    norms = (est[:, 0] ** 2).sum(1)
    sd_norm = float(u[0] @ u[0]) * math.sqrt(2 / k / seeds)
    assert abs(float(norms.mean()) - float(u[0] @ u[0])) < 5 * sd_norm


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_norms_are_preserved(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3000, generator=g, dtype=torch.float64)  # spans three generation blocks
    k = 1024
    ratio = (project_parameter(x, 3, k, seed=7, kind=kind) ** 2).sum(1) / (x**2).sum(1)
    # |R x|² / |x|² has mean 1 and standard deviation at most sqrt(2 / k) (≈ 0.044 here).
    assert float((ratio - 1).abs().max()) < 5 * math.sqrt(2 / k)


def test_projection_is_deterministic_and_blockwise():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2 * GENERATION_BLOCK + 5, generator=g, dtype=torch.float64)
    whole = project_parameter(x, 1, 32, seed=3)
    rows = torch.cat([project_parameter(x[:2], 1, 32, seed=3), project_parameter(x[2:], 1, 32, seed=3)])
    assert torch.allclose(whole, rows, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(whole, project_parameter(x, 1, 32, seed=4))
    assert not torch.allclose(whole, project_parameter(x, 2, 32, seed=3))  # other parameter, other columns
    grads = {"a": x[:, :10].reshape(6, 2, 5), "b": x[:, 10:]}
    both = project_gradients(grads, ["a", "b"], 32, seed=3)
    assert torch.allclose(both, project_parameter(x[:, :10], 0, 32, seed=3) + project_parameter(x[:, 10:], 1, 32, seed=3))


def test_sketched_features_match_projected_exact_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    exact = tangent_features(model, x, engine="functional")  # [5, 2, P]
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    grads = dict(zip(names, torch.split(exact, sizes, dim=2)))
    ref = torch.stack([project_gradients({n: g[:, o] for n, g in grads.items()}, names, 64, seed=5) for o in range(2)], 1)
    for engine in ("factored", "functional"):
        fast = sketched_tangent_features(model, x, k=64, seed=5, engine=engine, memory_budget=8_000)
        assert torch.allclose(fast, ref, rtol=1e-10, atol=1e-12), engine


def test_sketched_kernel_error_matches_its_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    x = torch.randn(24, 3, dtype=torch.float64)
    exact = gradient_kernel(model, x)
    for k in (64, 1024):
        errors = [float((sketched_gradient_kernel(model, x, k=k, seed=s) - exact).norm() / exact.norm()) for s in range(4)]
        rms = math.sqrt(sum(e * e for e in errors) / len(errors))
        expected = expected_relative_error(exact, k)
        # The mean of 4 squared errors has relative sd ≈ 1/sqrt(2) (heavier tails allowed): 0.3–2.5x.
        assert 0.3 * expected < rms < 2.5 * expected, (k, rms, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        project_parameter(torch.zeros(2, 3), 0, 0)
    with pytest.raises(ValueError, match="kind"):
        project_parameter(torch.zeros(2, 3), 0, 4, kind="sparse")


@pytest.mark.parametrize("positions, route", [(1, "factors"), (40, "matrix")])
def test_outer_products_are_projected_by_the_cheaper_exact_route(positions, route):
    """Few positions: from the factors; many (a convolution's patches): each example's matrix
    formed, a chunk of examples at a time, and projected. Both are R vec(Σ_t g_t a_tᵀ)."""
    from genkernel.core.engine.projections import ParameterProjection, weight_projection_macs, weight_projection_route

    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, positions, 3, generator=g, dtype=torch.float64)
    o = torch.randn(5, positions, 4, generator=g, dtype=torch.float64)
    macs = weight_projection_macs(positions, 3, 4, 64)
    assert weight_projection_route(positions, 3, 4, 64) == route == min(macs, key=macs.get)
    projection = ParameterProjection({"w": (4, 3)}, 64, seed=2)
    dense = projection.project("w", torch.einsum("nto,nti->noi", o, a))
    for chunk_bytes in (64 * 2**20, 100):  # one chunk; one example per chunk
        torch.testing.assert_close(projection.project_outer("w", a, o, chunk_bytes), dense, rtol=1e-12, atol=1e-12)


def test_kronecker_rows_sketch_outer_products_from_factors_and_are_unbiased():
    from genkernel.core.engine.projections import ParameterProjection

    g = torch.Generator().manual_seed(0)
    shapes = {"w": (6, 5), "b": (6,)}
    a = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)   # [N, T, I]
    o = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)   # [N, T, O]
    dense = torch.einsum("nto,nti->noi", o, a)                   # Σ_t g_t a_tᵀ
    projection = ParameterProjection(shapes, 64, seed=1)
    # The factor path is the same linear map as the dense one.
    torch.testing.assert_close(projection.project_outer("w", a, o), projection.project("w", dense), rtol=1e-12, atol=1e-12)
    # Unbiased inner products and norms: averages over seeds approach the exact values.
    u, v = dense[0], dense[1]
    inner, norm = [], []
    for seed in range(400):
        p = ParameterProjection(shapes, 16, seed=seed)
        ru, rv = p.project("w", u[None])[0], p.project("w", v[None])[0]
        inner.append(float(ru @ rv))
        norm.append(float(ru @ ru))
    inner, norm = torch.tensor(inner), torch.tensor(norm)
    exact_inner, exact_norm = float((u * v).sum()), float((u * u).sum())
    assert abs(float(inner.mean()) - exact_inner) < 4 * float(inner.std()) / 20
    assert abs(float(norm.mean()) - exact_norm) < 4 * float(norm.std()) / 20
    # Vectors use the i.i.d. blockwise projection, as project_parameter does.
    from genkernel.core.engine.projections import project_parameter
    bias = torch.randn(3, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(projection.project("b", bias), project_parameter(bias, 1, 64, seed=1), rtol=1e-12, atol=1e-12)


def test_any_int_seed_draws_r_and_seeds_that_worked_keep_their_r():
    """Seeds above about 1.8e7 (a date such as 20240101) overflowed manual_seed's 64 bits."""
    from genkernel.core.engine.projections import ParameterProjection, projection_block

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    for seed in (20240101, 2**70, -(2**40)):
        r = project_parameter(x, 2, 8, seed=seed)
        torch.testing.assert_close(project_parameter(x, 2, 8, seed=seed), r, rtol=0, atol=0)
        assert not torch.allclose(r, project_parameter(x, 2, 8, seed=seed + 1))
        signs = projection_block(seed, 2, 0, 8, 40, "rademacher", torch.float64) * 8**0.5
        assert set(signs.unique().tolist()) == {-1.0, 1.0}
        ParameterProjection({"w": (4, 10)}, 8, seed=seed).project("w", x.reshape(3, 4, 10))
    # In range, the generator's seed is still (seed·1000003 + i)·1000033 + j: R is unchanged.
    generator = torch.Generator().manual_seed((17 * 1_000_003 + 2) * 1_000_033 + 1)
    s = torch.randint(0, 2, (5, 8), generator=generator).to(torch.float64) * 2 - 1
    block = projection_block(17, 2, 1, 8, 5, "rademacher", torch.float64)
    torch.testing.assert_close(block, s / 8**0.5, rtol=0, atol=0)


def test_expected_relative_error_refuses_kernels_it_has_no_formula_for():
    torch.manual_seed(0)
    j = torch.randn(5, 7, dtype=torch.float64)
    kernel = j @ j.T
    fro2 = float((kernel * kernel).sum())
    expected = ((float(kernel.trace())) ** 2 / fro2 + 1) ** 0.5 / 4  # sqrt(((tr K)² / |K|²_F + 1) / k), k = 16
    assert expected_relative_error(kernel, 16) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"square \[M, M\]"):
        expected_relative_error(kernel[:, :3], 16)  # a cross kernel: its diagonal is not K_ii
    with pytest.raises(ValueError, match=r"square \[M, M\]"):
        expected_relative_error(kernel[:, :, None, None], 16)
    with pytest.raises(ValueError, match="not all zero"):
        expected_relative_error(torch.zeros(3, 3), 16)
    with pytest.raises(ValueError, match="k must be"):
        expected_relative_error(kernel, 0)


def test_sketches_refuse_unclear_inputs_clearly():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 3)
    with pytest.raises(ValueError, match="do not fit"):
        sketched_gradient_kernel(model, x, torch.randn(2, 5), k=4)
    with pytest.raises(TypeError, match="seed must be an int"):
        sketched_gradient_kernel(model, x, k=4, seed=1.5)
    with pytest.raises(TypeError, match="floating point"):
        project_parameter(torch.ones(2, 5, dtype=torch.long), 0, 4)  # R cast to int64 was all zeros
