"""Review tests for genkernel.analysis.hutchinson and genkernel.analysis.stochastic: attention models,
numeric argument types, and the replicates behind the intervals over seeds."""

import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

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
from genkernel.analysis.stochastic import expected_output_decomposition
from genkernel.supervised import mse_loss
from test_stochastic import tiny_problem


# ------------------------------------------------------------------ attention models


class _SDPA(nn.Module):
    """One attention layer through F.scaled_dot_product_attention (fused kernels on CPU and GPU),
    or, with ``manual=True``, the same function written out (softmax(Q Kᵀ / sqrt(d)) V)."""

    def __init__(self, manual=False):
        super().__init__()
        self.manual = manual
        self.q, self.k, self.v, self.o = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):  # [M, T, 4] -> [M, 1]
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.manual:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        return self.o(torch.tanh(a).mean(1))


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.o = nn.Linear(4, 1)

    def forward(self, x):
        a, _ = self.mha(x, x, x, need_weights=False)
        return self.o(torch.tanh(a).mean(1))


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def _dense_hessians(model, x):
    """[M, P, P] by torch.func.hessian on the flattened parameters (model written without fused ops)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    names, shapes, sizes = list(params), [p.shape for p in params.values()], [p.numel() for p in params.values()]

    def f(flat):
        p = {k: t.reshape(s) for k, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return functional_call(model, p, (x,)).reshape(x.shape[0])

    return hessian(f)(_flat(params))


def _second_difference(model, x, v, h=1e-4):
    """d²/dt² f(x; θ + t v) at 0 by the central difference, float64 (error ~ h² and 1e-16 / h²)."""
    with torch.no_grad():
        def f(t):
            return functional_call(model, {k: p + t * v[k] for k, p in model.named_parameters()}, (x,)).reshape(-1)
        return (f(h) - 2 * f(0.0) + f(-h)) / h**2


def test_attention_models_get_exact_second_derivatives():
    # Old code: every function raised NotImplementedError ("forward AD with
    # _scaled_dot_product_flash_attention_for_cpu" / "aten::_native_multi_head_attention"), so no
    # transformer could be analysed. Now: the math backend, checked against a dense reference.
    torch.manual_seed(0)
    fused = _SDPA().double().eval()
    manual = _SDPA(manual=True).double().eval()
    manual.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    v = {k: torch.randn(p.shape, dtype=torch.float64, generator=g) for k, p in fused.named_parameters()}
    grads = {k: torch.randn((6, *p.shape), dtype=torch.float64, generator=g) for k, p in fused.named_parameters()}
    h = _dense_hessians(manual, x)  # [M, P, P]
    fv = _flat(v)
    torch.testing.assert_close(hessian_quadratic_form(fused, x, v), torch.einsum("i,mij,j->m", fv, h, fv),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(hessian_vector_product(fused, x, v)), h.sum(0) @ fv, rtol=1e-10, atol=1e-12)
    per = per_probe_hessian_vector_product(fused, x, v)
    torch.testing.assert_close(torch.cat([t.reshape(3, -1) for t in per.values()], 1),
                               torch.einsum("mij,j->mi", h, fv), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deterministic_second_order_term(fused, x, v, 0.3),
                               0.5 * 0.09 * torch.einsum("i,mij,j->m", fv, h, fv), rtol=1e-10, atol=1e-12)
    dmat = torch.cat([t.reshape(6, -1) for t in grads.values()], 1)
    dmat = dmat - dmat.mean(0)
    exact_ref = 0.5 * 0.09 * torch.einsum("ij,mij->m", dmat.T @ dmat / (6 * 2), h)  # Σ = σ² / B, B = 2
    torch.testing.assert_close(exact_trace_sigma_hessian(fused, x, grads, 0.3, batch_size=2), exact_ref,
                               rtol=1e-10, atol=1e-14)
    batch_ref = 0.5 * 0.09 * torch.einsum("np,mpq,nq->m", dmat, h, dmat) / (6 * 5)
    torch.testing.assert_close(batch_ito_term(fused, x, grads, 0.3), batch_ref, rtol=1e-10, atol=1e-14)
    mean, se = ito_term_estimate(fused, x, grads, 0.3, num_samples=400, generator=torch.Generator().manual_seed(0))
    assert torch.all((mean - batch_ref).abs() <= 4 * se), (mean, batch_ref, se)

    # nn.MultiheadAttention in eval mode takes its fused fast path whenever the parameters do not require grad
    mha = _MHA().double().eval()
    v = {k: torch.randn(p.shape, dtype=torch.float64, generator=g) for k, p in mha.named_parameters()}
    torch.testing.assert_close(hessian_quadratic_form(mha, x, v), _second_difference(mha, x, v), rtol=1e-6, atol=1e-7)
    # the global switch is left as it was
    assert torch.backends.mha.get_fastpath_enabled()


def test_attention_switches_are_restored_after_an_error():
    mha = _MHA().double().eval()
    v = {k: torch.zeros_like(p) for k, p in mha.named_parameters()}
    with pytest.raises(ValueError, match="NaN"):
        hessian_quadratic_form(mha, torch.full((2, 3, 4), float("nan"), dtype=torch.float64), v)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        hessian_quadratic_form(mha, torch.ones(2, 3, 4, dtype=torch.float64), v)
        assert not torch.backends.mha.get_fastpath_enabled()  # a user's own setting is kept
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert torch.backends.mha.get_fastpath_enabled()


# ------------------------------------------------------------------ numeric argument types


def test_numpy_float_step_sizes_are_accepted():
    # Old code: lr=np.float32(...) raised TypeError in hutchinson, and expected_output_decomposition, which
    # accepts any real lr, crashed inside its first step with that TypeError.
    x, y, model = tiny_problem(n=8)
    lr32 = np.float32(0.05)
    grads = {k: torch.randn((4, *p.shape), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
             for k, p in model.named_parameters()}
    gbar = {k: t.mean(0) for k, t in grads.items()}
    for fn, args in ((batch_ito_term, (grads,)), (deterministic_second_order_term, (gbar,))):
        assert torch.equal(fn(model, x[:3], *args, lr32), fn(model, x[:3], *args, float(lr32)))
    est = [ito_term_estimate(model, x[:3], grads, lr, num_samples=4, generator=torch.Generator().manual_seed(0))
           for lr in (lr32, float(lr32))]
    assert torch.equal(est[0][0], est[1][0]) and torch.equal(est[0][1], est[1][1])
    kwargs = dict(batch_size=4, steps=2, seeds=[0, 1], hutchinson_samples=2)
    a = expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=lr32, **kwargs)
    b = expected_output_decomposition(model, x, y, mse_loss, x[:2], lr=float(lr32), **kwargs)
    for term in ("change", "first_order", "deterministic", "ito", "realized_second_order"):
        assert torch.equal(getattr(a, term), getattr(b, term)), term
    with pytest.raises(TypeError, match="lr must be a real number"):
        batch_ito_term(model, x[:3], grads, "0.1")


@pytest.mark.parametrize("population", [64.0, "64", True])
def test_population_of_the_wrong_type_names_the_problem(population):
    # Old code: ValueError "needs population = N >= B = 4 ..., got 64.0", as if 64.0 were too small.
    with pytest.raises(TypeError, match="population must be an int"):
        ito_scale(4, sampling="without_replacement", population=population)


# ------------------------------------------------------------------ stochastic Domingos: replicates and inputs


def test_decomposition_refuses_seeds_that_are_no_independent_replicates():
    # Old code ran [0, 0, 1] as three replicates (two identical) and [0.5, 0.7] as seed 0 twice: the
    # jackknife interval over seeds counted one run twice, silently.
    x, y, model = tiny_problem(n=8)
    kwargs = dict(lr=0.05, batch_size=4, steps=1, hutchinson_samples=2)
    with pytest.raises(ValueError, match="distinct"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], seeds=[0, 0, 1], **kwargs)
    with pytest.raises(TypeError, match="seeds must be ints"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], seeds=[0.5, 0.7], **kwargs)
    with pytest.raises(TypeError, match="seeds must be ints"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], seeds=[True, 2], **kwargs)
    # out of a generator's range: refused before any replicate is trained (old: "Overflow when unpacking")
    with pytest.raises(ValueError, match="seeds must lie in"):
        expected_output_decomposition(model, x, y, mse_loss, x[:2], seeds=[0, 2**64], **kwargs)
    # numpy and 0-d integer tensor seeds are ints; the result records them as ints
    dec = expected_output_decomposition(model, x, y, mse_loss, x[:2], seeds=np.array([3, 4]), **kwargs)
    assert dec.seeds == [3, 4] and all(type(s) is int for s in dec.seeds)
    ref = expected_output_decomposition(model, x, y, mse_loss, x[:2], seeds=[3, 4], **kwargs)
    assert torch.equal(dec.ito, ref.ito) and torch.equal(dec.change, ref.change)


def test_shares_jackknife_matches_a_hand_computed_interval_and_refuses_bad_confidence():
    # Old code: confidence=95 gave NaN ends, 1.0 infinite ones, -0.5 an inverted interval (hi < lo), silently.
    x, y, model = tiny_problem(n=8)
    dec = expected_output_decomposition(model, x, y, mse_loss, x[:3], lr=0.05, batch_size=4, steps=2,
                                        seeds=[0, 1, 2, 3], hutchinson_samples=2)
    for bad in (95, 1.0, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            dec.shares(confidence=bad)
    # coverage: the jackknife-t interval against the textbook formula, by hand
    change, ito = dec.change.numpy(), dec.ito.numpy()

    def share(rows):
        d = change[rows].mean(0)
        return float(ito[rows].mean(0) @ d / (d @ d))

    r = 4
    loo = np.array([share([j for j in range(r) if j != i]) for i in range(r)])
    se = math.sqrt((r - 1) / r * ((loo - loo.mean()) ** 2).sum())
    half = scipy.stats.t.ppf(0.95, r - 1) * se
    out = dec.shares(confidence=0.9)["ito"]
    assert out["share"] == pytest.approx(share(list(range(r))), rel=1e-12)
    assert out["interval"] == pytest.approx((out["share"] - half, out["share"] + half), rel=1e-12)


def test_decomposition_checks_its_data_up_front():
    x, y, model = tiny_problem(n=8)
    kwargs = dict(lr=0.05, batch_size=4, steps=1, seeds=[0], hutchinson_samples=2)
    # old: IndexError deep inside (index 7 is out of bounds)
    with pytest.raises(ValueError, match="targets need one row per training input"):
        expected_output_decomposition(model, x, y[:6], mse_loss, x[:2], **kwargs)
    # old: "the model's output for one probe is (0, 1) ... wrap the model", about the wrong thing
    with pytest.raises(ValueError, match="probes must be a Tensor"):
        expected_output_decomposition(model, x, y, mse_loss, x[:0], **kwargs)
    # old: AttributeError ('list' object has no attribute 'shape')
    with pytest.raises(ValueError, match="inputs must be a Tensor"):
        expected_output_decomposition(model, [0.1, 0.2], y, mse_loss, x[:2], **kwargs)


class _WithUnused(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))  # trainable, never reaches the output

    def forward(self, x):
        return self.net(x)


def test_a_trainable_parameter_the_output_does_not_reach_changes_nothing():
    # Old code: RuntimeError "One of the differentiated Tensors appears to not have been used" from the
    # full-gradient pass. Its gradient is 0, so every term equals the model's without it.
    x, y, model = tiny_problem(n=8)
    kwargs = dict(lr=0.05, batch_size=4, steps=2, seeds=[0, 1], hutchinson_samples=3)
    ref = expected_output_decomposition(model, x, y, mse_loss, x[:2], **kwargs)
    out = expected_output_decomposition(_WithUnused(copy.deepcopy(model)), x, y, mse_loss, x[:2], **kwargs)
    for term in ("change", "first_order", "deterministic", "ito", "realized_second_order", "ito_stderr"):
        torch.testing.assert_close(getattr(out, term), getattr(ref, term), rtol=1e-12, atol=1e-15, msg=term)


# ------------------------------------------------------------------ random activations


def test_rrelu_in_training_mode_is_refused_and_in_eval_mode_is_exact():
    # Old code: RReLU in training mode draws fresh slopes on every forward; two identical calls gave
    # [7.28, 1.31] and [6.62, -0.87] (measured), the "Hessian" of a random function, silently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.RReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double().train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, dtype=torch.float64, generator=g)
    v = {k: torch.randn(p.shape, dtype=torch.float64, generator=g) for k, p in model.named_parameters()}
    grads = {k: torch.stack([t, -t, 0.5 * t]) for k, t in v.items()}
    for call in (lambda: hessian_quadratic_form(model, x, v),
                 lambda: ito_term_estimate(model, x, grads, 0.1, num_samples=2, generator=torch.Generator()),
                 lambda: exact_trace_sigma_hessian(model, x, grads, 0.1)):
        with pytest.raises(ValueError, match="RReLU"):
            call()
    xs, ys, _ = tiny_problem(n=8)
    with pytest.raises(ValueError, match="RReLU"):
        expected_output_decomposition(nn.Sequential(nn.Linear(1, 4), nn.RReLU(), nn.Linear(4, 1)).double(), xs, ys,
                                      mse_loss, xs[:2], lr=0.05, batch_size=4, steps=1, seeds=[0])
    # eval mode (the mean slope) is deterministic and exact: against the dense Hessian
    model.eval()
    twin = copy.deepcopy(model)  # RReLU in eval mode is LeakyReLU with the mean slope (and vmap lacks rrelu)
    twin[1] = nn.LeakyReLU((model[1].lower + model[1].upper) / 2)
    h = _dense_hessians(twin, x)
    torch.testing.assert_close(hessian_quadratic_form(model, x, v), torch.einsum("i,mij,j->m", _flat(v), h, _flat(v)),
                               rtol=1e-10, atol=1e-12)
    # a fixed slope (lower == upper) draws nothing and is accepted in training mode
    fixed = nn.Sequential(nn.Linear(3, 8), nn.RReLU(0.2, 0.2), nn.Tanh(), nn.Linear(8, 1)).double().train()
    vf = {k: torch.randn(p.shape, dtype=torch.float64, generator=g) for k, p in fixed.named_parameters()}
    assert torch.equal(hessian_quadratic_form(fixed, x, vf), hessian_quadratic_form(fixed, x, vf))


# ------------------------------------------------------------------ the decomposition's expectation, by enumeration


def test_one_step_terms_average_to_the_exact_ito_term_over_every_batch():
    """Coverage. One step from θ_0, one seed per 3-subset of N = 6 examples (all 20 of them, equally likely
    under sampling without replacement): the average over batches of the realized second-order term is
    exactly deterministic + the exact Itô term (E[ĝ ĝᵀ] = ḡ ḡᵀ + Σ), and the Hutchinson Itô term averages to
    the exact one within its error."""
    import itertools

    from genkernel.core.adapter import trainable_parameters
    from genkernel.core.engine.gradients import group_gradients

    n, b, lr = 6, 3, 0.1
    x, y, model = tiny_problem(n=n, seed=1)
    probes = torch.tensor([[-1.0], [0.3], [1.2]], dtype=torch.float64)
    seeds, seen = [], set()
    for s in range(2000):
        batch = tuple(sorted(torch.randperm(n, generator=torch.Generator().manual_seed(s))[:b].tolist()))
        if batch not in seen:
            seen.add(batch)
            seeds.append(s)
    assert len(seeds) == len(list(itertools.combinations(range(n), b))) == 20
    dec = expected_output_decomposition(model, x, y, mse_loss, probes, lr=lr, batch_size=b, steps=1, seeds=seeds,
                                        hutchinson_samples=16)
    params = trainable_parameters(model)
    per_example, _ = group_gradients(model, params, (x,), y, mse_loss, torch.eye(n, dtype=torch.float64))
    exact = exact_trace_sigma_hessian(model, probes, per_example, lr, batch_size=b, sampling="without_replacement")
    assert (exact.abs() > 1e-6).all()
    torch.testing.assert_close(dec.deterministic, dec.deterministic[:1].expand(20, -1), rtol=1e-12, atol=0)
    torch.testing.assert_close(dec.realized_second_order.mean(0) - dec.deterministic[0], exact, rtol=1e-9, atol=1e-15)
    se = dec.ito_stderr.pow(2).sum(0).sqrt() / 20  # the signs' error of the mean over batches (batch noise is exact)
    assert ((dec.ito.mean(0) - exact).abs() <= 4 * se).all(), (dec.ito.mean(0), exact, se)


def test_an_op_without_a_batching_rule_names_chunk_size_one():
    # Old code: the bare "vmap: we do not yet support aten::rrelu_with_noise", without the documented fix.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.RReLU(), nn.Tanh(), nn.Linear(5, 1)).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, dtype=torch.float64, generator=g)
    grads = {k: torch.randn((4, *p.shape), dtype=torch.float64, generator=g) for k, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="chunk_size=1"):
        ito_term_estimate(model, x, grads, 0.1, num_samples=4, generator=torch.Generator().manual_seed(0))
    mean, se = ito_term_estimate(model, x, grads, 0.1, num_samples=150, generator=torch.Generator().manual_seed(0),
                                 chunk_size=1)
    target = batch_ito_term(model, x, grads, 0.1)
    assert ((mean - target).abs() <= 4 * se).all() and (se > 0).all()
