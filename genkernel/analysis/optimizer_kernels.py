"""The optimizer-weighted gradient kernel (docs/optimizers.md, "Adam and AdamW").

Under Adam/AdamW/RMSprop a step's update is the gradient preconditioned by P_k = diag(1/(sqrt(v̂_k)+ε)),
so the kernel through which a training example moves a probe becomes J(x) P_k J(x')ᵀ instead of
J(x) J(x')ᵀ (up to the learning rate η, a common factor; with parameter groups of different
learning rates the diagonal is η_g P_k, ``adaptive_preconditioner(..., scale_by_lr=True)``). These
helpers read P_k from the optimizer's own state and evaluate that kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapter import trainable_parameters
from ..core.engine.kernels import normalize_kernel, tangent_features

__all__ = ["adaptive_preconditioner", "preconditioned_kernel"]


def adaptive_preconditioner(model: nn.Module, optimizer: torch.optim.Optimizer, *, scale_by_lr: bool = False,
                            first_moment_weight: bool = False) -> torch.Tensor:
    """``[P]`` float64 diagonal P = 1/(sqrt(v̂)+ε) of an Adam/AdamW (v̂ = v/(1−β2^t)) or RMSprop
    (v̂ = v, no bias correction; centered not supported) optimizer, flattened in the order of
    :func:`tangent_features` (the model's trainable parameters). ε, β2 and the step count t are
    each parameter's own (its group's, its state's).

    Args:
        model: the trained model; every trainable parameter must be in ``optimizer``.
        optimizer: the optimizer after at least one step.
        scale_by_lr: multiply each parameter's entries by its group's current learning rate
            (``group["lr"]``), η_g/(sqrt(v̂)+ε): the diagonal through which a gradient moves the
            parameters when the groups' learning rates differ (Adam's first-moment weight
            (1 − β1)/(1 − β1^t) is left out: a common factor while the parameters share β1 and t).
            ``group["lr"]`` is read now: call this after ``optimizer.step()`` and before
            ``scheduler.step()`` for the learning rate of the step just taken (a scheduler stepped
            in between has already set the next step's).
        first_moment_weight: multiply each Adam parameter's entries by (1 − β1)/(1 − β1^t), its own
            β1 and step count t: the weight with which the gradient of the step just taken enters
            that step's update (1 for RMSprop). Needed when it is not common to the parameters: a
            parameter that missed steps (no gradient while a branch was off) has a smaller t, and
            groups may have different β1 (measured: 0.53 against 0.18 for a layer that sat out six
            of eight steps at β1 = 0.9).

    Raises:
        TypeError: for other optimizers.
        ValueError: before the first step (no second moment yet); for a parameter that has had no
            gradient at any step (no state); when the model's parameters sit in groups with
            different learning rates and ``scale_by_lr`` is False (J P Jᵀ would weigh a group with
            a small or zero learning rate like the others); when the first-moment weight
            (1 − β1)/(1 − β1^t) differs between the model's parameters and ``first_moment_weight``
            is False.
    """
    for flag, value in (("scale_by_lr", scale_by_lr), ("first_moment_weight", first_moment_weight)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    params = trainable_parameters(model)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.RMSprop)):  # AdamW subclasses Adam in recent PyTorch
        raise TypeError(f"{type(optimizer).__name__} has no diagonal preconditioner read here; use Adam, AdamW or "
                        "RMSprop (pass the optimizer itself, not its learning-rate scheduler)")
    by_id = {id(p): (group, optimizer.state.get(p, {})) for group in optimizer.param_groups for p in group["params"]}
    moment = "exp_avg_sq" if isinstance(optimizer, torch.optim.Adam) else "square_avg"
    if not any(moment in optimizer.state.get(p, {}) for p in params.values()):
        raise ValueError("the optimizer has not taken a step yet: no second moment to precondition with")
    lrs = {}
    for name, p in params.items():
        if id(p) not in by_id:
            raise ValueError(
                f"parameter '{name}' is not trained by this optimizer; freeze it (requires_grad_(False)) if "
                "another optimizer or nothing trains it, or pass the optimizer that holds it"
            )
        lrs[name] = float(by_id[id(p)][0]["lr"])
    if not scale_by_lr and len(set(lrs.values())) > 1:
        raise ValueError(
            f"the model's parameters are in optimizer groups with different learning rates ({sorted(set(lrs.values()))}): "
            "the kernel of a step is J diag(η_g/(sqrt(v̂)+ε)) Jᵀ, not J P Jᵀ; pass scale_by_lr=True"
        )
    pieces, weights = [], {}
    for name, p in params.items():
        group, state = by_id[id(p)]
        if moment not in state:
            raise ValueError(
                f"parameter '{name}' has no optimizer state: it has had no gradient at any step, so the "
                "optimizer has not moved it and it has no second moment; freeze it (requires_grad_(False)) "
                "or evaluate after a step in which it gets a gradient"
            )
        if isinstance(optimizer, torch.optim.Adam):
            step = float(state["step"])
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            v_hat = v.to(torch.float64) / (1 - float(group["betas"][1]) ** step)
            beta1 = float(group["betas"][0])
            weights[name] = (1 - beta1) / (1 - beta1**step)
        else:
            if group.get("centered"):
                raise ValueError("centered RMSprop is not supported here")
            v_hat = state["square_avg"].to(torch.float64)
        diag = 1.0 / (v_hat.sqrt() + float(group["eps"]))
        if scale_by_lr:
            diag = diag * lrs[name]
        if first_moment_weight and name in weights:
            diag = diag * weights[name]
        pieces.append(diag.reshape(-1).cpu())
    if not first_moment_weight and weights:
        low, high = min(weights.values()), max(weights.values())
        if high - low > 1e-12 * high:
            detail = ", ".join(f"'{n}': {w:.4g}" for n, w in weights.items())
            raise ValueError(
                "the weight (1 − β1)/(1 − β1^t) with which a step's gradient enters its Adam update differs "
                f"between the model's parameters ({detail}; a parameter that missed steps has a smaller step "
                "count t, or the groups' β1 differ), so J P Jᵀ would weigh them wrongly against each other; "
                "pass first_moment_weight=True"
            )
    return torch.cat(pieces)


def preconditioned_kernel(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, preconditioner: torch.Tensor | None,
                          *, normalize: bool = False) -> torch.Tensor:
    """``[M, N]`` float64 kernel Σ_outputs J(x1) P J(x2)ᵀ (``preconditioner`` None: P = I, the plain kernel).

    With ``normalize``: divided by sqrt(k(x, x) k(x', x')) under the same P.

    Raises:
        TypeError: ``preconditioner`` not a tensor, or complex.
        ValueError: ``preconditioner`` not a ``[P]`` vector, or with NaN, infinite or negative
            entries (a preconditioner is a non-negative diagonal).
    """
    if preconditioner is not None and not isinstance(preconditioner, torch.Tensor):
        raise TypeError(f"preconditioner must be a torch.Tensor [P] or None, got {type(preconditioner).__name__}")
    if preconditioner is not None and preconditioner.is_complex():  # .to(float64) would drop the imaginary part
        raise TypeError(f"preconditioner must be real, got {preconditioner.dtype}; pass a non-negative real diagonal")
    f1 = tangent_features(model, x1).to(torch.float64).cpu()  # [M, d, P]
    f2 = tangent_features(model, x2).to(torch.float64).cpu()
    p = torch.ones(f1.shape[-1], dtype=torch.float64) if preconditioner is None else preconditioner.detach().to(torch.float64).cpu()
    if p.shape != (f1.shape[-1],):
        raise ValueError(f"preconditioner must be a [P] vector with P={f1.shape[-1]}, got {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(
            "preconditioner has NaN, infinite or negative entries; pass a non-negative diagonal "
            "(e.g. from adaptive_preconditioner)"
        )
    k = torch.einsum("mdp,p,ndp->mn", f1, p, f2)
    if not normalize:
        return k
    d1 = torch.einsum("mdp,p,mdp->m", f1, p, f1)
    d2 = torch.einsum("ndp,p,ndp->n", f2, p, f2)
    return normalize_kernel(k, d1, d2)
