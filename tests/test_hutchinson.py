"""Tests for genkernel.analysis.hutchinson (the Itô term of stochastic Domingos)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

import itertools
import math

from genkernel.analysis.hutchinson import (
    batch_ito_term,
    deterministic_second_order_term,
    exact_trace_sigma_hessian,
    hessian_quadratic_form,
    hessian_vector_product,
    ito_scale,
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


def test_hutchinson_matches_its_batch_expectation_within_three_standard_errors():
    """Over the signs, the estimate's mean is the batch's own term a² Σ_n d_nᵀ H d_n."""
    model, probe, grads = _setup()
    lr = 0.1
    for kwargs in ({}, {"sampling": "without_replacement", "population": 64}):
        target = batch_ito_term(model, probe, grads, lr, **kwargs)
        gen = torch.Generator().manual_seed(0)
        mean, se = ito_term_estimate(model, probe, grads, lr, num_samples=3000, generator=gen, **kwargs)
        assert mean.shape == se.shape == (4,) and mean.dtype == torch.float64
        assert torch.all(se > 0)
        assert torch.all((mean - target).abs() <= 3 * se), (mean, target, se)
        # the estimate is informative: the interval is narrow compared with the value
        assert torch.all(se < 0.1 * target.abs()), (se, target)


def test_batch_term_is_the_scaled_sum_of_per_example_quadratic_forms():
    model, probe, grads = _setup()
    lr, b = 0.3, 12
    gbar = {k: t.mean(0) for k, t in grads.items()}
    total = torch.zeros(probe.shape[0], dtype=torch.float64)
    for n in range(b):
        total += hessian_quadratic_form(model, probe, {k: grads[k][n] - gbar[k] for k in grads})
    torch.testing.assert_close(batch_ito_term(model, probe, grads, lr), 0.5 * lr**2 * total / (b * (b - 1)),
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(batch_ito_term(model, probe, grads, lr, sampling="without_replacement", population=40),
                               0.5 * lr**2 * total * (40 - b) / (40 * b * (b - 1)), rtol=1e-10, atol=1e-14)


def test_ito_scale_and_the_bias_of_one_over_b():
    assert ito_scale(4) == pytest.approx(1 / 12)
    assert ito_scale(4, sampling="without_replacement", population=64) == pytest.approx(60 / (64 * 4 * 3))
    assert ito_scale(64, sampling="without_replacement", population=64) == 0.0  # a full batch has no noise
    # the former scale a = 1/B against the right one, without replacement: (B − 1)/B · N/(N − B) = 0.80
    assert (1 / 16) / ito_scale(4, sampling="without_replacement", population=64) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="B >= 2"):
        ito_scale(1)
    with pytest.raises(ValueError, match="population"):
        ito_scale(4, sampling="without_replacement")
    with pytest.raises(ValueError, match="population is for"):
        ito_scale(4, population=10)


def _population(n, seed=5):
    model = _mlp(seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, 3, dtype=torch.float64, generator=g)
    y = torch.randn(n, 1, dtype=torch.float64, generator=g)
    probe = torch.randn(3, 3, dtype=torch.float64, generator=g)
    return model, probe, _per_example_grads(model, x, y)


@pytest.mark.parametrize("sampling", ["with_replacement", "without_replacement"])
def test_exact_itô_term_equals_the_covariance_of_every_possible_batch(sampling):
    """The exact reference, checked by enumerating every batch: tr(Cov(batch mean) H)."""
    n, b, lr = 7, 3, 0.2
    model, probe, grads = _population(n)
    flat = torch.cat([t.reshape(n, -1) for t in grads.values()], dim=1)
    if sampling == "with_replacement":
        batches = list(itertools.product(range(n), repeat=b))
    else:
        batches = list(itertools.combinations(range(n), b))
    means = torch.stack([flat[list(idx)].mean(0) for idx in batches])
    centred = means - flat.mean(0)
    cov = centred.T @ centred / len(batches)
    h = _explicit_hessians(model, probe)
    truth = 0.5 * lr**2 * torch.einsum("ij,mij->m", cov, h)
    exact = exact_trace_sigma_hessian(model, probe, grads, lr, batch_size=b, sampling=sampling)
    torch.testing.assert_close(exact, truth, rtol=1e-9, atol=1e-15)


def test_itô_estimate_is_unbiased_over_batch_draws_without_replacement():
    """Monte Carlo over many batch draws (B = 4 of N = 64, without replacement, the recipes' setting):
    the mean of the batch estimates matches the exact Itô term, and the former scale a = 1/B, biased
    by (B − 1)/B · N/(N − B) = 0.8, lies far outside the Monte-Carlo error."""
    n, b, lr, draws = 64, 4, 0.1, 20000
    model, probe, grads = _population(n)
    exact = exact_trace_sigma_hessian(model, probe, grads, lr, batch_size=b, sampling="without_replacement")
    # Q[m, i, j] = g_iᵀ H_m g_j: every batch's term from the same matrices
    flat = torch.cat([t.reshape(n, -1) for t in grads.values()], dim=1)
    h = _explicit_hessians(model, probe)
    q = torch.einsum("ip,mpq,jq->mij", flat, h, flat)
    a2 = ito_scale(b, sampling="without_replacement", population=n)
    rng = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(n, generator=rng)[:b] for _ in range(draws)])  # [R, B]
    sub = q[:, idx[:, :, None], idx[:, None, :]]  # [M, R, B, B]
    per_batch = 0.5 * lr**2 * a2 * (sub.diagonal(dim1=2, dim2=3).sum(-1) - sub.sum((-1, -2)) / b)  # [M, R]
    # the library's batch term is this number (checked on a few draws)
    for r in range(3):
        torch.testing.assert_close(
            batch_ito_term(model, probe, {k: t[idx[r]] for k, t in grads.items()}, lr,
                           sampling="without_replacement", population=n),
            per_batch[:, r], rtol=1e-9, atol=1e-15)
    mean, se = per_batch.mean(1), per_batch.std(1) / math.sqrt(draws)
    assert torch.all((mean - exact).abs() <= 4 * se), (mean, exact, se)
    biased = mean * (1 / b**2) / a2
    assert torch.allclose(biased / mean, torch.full_like(mean, 0.8))
    assert torch.all((biased - exact).abs() > 8 * se), (biased, exact, se)
    # the sign-sampled estimator, through the library, over fewer draws: unbiased within its error
    values = []
    for r in range(300):
        est, _ = ito_term_estimate(model, probe, {k: t[idx[r]] for k, t in grads.items()}, lr, num_samples=4,
                                   generator=torch.Generator().manual_seed(r), sampling="without_replacement",
                                   population=n)
        values.append(est)
    values = torch.stack(values, 1)
    assert torch.all((values.mean(1) - exact).abs() <= 4 * values.std(1) / math.sqrt(300)), (values.mean(1), exact)


def test_hutchinson_reproducible_and_chunk_independent():
    model, probe, grads = _setup(seed=1, batch=6, probes=2)
    out = [ito_term_estimate(model, probe, grads, 0.5, num_samples=40,
                             generator=torch.Generator().manual_seed(7), chunk_size=c)
           for c in (1, 16, 40)]
    for mean, se in out[1:]:
        assert torch.allclose(mean, out[0][0], rtol=1e-12)
        assert torch.allclose(se, out[0][1], rtol=1e-12)


def test_hutchinson_single_example_batch_is_refused_and_full_batch_is_zero():
    model, probe, grads = _setup(batch=1, probes=2)
    with pytest.raises(ValueError, match="no spread"):
        ito_term_estimate(model, probe, grads, 0.1, num_samples=4, generator=torch.Generator().manual_seed(0))
    model, probe, grads = _setup(batch=6, probes=2)  # B = N without replacement: the batch is the training set
    mean, se = ito_term_estimate(model, probe, grads, 0.1, num_samples=4, generator=torch.Generator().manual_seed(0),
                                 sampling="without_replacement", population=6)
    assert torch.all(mean == 0) and torch.all(se == 0)
    exact = exact_trace_sigma_hessian(model, probe, grads, 0.1, batch_size=6, sampling="without_replacement")
    assert torch.all(exact.abs() < 1e-15)


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


# ------------------------------------------------------------------ models whose probes interact


def test_batch_statistics_and_active_dropout_are_refused_not_mixed_into_the_hessians():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    # BatchNorm without running statistics normalizes with the probes' own batch even in eval mode:
    # probe 0's "Hessian" would depend on which other probes share the call (measured -97.0 with 5
    # probes, -67.1 with 3, silently).
    torch.manual_seed(0)
    no_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(),
                             nn.Linear(4, 1)).double().eval()
    # BatchNorm in training mode: torch.func failed deep inside on the running-statistics update.
    train_bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double().train()
    # Active dropout: a fresh mask on every call.
    dropout = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).double().train()
    for model in (no_stats, train_bn, dropout):
        v = _random_like_params(model, 1)
        grads = {k: torch.stack([t, -t]) for k, t in v.items()}
        with pytest.raises(ValueError, match="couple or randomize"):
            hessian_quadratic_form(model, x, v)
        with pytest.raises(ValueError, match="couple or randomize"):
            per_probe_hessian_vector_product(model, x, v)
        with pytest.raises(ValueError, match="couple or randomize"):
            ito_term_estimate(model, x, grads, 0.1, num_samples=2, generator=torch.Generator().manual_seed(0))
    # BatchNorm with running statistics in eval mode treats probes independently and is accepted;
    # the quadratic forms of a probe do not depend on the other probes of the call.
    train_bn.eval()
    train_bn[1].running_mean.fill_(0.3)
    v = _random_like_params(train_bn, 1)
    q = hessian_quadratic_form(train_bn, x, v)
    assert torch.allclose(q[:3], hessian_quadratic_form(train_bn, x[:3], v), rtol=1e-12, atol=0)
    h = _explicit_hessians(train_bn, x)
    assert torch.allclose(q, torch.einsum("i,mij,j->m", _flat(v), h, _flat(v)), rtol=1e-10, atol=1e-12)


def test_results_hold_no_autograd_graph_when_theta_is_a_subset():
    # Parameters outside θ still require grad; the results used to carry their graph (grad_fn), which
    # kept every activation alive and made .numpy() fail.
    model, probe, grads = _setup(batch=4, probes=2)
    sub = {"4.weight": grads["4.weight"], "0.bias": grads["0.bias"]}
    vec = {k: t[0] for k, t in sub.items()}
    gen = torch.Generator().manual_seed(0)
    outs = [
        *hessian_vector_product(model, probe, vec).values(),
        *per_probe_hessian_vector_product(model, probe, vec).values(),
        hessian_quadratic_form(model, probe, vec),
        *ito_term_estimate(model, probe, sub, 0.1, num_samples=3, generator=gen),
        batch_ito_term(model, probe, sub, 0.1),
        deterministic_second_order_term(model, probe, vec, 0.1),
        exact_trace_sigma_hessian(model, probe, sub, 0.1),
    ]
    assert all(p.requires_grad for p in model.parameters())
    assert all(not t.requires_grad and t.grad_fn is None for t in outs)
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in outs)


def test_non_finite_probe_inputs_are_refused():
    model, probe, grads = _setup(batch=4, probes=2)
    gbar = {k: t.mean(0) for k, t in grads.items()}
    bad = probe.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        hessian_quadratic_form(model, bad, gbar)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ito_term_estimate(model, bad, grads, 0.1, num_samples=2, generator=torch.Generator().manual_seed(0))


def test_numpy_integers_are_accepted_as_counts():
    np = pytest.importorskip("numpy")
    assert ito_scale(np.int64(4), sampling="without_replacement", population=np.int64(64)) == pytest.approx(
        60 / (64 * 4 * 3), rel=1e-15)
    model, probe, grads = _setup(seed=1, batch=6, probes=2)
    ref = ito_term_estimate(model, probe, grads, 0.5, num_samples=8, generator=torch.Generator().manual_seed(7),
                            chunk_size=4)
    out = ito_term_estimate(model, probe, grads, 0.5, num_samples=np.int64(8),
                            generator=torch.Generator().manual_seed(7), chunk_size=np.int64(4))
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    exact = exact_trace_sigma_hessian(model, probe, grads, 0.5, batch_size=np.int64(3))
    assert torch.allclose(exact, exact_trace_sigma_hessian(model, probe, grads, 0.5, batch_size=3), rtol=1e-15)
