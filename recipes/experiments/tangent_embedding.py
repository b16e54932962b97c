"""Recipe 5 (paper Figure 4): 2-D embedding of tangent features of digits, for a network trained
on digits 0–4 only, at initialization and after training, for seen and unseen digits.

Steps:
  1. Data: sklearn digits (offline); training images of classes 0–4 from the train split;
     ``per_class`` images of every digit 0–9 from the test split for the embedding.
  2. ``SmallConvNet`` with 5 outputs, cross-entropy (Adam). Normalized gradient kernel k̂ over
     the embedding images at θ_0 and θ_T; tangent-feature distance d = sqrt(2 − 2 k̂)
     (DESIGN.md section 2, "Tangent features", "Normalized kernel").
  3. Embed with UMAP when umap-learn is installed, otherwise t-SNE (stated in the figure and
     the JSON). Silhouette scores are computed on the tangent-feature distances themselves (not
     on the 2-D embedding): seen digits among seen, unseen among unseen, before and after.
  4. Claims: training raises the seen digits' silhouette (paired per-image Student-t interval);
     after training seen digits are better separated than unseen ones (two-sample bootstrap
     interval over images of the difference of mean silhouettes).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import silhouette_samples

from genkernel import gradient_kernel
from genkernel.analysis.embedding import embed_2d
from genkernel.analysis.kernel_stats import kernel_distance
from genkernel.data import load_digits_images
from genkernel.plotting.figures import plot_tangent_embedding
from genkernel.stats import Interval, bootstrap_interval, mean_interval
from genkernel.supervised import SmallConvNet, SupervisedTrainer, cross_entropy_loss

from ..common import Timer, claim, finish, make_parser, parse, pick

NAME = "tangent_embedding"
SEEN = [0, 1, 2, 3, 4]
UNSEEN = [5, 6, 7, 8, 9]


def silhouettes(dist: np.ndarray, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Per-image silhouette values of the images in ``classes``, among those images only."""
    sel = np.isin(labels, classes)
    return silhouette_samples(dist[np.ix_(sel, sel)], labels[sel], metric="precomputed")


def mean_difference(a: np.ndarray, b: np.ndarray, seed: int) -> Interval:
    """mean(a) − mean(b) of two independent samples, with a BCa bootstrap interval: the pooled
    values are resampled with their sample labels (so the sample sizes vary between resamples)."""
    values = np.concatenate([a, b])
    in_a = np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    return bootstrap_interval(values, lambda v, first: v[first == 1].mean() - v[first == 0].mean(),
                              paired=(in_a,), seed=seed)


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    timer = Timer()
    args = parse(make_parser(__doc__.splitlines()[0]), argv)
    s = pick(
        args.mode,
        full=dict(per_class=60, width=16, steps=1500, batch=64, lr=2e-3, train_limit=None),
        quick=dict(per_class=30, width=16, steps=300, batch=64, lr=2e-3, train_limit=None),
        smoke=dict(per_class=4, width=4, steps=5, batch=8, lr=2e-3, train_limit=40),
    )
    device = args.torch_device
    # 1. Data.
    x_train, y_train = load_digits_images(size=16, classes=SEEN, split="train", seed=args.seed)
    if s["train_limit"]:
        x_train, y_train = x_train[: s["train_limit"]], y_train[: s["train_limit"]]
    x_emb, y_emb = load_digits_images(size=16, per_class=s["per_class"], split="test", seed=args.seed)
    labels = y_emb.numpy()
    # 2. Kernels at θ_0 and θ_T.
    torch.manual_seed(args.seed)
    model = SmallConvNet(1, len(SEEN), size=16, width=s["width"]).to(device)
    x_emb_d = x_emb.to(device)
    d_init = kernel_distance(gradient_kernel(model, x_emb_d, normalize=True).cpu())
    trainer = SupervisedTrainer(model, torch.optim.Adam(model.parameters(), lr=s["lr"]), cross_entropy_loss,
                                batch_size=min(s["batch"], len(x_train)), seed=args.seed)
    history = trainer.fit(x_train.to(device), y_train.to(device), steps=s["steps"])
    d_final = kernel_distance(gradient_kernel(model, x_emb_d, normalize=True).cpu())
    with torch.no_grad():
        seen_mask = np.isin(labels, SEEN)
        seen_acc = float((model(x_emb_d[torch.from_numpy(seen_mask)]).argmax(1).cpu() == y_emb[torch.from_numpy(seen_mask)]).double().mean())
    # 3. Silhouettes (on tangent distances) and embeddings.
    sil = {
        (when, group): silhouettes(d, labels, classes)
        for when, d in (("init", d_init), ("final", d_final))
        for group, classes in (("seen", SEEN), ("unseen", UNSEEN))
    }
    seen_sel = np.isin(labels, SEEN)
    coords_init, method = embed_2d(d_init[np.ix_(seen_sel, seen_sel)], seed=args.seed)
    coords_seen, _ = embed_2d(d_final[np.ix_(seen_sel, seen_sel)], seed=args.seed)
    coords_all, _ = embed_2d(d_final, seed=args.seed)
    results = {"embedding_method": method, "num_train": len(x_train), "seen_test_accuracy": seen_acc,
               "final_train_loss": history[-1]}
    for (when, group), v in sil.items():
        results[f"silhouette_{group}_{when}"] = float(v.mean())
    # 4. Claims.
    gain = mean_interval(sil[("final", "seen")] - sil[("init", "seen")])  # paired over images
    gap = mean_difference(sil[("final", "seen")], sil[("final", "unseen")], seed=args.seed)
    claims = {
        "seen_digits_cluster_after_training": claim(
            "training on digits 0–4 raises their silhouette in tangent-feature space (paired over images)",
            gain.above(0), gain.estimate, gain,
        ),
        "unseen_digits_cluster_less": claim(
            "after training, seen digits (0–4) are better separated than unseen digits (5–9): silhouette gap > 0",
            gap.above(0), gap.estimate, gap,
        ),
    }
    panels = [
        {"coords": coords_init, "labels": labels[seen_sel], "seen": SEEN,
         "title": f"initialization, digits 0–4\nsilhouette {results['silhouette_seen_init']:.3f}"},
        {"coords": coords_seen, "labels": labels[seen_sel], "seen": SEEN,
         "title": f"after training on 0–4 ({s['steps']} steps)\nsilhouette {results['silhouette_seen_final']:.3f}"},
        {"coords": coords_all, "labels": labels, "seen": SEEN,
         "title": f"after training, all digits\nsilhouette seen {results['silhouette_seen_final']:.3f}, "
                  f"unseen {results['silhouette_unseen_final']:.3f}"},
    ]
    fig = plot_tangent_embedding(panels, method=method)
    return finish(NAME, args, fig, results, claims, {**s, "embedding_method": method}, timer)


if __name__ == "__main__":
    main()
