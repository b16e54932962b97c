"""Generator step time with and without the GAN analyzer, in one process (issue 4, "Speed").

    python recipes/benchmark_gan.py [--quick] [--out-dir figures] [--seed 0] [--device cpu]

2-D MLP GAN (8-Gaussian ring), batch 64, 64 probe latents, 8 geometry groups (pushed-to mode),
Adam. Times generator steps only (discriminator steps run untimed in between) for:

- bare: the trainer's plain step;
- analyzer: the exact ledger with 8 groups (``controls=0``, evaluations off);
- analyzer + evaluations: alignment / coverage every 5 steps;
- analyzer + control: the label-permutation control (8 × 8 = 64 tracked groups).

Prints the ratio to the bare step (target: at most 3× for the analyzer alone) and writes
``benchmark_gan.json``. Reported, not asserted: timings depend on the machine and its load.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from genkernel.data import gaussian_ring, ring_mode_centers  # noqa: E402
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator  # noqa: E402

NAME = "benchmark_gan"
DTYPE = torch.float64


def time_generator_steps(analyzer_kwargs: dict | None, *, steps: int, warmup: int, seed: int, device) -> float:
    """Median seconds of a generator step (D steps untimed) for one configuration."""
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
    trainer = GANTrainer(G, D, data.to(device, DTYPE), labels=modes, batch_size=64, callbacks=callbacks, seed=seed)
    times = []
    for i in range(warmup + steps):
        trainer.discriminator_step()
        start = time.perf_counter()
        trainer.generator_step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> dict:
    parser = _common.make_parser(__doc__.splitlines()[0])
    args = _common.parse(parser, argv)
    timer = _common.Timer()
    settings = _common.pick(
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
    }
    seconds = {}
    for name, kwargs in configs.items():
        seconds[name] = time_generator_steps(kwargs, seed=args.seed, device=args.torch_device, **settings)
        print(f"[{NAME}] {name:28s} {1e3 * seconds[name]:8.2f} ms per generator step")
    ratios = {name: seconds[name] / seconds["bare"] for name in configs if name != "bare"}
    for name, ratio in ratios.items():
        print(f"[{NAME}] ratio {name:28s} {ratio:6.2f}x a bare step (target <= 3x for 'analyzer')")
    payload = {
        "recipe": NAME, "mode": args.mode, "settings": settings, "threads": torch.get_num_threads(),
        "milliseconds": {k: 1e3 * v for k, v in seconds.items()}, "ratios": ratios,
        "target_ratio": 3.0, "within_target": ratios["analyzer"] <= 3.0,
        "wall_seconds": round(timer.seconds, 2),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / f"{NAME}.json").write_text(json.dumps(_common._clean(payload), indent=2) + "\n")
    print(f"[{NAME}] done in {timer.seconds:.1f} s")
    return payload


if __name__ == "__main__":
    main()
