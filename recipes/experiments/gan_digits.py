"""GAN on 16×16 images: the generator's path kernel split by discriminator gradient direction.

    python -m recipes.experiments.gan_digits [--quick] [--out-dir figures] [--seed 0] [--device cpu]
                                 [--dataset digits|mnist|cifar10] [--data-root DIR]

DESIGN.md section 3, issue 4. A small DCGAN-style pair (GroupNorm generator, spectral-norm
discriminator, SiLU, Adam, non-saturating loss) on sklearn digits upsampled to 16×16 (MNIST or
CIFAR-10 from local files with ``--data-root``; nothing is downloaded). The generator ledger is grouped by
k-means clusters of the discriminator's input-gradient directions w_i/‖w_i‖ (fitted once on the
first batch and the probes), with a label-permutation control on the same trajectory; D keeps its
own ledger over generated / real examples at fixed real and generated probe images.

Writes ``gan_digits.png`` (samples before/after, alignment, coupling), ``gan_digits_samples.png``
(a torchvision sample grid) and ``gan_digits.json`` (numbers and claims).
"""

from __future__ import annotations

from pathlib import Path

import torch

from genkernel.data import load_image_dataset
from genkernel.gan import GANKernelAnalyzer, GANTrainer, DCDiscriminator, DCGenerator
from genkernel.plotting.arrays import float_array
from genkernel.stats import mean_interval

from .. import common

NAME = "gan_digits"


def settings_for(mode: str) -> dict:
    """The settings of ``mode`` (full, quick or smoke)."""
    return common.pick(
        mode,
        full=dict(iterations=600, width=32, latent=32, batch=64, probes=32, groups=6, window=100, eval_every=10, lr=1e-3, limit=None, dtype="float64"),
        quick=dict(iterations=45, width=8, latent=16, batch=32, probes=16, groups=4, window=15, eval_every=5, lr=1e-3, limit=None, dtype="float64"),
        smoke=dict(iterations=3, width=8, latent=8, batch=8, probes=4, groups=2, window=3, eval_every=1, lr=1e-3, limit=64, dtype="float64"),
    )


def load(args, s):
    """``(images [N, C, 16, 16] in [-1, 1], labels [N])`` of the chosen data set."""
    images, labels = load_image_dataset(args.dataset, data_root=args.data_root, train=True, size=16, limit=s["limit"], seed=args.seed)
    return images * 2 - 1, labels  # [-1, 1], the generator's tanh range


