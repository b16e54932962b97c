"""A model holding a parameter of no values (a placeholder ``nn.Parameter(torch.empty(0))``, a layer
sized to zero by a configuration) is tracked on every route: the per-example gradients' chunk size
divided by the parameters' count (0: a ZeroDivisionError) and the group rows' widening loop stepped
by 0 columns (a ValueError), both before any step could be recorded. (The dense route's graph
gradients passed before: coverage beside the three that failed.)"""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


class WithEmptyParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2).to(F64)
        self.empty = nn.Parameter(torch.zeros(0, dtype=F64))

    def forward(self, x):
        return torch.tanh(self.layer(x)) + self.empty.sum()


def loss_fn(outputs, targets):
    return ((outputs - targets) ** 2).sum(dim=1)


@pytest.mark.parametrize("group_state, gradient_route, optimizer", [
    ("dense", "example", lambda p: torch.optim.Adam(p, lr=0.05)),
    ("dense", "graph", lambda p: torch.optim.Adam(p, lr=0.05)),
    ("factored", "example", lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sketched", "example", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
])
def test_a_parameter_of_no_values_is_tracked_and_training_is_unchanged(group_state, gradient_route, optimizer):
    g = torch.Generator().manual_seed(0)
    x, y, probes = (torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64),
                    torch.randn(4, 3, generator=g, dtype=F64))
    torch.manual_seed(0)
    model = WithEmptyParameter()
    torch.manual_seed(0)
    bare = WithEmptyParameter()
    bare_optimizer = optimizer(bare.parameters())
    options = {"gradient_route": gradient_route} if group_state == "dense" else {}
    tracker = PathKernelTracker(model, optimizer(model.parameters()), loss_fn, probes, num_groups=3,
                                group_state=group_state, **options)
    for _ in range(3):
        tracker.step(x, y, torch.arange(6) % 3)
        bare_optimizer.zero_grad()
        loss_fn(bare(x), y).mean().backward()
        bare_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    ledger = tracker.ledger
    with torch.no_grad():
        torch.testing.assert_close(ledger.f_end, model(probes), rtol=0, atol=1e-14)  # the ledger's end is the model's
    assert ledger.steps == 3
    assert ledger.relative_residual() < 1e-2  # the groups' contributions make up the change (midpoint rule)
