"""The tracker under DistributedDataParallel (2 CPU processes, gloo, 127.0.0.1) equals a
single-process run on the same global batches; uneven shards, ranks whose trackers or kernel inputs
differ, and a step refused on one rank only are refused on every rank; kernels split across ranks."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel
from genkernel.core.errors import NonFiniteError
from genkernel.core.engine.distributed import distributed_gradient_kernel
from genkernel.core.tracking.distributed import summed_over_ranks
from genkernel.supervised import mse_loss

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def global_batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(STEPS, GLOBAL_BATCH, 2, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=gen)
    return x, y, groups


PROBES = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
KERNEL_ROWS = torch.linspace(-2, 2, 15, dtype=torch.float64).reshape(5, 3)


def worker(rank, rendezvous, out_dir):
    # A file rendezvous: a free TCP port picked here could be taken by another process before the workers bind it.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.01)
        tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
        x, y, groups = global_batches()
        shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        for k in range(STEPS):
            tracker.step(x[k, shard], y[k, shard], groups[k, shard])
        result = {"ledger": tracker.ledger.state_dict(), "params": [p.detach().clone() for p in model.parameters()]}
        result["kernel"] = distributed_gradient_kernel(model, KERNEL_ROWS, PROBES, normalize=True)
        # Uneven shards: rank 1 holds one example fewer; every rank must refuse the step.
        uneven = slice(shard.start, shard.stop - rank)
        try:
            tracker.step(x[0, uneven], y[0, uneven], groups[0, uneven])
        except ValueError as error:
            result["uneven_error"] = str(error)
        result["steps_after_uneven"] = tracker.ledger.steps
        # examples per group of the global batch (the analyzers' bin and group counts), from each rank's shard
        result["counts"] = summed_over_ranks(torch.bincount(groups[0, shard], minlength=3), tracker.distributed)
        result.update(disagreeing_ranks(rank, model, tracker, x, y, groups, shard))
        result.update(batch_norm(x, y, groups, shard))
        result.update(micro_batched(x, y, groups, shard))
        result.update(skipped_after_observe(shard))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears the group down: a rank that destroys it while the other
        # still drains the last collective's messages closes their connection under it, and gloo's
        # thread there aborts the process ("terminate called without an active exception", about 1
        # run in 6 on 2 loaded cores).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def refusal(call):
    """The error ``call()`` raised, as ``(type name, message)``; None when it returned."""
    try:
        call()
    except (ValueError, NonFiniteError) as error:
        return type(error).__name__, str(error)
    return None


def disagreeing_ranks(rank, model, tracker, x, y, groups, shard):
    """Ranks that disagree: kernel inputs, the trackers' partitions, a group id or a loss on one rank only."""
    out = {"kernel_error": refusal(lambda: distributed_gradient_kernel(model, KERNEL_ROWS + rank, PROBES))}
    # Equal parameters, a BatchNorm's running mean apart (DDP with broadcast_buffers=False): before, each rank's rows
    # came from its own buffers and the gathered kernel mixed two models (0.23 off, normalized), silently.
    torch.manual_seed(0)
    norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        norm[1].running_mean.add_(float(rank))
    out["buffer_error"] = refusal(lambda: distributed_gradient_kernel(norm, torch.randn(5, 3, dtype=torch.float64,
                                                                      generator=torch.Generator().manual_seed(1))))
    # The same number of group rows in another order: summed row by row, the ranks' groups would mix.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    partitions = {"a": 2, "b": 3} if rank == 0 else {"b": 3, "a": 2}
    swapped = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=partitions)
    out["layout_error"] = refusal(lambda: swapped.step(x[0, shard], y[0, shard], {"a": groups[0, shard] % 2,
                                                                                 "b": groups[0, shard]}))
    swapped.close()
    # Probes built from each rank's own data: each rank's ledger would be of its own probes.
    own = PathKernelTracker(model, optimizer, mse_loss, PROBES + rank, num_groups=3)
    out["probes_error"] = refusal(lambda: own.step(x[0, shard], y[0, shard], groups[0, shard]))
    own.close()
    # Rank 1 alone refuses a step (a group id out of range), then every rank steps on.
    bad = torch.full_like(groups[0, shard], 7) if rank == 1 else groups[0, shard]
    out["one_rank_error"] = refusal(lambda: tracker.step(x[0, shard], y[0, shard], bad))
    tracker.step(x[1, shard], y[1, shard], groups[1, shard])
    out["steps_after_one_rank"] = tracker.ledger.steps
    out["params_after_one_rank"] = [p.detach().clone() for p in model.parameters()]
    tracker.close()
    # An observed loop: rank 1 alone has a non-finite loss; the loop skips the micro-batch on every rank it
    # is refused on, so the ranks must agree on it.
    observer = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
    for k in range(2):
        inputs = x[k, shard].clone()
        if k == 0 and rank == 1:
            inputs[0, 0] = float("nan")
        losses = mse_loss(model(inputs), y[k, shard])
        out[f"observe_error{k}"] = refusal(lambda: observer.observe(losses, groups[k, shard]))
        if out[f"observe_error{k}"] is None:
            losses.mean().backward()
            optimizer.step()
        optimizer.zero_grad()
    out["observed_steps"] = observer.ledger.steps
    out["params_after_observed"] = [p.detach().clone() for p in model.parameters()]
    return out


