"""Second read of the ledgers' blocked elementwise checks (genkernel/core/tracking/checks.py).

Faults fixed: the cost estimate's ``check_scratch`` was below what a tracker and its EMA ledgers keep
once the rows are split into several partitions (the block width came from the widest partition's
rows, the estimate's from all of them); the check read one value back to the host per block and
partition (on a GPU each read waits for the device). Coverage: the blocked check decides as the whole-array formula does (random layouts,
shared rows apart from the partition, NaN and inf), and a tracker's refusal reports the parameter's
largest excess and rolls the step back."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import genkernel.core.tracking.checks as checks
from genkernel import LedgerCheckError, NonFiniteError, PathKernelTracker
from genkernel.core.tracking.checks import CheckScratch, largest_excess

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _loss(out, y):
    return ((out - y) ** 2).sum(dim=1)


def _kept_bytes(scratch: CheckScratch) -> int:
    return sum(b.numel() * b.element_size() for b in scratch._buffers.values())


def _whole_array_excess(rows, part, shared, target, floor, extra, rtol):
    """max_i |Σ rows − target| − rtol (Σ|rows| + |target| + extra) − floor over the partition's rows
    and its shared ones: whole float64 arrays, NaN if any element gives NaN (as the old check's
    ``(excess <= 0).all()`` refused it), -inf for no elements."""
    chosen = rows.to(F64).reshape(rows.shape[0], -1)[list(range(part.start, part.stop)) + list(shared)]
    t, f = target.reshape(-1), floor.reshape(-1)
    scale = chosen.abs().sum(0) + t.abs() + (0 if extra is None else extra.reshape(-1).to(F64))
    excess = (chosen.sum(0) - t).abs() - rtol * scale - f
    if excess.numel() == 0:
        return -math.inf
    return math.nan if bool(excess.isnan().any()) else float(excess.max())


def _copying_reference(target, floor):
    def reference(columns, real, fl, spare):
        real.copy_(target.reshape(-1)[columns])
        fl.copy_(floor.reshape(-1)[columns])
    return reference


def test_the_estimate_bounds_what_the_checks_keep_with_several_partitions(monkeypatch):
    """Two partitions (class: groups 0-1, control: 2-3; rest row 4, rounding rows 5 and 6, the EMA's
    start row 7) and blocks of 320 bytes: the update check's buffers and the EMA sync's together are at
    most tracker.cost.memory["check_scratch"]. Before: the block width came from the widest partition's
    rows (3 of the 7), 13 columns against the estimate's 5, and the checks kept 1664 bytes against an
    estimate of 1000."""
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", 40 * 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    tracker = PathKernelTracker(model, optimizer, _loss, torch.randn(4, 6, dtype=F64),
                                num_groups={"class": 2, "control": 2})
    average = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.track_ema(lambda: average)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 6, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
        tracker.step(x, y, {"class": torch.arange(8) % 2, "control": torch.arange(8) // 4})
        with torch.no_grad():
            for n, p in model.named_parameters():
                average[n].mul_(0.8).add_(p, alpha=0.2)
        tracker.ema_ledgers  # the EMA sync and its check
    kept = _kept_bytes(tracker._check_scratch) + _kept_bytes(tracker.ema._check_scratch)
    assert _kept_bytes(tracker.ema._check_scratch) > 0
    assert 0 < kept <= tracker.cost.memory["check_scratch"]


class _HostReads(TorchFunctionMode):
    """Counts the reads of a tensor's values into Python (each waits for a GPU)."""

    READS = {"__float__", "__bool__", "__int__", "item", "tolist"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_the_check_reads_one_value_back_per_call_whatever_the_blocks(monkeypatch):
    """80 columns in blocks of 96 bytes, 2 partitions, one of them with a shared row apart from it: the
    result is read back to Python once (before: once per block and partition, 54 reads for 27 blocks
    of 3 columns, each a wait for the device on a GPU), and is still the whole-array formula's."""
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", 6 * 2 * 8)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(6, 80, generator=g, dtype=F64)
    target = rows[[0, 1, 4]].sum(0) + 1e-9 * torch.randn(80, generator=g, dtype=F64)
    floor = torch.zeros(80, dtype=F64)
    layout = {"a": (slice(0, 2), [4]), "b": (slice(2, 4), [4, 5])}
    with _HostReads() as reads:
        worst = largest_excess(rows, layout, _copying_reference(target, floor), 1e-6, CheckScratch())
    assert reads.count == 1
    for name, (part, shared) in layout.items():
        assert worst[name] == pytest.approx(_whole_array_excess(rows, part, shared, target, floor, None, 1e-6),
                                            rel=1e-12, abs=1e-18)


def test_coverage_rows_of_a_parameter_with_no_values_have_nothing_to_refuse():
    """Coverage: rows [R, 0, 4] (a parameter of shape (0, 4)): every partition's largest excess is -inf,
    as the whole-array check's ``all()`` of no elements passed."""
    rows = torch.zeros(4, 0, 4, dtype=F64)
    reference = _copying_reference(torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64))
    worst = largest_excess(rows, {"p": (slice(0, 2), [2, 3])}, reference, 1e-6, CheckScratch())
    assert worst == {"p": -math.inf}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_coverage_the_blocked_check_decides_as_the_whole_array_one(dtype, monkeypatch):
    """Coverage: random partitions (shared rows adjacent or apart, a partition of no rows of its own),
    block budgets from one column to all, targets inside and outside the tolerance, a NaN or an inf in
    a row, the target or the extra scale: the same pass or fail as the whole-array formula, and the
    same largest excess (to 1e-12 with float64 rows; float32 rows are summed in float32, as the check
    did before the blocks: to their rounding, far inside the tolerance)."""
    g = torch.Generator().manual_seed(11)
    rtol = 1e-5
    for trial in range(24):
        num_rows, numel = 7, int(torch.randint(1, 40, (1,), generator=g))
        monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", [1, 7 * 3 * 8, 7 * 16 * 8, 10**9][trial % 4])
        rows = torch.randn(num_rows, numel, generator=g, dtype=F64).to(dtype)
        layout = {"first": (slice(0, 2), [4, 5]), "second": (slice(2, 4), [4, 6]), "none": (slice(4, 4), [5, 6])}
        target = rows[[0, 1, 4, 5]].to(F64).sum(0)
        target += (1e-3 if trial % 3 == 0 else 1e-8) * torch.randn(numel, generator=g, dtype=F64)  # out / in
        floor = 1e-7 * torch.rand(numel, generator=g, dtype=F64)
        extra = torch.rand(numel, generator=g, dtype=F64).to(dtype) if trial % 2 else None
        where = int(torch.randint(0, numel, (1,), generator=g))
        bad = [math.nan, math.inf, None][trial % 3]
        if bad is not None:
            [rows[3], target, floor][trial % 3 if trial % 3 < 2 else 0][where] = bad
        worst = largest_excess(rows, layout, _copying_reference(target, floor), rtol, CheckScratch(), extra_scale=extra)
        for name, (part, shared) in layout.items():
            expected = _whole_array_excess(rows, part, shared, target, floor, extra, rtol)
            assert (worst[name] <= 0) == (expected <= 0), (trial, name, worst[name], expected)
            if math.isfinite(expected):
                scale = float(rows.to(F64).abs().nan_to_num(0, 0, 0).sum(0).max() + target.abs().nan_to_num(0, 0, 0).max())
                tolerance = 1e-12 * abs(expected) if dtype == F64 else 4 * torch.finfo(dtype).eps * scale
                assert abs(worst[name] - expected) <= tolerance, (trial, name)
            else:
                assert math.isnan(worst[name]) == math.isnan(expected), (trial, name)