def build_claims(report: dict) -> dict:
    """The claims ``{key: claim}`` from the analyzer's report: exactness, alignment (Student-t intervals over
    evaluation steps) and own-direction traffic against the control, first and last window."""
    g, d = report["generator"], report["discriminator"]
    rows, windows = report["alignment"], report["windows"]
    worst = max(g["relative_residual"], d["relative_residual"])
    claims = {
        "exact_ledger": common.claim(
            "the contributions add up to the real change of G and of D (relative residual < 1e-3, midpoint)",
            worst < 1e-3, worst, None, generator=g["relative_residual"], discriminator=d["relative_residual"],
        )
    }
    for key, stat, threshold, text in (
        ("formula_matches_each_step", "cos_formula", 0.99, "each step's ΔG(z') equals the ledger's kernel machine: mean cosine > 0.99"),
        ("distribution_guided", "cos_kernel_field", 0.5, "the step follows the plain kernel-smoothed discriminator field (mean cosine > 0.5)"),
    ):
        m = mean_interval(float_array([r[stat] for r in rows]))
        claims[key] = common.claim(text, m.above(threshold), m.estimate, m)
    cmp = mean_interval(float_array([r["cos_kernel_field"] for r in rows]) - float_array([r["cos_local_push"] for r in rows]))
    claims["kernel_smoothing_matters"] = common.claim(
        "the kernel-smoothed field predicts the step better than the probe's local push −w(z') (difference > 0)",
        cmp.above(0), cmp.estimate, cmp,
    )
    for label, w in (("early", windows[0]), ("late", windows[-1])):
        t = w["traffic_own_minus_control"]
        claims[f"own_direction_traffic_{label}"] = common.claim(
            f"{label} window (steps {w['steps'][0]}-{w['steps'][1]}): a probe's own gradient-direction cluster carries "
            "more traffic than under the permutation control (measured − control > 0)",
            t["held"], t["difference"], t["interval"], method=t["method"], n=t["n"], kappa_median=w["kappa_median"],
        )
    return claims


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    parser = common.make_parser(__doc__.splitlines()[0], datasets=["digits", "mnist", "cifar10"])
    args = common.parse(parser, argv)
    timer = common.Timer()
    s = settings_for(args.mode)
    dtype = getattr(torch, s["dtype"])
    device = args.torch_device
    images, labels = load(args, s)
    channels = images.shape[1]
    data = images.to(device, dtype)

    torch.manual_seed(args.seed)
    G = DCGenerator(s["latent"], channels, width=s["width"], groups=min(8, s["width"])).to(device, dtype)
    D = DCDiscriminator(channels, width=s["width"], spectral_norm=True).to(device, dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    probes = torch.randn(s["probes"], s["latent"], generator=gen, dtype=torch.float64).to(device, dtype)
    analyzer = GANKernelAnalyzer(
        G, D, probes, grouping="direction", num_groups=s["groups"], controls=1,
        window=s["window"], eval_every=s["eval_every"], coverage_latents=0, seed=args.seed,
    )
    trainer = GANTrainer(G, D, data, labels=labels, batch_size=s["batch"], lr_g=s["lr"], lr_d=s["lr"],
                         callbacks=[analyzer], seed=args.seed, progress=args.mode != "smoke")
    show = torch.randn(32, s["latent"], generator=gen, dtype=torch.float64).to(device, dtype)
    before = trainer.sample(show).cpu()
    trainer.train(s["iterations"])
    after = trainer.sample(show).cpu()
    report = analyzer.report()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_samples(out / f"{NAME}_samples.png", show)

    claims = build_claims(report)
    figure = draw(report, analyzer, before, after, data[:32].cpu())
    results = {
        "generator": {k: v for k, v in report["generator"].items() if k != "coupling_whole_run"},
        "discriminator": report["discriminator"],
        "windows": report["windows"],
        "alignment": report["alignment"],
        "group_labels": report["group_labels"],
        "losses": {"d_final": trainer.history["d_loss"][-1], "g_final": trainer.history["g_loss"][-1]},
    }
    settings = {**s, "dataset": args.dataset, "images": int(images.shape[0]), "grouping": "k-means of w/|w|",
                "control": "label permutation within each batch, same trajectory", "loss": "nonsaturating",
                "optimizer": "Adam(betas=(0.5, 0.999))", "extra_figures": [f"{NAME}_samples.png"]}
    return common.finish(NAME, args, figure, results, claims, settings, timer)


def draw(report, analyzer, before, after, real):
    """The overview figure (samples, alignment, coupling minus control); returns it."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import plot_alignment, plot_coupling, plot_coverage_and_coupling, plot_sample_grid

    fig, axes = plt.subplots(2, 3, figsize=(13, 8.4))
    plot_sample_grid(axes[0, 0], real, title="real (16×16)")
    plot_sample_grid(axes[0, 1], before, title="generated at initialization")
    plot_sample_grid(axes[0, 2], after, title=f"generated after {report['generator_steps']} generator steps")
    plot_alignment(axes[1, 0], report["alignment"])
    last = report["windows"][-1]
    diff = float_array(last["traffic_matrix"]) - float_array(last["traffic_matrix_control"])
    plot_coupling(axes[1, 1], diff, analyzer.grouping.labels(), diverging=True,
                  title=f"traffic coupling − control, steps {last['steps'][0]}-{last['steps'][1]}")
    plot_coverage_and_coupling(axes[1, 2], [], report["windows"], title="own-direction traffic − control per window")
    fig.suptitle("GAN on 16×16 images: corrections grouped by discriminator gradient direction", fontsize=11)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
