"""Second read of the forty-third session's last commits (helper read43b): the cost estimate's measures kept per
architecture (cost.per_architecture, push_memory.architecture_key) shared between models that the key took as
one but whose forwards differ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_mend43 import counted_repeat_checks

pytestmark = pytest.mark.usefixtures("one_thread")


class _Copies(nn.Module):
    """Two linear layers over ``copies`` copies of the input (an attribute ``repr`` does not name: a token count)."""

    def __init__(self, copies: int):
        super().__init__()
        self.a, self.b, self.copies = nn.Linear(3, 6), nn.Linear(6, 2), copies

    def forward(self, x):
        h = torch.tanh(self.a(x.repeat(1, self.copies).view(x.shape[0], self.copies, 3)))
        return self.b(h).mean(1)


class _Tied(nn.Module):
    """``a``'s weight also read outside ``a``'s call (a tied weight: its block cannot be factored) where a switch
    says so: a boolean buffer (``mode="buffer"``) or the sign of a bias value (``mode="bias"``)."""

    def __init__(self, tied: bool, mode: str):
        super().__init__()
        self.a, self.b, self.mode = nn.Linear(3, 6), nn.Linear(6, 2), mode
        self.register_buffer("tied", torch.tensor(tied if mode == "buffer" else False))
        with torch.no_grad():
            self.a.bias[0] = 1.0 if tied else -1.0

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if bool(self.tied) if self.mode == "buffer" else bool(self.a.bias[0] > 0):
            h = h + F.linear(x, self.a.weight)
        return self.b(h)


def _estimate(model, group_state, gradient_route):
    from genkernel.core.cost import estimate_cost

    torch.manual_seed(1)
    probes = (torch.randn(4, 3, dtype=torch.float64),)
    estimate = estimate_cost(model, torch.optim.SGD(model.parameters(), lr=0.1), probes, outputs=2, rows=4,
                             group_state=group_state, gradient_route=gradient_route, memory_budget=2**20)
    return estimate.memory, estimate.work


def _fresh_and_after(first, second, group_state, gradient_route):
    """``second``'s estimate with no measure kept, and after ``first``'s (of the same ``repr``) was estimated."""
    from genkernel.core import push_memory

    push_memory._MEASURED.clear()
    fresh = _estimate(second, group_state, gradient_route)
    push_memory._MEASURED.clear()
    _estimate(first, group_state, gradient_route)
    return fresh, _estimate(second, group_state, gradient_route)


def test_the_estimate_of_a_model_whose_forward_repeats_its_tokens_by_an_attribute_is_its_own_after_another_models():
    """Two models of one class and ``repr`` whose forwards differ by a plain attribute (64 copies of the input
    against 1), or by a forward hook that repeats a layer's tokens (registered on one of them): the second model's
    estimate (every memory part and every work part) after the first's is the one it gets with no measure kept.

    Fails on the old code: cost.per_architecture keyed the counting passes by ``repr``, shapes and dtypes alone, so
    the 64-copy model was given the 1-copy model's activations (training_activations 512 bytes against 43008,
    probe_pushes 4624 against 276784: 64 times low)."""
    torch.manual_seed(0)
    for group_state, route in (("dense", "graph"), ("factored", "graph")):
        fresh, after = _fresh_and_after(_Copies(1).double(), _Copies(64).double(), group_state, route)
        assert after == fresh, (group_state, route)
    hooked = _Copies(1).double()
    hooked.a.register_forward_hook(lambda module, args, output: output.repeat(1, 16, 1))  # (16 tokens out of 1)
    fresh, after = _fresh_and_after(_Copies(1).double(), hooked, "dense", "graph")
    assert after == fresh


@pytest.mark.parametrize("mode", ["buffer", pytest.param("bias", marks=pytest.mark.xfail(strict=True, reason=(
    "cost.per_architecture's documented limit: a forward that branches on a parameter's value is estimated as the "
    "first model of its key was (keying the covering plan's parts by the model's own plan ran a covering check per "
    "new model, half of the suite's saving; an estimate moves, never a ledger or a kernel)")))])
def test_the_estimate_of_a_model_whose_covering_plan_differs_from_another_of_its_architecture_is_its_own(mode):
    """Two models of one class, ``repr`` and shapes, one of which reads a block's weight outside the block's call
    (so that block goes to the torch.func fallback of its covering plan), switched by a boolean buffer or by a
    parameter's value: on the factored and example routes, the tied model's estimate after the untied model's
    equals its estimate with no measure kept (switched by the buffer: every memory and work part; by the value:
    every memory part the covering plan decides).

    Fails on the old code (the buffer's case; the value's is a strict xfail, a known limit): the covering plan's
    shapes, captures and fallback passes were kept per architecture, so the tied model was estimated with the
    other's plan (held_factors 608 bytes against 1056, probe_captures 2784 against 5344, the group gradients' work
    7.6 against 11.9)."""
    torch.manual_seed(0)
    for group_state, route in (("factored", "graph"), ("dense", "factored"), ("dense", "example")):
        fresh, after = _fresh_and_after(_Tied(False, mode).double(), _Tied(True, mode).double(), group_state, route)
        if mode == "buffer":
            assert after == fresh, (group_state, route)
            continue
        # (switched by a parameter's value, what one pass of the first model counted or measured stays: the
        # one-example counts, the work's unit, and the push pass's measure, kept per architecture before this
        # session, here 5 % low, within its slack; no key short of running the forward sees a branch on a value.
        # The covering plan's parts are the model's own)
        memory = {part: size for part, size in after[0].items() if part != "probe_pushes"}
        assert memory == {part: size for part, size in fresh[0].items() if part != "probe_pushes"}, (group_state, route)


def test_a_repeat_check_kept_once_is_taken_again_after_the_input_alone_is_written_in_place(monkeypatch):
    """Inside engine.kernels.repeat_checked_once, a second gradient_kernel call after the input alone was written in
    place (its version bumped, the parameters untouched) runs the repeatability check again; a call with nothing
    changed runs none.

    Coverage: the old code keys the input's version already; test_mend43's in-place input case changed the
    parameters' versions just before it (mul_ then div_), so a key without the input's version passed it too
    (injected into a copy: that test passed, this one fails)."""
    from genkernel.core.engine.kernels import gradient_kernel, repeat_checked_once

    checks = counted_repeat_checks(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    with repeat_checked_once(model):
        gradient_kernel(model, x, engine="functional")
        gradient_kernel(model, x, engine="functional")
        assert len(checks) == 1
        x.mul_(1.0)
        gradient_kernel(model, x, engine="functional")
        assert len(checks) == 2
