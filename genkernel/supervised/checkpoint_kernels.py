"""Gradient kernels recorded at stated checkpoints while a model trains, for the path kernel
K^p = Σ_k η_k k_{θ_k} (DESIGN.md section 2, "Generalization and the null space").
"""

from __future__ import annotations

import torch

from ..core.callbacks import TrainerCallback
from ..core.kernels import gradient_kernel

__all__ = ["CheckpointKernels"]


class CheckpointKernels(TrainerCallback):
    """Records the gradient kernel over training inputs and test probes every ``every`` steps.

    Checkpoints are θ_0, θ_every, θ_2·every, ... (a left Riemann sum of the path): checkpoint k
    stands for the ``every`` steps that follow it and gets weight η_k · every, η_k read from the
    optimizer's first parameter group at that checkpoint.

    Args:
        train_x: ``[N, ...]`` training inputs; probe_x: ``[M, ...]`` test inputs (probes).
        every: steps between checkpoints; steps: the total number of steps of the run (the last
            checkpoint is the last multiple of ``every`` below it).

    Attributes after training:
        grams: list of ``[N, N]`` float64 kernels; crosses: list of ``[M, N]``; probe_self: list of
        ``[M]`` k(x, x); weights: list of floats η_k · every; checkpoints: their step indices.
        Use :meth:`path_kernel` for the sums.
    """

    def __init__(self, train_x: torch.Tensor, probe_x: torch.Tensor, *, every: int, steps: int) -> None:
        if every < 1 or steps < 1:
            raise ValueError(f"every and steps must be positive, got every={every}, steps={steps}")
        self.train_x, self.probe_x = train_x, probe_x
        self.every, self.steps = every, steps
        self.grams: list[torch.Tensor] = []
        self.crosses: list[torch.Tensor] = []
        self.probe_self: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.checkpoints: list[int] = []

    def _record(self, trainer, step: int) -> None:
        n = self.train_x.shape[0]
        both = torch.cat([self.train_x, self.probe_x])
        k = gradient_kernel(trainer.model, both).to(torch.float64).cpu()
        self.grams.append(k[:n, :n])
        self.crosses.append(k[n:, :n])
        self.probe_self.append(k[n:, n:].diagonal().clone())
        lr = float(trainer.optimizer.param_groups[0]["lr"])
        self.weights.append(lr * min(self.every, self.steps - step))
        self.checkpoints.append(step)

    def on_train_start(self, trainer) -> None:
        self._record(trainer, trainer.global_step)

    def on_step_end(self, trainer, step) -> None:
        done = trainer.global_step + 1  # the trainer increments global_step after the callbacks
        if done % self.every == 0 and done < self.steps:
            self._record(trainer, done)

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
