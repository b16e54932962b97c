"""Wall time per optimizer step of an example script, with the analyzer against without it.

Runs :mod:`recipes.examples.train_unconditional` (``--example unconditional``, the default) or
:mod:`recipes.examples.dcgan` (``--example dcgan``: upstream's 64×64 networks at batch 16, ``--nz
100 --ngf 64 --ndf 64``, 16 probes, 4 groups; one D step and one G step per iteration, each timed
as an optimizer step) on one tiny ``ImageFolder`` (random 16×16 RGB
images written to a temporary folder, unless ``--train_data_dir`` names one; the DCGAN, which runs
whole epochs, reads ``batchSize`` × ceil(steps / 2) of them, the first of that folder), alternating
``--analyze`` and ``--no-analyze`` runs (interleaved repeats, each pair in alternating order, so a
change in the machine's load hits both). Every optimizer step is timed by a global
optimizer-step post hook: the time between the ends of consecutive steps covers everything a step
costs (the micro-batches' forward, the analyzer's ``observe``, the backward, the optimizer, the EMA
and the analyzer's work in its step hooks), and leaves out the set-up and the kernel structure at
the start and the end, and the steps up to every optimizer's first (warm-up: the DCGAN's first G step
carries the analyzer's one-time work), which are reported apart as the rest of the run's wall time.

    python -m recipes.examples.overhead [--example unconditional|dcgan] [--repeats 3] [--steps 12] [--threads 1]
        [--out FILE] [-- SCRIPT ARGS]

Arguments after ``--`` go to the training script (e.g. ``-- --num_bins 4 --controls 0``).
Prints every run and the ratio of seconds per step (analyzed / bare): the median over repeats
of the paired ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from .dcgan import main as train_dcgan
from .dcgan import parse_args as parse_dcgan_args
from .train_unconditional import main as train_unconditional

SETTINGS = ["--resolution", "16", "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--use_ema"]
DCGAN_SETTINGS = ["--imageSize", "64", "--batchSize", "16", "--workers", "0", "--groups", "4", "--probes", "16"]


def example_argv(example: str, data: str, out: str, steps: int, extra: Sequence[str]) -> tuple[Any, list[str]]:
    """(the script's ``main``, its arguments) for ``steps`` optimizer steps of ``example`` on ``data``."""
    if example == "unconditional":
        return train_unconditional, ["--train_data_dir", data, "--output_dir", out, *SETTINGS, "--num_epochs", "1000",
                                     "--max_train_steps", str(steps), *extra]
    if example == "dcgan":  # two optimizer steps (D, G) per iteration, one epoch of ceil(steps / 2) batches
        return train_dcgan, ["--dataroot", data, "--outf", out, *DCGAN_SETTINGS, "--niter", "1", *extra]
    raise ValueError(f"--example must be 'unconditional' or 'dcgan', got {example!r}")


def used_device(example: str, argv: Sequence[str]) -> str:
    """The device the script trained on: accelerate takes a GPU when there is one; the DCGAN only
    with ``--cuda``."""
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if example == "unconditional" or "--cuda" in argv else "cpu"


def write_images(root: Path, count: int = 32, size: int = 16, seed: int = 0) -> Path:
    """Write ``count`` random RGB ``size``×``size`` PNGs into two class folders of ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def first_images(source: Path, root: Path, count: int) -> Path:
    """Links to the first ``count`` images of the ImageFolder ``source`` (in its order), in class folders of
    ``root``: a DCGAN epoch over them is the ``--steps`` asked for (the whole folder ran every image)."""
    from torchvision.datasets import ImageFolder

    for i, (path, _) in enumerate(ImageFolder(str(source)).samples[:count]):
        folder = root / Path(path).relative_to(source).parts[0]  # its class
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}_{Path(path).name}").symlink_to(Path(path).resolve())
    return root


def step_device(optimizer: torch.optim.Optimizer) -> torch.device:
    """The device of the optimizer's first parameter (the CPU for an optimizer without any)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            return param.device
    return torch.device("cpu")


def timed_run(train: Any, argv: Sequence[str]) -> dict[str, Any]:
    """Run the training script ``train`` once. Returns ``{"steps", "seconds_per_step" (mean time between the
    ends of consecutive optimizer steps, from the end of the first step of every optimizer on), "other_s"
    (the rest of the wall time), "total_s"}``. On CUDA each step's end is read after synchronizing the device.

    The steps up to the first step of the last optimizer to step are warm-up, left out: each optimizer's
    first step carries one-time work (the DCGAN at upstream's size, 8 steps, one thread: its first G step
    analyzed took 6.2 s against 5.0 s later, and counting it made the ratio 10.7 instead of 9.3; at ngf = ndf
    = 4, 0.55 s against 0.08 s, 6.4 instead of 3.3)."""
    ends: list[float] = []
    optimizers: list[int] = []

    def record(optimizer, args, kwargs):
        device = step_device(optimizer)
        if device.type == "cuda":  # the step's kernels still queued would otherwise land in the next step's time,
            torch.cuda.synchronize(device)  # or past the last end: a bare run that never waits looked cheaper
        ends.append(time.perf_counter())
        optimizers.append(id(optimizer))

    handle = register_optimizer_step_post_hook(record)
    start = time.perf_counter()
    try:
        train(argv)
    finally:
        handle.remove()
    total = time.perf_counter() - start
    first = max(optimizers.index(o) for o in set(optimizers)) if optimizers else 0  # every optimizer has stepped
    if len(ends) - first < 3:
        raise ValueError(f"only {len(ends)} optimizer steps ({first + 1} of them warm-up): give --steps >= 3 so that "
                         "step times can be measured")
    per_step = (ends[-1] - ends[first]) / (len(ends) - 1 - first)
    return {"steps": len(ends), "seconds_per_step": per_step,
            "other_s": total - per_step * (len(ends) - 1 - first), "total_s": total}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure; returns (and prints) the runs and the ratio of seconds per step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", default="unconditional", choices=["unconditional", "dcgan"])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (default 3)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--train_data_dir", default=None, help="an ImageFolder (default: 32 random 16×16 images)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: arguments of the training script")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 3:
        raise ValueError(f"need --repeats >= 1 and --steps >= 3, got {args.repeats} and {args.steps}")
    extra = [a for a in args.script_args if a != "--"]
    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {"analyze": [], "no-analyze": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.example == "unconditional":  # --max_train_steps stops it
            data = args.train_data_dir or str(write_images(Path(tmp) / "images", count=32))
        else:  # dcgan: one epoch of ceil(steps / 2) batches of the batch size its arguments end with
            count = parse_dcgan_args(["--dataroot", ".", *DCGAN_SETTINGS, *extra]).batchSize * ((args.steps + 1) // 2)
            data = (str(first_images(Path(args.train_data_dir), Path(tmp) / "images", count)) if args.train_data_dir
                    else str(write_images(Path(tmp) / "images", count=count)))
        train, base = example_argv(args.example, data, str(Path(tmp) / "out"), args.steps, extra)
        for repeat in range(args.repeats):
            order = ("no-analyze", "analyze") if repeat % 2 == 0 else ("analyze", "no-analyze")
            for mode in order:
                result = timed_run(train, [*base, f"--{mode}"])
                runs[mode].append(result)
                print(f"repeat {repeat} {mode:>10}: {result['seconds_per_step']:.4f} s/step over {result['steps']} steps, "
                      f"{result['other_s']:.1f} s besides the steps", flush=True)
    ratios = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(runs["analyze"], runs["no-analyze"])]
    summary = {
        "settings": {"example": args.example, "script_args": base, "steps": args.steps, "repeats": args.repeats,
                     "threads": args.threads, "device": used_device(args.example, base)},
        "runs": runs,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
    }
    print(f"seconds per optimizer step, analyzed / bare: {summary['ratio_median']:.2f} (median of {ratios})")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, allow_nan=False))
    return summary


if __name__ == "__main__":
    main()
