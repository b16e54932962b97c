"""Benchmark: what tracking costs at the scale people train, measured beside the cost estimate (issue 15).

    python -m recipes.benchmarks.scale [--quick] [--out-dir figures] [--seed 0] [--threads 2]

(from the repository root; ``--threads`` defaults to ``$BENCH_THREADS`` or 2, the cores the
committed figures were measured on). Three measurements, side by side in one run:

1. Memory of the DDPM CIFAR-10 UNet (``ddpm_cifar10_unet(dropout=0.0)``, 35.75M parameters, 32×32)
   under the :class:`~genkernel.diffusion.NoiseLevelAnalyzer` on the CPU: Adam, batch 4, 4 probes,
   5 log-SNR bins and one permutation control (10 group rows: the issue's 10 bins and a control,
   20 rows, would need about 14 GiB, more than a shared 24 GiB machine should give one
   benchmark), dense float32 group state. Each configuration runs in its own subprocess
   (:func:`~recipes.benchmarks.harness.run_child`) so that its peak is its own: a *bare* process
   (one warm-up step and two training steps) and a *tracked* one (the same warm-up step, then two
   tracked steps; the second is the first with committed and pending group state both alive).
   The peak of a process is ``ru_maxrss``; what the run added is that peak minus the process's
   RSS after its imports, before the model was built. Compared with the estimator
   (:func:`genkernel.core.cost.estimate_cost`, ``analyzer.tracker.cost``):

   - total: the tracked process's peak minus its RSS before the model, against ``total_bytes``
     (model, training and tracking: what a user must have free). **The 20 % claim is this one.**
   - analysis only: the tracked peak minus the bare process's peak, each less its own RSS before
     the model (the total's measure less the training's), against ``analysis_bytes``
     (reported beside it; the two peaks fall in different phases, so this difference is a
     lower bound of what tracking holds at its own peak).
   - training: the bare process's peak minus its RSS before the model, against the estimate's
     ``training_step`` and ``training_activations`` (and ``frozen_weights``).

   The tracked child also records, per phase of the step (monkeypatched wrappers around the
   tracker's, route's and splitter's methods; none of them is edited), the seconds, the peak RSS
   reached inside the phase and the RSS left after it, and the bytes of the arrays each phase
   returns (group gradients, split updates, committed and pending group state), against the
   estimate's parts. Seconds per tracked step against a bare step come from the same two
   processes (run one after the other, not interleaved: each holds several GiB).
2. Plain SGD (no momentum) on the factored route against a bare step, at B = 256 and 512: a
   :class:`~genkernel.PathKernelTracker` with one group per training example (``num_groups`` = all
   examples the run steps through), ``group_state="auto"`` (the route it picks and the estimate's
   settings are recorded: it must be "factored"), 64 probes, cross-entropy
   (:func:`genkernel.supervised.cross_entropy_loss`), on the MLP 784→256→256→10 and the small CNN
   of :mod:`recipes.benchmarks.kernels` (its ``mlp784`` and ``convnet10`` rows). Bare and tracked
   steps are interleaved (:func:`~recipes.benchmarks.harness.interleaved`: first calls apart,
   then rounds in rotated order), median seconds and the load average beside them. Target: at
   most 3× a bare step. Then the same on SGD with momentum 0.9 and ``group_state="sketched"``
   (the CNN at B = 256; no time target). Every row, and the tiny UNet of part 3, carries the
   estimate's predicted ratio (``tracker.cost.ratio``, known before the run) beside the step's
   operation count (``torch.utils.flop_counter``): the claim is that they agree to 10 %.
3. The tiny UNet of :mod:`recipes.benchmarks.diffusion` (its full settings: 16×16 digits,
   channels 16-32, batch 32) under the analyzer with 10 log-SNR bins, one control partition and
   64 probes, against a bare DDPM step, interleaved. Target: at most 8×, with the analyzed model
   bit-equal to the bare one after the same steps (``training_unchanged``, as for part 2). Then a few more analyzed
   steps with timers around the tracker's phases give where the time goes (exclusive seconds and
   fraction of the step per phase: training forward and backward, per-example group gradients,
   the checks, the split, the contribution JVPs per quadrature node, probe forwards, ...).

4. The same tiny-UNet timing in fresh processes, alternately with glibc's default allocator and
   with ``ALLOCATOR_TUNING`` (large freed arrays kept in the heap: the README's "CPU allocator"),
   ``allocator_rounds`` times each: what the page faults of fresh large arrays cost the analyzed
   step. No target; the numbers behind the README's paragraph.

``--quick`` (about 2 minutes on 2 loaded cores): part 1 with ``mnist_unet`` (1.1M parameters,
28×28) instead of the CIFAR UNet, fewer repeats, a smaller tiny UNet. The hidden ``--smoke`` (the
test suite's) uses an MLP denoiser in part 1, runs its two children at once, and tiny sizes:
its numbers check the plumbing, not the claims.

Writes ``OUT/benchmark_scale.json``: ``settings``, ``machine`` (threads, cores, load average at
the start and the end, torch version), ``memory`` (both children's raw numbers, the estimate's
parts, the three comparisons with their relative errors, the per-phase profile and array
inventory, seconds per step), ``sgd_factored`` and ``sketched`` (per model and batch: route,
medians, ratio, load, first calls, residual, operation counts, the estimate's predicted ratio and
its work per part), ``tiny_unet`` (medians, ratio,
load, the breakdown), ``allocator`` (per process: environment, medians, ratio; the medians per
setting), and ``claims``: a list of ``{"claim", "held", "numbers"}``, ``held``
computed from ``numbers`` (never written by hand). Also ``OUT/benchmark_scale.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from genkernel.core.cost import TRAINING_PARTS
from genkernel.core.tracking.io import jsonable

from ..common import Timer, make_parser, parse, pick
from .harness import (
    CHILD_OUT_FLAG, allocator_settings, counted_flops, interleaved, load_average, print_ratios, rss_bytes, run_child,
    write_outputs,
)

NAME = "benchmark_scale"
MODULE = __spec__.name  # what the memory children run: python -m MODULE --memory-child ...
MEMORY_TOLERANCE = 0.20  # the issue: predicted memory within 20 % of the measured peak
SGD_TARGET = 3.0  # plain SGD, factored route, one group per example: at most 3x a bare step
UNET_TARGET = 8.0  # tiny UNet, 10 bins, one control, 64 probes: at most 8x a bare step
ESTIMATE_TOLERANCE = 0.10  # the estimate's predicted ratio against the step's operation count
_MISSING = object()  # replace_attribute: the replaced attribute was not the owner's own
# Keeps freed arrays up to 1 GB in the heap (glibc otherwise maps arrays over 32 MB afresh each time)
ALLOCATOR_TUNING = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483648"}

SETTINGS = dict(
    full=dict(memory_model="ddpm_cifar10", memory_batch=4, memory_probes=4, memory_bins=5, memory_controls=1,
              memory_warmup=1, memory_steps=2, memory_timeout=2400.0, memory_parallel=False,
              sgd_models=("mlp", "cnn"), sgd_batches=(256, 512), sgd_probes=64, sgd_repeats=7,
              sketched_models=("cnn",), sketched_batch=256, sketched_repeats=5,
              unet_batch=32, unet_channels=(16, 32), unet_probes=64, unet_bins=10, unet_controls=1, unet_warmup=2,
              unet_repeats=5, breakdown_steps=2, allocator_rounds=2),
    quick=dict(memory_model="mnist", memory_batch=4, memory_probes=4, memory_bins=5, memory_controls=1,
               memory_warmup=1, memory_steps=2, memory_timeout=300.0, memory_parallel=False,
               sgd_models=("mlp", "cnn"), sgd_batches=(256, 512), sgd_probes=64, sgd_repeats=3,
               sketched_models=("cnn",), sketched_batch=256, sketched_repeats=2,
               unet_batch=16, unet_channels=(8, 16), unet_probes=64, unet_bins=10, unet_controls=1, unet_warmup=1,
               unet_repeats=2, breakdown_steps=1, allocator_rounds=1),
    smoke=dict(memory_model="mlp", memory_batch=4, memory_probes=2, memory_bins=2, memory_controls=1,
               memory_warmup=1, memory_steps=2, memory_timeout=120.0, memory_parallel=True,
               sgd_models=("mlp", "cnn"), sgd_batches=(16,), sgd_probes=4, sgd_repeats=1,
               sketched_models=("cnn",), sketched_batch=16, sketched_repeats=1,
               unet_batch=2, unet_channels=(8, 16), unet_probes=2, unet_bins=3, unet_controls=1, unet_warmup=1,
               unet_repeats=1, breakdown_steps=1, allocator_rounds=1),
)


# --------------------------------------------------------------------------------- phase timers
def replace_attribute(owner: Any, attribute: str, replacement: Any) -> tuple[Any, str, Any]:
    """``owner.attribute = replacement`` (an instance's, a class's or a module's attribute);
    returns what :func:`put_back` needs: the owner's own attribute (a class's or module's
    function), or nothing (an instance's method comes from its class again once deleted)."""
    saved = vars(owner).get(attribute, _MISSING)
    setattr(owner, attribute, replacement)
    return owner, attribute, saved


def put_back(patches: list[tuple[Any, str, Any]]) -> None:
    """Undoes :func:`replace_attribute` calls, last first."""
    for owner, attribute, saved in reversed(patches):
        if saved is _MISSING:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, saved)


