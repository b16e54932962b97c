"""An EMA sync cut off after its ledgers are written (an interrupt while the new offsets are formed)
leaves the EMA ledgers and their state as they were, so the next sync records the same move once:
before, the ledgers kept the update and the offsets took it, but the last EMA weights did not, and
the next sync booked the move a second time."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss

F64 = torch.float64


class _InterruptedAdd:
    """Stands in for a tensor whose next ``+`` is interrupted."""

    def __add__(self, other):
        raise KeyboardInterrupt


def _run(interrupt_at):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    probes = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2)
    average = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.track_ema(lambda: average)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        x, y = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64)
        tracker.step(x, y, torch.arange(6) % 2)
        with torch.no_grad():
            for n, p in model.named_parameters():
                average[n].mul_(0.8).add_(p, alpha=0.2)
        if step == interrupt_at:
            start, tracker.ema.start = tracker.ema.start, _InterruptedAdd()
            with pytest.raises(KeyboardInterrupt):
                tracker.ema_ledgers
            tracker.ema.start = start
        tracker.ema_ledgers  # the sync (records the move once)
    return tracker


def test_a_sync_cut_off_after_the_ledgers_are_written_is_recorded_once_on_the_next():
    straight, cut = _run(None), _run(2)
    for name, ledger in straight.ema_ledgers.items():
        other = cut.ema_ledgers[name]
        assert torch.equal(other.contributions, ledger.contributions)  # before: the move of step 2 twice
        assert torch.equal(other.residual, ledger.residual) and torch.equal(other.f_end, ledger.f_end)
    assert cut.ema.decays == straight.ema.decays
