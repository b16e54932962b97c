"""Edge faults of the kernel engine, the factored route's batch totals and the statistics, each against a reference
written here.

1. The refusal of an output that no trained parameter reaches read x1's first example alone: a forward that detaches
   by the data (a row computed under no_grad, a batch detached when one of its rows is out of range) was refused on
   every engine whenever x1's first example was such a row, though its kernel (zero in that row and column, each
   other example's own gradient elsewhere) is well defined. Now the other examples are looked at before refusing.
2. per_example.batch_totals formed Σ_n ‖c_n ∇_block ℓ_n‖ (the size against which the tracker judges the rounding of
   the groups' sum) from squares in the factors' own dtype: inf past per-example gradients of about 1.8e19 in float32
   (1.3e154 in float64), 0 below about 1e-19 (1.5e-154). The tracker's check allows gradient_rtol times that size:
   inf accepted any gap, 0 allowed no rounding at all.
3. Statistics: with two probe groups the GAN interaction's two cluster means are equal by construction, and
   mean_interval gave a t-interval about 1e-15 wide by rounding (or NaN ends, without saying why); few_units refused
   the claim but left that interval in the result. Now mean_interval (and the other intervals) says why an interval
   is undefined and takes unit means equal up to rounding as no spread; few_units keeps that why beside its own.
4. gradient_kernel(normalize=True) formed the kernel at the outputs' own magnitude: in float32 it overflowed past
   Jacobians of about 1e19 (NaN) and underflowed below about 1e-19 (cosines of 0, or of 3e-4 for an example with
   itself). Now both engines form it for the outputs times a power of two that brings the Jacobians near 1.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from genkernel.core.engine import (
    gradient_kernel,
    kernel_plan,
    sketched_gradient_kernel,
    sketched_tangent_features,
    tangent_features,
)
from genkernel.core.engine.factors import analysis, covering_plan
from genkernel.core.engine.per_example import batch_totals, capture_batch
from genkernel.core.engine.projections import project_parameter
from genkernel.gan.metrics import own_minus_others
from genkernel.stats import few_units, mean_interval, two_way_interval

from brute import Saturated, brute_jacobian

pytestmark = pytest.mark.usefixtures("one_thread")


# -- 1. examples that no trained parameter reaches, the first among them ----------------------------------------------

class _NoGradRows(nn.Module):
    """Each row alone; a row whose first feature is positive is computed under no_grad (a forward that detaches by
    the data, row by row)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        rows = []
        for row in x.split(1):
            if bool(row[0, 0] > 0):
                with torch.no_grad():
                    rows.append(self.b(torch.tanh(self.a(row))))
            else:
                rows.append(self.b(torch.tanh(self.a(row))))
        return torch.cat(rows)


class _DetachedBatch(_NoGradRows):
    """The whole batch's output detached when any of its rows has a first feature above 5 (a branch on the data)."""

    def forward(self, x):
        y = self.b(torch.tanh(self.a(x)))
        return y.detach() if bool((x[:, 0] > 5).any()) else y


