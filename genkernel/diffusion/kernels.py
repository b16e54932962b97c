"""Normalized gradient kernels between denoiser states (x_t, t), exact or output-sketched.

A *state* is a denoiser input, the tuple ``(z [M, *shape], t [M])``. The normalized kernel
k̂((z, s), (z', t)) = k / sqrt(k(z, z) k(z', t')) (DESIGN.md section 2) uses the trace kernel
k = tr J(z, s) J(z', t)ᵀ over the trainable parameters.

For d outputs and P parameters the exact kernel needs per-state Jacobians d×P (the core's
:func:`~genkernel.core.engine.kernels.gradient_kernel`): cheap for 2-D points, d = 256 backward passes
per state for a 16×16 image. ``output_sketch=V`` estimates the trace with V shared Rademacher
output directions r_v instead (Hutchinson): k ≈ (1/V) Σ_v ⟨J(z)ᵀ r_v, J(z')ᵀ r_v⟩, unbiased for
k, one per-state gradient per direction. The estimate is reported as sketched; its spread over
sketch seeds is the sketching error (reported separately from the ledger's residual).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad, vmap

from ..core.adapter import analysis_mode, as_tuple, batch_size, checked_forward, functional_model, trainable_parameters
from ..core.engine.kernels import gradient_kernel, normalize_kernel

__all__ = ["state_kernel", "make_states"]


def make_states(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States ``(z, t)`` for every (clean input, level) pair: ``clean, noise [n, *shape]``,
    ``timesteps [L]`` -> ``z [n·L, *shape]``, ``t [n·L]`` ordered point-major (row i·L + a)."""
    n, levels = clean.shape[0], timesteps.numel()
    x = clean.repeat_interleave(levels, dim=0)
    e = noise.repeat_interleave(levels, dim=0)
    t = timesteps.to(clean.device).repeat(n)
    return scheduler.add_noise(x, e, t), t


def state_kernel(
    model: nn.Module,
    states: tuple[torch.Tensor, ...],
    others: tuple[torch.Tensor, ...] | None = None,
    *,
    output_sketch: int | None = None,
    seed: int = 0,
    memory_budget: int = 256 * 2**20,
) -> torch.Tensor:
    """Normalized gradient kernel ``[M, N]`` (float64) between denoiser states.

    Args:
        states: ``(z [M, *shape], t [M])``; ``others`` likewise ``[N]`` (default: ``states``).
        output_sketch: None for the exact trace kernel, or V Rademacher output directions.
        seed: seeds the sketch directions (a private generator).
    """
    states = as_tuple(states, name="states")
    if output_sketch is None:
        return gradient_kernel(model, states, others, normalize=True, memory_budget=memory_budget).to(torch.float64)
    if not isinstance(output_sketch, int) or output_sketch < 1:
        raise ValueError(f"output_sketch must be None (exact) or a positive number of directions, got {output_sketch!r}")
    others_t = states if others is None else as_tuple(others, name="others")
    m, n = batch_size(states, name="states"), batch_size(others_t, name="others")
    params = {k: v.detach() for k, v in trainable_parameters(model).items()}
    num_params = sum(p.numel() for p in params.values())
    forward = functional_model(model)
    with torch.no_grad(), analysis_mode(model):
        d = checked_forward(model, tuple(t[:1] for t in states), name="states").shape[1]
    generator = torch.Generator().manual_seed(seed)
    first = next(iter(params.values()))
    directions = (torch.randint(0, 2, (output_sketch, d), generator=generator) * 2 - 1).to(first)
    chunk = max(1, memory_budget // (3 * num_params * first.element_size()))

    def projected(p, r, *x):
        return (forward(p, tuple(t.unsqueeze(0) for t in x))[0] * r).sum()

    per_state = vmap(grad(projected), in_dims=(None, None) + (0,) * len(states))

    def features(batch, r):
        rows = batch[0].shape[0]
        out = torch.empty((rows, num_params), dtype=first.dtype, device=first.device)
        for start in range(0, rows, chunk):
            sl = slice(start, min(rows, start + chunk))
            g = per_state(params, r, *(t[sl] for t in batch))
            out[sl] = torch.cat([g[name].reshape(g[name].shape[0], -1) for name in params], dim=1).detach()
        return out

    kernel = torch.zeros((m, n), dtype=torch.float64, device=first.device)
    diag1 = torch.zeros(m, dtype=torch.float64, device=first.device)
    diag2 = torch.zeros(n, dtype=torch.float64, device=first.device)
    with analysis_mode(model):
        for r in directions:
            f1 = features(states, r).to(torch.float64)
            f2 = f1 if others is None else features(others_t, r).to(torch.float64)
            kernel += f1 @ f2.T
            diag1 += (f1 * f1).sum(1)
            diag2 += (f2 * f2).sum(1)
    return normalize_kernel(kernel, diag1, diag2)
