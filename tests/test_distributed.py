"""The tracker under DistributedDataParallel (2 CPU processes, gloo, 127.0.0.1) equals a
single-process run on the same global batches; uneven shards are refused; kernels split across ranks."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel
from genkernel.core.engine.distributed import distributed_gradient_kernel
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
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
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-process job once; the per-rank results."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


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


def test_uneven_shards_are_refused_on_every_rank(ranks):
    for result in ranks:
        assert "per-rank batch sizes differ ([4, 3])" in result["uneven_error"]
        assert result["steps_after_uneven"] == STEPS


def test_distributed_kernel_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        distributed_gradient_kernel(make_model(), PROBES)
