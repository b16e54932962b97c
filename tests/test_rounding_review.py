"""Second read of the float32 gradient check's rounding allowance (tracking.rounding, commit 0330430).

What the allowance ROUNDING_ALLOWANCE ‖d‖ must not do: pass a wrong gradient because the sample d
itself went non-finite, outlive the gradient check it serves (cost.py counts it in the training pass,
group gradients and EMA sync phases only), or depend on the route it was taken on: an owned step's
replayed sample (example route, a forward again) is the graph route's sample of the same step, bit
for bit, with micro-batches, weights=, tuple inputs, targets=None and clipping, and taking it leaves
training bit-for-bit as it was.
"""

import copy
import gc

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.core.tracking import tracker as tracker_module
from genkernel.core.tracking.step import OptimizerStep
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _held_samples():
    """RoundingSample objects alive that still hold a sample d."""
    from genkernel.core.tracking.rounding import RoundingSample
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, RoundingSample) and o.difference is not None]


def _sample_spy(monkeypatch, force: bool):
    """Record the step's rounding norms (the sample scaled by the step's gradient scale) as the check sees them;
    ``force``: read them before the check, so an example-route step replays its forward whether or not a
    parameter fails the plain tolerance."""
    seen = []
    check = PathKernelTracker._check_gradients

    def spy(self, index, gradients, losses, rtol, witnesses, rounding_norms):
        def norms():
            if not seen:
                seen.append(rounding_norms())
            return seen[0]
        if force:
            norms()
        return check(self, index, gradients, losses, rtol, witnesses, norms)

    monkeypatch.setattr(PathKernelTracker, "_check_gradients", spy)
    return seen


def test_overflowed_rounding_sample_allows_nothing(monkeypatch):
    """A seeded copy of the gradient that overflowed float32 (|∇| = 8.45e37: with seeds 3 and 5, 5 × it was past
    3.4e38) gave ‖d‖ = inf, and an allowance of 4 × inf passed a gradient 1% off (refused before 0330430, gap
    8.45e35 at scale 1.7e38). The seeds are now 3/4 and 5/8 (no seeded gradient overflows where the real one does
    not), and a non-finite sample allows nothing (below): the wrong step is refused, the correct one passes."""
    for fault in (None, 1e-2):
        model = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        x, y = torch.tensor([[6.5e18, 1.0], [6.5e18, 2.0]]), torch.zeros(2, 1)
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-40), mse_loss, x[:1] * 1e-18,
                                    num_groups=2, group_state="dense", gradient_route="graph", batch_size=2,
                                    memory_check="warn")
        if fault is None:
            tracker.step(x, y, torch.arange(2))
            assert tracker.ledger.steps == 1
            continue
        model.weight.register_post_accumulate_grad_hook(lambda p: (p.grad.mul_(1 + fault), None)[1])
        before = model.weight.detach().clone()
        with pytest.raises(LedgerCheckError, match="group gradients of 'weight'"):
            tracker.step(x, y, torch.arange(2))
        assert tracker.ledger.steps == 0 and torch.equal(model.weight, before)


def test_a_non_finite_sample_allows_nothing():
    """A sample whose norm is inf or NaN measures nothing: its allowance is 0 for that parameter, not inf (with
    which any gap would pass) nor NaN (with which `gap > allowed` is False)."""
    from genkernel.core.tracking.rounding import RoundingSample

    sample = RoundingSample()
    sample.add({"a": torch.tensor([float("inf"), 1.0], dtype=torch.float64),
                "b": torch.tensor([float("nan")], dtype=torch.float64), "c": torch.tensor([3.0, 4.0], dtype=torch.float64)})
    assert sample.norms(2.0) == {"a": 0.0, "b": 0.0, "c": 10.0}
    sample.release()
    assert sample.norms(2.0) == {}


def _conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_owned_graph_step_holds_no_rounding_sample_in_the_analysis(monkeypatch):
    """An owned step on the graph route held its sample d (8 bytes a parameter) from the training pass through the
    analysis after the optimizer's step (the step's local RoundingSample), where cost.py does not count it: the
    check is its only reader, and it is released there."""
    held = []
    finish = PathKernelTracker._finish
    monkeypatch.setattr(PathKernelTracker, "_finish", lambda self, pending: (held.append(len(_held_samples())),
                                                                             finish(self, pending))[1])
    model = _conv_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 2, generator=g)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-2), mse_loss,
                                torch.randn(2, 3, 8, 8, generator=g), num_groups=4, group_state="dense",
                                gradient_route="graph", batch_size=8, memory_check="warn")
    seen = _sample_spy(monkeypatch, force=True)
    tracker.step(x, y, torch.arange(8) % 4)
    assert tracker.ledger.steps == 1 and seen and seen[0]  # (a sample was taken)
    assert held == [0]


