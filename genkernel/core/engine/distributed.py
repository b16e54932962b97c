"""Kernels split across the ranks of a torch.distributed process group.

Tested with 2 CPU processes on the gloo backend; the same code is meant to run with NCCL on GPUs,
which is untested here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..adapter import Batch, as_tuple, batch_size, unwrap
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

    Every rank passes the same ``x1`` and ``x2``; each computes a contiguous block of rows and the
    blocks are gathered, so every rank returns the full ``[M, N]`` (or ``[M, N, d, d]``) kernel.
    """
    model = unwrap(model)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group first, or use gradient_kernel")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    x1s = as_tuple(x1, name="x1")
    m = batch_size(x1s, name="x1")
    bounds = [round(i * m / world) for i in range(world + 1)]
    rows = slice(bounds[rank], bounds[rank + 1])
    other = x1s if x2 is None else x2
    # With more ranks than rows a rank computes one row for the shape and contributes none of it.
    mine = rows if rows.stop > rows.start else slice(0, 1)
    block = gradient_kernel(model, tuple(t[mine] for t in x1s), other, normalize=normalize, reduce=reduce,
                            memory_budget=memory_budget, engine=engine)[: rows.stop - rows.start]
    # all_gather needs equal shapes: pad every block to the largest and trim after.
    widest = max(bounds[r + 1] - bounds[r] for r in range(world))
    padded = block.new_zeros((widest, *block.shape[1:]))
    padded[: block.shape[0]] = block
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat([b[: bounds[r + 1] - bounds[r]] for r, b in enumerate(blocks)], dim=0)