class PhaseClock:
    """Exclusive seconds per named phase of nested calls and, with ``poll_s``, the peak RSS seen
    inside each phase (a thread samples ``/proc/self/statm``; the sample goes to the innermost
    phase running then) and the RSS just after its last call. With ``cuda_device``, each phase's
    exact peak of CUDA-allocated bytes: at every phase boundary the allocator's peak since the last
    boundary goes to the phase that ran in between (the innermost then), and the peak starts over.

    Phases are methods wrapped in place with :meth:`wrap` (an instance's, a class's or a module's
    attribute) and put back by :meth:`restore`: the library is timed as it runs, never edited.
    Exclusive times of the phases add up to the outermost phase's wall time.
    """

    def __init__(self, poll_s: float | None = None, cuda_device: torch.device | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_allocated: dict[str, int] = defaultdict(int)
        self._cuda = cuda_device
        if cuda_device is not None:
            torch.cuda.synchronize(cuda_device)
            torch.cuda.reset_peak_memory_stats(cuda_device)
        self.calls: dict[str, int] = defaultdict(int)
        self.peak_rss: dict[str, int] = defaultdict(int)
        self.rss_after: dict[str, int] = {}
        self.returned_bytes: dict[str, int] = {}
        self._stack: list[list] = []  # [name, started, seconds spent in nested phases]
        self._current: str | None = None  # read by the polling thread (an atomic assignment)
        self._patched: list[tuple[Any, str, Any]] = []
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = None
        if poll_s is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            name = self._current
            if name is not None:
                rss = rss_bytes()
                if rss > self.peak_rss[name]:
                    self.peak_rss[name] = rss
            time.sleep(self._poll_s)

    def _cuda_boundary(self) -> None:
        if self._cuda is None:
            return
        torch.cuda.synchronize(self._cuda)
        name = self._current if self._current is not None else "outside the phases"
        self.peak_allocated[name] = max(self.peak_allocated[name], torch.cuda.max_memory_allocated(self._cuda))
        torch.cuda.reset_peak_memory_stats(self._cuda)

    @contextmanager
    def phase(self, name: str):
        """Times the body as phase ``name`` (nested phases' time is theirs, not this one's)."""
        self._cuda_boundary()
        self._stack.append([name, time.perf_counter(), 0.0])
        self._current = name
        try:
            yield
        finally:
            self._cuda_boundary()
            _, started, nested = self._stack.pop()
            elapsed = time.perf_counter() - started
            self.seconds[name] += elapsed - nested
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][2] += elapsed
            self._current = self._stack[-1][0] if self._stack else None
            if self._poll_s is not None:
                self.rss_after[name] = rss_bytes()

    def wrap(self, owner: Any, attribute: str, name: str, measure: Callable[[Any], int] | None = None) -> None:
        """Replaces ``owner.attribute`` (a method or function) by a timed call of it; ``measure(value)``
        records the bytes of what the call returns (the last call's) under ``name``."""
        original = getattr(owner, attribute)
        clock = self

        def timed(*args, **kwargs):
            with clock.phase(name):
                value = original(*args, **kwargs)
            if measure is not None:
                clock.returned_bytes[name] = measure(value)
            return value

        self._patched.append(replace_attribute(owner, attribute, timed))

    def restore(self) -> None:
        """Puts every wrapped attribute back and stops the polling thread."""
        put_back(self._patched)
        self._patched = []
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def table(self, total: float | None = None) -> list[dict]:
        """Rows ``{phase, seconds, fraction, calls, (peak_rss_bytes, rss_after_bytes, peak_allocated_bytes,
        returned_bytes)}``, largest first; ``fraction`` of ``total`` (default the sum of the phases)."""
        total = total if total is not None else sum(self.seconds.values())
        rows = []
        for name, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            row = {"phase": name, "seconds": seconds, "fraction": seconds / total if total > 0 else None,
                   "calls": self.calls[name]}
            if self._poll_s is not None:
                row["peak_rss_bytes"] = self.peak_rss.get(name) or None
                row["rss_after_bytes"] = self.rss_after.get(name)
            if self._cuda is not None:
                row["peak_allocated_bytes"] = self.peak_allocated.get(name)
            if name in self.returned_bytes:
                row["returned_bytes"] = self.returned_bytes[name]
            rows.append(row)
        return rows


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (nested dicts, lists, tuples, dataclass-like objects)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


