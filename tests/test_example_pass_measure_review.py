"""The "example" route's measured pass (engine.gradients.example_pass_measure, shared with the cost estimate's
cost._pass_measure) is cached per kernel context too: the estimate measures under adapter.analysis_mode, whose
math SDPA backend keeps attention's T x T probabilities, and the engine's pass runs outside it.

Before: the signature left the context out, so for a model in eval mode (the same training flags in both) the first
measure was taken for both. A TransformerEncoderLayer (d = 32, T = 64) measured 64 472 elements an example under
analysis_mode and 25 048 outside; the engine, after the estimate, took 64 472 (at T = 256: 675 288 for 124 376, a
chunk 5.4x smaller than its budget allows), and the estimate, after the engine, 25 048."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core import cost
from genkernel.core.adapter import analysis_mode, functional_model
from genkernel.core.engine import gradients
from genkernel.core.engine.gradients import _measured_pass, example_pass_measure

pytestmark = pytest.mark.usefixtures("one_thread")


class Encoder(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.i = nn.Linear(4, d)
        self.layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.h = nn.Linear(d, 3)

    def forward(self, x):
        return self.h(self.layer(self.i(x)).mean(1))


def engine_count(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}
    return example_pass_measure(model, functional_model(model, None, flatten=False), params, (x[:1],)).activations


def estimate_count(model, x):
    with analysis_mode(model):
        return cost._pass_measure(model, (x,), dict(model.named_parameters())).activations


@pytest.mark.filterwarnings("ignore")
def test_the_engine_and_the_estimate_each_keep_their_own_measure_whatever_ran_first():
    """A model in eval mode: the engine's count is the same with or without the estimate's measure before it, and
    the estimate's with or without the engine's (before: 64 472 and 25 048 taken for each other's)."""
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(4, 64, 4)
    gradients._ACTIVATIONS.pop(model, None)
    engine_fresh = engine_count(model, x)
    gradients._ACTIVATIONS.pop(model, None)
    estimate_fresh = estimate_count(model, x)
    engine_after = engine_count(model, x)
    gradients._ACTIVATIONS.pop(model, None)
    engine_count(model, x)
    estimate_after = estimate_count(model, x)
    gradients._ACTIVATIONS.pop(model, None)
    assert engine_after == engine_fresh
    assert estimate_after == estimate_fresh


class Net(nn.Module):
    def __init__(self, norm: bool, drop: bool):
        super().__init__()
        self.a, self.b = nn.Conv1d(8, 16, 3), nn.Conv1d(16, 3, 3)
        self.bn = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.d = nn.Dropout(0.5) if drop else nn.Identity()

    def forward(self, x):
        return self.b(self.d(self.bn(self.a(x))))


@pytest.mark.parametrize("norm, drop", [(True, False), (False, True), (False, False)])
def test_the_measure_leaves_random_state_and_buffers_as_they_were(norm, drop):
    """coverage: passes before. In training mode (BatchNorm's batch statistics, dropout) the measure draws nothing
    from the global generator and neither writes nor bumps the version of any buffer."""
    torch.manual_seed(0)
    model, x = Net(norm, drop).train(), torch.randn(4, 8, 12)
    buffers = {n: (b, b.clone(), b._version) for n, b in model.named_buffers()}
    state = torch.get_rng_state()
    _measured_pass(model, functional_model(model, flatten=False),
                   {n: p.detach() for n, p in model.named_parameters()}, (x[:1],), None, None)
    assert torch.equal(state, torch.get_rng_state())
    for name, b in model.named_buffers():
        original, copy, version = buffers[name]
        assert b is original and torch.equal(b, copy) and b._version == version


class Attention(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.i, self.h = nn.Linear(4, d), nn.Linear(d, 3)
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        h = self.i(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(h.shape[-1]), -1)
        return self.h((a @ self.v(h)).mean(1))


def _loss(out, y):
    return ((out - y) ** 2).mean(1)


def _train(tracked: bool):
    torch.manual_seed(0)
    model = Attention()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 32, 4, generator=g), torch.randn(16, 3, generator=g)) for _ in range(3)]
    tracker = PathKernelTracker(model, opt, _loss, batches[0][0][:4], num_groups=2, batch_size=16, group_state="dense",
                                gradient_route="example", memory_budget=2 * 2**20,
                                memory_check="warn") if tracked else None
    draws = []
    for x, y in batches:
        if tracker is None:
            opt.zero_grad()
            _loss(model(x), y).mean().backward()
            opt.step()
        else:
            tracker.step(x, y, torch.arange(16) % 2)
        draws.append(torch.rand(()))
    return [p.detach().clone() for p in model.parameters()], torch.stack(draws)


@pytest.mark.filterwarnings("ignore")
def test_a_tracked_run_with_the_measured_pass_trains_as_an_untracked_one():
    """coverage: passes before. gradient_route="example" on attention written in plain operations (where the measure
    exceeds the leaf outputs and sizes the chunks): the parameters and the global generator's later draws are bit
    for bit those of the same loop untracked."""
    params, draws = _train(False)
    tracked_params, tracked_draws = _train(True)
    assert all(torch.equal(a, b) for a, b in zip(params, tracked_params))
    assert torch.equal(draws, tracked_draws)