def batch_norm(x, y, groups, shard):
    """BatchNorm with batch statistics under DDP: each rank normalizes its shard with the shard's statistics and
    updates its running statistics alone, so the ranks' models (and ledgers) drift apart; refused on every rank,
    at binding and at a step or observed micro-batch after a switch to training mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = {"bn_bind_error": refusal(lambda: PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3))}
    net.eval()  # frozen running statistics: accepted
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
    net.train()
    out["bn_step_error"] = refusal(lambda: tracker.step(x[0, shard], y[0, shard], groups[0, shard]))
    out["bn_observe_error"] = refusal(lambda: tracker.observe(mse_loss(model(x[0, shard]), y[0, shard]), groups[0, shard]))
    out["bn_steps"] = tracker.ledger.steps
    tracker.close()
    return out


def gradscaler_loop(model, shard, *, track):
    """Four steps of a loop that observes, then clears the gradients, then backpropagates through a
    GradScaler whose second step overflows (skipped); ``shard`` of each global batch (all of it in one
    process). Returns the tracker (None untracked)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3) if track else None
    x, y, groups = global_batches()
    for k in range(4):
        losses = mse_loss(model(x[k % STEPS, shard]), y[k % STEPS, shard])
        if tracker is not None:
            tracker.observe(losses, groups[k % STEPS, shard])
        optimizer.zero_grad()
        scaler.scale(losses.mean() * (float("inf") if k == 1 else 1.0)).backward()
        scaler.step(optimizer)
        scaler.update()
    return tracker


def skipped_after_observe(shard):
    """:func:`gradscaler_loop` under DDP, untracked and tracked: the skipped step is dropped at the next
    micro-batch's backward (inside DDP's), on every rank alike."""
    bare = nn.parallel.DistributedDataParallel(make_model())
    gradscaler_loop(bare, shard, track=False)
    model = nn.parallel.DistributedDataParallel(make_model())
    try:  # (a refusal is this test's result, not the worker's end: the other tests read the rest)
        tracker = gradscaler_loop(model, shard, track=True)
    except (ValueError, RuntimeError) as error:
        return {"skip_error": f"{type(error).__name__}: {error}"}
    return {"skip_error": None, "skip_equal": all(torch.equal(a, b) for a, b in zip(bare.parameters(), model.parameters())),
            "skip_steps": tracker.ledger.steps, "skip_skipped": tracker.skipped_steps,
            "skip_attempted": tracker.attempted_steps, "skip_contributions": tracker.ledger.contributions.clone()}


