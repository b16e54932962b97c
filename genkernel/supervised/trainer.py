"""A small supervised trainer with the shared callback protocol.

Lifecycle: ``trainer = SupervisedTrainer(model, optimizer, loss_fn, callbacks=[...])``, then
``trainer.fit(x, y, steps=...)``. Each update is an :class:`OptimizerStep` whose ``info`` holds
the batch's dataset ``indices`` (so analyzers can group by example or class) and is performed
through :func:`perform_step`, so a :class:`LedgerCallback` can take it over without changing
training.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapter import Batch, as_tuple, batch_size, select
from ..core.tracking.callbacks import TrainerCallback, fire, perform_step
from ..core.tracking.step import LossFn, OptimizerStep
from ..core.tracking.tracker import PathKernelTracker


class SupervisedTrainer:
    """Mini-batch training of ``model`` on an in-memory dataset.

    Args:
        model, optimizer, loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]``.
        batch_size: examples per step (sampled without replacement within each epoch).
        max_grad_norm: global-norm clipping (inf: none).
        callbacks: :class:`TrainerCallback` objects.
        seed: seeds the batch order (its own generator; the global RNG is untouched).
        progress: show a tqdm bar.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        batch_size: int = 64,
        max_grad_norm: float = math.inf,
        callbacks: Sequence[TrainerCallback] = (),
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm
        self.callbacks = list(callbacks)
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress
        self.global_step = 0
        self.history: list[float] = []

    def batches(self, n: int, steps: int):
        """Yield ``steps`` index tensors of size ``batch_size``, epoch by epoch."""
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if order.numel() < self.batch_size:
                order = torch.cat([order, torch.randperm(n, generator=self.generator)])
            yield order[: self.batch_size]
            order = order[self.batch_size :]

    def fit(self, inputs: Batch, targets: Batch, *, steps: int) -> list[float]:
        """Train for ``steps`` optimizer steps. Returns the mean loss of every step."""
        xs = as_tuple(inputs, name="inputs")
        ys = targets if isinstance(targets, torch.Tensor) else as_tuple(targets, name="targets")
        n = batch_size(xs, name="inputs")
        if n < self.batch_size:
            raise ValueError(f"the dataset has {n} examples, fewer than batch_size={self.batch_size}")
        fire(self.callbacks, "on_train_start", self)
        for indices in tqdm(self.batches(n, steps), total=steps, disable=not self.progress, desc="train"):
            step = OptimizerStep(
                self.model,
                self.optimizer,
                self.loss_fn,
                select(xs, indices),
                ys[indices] if isinstance(ys, torch.Tensor) else select(ys, indices),
                max_grad_norm=self.max_grad_norm,
                info={"indices": indices},
            )
            losses = perform_step(self.callbacks, self, step)
            self.global_step += 1
            self.history.append(float(losses.mean()))
        fire(self.callbacks, "on_train_end", self)
        return self.history


class LedgerCallback(TrainerCallback):
    """Keeps a :class:`PathKernelTracker` ledger over a trainer's steps, grouping each example by
    ``group_of[dataset index]`` (e.g. its class, or ``arange(N)`` for one group per example).

    Args:
        tracker: built on the trainer's model and optimizer.
        group_of: ``LongTensor[N]``, the group of every training example.
        start_step: steps before this global step are performed untracked (warm-up).
    """

    def __init__(self, tracker: PathKernelTracker, group_of: torch.Tensor, *, start_step: int = 0) -> None:
        self.tracker = tracker
        self.group_of = torch.as_tensor(group_of, dtype=torch.long)
        self.start_step = start_step

    def wrap_step(self, trainer, step, perform):
        if trainer.global_step < self.start_step:
            return perform()
        return self.tracker.track(step, self.group_of[step.info["indices"]]).losses