def _inputs(cls, first_reached: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [5, 3] and y [4, 3]: rows that no parameter reaches among others, x's first one among them unless
    ``first_reached``; y's first one among them always."""
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    if cls is _NoGradRows:
        x[:, 0] = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0]) * (1 if first_reached else -1)
        y[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    else:
        x[:, 0] = y[:, 0] = -1.0
        x[3 if first_reached else 0, 0] = y[0, 0] = 9.0
    return x, y


@pytest.mark.filterwarnings("ignore:torch.func.vmap cannot batch")
@pytest.mark.parametrize("cls, first_reached", [(_NoGradRows, False), (_DetachedBatch, False), (_NoGradRows, True)])
def test_kernels_of_a_batch_whose_first_example_no_parameter_reaches_are_the_brute_force(float64, cls, first_reached):
    """Kernels (blocks, trace and normalized, against itself and against another batch whose first example is not
    reached either), tangent features and sketched features on the functional and factored engines equal the brute
    force to 1e-10 of its scale: zero rows and columns for the examples no parameter reaches, each other example's
    own gradient; kernel_plan plans the batch.

    Fails on the old code where x1's first example is not reached: every engine refused the batch ("depends on none
    of its 4 trainable parameters"); where it is reached (a later row is not), the sketched kernel against y, whose
    first example is not, was refused (the kernels and features were right already)."""
    torch.manual_seed(0)
    model = cls()
    x, y = _inputs(cls, first_reached)
    jx, jy = brute_jacobian(model, x), brute_jacobian(model, y)
    assert bool(jx[0].any()) is first_reached and not jy[0].any() and jx[1:].any() and jy[1:].any()
    scale = float(jx.abs().max()) ** 2
    for engine in ("functional", "factored"):
        for other, j2 in ((None, jx), (y, jy)):
            want = torch.einsum("mip,njp->mnij", jx, j2)
            got = gradient_kernel(model, x, other, engine=engine, reduce="none")
            assert float((got - want).abs().max()) <= 1e-10 * scale, (engine, other is None)
            trace = want.diagonal(dim1=2, dim2=3).sum(-1)
            got = gradient_kernel(model, x, other, engine=engine)
            assert float((got - trace).abs().max()) <= 1e-10 * scale, (engine, other is None)
            n1, n2 = jx.flatten(1).norm(dim=1), j2.flatten(1).norm(dim=1)
            cosine = torch.where(n1[:, None] * n2[None, :] > 0, trace / (n1[:, None] * n2[None, :]).clamp_min(1e-300),
                                 torch.zeros_like(trace))
            got = gradient_kernel(model, x, other, engine=engine, normalize=True)
            assert float((got - cosine).abs().max()) <= 1e-10, (engine, other is None)
        feats = tangent_features(model, x, engine=engine)
        assert float((feats - jx).abs().max()) <= 1e-10 * float(jx.abs().max()), engine
        sketches = []
        for j in (jx, jy):
            k, start, want = 6, 0, torch.zeros(j.shape[0], j.shape[1], 6)
            for index, p in enumerate(model.parameters()):
                want += project_parameter(j[:, :, start : start + p.numel()], index, k, seed=2)
                start += p.numel()
            sketches.append(want)
        got = sketched_tangent_features(model, x, k=k, seed=2, engine=engine)
        assert float((got - sketches[0]).abs().max()) <= 1e-10 * float(sketches[0].abs().max()), engine
        want = torch.einsum("mdk,ndk->mn", *sketches)
        got = sketched_gradient_kernel(model, x, y, k=k, seed=2, engine=engine)
        assert float((got - want).abs().max()) <= 1e-10 * scale, engine
        assert kernel_plan(model, x, engine=engine).outputs == 2


class _NoGradEverywhere(_NoGradRows):
    def forward(self, x):
        with torch.no_grad():
            return self.b(torch.tanh(self.a(x)))


def test_a_batch_no_example_of_which_any_parameter_reaches_is_still_refused_and_counted(float64):
    """Where no example's output is reached the refusal stands, and says it looked at every example (one example:
    the first). Fails on the old code: its message named the first example only."""
    torch.manual_seed(0)
    model = _NoGradEverywhere()
    for engine in ("functional", "factored"):
        with pytest.raises(ValueError, match="on every one of the 5 examples of x1 depends on none of its 4 trainable"):
            gradient_kernel(model, torch.randn(5, 3), engine=engine)
    with pytest.raises(ValueError, match="on the first example of x depends on none"):
        tangent_features(model, torch.randn(1, 3))


# -- 2. the batch totals' sizes at any magnitude ----------------------------------------------------------------------

class _Blocks(nn.Module):
    """An embedding, a Linear, a Conv1d and a Linear head (blocks of every kind of factors) and an elementwise gain
    (a parameter left to torch.func: the plan's fallback)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.lin = nn.Linear(3, 5)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(10, 2)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 2))

    def forward(self, x):
        h = torch.tanh(self.lin(x[:, :3] + self.emb(x[:, 3].long())))
        return self.head(self.conv(h[:, None, :]).flatten(1)) * self.gain


def _brute_sizes(model, x, targets, loss_fn, c, plan) -> dict[str, float]:
    """Σ_n ‖c_n ∇_block ℓ_n‖ per parameter (its block's, or its own for a fallback parameter), from one autograd.grad
    per example, each norm formed on the gradient divided by its largest entry (no square overflows)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    block_of = {name: list(b.names) for b in plan.blocks for name in b.names}
    block_of.update({name: [name] for name in plan.fallback})
    per = []
    for n in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(x[n : n + 1]), targets[n : n + 1]).sum(), list(params.values()))
        per.append({k: g.double() * float(c[n]) for k, g in zip(params, grads)})
    sizes = {}
    for name in params:
        total = 0.0
        for g in per:
            top = max(float(g[k].abs().max()) for k in block_of[name]) or 1.0
            total += top * math.sqrt(sum(float(((g[k] / top) ** 2).sum()) for k in block_of[name]))
        sizes[name] = total
    return sizes


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-30), (torch.float32, 1e20), (torch.float32, 1e30),
                                          (torch.float64, 1e-160), (torch.float64, 1e160), (torch.float32, 1.0)])
