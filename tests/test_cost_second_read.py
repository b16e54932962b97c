"""A second read of the cost estimate's torch.func accounting (the fallback parameters outside the covering plan's
blocks, and ``engine.reference.per_example``'s check of each batched call on its first example alone), on the dense
route's per-example gradient routes and the Jacobian contribution route, against torch's operation count of a real
tracked step over a bare one (``test_cost_frozen_layers.counted_ratio``, with routes of its ``ROUTES`` table added
here: a given ``gradient_route`` and ``memory_budget``):

- the dense route's "factored" capture pass holds the fallback constant: a fallback first layer (a grouped
  convolution) spares the next block its input gradient there, as on the factored route (``capture_skipped``);
- the fallback's per-example gradients are summed into the group rows over the chunks of their own torch.func pass
  (3 × P_fb values an example in the budget), not over the blocks' chunks (4 × the largest parameter) nor the whole
  batch (the training pass's records);
- the "example" route's own vmapped pass runs a check per chunk of two or more examples, as the fallback's does;
- the Jacobian contribution route's one call over the M probes checks nothing where M = 1;
- a fallback parameter in no product (a learned positional table) has no input gradient in the exact count, and
  its one multiply-add a value in the factored routes' unit has one there, as before f89bde1;
- (coverage) the checks the estimate counts are the ones a tracked step runs, probe side and batch side, at every
  budget here (one probe per chunk, several, the whole batch in one chunk or in many)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import test_cost_frozen_layers as frozen_layers
from test_cost_dense_route import mlp
from test_cost_frozen_layers import counted_ratio
from test_cost_precision_review import grouped_first
from test_cost_review3 import RawWeight

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _adam(p):
    return torch.optim.Adam(p, lr=1e-4)


def _sgd(p):
    return torch.optim.SGD(p, lr=1e-3)


def _route(monkeypatch, name: str, group_state: str, optimizer, **options) -> str:
    monkeypatch.setitem(frozen_layers.ROUTES, name, (group_state, optimizer, options))
    return name


def test_the_dense_factored_capture_skips_the_input_gradients_a_fallback_first_layer_needs(monkeypatch):
    """A grouped first convolution (the fallback) before a convolution and a Linear (the blocks), gradient_route=
    "factored": the capture pass's backward holds the fallback constant, so it forms the Linear's input gradient
    alone, not the convolution's (10368 of 10800 multiply-adds an example). The ratio is the counted one (exact:
    5.8841). Fails on the old code: 6.1265 predicted against 5.8841 counted (+4.1 %; before f89bde1, +3.4 %)."""
    route = _route(monkeypatch, "dense-capture", "dense", _adam, gradient_route="factored")
    tracker, ratio, bare = counted_ratio(grouped_first, route)
    assert tracker.cost.bare_step == pytest.approx(bare, rel=1e-6)
    assert tracker.cost.ratio == pytest.approx(ratio, rel=1e-6)


def raw_weight():
    """``test_cost_review3.RawWeight``: 16 → 64, a bare 64 × 64 parameter through ``F.linear`` (the fallback), → 4."""
    torch.manual_seed(0)
    return RawWeight().double(), lambda n, g: ((torch.randn(n, 16, generator=g, dtype=F64),),
                                               torch.randn(n, 4, generator=g, dtype=F64))


@pytest.mark.parametrize("gradient_route, budget", [("factored", 200_000), ("example", 150_000)],
                         ids=["capture-pass", "training-pass"])
def test_the_fallbacks_rows_are_summed_over_its_own_chunks(monkeypatch, gradient_route, budget):
    """The raw middle weight (4096 values) is the fallback; 8 groups of one example each: its rows are added over its
    torch.func pass's chunks (the budget over 3 × 4096 × 8 bytes: 2 examples at 200 kB, 1 at 150 kB), a chunk of one
    reaching one row, a chunk of two every row (``row_sum_products``, as ``engine.gradients.add_rows``). At 200 kB the
    capture pass's chunks (4 × 4096 × 8 bytes an example) hold one example; at 150 kB the training pass is read (the
    whole batch in one). Exact. Fails on the old code: the fallback's rows summed over the blocks' chunks, 6.259
    predicted against 8.157 counted (-23 %) at 200 kB; over the whole batch, 7.816 against 5.917 (+32 %) at 150 kB."""
    route = _route(monkeypatch, f"dense-{gradient_route}-{budget}", "dense", _adam, gradient_route=gradient_route,
                   memory_budget=budget)
    tracker, ratio, bare = counted_ratio(raw_weight, route)
    assert tracker.cost.bare_step == pytest.approx(bare, rel=1e-6)
    assert tracker.cost.ratio == pytest.approx(ratio, rel=1e-6)


def test_the_example_routes_own_pass_checks_one_example_per_chunk(monkeypatch):
    """gradient_route="example" where the training pass's records do not fit (60 kB: 8088 bytes an example, 8
    examples): its own vmapped pass over every parameter, in chunks of 60000 // (3 × 879 × 8) = 2 examples, each
    checked on its first example alone (``per_example``): 4 examples' forward and backward more. Exact. Fails on the
    old code: 7.397 predicted against 7.897 counted (-6.3 %)."""
    route = _route(monkeypatch, "dense-example-60k", "dense", _adam, gradient_route="example", memory_budget=60_000)
    tracker, ratio, bare = counted_ratio(grouped_first, route)
    assert tracker.cost.ratio == pytest.approx(ratio, rel=1e-6)


def test_one_probes_jacobian_is_not_checked_again(monkeypatch):
    """The Jacobian contribution route with one probe: ``per_example`` checks a batched call of two or more examples
    only. Exact. Fails on the old code: (M + 1) Jacobians, 6.336 predicted against 5.969 counted (+6.1 %) on an
    MLP."""
    monkeypatch.setattr(frozen_layers, "PROBES", 1)
    tracker, ratio, bare = counted_ratio(mlp, "dense-jacobian")
    assert tracker.cost.ratio == pytest.approx(ratio, rel=1e-6)


class PositionTable(nn.Module):
    """Token ids through a 200 × 16 embedding plus a learned 6 × 16 positional table (a parameter in no product: the
    covering plan's fallback, one multiply-add a value in the factored routes' unit), a Linear, the mean token to 3."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 16)
        self.pos = nn.Parameter(torch.randn(6, 16) / 4)
        self.lin, self.out = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.lin(self.emb(ids) + self.pos)).mean(1))


