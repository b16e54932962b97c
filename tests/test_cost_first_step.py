"""The cost estimate of a loop follows the loop's real batch and micro-batches.

A tracker built without ``batch_size`` (and/or ``micro_batches``) estimates its cost with stand-ins: the probes'
count M and one micro-batch. At the first recorded step (an observed loop's ``optimizer.step()``, or an owned
``tracker.step``) the step's own batch B and micro-batch count K are known: the estimate is made again with them,
``tracker.cost`` replaced, and the memory check run again beside the construction's estimate, before anything of the
step is recorded (a refusal leaves model, optimizer and ledger as they were). ``cost.settings`` says where B and K
came from. A given ``batch_size`` is kept, with one warning when the step's differs. The GAN analyzer's estimate
(its own passes counted with B and K) follows the tracker's. Before, the estimate stayed at M examples in one
micro-batch: on the GAN analyzer below (M = 6, B = 12 in 2 micro-batches) it predicted about 0.8 of the work counted."""

from __future__ import annotations

import copy
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import genkernel.core.cost as cost
from genkernel import PathKernelTracker
from genkernel.core.cost import estimate_cost
from genkernel.gan import GANKernelAnalyzer, GeneratorLoss, frozen
from genkernel.supervised import mse_loss
from test_gan_analyzer_cost import EVERY, conv, g_forward, mlp, observed_steps, probes

pytestmark = pytest.mark.usefixtures("one_thread", "batch_sets_the_peak")

F64 = torch.float64
PROBES = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)  # M = 5
BATCH, MICRO = 12, 2
FREE = cost.available_memory  # (put back where a test has set its own, keeping batch_sets_the_peak's patch)


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(F64)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)  # (plain SGD: no optimizer state to compare)


def batches(steps=3, batch=BATCH):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, generator=g, dtype=F64), torch.randn(batch, 2, generator=g, dtype=F64),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def loop_step(model, optimizer, x, y, groups, tracker=None, micro=MICRO):
    """One optimizer step of a hand-written loop accumulating ``micro`` micro-batches; observe() its only added line."""
    optimizer.zero_grad()
    size = x.shape[0] // micro
    for i in range(micro):
        rows = slice(i * size, (i + 1) * size)
        losses = mse_loss(model(x[rows]), y[rows])
        if tracker is not None:
            tracker.observe(losses, groups[rows])
        (losses.mean() / micro).backward()
    optimizer.step()


def direct_estimate(tracker, batch, micro_batches):
    """estimate_cost called directly with the tracker's route and the given B and K."""
    return estimate_cost(tracker.module, tracker.optimizer, tracker.probes, outputs=2, rows=3, partitions=1,
                         group_state="dense", gradient_route="graph", contribution_route=tracker.route.contribution_route,
                         quadrature_nodes=1, batch_size=batch, micro_batches=micro_batches)


def same_estimate(a, b):
    return a.memory == b.memory and a.work == b.work and a.bare_step == b.bare_step


def dense_tracker(model, optimizer, **options):
    return PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3, group_state="dense",
                             gradient_route="graph", **options)


def test_an_observed_loops_estimate_takes_its_first_steps_batch_and_micro_batches():
    """Built without batch_size / micro_batches: the estimate uses M = 5 in one micro-batch and says so; after the
    first observed step (12 examples in 2 micro-batches) it is estimate_cost's with batch_size=12, micro_batches=2,
    exactly, and says the first step gave them. Before, it stayed at 5 in one micro-batch (the ratio 4.1x against
    3.5x with the real batch on this MLP)."""
    model, optimizer = model_and_optimizer()
    tracker = dense_tracker(model, optimizer)
    built = tracker.cost
    assert same_estimate(built, direct_estimate(tracker, 5, 1))
    data = batches()
    loop_step(model, optimizer, *data[0], tracker=tracker)
    followed = tracker.cost
    assert same_estimate(followed, direct_estimate(tracker, BATCH, MICRO)) and not same_estimate(followed, built)
    assert (built.settings["batch"], built.settings["micro_batches"]) == (5, 1)
    assert (built.settings["batch_from"], built.settings["micro_batches_from"]) == ("probes", "default")
    assert (followed.settings["batch"], followed.settings["micro_batches"]) == (BATCH, MICRO)
    assert (followed.settings["batch_from"], followed.settings["micro_batches_from"]) == ("first_step", "first_step")
    loop_step(model, optimizer, *data[1], tracker=tracker)  # once per tracker: the later steps leave it
    assert tracker.cost is followed and tracker.ledger.steps == 2


