"""Benchmark: training-step time with and without the noise-level analyzer, in one process.

Issue 3, "Speed, reported honestly". For the MLP denoiser (2-D points) and the attention UNet
(16×16 digits) it times bare DDPM steps and analyzed steps (probes and bins at the analyzer's
defaults: 64 probes, 10 bins), with and without the permutation control (which tracks G² joint
groups), and prints the ratios. Target from the issue: at most 3× a bare step for the MLP with
64 probes and 10 bins. The JSON records every time; no claim is tuned.

Run:  python recipes/benchmark_diffusion.py [--quick] [--out-dir figures] [--seed 0] [--device cpu]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import Timer, claim, finish, make_parser, parse, pick  # noqa: E402

from genkernel.data import gaussian_ring, load_image_dataset  # noqa: E402
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler, tiny_unet  # noqa: E402

NAME = "benchmark_diffusion"

SETTINGS = dict(
    full=dict(mlp_batch=256, mlp_hidden=128, mlp_steps=30, unet_batch=32, unet_channels=(16, 32), unet_steps=4,
              num_bins=10, num_probes=64, unet_probes=64, warmup=5),
    quick=dict(mlp_batch=128, mlp_hidden=128, mlp_steps=10, unet_batch=16, unet_channels=(8, 16), unet_steps=2,
               num_bins=10, num_probes=64, unet_probes=16, warmup=2),
    smoke=dict(mlp_batch=16, mlp_hidden=16, mlp_steps=2, unet_batch=2, unet_channels=(8, 16), unet_steps=1,
               num_bins=3, num_probes=4, unet_probes=2, warmup=1),
)


def time_steps(trainer: DDPMTrainer, steps: int) -> float:
    """Seconds per training step (median of ``steps`` single-step timings)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train(1)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def measure(make_model, data, probe_data, *, batch, steps, warmup, num_bins, num_probes, kernel_sketch, seed):
    scheduler = make_scheduler(1000, clip_sample=data.dim() > 2)
    out = {}
    for label, control in (("bare", None), ("analyzer_no_control", False), ("analyzer_with_control", True)):
        torch.manual_seed(seed)
        trainer = DDPMTrainer(make_model(), scheduler, data, batch_size=batch, seed=seed, progress=False)
        if control is not None:
            analyzer = NoiseLevelAnalyzer(scheduler, probe_data, num_bins=num_bins, num_probes=num_probes, control=control,
                                          snapshot_every=0, kernel_every=0, kernel_points=2, kernel_sketch=kernel_sketch)
            trainer.callbacks.append(analyzer)
            analyzer.on_train_start(trainer)  # bind (and the initial kernel checkpoint) outside the timing
            analyzer.record_kernel = lambda: None  # no kernel checkpoints inside the timed steps
        trainer.train(warmup)
        out[label] = time_steps(trainer, steps)
    out["ratio_no_control"] = out["analyzer_no_control"] / out["bare"]
    out["ratio_with_control"] = out["analyzer_with_control"] / out["bare"]
    return out


def main(argv=None) -> dict:
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
    for name, r in (("MLP", mlp), ("UNet", unet)):
        print(f"[{NAME}] {name}: bare {r['bare'] * 1e3:.1f} ms/step; analyzer {r['analyzer_no_control'] * 1e3:.1f} ms "
              f"({r['ratio_no_control']:.1f}x) without control, {r['analyzer_with_control'] * 1e3:.1f} ms "
              f"({r['ratio_with_control']:.1f}x) with the permutation control (G^2 joint groups)")
    claims = {
        "mlp_overhead_target": claim(
            f"an analyzed MLP step ({s['num_probes']} probes, {s['num_bins']} bins, no control) costs at most 3x a bare step",
            mlp["ratio_no_control"] <= 3.0, mlp["ratio_no_control"], None, with_control=mlp["ratio_with_control"],
        ),
    }
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = ["MLP", "UNet"]
    for i, key in enumerate(("ratio_no_control", "ratio_with_control")):
        ax.bar([j + 0.35 * i for j in range(2)], [mlp[key], unet[key]], 0.35, label=key.replace("_", " "))
    ax.axhline(3, color="k", ls="--", lw=0.8, label="3x target")
    ax.set_xticks([0.175, 1.175])
    ax.set_xticklabels(labels)
    ax.set_yscale("log")
    ax.set_ylabel("analyzed / bare step time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return finish(NAME, args, fig, {"mlp": mlp, "unet": unet, "threads": torch.get_num_threads()}, claims, s, timer)


if __name__ == "__main__":
    main()
