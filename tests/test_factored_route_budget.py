"""The "factored" gradient route (engine.gradients._factored_route) sizes its chunks of examples by what a chunk
holds: its first chunk of one example and its second of two are measured (push_memory.LiveBytes), the rest sized by
the slope beside what a chunk holds once.

Before: chunks were sized by the largest parameter alone, budget / (4 x its bytes). A conv net's factors (its
recorded inputs and output gradients at every position) are not parameter-sized: 3 -> 16 -> 16 -> 32 channels at
64x64, B = 64, held 45.3 MiB beside its rows for a 16 MiB budget (chunks of 12) and 11.3 MiB for 4 MiB."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel.core.engine import gradients
from genkernel.core.engine.gradients import group_gradients, membership_matrix
from genkernel.core.push_memory import LiveBytes

pytestmark = pytest.mark.usefixtures("one_thread")
MiB = 2**20


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, 2, 1), nn.Flatten(), nn.Linear(32 * 16 * 16, 10))


def cross_entropy(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def chunk_sizes(monkeypatch) -> list[int]:
    """The batch sizes the route's captures run on, in order."""
    sizes: list[int] = []
    capture = gradients.capture

    def recorded(model, plan, inputs, *args, **kwargs):
        sizes.append(int(inputs[0].shape[0]))
        return capture(model, plan, inputs, *args, **kwargs)

    monkeypatch.setattr(gradients, "capture", recorded)
    return sizes


def test_the_factored_routes_chunks_hold_at_most_the_budget_beside_the_rows(monkeypatch):
    """The conv net at 16 MiB, B = 64, 4 rows: live storages beyond the rows (4 x P float64) peak within the budget
    (before: 45.3 MiB); the chunks after the measured two are as large as the budget allows, not one example."""
    torch.manual_seed(0)
    model, x, y = conv_net(), torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
    params = dict(model.named_parameters())
    membership = membership_matrix([torch.arange(64) % 4], torch.ones(64, dtype=torch.float64), [4])
    sizes = chunk_sizes(monkeypatch)
    with LiveBytes((*params.values(), x, y)) as live:
        group_gradients(model, params, (x,), y, cross_entropy, membership, memory_budget=16 * MiB, route="factored")
    rows = 4 * sum(p.numel() for p in params.values()) * 8
    assert live.peak - rows <= 16 * MiB, ((live.peak - rows) / MiB, sizes)
    assert sizes[:2] == [1, 2] and sum(sizes) == 64 and max(sizes[2:]) >= 4, sizes


def test_one_example_at_a_time_where_one_takes_the_budget(monkeypatch):
    """coverage (the old rule gave one example too, by the Linear's 82k values): at 2 MiB one example of the conv
    net (2.3 MiB) takes the budget: every chunk is one example, none of two."""
    torch.manual_seed(0)
    model, x, y = conv_net(), torch.randn(5, 3, 64, 64), torch.randint(0, 10, (5,))
    membership = membership_matrix([torch.arange(5) % 2], torch.ones(5, dtype=torch.float64), [2])
    sizes = chunk_sizes(monkeypatch)
    group_gradients(model, dict(model.named_parameters()), (x,), y, cross_entropy, membership,
                    memory_budget=2 * MiB, route="factored")
    assert sizes == [1] * 5


@pytest.mark.parametrize("batch", [1, 2, 3, 11])
def test_rows_in_measured_chunks_equal_the_example_routes(batch, monkeypatch):
    """The rows over chunks of 1, 2 and the rest (float64, a budget of a few examples) are the example route's, to
    rounding; the losses too; every example is in one chunk once (before: one chunk of the batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).double()
    x, y = torch.randn(batch, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (batch,))
    membership = membership_matrix([torch.arange(batch) % 3], torch.rand(batch, dtype=torch.float64), [3])
    params = dict(model.named_parameters())
    sizes = chunk_sizes(monkeypatch)
    factored, losses = group_gradients(model, params, (x,), y, cross_entropy, membership, memory_budget=200_000,
                                       route="factored")
    example, example_losses = group_gradients(model, params, (x,), y, cross_entropy, membership, route="example")
    assert sum(sizes) == batch and sizes[:2] == [1, min(2, batch - 1)][:batch], sizes
    for name in params:
        torch.testing.assert_close(factored[name], example[name], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses, example_losses, rtol=1e-13, atol=0)


def test_the_estimate_counts_the_factored_routes_largest_chunk():
    """The cost estimate's ``example_pass`` on the factored gradient route is the largest chunk's capture, from its
    own measure of the first two chunks on the probes (a stand-in loss): on the conv net at 16 MiB, B = 64, it is
    within 5 % of what the engine's call held beyond its rows, and within the budget (before: not counted)."""
    from genkernel.core.cost import estimate_cost

    torch.manual_seed(0)
    model, x, y = conv_net(), torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
    params = dict(model.named_parameters())
    membership = membership_matrix([torch.arange(64) % 4], torch.ones(64, dtype=torch.float64), [4])
    with LiveBytes((*params.values(), x, y)) as live:
        group_gradients(model, params, (x,), y, cross_entropy, membership, memory_budget=16 * MiB, route="factored")
    held = live.peak - 4 * sum(p.numel() for p in params.values()) * 8
    estimate = estimate_cost(model, torch.optim.SGD(model.parameters(), lr=0.1), (x[:8],), outputs=10, rows=4,
                             group_state="dense", gradient_route="factored", batch_size=64, memory_budget=16 * MiB)
    assert estimate.memory["example_pass"] == pytest.approx(held, rel=0.05)
    assert estimate.memory["example_pass"] <= 16 * MiB
