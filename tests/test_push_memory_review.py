"""Second read of core.push_memory (the JVP pass measured at the tracker's construction): what LiveBytes counts,
and whether the measure, extrapolated to the passes the tracker runs, bounds what they hold (an independent
reference: the CPU allocator's own events under torch.profiler, every allocation and free, a kernel's workspace
included)."""

import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from genkernel.core.adapter import analysis_mode
from genkernel.core.cost import activation_elements, push_pass_bytes, push_pass_shape
from genkernel.core.push_memory import LiveBytes, measure_push_memory
from genkernel.core.tracking.routes import _jvp_rows


@pytest.fixture(autouse=True)
def fresh_measures(monkeypatch):
    """Every test measures its models afresh (the measures kept per process would answer a model seen before)."""
    from collections import OrderedDict

    from genkernel.core import push_memory

    monkeypatch.setattr(push_memory, "_MEASURED", OrderedDict())


def _profiled_peak(fn) -> int:
    """Peak bytes the CPU allocator held at once during ``fn()`` above what it held before (torch.profiler's
    memory events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _frozen_mlp(m):
    """Two frozen Linear layers (5.2M weights, 21 MB) before a trained head: the pass's tangents start at the head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 10))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    return model, (torch.randn(m, 512, generator=torch.Generator().manual_seed(1)),)


class _Adapted(nn.Module):
    """A trained adapter before a frozen [256, 4096] weight (4 MB): forward-mode AD through ``x @ w`` with a
    tangent on x alone materializes a zero tangent of w, once a pass whatever its probes and rows."""

    def __init__(self):
        super().__init__()
        self.adapter = nn.Linear(256, 256)
        self.w = nn.Parameter(torch.randn(256, 4096) * 0.01, requires_grad=False)
        self.head = nn.Linear(4096, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.adapter(x) @ self.w))


def _setup(model, probes):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with analysis_mode(model):
        record = activation_elements(model, tuple(t[:1] for t in probes)) * 4
    return params, record, measure_push_memory(model, params, probes, record)


def _real_pass(model, probes, params, record, push, budget):
    """(rows, chunk, peak bytes of the tracker's own _jvp_rows at the shape the budget picks, as the profiler
    sees them, the tangents made before)."""
    rows, chunk = push_pass_shape(budget, probes[0].shape[0], record, push)
    theta = {n: p.detach() for n, p in params.items()}
    tangents = {n: torch.randn(rows, *p.shape, generator=torch.Generator().manual_seed(2)) for n, p in theta.items()}
    tracked = types.SimpleNamespace(module=model, probes=probes, memory_budget=budget, record_bytes=record,
                                    push_memory=push)

    def run():
        with torch.no_grad(), analysis_mode(model):
            _jvp_rows(tracked, theta, tangents, rows)

    return rows, chunk, _profiled_peak(run)


def test_a_view_or_an_in_place_op_on_a_tensor_made_before_holds_nothing_new():
    """A storage an operation is given and no operation inside made (a frozen weight F.linear transposes, a buffer
    updated in place) was there before: only the new product's 4000 bytes count. Before: 8400, the weight's 4000
    bytes when its transpose was taken (as for every frozen Linear of a pass) and the buffer's 400 when added to."""
    weight, buffer = torch.ones(10, 100), torch.zeros(100)  # made before, not named as existing
    with LiveBytes() as live:
        transposed = weight.t()
        buffer.add_(1)
        product = transposed * 2  # 4000 bytes, the only new storage
    assert live.peak == 4000 and live.current == 4000
    del transposed, product


def test_a_storage_resized_in_place_counts_at_its_new_size():
    """A storage made inside and grown by resize_ (what an out= variant does to an empty output) holds its new
    size. Before: the 0 bytes it had when made (peak 0 for 4000 bytes held)."""
    with LiveBytes() as live:
        grown = torch.empty(0)
        grown.resize_(1000)
    assert live.peak == 4000
    del grown


def test_frozen_layers_are_not_counted_as_what_a_pass_holds():
    """On frozen layers before a trained head, 64 probes: at a budget the measure gives 4 rows through every probe,
    the pass holds (the allocator's events) more than a third of what is counted for it and at most all of it; at
    the default budget every row goes through every probe in one pass. Before: each frozen weight's transpose was
    counted as the pass's own (21 MB at 2 probes: a primal 400 times the probes' activations), 840 MB counted
    for a pass that held 1.1 MB, and at 256 MiB 22 rows went in 88 passes of one row through 20 probes."""
    model, probes = _frozen_mlp(64)
    params, record, push = _setup(model, probes)
    budget = int(64 * record * (push.primal + 4 * push.row)) + 1
    rows, chunk, peak = _real_pass(model, probes, params, record, push, budget)
    counted = push_pass_bytes(0, 4, rows, chunk * record, push)
    assert (rows, chunk) == (4, 64)
    assert counted / 3 < peak <= counted
    rows, chunk = push_pass_shape(256 * 2**20, 64, record, push)
    assert rows >= 22 and chunk == 64


