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
from torch.func import grad, jvp

from ..core.adapter import call_with, check_whole_parameters
from ..core.engine.kernels import REPEAT_RTOL, in_full_precision


@in_full_precision
def loss_sharpness(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, *, tol: float = 1e-10, max_iterations: int = 1000) -> float:
    """λ_max of the Hessian of the mean loss ``loss_fn(model(x), y).mean()`` with respect to the
    model's trainable parameters (buffers held fixed; the model in its current mode).

    Args:
        model: called as ``model(x)``; must give the same loss in every pass (no dropout in training
            mode: refused) and must not update buffers in its forward (BatchNorm in training mode:
            refused). Evaluated in its own precision (autocast and TF32 off, as
            :func:`~genkernel.core.adapter.full_precision`).
        loss_fn: per-example losses ``[B]`` from outputs and targets (``genkernel.supervised.mse_loss``);
            another shape is refused.
        x, y: the training batch (the whole set for full-batch gradient descent).
        tol, max_iterations: the Lanczos solver's relative tolerance and iteration limit.

    Returns:
        The largest (algebraic) eigenvalue, a float (0.0 for a loss whose Hessian is zero).

    Raises:
        ValueError: bad ``tol`` or ``max_iterations``; losses not of shape ``[B]``; a loss or
            Hessian-vector product that is NaN or infinite; a model whose passes differ (randomness)
            or that updates buffers.
        RuntimeError: the Lanczos solver did not converge.
    """
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0 (0: machine precision), got {tol!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters: there is no Hessian to measure")
    check_whole_parameters(params, model)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    def mean_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        # call_with, not torch.func.functional_call: functional_call (torch 2.14) leaves a module registered
        # under two names holding a plain tensor in place of its parameter
        losses = loss_fn(call_with(model, p, (x,)), y)
        # As the trainer's step: a [B, d] loss (reduction='none' over d outputs) averaged over B·d
        # would scale the Hessian by 1/d, silently (a halved λ_max for two outputs).
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or (batch is not None and len(losses) != batch):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return per-example losses of shape [{'B' if batch is None else batch}], got "
                f"{shape}; use reduction='none' and average over non-batch dimensions only"
            )
        return losses.mean()

    gradient = grad(mean_loss)

    def hessian_times(vector: np.ndarray) -> np.ndarray:
        flat = torch.as_tensor(np.ascontiguousarray(vector).reshape(-1), dtype=torch.float64)
        tangent = {n: t.reshape(s).to(dtype=params[n].dtype, device=params[n].device)  # each parameter's own
                   for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        try:
            _, product = jvp(gradient, (params,), (tangent,))
        except RuntimeError as error:
            if "mutate a captured Tensor" not in str(error):
                raise
            raise ValueError(
                f"{type(model).__name__}'s forward updates a buffer (BatchNorm's running statistics in training "
                "mode): call model.eval() first, or use a model whose forward leaves its buffers alone"
            ) from error
        out = torch.cat([product[n].reshape(-1) for n in names]).detach().double().cpu().numpy()
        if not np.all(np.isfinite(out)):
            loss = float(mean_loss(params))
            raise ValueError(
                f"the Hessian-vector product has NaN or infinite entries (mean loss {loss!r}): check x, y and "
                "the parameters for NaN or infinite values"
            )
        return out

    total = sum(sizes)
    start = np.ones(1) if total == 1 else np.random.default_rng(0).standard_normal(total)  # a fixed start
    first = hessian_times(start)
    # A model that draws random numbers (dropout in training mode) gives another Hessian in every
    # product, and Lanczos on such an operator returns a number with no meaning (measured: 6.82 and
    # 6.80 for two calls, 6.43 in eval mode). Two products on one vector must agree up to rounding.
    again = hessian_times(start)
    rtol = REPEAT_RTOL.get(params[names[0]].dtype, 1e-2)
    if np.linalg.norm(first - again) > rtol * np.linalg.norm(first):
        raise ValueError(
            f"{type(model).__name__} gives another Hessian-vector product in every pass (dropout in training mode, "
            "or other randomness): call model.eval() first, or remove the randomness from the forward"
        )
    if total == 1:
        return float(first[0])
    if not np.any(first):
        # H v = 0 for a random v: the Hessian is zero (a loss linear in the parameters), and ARPACK
        # cannot build a Krylov space from it ("starting vector is zero").
        return 0.0
    operator = LinearOperator((total, total), matvec=hessian_times, dtype=np.float64)
    try:
        values = eigsh(operator, k=1, which="LA", tol=tol, maxiter=max_iterations, v0=start,
                       return_eigenvectors=False)
    except ArpackNoConvergence as error:
        raise RuntimeError(f"the Lanczos solver did not converge in {max_iterations} iterations; raise "
                           "max_iterations or tol") from error
    except ArpackError as error:
        raise RuntimeError(f"the Lanczos solver failed ({error}); raise max_iterations or tol") from error
    return float(values[0])


__all__ = ["loss_sharpness"]
