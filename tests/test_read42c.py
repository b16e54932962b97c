"""Second read of the EMA ledger check's carried-drift floor (helper "read42c", session 42).

1eb769a widened the EMA ledger check's floor (core/tracking/ema.py: EMALedgers.sync, step 3) by
gain · |(θ̄_k − θ̄_0) − Σ E_k|, the offsets' drift measured from the offsets themselves. An error in an offset row
is then measured as drift and allowed: the check could no longer see offsets gone wrong. The fix bounds the carried
drift by a recurrence of the EMA's measured moves alone (A_{k+1} = β A_k + |Δθ̄ − (1 − β)(θ − θ̄_k)|
+ (1 − β)|Σ D + θ_0 − θ|), which the drift obeys with signs, and allows at most that.
"""
import math

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.errors import LedgerCheckError
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(dtype, steps, inject=None, gamma=1.0, beta=0.8, partitions=False):
    """A small MLP with an EMA ledger; ``inject(tracker, step)`` runs after each step's sync. Returns the tracker and
    the largest ratio of the measured carried drift to its bound over the syncs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)  # large weights: the moves are a few ulps of them in float32
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=gamma)
    probes = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)).to(dtype)
    groups = {"a": 2, "b": 3} if partitions else 2
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=groups)
    average = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.track_ema(lambda: average)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 3, generator=g).to(dtype), torch.randn(8, 2, generator=g).to(dtype)
        ids = torch.arange(8)
        tracker.step(x, y, {"a": ids % 2, "b": ids % 3} if partitions else ids % 2)
        sched.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                average[n].lerp_(p, 1 - beta)
        tracker.ema_ledgers  # the sync
        ema = tracker.ema
        if getattr(ema, "drift_allowance", None) is None:
            worst = math.inf  # (no bound kept)
        primary = ema.model.partitions.slices[ema.model.partitions.primary]
        shared = [ema.rows, ema.rounding_rows[ema.model.partitions.primary], ema.start_row]
        for n in ema.offset if worst < math.inf else ():
            carried = ((ema.last_bar[n] - ema.bar_start[n]) - ema.offset[n][primary].sum(0)
                       - ema.offset[n][shared].sum(0)).abs()
            bound = ema.drift_allowance[n] * (1 + 1e-6) + (ema.last_bar[n] - ema.bar_start[n]).abs() * 1e-10
            worst = max(worst, float((carried / bound.clamp_min(1e-300)).max()))
        if inject is not None:
            inject(tracker, step)
    return tracker, worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("partitions", [False, True])
def test_an_offset_gone_wrong_is_caught_by_the_next_sync(dtype, partitions):
    """An error put into one EMA offset row (the primary partition's group 0, one element of the last layer's
    weight, 1e-3 of the EMA's whole drift there) after the sync of step 3: the sync of step 4 raises
    LedgerCheckError, in float64 and float32, with one partition or two.

    Fails on the old code: no error at all (6 steps run): the floor allowed gain · |carried drift| with the carried
    drift measured from the offsets, so the error itself was counted as drift and allowed (the same for an error of
    1.0 of the drift); before 1eb769a this was caught at step 4."""
    def inject(tracker, step):
        if step == 3:
            ema = tracker.ema
            scale = float((ema.last_bar["2.weight"] - ema.bar_start["2.weight"]).abs().max())
            ema.offset["2.weight"][0].view(-1)[0] += 1e-3 * scale

    with pytest.raises(LedgerCheckError, match="after step 4 the EMA offsets of '2.weight'"):
        _run(dtype, 6, inject=inject, partitions=partitions)


@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("beta", [0.8, 0.99])
def test_the_carried_drift_stays_within_its_bound_in_float32(gamma, beta):
    """A float32 run with large weights (moves of a few ulps) and a StepLR halving the rate (the case 1eb769a was
    made for), 12 steps with two partitions: no sync is refused, and the carried drift measured from the offsets
    never exceeds the bound kept from the EMA's moves (the largest ratio is at most 1).

    Fails on the old code: the EMA ledgers keep no bound (the ratio is taken as infinite); the drift they allowed
    was whatever the offsets said, unbounded."""
    _, worst = _run(torch.float32, 12, gamma=gamma, beta=beta, partitions=True)
    assert worst <= 1.0


def test_a_saved_ema_state_keeps_the_bound_and_resumes_alike(tmp_path):
    """The EMA ledgers' state round-trips the carried drift's bound: a state saved after 3 steps and loaded into a
    fresh EMALedgers gives the same bound tensors, bit for bit.

    Fails on the old code: the state has no 'drift_allowance' (KeyError)."""
    tracker, _ = _run(torch.float32, 3)
    state = tracker.ema.state_dict()
    path = tmp_path / "ema.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=False)
    allowance = loaded["drift_allowance"]
    tracker.ema.drift_allowance = None
    tracker.ema.load_state_dict(loaded)
    assert set(allowance) == set(tracker.ema.offset)
    assert all(torch.equal(tracker.ema.drift_allowance[n], allowance[n]) for n in allowance)
    assert any(float(a.max()) > 0 for a in allowance.values())


class _Flaky(nn.Module):
    """A forward whose output differs between calls without drawing from torch's generators (a Python counter)."""

    def __init__(self, outputs):
        super().__init__()
        self.lin = nn.Linear(2, 2).double()
        self.outputs, self.calls = outputs, 0

    def forward(self, x):
        value = self.outputs[min(self.calls, len(self.outputs) - 1)]
        self.calls += 1
        return self.lin(x) * 0 + torch.tensor(value, dtype=torch.float64)


@pytest.mark.parametrize("outputs", [
    [[math.inf, 1.0], [5.0, 1.0]],  # overflowed in the first pass only
    [[math.inf, 1.0], [-math.inf, 1.0]],  # opposite infinities
    [[5.0, 1.0], [math.inf, 1.0]],  # (the second pass only: refused before too)
])
def test_an_infinity_in_one_pass_only_is_not_taken_as_repeatable(outputs):
    """repeatable_output (core/engine/kernels.py: _close) of a forward that gives an infinity in one of its two
    passes only, or infinities of opposite signs: refused as not deterministic, as a finite difference is; the same
    infinity in both passes is still accepted (tests/test_dfuzz42.py).

    Fails on the old code (the first two cases): the masked norms were ‖a − b‖ = inf <= rtol · ‖a‖ = inf, so the
    forward was accepted and the first pass's output returned ([inf, 1.0]) where the second gave 5.0 or −inf.
    Coverage: the third case (refused on the old code as well)."""
    from genkernel.core.engine.kernels import repeatable_output

    model = _Flaky(outputs)
    with pytest.raises(ValueError, match="not deterministic in eval mode"):
        repeatable_output(model, (torch.ones(1, 2, dtype=torch.float64),), dict(model.named_parameters()), "x")
