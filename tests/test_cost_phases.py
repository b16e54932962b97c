"""The cost estimate's total is the step's peak, not the sum of its parts.

A tracked step runs in phases whose temporaries are freed before the next: the training pass (its activations,
what it keeps of them, on the dense route the group rows formed from its graph), the group gradients read from the
training records, and the analysis after the optimizer's step (rows, split update, checks, pushes). Before, every
part was summed, the training activations at three times their elements: on an MNIST-sized UNet2DModel (B = 32,
16 probes, 20 group rows, Adam, float32 state) the estimate was 1374 MiB against a measured peak of 621-771 MiB (a
tracker refused where it fits), 2.35x the allocated peak of the CIFAR-10 UNet on an H200. Now each phase is
summed with the parts held throughout, and the largest phase is the peak."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import genkernel.core.cost as cost
from genkernel.core.cost import CostEstimate, STEP_TEMPORARIES, estimate_cost, with_analysis_passes, with_kernel_records
from peak_rss import measure_script

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINING = ("training_step", "training_activations", "frozen_weights")


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(8 * 12 * 12, 3))


def estimate(batch, *, group_state="dense", gradient_route="graph", optimizer="adam", budget=2**20, rows=6):
    model = conv_net()
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=1e-3)
    probes = (torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1)),)
    return estimate_cost(model, opt, probes, outputs=3, rows=rows, group_state=group_state,
                         gradient_route=gradient_route, batch_size=batch, memory_budget=budget, device="cpu")


ROUTES = [dict(group_state="dense", gradient_route="graph"), dict(group_state="dense", gradient_route="example"),
          dict(group_state="dense", gradient_route="factored"), dict(group_state="factored", optimizer="sgd"),
          dict(group_state="sketched", optimizer="sgd")]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: "-".join(r.values()))
def test_the_total_is_the_parts_held_throughout_and_the_largest_phase(route):
    """On every route: the phases are the three named, the analysis phase is STEP_TEMPORARIES, every part is held
    throughout or in a phase, and the total is the held parts plus the largest phase's (no part counted twice);
    analysis_bytes is the total less the training step's parts; the report carries the phases and the peak's."""
    for batch in (2, 64):
        e = estimate(batch, **route)
        assert set(e.phases) == {"training pass", "group gradients", "analysis"}
        assert e.phases["analysis"] == STEP_TEMPORARIES
        assert "training_activations" in e.phases["training pass"] and "training_step" not in e.phases["training pass"]
        in_phases = {p for parts in e.phases.values() for p in parts}
        held = sum(v for k, v in e.memory.items() if k not in in_phases)
        sizes = {name: sum(e.memory.get(p, 0) for p in parts) for name, parts in e.phases.items()}
        assert e.total_bytes == held + max(sizes.values()) < sum(e.memory.values())
        assert e.peak_phase == max(sizes, key=sizes.get) and e.phase_bytes() == sizes
        assert e.analysis_bytes == e.total_bytes - sum(e.memory.get(k, 0) for k in TRAINING)
        report = e.as_dict()
        assert report["peak_phase"] == e.peak_phase and report["total_bytes"] == e.total_bytes
        assert report["phases"] == {k: list(v) for k, v in e.phases.items()}


def test_a_larger_batch_moves_the_peak_only_once_the_training_pass_is_largest():
    """The batch's activations are freed before the analysis: while the analysis phase is the peak, a larger batch
    leaves the total as it is (the training pass grows below it); once the training pass is the largest, the total
    grows with it, by TRAINING_ACTIVATIONS activation elements per example. Before, every batch added its
    activations (three times) to the sum."""
    totals, peaks, backward = {}, {}, {}
    for batch in (1, 2, 512, 1024):
        e = estimate(batch)
        totals[batch], peaks[batch], backward[batch] = e.total_bytes, e.peak_phase, e.memory["row_backward"]
        if batch == 1:
            per_example = e.memory["training_activations"]
    assert peaks[1] == peaks[2] == "analysis" and totals[1] == totals[2]
    assert peaks[512] == peaks[1024] == "training pass"
    # (and the rows' batched backward through the graph, as many rows at once as the budget holds)
    assert totals[1024] - totals[512] == 512 * per_example + backward[1024] - backward[512]
    model = conv_net()
    elements = cost.hooked_forward_counts(model, (torch.randn(1, 1, 12, 12),), grad=True)[0]
    assert per_example == int(cost.TRAINING_ACTIVATIONS * elements * 4)


def test_an_analyzers_passes_count_their_excess_in_every_phase():
    """An analyzer's kernel record or own passes run between steps, beside the parts held throughout: the total grows
    by their excess over the analysis phase whichever phase is the peak (the record alone fits within the total:
    held parts plus the record), and by nothing when the analysis phase holds them; a kernel record every step runs
    in the tracker's listener, beside the recorded step and its split update (phase "listener")."""
    for batch in (2, 1024):  # the analysis phase, then the training pass, the peak
        e = estimate(batch)
        analysis = e.phase_bytes()["analysis"]
        held = e.total_bytes - max(e.phase_bytes().values())
        for big in (analysis // 2, analysis + 10**6):
            record = with_kernel_records(e, {"work": 1.0, "bytes": big, "states": 4, "sketch": None}, 1)
            passes = with_analysis_passes(e, {"work": {"passes": 1.0}, "bytes": big})
            for added, part in ((record, "kernel_record"), (passes, "analysis_passes")):
                assert added.memory[part] == max(0, big - analysis)
                # a kernel record every step runs in the tracker's listener, beside the recorded step and its split
                # update (the "listener" phase: the record up to the temporaries, its excess beside every phase)
                listener = (added.memory["step_record"] + e.memory["group_updates"] + min(big, analysis)
                            if part == "kernel_record" else 0)
                assert added.total_bytes == held + max(max(e.phase_bytes().values()), listener) + added.memory[part]
                assert added.total_bytes >= held + big and added.peak_phase is not None


def test_an_estimate_without_phases_sums_its_parts():
    """A CostEstimate made without phases (by hand) sums its parts, as every estimate did before the phases."""
    e = CostEstimate({"a": 3, "b": 4}, None, {}, 1.0)
    assert e.total_bytes == 7 and e.peak_phase is None and e.phase_bytes() == {}


MEASURE = textwrap.dedent("""
    import gc, json, sys
    import torch
    torch.set_num_threads(1)
    import genkernel.diffusion  # (imports before the baseline)
    from diffusers import UNet2DModel  # noqa: F401
    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
    from genkernel.diffusion.configs import mnist_unet
    from genkernel.diffusion.objectives import diffusion_loss, noisy_input, training_target
    from genkernel.core.tracking.step import OptimizerStep

    batch, probes, bins, controls = map(int, sys.argv[1:5])
    scheduler = make_scheduler(1000, clip_sample=True)
    gc.collect()
    before_model = rss()["VmRSS"]
    torch.manual_seed(0)
    model = mnist_unet()
    g = torch.Generator().manual_seed(0)
    data = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [(data[torch.randint(0, 64, (batch,), generator=g)], torch.randn(batch, 1, 28, 28, generator=g),
                torch.randint(0, 1000, (batch,), generator=g)) for _ in range(3)]
    clean, noise, t = batches[0]
    OptimizerStep(model, optimizer, diffusion_loss, (noisy_input(scheduler, clean, noise, t), t),
                  training_target(scheduler, clean, noise, t)).run()  # the optimizer's state, as mid-training
    analyzer = NoiseLevelAnalyzer(scheduler, data, num_bins=bins, num_probes=probes, controls=controls,
                                  snapshot_every=0, kernel_every=0, progress=False, group_state="dense",
                                  state_dtype=torch.float32)
    analyzer.record_kernel = lambda: {}  # (the kernel records at bind and at the end are not a step's)
    analyzer.bind(model, optimizer, batch_size=batch)
    analyzer.step(*batches[1])  # the first tracked step allocates what the tracker keeps
    gc.collect()
    reset_peak()  # VmHWM back to VmRSS: the peak of the next step
    analyzer.step(*batches[2])
    print(json.dumps({"measured": rss()["VmHWM"] - before_model, "predicted": analyzer.tracker.cost.total_bytes}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("setting", [(16, 8, 10, 0), (32, 16, 10, 1)], ids=["B16-10rows", "B32-20rows"])
def test_the_estimate_is_near_the_measured_peak_of_a_unet_step(setting):
    """A tracked step of the MNIST-sized UNet2DModel (Adam, dense float32 state, default memory budget) in a fresh
    process, glibc returning every block of 64 KiB or more at once (the peak is what the step holds): the estimate
    within [0.8, 1.45] of the peak RSS above the process before the model. Measured after: 1.15 (490 MiB for 427)
    and 1.36 (843 for 621, its peak the training pass, whose activations' factor is set for glibc's default
    allocator, 1.12 of a peak of 750 there); before, 1.95 and 2.21 (834 and 1374 MiB). About 20 s and 45 s on one
    thread."""
    result = measure_script(MEASURE, *map(str, setting), timeout=600)
    assert result["measured"] > 200 * 2**20  # (a step large enough to read above the process's noise)
    assert 0.8 <= result["predicted"] / result["measured"] <= 1.45, result
