"""Multi-process runs: the tracker under DistributedDataParallel.

DDP averages the per-rank mean gradients. With R ranks holding equal shards of size B_r of a
global batch B = R·B_r, the averaged gradient is (1/R) Σ_r (1/B_r) Σ_{n ∈ shard r} ∇ℓ_n =
(1/B) Σ_n ∇ℓ_n, the single-process mean. The tracker therefore computes each rank's group
gradients on its shard and combines them exactly as DDP does (sum over ranks, divided by R); every
rank then splits the same update with the same optimizer state and keeps the same ledger, equal
to a single-process run on the same global batches. Unequal shards would weight examples
differently from that single-process run (DDP averages means), so they are refused.

Tested with 2 CPU processes on the gloo backend; the same code is meant to run with NCCL on GPUs,
which is untested here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    """The process group a DDP model averages its gradients over."""

    group: object
    world_size: int
    rank: int


def ddp_context(model: nn.Module) -> DistributedContext | None:
    """The context of a DDP-wrapped ``model``; None for a plain module."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("the model is wrapped in DistributedDataParallel but torch.distributed is not initialized")
    group = model.process_group
    return DistributedContext(group, dist.get_world_size(group), dist.get_rank(group))


def combine_group_gradients(grads: dict[str, torch.Tensor], local_batch: int, context: DistributedContext) -> dict[str, torch.Tensor]:
    """Average per-rank group gradients as DDP averages gradients: Σ_r ĝ_g^(r) / R.

    Raises ValueError on every rank when the ranks' batch sizes differ.
    """
    first = next(iter(grads.values()))
    sizes = [torch.zeros(1, dtype=torch.long, device=first.device) for _ in range(context.world_size)]
    dist.all_gather(sizes, torch.tensor([local_batch], dtype=torch.long, device=first.device), group=context.group)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"per-rank batch sizes differ ({sizes}): DDP averages per-rank means, which weights examples unequally. "
            "Give every rank the same number of examples (a padding sampler such as DistributedSampler repeats "
            "examples to make the shards equal)."
        )
    names = list(grads)
    flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=context.group)
    flat /= context.world_size
    out, start = {}, 0
    for n in names:
        width = grads[n][0].numel()
        out[n] = flat[:, start : start + width].reshape(grads[n].shape)
        start += width
    return out
