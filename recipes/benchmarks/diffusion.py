"""Benchmark: training-step time with and without the noise-level analyzer and its controls, in one process.

For the MLP denoiser (2-D points) and the attention UNet (16×16 digits) it times bare DDPM steps
and analyzed steps (64 probes and 10 bins at full settings) with 0, 1 and 5 permutation control
partitions, interleaved round by round (every configuration takes one step per round; the median
per configuration is reported), and prints the ratios. Each control partition adds G group rows
to a step (Core v2; before it the control was a G² joint grouping). Targets: an analyzed MLP step
without control at most 3× a bare step; with one control at most 2.2× the step without, with five
at most 6×. The JSON records every time; no claim is tuned.

Run:  python -m recipes.benchmarks.diffusion [--quick] [--out-dir figures] [--seed 0] [--device cpu]

Writes OUT/benchmark_diffusion.png and OUT/benchmark_diffusion.json.
"""

from __future__ import annotations

import statistics

import torch

from genkernel.data import gaussian_ring, load_image_dataset
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler, tiny_unet

from ..common import Timer, claim, finish, make_parser, parse, pick
from .harness import load_average, print_ratios, synced_seconds

NAME = "benchmark_diffusion"

SETTINGS = dict(
    full=dict(mlp_batch=256, mlp_hidden=128, mlp_steps=30, unet_batch=32, unet_channels=(16, 32), unet_steps=4,
              num_bins=10, num_probes=64, unet_probes=64, warmup=5),
    quick=dict(mlp_batch=128, mlp_hidden=128, mlp_steps=10, unet_batch=16, unet_channels=(8, 16), unet_steps=2,
               num_bins=10, num_probes=64, unet_probes=16, warmup=2),
    smoke=dict(mlp_batch=16, mlp_hidden=16, mlp_steps=2, unet_batch=2, unet_channels=(8, 16), unet_steps=1,
               num_bins=3, num_probes=4, unet_probes=2, warmup=1),
)


CONFIGURATIONS = (("bare", None), ("no_control", 0), ("one_control", 1), ("five_controls", 5))


def _timed_step(trainer) -> float:
    """Seconds of one ``trainer.train(1)``; on CUDA the device is synchronized before the clock
    starts and before it is read (kernels still queued would otherwise land in another's time)."""
    return synced_seconds(next(trainer.model.parameters()).device, lambda: trainer.train(1))


def measure(make_model, data, probe_data, *, batch, steps, warmup, num_bins, num_probes, kernel_sketch, seed):
    """Median seconds per step of every configuration, timed in interleaved rounds (the order
    rotated each round), and the ratios; the first warm-up step's seconds apart (``first_step_s``)
    and the 1-minute load average over the rounds (``load_mean``)."""
    scheduler = make_scheduler(1000, clip_sample=data.dim() > 2)
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the first step is kept out of the medians), got {warmup!r}")
    trainers, first, analyzers = {}, {}, {}
    for label, controls in CONFIGURATIONS:
        torch.manual_seed(seed)
        trainer = DDPMTrainer(make_model(), scheduler, data, batch_size=batch, seed=seed, progress=False)
        if controls is not None:
            analyzer = NoiseLevelAnalyzer(scheduler, probe_data, num_bins=num_bins, num_probes=num_probes, controls=controls,
                                          snapshot_every=0, kernel_every=0, kernel_points=2, kernel_sketch=kernel_sketch)
            trainer.callbacks.append(analyzer)
            analyzer.on_train_start(trainer)  # bind (and the initial kernel checkpoint) outside the timing
            analyzer.record_kernel = lambda: None  # no kernel checkpoints inside the timed steps
            analyzers[label] = analyzer
        first[label] = _timed_step(trainer)
        trainer.train(warmup - 1)
        trainers[label] = trainer
    times: dict[str, list[float]] = {label: [] for label in trainers}
    labels, loads = list(trainers), []
    for round_ in range(steps):
        for label in labels[round_ % len(labels):] + labels[: round_ % len(labels)]:
            times[label].append(_timed_step(trainers[label]))
        loads.append(load_average())
    out = {label: statistics.median(t) for label, t in times.items()}
    out["ratio_no_control"] = out["no_control"] / out["bare"]
    out["ratio_one_control"] = out["one_control"] / out["bare"]
    out["ratio_five_controls"] = out["five_controls"] / out["bare"]
    out["control_cost_one"] = out["one_control"] / out["no_control"]
    out["control_cost_five"] = out["five_controls"] / out["no_control"]
    out["first_step_s"] = first
    out["load_mean"] = statistics.fmean(loads)
    # An analyzed step is the bare step made slower only if it trained the same (same seeds, as many steps) and
    # tracked every one of them: a configuration that trained otherwise or skipped its tracking is no overhead
    bare = list(trainers["bare"].model.parameters())
    out["steps_each"] = warmup + steps
    out["training_unchanged"] = {label: all(torch.equal(p, q) for p, q in zip(bare, trainers[label].model.parameters()))
                                 for label in analyzers}
    out["tracked_steps"] = {label: analyzer.ledger.steps for label, analyzer in analyzers.items()}
    return out


