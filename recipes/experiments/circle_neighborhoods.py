"""Figure 1: evolving neighbourhoods under the normalized gradient kernel (circle task).

Binary data, +1 on the circle x1² + x2² = 1 and −1 inside x1² + x2² <= 0.8; an MLP trained by
plain SGD with the exact path-kernel ledger attached (groups: the two classes). For three fixed
anchors, the k nearest training points in Euclidean space and under the normalized gradient
kernel k̂_t at initialization, mid-training and the end. Purity (share of the majority label)
is measured for the three anchors and for many random anchors; the claims rest on independent
training runs (seeds: data, initialization and batch order), each summarized by its mean over the
random anchors, and compare θ_T with θ₀ (the same network before training); the rise from θ₀ is
judged against the null model, the same runs trained on randomly permuted labels (paired by seed).

    python -m recipes.experiments.circle_neighborhoods [--quick] [--out-dir figures] [--seed 0]

JSON: ``results["drawn"]`` holds what the figure draws (:func:`drawn_numbers`): the training points and labels,
the decision grid's axis and the network's scores on it (121 × 121 floats, the decision regions and their
boundary), and each neighbourhood panel's indices into the points (3 anchors × k).
"""

from __future__ import annotations

import numpy as np
import torch

from genkernel import PathKernelTracker, gradient_kernel
from genkernel.analysis.neighbors import euclidean_neighbors, kernel_neighbors, label_purity
from genkernel.data import circle_task
from genkernel.plotting.core import circle_neighborhoods_figure
from genkernel.stats import Interval
from genkernel.supervised import LedgerCallback, SupervisedTrainer, mlp, mse_loss

from .. import common

NAME = "circle_neighborhoods"
ANCHORS = [(0.0, 0.95), (0.55, 0.55), (-0.3, -0.2)]


def drawn_numbers(panels: dict, grid: torch.Tensor) -> dict:
    """What :func:`~genkernel.plotting.core.circle_neighborhoods_figure` draws of ``panels``, for the JSON:
    ``points [N, 2]``, ``labels [N]`` (±1), ``anchors [3, 2]``, ``grid [G]`` (the decision grid's axis: x and y
    alike) with ``scores [G, G]`` (row i at y = grid[i]; the regions are their sign), and ``neighbors``: panel
    title → ``[3, k]`` indices into ``points``. Returns that dict."""
    return {"points": panels["points"], "labels": panels["labels"], "anchors": panels["anchors"], "grid": grid,
            "scores": panels["decision"][2],
            "neighbors": {title: idx for title, idx, _ in panels["neighborhoods"]}}


def summary(interval: Interval) -> dict:
    """``{"mean", "interval": [low, high], "n", "method"}`` of a mean's interval, for the results."""
    return {"mean": interval.estimate, "interval": [interval.low, interval.high], "n": interval.n, "method": interval.method}


def stage_neighborhoods(model, anchors, points, labels, k):
    """Neighbour indices ``[A, k]`` and purity ``[A]`` under the normalized gradient kernel."""
    kernel = gradient_kernel(model, anchors, points, normalize=True)
    idx = kernel_neighbors(kernel, k)
    return idx, label_purity(idx, labels)


