"""Per-example losses ``loss_fn(outputs, targets) -> Tensor[B]`` for the tracker and trainers.

Shapes are checked (the batch on dimension 0 of both sides), so that targets laid out another
way are refused rather than paired with the wrong outputs. Checks of values run outside torch.func
transforms only (per-example engines call the losses under ``vmap``, where data-dependent checks
cannot run); the training step's own call checks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.adapter import targets_per_example, under_torch_func


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example over its output values: ``[B]`` (targets ``[B, ...]`` with
    as many values per example as the outputs, e.g. ``[B]`` for outputs ``[B, 1]``)."""
    return ((outputs - targets_per_example(outputs, targets, "mse_loss")) ** 2).reshape(outputs.shape[0], -1).mean(dim=1)


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per example (``outputs [B, C]`` logits, ``targets [B]`` (or ``[B, 1]``)
    integer class ids of any integer dtype, or ``[B, C]`` class probabilities, float or an integer
    one-hot): ``[B]``. An id of -100 (PyTorch's ``ignore_index``) gets loss 0 and still counts in
    the batch mean. Ids outside ``[0, C)`` and probability rows that are not distributions (a
    multi-hot row, which would add up several classes' losses) are refused."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"cross_entropy_loss needs targets as a Tensor, got {type(targets).__name__}")
    if outputs.dim() != 2:
        raise ValueError(f"cross_entropy_loss needs outputs [B, C] (one logit per class), got {tuple(outputs.shape)}")
    batch, classes = outputs.shape
    if targets.dim() == 2 and targets.shape[1] == 1 and not targets.is_floating_point():
        targets = targets.reshape(-1)  # class ids as a column
    if targets.dim() == 1 and targets.is_floating_point():
        raise ValueError(
            f"cross_entropy_loss: targets of shape [{targets.shape[0]}] must be integer class ids, got {targets.dtype} "
            "(use targets.long(); probabilities need shape [B, C])"
        )
    if targets.dim() == 1 and targets.shape[0] == batch:
        targets = targets.long()  # int32 / int16 / bool ids (F.cross_entropy takes int64 and uint8 only)
        if not under_torch_func(targets):
            bad = ~(((targets >= 0) & (targets < classes)) | (targets == -100))
            if bool(bad.any()):
                raise ValueError(
                    f"cross_entropy_loss: class ids must lie in [0, {classes}) (or be -100, ignored), got "
                    f"{sorted(set(targets[bad].tolist()))[:5]}"
                )
        return F.cross_entropy(outputs, targets, reduction="none")
    if targets.shape != outputs.shape:
        hint = " (class ids as a float column: use targets.reshape(-1).long())" if (
            targets.dim() == 2 and targets.shape[1] == 1) else ""
        raise ValueError(
            f"cross_entropy_loss: targets of shape {tuple(targets.shape)} fit neither class ids [{batch}] nor "
            f"probabilities [{batch}, {classes}] for outputs of shape {tuple(outputs.shape)}{hint}"
        )
    if not targets.is_floating_point():
        targets = targets.to(outputs.dtype)  # an integer one-hot [B, C]: the probabilities it holds
    if not under_torch_func(targets):
        t = targets.detach()
        eps = torch.finfo(t.dtype).eps
        rows = t.sum(dim=1)
        if not bool(((t >= 0) & (t <= 1)).all()) or not bool(((rows - 1).abs() <= max(1e-5, 4 * classes * eps)).all()):
            raise ValueError(
                "cross_entropy_loss: targets [B, C] must be class probabilities (in [0, 1], each row summing to 1), "
                f"got rows summing to {sorted(set(rows.tolist()))[:3]}: a multi-hot row adds up several classes' "
                "losses; for several labels per example use binary cross-entropy"
            )
    return F.cross_entropy(outputs, targets, reduction="none")


def logistic_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(−y f)) per example for labels y in {−1, +1} and one output: ``[B]``."""
    if outputs.numel() != outputs.shape[0]:
        raise ValueError(f"logistic_loss needs one output per example, got outputs of shape {tuple(outputs.shape)}")
    y = targets_per_example(outputs, targets, "logistic_loss").reshape(-1)
    if y.dtype == torch.bool:
        raise ValueError("logistic_loss needs labels in {-1, +1}, got a bool tensor: map it with 2 * y.long() - 1")
    # Labels in {0, 1} would run without error: y = 0 gives the constant log 2 and no gradient.
    if not under_torch_func(y) and not bool((y.detach().abs() == 1).all()):
        raise ValueError(
            f"logistic_loss needs labels in {{-1, +1}}, got values {sorted(set(y.detach().flatten().tolist()))[:5]}: "
            "map {0, 1} labels with 2 * y - 1"
        )
    return F.softplus(-y * outputs.reshape(-1))
