"""Per-example ledgers without per-group copies of the parameters.

With one group per example (G in the thousands) the tracker's dense route, which keeps every
group's update and optimizer state as a float64 copy of the parameters ((G + 2) × P values),
does not fit. Two routes avoid those copies:

- ``factored`` (plain SGD, exact). The update of group g is u_{k,g} = −η_p s Σ_{n∈g} c_n ∇ℓ_n(θ_k)
  per parameter p (s: the clipping factor, −1 more under ``maximize``), so its contribution is
  a sum over the group's examples of cross kernels

      c_{k,g}(x) = Σ_q w_q Σ_{n∈g} Σ_layers ⟨J_layer(x; θ_q), −η s c_n ∇_layer ℓ_n(θ_k)⟩,

  computed per layer from captured factors (:mod:`genkernel.core.factored`): activations and
  output gradients of the batch at θ_k and of the probes at each quadrature node. No
  per-example gradient and no per-group update is ever formed.
- ``sketched`` (SGD with momentum, Adam, AdamW; approximate): see :mod:`genkernel.core.sketched_state`.

This module holds the factored pieces: :func:`capture_batch` (the batch's loss factors,
weighted by c_n), :func:`batch_totals` (Σ_n c_n ∇ℓ_n and a rounding scale, for the tracker's
exact checks) and :func:`factored_contributions` (the per-example contributions above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .adapter import batch_size
from .factored import (
    Factors, Plan, block_gradients, capture, chunk_sizes, concat_factors, output_cotangents, pair_kernel, self_kernel,
)
from .kernels import per_example_jacobian
from .pergrad import group_gradients


@dataclass
class BatchFactors:
    """One batch's loss factors at θ_k, each example's already multiplied by its c_n.

    Attributes:
        factors: one :class:`Factors` per block of the plan, with one cotangent (the loss).
        fallback: ``{name: [B, *shape]}`` float64 c_n ∇ℓ_n of the parameters outside the blocks.
        losses: ``[B]`` per-example losses of the analysis forward.
    """

    factors: list[Factors]
    fallback: dict[str, torch.Tensor]
    losses: torch.Tensor


def _weighted(f: Factors, weights: torch.Tensor) -> Factors:
    """Factors of c_n ∇ℓ_n: the output-gradient side scaled per example."""
    w = weights.to(dtype=f.g.dtype, device=f.g.device)
    return Factors(f.kind, f.a, f.g * w.view(1, -1, *([1] * (f.g.dim() - 2))))


def capture_batch(
    model: nn.Module,
    plan: Plan,
    inputs: tuple[torch.Tensor, ...],
    targets: Any,
    loss_fn: Callable,
    coefficients: torch.Tensor,
    memory_budget: int,
) -> BatchFactors:
    """Loss factors of the batch at the module's current parameters (a forward and a backward per
    chunk of rows; chunks sized so that one capture stays within half of ``memory_budget``).

    ``coefficients``: ``[B]`` c_n. Runs under the caller's :func:`analysis_mode`.
    """
    total = coefficients.shape[0]
    chunks, losses = [], []
    for rows in row_chunks(model, plan, inputs, 1, memory_budget):
        box: dict[str, torch.Tensor] = {}
        chunk_targets = _rows_of(targets, rows)

        def cotangents(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            values = loss_fn(out, chunk_targets).reshape(-1)
            box["losses"] = values.detach()
            return values, torch.ones((1, *values.shape), dtype=values.dtype, device=values.device)

        factors, _ = capture(model, plan, tuple(t[rows] for t in inputs), cotangents)
        chunks.append(factors)
        losses.append(box["losses"])
    factors = [_weighted(concat_factors([chunk[i] for chunk in chunks]), coefficients) for i in range(len(plan.blocks))]
    fallback: dict[str, torch.Tensor] = {}
    if plan.fallback:
        fallback, _ = group_gradients(
            model, dict(plan.fallback), inputs, targets, loss_fn, torch.arange(total, device=coefficients.device),
            coefficients, total, memory_budget=memory_budget, route="example",
        )
    return BatchFactors(factors, fallback, torch.cat(losses))


def row_chunks(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, memory_budget: int) -> list[slice]:
    """Row chunks of ``inputs`` whose capture with d cotangents takes at most half of the budget."""
    total = batch_size(inputs)
    rows, _ = chunk_sizes(model, plan, inputs, d, total, memory_budget, held=2)
    return [slice(start, min(start + rows, total)) for start in range(0, total, rows)]


def _rows_of(targets: Any, rows: slice) -> Any:
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets[rows]
    return tuple(t[rows] for t in targets)


def batch_totals(plan: Plan, batch: BatchFactors) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Σ_n c_n ∇ℓ_n per parameter (float64, from factors: no per-example gradient is formed) and,
    per parameter, Σ_n ‖c_n ∇_block ℓ_n‖: the size against which its rounding is judged."""
    totals: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for block, f in zip(plan.blocks, batch.factors):
        if f.kind == "dense" and f.g.shape[-1] == 0:  # the module was not called: zero gradients
            for name, p in ((block.weight, block.module.weight), (block.bias, block.module.bias)):
                if name is not None:
                    totals[name] = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
                    scales[name] = 0.0
            continue
        size = float(self_kernel(f, "trace").clamp_min(0).sqrt().sum())
        for name, total in _block_totals(block, f).items():
            totals[name] = total
            scales[name] = size
    for name, g in batch.fallback.items():
        totals[name] = g.sum(dim=0)
        scales[name] = float(g.reshape(g.shape[0], -1).norm(dim=1).sum())
    return totals, scales


