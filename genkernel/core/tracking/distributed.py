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
Each meeting also compares where the ranks are (which step or micro-batch, which point of it,
inside ``no_sync()`` or not): ranks that fell out of step (one observes a micro-batch more, or steps
where another observes) are refused on every rank there, instead of one running on into DDP's
gradient averaging while another waits in the tracker's next collective.

Every combination (:func:`combine_group_gradients`) also compares digests of the ranks' parameters
and real gradients: replicas that stepped apart (another learning rate or max_grad_norm on one
rank, a checkpoint restored on one rank only) and gradients DDP did not average (a step inside
``no_sync()``) are refused on every rank before the update, where each rank would otherwise record
its own replica's step and the ranks' ledgers would part silently.

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

from ..engine.distributed import gathered_rows, values_digest
from ..errors import LedgerCheckError, NonFiniteError


@dataclass(frozen=True)
class DistributedContext:
    """The process group a DDP model averages its gradients over.

    ``layout``: what every rank's group rows must agree on (the partitions' names and sizes, in
    order); ``device``: where the tensors of the tracker's collectives live (the model's);
    ``model``: the DistributedDataParallel wrapper (whether its next backward averages gradients,
    ``require_backward_grad_sync``, which ``no_sync()`` turns off, is part of every meeting);
    ``probes``: a digest of the tracker's probes' values, compared at every combination."""

    group: object
    world_size: int
    rank: int
    layout: tuple = ()
    device: torch.device = torch.device("cpu")
    model: object = None
    probes: int = 0


