"""Ranks that fall out of step under DistributedDataParallel (2 CPU processes, gloo): a rank that
observes a micro-batch more, enters no_sync() on another micro-batch, or steps where another
observes, is refused on every rank at the tracker's next meeting (before, they waited in different
collectives until the process group's timeout); replicas that would step apart (another
max_grad_norm or learning rate on one rank, a tracked step inside no_sync()) are refused on every
rank (before, each rank recorded its own replica's step and the ranks' ledgers and parameters
parted silently), as are buffers a module updates from each rank's shard; a kernel block that
fails on one rank fails on every rank (before, the others waited for it in the gather)."""

import contextlib
import datetime
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel
from genkernel.core.engine import distributed as engine_distributed
from genkernel.core.engine.distributed import distributed_gradient_kernel
from genkernel.supervised import mse_loss

WORLD = 2
PROBES = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)


def make_model():
    torch.manual_seed(0)
    return nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double())


def shard(rank, k=0):
    """This rank's half of global batch ``k`` (8 examples): inputs, targets, group ids in [0, 3)."""
    gen = torch.Generator().manual_seed(1 + k)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 3, (8,), generator=gen)
    rows = slice(4 * rank, 4 * rank + 4)
    return x[rows], y[rows], groups[rows]


def outcome(call):
    """``(error type name, message)`` of what ``call()`` raised; ``("ok", result)`` when it returned."""
    try:
        return "ok", call()
    except Exception as error:  # noqa: BLE001 - the test reads which error each rank raised
        return type(error).__name__, str(error)


def observe_loop(rank, sync_pattern):
    """One optimizer step over the micro-batches of ``sync_pattern`` (one example each; False: inside
    no_sync()), every one observed; the ledger's step count."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
    x, y, groups = shard(rank)
    for i, sync in enumerate(sync_pattern):
        with contextlib.nullcontext() if sync else model.no_sync():
            losses = mse_loss(model(x[i : i + 1]), y[i : i + 1])
            tracker.observe(losses, groups[i : i + 1])
            losses.mean().backward()
    optimizer.step()
    return tracker.ledger.steps


def step_where_another_observes(rank):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
    x, y, groups = shard(rank)
    if rank == 0:
        tracker.step(x, y, groups)
    else:
        losses = mse_loss(model(x), y)
        tracker.observe(losses, groups)
        losses.mean().backward()
        optimizer.step()
    return tracker.ledger.steps


def owned_steps(rank, lr=0.1, max_grad_norm=float("inf"), no_sync=False, steps=2):
    """``steps`` tracked steps; each rank's parameters and ledger (or the error, in ``outcome``)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3, max_grad_norm=max_grad_norm)
    for k in range(steps):
        with model.no_sync() if no_sync else contextlib.nullcontext():
            tracker.step(*shard(rank, k))
    return tracker.ledger.steps


class RunningCenter(nn.Module):
    """Subtracts a running mean of its inputs, updated from each training batch (a hand-written
    normalizer: not a BatchNorm, so no module check names it)."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(dim=0))
        return x - self.mean


def running_statistics_buffer(rank):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), RunningCenter(8), nn.Tanh(), nn.Linear(8, 2)).double()
    model = nn.parallel.DistributedDataParallel(net)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, PROBES, num_groups=3)
    tracker.step(*shard(rank))
    return tracker.ledger.steps


def kernel_with_a_nan_row(rank):
    """Row 2 of 3 holds a NaN: it lies in rank 1's block only."""
    x1 = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(3, 3)
    x1[2, 0] = float("nan")
    return distributed_gradient_kernel(make_model(), x1, PROBES)


def kernel_failing_on_one_rank(rank):
    """Rank 1's block runs out of memory (a rank-local failure, after every check)."""
    def out_of_memory_on_rank_1(*args, **kwargs):
        if rank == 1:
            raise MemoryError("rank 1's block does not fit")
        return gradient_kernel(*args, **kwargs)

    with mock.patch.object(engine_distributed, "gradient_kernel", out_of_memory_on_rank_1):
        return distributed_gradient_kernel(make_model(), PROBES, PROBES)


def observed_row_reductions(rank):
    """The all-reduces of an observed step (two micro-batches, the first under no_sync()): shapes of
    the tensors reduced, and the ledger's step count."""
    shapes = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    with mock.patch.object(dist, "all_reduce", counting):
        steps = observe_loop(rank, [False, True])
    return shapes, steps


