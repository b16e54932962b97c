"""The ledger of an exponential moving average of the weights (docs/observing.md, "EMA of the weights").

An EMA of the weights, θ̄_{k+1} = β_k θ̄_k + (1 − β_k) θ_{k+1}, is linear in the trajectory, so its
change splits into the same groups as the model's. With per-group cumulative displacements
D_{k,g} = Σ_{j<k} u_{j,g} (θ_k = θ_0 + Σ_g D_{k,g} + D_{k,rest}) and EMA offsets E_{k,g}
(θ̄_k = θ̄_0 + Σ_g E_{k,g} + E_{k,rest} + E_{k,start}):

    E_{k+1,g} = β_k E_{k,g} + (1 − β_k) D_{k+1,g},   E_{k+1,start} = β_k E_{k,start} + (1 − β_k)(θ_0 − θ̄_0),

exactly. Each EMA update's change ΔĒ_{k,g} = E_{k+1,g} − E_{k,g} is pushed to the probes through the
EMA weights' own quadrature nodes θ̄_k + s (θ̄_{k+1} − θ̄_k): a second ledger, for the weights
people sample from, with its own residual, rest and a ``start`` row (what the EMA's own start
away from θ_0 contributes), one per partition.

β_k is read, not assumed: after each optimizer step the EMA's weights are compared with their
previous value and the model's, (1 − β) = ⟨Δθ̄, θ − θ̄⟩ / ‖θ − θ̄‖², and the update is checked to be
exactly that interpolation (diffusers' ``EMAModel`` warm-up decay, ema-pytorch's schedule and
``AveragedModel``'s running mean all are). An EMA that moved otherwise is refused with the step.

Lifecycle (driven by the tracker): ``after_step(updates)`` when a step is recorded accumulates
D; ``sync()`` (before the next step, and whenever the ledgers are read) reads the EMA and records
its update, if any. The probes see f(x; θ̄) with the buffers of the model people sample from
(:func:`ema_buffers`): an EMA that holds a module (ema-pytorch's ``EMA``, ``AveragedModel``) keeps
its own (copied, averaged, or as built), which the probes read; diffusers' ``EMAModel`` holds only
parameters (``copy_to`` puts them in the live model), so its probes read the live model's as they
were when the last tracked step ended (:meth:`EMALedgers.after_step` keeps a copy): the EMA is
updated right after that step, and reading the ledgers later, after the next training forward has
moved BatchNorm's running statistics, must not change their numbers. A change of those buffers
between two EMA updates is booked in ``buffer_drift``, not in any group.
Frozen parameters are the live model's. Memory: two more float64 copies of the parameters per
group row (D and E).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..adapter import analysis_mode, evaluated_at, functional_model
from ..errors import LedgerCheckError
from .checks import CheckScratch, largest_excess
from .io import check_module_state
from .ledger import PathKernelLedger
from .routes import TrackedModel, push_rows


def ema_parameters(ema: Any, names: list[str], model: nn.Module) -> Callable[[], dict[str, torch.Tensor]]:
    """A reader of an EMA object's weights by parameter name, each on its parameter's device (an
    EMA kept elsewhere, as diffusers' ``offload_ema`` keeps it on the CPU, is copied over): diffusers'
    ``EMAModel`` (``shadow_params`` in the order of ``model.parameters()``), ema-pytorch's ``EMA``
    (``ema_model``), ``torch.optim.swa_utils.AveragedModel`` (``module``), an ``nn.Module`` holding
    the averaged weights, or a callable returning ``{name: tensor}``."""
    read = _weights_reader(ema, names, model)
    devices = {n: p.device for n, p in model.named_parameters() if n in names}
    # The readers are partials of module-level functions, not closures: ``copy.deepcopy`` of a tracker (with
    # its model, optimizer and EMA: a trainer) gives readers of the copied EMA (a closure would be shared, and
    # the copy's EMA ledger would follow the original's EMA).
    return functools.partial(_read_on_devices, read, devices)


def _read_on_devices(read: Callable[[], dict[str, torch.Tensor]], devices: dict[str, torch.device]) -> dict[str, torch.Tensor]:
    return {n: t.to(devices[n]) for n, t in read().items()}


def _read_callable(ema: Callable[[], Mapping[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    return {n: ema()[n] for n in names}


def ema_callable(read: Callable[[], dict[str, torch.Tensor]]) -> Callable | None:
    """The caller's function a reader of :func:`ema_parameters` calls (an EMA given as a callable), else None."""
    inner = read.args[0] if isinstance(read, functools.partial) and read.args else None
    return inner.args[0] if isinstance(inner, functools.partial) and inner.func is _read_callable else None


def _read_shadow(ema: Any, all_names: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in zip(all_names, ema.shadow_params) if n in names}


def _read_parameters(module: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if n in names}


def _read_buffers(module: nn.Module, own: list[str]) -> dict[str, torch.Tensor]:
    return {n: b for n, b in module.named_buffers() if n in own}


def _weights_reader(ema: Any, names: list[str], model: nn.Module) -> Callable[[], dict[str, torch.Tensor]]:
    """:func:`ema_parameters`' reader, the tensors where the EMA keeps them."""
    if callable(ema) and not isinstance(ema, nn.Module):
        return functools.partial(_read_callable, ema, names)
    if _is_diffusers_ema(ema):
        all_names = _shadow_names(ema, model)
        return functools.partial(_read_shadow, ema, all_names, names)
    if _is_ema_pytorch(ema):
        _check_ema_pytorch_options(ema, names, model)
    module = _ema_module(ema)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"cannot read averaged weights from a {type(ema).__name__}: pass diffusers' EMAModel, ema-pytorch's EMA, "
            "torch.optim.swa_utils.AveragedModel, the averaged nn.Module itself, or a callable returning {name: tensor}"
        )
    missing = [n for n in names if n not in dict(module.named_parameters())]
    if missing:
        raise ValueError(f"the EMA model has no parameters {missing[:5]}: it must be a copy of the tracked model")
    return functools.partial(_read_parameters, module, names)