def test_a_pass_through_one_probe_holds_no_more_than_is_counted():
    """coverage: passes before (where each frozen weight's transpose was counted, which happened to cover it); fails
    with the view fix alone (1.2-1.6 times the counted bytes). A zero tangent of a frozen weight after a trained
    adapter is held once a pass: a pass of one row through one probe (a budget below two probes' pass) holds at most
    what push_pass_bytes counts for it, the pass's parameter copy included."""
    torch.manual_seed(0)
    model = _Adapted()
    probes = (torch.randn(8, 256, generator=torch.Generator().manual_seed(1)),)
    params, record, push = _setup(model, probes)
    num = sum(p.numel() for p in params.values())
    budget = int(record * (push.primal + push.row)) + 1
    rows, chunk, peak = _real_pass(model, probes, params, record, push, budget)
    assert (rows, chunk) == (1, 1)
    assert peak <= push_pass_bytes(num, 4, rows, chunk * record, push)
    # and without the parameter copy: the frozen weight's zero tangent (4 MB) is the measure's, not the copy's
    assert 4 * 256 * 4096 <= push_pass_bytes(0, 4, rows, chunk * record, push)


def test_the_measure_leaves_the_model_and_the_rng_as_they_were():
    """coverage: passes before. Measured in training mode on BatchNorm and dropout: the parameters, the running
    statistics, the batches counted, every module's mode, the .grad fields and the global RNG are unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 4))
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    probes = (torch.randn(6, 3, 8, 8),)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    params, record, push = _setup(model, probes)
    assert push.row > 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(m.training for m in model.modules()) and torch.equal(torch.get_rng_state(), rng)


_MEASURE = """
import torch
from torch import nn
from genkernel.core.adapter import analysis_mode
from genkernel.core.cost import activation_elements
from genkernel.core.push_memory import measure_push_memory
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 3))
probes = (torch.randn(5, 32),)
with analysis_mode(model):
    record = activation_elements(model, (probes[0][:1],)) * 4
push = measure_push_memory(model, dict(model.named_parameters()), probes, record)
print(repr((push.row, push.primal)))
"""


def test_two_processes_measure_the_same_pass():
    """coverage: passes before. Under DDP every rank must pick the same pass shape: a fresh process (another
    Python history, another cyclic-GC timing) measures exactly what this one does."""
    exec_globals: dict = {}
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(_MEASURE, exec_globals)
    fresh = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert fresh.stdout.strip().splitlines()[-1] == out.getvalue().strip()


class _WideConv(nn.Module):
    """7×7 convolutions of 3 and 4 channels over 128×128 images: a CPU convolution unfolds its input into columns
    (C_in × 49 a position) inside the operation, freed before it returns."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, 4, 7, padding=3), nn.Conv2d(4, 4, 7, padding=3), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


@pytest.mark.xfail(strict=True, reason="a known limit (core.push_memory's docstring): an operation's own workspace "
                   "is not seen; reading the allocator's events (torch.profiler) would, but prints kineto's log lines "
                   "at every tracker built and reads a private API")
def test_an_operations_own_workspace_is_counted():
    """What a convolution allocates and frees inside one operation is held all the same: at a budget the measure
    gives 8 rows through every probe (8), the pass (the allocator's events) holds at most what push_pass_bytes
    counts for it, its parameter copy included. LiveBytes sees only the storages the operations return, and the
    pass holds 116 MiB for 85 counted (1.36 times; the peak RSS in a fresh process too): strict, so that a fix
    shows here."""
    torch.manual_seed(0)
    model = _WideConv()
    probes = (torch.randn(8, 3, 128, 128, generator=torch.Generator().manual_seed(1)),)
    params, record, push = _setup(model, probes)
    num = sum(p.numel() for p in params.values())
    budget = int(8 * record * (push.primal + 8 * push.row)) + 1
    rows, chunk, peak = _real_pass(model, probes, params, record, push, budget)
    assert (rows, chunk) == (8, 8)
    assert peak <= push_pass_bytes(num, 4, rows, chunk * record, push)