SCENARIOS = {
    # rank 1 observes a third micro-batch where rank 0 steps after two (every backward averaged)
    "one_more_micro_batch": lambda rank: observe_loop(rank, [True, True] + [True] * rank),
    # gradient accumulation, rank 1 with one micro-batch more under no_sync()
    "other_no_sync_micro_batches": lambda rank: observe_loop(rank, [False] * (1 + rank) + [True]),
    "step_where_another_observes": step_where_another_observes,
    "other_max_grad_norm": lambda rank: owned_steps(rank, max_grad_norm=(0.01, float("inf"))[rank]),
    "other_learning_rate": lambda rank: owned_steps(rank, lr=(0.1, 0.2)[rank]),
    "step_inside_no_sync": lambda rank: owned_steps(rank, no_sync=True, steps=1),
    "running_statistics_buffer": running_statistics_buffer,
    "kernel_with_a_nan_row": kernel_with_a_nan_row,
    "kernel_failing_on_one_rank": kernel_failing_on_one_rank,
    "in_step_after_all": lambda rank: owned_steps(rank, steps=1),  # the ranks still meet after the refusals
    "observed_row_reductions": observed_row_reductions,
}


def worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    # A short timeout: a hang (the old behaviour) ends the job instead of waiting 30 minutes.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=20))
    try:
        for name, scenario in SCENARIOS.items():
            torch.save(outcome(lambda: scenario(rank)), os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        dist.barrier()  # both ranks done before the group is torn down (see test_distributed.worker)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario once in a 2-process job (killed after 60 s); ``{scenario: [per-rank outcome]}``
    (None where a rank never got there)."""
    out = tmp_path_factory.mktemp("ddp_review")
    context = mp.start_processes(worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    for process in context.processes:
        process.join(timeout=60)
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    results = {}
    for name in SCENARIOS:
        paths = [out / f"{name}.rank{rank}.pt" for rank in range(WORLD)]
        results[name] = [torch.load(p) if p.exists() else None for p in paths]
    return results


@pytest.mark.parametrize("name", ["one_more_micro_batch", "other_no_sync_micro_batches", "step_where_another_observes"])
def test_ranks_at_different_points_of_the_loop_are_refused_on_every_rank(ranks, name):
    for result in ranks[name]:
        assert result is not None and result[0] == "RuntimeError", (name, result)
        assert "the ranks are at different points of the tracked loop" in result[1], result[1]
    assert "no_sync" in ranks["other_no_sync_micro_batches"][0][1]


@pytest.mark.parametrize("name", ["other_max_grad_norm", "step_inside_no_sync"])
def test_gradients_ddp_did_not_average_alike_are_refused_on_every_rank_before_the_update(ranks, name):
    # before: each rank clipped (or kept its shard's gradient) alone and recorded its own replica's step
    for result in ranks[name]:
        assert result is not None and result[0] == "ValueError", (name, result)
        assert "the ranks' real gradients differ at this step" in result[1], result[1]


def test_replicas_that_stepped_apart_are_refused_on_every_rank(ranks):
    # rank 1's optimizer has twice rank 0's learning rate: the first step parts the replicas, the second is refused
    for result in ranks["other_learning_rate"]:
        assert result is not None and result[0] == "ValueError", result
        assert "the ranks' parameters differ before this step" in result[1], result[1]


def test_buffers_each_rank_updates_from_its_shard_are_refused_on_every_rank(ranks):
    # before: each rank centred with its own shard's running mean; after 3 steps the ranks' ledgers were 4.5e-2
    # and 4.2e-2 (of the largest contribution) from the single-process run's, and from each other, with no error
    for result in ranks["running_statistics_buffer"]:
        assert result is not None and result[0] == "ValueError", result
        assert "the ranks' buffers differ after this step's forward" in result[1] and "'1.mean'" in result[1], result[1]


def test_the_ranks_still_step_together_after_the_refusals(ranks):
    assert ranks["in_step_after_all"] == [("ok", 1), ("ok", 1)]


def test_a_kernel_row_refused_on_one_rank_is_refused_on_every_rank_with_its_global_index(ranks):
    # before: rank 1 alone raised ("rows [0]", its block's), rank 0 waited in the gather for its block
    for result in ranks["kernel_with_a_nan_row"]:
        assert result is not None and result[0] == "ValueError", result
        assert "x1 hold NaN or infinite values at rows [2]" in result[1], result[1]


def test_a_kernel_block_failing_on_one_rank_fails_on_every_rank(ranks):
    failing, other = ranks["kernel_failing_on_one_rank"][1], ranks["kernel_failing_on_one_rank"][0]
    assert failing == ("MemoryError", "rank 1's block does not fit")
    assert other is not None and other[0] == "MemoryError" and "failed on rank [1]" in other[1], other


def test_an_observed_step_combines_its_group_rows_across_ranks_once(ranks):
    # before: once to fit the gradient scale and again in the route (3 rows x 50 parameters reduced twice:
    # about 3 GB more a step for the CIFAR UNet's 21 float32 rows); now the scale's fit reduces the
    # 50-entry sum alone
    for result in ranks["observed_row_reductions"]:
        assert result is not None and result[0] == "ok", result
        shapes, steps = result[1]
        assert steps == 1
        assert shapes.count((3, 50)) == 1 and (50,) in shapes, shapes
