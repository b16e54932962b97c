"""Analysis passes through a GAN's networks that leave training exactly as it was.

An analysis forward of D during training (the geometry w_i = ∇_x ℓ_G(D(x)) of a batch or of the
probes, the check of the user's generator losses) runs in D's *current* mode, so it sees what
training sees: a BatchNorm D in training mode normalizes with the batch's statistics, as in the
PyTorch DCGAN example's generator step. A training-mode forward also writes state: BatchNorm's
running statistics and ``num_batches_tracked``, spectral norm's power-iteration vectors u, v.
:func:`preserved` runs the pass on copies of every buffer and puts the original tensors back after
(and forks the RNG), so the pass leaves no trace: D's buffers and parameters compare ``torch.equal``
before and after, and a graph the user's forward saved them in can still backpropagate.

Spectral norm needs one more rule. A training-mode forward first advances u, v one power
iteration and then normalizes the weight with the new u, v. Before the training forward of a
step (an owned step) a pass in training mode therefore computes exactly the weight training is
about to use (and the buffers are put back). *After* the training forward (an observed loop: the
user's forward has run), another training-mode iteration would use a weight one iteration
further on; there ``reuse_power_iteration=True`` puts the spectral-norm modules alone in eval
mode, where they read the u, v that training's forward left: exactly the weight it used.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm

from ..core.adapter import preserved_state, unwrap


def power_iteration_modules(module: nn.Module) -> list[nn.Module]:
    """Modules whose training-mode forward runs spectral norm's power iteration: the
    ``parametrizations.spectral_norm`` modules and the layers with the legacy hook."""
    out = []
    for m in module.modules():
        if isinstance(m, _SpectralNorm) or any(isinstance(h, _LegacySpectralNorm) for h in m._forward_pre_hooks.values()):
            out.append(m)
    return out


@contextlib.contextmanager
def preserved(module: nn.Module | None, *, reuse_power_iteration: bool = False) -> Iterator[None]:
    """A pass through ``module`` in its current mode that changes none of its buffers and no RNG.

    During the pass every buffer slot holds a copy (running statistics, ``num_batches_tracked``,
    spectral norm's u and v), so whatever the forward writes goes to the copy; after it the original
    tensors are put back, untouched: not even their version counters move, so a graph the user's
    forward saved them in (training-mode BatchNorm) still backpropagates. The global RNG is forked,
    and with ``reuse_power_iteration`` the spectral-norm modules are in eval mode during the pass (see
    the module docstring). Parameters are not touched by a forward; ``.grad`` is not touched as long
    as the pass differentiates with ``torch.autograd.grad``. ``module=None``: a no-op.
    """
    if module is None:
        yield
        return
    held = [(m, m.training) for m in power_iteration_modules(module)] if reuse_power_iteration else []
    try:
        for m, _ in held:
            m.training = False
        with preserved_state(module):
            yield
    finally:
        for m, training in held:
            m.training = training


def classes_taken(module: nn.Module) -> bool | None:
    """Whether ``module``'s forward takes a second positional input (a conditional GAN's classes:
    G(z, y), D(x, y)): True when it needs two or more, False when it takes exactly one, None when the
    signature does not tell (``*args``, or a wrapper such as DistributedDataParallel whose inner
    module is read instead)."""
    inner = unwrap(module)
    try:
        signature = inspect.signature(inner.forward)
    except (TypeError, ValueError):
        return None
    positional = [p for p in signature.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
        return None
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(required) >= 2:
        return True
    if len(positional) == 1:
        return False
    return None  # a second positional input with a default: either use works


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of ``module`` by name (for checks that nothing changed)."""
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}


__all__ = ["preserved", "power_iteration_modules", "state_snapshot", "classes_taken"]