def wrap_tracker_phases(clock: PhaseClock, tracker, analyzer=None, trainer=None) -> None:
    """Timers around the phases of a tracked step (``genkernel/core/tracking/tracker.py`` and
    ``routes.py``: the numbered steps of ``PathKernelTracker.track``); the returned arrays of the
    group gradients, the split and the contributions are measured in bytes."""
    from genkernel.core.tracking import routes
    from genkernel.core.tracking.step import OptimizerStep

    grads_bytes = lambda value: tensor_bytes(value.grads)  # noqa: E731 - StepGradients: the rows only
    if trainer is not None:
        clock.wrap(trainer, "train", "trainer: batch, noise, bookkeeping")
    if analyzer is not None:
        clock.wrap(analyzer, "_groups", "analyzer: bins and control labels")
        clock.wrap(analyzer, "track", "analyzer: grouping the step")
    route, splitter = tracker.route, tracker.splitter
    clock.wrap(tracker, "track", "tracker: θ copies, bookkeeping")
    clock.wrap(tracker, "_save_state", "tracker: saved optimizer state")
    clock.wrap(OptimizerStep, "compute_gradients", "training forward + backward")
    clock.wrap(route, "gradients", "group gradients (read from the training pass, or a second pass)", grads_bytes)
    clock.wrap(route, "graph_gradients", "group gradients (training graph)", tensor_bytes)
    clock.wrap(tracker, "_begin", "begin: drift, capture")
    clock.wrap(tracker, "_check_gradients", "check: group gradients add up", tensor_bytes)
    clock.wrap(OptimizerStep, "apply_update", "optimizer step")
    clock.wrap(tracker, "_finish", "finish: residual, ledger record")
    clock.wrap(splitter, "split", "split: group updates and state", tensor_bytes)
    clock.wrap(tracker, "_check_updates", "check: updates add up")
    clock.wrap(tracker, "_nodes", "quadrature nodes (θ in between)", tensor_bytes)
    clock.wrap(route, "contributions", "contributions: other")
    clock.wrap(routes, "_jvp_rows", "contributions: JVP pushes (one call per quadrature node)")
    clock.wrap(routes, "per_example_jacobian", "contributions: probe Jacobians")
    clock.wrap(tracker, "_probe_outputs", "probe forwards")
    clock.wrap(route, "commit", "commit")
    clock.wrap(tracker, "_recorded", "listeners: analyzer records")


# ----------------------------------------------------------------------- part 1: memory (child)
def build_denoiser(name: str, seed: int):
    """``(model, clean images [N, C, H, W] or points [N, 2])`` for a memory child, seeded."""
    from genkernel.diffusion import MLPDenoiser
    from genkernel.diffusion.configs import ddpm_cifar10_unet, mnist_unet

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "ddpm_cifar10":
        return ddpm_cifar10_unet(dropout=0.0), torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
    if name == "mnist":
        return mnist_unet(), torch.rand(16, 1, 28, 28, generator=g) * 2 - 1
    if name == "mlp":
        return MLPDenoiser(2, hidden=32, depth=2), torch.randn(16, 2, generator=g)
    raise ValueError(f"unknown memory model {name!r}; choose ddpm_cifar10, mnist or mlp")


def _import_for(name: str) -> None:
    """Imports what building ``name`` imports, so that the RSS taken before the model holds the
    libraries and not the model (diffusers' UNet module alone is a few hundred MB of code)."""
    import genkernel.diffusion  # noqa: F401

    if name in ("ddpm_cifar10", "mnist"):
        from diffusers import UNet2DModel  # noqa: F401


