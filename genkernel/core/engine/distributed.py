"""Kernels split across the ranks of a torch.distributed process group.

Tested with 2 CPU processes on the gloo backend; the same code is meant to run with NCCL on GPUs,
which is untested here.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

from ..adapter import Batch, as_tuple, batch_size, check_finite, unwrap
from .factors import DEFAULT_MEMORY_BUDGET
from .kernels import gradient_kernel


def distributed_gradient_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    normalize: bool = False,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    engine: str = "auto",
    group: object | None = None,
) -> torch.Tensor:
    """:func:`gradient_kernel` with the rows of ``x1`` split across the ranks of ``group``.

    Every rank passes the same model, ``x1`` and ``x2`` (checked: ValueError on every rank when the
    ranks' inputs or weights differ); each computes a contiguous block of rows and the blocks are
    gathered, so every rank returns the full ``[M, N]`` (or ``[M, N, d, d]``) kernel. A block that
    fails on one rank (out of memory there) raises on every rank, of the failing rank's kind.
    """
    model = unwrap(model)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group first, or use gradient_kernel")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of `group`: call distributed_gradient_kernel on its ranks only")
    x1s = as_tuple(x1, name="x1")
    m = batch_size(x1s, name="x1")
    _check_same_on_every_rank(model, x1s, None if x2 is None else as_tuple(x2, name="x2"), world, group)
    # The whole inputs' checks, on every rank alike (a rank's block alone would name its own rows).
    check_finite(x1s, name="x1")
    if x2 is not None:
        check_finite(as_tuple(x2, name="x2"), name="x2")
    bounds = [round(i * m / world) for i in range(world + 1)]
    rows = slice(bounds[rank], bounds[rank + 1])
    other = x1s if x2 is None else x2
    # With more ranks than rows a rank computes one row for the shape and contributes none of it.
    mine = rows if rows.stop > rows.start else slice(0, 1)
    try:
        block = gradient_kernel(model, tuple(t[mine] for t in x1s), other, normalize=normalize, reduce=reduce,
                                memory_budget=memory_budget, engine=engine)[: rows.stop - rows.start]
        error = None
    except Exception as caught:  # noqa: BLE001 - told to every rank below, then raised here
        block, error = None, caught
    _agree_on_failure(error, rows, world, rank, group, next((p.device for p in model.parameters()), x1s[0].device))
    return gathered_rows(block, [bounds[r + 1] - bounds[r] for r in range(world)], group)


def gathered_rows(rows: torch.Tensor, counts: list[int], group: object) -> torch.Tensor:
    """Every rank's ``rows [counts[r], ...]`` concatenated in rank order, ``[Σ counts, ...]``: this rank's are
    ``rows``, the ranks' counts ``counts`` are known to all of them. all_gather needs equal shapes: each rank's
    rows are padded to the largest count and trimmed after."""
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    blocks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(blocks, counts)], dim=0)


_KINDS = (ValueError, TypeError, MemoryError, RuntimeError)


def _agree_on_failure(error: Exception | None, rows: slice, world: int, rank: int, group: object,
                      device: torch.device) -> None:
    """Raise on every rank when a rank's block of rows failed (a check on its rows, out of memory):
    the others would otherwise wait for its block in the gather until the process group's timeout.
    The failing rank raises its own ``error``; the others an error of its kind naming it."""
    kind = 0 if error is None else 1 + next((i for i, k in enumerate(_KINDS) if isinstance(error, k)), len(_KINDS) - 1)
    kinds = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(kinds, torch.tensor([kind], dtype=torch.long, device=device), group=group)
    if error is not None:
        raise error
    failed = [r for r, k in enumerate(kinds) if int(k)]
    if failed:
        raise _KINDS[int(kinds[failed[0]]) - 1](
            f"the kernel's rows failed on rank{'s' if len(failed) > 1 else ''} {failed} (that rank's error says why; "
            f"rank {rank} computed rows {rows.start}..{rows.stop - 1}): no rank returns the kernel"
        )


def values_digest(tensors) -> int:
    """A CRC of the tensors' shapes, dtypes and bytes: equal on two ranks exactly when they are."""
    crc = 0
    for t in tensors:
        t = t.detach()
        crc = zlib.crc32(f"{tuple(t.shape)}{t.dtype}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes(), crc)
    return crc


def _check_same_on_every_rank(model: nn.Module, x1: tuple, x2: tuple | None, world: int, group: object) -> None:
    """Raise ValueError on every rank when the ranks' ``x1``, ``x2`` or parameters differ: the
    gathered rows would come from different kernels."""
    device = next((p.device for p in model.parameters()), x1[0].device)
    # buffers too: BatchNorm's running statistics enter every row's kernel. They differ after any training step under
    # DDP (its broadcast_buffers=True copies rank 0's buffers at the start of the next forward, and each rank's
    # forward then updates them with its own batch), so they are named apart, with the fix.
    mine = [values_digest(x1), -1 if x2 is None else values_digest(x2), values_digest(model.parameters()),
            values_digest(model.buffers())]
    gathered = [torch.zeros(4, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.long, device=device), group=group)
    rows = [[int(v) for v in g] for g in gathered]
    differ = [what for i, what in enumerate(("x1", "x2", "the model's parameters", "the model's buffers"))
              if len({r[i] for r in rows}) > 1]
    if differ == ["the model's buffers"]:
        raise ValueError(
            "the ranks passed models whose buffers differ (BatchNorm's running statistics: DDP copies rank 0's "
            "buffers only at the start of its next forward, and each rank's training forward updates its own): each "
            "rank computes rows of one kernel. Copy rank 0's buffers to every rank before the call (for b in "
            "model.buffers(): torch.distributed.broadcast(b, 0)), or train with SyncBatchNorm"
        )
    if differ:
        raise ValueError(
            f"the ranks passed different {' and '.join(differ)}: each rank computes rows of one kernel, so every rank "
            "must pass the same model (the same weights and buffers) and the same inputs; use gradient_kernel for a rank's own"
        )
