"""The "example" route's chunks (engine.gradients.example_chunk) are sized by what the pass holds with the loss it
runs and what it holds once whatever the chunk (engine.gradients.example_pass_measure).

Before: the pass was measured with a sum of squares of the output standing in for the loss, and the budget went to
the examples alone, the slope of the pass in its copies. A loss building an outer product of a 256-wide output
(a [256, 256] array an example) ran 4.94x a 4 MiB budget; a net building a [2048, 2048] float32 feature matrix from
two buffers in its forward (32 MiB at its peak, once per call) ran 1.71x a 32 MiB budget (54.9 MiB of live storages)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel.core.adapter import functional_model
from genkernel.core.engine import gradients
from genkernel.core.engine.gradients import (_example_chunks, example_chunk, example_pass_bytes,
                                             example_pass_measure, group_gradients, membership_matrix)
from genkernel.core.push_memory import LiveBytes

pytestmark = pytest.mark.usefixtures("one_thread")
MiB = 2**20


class FixedFeatures(nn.Module):
    """x -> Linear(tanh(Linear(x) @ cos(a bᵀ))): the [n, n] feature matrix is built once per call from two buffers,
    whatever the batch; nothing of it is per example."""

    def __init__(self, n: int = 2048):
        super().__init__()
        self.register_buffer("a", torch.linspace(0, 1, n))
        self.register_buffer("b", torch.linspace(0, 3, n))
        self.inp, self.out = nn.Linear(8, n), nn.Linear(n, 8)

    def forward(self, x):
        features = torch.cos(self.a[:, None] * self.b[None, :])
        return self.out(torch.tanh(self.inp(x) @ features))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 64), nn.Linear(64, 256)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def squares(out, y):
    return out.pow(2).mean(dim=-1)


def outer_loss(out, y):
    """Per-example loss through a [B, 256, 256] outer product of the output: no leaf module's output."""
    return (out.unsqueeze(-1) * out.unsqueeze(-2)).tanh().mean(dim=(-1, -2))


def outer_loss_to_target(out, y):
    """As :func:`outer_loss`, of the output less its target (a tuple of one tensor)."""
    r = out - y[0]
    return (r.unsqueeze(-1) * r.unsqueeze(-2)).tanh().mean(dim=(-1, -2))


def pass_peak(model, x, targets, loss_fn, budget) -> tuple[int, int]:
    """(live storages' peak over a second run of the route's chunks, beside the parameters and the batch, and the
    chunk taken): the first run measures the pass once (cached), as a tracker's first step does."""
    params = dict(model.named_parameters())
    for _ in _example_chunks(model, params, (x,), targets, loss_fn, budget):
        pass
    sizes = []
    with LiveBytes((*params.values(), x, *(() if targets is None else targets))) as live:
        for rows, grads, values in _example_chunks(model, params, (x,), targets, loss_fn, budget):
            sizes.append(rows.stop - rows.start)
            del grads, values
    return live.peak, max(sizes)


def test_what_the_pass_holds_once_is_left_out_of_the_budget_for_its_examples():
    """The feature net at 48 MiB, B = 256: the pass holds at most the budget (before: 66.0 MiB, 1.38x, in chunks of 144).
    Its measured fixed part is the feature matrix and the product it is the cosine of, alive at once in the
    forward: 2 x 16 MiB, within a few KiB."""
    torch.manual_seed(0)
    model, x = FixedFeatures(), torch.randn(256, 8)
    measured = example_pass_measure(model, functional_model(model, flatten=False),
                                    {n: p.detach() for n, p in model.named_parameters()}, (x[:1],), squares, None)
    assert 32 * MiB <= measured.fixed_bytes <= 32 * MiB + 64 * 1024, measured
    peak, chunk = pass_peak(model, x, None, squares, 48 * MiB)
    assert peak <= 48 * MiB, (peak / MiB, chunk)
    assert chunk > 16  # (the rest of the budget still goes to examples: not one at a time)


