"""A small supervised trainer with the shared callback protocol.

Lifecycle: ``trainer = SupervisedTrainer(model, optimizer, loss_fn, callbacks=[...])``, then
``trainer.fit(x, y, steps=...)``; further ``fit`` calls on the same data continue the batch order
where the last one stopped, and ``state_dict()`` / ``load_state_dict()`` resume a run in a new
process bit for bit (model, optimizer, batch order, global RNG). Each update is an
:class:`OptimizerStep` whose ``info`` holds the batch's dataset ``indices`` (so analyzers can
group by example or class) and is performed through :func:`perform_step`, so a
:class:`LedgerCallback` can take it over without changing training.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapter import (
    Batch, analysis_mode, as_tuple, batch_size, buffer_snapshot, first_tensor, positive_int, restore_buffers,
    seeded_generator, select,
)
from ..core.errors import NonFiniteError
from ..core.grouping import INTEGER_DTYPES
from ..core.tracking.callbacks import TrainerCallback, check_between_steps, fire, perform_step
from ..core.tracking.io import (
    check_module_state, check_optimizer_state, check_resume_config, global_rng_state, set_global_rng_state,
)
from ..core.tracking.step import (
    LossFn, OptimizerStep, check_max_grad_norm, check_not_torn, torn_update, trainer_autocast_dtype, trainer_grad_scaler,
    until_applied,
)
from ..core.tracking.tracker import PathKernelTracker
from .losses import cross_entropy_loss, logistic_loss, mse_loss

# The losses whose checks of the targets' values (class ids in [0, C), labels in {-1, +1}, shapes) fit reads before
# any step on the whole dataset (they run on zero outputs; another loss function may need real ones).
CHECKED_LOSSES = (cross_entropy_loss, logistic_loss, mse_loss)
# Output values per call of that check (a chunk of the targets): 4M zeros, 16 MiB of float32.
TARGET_CHECK_ELEMENTS = 1 << 22


class SupervisedTrainer:
    """Mini-batch training of ``model`` on an in-memory dataset.

    Args:
        model, optimizer, loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]``.
        batch_size: examples per step (sampled without replacement within each epoch).
        micro_batches: run each step's batch in this many micro-batches, forward and backward one at a
            time with the gradients summed, then one clipping and one step (gradient accumulation;
            :class:`~genkernel.core.tracking.step.OptimizerStep`). Default 1; at most ``batch_size``.
        max_grad_norm: global-norm clipping (inf: none).
        mixed_precision: "no" (default), "bf16" or "fp16": each step's forward and loss under
            ``torch.autocast`` to that half precision with float32 weights (fp16 through a
            ``torch.amp.GradScaler``, :attr:`grad_scaler`, whose overflowing steps are skipped, counted in
            :attr:`skipped_steps` and drawn again), as :class:`~genkernel.diffusion.DDPMTrainer`'s; a
            :class:`LedgerCallback`'s tracker then needs ``mixed_precision="observe"``.
        callbacks: :class:`TrainerCallback` objects.
        seed: seeds the batch order (its own generator; the global RNG is untouched), an int in [0, 2**64).
        progress: show a tqdm bar.

    The examples are drawn as one stream of epochs (each a permutation of the dataset), cut into
    batches; a batch may span two epochs (and then can hold an example twice). Successive ``fit``
    calls continue the stream, so ``fit(steps=a)`` then ``fit(steps=b)`` trains exactly as
    ``fit(steps=a + b)``, also when ``fit`` raised in between: an update made before the error (a
    callback's ``on_step_end``) is counted, a step that failed before its update gives its batch
    and dropout draws back (a NonFiniteError step keeps them used up, as a GradScaler skips it). An
    interrupt inside ``optimizer.step()`` without a :class:`LedgerCallback` to roll it back may leave part of
    the update written: ``fit`` raises a RuntimeError saying so and refuses to go on (``fit``,
    ``state_dict``) until :meth:`load_state_dict` loads a saved state.
    """

    FORMAT = "genkernel.SupervisedTrainer/1"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        batch_size: int = 64,
        micro_batches: int = 1,
        max_grad_norm: float = math.inf,
        mixed_precision: str = "no",
        callbacks: Sequence[TrainerCallback] = (),
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        batch_size = positive_int(batch_size, "batch_size")
        self.micro_batches = positive_int(micro_batches, "micro_batches")
        if self.micro_batches > batch_size:
            raise ValueError(f"micro_batches={self.micro_batches} exceeds batch_size={batch_size}: a micro-batch holds "
                             "at least one example")
        check_max_grad_norm(max_grad_norm)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a function loss_fn(outputs, targets) -> Tensor[B] (per-example losses), got "
                            f"{type(loss_fn).__name__}: e.g. genkernel.supervised.cross_entropy_loss")
        callbacks = list(callbacks)
        hookless = [type(c).__name__ for c in callbacks
                    if not all(callable(getattr(c, hook, None)) for hook in ("on_train_start", "wrap_step", "on_step_end",
                                                                              "on_train_end"))]
        if hookless:
            raise TypeError(f"callbacks must be TrainerCallback objects (on_train_start, wrap_step, on_step_end, "
                            f"on_train_end), got {hookless}: subclass genkernel.TrainerCallback")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int (it seeds the batch order), got {seed!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm
        self.mixed_precision = mixed_precision
        self.autocast_dtype = trainer_autocast_dtype(mixed_precision, model)
        self.grad_scaler = trainer_grad_scaler(mixed_precision, first_tensor(model, "the model").device)
        self.skipped_steps = 0  # steps a GradScaler skipped (fp16): no update, not in global_step
        self.callbacks = callbacks
        self.generator = seeded_generator(seed)  # seeds of 2**32 or more do not repeat another seed's order
        self.progress = progress
        self.global_step = 0
        self.num_examples: int | None = None  # the dataset size of the current fit (callbacks check against it)
        self.history: list[float] = []
        # The stream's drawn but not yet trained-on indices, and the dataset size they index.
        self._order = torch.empty(0, dtype=torch.long)
        self._order_size: int | None = None
        # the targets _check_targets last passed: (weak reference, (their _version, the loss, the parameters'
        # shapes)), or None
        self._targets_checked: tuple | None = None
        # why the model or the optimizer hold part of an update (an interrupt inside optimizer.step()): training and
        # state_dict() refused until load_state_dict() (torn_update)
        self._torn: str | None = None

    def batches(self, n: int, steps: int):
        """Yield ``steps`` index tensors of size ``batch_size``, epoch by epoch, continuing the
        order the previous call left (a dataset of another size starts a new stream)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < self.batch_size:
            # (fewer examples than a batch: each batch would be one permutation of them, shorter than batch_size)
            raise ValueError(f"n must be a dataset size of at least batch_size={self.batch_size} examples, got {n!r}")
        for _ in range(steps):
            yield self._next_batch(n)

    def _next_batch(self, n: int) -> torch.Tensor:
        if self._order_size != n:
            self._order, self._order_size = torch.empty(0, dtype=torch.long), n
        if self._order.numel() < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(n, generator=self.generator)])
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return batch

    def fit(self, inputs: Batch, targets: Batch, *, steps: int) -> list[float]:
        """Train for ``steps`` optimizer steps. Returns the mean loss of every step. With one of this module's
        losses, targets it refuses (a class id outside [0, C), a logistic label not ±1, a shape that does not fit
        the outputs) are refused on the whole dataset before the first step, not at the step that draws them."""
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        check_not_torn(self, "fit()")
        steps = int(steps)
        xs = as_tuple(inputs, name="inputs")
        ys = targets if isinstance(targets, torch.Tensor) else as_tuple(targets, name="targets")
        n = batch_size(xs, name="inputs")
        # Batches index inputs and targets alike: targets of another length would be cut or overrun.
        m = batch_size((ys,) if isinstance(ys, torch.Tensor) else ys, name="targets")
        if m != n:
            raise ValueError(f"inputs have {n} examples but targets have {m}: pass one target per input (dimension 0)")
        if n < self.batch_size:
            raise ValueError(f"the dataset has {n} examples, fewer than batch_size={self.batch_size}")
        self._check_targets(xs, ys)
        self.num_examples = n
        fire(self.callbacks, "on_train_start", self)
        for _ in tqdm(range(steps), total=steps, disable=not self.progress, desc="train"):
            until_applied(lambda: self._train_step(xs, ys, n), self.grad_scaler, self._count_skip)
        fire(self.callbacks, "on_train_end", self)
        return self.history

    def _check_targets(self, xs: tuple[torch.Tensor, ...], ys) -> None:
        """Refuse, before any step, targets that one of this module's losses (:data:`CHECKED_LOSSES`) refuses: their
        checks of values ran only on the batches drawn, so a class id out of range (or a label 0 for the logistic
        loss) was refused at the first step whose batch held it, after the steps before had trained on the data.
        The loss is called on zero outputs shaped as the model's (one eval-mode forward of two examples, the RNG and
        the buffers put back: a quantization observer counts in eval mode too), :data:`TARGET_CHECK_ELEMENTS` output
        values at a time on the targets' device (all N at once made an N × C tensor: 5 GB for 1.28M examples of
        1000 classes, on the model's device); a model whose forward fails there is left to the steps, which report
        it. Targets checked once are not read again by a later ``fit`` (the same tensor, unchanged: ``fit(steps=1)``
        in a loop read all N every step); "unchanged" is read from the tensor's version counter, which writes through
        another alias of its memory (``ys.data``, a NumPy array it was made from) do not move, so such targets are
        not checked again (inference tensors, which have no counter, are checked at every fit). Returns nothing."""
        if self.loss_fn not in CHECKED_LOSSES or not isinstance(ys, torch.Tensor):
            return
        # (the model's parameter shapes too: a head replaced between fits, another class count, checks them again;
        # targets made under torch.inference_mode keep no version counter, reading it raised a RuntimeError: they
        # are checked at every fit)
        key = None if ys.is_inference() else (
            ys._version, self.loss_fn, tuple(tuple(p.shape) for p in self.model.parameters()))
        done = getattr(self, "_targets_checked", None)
        if key is not None and done is not None and done[0]() is ys and done[1] == key:
            return
        buffers = buffer_snapshot(self.model)
        try:
            with torch.no_grad(), analysis_mode(self.model):
                out = self.model(*(t[:2] for t in xs))
        except Exception:  # (the first step's forward reports it, in its words)
            return
        finally:
            restore_buffers(buffers)
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return
        n, per = ys.shape[0], max(1, math.prod(out.shape[1:]))
        rows = max(1, TARGET_CHECK_ELEMENTS // per)
        for start in range(0, n, rows):
            part = ys[start:start + rows]
            try:
                with torch.no_grad():
                    self.loss_fn(out.new_zeros((part.shape[0], *out.shape[1:]), device=part.device), part)
            except (ValueError, TypeError) as error:
                where = "" if rows >= n else f"; examples {start} to {start + part.shape[0] - 1} hold it"
                raise type(error)(f"the targets do not fit {self.loss_fn.__name__} (checked on all {n} examples "
                                  f"before any step{where}): {error}") from None
            except RuntimeError:  # (torch's own, e.g. of dtypes the steps' autocast reconciles: left to the steps)
                return
        self._targets_checked = None if key is None else (weakref.ref(ys), key)

    def _train_step(self, xs: tuple[torch.Tensor, ...], ys, n: int) -> None:
        """One update through the callbacks, counted (``global_step``, ``history``) once it is in the
        parameters, also when an error comes after it (a callback's ``on_step_end``): the model holds
        it, and a run continued after the error is the straight one. A step that failed before its
        update (an analyzer's refusal, an interrupt) hands its batch back and rewinds the global RNG
        (dropout), so ``fit`` again draws the same batch and masks: the run is the uninterrupted one.
        A step skipped for a non-finite loss or gradient (NonFiniteError) keeps its batch used up, as
        the other trainers (and a GradScaler) skip such a step: drawn again, it would fail again."""
        # (_order is never changed in place, only rebound: keeping the tensor keeps the position)
        position = (self.generator.get_state(), self._order, self._order_size)
        global_rng = global_rng_state()
        # The model's buffers (BatchNorm's running statistics): a forward that ran before a failure (micro-batch 0's when
        # micro-batch 1 fails, or one a callback ran before refusing) advanced them, and the step drawn again advances
        # them again: put back, as the batch and the global RNG are (a tracker restores them itself; this is the rest).
        buffers = buffer_snapshot(self.model)
        step = None
        try:
            indices = self._next_batch(n)
            step = OptimizerStep(
                self.model,
                self.optimizer,
                self.loss_fn,
                select(xs, indices),
                ys[indices] if isinstance(ys, torch.Tensor) else select(ys, indices),
                max_grad_norm=self.max_grad_norm,
                micro_batches=self.micro_batches,
                info={"indices": indices},
                autocast_dtype=self.autocast_dtype,
                grad_scaler=self.grad_scaler,
            )
            perform_step(self.callbacks, self, step)
        except BaseException as error:
            if step is not None and step.applied:
                self._count(step)
            elif step is not None and step.torn:  # (not rolled back: no LedgerCallback, or one that could not undo it)
                raise torn_update(
                    self, f"optimizer.step() of step {self.global_step + 1}", "the parameters and the optimizer's state",
                    error, "Load the last saved state (trainer.load_state_dict(state)), which replaces the model, the "
                    "optimizer and the counts; fit() and state_dict() are refused until then") from error
            elif not isinstance(error, NonFiniteError):
                self.generator.set_state(position[0])
                self._order, self._order_size = position[1], position[2]
                set_global_rng_state(global_rng)
                restore_buffers(buffers)
            raise
        self._count(step)

    def _count(self, step: OptimizerStep) -> None:
        self.global_step += 1
        self.history.append(float(step.losses.mean()))

    def _count_skip(self) -> None:
        self.skipped_steps += 1

    def state_dict(self) -> dict:
        """Everything :meth:`load_state_dict` needs to continue this run exactly: the model, the
        optimizer, the batch order (generator and the current epoch's rest), the step count, the
        loss history and the global RNG (dropout draws from it). Callbacks keep their own state.
        The model's and optimizer's tensors are shared with the live ones, as in PyTorch's own
        ``state_dict``: ``torch.save`` the state (or deep-copy it) before training on. Refused while the
        trainer holds a torn update (an interrupt inside ``optimizer.step()``)."""
        check_between_steps(self, "state_dict()")
        check_not_torn(self, "state_dict()")
        return {
            "format": self.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "order": self._order.clone(),
            "order_size": self._order_size,
            "global_step": self.global_step,
            "history": list(self.history),
            "global_rng": global_rng_state(),
            "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "config": self._resume_config(),
        }

    def _resume_config(self) -> dict:
        """The settings a saved state must share with the trainer that loads it (BatchNorm's statistics,
        dropout's draws and the rounding depend on the micro-batches, as in DDPMTrainer's checkpoints)."""
        return {"batch_size": self.batch_size, "micro_batches": self.micro_batches,
                "max_grad_norm": float(self.max_grad_norm), "optimizer": type(self.optimizer).__name__,
                "mixed_precision": self.mixed_precision}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; a state of another set-up (batch size, clipping,
        optimizer, model) is refused before anything is loaded. Build callbacks that keep a ledger
        after loading (a tracker built before would start its ledger at the old parameters)."""
        check_between_steps(self, "load_state_dict()")
        if not isinstance(state, dict) or state.get("format") != self.FORMAT:
            raise ValueError("not a SupervisedTrainer state (written by SupervisedTrainer.state_dict)")
        # (a state written before micro-batches existed ran every batch whole)
        check_resume_config({"micro_batches": 1, "mixed_precision": "no", **state["config"]}, self._resume_config(),
                            "SupervisedTrainer")
        check_module_state(self.model, state["model"], "model")
        check_optimizer_state(self.optimizer, state["optimizer"], "optimizer")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self._order, self._order_size = state["order"].clone(), state["order_size"]
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        set_global_rng_state(state["global_rng"])
        if self.grad_scaler is not None:  # (the config check: an "fp16" state has one)
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._torn = None  # (the model and the optimizer are the state's: whole)


class LedgerCallback(TrainerCallback):
    """Keeps a :class:`PathKernelTracker` ledger over a trainer's steps, grouping each example by
    ``group_of[dataset index]`` (e.g. its class, or ``arange(N)`` for one group per example).

    Args:
        tracker: built on the trainer's model and optimizer; or, with ``start_step`` > 0, a
            function ``make_tracker() -> PathKernelTracker`` called when tracking starts (a tracker
            built before the warm-up would start its ledger at the outputs it saw then, and book the
            warm-up's change as residual: refused).
        group_of: integer ``Tensor[N]``, the group of every training example; or ``{partition:
            Tensor[N]}`` for a tracker with several partitions.
        start_step: steps before this global step are performed untracked (warm-up).
    """

    def __init__(self, tracker: PathKernelTracker | Callable[[], PathKernelTracker],
                 group_of: torch.Tensor | Mapping[str, torch.Tensor], *, start_step: int = 0) -> None:
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        if not isinstance(tracker, PathKernelTracker) and not callable(tracker):
            raise TypeError(
                f"tracker must be a PathKernelTracker or a function that builds one, got {type(tracker).__name__}"
            )
        self._make_tracker = None if isinstance(tracker, PathKernelTracker) else tracker
        self.tracker: PathKernelTracker | None = tracker if isinstance(tracker, PathKernelTracker) else None
        named = group_of.items() if isinstance(group_of, Mapping) else [("group_of", group_of)]
        checked = {}
        for name, ids in named:
            ids = torch.as_tensor(ids)
            # An id cast from a float would be truncated silently (0.7 -> group 0).
            if (ids.dtype not in INTEGER_DTYPES and ids.dtype != torch.bool) or ids.dim() != 1:
                raise ValueError(f"{name} must be a 1-D integer tensor (one group id per training example), got "
                                 f"{ids.dtype} of shape {tuple(ids.shape)}")
            checked[name] = ids.to(torch.long)
        self.group_of = checked if isinstance(group_of, Mapping) else checked["group_of"]
        self.start_step = start_step

    def on_train_start(self, trainer) -> None:
        # The tracker performs the step itself: a wrap_step after this one in the chain never runs.
        callbacks = list(getattr(trainer, "callbacks", []))
        after = callbacks[callbacks.index(self) + 1:] if self in callbacks else []
        skipped = [type(c).__name__ for c in after
                   if getattr(type(c), "wrap_step", TrainerCallback.wrap_step) is not TrainerCallback.wrap_step]
        if skipped:
            raise ValueError(
                f"LedgerCallback performs each step through its tracker, so the wrap_step of {skipped} after it in the "
                "callbacks would never run (a second LedgerCallback would record nothing). Put observing callbacks "
                "before the LedgerCallback, and keep several groupings in one tracker (num_groups={name: G}, "
                "group_of={name: ids})"
            )
        n = getattr(trainer, "num_examples", None)
        sizes = {len(v) for v in (self.group_of.values() if isinstance(self.group_of, dict) else [self.group_of])}
        if n is not None and sizes != {n}:
            raise ValueError(
                f"group_of has {sorted(sizes)} entries but the dataset has {n} examples: give one group id per "
                "training example"
            )
        if self.tracker is not None:
            self._check_group_of(self.tracker)

    def _check_group_of(self, tracker: PathKernelTracker) -> None:
        """Every example's ids against ``tracker``'s partitions, before a step: an id outside [0, G) or a partition
        named wrongly was refused only at the first step whose batch held it, in the tracker's words ("groups")."""
        ids = self.group_of
        n = len(next(iter(ids.values()))) if isinstance(ids, dict) else len(ids)
        try:
            tracker.partitions.check(ids, n)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"LedgerCallback's group_of does not fit the tracker's partitions {dict(tracker.partitions.sizes)} "
                f"({error}): give every training example an id in [0, G) of each partition (group_of={{name: ids}} for "
                "several)"
            ) from None

    def _groups(self, indices: torch.Tensor):
        if isinstance(self.group_of, dict):
            return {name: ids[indices] for name, ids in self.group_of.items()}
        return self.group_of[indices]

    def wrap_step(self, trainer, step, perform):
        if trainer.global_step < self.start_step:
            if self.tracker is not None:
                raise ValueError(
                    f"LedgerCallback(start_step={self.start_step}) was given a tracker built before the warm-up: its "
                    "ledger starts at the outputs it saw when built, so the untracked steps' change would be booked as "
                    "residual. "
                    "Pass a function that builds the tracker (LedgerCallback(lambda: PathKernelTracker(...), ...)); it "
                    "is called when tracking starts"
                )
            return perform()
        if self.tracker is None:
            tracker = self._make_tracker()
            if not isinstance(tracker, PathKernelTracker):
                raise TypeError(f"the tracker function returned a {type(tracker).__name__}, not a PathKernelTracker")
            self._check_group_of(tracker)
            self.tracker = tracker  # (kept only once it fits: a refused one is built again at the retried step)
        return self.tracker.track(step, self._groups(step.info["indices"])).losses
