"""Gradient checks at float64's far scales: norms formed from squares overflowed past about 1.3e154 (and
underflowed below 1.5e-154). The observed loop's fitted scale read a finite gradient as "not finite", and a check
of a gap against ``rtol × inf`` passed any gap: a loop weighting its micro-batches unlike the observed means was
accepted with a 17.5 % residual once the first was mended. ``reference.norm_of`` forms every such norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.engine.reference import norm_of
from genkernel.core.errors import LedgerCheckError

F64 = torch.float64


def _observed_run(scale: float, weighted_alike: bool):
    """Two observed micro-batches (8 and 4 examples) of a float64 linear model whose per-example losses are its
    output times ``scale`` (gradients of that size; the learning rate 1e-2 / scale, so the parameters move alike at
    every scale), each micro-batch's loss its mean (``weighted_alike``) or its sum. Returns the tracker."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2 / scale)

    def loss_fn(out, _):
        return out.reshape(-1) * scale

    tracker = PathKernelTracker(model, optimizer, loss_fn, torch.randn(5, 4, dtype=F64), num_groups=3)
    x, groups = torch.randn(12, 4, dtype=F64), torch.arange(12) % 3
    for rows in (slice(0, 8), slice(8, 12)):
        losses = loss_fn(model(x[rows]), None)
        tracker.observe(losses, groups[rows])
        (losses.mean() / 2 if weighted_alike else losses.sum()).backward()
    optimizer.step()
    optimizer.zero_grad()
    return tracker


@pytest.mark.parametrize("scale", [1e160, 1e-160])
def test_an_observed_step_at_a_far_scale_books_what_it_books_at_scale_one(scale):
    """Fails on the old code at 1e160: NonFiniteError, "the optimizer's gradient is not finite" (the fitted scale's
    dot product overflowed); at 1e-160 the products underflowed and the scale read 1.0 (refused as not adding up)."""
    reference, far = _observed_run(1.0, True), _observed_run(scale, True)
    assert far.ledger.steps == 1
    torch.testing.assert_close(far.ledger.contributions, reference.ledger.contributions, rtol=1e-10, atol=1e-14)
    assert far.ledger.relative_residual() < 1e-12


@pytest.mark.parametrize("scale", [1.0, 1e160, 1e-160])
def test_micro_batches_weighted_unlike_their_observed_means_are_refused_at_every_scale(scale):
    """losses.sum() over micro-batches of 8 and 4 is no scalar times the observed means' sum. Fails on the old code
    at 1e160 (refused as a non-finite gradient, naming a GradScaler) and, with the fitted scale alone mended, it
    was accepted: the check's scale was inf and any gap passed."""
    with pytest.raises(LedgerCheckError, match="do not add up to the real gradient"):
        _observed_run(scale, False)


def test_norm_of_agrees_with_a_hypot_brute_force_from_1e_minus_300_to_1e300():
    """Fails on the old code: there was no such function (coverage of the helper the checks now share)."""
    generator = torch.Generator().manual_seed(1)
    for exponent in (-300, -200, -160, -100, 0, 100, 160, 200, 300):
        t = torch.randn(7, 3, generator=generator, dtype=F64) * 10.0 ** exponent
        expected = math.hypot(*t.reshape(-1).tolist())
        assert norm_of(t) == pytest.approx(expected, rel=1e-14), exponent
    assert norm_of(torch.zeros(5, dtype=F64)) == 0.0
    assert norm_of(torch.tensor([1e300, float("inf")], dtype=F64)) == math.inf
    assert math.isnan(norm_of(torch.tensor([1.0, float("nan")], dtype=F64)))
    assert norm_of(torch.tensor([3e-320, 4e-320], dtype=F64)) == pytest.approx(5e-320, rel=1e-3)  # (subnormal)
