"""One optimizer step, described once and performed the same way with or without analysis.

Trainers build an :class:`OptimizerStep` for every update and call ``run()``; an analyzer that
wraps the step calls ``compute_gradients()`` and ``apply_update()`` itself, with its analysis
between them. Both paths execute the same operations in the same order, which is why attaching
an analyzer leaves training bit-for-bit unchanged.

The loss of a step is Σ_n c_n ℓ_n with per-example coefficients c_n (``weights``); the default
is the mean, computed as ``losses.mean()`` exactly as an untracked loop would. With
``micro_batches=K`` the batch is split into K micro-batches (``torch.tensor_split``: sizes differ by at
most one), each run forward and backward on its own with the gradients summed (gradient
accumulation: the memory of one micro-batch), before one clipping and one optimizer step; micro-batch
j's loss is Σ_{n ∈ j} ℓ_n / B (with ``weights``, Σ_{n ∈ j} c_n ℓ_n), so the step minimizes the same
Σ_n c_n ℓ_n as the whole batch at once, up to rounding. Under DistributedDataParallel the micro-batches
before the last run inside its ``no_sync()``: one all-reduce of the summed gradient per step.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..adapter import (Batch, as_tuple, batch_size, floating_parameter, not_fitting_inputs, not_fitting_message,
                       output_tensor, unwrap_optimizer)
from ..errors import NonFiniteError, SkippedStep

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
# What a step's forward may run under autocast to (None: the model's own precision).
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)


def check_max_grad_norm(value: Any) -> None:
    """ValueError unless ``value`` is a positive number (``math.inf``: no clipping): what a step and the
    trainers that build steps (refusing it at construction, before any callback runs) accept."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"max_grad_norm must be a positive number (math.inf for no clipping), got {value!r}")


# A trainer's mixed_precision setting and the dtype its steps run their forward under autocast to
# ("fp16" with a GradScaler: trainer_grad_scaler).
TRAINER_PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# GradScaler skips in a row after which a trainer stops: the gradients stay non-finite as the scale falls.
MAX_SKIPS_IN_A_ROW = 64


def trainer_autocast_dtype(mixed_precision: Any, model: nn.Module) -> torch.dtype | None:
    """The :attr:`OptimizerStep.autocast_dtype` of a trainer built with ``mixed_precision`` ("no", "bf16",
    "fp16") for ``model``; ValueError for another setting, or a half precision on a model whose
    floating-point parameters are not all float32 (autocast leaves float64 alone; half-precision weights
    round every update away)."""
    if not isinstance(mixed_precision, str) or mixed_precision not in TRAINER_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {tuple(TRAINER_PRECISIONS)}, got {mixed_precision!r}")
    dtype = TRAINER_PRECISIONS[mixed_precision]
    if dtype is not None:
        odd = [p for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32]
        others = sorted({str(p.dtype).removeprefix("torch.") for p in odd})
        if others:
            why = ("half-precision weights round each update away" if any(p.requires_grad for p in odd) else
                   "frozen ones included: diffusers' scripts cast a frozen UNet to the mixed precision's dtype, "
                   "here the trainer's inputs and an analyzer's passes would run in it")
            raise ValueError(
                f"mixed_precision={mixed_precision!r} runs a float32 model's forward under torch.autocast, but this "
                f"model has {' and '.join(others)} parameters (autocast leaves float64 alone; {why}): keep float32 "
                "parameters (model.float()), or train with mixed_precision='no'"
            )
    return dtype


