"""Review (jointrev) of the observed step decided by the loop's backward (hooks on the observed losses):
a micro-batch left out for want of a hook whose gradient the step's check cannot tell from the kept
ones', a GradScaler-skipped step in a loop whose loss is built beside the observed losses (no hook of
theirs fires), and reentrant activation checkpointing (the tracker's passes read zero gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss

F64 = torch.float64
G = 3
PROBES = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64),
            torch.randint(0, G, (n,), generator=g))


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    return model, opt, PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=G)


class Parallel(nn.Module):
    """f(x) = (2a + b)·x: every example's gradient points along (2, 1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3], dtype=F64))
        self.b = nn.Parameter(torch.tensor([0.2], dtype=F64))

    def forward(self, x):
        return (2 * self.a + self.b) * x


def test_a_left_out_micro_batch_whose_gradient_is_parallel_to_the_kept_ones_is_refused_not_given_to_them():
    """Two micro-batches (groups 0 and 1) trained on, the second's backward through F.mse_loss(outputs, y)
    beside its observed per-example losses (no hook of theirs fires): the feature left it out, fitted
    scale 0.815 to the first alone and booked the whole update to group 0 (group contributions at the
    probes [0.532, 0.0]; right: [0.327, 0.206]), silently, where the code before refused (parallel
    gradients). Now refused before the parameters move."""
    g = torch.Generator().manual_seed(0)
    x1, y1 = torch.rand(3, 1, generator=g, dtype=F64) + 0.5, torch.rand(3, 1, generator=g, dtype=F64) + 2
    x2, y2 = torch.rand(3, 1, generator=g, dtype=F64) + 0.5, torch.rand(3, 1, generator=g, dtype=F64) + 2
    model = Parallel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = PathKernelTracker(model, opt, mse_loss, torch.tensor([[1.0], [2.0]], dtype=F64), num_groups=2)
    opt.zero_grad()
    losses = mse_loss(model(x1), y1)
    tracker.observe(losses, torch.zeros(3, dtype=torch.long))
    (losses.mean() / 2).backward()
    outputs = model(x2)
    tracker.observe(mse_loss(outputs, y2), torch.ones(3, dtype=torch.long))
    (F.mse_loss(outputs, y2) / 2).backward()  # trained on: the same loss, through another node
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"micro-batch\(es\) \[2\].*parallel to the kept"):
        opt.step()
    assert tracker.ledger.steps == 0 and tracker.gradient_scales == [] and tracker.observed_micro_batches == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))


def beside_loop(skip):
    """Per step: micro-batch A (its backward then cleared without a step, as a GradScaler that found inf,
    when ``skip``; else not run at all), then B, stepped on. The loss is built beside the observed
    per-example losses (F.mse_loss(outputs, y)): no hook on the observed losses fires."""
    model, opt, tracker = mlp()
    for k in range(2):
        opt.zero_grad()
        if skip:
            x, y, g = rows(3, 10 + k)
            outputs = model(x)
            tracker.observe(mse_loss(outputs, y), g)
            F.mse_loss(outputs, y).backward()
            opt.zero_grad()
        x, y, g = rows(4, 20 + k)
        outputs = model(x)
        tracker.observe(mse_loss(outputs, y), g)
        F.mse_loss(outputs, y).backward()
        opt.step()
    return model, tracker


