"""The GPU check: CUDA tests and the analyzers on models of the size people train, in one script.

    python -m recipes.benchmarks.gpu_check [--tiny] [--out-dir figures] [--budget 480]

On a CUDA device (``make gpu-check``), within ``--budget`` seconds (8 minutes by default):

1. the ``cuda``-marked tests (``tests/test_cuda.py``: exact ledgers, bit-equal training under
   deterministic algorithms, engines that agree);
2. the DDPM CIFAR-10 UNet (35.7M parameters) under the noise-level analyzer: 10 log-SNR bins, one
   control partition, 100 probes, float32 group state, a few tracked steps against bare steps
   (interleaved): seconds per step, their ratio, the peak memory against the cost estimate, a
   second bare run, the residual under Simpson and six Gauss–Legendre nodes, one step timed
   phase by phase with each phase's peak of allocated bytes (to fit the estimate's parts to), and
   the same steps in bfloat16 (``DDPMTrainer(mixed_precision="bf16")``, the analyzer splitting
   them: ``bf16``, seconds, ratio, residual, training unchanged);
3. the DCGAN at 64×64 (BatchNorm in training mode) under the GAN analyzer in an observed loop:
   seconds per iteration with and without the analyzer, peak memory.

Everything runs as exact ledgers need on CUDA (:func:`exact_mode`: TF32 off, deterministic
algorithms, no cuDNN autotuning). It writes ``OUT/gpu_check.json`` (device name, those settings,
per-step times (medians of steady steps; each trainer's first step, which binds its analyzer, timed
apart), ratios, peak memory above what was allocated before each trainer, the GAN's
training unchanged against a second bare pair, test results), rewritten after each section: a
section that fails keeps its traceback there and the next one runs; a run killed at its limit keeps
what finished. The tests' whole output goes to ``OUT/gpu_check_tests.log``. ``--tiny`` runs the
same code on the CPU with tiny models and sizes (what CI runs, to keep the script working); its
numbers say nothing about a GPU.

On a machine without network whose python already has torch (the lent GPU machine), carry the two
packages it may lack as wheels and run the script with that python, not ``make``::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata   # here
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:. python3 -m recipes.benchmarks.gpu_check --out-dir $OUT   # there
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .harness import synced_seconds


def _settings(tiny: bool) -> dict:
    if tiny:
        # two timed steps each: CI reaches the medians of more than one step, as the GPU run does
        return dict(unet="tiny", batch=4, probes=4, bins=2, controls=1, steps=2, images=8, lr=2e-4, gan_width=4,
                    gan_batch=4, gan_steps=2)
    # lr: the DDPM paper's CIFAR-10 rate (the trainer's default, 1e-3, moves each of the 35.7M
    # parameters by 1e-3 in Adam's first steps: the midpoint rule then left 1.48 of the change).
    return dict(unet="ddpm_cifar10", batch=64, probes=100, bins=10, controls=1, steps=3, images=512, lr=2e-4,
                gan_width=64, gan_batch=64, gan_steps=3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def exact_mode(device: torch.device) -> dict:
    """On CUDA, :func:`genkernel.set_exact_cuda_mode` for the whole check (TF32 off, deterministic
    algorithms with warnings only, so that an op without a deterministic kernel does not stop the
    benchmark: the tests run strict; no cuDNN autotuning). Returns the settings, for the JSON."""
    from genkernel import set_exact_cuda_mode
    from genkernel.core.adapter import exact_cuda_settings

    if device.type == "cuda":
        return set_exact_cuda_mode("warn")
    return {**exact_cuda_settings(), "set_exact_cuda_mode": False}


def _allocated(device: torch.device) -> int:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0


def run_cuda_tests(root: Path, budget: float, log: Path) -> dict:
    """The ``cuda``-marked tests in a subprocess: exit code and the last lines of their output (the
    whole of it in ``log``)."""
    if not torch.cuda.is_available():
        return {"ran": False, "why": "no CUDA device"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-m", "cuda", "tests/test_cuda.py"],
                              cwd=root, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as error:
        log.write_text(f"{error.stdout or ''}{error.stderr or ''}")
        return {"ran": True, "passed": False, "why": f"timed out after {budget:.0f} s"}
    text = done.stdout + done.stderr
    log.write_text(text)
    return {"ran": True, "passed": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
            "tail": text.strip().splitlines()[-40:]}


def analysis_budget(device: torch.device) -> int:
    """The analyzers' working-memory budget: their CPU default, or on a GPU a quarter of its free
    memory up to 16 GiB (a CIFAR UNet's 64-example training records and wide JVP passes fit: on
    256 MiB it would run 64 one-example gradient passes and one JVP row per pass)."""
    if device.type != "cuda":
        return 256 * 2**20
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(16 * 2**30, free // 4))


def diffusion_benchmark(device: torch.device, s: dict, deadline: float) -> dict:
    """Bare and analyzed DDPM steps of the CIFAR-sized UNet (tiny: ``tiny_unet``), interleaved, as
    many timed pairs as ``s["steps"]`` and the ``deadline`` (``time.perf_counter()``) allow (one
    at least). Then, as the deadline allows: a second bare run (parameters bit-equal to the first
    tell the analyzer's effect from nondeterministic kernels), the same tracked steps under
    Simpson's rule and six Gauss–Legendre nodes (residuals that fall with more nodes say the residual
    is the quadrature's, not a wrong push), and one more analyzed step timed phase by phase with, on
    CUDA, each phase's peak of allocated bytes (``phases``). On CUDA under strict deterministic
    algorithms."""
    if device.type == "cuda":
        # Strict: under "warn" the memory-efficient attention backward runs its non-deterministic
        # algorithm, and two bare runs of the CIFAR UNet ended with other parameters (H200, torch 2.11).
        previous = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=False)
        try:
            return _diffusion_benchmark(device, s, deadline)
        finally:
            torch.use_deterministic_algorithms(True, warn_only=previous)
    return _diffusion_benchmark(device, s, deadline)


def _diffusion_benchmark(device: torch.device, s: dict, deadline: float) -> dict:
    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler, tiny_unet
    from genkernel.diffusion.configs import ddpm_cifar10_unet

    scheduler = make_scheduler(1000, clip_sample=True)
    g = torch.Generator().manual_seed(0)
    channels, size = (3, 32) if s["unet"] == "ddpm_cifar10" else (1, 16)
    data = (torch.rand(s["images"], channels, size, size, generator=g) * 2 - 1).to(device)

    def model():
        torch.manual_seed(0)
        net = ddpm_cifar10_unet(dropout=0.0) if s["unet"] == "ddpm_cifar10" else tiny_unet(16, 1, channels=(8, 16))
        return net.to(device)

    out: dict = {"model": s["unet"], "batch": s["batch"], "probes": s["probes"], "bins": s["bins"],
                 "controls": s["controls"], "state_dtype": "float32", "lr": s["lr"],
                 "deterministic_strict": torch.are_deterministic_algorithms_enabled()
                 and not torch.is_deterministic_algorithms_warn_only_enabled()}
    # Peaks are counted from what was allocated before each trainer was built (the data, and for the
    # analyzed one the bare trainer, which the interleaved timing below still needs).
    before = _allocated(device)

    def make_trainer(callbacks=(), mixed_precision="no"):
        return DDPMTrainer(model(), scheduler, data, batch_size=s["batch"], lr=s["lr"], progress=False,
                           callbacks=list(callbacks), mixed_precision=mixed_precision)

    def analyzer_for(quadrature: str, mixed_precision="refuse"):
        made = NoiseLevelAnalyzer(scheduler, data[:32], num_bins=s["bins"], num_probes=s["probes"], controls=s["controls"],
                                  kernel_points=2, kernel_sketch=1, snapshot_every=0, state_dtype=torch.float32,
                                  quadrature=quadrature, memory_budget=analysis_budget(device), progress=False,
                                  mixed_precision=mixed_precision)
        made.record_kernel = lambda: None  # the kernel structure is not part of a step
        return made

    bare = make_trainer()
    _reset_peak(device)
    first = {"bare": synced_seconds(device, lambda: bare.train(1))}  # first calls: never part of the steady numbers
    out["bare_peak_bytes"] = None if device.type != "cuda" else _peak(device) - before
    before = _allocated(device)
    analyzer = analyzer_for("midpoint")
    out["memory_budget"] = analyzer.memory_budget
    tracked = make_trainer([analyzer])
    _reset_peak(device)
    first["analyzed"] = synced_seconds(device, lambda: tracked.train(1))  # binds the analyzer: one-time work
    out["first_step_seconds"] = first
    out["analyzed_peak_bytes"] = None if device.type != "cuda" else _peak(device) - before
    out["estimate"] = analyzer.tracker.cost.as_dict()
    steady_peak = None  # on CUDA: the analyzed timed steps' peak, above the same baseline as the first step's

    def analyzed_peak(label):
        nonlocal steady_peak
        if label == "analyzed" and device.type == "cuda":
            steady_peak = max(steady_peak or 0, _peak(device) - before)

    times = _interleaved_steps(device, {"bare": bare, "analyzed": tracked}, s["steps"], deadline, after=analyzed_peak)
    if len(times["bare"]) < s["steps"]:
        out["stopped_early"] = "the time budget"
    out["analyzed_steady_peak_bytes"] = steady_peak  # the first step's (above) carries the analyzer's binding
    out["seconds_per_step"] = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["seconds_per_step"]["analyzed"] / out["seconds_per_step"]["bare"]
    out["relative_residual"] = analyzer.ledger.relative_residual()
    out["tracked_steps"] = analyzer.ledger.steps
    # The estimate (tracker.cost.total_bytes) is a tracked step's peak (genkernel.core.cost: "the step's peak"), not
    # the first step's, which also binds the analyzer (one-time work the estimate does not count): the comparison
    # "predicted memory within 20 % of the measured peak" is with the steady steps' peak. The first step's ratio
    # is kept beside it (a bind that outgrows the estimate would let the memory check pass a set-up that fails).
    if steady_peak:
        out["estimate_over_measured_peak"] = out["estimate"]["total_bytes"] / steady_peak
        out["measured_peak"] = "analyzed_steady_peak_bytes: the timed steps after the first, the estimate's step"
    if out["analyzed_peak_bytes"]:
        out["estimate_over_first_step_peak"] = out["estimate"]["total_bytes"] / out["analyzed_peak_bytes"]
    steps = len(times["bare"]) + 1

    def parameters_equal(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))

    out["training_unchanged"] = parameters_equal(bare, tracked)
    if time.perf_counter() + steps * times["bare"][-1] < deadline:
        control = make_trainer()
        control.train(steps)
        out["bare_runs_identical"] = parameters_equal(bare, control)
        del control
    per_step = max(times["analyzed"])
    out["rules"] = {}
    for rule, nodes in (("simpson", 3), ("gauss6", 6)):
        if time.perf_counter() + (nodes + 1) * steps * per_step > deadline:  # a push of every row per node
            out["rules"][rule] = "not run: the time budget"
            continue
        other = analyzer_for(rule)
        trainer = make_trainer([other])
        # as for the midpoint rule: the first step (it binds the analyzer) apart, then the median of steady steps
        rule_times = [synced_seconds(device, functools.partial(trainer.train, 1)) for _ in range(steps)]
        out["rules"][rule] = {"tracked_steps": other.ledger.steps, "relative_residual": other.ledger.relative_residual(),
                              "first_step_seconds": rule_times[0], "seconds_per_step": statistics.median(rule_times[1:])}
        del other, trainer
    # One more analyzed step with its phases timed and, on CUDA, each phase's peak of allocated bytes
    # beside the estimate's parts (the estimate adds them all; the peak comes from one phase).
    if time.perf_counter() + 2 * per_step < deadline:
        from .scale import PhaseClock, wrap_tracker_phases

        out["phases_held_before_bytes"] = _allocated(device) if device.type == "cuda" else None  # the phases' peaks include it
        clock = PhaseClock(cuda_device=device if device.type == "cuda" else None)
        wrap_tracker_phases(clock, analyzer.tracker, analyzer)
        try:
            with clock.phase("step: outside the tracker"):
                tracked.train(1)
        finally:
            clock.restore()
        out["phases"] = clock.table()
    else:
        out["phases"] = "not run: the time budget"
    # The same UNet as a GPU user trains it, in bfloat16 (DDPMTrainer(mixed_precision="bf16")), the analyzer
    # splitting its half-precision steps (mixed_precision="observe"): bare and analyzed steps interleaved as above.
    if time.perf_counter() + 2 * steps * per_step < deadline:
        del tracked, analyzer
        half_bare = make_trainer(mixed_precision="bf16")
        half_analyzer = analyzer_for("midpoint", mixed_precision="observe")
        half_tracked = make_trainer([half_analyzer], mixed_precision="bf16")
        half_first = {label: synced_seconds(device, functools.partial(trainer.train, 1))
                      for label, trainer in (("bare", half_bare), ("analyzed", half_tracked))}
        half_times = _interleaved_steps(device, {"bare": half_bare, "analyzed": half_tracked}, s["steps"], deadline)
        seconds = {k: statistics.median(v) for k, v in half_times.items()}
        out["bf16"] = {
            "first_step_seconds": half_first, "seconds_per_step": seconds,
            "ratio": seconds["analyzed"] / seconds["bare"],
            "bare_over_float32_bare": seconds["bare"] / out["seconds_per_step"]["bare"],
            "tracked_steps": half_analyzer.ledger.steps, "relative_residual": half_analyzer.ledger.relative_residual(),
            "per_step_relative_residual": [e.get("relative_residual") for e in half_analyzer.tracker.gradient_scales],
            "gradient_precision": sorted({str(e.get("gradient_precision")) for e in half_analyzer.tracker.gradient_scales}),
            "training_unchanged": parameters_equal(half_bare, half_tracked),
        }
    else:
        out["bf16"] = "not run: the time budget"
    return out


def _interleaved_steps(device: torch.device, trainers: dict, steps: int, deadline: float, after=None) -> dict:
    """``{label: [seconds, ...]}``: up to ``steps`` rounds of one step of each trainer in turn (interleaved, so
    the machine's load falls on all alike; the order rotated each round, as
    :func:`~recipes.benchmarks.harness.interleaved` does: no trainer always runs first, on a cache or allocator the
    other left), stopping before a round the ``deadline`` would cut (at least one round); ``after(label)`` runs
    after each timed step (a peak reading), the peak reset before it."""
    times = {label: [] for label in trainers}
    for round_ in range(steps):
        last = sum(v[-1] for v in times.values() if v)
        if last and time.perf_counter() + 1.5 * last > deadline:
            break
        for label, trainer in rotated(list(trainers.items()), round_):
            _reset_peak(device)
            times[label].append(synced_seconds(device, functools.partial(trainer.train, 1)))
            if after is not None:
                after(label)
    return times


def rotated(items: list, round_: int) -> list:
    """``items`` rotated left by ``round_`` (mod their count): the order of round ``round_``."""
    shift = round_ % len(items) if items else 0
    return items[shift:] + items[:shift]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (what CI runs)")
    parser.add_argument("--out-dir", default="figures", help="folder for gpu_check.json")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 8 minutes)")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    s = _settings(args.tiny or device.type == "cpu")
    start = time.perf_counter()
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tiny": args.tiny or device.type == "cpu", "torch": torch.__version__, "settings": s,
        "exact_mode": exact_mode(device),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    deadline = start + args.budget
    sections = (
        ("cuda_tests", lambda: run_cuda_tests(root, budget=args.budget / 3, log=out / "gpu_check_tests.log")),
        ("diffusion", lambda: diffusion_benchmark(device, s, deadline - args.budget / 4)),
        ("gan", lambda: gan_benchmark(device, s)),
    )
    for name, section in sections:
        try:
            result[name] = section()
        except Exception as error:  # the next section still runs; the JSON says what failed and where
            result[name] = {"ran": False, "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc().splitlines()[-30:]}
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        write_json(result, path)
    ratios = {name: result[name].get("ratio") for name in ("diffusion", "gan")}
    print(f"[gpu_check] {result['device']}: ratios to a bare step {ratios}; wrote {path} in {result['wall_seconds']} s")
    return result


def write_json(result: dict, path: Path) -> None:
    """``result`` as strict JSON, atomically (a non-finite number is written as its name)."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    from genkernel.core.tracking.io import atomic_file

    text = json.dumps(finite(result), indent=2, allow_nan=False, default=str) + "\n"
    with atomic_file(path, "w") as handle:
        handle.write(text)


def gan_benchmark(device: torch.device, s: dict) -> dict:
    """Bare and analyzed iterations of the 64×64 DCGAN (BatchNorm in training mode) in an observed loop."""
    from genkernel.gan import GANKernelAnalyzer, GeneratorLoss
    from genkernel.gan.configs import dcgan64_discriminator, dcgan64_generator

    width, batch = s["gan_width"], s["gan_batch"]
    nz = 100
    real = (torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
    bce = torch.nn.BCELoss(reduction="none")

    def players():
        G = dcgan64_generator(nz, width, seed=0).to(device)
        D = dcgan64_discriminator(width, seed=1).to(device)
        return G, D, torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)), torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))

    def iteration(G, D, g_opt, d_opt, analyzer, step):
        gen = torch.Generator().manual_seed(100 + step)
        x = real[torch.randint(0, real.shape[0], (batch,), generator=gen).to(device)]
        z = torch.randn(batch, nz, 1, 1, generator=gen).to(device)
        fake = G(z)
        d_in = torch.cat([x, fake.detach()])
        roles = torch.cat([torch.ones(batch), torch.zeros(batch)]).long().to(device)
        d_losses = bce(D(d_in), roles.to(real.dtype))
        if analyzer is not None:
            analyzer.observe_discriminator(d_losses, roles, d_in)
        d_opt.zero_grad()
        d_losses.mean().backward()
        d_opt.step()
        g_losses = bce(D(fake), torch.ones(batch, device=device))
        if analyzer is not None:
            analyzer.observe_generator(g_losses, z, fake)
        g_opt.zero_grad()
        g_losses.mean().backward()
        g_opt.step()

    out: dict = {"width": width, "batch": batch}
    try:
        bare = players()
        control = players()  # a second bare pair: tells nondeterminism from the analyzer's effect
        tracked = players()
        probes = torch.randn(16 if s["gan_width"] > 8 else 4, nz, 1, 1, generator=torch.Generator().manual_seed(3)).to(device)
        analyzer = GANKernelAnalyzer(tracked[0], tracked[1], probes, grouping="direction", num_groups=4, controls=1,
                                     generator_loss=GeneratorLoss(tracked[1], output="probability"), window=10**6,
                                     eval_every=10**6)
        analyzer.bind(g_optimizer=tracked[2], d_optimizer=tracked[3])
    except (TypeError, AttributeError) as error:  # the observe API of the GAN analyzer
        return {"ran": False, "why": f"the GAN analyzer cannot observe this loop: {error}"}
    times = {"bare": [], "analyzed": []}
    first = {}
    extra = {"bare": 0, "analyzed": 0}  # the most an iteration allocated above what was held before it
    _reset_peak(device)
    order = [("bare", bare, None), ("analyzed", tracked, analyzer), ("control", control, None)]
    out["orders"] = []
    for step in range(s["gan_steps"] + 1):
        # the first iteration (it builds the trackers) in this order, then rotated each iteration as the diffusion
        # section's steps: the analyzed pair always ran second, after the bare one, on what it left in the caches
        this = rotated(order, step)
        out["orders"].append([label for label, _, _ in this])
        for label, (G, D, g_opt, d_opt), a in this:
            _sync(device)
            held = _allocated(device)
            _reset_peak(device)
            start = time.perf_counter()
            iteration(G, D, g_opt, d_opt, a, step)
            _sync(device)
            if label == "control":
                continue
            if step:  # the first iteration builds the trackers: kept apart from the steady numbers
                times[label].append(time.perf_counter() - start)
            else:
                first[label] = time.perf_counter() - start
            if device.type == "cuda":
                extra[label] = max(extra[label], _peak(device) - held)
    out["first_iteration_seconds"] = first
    out["seconds_per_iteration"] = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["seconds_per_iteration"]["analyzed"] / out["seconds_per_iteration"]["bare"]
    out["iteration_peak_extra_bytes"] = extra if device.type == "cuda" else None
    out["generator_relative_residual"] = analyzer.generator_ledger().relative_residual()
    out["discriminator_relative_residual"] = analyzer.discriminator_ledger.relative_residual()

    def same(a, b):  # both players' parameters and buffers (BatchNorm's running statistics)
        return all(torch.equal(x, y) for m, n in zip(a[:2], b[:2])
                   for x, y in zip([*m.parameters(), *m.buffers()], [*n.parameters(), *n.buffers()]))

    out["training_unchanged"] = same(bare, tracked)
    out["bare_runs_identical"] = same(bare, control)  # the control: two bare runs, no analyzer
    return out


if __name__ == "__main__":
    main()
