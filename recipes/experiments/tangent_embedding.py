"""Recipe 5 (paper Figure 4): 2-D embedding of tangent features of digits, for a network trained
on digits 0–4 only, at initialization and after training, for seen and unseen digits.

Steps:
  1. Data: sklearn digits (offline); training images of classes 0–4 from the train split;
     ``per_class`` images of every digit 0–9 from the test split for the embedding.
  2. ``SmallConvNet`` with 5 outputs, cross-entropy (Adam). Normalized gradient kernel k̂ over
     the embedding images at θ_0 and θ_T; tangent-feature distance d = sqrt(2 − 2 k̂)
     (docs/ledger.md, "Gradient kernels").
  3. Embed with UMAP when umap-learn is installed, otherwise t-SNE (stated in the figure and
     the JSON). Silhouette scores are computed on the tangent-feature distances themselves (not
     on the 2-D embedding): seen digits among seen, unseen among unseen, before and after.
  4. Claims, each a change from θ_0 with a Student-t interval over independent training runs
     (``seeds``: initialization and batch order): training raises the seen digits' silhouette;
     training separates seen digits more than unseen ones (difference in differences: the
     seen − unseen silhouette gap at θ_T minus the same gap at θ_0, which is not zero: the
     untrained network's kernel already clusters digits). Each is judged against the null model:
     the same network (initialization and batch order) trained on randomly permuted labels of
     digits 0–4, whose change from θ_0 is the baseline (paired by seed).

JSON: ``results["drawn"]`` holds what the figure draws (:func:`drawn_numbers`): per panel, the first seed's
2-D embedding coordinates and the digit of every point.
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
from genkernel.supervised import SmallConvNet, SupervisedTrainer, cross_entropy_loss

from ..common import Timer, baseline, claim, finish, make_parser, over_seeds, parse, permuted_labels, pick

NAME = "tangent_embedding"
SEEN = [0, 1, 2, 3, 4]
UNSEEN = [5, 6, 7, 8, 9]


def silhouettes(dist: np.ndarray, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Per-image silhouette values of the images in ``classes``, among those images only."""
    sel = np.isin(labels, classes)
    return silhouette_samples(dist[np.ix_(sel, sel)], labels[sel], metric="precomputed")


def train_once(seed, s, x_train, y_train, x_emb, y_emb, labels, device, *, random_labels: bool = False) -> dict:
    """One training run from ``seed``: tangent-feature distances over the embedding images at θ_0
    and θ_T, the per-image silhouettes (seen among seen, unseen among unseen) at both, the seen
    digits' test accuracy and the loss history.

    ``random_labels=True``: the null model, the same network and batch order trained on
    :func:`~recipes.common.permuted_labels` of ``y_train``; the silhouettes are still scored by the true digits."""
    torch.manual_seed(seed)
    model = SmallConvNet(1, len(SEEN), size=16, width=s["width"]).to(device)
    x_emb_d = x_emb.to(device)
    d_init = kernel_distance(gradient_kernel(model, x_emb_d, normalize=True).cpu())
    trainer = SupervisedTrainer(model, torch.optim.Adam(model.parameters(), lr=s["lr"]), cross_entropy_loss,
                                batch_size=min(s["batch"], len(x_train)), seed=seed)
    targets = permuted_labels(y_train, seed) if random_labels else y_train
    history = trainer.fit(x_train.to(device), targets.to(device), steps=s["steps"])
    d_final = kernel_distance(gradient_kernel(model, x_emb_d, normalize=True).cpu())
    seen_mask = torch.from_numpy(np.isin(labels, SEEN))
    with torch.no_grad():
        seen_acc = float((model(x_emb_d[seen_mask.to(device)]).argmax(1).cpu() == y_emb[seen_mask]).double().mean())
    sil = {
        (when, group): silhouettes(d, labels, classes)
        for when, d in (("init", d_init), ("final", d_final))
        for group, classes in (("seen", SEEN), ("unseen", UNSEEN))
    }
    return {"seed": seed, "random_labels": random_labels, "d_init": d_init, "d_final": d_final, "seen_acc": seen_acc,
            "history": history, "sil": sil}


NULL_NOT_RUN_WHY = ("the random-label null model was not run: a change from θ₀ is what any training on digits 0–4 "
                    "may show (the claim is that training on their labels changes it more than training on randomly "
                    "permuted labels does)")


