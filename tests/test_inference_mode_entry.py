"""Entry points that measure and remember (the covering plan, the cost estimate's measures, a tracker's
construction), called under ``torch.inference_mode`` (a Lightning validation loop, an evaluation script) with
tensors made there.

Fails on the old code: the covering check's passes could not record a graph there, so every block moved to the
torch.func fallback and that outcome was remembered for the model: a later call outside inference mode got a plan
with no factored block (the factored route silently the slow one), and the estimate's measures (taken as failed)
were kept for every model of the architecture: 55840 bytes estimated instead of 58432."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from genkernel.core import push_memory
from genkernel.core.cost import estimate_cost
from genkernel.core.engine import factors
from genkernel.core.engine.factors import covering_plan
from genkernel.core.tracking import PathKernelTracker


pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(outputs=1, rows=2, group_state="factored", gradient_route="factored")


@pytest.fixture
def fresh_memory(monkeypatch):
    """Nothing remembered: the process's measures and plans as a new process has them."""
    monkeypatch.setattr(push_memory, "_MEASURED", OrderedDict())
    monkeypatch.setattr(factors, "_COVERED", type(factors._COVERED)())


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1)).double()
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    probes = (torch.randn(4, 1, 6, 6, dtype=torch.float64),)
    return model, x, y, probes, torch.optim.SGD(model.parameters(), lr=0.1)


def _loss(out, target):
    return ((out - target) ** 2).squeeze(1)


def _made_in_inference_mode(*tensors):
    with torch.inference_mode():
        return tuple(t.clone() for t in tensors)


@pytest.mark.parametrize("entry", ["covering_plan", "estimate_cost", "tracker"])
def test_an_entry_point_called_under_inference_mode_remembers_what_a_call_outside_it_would(entry, fresh_memory):
    model, x, y, probes, optimizer = _setup()
    reference = estimate_cost(model, optimizer, probes, **KW)
    plan = [b.name for b in covering_plan(model, (x,)).blocks]
    assert plan == ["0", "3"]

    push_memory._MEASURED.clear()
    factors._COVERED.clear()
    x_inf, probe_inf = _made_in_inference_mode(x, probes[0])
    with torch.inference_mode():
        if entry == "covering_plan":
            assert [b.name for b in covering_plan(model, (x_inf,)).blocks] == plan
        elif entry == "estimate_cost":
            assert estimate_cost(model, optimizer, (probe_inf,), **KW).memory == reference.memory
        else:
            PathKernelTracker(model, optimizer, _loss, (probe_inf,), num_groups=2, group_state="factored")
    assert [b.name for b in covering_plan(model, (x,)).blocks] == plan
    again = estimate_cost(model, optimizer, probes, **KW)
    assert again.memory == reference.memory and again.work == reference.work


def test_a_tracker_built_under_inference_mode_keeps_the_factored_route_and_an_exact_ledger(fresh_memory):
    model, x, y, probes, optimizer = _setup()
    (probe_inf,) = _made_in_inference_mode(probes[0])
    with torch.inference_mode():
        tracker = PathKernelTracker(model, optimizer, _loss, (probe_inf,), num_groups=2, group_state="factored")
    before = model(probes[0]).detach()
    for _ in range(2):
        tracker.step(x, y, torch.arange(8) % 2)
    assert [b.name for b in covering_plan(model, (x,)).blocks] == ["0", "3"]
    ledger = tracker.ledger
    delta = model(probes[0]).detach() - before
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(ledger.delta, delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12)
    assert float(ledger.residual.abs().max()) < 1e-3 * float(delta.abs().max())
