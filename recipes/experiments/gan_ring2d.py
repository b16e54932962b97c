"""GAN on a 2-D Gaussian mixture: the generator's path kernel split by discriminator gradient geometry.

    python -m recipes.experiments.gan_ring2d [--quick] [--out-dir figures] [--seed 0] [--device cpu]
                                 [--mixture ring|grid] [--loss nonsaturating|hinge|wgan-gp] [--spectral-norm]

DESIGN.md section 3, issue 4. Trains MLP G and D (SiLU, Adam, float64) with the
:class:`GANKernelAnalyzer` attached: generator ledger grouped by the pushed-to mode
argmax_m cos(−w_i, μ_m − G(z_i)) with a label-permutation control on the same trajectory, and the
discriminator's ledger grouped into real (by mode), generated (by nearest mode) and penalty examples.

Writes ``gan_ring2d.png`` (overview), ``gan_ring2d_coupling.png`` (coupling matrices, early and
last window) and ``gan_ring2d.json`` (numbers and claims, each held / not held from its interval);
``--mixture grid`` writes the same as ``gan_grid2d*``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genkernel.data import gaussian_grid, gaussian_ring, grid_mode_centers, ring_mode_centers
from genkernel.gan import (
    LOSSES, GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator, frozen, mode_coverage, push_field,
)
from genkernel.plotting.arrays import float_array
from genkernel.stats import mean_interval

from .. import common

NAME = "gan_ring2d"
DTYPE = torch.float64


def settings_for(mode: str) -> dict:
    """The settings of ``mode`` (full, quick or smoke)."""
    return common.pick(
        mode,
        full=dict(iterations=1500, hidden=64, depth=3, batch=128, probes=64, window=100, eval_every=10, lr=1e-3, n_data=8192),
        quick=dict(iterations=150, hidden=32, depth=3, batch=64, probes=64, window=25, eval_every=5, lr=2e-3, n_data=4096),
        smoke=dict(iterations=6, hidden=8, depth=2, batch=16, probes=8, window=3, eval_every=1, lr=2e-3, n_data=256),
    )


def make_data(mixture: str, n: int, seed: int):
    """``(points [n, 2], mode labels [n], mode centres, mode std, plot extent)`` of the ring or grid mixture."""
    if mixture == "ring":
        std = 0.05
        data, modes = gaussian_ring(n, num_modes=8, radius=2.0, std=std, seed=seed)
        return data, modes, ring_mode_centers(8, 2.0), std, 3.0
    std = 0.05
    data, modes = gaussian_grid(n, side=5, spacing=1.0, std=std, seed=seed)
    return data, modes, grid_mode_centers(5, 1.0), std, 3.0


def build_claims(report: dict, windows: list[dict]) -> dict:
    """The claims ``{key: claim}`` from the analyzer's report: exactness, alignment (Student-t intervals over
    evaluation steps) and own-mode coupling against the control, early and late."""
    g, d = report["generator"], report["discriminator"]
    claims = {}
    worst = max(g["relative_residual"], d["relative_residual"])
    claims["exact_ledger"] = common.claim(
        "the contributions add up to the real change of G and of D (relative residual < 1e-3, midpoint)",
        worst < 1e-3, worst, None, generator=g["relative_residual"], discriminator=d["relative_residual"],
    )
    rows = report["alignment"]
    formula = mean_interval(float_array([r["cos_formula"] for r in rows]))
    claims["formula_matches_each_step"] = common.claim(
        "each step's ΔG(z') equals the ledger's kernel machine (optimizer weights): mean cosine > 0.99",
        formula.above(0.99), formula.estimate, formula,
    )
    field = mean_interval(float_array([r["cos_kernel_field"] for r in rows]))
    claims["distribution_guided"] = common.claim(
        "the generator's step follows the plain kernel-smoothed discriminator field −Σ_i c_i K_G(z', z_i) w_i "
        "(mean cosine over evaluation steps > 0.5)",
        field.above(0.5), field.estimate, field,
    )
    cmp = mean_interval(float_array([r["cos_kernel_field"] for r in rows]) - float_array([r["cos_local_push"] for r in rows]))
    claims["kernel_smoothing_matters"] = common.claim(
        "the kernel-smoothed field predicts the step's direction better than the probe's own local push −w(z') "
        "(mean over evaluation steps of cos(ΔG, field) − cos(ΔG, −w) > 0)",
        cmp.above(0), cmp.estimate, cmp,
    )
    early, late = early_window(windows), windows[-1]
    for label, w in (("early", early), ("late", late)):
        t, n = w["traffic_own_minus_control"], w["net_own_minus_control"]
        claims[f"own_mode_traffic_{label}"] = common.claim(
            f"{label} window (steps {w['steps'][0]}-{w['steps'][1]}): a probe's own pushed-to-mode group carries more "
            "traffic than under the label-permutation control (measured − control > 0)",
            t["held"], t["difference"], t["interval"], method=t["method"], n=t["n"],
        )
        claims[f"own_mode_net_share_{label}"] = common.claim(
            f"{label} window: own-group net share exceeds the control's (measured − control > 0; read with κ)",
            n["held"], n["difference"], n["interval"], method=n["method"], n=n["n"], kappa_median=w["kappa_median"],
        )
    return claims


def early_window(windows: list[dict], min_groups: int = 3) -> dict:
    """The first window whose probes fall in at least ``min_groups`` geometry groups. At initialization
    G maps every latent to nearly one point, so all probes share one group and an own-group share
    compares that group with itself; such windows are reported but not used for the early claim."""
    for w in windows:
        if len(set(w["probe_groups"])) >= min_groups:
            return w
    return windows[0]


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    parser = common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--mixture", default="ring", choices=["ring", "grid"], help="8 Gaussians on a ring or 25 on a grid")
    parser.add_argument("--loss", default="nonsaturating", choices=list(LOSSES))
    parser.add_argument("--spectral-norm", action="store_true", help="spectral norm in D")
    args = common.parse(parser, argv)
    timer = common.Timer()
    s = settings_for(args.mode)
    device = args.torch_device
    data, modes, centers, std, extent = make_data(args.mixture, s["n_data"], args.seed)
    s["batch"] = max(s["batch"], 2 * centers.shape[0])  # every mode group can be filled (25 on the grid)
    data = data.to(device, DTYPE)

    torch.manual_seed(args.seed)
    G = MLPGenerator(2, 2, hidden=s["hidden"], depth=s["depth"]).to(device, DTYPE)
    D = MLPDiscriminator(2, hidden=s["hidden"], depth=s["depth"], spectral_norm=args.spectral_norm).to(device, DTYPE)
    gen = torch.Generator().manual_seed(args.seed + 1)
    probes = torch.randn(s["probes"], 2, generator=gen, dtype=DTYPE).to(device)
    axis = torch.linspace(-extent, extent, 8, dtype=DTYPE)
    d_probes = torch.cartesian_prod(axis, axis).to(device)
    analyzer = GANKernelAnalyzer(
        G, D, probes, grouping="mode", mode_centers=centers, mode_std=std, controls=1,
        window=s["window"], eval_every=s["eval_every"], discriminator_probes=d_probes,
        discriminator_groups="role_mode", seed=args.seed,
    )
    trainer = GANTrainer(
        G, D, data, labels=modes, loss=args.loss, batch_size=s["batch"], lr_g=s["lr"], lr_d=s["lr"],
        callbacks=[analyzer], seed=args.seed, progress=args.mode != "smoke",
    )
    show = torch.randn(512, 2, generator=gen, dtype=DTYPE).to(device)
    start_samples = trainer.sample(show).cpu()
    trainer.train(s["iterations"])
    report = analyzer.report()
    end_samples = trainer.sample(show).cpu()

    # The discriminator's push field on a grid, at the end.
    grid_axis = torch.linspace(-extent, extent, 21, dtype=DTYPE)
    grid = torch.cartesian_prod(grid_axis, grid_axis).to(device)
    with frozen(D):
        push = push_field(trainer.g_loss, grid).cpu()

    windows = report["windows"]
    claims = build_claims(report, windows)
    figure = draw(report, analyzer, grid.cpu(), push, data.cpu()[:1000], end_samples, centers, extent)
    name = NAME if args.mixture == "ring" else "gan_grid2d"  # the grid variant keeps its own files
    draw_coupling(windows, analyzer.grouping.labels(), Path(args.out_dir) / f"{name}_coupling.png")
    results = {
        "generator": {k: v for k, v in report["generator"].items() if k != "coupling_whole_run"},
        "coupling_whole_run": report["generator"]["coupling_whole_run"],
        "discriminator": report["discriminator"],
        "windows": windows,
        "alignment": report["alignment"],
        "coverage": report["coverage"],
        "coverage_start": mode_coverage(start_samples, centers, std),
        "coverage_end": mode_coverage(end_samples, centers, std),
        "group_labels": report["group_labels"],
        "losses": {"d_final": trainer.history["d_loss"][-1], "g_final": trainer.history["g_loss"][-1]},
    }
    settings = {**s, "mixture": args.mixture, "loss": args.loss, "spectral_norm": args.spectral_norm,
                "grouping": "pushed-to mode", "control": "label permutation within each batch, same trajectory",
                "dtype": "float64", "optimizer": "Adam(betas=(0.5, 0.999))", "extra_figures": [f"{name}_coupling.png"]}
    return common.finish(name, args, figure, results, claims, settings, timer)


def draw(report, analyzer, grid, push, real, fake, centers, extent):
    """The overview figure (fields, coupling minus control, alignment, coverage); returns it."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import (
        plot_alignment, plot_coupling, plot_coverage_and_coupling, plot_discriminator_field, plot_probe_field,
    )

    fig, axes = plt.subplots(2, 3, figsize=(13, 8.4))
    plot_discriminator_field(axes[0, 0], grid, push, real, fake, centers, title="end: discriminator push −w, real and generated")
    # Fields at the evaluation step nearest 40% of training, where the samples have spread out.
    target = 0.4 * analyzer.fields[-1]["step"]
    early = min(analyzer.fields, key=lambda f: abs(f["step"] - target))
    for ax in axes[0, :3]:
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
    plot_probe_field(axes[0, 1], early["x"], -early["w"], centers, title=f"step {early['step']}: raw push −w(z') at probes", color="tab:orange")
    plot_probe_field(axes[0, 2], early["x"], early["field"], centers, title=f"step {early['step']}: kernel-smoothed field −Σ c K_G w", color="tab:blue")
    first = early_window(report["windows"])
    diff = float_array(first["traffic_matrix"]) - float_array(first["traffic_matrix_control"])
    plot_coupling(axes[1, 0], diff, analyzer.grouping.labels(), diverging=True,
                  title=f"traffic coupling − control, steps {first['steps'][0]}-{first['steps'][1]}")
    plot_alignment(axes[1, 1], report["alignment"])
    plot_coverage_and_coupling(axes[1, 2], report["coverage"], report["windows"])
    fig.suptitle("GAN on a 2-D mixture: generator corrections as kernel-smoothed discriminator gradients", fontsize=11)
    fig.tight_layout()
    return fig


def draw_coupling(windows, labels, path: Path) -> None:
    """Saves the coupling matrices (measured and control, early and last window) to ``path``; returns nothing."""
    import matplotlib.pyplot as plt

    from genkernel.plotting.gan import plot_coupling

    chosen = [("early", early_window(windows)), ("last", windows[-1])]
    fig, axes = plt.subplots(2, 4, figsize=(15, 7.4))
    for row, (name, w) in enumerate(chosen):
        span = f"{w['steps'][0]}-{w['steps'][1]}"
        plot_coupling(axes[row, 0], w["traffic_matrix"], labels, title=f"{name} window {span}: traffic shares")
        plot_coupling(axes[row, 1], w["traffic_matrix_control"], labels, title="traffic, permutation control")
        plot_coupling(axes[row, 2], w["net_matrix"], labels, diverging=True, title=f"net shares (κ median {w['kappa_median']:.1f})")
        plot_coupling(axes[row, 3], w["net_matrix_control"], labels, diverging=True, title="net shares, permutation control")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
