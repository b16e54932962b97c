"""Learning-rate schedules in the built-in trainers (``DDPMTrainer(lr_scheduler=)``,
``GANTrainer(lr_scheduler_g=, lr_scheduler_d=)``).

A schedule is PyTorch's own ``LRScheduler`` over the trainer's optimizer (diffusers'
``get_scheduler("cosine", optimizer, num_warmup_steps=, num_training_steps=)`` returns one), stepped
once after every update that is in the weights, as diffusers' scripts step theirs after
``optimizer.step()``: the learning rate a step uses is the one the schedule set after the step
before. A tracker reads each step's learning rate from the optimizer's parameter groups when the
step is taken, so every ledger follows the schedule with nothing more. Checkpoints save the
schedule's state and record its kind and base rates; a resume with another schedule is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

LRSchedulerArg = Union[torch.optim.lr_scheduler.LRScheduler, Callable[[torch.optim.Optimizer], Any], None]

EXAMPLE = ("lambda optimizer: diffusers.optimization.get_scheduler('cosine', optimizer, num_warmup_steps=500, "
           "num_training_steps=10_000)")


def build_lr_scheduler(given: LRSchedulerArg, optimizer: torch.optim.Optimizer, name: str) -> Any:
    """The schedule a trainer steps after every update of ``optimizer``, or None: ``given`` itself (an
    ``LRScheduler`` built over ``optimizer``) or what the function ``given(optimizer)`` returns (for an
    optimizer the trainer builds from its name). Raises a TypeError for anything else and a ValueError
    for a schedule of another optimizer or one that steps on a metric (``ReduceLROnPlateau``)."""
    if given is None:
        return None
    scheduler = given(optimizer) if callable(given) and not hasattr(given, "step") else given
    if not all(callable(getattr(scheduler, verb, None)) for verb in ("step", "state_dict", "load_state_dict")):
        raise TypeError(
            f"{name} must be a torch.optim.lr_scheduler.LRScheduler over the trainer's optimizer, or a function "
            f"optimizer -> LRScheduler such as {EXAMPLE}; got {type(scheduler).__name__}"
        )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            f"{name}: ReduceLROnPlateau steps on a validation metric the trainer does not compute; step it in a loop "
            "of your own (the analyzers' observe() follows any learning rate), or pass a schedule by step count"
        )
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise ValueError(
            f"{name} schedules another optimizer than the trainer's: its steps would not change the rates the trainer "
            f"uses. Build it over the optimizer passed as optimizer=, or pass a function optimizer -> scheduler "
            f"({EXAMPLE}) when the trainer builds the optimizer"
        )
    return scheduler


# A schedule's state entries that say where it is, not which schedule it is (CosineAnnealingWarmRestarts:
# T_cur, the step within the current cycle, and T_i, the current cycle's length, T_0 · T_mult^cycles)
PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "verbose",
                      "T_cur", "T_i"})
# State entries compared otherwise: the schedules of a SequentialLR / ChainedScheduler (each by its own settings,
# its functions' values included), a LambdaLR's functions (by their values)
NESTED = frozenset({"_schedulers", "lr_lambdas"})
_UNCOMPARED = object()
PROBE_STEPS = (0, 1, 10, 100, 1000, 10_000, 100_000)


def lr_scheduler_settings(scheduler: Any) -> dict[str, Any] | None:
    """What a resumed run's schedule must share with the saved one's (a schedule's state holds where it
    is; loaded into another schedule it would continue a different run from the saved step): its kind,
    base rates, settings (``T_max``, ``gamma``, ``step_size``, ``MultiStepLR``'s milestones, ``OneCycleLR``'s
    phases, ``SequentialLR``'s milestones, ...), for ``LambdaLR`` and ``MultiplicativeLR`` (diffusers'
    ``get_scheduler`` builds a ``LambdaLR``) its functions' values at steps 0, 1, 10, ..., 10⁵, which tell
    a warm-up of 500 steps from one of 1000, and for ``SequentialLR`` / ``ChainedScheduler`` the settings
    of each schedule they run."""
    if scheduler is None:
        return None
    settings = {
        "kind": type(scheduler).__name__,
        "base_lrs": [float(lr) for lr in getattr(scheduler, "base_lrs", [])],
    }
    for key, value in sorted(scheduler.state_dict().items()):
        if key in PROGRESS or key in NESTED or key == "base_lrs":
            continue
        value = _comparable(value)
        if value is not _UNCOMPARED:
            settings[key] = value
    inner = getattr(scheduler, "_schedulers", None)
    if isinstance(inner, (list, tuple)):
        settings["schedulers"] = [lr_scheduler_settings(one) for one in inner]
    functions = getattr(scheduler, "lr_lambdas", None)
    if functions is not None:
        settings["lr_lambda_values"] = [[_value_at(function, step) for step in PROBE_STEPS] for function in functions]
    return settings


def _comparable(value: Any) -> Any:
    """``value`` as plain data that compares by value (a Counter of milestones as a dict, tuples as lists, NaN as
    "nan", which equals itself), or ``_UNCOMPARED`` for what holds anything else (functions, objects)."""
    if isinstance(value, float) and value != value:
        return "nan"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        items = {key: _comparable(item) for key, item in value.items()}
        if all(isinstance(key, (bool, int, float, str)) for key in items) and _UNCOMPARED not in items.values():
            return dict(sorted(items.items(), key=lambda item: repr(item[0])))
        return _UNCOMPARED
    if isinstance(value, (list, tuple)):
        items = [_comparable(item) for item in value]
        return _UNCOMPARED if any(item is _UNCOMPARED for item in items) else items
    return _UNCOMPARED


def _value_at(function: Callable[[int], float], step: int) -> float | str:
    try:
        value = float(function(step))
    except Exception as error:  # a schedule defined for fewer steps: its failure is part of what it is
        return f"raises {type(error).__name__}"
    return "nan" if value != value else value  # (NaN != NaN would refuse the same schedule)


def step_lr_scheduler(scheduler: Any) -> None:
    """One schedule step after an update (nothing without a schedule)."""
    if scheduler is not None:
        scheduler.step()