def trainer_grad_scaler(mixed_precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The GradScaler a trainer built with ``mixed_precision="fp16"`` scales its losses with on ``device``
    (torch's defaults: 2^16 to start, halved at a step with inf/NaN, doubled after 2000 clean ones), or None."""
    return torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None


def until_applied(attempt: Callable[[], Any], scaler: torch.amp.GradScaler | None, skipped: Callable[[], None]) -> Any:
    """``attempt()`` (one step of a trainer, drawing its batch) again after each GradScaler skip
    (:class:`SkippedStep`; ``skipped()`` counts it) until one returns; returns what it returns. A
    NonFiniteError (:class:`SkipStreak`) after :data:`MAX_SKIPS_IN_A_ROW` skips in a row."""
    streak = SkipStreak(scaler)
    while True:
        try:
            return attempt()
        except SkippedStep as error:
            skipped()
            streak.skipped(error)


class SkipStreak:
    """GradScaler skips in a row of one trainer (both players of a GAN count in one streak, as its one scaler
    backs off for either): :meth:`skipped` raises the NonFiniteError that stops training at the
    :data:`MAX_SKIPS_IN_A_ROW`-th, naming the scale reached and the fixes; :meth:`applied` ends the streak."""

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler
        self.count = 0

    def skipped(self, error: BaseException) -> None:
        self.count += 1
        if self.count < MAX_SKIPS_IN_A_ROW:
            return
        count, self.count = self.count, 0  # (training called again, at the lowered scale, starts a streak of its own)
        raise NonFiniteError(
            f"the GradScaler skipped {count} steps in a row (the loss scale is now {self.scaler.get_scale():g}): the "
            f"gradients stay non-finite as the scale falls ({error}). Lower the learning rate, or train with "
            "mixed_precision='bf16' or 'no'"
        ) from error

    def applied(self) -> None:
        self.count = 0


def autocast_to(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing for ``dtype=None`` (the model's own
    precision): what a trainer's mixed-precision passes run in."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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
        micro_batches: K, the number of micro-batches the batch is run in (gradient accumulation;
            1: the whole batch at once), at most the batch size.
        phase: a label for trainers with several optimizers ("generator", "discriminator").
        autocast_dtype: run the forward and ``loss_fn`` under ``torch.autocast`` to this dtype
            (``torch.bfloat16``, ``torch.float16``) on the model's device type, as a mixed-precision
            loop does (the parameters, their gradients and the update stay in the model's dtype);
            None (default): in the model's own precision.
        grad_scaler: a ``torch.amp.GradScaler`` (float16): every micro-batch's backward runs on the
            loss times its scale (:attr:`loss_scale`), the gradients are unscaled before the
            non-finite check and the clipping, and the update is ``scaler.step`` then
            ``scaler.update()``; inf or NaN found (or a non-finite loss, whose backward would overflow)
            lowers the scale and raises :class:`SkippedStep` before anything is updated. None (default),
            or a disabled scaler: no scaling.
        info: free-form extras for analyzers (timesteps, latents, ...).
        applied: whether the update is in the parameters (set by :meth:`apply_update`; a tracker that
            rolls the step back after a failure sets it back to False), so that a trainer whose step
            raised can tell an update made (an error after it, in a callback) from one never made.
        torn: ``optimizer.step()`` (a GradScaler's ``step``/``update()``) raised part-way, an interrupt or an
            out-of-memory error: the parameters and the optimizer's state may hold part of the update (an Adam
            without ``foreach`` updates them one at a time), neither the step made nor one never made. A tracker
            that rolls the step back sets it back to False; a trainer that finds it set refuses to go on
            (:func:`torn_update`).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    inputs: Batch
    targets: Batch | None = None
    weights: torch.Tensor | None = None
    max_grad_norm: float = math.inf
    micro_batches: int = 1
    phase: str = "train"
    info: dict[str, Any] = field(default_factory=dict)
    autocast_dtype: torch.dtype | None = None
    grad_scaler: Any = None
    clip_factor: float = field(default=1.0, init=False)
    losses: torch.Tensor | None = field(default=None, init=False)
    applied: bool = field(default=False, init=False)
    torn: bool = field(default=False, init=False)
    # The GradScaler's scale the step's backward ran at (1.0 without one), and its state before apply_update's
    # update() (undo_scaler_update puts it back).
    loss_scale: float = field(default=1.0, init=False)
    _scaler_before: dict[str, Any] | None = field(default=None, init=False, repr=False)
    # The model's output tensor with its graph, set during ``before_backward`` only (an analyzer
    # checks there that each example's loss reads its own output rows alone).
    outputs: torch.Tensor | None = field(default=None, init=False, repr=False)
    # The rows of the batch whose losses ``before_backward`` is given (one micro-batch's), set during it only.
    rows: slice | None = field(default=None, init=False, repr=False)

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
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {AUTOCAST_DTYPES} (None: the model's own precision), "
                             f"got {self.autocast_dtype!r}")
        if self.grad_scaler is not None:
            if not isinstance(self.grad_scaler, torch.amp.GradScaler):
                raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(self.grad_scaler).__name__}")
            if not self.grad_scaler.is_enabled():
                self.grad_scaler = None
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, numbers.Integral) \
                or self.micro_batches < 1:
            raise ValueError(f"micro_batches must be a positive int (1: no gradient accumulation), got {self.micro_batches!r}")
        self.micro_batches = int(self.micro_batches)
        if self.micro_batches > self.batch:
            raise ValueError(f"a batch of {self.batch} examples cannot be run in {self.micro_batches} micro-batches: "
                             f"pass micro_batches <= {self.batch}")
        if self.micro_batches > 1:
            targets = () if self.targets is None else as_tuple(self.targets, name="targets")
            unbatched = [tuple(t.shape) for t in targets if t.dim() == 0 or t.shape[0] != self.batch]
            if unbatched:
                raise ValueError(
                    f"micro-batches split the targets along their first dimension, but targets of shapes {unbatched} "
                    f"do not have the batch's {self.batch} rows there: pass per-example targets, or micro_batches=1"
                )

    def compute_gradients(self, before_backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Forward, per-example losses, backward, clipping. Returns the losses ``[B]`` (detached).

        ``before_backward(losses)``: called with the per-example losses, graph attached, between the
        forward and the backward (an analyzer takes group gradients from the step's own graph there,
        with ``retain_graph=True``; training is unchanged); :attr:`outputs` holds the model's output
        tensor during the call. With micro-batches it is called once per micro-batch, before that
        micro-batch's backward, with its losses; :attr:`rows` holds which rows of the batch they are.

        Raises NonFiniteError before any parameter changes when a loss or gradient is not finite
        (a loss's example indices are the batch's, in every micro-batch). The gradients of a step that
        fails are never a partial sum: a failure before the first backward leaves ``.grad`` as it was,
        one after the last backward (a non-finite gradient) the step's, and one in between (in
        micro-batch j > 0, or inside a backward) clears them (``optimizer.zero_grad()``).
        Refuses a step already applied before running anything (a second forward would draw dropout
        masks again, update batch statistics again and overwrite the gradients of the update made).
        """
        if self.applied:
            raise RuntimeError(
                f"this {self.phase} step was already applied: a step is performed once (a callback's wrap_step must "
                "call perform() at most once, and only one analyzer may take over a step)"
            )
        whole = self.micro_batches == 1
        micro_losses = []
        scaler = self.grad_scaler
        if scaler is not None:
            # A step abandoned after its unscale_ (a refusal, an interrupt) left the scaler's record of this
            # optimizer; its scale and growth count change only at update(), so a fresh record is the scaler as it was.
            scaler._per_optimizer_states.pop(id(self.optimizer), None)
            self.loss_scale = float(scaler.get_scale())
        accumulating = False  # between the zero_grad and the end of the last backward: .grad holds a partial sum
        try:
            for rows in self.micro_batch_slices():
                with self._gradient_sync(last=rows.stop == self.batch):
                    losses, loss = self._micro_batch_loss(rows, whole, before_backward)
                    if rows.start == 0:
                        self.optimizer.zero_grad()
                        accumulating = True
                    (loss if scaler is None else scaler.scale(loss)).backward()
                micro_losses.append(losses.detach())
            accumulating = False
        except BaseException:
            if accumulating:
                # A failure in micro-batch j > 0 (a non-finite loss, an analyzer's refusal, an interrupt) or
                # inside a backward: .grad holds the sum of some micro-batches only, a gradient of no step
                # that an optimizer.step() would apply as one. Cleared (as zero_grad does), never left partial.
                self.optimizer.zero_grad()
            raise
        return self._checked_and_clipped(micro_losses)

    def micro_batch_slices(self) -> list[slice]:
        """The rows of each micro-batch, in order: contiguous, the first starting at 0, the last ending at
        the batch's end (:func:`micro_batch_rows`' equal split; a subclass may split otherwise, as the GAN
        trainer's discriminator step keeps each micro-batch's real and generated rows together)."""
        return micro_batch_rows(self.batch, self.micro_batches)

    def _gradient_sync(self, *, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: DistributedDataParallel's (and FSDP's) ``no_sync()``
        for every micro-batch but the last, whose backward all-reduces the summed gradient once, as
        accelerate's and Lightning's gradient accumulation do (one all-reduce per step, not one per
        micro-batch: the same gradient up to rounding, and the same whether an analyzer is attached)."""
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last or not callable(no_sync) else no_sync()

    def micro_batch(self, rows: slice) -> tuple[tuple[torch.Tensor, ...], Batch | None]:
        """The inputs and targets of the batch's ``rows`` (one micro-batch; the batch's own tensors for all of them)."""
        if rows.start == 0 and rows.stop == self.batch:
            return self.inputs, self.targets
        return tuple(t[rows] for t in self.inputs), _rows(self.targets, rows)

    def _micro_batch_loss(self, rows: slice, whole: bool, before_backward) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward of the batch's ``rows`` and ``before_backward``; returns their per-example losses
        ``[size]`` and the scalar whose backward adds their share of the step's gradient."""
        outputs, losses = self._forward(*self.micro_batch(rows), rows)
        if before_backward is not None:
            self.outputs, self.rows = outputs, rows
            try:
                before_backward(losses)
            finally:
                self.outputs = self.rows = None
        del outputs
        if self.weights is not None:
            return losses, (losses * self.weights[rows].to(losses)).sum()
        # micro-batches of any sizes: Σ_{n ∈ j} ℓ_n / B, which sum to the batch's mean
        return losses, losses.mean() if whole else losses.sum() / self.batch

    def _checked_and_clipped(self, micro_losses: list[torch.Tensor]) -> torch.Tensor:
        """After the last backward: unscale (a GradScaler's), refuse a non-finite gradient (a GradScaler's: the
        scale lowered, :class:`SkippedStep`), clip, keep and return the losses ``[B]``."""
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if any(not torch.isfinite(p.grad).all() for p in params):
            if scaler is not None:
                scaler.update()  # (unscale_ recorded the inf: the scale backs off, as scaler.step + update do)
                raise SkippedStep(
                    f"the GradScaler found inf or NaN in the gradients at loss scale {self.loss_scale:g}: the step is "
                    f"skipped, nothing updated, and the scale lowered to {scaler.get_scale():g}"
                )
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
        self.losses = micro_losses[0] if self.micro_batches == 1 else torch.cat(micro_losses)
        return self.losses

    def _forward(self, inputs: tuple[torch.Tensor, ...], targets: Batch | None,
                 rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward on ``inputs`` (rows ``rows`` of the batch: one micro-batch, or the batch): the
        model's output tensor and the per-example losses ``[size]`` with their graph, checked."""
        size = rows.stop - rows.start
        with self.precision():
            outputs = model_output(self.model, inputs)
            losses = self.loss_fn(outputs, targets)
        if isinstance(losses, torch.Tensor) and torch.is_grad_enabled() and not losses.requires_grad:
            raise ValueError(
                "loss_fn returned losses that do not depend on the model's parameters (detached, or computed under "
                "torch.no_grad()): return the per-example losses with their graph"
            )
        if not isinstance(losses, torch.Tensor) or losses.shape != (size,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return per-example losses of shape [{size}], got {shape}; "
                "use reduction='none' and average over non-batch dimensions only"
            )
        if not torch.isfinite(losses).all():
            # (the batch's example indices: micro-batch j's rows start at rows.start, not at 0)
            bad = (torch.nonzero(~torch.isfinite(losses)).flatten() + rows.start).tolist()
            if self.grad_scaler is not None:
                # A mixed-precision loop's backward of this loss overflows and its GradScaler skips the step, backing
                # off (the scale times its backoff factor, the growth count reset): the same, without the backward.
                state = self.grad_scaler.state_dict()
                self.grad_scaler.load_state_dict({**state, "scale": state["scale"] * state["backoff_factor"],
                                                  "_growth_tracker": 0})
                raise SkippedStep(
                    f"non-finite loss at examples {bad[:10]} (a float16 forward that overflowed, or bad data): the step "
                    f"is skipped as a GradScaler skips it, nothing updated, the scale lowered to "
                    f"{self.grad_scaler.get_scale():g}"
                )
            raise NonFiniteError(f"non-finite loss at examples {bad[:10]}")
        return outputs, losses

    def precision(self) -> contextlib.AbstractContextManager:
        """The context the step's forward and loss run in: :func:`autocast_to` :attr:`autocast_dtype` on the
        model's device."""
        return autocast_to(self.autocast_dtype, floating_parameter(self.model).device)

    def apply_update(self) -> None:
        """The real ``optimizer.step()``; a step is applied once."""
        if self.applied:
            raise RuntimeError(
                f"this {self.phase} step was already applied: only one analyzer may take over a step"
            )
        if self.grad_scaler is not None:
            # (what undo_scaler_update puts back: a tracker that rolls the update back rolls the scaler's count back too)
            self._scaler_before = self.grad_scaler.state_dict()
        marks = write_marks(self.optimizer)
        try:
            if self.grad_scaler is None:
                self.optimizer.step()
            else:  # (the gradients were unscaled and found finite: scaler.step steps, update() counts a clean step)
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
        except BaseException:
            # an interrupt (or an out-of-memory error) inside optimizer.step() may leave some parameters and their
            # optimizer state updated and others not: neither the step made nor one never made (a tracker rolls it
            # back and clears this; a trainer without one refuses to go on). An error raised before anything was
            # written (a step pre-hook's refusal, Adam's refusal of sparse gradients) is not torn: the step was
            # never made, and the trainer hands its batch back as for any other failure before the update.
            self.torn = not unwritten(self.optimizer, marks)
            raise
        self.applied = True

    def undo_scaler_update(self) -> None:
        """Put the GradScaler's scale and growth count back to what they were before :meth:`apply_update`'s
        ``update()`` (a tracker rolling the update back: the step run again must run at the same scale and
        count as an uninterrupted run's); nothing without a scaler or an update."""
        before = self._scaler_before
        if self.grad_scaler is None or before is None:
            return
        self.grad_scaler.load_state_dict(before)
        self._scaler_before = None

    def run(self) -> torch.Tensor:
        """Perform the step without analysis. Returns the per-example losses ``[B]``."""
        losses = self.compute_gradients()
        self.apply_update()
        return losses


def write_marks(optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, list, dict] | None:
    """What ``optimizer.step()`` may write, marked before it (:func:`unwritten` reads it after a failure): the
    optimizer whose state is marked (the one inside accelerate's or Lightning's pass-through wrapper), each
    parameter's version counter and each state entry's values (a tensor's identity and version counter). None for
    an optimizer not of ``torch.optim``'s own classes, which may write through ``.data`` (no version counter sees
    that), and for one with a fused group (``fused=True``: torch's fused kernels move no version counter, measured
    for SGD and Adam): its failed step is taken as torn."""
    try:
        optimizer = unwrap_optimizer(optimizer)
    except TypeError:
        return None
    if not type(optimizer).__module__.startswith("torch.optim.") or any(
            group.get("fused") for group in optimizer.param_groups):
        return None
    versions = [(p, p._version) for group in optimizer.param_groups for p in group["params"]]
    state = {p: {k: (v, v._version if isinstance(v, torch.Tensor) else None) for k, v in entry.items()}
             for p, entry in optimizer.state.items()}
    return optimizer, versions, state


def unwritten(optimizer: torch.optim.Optimizer, marks: tuple[torch.optim.Optimizer, list, dict] | None) -> bool:
    """Whether the ``optimizer.step()`` that raised after :func:`write_marks` gave ``marks`` wrote nothing: no
    parameter and no state entry it held changed; the entries it created for parameters without state (a first
    step's lazy initialization, made before the error) are removed, so the optimizer is as it was."""
    if marks is None:
        return False
    optimizer, versions, state = marks
    if any(p._version != version for p, version in versions):
        return False
    for p, entry in optimizer.state.items():
        before = state.get(p)
        if before is None:
            continue
        if entry.keys() != before.keys() or any(
                value is not before[k][0] or (before[k][1] is not None and value._version != before[k][1])
                for k, value in entry.items()):
            return False
    for p in [p for p in optimizer.state if p not in state]:
        del optimizer.state[p]
    return True


def torn_update(trainer: Any, what: str, writes: str, error: BaseException, fix: str) -> RuntimeError:
    """Mark ``trainer`` as holding a torn update and return the RuntimeError to raise (``from error``): ``what``
    (``optimizer.step() of step 7``, ``the EMA's update after step 7``) raised ``error`` part-way, so ``writes``
    (what it writes: the parameters and the optimizer's state, the EMA's weights) may hold part of an update that
    no step can follow and no checkpoint may be written from. Until ``fix`` (a load of the last checkpoint, which
    replaces that state) every further step and state is refused with the same message (:func:`check_not_torn`)."""
    reason = (f"{what} raised {type(error).__name__} part-way ({error}): {writes} may hold part of that update, "
              f"which neither training on nor a checkpoint written now can make whole. {fix}")
    trainer._torn = reason
    return RuntimeError(reason)


def check_not_torn(trainer: Any, what: str) -> None:
    """Raise the RuntimeError of :func:`torn_update` when ``trainer`` holds a torn update (``what``: the call
    refused, e.g. ``"train()"``)."""
    reason = getattr(trainer, "_torn", None)
    if reason is not None:
        raise RuntimeError(f"{type(trainer).__name__}.{what} is refused: {reason}")


def model_output(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``model(*inputs)``'s output tensor (:func:`~genkernel.core.adapter.output_tensor`); inputs the model cannot
    take (a shape or a dtype it refuses) raise a ValueError naming their shapes and the model."""
    try:
        return output_tensor(model(*inputs))
    except Exception as error:
        if not not_fitting_inputs(error):
            raise
        raise ValueError(not_fitting_message("inputs", model, inputs, error)) from error


def micro_batch_rows(batch: int, micro_batches: int) -> list[slice]:
    """The rows of each of ``micro_batches`` micro-batches of a batch of ``batch`` examples, in order
    (``torch.tensor_split``'s sizes: the first ``batch % micro_batches`` one example larger)."""
    size, larger = divmod(batch, micro_batches)
    rows, first = [], 0
    for j in range(micro_batches):
        stop = first + size + (1 if j < larger else 0)
        rows.append(slice(first, stop))
        first = stop
    return rows


def _rows(targets: Batch | None, rows: slice) -> Batch | None:
    """One micro-batch's rows of the targets (a Tensor, a tuple of Tensors, or None)."""
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets[rows]
    return tuple(t[rows] for t in targets)
