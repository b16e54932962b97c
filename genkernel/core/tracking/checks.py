"""The ledgers' elementwise checks: a partition's rows add up to a real change.

Every recorded step is checked element by element: the tracker's split update against the
optimizer's real step Δ_k (``PathKernelTracker._check_updates``), an EMA's offsets against the EMA's
real move (``EMALedgers.sync``). Both ask, for every partition p and every element i of a parameter,

    excess_i = |Σ_{r∈p} rows[r, i] − target_i| − rtol (Σ_{r∈p} |rows[r, i]| + |target_i| + extra_i) − floor_i ≤ 0,

with the rows of p its groups and the rows it shares with the other partitions (the rest, its
rounding row, ...). :func:`largest_excess` returns max_i excess_i per partition.

It runs a block of columns at a time in buffers kept from step to step (:class:`CheckScratch`):
parameter-sized temporaries made afresh at every step cost a CPU process a page fault per 4 KB
(glibc hands large freed arrays back to the system), which on a small model was most of the
check's time (measured: the update check of a 784-256-256-10 MLP at B = 256, 3 rows of 269k
float64 values, took 2.3-2.5 ms with the allocator set to keep freed memory and 8.6-17.5 ms without,
3000 page faults a step). With the blocks and the kept buffers it makes no fresh array of a
parameter's size, whatever the allocator.

The sums over a block's rows are accumulated in the rows' dtype when it is float32 (as the check
did on whole arrays before: a reduction of float32 rows cast to float64 took about twice as long,
100-105 ms against 52-54 ms for 2002 rows of 20k values on one CPU thread; the float32 sums'
rounding, a few ε₃₂ Σ|rows|, is far below the float32 state's rtol of 1e-5), otherwise in float64;
everything after the sums is in float64. The partitions' maxima are read back to the host once a
call, whatever the number of blocks (on a GPU each read waits for the device).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from ..grouping import contiguous_rows

# Bytes of a rows block (rows × columns) a check reads at once: on CPU a block that stays in cache
# and buffers of a few MB; elsewhere (CUDA) larger, as every block is a few kernel launches.
CHECK_BLOCK_BYTES = {"cpu": 4 * 2**20}
DEVICE_CHECK_BLOCK_BYTES = 256 * 2**20
VECTORS = 5  # float64 buffers of a block's columns: the target, the floor, a spare, the total, the size
NARROW_SUMS = {torch.float32}  # row dtypes summed in their own dtype (a partial sum of a block's columns besides)


# Rows a block's budget is counted for: with more, a block is that many times wider than the budget
# allows, so each row's segment stays long. Measured (one CPU thread, 2002 rows of 20k values): blocks
# of 4 MB (261 float64 or 523 float32 columns) took 1.06-1.26x the whole-array check's time, blocks
# of 1024 float64 or 2048 float32 columns (16 MB) 0.90-0.96x.
BUDGET_ROWS = 512


def block_columns(rows: int, numel: int, element_size: int, device: torch.device) -> int:
    """Columns of a block of ``rows`` rows of ``element_size`` bytes: at most ``numel``, at least 1."""
    budget = CHECK_BLOCK_BYTES.get(device.type, DEVICE_CHECK_BLOCK_BYTES)
    return max(1, min(numel, budget // max(1, min(rows, BUDGET_ROWS) * element_size)))


def check_scratch_bytes(rows: int, numel: int, element_size: int, device: torch.device | str) -> int:
    """Bytes of the buffers :func:`largest_excess` keeps for blocks of ``rows`` rows of a parameter of
    ``numel`` values (``element_size`` bytes each) on ``device``: the float64 vectors and the block's
    magnitudes, with float32 rows a partial sum besides (a few MB on CPU however large the parameter;
    what the cost estimate counts: the most the checks keep, whichever rows a partition reads)."""
    width = block_columns(rows, numel, element_size, torch.device(device))
    partial = 1 if element_size == 4 else 0  # (float32: NARROW_SUMS)
    return VECTORS * width * 8 + (max(1, rows) + partial) * width * element_size


class CheckScratch:
    """Buffers the checks reuse from step to step, grown to the largest block they were asked for
    (per device and dtype; a few MB on CPU, :data:`CHECK_BLOCK_BYTES`, R / :data:`BUDGET_ROWS` times
    that with R > BUDGET_ROWS rows). Holds nothing a check's result depends on: a copy or a fresh one
    checks the same."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, purpose: str, device: torch.device, dtype: torch.dtype, size: int) -> torch.Tensor:
        """A 1-D view of ``size`` values of the kept buffer of ``purpose`` (one per purpose, device and
        dtype: views taken for two purposes never overlap; contents undefined)."""
        key = (purpose, torch.device(device), dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            self._buffers.pop(key, None)  # (freed before the larger one is made)
            buffer = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size]

    def __getstate__(self):  # the buffers are scratch: not saved, not copied
        return {"_buffers": {}}

    def __deepcopy__(self, memo):
        return CheckScratch()