def _block_totals(block, f: Factors) -> dict[str, torch.Tensor]:
    """Σ over the batch of one block's gradients ``{name: float64 [*shape]}``."""
    module = block.module
    g = f.g[0]  # [B, T, O] or [B, P_block]
    out: dict[str, torch.Tensor] = {}
    if f.kind == "outer":
        # In the model's dtype, like the batched gradient it is checked against: the two differ
        # by rounding, which the tracker carries as its own row (its effect stays in the residual).
        if block.weight is not None:
            weight_columns = f.a[..., :-1] if block.bias is not None else f.a
            out[block.weight] = torch.einsum("bto,bti->oi", g, weight_columns).reshape(module.weight.shape).to(torch.float64)
        if block.bias is not None:
            out[block.bias] = g.to(torch.float64).sum(dim=(0, 1)).reshape(module.bias.shape)
        return out
    g = g.to(torch.float64)
    if f.kind == "embedding":
        total = g.new_zeros(module.weight.shape)
        total.index_add_(0, f.a.reshape(-1), g.reshape(-1, g.shape[-1]))
        out[block.weight] = total
        return out
    summed = Factors("dense", None, f.g[:, :].sum(dim=1, keepdim=True).to(torch.float64))
    return {name: value[0, 0] for name, value in block_gradients(block, summed).items()}


def _scaled_for_update(block, f: Factors, scale: dict[str, float]) -> Factors:
    """Factors of the update −η_p c_n ∇ℓ_n: each parameter's part times its own scale."""
    if f.kind == "outer":
        a = f.a.clone()
        if block.bias is not None:
            if block.weight is not None:
                a[..., :-1] *= scale[block.weight]
            a[..., -1] *= scale[block.bias]
        else:
            a *= scale[block.weight]
        return Factors("outer", a, f.g)
    if f.kind == "embedding":
        return Factors("embedding", f.a, f.g * scale[block.weight])
    g = f.g.clone()
    offset = 0
    for name, p in ((block.weight, block.module.weight), (block.bias, block.module.bias)):
        if name is None:
            continue
        g[..., offset : offset + p.numel()] *= scale[name]
        offset += p.numel()
    return Factors("dense", None, g)