def memory_child(tracked: bool, s: dict, seed: int, out: str) -> None:
    """One configuration of part 1 in this fresh process: warm-up step(s), then bare or tracked
    steps; saves the RSS marks, the peak, the step times, the estimate and the phase profile."""
    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
    from genkernel.diffusion.objectives import diffusion_loss, noisy_input, training_target
    from genkernel.core.tracking.step import OptimizerStep

    _import_for(s["memory_model"])
    scheduler = make_scheduler(1000, clip_sample=s["memory_model"] != "mlp")
    import gc

    gc.collect()
    rss_before_model = rss_bytes()
    model, data = build_denoiser(s["memory_model"], seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    batch = s["memory_batch"]
    steps = s["memory_warmup"] + s["memory_steps"]
    batches = []
    for _ in range(steps):
        clean = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        batches.append((clean, torch.randn(clean.shape, generator=g), torch.randint(0, 1000, (batch,), generator=g)))
    rss_setup = rss_bytes()

    def bare_step(clean, noise, t):
        # What DDPMTrainer does without an analyzer: one OptimizerStep, run as is.
        step = OptimizerStep(model, optimizer, diffusion_loss, (noisy_input(scheduler, clean, noise, t), t),
                             training_target(scheduler, clean, noise, t))
        step.run()

    result: dict[str, Any] = {"tracked": tracked, "model": s["memory_model"], "threads": torch.get_num_threads(),
                              "parameters": sum(p.numel() for p in params), "rss_before_model": rss_before_model,
                              "rss_setup": rss_setup}
    seconds, loads = [], []
    for clean, noise, t in batches[: s["memory_warmup"]]:  # optimizer state exists before the window, as mid-training
        began = time.perf_counter()
        bare_step(clean, noise, t)
        result["warmup_s"] = time.perf_counter() - began
    clock = None
    if tracked:
        analyzer = NoiseLevelAnalyzer(
            scheduler, data, num_bins=s["memory_bins"], num_probes=s["memory_probes"], controls=s["memory_controls"],
            snapshot_every=0, kernel_every=0, kernel_points=2, kernel_sketch=1, progress=False,
            group_state="dense", state_dtype=torch.float32,
        )
        analyzer.record_kernel = lambda: {}  # the kernel structure at binding is not part of a step
        analyzer.bind(model, optimizer)
        result["rss_bound"] = rss_bytes()
        result["estimate"] = analyzer.tracker.cost.as_dict()
        result["route"] = {"group_state": analyzer.tracker.group_state, "route": analyzer.tracker.route.name,
                           "contribution_route": analyzer.tracker.route.contribution_route,
                           "uses_graph": analyzer.tracker.route.uses_graph()}
        clock = PhaseClock(poll_s=0.005)
        wrap_tracker_phases(clock, analyzer.tracker, analyzer)
    for clean, noise, t in batches[s["memory_warmup"]:]:
        began = time.perf_counter()
        if tracked:
            with clock.phase("step: outside the tracker"):
                analyzer.step(clean, noise, t)
        else:
            bare_step(clean, noise, t)
        seconds.append(time.perf_counter() - began)
        loads.append(load_average())
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    result["rss_end"] = rss_bytes()
    result["step_s"], result["step_load"] = seconds, loads
    if tracked:
        clock.restore()
        result["phases"] = clock.table()
        splitter = analyzer.tracker.splitter
        result["held_after"] = {
            "group_state_committed": tensor_bytes(splitter.state),
            "splitter_other": tensor_bytes([splitter.magnitude, splitter.before, splitter.rounding_scale]),
            "ledgers": tensor_bytes([ledger.state_dict() for ledger in analyzer.tracker.ledgers.values()]),
        }
        result["relative_residual"] = analyzer.ledger.relative_residual()
    torch.save(result, out)


# ---------------------------------------------------------------------- part 1: memory (parent)
def memory_comparison(s: dict, seed: int, threads: int) -> dict:
    """Runs the bare and the tracked child (one after the other; at once with ``memory_parallel``)
    and compares their peaks with the estimate."""
    children = {}
    args = {kind: ["--memory-child", kind, "--seed", str(seed), "--threads", str(threads), "--mode-settings",
                   _encode(s)] for kind in ("bare", "tracked")}
    if s["memory_parallel"]:
        with ThreadPoolExecutor(2) as pool:
            futures = {kind: pool.submit(run_child, MODULE, a, s["memory_timeout"]) for kind, a in args.items()}
            children = {kind: f.result() for kind, f in futures.items()}
    else:
        for kind, a in args.items():
            children[kind] = run_child(MODULE, a, s["memory_timeout"])
    out: dict[str, Any] = {"model": s["memory_model"], "children": children}
    bare, tracked = children["bare"], children["tracked"]
    if "error" in bare or "error" in tracked:
        out["error"] = {k: v.get("error") for k, v in children.items() if "error" in v}
        return out
    estimate = tracked["estimate"]
    memory = estimate["memory_bytes"]
    predicted_total = estimate["total_bytes"]
    # What the bare process holds at its peak: the training step's arrays and activations and the frozen weights (in
    # both processes: in the total, not in what analysis adds; CostEstimate.analysis_bytes)
    predicted_training = sum(memory.get(k, 0) for k in TRAINING_PARTS)
    predicted_analysis = predicted_total - predicted_training
    measured_total = tracked["peak_rss"] - tracked["rss_before_model"]
    measured_training = bare["peak_rss"] - bare["rss_before_model"]
    # each process's own RSS before the model subtracted from its own peak (the raw difference of
    # the two peaks also held the difference of the two processes' imports)
    measured_analysis = measured_total - measured_training
    out["comparisons"] = {
        "total": _compare(predicted_total, measured_total,
                          "tracked process: peak RSS minus RSS before the model; estimate: total_bytes"),
        "analysis_only": _compare(predicted_analysis, measured_analysis,
                                  "tracked peak minus bare peak, each less its own RSS before the model; "
                                  "estimate: analysis_bytes"),
        "training": _compare(predicted_training, measured_training,
                             "bare process: peak RSS minus RSS before the model; estimate: training_step, "
                             "training_activations and frozen_weights"),
    }
    out["claim_refers_to"] = "total"
    out["estimate_parts_bytes"] = memory
    out["estimate"] = estimate
    out["route"] = tracked.get("route")
    out["phases"] = tracked.get("phases")
    out["held_after_bytes"] = tracked.get("held_after")
    bare_s = statistics.median(bare["step_s"])
    tracked_s = statistics.median(tracked["step_s"][1:] or tracked["step_s"])  # after the first tracked step
    out["seconds_per_step"] = {"bare": bare_s, "tracked": tracked_s, "ratio": tracked_s / bare_s,
                               "tracked_first_s": tracked["step_s"][0], "bare_all_s": bare["step_s"],
                               "tracked_all_s": tracked["step_s"], "bare_load": bare["step_load"],
                               "tracked_load": tracked["step_load"], "predicted_ratio": estimate["ratio"],
                               "note": "separate processes, one after the other (not interleaved); tracked: "
                                       "steps after the first"}
    out["relative_residual"] = tracked.get("relative_residual")
    return out


def _compare(predicted: float, measured: float, what: str) -> dict:
    error = (predicted - measured) / measured if measured > 0 else None
    return {"predicted_bytes": int(predicted), "measured_bytes": int(measured), "relative_error": error,
            "within_20_percent": error is not None and abs(error) <= MEMORY_TOLERANCE, "what": what}


def _percent(error: float | None) -> str:
    """A relative error as a signed percentage; "no measured peak" when the measured part was not
    positive (on tiny models the RSS difference between two processes can be zero or negative)."""
    return "no measured peak" if error is None else f"{error:+.0%}"


def _encode(s: dict, prefix: str = "memory_") -> str:
    """The settings a child needs (those named ``prefix...``), as the JSON of ``--mode-settings``."""
    import json

    return json.dumps({k: v for k, v in s.items() if k.startswith(prefix)})


# ------------------------------------------------------------------- part 2: SGD, factored and sketched
def sgd_steps(model_name: str, batch: int, probes: int, repeats: int, seed: int, *, momentum: float = 0.0,
              group_state: str = "auto") -> dict:
    """Bare and tracked SGD steps, interleaved, one group per training example (plain SGD with
    ``group_state="auto"``: the factored route; ``momentum`` with ``group_state="sketched"``: the
    sketched one)."""
    from genkernel import PathKernelTracker
    from genkernel.supervised import cross_entropy_loss

    from .kernels import build

    row = {"mlp": "mlp784", "cnn": "convnet10"}[model_name]
    examples = batch * (repeats + 2)  # the first calls, the rounds, one spare
    bare_model, x, held_out = build(row, examples, False)  # seeded: both copies start equal
    tracked_model, _, _ = build(row, 1, False)
    y = torch.randint(0, 10, (examples,), generator=torch.Generator().manual_seed(seed))
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=momentum)
    tracked_opt = torch.optim.SGD(tracked_model.parameters(), lr=0.01, momentum=momentum)
    tracker = PathKernelTracker(tracked_model, tracked_opt, cross_entropy_loss, held_out[:probes],
                                num_groups=examples, group_state=group_state, batch_size=batch)
    position = {"bare": 0, "tracked": 0}

    def rows(kind: str) -> slice:
        start = position[kind]
        position[kind] += batch
        return slice(start, start + batch)

    def bare_step():
        r = rows("bare")
        bare_opt.zero_grad()
        cross_entropy_loss(bare_model(x[r]), y[r]).mean().backward()
        bare_opt.step()

    def tracked_step():
        r = rows("tracked")
        tracker.step(x[r], y[r], torch.arange(r.start, r.stop))

    times = interleaved({"bare": bare_step, "tracked": tracked_step}, repeats)
    ratio = times["tracked"]["steady_median_s"] / times["bare"]["steady_median_s"]
    flops = {"bare": counted_flops(bare_step)[0], "tracked": counted_flops(tracked_step)[0]}  # the spare batch, both
    same = all(torch.equal(p, q) for p, q in zip(bare_model.parameters(), tracked_model.parameters()))
    return {"model": model_name, "architecture": row, "batch": batch, "groups": examples, "probes": probes,
            "momentum": momentum, "work": tracker.cost.work, "bare_work": tracker.cost.bare_step,
            "parameters": sum(p.numel() for p in bare_model.parameters()), "group_state": tracker.group_state,
            "route": tracker.route.name, "contribution_route": tracker.route.contribution_route,
            "estimate_group_state": tracker.cost.settings["group_state"], "estimate_batch": tracker.cost.settings["batch"],
            "predicted_ratio": tracker.cost.ratio,
            "bare_median_s": times["bare"]["steady_median_s"], "tracked_median_s": times["tracked"]["steady_median_s"],
            "ratio": ratio, "load_mean": (times["bare"]["load_mean"] + times["tracked"]["load_mean"]) / 2,
            "bare_gflop": flops["bare"] / 1e9, "tracked_gflop": flops["tracked"] / 1e9,
            "flop_ratio": flops["tracked"] / flops["bare"],
            "times": times, "training_unchanged": same, "relative_residual": tracker.ledger.relative_residual()}


