"""Ranks that fall out of step under DistributedDataParallel (2 CPU processes, gloo): a rank that
observes a micro-batch more, enters no_sync() on another micro-batch, or steps where another
observes, is refused on every rank at the tracker's next meeting (before, they waited in different
collectives until the process group's timeout); replicas that would step apart (another
max_grad_norm or learning rate on one rank, a tracked step inside no_sync()) are refused on every
rank (before, each rank recorded its own replica's step and the ranks' ledgers and parameters
parted silently), as are buffers a module updates from each rank's shard; a kernel block that
fails on one rank fails on every rank (before, the others waited for it in the gather). Counts summed
over the ranks are a new int64 tensor (before: the caller's own tensor, summed in place; uint8 counts
wrapped, bool counts were or-ed), and counts of another shape or dtype are refused on every rank
(before: gloo summed the bytes into silent garbage, or one rank waited until the timeout).

Also CheckpointKernels (single process): a recorder used for a second run is refused (before, path_kernel()
summed both runs), checkpoint steps that are not whole numbers are refused (before, cut to the step below),
and the Domingos sum is refused when train_x is not the trainer's inputs row for row (before, 85-116% off)."""

import contextlib
import datetime
import importlib
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


def rank_counts(rank):
    """This rank's counts: int64 (on the context's device: the CPU), uint8 near its top, bool."""
    return {"int64": torch.tensor([1, 2, 3]) * (rank + 1), "uint8": torch.tensor([200, 7 * rank], dtype=torch.uint8),
            "bool": torch.tensor([True, rank == 0, False])}


def summed_counts(rank):
    """Every kind of counts summed over the ranks: ``{kind: (counts after the call, the sum)}``."""
    from genkernel.core.tracking.distributed import ddp_context, summed_over_ranks

    context = ddp_context(make_model())
    out = {}
    for kind, counts in rank_counts(rank).items():
        total = summed_over_ranks(counts, context)
        out[kind] = (counts, total)
    return out


def summed_mismatched(rank, kind):
    """Rank 1's counts of another dtype (same bytes per element) or of another length than rank 0's."""
    from genkernel.core.tracking.distributed import ddp_context, summed_over_ranks

    context = ddp_context(make_model())
    if kind == "dtype":
        counts = torch.tensor([1, 2, 3]) if rank == 0 else torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    else:
        counts = torch.tensor([1, 2, 3]) if rank == 0 else torch.tensor([1, 2])
    return summed_over_ranks(counts, context)


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
    "summed_counts": summed_counts,
    "summed_counts_of_another_dtype": lambda rank: summed_mismatched(rank, "dtype"),
    # last: before, rank 0 waited here until the timeout and the process group broke
    "summed_counts_of_another_shape": lambda rank: summed_mismatched(rank, "shape"),
}