def test_an_owned_steps_estimate_takes_its_batch():
    """tracker.step(x, y, groups) without batch_size: the first step's 12 examples (one micro-batch) replace M = 5;
    the micro-batch count stays 1, now from the first step. Before: 5."""
    model, optimizer = model_and_optimizer()
    tracker = dense_tracker(model, optimizer)
    x, y, groups = batches()[0]
    tracker.step(x, y, groups)
    assert same_estimate(tracker.cost, direct_estimate(tracker, BATCH, 1))
    assert (tracker.cost.settings["batch_from"], tracker.cost.settings["micro_batches_from"]) == ("first_step",
                                                                                                 "first_step")


@pytest.mark.parametrize("memory_check", ["refuse", "warn"])
def test_a_first_step_whose_batch_does_not_fit_is_refused_before_anything_changes(monkeypatch, memory_check):
    """The device's free memory just under what the real batch adds to the construction's estimate: the first
    observed step is refused with a MemoryError naming batch_size, the real batch and memory_check='warn', with the
    parameters, the optimizer, the gradients and the ledger as before optimizer.step() and the estimate the
    construction's; with one byte more it fits. The loop then runs the step again and trains exactly as without a
    tracker. With memory_check='warn' it is a ResourceWarning and the step is recorded. Before, no check at the step:
    recorded."""
    model, optimizer = model_and_optimizer()
    bare_model = copy.deepcopy(model)
    bare_optimizer = torch.optim.SGD(bare_model.parameters(), lr=0.05)
    tracker = dense_tracker(model, optimizer, memory_check=memory_check)
    built = tracker.cost
    grown = direct_estimate(tracker, BATCH, MICRO).total_bytes - built.total_bytes
    assert grown > 0
    monkeypatch.setattr(cost, "available_memory", lambda device: grown - 1)
    data = batches()
    if memory_check == "warn":
        with pytest.warns(ResourceWarning, match="batch_size"):
            loop_step(model, optimizer, *data[0], tracker=tracker)
        assert tracker.ledger.steps == 1 and tracker.cost.settings["batch"] == BATCH
        return
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(MemoryError) as refused:
        loop_step(model, optimizer, *data[0], tracker=tracker)
    message = str(refused.value)
    assert "batch_size" in message and f"{BATCH} examples in {MICRO} micro-batches" in message
    assert "memory_check='warn'" in message and "step 1" in message
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    assert not optimizer.state and tracker.ledger.steps == 0 and tracker.attempted_steps == 0
    assert tracker.cost is built and tracker.cost.settings["batch_from"] == "probes"
    monkeypatch.setattr(cost, "available_memory", lambda device: grown)  # one byte more: it fits
    for x, y, groups in data:
        loop_step(model, optimizer, x, y, groups, tracker=tracker)
        loop_step(bare_model, bare_optimizer, x, y, groups)
    assert tracker.ledger.steps == 3 and tracker.cost.settings["batch"] == BATCH
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare_model.parameters()))


