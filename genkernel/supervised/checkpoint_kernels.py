"""Gradient kernels recorded at stated checkpoints while a model trains, for the path kernel
K^p = Σ_k η_k k_{θ_k} (docs/generalization.md, "The null space").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..core.adapter import analysis_mode, checked_forward
from ..core.tracking.callbacks import TrainerCallback
from ..core.engine.kernels import gradient_kernel

__all__ = ["CheckpointKernels", "geometric_checkpoints"]


def geometric_checkpoints(steps: int, count: int) -> list[int]:
    """About ``count`` distinct checkpoint steps in [0, steps), 0 first, spaced geometrically."""
    if steps < 1 or count < 1:
        raise ValueError(f"steps and count must be positive, got steps={steps}, count={count}")
    raw = np.unique(np.round(np.geomspace(1, steps, num=count)).astype(int) - 1)
    return sorted({0, *[int(v) for v in raw if v < steps]})


class CheckpointKernels(TrainerCallback):
    """Records the gradient kernel over training inputs and test probes every ``every`` steps.

    Checkpoints are θ_0, θ_every, θ_2·every, ..., or the steps listed in ``at`` (a left Riemann
    sum of the path): checkpoint k stands for the steps up to the next checkpoint (or the end) and
    gets weight η_k × that many steps, η_k read from the optimizer's first parameter group at that
    checkpoint. Training changes fastest early, so geometrically spaced ``at`` (see
    :func:`geometric_checkpoints`) describe the path better than evenly spaced ones.

    Args:
        train_x: ``[N, ...]`` training inputs; probe_x: ``[M, ...]`` test inputs (probes), the same
            shape per example, dtype and device.
        every: steps between checkpoints (ignored when ``at`` is given); steps: the total number
            of steps of the run (a run of another length is refused: the last checkpoint's weight
            counts the steps up to ``steps``).
        at: explicit checkpoint steps (must include 0, increasing, below ``steps``).

    Attributes after training:
        grams: list of ``[N, N]`` float64 kernels; crosses: list of ``[M, N]``; probe_self: list of
        ``[M]`` k(x, x); weights: list of floats η_k · every; checkpoints: their step indices;
        train_outputs / probe_outputs: lists of ``[N, d]`` / ``[M, d]`` model outputs at each
        checkpoint (for the loss weights w_n = ∂ℓ/∂f of the Domingos sum).
        Use :meth:`path_kernel` for the sums and :meth:`kernel_machine_change` for the
        Domingos reconstruction of the probes' change.
    """

    def __init__(self, train_x: torch.Tensor, probe_x: torch.Tensor, *, every: int = 1, steps: int,
                 at: Sequence[int] | None = None) -> None:
        if every < 1 or steps < 1:
            raise ValueError(f"every and steps must be positive, got every={every}, steps={steps}")
        if at is None:
            at = range(0, steps, every)
        at = [int(a) for a in at]
        if not at or at[0] != 0 or any(b <= a for a, b in zip(at, at[1:])) or at[-1] >= steps:
            raise ValueError(f"checkpoints must start at 0, increase strictly and stay below steps={steps}; got {at[:10]}")
        for name, t in (("train_x", train_x), ("probe_x", probe_x)):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == 0:
                raise ValueError(f"{name} must be a Tensor with at least one example on dimension 0, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if (train_x.shape[1:], train_x.dtype, train_x.device) != (probe_x.shape[1:], probe_x.dtype, probe_x.device):
            raise ValueError(
                f"train_x {tuple(train_x.shape)} ({train_x.dtype}, {train_x.device}) and probe_x "
                f"{tuple(probe_x.shape)} ({probe_x.dtype}, {probe_x.device}) must agree on the shape per example, "
                "dtype and device: one kernel is computed over both"
            )
        self.train_x, self.probe_x = train_x, probe_x
        self.every, self.steps = every, steps
        self.at = at
        self._next = dict(zip(at, at[1:] + [steps]))
        self.grams: list[torch.Tensor] = []
        self.crosses: list[torch.Tensor] = []
        self.probe_self: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.checkpoints: list[int] = []
        self.train_outputs: list[torch.Tensor] = []
        self.probe_outputs: list[torch.Tensor] = []

    def _record(self, trainer, step: int) -> None:
        n = self.train_x.shape[0]
        both = torch.cat([self.train_x, self.probe_x])
        k = gradient_kernel(trainer.model, both).to(torch.float64).cpu()
        # In the mode the kernel is computed in (eval, RNG untouched): a training-mode forward would
        # advance state such as spectral norm's power iteration and change training.
        with torch.no_grad(), analysis_mode(trainer.model):
            out = checked_forward(trainer.model, (both,), name="train_x and probe_x").to(torch.float64).cpu()
        self.train_outputs.append(out[:n])
        self.probe_outputs.append(out[n:])
        self.grams.append(k[:n, :n])
        self.crosses.append(k[n:, :n])
        self.probe_self.append(k[n:, n:].diagonal().clone())
        lr = float(trainer.optimizer.param_groups[0]["lr"])
        self.weights.append(lr * (self._next[step] - step))
        self.checkpoints.append(step)

    def on_train_start(self, trainer) -> None:
        if trainer.global_step != 0:
            raise RuntimeError("CheckpointKernels counts steps from 0: attach it to a fresh trainer")
        self._record(trainer, 0)

    def on_step_end(self, trainer, step) -> None:
        done = trainer.global_step + 1  # the trainer increments global_step after the callbacks
        if done > self.steps:
            raise ValueError(
                f"CheckpointKernels was built with steps={self.steps} but the run goes on to step {done}: the last "
                "checkpoint's weight would miss the extra steps. Build it with the run's number of steps"
            )
        if done in self._next:
            self._record(trainer, done)

    def on_train_end(self, trainer) -> None:
        if trainer.global_step != self.steps:
            raise ValueError(
                f"CheckpointKernels was built with steps={self.steps} but the run stopped after {trainer.global_step}: "
                "the last checkpoint's weight counts steps that did not happen (and checkpoints after them are "
                "missing). Build it with the run's number of steps"
            )

    def kernel_machine_change(self, loss_weight) -> torch.Tensor:
        """``[M, d]`` the Domingos sum −Σ_k η_k (1/N) Σ_n k_{θ_k}(x, x_n) w_n(θ_k) at the probes
        (a left Riemann sum over the checkpoints; for a full-batch mean loss and scalar outputs).

        Args:
            loss_weight: ``loss_weight(train_outputs [N, d]) -> [N, d]``, w_n = ∂ℓ_n/∂f, e.g.
                ``lambda f: 2 * (f - y)`` for the squared error (``y`` of shape ``[N, 1]``: a ``[N]``
                ``y`` would broadcast to ``[N, N]`` and is refused). The outputs it receives are the
                recorded ones, float64 on the CPU: close over CPU targets (``y.cpu()``).
        """
        if not self.weights:
            raise RuntimeError("no checkpoint recorded yet: attach the callback to a trainer and train")
        n, d = self.train_outputs[0].shape
        if d != 1:
            # The recorded kernels are traces over the outputs; the sum needs the d×d blocks K(x, x_n).
            raise ValueError(
                f"kernel_machine_change needs a model with one output, this one has {d}: the recorded kernels are "
                "traces over the outputs, and the Domingos sum needs their d×d blocks (gradient_kernel(..., "
                "reduce='none'))"
            )
        total = torch.zeros_like(self.probe_outputs[0])
        for w, cross, f in zip(self.weights, self.crosses, self.train_outputs):
            weight = loss_weight(f)
            if not isinstance(weight, torch.Tensor) or weight.shape != f.shape:
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(
                    f"loss_weight must return one weight per recorded output, shape {tuple(f.shape)}, got {shape}; "
                    "targets of shape [N] broadcast against outputs [N, 1]: use y.reshape(-1, 1)"
                )
            total -= w / n * cross @ weight.to(torch.float64)
        return total

    def path_kernel(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gram [N, N], cross [M, N], probe_self [M])`` of K^p = Σ_k η_k k_{θ_k}."""
        if not self.weights:
            raise RuntimeError("no checkpoint recorded yet: attach the callback to a trainer and train")
        w = torch.tensor(self.weights, dtype=torch.float64)
        return (
            torch.einsum("k,kij->ij", w, torch.stack(self.grams)),
            torch.einsum("k,kij->ij", w, torch.stack(self.crosses)),
            torch.einsum("k,ki->i", w, torch.stack(self.probe_self)),
        )