def test_observed_step_holds_no_rounding_sample_after_the_check(monkeypatch):
    """coverage: passes before. An observed loop's sample (summed in the observed micro-batches' dict) is gone by
    the analysis after the loop's optimizer.step()."""
    held = []
    after = PathKernelTracker._after_observed_step
    monkeypatch.setattr(PathKernelTracker, "_after_observed_step",
                        lambda self, *a: (held.append(len(_held_samples())), after(self, *a))[1])
    model = _conv_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 2, generator=g)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(2, 3, 8, 8, generator=g), num_groups=4,
                                group_state="dense", gradient_route="graph", batch_size=8, memory_check="warn")
    seen = _sample_spy(monkeypatch, force=True)
    for rows in (slice(0, 4), slice(4, 8)):
        losses = mse_loss(model(x[rows]), y[rows])
        tracker.observe(losses, torch.arange(8)[rows] % 4)
        (losses.mean() / 2).backward()
    optimizer.step()
    assert tracker.ledger.steps == 1 and seen and seen[0]
    assert held == [0]


class _TwoInputs(nn.Module):
    """A conv net of two inputs (images, a per-example scale) for tuple inputs and a loss without targets."""

    def __init__(self):
        super().__init__()
        self.net = _conv_model(3)

    def forward(self, x, s):
        return self.net(x) * s[:, None]


def _unit_loss(outputs, targets):
    assert targets is None
    return ((outputs - 1.0) ** 2).mean(dim=1)


def _replay_setup(route, max_grad_norm):
    model = _TwoInputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    tracker = PathKernelTracker(model, optimizer, _unit_loss, (torch.randn(2, 3, 8, 8, generator=g), torch.ones(2)),
                                num_groups=3, group_state="dense", gradient_route=route, batch_size=10,
                                micro_batches=2, max_grad_norm=max_grad_norm, memory_check="warn")
    x, s = torch.randn(10, 3, 8, 8, generator=g), torch.rand(10, generator=g) + 0.5
    weights = torch.rand(10, generator=g, dtype=torch.float64) / 5
    return model, optimizer, tracker, (x, s), weights


@pytest.mark.parametrize("max_grad_norm", [float("inf"), 1e-3])
def test_replayed_sample_is_the_graph_routes(monkeypatch, max_grad_norm):
    """coverage: passes before. The example route's sample, a forward of each micro-batch again (ReplayedRounding), is
    the graph route's sample of the same step bit for bit (2 micro-batches, weights=, tuple inputs, targets=None;
    with clipping, both scaled by the same clip factor, which clips here: 1e-3 against a gradient norm ~1), and
    taking it leaves training as it was: parameters, .grad, Adam's state and the RNG after the step equal those of
    the same step whose sample was not taken, bit for bit."""
    norms, states = {}, {}
    for route, force in (("graph", True), ("example", True), ("example", False)):
        with monkeypatch.context() as patched:
            seen = _sample_spy(patched, force)
            model, optimizer, tracker, inputs, weights = _replay_setup(route, max_grad_norm)
            step = OptimizerStep(model, optimizer, _unit_loss, inputs, None, weights, max_grad_norm=max_grad_norm,
                                 micro_batches=2)
            torch.manual_seed(5)
            tracker.track(step, torch.arange(10) % 3)
            assert tracker.ledger.steps == 1
            if max_grad_norm < 1:
                assert step.clip_factor < 0.1
            if force:
                norms[route] = seen[0]
            states[route, force] = ([p.detach().clone() for p in model.parameters()],
                                    [p.grad.clone() for p in model.parameters()],
                                    copy.deepcopy(optimizer.state_dict()["state"]), torch.get_rng_state())
    assert norms["graph"] == norms["example"] and all(v > 0 for v in norms["graph"].values())
    (p1, g1, o1, r1), (p2, g2, o2, r2) = states["example", True], states["example", False]
    assert all(torch.equal(a, b) for a, b in zip(p1, p2)) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.equal(o1[k][n], o2[k][n]) for k in o1 for n in o1[k]) and torch.equal(r1, r2)


