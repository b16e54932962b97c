"""Sharpness: the largest eigenvalue of the training loss's Hessian, and what it says about a step size.

Full-batch gradient descent with step η on a loss L is stable near a minimum only while
η λ_max(∇²L) < 2; trained at a fixed η, the sharpness rises until it hovers at that edge
(Cohen et al., "Gradient descent on neural networks typically occurs at the edge of stability",
2021). There the trajectory amplifies rounding: two runs whose targets differ by 1e-12 end apart
(measured on the null-space recipe's tanh MLP at η = 0.05: its kernel-machine error went from 48.7
to 17.1 for one seed), so numbers computed from such a run change from machine to machine. A
recipe that reports η λ_max below 2 shows it trained in the stable regime.

λ_max comes from scipy's Lanczos solver (:func:`scipy.sparse.linalg.eigsh`) on Hessian-vector
products by forward-over-reverse AD (:mod:`torch.func`); the Hessian is never formed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp


def loss_sharpness(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, *, tol: float = 1e-10, max_iterations: int = 1000) -> float:
    """λ_max of the Hessian of the mean loss ``loss_fn(model(x), y).mean()`` with respect to the
    model's trainable parameters (buffers held fixed; the model in its current mode).

    Args:
        model: called as ``model(x)``; must treat examples independently of the pass (no dropout in
            training mode).
        loss_fn: per-example losses ``[B]`` from outputs and targets (``genkernel.supervised.mse_loss``).
        x, y: the training batch (the whole set for full-batch gradient descent).
        tol, max_iterations: the Lanczos solver's relative tolerance and iteration limit.

    Returns:
        The largest (algebraic) eigenvalue, a float.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters: there is no Hessian to measure")
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    reference = params[names[0]]

    def mean_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y).mean()

    gradient = grad(mean_loss)

    def hessian_times(vector: np.ndarray) -> np.ndarray:
        flat = torch.as_tensor(np.ascontiguousarray(vector).reshape(-1), dtype=reference.dtype, device=reference.device)
        tangent = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        _, product = jvp(gradient, (params,), (tangent,))
        return torch.cat([product[n].reshape(-1) for n in names]).detach().double().cpu().numpy()

    total = sum(sizes)
    if total == 1:
        return float(hessian_times(np.ones(1))[0])
    operator = LinearOperator((total, total), matvec=hessian_times, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(total)  # a fixed start: the same answer every call
    try:
        values = eigsh(operator, k=1, which="LA", tol=tol, maxiter=max_iterations, v0=start,
                       return_eigenvectors=False)
    except ArpackNoConvergence as error:
        raise RuntimeError(f"the Lanczos solver did not converge in {max_iterations} iterations; raise "
                           "max_iterations or tol") from error
    return float(values[0])


__all__ = ["loss_sharpness"]
