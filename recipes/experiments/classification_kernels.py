"""Recipe 3 (paper Figure 2 e–h): normalized gradient kernels of a small convnet over
class-ordered images (10 per class), at initialization and after training.

Steps:
  1. Data: ``load_image_dataset`` (sklearn digits offline by default; ``--dataset mnist|cifar10
     --data-root DIR`` reads the real sets through torchvision, never downloading). Training
     images from the train split; the kernel's images, ``per_class`` per class ordered by class,
     from the test split.
  2. k̂ at θ_0, train ``SmallConvNet`` with cross-entropy (Adam), k̂ at θ_T (docs/ledger.md,
     "Gradient kernels", trace over the class logits).
  3. Numbers: the block AUC (probability that a within-class pair has higher k̂ than a
     between-class pair, self pairs excluded: scale-free, unlike the absolute within − between gap,
     which grows when all similarities fall) before and after, per class, the absolute gaps and
     distance ratios beside it, test accuracy.
  4. Claim: training raises the block AUC (θ_T − θ₀; Student t over independent training runs,
     ``seeds``, which vary the initialization and batch order).
"""

from __future__ import annotations

import torch

from genkernel import gradient_kernel
from genkernel.analysis.kernel_stats import block_auc, within_between_gap
from genkernel.data import load_image_dataset
from genkernel.plotting.figures import plot_class_kernels
from genkernel.supervised import SmallConvNet, SupervisedTrainer, cross_entropy_loss

from ..common import Timer, baseline, claim, finish, make_parser, over_seeds, parse, pick

NAME = "classification_kernels"
DATASETS = ("digits", "mnist", "cifar10")


def train_once(seed, s, x_train, y_train, x_probe, y_probe, labels, device) -> dict:
    """One training run from ``seed`` (initialization and batch order): k̂ over the probe images at
    θ_0 and θ_T, their block AUCs and gaps, the probe accuracy and the loss history."""
    torch.manual_seed(seed)
    model = SmallConvNet(x_train.shape[1], 10, size=s["size"], width=s["width"]).to(device)
    k_init = gradient_kernel(model, x_probe, normalize=True).cpu()
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"])
    trainer = SupervisedTrainer(model, optimizer, cross_entropy_loss, batch_size=min(s["batch"], len(x_train)), seed=seed)
    history = trainer.fit(x_train, y_train, steps=s["steps"])
    k_final = gradient_kernel(model, x_probe, normalize=True).cpu()
    with torch.no_grad():
        accuracy = float((model(x_probe).argmax(1) == y_probe).double().mean())
    return {
        "k_init": k_init, "k_final": k_final, "history": history, "accuracy": accuracy,
        "auc_init": block_auc(k_init, labels), "auc_final": block_auc(k_final, labels),
        "gap_init": within_between_gap(k_init, labels), "gap_final": within_between_gap(k_final, labels),
    }


def claims_from_runs(runs: list[dict]) -> dict:
    """The claim from the runs (one per seed, :func:`train_once`)."""
    change = over_seeds([r["auc_final"].auc - r["auc_init"].auc for r in runs])
    return {
        "training_sharpens_class_blocks": claim(
            "training sharpens the class blocks of k̂: the block AUC (a within-class pair more similar than a "
            "between-class pair; scale-free) rises from θ₀ to θ_T (Student t over seeds)",
            change.above(0), change.estimate, change,
            statistic="block AUC of k̂ (within vs between class), θ_T − θ₀",
            baseline=baseline(sum(r["auc_init"].auc for r in runs) / len(runs), "θ₀: block AUC before training"),
            at_theta_T=sum(r["auc_final"].auc for r in runs) / len(runs),
            gap_init=runs[0]["gap_init"].gap, gap_final=runs[0]["gap_final"].gap,
        )
    }


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    timer = Timer()
    args = parse(make_parser(__doc__.splitlines()[0], datasets=DATASETS), argv)
    s = pick(
        args.mode,
        full=dict(size=16, train_limit=None, per_class=10, width=16, steps=1500, batch=64, lr=2e-3, seeds=5),
        quick=dict(size=16, train_limit=None, per_class=10, width=16, steps=300, batch=64, lr=2e-3, seeds=3),
        smoke=dict(size=8, train_limit=40, per_class=2, width=4, steps=5, batch=8, lr=2e-3, seeds=2),
    )
    device = args.torch_device
    # 1. Data.
    load = dict(data_root=args.data_root, size=s["size"], seed=args.seed)
    x_train, y_train = load_image_dataset(args.dataset, train=True, limit=s["train_limit"], **load)
    x_probe, y_probe = load_image_dataset(args.dataset, train=False, per_class=s["per_class"], **load)
    x_train, y_train, x_probe, y_probe = (t.to(device) for t in (x_train, y_train, x_probe, y_probe))
    # 2. Kernels before and after training, one independent run per seed.
    labels = y_probe.cpu()
    runs = [train_once(args.seed + r, s, x_train, y_train, x_probe, y_probe, labels, device) for r in range(s["seeds"])]
    first = runs[0]
    # 3. Numbers (the figure and the per-class values are seed 0's; the claim rests on every seed).
    before, after = first["gap_init"], first["gap_final"]
    results = {
        "dataset": args.dataset,
        "num_train": len(x_train),
        "num_kernel_images": len(x_probe),
        "block_auc_init": [r["auc_init"].auc for r in runs], "block_auc_final": [r["auc_final"].auc for r in runs],
        "per_class_auc_init": first["auc_init"].per_class, "per_class_auc_final": first["auc_final"].per_class,
        "distance_ratio_init": [r["auc_init"].distance_ratio for r in runs],
        "distance_ratio_final": [r["auc_final"].distance_ratio for r in runs],
        "gap_init": before.gap, "gap_final": after.gap,
        "within_init": before.within, "between_init": before.between,
        "within_final": after.within, "between_final": after.between,
        "per_class_gap_init": before.per_class, "per_class_gap_final": after.per_class,
        "probe_accuracy": first["accuracy"], "probe_accuracy_per_seed": [r["accuracy"] for r in runs],
        "final_train_loss": first["history"][-1] if first["history"] else None,
        "initial_train_loss": first["history"][0] if first["history"] else None,
        "seeds": [args.seed + r for r in range(s["seeds"])],
    }
    claims = claims_from_runs(runs)  # 4. Claim.
    fig = plot_class_kernels(first["k_init"], first["k_final"], s["per_class"], dataset=args.dataset,
                             gaps={"init": before.gap, "final": after.gap},
                             aucs={"init": first["auc_init"].auc, "final": first["auc_final"].auc})
    return finish(NAME, args, fig, results, claims, {**s, "dataset": args.dataset}, timer)


if __name__ == "__main__":
    main()
