"""One optimizer step, described once and performed the same way with or without analysis.

Trainers build an :class:`OptimizerStep` for every update and call ``run()``; an analyzer that
wraps the step calls ``compute_gradients()`` and ``apply_update()`` itself, with its analysis
between them. Both paths execute the same operations in the same order, which is why attaching
an analyzer leaves training bit-for-bit unchanged.

The loss of a step is Σ_n c_n ℓ_n with per-example coefficients c_n (``weights``); the default
is the mean, computed as ``losses.mean()`` exactly as an untracked loop would.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..adapter import Batch, as_tuple, batch_size, not_fitting_inputs, output_tensor
from ..errors import NonFiniteError

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def check_max_grad_norm(value: Any) -> None:
    """ValueError unless ``value`` is a positive number (``math.inf``: no clipping): what a step and the
    trainers that build steps (refusing it at construction, before any callback runs) accept."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"max_grad_norm must be a positive number (math.inf for no clipping), got {value!r}")


@dataclass
class OptimizerStep:
    """Everything needed to perform (and to analyse) one optimizer step.

    Attributes:
        model, optimizer: what is trained.
        loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]`` per-example losses, where
            ``outputs`` is the model's output tensor for the batch.
        inputs: Tensor or tuple of Tensors (positional model arguments), batch on dim 0.
        targets: Tensor, tuple of Tensors, or None.
        weights: per-example coefficients c_n ``Tensor[B]``; None means the mean (1/B).
        max_grad_norm: clip the global gradient norm to this value (inf: no clipping).
        phase: a label for trainers with several optimizers ("generator", "discriminator").
        info: free-form extras for analyzers (timesteps, latents, ...).
        applied: whether the update is in the parameters (set by :meth:`apply_update`; a tracker that
            rolls the step back after a failure sets it back to False), so that a trainer whose step
            raised can tell an update made (an error after it, in a callback) from one never made.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    inputs: Batch
    targets: Batch | None = None
    weights: torch.Tensor | None = None
    max_grad_norm: float = math.inf
    phase: str = "train"
    info: dict[str, Any] = field(default_factory=dict)
    clip_factor: float = field(default=1.0, init=False)
    losses: torch.Tensor | None = field(default=None, init=False)
    applied: bool = field(default=False, init=False)
    # The model's output tensor with its graph, set during ``before_backward`` only (an analyzer
    # checks there that each example's loss reads its own output rows alone).
    outputs: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.inputs = as_tuple(self.inputs, name="inputs")
        if self.targets is not None and not isinstance(self.targets, torch.Tensor):
            self.targets = as_tuple(self.targets, name="targets")
        self.batch = batch_size(self.inputs, name="inputs")
        if self.weights is not None:
            if not isinstance(self.weights, torch.Tensor) or self.weights.shape != (self.batch,):
                shape = getattr(self.weights, "shape", type(self.weights).__name__)
                raise ValueError(f"weights must be a Tensor of shape [{self.batch}] (one c_n per example), got {shape}")
        check_max_grad_norm(self.max_grad_norm)

    def compute_gradients(self, before_backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Forward, per-example losses, backward, clipping. Returns the losses ``[B]`` (detached).

        ``before_backward(losses)``: called with the per-example losses, graph attached, between the
        forward and the backward (an analyzer takes group gradients from the step's own graph there,
        with ``retain_graph=True``; training is unchanged); :attr:`outputs` holds the model's output
        tensor during the call.

        Raises NonFiniteError before any parameter changes when a loss or gradient is not finite.
        Refuses a step already applied before running anything (a second forward would draw dropout
        masks again, update batch statistics again and overwrite the gradients of the update made).
        """
        if self.applied:
            raise RuntimeError(
                f"this {self.phase} step was already applied: a step is performed once (a callback's wrap_step must "
                "call perform() at most once, and only one analyzer may take over a step)"
            )
        try:
            outputs = output_tensor(self.model(*self.inputs))
        except Exception as error:
            if not not_fitting_inputs(error):
                raise
            shapes = [tuple(t.shape) for t in self.inputs]
            raise ValueError(f"inputs of shapes {shapes} do not fit {type(self.model).__name__}: {error}") from error
        losses = self.loss_fn(outputs, self.targets)
        if isinstance(losses, torch.Tensor) and torch.is_grad_enabled() and not losses.requires_grad:
            raise ValueError(
                "loss_fn returned losses that do not depend on the model's parameters (detached, or computed under "
                "torch.no_grad()): return the per-example losses with their graph"
            )
        if not isinstance(losses, torch.Tensor) or losses.shape != (self.batch,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return per-example losses of shape [{self.batch}], got {shape}; "
                "use reduction='none' and average over non-batch dimensions only"
            )
        if not torch.isfinite(losses).all():
            bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
            raise NonFiniteError(f"non-finite loss at examples {bad[:10]}")
        if before_backward is not None:
            self.outputs = outputs
            try:
                before_backward(losses)
            finally:
                self.outputs = None
        loss = losses.mean() if self.weights is None else (losses * self.weights.to(losses)).sum()
        self.optimizer.zero_grad()
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if any(not torch.isfinite(p.grad).all() for p in params):
            raise NonFiniteError("non-finite gradient")
        if math.isfinite(self.max_grad_norm):
            total = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            if not torch.isfinite(total):
                # Finite gradients whose norm overflows (float16 beyond 65504): clip_grad_norm_ scaled
                # them by max_norm / inf = 0, an update of zero gradients the optimizer must not take.
                raise NonFiniteError(f"the gradient norm overflows {total.dtype} (finite gradients, norm {float(total)})")
            # The factor clip_grad_norm_ applied, as PyTorch computes it: in the norm's dtype
            # (float32 for float32 gradients), not in float64, so that grad = raw grad * clip_factor
            # holds exactly (a float64 quotient was 1 ulp off for float32, 0.4 % for bfloat16).
            self.clip_factor = float(torch.clamp(float(self.max_grad_norm) / (total + 1e-6), max=1.0))
        self.losses = losses.detach()
        return self.losses

    def apply_update(self) -> None:
        """The real ``optimizer.step()``; a step is applied once."""
        if self.applied:
            raise RuntimeError(
                f"this {self.phase} step was already applied: only one analyzer may take over a step"
            )
        self.optimizer.step()
        self.applied = True

    def run(self) -> torch.Tensor:
        """Perform the step without analysis. Returns the per-example losses ``[B]``."""
        losses = self.compute_gradients()
        self.apply_update()
        return losses