def position_table():
    torch.manual_seed(0)
    return PositionTable().double(), lambda n, g: ((torch.randint(0, 200, (n, 6), generator=g),),
                                                   torch.randn(n, 3, generator=g, dtype=F64))


@pytest.mark.parametrize("route", ["dense-jvp", "dense-jacobian", "factored", "sketched"])
def test_a_parameter_in_no_product_keeps_the_bare_step_exact(route):
    """A bare step is 3 forwards an example here (every product's input depends on the embedding), on every route;
    the dense routes' ratio is the counted one (exact). Fails on the old code (f89bde1's exact input gradients over a
    unit the positional table's 96 values grow: 1584 multiply-adds over 1680): bare step 23.54 against 24.00
    (-1.9 %) on every route, the dense ratio +1.0 % (jvp) and +1.7 % (jacobian); before f89bde1 the bare step was
    24.00. (The factored and sketched ratios, +18.6 % and -5.1 % here before f89bde1 and after, are not this.)"""
    tracker, ratio, bare = counted_ratio(position_table, route)
    assert tracker.cost.bare_step == pytest.approx(bare, rel=1e-6)
    if route.startswith("dense"):
        assert tracker.cost.ratio == pytest.approx(ratio, rel=1e-6)


@pytest.mark.parametrize("group_state, budget", [
    ("factored", None), ("factored", 6_000), ("factored", 3_000), ("sketched", 20_000), ("dense", 20_000),
    ("dense", 60_000)])
def test_the_checks_counted_are_the_ones_a_step_runs(monkeypatch, group_state, budget):
    """coverage: passes before (f89bde1 counts them). Every torch.func call ``per_example`` makes in a tracked step
    of the grouped-first-convolution net, by its size: over the probes (5, at every quadrature node) and over the
    batch (8), in the engine's chunks; those of two or more run the check, as many as the estimate's
    ``probe_checks`` per node and ``batch_checks`` (``cost._fallback_passes``) say."""
    from torch.utils import _pytree as pytree

    from genkernel import PathKernelTracker
    from genkernel.core import cost
    from genkernel.core.engine import gradients, reference
    from genkernel.core.engine.factors import covering_plan

    sizes: list[int] = []
    original = reference.per_example

    def recording(fn, in_dims):
        run = original(fn, in_dims)

        def sized(*args):
            sizes.append(next(pytree.tree_leaves(a)[0].shape[d] for a, d in zip(args, in_dims) if d is not None))
            return run(*args)

        return sized

    model, data = grouped_first()
    g = torch.Generator().manual_seed(1)
    (probes,), _ = data(5, g)
    options = {"contribution_route": "jvp", **({} if budget is None else {"memory_budget": budget}),
               **({"gradient_route": "factored"} if group_state == "dense" else {})}
    optimizer = (_sgd if group_state == "factored" else _adam)(list(model.parameters()))
    tracker = PathKernelTracker(model, optimizer, frozen_layers.loss_fn, (probes,), num_groups=8, batch_size=8,
                                group_state=group_state, **options)
    tracker.step(*data(8, g), torch.arange(8))
    monkeypatch.setattr(reference, "per_example", recording)
    monkeypatch.setattr(gradients, "per_example", recording)
    tracker.step(*data(8, g), torch.arange(8))
    fallback = sum(p.numel() for p in covering_plan(model, (probes,)).fallback.values())
    layers = cost.hooked_forward_counts(model, (probes[:1],), grad=True)[3]
    _, _, _, probe_checks, batch_checks = cost._fallback_passes(
        model, (probes,), layers, fallback, outputs=3, batch=8, param_bytes=8, memory_budget=tracker.memory_budget,
        probe_side=group_state != "dense")
    nodes = len(tracker.rule.nodes) if group_state != "dense" else 0
    # (the probes' Jacobians a chunk of outputs at a time: one call per chunk of rows and chunk of outputs)
    output_chunks = len(tracker.route.probe_chunks()[1]) if group_state != "dense" else 0
    assert sum(sizes) == nodes * 5 * output_chunks + 8
    assert sum(size >= 2 for size in sizes) == nodes * probe_checks + batch_checks