def test_a_given_batch_size_is_kept_and_a_different_first_step_warns_once():
    """batch_size=20 given, the loop trains 12 in 2 micro-batches: the estimate stays the one asked for (B = 20),
    and the first step warns once, naming both numbers; micro_batches, not given, follows the step. Given as the
    step's own, nothing warns. Before: no warning."""
    model, optimizer = model_and_optimizer()
    tracker = dense_tracker(model, optimizer, batch_size=20)
    data = batches()
    with pytest.warns(UserWarning, match="batch_size=20 but this step's is 12"):
        loop_step(model, optimizer, *data[0], tracker=tracker)
    assert same_estimate(tracker.cost, direct_estimate(tracker, 20, MICRO))
    assert (tracker.cost.settings["batch_from"], tracker.cost.settings["micro_batches_from"]) == ("batch_size",
                                                                                                 "first_step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop_step(model, optimizer, *data[1], tracker=tracker)  # once
        model, optimizer = model_and_optimizer()
        matching = dense_tracker(model, optimizer, batch_size=BATCH, micro_batches=MICRO)
        built = matching.cost
        loop_step(model, optimizer, *data[0], tracker=matching)
    assert matching.cost.memory == built.memory and matching.cost.settings["batch_from"] == "batch_size"


def test_training_is_bit_identical_with_a_tracker_that_estimates_again():
    """coverage: passes before. Three steps of 12 examples in 2 micro-batches with a tracker built without
    batch_size (its estimate made again at the first step) leave the parameters bit for bit those of the loop
    without it."""
    model, optimizer = model_and_optimizer()
    bare_model = copy.deepcopy(model)
    bare_optimizer = torch.optim.SGD(bare_model.parameters(), lr=0.05)
    tracker = dense_tracker(model, optimizer)
    for x, y, groups in batches():
        loop_step(model, optimizer, x, y, groups, tracker=tracker)
        loop_step(bare_model, bare_optimizer, x, y, groups)
    assert tracker.ledger.steps == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare_model.parameters()))


@pytest.mark.parametrize("build", [mlp, conv])
def test_the_gan_analyzers_estimate_follows_a_bound_loops_real_batch(build):
    """A GAN analyzer bound before its first step (M = 6 probes), the loop training G on 12 latents in 2
    micro-batches, D frozen: everything steps 2 and 3 count is twice the analyzer's estimated step
    (``bare_step + sum(work)``) once the first step gave B and K, as tests/test_gan_analyzer_cost.py checks at
    B = M. Before, the estimate stayed at 6 in one micro-batch: 0.8 of the count on the conv pair."""
    analyzer, G, shape, total, bound_batch = observed_steps(build, BATCH, 2)
    assert bound_batch == 6  # (the probes' count, until the first step)
    estimate = analyzer.cost
    assert 2 * (estimate.bare_step + sum(estimate.work.values())) == pytest.approx(total / g_forward(G, shape),
                                                                                   rel=1e-9)
    assert (estimate.settings["batch"], estimate.settings["micro_batches"]) == (BATCH, 2)
    assert estimate.settings["analysis_micro_batches"] == 2 and estimate.settings["batch_from"] == "first_step"


def test_the_gan_analyzers_passes_are_checked_again_with_the_real_batch(monkeypatch):
    """The analyzer's own passes checked beside the tracker's new estimate: on the conv pair with a geometry_loss
    (its push of the batch, which holds D's graph of the batch: at M = 6 no memory beyond the step's temporaries,
    at B = 128 some; at B = 64 none beside the conv generator's measured pushes, core.push_memory) and free memory for the tracker's growth with the real batch and not a byte more, the tracker
    fits, the analyzer's passes do not: the first generator step is refused naming the batch, nothing recorded, the
    pass record and the tracker's estimate left as at bind. Before: recorded."""
    batch = 128

    def bound():
        G, D, shape = conv()
        analyzer = GANKernelAnalyzer(G, D, probes(shape, 6), num_groups=2, window=2 * EVERY, eval_every=EVERY,
                                     track_discriminator=False, geometry_loss=GeneratorLoss(D))
        g_opt = torch.optim.Adam(G.parameters(), 1e-3)
        analyzer.bind(g_opt, None)
        return G, D, shape, analyzer, g_opt

    def first_step(G, D, shape, analyzer, g_opt):
        z = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        g_opt.zero_grad()
        with frozen(D):
            fake = G(z)
            losses = F.binary_cross_entropy_with_logits(D(fake).view(-1), torch.ones(batch, dtype=F64),
                                                        reduction="none")
            analyzer.observe_generator(losses, z, fake)
            losses.mean().backward()
        g_opt.step()

    twin = bound()  # the tracker's growth, with the memory free
    at_bind = twin[3].g_tracker.cost.total_bytes
    first_step(*twin)
    growth = twin[3].g_tracker.cost.total_bytes - at_bind
    assert growth > 0 and twin[3].g_tracker.cost.settings["batch"] == batch
    assert twin[3].cost.memory["analysis_passes"] > 0
    G, D, shape, analyzer, g_opt = bound()
    record, tracker = analyzer._pass_record, analyzer.g_tracker
    built = tracker.cost
    monkeypatch.setattr(cost, "available_memory", lambda device: growth)
    theta = [p.detach().clone() for p in G.parameters()]
    with pytest.raises(MemoryError, match=f"batch of {batch} examples") as refused:
        first_step(G, D, shape, analyzer, g_opt)
    assert "GAN analyzer's own passes" in str(refused.value) and "batch_size" in str(refused.value)
    assert all(torch.equal(p, q) for p, q in zip(G.parameters(), theta)) and tracker.ledger.steps == 0
    assert analyzer._pass_record is record and tracker.cost is built and not g_opt.state
    monkeypatch.setattr(cost, "available_memory", FREE)  # free again: the loop runs the step again, as the twin's
    first_step(G, D, shape, analyzer, g_opt)
    assert tracker.ledger.steps == 1 and analyzer.g_steps == 1
    assert analyzer.cost.work == twin[3].cost.work and analyzer.cost.memory == twin[3].cost.memory
    assert all(torch.equal(p, q) for p, q in zip(G.parameters(), twin[0].parameters()))


