"""Edge faults of the kernel engine and the Itô estimate, each against a reference written here.

1. An output that no trained parameter reaches: the functional engine gave a zero kernel and the factored engine
   (gradient_kernel, tangent_features, the sketches) a raw autograd error ("element 0 of tensors does not require
   grad"). Now every engine refuses an output that depends on no trainable parameter at all (a forward under
   no_grad, a detached output) with a ValueError naming the cause, and gives zero rows and columns for output
   components, or a batch, that no parameter reaches, as the brute force (one autograd.grad per example and output,
   unused parameters as zeros) does.
2. kernel_plan planned x against itself only: for a kernel between x1 and x2 it said "factored" where the kernel ran
   torch.func (the second side's batches were never row-checked). kernel_plan(model, x1, x2) plans that pair.
3. The engine's repeat and row checks formed float64 norms of outputs and gradients directly: past about 1.3e154
   they overflowed (inf <= rtol * inf accepted any difference, or a Python OverflowError), below about 1.5e-154
   they underflowed (0 <= rtol * 0 did too).
4. ito_term_estimate at B = 2 gave a standard error of exactly 0 in one call of 2^(S-1) (every draw the same
   direction up to its sign), for an estimate whose draws are 0 or twice the mean.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import genkernel.core.engine.kernels as kernels
from genkernel.core.engine import (
    gradient_kernel,
    kernel_plan,
    sketched_gradient_kernel,
    sketched_tangent_features,
    tangent_features,
)
from genkernel.core.engine.factors import BatchDependent, check_rows_alone, covering_plan
from genkernel.core.engine.projections import project_parameter
from test_mend42b import factored_kernels_finished
from test_read42b import _SizeDependent

from brute import brute_jacobian

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINES = ("functional", "factored", "auto")


# -- 1. outputs that no trained parameter reaches ---------------------------------------------------------------------

class _Detached(nn.Module):
    """The layer's output detached (a forward that computes its output without autograd)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).detach()


class _UnderNoGrad(_Detached):
    def forward(self, x):
        with torch.no_grad():
            return self.b(torch.tanh(self.a(x)))


class _ReadsOnlyFrozen(_Detached):
    """Trainable ``a`` never read; the output reads ``b`` only, which is frozen."""

    def __init__(self):
        super().__init__()
        self.b.requires_grad_(False)

    def forward(self, x):
        return self.b(x.new_ones(x.shape[0], 4) * x.sum(1, keepdim=True))


@pytest.mark.parametrize("cls", [_Detached, _UnderNoGrad, _ReadsOnlyFrozen])
def test_output_that_depends_on_no_trained_parameter_is_refused_by_every_engine(float64, cls):
    """gradient_kernel (against itself and against x2), tangent_features, the sketches and kernel_plan, on every
    engine: one ValueError that names the cause and the fix.

    Fails on the old code: the functional engine returned an all-zero kernel and the factored engine raised
    RuntimeError ("element 0 of tensors does not require grad")."""
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(4, 3), torch.randn(3, 3)
    calls = {
        "kernel": lambda e: gradient_kernel(model, x, engine=e),
        "pair": lambda e: gradient_kernel(model, x, y, engine=e, reduce="none"),
        "features": lambda e: tangent_features(model, x, engine=e),
        "sketch": lambda e: sketched_tangent_features(model, x, k=4, engine=e),
        "sketched kernel": lambda e: sketched_gradient_kernel(model, x, y, k=4, engine=e),
        "plan": lambda e: kernel_plan(model, x, engine=e),
    }
    for (what, call), engine in itertools.product(calls.items(), ENGINES):
        with pytest.raises(ValueError, match="depends on none of its .* trainable parameters") as error:
            call(engine)
        assert "no_grad" in str(error.value) and "requires_grad=True" in str(error.value), (what, engine)


