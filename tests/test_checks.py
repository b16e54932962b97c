"""The ledgers' elementwise checks (genkernel/core/tracking/checks.py) a block of columns at a time:
the largest excess equals the elementwise formula computed whole, whatever the block size; a NaN
anywhere fails; the buffers are kept and stay block-sized; and a tracker whose check runs in blocks
of a few columns still catches an update that differs from its split in one element of the last
block (and rolls the step back)."""

import math

import pytest
import torch
from torch import nn

import genkernel.core.tracking.checks as checks
from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.core.tracking.checks import CheckScratch, largest_excess

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
RTOL = 1e-6


def _brute_force(rows, part, shared, target, floor, extra):
    """max_i |Σ rows − target| − rtol (Σ |rows| + |target| + extra) − floor over the partition's rows
    and its shared ones, whole arrays in float64."""
    chosen = rows[list(range(part.start, part.stop)) + list(shared)].to(F64).reshape(len(range(part.start, part.stop)) + len(shared), -1)
    t, f = target.reshape(-1), floor.reshape(-1)
    scale = chosen.abs().sum(0) + t.abs() + (0 if extra is None else extra.reshape(-1).to(F64))
    return float(((chosen.sum(0) - t).abs() - RTOL * scale - f).max())


def _reference_of(target, floor):
    def reference(columns, real, fl, spare):
        real.copy_(target.reshape(-1)[columns])
        fl.copy_(floor.reshape(-1)[columns])
    return reference


@pytest.mark.parametrize("block_bytes", [8, 24 * 8, 10**9])  # one column a block, three, everything at once
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_largest_excess_is_the_elementwise_formula_whatever_the_block(block_bytes, dtype, monkeypatch):
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", block_bytes)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 5, 7, generator=g, dtype=F64).to(dtype)
    target = rows[[1, 2, 3, 6, 7]].to(F64).sum(0) + 1e-7 * torch.randn(5, 7, generator=g, dtype=F64)
    floor = 1e-9 * torch.rand(5, 7, generator=g, dtype=F64)
    extra = torch.rand(5, 7, generator=g, dtype=F64)
    layout = {"adjacent": (slice(1, 4), [4, 5]), "apart": (slice(1, 4), [6, 7]), "none": (slice(0, 2), [])}
    for extra_scale in (None, extra):
        worst = largest_excess(rows, layout, _reference_of(target, floor), RTOL, CheckScratch(), extra_scale=extra_scale)
        for name, (part, shared) in layout.items():
            expected = _brute_force(rows, part, shared, target, floor, extra_scale)
            # float32 rows are summed in float32 (checks.NARROW_SUMS): a few ε₃₂ of the rows' magnitudes apart
            rounding = 1e-15 if dtype == F64 else 8 * torch.finfo(torch.float32).eps * float(rows.abs().sum(0).max())
            assert worst[name] == pytest.approx(expected, rel=1e-12, abs=rounding), name


def test_a_nan_anywhere_fails_the_partitions_that_read_it(monkeypatch):
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", 3 * 2 * 8)  # two columns a block
    rows = torch.zeros(4, 11, dtype=F64)
    rows[2, 9] = math.nan  # in the last block but one
    reference = _reference_of(torch.zeros(11, dtype=F64), torch.zeros(11, dtype=F64))
    worst = largest_excess(rows, {"reads": (slice(0, 3), []), "skips": (slice(0, 2), [3])}, reference, RTOL,
                           CheckScratch())
    assert math.isnan(worst["reads"])
    assert worst["skips"] <= 0
    assert not worst["reads"] <= 0  # (how the callers compare: NaN fails)


def test_the_buffers_are_kept_and_block_sized(monkeypatch):
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", 4 * 100 * 8)  # 100 columns of 4 rows
    scratch = CheckScratch()
    rows = torch.randn(4, 10_000, dtype=F64)
    reference = _reference_of(rows.sum(0), torch.zeros(10_000, dtype=F64))
    largest_excess(rows, {"p": (slice(0, 4), [])}, reference, RTOL, scratch)
    pointers = {key: buffer.data_ptr() for key, buffer in scratch._buffers.items()}
    assert sum(b.numel() for b in scratch._buffers.values()) == checks.VECTORS * 100 + 4 * 100  # not 10 000
    largest_excess(rows, {"p": (slice(0, 4), [])}, reference, RTOL, scratch)
    assert {key: buffer.data_ptr() for key, buffer in scratch._buffers.items()} == pointers  # nothing made afresh


def test_a_tracker_checking_in_small_blocks_catches_one_wrong_element_of_the_last_block(monkeypatch):
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", 3 * 7 * 8)  # 7 columns of the 3 rows at a time
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(out, y):
        return ((out - y) ** 2).sum(dim=1)

    x, y = torch.randn(8, 6, dtype=F64), torch.randn(8, 2, dtype=F64)
    tracker = PathKernelTracker(model, optimizer, loss_fn, torch.randn(4, 6, dtype=F64), num_groups=2)
    ids = torch.arange(8) % 2
    tracker.step(x, y, ids)  # right: checked in blocks of 7 of the first weight's 30 values
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    real_step = optimizer.step

    def step_and_nudge_last_element(*args, **kwargs):  # (a hidden change of one element the split cannot see)
        result = real_step(*args, **kwargs)
        with torch.no_grad():
            model[0].weight.view(-1)[-1] += 1e-3
        return result

    monkeypatch.setattr(optimizer, "step", step_and_nudge_last_element)
    with pytest.raises(LedgerCheckError, match="split update of '0.weight'"):
        tracker.step(x, y, ids)
    monkeypatch.setattr(optimizer, "step", real_step)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # rolled back
    assert tracker.ledger.steps == 1
    tracker.step(x, y, ids)
    assert tracker.ledger.relative_residual() < 1e-3


@pytest.mark.parametrize("group_state", ["dense", "factored"])
def test_the_estimate_counts_the_buffers_the_check_keeps(group_state, monkeypatch):
    """tracker.cost.memory["check_scratch"] is the bytes the update check's kept buffers hold after a step (one
    partition: its rows and the rest and rounding rows after them are one block), here with blocks of 40 values."""
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", 40 * 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(out, y):
        return ((out - y) ** 2).sum(dim=1)

    tracker = PathKernelTracker(model, optimizer, loss_fn, torch.randn(4, 6, dtype=F64), num_groups=3,
                                group_state=group_state)
    tracker.step(torch.randn(8, 6, dtype=F64), torch.randn(8, 2, dtype=F64), torch.arange(8) % 3)
    kept = sum(b.numel() * b.element_size() for b in tracker._check_scratch._buffers.values())
    assert kept == tracker.cost.memory["check_scratch"] > 0
