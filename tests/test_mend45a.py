"""Mends of session 45 (helper "mend45a"): three faults of the cost estimate and the engine's measures.

1. The witnesses of an observed half-precision step (mixed_precision="observe"): the estimate counted float16's worst
   case, 5 parameter copies and 3 backward passes, for every tracker; bfloat16's one seed scale holds at most 3 and
   runs 2 (measured here from the tracker's own arrays). A tracker built under a bfloat16 autocast counts bfloat16's;
   one whose half precision is not known at construction keeps float16's, the larger.
2. A model whose probes couple in plain operations (a centering ``h - h.mean(0) / 2``, found by the tracker's forward
   check): its pushes run all the probes in one pass (routes.probes_coupled) but the estimate decided by module type
   alone and counted chunked pushes, about 3x under the peak they hold. The estimate now takes the pushes' decision.
3. The engine's example-pass measure and the factored route's chunk peaks: a measuring pass that raised (a passing
   failure: a user's hook, an interrupted pass) left its fallback kept for the model (the engine's cache, the
   estimate's per-architecture measures), so every later call in the process planned other chunks than a fresh
   process does. Not kept now, as commit 7842a4d did for the graph-row and training-pass measures.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core import cost, push_memory
from genkernel.core.adapter import analysis_mode, functional_model
from genkernel.core.engine import gradients
from genkernel.core.param_bytes import parameter_bytes
from genkernel.core.push_memory import LiveBytes
from genkernel.core.tracking.routes import probes_coupled, push_rows
from test_witness44 import G, _batch, _witness_bytes
from test_bf16fix43 import LR, _net, _probes

pytestmark = pytest.mark.usefixtures("one_thread")


# -- 1. the witnesses bfloat16 holds ----------------------------------------------------------------------------------

def _witness_peak(tracker, net, dtype, scales, sizes=(6, 4, 2)):
    """One observed SGD step of micro-batches of ``sizes`` under ``dtype`` autocast, each backward losses.mean() times
    its scale: ``(peak, passes)``, the witnesses held at once (their distinct storages, read after each observe() and
    inside each loop backward, as tests/test_witness44.py reads them) and the backward passes through each
    micro-batch's losses besides the group rows' and the loop's own."""
    peak, passes = [0], []
    next(net.parameters()).register_post_accumulate_grad_hook(
        lambda p: peak.__setitem__(0, max(peak[0], _witness_bytes(tracker))))
    for k, (b, scale) in enumerate(zip(sizes, scales)):
        x, noise, t = _batch(b, k)
        with torch.autocast("cpu", dtype=dtype):
            losses = ((net(x, t) - noise) ** 2).mean(dim=1)
        fired = []
        losses.register_hook(lambda g: fired.append(1))
        tracker.observe(losses, torch.arange(b) % G)
        peak[0] = max(peak[0], _witness_bytes(tracker))
        (losses.mean() * scale).backward()
        passes.append(len(fired) - 2)
    return peak[0], passes


def test_a_tracker_built_under_bfloat16_autocast_counts_the_three_witnesses_bfloat16_holds():
    """bfloat16 autocast, micro-batches of 6, 4, 2 seeded / 2, then / 2 · (1 + 1e-6) twice (float16's worst case,
    tests/test_witness44.py: a power of two, then a seed no power of two times c_n): the witnesses held at once peak
    at 3 parameter copies and 2 backward passes a micro-batch; a tracker built under that autocast counts exactly
    those (``witnesses`` 3 copies, ``work['witnesses']`` 2 bare backward passes); one built outside any autocast,
    its half precision unknown, keeps float16's 5 and 3, never under either peak (cost.witness_counts).

    Fails on the old code: the estimate under bfloat16 autocast counted 5 copies and 3 passes."""
    odd = 0.5 * (1 + 1e-6)
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracker = PathKernelTracker(net, optimizer, None, _probes(), num_groups=G, mixed_precision="observe")
    p_bytes = parameter_bytes(list(net.parameters()))
    peak, passes = _witness_peak(tracker, net, torch.bfloat16, [0.5, odd, odd])
    optimizer.step()
    assert tracker.ledger.steps == 1
    assert peak == 3 * p_bytes and max(passes) == 2
    estimate = tracker.cost
    assert estimate.memory["witnesses"] == 3 * p_bytes
    assert estimate.work["witnesses"] == 2 * (estimate.bare_step - estimate.settings["batch"])
    other = _net()
    unknown = PathKernelTracker(other, torch.optim.SGD(other.parameters(), lr=LR), None, _probes(), num_groups=G,
                                mixed_precision="observe").cost
    assert unknown.memory["witnesses"] == 5 * p_bytes
    assert unknown.work["witnesses"] == 3 * (unknown.bare_step - unknown.settings["batch"])
    assert cost.witness_counts(None) == cost.witness_counts(torch.float16) == (5, 3)
    with pytest.raises(ValueError, match="torch.float16, torch.bfloat16 or None"):
        cost.witness_counts(torch.float32)


