"""A cost measure that raised is not kept for the architecture: a passing failure of one pass (a user's hook, an
interrupted forward) gave 0.0 to every later estimate of the same architecture in the process, and with it other
chunk sizes than a fresh process plans (a resumed run's kernel record moved 1e-7 from the uninterrupted one's)."""

from __future__ import annotations

import torch
from torch import nn

from genkernel.core import cost, push_memory

FAIL = {"next": False}


class FailsOnce(nn.Module):
    """An MLP whose forward raises once when ``FAIL["next"]`` is set (module-level, so the architecture key, which
    reads the modules' own attributes, is the same before and after)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x):
        if FAIL["next"]:
            FAIL["next"] = False
            raise RuntimeError("a passing failure")
        return self.net(x)


def test_a_graph_row_measure_that_raised_is_taken_again_by_the_next_estimate():
    """Fails on the old code: the second measure returns the kept 0.0."""
    push_memory._MEASURED.clear()
    torch.manual_seed(0)
    model, probes = FailsOnce(), (torch.randn(4, 6),)
    FAIL["next"] = True
    assert cost.graph_row_bytes(model, probes) == 0.0  # the failed measure: the count alone
    again = cost.graph_row_bytes(model, probes)
    push_memory._MEASURED.clear()
    fresh = cost.graph_row_bytes(model, probes)
    assert fresh > 0.0 and again == fresh
    assert any(kind == "graph row" for kind, _ in push_memory._MEASURED)  # (a measure that succeeded is kept)
