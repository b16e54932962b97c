"""Structurally null parameters: trainable parameters whose loss gradient is zero in exact arithmetic.

A bias feeding a training-mode BatchNorm (the default ``nn.Linear``/``nn.Conv2d`` bias before it) shifts every
example of a channel alike, which the normalization subtracts again: every example's gradient with respect to it is
exactly zero for any loss. In float32 the backward leaves ~1e-9 of rounding noise there, which an adaptive optimizer
(Adam, RMSprop, Adagrad, ...: per-coordinate normalization) turns into a move of order lr that the probes see in eval
mode (running statistics). No example caused it: split to the groups, each group would get its own rounding noise
times the preconditioner (0.015-0.95 of the change off a float64 brute force). The splitter books such a parameter's
whole update to the rest instead (:attr:`UpdateSplitter.null`), and the ledger keeps that part apart
(``PathKernelLedger.null_moves``).

Found on a float64 copy of the module in its current modes: two forward and backward passes, on the first
:data:`NULL_PROBES` probes and on a perturbed copy of them, with random output cotangents; a parameter whose gradient is at float64 rounding level
(≤ :data:`NULL_TOLERANCE` of the largest entry of the whole gradient) in both passes, and not exactly zero in both
(a unit the probes leave unused, a dead ReLU: not a cancellation, and it may come alive), is structurally null.
Only parameters of a dtype coarser than float64 are looked at (in float64 the noise is at 1e-17: nothing to book
apart, and float64 models keep their numbers bit for bit). The real module, the optimizer and every global random
generator are left as they are."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..adapter import output_tensor

# Relative to the largest entry of the whole float64 gradient: 1e3 units of float64 rounding.
NULL_TOLERANCE = 1e3 * torch.finfo(torch.float64).eps
# The passes run on the first this many probes (a batch statistic needs more than one; the cost stays two small passes).
NULL_PROBES = 8


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
                "_state_dict_hooks", "_load_state_dict_pre_hooks")


# Forward pre-hooks that are part of the module's function: torch.nn.utils.spectral_norm and weight_norm (the hook
# forms, common in GAN discriminators) compute the weight from weight_orig (or weight_g, weight_v) before every forward.
# Without them the copy ran with the weight last computed (float32 beside float64 inputs: the copy failed, and with it
# the search, silently: G's output bias before such a D's BatchNorm was split to the groups, 4e-3 off, residual 0.08).
_FUNCTIONAL_PRE_HOOKS = (SpectralNorm, WeightNorm)


def _hookless_memo(module: nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo that gives the copy empty hook tables: a hook is not copied at all (a bound method's
    object, a trainer or a logger behind it, would be deep-copied with it, or refuse the copy and with it the
    search). Spectral and weight norm's hooks (:data:`_FUNCTIONAL_PRE_HOOKS`, their settings only) are kept, shared,
    and the weight they computed last is copied detached (deepcopy refuses a tensor with a graph)."""
    memo: dict[int, object] = {}
    for m in module.modules():
        for key in _HOOK_TABLES:
            table = getattr(m, key, None)
            if isinstance(table, dict):
                memo[id(table)] = type(table)()
        pre_hooks = getattr(m, "_forward_pre_hooks", None)
        for hook_id, hook in (pre_hooks.items() if isinstance(pre_hooks, dict) else ()):
            if isinstance(hook, _FUNCTIONAL_PRE_HOOKS):
                memo[id(pre_hooks)][hook_id] = hook
                weight = m.__dict__.get(hook.name)
                if isinstance(weight, torch.Tensor):
                    memo[id(weight)] = weight.detach().clone()
    return memo


def structurally_null(module: nn.Module, params: dict[str, torch.Tensor], probes: tuple[torch.Tensor, ...],
                      *, seed: int = 0, through: nn.Module | None = None) -> tuple[str, ...]:
    """Names (in ``params``' order) of the structurally null parameters of ``module`` in its current modes (see the
    module docstring); ``()`` where none is coarser than float64, or where the float64 copy cannot be made or run
    (nothing is booked apart then, as before). ``through``: a module the loss reads ``module``'s outputs through,
    called as ``through(output, *probes[1:])`` (a GAN generator's discriminator: a training-mode BatchNorm after D's
    first linear layer cancels a shift of every sample, G's output bias); its float64 copy, in its current modes,
    runs between ``module``'s output and the random cotangents."""
    coarse = [n for n, p in params.items() if p.is_floating_point() and torch.finfo(p.dtype).eps > torch.finfo(torch.float64).eps]
    if not coarse or not probes:
        return ()
    ids = {id(p): n for n, p in params.items()}
    probes = tuple(t[:NULL_PROBES] for t in probes)
    devices = sorted({t.device for t in probes if t.is_cuda}, key=str)
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            twin = copy.deepcopy(module, _hookless_memo(module))  # (no hook of the real module runs on the copy)
            after = None if through is None else copy.deepcopy(through, _hookless_memo(through)).double()
            names = {}
            for (_, p_twin), (_, p) in zip(twin.named_parameters(), module.named_parameters()):
                if id(p) in ids:
                    names[ids[id(p)]] = p_twin
            if names.keys() != params.keys():
                return ()
            twin.double()
            generator = torch.Generator(device="cpu").manual_seed(seed)
            passes = []
            for perturb in (False, True):
                inputs = []
                for t in probes:
                    t = t.detach()
                    if t.is_floating_point():
                        t = t.double()
                        if perturb:
                            noise = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device)
                            t = t + 0.1 * (t.abs().mean() + 1.0) * noise
                    inputs.append(t)
                out = output_tensor(twin(*inputs))
                if after is not None:
                    out = output_tensor(after(out, *inputs[1:]))
                if not out.is_floating_point():
                    return ()
                cot = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
                grads = torch.autograd.grad((out.double() * cot).sum(), [names[n] for n in params], allow_unused=True)
                passes.append(dict(zip(params, grads)))
    except Exception:  # (a module that cannot be copied or run in float64 this way: nothing found)
        return ()
    # each pass's largest gradient entry, once (not once per parameter: a full pass over the gradients each time)
    scales = [max((float(v.abs().max()) for v in grads.values() if v is not None and v.numel()), default=0.0)
              for grads in passes]
    null = []
    for n in coarse:
        small, nonzero = True, False
        for grads, scale in zip(passes, scales):
            g = grads[n]
            if g is None or not g.numel() or not scale > 0 or not bool(torch.isfinite(g).all()):
                small = False
                break
            size = float(g.abs().max())
            small = small and size <= NULL_TOLERANCE * scale
            nonzero = nonzero or size > 0
        if small and nonzero:
            null.append(n)
    return tuple(null)


__all__ = ["NULL_PROBES", "NULL_TOLERANCE", "structurally_null"]
