"""Recipe 4 (paper Figure 3): a linear SVM on learned tangent features against an RBF-kernel SVM
on the raw inputs, on the isotropic circle task and the anisotropic ellipse task.

Steps:
  1. Data: ``ellipse_task(a=1, level=0.9)`` (circle: x1² + x2² ≤ 0.9 against = 1) and
     ``ellipse_task(a=100, level=0.9)`` (100 x1² + x2² ≤ 0.9 against = 1); train and test sets.
  2. Train a tanh MLP with the logistic loss (Adam, full batch); tangent features
     φ(x) = ∇_θ f(x; θ_T) (DESIGN.md section 2, "Tangent features").
  3. Fit a linear SVM on φ(x_n) and an RBF SVM (gamma="scale") on x_n; test accuracies and the
     decision regions on a grid.
  4. Claims: on each task, the tangent-feature SVM is at least as accurate as the RBF SVM: the
     paired bootstrap interval over test points of its accuracy minus the RBF SVM's lies above
     −MARGIN (non-inferiority); ``strictly_better`` when it lies above 0. The network alone is
     reported beside them.
"""

from __future__ import annotations

import numpy as np
import torch

from genkernel.data import ellipse_task
from genkernel.plotting.figures import plot_tangent_svm
from genkernel.stats import Interval, bootstrap_interval
from genkernel.supervised import SupervisedTrainer, logistic_loss, mlp
from genkernel.supervised.svm import fit_rbf_svm, fit_tangent_svm

from ..common import Timer, claim, finish, make_parser, parse, pick

NAME = "tangent_svm"
TASKS = {"circle": 1.0, "ellipse": 100.0}
MARGIN = 0.01  # non-inferiority margin of the accuracy difference (one percentage point)


def run_task(task: str, a: float, s: dict, seed: int, device) -> tuple[dict, dict, Interval]:
    """Trains the network and both SVMs on one task; returns its results, its figure panel and
    the interval of the tangent-feature SVM's test accuracy minus the RBF SVM's."""
    x, y = ellipse_task(s["n_train"], a=a, level=0.9, seed=seed)
    xt, yt = ellipse_task(s["n_test"], a=a, level=0.9, seed=seed + 10_000)
    x, y, xt = x.to(device), y.to(device), xt.to(device)
    torch.manual_seed(seed)
    model = mlp(2, [s["width"]] * 2, 1, act="tanh").to(device)
    trainer = SupervisedTrainer(model, torch.optim.Adam(model.parameters(), lr=s["lr"]), logistic_loss,
                                batch_size=s["n_train"], seed=seed)
    history = trainer.fit(x, y, steps=s["steps"])
    ytn = yt.numpy()
    with torch.no_grad():
        net_correct = (np.sign(model(xt).cpu().numpy().reshape(-1)) == ytn)
    tsvm = fit_tangent_svm(model, x, y, C=s["C"])
    rbf = fit_rbf_svm(x, y, C=s["C"])
    t_correct = tsvm.svm.predict(tsvm.features(xt)) == ytn
    r_correct = rbf.predict(xt.cpu().double().numpy()) == ytn
    diff = (t_correct.astype(float) - r_correct.astype(float))
    interval = bootstrap_interval(diff, np.mean, seed=seed)  # BCa, over test points (paired: one diff each)
    # decision regions on a grid covering the data
    sx = 1.15 / np.sqrt(a)
    gx, gy = np.meshgrid(np.linspace(-sx, sx, s["grid"]), np.linspace(-1.15, 1.15, s["grid"]))
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32, device=device)
    panel = {
        "grid_x": gx, "grid_y": gy,
        "tangent_scores": tsvm.decision_function(grid).reshape(gx.shape),
        "rbf_scores": rbf.decision_function(grid.cpu().double().numpy()).reshape(gx.shape),
        "x_test": xt.cpu(), "y_test": yt, "tangent_acc": float(t_correct.mean()), "rbf_acc": float(r_correct.mean()),
    }
    result = {
        "tangent_svm_test_accuracy": float(t_correct.mean()),
        "rbf_svm_test_accuracy": float(r_correct.mean()),
        "network_test_accuracy": float(net_correct.mean()),
        "tangent_minus_rbf": interval.estimate,
        "tangent_minus_rbf_interval": [interval.low, interval.high],
        "tangent_minus_rbf_n": interval.n, "tangent_minus_rbf_method": interval.method,
        "tangent_svm_train_accuracy": tsvm.accuracy(x, y),
        "rbf_svm_train_accuracy": float((rbf.predict(x.cpu().double().numpy()) == y.cpu().numpy()).mean()),
        "final_train_loss": history[-1],
        "num_tangent_features": int(tsvm.svm.coef_.shape[1]),
    }
    return result, panel, interval


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    timer = Timer()
    args = parse(make_parser(__doc__.splitlines()[0]), argv)
    s = pick(
        args.mode,
        full=dict(n_train=1000, n_test=2000, width=64, lr=1e-2, steps=2000, C=1.0, grid=150),
        quick=dict(n_train=400, n_test=1000, width=64, lr=1e-2, steps=800, C=1.0, grid=80),
        smoke=dict(n_train=40, n_test=40, width=8, lr=1e-2, steps=20, C=1.0, grid=12),
    )
    results, panels, claims = {}, {}, {}
    for task, a in TASKS.items():
        results[task], panels[task], difference = run_task(task, a, s, args.seed, args.torch_device)
        claims[f"{task}_tangent_svm_at_least_rbf"] = claim(
            f"{task}: linear SVM on tangent features is at least as accurate as an RBF SVM on raw inputs "
            f"(accuracy difference; its paired bootstrap interval over test points lies above −{MARGIN:g}, "
            "strictly_better when it lies above 0)",
            difference.above(-MARGIN), difference.estimate, difference,
            margin=MARGIN, strictly_better=difference.above(0),
        )
    fig = plot_tangent_svm(panels)
    return finish(NAME, args, fig, results, claims, s, timer)


if __name__ == "__main__":
    main()
