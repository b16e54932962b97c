"""The optimizer-weighted gradient kernel (docs/optimizers.md, "Adam and AdamW").

Under Adam/AdamW/RMSprop a step's update is the gradient preconditioned by P_k = diag(1/(sqrt(v̂_k)+ε)),
so the kernel through which a training example moves a probe becomes J(x) P_k J(x')ᵀ instead of
J(x) J(x')ᵀ. These helpers read P_k from the optimizer's own state and evaluate that kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapter import trainable_parameters
from ..core.engine.kernels import normalize_kernel, tangent_features

__all__ = ["adaptive_preconditioner", "preconditioned_kernel"]


def adaptive_preconditioner(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """``[P]`` float64 diagonal P = 1/(sqrt(v̂)+ε) of an Adam/AdamW (v̂ = v/(1−β2^t)) or RMSprop
    (v̂ = v, no bias correction; centered not supported) optimizer, flattened in the order of
    :func:`tangent_features` (the model's trainable parameters).

    Raises:
        TypeError: for other optimizers; ValueError before the first step (no second moment yet).
    """
    params = trainable_parameters(model)
    by_id = {id(p): (group, optimizer.state.get(p, {})) for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for name, p in params.items():
        if id(p) not in by_id:
            raise ValueError(f"parameter '{name}' is not trained by this optimizer")
        group, state = by_id[id(p)]
        if isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam in recent PyTorch
            if "exp_avg_sq" not in state:
                raise ValueError("the optimizer has not taken a step yet: no second moment to precondition with")
            step = float(state["step"])
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            v_hat = v.to(torch.float64) / (1 - group["betas"][1] ** step)
        elif isinstance(optimizer, torch.optim.RMSprop):
            if group.get("centered"):
                raise ValueError("centered RMSprop is not supported here")
            if "square_avg" not in state:
                raise ValueError("the optimizer has not taken a step yet: no second moment to precondition with")
            v_hat = state["square_avg"].to(torch.float64)
        else:
            raise TypeError(f"{type(optimizer).__name__} has no diagonal preconditioner; use Adam, AdamW or RMSprop")
        pieces.append((1.0 / (v_hat.sqrt() + group["eps"])).reshape(-1))
    return torch.cat(pieces).cpu()


def preconditioned_kernel(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, preconditioner: torch.Tensor | None,
                          *, normalize: bool = False) -> torch.Tensor:
    """``[M, N]`` float64 kernel Σ_outputs J(x1) P J(x2)ᵀ (``preconditioner`` None: P = I, the plain kernel).

    With ``normalize``: divided by sqrt(k(x, x) k(x', x')) under the same P.
    """
    f1 = tangent_features(model, x1).to(torch.float64).cpu()  # [M, d, P]
    f2 = tangent_features(model, x2).to(torch.float64).cpu()
    p = torch.ones(f1.shape[-1], dtype=torch.float64) if preconditioner is None else preconditioner.to(torch.float64).cpu()
    if p.shape != (f1.shape[-1],):
        raise ValueError(f"preconditioner must be a [P] vector with P={f1.shape[-1]}, got {tuple(p.shape)}")
    k = torch.einsum("mdp,p,ndp->mn", f1, p, f2)
    if not normalize:
        return k
    d1 = torch.einsum("mdp,p,mdp->m", f1, p, f1)
    d2 = torch.einsum("ndp,p,ndp->n", f2, p, f2)
    return normalize_kernel(k, d1, d2)