def ddp_context(model: nn.Module, layout: tuple = (), probes: tuple[torch.Tensor, ...] = ()) -> DistributedContext | None:
    """The context of a DDP-wrapped ``model``; None for a plain module. ``layout``: the tracker's
    partitions as ``((name, G), ...)``, and ``probes``: its probe inputs, both checked to agree across
    ranks at every combination (the digest of the probes' values is taken here, once)."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("the model is wrapped in DistributedDataParallel but torch.distributed is not initialized")
    group = model.process_group
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    context = DistributedContext(group, dist.get_world_size(group), dist.get_rank(group), tuple(layout), device, model,
                                 values_digest(probes))
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



# An odd factor (2**64 / golden ratio, as a wrapped int64) on the columns' weighted sum in the digest's third
# sum: with the rows' and columns' weights alike, a transposed square weight would give the same sum.
_COLUMN_FACTOR = 0x9E3779B97F4A7C15 - 2**64


def _replica_digest(module: nn.Module) -> list[int]:
    """Nine int64 digests of ``module``'s replica, computed on its device: of its parameters, of
    their gradients (None counts as zeros) and of its buffers, the sums, wrapping modulo 2**64, of
    each element's bit pattern, of its square, and of it times a weight of its place: 2j + 1 for its
    row (j counts the rows, the first-dimension slices, of the part's tensors in order) plus
    (2c + 1)·_COLUMN_FACTOR for its column c within the row. Integer sums do not depend on the order
    of summation, so equal replicas give equal digests on any device; replicas that stepped
    differently, gradients that DDP did not average, or buffers each rank updated from its own shard
    differ in them (unless the differences cancel in all three sums, which updates and shards do not
    arrange). The third sum tells replicas holding the same values in other places (two frozen
    weights of one shape swapped on one rank, rows or columns permuted, a weight transposed), which
    the first two cannot; it is formed from the row and column sums, one reduction more."""
    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    params = list(module.parameters())
    buffers = list(module.buffers())
    # (a part's tensors, the tensors whose rows give their places: a None gradient keeps its parameter's rows)
    parts = ((params, params), ([p.grad for p in params], params), (buffers, buffers))
    totals: dict[torch.device, torch.Tensor] = {}  # one sum per device, read once at the end
    for i, (tensors, places) in enumerate(parts):
        offset = 0
        for t, place in zip(tensors, places):
            rows = place.shape[0] if place.dim() else 1
            start, offset = offset, offset + rows
            if t is None or t.numel() == 0:
                continue
            bits = t.detach().reshape(rows, -1).view(views.get(t.element_size(), torch.uint8)).to(torch.long)
            row_sums, column_sums = bits.sum(1), bits.sum(0)
            row_weights = torch.arange(start, start + rows, dtype=torch.long, device=t.device).mul_(2).add_(1)
            column_weights = torch.arange(column_sums.numel(), dtype=torch.long, device=t.device).mul_(2).add_(1)
            placed = (row_sums * row_weights).sum() + (column_sums * column_weights).sum() * _COLUMN_FACTOR
            total = totals.setdefault(t.device, torch.zeros(3 * len(parts), dtype=torch.long, device=t.device))
            total[3 * i: 3 * i + 3] += torch.stack([row_sums.sum(), (bits * bits).sum(), placed])
    return [int(v) for v in sum((t.cpu() for t in totals.values()), torch.zeros(3 * len(parts), dtype=torch.long))]


def combine_group_gradients(grads: dict[str, torch.Tensor], local_batch: int, context: DistributedContext) -> dict[str, torch.Tensor]:
    """Average per-rank group gradients as DDP averages gradients: Σ_r ĝ_g^(r) / R.

    ``grads``: ``{name: Tensor[rows, *param.shape]}``; returns the same shapes, equal on every rank.
    Raises ValueError on every rank when the ranks' batch sizes differ, when their group rows
    are laid out differently (other partitions, another parameter set or dtype): summed row by
    row, such rows would mix one rank's groups with another's; and when their parameters, real
    gradients or buffers differ (:func:`_replica_digest`; every caller combines after the backward and
    before the update, where DDP keeps the parameters and gradients equal on every rank, and the
    buffers as rank 0 broadcast them before the forward unless a module updated them from its shard).
    """
    first = next(iter(grads.values()))
    names = list(grads)
    rows = first.shape[0]
    # Everything the ranks must agree on for the row-by-row sum, gathered in the one collective
    # that also gathers the batch sizes.
    shapes = ";".join(f"{n}:{tuple(grads[n].shape[1:])}" for n in names)
    # Digests of the replica's parameters (θ_k: every caller combines before the update), of its real
    # gradients, which DDP's averaging makes equal on every rank, and of its buffers, which DDP
    # broadcasts from rank 0 before each forward (the forward may have updated them since).
    digest = _replica_digest(context.model.module) if context.model is not None else [0] * 9
    mine = [local_batch, *digest, rows, _code(repr(context.layout)), _code(shapes), _code(str(first.dtype)),
            context.probes]
    gathered = [torch.zeros(len(mine), dtype=torch.long, device=first.device) for _ in range(context.world_size)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.long, device=first.device), group=context.group)
    gathered = [[int(v) for v in g] for g in gathered]

    def apart_from_rank_0(columns: slice) -> list[int]:
        return sorted(r for r, g in enumerate(gathered) if g[columns] != gathered[0][columns])

    diverged = apart_from_rank_0(slice(1, 4))
    if diverged:
        raise ValueError(
            f"the ranks' parameters differ before this step (ranks {diverged} differ from rank 0): the replicas "
            "have drifted apart (each rank stepped differently: another max_grad_norm, learning rate or optimizer on "
            "some rank, a checkpoint loaded on one rank only, parameters changed on one rank), so no rank's ledger "
            "is the single-process run's. Build every rank's model, optimizer and tracker alike, and restore "
            "checkpoints on every rank"
        )
    unaveraged = apart_from_rank_0(slice(4, 7))
    if unaveraged:
        raise ValueError(
            f"the ranks' real gradients differ at this step (ranks {unaveraged} differ from rank 0): DDP did not "
            "average them, or they were changed on some rank after it (the backward ran inside "
            "DistributedDataParallel.no_sync(); the ranks' trackers or loops clip at another max_grad_norm), so each "
            "rank would step on its own gradient and the replicas would drift apart. Build every rank's tracker "
            "alike, and step (tracker.step, or the loop's optimizer.step()) after a backward outside no_sync(); "
            "under no_sync() only the micro-batches before the last one of a step"
        )
    shifted = apart_from_rank_0(slice(7, 10))
    if shifted:
        buffers = [name for name, _ in context.model.module.named_buffers()]
        raise ValueError(
            f"the ranks' buffers differ after this step's forward (ranks {shifted} differ from rank 0; the model's "
            f"buffers: {buffers[:5]}{'...' if len(buffers) > 5 else ''}): a module updates a buffer from its batch "
            "(running statistics, a data-dependent initialization), so each rank's replica saw its shard alone and "
            "the ranks' models differ; no rank's ledger would be the single-process run's. Keep such buffers frozen "
            "while tracking (eval mode for that module), or track on one process"
        )
    apart = sorted(r for r, g in enumerate(gathered) if g[14] != mine[14])
    if apart:
        raise ValueError(
            f"the ranks' trackers have different probes (rank {context.rank}'s differ from ranks {apart}'): each rank's "
            "ledger would describe its own probes, and the ranks' reports (the one rank 0 writes among them) would "
            "disagree. Build every rank's probes alike: from the same data and seed, not from the rank's own shard "
            "(or broadcast rank 0's, torch.distributed.broadcast(probes, 0), before building the tracker)"
        )
    differ = sorted(r for r, g in enumerate(gathered) if g[10:14] != mine[10:14])
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
    batch's, as one process would count them; ``counts`` itself unchanged in one process
    (``context`` None). Every rank must call it at the same point, with counts of one shape and
    dtype (checked: a ValueError on every rank, where gloo would sum mismatched buffers into
    silent garbage on one rank and leave the other waiting).

    Returns a new tensor on ``counts``' device, of its shape; ``counts`` is left as it was.
    Integer and bool counts are summed in int64 and returned as int64 (a uint8 sum wraps,
    200 + 200 = 144; a bool sum is a logical or, True + True = True); floating counts are summed
    and returned in their own dtype."""
    if context is None:
        return counts
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a Tensor, got {type(counts).__name__}")
    wide = counts.dtype if (counts.dtype.is_floating_point or counts.dtype.is_complex) else torch.int64
    # What the ranks' buffers must agree on, gathered first: a mismatch is refused on every rank.
    mine = torch.tensor([counts.numel(), counts.dim(), _code(str(tuple(counts.shape))), _code(str(counts.dtype))],
                        dtype=torch.long, device=context.device)
    gathered = [torch.zeros_like(mine) for _ in range(context.world_size)]
    dist.all_gather(gathered, mine, group=context.group)
    differ = sorted(r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0]))
    if differ:
        sizes = [int(g[0]) for g in gathered]
        raise ValueError(
            f"the ranks' counts to sum differ in shape or dtype (rank {context.rank}: {tuple(counts.shape)} "
            f"{counts.dtype}; ranks {differ} differ from rank 0; elements per rank {sizes}): summed element by "
            "element they would mix one rank's entries with another's. Give every rank counts of the same shape "
            "and dtype (torch.bincount(ids, minlength=G) with ids in [0, G) on every rank)"
        )
    total = counts.to(device=context.device, dtype=wide, copy=True)  # never the caller's tensor
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=context.group)
    return total.to(counts.device)