def test_batch_totals_sizes_are_the_per_example_gradient_norms_at_any_magnitude(dtype, scale):
    """The factored route's sizes (every block kind and a fallback parameter) equal the brute force to 1e-4 (float32
    factors) when every gradient is scaled by 1e-30..1e30 (float32) or 1e±160 (float64), and the totals are the sum
    of the per-example gradients.

    Fails on the old code: inf at 1e20 and 1e30 in float32 and 1e160 in float64, 0 at 1e-30 in float32, 0.7 % off at
    1e-160 in float64 (the fallback's squares partly subnormal); scale 1 is coverage."""
    torch.manual_seed(0)
    model = _Blocks().to(dtype)
    x = torch.cat([torch.randn(4, 3), torch.tensor([[0.0], [3.0], [3.0], [6.0]])], dim=1).to(dtype)
    targets = (torch.randn(4, 2, dtype=torch.float64) * scale).to(dtype)  # a linear loss: gradients scale with them

    def loss_fn(out, t):
        return (out * t).sum(dim=1)

    c = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64)
    with analysis(model):
        plan = covering_plan(model, (x,))
        batch = capture_batch(model, plan, (x,), targets, loss_fn, c, 2**30)
    assert {b.name for b in plan.blocks} == {"emb", "lin", "conv", "head"} and list(plan.fallback) == ["gain"]
    totals, sizes = batch_totals(batch)
    want = _brute_sizes(model, x, targets, loss_fn, c, plan)
    for name, size in want.items():
        assert 0 < size < math.inf and abs(sizes[name] - size) <= 1e-4 * size, (name, sizes[name], size)
        total = sum(torch.autograd.grad(float(c[n]) * loss_fn(model(x[n : n + 1]), targets[n : n + 1]).sum(),
                                        dict(model.named_parameters())[name])[0].double() for n in range(4))
        top = float(total.abs().max())
        assert float((totals[name] - total).abs().max()) <= 1e-4 * top, name


# -- 3. intervals over too few units, or units equal up to rounding ---------------------------------------------------