def probe_factors(
    model: nn.Module, plan: Plan, probes: tuple[torch.Tensor, ...], theta: dict[str, torch.Tensor], d: int
) -> tuple[list[Factors], torch.Tensor | None]:
    """The probes' factors at θ (d output cotangents) and, for parameters outside the blocks,
    their torch.func Jacobians ``[M, d, P_fb]`` at θ (None when every parameter is in a block)."""
    # θ must require grad for the block outputs to have a graph.
    params = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
    factors, _ = capture(model, plan, probes, output_cotangents(list(range(d))), parameters=params)
    if not plan.fallback:
        return factors, None
    others = {n: t for n, t in theta.items() if n not in plan.fallback}
    jac = per_example_jacobian(model, {n: theta[n] for n in plan.fallback}, fixed=others)(*probes).detach()
    return factors, jac


def factored_contributions(
    model: nn.Module,
    plan: Plan,
    probes: tuple[torch.Tensor, ...],
    nodes: list[tuple[float, dict[str, torch.Tensor]]],
    batch: BatchFactors,
    scale: dict[str, float],
    d: int,
    probe_chunks: list[slice],
    memory_budget: int,
) -> torch.Tensor:
    """Per-example contributions ``[M, B, d]`` (model dtype): Σ_q w_q J(x; θ_q) u_n with
    u_n = scale_p c_n ∇ℓ_n(θ_k) per parameter p (``scale``: −η_p times the clipping factor).

    ``nodes``: (weight w_q, parameters θ_q) of the quadrature rule. ``probe_chunks``: row
    chunks of the probes (:func:`row_chunks`; fixed probes, so callers compute them once).

    Algorithm:
        1. Scale the batch side once: each parameter's columns of the factors by scale_p.
        2. Per node, capture the probes' factors at θ_q with d output cotangents.
        3. Per block, the cross kernel between probe and batch factors (``pair_kernel``,
           ``reduce="none"``: ``[M, B, d, 1]``), weighted by w_q and summed.
        4. Parameters outside the blocks: the probes' torch.func Jacobians at θ_q times the
           scaled per-example gradients.
    """
    # 1. The batch side of every block, scaled once.
    scaled = [
        None if (f.kind == "dense" and f.g.shape[-1] == 0) else _scaled_for_update(block, f, scale)
        for block, f in zip(plan.blocks, batch.factors)
    ]
    fallback = {
        name: g * scale[name] for name, g in batch.fallback.items()
    }
    total = torch.zeros((batch_size(probes), batch.losses.shape[0], d), dtype=next(iter(plan.params.values())).dtype,
                        device=batch.losses.device)
    for weight, theta in nodes:
        for rows in probe_chunks:
            total[rows] += weight * _chunk_contributions(model, plan, tuple(t[rows] for t in probes), theta, scaled,
                                                         fallback, d, memory_budget)
    return total


def _chunk_contributions(model, plan, probes, theta, scaled, fallback, d, memory_budget) -> torch.Tensor:
    """Steps 2-4 of :func:`factored_contributions` for one chunk of probes at one node: ``[m, B, d]``."""
    # 2. Probe factors at θ_q.
    factors, jac = probe_factors(model, plan, probes, theta, d)
    value = None
    # 3. Cross kernels per block.
    for f_batch, f_probe in zip(scaled, factors):
        if f_batch is None:
            continue
        block = pair_kernel(f_probe, f_batch, "none", memory_budget)[..., 0]  # [m, B, d]
        value = block if value is None else value + block
    # 4. torch.func for the rest of the parameters.
    if jac is not None:
        flat = torch.cat([fallback[n].reshape(fallback[n].shape[0], -1) for n in plan.fallback], dim=1)
        part = torch.einsum("mdp,bp->mbd", jac.to(torch.float64), flat).to(jac.dtype)
        value = part if value is None else value + part
    return value


__all__ = ["BatchFactors", "batch_totals", "capture_batch", "factored_contributions", "probe_factors", "row_chunks"]