def _per_seed(runs: list[dict]) -> dict[str, np.ndarray]:
    return {f"{group}_{when}": np.array([float(r["sil"][(when, group)].mean()) for r in runs])
            for when in ("init", "final") for group in ("seen", "unseen")}


def claims_from_runs(runs: list[dict], nulls: list[dict] | None = None) -> dict:
    """The two claims from the runs (one per seed, :func:`train_once`), changes from θ_0, each judged
    against the random-label null model's runs (``random_labels=True``, the same seeds in the same
    order), paired by seed: a claim's baseline is the null model's value of its statistic, and it is
    held when the statistic and the statistic minus the null's (per seed) both lie above 0 (Student t
    over seeds). Without ``nulls`` neither claim is measured."""
    per_seed = _per_seed(runs)
    gap_init = per_seed["seen_init"] - per_seed["unseen_init"]
    gap_final = per_seed["seen_final"] - per_seed["unseen_final"]
    values = {"seen_digits_cluster_after_training": per_seed["seen_final"] - per_seed["seen_init"],
              "unseen_digits_cluster_less": gap_final - gap_init}
    null_values = None
    if nulls is not None:
        if [n.get("seed") for n in nulls] != [r.get("seed") for r in runs] or not all(n.get("random_labels") for n in nulls):
            raise ValueError("nulls must be train_once(..., random_labels=True) runs with the same seeds, in the same "
                             f"order, as runs: got seeds {[n.get('seed') for n in nulls]} for {[r.get('seed') for r in runs]}")
        null_seed = _per_seed(nulls)
        null_values = {"seen_digits_cluster_after_training": null_seed["seen_final"] - null_seed["seen_init"],
                       "unseen_digits_cluster_less": (null_seed["seen_final"] - null_seed["unseen_final"])
                       - (null_seed["seen_init"] - null_seed["unseen_init"])}
    spec = {
        "seen_digits_cluster_after_training": dict(
            statement="training on digits 0–4 raises their silhouette in tangent-feature space (θ_T − θ₀), and more "
                      "than training the same network (initialization, batch order) on randomly permuted labels does "
                      "(paired by seed; Student t over seeds)",
            statistic="silhouette of digits 0–4 (tangent-feature distances), θ_T − θ₀",
            theta_0=per_seed["seen_init"], at_theta_T=per_seed["seen_final"],
            null_what="its θ_T − θ₀ silhouette of digits 0–4"),
        "unseen_digits_cluster_less": dict(
            statement="training separates the seen digits (0–4) more than the unseen ones (5–9): the seen − unseen "
                      "silhouette gap at θ_T minus the same gap at θ₀ > 0 (difference in differences), and more than "
                      "for the same network (initialization, batch order) trained on randomly permuted labels (paired "
                      "by seed; Student t over seeds)",
            statistic="(seen − unseen silhouette) at θ_T minus at θ₀",
            theta_0=gap_init, at_theta_T=gap_final, null_what="its seen − unseen gap at θ_T minus at θ₀"),
    }
    out = {}
    for key, sp in spec.items():
        value = over_seeds(values[key])
        theta_0 = over_seeds(sp["theta_0"])
        fields = dict(statistic=sp["statistic"], at_theta_T=float(sp["at_theta_T"].mean()), theta_0=theta_0.estimate,
                      theta_0_interval=[theta_0.low, theta_0.high])
        if null_values is None:
            out[key] = claim(sp["statement"], False, value.estimate, value, measured=False, why=NULL_NOT_RUN_WHY,
                             baseline=baseline(None, "null model: random labels (not run)"), **fields)
            continue
        null = over_seeds(null_values[key])
        beyond = over_seeds(values[key] - null_values[key])
        out[key] = claim(
            sp["statement"], value.above(0) and beyond.above(0), value.estimate, value,
            baseline=baseline(null.estimate, "null model (random labels): the same network, initialization and batch "
                              f"order trained on randomly permuted labels of digits 0–4 ({sp['null_what']})", null),
            null_model="the same network, initialization and batch order trained on randomly permuted labels",
            beyond_null=beyond.estimate, beyond_null_interval=[beyond.low, beyond.high], **fields)
    return out