def _two_group_interactions(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-probe interaction statistic [M], probe groups [M]) of random shares over two probe groups."""
    g = torch.Generator().manual_seed(seed)
    m = 6 + seed % 40
    raw = torch.rand(m, 2, generator=g, dtype=torch.float64) ** (1 + seed % 5)
    shares = raw / raw.sum(dim=1, keepdim=True)
    groups = torch.randint(0, 2, (m,), generator=g)
    groups[:2] = torch.tensor([0, 1])
    return own_minus_others(shares, groups, 2), groups


def test_interaction_over_two_probe_groups_has_no_interval_and_says_why():
    """Over 200 random share matrices with two probe groups, the interaction's clustered mean_interval has NaN ends,
    the estimate (the two equal cluster means) and a why; as_dict carries the why, and few_units over it says why
    the claim is refused and keeps that why.

    Fails on the old code: the interval was defined (about 1e-15 wide) in 177 of the 200, without a why in all."""
    for seed in range(200):
        interaction, groups = _two_group_interactions(seed)
        means = [float(interaction[groups == u].mean()) for u in (0, 1)]
        assert abs(means[0] - means[1]) <= 1e-14  # equal by construction, up to rounding
        interval = mean_interval(interaction, clusters=groups)
        assert not interval.defined and math.isnan(interval.low) and math.isnan(interval.high), seed
        assert interval.n == 2 and abs(interval.estimate - np.mean(means)) <= 1e-15
        assert "2 independent cluster means are" in interval.why and "no spread" in interval.why
        shown = interval.as_dict()
        assert shown["low"] is None and shown["high"] is None and shown["why"] == interval.why
        refused = few_units({**shown, "held": interval.above(0.0)}, minimum=4)
        assert refused["held"] is False and "needs at least 4" in refused["why"] and refused["low"] is None
        assert refused["why"].endswith(interval.why)


def test_undefined_intervals_say_why_and_defined_ones_carry_no_why():
    """Each undefined case says its cause; a defined interval's as_dict has no "why" key (its JSON is unchanged).
    Fails on the old code: Interval had no why."""
    assert "no finite values" in mean_interval([math.nan, math.inf]).why
    assert "1 independent value" in mean_interval([1.0, 2.0], clusters=[0, 0]).why
    assert "all equal" in mean_interval([0.5, 0.5, 0.5]).why
    assert "up to rounding" in mean_interval([0.1 + 0.2, 0.3, 0.3]).why  # 0.30000000000000004 and 0.3
    # float32 values: their own rounding (one float32 ulp apart is no spread; 1e-3 apart is)
    assert "up to rounding" in mean_interval(torch.tensor([1.0, 1.0 + 2**-23, 1.0])).why
    assert mean_interval(torch.tensor([1.0, 1.001, 1.0])).defined
    defined = mean_interval([1.0, 2.0, 4.0])
    assert defined.defined and defined.why is None and "why" not in defined.as_dict()
    two = two_way_interval([1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1], [0, 1, 0, 1])
    assert not two.defined and "no spread" in two.why
    assert "needs at least 2" in two_way_interval([1.0, 2.0], [0, 0], [0, 1]).why


def test_few_units_keeps_the_interval_and_its_own_why_beside_its_refusal():
    """Below the minimum: held False and a why that names the units, followed by the interval's own why where it has
    one; the interval itself is left as it came (defined or not); at the minimum the result is returned as it came.
    Fails on the old code: the interval's own why was dropped (and mean_interval had none)."""
    undefined = {**mean_interval([0.3, 0.3 + 2**-54, 0.3], clusters=[0, 1, 1]).as_dict(), "held": False}
    refused = few_units(undefined)
    assert refused["why"].startswith("2 independent unit(s) (probe groups); a within-run interval needs at least 3; ")
    assert refused["why"].endswith("no spread to estimate a standard error from") and refused["low"] is None
    defined = {"n": 2, "held": True, "estimate": 0.3, "low": 0.1, "high": 0.5}
    assert few_units(defined) == {**defined, "held": False,
                                  "why": "2 independent unit(s) (probe groups); a within-run interval needs at least 3"}
    kept = {"n": 3, "held": True, "low": 0.1, "high": 0.5, "interval": [0.1, 0.5]}
    assert few_units(kept) == kept


@pytest.mark.parametrize("clustered", [False, True])
def test_well_defined_intervals_are_the_scipy_t_interval_bit_for_bit(clustered):
    """On 300 random inputs (2 to 40 values or clusters, magnitudes 1e-30 to 1e30, float64 and float32), every
    interval equals the Student-t interval formed here from scipy.stats.t, bit for bit.

    Coverage: the old code formed these the same way; this pins that the rounding rule leaves them alone."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 41))
        size = 10.0 ** rng.uniform(-30, 30)
        dtype = np.float32 if trial % 3 == 0 else np.float64
        values = (rng.normal(size=3 * n if clustered else n) * size + rng.normal() * size).astype(dtype)
        labels = np.repeat(np.arange(n), 3) if clustered else None
        got = mean_interval(values, clusters=labels, confidence=0.9)
        a = values.astype(np.float64)
        if clustered:
            a = np.array([a[labels == u].mean() for u in range(n)])
        mean = float(a.mean())
        half = float(scipy.stats.t.ppf(0.95, n - 1)) * float(a.std(ddof=1)) / math.sqrt(n)
        assert (got.estimate, got.low, got.high, got.n) == (mean, mean - half, mean + half, n), trial
        assert got.defined


# -- 4. normalized kernels of outputs of any magnitude ----------------------------------------------------------------

class _OutputTimes(nn.Module):
    """A small network of several kinds of layers (Conv1d, GroupNorm, embedding, attention, shared weights, a frozen
    layer) whose output is multiplied by a constant ``c``: every Jacobian is c times that of c = 1."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(5, 4)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.norm = nn.GroupNorm(2, 2)
        self.attn = nn.MultiheadAttention(2, 1, batch_first=True)
        self.shared = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x[:, :4] + self.emb(x[:, 4].long())
        h = self.norm(self.conv(h[:, None, :])).transpose(1, 2)  # [B, 4, 2]
        h = self.attn(h, h, h, need_weights=False)[0].flatten(1)  # [B, 8]
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.c * self.head(torch.tanh(self.frozen(h)))