def test_the_noise_level_analyzers_estimate_follows_and_its_kernel_record_is_checked_again(monkeypatch):
    """NoiseLevelAnalyzer bound to a loop of your own without batch_size (M = 4 probes): after the first observed step
    (12 examples in 2 micro-batches) its cost is the tracker's new estimate with the kernel records added; with free
    memory for the tracker's growth and not the kernel record beside it, that first step is refused naming the batch,
    nothing recorded, and runs once the memory is free. Before: the estimate stayed at 4 in one micro-batch, no
    check at the step."""
    from genkernel.core.cost import with_kernel_records
    from genkernel.diffusion import NoiseLevelAnalyzer
    from genkernel.diffusion.objectives import make_scheduler, noisy_input
    from test_analyzer_kernel_cost import tiny_unet

    scheduler = make_scheduler(100)
    g = torch.Generator().manual_seed(2)
    clean, noise = torch.randn(BATCH, 1, 4, 4, generator=g, dtype=F64), torch.randn(BATCH, 1, 4, 4, generator=g, dtype=F64)
    t = torch.randint(0, 100, (BATCH,), generator=g)

    def bound():
        model, data = tiny_unet()  # (a kernel record that needs memory beyond the step's temporaries)
        analyzer = NoiseLevelAnalyzer(scheduler, data[:8], num_bins=2, num_probes=4, kernel_points=4, progress=False)
        optimizer = torch.optim.SGD(model.parameters(), 1e-3)
        analyzer.bind(model, optimizer)
        return model, optimizer, analyzer

    def first_step(model, optimizer, analyzer, before_step=lambda: None):
        """Returns the tracker's estimate as optimizer.step() begins (observe() switched it to the dense route)."""
        optimizer.zero_grad()
        for rows in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
            out = model(noisy_input(scheduler, clean[rows], noise[rows], t[rows]), t[rows]).sample
            losses = ((out - noise[rows]) ** 2).mean(dim=(1, 2, 3))
            analyzer.observe(losses, t[rows])
            (losses.mean() / 2).backward()
        built = analyzer.tracker.cost
        before_step()
        optimizer.step()
        return built

    model, optimizer, analyzer = bound()
    built = first_step(model, optimizer, analyzer)
    followed = analyzer.tracker.cost
    assert (followed.settings["batch"], followed.settings.get("micro_batches")) == (BATCH, 2)
    assert analyzer.cost.as_dict() == with_kernel_records(followed, analyzer._kernel_record,
                                                          analyzer.kernel_every).as_dict()
    assert analyzer.cost.bare_step > built.bare_step
    growth = followed.total_bytes - built.total_bytes
    model, optimizer, analyzer = bound()
    tracker = analyzer.tracker
    theta = [p.detach().clone() for p in model.parameters()]
    # the free memory at the step: the tracker's growth, not the record beside it
    with pytest.raises(MemoryError, match="kernel structure records") as refused:
        first_step(model, optimizer, analyzer,
                   lambda: monkeypatch.setattr(cost, "available_memory", lambda device: growth))
    assert "batch_size" in str(refused.value) or f"{BATCH} examples" in str(refused.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta)) and tracker.ledger.steps == 0
    assert tracker.cost.settings["batch"] == 4 and tracker.cost.settings["batch_from"] == "probes"
    monkeypatch.setattr(cost, "available_memory", FREE)
    first_step(model, optimizer, analyzer)
    assert tracker.ledger.steps == 1 and tracker.cost.settings["batch"] == BATCH


