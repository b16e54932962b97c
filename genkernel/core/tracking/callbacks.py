"""The callback protocol shared by every genkernel trainer (diffusion, GAN, supervised).

A trainer builds an :class:`~genkernel.core.tracking.step.OptimizerStep` for each update and hands it to
its callbacks through :func:`perform_step`. A callback that keeps a ledger needs θ_k and the
batch *before* the update, so it wraps the step: ``wrap_step(trainer, step, perform)`` either
calls ``perform()`` (observe only) or takes the step over with ``tracker.track(step, groups)``,
which runs the same operations. At most one callback may take over a given step.

Lifecycle::

    on_train_start(trainer)
    for every optimizer step:            # step.phase: "train", "generator", "discriminator"
        wrap_step(trainer, step, perform) -> per-example losses [B]
        on_step_end(trainer, step)
    on_train_end(trainer)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from .step import OptimizerStep


class TrainerCallback:
    """Base class: every hook is optional and does nothing by default."""

    def on_train_start(self, trainer: Any) -> None:
        pass

    def wrap_step(self, trainer: Any, step: OptimizerStep, perform: Callable[[], torch.Tensor]) -> torch.Tensor:
        return perform()

    def on_step_end(self, trainer: Any, step: OptimizerStep) -> None:
        pass

    def on_train_end(self, trainer: Any) -> None:
        pass


def perform_step(callbacks: Sequence[TrainerCallback], trainer: Any, step: OptimizerStep) -> torch.Tensor:
    """Run ``step`` through every callback's ``wrap_step`` (first callback outermost), then
    ``on_step_end``. Returns the per-example losses ``[B]``."""
    perform: Callable[[], torch.Tensor] = step.run
    for callback in reversed(callbacks):
        perform = functools.partial(callback.wrap_step, trainer, step, perform)
    losses = perform()
    if not step.applied:
        raise RuntimeError(
            f"no callback performed the {step.phase} step: wrap_step must call perform() or take the step over"
        )
    for callback in callbacks:
        callback.on_step_end(trainer, step)
    return losses


def fire(callbacks: Sequence[TrainerCallback], hook: str, trainer: Any) -> None:
    """Call ``hook`` ("on_train_start" or "on_train_end") on every callback."""
    if hook not in ("on_train_start", "on_train_end"):
        raise ValueError(f"unknown hook {hook!r}")
    for callback in callbacks:
        getattr(callback, hook)(trainer)
