"""Diffusion on images: noise-level path kernels of a small attention UNet2DModel on digits.

docs/diffusion.md. A diffusers ``UNet2DModel`` whose blocks are modulated by the time
embedding (self-attention at the lowest resolution) is trained with DDPMScheduler (ε-prediction,
Adam) on sklearn's 8×8 digits upsampled to 16×16 (default), or on MNIST / CIFAR-10 read from a
local folder (``--dataset mnist|cifar10 --data-root DIR``; nothing is downloaded). The
NoiseLevelAnalyzer keeps the exact ledger split by training-timestep bin with a same-trajectory
permutation control; kernels between image states use an output sketch (V Rademacher directions).

Writes diffusion_digits.png (overview), diffusion_digits_{noise_matrix,locality,kernel_decay,
matrix_evolution,retrieval}.png and diffusion_digits.json (numbers, claims with intervals,
timings, what ran) into --out-dir. Claims as in the toy recipe (recipes/common.py, "diffusion
recipes"); a claim these settings cannot measure says so (``measured: false`` and why).

What the quick setting can and cannot say. Quick mode (`make figures`) trains 80 steps and
tracks 6: the samples are still noise and the window's change is mostly Adam's first moment from
before the window, so the ledger-locality and retrieval claims come out "not measured"; so does the
kernel's change from θ₀, since quick mode trains no time-blind denoiser (the null model, whose kernel
locality rises with training too): only the ledger's residual is measured there.

The full run the paper's claim needs (default, no --quick): a UNet2DModel (32, 64 channels) trained
untracked until its samples are recognisable (20 000 steps), then tracked over a window of 500
steps with 100 probes, 10 log-SNR bins and 3 permutation controls, a time-blind UNet trained the
same way as the null model's kernel, three seeds (quick and full run three from --seed by default)::

    python -m recipes.experiments.diffusion_digits --device cuda --seeds 0 1 2 \
        --checkpoint-dir runs/diffusion_digits --out-dir figures

One invocation runs the seeds in turn and aggregates them (claims with Student-t intervals over
seeds; with one seed, within the run); or run one seed per invocation (``--seeds 1 --runs-dir R``, on several machines) and
aggregate with ``--aggregate --runs-dir R``. ``--checkpoint-dir`` makes every run resumable: the
trainer, the analyzer's ledgers (the trackers' save/load) and θ₀ are checkpointed every
``--checkpoint-every`` steps in DIR/seed_S; rerunning the same command continues where it stopped.

Expected wall time: ``--estimate-only --device DEVICE`` times bare steps, tracked steps and one
kernel structure on the device and prints the whole run's time (warm-up, window, kernels and the
time-blind reference; retrieval not counted). Measured on 2 shared CPU cores (load about 4): quick
settings about 2 min in all (three seeds); full settings 0.95 s per bare step, 95 s per tracked step and 234 s per
kernel structure, i.e. about 24 h per seed on those CPUs. On one H100 or H200 nothing was measured
(no GPU was available to this work): run ``--estimate-only --device cuda`` there first. On the CPUs
a tracked step cost about 100 bare steps, so the 500-step window outweighs the 20 000-step warm-up.

Run:  python -m recipes.experiments.diffusion_digits [--quick] [--out-dir figures] [--seed 0] [--device cpu]
      [--dataset digits|mnist|cifar10] [--data-root DIR] [--prediction-type ...] [--beta-schedule ...]
      [--num-bins G] [--band w] [--controls K] [--seeds S ...] [--runs-dir DIR] [--aggregate]
      [--checkpoint-dir DIR] [--checkpoint-every N] [--estimate-only]
"""

from __future__ import annotations

import torch

from genkernel.data import load_image_dataset
from genkernel.diffusion import make_scheduler, tiny_unet

from ..common import (TimeBlind, add_diffusion_arguments, apply_diffusion_overrides, make_parser, parse, pick, recipe_seeds,
                      run_diffusion_recipe)

NAME = "diffusion_digits"

SETTINGS = dict(
    full=dict(num_train=None, channels=(32, 64), batch_size=64, lr=2e-4, warmup_steps=20000, window_steps=500,
              num_bins=10, num_probes=100, band=1, controls=3, reference="kernel", snapshot_every=50, kernel_every=250,
              kernel_points=8, kernel_sketch=16, retrieval_samples=8, retrieval_train=256, retrieval_stages=6,
              inference_steps=250, timesteps=1000, checkpoint_every=1000, seeds=3),
    quick=dict(num_train=512, channels=(8, 16), batch_size=16, lr=1e-3, warmup_steps=80, window_steps=6,
               num_bins=5, num_probes=10, band=1, controls=2, reference=None, snapshot_every=2, kernel_every=0,
               kernel_points=3, kernel_sketch=2, retrieval_samples=3, retrieval_train=24, retrieval_stages=3,
               inference_steps=25, timesteps=1000, checkpoint_every=2, seeds=3),
    smoke=dict(num_train=64, channels=(8, 16), batch_size=4, lr=1e-4, warmup_steps=1, window_steps=2,
               num_bins=2, num_probes=4, band=0, controls=1, reference=None, snapshot_every=1, kernel_every=0,
               kernel_points=2, kernel_sketch=1, retrieval_samples=2, retrieval_train=6, retrieval_stages=2,
               inference_steps=4, timesteps=100, checkpoint_every=1, seeds=1),
)


def load(args, mode_settings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out images in [-1, 1] (the UNet's convention)."""
    size = args.image_size or (32 if args.dataset == "cifar10" else 16)
    limit = mode_settings["num_train"]
    common = dict(size=size, seed=seed)
    root = dict(data_root=args.data_root) if args.dataset != "digits" else {}
    train, _ = load_image_dataset(args.dataset, train=True, limit=limit, **root, **common)
    held, _ = load_image_dataset(args.dataset, train=False, limit=64, **root, **common)
    return train * 2 - 1, held * 2 - 1


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    parser = make_parser(__doc__.splitlines()[0], datasets=("digits", "mnist", "cifar10"))
    parser.add_argument("--image-size", type=int, default=None, help="resize images (default 16; 32 for CIFAR-10)")
    add_diffusion_arguments(parser)
    args = parse(parser, argv)
    s = apply_diffusion_overrides(pick(args.mode, **SETTINGS), args)
    first = load(args, s, recipe_seeds(args, s)[0])[0]  # fails early, naming the files, when a data set is missing
    s.update(dataset=args.dataset, image_shape=list(first.shape[1:]), num_train=int(first.shape[0]))

    def model():
        return tiny_unet(first.shape[-1], first.shape[1], channels=tuple(s["channels"]), attention=True)

    spec = {
        "load": lambda seed: load(args, s, seed),
        "model": model,
        "time_blind": lambda: TimeBlind(model()),
        "scheduler": lambda: make_scheduler(s["timesteps"], s["beta_schedule"], s["prediction_type"], clip_sample=True),
        "retrieval": {"output_sketch": s["kernel_sketch"], "top_k": min(3, s["retrieval_train"])},
        "images": True,
    }
    return run_diffusion_recipe(NAME, spec, args, s)


if __name__ == "__main__":
    main()