# -- 2. probes coupled in plain operations ----------------------------------------------------------------------------

class _HalfCenter(nn.Module):
    """h - mean(h) / 2 over the batch in plain operations: coupled in eval mode too, no module type says so."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True) / 2


def _center_conv(center=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _HalfCenter() if center else nn.Identity(), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 4))


def _mse(outputs, targets):
    return ((outputs - targets) ** 2).mean(1)


@pytest.mark.parametrize("route, budget", [("jvp", 2**16), ("jacobian", 2**26)])
def test_a_centering_models_pushes_are_estimated_as_the_one_pass_of_all_probes_they_run(route, budget):
    """A conv net with a centering layer in plain operations, 8 probes: the tracker's forward check finds it, its
    pushes run all the probes together (routes.probes_coupled), and the live storages of its own push of three rows
    (LiveBytes around push_rows, as tests/test_mend42b.py measures BatchNorm's) are within the estimate's
    ``probe_pushes`` and at least half of it; an estimate made without a tracker (estimate_cost alone) decides the
    same (cost.probes_couple) and counts as much; the same net without the layer keeps its smaller estimate.

    Fails on the old code: the estimate counted the pushes chunked, 3.07x (JVP, a 64 KiB budget: 863 312 bytes held
    for 281 434) and 2.97x (Jacobians: 15.2 MB for 5.1) under what they hold."""
    probes = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    estimates = {}
    for center in (False, True):
        model = _center_conv(center)
        tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=1e-3), _mse, probes,
                                    num_groups=2, memory_budget=budget, contribution_route=route)
        estimates[center] = tracker.cost.memory["probe_pushes"]
    tracked = tracker._tracked  # (the centering one, ``model``, measured)
    gen = torch.Generator().manual_seed(4)
    rows = {n: torch.randn((3, *p.shape), generator=gen) for n, p in tracked.params.items()}  # R + 1 rows
    theta = {n: p.detach() for n, p in tracked.params.items()}
    with torch.no_grad(), analysis_mode(model):
        assert probes_coupled(tracked)
        with LiveBytes((*rows.values(), *theta.values(), probes)) as live:
            push_rows(tracked, rows, [(1.0, theta)], route=route)
    assert 0.5 * estimates[True] <= live.peak <= estimates[True]
    alone = cost.estimate_cost(model, torch.optim.Adam(model.parameters(), lr=1e-3), (probes,), outputs=4, rows=2,
                               memory_budget=budget, contribution_route=route, device="cpu",
                               push_memory=tracked.push_memory)
    assert alone.memory["probe_pushes"] == estimates[True]
    assert estimates[False] < estimates[True]


# -- 3. a failed measure is not kept ----------------------------------------------------------------------------------

FAIL = {"at": None}


class _FailsOnce(nn.Module):
    """A small conv net after plain operations, whose forward raises once, at the forward ``FAIL["at"]`` counts down
    to (module-level, so the architecture key and the engine's module signature are the same before and after)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))

    def forward(self, x):
        if FAIL["at"] is not None:
            FAIL["at"] -= 1
            if FAIL["at"] < 0:
                FAIL["at"] = None
                raise RuntimeError("a passing failure")
        # (an outer product in plain operations, no leaf module's output: the measured pass holds more than the leaf
        # outputs count)
        h = x.flatten(1)
        return self.net((h + (h[:, :, None] * h[:, None, :]).tanh().mean(2)).view_as(x))


def _fails_once():
    torch.manual_seed(0)
    return _FailsOnce(), (torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1)),)


