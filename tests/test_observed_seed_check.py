"""An observed loop's per-example weights are checked through the seed its backward hands the observed losses in
full precision too (tracker._check_seeds), not only in half precision.

Before: where the trainable parameters' per-example gradients span one direction (a scalar temperature over a frozen
body), any weighting of the examples gives a gradient parallel to the observed sum, and the gradient check cannot see
a loop that weighs a class 0.1 while observe() is told the plain mean: group 1 was credited 0.339 of the change for a
true 0.050, the residual 5e-17, nothing raised."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class Temperature(nn.Module):
    """A frozen body scaled by one trainable scalar: every per-example gradient is a multiple of one direction."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64).requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=F64))

    def forward(self, x):
        return self.scale * self.body(x)


def setting():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
    groups = torch.arange(8) % 2
    model = Temperature()
    optimizer = torch.optim.SGD([model.scale], lr=0.1)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(4, 3, generator=g, dtype=F64), num_groups=2)
    return model, optimizer, tracker, x, y, groups


def test_a_loop_weighing_its_examples_otherwise_than_observed_is_refused_in_full_precision():
    """The loop weighs group 1 by 0.1, observe() is told the plain mean: the step is refused naming the seed, and
    the parameter, the optimizer's state and the ledger are as before it."""
    model, optimizer, tracker, x, y, groups = setting()
    losses = mse_loss(model(x), y)
    tracker.observe(losses, groups)
    weights = torch.where(groups == 1, 0.1, 1.0).to(F64) / 8
    (weights * losses).sum().backward()
    before = model.scale.detach().clone()
    with pytest.raises(LedgerCheckError, match="seed .*off every multiple of the coefficients"):
        optimizer.step()
    assert torch.equal(model.scale, before) and tracker.ledger.steps == 0


def test_the_same_loop_observed_with_its_own_weights_is_recorded_exactly():
    """coverage: told the loop's weights (weights=), the step is recorded; its groups' contributions are the
    brute-force ones: each group's share of the update, pushed through the midpoint's Jacobian (the output is
    linear in the scale, so the midpoint rule is exact)."""
    model, optimizer, tracker, x, y, groups = setting()
    weights = torch.where(groups == 1, 0.1, 1.0).to(F64) / 8
    losses = mse_loss(model(x), y)
    tracker.observe(losses, groups, weights=weights)
    shares = [torch.autograd.grad((weights * losses * (groups == g)).sum(), model.scale, retain_graph=True)[0]
              for g in range(2)]
    (weights * losses).sum().backward()
    optimizer.step()
    probes = tracker.probes[0]
    with torch.no_grad():
        body = model.body(probes)
    for g in range(2):
        torch.testing.assert_close(tracker.ledger.contributions[:, g], -0.1 * shares[g] * body, rtol=1e-12, atol=1e-14)
