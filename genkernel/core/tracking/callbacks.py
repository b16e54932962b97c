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

State: a callback with something to checkpoint returns it from ``state_dict()`` and takes it back in
``load_state_dict()``; trainers save callback states keyed by the callback's ``state_key`` (its
class name unless given a ``name``), never by position (:class:`CallbackStates`), so a run
resumed with its callbacks in another order, or attached after ``resume()``, gets every state
back, and a saved state no callback claims is an error that names it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from .step import OptimizerStep


class TrainerCallback:
    """Base class: every hook is optional and does nothing by default.

    ``name``: the key this callback's checkpointed state is saved under (default: the class
    name); give two callbacks of one class different names.
    """

    name: str | None = None

    @property
    def state_key(self) -> str:
        return self.name or type(self).__name__

    def state_dict(self) -> dict[str, Any] | None:
        """The callback's state for a checkpoint (None: nothing to save)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError(f"{type(self).__name__} saved a state but cannot load one")

    def on_train_start(self, trainer: Any) -> None:
        pass

    def wrap_step(self, trainer: Any, step: OptimizerStep, perform: Callable[[], torch.Tensor]) -> torch.Tensor:
        return perform()

    def on_step_end(self, trainer: Any, step: OptimizerStep) -> None:
        pass

    def on_train_end(self, trainer: Any) -> None:
        pass


# The trainers inside perform_step (by id: the entry lives only while the call runs), with the phase of the step.
_STEPS_IN_FLIGHT: dict[int, str] = {}


def perform_step(callbacks: Sequence[TrainerCallback], trainer: Any, step: OptimizerStep) -> torch.Tensor:
    """Run ``step`` through every callback's ``wrap_step`` (first callback outermost), then
    ``on_step_end``. Returns the per-example losses ``[B]``. Meanwhile the trainer is marked as inside a
    step (:func:`check_between_steps`)."""
    perform: Callable[[], torch.Tensor] = _once(step, step.run, "the step")
    for callback in reversed(callbacks):
        perform = _once(step, functools.partial(callback.wrap_step, trainer, step, perform), type(callback).__name__)
    outer = _STEPS_IN_FLIGHT.get(id(trainer))
    _STEPS_IN_FLIGHT[id(trainer)] = step.phase
    try:
        losses = perform()
        if not step.applied:
            raise RuntimeError(
                f"no callback performed the {step.phase} step: wrap_step must call perform() or take the step over"
            )
        for callback in callbacks:
            callback.on_step_end(trainer, step)
    finally:
        if outer is None:
            del _STEPS_IN_FLIGHT[id(trainer)]
        else:
            _STEPS_IN_FLIGHT[id(trainer)] = outer
    return losses


# Why a trainer's state cannot be taken or loaded inside a step, and where to do it instead, by the call refused.
_BETWEEN_STEPS = {
    "state_dict()": (
        "the step's draws are made and its update is not yet counted, so a run resumed from this state would not be "
        "the uninterrupted one. Save between steps: the trainer's checkpoint_every= (DDPMTrainer, GANTrainer), or "
        "state_dict() / save_checkpoint() after train() returns"
    ),
    # (the step's update, count, EMA and schedule step land on the loaded state after the call: a state of step k
    # comes back as k + 1, holding k's weights)
    "load_state_dict()": (
        "the trainer counts the step after the callbacks return, so the loaded state would be counted one step on, "
        "its EMA and learning-rate schedule advanced past the weights it holds. Load between steps: stop train() "
        "(raise from the callback) and load_state_dict() / resume() before training on"
    ),
}


def check_between_steps(trainer: Any, what: str) -> None:
    """Raise a RuntimeError when ``trainer`` is inside a step (a callback's ``wrap_step`` or ``on_step_end``
    calling ``what``, "state_dict()" or "load_state_dict()"): the step's batch and noise are drawn and its
    update may be made, but the trainer has not counted it (the step count, the loss history, the EMA, the
    learning-rate schedule), so a checkpoint written there would resume one step short of the weights it
    holds, or past a batch never trained on, and a state loaded there would be counted one step on."""
    phase = _STEPS_IN_FLIGHT.get(id(trainer))
    if phase is not None:
        raise RuntimeError(f"{type(trainer).__name__}.{what} was called inside a {phase} step (from a callback): "
                           f"{_BETWEEN_STEPS[what]}")


def _once(step: OptimizerStep, inner: Callable[[], torch.Tensor], what: str) -> Callable[[], torch.Tensor]:
    """``inner`` guarded against a second call once the step's update is made: a callback whose
    ``wrap_step`` calls ``perform()`` twice would otherwise run the inner callbacks again (an analyzer
    would take the applied step over anew, roll it back on the refusal and mark it not applied while
    the parameters hold its update) and the forward again (dropout draws, batch statistics)."""

    def perform() -> torch.Tensor:
        if step.applied:
            raise RuntimeError(
                f"the {step.phase} step was performed twice (perform() called again, reaching {what}, after its update "
                "was made): a callback's wrap_step must call perform() at most once"
            )
        return inner()

    return perform


class CallbackStates:
    """Callback states in a trainer's checkpoint, keyed by ``state_key``.

    ``save(callbacks)`` returns ``{key: state}``; ``load(callbacks, saved)`` restores the states
    of the callbacks attached now and keeps the others pending; ``claim(callbacks)`` (at the start
    of training) restores pending states into callbacks attached since, and raises naming any
    state left without a callback, before a step could silently start a new ledger.
    """

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, Any]] = {}
        # Why the last load stopped at a callback's refusal (the trainers load the callbacks' states first, so
        # nothing else of that checkpoint was loaded either), else None: its pending states are then refused by
        # claim and discard alike, since training on without them would train the trainer's own state, not the
        # checkpoint's.
        self.aborted: str | None = None

    @staticmethod
    def _keyed(callbacks: Sequence[TrainerCallback]) -> dict[str, TrainerCallback]:
        keyed: dict[str, TrainerCallback] = {}
        for callback in callbacks:
            key = callback.state_key if isinstance(callback, TrainerCallback) else type(callback).__name__
            if key in keyed:
                raise ValueError(
                    f"two callbacks share the state key {key!r}: give them different names (name=...) so their "
                    "checkpointed states cannot be swapped"
                )
            keyed[key] = callback
        return keyed

    def save(self, callbacks: Sequence[TrainerCallback]) -> dict[str, dict[str, Any]]:
        out = {}
        for key, callback in self._keyed(callbacks).items():
            state = callback.state_dict() if hasattr(callback, "state_dict") else None
            if state is not None:
                out[key] = state
        # States loaded from a checkpoint whose callback is not attached yet travel on.
        return {**{k: v for k, v in self.pending.items() if k not in out}, **out}

    def load(self, callbacks: Sequence[TrainerCallback], saved: dict[str, dict[str, Any]], *,
             trainer: Any = None) -> None:
        """Restore ``saved`` into the callbacks attached now (the others pending). ``trainer``: the trainer whose
        checkpoint this is, told for this call alone to the callbacks that compare a state with it before their
        trackers exist (an analyzer's ``resuming_trainer``: whether that trainer keeps an EMA, its model's device)."""
        if not isinstance(saved, dict):
            raise ValueError(
                "this checkpoint stores callback states by position (an older genkernel); it cannot be matched to "
                "callbacks safely: start the analysis anew from the model and optimizer it holds"
            )
        self.pending, self.aborted = dict(saved), None
        try:
            self.claim(callbacks, strict=False, trainer=trainer)
        except BaseException as error:
            self.aborted = f"{type(error).__name__}: {error}"
            raise

    def claim(self, callbacks: Sequence[TrainerCallback], *, strict: bool = True, trainer: Any = None) -> None:
        """Load the pending states into the callbacks attached now (``strict``: and raise naming any state left
        without one). ``trainer``: the trainer whose run the states belong to, told for this call alone to the
        callbacks that compare a state with it before their trackers exist (:meth:`load`; a trainer's ``train()``
        claiming the states of callbacks attached after its resume: compared as at the resume, e.g. whether the
        trainer keeps an EMA, before a step could move the trainer)."""
        if strict and self.aborted is not None and self.pending:
            raise ValueError(self._aborted_message())
        keyed = self._keyed(callbacks)
        # Each told callback's own value put back afterwards, whatever happens: None after a trainer's load, the
        # outer load's trainer after a load nested in a callback's load_state_dict (reset to None there, a callback
        # claimed later in the outer load compared its state with no trainer, the EMA ledger unchecked).
        told: list[tuple[Any, Any]] = []
        try:
            for key in list(self.pending):
                if key in keyed:
                    callback = keyed[key]
                    if trainer is not None and hasattr(callback, "resuming_trainer"):
                        told.append((callback, callback.resuming_trainer))
                        callback.resuming_trainer = trainer
                    # popped only once loaded: a state its callback refuses (other settings) stays pending, so the
                    # next train() is refused again instead of starting a new ledger in the middle of the resumed run
                    callback.load_state_dict(self.pending[key])
                    del self.pending[key]
        finally:
            for callback, before in reversed(told):
                callback.resuming_trainer = before
        if strict and self.pending:
            names = sorted(self.pending)
            raise ValueError(
                f"the checkpoint holds the state of callback(s) {names} but no attached callback has that state key: "
                f"attach them (e.g. the analyzer, built with the same settings and name) before training on, or "
                f"call trainer.discard_callback_states({names!r}) to continue without them"
            )

    def _aborted_message(self) -> str:
        return (f"the last resume (load_state_dict) stopped where a callback refused its state ({self.aborted}), "
                f"before the model, the optimizer and the counts were loaded: the trainer holds its own state, not "
                f"the checkpoint's. Resume again with a callback that takes the state (built with the checkpoint's "
                f"settings), or with that callback detached (its state then waits for discard_callback_states)")

    def discard(self, keys: Sequence[str]) -> None:
        if self.aborted is not None and any(key in self.pending for key in keys):
            raise ValueError(f"{self._aborted_message()}: discarding the states now would train on from the "
                             "trainer's own state as if it had resumed")
        for key in keys:
            self.pending.pop(key, None)


def fire(callbacks: Sequence[TrainerCallback], hook: str, trainer: Any) -> None:
    """Call ``hook`` ("on_train_start" or "on_train_end") on every callback."""
    if hook not in ("on_train_start", "on_train_end"):
        raise ValueError(f"unknown hook {hook!r}")
    for callback in callbacks:
        getattr(callback, hook)(trainer)