def test_an_example_pass_measure_that_raised_is_measured_again_by_the_next_call():
    """engine.gradients.example_pass_measure, its measured pass raising once (the leaf-output count before it runs):
    that call gives the leaf outputs alone (fewer activations than the pass holds: an outer product in plain
    operations), the next one measures, as a fresh cache does.

    Fails on the old code: the fallback was kept and returned again (867 activations an example for 5553)."""
    model, probes = _fails_once()
    params = {n: p.detach() for n, p in model.named_parameters()}
    forward = functional_model(model, None, flatten=False)

    def measure():
        return gradients.example_pass_measure(model, forward, params, tuple(t[:1] for t in probes))

    FAIL["at"] = 1  # (the leaf outputs' forward passes, the measured pass raises)
    failed = measure()
    again = measure()
    gradients._ACTIVATIONS.pop(model, None)
    fresh = measure()
    assert fresh.activations > failed.activations and failed.fixed_bytes == 0
    assert again == fresh


def test_a_factored_chunk_measure_that_raised_is_taken_again_by_the_next_estimate():
    """cost.factored_chunk_bytes (engine.gradients.factored_chunk_peaks per architecture), its pass raising once:
    (0, 0) for that call, the next one measures, as a fresh process does; a measure that succeeded is kept.

    Fails on the old code: the (0, 0) was kept for the architecture and returned again."""
    model, probes = _fails_once()
    push_memory._MEASURED.clear()
    FAIL["at"] = 0
    assert cost.factored_chunk_bytes(model, probes, 4, 1) == (0, 0)
    again = cost.factored_chunk_bytes(model, probes, 4, 1)
    push_memory._MEASURED.clear()
    fresh = cost.factored_chunk_bytes(model, probes, 4, 1)
    assert fresh[0] > 0 and again == fresh
    assert any(kind == "factored chunks" for kind, _ in push_memory._MEASURED)


def test_a_tracker_built_under_bfloat16_whose_loop_runs_float16_counts_float16s_witnesses_from_its_first_step():
    """Built under a bfloat16 autocast (3 witness copies counted), the loop then runs float16 (micro-batches of 6, 4,
    2, float16's worst case of seeds): the witnesses held peak at 5 parameter copies and 3 passes, and the estimate
    after the first step counts those (tracker.cost, made again at the first step from the precision observed); a
    loop that runs bfloat16 as the construction's keeps 3.

    Fails on the old code: the estimate stayed at 3 copies and 2 passes, under the measured peak (read45)."""
    odd = 0.5 * (1 + 1e-6)
    p_bytes = None
    for loop, copies, passes_counted in ((torch.float16, 5, 3), (torch.bfloat16, 3, 2)):
        net = _net()
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tracker = PathKernelTracker(net, optimizer, None, _probes(), num_groups=G, mixed_precision="observe")
        p_bytes = parameter_bytes(list(net.parameters()))
        assert tracker.cost.memory["witnesses"] == 3 * p_bytes
        peak, passes = _witness_peak(tracker, net, loop, [0.5, odd, odd])
        optimizer.step()
        assert tracker.ledger.steps == 1
        assert peak == copies * p_bytes and max(passes) == passes_counted
        estimate = tracker.cost
        assert estimate.memory["witnesses"] == copies * p_bytes
        assert estimate.work["witnesses"] == passes_counted * (estimate.bare_step - estimate.settings["batch"])
    assert peak == 3 * p_bytes  # (the bfloat16 loop's own peak: the construction's count was right)
