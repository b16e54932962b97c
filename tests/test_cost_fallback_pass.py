"""The dense route's fallback parameters' own per-example pass, in the "group gradients" phase (``example_pass``).

When the dense route's ``gradient_route="example"`` reads the training pass (its records fit the budget), the rows
of the parameters no factored block covers (a raw ``nn.Parameter`` used in the forward, a layer the plan leaves out)
come from a vmapped per-example pass of their own (routes.DenseRoute._from_training_pass: engine.gradients'
"example" route over the fallback alone) through the whole model, its chunk sized by the budget to the fallback's
few gradient values (often the whole batch), beside the training records. The estimate's phase held the records and
the rows alone. Measured in a fresh process (tests/peak_rss.py), after a warm-up tracker of the same set-up."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from genkernel.core import cost
from genkernel.core.cost import estimate_cost, hooked_forward_counts
from peak_rss import measure_script

pytestmark = pytest.mark.usefixtures("one_thread")


class Scaled(nn.Module):
    """A conv net whose input is scaled by a raw parameter (3 values: no factored block covers it)."""

    def __init__(self, side: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                                  nn.Tanh(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(32 * (side // 4) ** 2, 4))
        self.scale = nn.Parameter(torch.ones(1, 3, 1, 1))

    def forward(self, x):
        return self.body(x * self.scale)


def test_the_fallbacks_pass_from_its_definition():
    """``example_pass`` = c (EXAMPLE_PASS_ACTIVATIONS · activations + 2 P_fb) bytes + the widened block (float32), c the
    engine's fallback chunk (budget // (3 P_fb bytes), at most the batch), when the training pass is read; none
    without a fallback parameter. Exact arithmetic of the set-up's counts. Before: no ``example_pass`` when the
    training pass is read."""
    torch.manual_seed(0)
    model = Scaled(side=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    probes = (torch.randn(4, 3, 8, 8),)
    acts = hooked_forward_counts(model, (probes[0][:1],), grad=True)[0]
    budget, batch = 64 * 10**6, 16
    assert acts * 4 * batch <= budget  # (the records fit: the training pass is read)
    # (the pass's activations as the engine sizes its chunks: the leaf outputs, or the measured pass where larger)
    from genkernel.core.engine.factors import covering_plan

    measured = cost._pass_measure(model, probes, covering_plan(model, probes).fallback)
    pass_acts = measured.activations
    assert pass_acts >= acts
    read = estimate_cost(model, optimizer, probes, outputs=4, rows=4, gradient_route="example", batch_size=batch,
                         memory_budget=budget)
    chunk = min(budget // (3 * 3 * 4), batch)
    assert read.memory["example_pass"] == (int(chunk * (cost.EXAMPLE_PASS_ACTIVATIONS * pass_acts + 2 * 3) * 4)
                                           + chunk * 3 * 8 + measured.fixed_bytes)
    assert {"example_pass", "training_records"} <= set(read.phases["group gradients"])
    torch.manual_seed(0)
    covered = nn.Sequential(*model.body)  # (the same layers, no raw parameter)
    plain = estimate_cost(covered, torch.optim.Adam(covered.parameters(), lr=1e-3), probes, outputs=4, rows=4,
                          gradient_route="example", batch_size=batch, memory_budget=budget)
    assert "example_pass" not in plain.memory


MEASURE = textwrap.dedent("""
    import gc, json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, "tests")
    from genkernel import PathKernelTracker
    from genkernel.supervised import mse_loss
    from genkernel.core.tracking import routes
    from test_cost_fallback_pass import Scaled

    batch, budget = 32, 64 * 10**6  # the records (24 MB) fit: the training pass is read
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch + 8, 3, 64, 64, generator=g)
    y = torch.randn(2 * batch, 4, generator=g)
    groups = torch.arange(batch) % 4

    def tracked():
        torch.manual_seed(0)
        model = Scaled()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        return model, optimizer, PathKernelTracker(model, optimizer, mse_loss, x[-8:], num_groups=4, batch_size=batch,
                                                   group_state="dense", gradient_route="example", memory_budget=budget,
                                                   memory_check="warn")

    warm = tracked()  # (a fresh process's one-time growth)
    warm[2].step(x[:batch], y[:batch], groups)
    del warm
    base = rss_after_bare_step(lambda: (torch.manual_seed(0), Scaled())[1], mse_loss, x[:batch], y[:batch])
    model, optimizer, tracker = tracked()
    peak = {}
    gradients = routes.DenseRoute.gradients

    def measured(self, *args, **kwargs):
        reset_peak()
        out = gradients(self, *args, **kwargs)
        peak["call"] = rss()["VmHWM"] - base
        return out

    tracker.step(x[:batch], y[:batch], groups)
    routes.DenseRoute.gradients = measured
    gc.collect()
    tracker.step(x[batch:2 * batch], y[batch:2 * batch], groups)
    c = tracker.cost
    held = c.total_bytes - c.existing_bytes - max(c.phase_bytes().values())
    print(json.dumps({"call": peak["call"], "counted": held + c.phase_bytes()["group gradients"],
                      "pass": c.memory.get("example_pass", 0)}))
""")


@pytest.mark.slow
def test_the_group_gradients_phase_covers_the_gradients_calls_peak():
    """The parts held throughout and the "group gradients" phase (records, rows, the fallback's pass over the batch
    of 32) within [0.8, 1.2] of the peak resident memory during the route's gradients call, above the process after
    a bare step. Measured after: 1.12 (66.4 MiB for 59.3); before, 0.54 (31.9: the pass, 29.6 MiB of the call's
    growth, uncounted)."""
    measured = measure_script(MEASURE)
    assert measured["call"] > 40 * 2**20  # (far above the process's noise)
    assert 0.8 <= measured["counted"] / measured["call"] <= 1.2, measured
    assert measured["pass"] > 0
