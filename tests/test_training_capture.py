"""Step 1 of the per-example routes (factored, sketched, dense "example") read from the training
pass itself (:class:`genkernel.core.engine.factors.TrainingCapture`): the same per-example
gradients as a capture pass of their own, training untouched, and a pass that cannot be read (or
whose records would not fit the memory budget) handed to that second pass."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from genkernel import PathKernelTracker
from genkernel.core.engine.factors import TrainingCapture, covering_plan
from genkernel.core.engine.per_example import capture_batch
from genkernel.supervised import mse_loss

from test_factored import Mixed, convnet, mlp


class Checkpointed(nn.Module):
    """An MLP whose hidden layers run under activation checkpointing (recomputed in the backward)."""

    def __init__(self):
        super().__init__()
        self.first, self.hidden, self.head = nn.Linear(3, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def _inner(self, h):
        return torch.tanh(self.hidden(torch.tanh(self.first(h))))

    def forward(self, x):
        return self.head(checkpoint(self._inner, x, use_reentrant=False))


def _model_and_batch(kind, dtype=torch.float64, batch=7):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mixed":  # embedding, Conv1d, LayerNorm, a Linear called twice, a frozen weight
        return Mixed().to(dtype), torch.randint(0, 11, (batch, 7), generator=g), torch.randn(batch, 3, generator=g, dtype=dtype)
    if kind == "convnet":  # GroupNorm, ReLU(inplace=True) after a convolution
        return convnet(dtype), torch.randn(batch, 1, 8, 8, generator=g, dtype=dtype), torch.randn(batch, 4, generator=g, dtype=dtype)
    if kind == "checkpoint":
        return Checkpointed().to(dtype), torch.randn(batch, 3, generator=g, dtype=dtype), torch.randn(batch, 2, generator=g, dtype=dtype)
    return mlp(dtype), torch.randn(batch, 3, generator=g, dtype=dtype), torch.randn(batch, 2, generator=g, dtype=dtype)


def _per_example(factors, names):
    out = {}
    for f in factors:
        out.update({n: g[0] for n, g in f.gradients().items() if n in names})
    return out


@pytest.mark.parametrize("kind", ["mlp", "mixed", "convnet", "checkpoint"])
def test_the_training_pass_gives_the_capture_pass_per_example_gradients_and_leaves_training_alone(kind):
    model, x, y = _model_and_batch(kind)
    weights = torch.linspace(0.2, 1.3, x.shape[0], dtype=torch.float64)  # a weighted loss, not the mean
    plan = covering_plan(model, (x,))
    names = {n for block in plan.blocks for n in block.names}  # the fallback's take their own pass
    assert names  # the comparison below is not empty

    model.zero_grad()
    (mse_loss(model(x), y) * weights).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    with TrainingCapture(plan, x.shape[0]) as recorded:
        losses = mse_loss(model(x), y)
        recorded.stop(losses)
        (losses * weights).sum().backward()
    # Reading the pass changes nothing: the same gradients, bit for bit.
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.equal(p.grad, plain[n]), n

    factors = recorded.factors()
    assert factors is not None
    reference = capture_batch(model, plan, (x,), y, mse_loss, weights, 2**30)
    ours, theirs = _per_example(factors, names), _per_example(reference.factors, names)
    assert ours.keys() == theirs.keys() == names
    for n in names:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-12, atol=1e-14, msg=n)
        # and they add up to the step's gradient
        torch.testing.assert_close(ours[n].sum(0), plain[n], rtol=1e-12, atol=1e-14, msg=n)


def test_a_pass_without_a_graph_is_not_read():
    """Block outputs with no graph (a forward under no_grad) cannot be read: no factors, and the
    route runs its own capture pass."""
    model, x, y = _model_and_batch("mlp", batch=5)
    with TrainingCapture(covering_plan(model, (x,)), 5) as recorded, torch.no_grad():
        model(x)
    assert not recorded.readable and recorded.factors() is None
    assert TrainingCapture.idle().factors() is None


def _count_batch_forwards(model, batch):
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]) if args[0].shape[0] == batch else None)
    return calls


def test_the_factored_ledger_is_the_same_with_or_without_the_second_pass():
    """The ledger read from the training pass, under activation checkpointing (whose recomputed
    forward runs inside the backward, where nothing is recorded), equals the ledger of a capture
    pass of its own, and adds up to the real change; the training batch goes through the model
    once per step, not twice. (torch.func cannot run a checkpointed model, so the dense route is
    no reference here.)"""
    batch, steps = 6, 3
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(batch, 3, generator=g, dtype=torch.float64), torch.randn(batch, 2, generator=g, dtype=torch.float64))
            for _ in range(steps)]
    probes = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ledgers, params = {}, {}
    for source in ("training pass", "second pass"):
        torch.manual_seed(0)
        model = Checkpointed().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=batch * steps, group_state="factored",
                                    quadrature="simpson")
        if source == "second pass":
            tracker.route.recording = lambda batch: TrainingCapture.idle()
        calls = _count_batch_forwards(model, batch)
        for k, (x, y) in enumerate(data):
            tracker.step(x, y, torch.arange(k * batch, (k + 1) * batch))
        ledgers[source], params[source] = tracker.ledger, [p.detach().clone() for p in model.parameters()]
        assert len(calls) == (steps if source == "training pass" else 2 * steps)
        # Simpson's rule: 3e-8, as without checkpointing (4e-3 when the probes' backward at the
        # quadrature nodes recomputed the checkpointed forward at the module's own parameters)
        assert tracker.ledger.relative_residual() < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(params["training pass"], params["second pass"]))
    scale = float(ledgers["second pass"].contributions.abs().max())
    assert float((ledgers["training pass"].contributions - ledgers["second pass"].contributions).abs().max()) <= 1e-12 * scale


def test_a_failure_while_reading_never_reaches_training(monkeypatch):
    """Anything the recording hook cannot handle turns the capture off; the training step runs as
    without it and the step is still recorded exactly (by the capture pass)."""
    def broken(*args, **kwargs):
        raise RuntimeError("cannot read this call")

    model, x, y = _model_and_batch("mlp", batch=6)
    reference = [p.detach().clone() for p in model.parameters()]
    bare = mlp(torch.float64)
    bare.load_state_dict(model.state_dict())
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, x[:3], num_groups=6,
                                group_state="factored", quadrature="simpson")
    monkeypatch.setattr(TrainingCapture, "_gradient_hook", broken)
    calls = _count_batch_forwards(model, 6)
    tracker.step(x, y, torch.arange(6))
    opt = torch.optim.SGD(bare.parameters(), lr=0.1)
    mse_loss(bare(x), y).mean().backward()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), reference))
    assert len(calls) == 2  # the training forward, then the capture pass of its own
    assert tracker.ledger.relative_residual() < 1e-8


def test_a_compiled_model_is_never_hooked_and_still_tracked_exactly(monkeypatch):
    """Hooks inside a torch.compile'd forward would change what it traces: the route runs its
    own pass instead, and training is as without the tracker."""
    starts = []
    original = TrainingCapture.start
    monkeypatch.setattr(TrainingCapture, "start", lambda self: (starts.append(self.plan is not None), original(self)))
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    params, ledgers = {}, {}
    for kind in ("bare", "plain", "compiled"):
        torch.manual_seed(0)
        model = mlp(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trained = torch.compile(model, backend="eager") if kind == "compiled" else model
        if kind == "bare":
            mse_loss(model(x), y).mean().backward()
            opt.step()
        else:
            tracker = PathKernelTracker(trained, opt, mse_loss, x[:2], num_groups=6, group_state="factored",
                                        quadrature="simpson")
            starts.clear()
            tracker.step(x, y, torch.arange(6))
            assert starts == ([True] if kind == "plain" else [False])  # read the pass / record nothing
            ledgers[kind] = tracker.ledger
        params[kind] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params["bare"], params["compiled"]))
    assert all(torch.equal(a, b) for a, b in zip(params["bare"], params["plain"]))
    scale = float(ledgers["plain"].contributions.abs().max())
    assert float((ledgers["compiled"].contributions - ledgers["plain"].contributions).abs().max()) <= 1e-12 * scale
    assert ledgers["compiled"].relative_residual() == ledgers["plain"].relative_residual()


@pytest.mark.parametrize("group_state", ["factored", "dense"])
def test_records_that_do_not_fit_the_memory_budget_leave_it_to_the_chunked_pass(group_state, monkeypatch):
    """Reading the training pass keeps about one copy of its activations until step 1: only when
    that fits the memory budget; else step 1 runs its own pass in chunks. The ledgers agree."""
    from genkernel.core.cost import reads_training_pass
    from genkernel.core.tracking import routes

    second = "capture_batch" if group_state == "factored" else "group_gradients"
    passes = []
    original = getattr(routes, second)
    monkeypatch.setattr(routes, second, lambda *args, **kwargs: (passes.append(1), original(*args, **kwargs))[1])
    model0, x, y = _model_and_batch("convnet", batch=8)
    ledgers, counts = {}, {}
    for budget in (2**30, 2**14):
        model = convnet(torch.float64)
        model.load_state_dict(model0.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.05) if group_state == "factored" else torch.optim.Adam(model.parameters(), lr=1e-2)
        tracker = PathKernelTracker(model, opt, mse_loss, x[:3], num_groups=2, group_state=group_state, memory_budget=budget)
        passes.clear()
        tracker.step(x, y, torch.arange(8) % 2)
        fits = reads_training_pass(tracker.route.model.record_bytes, 8, budget)
        assert fits == (budget == 2**30) and ("training_records" in tracker.cost.memory) == fits
        counts[budget], ledgers[budget] = len(passes), tracker.ledger
    assert counts == {2**30: 0, 2**14: 1}  # the second pass only where the records do not fit
    scale = float(ledgers[2**30].contributions.abs().max())
    assert float((ledgers[2**14].contributions - ledgers[2**30].contributions).abs().max()) <= 1e-10 * scale


def test_the_cost_estimate_counts_the_group_gradient_route_the_tracker_takes():
    model, x, _ = _model_and_batch("mlp", batch=8)
    costs = {}
    for route in ("auto", "factored", "graph"):
        tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters()), mse_loss, x[:3], num_groups=4,
                                    group_state="dense", gradient_route=route, batch_size=8)
        costs[route] = tracker.cost
    # "auto" reads the training pass (its records kept), "factored" captures a pass of its own (a forward and its
    # input gradients, B (1 + β), more) in chunks (a step after the first: equal chunks of the size its first two
    # measured gave, engine.gradients.factored_steady_chunk), where the training pass is one chunk of the batch: the
    # same per-example products after it but a Linear weight's, which are summed over the rows each chunk reaches
    # (cost.outer_row_products); "graph" runs R = 4 backward passes of the batch (a bare step less its forward
    # each); tests/test_cost_dense_route.py checks each against the operation count
    from genkernel.core import cost
    from genkernel.core.engine.factored import block_shapes
    from genkernel.core.engine.gradients import factored_steady_chunk

    assert "training_records" in costs["auto"].memory
    assert "training_records" not in costs["factored"].memory and "training_records" not in costs["graph"].memory
    bare = costs["factored"].bare_step
    share = bare / 8 - 2  # β, the input gradients' share of a forward: B (2 + β) is the bare step
    chunks = cost.equal_chunks(8, factored_steady_chunk(8, 256 * 2**20, *cost.factored_chunk_bytes(model, (x[:3],), 4, 1)))
    assert chunks == [5, 3]
    shapes, _ = block_shapes(model, (x[:3],))
    outer = sum(s.parameters - (s.outputs if s.bias else 0) for s in shapes if s.kind == "linear" and s.positions == 1)
    forward = cost.hooked_forward_counts(model, (x[:1],), grad=True)[1]
    fewer = (cost.outer_row_products(4, 1, [8]) - cost.outer_row_products(4, 1, chunks)) * outer / forward
    assert costs["factored"].work["group_gradients"] - costs["auto"].work["group_gradients"] == pytest.approx(
        8 * (1 + share) - fewer)
    assert costs["graph"].work["group_gradients"] == pytest.approx(4 * (costs["graph"].bare_step - 8))


def test_factor_rows_cast_block_by_block_equal_float64_sums_cast_at_the_end():
    """engine.gradients.factor_rows keeps one block's float64 rows at a time; the rows are the ones
    summing every block in float64 and casting at the end gives, bit for bit, with zeros for a
    module the forward skips."""
    from genkernel.core.engine.factors import capture, loss_cotangents, make_plan
    from genkernel.core.engine.gradients import add_factor_rows, factor_rows

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Conv1d(1, 4, 3, padding=1), nn.Flatten(),
                                      nn.Tanh(), nn.Linear(64, 2))
            self.spare = nn.Linear(4, 4)  # never called

        def forward(self, x):
            return self.body[5](self.body[4](self.body[3](self.body[2](self.body[1](self.body[0](x)).unsqueeze(1)))))

    torch.manual_seed(0)
    model = WithSpare()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    plan = make_plan(model)
    make, _ = loss_cotangents(mse_loss, y)
    factors, _ = capture(model, plan, (x,), make)
    weights = torch.randn(3, 8, generator=g, dtype=torch.float64)
    params = {name: p for name, p in model.named_parameters() if name not in plan.fallback}
    summed = {name: torch.zeros((3, *p.shape), dtype=torch.float64) for name, p in params.items()}
    add_factor_rows(summed, weights, factors)
    for dtype in (torch.float32, torch.float64):
        rows = factor_rows(weights, factors, params, dtype)
        assert rows.keys() == params.keys()
        for name, value in rows.items():
            assert value.dtype == dtype and torch.equal(value, summed[name].to(dtype)), name
    assert not rows["spare.weight"].any() and summed["body.0.weight"].abs().sum() > 0
