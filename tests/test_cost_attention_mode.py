"""The estimate's measured training passes use the training pass's attention kernels, wherever it is made.

Before: PathKernelTracker._check_cost makes the estimate inside analysis_mode, which forces the math attention
backend and turns MultiheadAttention's fast path off: the measured row of the batched backward (graph_row_bytes) and
the training pass (training_pass_bytes) held attention probabilities the real training pass never holds. On a conv
net with GroupNorm and attention (a helper's hunt) the tracker's estimate was 2.15x the measured peak (634 MiB for
294), and a set-up that fits could be refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genkernel.core.push_memory as push_memory
from genkernel.core import cost
from genkernel.core.adapter import analysis_mode

pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.mha = nn.GroupNorm(4, channels), nn.MultiheadAttention(channels, 4, batch_first=True)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        return x + self.mha(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(b, c, h, w)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), Attention(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


@pytest.mark.parametrize("measure", [cost.graph_row_bytes, cost.training_pass_bytes])
def test_a_measure_made_inside_analysis_mode_is_the_training_passs(measure, monkeypatch):
    probes = (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
    monkeypatch.setattr(push_memory, "_MEASURED", type(push_memory._MEASURED)())  # (measured afresh, not recalled)
    outside = measure(model(), probes)
    monkeypatch.setattr(push_memory, "_MEASURED", type(push_memory._MEASURED)())
    net = model()
    with analysis_mode(net):
        inside = measure(net, probes)
    assert inside == outside > 0
