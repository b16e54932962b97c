"""The factored kernel engine: gradient kernels and Jacobians from layer factors.

Per-layer kernels between two batches come from their captured factors
(:class:`~genkernel.core.engine.factors.Factors`): no P-sized Gram matmul for linear layers, and
for convolutions, per layer and per chunk, the cheaper of the factored O(T²) form and
materialized per-example gradients. Every parameter outside a supported layer goes through the
torch.func reference (:mod:`genkernel.core.engine.reference`) in the same call. Work is chunked
over rows and over outputs so that captured factors stay under ``memory_budget`` bytes
(:func:`chunk_sizes`).

The kernel of a model with d outputs is the trace over outputs, Σ_o J_o(x) · J_o(x') (``[M, N]``),
or the blocks J_o(x) · J_q(x') (``[M, N, d, d]``, ``reduce="none"``). Every path here is tested
against the torch.func reference (``gradient_kernel(..., engine="functional")``).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ..adapter import Batch, analysis_mode, as_tuple, batch_size, check_memory_budget, flat_output
from .factors import DEFAULT_MEMORY_BUDGET, Plan, Unfactorable, capture, covering_plan, output_cotangents
from .reference import jacobian_pair_kernel, jacobian_self_kernel, per_example_jacobian, split_columns


# ---------------------------------------------------------------------------------------------
# 1. Chunk sizes from a memory budget.
# ---------------------------------------------------------------------------------------------
def _probe_sizes(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int, int]:
    """Per-example element counts: (activation factors, output-gradient factors per cotangent,
    all module outputs) from a forward pass on one example."""
    one = tuple(t[:1] for t in inputs)
    sizes = {"a": 0, "g": 0, "act": 0}
    block_modules = {id(b.module): b for b in plan.blocks}
    handles = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            sizes["act"] += output.numel()
            block = block_modules.get(id(module))
            if block is not None:
                if block.kind == "norm":
                    sizes["g"] += output.numel() + sum(p.numel() for p in module.parameters(recurse=False))
                    sizes["a"] += output.numel()
                elif block.kind == "conv":
                    k = math.prod(module.kernel_size) * module.in_channels + 1
                    positions = output[0, 0].numel()
                    sizes["a"] += positions * k
                    sizes["g"] += output.numel()
                else:
                    sizes["a"] += args[0].numel() + output.numel() // max(output.shape[-1], 1)
                    sizes["g"] += output.numel()

    for module in model.modules():
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*one)
    finally:
        for handle in handles:
            handle.remove()
    return sizes["a"], sizes["g"], sizes["act"]


def chunk_sizes(
    model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, rows_total: int, memory_budget: int, held: int = 2
) -> tuple[int, int]:
    """(rows per chunk, cotangents per chunk) keeping ``held`` chunks of factors in the budget."""
    memory_budget = check_memory_budget(memory_budget)
    itemsize = next(iter(plan.params.values())).element_size()
    a_size, g_size, act = _probe_sizes(model, plan, inputs)
    fb = sum(p.numel() for p in plan.fallback.values())

    def per_example(c: int) -> int:
        # factors + the graph (about 4 copies of every activation, clones included) + c output gradients, + fallback Jacobians
        return itemsize * (a_size + c * g_size + 4 * act + c * act + 2 * d * fb)

    c = d
    while c > 1 and memory_budget // (held * per_example(c)) < min(rows_total, 8):
        c = (c + 1) // 2
    rows = max(1, memory_budget // (held * per_example(c)))
    return min(rows, rows_total), c


def row_chunks(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, memory_budget: int) -> list[slice]:
    """Row chunks of ``inputs`` whose capture with d cotangents takes at most half of the budget."""
    total = batch_size(inputs)
    rows, _ = chunk_sizes(model, plan, inputs, d, total, memory_budget, held=2)
    return list(chunks(total, rows))


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def fallback_jacobian(model: nn.Module, plan: Plan):
    """The torch.func reference restricted to the plan's fallback parameters (None if there are none)."""
    if not plan.fallback:
        return None
    return per_example_jacobian(model, plan.fallback)


