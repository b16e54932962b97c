"""Multi-process runs: the tracker under DistributedDataParallel.

DDP averages the per-rank mean gradients. With R ranks holding equal shards of size B_r of a
global batch B = R·B_r, the averaged gradient is (1/R) Σ_r (1/B_r) Σ_{n ∈ shard r} ∇ℓ_n =
(1/B) Σ_n ∇ℓ_n, the single-process mean. The tracker therefore computes each rank's group
gradients on its shard and combines them exactly as DDP does (sum over ranks, divided by R); every
rank then splits the same update with the same optimizer state and keeps the same ledger, equal
to a single-process run on the same global batches. Unequal shards would weight examples
differently from that single-process run (DDP averages means), so they are refused; so are ranks
whose trackers lay out their group rows differently (other partitions, names or order), whose rows
the sum would mix.

A step refused on one rank only (a group id out of range, a non-finite loss, a failed check) is
refused on every rank: the ranks meet at a few points of each step (:class:`StepAgreement`), so
that none runs on into a collective the others never join, or steps while the others roll back.

BatchNorm with batch statistics (training mode, SyncBatchNorm included) is refused on every rank
(:func:`check_replicated`). Every rank must observe every micro-batch: a rank that never calls
``observe()`` is in DDP's gradient averaging while the others wait in the micro-batch's meeting, two
different collectives, so they wait until the process group's timeout (detecting it would mean
carrying a flag in DDP's own communication, a comm hook).

Tested with 2 CPU processes on the gloo backend; the same code is meant to run with NCCL on GPUs,
which is untested here.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LedgerCheckError, NonFiniteError


@dataclass(frozen=True)
class DistributedContext:
    """The process group a DDP model averages its gradients over.

    ``layout``: what every rank's group rows must agree on (the partitions' names and sizes, in
    order); ``device``: where the tensors of the tracker's collectives live (the model's)."""

    group: object
    world_size: int
    rank: int
    layout: tuple = ()
    device: torch.device = torch.device("cpu")


def ddp_context(model: nn.Module, layout: tuple = ()) -> DistributedContext | None:
    """The context of a DDP-wrapped ``model``; None for a plain module. ``layout``: the tracker's
    partitions as ``((name, G), ...)``, checked to agree across ranks at every combination."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("the model is wrapped in DistributedDataParallel but torch.distributed is not initialized")
    group = model.process_group
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    context = DistributedContext(group, dist.get_world_size(group), dist.get_rank(group), tuple(layout), device)
    check_replicated(model.module, context)
    return context


def check_replicated(module: nn.Module, context: DistributedContext | None) -> None:
    """Refuse, under DDP, modules whose replicas stop being one model: BatchNorm that normalizes
    with the batch's statistics (training mode, or no running statistics; SyncBatchNorm too).

    Each rank would normalize its shard with the shard's own statistics (not the global batch's, so
    the run is not the single-process one) and update its running statistics from its shard alone:
    between steps the ranks' models differ (DDP broadcasts rank 0's buffers only at the next
    forward), so the ranks' ledgers disagree and none is exact. Every rank holds the same modules in
    the same modes, so every rank raises here, with no collective to wait in."""
    if context is None:
        return
    batch_norms = [
        f"{name or type(module).__name__} ({type(m).__name__})" for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or (m.running_mean is None and m.running_var is None))
    ]
    if batch_norms:
        raise ValueError(
            f"under DistributedDataParallel, {batch_norms[:5]} normalize each rank's shard with its own batch "
            "statistics and update each rank's running statistics from its shard alone: the ranks' models differ "
            "between steps and the run is not the single-process run on the global batches, so no rank's ledger "
            "would be exact. Put BatchNorm in eval mode (module.eval(): frozen running statistics), replace it with "
            "GroupNorm or LayerNorm, or track on one process"
        )