def test_error_in_the_replay_rolls_the_step_back(monkeypatch):
    """coverage: passes before. An error inside the replay (its seeded backward raising after the replay's
    forward) fails the step cleanly: the parameters, Adam's state and the ledger are as before, and the
    step run again (no error) is recorded."""
    model, optimizer, tracker, inputs, weights = _replay_setup("example", float("inf"))
    _sample_spy(monkeypatch, force=True)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("replay failed")

    with monkeypatch.context() as patched:
        patched.setattr(tracker_module, "rounding_of", failing)
        before = [p.detach().clone() for p in model.parameters()]
        step = OptimizerStep(model, optimizer, _unit_loss, inputs, None, weights, micro_batches=2)
        with pytest.raises(RuntimeError, match="replay failed"):
            tracker.track(step, torch.arange(10) % 3)
    assert calls == [1] and tracker.ledger.steps == 0 and not optimizer.state and not step.applied
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    tracker.track(OptimizerStep(model, optimizer, _unit_loss, inputs, None, weights, micro_batches=2), torch.arange(10) % 3)
    assert tracker.ledger.steps == 1


def _long_reduction_tracker(seed=1):
    """tests/test_gradient_check_float32.py's long reduction: a 4-channel conv net on 64 examples of 64x64, its
    second conv's bias gradient a sum over 262144 positions."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(64, 3, 64, 64, generator=g), torch.randn(64, 4, generator=g)
    ids = torch.randint(0, 8, (64,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(2, 3, 64, 64, generator=g), num_groups=8,
                                batch_size=64, memory_check="warn", group_state="dense", gradient_route="graph")
    return model, optimizer, tracker, x, y, ids


@pytest.mark.parametrize("fault", [None, 1e-3])
def test_allowance_follows_an_observed_loops_fitted_scale(fault):
    """The allowance is the sample times the step's gradient scale: an observed loop that sums its losses (its
    fitted scale 64, the observed coefficients the mean's 1/64) passes its correct long-reduction step (seed 1:
    refused before 0330430, gap 1.3e-5 past the plain tolerance; an unscaled sample would allow 64 times too
    little) and refuses the same step with the conv bias's gradient 1e-3 off (a sample scaled twice would allow
    64 times too much). coverage: passes on HEAD (0330430); before it the correct step was refused."""
    model, optimizer, tracker, x, y, ids = _long_reduction_tracker()
    if fault is not None:
        model[2].bias.register_post_accumulate_grad_hook(lambda p: (p.grad.mul_(1 + fault), None)[1])
    optimizer.zero_grad()
    losses = mse_loss(model(x), y)
    tracker.observe(losses, ids)
    losses.sum().backward()
    if fault is None:
        optimizer.step()
        assert tracker.ledger.steps == 1 and tracker.gradient_scales[-1]["scale"] == pytest.approx(64.0, rel=1e-5)
    else:
        with pytest.raises(LedgerCheckError, match="do not add up to the real gradient"):  # (the fit moves too:
            optimizer.step()  # another parameter may be the one refused)
        assert tracker.ledger.steps == 0


@pytest.mark.parametrize("fault", [None, 1e-3])
def test_allowance_follows_a_clipped_steps_clip_factor(fault):
    """An owned step clipped to max_grad_norm=0.01 (clip factor ~0.03): its rows and its sample both carry the clip
    factor, so the correct long-reduction step passes (a sample clipped twice would allow 30 times too little) and
    the conv bias's gradient 1e-3 off is refused (an unclipped sample would allow 30 times too much).
    coverage: passes on HEAD (0330430); before it the correct step was refused."""
    model, optimizer, _, x, y, ids = _long_reduction_tracker()
    g = torch.Generator().manual_seed(2)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(2, 3, 64, 64, generator=g), num_groups=8,
                                batch_size=64, memory_check="warn", group_state="dense", gradient_route="graph",
                                max_grad_norm=0.01)
    factors = []
    check = PathKernelTracker._begin
    if fault is not None:
        model[2].bias.register_post_accumulate_grad_hook(lambda p: (p.grad.mul_(1 + fault), None)[1])
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(PathKernelTracker, "_begin", lambda self, *a: (factors.append(a[7]), check(self, *a))[1])
        if fault is None:
            tracker.step(x, y, ids)
            assert tracker.ledger.steps == 1
        else:
            with pytest.raises(LedgerCheckError, match="group gradients of '2.bias'.*its own backward's rounding"):
                tracker.step(x, y, ids)
            assert tracker.ledger.steps == 0
    assert 0.01 < factors[0] < 0.1
