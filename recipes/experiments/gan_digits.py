"""GAN on 16×16 images: the generator's path kernel split by discriminator gradient direction.

    python -m recipes.experiments.gan_digits [--quick] [--out-dir figures] [--device cpu] [--seed 0 | --seeds 0 1 2]
        [--dataset digits|mnist|cifar10] [--data-root DIR] [--controls K] [--null-model | --no-null-model]
        [--runs-dir DIR] [--aggregate] [--checkpoint-dir DIR] [--estimate-only]

docs/gan.md. A small DCGAN-style pair (GroupNorm generator, spectral-norm
discriminator, SiLU, Adam, non-saturating loss) on sklearn digits upsampled to 16×16 (MNIST or
CIFAR-10 from local files with ``--data-root``; nothing is downloaded). The generator ledger is split
on the same steps by k-means clusters of the discriminator's input-gradient directions w_i/‖w_i‖
(fitted once on the first batch and the probes), by k-means clusters of the latents z (a spatial
grouping of the same size that ignores D), and by K label permutations of each; D keeps its own
ledger over generated / real examples at fixed real and generated probe images.

The claims, the seeds, the null model (G trained against a fixed random discriminator), resuming and
aggregating are those of :mod:`recipes.experiments.gan_ring2d` (the shared protocol lives there).
Convergence for images: each sample's class is its nearest training image's, and it is "on the
data" within the 95th percentile of held-out images' nearest-training distances
(:func:`genkernel.gan.metrics.image_coverage`); the coupling claims are measured only when at least
3/4 of the classes are hit and half the samples are on the data.

Expected wall time, full settings (2000 iterations, K = 3, null model on), one seed: about 3 h on 2
CPU cores (``--estimate-only``: 2.7 s per tracked iteration); measure a GPU with ``--estimate-only
--device cuda``. Quick: about 3 minutes on 2 CPU cores (3 seeds, each with its null model).

Writes ``gan_digits.png`` (samples before/after, alignment, every window's statistics),
``gan_digits_coupling.png`` (coupling matrices, measured beside control on one scale, for both
groupings), ``gan_digits_samples.png`` (a large real / generated sample sheet) and ``gan_digits.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genkernel.data import load_image_dataset
from genkernel.gan import DCDiscriminator, DCGenerator, GANKernelAnalyzer, GANTrainer, GeneratorLoss
from genkernel.gan.metrics import converged, image_coverage

from .. import common
from .gan_ring2d import (
    add_gan_arguments, apply_gan_overrides, drawn_numbers, estimate_wall_time, gan_claims, report_for_run, run_protocol,
    train_resumable,
)

NAME = "gan_digits"
IMAGE_QUALITY = 0.5  # share of samples on the data (see the module docstring) for a converged GAN


def settings_for(mode: str) -> dict:
    """The settings of ``mode`` (full, quick or smoke)."""
    return common.pick(
        mode,
        full=dict(iterations=2000, width=32, latent=32, batch=64, probes=32, groups=6, window=200, eval_every=20, lr=1e-3,
                  limit=None, dtype="float64", controls=3, null_model=True, seeds=3, quadrature="midpoint"),
        quick=dict(iterations=45, width=8, latent=16, batch=32, probes=16, groups=4, window=15, eval_every=5, lr=1e-3,
                   limit=None, dtype="float64", controls=2, null_model=True, seeds=3, quadrature="simpson"),
        smoke=dict(iterations=3, width=8, latent=8, batch=8, probes=4, groups=2, window=3, eval_every=1, lr=1e-3,
                   limit=64, dtype="float64", controls=1, null_model=False, seeds=1, quadrature="midpoint"),
    )


def load(args, s, seed: int, *, train: bool = True):
    """``(images [N, C, 16, 16] in [-1, 1], labels [N])`` of the chosen data set (its train or test split)."""
    images, labels = load_image_dataset(args.dataset, data_root=args.data_root, train=train, size=16,
                                        limit=s["limit"] if train else (s["limit"] or 512), seed=seed)
    return images * 2 - 1, labels  # [-1, 1], the generator's tanh range


def build(args, s: dict, seed: int, *, null: bool, analyzed: bool = True, run_dir: Path | None = None):
    """``(trainer, analyzer or None, context)`` for one run of ``seed`` (``null``: see gan_ring2d.build)."""
    dtype = getattr(torch, s["dtype"])
    device = args.torch_device
    images, labels = load(args, s, seed)
    channels = images.shape[1]
    torch.manual_seed(seed)
    G = DCGenerator(s["latent"], channels, width=s["width"], groups=min(8, s["width"])).to(device, dtype)
    D = DCDiscriminator(channels, width=s["width"], spectral_norm=True).to(device, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    probes = torch.randn(s["probes"], s["latent"], generator=gen, dtype=torch.float64).to(device, dtype)
    analyzer = None
    if analyzed:
        analyzer = GANKernelAnalyzer(
            G, D, probes, grouping="direction", comparison="latent_kmeans", num_groups=s["groups"], controls=s["controls"],
            window=s["window"], eval_every=s["eval_every"], coverage_latents=0, seed=seed, quadrature=s["quadrature"],
            geometry_loss=GeneratorLoss(D) if null else None,
        )
    trainer = GANTrainer(G, D, images.to(device, dtype), labels=labels, batch_size=s["batch"], lr_g=s["lr"], lr_d=s["lr"],
                         callbacks=[analyzer] if analyzer is not None else [], seed=seed, progress=args.mode == "full",
                         checkpoint_dir=run_dir, checkpoint_every=s["window"] if run_dir is not None else 0)
    if null:
        torch.manual_seed(seed + 10_000)
        fixed = DCDiscriminator(channels, width=s["width"], spectral_norm=True).to(device, dtype).requires_grad_(False)
        trainer.g_loss = GeneratorLoss(fixed)  # G's steps ignore D
    show = torch.randn(64, s["latent"], generator=gen, dtype=torch.float64).to(device, dtype)
    coverage = torch.randn(256, s["latent"], generator=gen, dtype=torch.float64).to(device, dtype)
    return trainer, analyzer, {"images": images, "labels": labels, "show": show, "coverage": coverage}


def run_seed(args, s: dict, seed: int, null: bool, run_dir: Path | None) -> dict:
    """One independent run (or its null model), JSON-ready (see gan_ring2d.run_seed)."""
    timer = common.Timer()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer, analyzer, ctx = build(args, s, seed, null=null, run_dir=run_dir)
    before = trainer.sample(ctx["show"]).cpu()
    resumed, train_s = train_resumable(trainer, s["iterations"], run_dir)
    after = trainer.sample(ctx["show"]).cpu()
    report = analyzer.report()
    held_out, _ = load(args, s, seed, train=False)
    coverage_end = image_coverage(trainer.sample(ctx["coverage"]).cpu(), ctx["images"], ctx["labels"], held_out)
    ok, why = converged(coverage_end, quality=IMAGE_QUALITY, modes="classes", on="on the data")
    return common._clean({
        "seed": seed, "null": null, "resumed": resumed, "report": report_for_run(report),
        "coverage_end": coverage_end, "convergence": {"converged": ok, "why": why},
        "losses": {"d_final": trainer.history["d_loss"][-1], "g_final": trainer.history["g_loss"][-1]},
        "timing": {"train_s": train_s, "total_s": timer.seconds, "seconds_per_iteration": train_s / max(1, s["iterations"])},
        "figure": {"real": ctx["images"][:64], "before": before, "after": after},
    })


def write_outputs(name: str, args, s: dict, timer, runs: list[dict], nulls: list[dict]) -> dict:
    """Claims from the runs, the figures over every seed, and OUT/NAME.json; returns the payload."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import coupling_figure, sample_figure

    claims = gan_claims(runs, nulls, key="own_direction", grouping_word="gradient-direction", spatial_word="latent k-means")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dpi = 50 if args.mode == "smoke" else 110
    labels = runs[0]["report"]["group_labels"]
    windows = [r["report"]["windows"] for r in runs]
    fig = coupling_figure(windows, labels, [f"z-cluster {g}" for g in range(len(labels))],
                          title=f"{name}: coupling by gradient direction and by latent cluster", seeds=[r["seed"] for r in runs])
    fig.savefig(out / f"{name}_coupling.png", dpi=dpi)
    plt.close(fig)
    first = runs[0]
    tensor = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    steps = first["report"]["generator_steps"]
    sheet = sample_figure([("real (16×16)", tensor(first["figure"]["real"])),
                           ("generated at initialization", tensor(first["figure"]["before"])),
                           (f"generated after {steps} generator steps", tensor(first["figure"]["after"]))],
                          title=f"{name}, seed {first['seed']}: the same 64 latents before and after training")
    sheet.savefig(out / f"{name}_samples.png", dpi=max(dpi, 100))
    plt.close(sheet)
    results = {
        "seeds": [r["seed"] for r in runs],
        "what_ran": (f"{args.mode} settings, {len(runs)} seed(s) {[r['seed'] for r in runs]}, {s['iterations']} iterations, "
                     f"windows of {s['window']} generator steps, {s['controls']} permutation controls per grouping, null model "
                     f"{'run' if nulls else 'not run'}"),
        "generator": first["report"]["generator"],
        "discriminator": first["report"]["discriminator"],
        "windows": first["report"]["windows"],
        # what the coupling figure and the overview's window panels draw: every seed, not seed 0's alone
        "drawn_over_seeds": drawn_numbers(runs),
        "alignment": first["report"]["alignment"],
        # what the sample sheet and the overview's top row draw (seed 0, images [B, C, H, W] in [-1, 1]; the grids show
        # (x + 1) / 2, the overview the first 32 of each): 64 real images, and the generator's images of the same 64
        # latents before and after training
        "drawn_samples": {"seed": first["seed"], **first["figure"]},
        "coverage_end": first["coverage_end"],
        "convergence": [dict(seed=r["seed"], **r["convergence"]) for r in runs],
        "group_labels": labels,
        "losses": first["losses"],
        "runs": [{k: r[k] for k in ("seed", "resumed", "coverage_end", "convergence", "losses", "timing")} for r in runs],
        "null_runs": [{k: r[k] for k in ("seed", "coverage_end", "losses", "timing")} for r in nulls],
        "timing": first["timing"],
    }
    settings = {**s, "dataset": args.dataset, "images": int(load(args, s, first["seed"])[0].shape[0]),
                "grouping": "k-means of w/|w|", "comparison": "k-means of z (ignores D), same size",
                "control": "label permutations within each batch, same trajectory, one set per grouping", "loss": "nonsaturating",
                "optimizer": "Adam(betas=(0.5, 0.999))", "extra_figures": [f"{name}_samples.png", f"{name}_coupling.png"],
                "convergence_rule": "at least 3/4 of the classes hit and half the samples within the 95th percentile of "
                                    "held-out images' nearest-training distance"}
    return common.finish(name, args, draw(runs), results, claims, settings, timer)


