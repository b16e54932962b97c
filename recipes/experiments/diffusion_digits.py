"""Diffusion on images: noise-level path kernels of a small attention UNet2DModel on digits.

DESIGN.md section 3, issue 3. A diffusers ``UNet2DModel`` whose blocks are modulated by the time
embedding (self-attention at the lowest resolution) is trained with DDPMScheduler (ε-prediction,
Adam) on sklearn's 8×8 digits upsampled to 16×16 (default), or on MNIST / CIFAR-10 read from a
local folder (``--dataset mnist|cifar10 --data-root DIR``; nothing is downloaded). The
NoiseLevelAnalyzer keeps the exact ledger split by training-timestep bin with a same-trajectory
permutation control; kernels between image states use an output sketch (V Rademacher directions).

Writes diffusion_digits.png (overview), diffusion_digits_{noise_matrix,locality,kernel_decay,
retrieval}.png and diffusion_digits.json (numbers, claims with intervals, timings) into --out-dir.

Run:  python -m recipes.experiments.diffusion_digits [--quick] [--out-dir figures] [--seed 0] [--device cpu]
      [--dataset digits|mnist|cifar10] [--data-root DIR] [--prediction-type ...] [--beta-schedule ...]
      [--num-bins G] [--band w]
"""

from __future__ import annotations

import torch

from genkernel.data import load_image_dataset
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler, retrieval_attribution, train_with_window, tiny_unet
from genkernel.plotting import diffusion as plots

from ..common import (
    Timer, add_diffusion_arguments, apply_diffusion_overrides, make_parser, parse, pick, write_diffusion_outputs,
)

NAME = "diffusion_digits"

SETTINGS = dict(
    full=dict(num_train=None, channels=(32, 64), batch_size=64, lr=2e-4, warmup_steps=0, window_steps=4000,
              num_bins=10, num_probes=64, band=1, snapshot_every=200, kernel_every=1000, kernel_points=8, kernel_sketch=16,
              retrieval_samples=8, retrieval_train=256, retrieval_stages=6, inference_steps=250, timesteps=1000),
    quick=dict(num_train=512, channels=(8, 16), batch_size=16, lr=1e-3, warmup_steps=80, window_steps=6,
               num_bins=5, num_probes=10, band=1, snapshot_every=2, kernel_every=0, kernel_points=3, kernel_sketch=2,
               retrieval_samples=3, retrieval_train=24, retrieval_stages=3, inference_steps=25, timesteps=1000),
    smoke=dict(num_train=64, channels=(8, 16), batch_size=4, lr=1e-4, warmup_steps=1, window_steps=2,
               num_bins=2, num_probes=4, band=0, snapshot_every=1, kernel_every=0, kernel_points=2, kernel_sketch=1,
               retrieval_samples=2, retrieval_train=6, retrieval_stages=2, inference_steps=4, timesteps=100),
)


def load(args, mode_settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out images in [-1, 1] (the UNet's convention)."""
    size = args.image_size or (32 if args.dataset == "cifar10" else 16)
    limit = mode_settings["num_train"]
    common = dict(size=size, seed=args.seed)
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
    timer = Timer()
    device = args.torch_device

    # 1. Data, model, scheduler, trainer.
    data, held_out = load(args, s)
    s.update(dataset=args.dataset, image_shape=list(data.shape[1:]), num_train=int(data.shape[0]))
    torch.manual_seed(args.seed)
    model = tiny_unet(data.shape[-1], data.shape[1], channels=tuple(s["channels"]), attention=True).to(device)
    scheduler = make_scheduler(s["timesteps"], s["beta_schedule"], s["prediction_type"], clip_sample=True)
    trainer = DDPMTrainer(model, scheduler, data.to(device), batch_size=s["batch_size"], lr=s["lr"], seed=args.seed,
                          progress=args.mode == "full")

    # 2. Warm-up without analysis (quick mode), then the tracked window.
    analyzer = NoiseLevelAnalyzer(
        scheduler, held_out.to(device), num_bins=s["num_bins"], num_probes=s["num_probes"], band=s["band"],
        snapshot_every=s["snapshot_every"], kernel_every=s["kernel_every"], kernel_points=s["kernel_points"],
        kernel_sketch=s["kernel_sketch"], seed=args.seed,
    )
    window = train_with_window(trainer, analyzer, warmup_steps=s["warmup_steps"], window_steps=s["window_steps"])
    report, warmup_seconds, window_seconds = window["report"], window["warmup_s"], window["window_s"]

    # 3. Stage-wise attribution of generated images.
    t0 = Timer()
    train_subset = data[: s["retrieval_train"]].to(device)
    retrieval = retrieval_attribution(
        model, scheduler, train_subset, num_samples=s["retrieval_samples"], num_stages=s["retrieval_stages"],
        num_inference_steps=s["inference_steps"], output_sketch=s["kernel_sketch"], top_k=min(3, s["retrieval_train"]),
        seed=args.seed,
    )
    retrieval_seconds = t0.seconds

    # 4. Figures and the JSON, claims computed from the numbers with their intervals.
    timings = {"warmup_s": warmup_seconds, "window_s": window_seconds, "retrieval_s": retrieval_seconds}
    figure = plots.plot_retrieval(retrieval, train_subset, images=True, top=min(3, s["retrieval_train"]))
    return write_diffusion_outputs(NAME, args, s, timer, trainer, report, retrieval, figure, timings)


if __name__ == "__main__":
    main()