@pytest.mark.parametrize("with_targets", [False, True])
def test_the_pass_is_measured_with_the_loss_it_runs(with_targets):
    """A loss through an outer product of the 256-wide output, at 4 MiB, B = 64, with targets (a tuple) or without:
    the pass holds at most the budget (before: 19.8 MiB, 4.9x, sized by the stand-in loss)."""
    torch.manual_seed(0)
    model, x = Small(), torch.randn(64, 8)
    targets = (torch.randn(64, 256),) if with_targets else None
    loss = outer_loss_to_target if with_targets else outer_loss
    peak, chunk = pass_peak(model, x, targets, loss, 4 * MiB)
    assert peak <= 4 * MiB, (peak / MiB, chunk)
    stand_in = example_pass_measure(model, functional_model(model, flatten=False),
                                    {n: p.detach() for n, p in model.named_parameters()}, (x[:1],))
    assert chunk < example_chunk(4 * MiB, sum(p.numel() for p in model.parameters()), 256 * 64, 4,
                                 stand_in.activations, stand_in.fixed_bytes) / 4  # (the loss is most of the pass)


def test_rows_with_the_loss_measured_equal_the_per_example_loop():
    """The rows the chunked route forms with the heavy loss (chunks of a few examples) are the per-example
    gradients' sums, one example at a time by torch.autograd, in float64."""
    torch.manual_seed(0)
    model, x = Small().double(), torch.randn(12, 8, dtype=torch.float64)
    targets = (torch.randn(12, 256, dtype=torch.float64),)
    ids = torch.arange(12) % 3
    coefficients = torch.rand(12, dtype=torch.float64)
    membership = membership_matrix([ids], coefficients, [3])
    params = dict(model.named_parameters())
    rows, losses = group_gradients(model, params, (x,), targets, outer_loss_to_target, membership,
                                   memory_budget=2 * MiB, route="example")
    for name, p in params.items():
        expected = torch.zeros((3, *p.shape), dtype=torch.float64)
        for n in range(12):
            loss = outer_loss_to_target(model(x[n:n + 1]), (targets[0][n:n + 1],)).sum()
            (g,) = torch.autograd.grad(loss, p)
            expected[ids[n]] += coefficients[n] * g
        torch.testing.assert_close(rows[name], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses, outer_loss_to_target(model(x), targets).detach())


def test_a_loss_made_afresh_each_step_is_measured_once_and_another_loss_again(monkeypatch):
    """The measure is cached by the loss's code (a closure built per step is the same loss), a bound method's
    function and object, a loss module's modules: one measure for five steps' fresh closures; a loss of other code
    measures again."""
    torch.manual_seed(0)
    model, x = Small(), torch.randn(8, 8)
    calls = []
    measure = gradients._measured_pass
    monkeypatch.setattr(gradients, "_measured_pass", lambda *args: calls.append(args[4]) or measure(*args))
    gradients._ACTIVATIONS.pop(model, None)
    membership = membership_matrix([torch.arange(8) % 2], torch.ones(8, dtype=torch.float64), [2])
    params = dict(model.named_parameters())
    for scale in range(1, 6):
        def scaled(out, y, scale=scale):  # a fresh function object each step
            return scale * outer_loss(out, y)
        group_gradients(model, params, (x,), None, scaled, membership, route="example")
    assert len(calls) == 1
    group_gradients(model, params, (x,), None, squares, membership, route="example")
    loss_module = nn.MSELoss(reduction="none")

    def through_module(out, y):
        return loss_module(out, torch.zeros_like(out)).mean(-1)
    group_gradients(model, params, (x,), None, through_module, membership, route="example")
    assert len(calls) == 3


def test_the_chunk_is_the_most_examples_that_fit_beside_the_fixed_part():
    """example_chunk with a fixed part: the chunk's pass (example_pass_bytes, fixed part in) fits the budget and one
    example more would not, over a grid of sizes; at least one example when the fixed part alone exceeds it."""
    for budget in (MiB, 8 * MiB, 64 * MiB):
        for fixed in (0, 100_000, MiB // 2, 4 * MiB):
            for acts, params, itemsize in ((1000, 5000, 4), (20_000, 300, 8), (0, 70_000, 2)):
                chunk = example_chunk(budget, params, params // 2, itemsize, acts, fixed)
                held = example_pass_bytes(chunk, params, params // 2, itemsize, acts, fixed)
                if fixed + example_pass_bytes(1, params, params // 2, itemsize, acts) > budget:
                    assert chunk == 1
                    continue
                assert held <= budget < example_pass_bytes(chunk + 1, params, params // 2, itemsize, acts, fixed), (
                    budget, fixed, acts, params, chunk)