def _shadow_names(ema: Any, model: nn.Module) -> list[str]:
    """The parameter names of diffusers' ``EMAModel``'s ``shadow_params``, in order: those of
    ``model.named_parameters()``, or of its trainable parameters only (an EMA of LoRA adapters over a
    frozen base, ``EMAModel([p for p in unet.parameters() if p.requires_grad])``: no copy of the base);
    a ValueError when it averages another set of tensors."""
    named = list(model.named_parameters())
    shapes = [tuple(t.shape) for t in ema.shadow_params]
    every = [n for n, _ in named]
    trainable = [n for n, p in named if p.requires_grad]
    for names in (every, trainable):
        chosen = set(names)
        if [tuple(p.shape) for n, p in named if n in chosen] == shapes:
            return names
    raise ValueError(
        f"the EMAModel averages {len(shapes)} tensors, which are neither the model's {len(every)} parameters nor "
        f"its {len(trainable)} trainable ones (in the order of model.parameters(), of the same shapes): build it as "
        "EMAModel(model.parameters(), ...), or over the trainable parameters only, EMAModel([p for p in "
        "model.parameters() if p.requires_grad], ...) (LoRA adapters)"
    )


def _check_ema_pytorch_options(ema: Any, names: list[str], model: nn.Module) -> None:
    """Refuse the options of ema-pytorch's ``EMA`` under which its ``update()`` is not one EMA step
    of the model's trained parameters (read in ema_pytorch 0.8.3's source), each with its fix:

    * ``update_model_with_ema_every`` (with ``update_model_with_ema_beta``): every N updates it
      writes the EMA back into the online model (a copy, or a lerp keeping that much of the model):
      the weights move outside the optimizer step, which no tracker can book (it refused the next
      step with "changed outside the tracked step", naming no cause);
    * ``ignore_names`` / ``ignore_startswith_names`` / ``param_or_buffer_names_no_ema`` covering a
      trained parameter: the EMA leaves it at its last warm-up copy, or copies it at each update,
      instead of averaging it with the others' decay; the EMA ledger follows one decay for all
      parameters (it refused the first such update, or, where the parameter moved little, booked an
      average the EMA did not make). Frozen parameters and buffers may be listed: a frozen
      parameter never moves, and the EMA's buffers are read as they are (a change booked in the
      ledger's ``buffer_drift``);
    * ``lazy_init_ema=True`` before the first ``update()``: there are no averaged weights to read yet.

    ``include_online_model``, ``allow_different_devices``, ``move_ema_to_online_device``,
    ``use_foreach``, ``forward_method_names`` and ``coerce_dtype`` (see :func:`check_ema_precision`)
    change where the tensors live or how the same average is computed, not what it is: accepted."""
    every = getattr(ema, "update_model_with_ema_every", None)
    if every is not None:
        raise ValueError(
            f"ema-pytorch's EMA was built with update_model_with_ema_every={every} (update_model_with_ema_beta="
            f"{getattr(ema, 'update_model_with_ema_beta', 0.0)}): every {every} updates it writes the EMA back into "
            "the model, a change of the trained weights outside the optimizer step that the trainer's EMA, its "
            "checkpoints and an analyzer's ledgers cannot follow. Build it without update_model_with_ema_every "
            "(None, the default); to continue from the EMA weights, copy them into the model between runs "
            "(ema.copy_params_from_ema_to_model())"
        )
    if getattr(ema, "ema_model", None) is None:
        raise ValueError(
            "ema-pytorch's EMA was built with lazy_init_ema=True and has no EMA model yet: build it with "
            "lazy_init_ema=False (the default), or call ema.init_ema() before passing it"
        )
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n in names}
    for option in ("ignore_names", "ignore_startswith_names", "param_or_buffer_names_no_ema"):
        listed = set(getattr(ema, option, ()) or ())
        if option == "ignore_startswith_names":
            hit = sorted(n for n in trained if any(n.startswith(prefix) for prefix in listed))
        else:
            hit = sorted(trained & listed)
        if hit:
            what = ("copies them at each update instead of averaging them" if option == "param_or_buffer_names_no_ema"
                    else "leaves them at their last warm-up copy instead of averaging them")
            raise ValueError(
                f"ema-pytorch's EMA was built with {option} covering the trained parameters {hit[:5]}"
                f"{' ...' if len(hit) > 5 else ''}: it {what}, so it is not one EMA of the model's weights, which "
                f"the trainer's EMA ledger follows. Drop them from {option} (buffers and frozen parameters may stay "
                "there), or freeze them (requires_grad=False) before building the EMA"
            )