def gathered_over_ranks(rows: torch.Tensor, group: object | None) -> torch.Tensor:
    """``rows [n_r, ...]`` of every rank of ``group``, concatenated in rank order (the global batch as
    one process holds it when rank r's shard is its r-th block); ``rows`` itself when ``group`` is
    None. Every rank must call it at the same point with rows of one trailing shape and dtype
    (checked: a ValueError on every rank); the ranks' row counts may differ. What an analyzer fits
    once on "the first batch" (a grouping's k-means centres, default probes) is fitted on the global
    batch this way, alike on every rank, as one process fits it."""
    if group is None:
        return rows
    world = dist.get_world_size(group)
    device = rows.device
    mine = torch.tensor([rows.shape[0] if rows.dim() else 1, _code(str(tuple(rows.shape[1:]))), _code(str(rows.dtype))],
                        dtype=torch.long, device=device)
    heads = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(heads, mine, group=group)
    if len({tuple(int(v) for v in h[1:]) for h in heads}) > 1:
        raise ValueError(
            f"the ranks' rows to gather differ in shape or dtype (this rank: {tuple(rows.shape)} {rows.dtype}): every "
            "rank must pass rows of one trailing shape and dtype"
        )
    counts = [int(h[0]) for h in heads]
    # (a 0-d value as one row: [R] gathered)
    return gathered_rows(rows.detach().reshape(-1) if rows.dim() == 0 else rows.detach(), counts, group)


