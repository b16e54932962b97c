"""Per-example contributions from layer factors: the tracker's routes without per-group copies.

With one group per example (G in the thousands) the tracker's dense route, which keeps every
group's update and optimizer state as a float64 copy of the parameters ((G + 2) × P values),
does not fit. Under plain SGD the update of example n is u_{k,n} = −η_p s c_n ∇ℓ_n(θ_k) per
parameter p (s: the clipping factor, −1 more under ``maximize``), so its contribution is a cross
kernel

    c_{k,n}(x) = Σ_q w_q Σ_layers ⟨J_layer(x; θ_q), −η s c_n ∇_layer ℓ_n(θ_k)⟩,

computed per layer from captured factors (:mod:`genkernel.core.engine.factors`): activations and
output gradients of the batch at θ_k and of the probes at each quadrature node. No per-example
gradient and no per-group update is ever formed.

This module holds those pieces: :func:`capture_batch` (the batch's loss factors, weighted by
c_n), :func:`batch_totals` (Σ_n c_n ∇ℓ_n and a rounding scale, for the tracker's exact
checks), :func:`probe_factors`, :func:`probe_fallback_jacobians` and :func:`factored_contributions`
(the per-example contributions above, a chunk of the probes' outputs at a time). The sketched route (:mod:`genkernel.core.tracking.sketched`) reads the same batch factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..adapter import batch_size
from ..param_bytes import joined_dtype
from .factored import row_chunks
from .factors import Factors, Plan, TrainingCapture, capture, capture_by_outputs, loss_cotangents
from .gradients import per_example_gradients
from .reference import finite_peak, per_example_jacobian, scaled_alike


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


def capture_batch(
    model: nn.Module,
    plan: Plan,
    inputs: tuple[torch.Tensor, ...],
    targets: Any,
    loss_fn: Callable,
    coefficients: torch.Tensor,
    memory_budget: int,
    form: str = "outer",
) -> BatchFactors:
    """Loss factors of the batch at the module's current parameters (a forward and a backward per
    chunk of rows; chunks sized so that one capture stays within half of ``memory_budget``).

    ``coefficients``: ``[B]`` c_n; ``form``: the factors' form (:data:`~genkernel.core.engine.factors.FACTOR_FORMS`;
    "outer" or "lean", which is never larger). Runs under the caller's :func:`analysis_mode`.
    """
    batch = batch_size(inputs)
    factors: list[Factors] | None = None
    losses = []
    for rows in row_chunks(model, plan, inputs, 1, memory_budget):
        cotangents, box = loss_cotangents(loss_fn, _rows_of(targets, rows))
        chunk, _ = capture(model, plan, tuple(t[rows] for t in inputs), cotangents, form=form)
        if factors is None:  # the whole batch's factors, filled chunk by chunk (no list of chunks beside them)
            factors = chunk if rows.stop - rows.start == batch else [f.allocate(batch) for f in chunk]
        if factors is not chunk:
            for whole, part in zip(factors, chunk):
                whole.write(rows, part)
        del chunk
        losses.append(box["losses"])
    for i, f in enumerate(factors):  # one block's scaled copy at a time
        factors[i] = f.per_example_scaled(coefficients)
    fallback = _fallback_gradients(model, plan, inputs, targets, loss_fn, coefficients, memory_budget)
    return BatchFactors(factors, fallback, torch.cat(losses))


def training_batch(
    model: nn.Module,
    plan: Plan,
    recorded: TrainingCapture,
    inputs: tuple[torch.Tensor, ...],
    targets: Any,
    loss_fn: Callable,
    coefficients: torch.Tensor,
    losses: torch.Tensor,
    memory_budget: int,
) -> BatchFactors | None:
    """What :func:`capture_batch` returns, read from the training step's own pass (``recorded``:
    its factors already carry c_n, and ``losses`` are the training losses ``[B]``), so no second
    forward and backward is run for the blocks; None when the pass could not be read (the caller
    then runs :func:`capture_batch`). Parameters outside the blocks still take their own pass."""
    factors = recorded.factors()
    if factors is None:
        return None
    fallback = _fallback_gradients(model, plan, inputs, targets, loss_fn, coefficients, memory_budget)
    return BatchFactors(factors, fallback, losses)


def _fallback_gradients(model, plan, inputs, targets, loss_fn, coefficients, memory_budget) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` float64 c_n ∇ℓ_n of the plan's fallback parameters (torch.func)."""
    if not plan.fallback:
        return {}
    return per_example_gradients(model, dict(plan.fallback), inputs, targets, loss_fn, coefficients,
                                 memory_budget=memory_budget)