def test_covering_check_of_an_output_without_a_graph_keeps_its_blocks():
    """The factored engine's covering check on a batch whose output has no graph (what trackers run on their own
    batches): every block's gradient is zero on both sides, so the blocks stay factored.

    Fails on the old code: RuntimeError from autograd.grad on the output."""
    torch.manual_seed(0)
    plan = covering_plan(_Detached().double(), (torch.randn(3, 3, dtype=torch.float64),))
    assert {b.name for b in plan.blocks} == {"a", "b"} and not plan.fallback


class _ConstantColumn(nn.Module):
    """Outputs: two of a Linear head, one constant column, and one detached copy of the first."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.b(torch.tanh(self.a(x)))
        return torch.cat([y, torch.ones_like(y[:, :1]), 2 * y[:, :1].detach()], dim=1)


class _DetachedByTheData(nn.Module):
    """The whole batch's output detached when any of its rows has a first feature above 5 (a branch on the data):
    examples alone keep their gradient unless they are such a row."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.b(torch.tanh(self.a(x)))
        return y.detach() if bool((x[:, 0] > 5).any()) else y


@pytest.mark.filterwarnings("ignore:torch.func.vmap cannot batch")
@pytest.mark.parametrize("cls", [_ConstantColumn, _DetachedByTheData])
def test_components_and_examples_no_parameter_reaches_get_zeros_on_every_engine(float64, cls):
    """Kernels (blocks and trace, against itself and another batch), tangent features and sketched features on every
    engine equal the brute force to 1e-10 of its scale: zero rows and columns for the outputs (or the example) that
    no parameter reaches, each other example's own gradient.

    Fails on the old code for the forward that detaches by the data: RuntimeError on the factored engine (the
    constant and detached columns were already right on every engine: coverage)."""
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(5, 3), torch.randn(3, 3)
    x[3, 0] = y[1, 0] = 9.0  # (detaches the batches that hold them, for _DetachedByTheData)
    jx, jy = brute_jacobian(model, x), brute_jacobian(model, y)
    assert not jx[3].any() if cls is _DetachedByTheData else not jx[:, 2:].any()
    scale = float(jx.abs().max()) ** 2
    for engine in ENGINES:
        for other, j2 in ((None, jx), (y, jy)):
            want = torch.einsum("mip,njp->mnij", jx, j2)
            got = gradient_kernel(model, x, other, engine=engine, reduce="none")
            assert float((got - want).abs().max()) <= 1e-10 * scale, (engine, other is None)
            got = gradient_kernel(model, x, other, engine=engine)
            assert float((got - want.diagonal(dim1=2, dim2=3).sum(-1)).abs().max()) <= 1e-10 * scale
        feats = tangent_features(model, x, engine=engine)
        assert float((feats - jx).abs().max()) <= 1e-10 * float(jx.abs().max()), engine
        k, start, want = 6, 0, torch.zeros(5, jx.shape[1], 6)
        for index, p in enumerate(model.parameters()):
            want += project_parameter(jx[:, :, start : start + p.numel()], index, k, seed=2)
            start += p.numel()
        got = sketched_tangent_features(model, x, k=k, seed=2, engine=engine)
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max()), engine


# -- 2. kernel_plan of a pair -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("period, above", [(5, 0), (4, 0), (3, 0), (0, 4)])
def test_kernel_plan_of_a_pair_says_the_engine_the_pair_kernel_runs(float64, period, above, monkeypatch):
    """Fresh models, the plan of (x1, x2) made before gradient_kernel(model, x1, x2), at budgets that hold a side,
    join chunks in pairs or give one chunk: "factored" exactly where the factored kernel completes.

    Fails on the old code: kernel_plan took no second input set (TypeError); planned as x1 against itself at the
    larger count, it said "factored" for 25 of 400 such pairs whose kernel ran torch.func."""
    finished = factored_kernels_finished(monkeypatch)
    torch.manual_seed(0)
    for budget in (2**10, 2**12, 2**20):
        for m, n in ((1, 4), (2, 5), (5, 4), (7, 5), (3, 9)):
            model = _SizeDependent(period, above)
            x1, x2 = torch.randn(m, 3), torch.randn(n, 3)
            plan = kernel_plan(model, x1, x2, memory_budget=budget)
            finished.clear()
            gradient_kernel(model, x1, x2, memory_budget=budget)
            assert (plan.engine == "factored") == bool(finished), (budget, m, n, plan)