def largest_excess(
    rows: torch.Tensor,
    partitions: Mapping[str, tuple[slice, Sequence[int]]],
    reference: Callable[[slice, torch.Tensor, torch.Tensor, torch.Tensor], None],
    rtol: float,
    scratch: CheckScratch,
    extra_scale: torch.Tensor | None = None,
) -> dict[str, float]:
    """``{partition: max_i excess_i}`` (the module docstring's excess) for ``rows [R, *shape]``.

    ``partitions``: ``{name: (part, shared)}``, the rows of a partition (a slice) and the single
    rows it shares (indices outside it). ``reference(columns, target, floor, spare)`` writes the
    real change and the floor of the flattened elements ``columns`` into the float64 vectors
    ``target`` and ``floor`` (``spare``: a vector of theirs it may use). ``extra_scale``: a further
    scale of the shape of one row (the optimizer state's rounding), or None. A NaN anywhere gives
    NaN (compare with ``<= 0``: NaN fails)."""
    flat = rows.reshape(rows.shape[0], -1)
    numel = flat.shape[1]
    extra = None if extra_scale is None else extra_scale.reshape(-1)
    layouts = [(name, *contiguous_rows(part, shared)) for name, (part, shared) in partitions.items()]
    block_rows = max(stop - first for _, (first, stop), _ in layouts)
    # The width is set by all R rows, not the widest partition's: the buffers then never exceed what
    # check_scratch_bytes(R, ...) counts, however the rows are split into partitions.
    width = block_columns(flat.shape[0], numel, flat.element_size(), flat.device)
    vectors = scratch.take("vectors", flat.device, torch.float64, VECTORS * width).view(VECTORS, width)
    narrow = flat.dtype in NARROW_SUMS
    magnitudes = scratch.take("magnitudes", flat.device, flat.dtype, (max(1, block_rows) + narrow) * width)
    partial_sums = magnitudes[max(1, block_rows) * width :]  # (float32 rows: a block's sums before float64)
    maxima: list[torch.Tensor] = []  # per block, per partition: 0-dim, read back once at the end
    for start in range(0, numel, width):
        n = min(numel, start + width) - start
        columns = slice(start, start + n)
        target, floor, spare, total, size = (vectors if n == width else vectors[:, :n]).unbind(0)
        columns_of_rows = flat if n == numel else flat[:, columns]
        reference(columns, target, floor, spare)
        target_size = torch.abs(target, out=spare)
        for _, (first, stop), shared in layouts:
            block = columns_of_rows[first:stop]
            block_magnitudes = torch.abs(block, out=magnitudes[: block.numel()].view(block.shape))
            if narrow:
                total.copy_(torch.sum(block, dim=0, out=partial_sums[:n]))
                size.copy_(torch.sum(block_magnitudes, dim=0, out=partial_sums[:n]))
            else:
                torch.sum(block, dim=0, dtype=torch.float64, out=total)
                torch.sum(block_magnitudes, dim=0, dtype=torch.float64, out=size)
            for index in shared:
                row = columns_of_rows[index]
                total.add_(row)
                size.add_(torch.abs(row, out=magnitudes[:n]))
            excess = total.sub_(target).abs_()
            size.add_(target_size)
            if extra is not None:
                size.add_(extra[columns])
            excess.sub_(size, alpha=rtol).sub_(floor)
            maxima.append(excess.max())
    worst = {name: -math.inf for name, _, _ in layouts}
    if maxima:  # (one read: on a GPU each float() would wait for the device)
        values = [float(maxima[0])] if len(maxima) == 1 else torch.stack(maxima).tolist()
        for i, value in enumerate(values):
            name = layouts[i % len(layouts)][0]
            worst[name] = _nan_max(worst[name], value)
    return worst


def _nan_max(a: float, b: float) -> float:
    """max(a, b), NaN if either is NaN (Python's ``max`` drops a NaN in second place)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


__all__ = ["BUDGET_ROWS", "CheckScratch", "block_columns", "check_scratch_bytes", "largest_excess"]
