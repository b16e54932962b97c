"""Normalized gradient kernels between denoiser states (x_t, t), exact or output-sketched.

A *state* is a denoiser input, the tuple ``(z [M, *shape], t [M])``. The normalized kernel
k̂((z, s), (z', t)) = k / sqrt(k(z, z) k(z', t')) (docs/ledger.md, "Gradient kernels") uses the trace kernel
k = tr J(z, s) J(z', t)ᵀ over the trainable parameters.

For d outputs and P parameters the exact kernel needs per-state Jacobians d×P (the core's
:func:`~genkernel.core.engine.kernels.gradient_kernel`): cheap for 2-D points, d = 256 backward passes
per state for a 16×16 image. ``output_sketch=V`` estimates the trace with V shared Rademacher
output directions r_v instead (Hutchinson): k ≈ (1/V) Σ_v ⟨J(z)ᵀ r_v, J(z')ᵀ r_v⟩, unbiased for
k: the kernel of each scalar output ⟨r_v, f⟩, computed by the engine within the memory budget. The estimate is reported as sketched; its spread over
sketch seeds is the sketching error (reported separately from the ledger's residual).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapter import (  # eval_mode: re-exported, it was defined here
    analysis_mode, as_tuple, checked_forward, eval_mode, output_tensor, seeded_generator, trainable_parameters, unwrap,
)
from ..core.engine.kernels import gradient_kernel, kernel_plan, normalize_kernel, repeat_checked_once
from ..core.param_bytes import parameter_bytes, value_bytes
from .objectives import check_timesteps, noisy_input

__all__ = ["state_kernel", "state_kernel_work", "make_states", "eval_mode"]


def make_states(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States ``(z, t)`` for every (clean input, level) pair: ``clean, noise [n, *shape]``,
    ``timesteps [L]`` (integers in [0, T), T the scheduler's num_train_timesteps; flow matching: reals
    in [0, T]) -> ``z [n·L, *shape]``,
    ``t [n·L]`` ordered point-major (row i·L + a); input i keeps its noise at every level."""
    if not isinstance(clean, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise TypeError(f"clean and noise must be Tensors [n, *shape], got {type(clean).__name__} and "
                        f"{type(noise).__name__}")
    # add_noise broadcasts: noise [1, *shape] (or [n, 1]) would give every input the same noise.
    if clean.dim() == 0 or clean.shape != noise.shape:
        raise ValueError(f"clean inputs {tuple(clean.shape)} and noise {tuple(noise.shape)} must have the same shape "
                         "[n, *shape]: one noise draw per clean input")
    if isinstance(timesteps, torch.Tensor) and timesteps.dim() == 0:
        timesteps = timesteps.reshape(1)
    # add_noise reads ᾱ[t]: a negative t would take ᾱ from the end of the schedule while t stays negative.
    timesteps = check_timesteps(timesteps, scheduler)
    if timesteps.numel() == 0:
        raise ValueError("timesteps is empty: pass at least one noise level")
    n, levels = clean.shape[0], timesteps.numel()
    x = clean.repeat_interleave(levels, dim=0)
    e = noise.repeat_interleave(levels, dim=0)
    t = timesteps.to(clean.device).repeat(n)
    return noisy_input(scheduler, x, e, t), t


class _Directional(nn.Module):
    """The scalar output ⟨r, f(x)⟩ of ``model`` along one output direction r (its parameters are
    the model's own)."""

    def __init__(self, model: nn.Module, direction: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("direction", direction, persistent=False)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = output_tensor(self.model(*inputs))
        return (out.reshape(out.shape[0], -1) * self.direction).sum(dim=1, keepdim=True)


def state_kernel(
    model: nn.Module,
    states: tuple[torch.Tensor, ...],
    others: tuple[torch.Tensor, ...] | None = None,
    *,
    output_sketch: int | None = None,
    seed: int = 0,
    memory_budget: int = 256 * 2**20,
    progress: bool = False,
    normalize: bool = True,
    wrappers: dict | None = None,
    errors: dict | None = None,
) -> torch.Tensor:
    """Normalized gradient kernel ``[M, N]`` (float64) between denoiser states (``normalize=False``: the
    kernel itself, Σ_o ⟨∇_θ f_o(state), ∇_θ f_o(other)⟩, or its sketch).

    Args:
        states: ``(z [M, *shape], t [M], *conditioning)``; ``others`` likewise ``[N]`` (default: ``states``).
        output_sketch: None for the exact trace kernel, or V Rademacher output directions: the
            kernel of each scalar output ⟨r_v, f⟩ is computed by the engine
            (:func:`~genkernel.core.engine.kernels.gradient_kernel`, within ``memory_budget``) and
            the V kernels are averaged (``normalize=False``: an unbiased estimate of the trace
            kernel; normalized: divided by the sketch's own diagonals, so |k̂| <= 1 and k̂(x, x) = 1).
        seed: seeds the sketch directions (a private generator).
        progress: a tqdm bar over the directions.
        wrappers: a dict the caller keeps between calls on the same model (an analyzer's records): the sketch's
            one-output wrapper is kept there, so that the engine's covering check of the model's layers, remembered
            per module, runs at the first call only (without it, at every call: measured on a tiny UNet2DModel,
            a third of a two-direction record's multiply-adds).
        errors: with ``output_sketch``, a dict this fills with ``"standard_error"``: the estimate's ``[M, N]``
            standard error, a jackknife over the V directions (infinite for V = 1: no spread to read), and
            ``"leave_one_out"``: the ``[V, M, N]`` estimates without each direction, from which any number read
            off the kernel gets its own jackknife error (:func:`~genkernel.diffusion.locality.sketch_jackknife`;
            absent for V = 1); left empty for the exact kernel.
    """
    states = as_tuple(states, name="states")
    if output_sketch is None:
        return gradient_kernel(model, states, others, normalize=normalize, memory_budget=memory_budget).to(torch.float64)
    if isinstance(output_sketch, bool) or not isinstance(output_sketch, int) or output_sketch < 1:
        raise ValueError(f"output_sketch must be None (exact) or a positive number of directions, got {output_sketch!r}")
    others_t = None if others is None else as_tuple(others, name="others")
    with torch.no_grad(), analysis_mode(model):
        d = checked_forward(model, tuple(t[:1] for t in states), name="states").shape[1]
        d2 = d if others_t is None else checked_forward(model, tuple(t[:1] for t in others_t), name="others").shape[1]
    if d2 != d:  # the directions [V, d] would broadcast against (or fail on) the others' outputs
        raise ValueError(f"states give {d} outputs per example but others give {d2}")
    first = next(iter(trainable_parameters(model).values()))
    directions, checked_along = _sketch_directions(output_sketch, d, seed)
    directions = directions.to(first)
    kernel = diag1 = diag2 = None
    pieces: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []  # per direction, for errors
    # One wrapper for every direction, its buffer set to each in turn: the factored engine's covering check is
    # remembered per module, and a new wrapper per direction ran it V times (on a small cross-attention UNet,
    # 0.2 s each: most of an analyzer's kernel structure). The check runs here, once, along a Gaussian direction:
    # a ±1 direction can cancel equal outputs (r = (1, -1) on two equal channels), and a block it leaves without
    # gradient passes the check whatever its factors miss, an outcome then kept for the directions that do not
    # cancel it (measured: a block seeing its batch reversed, 38 % of the kernel's scale off)
    one = _directional(model, d, first, wrappers)
    # (every direction is a read-out of one model on the same states: its repeatability checked once, along the
    # Gaussian direction, not again per direction, which was half of a record's passes)
    with repeat_checked_once(one):
        one.direction.copy_(checked_along)
        for inputs in (states, others_t) if others_t is not None else (states,):
            kernel_plan(one, inputs, memory_budget=memory_budget)
            if normalize and others_t is not None:  # _self_diagonal's one-example kernels: a check of one example
                kernel_plan(one, tuple(t[:1] for t in inputs), memory_budget=memory_budget)
        for r in tqdm(directions, desc="state kernel (sketched)", disable=not progress, leave=False):
            one.direction.copy_(r)
            k = gradient_kernel(one, states, others_t, memory_budget=memory_budget).to(torch.float64)
            kernel = k if kernel is None else kernel + k
            if not normalize:
                if errors is not None:
                    pieces.append((k, None, None))
                continue
            d1 = k.diagonal() if others_t is None else _self_diagonal(one, states, memory_budget)
            d2 = k.diagonal() if others_t is None else _self_diagonal(one, others_t, memory_budget)
            diag1 = d1 if diag1 is None else diag1 + d1
            diag2 = d2 if diag2 is None else diag2 + d2
            if errors is not None:
                pieces.append((k, d1, d2))
    if errors is not None:
        leave_one_out = _left_out(pieces, kernel, diag1, diag2, normalize)
        errors["standard_error"] = (torch.full_like(kernel, float("inf")) if leave_one_out is None
                                    else jackknife_error(leave_one_out))
        if leave_one_out is not None:
            errors["leave_one_out"] = leave_one_out
    if normalize:  # (the 1/V cancels in k / sqrt(k(x, x) k(x', x')))
        return normalize_kernel(kernel, diag1, diag2)
    # The mean over the V directions, (1/V) Σ_v ⟨J(z)ᵀ r_v, J(z')ᵀ r_v⟩, is the unbiased estimate of the trace
    # kernel; the sum was V times it.
    return kernel / output_sketch


def _left_out(pieces, kernel, diag1, diag2, normalize: bool) -> torch.Tensor | None:
    """``[V, M, N]``: the sketched (normalized) kernel estimated without each of the V directions; None for V = 1."""
    count = len(pieces)
    if count < 2:
        return None
    leave = []
    for k, d1, d2 in pieces:
        rest = kernel - k
        leave.append(normalize_kernel(rest, diag1 - d1, diag2 - d2) if normalize else rest / (count - 1))
    return torch.stack(leave)


def jackknife_error(leave_one_out: torch.Tensor) -> torch.Tensor:
    """The delete-one jackknife standard error ``sqrt((V - 1) / V Σ_v (θ_(v) - θ̄)²)`` of an estimate whose V
    leave-one-out values are ``leave_one_out [V, ...]``: shape ``[...]``."""
    count = leave_one_out.shape[0]
    return ((count - 1) / count * (leave_one_out - leave_one_out.mean(0)).square().sum(0)).sqrt()


def _sketch_directions(output_sketch: int, outputs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the sketch's ±1 directions [V, outputs], the Gaussian direction [outputs] the covering check runs along)``
    (float64) drawn from ``seed``: :func:`state_kernel`'s, and the direction :func:`state_kernel_work` checks its
    kept wrapper along, so that the outcome it leaves in ``wrappers`` is the one a record would find."""
    generator = seeded_generator(seed)
    directions = torch.randint(0, 2, (output_sketch, outputs), generator=generator) * 2 - 1
    return directions.to(torch.float64), torch.randn(outputs, generator=generator, dtype=torch.float64)


def _directional(model: nn.Module, outputs: int, like: torch.Tensor, wrappers: dict | None) -> _Directional:
    """A :class:`_Directional` of ``model`` with an ``[outputs]`` direction in ``like``'s dtype and device: the one
    kept in ``wrappers`` for them, else a new one (kept there)."""
    key = (id(model), outputs, like.dtype, like.device)
    one = None if wrappers is None else wrappers.get(key)
    if one is None or one.model is not model:
        one = _Directional(model, torch.zeros(outputs, dtype=like.dtype, device=like.device))
        if wrappers is not None:
            wrappers[key] = one
    return one


def _self_diagonal(model: nn.Module, states: tuple[torch.Tensor, ...], memory_budget: int) -> torch.Tensor:
    """k(x, x) of every state, one state at a time (no N × N kernel)."""
    return torch.cat([
        gradient_kernel(model, tuple(t[i : i + 1] for t in states), memory_budget=memory_budget).reshape(1)
        for i in range(states[0].shape[0])
    ]).to(torch.float64)


def state_kernel_work(model: nn.Module, states: tuple[torch.Tensor, ...], *, output_sketch: int | None = None,
                      memory_budget: int = 256 * 2**20, wrappers: dict | None = None, seed: int = 0) -> dict[str, float]:
    """Multiply-adds and bytes :func:`state_kernel` (``normalize=True``, ``others=None``) takes on ``states``, from
    the engine's own counts (:func:`~genkernel.core.engine.kernels.choose_engine`'s): ``{"kernel": the kernel's
    passes and pair products, "checks": the repeatability check (three forward and backward passes of one
    example, once per record), "forward_macs": one example's forward, "bytes": the engine's peak of Jacobians or
    factors held at once (two chunks of Jacobians, or the held side's factors, as the engine sizes them within
    ``memory_budget``) and the float64 kernel [M, M]}``. The covering check of a model's
    layers runs once per model and kind of input (with ``wrappers``, :func:`state_kernel`'s, once for the sketch's
    wrapper too), so it is not counted. Needs one example's forward and the
    engine's plan; nothing the size of the kernel is computed. ``seed``: :func:`state_kernel`'s; sketched, the
    wrapper's covering check runs along its Gaussian direction (an outcome kept in ``wrappers`` for the records)."""
    from ..core.cost import bare_step_forwards, hooked_forward_counts
    from ..core.engine.factored import _probe_sizes
    from ..core.engine.kernels import _chunking, _engine_plan, example_passes

    states = as_tuple(states, name="states")
    m = states[0].shape[0]
    one = tuple(t[:1] for t in states)
    with torch.no_grad(), analysis_mode(model):
        outputs = checked_forward(model, one, name="states").shape[1]
    with analysis_mode(model):
        activations, forward, trainable, layers = hooked_forward_counts(model, one, grad=True)
    params = trainable_parameters(model)
    total = sum(p.numel() for p in params.values())
    first = next(iter(params.values()))
    if output_sketch is not None:
        calls, d = output_sketch, 1
        target = _directional(model, outputs, first, wrappers)
        # along state_kernel's Gaussian direction, as a record checks: the plan below runs the wrapper's covering
        # check, remembered for the records, and along a zero direction every gradient is zero, so every block
        # passed whatever its factors miss (a block seeing its batch reversed: the records' kernel 0.31 off)
        target.direction.copy_(_sketch_directions(output_sketch, outputs, seed)[1])
    else:
        calls, d, target = 1, outputs, unwrap(model)  # (gradient_kernel unwraps it the same way)
    with analysis_mode(target):
        plan = _engine_plan(target, states, d, (m, m), "auto", None, memory_budget)
        if plan is None:
            from ..core.engine.kernels import _functional_rows
            rows = _functional_rows(params, d, memory_budget)
            passes = example_passes(m, m, rows, True, False, "functional")
            kernel = passes * (1 + 2 * d) * forward + m * m * d * total + m * d * total
            held = 2 * min(rows, m) * 2 * d * parameter_bytes(params)  # two chunks, vmap's doubling (each parameter's dtype)
        else:
            sizes = _probe_sizes(target, plan, states)
            chunking = _chunking(target, plan, states, d, (m, m), True, sizes, memory_budget)
            # per chunk of c cotangents: a block kept factored forms its activations' Gram T²·I again in each
            # (counted once for all d outputs, the kernel at c = 1 was 14 % low on a tiny UNet), and whether a block
            # materializes is decided at c
            c = min(chunking.cotangents, d)
            widths = [c] * (d // c) + ([d % c] if d % c else [])
            counts = [sizes.engine_counts(plan, width) for width in widths]
            materialized = sum(width * counted[1] for width, counted in zip(widths, counts)) / d
            pair = sum(counted[2] for counted in counts)
            fallback = sum(p.numel() for p in plan.fallback.values())
            passes = example_passes(m, m, chunking.rows, True, chunking.held, "factored")
            out_chunks = -(-d // max(chunking.cotangents, 1))
            # the backward of d cotangents forms the inputs' gradients of the layers after a trained one
            # (the first layer's input needs none), then the materialized blocks' per-example gradients
            kernel = (passes * (out_chunks * forward + d * (layers.input_gradients + materialized)) + m * m * pair
                      + (passes * (1 + 2 * d) * forward + m * m * d * fallback if fallback else 0))
            # the held side's factors and the streamed chunk's captures, or two chunks' captures recomputed per pair
            # (each of the engine's chunks of cotangents, c of the d outputs)
            # (as engine.kernels._chunking: the factors at the bytes per value, the fallback in its own dtypes)
            per_example = value_bytes(plan.params) * sizes.compact_factors(plan, c) + c * parameter_bytes(plan.fallback)
            captured = min(chunking.rows, m) * per_example
            held = m * per_example + captured if chunking.held else 2 * captured
            held += int(min(chunking.rows, m) * activations * value_bytes(params))  # the capture pass's activations
    # repeatable_output: three forward and backward passes of one example (the third with the parameters
    # substituted as torch.func substitutes them), once per record: sketched, along the Gaussian direction's plan,
    # its verdict kept for the directions (engine.kernels.repeat_checked_once), and one no-grad forward for the outputs
    checks = 3 * forward * bare_step_forwards(forward, trainable, 1, layers.input_gradients)
    extra = forward if output_sketch is not None else 0
    return {"kernel": float(calls * kernel), "checks": float(checks + extra), "forward_macs": float(forward),
            "bytes": float(held + 3 * m * m * 8)}
