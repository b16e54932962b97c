"""Review of 25e5c6f (one directional wrapper for every sketch direction; resume_position's attach=) and the
commits before it: the sketched state kernel against a brute-force per-example reference, and the examples'
checkpoint resume with and without the analyzer's state."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch import nn

from genkernel import gradient_kernel
from genkernel.core.adapter import seeded_generator
from genkernel.diffusion import state_kernel
from genkernel.diffusion.kernels import _Directional

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# state_kernel: one wrapper module for every direction
# ---------------------------------------------------------------------------------------------
class _ReversedLinear(nn.Module):
    """A linear layer that sees its batch in reverse order (a forward that reorders its rows and puts them back):
    its factors credit example n's gradient to example B-1-n, which the covering check must catch."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.lin = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flip(0)).flip(0)


class _TwinOutputs(nn.Module):
    """``(z [B, 2], t [B]) -> [B, 3]``: ``[a(x), g(x), g(x)]``, the last two outputs equal, so a ±1 direction
    ``(., 1, -1)`` cancels every gradient of g's reversed layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 1)
        self.g = _ReversedLinear(3, 1)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, t.to(z.dtype)[:, None] / 100], 1)
        h = torch.tanh(self.g(x))
        return torch.cat([self.a(x), h, h], 1)


def _brute_force_gradients(model, states, direction):
    """``[M, P]``: each state's gradient of ⟨direction, f(state)⟩ from a pass of that state alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(states[0].shape[0]):
        out = model(*(t[n : n + 1] for t in states)).reshape(-1)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad((out * direction).sum(), params)]))
    return torch.stack(rows).to(F64)


def _brute_force_sketch(model, states, others, directions, normalize):
    """The sketched kernel ``[M, N]`` by hand: Σ_v G_v(states) G_v(others)ᵀ / V, or normalized by the sketch's
    own diagonals Σ_v |G_v(x)|²."""
    kernel = diag1 = diag2 = 0
    for r in directions:
        g1 = _brute_force_gradients(model, states, r)
        g2 = g1 if others is None else _brute_force_gradients(model, others, r)
        kernel = kernel + g1 @ g2.T
        diag1, diag2 = diag1 + (g1 * g1).sum(1), diag2 + (g2 * g2).sum(1)
    if normalize:
        return kernel / (diag1[:, None] * diag2[None, :]).sqrt()
    return kernel / len(directions)


@pytest.mark.parametrize("with_others", [False, True])
def test_a_sketch_whose_first_direction_cancels_a_block_still_gives_the_per_example_kernel(with_others):
    """The shared wrapper's covering check ran once, along the first ±1 direction, and was kept for the others.
    With two equal outputs, seed 1's first direction (1, 1, -1) cancels the reversed layer: its gradients are zero
    on both sides, the check passed it, and the later directions read its factors with the batch reversed
    (HEAD: 3.9 off a kernel of scale 10, silently; a fresh wrapper per direction was right)."""
    model = _TwinOutputs().double()
    gen = torch.Generator().manual_seed(0)
    states = (torch.randn(5, 2, generator=gen, dtype=F64), torch.tensor([3, 20, 45, 70, 96]))
    others = (torch.randn(4, 2, generator=gen, dtype=F64), torch.tensor([8, 33, 61, 90])) if with_others else None
    directions = (torch.randint(0, 2, (4, 3), generator=seeded_generator(1)) * 2 - 1).to(F64)
    assert directions[0].tolist() == [1, 1, -1] and directions[1].tolist() == [-1, 1, 1]  # the premise
    for normalize in (False, True):
        got = state_kernel(model, states, others, output_sketch=4, seed=1, normalize=normalize)
        want = _brute_force_sketch(model, states, others, directions, normalize)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


class _ConvDenoiser(nn.Module):
    """A small convolutional denoiser ``(z [B, 2, 4, 4], t [B]) -> [B, 2, 4, 4]``: the factored engine's route."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.temb, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(1, 4), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, z, t):
        return self.conv2(torch.tanh(self.conv1(z) + self.temb(t.to(z.dtype)[:, None] / 100)[:, :, None, None]))


class _FunctionalDenoiser(nn.Module):
    """A denoiser reading its parameters outside any module call ``(z [B, 8], t [B]) -> [B, 8]``: torch.func's
    route."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.w, self.v = nn.Parameter(torch.randn(8, 8) / 3), nn.Parameter(torch.randn(8) / 3)

    def forward(self, z, t):
        return torch.tanh(z @ self.w + self.v * t.to(z.dtype)[:, None] / 100) @ self.w.T


@pytest.mark.parametrize("model_cls, shape, budget", [(_ConvDenoiser, (2, 4, 4), 2**13),
                                                      (_FunctionalDenoiser, (8,), 2**12)])
