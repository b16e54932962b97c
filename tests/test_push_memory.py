"""What a vmapped JVP pass through the probes holds, measured on the model (genkernel.core.push_memory).

One constant (1.25 of the probes' activations a row) sized every model's passes: on UNets a row holds
0.18-0.29 of them, so their passes were 4-7 times narrower than the memory budget allows (a primal
forward of the probes each) and the estimate's pushes 4-7 times the pass. The tracker now measures its
model's pass at construction (live storages at 1 and 2 rows) and sizes passes and estimate with it.
"""

import pytest
import torch
from torch import nn
from torch.func import vmap

from genkernel import PathKernelTracker
from genkernel.core.cost import push_pass_bytes, push_pass_shape
from genkernel.core.push_memory import (
    ALLOCATOR_SLACK, DEFAULT_PUSH_MEMORY, LiveBytes, PushMemory, jvp_pass, measure_push_memory,
)
from genkernel.core.tracking.routes import _jvp_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_measures(monkeypatch):
    """Every test measures its models afresh (the measures kept per process would answer a model seen before)."""
    from collections import OrderedDict

    from genkernel.core import push_memory

    monkeypatch.setattr(push_memory, "_MEASURED", OrderedDict())


def test_live_bytes_counts_what_the_operations_allocate_while_it_lives():
    """coverage: new. Fresh storages count while alive (views once), tensors made before are left out, and the
    peak is the largest sum at once."""
    before = torch.ones(1000)
    with LiveBytes((before,)) as live:
        a = torch.ones(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: the same storage
        before.add_(1)  # in place on a tensor made before: nothing new
        alias = before.view(-1)  # a view of a tensor made before
        del a, b
        c = torch.zeros(250)  # 1000 bytes, after the 4000 were freed
        d = c + 1  # 1000 more
    assert live.peak == 4000 and live.current == 2000
    del alias, c, d


def _tiny_unet_denoiser():
    from genkernel.diffusion import tiny_unet

    torch.manual_seed(0)  # (a UNet2DModel called as model(x_t, t): the adapter reads its output's .sample)
    return tiny_unet(16, 1), (torch.randn(8, 1, 16, 16), torch.arange(8))


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))
    return model, (torch.randn(16, 64),)


@pytest.mark.parametrize("build", [_tiny_unet_denoiser, _mlp])
def test_a_pass_of_the_width_the_budget_allows_stays_within_it(build):
    """The tracker's measure (at 1 and 2 rows, 2 probes) extrapolates to its passes: a pass of as many rows as a
    budget allows, through all the probes, holds (live storages, the parameters, tangents and probes made before
    left out) at most the bytes push_pass_bytes counts for it less the parameter copy, and more than a third of
    them (the measure is the pass's own, not a bound far above it)."""
    model, probes = build()
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-3), lambda out, y: out.flatten(1).pow(2)
                                .mean(1), probes, num_groups=4, batch_size=8, memory_check="warn")
    tracked = tracker._tracked
    push = tracked.push_memory
    assert push != DEFAULT_PUSH_MEMORY and push.row > 0
    m = probes[0].shape[0]
    budget = int(m * tracked.record_bytes * (push.primal + 6 * push.row)) + 1
    rows, chunk = push_pass_shape(budget, m, tracked.record_bytes, push)
    assert (rows, chunk) == (6, m)
    theta = {n: p.detach() for n, p in tracked.params.items()}
    tangents = {n: torch.randn(rows, *p.shape) for n, p in theta.items()}
    with torch.no_grad(), LiveBytes((*theta.values(), *tangents.values(), *probes)) as live:
        from genkernel.core.adapter import analysis_mode

        with analysis_mode(model):
            out = vmap(jvp_pass(model, theta, probes))(tangents)
    del out
    counted = push_pass_bytes(0, 4, rows, m * tracked.record_bytes, push)
    assert counted / 3 < live.peak <= counted


