"""Tests for genkernel.analysis.hutchinson (the Itô term of stochastic Domingos)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from genkernel.analysis.hutchinson import (
    deterministic_second_order_term,
    exact_trace_sigma_hessian,
    hessian_quadratic_form,
    hessian_vector_product,
    ito_term_estimate,
    per_probe_hessian_vector_product,
)


def _mlp(seed=0):
    torch.manual_seed(seed)
    # 3*6+6 + 6*6+6 + 6+1 = 73 parameters, smooth activations
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                         nn.Linear(6, 1)).double()


class _TwoInputs(nn.Module):
    """f(a, b) = W2 tanh(W1 [a, b]) with a 2-element output per example."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5, 2)

    def forward(self, a, b):
        return self.l2(torch.tanh(self.l1(torch.cat([a, b], dim=1))))


def _flat_params(model):
    return {k: p.detach() for k, p in model.named_parameters()}


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def _explicit_hessians(model, x, output_index=None):
    """[M, P, P] per-probe Hessians by torch.func.hessian on the flattened parameters."""
    params = _flat_params(model)
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    inputs = x if isinstance(x, tuple) else (x,)

    def f(flat):
        p = {k: t.reshape(s) for k, t, s in zip(names, torch.split(flat, sizes), shapes)}
        out = functional_call(model, p, inputs).reshape(inputs[0].shape[0], -1)
        return out[:, 0 if output_index is None else output_index]

    return hessian(f)(_flat(params))


def _per_example_grads(model, x, y):
    params = _flat_params(model)

    def loss(p, xi, yi):
        return ((functional_call(model, p, (xi[None],)) - yi) ** 2).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _random_like_params(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype)
            for k, p in model.named_parameters()}


# ------------------------------------------------------------------ HVPs


def test_hvp_matches_explicit_hessian():
    model = _mlp()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = _random_like_params(model, 2)
    h = _explicit_hessians(model, x)  # [M, P, P]
    hv = hessian_vector_product(model, x, v)
    assert set(hv) == set(v) and all(t.dtype == torch.float64 for t in hv.values())
    assert torch.allclose(_flat(hv), h.sum(0) @ _flat(v), atol=1e-12)

    per = per_probe_hessian_vector_product(model, x, v)
    per_flat = torch.cat([t.reshape(5, -1) for t in per.values()], dim=1)
    assert torch.allclose(per_flat, torch.einsum("mij,j->mi", h, _flat(v)), atol=1e-12)

    q = hessian_quadratic_form(model, x, v)
    assert q.shape == (5,)
    assert torch.allclose(q, torch.einsum("i,mij,j->m", _flat(v), h, _flat(v)), atol=1e-11)


def test_hvp_tuple_inputs_output_index_and_param_subset():
    torch.manual_seed(3)
    model = _TwoInputs().double()
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 2, dtype=torch.float64, generator=g)
    b = torch.randn(3, 2, dtype=torch.float64, generator=g)
    v = _random_like_params(model, 5)
    h = _explicit_hessians(model, (a, b), output_index=1)
    hv = per_probe_hessian_vector_product(model, (a, b), v, output_index=1)
    hv_flat = torch.cat([t.reshape(3, -1) for t in hv.values()], dim=1)
    assert torch.allclose(hv_flat, torch.einsum("mij,j->mi", h, _flat(v)), atol=1e-12)
    # a subset of parameters: the Hessian block of l1.weight
    sub = {"l1.weight": v["l1.weight"]}
    hv_sub = hessian_vector_product(model, (a[:1], b[:1]), sub, output_index=1)
    n = v["l1.weight"].numel()
    assert torch.allclose(hv_sub["l1.weight"].reshape(-1), h[0, :n, :n] @ _flat(sub),
                          atol=1e-12)
    with pytest.raises(ValueError, match="output_index"):
        hessian_vector_product(model, (a, b), v)  # 2 outputs, no index
    with pytest.raises(ValueError, match="out of range"):
        hessian_vector_product(model, (a, b), v, output_index=2)


# ------------------------------------------------------------------ Itô term


def _setup(seed=0, batch=12, probes=4):
    model = _mlp(seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, 3, dtype=torch.float64, generator=g)
    y = torch.randn(batch, 1, dtype=torch.float64, generator=g)
    probe = torch.randn(probes, 3, dtype=torch.float64, generator=g)
    return model, probe, _per_example_grads(model, x, y)