def pushed_flops(step: Callable[[], object]) -> int:
    """FLOPs of the probes' pushes (JVPs or Jacobians, :mod:`genkernel.core.tracking.routes`) in one
    call of ``step`` (1 + 2 R forward passes of the probes for R tangent rows in one pass)."""
    from genkernel.core.tracking import routes

    counted = []

    def counting(original):
        def call(*args, **kwargs):
            flops, result = counted_flops(lambda: original(*args, **kwargs))
            counted.append(flops)
            return result
        return call

    patches = [replace_attribute(routes, name, counting(getattr(routes, name)))
               for name in ("_jvp_rows", "per_example_jacobian")]
    try:
        step()
    finally:
        put_back(patches)
    return sum(counted)


# ---------------------------------------------------------------------------- part 3: tiny UNet
def tiny_unet_step(s: dict, seed: int, *, details: bool = True) -> dict:
    """Bare and analyzed DDPM steps of the tiny UNet, interleaved; then (``details``) the
    operation counts and the analyzed step's phases."""
    from genkernel.data import load_image_dataset
    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler, tiny_unet

    images = load_image_dataset("digits", size=16, limit=512, seed=seed)[0] * 2 - 1  # as benchmarks.diffusion
    scheduler = make_scheduler(1000, clip_sample=True)

    def trainer(callbacks):
        torch.manual_seed(seed)
        return DDPMTrainer(tiny_unet(16, 1, channels=tuple(s["unet_channels"])), scheduler, images,
                           batch_size=s["unet_batch"], seed=seed, progress=False, callbacks=callbacks)

    bare = trainer([])
    analyzer = NoiseLevelAnalyzer(scheduler, images[:64], num_bins=s["unet_bins"], bin_spacing="log_snr",
                                  num_probes=s["unet_probes"], controls=s["unet_controls"], snapshot_every=0,
                                  kernel_every=0, kernel_points=2, kernel_sketch=1, progress=False)
    analyzer.record_kernel = lambda: {}  # no kernel checkpoints (at binding or inside the timed steps)
    analyzed = trainer([analyzer])
    analyzer.on_train_start(analyzed)  # bind outside the timing
    bare.train(s["unet_warmup"])
    analyzed.train(s["unet_warmup"])
    times = interleaved({"bare": lambda: bare.train(1), "analyzed": lambda: analyzed.train(1)}, s["unet_repeats"])
    ratio = times["analyzed"]["steady_median_s"] / times["bare"]["steady_median_s"]
    # as many steps each (warm-up, first call, rounds): the analyzed step must be the bare one made slower
    same = all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), analyzed.model.parameters()))
    if not details:
        return {"bare_median_s": times["bare"]["steady_median_s"], "analyzed_median_s": times["analyzed"]["steady_median_s"],
                "ratio": ratio, "load_mean": times["analyzed"]["load_mean"], "allocator": allocator_settings(),
                "training_unchanged": same}
    counted: dict = {}  # one analyzed step counted whole and, inside it, its pushes
    counted["pushes"] = pushed_flops(lambda: counted.update(analyzed=counted_flops(lambda: analyzed.train(1))[0]))
    flops = {"bare": counted_flops(lambda: bare.train(1))[0], **counted}
    # Where the time goes: more analyzed steps with timers around the tracker's phases (apart
    # from the interleaved timing, which the wrappers' small overhead must not touch).
    clock = PhaseClock()
    wrap_tracker_phases(clock, analyzer.tracker, analyzer, analyzed)
    began = time.perf_counter()
    try:
        analyzed.train(s["breakdown_steps"])
    finally:
        clock.restore()
    wall = time.perf_counter() - began
    tracker = analyzer.tracker
    return {"batch": s["unet_batch"], "channels": list(s["unet_channels"]), "probes": s["unet_probes"],
            "bins": s["unet_bins"], "controls": s["unet_controls"], "rows": tracker.partitions.total,
            "parameters": sum(p.numel() for p in tracker.params.values()), "group_state": tracker.group_state,
            "gradient_route": "graph" if tracker.route.uses_graph() else "example",
            "contribution_route": tracker.route.contribution_route, "quadrature_nodes": len(tracker.rule.nodes),
            "bare_median_s": times["bare"]["steady_median_s"], "analyzed_median_s": times["analyzed"]["steady_median_s"],
            "ratio": ratio, "predicted_ratio": tracker.cost.ratio, "load_mean": times["analyzed"]["load_mean"],
            "training_unchanged": same,
            "bare_gflop": flops["bare"] / 1e9, "analyzed_gflop": flops["analyzed"] / 1e9,
            "pushes_gflop": flops["pushes"] / 1e9, "flop_ratio": flops["analyzed"] / flops["bare"],
            "times": times, "relative_residual": analyzer.ledger.relative_residual(),
            "breakdown": {"steps": s["breakdown_steps"], "wall_s": wall, "seconds_per_step": wall / s["breakdown_steps"],
                          "phases": clock.table(total=wall)}}


