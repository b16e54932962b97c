"""An observed loop with gradient clipping whose weight's gradient autograd returns as an expanded view (a
weight summed over in the forward: einsum("bj,pqkj->bk") gives it stride 0 along p and q). The tracker scales
its group rows by the clip factor; in place, such a row raised "more than one element of the written-to tensor
refers to a single memory location" and the step stopped."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker

pytestmark = pytest.mark.usefixtures("one_thread")


class SummedWeight(nn.Module):
    """x [B, 3] -> [B, 2]: a 4-D weight summed over its first two dims (its gradient an expanded view), then tanh."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, 2, 3, dtype=torch.float64) * 0.3)

    def forward(self, x):
        return torch.tanh(torch.einsum("bj,pqkj->bk", x, self.weight))


def test_a_clipped_observed_step_through_an_expanded_gradient_is_recorded_and_trains_as_without_the_tracker():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, 3, generator=g, dtype=torch.float64), torch.randn(4, 8, 2, generator=g, dtype=torch.float64)
    probes = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def run(track):
        torch.manual_seed(1)
        model = SummedWeight()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tracker = PathKernelTracker(model, optimizer, lambda out, t: ((out - t) ** 2).mean(1), probes,
                                    num_groups=2) if track else None
        for k in range(4):
            losses = ((model(x[k]) - y[k]) ** 2).mean(1)
            if tracker is not None:
                tracker.observe(losses, torch.arange(8) % 2)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # active: the rows are scaled
            optimizer.step()
            optimizer.zero_grad()
        return model, tracker

    plain, _ = run(False)
    model, tracker = run(True)
    assert torch.equal(model.weight, plain.weight)
    ledger = tracker.ledger
    assert ledger.steps == 4
    assert all(entry["scale"] < 1 for entry in tracker.gradient_scales)  # every step was clipped
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 1e-2