def _ema_module(ema: Any) -> Any:
    """The module an EMA object holds its averaged model in (ema-pytorch's ``ema_model``,
    ``AveragedModel.module``), or the object itself."""
    return getattr(ema, "ema_model", None) or getattr(ema, "module", None) or ema


def ema_buffers(ema: Any, model: nn.Module) -> Callable[[], dict[str, torch.Tensor]] | None:
    """A reader of the buffers the EMA weights are sampled with, by name: those of the module an
    EMA holds (ema-pytorch's ``EMA.ema_model``, ``AveragedModel.module``, an ``nn.Module``), or None
    where the EMA keeps parameters only (diffusers' ``EMAModel``, a callable) or the model has no
    buffers: the live model's are the ones then."""
    own = [n for n, _ in model.named_buffers()]
    if not own or (callable(ema) and not isinstance(ema, nn.Module)) or _is_diffusers_ema(ema):
        return None
    module = _ema_module(ema)
    theirs = {n for n, _ in module.named_buffers()}
    missing = [n for n in own if n not in theirs]
    if missing:
        raise ValueError(f"the EMA model has no buffers {missing[:5]}: it must be a copy of the tracked model")
    return functools.partial(_read_buffers, module, own)


EMA_KINDS = "diffusers' EMAModel, ema-pytorch's EMA or torch.optim.swa_utils.AveragedModel"
# An analyzer's ema_ledger: whether the EMA a trainer keeps (DDPMTrainer(ema=), GANTrainer(ema=)) gets a ledger
EMA_LEDGERS = ("trainer", "none")


def check_trainable_ema(ema: Any, model: nn.Module) -> None:
    """Raise unless a trainer can step ``ema`` (:func:`step_ema`) and read its weights for ``model``: a
    TypeError naming the kinds it takes, a ValueError when the EMA averages another model."""
    if not (_is_diffusers_ema(ema) or _is_ema_pytorch(ema)
            or isinstance(ema, torch.optim.swa_utils.AveragedModel)):
        raise TypeError(f"ema must be {EMA_KINDS} built over the trainer's model, got {type(ema).__name__}")
    names = [n for n, _ in model.named_parameters()]
    ema_parameters(ema, names, model)  # (its errors name the mismatch)
    if _is_ema_pytorch(ema) and {id(p) for p in ema.model.parameters()} != {id(p) for p in model.parameters()}:
        # ema-pytorch's update() averages the model it was built over, not the one the trainer steps
        raise ValueError(
            "ema-pytorch's EMA averages the model it was built over, and this one was built over another model (a "
            "copy?): its update() would never see the trainer's updates. Build it as EMA(model) with the model "
            "passed to the trainer"
        )
    check_ema_precision(ema, _weights_reader(ema, names, model)(), dict(model.named_parameters()))


def check_ema_precision(ema: Any, averaged: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Refuse EMA weights less precise than the model's (an EMA built before the model was cast: it would
    average in the lower precision, sample in it, and its ledger's check would fail at the first update), and
    an ema-pytorch EMA of another dtype without ``coerce_dtype=True`` (its ``lerp_`` fails after an update)."""
    for name, tensor in averaged.items():
        mine = params[name].dtype
        if tensor.dtype == mine or not (tensor.is_floating_point() and params[name].is_floating_point()):
            continue
        if torch.finfo(tensor.dtype).eps > torch.finfo(mine).eps:
            raise ValueError(
                f"the EMA holds '{name}' in {str(tensor.dtype).replace('torch.', '')} but the model's parameter is "
                f"{str(mine).replace('torch.', '')}: build the EMA after the model is cast (e.g. model.double() "
                "before EMAModel(model.parameters()) / EMA(model) / AveragedModel(model)). Lightning's "
                "precision='64-true' casts the module after __init__, setup() and on_load_checkpoint(): build the "
                "network in float64 in __init__, or cast the EMA in on_fit_start() (diffusers' "
                "ema.to(dtype=torch.float64))"
            )
        if _is_ema_pytorch(ema) and not getattr(ema, "coerce_dtype", False):
            raise ValueError(
                f"ema-pytorch's EMA holds '{name}' in {str(tensor.dtype).replace('torch.', '')}, the model "
                f"{str(mine).replace('torch.', '')}: its update cannot average across dtypes; build it with "
                "coerce_dtype=True, or after the model is cast"
            )


def _is_diffusers_ema(ema: Any) -> bool:
    """diffusers' ``EMAModel`` (``training_utils``): it holds the averaged parameters as ``shadow_params``."""
    return hasattr(ema, "shadow_params")


def _is_ema_pytorch(ema: Any) -> bool:
    return isinstance(ema, nn.Module) and hasattr(ema, "ema_model") and callable(getattr(ema, "update", None))


def ema_settings(ema: Any) -> dict[str, Any]:
    """What a resumed run's EMA must share with the saved one's, for a trainer's checkpoint: its kind and
    its decay schedule. diffusers' ``EMAModel`` loads its settings from the checkpoint (a resume built with
    another decay would silently take the saved one), ema-pytorch's ``EMA`` and ``AveragedModel`` keep the
    new ones (the average would silently follow another schedule): either way, refused. An
    ``AveragedModel``'s averaging function is compared by what it makes of θ̄ = 0, θ = 1 after 3 averages
    (``get_ema_multi_avg_fn(β)``: 1 − β; the default running mean: 1/4)."""
    kind = type(ema).__name__
    if _is_diffusers_ema(ema):
        keys = ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
    elif _is_ema_pytorch(ema):
        keys = ("beta", "update_after_step", "update_every", "inv_gamma", "power", "min_value")
    else:
        return {"kind": kind, "use_buffers": bool(ema.use_buffers), "average_of_0_and_1": _averaging_probe(ema)}
    return {"kind": kind, **{key: getattr(ema, key) for key in keys}}


def _averaging_probe(ema: Any) -> float:
    """An ``AveragedModel``'s average of θ̄ = 0 and θ = 1 after 3 averages (float64 scalars)."""
    averaged, current, count = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64), torch.tensor(3)
    if ema.multi_avg_fn is not None:
        rows = [averaged]
        ema.multi_avg_fn(rows, [current], count)
        return float(rows[0])
    if ema.avg_fn is not None:
        return float(ema.avg_fn(averaged, current, count))
    return 1.0 / (int(count) + 1)  # AveragedModel's own running mean, θ̄ + (θ − θ̄) / (n + 1)


