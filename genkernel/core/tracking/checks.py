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

The arithmetic is in float64 whatever the rows' dtype: the sums of the rows and the magnitudes
are accumulated in float64.
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


def block_columns(rows: int, numel: int, element_size: int, device: torch.device) -> int:
    """Columns of a block of ``rows`` rows of ``element_size`` bytes: at most ``numel``, at least 1."""
    budget = CHECK_BLOCK_BYTES.get(device.type, DEVICE_CHECK_BLOCK_BYTES)
    return max(1, min(numel, budget // max(1, rows * element_size)))


def check_scratch_bytes(rows: int, numel: int, element_size: int, device: torch.device | str) -> int:
    """Bytes of the buffers :func:`largest_excess` keeps for blocks of ``rows`` rows of a parameter of
    ``numel`` values (``element_size`` bytes each) on ``device``: the float64 vectors and the block's
    magnitudes (a few MB on CPU however large the parameter; what the cost estimate counts)."""
    width = block_columns(rows, numel, element_size, torch.device(device))
    return VECTORS * width * 8 + max(1, rows) * width * element_size


class CheckScratch:
    """Buffers the checks reuse from step to step, grown to the largest block they were asked for
    (per device and dtype; a few MB on CPU: :data:`CHECK_BLOCK_BYTES`). Holds nothing a check's
    result depends on: a copy or a fresh one checks the same."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, purpose: str, device: torch.device, dtype: torch.dtype, sizes: Sequence[int]) -> list[torch.Tensor]:
        """Disjoint 1-D views of lengths ``sizes`` into the kept buffer of ``purpose`` (one per purpose,
        device and dtype: views taken for two purposes never overlap; contents undefined)."""
        key = (purpose, torch.device(device), dtype)
        needed = sum(sizes)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < needed:
            self._buffers.pop(key, None)  # (freed before the larger one is made)
            buffer = self._buffers[key] = torch.empty(needed, dtype=dtype, device=device)
        views, start = [], 0
        for size in sizes:
            views.append(buffer[start : start + size])
            start += size
        return views

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
    layouts = {name: contiguous_rows(part, shared) for name, (part, shared) in partitions.items()}
    block_rows = max(stop - start for (start, stop), _ in layouts.values())
    width = block_columns(block_rows, numel, flat.element_size(), flat.device)
    target, floor, spare, total, size = scratch.take("vectors", flat.device, torch.float64, [width] * VECTORS)
    (magnitudes,) = scratch.take("magnitudes", flat.device, flat.dtype, [max(1, block_rows) * width])
    worst = {name: -math.inf for name in partitions}
    for start in range(0, numel, width):
        columns = slice(start, min(numel, start + width))
        n = columns.stop - columns.start
        t, f, s, tot, sz = target[:n], floor[:n], spare[:n], total[:n], size[:n]
        reference(columns, t, f, s)
        target_size = torch.abs(t, out=s)
        for name, ((first, stop), shared) in layouts.items():
            block = flat[first:stop, columns]
            torch.sum(block, dim=0, dtype=torch.float64, out=tot)
            torch.sum(torch.abs(block, out=magnitudes[: block.numel()].view(block.shape)), dim=0,
                      dtype=torch.float64, out=sz)
            for index in shared:
                row = flat[index, columns]
                tot.add_(row)
                sz.add_(torch.abs(row, out=magnitudes[:n]))
            excess = tot.sub_(t).abs_()
            sz.add_(target_size)
            if extra is not None:
                sz.add_(extra[columns])
            excess.sub_(sz, alpha=rtol).sub_(f)
            worst[name] = _nan_max(worst[name], float(excess.max()))
    return worst


def _nan_max(a: float, b: float) -> float:
    """max(a, b), NaN if either is NaN (Python's ``max`` drops a NaN in second place)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


__all__ = ["CheckScratch", "block_columns", "check_scratch_bytes", "largest_excess"]
