"""Recipe 8 (generalization and the null space): the path-kernel integral operator's spectrum,
target energy, alignment, and each test point's error against the part of its kernel feature
outside the span the operator can reach.

Steps (DESIGN.md section 2, "Generalization and the null space"):
  1. Data: ``regression_1d("sin")`` training inputs on [−π, π]; test points on a wider grid
     [−1.5π, 1.5π] (inside and outside the training range).
  2. Train a tanh MLP with full-batch gradient descent; ``CheckpointKernels`` records the gradient
     kernel over training inputs and test probes at S stated checkpoints (geometrically spaced:
     training changes fastest early); K^p = Σ_k η_k k_{θ_k}, η_k = step size × steps it stands for.
  3. ``eigendecompose`` the N×N Gram matrix; operator spectrum λ_i / N; ``target_energy_curve``;
     kernel–target alignment; ``nystrom_extend`` of the top eigenfunctions to the test points;
     r(x) = 1 − k_xᵀ (K + λI)⁻¹ k_x / k(x, x) (``out_of_span_residual``).
  4. Claims: the checkpoint path kernel, as a kernel machine with the loss weights
     w_n = 2(f(x_n) − y_n) at each checkpoint, reproduces the network's change at the test points
     (Domingos, left Riemann sum; a single number, so its interval is the point); the test error |f(x) − y(x)| increases with r(x): Spearman ρ > 0 with its bootstrap
     interval (``spearman_with_interval``).
"""

from __future__ import annotations

import math

import torch

from genkernel.analysis.kernel_stats import centered_alignment
from genkernel.analysis.spectral import (
    eigendecompose,
    kernel_target_alignment,
    nystrom_extend,
    operator_eigenvalues,
    out_of_span_residual,
    spearman_with_interval,
    target_energy_curve,
)
from genkernel.data import regression_1d
from genkernel.plotting.figures import plot_null_space
from genkernel.supervised import SupervisedTrainer, mlp, mse_loss
from genkernel.supervised.checkpoint_kernels import CheckpointKernels, geometric_checkpoints

from ..common import Timer, claim, finish, make_parser, parse, pick

NAME = "null_space"


def main(argv=None) -> dict:
    """Runs the experiment on the command line ``argv``; returns the JSON payload it wrote (OUT/NAME.json)."""
    timer = Timer()
    args = parse(make_parser(__doc__.splitlines()[0]), argv)
    s = pick(
        args.mode,
        full=dict(n_train=64, n_test=300, width=64, lr=0.05, steps=5000, checkpoints=50, extent=1.5, top_k=10),
        quick=dict(n_train=48, n_test=150, width=64, lr=0.05, steps=2000, checkpoints=20, extent=1.5, top_k=10),
        smoke=dict(n_train=10, n_test=12, width=8, lr=0.05, steps=20, checkpoints=4, extent=1.5, top_k=3),
    )
    dtype = torch.float64
    device = args.torch_device
    # 1. Data.
    x, y = regression_1d("sin", s["n_train"], seed=args.seed, dtype=dtype)
    x_test = torch.linspace(-s["extent"] * math.pi, s["extent"] * math.pi, s["n_test"], dtype=dtype)[:, None]
    y_test = torch.sin(x_test)
    x, y, x_test = x.to(device), y.to(device), x_test.to(device)
    # 2. Train with checkpoint kernels.
    torch.manual_seed(args.seed)
    model = mlp(1, [s["width"]] * 2, 1, act="tanh").to(dtype).to(device)
    at = geometric_checkpoints(s["steps"], s["checkpoints"])
    recorder = CheckpointKernels(x, x_test, at=at, steps=s["steps"])
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=s["lr"]), mse_loss,
                                batch_size=s["n_train"], seed=args.seed, callbacks=[recorder])
    history = trainer.fit(x, y, steps=s["steps"])
    gram, cross, self_k = recorder.path_kernel()
    with torch.no_grad():
        pred = model(x_test).cpu().reshape(-1)
    error = (pred - y_test.cpu().reshape(-1)).abs()
    # Domingos check: the checkpoint path kernel as a kernel machine, against the real change.
    y_cpu = y.cpu().to(torch.float64)
    machine = recorder.kernel_machine_change(lambda f: 2.0 * (f - y_cpu)).reshape(-1)
    real = pred.to(torch.float64) - recorder.probe_outputs[0].reshape(-1)
    domingos_error = float((machine - real).norm() / real.norm())
    # 3. Spectral analysis.
    system = eigendecompose(gram)
    spectrum = operator_eigenvalues(system)
    energy = target_energy_curve(system, y.cpu())
    k = min(s["top_k"], s["n_train"])
    phi = nystrom_extend(system, cross, k=min(3, k))
    residual = out_of_span_residual(gram, cross, self_k).clamp_min(1e-16)
    rho, interval = spearman_with_interval(residual, error, seed=args.seed)
    inside = (x_test.cpu().reshape(-1).abs() <= math.pi).numpy()
    results = {
        "checkpoints": recorder.checkpoints, "checkpoint_weights": recorder.weights,
        "operator_spectrum": spectrum, "top_k": k, "top_k_target_energy": float(energy[k - 1]),
        "target_energy_curve": energy,
        "kernel_target_alignment": kernel_target_alignment(gram, y.cpu()),
        "centered_alignment": centered_alignment(gram, y.cpu()),
        "spearman_residual_vs_error": rho, "spearman_interval": list(interval),
        "out_of_span_residual": residual, "test_error": error,
        "mean_residual_inside_range": float(residual[inside].mean()),
        "mean_residual_outside_range": float(residual[~inside].mean()) if (~inside).any() else None,
        "mean_error_inside_range": float(error[inside].mean()),
        "mean_error_outside_range": float(error[~inside].mean()) if (~inside).any() else None,
        "domingos_relative_error": domingos_error,
        "final_train_mse": history[-1], "min_raw_eigenvalue": system.min_raw_eigenvalue,
    }
    # 4. Claim.
    claims = {
        "error_grows_with_out_of_span_part": claim(
            "test error rises with the out-of-span part r(x) of the path kernel (Spearman ρ > 0, bootstrap interval)",
            interval[0] > 0, rho, interval,
        ),
        "checkpoint_path_kernel_reproduces_change": claim(
            "the path kernel over the stated checkpoints, used as a kernel machine (Domingos), reproduces the "
            "trained network's change at the test points within 10% (‖machine − real‖ / ‖real‖)",
            domingos_error < 0.1, domingos_error, (domingos_error, domingos_error),
        ),
    }
    fig = plot_null_space(spectrum, energy, x.cpu().reshape(-1), x_test.cpu().reshape(-1), y_test.reshape(-1), pred,
                          residual, error, rho=rho, interval=interval, eigenfunctions=phi)
    return finish(NAME, args, fig, results, claims, {**s, "checkpoint_steps": at}, timer)


if __name__ == "__main__":
    main()