def test_exact_trace_matches_per_example_quadratic_forms():
    model, probe, grads = _setup()
    lr = 0.3
    exact = exact_trace_sigma_hessian(model, probe, grads, lr)
    b = next(iter(grads.values())).shape[0]
    gbar = {k: t.mean(0) for k, t in grads.items()}
    total = torch.zeros(probe.shape[0], dtype=torch.float64)
    for n in range(b):
        d = {k: grads[k][n] - gbar[k] for k in grads}
        total += hessian_quadratic_form(model, probe, d)
    assert torch.allclose(exact, 0.5 * lr**2 * total / b**2, rtol=1e-10, atol=1e-14)


def test_hutchinson_matches_exact_trace_within_three_standard_errors():
    model, probe, grads = _setup()
    lr = 0.1
    exact = exact_trace_sigma_hessian(model, probe, grads, lr)
    gen = torch.Generator().manual_seed(0)
    mean, se = ito_term_estimate(model, probe, grads, lr, num_samples=3000, generator=gen)
    assert mean.shape == se.shape == (4,) and mean.dtype == torch.float64
    assert torch.all(se > 0)
    assert torch.all((mean - exact).abs() <= 3 * se), (mean, exact, se)
    # the estimate is informative: the interval is narrow compared with the value
    assert torch.all(se < 0.1 * exact.abs()), (se, exact)


def test_hutchinson_reproducible_and_chunk_independent():
    model, probe, grads = _setup(seed=1, batch=6, probes=2)
    out = [ito_term_estimate(model, probe, grads, 0.5, num_samples=40,
                             generator=torch.Generator().manual_seed(7), chunk_size=c)
           for c in (1, 16, 40)]
    for mean, se in out[1:]:
        assert torch.allclose(mean, out[0][0], rtol=1e-12)
        assert torch.allclose(se, out[0][1], rtol=1e-12)


def test_hutchinson_single_example_batch_is_zero():
    model, probe, grads = _setup(batch=1, probes=2)
    mean, se = ito_term_estimate(model, probe, grads, 0.1, num_samples=4,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.all(mean == 0) and torch.all(se == 0)


def test_deterministic_second_order_term():
    model, probe, grads = _setup()
    lr = 0.2
    gbar = {k: t.mean(0) for k, t in grads.items()}
    h = _explicit_hessians(model, probe)
    ref = 0.5 * lr**2 * torch.einsum("i,mij,j->m", _flat(gbar), h, _flat(gbar))
    out = deterministic_second_order_term(model, probe, gbar, lr)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ bad input


def test_bad_inputs_raise():
    model, probe, grads = _setup(batch=4, probes=2)
    gbar = {k: t.mean(0) for k, t in grads.items()}
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="nn.Module"):
        hessian_vector_product(lambda x: x, probe, gbar)
    with pytest.raises(TypeError, match="dict"):
        hessian_vector_product(model, probe, [1, 2])
    with pytest.raises(ValueError, match="not parameters"):
        hessian_vector_product(model, probe, {"nope": torch.zeros(1)})
    bad = dict(gbar)
    bad["0.weight"] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        hessian_vector_product(model, probe, bad)
    with pytest.raises(TypeError, match="Tensor or a non-empty tuple"):
        hessian_vector_product(model, [probe], gbar)
    with pytest.raises(ValueError, match="batch"):
        per_probe_hessian_vector_product(model, torch.zeros(0, 3, dtype=torch.float64), gbar)
    with pytest.raises(ValueError, match="num_samples"):
        ito_term_estimate(model, probe, grads, 0.1, num_samples=1, generator=gen)
    with pytest.raises(TypeError, match="Generator"):
        ito_term_estimate(model, probe, grads, 0.1, num_samples=5, generator=0)
    with pytest.raises(ValueError, match="lr"):
        ito_term_estimate(model, probe, grads, -0.1, num_samples=5, generator=gen)
    with pytest.raises(ValueError, match=r"\[B, \*"):
        ito_term_estimate(model, probe, gbar, 0.1, num_samples=5, generator=gen)
    uneven = dict(grads)
    uneven["2.bias"] = uneven["2.bias"][:2]
    with pytest.raises(ValueError, match="batch size"):
        exact_trace_sigma_hessian(model, probe, uneven, 0.1)
    with pytest.raises(ValueError, match="max_params"):
        exact_trace_sigma_hessian(model, probe, grads, 0.1, max_params=10)
    nan = dict(gbar)
    nan["4.bias"] = torch.tensor([float("nan")], dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        deterministic_second_order_term(model, probe, nan, 0.1)