def replicate(seed: int, settings: dict, device, dtype, *, random_labels: bool = False) -> dict:
    """One more independent run (data, initialization, batch order from ``seed``), without the
    ledger: mean purity over random anchors under k̂ at θ₀ and θ_T and under Euclidean distance.

    ``random_labels=True``: the null model, the same run trained on randomly permuted labels (purity
    is still measured against the true labels)."""
    points, labels = circle_task(settings["n_train"], seed=seed)
    points, labels = points.to(device, dtype), labels.to(device, dtype)
    targets = common.permuted_labels(labels, seed) if random_labels else labels
    torch.manual_seed(seed)
    model = mlp(2, [settings["hidden"]] * 2, 1, act="tanh").to(device, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    anchors = (torch.rand(settings["random_anchors"], 2, generator=gen, dtype=dtype) * 2.4 - 1.2).to(device)
    k = settings["k"]
    init = stage_neighborhoods(model, anchors, points, labels, k)[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
    SupervisedTrainer(model, optimizer, mse_loss, batch_size=settings["batch"], seed=seed).fit(
        points, targets[:, None], steps=settings["steps"])
    end = stage_neighborhoods(model, anchors, points, labels, k)[1]
    euclid = label_purity(euclidean_neighbors(anchors, points, k), labels)
    return {"seed": seed, "kernel_init": float(init.mean()), "kernel_end": float(end.mean()), "euclidean": float(euclid.mean())}


NULL_NOT_RUN_WHY = ("the random-label null model was not run: a rise in purity from θ₀ is what any training may "
                    "show (the claim is that training on the labels raises it more than training on randomly "
                    "permuted labels does)")


def claims_from_runs(runs: list[dict], residual: float, nulls: list[dict] | None = None) -> tuple[dict, dict]:
    """The claims from one entry per independent run (``{"seed", "kernel_init", "kernel_end", "euclidean"}``:
    mean purities over random anchors), the ledger's relative residual and the random-label null
    model's runs (:func:`replicate` with ``random_labels=True``, the same seeds in the same order);
    returns ``(claims, summaries for the results)``.

    ``kernel_neighborhoods_sharpen`` is judged against the null model's rise, paired by seed: its
    baseline is the null's θ_T − θ₀ purity, and it is held when the rise and the rise minus the
    null's (per seed) both lie above 0 (Student t over seeds). Without ``nulls`` it is not measured."""
    rise = common.over_seeds([r["kernel_end"] - r["kernel_init"] for r in runs])
    over_euclid = common.over_seeds([r["kernel_end"] - r["euclidean"] for r in runs])
    over_euclid_init = common.over_seeds([r["kernel_init"] - r["euclidean"] for r in runs])
    init = common.over_seeds([r["kernel_init"] for r in runs])
    end_purity = float(np.mean([r["kernel_end"] for r in runs]))
    statement = ("training makes kernel neighbourhoods more label-pure: mean purity over random anchors at θ_T minus at "
                 "θ₀ > 0, and more than for the same runs (data, initialization, batch order) trained on randomly "
                 "permuted labels (paired by seed; Student t over seeds)")
    stat = "mean k̂-neighbourhood purity, θ_T − θ₀"
    fields = dict(statistic=stat, at_theta_T=end_purity, theta_0=init.estimate, theta_0_interval=[init.low, init.high])
    if nulls is None:
        sharpen = common.claim(statement, False, rise.estimate, rise, measured=False, why=NULL_NOT_RUN_WHY,
                               baseline=common.baseline(None, "null model: random labels (not run)"), **fields)
    else:
        if [n.get("seed") for n in nulls] != [r.get("seed") for r in runs]:
            raise ValueError("nulls must be replicate(..., random_labels=True) runs with the same seeds, in the same "
                             f"order, as runs: got seeds {[n.get('seed') for n in nulls]} for {[r.get('seed') for r in runs]}")
        null_rises = [n["kernel_end"] - n["kernel_init"] for n in nulls]
        null = common.over_seeds(null_rises)
        beyond = common.over_seeds([r["kernel_end"] - r["kernel_init"] - b for r, b in zip(runs, null_rises)])
        sharpen = common.claim(
            statement, rise.above(0) and beyond.above(0), rise.estimate, rise,
            baseline=common.baseline(null.estimate, "null model (random labels): the same runs trained on randomly permuted labels "
                                     "(its θ_T − θ₀ purity, against the true labels)", null),
            null_model="the same data, initialization and batch order trained on randomly permuted labels",
            beyond_null=beyond.estimate, beyond_null_interval=[beyond.low, beyond.high], **fields)
    claims = {
        "kernel_neighborhoods_sharpen": sharpen,
        # "training made them so" is the sharpening claim's rule: a rise from θ₀ beyond the random-label null's
        # (any training raises purity: the plain rise alone is passed by a null model that rises as much)
        "kernel_purer_than_euclidean": common.claim(
            "after training, kernel neighbourhoods are purer than Euclidean ones, and training on the labels made them "
            "so: purity at θ_T minus Euclidean > 0, and the rise from θ₀ > 0 and beyond the random-label null's "
            "(Student t over seeds)",
            None if nulls is None else over_euclid.above(0) and bool(sharpen["held"]), over_euclid.estimate, over_euclid,
            statistic="mean purity, k̂ at θ_T − Euclidean",
            baseline=common.baseline(over_euclid_init.estimate, "θ₀: k̂ at θ₀ − Euclidean", over_euclid_init),
            rise_from_theta_0=rise.estimate,
            **({"measured": False, "why": NULL_NOT_RUN_WHY} if nulls is None else
               {"beyond_null": sharpen["beyond_null"], "beyond_null_interval": sharpen["beyond_null_interval"]})),
        "ledger_exact": common.claim(
            "the ledger adds up to the real output change (relative residual < 1e-3)",
            residual < 1e-3, residual,
            statistic="relative residual ‖R‖/‖Δf‖ of the class ledger (Simpson rule)",
            baseline=common.baseline(1.0, "no ledger: predicting no change")),
    }
    summaries = {"purity_rise_init_to_end": summary(rise), "purity_end_minus_euclidean": summary(over_euclid),
                 "purity_init_minus_euclidean": summary(over_euclid_init)}
    if nulls is not None:
        summaries["purity_rise_random_labels"] = summary(null)
    return claims, summaries


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    parser = common.make_parser(__doc__.splitlines()[0])
    args = common.parse(parser, argv)
    timer = common.Timer()
    settings = common.pick(
        args.mode,
        full=dict(n_train=1000, hidden=64, steps=3000, batch=32, lr=0.05, k=100, random_anchors=300, probes=64, seeds=5),
        quick=dict(n_train=600, hidden=64, steps=800, batch=32, lr=0.05, k=100, random_anchors=150, probes=32, seeds=3),
        smoke=dict(n_train=120, hidden=16, steps=20, batch=16, lr=0.05, k=20, random_anchors=20, probes=8, seeds=2),
    )
    device, dtype = args.torch_device, torch.float64

    # 1. Data and model.
    points, labels = circle_task(settings["n_train"], seed=args.seed)
    points, labels = points.to(device, dtype), labels.to(device, dtype)
    torch.manual_seed(args.seed)
    model = mlp(2, [settings["hidden"]] * 2, 1, act="tanh").to(device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
    anchors = torch.tensor(ANCHORS, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    random_anchors = (torch.rand(settings["random_anchors"], 2, generator=gen, dtype=dtype) * 2.4 - 1.2).to(device)
    probes = torch.cat([anchors, random_anchors[: settings["probes"] - len(ANCHORS)]])
    k = settings["k"]

    # 2. Neighbourhoods in input space and under k̂ at initialization.
    euclid = euclidean_neighbors(anchors, points, k)
    euclid_all = euclidean_neighbors(random_anchors, points, k)
    stages = {"init": stage_neighborhoods(model, torch.cat([anchors, random_anchors]), points, labels, k)}

    # 3. Train with the ledger attached (groups: class −1 → 0, class +1 → 1), pausing mid-way.
    tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=2, quadrature="simpson")
    trainer = SupervisedTrainer(model, optimizer, mse_loss, batch_size=settings["batch"], seed=args.seed,
                                callbacks=[LedgerCallback(tracker, (labels > 0).long())])
    targets = labels[:, None]
    trainer.fit(points, targets, steps=settings["steps"] // 2)
    stages["mid"] = stage_neighborhoods(model, torch.cat([anchors, random_anchors]), points, labels, k)
    trainer.fit(points, targets, steps=settings["steps"] - settings["steps"] // 2)
    stages["end"] = stage_neighborhoods(model, torch.cat([anchors, random_anchors]), points, labels, k)

    # 4. Purity of the three anchors, and over the random anchors (for intervals).
    a = len(ANCHORS)
    purity = {"euclidean": label_purity(euclid, labels)}
    random_purity = {"euclidean": label_purity(euclid_all, labels)}
    for stage, (idx, pur) in stages.items():
        purity[f"kernel_{stage}"] = pur[:a]
        random_purity[f"kernel_{stage}"] = pur[a:]
    # Independent replicates: this run plus settings["seeds"] − 1 more (no ledger); one value per seed.
    runs = [{"seed": args.seed, **{key: float(random_purity[key].mean()) for key in ("kernel_init", "kernel_end", "euclidean")}}]
    runs += [replicate(args.seed + r, settings, device, dtype) for r in range(1, settings["seeds"])]
    # the null model: the same runs (data, initialization, batch order) trained on randomly permuted labels
    nulls = [replicate(args.seed + r, settings, device, dtype, random_labels=True) for r in range(settings["seeds"])]
    claims, summaries = claims_from_runs(runs, tracker.ledger.relative_residual(), nulls)
    with torch.no_grad():
        accuracy = float(((model(points)[:, 0] > 0) == (labels > 0)).double().mean())
        grid = torch.linspace(-1.3, 1.3, 121, dtype=dtype)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        scores = model(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(device)).reshape(gx.shape).cpu()
    ledger = tracker.ledger
    shares = ledger.shares()

    results = {
        "anchors": ANCHORS,
        "k": k,
        "purity": {key: value.tolist() for key, value in purity.items()},
        "random_anchor_mean_purity": {key: float(value.mean()) for key, value in random_purity.items()},
        **summaries,
        "seeds": runs,
        "seeds_random_labels": nulls,
        "purity_rose_for_each_anchor": [bool(purity["kernel_end"][i] > purity["kernel_init"][i]) for i in range(a)],
        "train_accuracy": accuracy,
        "ledger": ledger.summary(),
        "anchor_class_shares": shares.groups[:a].tolist(),
        "anchor_kappa": shares.kappa[:a].tolist(),
    }
    # 5. Figure, and the numbers it draws.
    titles = {"init": "(d) k̂ neighbours at initialization", "mid": f"(e) k̂ neighbours at step {settings['steps'] // 2}",
              "end": f"(f) k̂ neighbours at the end (step {settings['steps']})"}
    panels = {
        "points": points.cpu(), "labels": labels.cpu(), "anchors": anchors.cpu(),
        "decision": (gx, gy, scores),
        "neighborhoods": [("(c) Euclidean neighbours", euclid, purity["euclidean"])]
        + [(titles[s], stages[s][0][:a], purity[f"kernel_{s}"]) for s in ("init", "mid", "end")],
    }
    results["drawn"] = drawn_numbers(panels, grid)
    return common.finish(NAME, args, circle_neighborhoods_figure(panels), results, claims, settings, timer)


if __name__ == "__main__":
    main()
