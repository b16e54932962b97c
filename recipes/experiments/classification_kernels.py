"""Recipe 3 (paper Figure 2 e–h): normalized gradient kernels of a small convnet over
class-ordered images (10 per class), at initialization and after training.

Steps:
  1. Data: ``load_image_dataset`` (sklearn digits offline by default; ``--dataset mnist|cifar10
     --data-root DIR`` reads the real sets through torchvision, never downloading). Training
     images from the train split; the kernel's images, ``per_class`` per class ordered by class,
     from the test split.
  2. k̂ at θ_0, train ``SmallConvNet`` with cross-entropy (Adam), k̂ at θ_T (DESIGN.md
     section 2, trace over the class logits).
  3. Numbers: mean within-class minus between-class k̂ (self pairs excluded) before and after,
     per-class gaps, test accuracy.
  4. Claim: training raises the within−between gap (interval over classes of the per-class
     change).
"""

from __future__ import annotations

import torch

from genkernel import gradient_kernel
from genkernel.analysis.kernel_stats import within_between_gap
from genkernel.data import load_image_dataset
from genkernel.plotting.figures import plot_class_kernels
from genkernel.stats import mean_interval
from genkernel.supervised import SmallConvNet, SupervisedTrainer, cross_entropy_loss

from ..common import Timer, claim, finish, make_parser, parse, pick

NAME = "classification_kernels"
DATASETS = ("digits", "mnist", "cifar10")


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    timer = Timer()
    args = parse(make_parser(__doc__.splitlines()[0], datasets=DATASETS), argv)
    s = pick(
        args.mode,
        full=dict(size=16, train_limit=None, per_class=10, width=16, steps=1500, batch=64, lr=2e-3),
        quick=dict(size=16, train_limit=None, per_class=10, width=16, steps=300, batch=64, lr=2e-3),
        smoke=dict(size=8, train_limit=40, per_class=2, width=4, steps=5, batch=8, lr=2e-3),
    )
    device = args.torch_device
    # 1. Data.
    load = dict(data_root=args.data_root, size=s["size"], seed=args.seed)
    x_train, y_train = load_image_dataset(args.dataset, train=True, limit=s["train_limit"], **load)
    x_probe, y_probe = load_image_dataset(args.dataset, train=False, per_class=s["per_class"], **load)
    x_train, y_train, x_probe, y_probe = (t.to(device) for t in (x_train, y_train, x_probe, y_probe))
    # 2. Kernels before and after training.
    torch.manual_seed(args.seed)
    model = SmallConvNet(x_train.shape[1], 10, size=s["size"], width=s["width"]).to(device)
    k_init = gradient_kernel(model, x_probe, normalize=True).cpu()
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"])
    trainer = SupervisedTrainer(model, optimizer, cross_entropy_loss, batch_size=min(s["batch"], len(x_train)), seed=args.seed)
    history = trainer.fit(x_train, y_train, steps=s["steps"])
    k_final = gradient_kernel(model, x_probe, normalize=True).cpu()
    with torch.no_grad():
        accuracy = float((model(x_probe).argmax(1) == y_probe).double().mean())
    # 3. Numbers.
    labels = y_probe.cpu()
    before, after = within_between_gap(k_init, labels), within_between_gap(k_final, labels)
    change = mean_interval(after.per_class - before.per_class)  # Student t over classes
    results = {
        "dataset": args.dataset,
        "num_train": len(x_train),
        "num_kernel_images": len(x_probe),
        "gap_init": before.gap, "gap_final": after.gap,
        "within_init": before.within, "between_init": before.between,
        "within_final": after.within, "between_final": after.between,
        "per_class_gap_init": before.per_class, "per_class_gap_final": after.per_class,
        "probe_accuracy": accuracy,
        "final_train_loss": history[-1], "initial_train_loss": history[0],
    }
    # 4. Claim.
    claims = {
        "training_sharpens_class_blocks": claim(
            "mean within-class minus between-class normalized kernel rises with training "
            "(interval over classes of the per-class change)",
            change.above(0), change.estimate, change,
            gap_init=before.gap, gap_final=after.gap,
        )
    }
    fig = plot_class_kernels(k_init, k_final, s["per_class"], dataset=args.dataset,
                             gaps={"init": before.gap, "final": after.gap})
    return finish(NAME, args, fig, results, claims, {**s, "dataset": args.dataset}, timer)


if __name__ == "__main__":
    main()