def averaged_over_ranks(tensors: dict[str, torch.Tensor], group: object | None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` averaged over the ranks of ``group`` as DDP averages gradients (Σ_r / R): a
    quantity each rank sums over its shard with the loop's weights (a pulled vector Σ_i c_i J_iᵀ w_i)
    becomes the global batch's; ``tensors`` itself when ``group`` is None. Every rank must call it at
    the same point with tensors of the same names, shapes and dtypes."""
    if group is None or not tensors:
        return tensors
    names = list(tensors)
    flat = torch.cat([tensors[n].detach().reshape(-1).to(torch.float64) for n in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    out, start = {}, 0
    for n in names:
        t = tensors[n]
        out[n] = flat[start: start + t.numel()].reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


def ddp_group(*modules: object) -> object | None:
    """The process group of the first DistributedDataParallel among ``modules`` (None: none is, or
    torch.distributed is not initialized)."""
    for module in modules:
        if isinstance(module, nn.parallel.DistributedDataParallel) and dist.is_available() and dist.is_initialized():
            return module.process_group
    return None


# The error a rank raises when another rank refused the step: the refusing rank's kind, so that a
# loop catching it (``except NonFiniteError``: skip the batch) catches it on every rank alike.
_KINDS = (NonFiniteError, LedgerCheckError, ValueError, TypeError, MemoryError, RuntimeError)
# How many bytes of each rank's meeting (StepAgreement._where) the ranks compare.
_WHERE = 96


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
        self.points = points
        self.left = 0 if context is None else points

    def _where(self) -> str:
        """This rank's meeting, as the other ranks must name it too: the step or micro-batch, which of
        its points, and whether DDP averages the gradients of the backward to come (``no_sync()``)."""
        sync = getattr(self.context.model, "require_backward_grad_sync", True)
        return f"{self.what}, meeting {self.points - self.left + 1} of {self.points}, {'' if sync else 'no_'}sync"

    def _meet(self, error: BaseException | None) -> None:
        context = self.context
        kind = 0 if error is None else 1 + next(
            (i for i, k in enumerate(_KINDS) if isinstance(error, k)), len(_KINDS) - 1)
        # Every rank's kind and where it meets (its first _WHERE bytes): the same small collective at
        # every meeting, so ranks at different meetings (one observed a micro-batch more, or entered
        # no_sync() where another did not) meet each other here and learn it, instead of one running
        # on into DDP's gradient averaging while the other waits in the tracker's next collective.
        where = self._where()
        code = list(where.encode()[:_WHERE]) + [0] * max(0, _WHERE - len(where.encode()))
        mine = torch.tensor([kind, *code], dtype=torch.long, device=context.device)
        codes = [torch.zeros_like(mine) for _ in range(context.world_size)]
        dist.all_gather(codes, mine, group=context.group)
        places = [bytes(int(v) for v in c[1:] if int(v)).decode(errors="replace") for c in codes]
        if len(set(places)) > 1:
            self.left = 0
            if error is None:
                raise RuntimeError(
                    "the ranks are at different points of the tracked loop: "
                    + "; ".join(f"rank {r} at {place!r}" for r, place in enumerate(places))
                    + ". Every rank must make the same calls in the same order: observe() the same number of "
                    "micro-batches per optimizer step, under no_sync() on the same ones, and step alike (give every "
                    "rank the same number of batches: drop_last=True, or a sampler that pads). The step or "
                    "micro-batch is refused on every rank"
                )
            return
        failed = [(r, int(c[0])) for r, c in enumerate(codes) if int(c[0])]
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