def check_ema_state(ema: Any, state: Any) -> None:
    """Raise a ValueError unless ``state`` (an EMA's ``state_dict``) fits ``ema``, before anything is
    loaded: the same averaged tensors with their shapes and dtypes."""
    if _is_diffusers_ema(ema):
        saved = state.get("shadow_params") if isinstance(state, dict) else None
        mine = [(tuple(t.shape), t.dtype) for t in ema.shadow_params]
        theirs = None if not isinstance(saved, list) else [(tuple(t.shape), t.dtype) for t in saved]
        if theirs != mine:
            raise ValueError(
                f"the checkpoint's EMA does not fit this EMAModel ({len(mine)} tensors here, "
                f"{'none' if theirs is None else len(theirs)} saved, or other shapes or dtypes): build the EMA over "
                "the saved run's model"
            )
        return
    check_module_state(ema, state, "EMA")


def load_ema_state(ema: Any, state: Any, device: torch.device) -> None:
    """Load a checked (:func:`check_ema_state`) EMA state; diffusers' ``EMAModel`` keeps the loaded tensors
    where they were saved, so its averages are moved to the model's ``device``."""
    ema.load_state_dict(state)
    if _is_diffusers_ema(ema):
        ema.to(device=device)


def ema_update_count(ema: Any) -> int | None:
    """How many times the EMA's update was called, by its own counter (ema-pytorch's ``step``, which
    also counts the calls ``update_every`` skips; ``AveragedModel.n_averaged``; diffusers'
    ``EMAModel.optimization_step``), or None for an EMA that keeps none."""
    if _is_diffusers_ema(ema):
        count = getattr(ema, "optimization_step", None)
    elif _is_ema_pytorch(ema):
        count = getattr(ema, "step", None)
    else:
        count = getattr(ema, "n_averaged", None)
    return None if count is None else int(count)


def step_ema(ema: Any, model: nn.Module) -> None:
    """One EMA update after an optimizer step, each kind by its own API: ``EMAModel.step(parameters)``,
    ema-pytorch's ``EMA.update()`` (its own warm-up and ``update_every``), ``AveragedModel.update_parameters``."""
    if _is_diffusers_ema(ema):
        params = dict(model.named_parameters())
        ema.step([params[n] for n in _shadow_names(ema, model)])  # (zip would pair an adapters' EMA with the base)
    elif _is_ema_pytorch(ema):
        ema.update()
    else:
        ema.update_parameters(model)


@contextlib.contextmanager
def ema_weights(ema: Any, model: nn.Module) -> Iterator[nn.Module]:
    """Inside: a module with the EMA's weights, to sample with (``DDPMTrainer.sample(weights="ema")``,
    ``GANTrainer.sample(..., weights="ema")``): the one an EMA holds (ema-pytorch's ``ema_model``,
    ``AveragedModel.module``), or, for diffusers' ``EMAModel``, which holds parameters only, ``model``
    itself with the ``shadow_params`` in its parameter slots (no copy of the parameters: what
    ``copy_to`` would write, each in its parameter's dtype, device and strides, only a shadow that
    differs in these is converted) and copies of its buffers in the buffer slots (a forward that
    writes a buffer writes the copy).

    After the block, also when it raised: ``model``'s own parameter and buffer tensors back in their
    slots, untouched (values, ``requires_grad``, gradients), and every submodule's training mode as it
    was. The samples are bit for bit those of a deep copy of ``model`` with ``ema.copy_to`` applied,
    without the copy's memory. Not for training: the shadows are the
    EMA's own tensors (an optimizer step inside the block would write the EMA)."""
    if not _is_diffusers_ema(ema):
        yield _ema_module(ema)
        return
    params = dict(model.named_parameters())
    values = {}
    for name, shadow in zip(_shadow_names(ema, model), ema.shadow_params):  # (a ValueError for another set)
        param = params[name]
        same = shadow.dtype == param.dtype and shadow.device == param.device and shadow.stride() == param.stride()
        values[name] = shadow.detach() if same else torch.empty_like(param, requires_grad=False).copy_(shadow.detach())
    values.update({n: b.detach().clone() for n, b in model.named_buffers()})
    modes = [(m, m.training) for m in model.modules()]
    try:
        with evaluated_at(model, values):
            yield model
    finally:
        for module, training in modes:
            module.training = training