def drawn_numbers(panels: list[dict]) -> list[dict]:
    """What :func:`~genkernel.plotting.figures.plot_tangent_embedding` draws, for the JSON: per panel (left to
    right) its ``title``, ``coords [N, 2]`` (the 2-D embedding) and ``labels [N]`` (the digits; ``seen``: the
    digits trained on, drawn as dots, the others as crosses). Returns that list."""
    return [{"title": p["title"], "coords": p["coords"], "labels": p["labels"], "seen": list(p["seen"])} for p in panels]


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    timer = Timer()
    args = parse(make_parser(__doc__.splitlines()[0]), argv)
    s = pick(
        args.mode,
        full=dict(per_class=60, width=16, steps=1500, batch=64, lr=2e-3, train_limit=None, seeds=5),
        quick=dict(per_class=30, width=16, steps=300, batch=64, lr=2e-3, train_limit=None, seeds=3),
        smoke=dict(per_class=4, width=4, steps=5, batch=8, lr=2e-3, train_limit=40, seeds=2),
    )
    device = args.torch_device
    # 1. Data.
    x_train, y_train = load_digits_images(size=16, classes=SEEN, split="train", seed=args.seed)
    if s["train_limit"]:
        x_train, y_train = x_train[: s["train_limit"]], y_train[: s["train_limit"]]
    x_emb, y_emb = load_digits_images(size=16, per_class=s["per_class"], split="test", seed=args.seed)
    labels = y_emb.numpy()
    # 2. Kernels at θ_0 and θ_T, one independent training run per seed (seed 0 also draws the figure).
    runs = [train_once(args.seed + r, s, x_train, y_train, x_emb, y_emb, labels, device) for r in range(s["seeds"])]
    nulls = [train_once(args.seed + r, s, x_train, y_train, x_emb, y_emb, labels, device, random_labels=True)
             for r in range(s["seeds"])]  # the null model: the same runs on randomly permuted labels
    first = runs[0]
    d_init, d_final, seen_acc, history, sil = first["d_init"], first["d_final"], first["seen_acc"], first["history"], first["sil"]
    seen_sel = np.isin(labels, SEEN)
    coords_init, method = embed_2d(d_init[np.ix_(seen_sel, seen_sel)], seed=args.seed)
    coords_seen, _ = embed_2d(d_final[np.ix_(seen_sel, seen_sel)], seed=args.seed)
    coords_all, _ = embed_2d(d_final, seed=args.seed)
    results = {"embedding_method": method, "num_train": len(x_train), "seen_test_accuracy": seen_acc,
               "final_train_loss": history[-1] if history else None, "seeds": [args.seed + r for r in range(s["seeds"])]}
    for (when, group), v in sil.items():
        results[f"silhouette_{group}_{when}"] = float(v.mean())
        results[f"silhouette_{group}_{when}_per_seed"] = [float(r["sil"][(when, group)].mean()) for r in runs]
        results[f"silhouette_{group}_{when}_random_labels_per_seed"] = [float(n["sil"][(when, group)].mean()) for n in nulls]
    results["seen_test_accuracy_random_labels_per_seed"] = [n["seen_acc"] for n in nulls]
    claims = claims_from_runs(runs, nulls)  # 4. Claims: changes from θ_0 against the random-label null, per seed.
    panels = [
        {"coords": coords_init, "labels": labels[seen_sel], "seen": SEEN,
         "title": f"initialization, digits 0–4\nsilhouette {results['silhouette_seen_init']:.3f}"},
        {"coords": coords_seen, "labels": labels[seen_sel], "seen": SEEN,
         "title": f"after training on 0–4 ({s['steps']} steps)\nsilhouette {results['silhouette_seen_final']:.3f}"},
        {"coords": coords_all, "labels": labels, "seen": SEEN,
         "title": f"after training, all digits\nsilhouette seen {results['silhouette_seen_final']:.3f}, "
                  f"unseen {results['silhouette_unseen_final']:.3f}"},
    ]
    results["drawn"] = drawn_numbers(panels)  # the figure's panels: the first seed's run
    fig = plot_tangent_embedding(panels, method=method, seed=first["seed"])
    return finish(NAME, args, fig, results, claims, {**s, "embedding_method": method}, timer)


if __name__ == "__main__":
    main()