def test_the_unets_passes_are_wider_than_the_constant_allowed():
    """On the tiny UNet a row holds about a quarter of the probes' activations: measured, a pass of the default
    budget pushes 3 or more times the rows the constant 1.25 allowed, and the contributions are those of one row a
    pass (the same JVPs, split otherwise)."""
    model, probes = _tiny_unet_denoiser()
    trained = {n: p for n, p in model.named_parameters()}
    from genkernel.core.cost import activation_elements

    one = activation_elements(model, tuple(t[:1] for t in probes)) * 4
    push = measure_push_memory(model, trained, probes, one)
    assert 0.15 * ALLOCATOR_SLACK < push.row < 0.5 * ALLOCATOR_SLACK
    budget = 64 * 2**20
    assert push_pass_shape(budget, 8, one, push)[0] >= 3 * push_pass_shape(budget, 8, one)[0]
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-3), lambda out, y: out.flatten(1).pow(2)
                                .mean(1), probes, num_groups=4, batch_size=8, memory_check="warn", memory_budget=budget)
    tracked = tracker._tracked
    theta = {n: p.detach() for n, p in tracked.params.items()}
    updates = {n: torch.randn(5, *p.shape, generator=torch.Generator().manual_seed(1)) for n, p in theta.items()}
    with torch.no_grad():
        from genkernel.core.adapter import analysis_mode

        with analysis_mode(model):
            wide = _jvp_rows(tracked, theta, updates, 5)
            tracked.memory_budget = 1  # one row through one probe a pass
            narrow = _jvp_rows(tracked, theta, updates, 5)
    assert torch.allclose(wide, narrow, rtol=1e-5, atol=1e-6 * float(wide.abs().max()))


def test_a_model_whose_pass_cannot_run_gets_the_constant():
    """coverage: new. A forward without a forward-mode rule (the tracker then takes the Jacobian route) is given
    the constant, and a measure must be a number >= 0."""

    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return NoForwardAD.apply(self.linear(x))

    model = Model()
    assert measure_push_memory(model, dict(model.named_parameters()), (torch.randn(4, 3),), 16) == DEFAULT_PUSH_MEMORY
    with pytest.raises(ValueError, match="row must be a number >= 0"):
        PushMemory(row=-1.0, primal=0.0)
    with pytest.raises(ValueError, match="primal must be a number >= 0"):
        PushMemory(row=1.0, primal=float("nan"))


def test_the_estimate_counts_the_measured_pass():
    """estimate_cost measures the model's pass unless given one (the tracker gives its own), and the pushes part is
    push_pass_bytes with that measure."""
    from genkernel.core.cost import activation_elements, estimate_cost

    model, probes = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    one = activation_elements(model, (probes[0][:1],)) * 4
    push = measure_push_memory(model, dict(model.named_parameters()), probes, one)
    measured = estimate_cost(model, optimizer, probes, outputs=4, rows=4, device="cpu")
    given = estimate_cost(model, optimizer, probes, outputs=4, rows=4, device="cpu", push_memory=push)
    constant = estimate_cost(model, optimizer, probes, outputs=4, rows=4, device="cpu", push_memory=DEFAULT_PUSH_MEMORY)
    num = sum(p.numel() for p in model.parameters())
    assert measured.memory["probe_pushes"] == given.memory["probe_pushes"] == push_pass_bytes(num, 4, 5, 16 * one, push)
    assert constant.memory["probe_pushes"] == push_pass_bytes(num, 4, 5, 16 * one)
    assert given.memory["probe_pushes"] != constant.memory["probe_pushes"]


def test_a_model_measured_before_is_not_measured_again(monkeypatch):
    """A tracker of a model whose architecture, shapes, trained parameters and probes were measured before in the
    process reuses that measure (no pass runs); another probe shape, another set of trained parameters or another
    width is measured afresh."""
    from genkernel.core import push_memory
    from genkernel.core.cost import activation_elements

    passes = []
    real = push_memory.jvp_pass
    monkeypatch.setattr(push_memory, "jvp_pass", lambda *a: passes.append(1) or real(*a))

    def measure(width=256, probes=16, trained=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 4))
        x = (torch.randn(probes, 64),)
        params = {n: p for n, p in model.named_parameters() if trained is None or n in trained}
        return measure_push_memory(model, params, x, activation_elements(model, (x[0][:1],)) * 4)

    first = measure()
    assert len(passes) == 3 and measure() == first and len(passes) == 3  # (other weights, same architecture)
    measure(probes=1)
    measure(trained=("2.weight", "2.bias"))
    measure(width=128)
    assert len(passes) == 3 + 2 + 3 + 3  # (one probe: two passes)