def draw(runs: list[dict]):
    """The overview figure (samples, alignment, every window's statistics); returns it."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import plot_alignment, plot_sample_grid, plot_window_statistics

    first = runs[0]
    tensor = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.6))
    plot_sample_grid(axes[0, 0], tensor(first["figure"]["real"])[:32], title="real (16×16)")
    plot_sample_grid(axes[0, 1], tensor(first["figure"]["before"])[:32], title="generated at initialization")
    plot_sample_grid(axes[0, 2], tensor(first["figure"]["after"])[:32],
                     title=f"generated after {first['report']['generator_steps']} generator steps")
    plot_alignment(axes[1, 0], first["report"]["alignment"], title=f"seed {first['seed']}: alignment of each step's ΔG(z')")
    windows = [r["report"]["windows"] for r in runs]
    seeds = [r["seed"] for r in runs]  # (the legend names each marker's seed)
    plot_window_statistics(axes[1, 1], windows, kind="traffic", seeds=seeds)
    plot_window_statistics(axes[1, 2], windows, kind="net", seeds=seeds)
    fig.suptitle("GAN on 16×16 images: corrections grouped by discriminator gradient direction", fontsize=11)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    parser = common.make_parser(__doc__.splitlines()[0], datasets=["digits", "mnist", "cifar10"])
    add_gan_arguments(parser)
    args = common.parse(parser, argv)
    s = apply_gan_overrides(settings_for(args.mode), args)

    def estimate(name, args, s, seeds):
        return estimate_wall_time(name, args, s, seeds, lambda analyzed: build(args, s, seeds[0], null=False, analyzed=analyzed)[0])

    return run_protocol(NAME, args, s, {"run": run_seed, "write": write_outputs, "estimate": estimate})


if __name__ == "__main__":
    main()