def test_kernel_plan_of_inputs_of_two_kinds_and_its_arguments(float64, monkeypatch):
    """Sequences of two lengths (no joint capture: each side's chunks alone): the plan says what the kernel runs;
    ``kernel_plan(model, x)`` is unchanged by the new argument; ``rows_total`` with ``x2`` is refused (it plans x
    against itself), and an x2 with another number of outputs is refused as gradient_kernel refuses it.

    Fails on the old code: kernel_plan took no second input set (TypeError)."""
    finished = factored_kernels_finished(monkeypatch)
    torch.manual_seed(0)
    for budget in (2**10, 2**12, 2**20):
        for period in (3, 4, 5):
            model = _SizeDependent(period)
            x1, x2 = torch.randn(4, 2, 3), torch.randn(5, 3, 3)
            plan = kernel_plan(model, x1, x2, memory_budget=budget)
            finished.clear()
            gradient_kernel(model, x1, x2, memory_budget=budget)
            assert (plan.engine == "factored") == bool(finished), (budget, period, plan)
    model, x = _SizeDependent(), torch.randn(4, 3)
    assert kernel_plan(model, x) == kernel_plan(model, x, None) == kernel_plan(model, x, rows_total=4)
    with pytest.raises(ValueError, match="rows_total"):
        kernel_plan(model, x, x, rows_total=4)
    with pytest.raises(ValueError, match="x gives 2 outputs per example but x2 gives 4"):
        kernel_plan(_Flat(nn.Linear(3, 2)), torch.randn(2, 1, 3), torch.randn(2, 2, 3))


