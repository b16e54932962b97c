"""Diffusion on 2-D points: is the denoiser corrected stage-wise and noise-localized?

DESIGN.md section 3, issue 3. A time-embedded SiLU MLP denoiser (ε-prediction, Adam) is trained
with diffusers' DDPMScheduler on a Gaussian ring (or two moons). The NoiseLevelAnalyzer keeps the
exact path-kernel ledger split by the training timestep's bin, at probes (clean x, level s, fixed
noise) placed at the bin centres, with a label-permutation control on the same trajectory.

Writes into --out-dir:

- diffusion_toy2d.png              overview (traffic matrix, locality vs control, k̂ decay, entropy)
- diffusion_toy2d_noise_matrix.png traffic and net shares C[s, t], measured and control, with κ
- diffusion_toy2d_locality.png     traffic / net-share / kernel locality over training vs control
- diffusion_toy2d_kernel_decay.png mean k̂((x, s), (x', t)) against |bin(s) − bin(t)| at checkpoints
- diffusion_toy2d_retrieval.png    generated samples with their retrieved training points per stage
- diffusion_toy2d.json             the numbers, the claims (held or not, with intervals), timings

Run:  python -m recipes.experiments.diffusion_toy2d [--quick] [--out-dir figures] [--seed 0] [--device cpu]
      [--dataset ring|moons] [--film] [--prediction-type epsilon|v_prediction|sample]
      [--beta-schedule linear|squaredcos_cap_v2] [--num-bins G] [--band w]
"""

from __future__ import annotations

import torch

from genkernel.data import gaussian_ring, two_moons
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler, retrieval_attribution, train_with_window
from genkernel.plotting import diffusion as plots

from ..common import (
    Timer, add_diffusion_arguments, apply_diffusion_overrides, make_parser, parse, pick, write_diffusion_outputs,
)

NAME = "diffusion_toy2d"

SETTINGS = dict(
    full=dict(num_train=4000, hidden=128, depth=3, batch_size=256, lr=1e-3, warmup_steps=0, window_steps=3000,
              num_bins=10, num_probes=64, band=1, snapshot_every=100, kernel_every=500, kernel_points=24,
              retrieval_samples=16, retrieval_train=512, retrieval_stages=6, inference_steps=200, timesteps=1000),
    quick=dict(num_train=1024, hidden=64, depth=3, batch_size=128, lr=2e-3, warmup_steps=1500, window_steps=60,
               num_bins=10, num_probes=64, band=1, snapshot_every=10, kernel_every=30, kernel_points=12,
               retrieval_samples=8, retrieval_train=256, retrieval_stages=5, inference_steps=100, timesteps=1000),
    smoke=dict(num_train=128, hidden=16, depth=2, batch_size=32, lr=2e-3, warmup_steps=5, window_steps=4,
               num_bins=4, num_probes=8, band=1, snapshot_every=2, kernel_every=2, kernel_points=3,
               retrieval_samples=3, retrieval_train=32, retrieval_stages=3, inference_steps=10, timesteps=100),
)


def load(dataset: str, n: int, seed: int) -> torch.Tensor:
    """``n`` points ``[n, 2]`` of the 8-Gaussian ring or of two moons."""
    if dataset == "ring":
        return gaussian_ring(n, num_modes=8, radius=2.0, std=0.05, seed=seed)[0]
    return two_moons(n, noise=0.05, seed=seed)[0]


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    parser = make_parser(__doc__.splitlines()[0], datasets=("ring", "moons"))
    parser.add_argument("--film", action="store_true", help="FiLM-modulate every hidden layer by the time embedding")
    add_diffusion_arguments(parser)
    args = parse(parser, argv)
    s = apply_diffusion_overrides(pick(args.mode, **SETTINGS), args)
    s.update(dataset=args.dataset, film=args.film)
    timer = Timer()
    device = args.torch_device

    # 1. Data, model, scheduler, trainer (seeded; the analyzer never touches the trainer's RNG).
    data = load(args.dataset, s["num_train"], args.seed)
    held_out = load(args.dataset, 256, args.seed + 1000)
    torch.manual_seed(args.seed)
    model = MLPDenoiser(2, hidden=s["hidden"], depth=s["depth"], film=args.film).to(device)
    scheduler = make_scheduler(s["timesteps"], s["beta_schedule"], s["prediction_type"])
    trainer = DDPMTrainer(model, scheduler, data.to(device), batch_size=s["batch_size"], lr=s["lr"], seed=args.seed,
                          progress=args.mode == "full")

    # 2. Warm-up without analysis (quick mode), then the tracked window.
    analyzer = NoiseLevelAnalyzer(
        scheduler, held_out.to(device), num_bins=s["num_bins"], num_probes=s["num_probes"], band=s["band"],
        snapshot_every=s["snapshot_every"], kernel_every=s["kernel_every"], kernel_points=s["kernel_points"], seed=args.seed,
    )
    window = train_with_window(trainer, analyzer, warmup_steps=s["warmup_steps"], window_steps=s["window_steps"])
    report, warmup_seconds, window_seconds = window["report"], window["warmup_s"], window["window_s"]

    # 3. Stage-wise attribution along reverse sampling at θ_T.
    t0 = Timer()
    retrieval = retrieval_attribution(
        model, scheduler, data[: s["retrieval_train"]].to(device), num_samples=s["retrieval_samples"],
        num_stages=s["retrieval_stages"], num_inference_steps=s["inference_steps"], seed=args.seed,
    )
    retrieval_seconds = t0.seconds

    # 4. Figures and the JSON, claims computed from the numbers with their intervals.
    timings = {"warmup_s": warmup_seconds, "window_s": window_seconds, "retrieval_s": retrieval_seconds}
    figure = plots.plot_retrieval(retrieval, data[: s["retrieval_train"]], images=False)
    return write_diffusion_outputs(NAME, args, s, timer, trainer, report, retrieval, figure, timings)


if __name__ == "__main__":
    main()