def measured_alike(r: dict, *labels: str) -> bool:
    """Whether every analyzed configuration in ``labels`` trained bit-equal to the bare one and tracked all of
    its ``steps_each`` steps (what a ratio of their times needs to mean an overhead)."""
    return all(r["training_unchanged"][label] is True and r["tracked_steps"][label] == r["steps_each"]
               for label in labels)


def main(argv=None) -> dict:
    """Runs the benchmark on the command line ``argv``; returns the JSON payload it wrote."""
    args = parse(make_parser(__doc__.splitlines()[0]), argv)
    s = pick(args.mode, **SETTINGS)
    timer = Timer()
    device = args.torch_device
    points = gaussian_ring(2048, std=0.05, seed=args.seed)[0].to(device)
    mlp = measure(lambda: MLPDenoiser(2, hidden=s["mlp_hidden"], depth=3).to(device), points, points[:256],
                  batch=s["mlp_batch"], steps=s["mlp_steps"], warmup=s["warmup"], num_bins=s["num_bins"],
                  num_probes=s["num_probes"], kernel_sketch=None, seed=args.seed)
    images = (load_image_dataset("digits", size=16, limit=512, seed=args.seed)[0] * 2 - 1).to(device)
    unet = measure(lambda: tiny_unet(16, 1, channels=tuple(s["unet_channels"])).to(device), images, images[:64],
                   batch=s["unet_batch"], steps=s["unet_steps"], warmup=s["warmup"], num_bins=s["num_bins"],
                   num_probes=s["unet_probes"], kernel_sketch=1, seed=args.seed)
    print_ratios(
        f"[{NAME}] bare ms per step; analyzed step without control (x bare); one and five controls (x without)",
        {name: {"bare ms": r["bare"] * 1e3, "analyzed": r["ratio_no_control"], "1 control": r["control_cost_one"],
                "5 controls": r["control_cost_five"]} for name, r in (("MLP", mlp), ("UNet", unet))},
    )
    claims = {
        "mlp_overhead_target": claim(
            f"an analyzed MLP step ({s['num_probes']} probes, {s['num_bins']} bins, no control) costs at most 3x a bare step",
            mlp["ratio_no_control"] <= 3.0 and measured_alike(mlp, "no_control"), mlp["ratio_no_control"], None,
            training_unchanged=mlp["training_unchanged"]["no_control"], tracked_steps=mlp["tracked_steps"]["no_control"],
        ),
    }
    for name, r in (("mlp", mlp), ("unet", unet)):
        claims[f"{name}_one_control_cost"] = claim(
            f"{name}: one permutation control costs at most 2.2x the analyzed step without control",
            r["control_cost_one"] <= 2.2 and measured_alike(r, "no_control", "one_control"), r["control_cost_one"], None,
        )
        claims[f"{name}_five_controls_cost"] = claim(
            f"{name}: five permutation controls cost at most 6x the analyzed step without control",
            r["control_cost_five"] <= 6.0 and measured_alike(r, "no_control", "five_controls"), r["control_cost_five"], None,
        )
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    keys = ("ratio_no_control", "ratio_one_control", "ratio_five_controls")
    width = 0.27
    for i, key in enumerate(keys):
        ax.bar([j + width * i for j in range(2)], [mlp[key], unet[key]], width, label=key.replace("ratio_", "").replace("_", " "))
    ax.axhline(3, color="k", ls="--", lw=0.8, label="3x target (MLP, no control)")
    ax.set_xticks([width, 1 + width])
    ax.set_xticklabels(["MLP denoiser", "tiny UNet"])
    ax.set_ylabel("analyzed / bare step time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return finish(NAME, args, fig, {"mlp": mlp, "unet": unet, "threads": torch.get_num_threads()}, claims, s, timer)


if __name__ == "__main__":
    main()
