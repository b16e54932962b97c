"""Generator step time with and without the GAN analyzer, in one process (issue 4, "Speed").

    python -m recipes.benchmarks.gan [--quick] [--out-dir figures] [--seed 0] [--device cpu]

2-D MLP GAN (8-Gaussian ring), batch 64, 64 probe latents, 8 geometry groups (pushed-to mode),
Adam. Times generator steps only (discriminator steps run untimed in between), interleaved round by
round with the order rotated (a change in the machine's load hits every configuration alike; the
first step's seconds and the load are reported apart from the medians), for:

- bare: the trainer's plain step;
- analyzer: the exact ledger with 8 groups (``controls=0``, evaluations off);
- analyzer + evaluations: alignment / coverage every 5 steps;
- analyzer + control: one label-permutation control partition (8 more tracked group rows);
- analyzer + comparison: the nearest-mode comparison grouping with its own control as well (the
  claims' setting: 4 partitions, 32 rows; partitions add to the cost, they do not multiply).

Prints the ratio to the bare step (target: at most 3× for the analyzer alone) and writes
``benchmark_gan.json`` and ``benchmark_gan.png`` (the ratios as bars). Reported, not asserted:
timings depend on the machine and its load.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import BinaryIO

import torch

from genkernel.data import gaussian_ring, ring_mode_centers
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

from ..common import Timer, make_parser, parse, pick
from .harness import load_average, print_ratios, synced_seconds, write_outputs

NAME = "benchmark_gan"
DTYPE = torch.float64
TARGET_RATIO = 3.0  # the analyzer alone, against a bare generator step


def make_trainer(analyzer_kwargs: dict | None, *, seed: int, device) -> GANTrainer:
    """The trainer of one configuration (``analyzer_kwargs`` None: bare)."""
    torch.manual_seed(seed)
    data, modes = gaussian_ring(4096, radius=2.0, std=0.05, seed=seed)
    # float64: the core's float32 Adam check can trip on coordinates whose batch gradient is a small
    # net of large per-example terms (see figures/README.md); the 2-D models are tiny either way.
    G = MLPGenerator(2, 2, hidden=64, depth=3).to(device, DTYPE)
    D = MLPDiscriminator(2, hidden=64, depth=3).to(device, DTYPE)
    callbacks = []
    if analyzer_kwargs is not None:
        probes = torch.randn(64, 2, generator=torch.Generator().manual_seed(seed + 1)).to(device, DTYPE)
        callbacks.append(GANKernelAnalyzer(
            G, D, probes, grouping="mode", mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
            track_discriminator=False, **analyzer_kwargs,
        ))
    return GANTrainer(G, D, data.to(device, DTYPE), labels=modes, batch_size=64, callbacks=callbacks, seed=seed)


def timed_generator_step(trainer: GANTrainer, device) -> float:
    """One discriminator step (untimed), then the seconds of one generator step; on CUDA the device
    is synchronized before the clock starts and before it is read."""
    trainer.discriminator_step()
    return synced_seconds(device, trainer.generator_step)


def time_generator_steps(configs: dict[str, dict | None], *, steps: int, warmup: int, seed: int, device) -> dict:
    """Every configuration's generator steps (D steps untimed), interleaved: ``warmup`` steps each
    (the first one's seconds kept apart), then ``steps`` rounds of one step per configuration, the
    order rotated each round. Returns ``{"median_s", "first_step_s", "load_mean"}`` (seconds per
    configuration; the 1-minute load average over the rounds), ``generator_steps`` (each configuration's),
    ``training_unchanged`` (per analyzed configuration: both players bit-equal to the bare ones) and
    ``tracked_generator_steps`` (per analyzed configuration)."""
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the first step is kept out of the medians), got {warmup!r}")
    trainers = {name: make_trainer(kwargs, seed=seed, device=device) for name, kwargs in configs.items()}
    first = {}
    for name, trainer in trainers.items():
        first[name] = timed_generator_step(trainer, device)
        for _ in range(warmup - 1):
            timed_generator_step(trainer, device)
    names, times, loads = list(trainers), {name: [] for name in trainers}, []
    for round_ in range(steps):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            times[name].append(timed_generator_step(trainers[name], device))
        loads.append(load_average())
    # An analyzed step is the bare step made slower only if it trained the same (both players' parameters and
    # buffers bit-equal after as many steps from the same seed) and tracked every generator step
    bare = [trainers[name] for name, kwargs in configs.items() if kwargs is None]
    unchanged, tracked = {}, {}
    for name, trainer in trainers.items():
        if configs[name] is None:
            continue
        if bare:
            unchanged[name] = all(torch.equal(x, y) for a, b in ((bare[0].generator, trainer.generator),
                                                                 (bare[0].discriminator, trainer.discriminator))
                                  for x, y in zip([*a.parameters(), *a.buffers()], [*b.parameters(), *b.buffers()]))
        tracked[name] = trainer.callbacks[0].generator_ledger().steps
    return {"median_s": {name: statistics.median(t) for name, t in times.items()}, "first_step_s": first,
            "load_mean": statistics.fmean(loads), "generator_steps": warmup + steps, "training_unchanged": unchanged,
            "tracked_generator_steps": tracked}


def main(argv=None) -> dict:
    """Times every configuration, prints the ratios and writes the JSON and PNG; returns the JSON's dict."""
    args = parse(make_parser(__doc__.splitlines()[0]), argv)
    timer = Timer()
    settings = pick(
        args.mode,
        full=dict(steps=60, warmup=5),
        quick=dict(steps=20, warmup=3),
        smoke=dict(steps=3, warmup=1),
    )
    configs = {
        "bare": None,
        "analyzer": dict(controls=0, window=10**6, eval_every=10**6),
        "analyzer_with_evaluations": dict(controls=0, window=20, eval_every=5),
        "analyzer_with_control": dict(controls=1, window=10**6, eval_every=10**6),
        "analyzer_with_comparison": dict(controls=1, comparison="nearest_mode", window=10**6, eval_every=10**6),
    }
    timed = time_generator_steps(configs, seed=args.seed, device=args.torch_device, **settings)
    seconds = timed["median_s"]
    for name in configs:
        print(f"[{NAME}] {name:28s} {1e3 * seconds[name]:8.2f} ms per generator step (first {1e3 * timed['first_step_s'][name]:.2f} ms)")
    ratios = {name: seconds[name] / seconds["bare"] for name in configs if name != "bare"}
    print_ratios(f"[{NAME}] generator step time, x a bare step (target <= {TARGET_RATIO:g}x for 'analyzer')",
                 {name: {"x bare": ratio} for name, ratio in ratios.items()})
    payload = {
        "recipe": NAME, "mode": args.mode, "settings": settings, "threads": torch.get_num_threads(),
        "milliseconds": {k: 1e3 * v for k, v in seconds.items()}, "ratios": ratios,
        "first_step_milliseconds": {k: 1e3 * v for k, v in timed["first_step_s"].items()}, "load_mean": timed["load_mean"],
        "generator_steps": timed["generator_steps"], "training_unchanged": timed["training_unchanged"],
        "tracked_generator_steps": timed["tracked_generator_steps"],
        "target_ratio": TARGET_RATIO,
        # a faster analyzed step that trained otherwise, or tracked fewer steps, is no overhead within the target
        "within_target": (ratios["analyzer"] <= TARGET_RATIO and timed["training_unchanged"].get("analyzer") is True
                          and timed["tracked_generator_steps"].get("analyzer") == timed["generator_steps"]),
        "wall_seconds": round(timer.seconds, 2),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(payload, out / f"{NAME}.json", out / f"{NAME}.png", plot)
    print(f"[{NAME}] done in {timer.seconds:.1f} s")
    return payload


def plot(payload: dict, path: Path | BinaryIO) -> None:
    """Draws each configuration's ratio to the bare step as a bar, with the target line, to
    ``path``; returns nothing."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    names = list(payload["ratios"])
    ax.bar(range(len(names)), [payload["ratios"][n] for n in names])
    ax.axhline(payload["target_ratio"], color="k", ls="--", lw=0.8, label=f"{payload['target_ratio']:g}x target (analyzer)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_", " ") for n in names], fontsize=8)
    ax.set_ylabel("generator step / bare step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=50 if payload["mode"] == "smoke" else 110)
    plt.close(fig)


if __name__ == "__main__":
    main()
