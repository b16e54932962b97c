"""The kernel benchmark's own pieces: the minimal hook-based baseline computes the same kernel as
the torch.func reference, refuses what it cannot cover, and the interleaved timer runs every
method the same number of rounds in rotated order."""

import pytest
import torch
from torch import nn

from genkernel import gradient_kernel
from recipes.benchmarks.harness import interleaved
from recipes.benchmarks.kernels import Readout, linear_reference_kernel


@pytest.mark.parametrize("outputs", [1, 3])
def test_linear_reference_equals_the_functional_kernel(outputs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, outputs)).double()
    x1, x2 = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    reference = gradient_kernel(model, x1, x2, engine="functional")
    torch.testing.assert_close(linear_reference_kernel(model, x1, x2), reference, rtol=1e-12, atol=1e-12)


def test_linear_reference_refuses_other_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="every trainable parameter in an nn.Linear"):
        linear_reference_kernel(model, torch.randn(2, 3), torch.randn(2, 3))
    no_bias = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="trainable weight and bias"):
        linear_reference_kernel(no_bias, torch.randn(2, 3), torch.randn(2, 3))


def test_readout_is_a_fixed_projection_without_parameters():
    inner = nn.Conv2d(1, 1, 3, padding=1)
    model = Readout(inner, 16)
    assert [n for n, _ in model.named_parameters()] == ["model.weight", "model.bias"]
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(model(x), inner(x).flatten(1) @ model.w)


def test_interleaved_rotates_and_counts_rounds():
    calls = []
    methods = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = interleaved(methods, repeats=3)
    assert calls[:3] == ["a", "b", "c"]  # the first calls, in order
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each round starts one later
    for entry in out.values():
        assert len(entry["steady_s"]) == 3 and len(entry["steady_load"]) == 3
        assert entry["steady_min_s"] <= entry["steady_median_s"]