def _rows_of(targets: Any, rows: slice) -> Any:
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets[rows]
    return tuple(t[rows] for t in targets)


def batch_totals(batch: BatchFactors) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Σ_n c_n ∇ℓ_n per parameter (float64, from factors: no per-example gradient is formed) and,
    per parameter, Σ_n ‖c_n ∇_block ℓ_n‖ (a float, of any magnitude: :func:`_block_size`): the size against which
    its rounding is judged."""
    totals: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for f in batch.factors:
        size = _block_size(f)
        for name, total in f.totals().items():
            totals[name] = total
            scales[name] = size
    for name, g in batch.fallback.items():
        totals[name] = g.sum(dim=0)
        if _in_reach(finite_peak(g), g.dtype):  # (the common case: no copy of the example rows, which fill the budget)
            scales[name] = float(g.reshape(g.shape[0], -1).norm(dim=1).sum())
        else:
            (flat,), times = scaled_alike(g.reshape(g.shape[0], -1))
            scales[name] = float(flat.norm(dim=1).sum()) * times
    return totals, scales


def _in_reach(peak: float, dtype: torch.dtype) -> bool:
    """Whether factors (or example rows) of largest magnitude ``peak`` form their squared norms directly in ``dtype``
    without over- or underflow: 0, or within 2^±(max exponent / 4 − 8) (2^±24 in float32 and bfloat16, 2^±248 in
    float64; never in float16): the squares of two such factors' products, summed over up to 2^30 terms, stay in
    range."""
    if peak == 0.0:
        return True
    reach = math.log2(torch.finfo(dtype).max) / 4 - 8 if dtype.is_floating_point else 0.0
    return reach > 0 and 2.0 ** -reach <= peak <= 2.0 ** reach


def _block_size(f: Factors) -> float:
    """Σ_n ‖∇_block ℓ_n‖ of one block's factors, formed on copies divided by their largest magnitudes (activations
    and output gradients apart: the per-example gradient is divided by their product, which multiplies the sum
    back). Formed directly, the squares in ``self_kernel`` (in the factors' own dtype) overflowed to inf past about
    1.8e19 in float32 (1.3e154 in float64) and underflowed to 0 below about 1e-19 (1.5e-154): the tracker's check of
    the groups' sum against the training gradient then allowed an infinite gap (any group gradient passed) or no
    rounding at all. An infinity or a NaN among the factors still gives inf or NaN. Factors whose magnitudes are in
    reach of the dtype (:func:`_in_reach`: the common case) are used as they are: the copies would hold a second set
    of the block's factors, which fill the memory budget, for every step."""
    if f.is_unused:
        return 0.0
    floating = f.a is not None and f.a.is_floating_point()
    peak_a, peak = (finite_peak(f.a) if floating else 0.0), finite_peak(f.g)
    if _in_reach(peak_a, f.a.dtype if floating else f.g.dtype) and _in_reach(peak, f.g.dtype):
        return float(f.self_kernel("trace").to(torch.float64).clamp_min(0).sqrt().sum())
    a, times = f.a, 1.0
    if floating and peak_a > 0:
        a, times = a / peak_a, peak_a
    g = f.g / peak if peak > 0 else f.g
    per = Factors(f.block, f.kind, a, g).self_kernel("trace").to(torch.float64).clamp_min(0).sqrt()
    return float(per.sum()) * times * (peak if peak > 0 else 1.0)


def probe_fallback_jacobians(
    model: nn.Module, plan: Plan, probes: tuple[torch.Tensor, ...], theta: dict[str, torch.Tensor],
    output_chunks: list[slice], consume: Callable[[slice, torch.Tensor], None],
) -> None:
    """For parameters outside the blocks (none: nothing runs), the probes' torch.func Jacobians at θ,
    ``consume(outputs, jacobian [M, c, P_fb])`` once per chunk of ``output_chunks``
    (:func:`~genkernel.core.engine.factored.capture_chunks` sizes them for this too): neither jacrev's backward
    passes nor the result are ever over all d outputs at once (a DCGAN generator's, d = 4096, is 4096 P_fb
    values a probe)."""
    if not plan.fallback:
        return
    others = {n: t for n, t in theta.items() if n not in plan.fallback}
    params = {n: theta[n] for n in plan.fallback}
    whole = len(output_chunks) == 1  # (every output: the Jacobian unsliced)
    for outputs in output_chunks:
        consume(outputs, per_example_jacobian(model, params, fixed=others,
                                              outputs=None if whole else outputs)(*probes).detach())


def probe_factors(
    model: nn.Module, plan: Plan, probes: tuple[torch.Tensor, ...], theta: dict[str, torch.Tensor],
    output_chunks: list[slice], consume: Callable[[slice, list[Factors]], None],
) -> None:
    """The probes' factors at θ, ``consume(outputs, factors)`` once per chunk of the output
    cotangents (:func:`~genkernel.core.engine.factors.capture_by_outputs`: one forward)."""
    # θ must require grad for the block outputs to have a graph.
    params = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
    capture_by_outputs(model, plan, probes, output_chunks, consume, parameters=params)


def factored_contributions(
    model: nn.Module,
    plan: Plan,
    probes: tuple[torch.Tensor, ...],
    nodes: list[tuple[float, dict[str, torch.Tensor]]],
    batch: BatchFactors,
    scale: dict[str, float],
    d: int,
    probe_chunks: tuple[list[slice], list[slice]],
    memory_budget: int,
) -> torch.Tensor:
    """Per-example contributions ``[M, B, d]`` (model dtype): Σ_q w_q J(x; θ_q) u_n with
    u_n = scale_p c_n ∇ℓ_n(θ_k) per parameter p (``scale``: −η_p times the clipping factor).

    ``nodes``: (weight w_q, parameters θ_q) of the quadrature rule. ``probe_chunks``: (row
    chunks of the probes, chunks of the outputs) (:func:`~genkernel.core.engine.factored.capture_chunks`;
    fixed probes, so callers compute them once).

    Algorithm:
        1. Scale the batch side once: each parameter's part of the factors by scale_p.
        2. Per node and chunk of probes, capture the probes' factors at θ_q, a chunk of the output
           cotangents at a time.
        3. Per block, the cross kernel between probe and batch factors (``reduce="none"``:
           ``[m, B, c, 1]``), weighted by w_q and summed.
        4. Parameters outside the blocks: the probes' torch.func Jacobians at θ_q times the
           scaled per-example gradients.
    """
    # 1. The batch side of every block, scaled once.
    scaled = [None if f.is_unused else f.parameter_scaled(scale) for f in batch.factors]
    fallback = {name: g * scale[name] for name, g in batch.fallback.items()}
    flat = (torch.cat([fallback[n].reshape(fallback[n].shape[0], -1) for n in plan.fallback], dim=1)
            if plan.fallback else None)
    # (in the parameters' dtypes joined, as the sum of their blocks' cross kernels is: a float32 first layer rounded a
    # float64 model's contributions to float32)
    total = torch.zeros((batch_size(probes), batch.losses.shape[0], d), dtype=joined_dtype(plan.params),
                        device=batch.losses.device)
    row_chunks, output_chunks = probe_chunks
    for weight, theta in nodes:
        for rows in row_chunks:
            chunk = tuple(t[rows] for t in probes)
            part = total[rows]  # a view: each output chunk's cross kernels added in place

            # 2-3. Probe factors at θ_q, cross kernels per block.
            def add(outputs: slice, factors: list[Factors]) -> None:
                value = None
                for f_batch, f_probe in zip(scaled, factors):
                    if f_batch is not None:
                        block = f_probe.pair_kernel(f_batch, "none", memory_budget)[..., 0]  # [m, B, c]
                        value = block if value is None else value + block
                if value is not None:
                    part[:, :, outputs] += weight * value

            probe_factors(model, plan, chunk, theta, output_chunks, add)

            # 4. torch.func for the rest of the parameters.
            def add_fallback(outputs: slice, jac: torch.Tensor) -> None:
                part[:, :, outputs] += weight * torch.einsum("mcp,bp->mbc", jac.to(torch.float64), flat).to(jac.dtype)

            probe_fallback_jacobians(model, plan, chunk, theta, output_chunks, add_fallback)
    return total


__all__ = [
    "BatchFactors", "batch_totals", "capture_batch", "factored_contributions", "probe_factors", "probe_fallback_jacobians",
    "training_batch",
]