def _code(text: str) -> int:
    """A digest of ``text`` equal on every process (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32(text.encode())


def combine_group_gradients(grads: dict[str, torch.Tensor], local_batch: int, context: DistributedContext) -> dict[str, torch.Tensor]:
    """Average per-rank group gradients as DDP averages gradients: Σ_r ĝ_g^(r) / R.

    ``grads``: ``{name: Tensor[rows, *param.shape]}``; returns the same shapes, equal on every rank.
    Raises ValueError on every rank when the ranks' batch sizes differ, or when their group rows
    are laid out differently (other partitions, another parameter set or dtype): summed row by
    row, such rows would mix one rank's groups with another's.
    """
    first = next(iter(grads.values()))
    names = list(grads)
    rows = first.shape[0]
    # Everything the ranks must agree on for the row-by-row sum, gathered in the one collective
    # that also gathers the batch sizes.
    shapes = ";".join(f"{n}:{tuple(grads[n].shape[1:])}" for n in names)
    mine = [local_batch, rows, _code(repr(context.layout)), _code(shapes), _code(str(first.dtype))]
    gathered = [torch.zeros(len(mine), dtype=torch.long, device=first.device) for _ in range(context.world_size)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.long, device=first.device), group=context.group)
    gathered = [[int(v) for v in g] for g in gathered]
    differ = sorted(r for r, g in enumerate(gathered) if g[1:] != mine[1:])
    if differ:
        raise ValueError(
            f"the ranks' trackers lay out their group rows differently (rank {context.rank}: partitions "
            f"{dict(context.layout) or '?'}, {rows} rows of {first.dtype} group gradients; ranks {differ} differ): "
            "summed across ranks, one rank's groups would be mixed with another's. Build every rank's tracker with "
            "the same num_groups (the same partitions, names and order) and state_dtype"
        )
    sizes = [g[0] for g in gathered]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"per-rank batch sizes differ ({sizes}): DDP averages per-rank means, which weights examples unequally. "
            "Give every rank the same number of examples (a padding sampler such as DistributedSampler repeats "
            "examples to make the shards equal)."
        )
    flat = torch.cat([grads[n].reshape(rows, -1) for n in names], dim=1)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=context.group)
    flat /= context.world_size
    out, start = {}, 0
    for n in names:
        width = grads[n][0].numel()
        out[n] = flat[:, start : start + width].reshape(grads[n].shape)
        start += width
    return out


def summed_over_ranks(counts: torch.Tensor, context: DistributedContext | None) -> torch.Tensor:
    """``counts`` (e.g. examples per group of this rank's shard) summed over the ranks: the global
    batch's, as one process would count them; unchanged in one process (``context`` None). Same
    shape, dtype and device as ``counts``; every rank must call it at the same point."""
    if context is None:
        return counts
    total = counts.to(context.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=context.group)
    return total.to(counts.device)


# The error a rank raises when another rank refused the step: the refusing rank's kind, so that a
# loop catching it (``except NonFiniteError``: skip the batch) catches it on every rank alike.
_KINDS = (NonFiniteError, LedgerCheckError, ValueError, TypeError, RuntimeError)


class StepAgreement:
    """Keeps the ranks of one tracked step together when a rank refuses it.

    The step calls :meth:`passed` at its ``points`` fixed points (each rank the same, in order);
    a rank that fails calls :meth:`failed` instead, once, for the next point. Each is one small
    collective: at it every rank learns whether any failed, and the ranks that did not fail raise
    an error of the failing rank's kind, so every rank rolls the step back and none waits in a
    collective the others never join. In one process (``context`` None) both do nothing.

    A failure between two points, on one rank, inside a collective of the step (DDP's gradient
    averaging, :func:`combine_group_gradients`) cannot be carried this way: there the other ranks
    wait in that collective until the process group's timeout.
    """

    def __init__(self, context: DistributedContext | None, what: str, points: int) -> None:
        self.context = context
        self.what = what
        # Points still to meet at: none in one process, none once a rank has failed (every rank
        # knows and raises) or after the last one (a failure there is no other rank's concern).
        self.left = 0 if context is None else points

    def _meet(self, error: BaseException | None) -> None:
        context = self.context
        kind = 0 if error is None else 1 + next(
            (i for i, k in enumerate(_KINDS) if isinstance(error, k)), len(_KINDS) - 1)
        codes = [torch.zeros(1, dtype=torch.long, device=context.device) for _ in range(context.world_size)]
        dist.all_gather(codes, torch.tensor([kind], dtype=torch.long, device=context.device), group=context.group)
        failed = [(r, int(c)) for r, c in enumerate(codes) if int(c)]
        self.left = 0 if failed else self.left - 1
        if failed and error is None:
            kind = _KINDS[failed[0][1] - 1]
            raise kind(
                f"{self.what} was refused on rank{'s' if len(failed) > 1 else ''} {[r for r, _ in failed]} "
                f"({kind.__name__}; that rank's error says why): it is refused on rank {context.rank} too, so every "
                "rank keeps the same parameters and ledger. Fix the cause there"
            )

    def passed(self) -> None:
        """This rank got through to here; raises when another rank did not."""
        if self.left:
            self._meet(None)

    def failed(self, error: BaseException) -> None:
        """This rank failed with ``error`` (which the caller raises): tell the other ranks, unless
        they already know (``error`` came from :meth:`passed`) or the ranks met for the last time."""
        if self.left:
            self._meet(error)

    @contextmanager
    def meeting(self) -> Iterator[None]:
        """The next point around a block: :meth:`failed` if it raises, else :meth:`passed` after it."""
        try:
            yield
        except BaseException as error:
            self.failed(error)
            raise
        self.passed()