def test_normalized_kernels_do_not_depend_on_the_outputs_magnitude():
    """float32, outputs times 2^k for k in -100..100 (Jacobians 1e-30..1e30): the normalized kernels (trace and blocks,
    against itself and a batch of another size) on both engines are bit for bit those at k = 0, and those equal the
    float64 brute force's cosines to 1e-5.

    Fails on the old code: NaN at 2^70 and 2^100 (the kernel overflowed float32: inf / inf); at 2^-70 a diagonal of
    3e-4 instead of 1 (a subnormal kernel), at 2^-100 zeros where the cosines are, the diagonal's 1 included."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4, 4), torch.tensor([[0.0], [1.0], [4.0], [2.0]])], dim=1)
    y = torch.cat([torch.randn(3, 4), torch.tensor([[3.0], [1.0], [0.0]])], dim=1)
    torch.manual_seed(1)
    reference = _OutputTimes(1.0).double()
    jx, jy = brute_jacobian(reference, x.double()), brute_jacobian(reference, y.double())
    unit_x, unit_y = (j.flatten(1) / j.flatten(1).norm(dim=1, keepdim=True) for j in (jx, jy))
    cosines = {None: unit_x @ unit_x.T, "y": unit_x @ unit_y.T}
    at_one = {}
    for k in (0, -100, -70, 70, 100):
        torch.manual_seed(1)
        model = _OutputTimes(2.0**k)
        for engine, other in itertools.product(("functional", "factored"), (None, "y")):
            x2 = None if other is None else y
            got = (gradient_kernel(model, x, x2, engine=engine, normalize=True),
                   gradient_kernel(model, x, x2, engine=engine, normalize=True, reduce="none"))
            if k == 0:
                at_one[engine, other] = got
                assert float((got[0].double() - cosines[other]).abs().max()) <= 1e-5, (engine, other)
            else:
                assert all(torch.equal(a, b) for a, b in zip(got, at_one[engine, other])), (k, engine, other)


@pytest.mark.parametrize("engine", ["factored", "auto"])
def test_kernel_of_activations_whose_products_overflow_is_the_brute_force(engine):
    """float32 inputs of about 1e25 saturate the tanh: the first layer's Jacobian is exactly 0 and the kernel is the
    head's, about 4. The factored kernel (trace, blocks, normalized, against another batch too) equals the brute
    force's to 1e-5 of its scale.

    Fails on the old code: NaN in every entry (a·a' = 1e50 overflowed float32, times output gradients of 0)."""
    torch.manual_seed(0)
    model = Saturated()
    x, y = torch.randn(5, 3) * 1e25, torch.randn(3, 3) * 1e25
    jx, jy = brute_jacobian(model, x).double(), brute_jacobian(model, y).double()
    assert not jx[:, :, :16].any() and jx.abs().max() <= 1  # (the first layer's 16 parameters: no gradient)
    for other, j2 in ((None, jx), (y, jy)):
        want = torch.einsum("mip,njp->mnij", jx, j2)
        got = gradient_kernel(model, x, other, engine=engine, reduce="none").double()
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), other is None
        trace = want.diagonal(dim1=2, dim2=3).sum(-1)
        got = gradient_kernel(model, x, other, engine=engine).double()
        assert float((got - trace).abs().max()) <= 1e-5 * float(trace.abs().max()), other is None
        n1, n2 = jx.flatten(1).norm(dim=1), j2.flatten(1).norm(dim=1)
        got = gradient_kernel(model, x, other, engine=engine, normalize=True).double()
        assert float((got - trace / (n1[:, None] * n2[None, :])).abs().max()) <= 1e-5, other is None
