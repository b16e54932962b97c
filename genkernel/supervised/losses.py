"""Per-example losses ``loss_fn(outputs, targets) -> Tensor[B]`` for the tracker and trainers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example over its output values: ``[B]``."""
    return ((outputs - targets.reshape(outputs.shape)) ** 2).reshape(outputs.shape[0], -1).mean(dim=1)


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per example (``outputs [B, C]`` logits, ``targets [B]`` class ids): ``[B]``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def logistic_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(−y f)) per example for labels y in {−1, +1} and one output: ``[B]``."""
    return F.softplus(-targets.reshape(-1) * outputs.reshape(-1))