def scenario_worker(rank, rendezvous, out_dir, module):
    """One rank of a 2-process gloo job running every scenario of test module ``module``'s ``SCENARIOS`` in
    order, each one's :func:`outcome` saved as ``{name}.rank{rank}.pt`` in ``out_dir``."""
    torch.set_num_threads(1)
    scenarios = importlib.import_module(module).SCENARIOS
    # A short timeout: a hang (the old behaviour) ends the job instead of waiting 30 minutes.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=20))
    try:
        for name, scenario in scenarios.items():
            torch.save(outcome(lambda: scenario(rank)), os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        dist.barrier()  # both ranks done before the group is torn down (see test_distributed.worker)
    finally:
        dist.destroy_process_group()


def run_scenarios(out, module: str, timeout: float, while_running=lambda: None):
    """Every scenario of test module ``module``'s ``SCENARIOS`` once in a 2-process job (:func:`scenario_worker`,
    killed after ``timeout`` seconds), ``while_running()`` called meanwhile in this process; returns
    ``({scenario: [per-rank outcome, None where a rank never got there]}, while_running's result)``."""
    context = mp.start_processes(scenario_worker, args=(str(out / "rendezvous"), str(out), module), nprocs=WORLD,
                                 join=False, start_method="spawn")
    here = while_running()
    for process in context.processes:
        process.join(timeout=timeout)
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    results = {}
    for name in importlib.import_module(module).SCENARIOS:
        paths = [out / f"{name}.rank{rank}.pt" for rank in range(WORLD)]
        results[name] = [torch.load(p, weights_only=False) if p.exists() else None for p in paths]
    return results, here


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario once in a 2-process job (killed after 60 s); ``{scenario: [per-rank outcome]}``
    (None where a rank never got there)."""
    return run_scenarios(tmp_path_factory.mktemp("ddp_review"), __name__, timeout=60)[0]


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


def test_counts_summed_over_ranks_are_the_global_counts_and_leave_the_callers_tensor_alone(ranks):
    # before: the result was the caller's own tensor, summed in place (counts [1, 2, 3] became [3, 6, 9] on
    # rank 0); uint8 counts wrapped (200 + 200 -> [144]) and bool counts were or-ed (True + True -> True)
    for rank, result in enumerate(ranks["summed_counts"]):
        assert result is not None and result[0] == "ok", result
        for kind, (counts, total) in result[1].items():
            expected = sum(rank_counts(r)[kind].to(torch.int64) for r in range(WORLD))  # single-process sum
            assert torch.equal(counts, rank_counts(rank)[kind]), (kind, counts)
            assert total.dtype == torch.int64 and torch.equal(total, expected), (kind, total, expected)


@pytest.mark.parametrize("kind", ["dtype", "shape"])
def test_counts_of_another_dtype_or_shape_are_refused_on_every_rank(ranks, kind):
    # before: gloo summed the bytes: int64 [1, 2, 3] + float64 [1., 2., 3.] gave [4607182418800017408, ...] on
    # rank 0 and [1.0, 2.0, 3.0000000000000013] on rank 1, no error; lengths 3 and 2 gave rank 1 [3, 2] while
    # rank 0 waited until the process group's timeout
    for result in ranks[f"summed_counts_of_another_{kind}"]:
        assert result is not None and result[0] == "ValueError", result
        assert "the ranks' counts to sum differ in shape or dtype" in result[1] and "ranks [1]" in result[1], result[1]


# -- CheckpointKernels: one recorder per run; whole-number steps -------------------------------------------------------


def _checkpoint_inputs():
    """Six training inputs (3 features) and their targets (2 outputs)."""
    gen = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)


def _checkpoint_run(rec, lr=0.1, steps=4):
    """A full-batch SGD run of ``steps`` steps on :func:`_checkpoint_inputs`, recorded by ``rec``."""
    from genkernel.supervised import SupervisedTrainer

    x, y = _checkpoint_inputs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), mse_loss, batch_size=6,
                      callbacks=[rec]).fit(x, y, steps=steps)
    return model


def test_a_checkpoint_recorder_used_for_a_second_run_is_refused_and_keeps_the_first_run():
    """Before: the second run appended its checkpoints to the first's (checkpoints [0, 2, 0, 2], weights
    [0.2] * 4) and path_kernel() summed both runs' kernels: twice the first run's here, with no error."""
    from genkernel.supervised.checkpoint_kernels import CheckpointKernels

    x, probes = _checkpoint_inputs()[0], PROBES
    rec = CheckpointKernels(x, probes, every=2, steps=4)
    _checkpoint_run(rec)
    first = rec.path_kernel()
    # Brute force: Σ_k (η × 2 steps) J_k J_k^T from the recorded checkpoints' own kernels, and the checkpoint-0
    # kernel against dense float64 Jacobians of the initial model.
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(initial(x[n : n + 1])[0, i],
                                                                             list(initial.parameters()))])
                       for n in range(len(x)) for i in range(2)]).reshape(len(x), 2, -1)
    torch.testing.assert_close(rec.grams[0], torch.einsum("ndp,mdp->nm", jac, jac), rtol=1e-12, atol=1e-12)
    assert rec.checkpoints == [0, 2] and rec.weights == pytest.approx([0.2, 0.2], rel=1e-15)
    torch.testing.assert_close(first[0], 0.2 * (rec.grams[0] + rec.grams[1]), rtol=1e-13, atol=0)
    with pytest.raises(RuntimeError, match="already recorded a run"):
        _checkpoint_run(rec)
    assert rec.checkpoints == [0, 2] and rec.weights == pytest.approx([0.2, 0.2], rel=1e-15)
    for a, b in zip(rec.path_kernel(), first):
        assert torch.equal(a, b)


def test_checkpoint_steps_that_are_not_whole_numbers_are_refused():
    """Before: at=[0, 2.5, 3.7] was cut to [0, 2, 3] and np.geomspace's float steps likewise, with no error;
    steps=5.0 or every=2.5 failed inside range() ("'float' object cannot be interpreted as an integer");
    geometric_checkpoints(10.5, 4) returned [0, 1, 4, 9]."""
    import numpy as np

    from genkernel.supervised.checkpoint_kernels import CheckpointKernels, geometric_checkpoints

    x, probes = _checkpoint_inputs()[0], PROBES
    for kwargs, name in [(dict(at=[0, 2.5, 3.7], steps=5), r"at\[1\]"),
                         (dict(at=np.geomspace(1, 6, 3) - 1, steps=6), r"at\[0\]"),
                         (dict(at=torch.tensor([0.0, 2.0]), steps=6), r"at\[0\]"),
                         (dict(steps=5.0), "steps"), (dict(every=2.5, steps=5), "every"),
                         (dict(at=5, steps=6), "sequence of int steps")]:
        with pytest.raises(ValueError, match=name):
            CheckpointKernels(x, probes, **kwargs)
    for args, name in [((10.5, 4), "steps"), ((10, 4.0), "count")]:
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            geometric_checkpoints(*args)
    # Integer steps of any kind are steps.
    assert CheckpointKernels(x, probes, at=np.array([0, 2, 4]), steps=6).at == [0, 2, 4]
    assert CheckpointKernels(x, probes, at=torch.tensor([0, 3]), steps=6).at == [0, 3]
    assert CheckpointKernels(x, probes, every=np.int64(2), steps=6).at == [0, 2, 4]
    assert geometric_checkpoints(np.int64(100), 5) == geometric_checkpoints(100, 5) == [0, 2, 9, 31, 99]


@pytest.mark.parametrize("case", ["reversed", "shifted"])
def test_kernel_machine_change_refuses_a_train_x_that_is_not_the_trainers_inputs_row_for_row(case):
    """The Domingos sum pairs kernel row n (train_x[n]) with the loss weight of training example n. Before, a
    train_x in another order (reversed) or of other inputs of the same size (shifted by 0.5) gave sums 116% and
    85% off the real change with no error; train_x as trained on: 0.17%."""
    from genkernel.supervised import SupervisedTrainer
    from genkernel.supervised.checkpoint_kernels import CheckpointKernels

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1])
    probes = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    other = x.flip(0) if case == "reversed" else x + 0.5
    recorders = {}
    for name, train_x in (("same", x), (case, other)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        rec = recorders[name] = CheckpointKernels(train_x, probes, every=1, steps=10)
        SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05), mse_loss, batch_size=8,
                          callbacks=[rec]).fit(x, y, steps=10)
        real = model(probes).detach() - rec.probe_outputs[0]
    same = recorders["same"]
    assert not same.not_plain_steps
    sum_error = (same.kernel_machine_change(lambda f: 2 * (f - y)) - real).norm() / real.norm()
    assert float(sum_error) < 5e-3  # the left Riemann sum of plain full-batch steps (0.0017)
    with pytest.raises(ValueError, match="other inputs than train_x"):
        recorders[case].kernel_machine_change(lambda f: 2 * (f - y))
    recorders[case].path_kernel()  # the kernels over the inputs given are still there
