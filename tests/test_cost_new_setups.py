"""The cost estimate on a LoRA-style fine-tune (low-rank adapters beside a frozen base, as peft's
``add_adapter`` builds them): the bare step it compares an analyzed step against is the step's own
operation count (``torch.utils.flop_counter``: a frozen layer's backward forms its input's gradient,
not its weight's), and its parameter-sized arrays count the trainable parameters only.

The models are plain torch (a base Linear and its A, B adapters, the structure peft's ``lora.Linear``
has) so that the file runs in seconds without importing peft or diffusers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from genkernel.core.cost import estimate_cost

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH, RANK, DEPTH, BATCH, PROBES = 64, 2, 6, 8, 4


class LowRankAdapted(nn.Module):
    """A frozen ``base_layer`` plus a trainable ``lora_B(lora_A(x))`` (peft's lora.Linear, scale 1)."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.base_layer = nn.Linear(width, width).requires_grad_(False)
        self.lora_A = nn.Linear(width, rank, bias=False)
        self.lora_B = nn.Linear(rank, width, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def adapted_mlp(frozen_base: bool) -> nn.Module:
    """4 → WIDTH → (DEPTH adapted WIDTH × WIDTH layers) → 4; ``frozen_base=False``: everything trained."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, WIDTH), nn.ReLU()]
    for _ in range(DEPTH):
        layers += [LowRankAdapted(WIDTH, RANK), nn.ReLU()]
    layers.append(nn.Linear(WIDTH, 4))
    model = nn.Sequential(*layers)
    if frozen_base:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        model.requires_grad_(True)
    return model


def counted(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def measured_bare_step(model: nn.Module, x: torch.Tensor) -> float:
    """A bare step's operation count (forward and backward of the batch ``x [B, 4]``, mean squared
    error) in forwards of one example, counted by torch's flop counter."""
    one_forward = counted(lambda: model(x[:1]))

    def step():
        model.zero_grad()
        ((model(x) - 1.0) ** 2).mean().backward()

    return counted(step) / one_forward


def estimate(model: nn.Module, x: torch.Tensor, rows: int = 3):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-2)
    return estimate_cost(model, optimizer, (x[:PROBES],), outputs=4, rows=rows, batch_size=BATCH,
                         memory_budget=64 * 2**20, device="cpu")


def test_the_bare_step_of_a_frozen_base_is_its_counted_forward_and_input_gradients():
    """The estimate's bare step (example-forwards) within 10 % of the flop counter's on a frozen base
    with adapters: about 2 B (no weight gradients of the frozen layers), where 3 B was counted."""
    x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(1))
    model = adapted_mlp(frozen_base=True)
    measured = measured_bare_step(model, x)
    assert measured < 2.3 * BATCH  # the setup: the frozen weights' gradients are not formed
    cost = estimate(model, x)
    assert abs(cost.bare_step / measured - 1) < 0.10, (cost.bare_step, measured)


def test_coverage_the_bare_step_of_a_fully_trained_model_is_three_forwards_an_example():
    """Coverage: the same model with every layer trained: the estimate's bare step within 10 % of
    the counted one (about 3 B), as before."""
    x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(1))
    model = adapted_mlp(frozen_base=False)
    measured = measured_bare_step(model, x)
    cost = estimate(model, x)
    assert abs(cost.bare_step / measured - 1) < 0.10, (cost.bare_step, measured)


def test_coverage_parameter_sized_arrays_count_the_adapters_only():
    """Coverage: under a frozen base, every parameter-sized array of the estimate is counted over the
    adapters' P values (hand count: dense float64 group state, AdamW, midpoint rule), never the base's."""
    x = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(1))
    model = adapted_mlp(frozen_base=True)
    rows, partitions, nodes = 3, 1, 1
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters == DEPTH * 2 * RANK * WIDTH
    cost = estimate(model, x, rows=rows)
    stacked = rows + 1 + partitions
    assert cost.settings["parameters"] == adapters
    assert cost.held == adapters * 4  # the adapters (float32) before the first step
    assert cost.memory["parameter_copies"] == (2 + nodes) * adapters * 4 + 2 * adapters * 4  # θ_k, θ_k+1, node; AdamW's 2
    assert cost.memory["group_gradients"] == rows * adapters * 8
    assert cost.memory["group_state"] == 2 * stacked * adapters * 8
    assert cost.memory["group_updates"] == stacked * adapters * 8