# ------------------------------------------------------------------------- part 4: allocator
def allocator_comparison(s: dict, seed: int, threads: int) -> dict:
    """The tiny-UNet timing in fresh processes, default allocator and ``ALLOCATOR_TUNING`` in turn."""
    settings = {"default": {name: None for name in ALLOCATOR_TUNING}, "tuned": ALLOCATOR_TUNING}
    args = ["--unet-child", "--seed", str(seed), "--threads", str(threads), "--mode-settings", _encode(s, "unet_")]
    runs = []
    for _ in range(s["allocator_rounds"]):
        for label, env in settings.items():
            runs.append({"setting": label, **run_child(MODULE, args, s["memory_timeout"], env=env)})
    out: dict[str, Any] = {"variables": ALLOCATOR_TUNING, "runs": runs}
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        out["error"] = failed[0]
        return out
    for key in ("ratio", "analyzed_median_s", "bare_median_s"):
        out[key] = {label: statistics.median(r[key] for r in runs if r["setting"] == label) for label in settings}
    return out


def unet_child(s: dict, seed: int, out: str) -> None:
    """Part 4 in this fresh process: the tiny-UNet timing alone (no counts, no breakdown)."""
    torch.save(tiny_unet_step(s, seed, details=False), out)


# ---------------------------------------------------------------------------------------- main
def claims_of(report: dict) -> list[dict]:
    """The claims, each ``{"claim", "held", "numbers"}`` with ``held`` computed from ``numbers``."""
    claims = []
    memory = report["memory"]
    if "comparisons" in memory:
        what = {"total": "the estimate's total memory (tracker.cost.total_bytes) is within 20 % of the measured peak "
                         "of the tracked process (peak RSS minus its RSS before the model was built)",
                "analysis_only": "the estimate's analysis-only memory (analysis_bytes) is within 20 % of the tracked "
                                 "peak minus the bare peak"}
        for key, statement in what.items():
            c = memory["comparisons"][key]
            claims.append({
                "claim": f"{memory['model']}: {statement}", "held": c["within_20_percent"],
                "numbers": {"predicted_bytes": c["predicted_bytes"], "measured_bytes": c["measured_bytes"],
                            "relative_error": c["relative_error"], "tolerance": MEMORY_TOLERANCE}})
    for run in report["sgd_factored"]:
        claims.append({
            "claim": f"plain SGD, factored route, one group per example, {run['probes']} probes: a tracked step of the "
                     f"{run['model']} at B={run['batch']} costs at most {SGD_TARGET:g}x a bare step",
            # a tracked step that trained differently from the bare one is not the same step made slower
            "held": run["group_state"] == "factored" and run["ratio"] <= SGD_TARGET and run["training_unchanged"] is True,
            "numbers": {"ratio": run["ratio"], "bare_median_s": run["bare_median_s"],
                        "tracked_median_s": run["tracked_median_s"], "group_state": run["group_state"],
                        "training_unchanged": run["training_unchanged"],
                        "load_mean": run["load_mean"], "target": SGD_TARGET,
                        "flop_ratio_floor": run["flop_ratio"]}})
    unet = report["tiny_unet"]
    estimated = [(f"{r['group_state']} route, {r['model']} at B={r['batch']}", r)
                 for r in report["sgd_factored"] + report["sketched"]]
    estimated.append((f"tiny UNet under the analyzer ({unet['group_state']} route)", unet))
    for what, run in estimated:
        error = run["predicted_ratio"] / run["flop_ratio"] - 1
        claims.append({
            "claim": f"{what}: the estimate's predicted ratio (tracker.cost.ratio, known before the run) is within "
                     f"{ESTIMATE_TOLERANCE:.0%} of the step's operation count over a bare step's",
            "held": abs(error) <= ESTIMATE_TOLERANCE,
            "numbers": {"predicted_ratio": run["predicted_ratio"], "flop_ratio": run["flop_ratio"],
                        "relative_error": error, "tolerance": ESTIMATE_TOLERANCE}})
    claims.append({
        "claim": f"tiny UNet, {unet['bins']} log-SNR bins, {unet['controls']} control partition, {unet['probes']} probes: "
                 f"an analyzed step costs at most {UNET_TARGET:g}x a bare step",
        # as for SGD: an analyzed step that trained differently from the bare one is not the same step made slower
        "held": unet["ratio"] <= UNET_TARGET and unet.get("training_unchanged") is True,
        "numbers": {"ratio": unet["ratio"], "bare_median_s": unet["bare_median_s"],
                    "analyzed_median_s": unet["analyzed_median_s"], "load_mean": unet["load_mean"],
                    "training_unchanged": unet.get("training_unchanged"),
                    "target": UNET_TARGET, "flop_ratio_floor": unet["flop_ratio"]}})
    return claims