def test_one_wrapper_for_every_direction_equals_a_fresh_wrapper_per_direction(model_cls, shape, budget):
    """coverage: the wrapper's direction buffer, copied in turn, is what every pass reads (nothing cached per
    module depends on its values), in row chunks (a budget of a few KiB), with others and without, normalized
    and not: equal to a fresh wrapper per direction to the last bit."""
    model = model_cls().double()
    gen = torch.Generator().manual_seed(3)
    states = (torch.randn(5, *shape, generator=gen, dtype=F64), torch.tensor([1, 20, 40, 60, 90]))
    others = (torch.randn(4, *shape, generator=gen, dtype=F64), torch.tensor([5, 25, 45, 95]))
    d = states[0][0].numel()
    directions = (torch.randint(0, 2, (3, d), generator=seeded_generator(2)) * 2 - 1).to(F64)
    per_direction = [gradient_kernel(_Directional(model, r.clone()), states, others, memory_budget=budget).to(F64)
                     for r in directions]
    got = state_kernel(model, states, others, output_sketch=3, seed=2, normalize=False, memory_budget=budget)
    torch.testing.assert_close(got, sum(per_direction) / 3, rtol=1e-13, atol=0)
    self_kernel = sum(gradient_kernel(_Directional(model, r.clone()), states, memory_budget=budget).to(F64)
                      for r in directions)
    diag = self_kernel.diagonal()
    got = state_kernel(model, states, output_sketch=3, seed=2, normalize=True, memory_budget=budget)
    torch.testing.assert_close(got, self_kernel / (diag[:, None] * diag[None, :]).sqrt(), rtol=1e-13, atol=0)

    def own_diagonal(inputs):  # k(x, x) of each state alone, summed over the directions (fresh wrappers)
        return sum(torch.stack([gradient_kernel(_Directional(model, r.clone()), tuple(t[i : i + 1] for t in inputs),
                                                memory_budget=budget).to(F64).reshape(()) for i in range(len(inputs[1]))])
                   for r in directions)

    got = state_kernel(model, states, others, output_sketch=3, seed=2, normalize=True, memory_budget=budget)
    want = sum(per_direction) / (own_diagonal(states)[:, None] * own_diagonal(others)[None, :]).sqrt()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# recipes/examples/checkpointing.py resume_position(attach=)
# ---------------------------------------------------------------------------------------------
class _Counter:
    """A checkpointed object: ``state_dict() -> {"value": int}``."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _accelerator_with(*registered):
    """A CPU Accelerator (accelerate's process state reset first) with ``registered`` registered for checkpointing."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    for item in registered:
        accelerator.register_for_checkpointing(item)
    return accelerator


def _args(out, resume):
    return argparse.Namespace(resume_from_checkpoint=resume, output_dir=str(out), gradient_accumulation_steps=1)


@pytest.mark.usefixtures("fresh_accelerate")
def test_a_checkpoint_saved_with_the_analyzer_resumes_a_run_without_it(tmp_path):
    """A run checkpointed with the analyzer (the epoch RNG's state, then the analyzer's) resumed with --no-analyze
    (nothing attached): accelerate's load_state refused the folder, 'Number of custom checkpoints ... does not
    match' (HEAD: a RuntimeError naming neither the analyzer nor a remedy). It loads the states of the objects
    this run registers, and the checkpoints it saves hold only theirs: attached again from one, the analyzer
    starts at that step."""
    from recipes.examples.checkpointing import resume_position

    saving = _accelerator_with(_Counter(5), _Counter(7))  # (EpochRNG, analyzer)
    saving.save_state(str(tmp_path / "checkpoint-4"))
    epoch_rng = _Counter()
    accelerator = _accelerator_with(epoch_rng)
    assert resume_position(_args(tmp_path, str(tmp_path / "checkpoint-4")), accelerator, 2) == (4, 2, 0)
    assert epoch_rng.value == 5 and len(accelerator._custom_objects) == 1
    accelerator.save_state(str(tmp_path / "later" / "checkpoint-6"))
    assert sorted(f for f in os.listdir(tmp_path / "later" / "checkpoint-6") if f.startswith("custom_checkpoint")) == [
        "custom_checkpoint_0.pkl"]
    epoch_rng, analyzer = _Counter(), _Counter(-1)
    accelerator = _accelerator_with(epoch_rng)
    resume_position(_args(tmp_path / "later", "latest"), accelerator, 2, attach=[analyzer])
    assert epoch_rng.value == 5 and analyzer.value == -1 and accelerator._custom_objects == [epoch_rng, analyzer]


@pytest.mark.usefixtures("fresh_accelerate")
def test_attached_objects_load_from_a_checkpoint_holding_them_and_register_without_one(tmp_path):
    """coverage: attach= loads the analyzer's state at the index after the objects registered before (the epoch
    RNG's file is custom_checkpoint_0.pkl, the analyzer's _1); "latest" with no checkpoint registers it and
    starts at (0, 0, 0)."""
    from recipes.examples.checkpointing import resume_position

    _accelerator_with(_Counter(5), _Counter(7)).save_state(str(tmp_path / "checkpoint-3"))
    epoch_rng, analyzer = _Counter(), _Counter()
    accelerator = _accelerator_with(epoch_rng)
    assert resume_position(_args(tmp_path, "latest"), accelerator, 2, attach=[analyzer]) == (3, 1, 1)
    assert (epoch_rng.value, analyzer.value) == (5, 7) and accelerator._custom_objects == [epoch_rng, analyzer]
    analyzer = _Counter(-1)
    accelerator = _accelerator_with(_Counter())
    assert resume_position(_args(tmp_path / "empty", "latest"), accelerator, 2, attach=[analyzer]) == (0, 0, 0)
    assert analyzer.value == -1 and accelerator._custom_objects[-1] is analyzer
