"""Per-example loss gradients, summed into groups (DESIGN.md section 2).

ĝ_g = Σ_{n ∈ g} c_n ∇_θ ℓ_n, by one of two exact routes (both ``torch.func``):

- "example": per-example gradients (``vmap`` over ``grad`` of a one-example ``functional_call``),
  in example chunks sized by a memory budget, summed into the G groups in float64 straight away;
  cost ∝ B gradients of size P.
- "group": one forward of the whole batch and G backward passes batched with ``vmap``, each with
  the cotangent c_n·1[n ∈ g]; no per-example gradient is ever formed; cost ∝ G backward passes.

"auto" takes "group" when 2 G <= B (few groups, e.g. noise-level bins), else "example".
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import grad, grad_and_value, vmap

from .adapter import functional_model

DEFAULT_GRADIENT_BUDGET = 256 * 2**20
GRADIENT_ROUTES = ("auto", "example", "group")


def group_gradients(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor | tuple[torch.Tensor, ...] | None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    groups: torch.Tensor,
    coefficients: torch.Tensor,
    num_groups: int,
    *,
    memory_budget: int = DEFAULT_GRADIENT_BUDGET,
    route: str = "auto",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Group-summed loss gradients and the per-example losses of the analysis forward.

    Args:
        params: the trainable parameters (θ_k), by name.
        inputs, targets: the batch (batch on dim 0); ``targets`` may be None.
        groups: ``LongTensor[B]`` of group ids in [0, num_groups).
        coefficients: ``Tensor[B]`` of c_n (1/B for a mean).
        route: "auto", "example" or "group" (see the module docstring).

    Returns:
        ``({name: Tensor[G, *shape] float64}, losses Tensor[B])``.
    """
    if route not in GRADIENT_ROUTES:
        raise ValueError(f"route must be one of {GRADIENT_ROUTES}, got {route!r}")
    batch = inputs[0].shape[0]
    if route == "group" or (route == "auto" and 2 * num_groups <= batch):
        return _group_route(model, params, inputs, targets, loss_fn, groups, coefficients, num_groups, memory_budget)
    forward = functional_model(model, flatten=False)  # loss_fn sees outputs shaped as in training
    detached = {name: p.detach() for name, p in params.items()}

    # 1. One example's loss as a function of θ: ℓ_n(θ) = loss_fn(f(x_n; θ), y_n).
    def example_loss(p, x, y):
        out = forward(p, tuple(t.unsqueeze(0) for t in x))
        target = None if y is None else tuple(t.unsqueeze(0) for t in y)
        if target is not None and isinstance(targets, torch.Tensor):
            target = target[0]
        return loss_fn(out, target).reshape(())

    per_example = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0 if targets is not None else None))
    target_tuple = None if targets is None else ((targets,) if isinstance(targets, torch.Tensor) else tuple(targets))

    num_params = sum(p.numel() for p in params.values())
    itemsize = next(iter(params.values())).element_size()
    chunk = max(1, memory_budget // (3 * num_params * itemsize))
    sums = {name: torch.zeros((num_groups, *p.shape), dtype=torch.float64, device=p.device) for name, p in params.items()}
    losses = []
    for start in range(0, batch, chunk):
        rows = slice(start, min(start + chunk, batch))
        # 2. Per-example gradients ∇ℓ_n for a chunk of examples: {name: [c, *shape]}.
        grads, values = per_example(
            detached,
            tuple(t[rows] for t in inputs),
            None if target_tuple is None else tuple(t[rows] for t in target_tuple),
        )
        losses.append(values.detach())
        # 3. ĝ_g += Σ_{n ∈ chunk ∩ g} c_n ∇ℓ_n in float64, as one matmul with the [G, c]
        #    matrix of coefficients (index_add_ is far slower on CPU).
        device = next(iter(detached.values())).device
        assign = torch.zeros((num_groups, rows.stop - rows.start), dtype=torch.float64, device=device)
        assign[groups[rows].to(device), torch.arange(rows.stop - rows.start, device=device)] = (
            coefficients[rows].to(device=device, dtype=torch.float64)
        )
        for name, g in grads.items():
            sums[name] += (assign @ g.detach().reshape(g.shape[0], -1).to(torch.float64)).view_as(sums[name])
    return sums, torch.cat(losses)


def _group_route(model, params, inputs, targets, loss_fn, groups, coefficients, num_groups, memory_budget):
    """ĝ_g as G vmapped backward passes through one batch forward (see the module docstring)."""
    forward = functional_model(model, flatten=False)
    detached = {name: p.detach() for name, p in params.items()}
    first = next(iter(detached.values()))
    batch = inputs[0].shape[0]

    # 1. The step's weighted loss for one row of coefficients w: Σ_n w_n ℓ_n(θ).
    def weighted_loss(p, w):
        losses = loss_fn(forward(p, inputs), targets).reshape(batch)
        return (losses * w).sum(), losses

    # 2. W[g, n] = c_n if example n is in group g, else 0.
    weights = torch.zeros((num_groups, batch), dtype=first.dtype, device=first.device)
    weights[groups.to(first.device), torch.arange(batch, device=first.device)] = coefficients.to(device=first.device, dtype=first.dtype)
    num_params = sum(p.numel() for p in detached.values())
    chunk = max(1, memory_budget // (3 * num_params * first.element_size()))
    batched = vmap(grad(weighted_loss, has_aux=True), in_dims=(None, 0))
    sums = {name: torch.empty((num_groups, *p.shape), dtype=torch.float64, device=p.device) for name, p in detached.items()}
    losses = None
    for start in range(0, num_groups, chunk):
        rows = slice(start, min(start + chunk, num_groups))
        # 3. Backward passes for a chunk of groups at once: {name: [g, *shape]}.
        grads, values = batched(detached, weights[rows])
        losses = values[0].detach() if losses is None else losses
        for name, g in grads.items():
            sums[name][rows] = g.detach().to(torch.float64)
    return sums, losses