# ---------------------------------------------------------------------------------------------
# 2. The kernel.
# ---------------------------------------------------------------------------------------------
def factored_gradient_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient kernel from captured factors (unnormalized) and both diagonals.

    Args:
        model: the network; outputs flattened to d values per example.
        x1, x2: M and N inputs (``x2=None``: x1 against itself).
        reduce: ``"trace"`` or ``"none"``.
        memory_budget: bytes of captured factors (and the graph they come from) held at once.

    Returns:
        ``(kernel, diag1, diag2)``: ``[M, N]`` and ``[M]``, ``[N]`` for ``"trace"``;
        ``[M, N, d, d]`` and ``[M, d]``, ``[N, d]`` for ``"none"``.

    Algorithm:
        1. Plan: supported modules are factored, every other parameter goes to torch.func
           (:func:`~genkernel.core.engine.factors.covering_plan` checks on x1 that every block's
           factors give its parameters' whole gradient); a module found not to keep the batch on
           dimension 0 moves to torch.func and the computation restarts.
        2. When one side's factors fit in half the budget, that side is captured once and held
           in compact form while the other streams past it (:func:`_held_kernel`). Otherwise,
           for each pair of row chunks, one forward pass of the concatenated chunk with hooks
           captures activations; one backward with c output cotangents gives the output
           gradients (chunks of outputs for large d).
        3. Per block, the kernel between the two chunks' factors; fallback parameters add
           J_fb J_fbᵀ.
        4. Symmetric case: only blocks on and above the diagonal are computed, then mirrored.
    """
    excluded: set[str] = set()
    xs1 = as_tuple(x1, name="x1")
    while True:
        plan = covering_plan(model, xs1, excluded)
        try:
            return _factored_kernel(model, x1, x2, reduce=reduce, memory_budget=memory_budget, d=d, plan=plan)
        except Unfactorable as error:
            excluded.add(error.module_name)


def _held_kernel(model, plan, xs1, xs2, m_total, n_total, reduce, memory_budget, d, jac_fb):
    """The kernel with one side's factors held: x2 (x1 when symmetric) is captured once and kept
    in compact form, x1 is streamed past it in chunks, so every example is captured once.
    Returns ``(kernel, diag1, diag2)``, or None when the held side would take more than half of
    ``memory_budget`` (the caller then recomputes factors per pair of row chunks). Captures are
    sized to the other half."""
    rows, c = chunk_sizes(model, plan, xs1, d, max(m_total, n_total), memory_budget, held=2)
    if c < d:
        return None
    held_xs, held_total = (xs1, m_total) if xs2 is None else (xs2, n_total)

    def side_chunk(xs, r):
        batch = tuple(t[r] for t in xs)
        factors, _ = capture(model, plan, batch, output_cotangents(list(range(d))))
        return [f.compact() for f in factors], (None if jac_fb is None else jac_fb(*batch).detach())

    # 1. The held side, chunk by chunk into preallocated storage (no concatenated copy).
    held, held_fb = None, None
    for r in chunks(held_total, rows):
        factors, fb = side_chunk(held_xs, r)
        if held is None:
            chunk_bytes = sum(f.nbytes for f in factors) + (0 if fb is None else fb.numel() * fb.element_size())
            per_example = chunk_bytes / (r.stop - r.start)
            if per_example * held_total > memory_budget // 2:
                return None
            held = [f.allocate(held_total) for f in factors]
            held_fb = None if fb is None else fb.new_empty((held_total, *fb.shape[1:]))
        for target, f in zip(held, factors):
            target.write(r, f)
        if fb is not None:
            held_fb[r] = fb
        del factors, fb

    # 2. Stream x1 past it (symmetric: the held side's own chunks).
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    first = held[0].g
    kernel = torch.zeros(shape, dtype=first.dtype, device=first.device)
    diag_shape = () if reduce == "trace" else (d,)
    diag1 = torch.zeros((m_total, *diag_shape), dtype=first.dtype, device=first.device)
    for r in chunks(m_total, rows):
        if xs2 is None:
            factors, fb = [f.select(r) for f in held], (None if held_fb is None else held_fb[r])
        else:
            factors, fb = side_chunk(xs1, r)
        for f1, f2 in zip(factors, held):
            if f1.is_unused:
                continue
            kernel[r] += f1.pair_kernel(f2, reduce, memory_budget)
            diag1[r] += f1.self_kernel(reduce)
        if fb is not None:
            kernel[r] += jacobian_pair_kernel(fb, held_fb, reduce)
            diag1[r] += jacobian_self_kernel(fb, reduce)
    if xs2 is None:
        return kernel, diag1, diag1
    diag2 = sum(f.self_kernel(reduce) for f in held if not f.is_unused)
    if held_fb is not None:
        diag2 = diag2 + jacobian_self_kernel(held_fb, reduce)
    return kernel, diag1, diag2


def _factored_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    d: int | None = None,
    plan: Plan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs1 = as_tuple(x1, name="x1")
    xs2 = xs1 if x2 is None else as_tuple(x2, name="x2")
    m_total, n_total = batch_size(xs1, name="x1"), batch_size(xs2, name="x2")
    first = next(iter(plan.params.values()))
    if d is None:
        with torch.no_grad(), analysis_mode(model):
            d = flat_output(model(*(t[:1] for t in xs1)), 1).shape[1]
    with analysis_mode(model):
        rows, c = chunk_sizes(model, plan, xs1, d, max(m_total, n_total), memory_budget, held=2)
    if reduce == "none":
        c = d
    out_chunks = [list(range(s.start, s.stop)) for s in chunks(d, c)]
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    kernel = torch.zeros(shape, dtype=first.dtype, device=first.device)
    diag_shape = () if reduce == "trace" else (d,)
    diag1 = torch.zeros((m_total, *diag_shape), dtype=first.dtype, device=first.device)
    diag2 = diag1 if x2 is None else torch.zeros((n_total, *diag_shape), dtype=first.dtype, device=first.device)
    jac_fb = fallback_jacobian(model, plan)
    symmetric = x2 is None

    with analysis_mode(model):
        # 2. When one side's factors fit, capture each side once (no recomputation per pair).
        held = _held_kernel(model, plan, xs1, None if symmetric else xs2, m_total, n_total, reduce, memory_budget, d, jac_fb)
        if held is not None:
            return held

        for r1 in chunks(m_total, rows):
            for r2 in chunks(n_total, rows):
                if symmetric and r2.start < r1.start:
                    continue
                same = symmetric and r2 == r1
                batch = tuple(t[r1] for t in xs1) if same else tuple(
                    torch.cat([a[r1], b[r2]]) for a, b in zip(xs1, xs2)
                )
                m = r1.stop - r1.start
                first_pair = r2.start == 0 or (symmetric and same)
                # 2.-3. Factored blocks, per chunk of outputs.
                for outs in out_chunks:
                    factors, _ = capture(model, plan, batch, output_cotangents(outs))
                    for f in factors:
                        if f.is_unused:
                            continue
                        f1 = f if same else f.select(slice(0, m))
                        f2 = f if same else f.select(slice(m, None))
                        kernel[r1, r2] += f1.pair_kernel(f2, reduce, memory_budget)  # "none": c = d, whole blocks
                        if first_pair:
                            diag1[r1] += f1.self_kernel(reduce)
                        if not symmetric and r1.start == 0:
                            diag2[r2] += f2.self_kernel(reduce)
                    del factors
                # 3. torch.func fallback parameters.
                if jac_fb is not None:
                    j = jac_fb(*batch).detach()  # [b, d, P_fb]
                    j1, j2 = (j, j) if same else (j[:m], j[m:])
                    kernel[r1, r2] += jacobian_pair_kernel(j1, j2, reduce)
                    if first_pair:
                        diag1[r1] += jacobian_self_kernel(j1, reduce)
                    if not symmetric and r1.start == 0:
                        diag2[r2] += jacobian_self_kernel(j2, reduce)
                # 4. Mirror the symmetric block.
                if symmetric and not same:
                    if reduce == "trace":
                        kernel[r2, r1] = kernel[r1, r2].T
                    else:
                        kernel[r2, r1] = kernel[r1, r2].permute(1, 0, 3, 2)
    return kernel, diag1, diag2


# ---------------------------------------------------------------------------------------------
# 3. Per-example Jacobians (tangent features) from factors.
# ---------------------------------------------------------------------------------------------
def factored_jacobian(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: list[int], plan: Plan | None = None
) -> torch.Tensor:
    """Per-example Jacobians ``[B, c, P]`` (P in ``named_parameters`` order) for model outputs
    ``outputs``, materialized per layer from factors (one forward and one batched backward)."""
    plan = covering_plan(model, inputs) if plan is None else plan
    factors, _ = capture(model, plan, inputs, output_cotangents(outputs))
    grads: dict[str, torch.Tensor] = {}
    for f in factors:
        grads.update(f.gradients())
    if plan.fallback:
        j = fallback_jacobian(model, plan)(*inputs).detach()[:, outputs]  # [B, c, P_fb]
        for name, part in split_columns(j, plan.fallback).items():
            grads[name] = part.transpose(0, 1).reshape(len(outputs), -1, *plan.fallback[name].shape)
    b = batch_size(inputs)
    return torch.cat([grads[n].reshape(len(outputs), b, -1) for n in plan.order], dim=2).transpose(0, 1)


__all__ = ["chunk_sizes", "chunks", "factored_gradient_kernel", "factored_jacobian", "fallback_jacobian", "row_chunks"]
