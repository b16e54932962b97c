"""A graph that runs some layers in bfloat16 and others in float16 (nested autocast regions in the
model's forward) carries bfloat16's rounding: the observed step is checked, and reported, at the
coarser of the two precisions, whichever layer comes last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.adapter import low_precision_in_graph

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoPrecisions(nn.Module):
    """Linear → tanh → Linear, the first layer under autocast to ``first``, the second to ``second``."""

    def __init__(self, first: torch.dtype, second: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = nn.Linear(6, 32), nn.Linear(32, 3)
        self.first, self.second = first, second

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.first):
            h = torch.tanh(self.inner(x))
        with torch.autocast("cpu", dtype=self.second):
            return self.outer(h).float()


@pytest.mark.parametrize("first, second", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_a_graph_mixing_half_precisions_reports_the_coarser_in_either_order(first, second):
    model = TwoPrecisions(first, second)
    loss = model(torch.randn(4, 6)).pow(2).sum()
    assert low_precision_in_graph(loss) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        only_fp16 = nn.Linear(6, 3)(torch.randn(4, 6)).float().sum()
    assert low_precision_in_graph(only_fp16) == torch.float16
    assert low_precision_in_graph(torch.randn(3, requires_grad=True).sum()) is None


@pytest.mark.parametrize("first, second", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_an_observed_loop_mixing_half_precisions_is_booked_at_bfloat16(first, second):
    """Each step is booked at bfloat16 (old code: float16 where the float16 layer came last, a check 8× too
    tight for the bfloat16 layer's rounding) and the identity closes."""
    model = TwoPrecisions(first, second)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y, probes = torch.randn(48, 6, generator=g), torch.randn(48, 3, generator=g), torch.randn(5, 6, generator=g)
    tracker = PathKernelTracker(model, optimizer, lambda out, t: ((out - t) ** 2).mean(dim=1), probes, num_groups=4,
                                mixed_precision="observe")
    for k in range(3):
        rows = slice(16 * k, 16 * (k + 1))
        losses = ((model(x[rows]) - y[rows]) ** 2).mean(dim=1)
        tracker.observe(losses, torch.arange(16) % 4)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tracker.close()
    assert [e["gradient_precision"] for e in tracker.gradient_scales] == ["bfloat16"] * 3
    ledger = tracker.ledger
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)