def plot(report: dict, path: Path | BinaryIO) -> None:
    """Three panels: memory predicted against measured, SGD ratios, the tiny UNet's breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    memory = report["memory"]
    ax = axes[0]
    if "comparisons" in memory:
        keys = ("total", "analysis_only", "training")
        comps = memory["comparisons"]
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [comps[k]["predicted_bytes"] / 2**30 for k in keys], 0.4, label="estimate")
        ax.bar([x + 0.2 for x in xs], [comps[k]["measured_bytes"] / 2**30 for k in keys], 0.4, label="measured (RSS)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{k}\n{_percent(comps[k]['relative_error'])}" for k in keys])
        ax.legend(fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title(f"memory: {memory['model']}", fontsize=9)
    ax = axes[1]
    runs = report["sgd_factored"] + report["sketched"]
    xs = range(len(runs))
    ax.bar(xs, [r["ratio"] for r in runs], label="time")
    ax.plot(xs, [r["flop_ratio"] for r in runs], "k_", ms=18, mew=2, label="operation count")
    ax.plot(xs, [r["predicted_ratio"] for r in runs], "r.", ms=10, label="estimate (before the run)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['model']}\nB={r['batch']}\n{r['group_state']}" for r in runs], fontsize=7)
    ax.axhline(SGD_TARGET, color="k", ls="--", lw=0.8, label=f"{SGD_TARGET:g}x target (factored)")
    ax.set_ylabel("tracked / bare step")
    ax.set_title("SGD, one group per example (sketched: momentum 0.9)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    phases = [p for p in report["tiny_unet"]["breakdown"]["phases"] if p["fraction"]]
    ax.barh(range(len(phases)), [p["fraction"] for p in phases])
    ax.set_yticks(range(len(phases)))
    ax.set_yticklabels([p["phase"] for p in phases], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of an analyzed step")
    ax.set_title(f"tiny UNet: analyzed step {report['tiny_unet']['ratio']:.1f}x bare", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.splitlines()[0])
    parser.set_defaults(threads=int(os.environ.get("BENCH_THREADS", "2")))  # the cores the figures were measured on
    parser.add_argument("--memory-child", choices=("bare", "tracked"), help=argparse.SUPPRESS)
    parser.add_argument("--unet-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode-settings", help=argparse.SUPPRESS)
    parser.add_argument(CHILD_OUT_FLAG, dest="child_out", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> dict:
    """Runs the benchmark (or, with the hidden ``--memory-child``, one memory configuration);
    returns the report it wrote."""
    parser = _parser()
    args = parse(parser, argv)
    if args.torch_device.type != "cpu":  # every part runs on the CPU; the figures would say nothing of the device
        parser.error(f"--device {args.device!r}: this benchmark measures the CPU only (RSS peaks, CPU steps); "
                     "the GPU numbers come from recipes.benchmarks.gpu_check")
    if args.memory_child:
        import json

        if args.child_out is None or args.mode_settings is None:
            parser.error("--memory-child needs --child-out PATH and --mode-settings JSON")
        memory_child(args.memory_child == "tracked", json.loads(args.mode_settings), args.seed, args.child_out)
        return {}
    if args.unet_child:
        import json

        if args.child_out is None or args.mode_settings is None:
            parser.error("--unet-child needs --child-out PATH and --mode-settings JSON")
        unet_child(json.loads(args.mode_settings), args.seed, args.child_out)
        return {}
    s = pick(args.mode, **SETTINGS)
    timer = Timer()
    threads = torch.get_num_threads()
    machine = {"threads": threads, "cpu_count": os.cpu_count(), "load_at_start": load_average(),
               "allocator": allocator_settings(),
               "torch": torch.__version__, "python": platform.python_version()}
    print(f"[{NAME}] {args.mode} mode, {threads} threads, load {machine['load_at_start']:.2f}", flush=True)
    report: dict[str, Any] = {"benchmark": NAME, "mode": args.mode, "seed": args.seed, "settings": s, "machine": machine}
    report["memory"] = memory_comparison(s, args.seed, threads)
    _print_memory(report["memory"])
    report["sgd_factored"] = [sgd_steps(m, b, s["sgd_probes"], s["sgd_repeats"], args.seed)
                              for m in s["sgd_models"] for b in s["sgd_batches"]]
    print_ratios(f"[{NAME}] plain SGD, factored route, one group per example: tracked / bare step (target <= {SGD_TARGET:g})",
                 _ratio_rows(report["sgd_factored"]))
    report["sketched"] = [sgd_steps(m, s["sketched_batch"], s["sgd_probes"], s["sketched_repeats"], args.seed,
                                    momentum=0.9, group_state="sketched") for m in s["sketched_models"]]
    print_ratios(f"[{NAME}] SGD with momentum, sketched route, one group per example: tracked / bare step (no target)",
                 _ratio_rows(report["sketched"]))
    report["tiny_unet"] = tiny_unet_step(s, args.seed)
    unet = report["tiny_unet"]
    print_ratios(f"[{NAME}] tiny UNet: analyzed / bare step (target <= {UNET_TARGET:g}), predicted by the estimate",
                 {"tiny UNet": {"ratio": unet["ratio"], "flop ratio": unet["flop_ratio"], "predicted": unet["predicted_ratio"],
                                "bare ms": unet["bare_median_s"] * 1e3, "load": unet["load_mean"]}})
    print_ratios(f"[{NAME}] tiny UNet: where an analyzed step's time goes (fraction)",
                 {p["phase"]: {"fraction": p["fraction"], "s/step": p["seconds"] / unet["breakdown"]["steps"]}
                  for p in unet["breakdown"]["phases"]})
    report["allocator"] = allocator_comparison(s, args.seed, threads)
    _print_allocator(report["allocator"])
    report["claims"] = claims_of(report)
    machine["load_at_end"] = load_average()
    report["wall_seconds"] = timer.seconds
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = jsonable(report)
    write_outputs(report, out / f"{NAME}.json", out / f"{NAME}.png", plot)
    for c in report["claims"]:
        print(f"[{NAME}] {'held' if c['held'] else 'did NOT hold'}: {c['claim']}")
    print(f"[{NAME}] wrote {out / (NAME + '.json')} in {timer.seconds:.0f} s", flush=True)
    return report


def _ratio_rows(runs: list[dict]) -> dict[str, dict[str, float]]:
    """:func:`~recipes.benchmarks.harness.print_ratios` rows of :func:`sgd_steps` runs."""
    return {f"{r['model']} B={r['batch']}": {"ratio": r["ratio"], "flop ratio": r["flop_ratio"],
                                             "predicted": r["predicted_ratio"], "bare ms": r["bare_median_s"] * 1e3,
                                             "load": r["load_mean"]} for r in runs}


def _print_allocator(allocator: dict) -> None:
    if "error" in allocator:
        print(f"[{NAME}] allocator children failed: {allocator['error']}", file=sys.stderr, flush=True)
        return
    print_ratios(f"[{NAME}] tiny UNet in fresh processes, glibc's default allocator against {allocator['variables']}",
                 {label: {"ratio": allocator["ratio"][label], "analyzed s": allocator["analyzed_median_s"][label],
                          "bare ms": allocator["bare_median_s"][label] * 1e3} for label in allocator["ratio"]})


def _print_memory(memory: dict) -> None:
    if "comparisons" not in memory:
        print(f"[{NAME}] memory children failed: {memory.get('error')}", file=sys.stderr, flush=True)
        return
    print_ratios(f"[{NAME}] memory of {memory['model']}: estimate against measured (GiB); error = estimate / measured - 1",
                 {k: {"estimate": c["predicted_bytes"] / 2**30, "measured": c["measured_bytes"] / 2**30,
                      "error": c["relative_error"]} for k, c in memory["comparisons"].items()})
    step = memory["seconds_per_step"]
    print(f"[{NAME}] {memory['model']}: tracked step {step['tracked']:.1f} s, bare {step['bare']:.1f} s: "
          f"{step['ratio']:.1f}x (separate processes)", flush=True)


if __name__ == "__main__":
    main()