def _tracker(num_groups=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, _loss, torch.randn(4, 6, dtype=F64), num_groups=num_groups)
    return model, optimizer, tracker


@pytest.mark.parametrize("nudge", [1e-3, math.inf])
def test_coverage_a_refused_step_reports_the_largest_excess_and_rolls_back(nudge, monkeypatch):
    """Coverage: blocks of 128 bytes (5 columns of the route's 3 rows); a hidden change of two elements of
    the first weight (in its second and last blocks, the larger in the second): the LedgerCheckError's excess gap is
    the parameter's largest excess (the whole-array formula on the step's rows), an inf gives the
    NonFiniteError, and either way the step is rolled back."""
    monkeypatch.setitem(checks.CHECK_BLOCK_BYTES, "cpu", 4 * 4 * 8)
    model, optimizer, tracker = _tracker()
    x, y, ids = torch.randn(8, 6, dtype=F64), torch.randn(8, 2, dtype=F64), torch.arange(8) % 2
    tracker.step(x, y, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    real_check, real_step = tracker._check_updates, optimizer.step
    monkeypatch.setattr(tracker, "_check_updates", lambda *a: (seen.append(a), real_check(*a)))

    def step_and_nudge(*args, **kwargs):
        result = real_step(*args, **kwargs)
        with torch.no_grad():
            model[0].weight.view(-1)[5] += nudge
            model[0].weight.view(-1)[29] += 0.5 * nudge
        return result

    monkeypatch.setattr(optimizer, "step", step_and_nudge)
    if math.isinf(nudge):
        with pytest.raises(NonFiniteError, match="parameter '0.weight' is non-finite"):
            tracker.step(x, y, ids)
    else:
        with pytest.raises(LedgerCheckError, match="split update of '0.weight'") as refused:
            tracker.step(x, y, ids)
        _, updates, theta_before, theta_after = seen[0]
        u, after = updates["0.weight"], theta_after["0.weight"]
        rounding_floor = after.abs() * torch.finfo(F64).eps + torch.finfo(F64).tiny * torch.finfo(F64).eps
        partitions = tracker.route.splitter_partitions
        (name, part), = partitions.slices.items()
        shared = [partitions.total, tracker.splitter.rounding_rows[name]]
        expected = _whole_array_excess(u, part, shared, after - theta_before["0.weight"], rounding_floor,
                                       tracker.splitter.rounding_scale.get("0.weight"), tracker.rtol)
        assert f"excess gap {expected:.3e}" in str(refused.value)
        assert expected == pytest.approx(nudge, rel=1e-6)  # the larger change, in the second block
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert tracker.ledger.steps == 1


def test_coverage_copies_of_the_scratch_hold_nothing_and_check_the_same():
    """Coverage: a deep copy, a pickled copy and a copy.copy of a used CheckScratch keep no buffers, and a
    tracker's next step checks and records the same whether its scratch is the kept one or a fresh one."""
    model, optimizer, tracker = _tracker()
    x, y, ids = torch.randn(8, 6, dtype=F64), torch.randn(8, 2, dtype=F64), torch.arange(8) % 2
    tracker.step(x, y, ids)
    assert tracker._check_scratch._buffers
    for copied in (copy.deepcopy(tracker._check_scratch), pickle.loads(pickle.dumps(tracker._check_scratch)),
                   copy.copy(tracker._check_scratch)):
        assert copied._buffers == {}
    kept = dict(tracker._check_scratch._buffers)
    for buffer in kept.values():
        buffer.fill_(math.nan)  # (contents left from the last step must not matter)
    model_twin, _, twin = _tracker()
    twin.step(x, y, ids)
    tracker.step(x, y, ids)
    twin.step(x, y, ids)
    assert twin._check_scratch is not tracker._check_scratch
    assert torch.equal(twin.ledger.contributions, tracker.ledger.contributions)