# -- under DDP: a first step one rank refuses is refused on every rank --------------------------------------------
def _ddp_worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    cost.TRAINING_ACTIVATIONS = 1e4  # (batch_sets_the_peak, in this spawned process)
    try:
        model, _ = model_and_optimizer()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        tracker = PathKernelTracker(ddp, optimizer, mse_loss, PROBES, num_groups=3, gradient_route="graph")
        built = tracker.cost
        x, y, groups = batches(batch=2 * BATCH)[0]
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        theta = [p.detach().clone() for p in model.parameters()]
        available = cost.available_memory
        if rank == 1:  # only rank 1's device is short of memory for the real batch (a byte under its growth)
            cost.available_memory = lambda device: 0
        try:
            loop_step(ddp, optimizer, x[shard], y[shard], groups[shard], tracker=tracker)
            error = None
        except Exception as caught:
            error = f"{type(caught).__name__}: {caught}"
        finally:
            cost.available_memory = available
        out = {"error": error, "unchanged": all(torch.equal(p, q) for p, q in zip(model.parameters(), theta)),
               "steps": tracker.ledger.steps, "batch": tracker.cost.settings["batch"], "same": tracker.cost is built}
        loop_step(ddp, optimizer, x[shard], y[shard], groups[shard], tracker=tracker)  # both fit now
        out.update(after_steps=tracker.ledger.steps, after_batch=tracker.cost.settings["batch"],
                   after_micro=tracker.cost.settings.get("micro_batches"))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done before either tears the group down (tests/test_distributed.py's worker): a rank that
        # destroys it while the other still drains the last collective's messages closes their connection under
        # it, and gloo's thread there aborts the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_under_ddp_a_first_step_one_rank_cannot_hold_is_refused_on_both(tmp_path):
    """Two gloo processes, each observing its 12 rows in 2 micro-batches, only rank 1 short of memory: both raise a
    MemoryError at the first step (rank 1 its own, naming batch_size; rank 0 that rank 1 refused), nothing moves,
    no step is recorded; the step run again is recorded on both with the rank's batch, 12 in 2. Before: recorded on
    both at the first try."""
    # Read from the files each rank saves before the group is torn down, as tests/test_distributed_review.py's
    # scenarios are: gloo's teardown on 2 loaded cores can abort a process after its results are saved ("terminate
    # called without an active exception", twice in the clean-clone CI, never in 10 loaded runs here), which says
    # nothing of the step; a rank that died before saving fails below with the exit codes.
    context = mp.start_processes(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    for process in context.processes:
        process.join(timeout=240)
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    codes = [process.exitcode for process in context.processes]
    missing = [r for r in range(2) if not (tmp_path / f"rank{r}.pt").exists()]
    assert not missing, f"ranks {missing} saved no result (exit codes {codes})"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[1]["error"].startswith("MemoryError") and "batch_size" in ranks[1]["error"]
    assert ranks[0]["error"].startswith("MemoryError") and "rank" in ranks[0]["error"]
    for out in ranks:
        assert out["unchanged"] and out["steps"] == 0 and out["same"] and out["batch"] == 5
        assert (out["after_steps"], out["after_batch"], out["after_micro"]) == (1, BATCH, MICRO)
