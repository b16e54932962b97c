"""A minibatch-std layer whose fixed groups must divide its batch.

Before: the coupling check ran the first four probes alone; a grouped minibatch standard deviation with groups of 8
(written, as some ProGAN ports are, as ``h.view(8, -1, ...)`` with no ``min(group, N)``) raised on them, and the check
answered "independent". The tracker then stopped with the view's bare RuntimeError from its one-example measure,
which said nothing of the cause. Now the check runs every probe where the first four are refused, and the tracker
names what it needs (a batch of one) and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.adapter import coupled_forward
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class GroupedMinibatchStd(nn.Module):
    """Minibatch std over groups of exactly 8 examples (the batch must be a multiple of 8)."""

    def forward(self, h):
        groups = h.view(8, -1, h.shape[1])
        s = groups.std(0, unbiased=False).mean(1, keepdim=True)  # [N / 8, 1]
        return torch.cat([h, s.repeat(8, 1)], dim=1)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), GroupedMinibatchStd(), nn.Tanh(), nn.Linear(7, 2)).to(F64)


def test_the_check_runs_every_probe_where_the_first_four_are_refused():
    probes = torch.randn(8, 3, dtype=F64)
    with pytest.raises(RuntimeError):
        net()(probes[:4])
    assert coupled_forward(net(), (probes,))
    assert coupled_forward(nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(F64), (probes,)) == []


def test_the_tracker_refuses_a_model_that_cannot_take_one_example_naming_the_fix():
    """The tracker measures and splits single examples' passes: a model that needs a multiple of 8 is refused with
    the cause and the fix (before: the view's RuntimeError from deep in the construction's measure)."""
    model = net()
    probes = torch.randn(8, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"fails on a batch of one probe \(RuntimeError.*min\(group_size, batch\)"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4)