def _odd_gains(bar: dict[str, torch.Tensor], last: dict[str, torch.Tensor], theta: dict[str, torch.Tensor]) -> str:
    """The parameters whose own (1 − β), ⟨Δθ̄, θ − θ̄⟩ / ‖θ − θ̄‖², differs from most parameters' (one
    the EMA left out has 0, one it copied 1), as text for an error message; "" when none stands out."""
    own = {}
    for name in bar:
        away = theta[name] - last[name]
        norm = float((away * away).sum())
        if norm > 0:
            own[name] = float(((bar[name] - last[name]) * away).sum()) / norm
    if not own:
        return ""
    typical = sorted(own.values())[len(own) // 2]
    odd = {n: g for n, g in own.items() if not math.isclose(g, typical, rel_tol=1e-6, abs_tol=1e-12)}
    if not odd:
        return ""
    listed = ", ".join(f"'{n}': {g:.6g}" for n, g in list(odd.items())[:5])
    return (f"; the EMA moved these parameters with another 1 − β than the others' {typical:.6g}: {listed}"
            f"{' ...' if len(odd) > 5 else ''}")


class EMALedgers:
    """The EMA weights' ledgers of a tracker (see the module docstring); ``tracker.track_ema(ema)``
    builds it. ``ledgers[name]`` per partition, ``ledger`` the primary one (their ``rest`` holds
    the EMA's start row, also kept apart in ``start [M, d]``), ``decays`` the β_k read."""

    def __init__(self, model: TrackedModel, read: Callable[[], dict[str, torch.Tensor]], rtol: float, rule,
                 read_buffers: Callable[[], dict[str, torch.Tensor]] | None = None):
        self.model = model
        self.read = read
        self.read_buffers = read_buffers
        self.rtol = rtol
        self.rule = rule
        partitions = model.partitions
        self.rows = partitions.total  # groups of every partition; then the rest, one rounding row per partition
        self.rounding_rows = {name: self.rows + 1 + i for i, name in enumerate(partitions.names)}
        self.num_rows = self.rows + 1 + len(partitions.names)
        self.start_row = self.num_rows  # E's extra row
        self._check_scratch = CheckScratch()  # the sync's check buffers, kept from sync to sync
        theta = {n: p.detach().to(torch.float64).clone() for n, p in model.params.items()}
        bar = {n: t.detach().to(torch.float64).clone() for n, t in read().items()}
        self.theta_start, self.bar_start = theta, bar
        # rows: every partition's groups, the rest, each partition's rounding gap, (E only) the start
        self.displacement = {n: torch.zeros((self.num_rows, *t.shape), dtype=torch.float64, device=t.device)
                             for n, t in theta.items()}
        self.offset = {n: torch.zeros((self.num_rows + 1, *t.shape), dtype=torch.float64, device=t.device)
                       for n, t in theta.items()}
        self.last_bar = {n: t.clone() for n, t in bar.items()}
        # The bound on the offsets' carried drift (θ̄_k − θ̄_0) − Σ E_k, built from the EMA's measured moves alone:
        # A_{k+1} = β A_k + |Δθ̄_k − (1 − β)(θ − θ̄_k)| + (1 − β)|Σ D + θ_0 − θ| (the carried drift obeys the same
        # recurrence with signs), so an error in the offsets themselves is not taken as carried drift (measured from
        # the offsets alone, it was: any error in them widened the floor by itself). None: a state saved before it was
        # kept (the drift as measured, as before).
        self.drift_allowance: dict[str, torch.Tensor] | None = {n: torch.zeros_like(t) for n, t in bar.items()}
        # The structurally null parameters' share of D's and E's rest rows (tracking.null_params: the model's ledger
        # keeps their moves apart as ``null_moves``), for those that have been null at some step: D_null sums their
        # rest rows at the steps they were null, E_null follows D_null as E follows D; ΔE_null is pushed as one more
        # row, part of the rest (the EMA ledger's ``null_moves``).
        self.null_displacement: dict[str, torch.Tensor] = {}
        self.null_offset: dict[str, torch.Tensor] = {}
        self.decays: list[float] = []
        # An EMA of parameters only is sampled with the live model's buffers as they were after the last
        # tracked step ({name: tensor}, copies; None when the EMA keeps its own or there are none).
        self.live_buffers = None if read_buffers is not None else self._copy_live_buffers()
        with torch.no_grad(), analysis_mode(model.module), self._sampled_buffers():
            f_start = self._outputs(bar)
        self.ledgers = {name: PathKernelLedger.empty(f_start, size) for name, size in partitions.sizes.items()}
        self.start = torch.zeros_like(f_start)  # [M, d] the part of ``rest`` the start row made
        self._f_prev = f_start

    @property
    def ledger(self) -> PathKernelLedger:
        return self.ledgers[self.model.partitions.primary]

    def after_step(self, updates: dict[str, torch.Tensor], live_buffers: dict[str, torch.Tensor] | None = None,
                   null_names: tuple[str, ...] = ()) -> None:
        """D_{k+1} = D_k + u_k, with the step's rows ``{name: [R + 1 + Π, *shape]}``; ``live_buffers``: the copy of the
        live model's buffers :meth:`live_buffers_after` made (made here when not given); ``null_names``: the step's
        structurally null parameters (their whole update is the rest row's: added to D_null too)."""
        for name, u in updates.items():
            if u.shape[0] != self.num_rows:
                raise ValueError("an EMA ledger needs one update row per group: build the tracker with group_state='dense'")
        for name in null_names:  # (made first: a failing allocation leaves D as it was)
            if name not in self.null_displacement:
                self.null_displacement[name] = torch.zeros_like(self.displacement[name][self.rows])
                self.null_offset[name] = torch.zeros_like(self.displacement[name][self.rows])
        for name, u in updates.items():
            self.displacement[name] += u
            if name in null_names:
                self.null_displacement[name] += u[self.rows]
        if self.live_buffers is not None:
            self.live_buffers = live_buffers if live_buffers is not None else self._copy_live_buffers()

    def live_buffers_after(self) -> dict[str, torch.Tensor] | None:
        """The copy of the live model's buffers :meth:`after_step` keeps (None when it keeps none), made before the
        step is recorded: an allocation that fails there leaves nothing half-recorded."""
        return self._copy_live_buffers() if self.live_buffers is not None else None

    def _copy_live_buffers(self) -> dict[str, torch.Tensor] | None:
        """Copies of the live model's buffers by name (None when it has none)."""
        buffers = {n: b.detach().clone() for n, b in self.model.module.named_buffers()}
        return buffers or None

    def sync(self, step: int, theta_after: Mapping[str, torch.Tensor]) -> None:
        """Record the EMA's update since the last sync, if it moved (``step``: the optimizer steps so far;
        ``theta_after``: the model's parameters after the last tracked step, the θ the EMA moved towards,
        which the live ones need not be any more: an EMA copied into the model at the end of training)."""
        bar = {n: t.detach().to(torch.float64) for n, t in self.read().items()}
        if all(torch.equal(bar[n], self.last_bar[n]) for n in bar):
            return
        theta = {n: theta_after[n].detach().to(device=bar[n].device, dtype=torch.float64) for n in self.model.params}
        # 1. (1 − β) from the EMA's own move: Δθ̄ = (1 − β)(θ − θ̄).
        dot = sum(float(((bar[n] - self.last_bar[n]) * (theta[n] - self.last_bar[n])).sum()) for n in bar)
        norm = sum(float(((theta[n] - self.last_bar[n]) ** 2).sum()) for n in bar)
        gain = dot / norm if norm > 0 else math.nan
        for name in bar:
            expected = self.last_bar[name] + gain * (theta[name] - self.last_bar[name])
            gap = float((expected - bar[name]).abs().max()) if math.isfinite(gain) else math.inf
            scale = float(bar[name].abs().max() + theta[name].abs().max())
            ulp = float(torch.finfo(self.model.params[name].dtype).eps) * 4 * scale
            if gap > self.rtol * scale + ulp:
                raise LedgerCheckError(
                    f"after step {step} the EMA weights of '{name}' moved in a way that is not β θ̄ + (1 − β) θ of the "
                    f"model's current weights (best 1 − β = {gain:.6g}, gap {gap:.3e}){_odd_gains(bar, self.last_bar, theta)}: "
                    "update the EMA right after optimizer.step(), with the model's parameters, averaging every trained "
                    "parameter with one decay (no ema-pytorch ignore_names or param_or_buffer_names_no_ema for them); "
                    "when resuming, load the EMA's state from the checkpoint the tracker's state came from"
                )
        beta = 1.0 - gain
        # The fitted gain is only as precise as the EMA's moves: each is rounded where the EMA writes θ̄ (up to
        # ε|θ̄| apart from (1 − β)(θ − θ̄)), and in float32 a move of a few hundred ulps of the large weights
        # biases the least-squares gain (2e-4 of 0.1 with moves 3e-5 on weights 0.5). By Cauchy-Schwarz
        # |gain − (1 − β)| ≤ sqrt(Σ (ε θ̄)²) / sqrt(Σ (θ − θ̄)²): an element's offsets may miss its move by
        # that much of its |θ − θ̄|.
        noise = math.sqrt(sum(float((bar[n] * torch.finfo(self.model.params[n].dtype).eps).pow(2).sum()) for n in bar))
        gain_slack = noise / math.sqrt(norm) if norm > 0 else 0.0
        # 2. E_{k+1} = β E_k + (1 − β) D_{k+1}; the start row: β E + (1 − β)(θ_0 − θ̄_0).
        # Nothing of this object changes before the ledgers are written (step 5): a sync cut off half-way
        # (an interrupt, a failed check) leaves it as it was, and the next one records the same move.
        # As the change E_{k+1} − E_k = (1 − β)(D_{k+1} − E_k), formed in one [rows + 1, *shape] array per
        # parameter (the target [D; θ_0 − θ̄_0] and β E_k would be two more copies of every row).
        change = {}
        for name in bar:
            rows = torch.empty_like(self.offset[name])
            torch.sub(self.displacement[name], self.offset[name][:-1], out=rows[:-1])
            torch.sub(self.theta_start[name] - self.bar_start[name], self.offset[name][-1], out=rows[-1])
            change[name] = rows.mul_(gain)
        null_change = {n: (d - self.null_offset[n]).mul_(gain) for n, d in self.null_displacement.items()}
        # 3. The check: for every partition, its rows and the shared ones add up to the EMA's real move.
        layout = {partition: (part, [self.rows, self.rounding_rows[partition], self.start_row])
                  for partition, part in self.model.partitions.slices.items()}
        primary_name = self.model.partitions.primary
        primary = self.model.partitions.slices[primary_name]
        d_shared_rows = [self.rows, self.rounding_rows[primary_name]]  # D's rest and rounding rows
        shared_rows = [*d_shared_rows, self.start_row]  # E's, and its start row (layout's for the primary)
        allowance = {}
        for name in bar:
            eps = torch.finfo(self.model.params[name].dtype).eps
            bar_flat, last_flat, theta_flat = bar[name].reshape(-1), self.last_bar[name].reshape(-1), theta[name].reshape(-1)
            # The offsets' carried drift: Σ E_k is the EMA of the exact recurrence with the earlier steps' fitted gains,
            # θ̄_k the EMA's own writes; they part by the earlier gains' imprecision (the slack allowed at those steps,
            # times |θ − θ̄| then) and the EMA's rounding, decayed by β since. This step's rows move Σ E by
            # gain (θ − θ̄_0 − Σ E_k), the EMA by gain (θ − θ̄_k): they may differ by gain |drift| on top of this step's
            # own error. (Without it, a float32 run whose moves shrank below the earlier steps' slack, a StepLR
            # halving the rate, was refused with the rows correct to rounding: 1.0e-11 of carried drift on a move
            # of 1.0e-9, a floor of 4.8e-12.)
            offset = self.offset[name]
            carried = ((self.last_bar[name] - self.bar_start[name]) - offset[primary].sum(0) - offset[shared_rows].sum(0))
            carried.abs_()
            if self.drift_allowance is not None:
                # at most what the EMA's own moves can have carried (with float64's rounding of the offsets' sums):
                # offsets gone wrong are not drift (measured from the offsets alone, any error in them was allowed)
                cap = self.drift_allowance[name] * (1 + 1e-6) + (self.last_bar[name] - self.bar_start[name]).abs_().mul_(1e-10)
                torch.minimum(carried, cap, out=carried)
                del cap
                # carried_{k+1} = β carried_k + [Δθ̄ − gain (θ − θ̄_k)] − gain [Σ D + θ_0 − θ] (D's rows against the
                # parameters' own writes, rounded in their dtype): bounded term by term
                displacement = self.displacement[name]
                written = displacement[primary].sum(0).add_(displacement[d_shared_rows].sum(0)).add_(
                    self.theta_start[name]).sub_(theta[name]).abs_()
                fit = (bar[name] - self.last_bar[name]).sub_(theta[name] - self.last_bar[name], alpha=gain).abs_()
                allowance[name] = fit.add_(self.drift_allowance[name], alpha=abs(beta)).add_(written, alpha=abs(gain))
                del written
            carried_flat = carried.reshape(-1).mul_(abs(gain))

            def reference(columns, real, floor, spare, bar_flat=bar_flat, last_flat=last_flat, theta_flat=theta_flat,
                          eps=eps, carried_flat=carried_flat):
                torch.sub(bar_flat[columns], last_flat[columns], out=real)
                torch.abs(bar_flat[columns], out=floor).mul_(4 * eps)
                floor.add_(torch.sub(theta_flat[columns], last_flat[columns], out=spare).abs_(), alpha=gain_slack)
                floor.add_(carried_flat[columns])

            worst = largest_excess(change[name], layout, reference, self.rtol, self._check_scratch)
            for partition, excess in worst.items():
                if not excess <= 0:
                    raise LedgerCheckError(
                        f"after step {step} the EMA offsets of '{name}' (partition '{partition}') do not add up to the "
                        "EMA's move"
                    )
        # 4. Push the groups, the rest and the start row through the EMA's own quadrature nodes
        #    (the rounding row's effect stays in the residual, as in the model's ledger).
        keep = list(range(self.rows + 1)) + [self.start_row]
        nodes = []
        # (each parameter in its own dtype: the first one's for all rounded a float64 head's EMA weights to a float32
        # first layer's dtype, or evaluated a float32 layer in float64)
        dtypes = {n: p.dtype for n, p in self.model.params.items()}
        for s, w in zip(self.rule.nodes, self.rule.weights):
            nodes.append((w, {n: (self.last_bar[n] + s * (bar[n] - self.last_bar[n])).to(dtypes[n]) for n in bar}))
        with torch.no_grad(), analysis_mode(self.model.module), self._sampled_buffers():
            f_before = self._outputs(self.last_bar)
            rows = {n: c[keep] for n, c in change.items()}
            if null_change:  # one more row: E_null's change (part of the rest row's), reported apart
                rows = {n: torch.cat([c, (null_change[n] if n in null_change else torch.zeros_like(c[-1])).unsqueeze(0)])
                        for n, c in rows.items()}
            pushed = push_rows(self.model, rows, nodes)  # [M, R + 2 (+ 1), d]
            del rows
            f_after = self._outputs(bar)
        drift = f_before - self._f_prev  # the buffers moved the EMA weights' outputs
        rest = pushed[:, self.rows] + pushed[:, self.rows + 1] + drift  # the rest and the start rows
        # 5. Record every partition's ledger and form the new state, all or nothing: an error or an interrupt
        #    before the state is swapped in puts the ledgers back (PathKernelLedger.mark / restore), so the next
        #    sync records the same move once (the new offsets were formed after the ledgers were written, and a
        #    cut there left a recorded update without its offsets).
        written = []
        try:
            for name, part in self.model.partitions.slices.items():
                written.append((self.ledgers[name], self.ledgers[name].mark()))
                self.ledgers[name].record(pushed[:, part], rest, f_after, None, drift,
                                          step_null=pushed[:, self.rows + 2] if null_change else None,
                                          null_parameters=tuple(null_change))
            offset = {n: self.offset[n] + change.pop(n) for n in list(change)}  # each change freed as it is added
            null_offset = {n: self.null_offset[n] + c for n, c in null_change.items()}
            start = self.start + pushed[:, self.rows + 1]
            last_bar = {n: t.clone() for n, t in bar.items()}
            decays = [*self.decays, beta]
        except BaseException:
            for ledger, mark in reversed(written):
                ledger.restore(mark)
            raise
        self.offset, self.start, self._f_prev, self.last_bar, self.decays = offset, start, f_after, last_bar, decays
        self.null_offset = null_offset
        if self.drift_allowance is not None:
            self.drift_allowance = allowance

    @contextlib.contextmanager
    def _sampled_buffers(self) -> Iterator[None]:
        """Inside: the live module's buffer slots hold copies of the EMA's own buffers (where it
        has them, :func:`ema_buffers`), else of the live buffers kept after the last tracked step;
        after: the live tensors themselves again, untouched."""
        values = self.read_buffers() if self.read_buffers is not None else self.live_buffers
        if values is None:
            yield
            return
        slots = [(m, name, b, values[full]) for prefix, m in self.model.module.named_modules()
                 for name, b in m._buffers.items()
                 if b is not None and (full := f"{prefix}.{name}".lstrip(".")) in values]
        try:
            with torch.no_grad():
                for m, name, b, value in slots:
                    m._buffers[name] = value.detach().to(device=b.device, dtype=b.dtype, copy=True)
            yield
        finally:
            for m, name, b, _ in slots:
                m._buffers[name] = b

    def _outputs(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        params = self.model.params  # (each parameter in its own dtype, as in the pushes' nodes)
        forward = functional_model(self.model.module)
        return forward({n: t.to(params[n].dtype) for n, t in theta.items()}, self.model.probes).to(torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ledgers": {n: ledger.state_dict() for n, ledger in self.ledgers.items()},
            "displacement": self.displacement, "offset": self.offset, "last_bar": self.last_bar,
            "theta_start": self.theta_start, "bar_start": self.bar_start, "decays": list(self.decays),
            "f_prev": self._f_prev, "start": self.start, "live_buffers": self.live_buffers,
            "null_displacement": self.null_displacement, "null_offset": self.null_offset,
            "drift_allowance": self.drift_allowance,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledgers = {n: PathKernelLedger.from_state_dict(s) for n, s in state["ledgers"].items()}
        for key in ("displacement", "offset", "last_bar", "theta_start", "bar_start"):
            setattr(self, key, {n: t.clone() for n, t in state[key].items()})
        self.decays = list(state["decays"])
        self._f_prev = state["f_prev"].clone()
        self.start = state["start"].clone()
        # (states saved before the null parameters' share was kept: none, as their ledgers booked none)
        self.null_displacement = {n: t.clone() for n, t in state.get("null_displacement", {}).items()}
        self.null_offset = {n: t.clone() for n, t in state.get("null_offset", {}).items()}
        # (states saved before the carried drift's bound was kept: the drift as measured, uncapped)
        allowance = state.get("drift_allowance")
        self.drift_allowance = None if allowance is None else {n: t.clone() for n, t in allowance.items()}
        if self.live_buffers is not None and state.get("live_buffers") is not None:  # (older states: the live ones now)
            self.live_buffers = {n: t.clone() for n, t in state["live_buffers"].items()}


__all__ = ["EMALedgers", "check_ema_precision", "ema_buffers", "ema_callable", "ema_parameters", "ema_weights"]
