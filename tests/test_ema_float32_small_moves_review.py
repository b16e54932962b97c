"""An EMA ledger of a float32 model whose steps move the weights by a few hundred ulps: the EMA's decay is fitted
from float32-rounded moves, so the fit is off by up to sqrt(Σ (ε θ̄)²) / sqrt(Σ (θ − θ̄)²) (2e-4 of 0.1 here), and a
small weight's offsets then miss its move by that much of |θ − θ̄|. Before, the offsets' check allowed only 4 ε|θ̄|
per element and refused the exact EMA of plain SGD at its second sync."""

import torch

from genkernel import PathKernelTracker
from genkernel.supervised import mlp, mse_loss


def test_a_float32_ema_with_small_moves_is_recorded_and_its_decay_is_the_ema_s():
    """SGD(lr=1e-3) on a float32 4-32-32-2 MLP, EMA decay 0.9 (AveragedModel, get_ema_multi_avg_fn), 4 steps:
    every sync is recorded (before: LedgerCheckError 'the EMA offsets of ... do not add up to the EMA's move' after
    step 2) and the fitted decays after the first (a copy: 0) are 0.9 to 1e-3."""
    torch.manual_seed(1)
    model = mlp(4, [32, 32], 2).float()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    tracker = PathKernelTracker(model, opt, mse_loss, torch.randn(3, 4, generator=gen), num_groups=2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ledgers = tracker.track_ema(ema)
    for _ in range(4):
        tracker.step(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen), torch.arange(8) % 2)
        ema.update_parameters(model)
    tracker.step(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen), torch.arange(8) % 2)
    assert len(ledgers.decays) == 4
    assert all(abs(d - 0.9) < 1e-3 for d in ledgers.decays[1:]), ledgers.decays
