"""Review of owned steps under autocast (``OptimizerStep(autocast_dtype=)``, trainers' ``mixed_precision="bf16"``,
trackers built with ``mixed_precision="observe"``): what the step's ``gradient_scales`` entry reports against the
entry an observed loop running the same forward, loss and backward reports; a float16 owned step whose gradient
underflows (no GradScaler) refused with the cause and the fix; and, as coverage, the caller's ``with
torch.autocast`` giving the same ledger as the step's own ``autocast_dtype``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel import OptimizerStep, PathKernelTracker
from genkernel.core.errors import LedgerCheckError

pytestmark = pytest.mark.usefixtures("one_thread")

B, G = 8, 4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _data(steps=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(steps * B, 5, generator=g), torch.randn(steps * B, 2, generator=g),
            torch.randn(6, 5, generator=g))


def _loss(out, target):
    return ((out.float() - target) ** 2).mean(dim=1)


def test_an_owned_micro_batched_steps_scale_entry_reads_as_the_observed_loops():
    """test_mixed_precision's loop (two micro-batches of B, each its mean / 2, clipped, bfloat16 autocast) observed,
    and the same step owned (OptimizerStep(micro_batches=2, autocast_dtype=bfloat16) over the 2B rows): the same
    parameters bit for bit, and the same ``scale_times_micro_batches`` (the clip factor of a loop that averages its
    micro-batches: test_observe asserts it is at most 1, test_integrations reads a value under 1 as clipping that
    acted). The old code wrote clip × K for the owned step (2 × 0.653 = 1.305 where the observed loop reads 0.653, 2.0
    unclipped), which reads as a loop that summed its micro-batch means without dividing by K."""
    from test_mixed_precision import B as LOOP_B, MAX_NORM, STEPS, _data as loop_data, _loop, _model

    _, observed = _loop(torch.bfloat16, dict(mixed_precision="observe", max_grad_norm=MAX_NORM))
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y, probes = loop_data()
    tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=4, max_grad_norm=MAX_NORM,
                                mixed_precision="observe")
    for k in range(STEPS):
        rows = slice(2 * k * LOOP_B, 2 * (k + 1) * LOOP_B)
        tracker.track(OptimizerStep(model, optimizer, _loss, x[rows], y[rows], micro_batches=2,
                                    max_grad_norm=MAX_NORM, autocast_dtype=torch.bfloat16), torch.arange(2 * LOOP_B) % 4)
    assert all(torch.equal(a, b) for a, b in zip(observed.model.parameters(), model.parameters()))
    ours = [e["scale_times_micro_batches"] for e in tracker.gradient_scales]
    theirs = [e["scale_times_micro_batches"] for e in observed.gradient_scales]
    assert any(t < 1 for t in theirs)  # clipping acted (the observed loop's reading)
    assert ours == [pytest.approx(t, rel=torch.finfo(torch.bfloat16).eps) for t in theirs]
    assert all(0 < s <= 1 + 1e-12 for s in ours)


def test_a_float16_owned_step_whose_gradient_underflows_is_refused_naming_the_underflow_and_the_fix():
    """An owned float16 step (no GradScaler: OptimizerStep has none) whose loss is so small that every gradient
    entry underflows to 0 in the step's own backward (loss × 1e-7: the weight gradients are ~1e-8, under float16's
    smallest subnormal 6e-8), while the groups' rows, taken with the losses scaled up, are not: refused before the
    update, the model as it was, and the message names the float16 underflow and the fix (bfloat16, or a loss
    scaled up). The old code said only "the group gradients of '0.weight' do not add up to the real gradient (gap
    5.6e-08, scale 7.0e-08)", which reads as a tracker fault."""
    x, y, probes = _data(1)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e6)

    def tiny(out, target):
        return 1e-7 * ((out.float() - target) ** 2).mean(dim=1)

    tracker = PathKernelTracker(model, optimizer, tiny, probes, num_groups=G, mixed_precision="observe")
    step = OptimizerStep(model, optimizer, tiny, x, y, autocast_dtype=torch.float16)
    with pytest.raises(LedgerCheckError, match=r"(?s)underflow.*float16.*bfloat16"):
        tracker.track(step, torch.arange(B) % G)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and tracker.ledger.steps == 0
    assert not step.applied


def test_the_callers_autocast_books_the_same_ledger_as_the_steps_own_autocast_dtype():
    """coverage: passes on the code before. Weighted owned steps (weights=, micro_batches=2) run inside the caller's
    ``with torch.autocast("cpu", dtype=bfloat16)`` and as OptimizerStep(autocast_dtype=bfloat16) outside it: the same
    parameters, and the same ledger bit for bit (the tracker's own probe, contribution and check passes run in
    float32 in both: the caller's autocast reaches only the step's forward), each step booked in bfloat16, the
    identity closed (measured 0.0), the relative residual the rounding's (measured 1e-3)."""
    x, y, probes = _data(2)
    weights = torch.rand(2 * B, generator=torch.Generator().manual_seed(3))
    runs = []
    for inside in (True, False):
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=G, mixed_precision="observe")
        for k in range(2):
            rows = slice(k * B, (k + 1) * B)
            step = OptimizerStep(model, optimizer, _loss, x[rows], y[rows], weights[rows], micro_batches=2,
                                 autocast_dtype=None if inside else torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                tracker.track(step, torch.arange(B) % G)
        runs.append((model, tracker))
    (m1, t1), (m2, t2) = runs
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    for name in ("delta", "contributions", "rest", "residual"):
        assert torch.equal(getattr(t1.ledger, name), getattr(t2.ledger, name)), name
    ledger = t1.ledger
    assert [e["gradient_precision"] for e in t1.gradient_scales] == ["bfloat16"] * 2
    assert float((ledger.delta - ledger.contributions.sum(1) - ledger.rest - ledger.residual).abs().max()) < 1e-12
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 1e-2