def micro_batched(x, y, groups, shard):
    """Tracked steps of 2 micro-batches per rank under DDP, its all-reduces counted by a communication hook
    (DDP's own all-reduce inside): the micro-batch before the last runs in no_sync(), one all-reduce a step."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from genkernel.core.tracking.step import OptimizerStep

    model = nn.parallel.DistributedDataParallel(make_model())
    all_reduces = [0]

    def counted(state, bucket):
        all_reduces[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counted)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.01)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
    for k in range(2):
        tracker.track(OptimizerStep(model, optimizer, mse_loss, x[k, shard], y[k, shard], micro_batches=2), groups[k, shard])
    ledger = tracker.ledger
    identity = (ledger.contributions.sum(1) + ledger.rest + ledger.residual - (ledger.f_end - ledger.f_start)).abs().max()
    out = {"mb_all_reduces": all_reduces[0], "mb_params": [p.detach().clone() for p in model.parameters()],
           "mb_identity": float(identity), "mb_contributions": ledger.contributions.clone()}
    # A tracker that does not fit, under DDP: its refusal may name only the dense route (the others run in one process).
    from genkernel.core import cost

    available, cost.available_memory = cost.available_memory, lambda device: 1000
    try:
        out["memory_error"] = str(pytest.raises(MemoryError, PathKernelTracker, model, torch.optim.SGD(
            model.parameters(), lr=0.1), mse_loss, PROBES, num_groups=3).value)
    finally:
        cost.available_memory = available
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-process job once; the per-rank results."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def test_counts_summed_over_ranks_are_the_global_batchs(ranks):
    x, y, groups = global_batches()
    for rank in ranks:
        assert torch.equal(rank["counts"], torch.bincount(groups[0], minlength=3))
    assert not torch.equal(torch.bincount(groups[0, : GLOBAL_BATCH // WORLD], minlength=3), ranks[0]["counts"])


def test_ddp_ledger_equals_single_process(ranks):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.01)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
    x, y, groups = global_batches()
    for k in range(STEPS):
        tracker.step(x[k], y[k], groups[k])
    single = tracker.ledger
    for result in ranks:
        for a, b in zip(result["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)
        ledger = result["ledger"]
        scale = single.contributions.abs().max()
        torch.testing.assert_close(ledger["contributions"], single.contributions, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(ledger["rest"], single.rest, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(ledger["f_end"], single.f_end, rtol=1e-12, atol=1e-14)
        assert ledger["steps"] == STEPS
        expected_kernel = gradient_kernel(model, KERNEL_ROWS, PROBES, normalize=True)
        torch.testing.assert_close(result["kernel"], expected_kernel, rtol=1e-10, atol=1e-12)


def test_micro_batches_under_ddp_all_reduce_once_a_step_and_equal_single_process(ranks):
    """OptimizerStep(micro_batches=2) all-reduced every micro-batch's gradient under DDP (4 all-reduces for 2
    steps); the first now runs in no_sync(): 2, and the run is the single-process run on the global batches."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.01)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3)
    x, y, groups = global_batches()
    for k in range(2):
        tracker.step(x[k], y[k], groups[k])
    scale = tracker.ledger.contributions.abs().max()
    for result in ranks:
        assert result["mb_all_reduces"] == 2
        for a, b in zip(result["mb_params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(result["mb_contributions"], tracker.ledger.contributions, rtol=0, atol=1e-10 * scale)
        assert result["mb_identity"] < 1e-12


def test_a_refusal_under_ddp_names_no_single_process_route(ranks):
    """A tracker that did not fit under DDP suggested group_state='sketched' (and would 'factored' for plain SGD),
    which a tracker under DDP refuses."""
    for result in ranks:
        assert "would not fit" in result["memory_error"] and "fewer groups" in result["memory_error"]
        assert "group_state=" not in result["memory_error"]


def test_uneven_shards_are_refused_on_every_rank(ranks):
    for result in ranks:
        assert "per-rank batch sizes differ ([4, 3])" in result["uneven_error"]
        assert result["steps_after_uneven"] == STEPS


def test_ranks_that_pass_different_kernel_inputs_are_refused_on_every_rank(ranks):
    for result in ranks:
        assert result["kernel_error"][0] == "ValueError"
        assert "the ranks passed different x1" in result["kernel_error"][1]


def test_ranks_whose_models_differ_in_buffers_alone_are_refused_on_every_rank(ranks):
    for result in ranks:
        assert result["buffer_error"][0] == "ValueError"
        assert "buffers differ" in result["buffer_error"][1] and "broadcast(b, 0)" in result["buffer_error"][1]


def test_ranks_whose_trackers_lay_out_groups_differently_are_refused_on_every_rank(ranks):
    for result in ranks:
        assert result["layout_error"][0] == "ValueError"
        assert "lay out their group rows differently" in result["layout_error"][1]


def test_ranks_whose_trackers_have_different_probes_are_refused_on_every_rank(ranks):
    """Fails on the old code: each rank's ledger described its own probes, and nothing said so."""
    for result in ranks:
        assert result["probes_error"][0] == "ValueError"
        assert "different probes" in result["probes_error"][1]


def test_a_step_refused_on_one_rank_is_refused_on_every_rank_and_the_replicas_stay_equal(ranks):
    assert "group ids must lie in [0, 3)" in ranks[1]["one_rank_error"][1]
    assert ranks[0]["one_rank_error"][0] == "ValueError" and "refused on rank [1]" in ranks[0]["one_rank_error"][1]
    for result in ranks:
        assert result["steps_after_one_rank"] == STEPS + 1  # the refused step is none, the next one recorded
    for a, b in zip(ranks[0]["params_after_one_rank"], ranks[1]["params_after_one_rank"]):
        assert torch.equal(a, b)


def test_a_micro_batch_refused_on_one_rank_is_refused_on_every_rank(ranks):
    assert "non-finite loss" in ranks[1]["observe_error0"][1]
    assert ranks[0]["observe_error0"][0] == "NonFiniteError" and "refused on rank [1]" in ranks[0]["observe_error0"][1]
    for result in ranks:
        assert result["observe_error1"] is None and result["observed_steps"] == 1
    for a, b in zip(ranks[0]["params_after_observed"], ranks[1]["params_after_observed"]):
        assert torch.equal(a, b)


def test_distributed_kernel_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        distributed_gradient_kernel(make_model(), PROBES)


def test_batch_norm_with_batch_statistics_is_refused_on_every_rank(ranks):
    for result in ranks:
        for key in ("bn_bind_error", "bn_step_error", "bn_observe_error"):
            assert result[key] is not None and result[key][0] == "ValueError", (key, result[key])
            assert "1 (BatchNorm1d)" in result[key][1] and "eval mode" in result[key][1], result[key][1]
        assert result["bn_steps"] == 0


def test_a_gradscaler_skip_cleared_after_observe_is_dropped_on_every_rank_as_in_one_process(ranks):
    """observe(), zero_grad(), a scaled backward whose second step overflows (the GradScaler skips it):
    under DDP each rank drops the skipped micro-batch at the next backward, books the three steps taken
    and counts four, training as without the tracker; the ledger is the single-process loop's on the
    global batches. Before, the skipped micro-batch stayed and the next step was refused."""
    single = gradscaler_loop(make_model(), slice(None), track=True)
    assert single.skipped_steps == [{"after_step": 1, "micro_batches": 1}]
    scale = single.ledger.contributions.abs().max()
    for result in ranks:
        assert result["skip_error"] is None, result["skip_error"]
        assert result["skip_equal"]
        assert result["skip_steps"] == 3 and result["skip_attempted"] == 4
        assert result["skip_skipped"] == single.skipped_steps
        torch.testing.assert_close(result["skip_contributions"], single.ledger.contributions, rtol=0, atol=1e-10 * scale)