class _Flat(nn.Module):
    """A Linear applied per position, flattened: d = 2 × positions."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).flatten(1)


# -- 3. repeat and row checks of very large and very small values ---------------------------------------------------

@pytest.mark.parametrize("scale", [1e154, 1e200, 1e300, 1e-200, 1e-300])
def test_repeat_check_compares_outputs_of_any_magnitude(scale):
    """kernels._close, the check that two passes agree: values of ~1e154-1e300 (and ~1e-200-1e-300) that differ by
    half in one entry are refused, equal ones and ones 1e-13 apart accepted, in float64 and (scaled into range)
    float32.

    Fails on the old code: the differing values were accepted (norms overflowed to inf, or underflowed to 0)."""
    a = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * scale
    assert not kernels._close(a, a * torch.tensor([1.0, 1.5, 1.0], dtype=torch.float64))
    assert kernels._close(a, a.clone()) and kernels._close(a, a * (1 + 1e-13))
    if 1e-30 < scale < 1e30 or scale > 1e300:
        return
    small = torch.tensor([1.0, -2.0, 3.0]) * (1e37 if scale > 1 else 1e-40)
    assert not kernels._close(small, small * torch.tensor([1.0, 1.5, 1.0]))
    assert kernels._close(small, small.clone())


class _Huge(nn.Module):
    """A Linear scaled to outputs ~1e200; ``flip``: every second call ×1.5 (a Python counter, no random draw)."""

    def __init__(self, flip: bool):
        super().__init__()
        self.lin, self.flip, self.calls = nn.Linear(3, 2), flip, 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (1e200 * (1.5 if self.flip and self.calls % 2 == 0 else 1.0))


def test_eval_mode_repeat_check_refuses_huge_outputs_that_differ(float64):
    """repeatable_output (every kernel's first check) on outputs ~1e200: a forward whose second pass differs by half
    is refused as not deterministic, the same forward without the difference gives its output.

    Fails on the old code: the differing passes were accepted (inf <= rtol * inf)."""
    torch.manual_seed(0)
    one = (torch.randn(1, 3),)
    with pytest.raises(ValueError, match="not deterministic in eval mode"):
        model = _Huge(True)
        kernels.repeatable_output(model, one, dict(model.named_parameters()), "x")
    model = _Huge(False)
    out = kernels.repeatable_output(model, one, dict(model.named_parameters()), "x")
    torch.testing.assert_close(out, model.lin(one[0]).detach() * 1e200, rtol=1e-15, atol=0)


@pytest.mark.parametrize("scale", [1e160, 1e250, 1e-200])
def test_row_check_compares_rows_of_any_magnitude(float64, scale):
    """factors.check_rows_alone on outputs ~1e160-1e250 (and ~1e-200): a batch output whose first row differs from
    the example alone by half is refused (BatchDependent), the model's own batch output passes.

    Fails on the old code: the differing row passed (norms inf, or 0)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.mul_(scale)
        model.bias.mul_(scale)
    x = torch.randn(4, 3)
    out = model(x).detach()
    check_rows_alone(model, (x,), out)
    wrong = out.clone()
    wrong[0] *= 1.5
    with pytest.raises(BatchDependent):
        check_rows_alone(model, (torch.randn(5, 3),), torch.cat([wrong, wrong[:1]]))


class _Centred(nn.Module):
    """Linear layers around a centring of the batch's rows (a batch dependence any sample of two shows), its output
    scaled by ``scale``."""

    def __init__(self, scale: float, centre: bool):
        super().__init__()
        self.a, self.b, self.scale, self.centre = nn.Linear(3, 4), nn.Linear(4, 2), scale, centre

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h - h.mean(0, keepdim=True) if self.centre else h
        return self.b(h) * self.scale


@pytest.mark.parametrize("scale", [1e160, 1e-170])
def test_covering_check_compares_gradients_of_any_magnitude(float64, scale):
    """factors.covering_plan on gradients ~1e160 (and ~1e-170): the layers around a centring of the batch are moved
    to torch.func (their factors are the batch's, not the example's: alone, the centred rows are 0), the plain
    model's layers stay factored.

    Fails on the old code: the centred layers kept (their gradients' norms overflowed to inf at 1e160 and underflowed
    to 0 at 1e-170, and any gap passed)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    assert set(covering_plan(_Centred(scale, True), (x,)).fallback) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert not covering_plan(_Centred(scale, False), (x,)).fallback


def test_vmap_check_compares_results_of_any_magnitude():
    """reference._agrees (vmap's batched result against the example alone) on values ~1e160 and ~1e200: a result
    half off disagrees, an equal one agrees.

    Fails on the old code: the result half off agreed (norms inf <= inf at 1e160 and 1e200, 0 <= 0 at 1e-200); a
    finite norm past 1.3e154 squared in Python raised OverflowError besides."""
    from genkernel.core.engine.reference import _agrees

    for scale in (1e160, 1e200, 1e-200):
        a = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64) * scale
        assert _agrees({"w": a}, {"w": a.clone()})
        assert not _agrees({"w": a}, {"w": a * 1.5}), scale


# -- 4. the Itô estimate's standard error ----------------------------------------------------------------------------

def _mlp_and_grads(batch: int):
    """A float64 tanh MLP with one output, two probes and the per-example gradients of a squared loss on ``batch``
    examples (each example alone, autograd)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(100)
    x = torch.randn(batch, 3, dtype=torch.float64, generator=g)
    y = torch.randn(batch, 1, dtype=torch.float64, generator=g)
    probe = torch.randn(2, 3, dtype=torch.float64, generator=g)
    names = [n for n, _ in model.named_parameters()]
    rows = [torch.autograd.grad(0.5 * ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).sum(), list(model.parameters()))
            for i in range(batch)]
    return model, probe, {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


def _explicit_hessians(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """``[M, P, P]``: each probe's Hessian over the flattened parameters (torch.autograd.functional.hessian)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def output(theta, row):
        parts, start = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[start : start + math.prod(s)].reshape(s)
            start += math.prod(s)
        return torch.func.functional_call(model, parts, (probe[row : row + 1],)).sum()

    return torch.stack([torch.autograd.functional.hessian(lambda t: output(t, m), flat) for m in range(probe.shape[0])])


def _one_direction(seed: int, batch: int, samples: int) -> bool:
    """Whether the signs ito_term_estimate draws from ``seed`` give every draw one direction up to its sign."""
    r = torch.randint(0, 2, (samples, batch), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return bool(((r == r[:1]).all(1) | (r == -r[:1]).all(1)).all())


def _one_direction_seeds(batch: int, samples: int, wanted: int) -> list[int]:
    """The first ``wanted`` seeds of :func:`_one_direction`."""
    seeds = []
    for seed in range(100_000):
        if _one_direction(seed, batch, samples):
            seeds.append(seed)
            if len(seeds) == wanted:
                return seeds
    raise AssertionError("no such seed")


@pytest.mark.parametrize("batch, samples", [(2, 8), (3, 2), (3, 4)])
def test_ito_estimate_standard_error_is_the_signs_own_where_every_draw_gives_one_direction(batch, samples):
    """Seeds whose S draws all give one direction up to its sign (at B = 2, S = 8: seeds 277 and 352 among the first
    400; one call in 128): the standard error is the exact one over the signs, sqrt(Var_r / S), Var_r the variance of
    (η²/2) vᵀ H v over all 2^B sign vectors, enumerated with explicit Hessians (at B = 2 it equals the signs' mean,
    |batch_ito_term|, since the draws are 0 or twice it); a seed with several directions keeps the sample's.

    Fails on the old code: a standard error of exactly 0 (to rounding) for the one-direction seeds."""
    from genkernel.analysis.hutchinson import batch_ito_term, ito_scale, ito_term_estimate

    model, probe, grads = _mlp_and_grads(batch)
    lr = 0.1
    h = _explicit_hessians(model, probe)
    d = torch.cat([t.reshape(batch, -1) for t in grads.values()], dim=1)
    d = d - d.mean(0, keepdim=True)
    a = math.sqrt(ito_scale(batch))
    values = torch.stack([0.5 * lr**2 * torch.einsum("p,mpq,q->m", v, h, v)
                          for r in itertools.product((-1.0, 1.0), repeat=batch)
                          for v in [a * (torch.tensor(r, dtype=torch.float64) @ d)]])  # [2^B, M]
    exact = values.std(dim=0, correction=0) / math.sqrt(samples)
    assert bool((exact > 0).all())
    if batch == 2:
        torch.testing.assert_close(exact * math.sqrt(samples), batch_ito_term(model, probe, grads, lr).abs(), rtol=1e-9,
                                   atol=0)
    for seed in _one_direction_seeds(batch, samples, 2):
        mean, se = ito_term_estimate(model, probe, grads, lr, num_samples=samples,
                                     generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(se, exact, rtol=1e-8, atol=0)
    if batch == 2 and samples == 8:
        assert _one_direction_seeds(2, 8, 2) == [277, 352]
    # a seed with draws of both directions: the sample's own spread, unchanged
    seed = next(s for s in range(100) if not _one_direction(s, batch, samples))
    mean, se = ito_term_estimate(model, probe, grads, lr, num_samples=samples,
                                 generator=torch.Generator().manual_seed(seed))
    r = torch.randint(0, 2, (samples, batch), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    draws = torch.stack([0.5 * lr**2 * torch.einsum("p,mpq,q->m", v, h, v) for v in a * (r @ d)])
    torch.testing.assert_close(mean, draws.mean(0), rtol=1e-9, atol=1e-18)
    torch.testing.assert_close(se, draws.std(0, correction=1) / math.sqrt(samples), rtol=1e-8, atol=1e-18)