def test_a_skipped_step_in_a_loop_whose_loss_is_built_beside_the_observed_losses_is_dropped():
    """The feature kept A (no hook fired) at B's observe() and refused every step (real gradient B's,
    observed A + B: gap 4.8e-01 of 9.5e-01 at step 1), where the code before dropped A as a skipped step.
    Now a backward into the parameters after A's observe() marks A as run: dropped, the steps are B's,
    equal to the loop that never ran A. Two halves observed before one joint backward built the same
    way (no backward between their observe() calls) still form one step."""
    model, tracker = beside_loop(skip=True)
    reference_model, reference = beside_loop(skip=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    assert tracker.ledger.steps == 2
    scale = float(reference.ledger.contributions.abs().max())
    torch.testing.assert_close(tracker.ledger.contributions, reference.ledger.contributions, rtol=0, atol=1e-12 * scale)
    assert tracker.skipped_steps == [{"after_step": 0, "micro_batches": 1}, {"after_step": 1, "micro_batches": 1}]

    model, opt, joint = mlp()
    opt.zero_grad()
    (x1, y1, g1), (x2, y2, g2) = rows(3, 30), rows(3, 31)
    out1, out2 = model(x1), model(x2)
    joint.observe(mse_loss(out1, y1), g1)
    joint.observe(mse_loss(out2, y2), g2)
    (F.mse_loss(out1, y1) + F.mse_loss(out2, y2)).backward()
    opt.step()
    assert joint.skipped_steps == [] and joint.ledger.steps == 1
    assert [(e["micro_batches"], e["dropped_micro_batches"]) for e in joint.gradient_scales] == [(2, 0)]


def test_reentrant_checkpointing_is_refused_at_observe_with_the_fix():
    """torch.utils.checkpoint(use_reentrant=True): the tracker's torch.autograd.grad passes read every group
    gradient as zero; the feature observed the zeros and refused the step later as 'do not add up to the
    real gradient' (gap 4.5e-01 of 4.5e-01), naming weights and clipping. Now observe() refuses with the
    cause and the fix, and use_reentrant=False is recorded exactly (scale 0.5 per accumulated pair)."""
    x, y, g = rows(6, 3)
    model, opt, tracker = mlp()
    opt.zero_grad()
    losses = mse_loss(checkpoint(model, x.clone().requires_grad_(True), use_reentrant=True), y)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        tracker.observe(losses, g)
    assert tracker.observed_micro_batches == 0

    model, opt, tracker = mlp()
    opt.zero_grad()
    for part in (slice(0, 3), slice(3, 6)):
        losses = mse_loss(checkpoint(model, x[part], use_reentrant=False), y[part])
        tracker.observe(losses, g[part])
        (losses.mean() / 2).backward()
    opt.step()
    assert tracker.ledger.steps == 1 and tracker.gradient_scales[0]["scale"] == pytest.approx(0.5, rel=1e-12)


def test_accumulation_holds_the_sum_and_one_micro_batch_and_a_stale_hook_marks_no_new_entry():
    """coverage: passes on the code before (the feature's, 43b68a4; the code before the feature has no
    per-micro-batch entries to count). An accumulation loop (observe, backward, ...) holds at most two
    group-gradient sets at each observe() (the running sum and the newest micro-batch); a second
    backward through a stepped micro-batch's losses (retain_graph) flips only that old micro-batch's
    flag, never the next step's entry."""
    model, opt, tracker = mlp()
    opt.zero_grad()
    held = []
    for k in range(4):
        x, y, g = rows(3, 40 + k)
        losses = mse_loss(model(x), y)
        tracker.observe(losses, g)
        observed = tracker._observed
        held.append(sum(e["grads"] is not None for e in observed["entries"]) + (observed["grads"] is not None))
        (losses.mean() / 4).backward(retain_graph=k == 3)
    old_flag = tracker._observed["entries"][-1]["backward"]
    opt.step()
    old_flag[0] = False  # (the step has taken it: to see the stale pass set it again)
    assert held == [1, 2, 2, 2] and tracker.gradient_scales[0]["micro_batches"] == 4

    stale = losses
    opt.zero_grad()
    x, y, g = rows(3, 50)
    tracker.observe(mse_loss(model(x), y), g)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # the hook runs before this
        stale.sum().backward()  # through the stepped micro-batch's losses again
    assert old_flag == [True] and [e["backward"][0] for e in tracker._observed["entries"]] == [False]


def test_micro_batches_observed_before_a_load_are_not_part_of_the_loaded_runs_next_step():
    """A state holds no observed micro-batches, but load_state_dict kept those observed before it: here A
    (observed, never backwarded) came back as a dropped micro-batch of the loaded run's next step. Now the
    loaded tracker's next step is the one a fresh tracker loaded from the same state records."""
    x, y, ids = rows(8, 3)
    runs = []
    for observe_first in (False, True):
        model, opt, tracker = mlp()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        saved = tracker.state_dict()
        if observe_first:
            tracker.observe(mse_loss(model(x[:4]), y[:4]), ids[:4])  # A: observed, then the run is rolled back
        model.load_state_dict(state)
        tracker.load_state_dict(saved)
        opt.zero_grad()
        losses = mse_loss(model(x[4:]), y[4:])
        tracker.observe(losses, ids[4:])
        losses.mean().backward()
        opt.step()
        runs.append(tracker)
    assert runs[1].gradient_scales[-1]["dropped_micro_batches"] == 0 and runs[1].skipped_steps == []
    assert runs[1].gradient_scales[-1]["micro_batches"] == 1
    assert torch.equal(runs[0].ledger.contributions, runs[1].ledger.contributions)
