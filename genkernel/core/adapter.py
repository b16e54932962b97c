"""One small adapter between user models and the functional kernel core.

Every entry point of genkernel accepts the same shapes of data:

- ``inputs`` / ``probes``: a Tensor, or a tuple of Tensors passed as positional arguments
  (a denoiser called as ``model(x_t, t)``). Every tensor has the batch on dimension 0.
- ``targets``: a Tensor, a tuple of Tensors, or ``None`` when the loss needs none.
- model outputs: a Tensor, an object with a ``.sample`` tensor (diffusers), a dict with a
  ``"sample"`` key, or a tuple whose first element is the output. They are flattened per
  example to ``[B, d]``.

The adapter also refuses models whose per-example gradients would be meaningless (BatchNorm
in training mode, dropout in training mode) and runs analysis passes in a context that cannot
disturb training: modules are put in eval mode (so spectral norm's power iteration does not
advance; BatchNorm/dropout in training mode were refused, so nothing else changes), attention
uses the math SDPA backend (forward-mode AD does not pass through the fused CPU kernels), and
no global random state is consumed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import numbers
import os
import pickle
import random
import types
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_leaves

Batch = torch.Tensor | tuple[torch.Tensor, ...]


def as_tuple(batch: Batch, *, name: str = "inputs") -> tuple[torch.Tensor, ...]:
    """Return ``batch`` as a tuple of tensors; a single tensor becomes a 1-tuple.

    A tensor made under ``torch.inference_mode`` (a validation step's noised images) cannot be
    saved for a backward, which every analysis pass runs: it is copied into an ordinary tensor
    (the same values)."""
    if isinstance(batch, torch.Tensor):
        return (_ordinary(batch),)
    if isinstance(batch, (tuple, list)) and len(batch) > 0 and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(_ordinary(t) for t in batch)
    raise TypeError(
        f"{name} must be a Tensor or a non-empty tuple of Tensors (positional model arguments), "
        f"got {type(batch).__name__}"
    )


def like_parameter(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` on ``param``'s device, in its dtype when floating (integer class labels keep theirs): a model
    input (conditioning, latents) made to meet the model's weights."""
    return tensor.to(device=param.device, dtype=param.dtype if tensor.is_floating_point() else tensor.dtype)


def outside_inference_mode(function: Callable) -> Callable:
    """``function`` run with inference mode off: an entry point whose passes differentiate,
    callable from code under ``torch.inference_mode`` (Lightning's validation and test loops),
    where no pass records a graph. Its tensor arguments made under inference mode (alone, or in a
    tuple or list) are passed as ordinary copies (a view of one could not be saved for a backward
    either); its results are ordinary tensors. An entry point that remembers what it measured (a
    covering plan, a cost measure) would otherwise keep the outcome of passes that could not run."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            args = tuple(_ordinary_argument(a) for a in args)
            kwargs = {name: _ordinary_argument(value) for name, value in kwargs.items()}
            return function(*args, **kwargs)

    return run


def _ordinary_argument(value: Any) -> Any:
    """``value`` with an inference tensor in it (itself, or an item of a tuple or list) made ordinary."""
    if isinstance(value, torch.Tensor):
        return _ordinary(value)
    if isinstance(value, (tuple, list)) and any(isinstance(t, torch.Tensor) and t.is_inference() for t in value):
        items = [_ordinary(t) if isinstance(t, torch.Tensor) else t for t in value]
        # (a namedtuple takes its fields as arguments: built from one iterable it held that iterable as its first field)
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an ordinary copy of an inference tensor (made outside inference mode, which an
    inference tensor's own clone would not be)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def batch_size(batch: tuple[torch.Tensor, ...], *, name: str = "inputs") -> int:
    """Return the common leading dimension of every tensor in ``batch``; raise if they differ or
    the batch is empty."""
    sizes = {t.shape[0] if t.dim() > 0 else None for t in batch}
    if None in sizes:
        raise ValueError(f"every tensor in {name} needs a batch dimension 0; got a 0-d tensor")
    if len(sizes) != 1:
        raise ValueError(f"tensors in {name} disagree on the batch size: {[tuple(t.shape) for t in batch]}")
    size = sizes.pop()
    if size == 0:
        raise ValueError(f"{name} is empty (batch size 0): pass at least one example")
    return size


def select(batch: tuple[torch.Tensor, ...] | None, index: torch.Tensor | slice) -> tuple[torch.Tensor, ...] | None:
    """Rows ``index`` of every tensor of ``batch`` (``None`` stays ``None``); tensors of other batch
    sizes are refused (ValueError)."""
    if batch is None:
        return None
    if len({t.shape[0] if t.dim() > 0 else None for t in batch}) > 1 or any(t.dim() == 0 for t in batch):
        # rows of tensors of other lengths are other examples (a slice cuts them unequally, silently)
        raise ValueError(f"select needs every tensor with the same batch size on dimension 0, got shapes "
                         f"{[tuple(t.shape) for t in batch]}: pass one row per example in each tensor")
    return tuple(t[index] for t in batch)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor inside a model output (Tensor, ``.sample``, ``{"sample": ...}``, or tuple[0])."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, dict) and isinstance(output.get("sample"), torch.Tensor):
        return output["sample"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find the output tensor in a {type(output).__name__}: return a Tensor, an object "
        "with a .sample Tensor, a dict with 'sample', or a tuple whose first element is the output"
    )


def flat_output(output: Any, batch: int) -> torch.Tensor:
    """Model output as ``Tensor[batch, d]``."""
    out = output_tensor(output)
    if out.dim() == 0 or out.shape[0] != batch:
        raise ValueError(
            f"the model returned shape {tuple(out.shape)} for a batch of {batch}: outputs need the "
            "batch on dimension 0"
        )
    return out.reshape(batch, -1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, DataParallel or ``torch.compile`` (or ``model``
    itself): analysis passes run on the wrapped module, whose parameters the wrapper shares."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` wraps ``model`` (at any depth of :func:`unwrap`'s wrappers)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            return True
        if not isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return False
        model = model.module


# Wrappers whose step() is the inner optimizer's step (plus gradient synchronisation or a loss
# scaler, which the tracker checks itself), by the module that defines them.
PASS_THROUGH_OPTIMIZERS = ("accelerate.", "lightning.", "pytorch_lightning.", "lightning_fabric.")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (``.optimizer``) or
    Lightning's ``LightningOptimizer`` (``._optimizer``), or ``optimizer`` itself.

    Any other object that holds an optimizer in ``.optimizer`` or ``._optimizer`` (Lookahead, SWA,
    a schedule-free wrapper) is refused: its step() may move the parameters beyond the inner
    optimizer's step, which a tracker stepping the inner optimizer would silently leave out."""
    for _ in range(8):  # wrappers may subclass Optimizer themselves (accelerate's does)
        inner = getattr(optimizer, "optimizer", None)
        inner = inner if isinstance(inner, torch.optim.Optimizer) else getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        kind = type(optimizer)
        if not kind.__module__.startswith(PASS_THROUGH_OPTIMIZERS):
            raise TypeError(
                f"{kind.__module__}.{kind.__qualname__} wraps {type(inner).__name__}, but genkernel knows only "
                "accelerate's and Lightning's wrappers to step the inner optimizer unchanged: a wrapper's step() may "
                "move the parameters further (Lookahead, SWA), which the ledger would leave out. Pass the inner "
                "optimizer if the wrapper's step() is only its step(), else train without the wrapper"
            )
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{type(optimizer).__name__} is not a torch.optim.Optimizer and wraps none that genkernel can find "
            "(.optimizer or ._optimizer)"
        )
    return optimizer


def check_memory_budget(value: Any, *, name: str = "memory_budget") -> int:
    """A memory budget as a positive int number of bytes (ints, numpy integers and finite floats
    such as ``2e9`` are accepted); a clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be a number of bytes (e.g. 256 * 2**20), got {value!r}")
    number = float(value)
    if not (number >= 1 and number != float("inf")):
        raise ValueError(f"{name} must be a positive, finite number of bytes (e.g. 256 * 2**20), got {value!r}")
    if not isinstance(value, numbers.Integral) and not hasattr(value, "__index__") and number < 2**10:
        # A float of a few bytes is a size in other units (1.5 meaning 1.5 GiB ran on a 1-byte budget);
        # an int that small stays a budget in bytes (it forces the smallest chunks).
        raise ValueError(f"{name}={value!r} would be {int(number)} byte(s): budgets are in bytes, e.g. "
                         f"{name}={value!r} * 2**30 for {value!r} GiB")
    return int(number)


def check_finite(batch: tuple[torch.Tensor, ...], *, name: str) -> None:
    """Raise if a floating tensor of ``batch`` holds NaN or ±inf (naming the first bad rows)."""
    for position, t in enumerate(batch):
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) if t.dim() else ~torch.isfinite(t)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten().tolist()[:10]
                where = "" if len(batch) == 1 else f" (tensor {position})"
                raise ValueError(
                    f"{name}{where} hold NaN or infinite values at rows {rows}: every probe and input must be finite"
                )


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that require grad, by name (the θ of every ledger); refused when they are
    shards (:func:`check_whole_parameters`)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True): "
            "there is nothing to attribute"
        )
    check_whole_parameters(params, model)
    return params


def check_whole_parameters(params: dict[str, torch.Tensor], model: nn.Module | None = None) -> None:
    """Refuse parameters that are shards of the model's: DTensors (FSDP's ``fully_shard``, tensor
    parallelism), FSDP's flattened ``FlatParameter`` (a plain ``nn.Parameter`` marked ``_is_flat_param``
    since torch 2.1), or any parameter of a ``model`` holding a ``FullyShardedDataParallel`` wrapper (with
    ``use_orig_params=True`` its parameters are plain views of the local shard). Every kernel and ledger
    differentiates the model's own function of whole parameters on each process (per-example passes
    through ``torch.func``, the optimizer's update split elementwise); on shards the passes fail deep
    inside (DTensor's "mixed torch.Tensor and DTensor", FSDP's unshard inside a transform) or would
    describe one process's slice."""
    sharded = [name for name, p in params.items() if _is_flat_parameter(p) or _is_dtensor(p)]
    if not sharded and model is not None and any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        sharded = list(params)
    if sharded:
        raise ValueError(
            f"parameters {sharded[:5]} are shards (FSDP's fully_shard or FullyShardedDataParallel, or tensor "
            "parallelism): genkernel needs every trained parameter whole on each process. Train under "
            "DistributedDataParallel, whose gradient averaging the tracker follows, or analyze a single-process "
            "copy of the model with its full weights (the sharded state_dict gathered, DTensor.full_tensor())"
        )


def _is_flat_parameter(value: torch.Tensor) -> bool:
    """Whether ``value`` is FSDP's ``FlatParameter``: since torch 2.1 an ``nn.Parameter`` whose
    ``_is_flat_param`` is set (``isinstance`` answers through a metaclass; the type's name is "Parameter")."""
    return type(value).__name__ == "FlatParameter" or getattr(value, "_is_flat_param", False) is True


def _is_dtensor(value: torch.Tensor) -> bool:
    """Whether ``value`` is a DTensor (``torch.distributed.tensor``, ``torch.distributed._tensor`` before
    torch 2.5), without importing torch.distributed where no DTensor could exist: the class is looked up
    only when its module is loaded."""
    for where in ("torch.distributed.tensor", "torch.distributed._tensor"):
        dtensor = getattr(sys.modules.get(where), "DTensor", None)
        if isinstance(dtensor, type) and isinstance(value, dtensor):
            return True
    return False


def has_state_outside_training(model: nn.Module) -> bool:
    """Whether anything but the optimizer can move the model's outputs between steps: buffers
    (running statistics, spectral norm's vectors) or frozen parameters."""
    return any(True for _ in model.buffers()) or any(not p.requires_grad for p in model.parameters())


# Modules that draw random numbers in training mode besides dropout, by class name (so that
# libraries need not be imported): the attribute holding the probability of a draw.
RANDOM_IN_TRAINING = {
    "StochasticDepth": "p",  # torchvision: ConvNeXt, Swin, EfficientNet, MaxViT (residual branches dropped per example)
    "DropPath": "drop_prob",  # timm's stochastic depth
    "LabelEmbedding": "dropout_prob",  # diffusers: classifier-free guidance's label dropout (DiT, PixArt)
}


def coupled_modules(model: nn.Module) -> list[str]:
    """Modules whose forward couples or randomizes examples: BatchNorm that normalizes with the
    batch's statistics (in training mode, and in eval mode too when it keeps no running
    statistics, ``track_running_stats=False``), dropout with p > 0 in training mode (fresh
    masks), RReLU with lower < upper in training mode (fresh slopes), and the other modules that
    draw in training mode (:data:`RANDOM_IN_TRAINING`: stochastic depth, label dropout), whose
    draws a second forward does not repeat."""
    return [label for label, _, _ in _coupling(model)]


def randomizing_modules(model: nn.Module) -> list[str]:
    """The modules of :func:`coupled_modules` that draw random numbers in the forward (all but BatchNorm)."""
    return [label for label, draws, _ in _coupling(model) if draws]


def _coupling(model: nn.Module) -> list[tuple[str, bool, nn.Module]]:
    """``(label, draws, module)`` for each module of :func:`coupled_modules`, in module order; ``draws``: it
    randomizes (dropout, RReLU, :data:`RANDOM_IN_TRAINING`) rather than normalizing over the batch."""
    out = []
    for name, module in model.named_modules():
        label = f"{name or type(model).__name__} ({type(module).__name__}"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_mean is None and module.running_var is None:
                out.append((label + ", no running statistics: batch statistics in eval mode too)", False, module))
            elif module.training:
                out.append((label + ")", False, module))
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            out.append((label + ")", True, module))
        elif isinstance(module, nn.RReLU) and module.training and module.lower != module.upper:
            # fresh random negative slopes on every forward (measured: two per-probe Hessian calls gave
            # 6.62 and 7.28 for the same probe, silently)
            out.append((label + f", random slopes in [{module.lower}, {module.upper}] in training mode)", True,
                        module))
        elif module.training and type(module).__name__ in RANDOM_IN_TRAINING:
            p = getattr(module, RANDOM_IN_TRAINING[type(module).__name__], 0)
            if isinstance(p, numbers.Real) and p > 0:
                out.append((label + f", p={p} in training mode)", True, module))
    return out


@contextlib.contextmanager
def _typed_draws_off(model: nn.Module) -> Iterator[None]:
    """Inside: the modules that draw by type (:func:`randomizing_modules`) in eval mode (their own flag only),
    so that a forward's draws are the other modules'; their modes back afterwards."""
    typed = [module for _, draws, module in _coupling(model) if draws]
    try:
        for module in typed:
            module.training = False
        yield
    finally:
        for module in typed:
            module.training = True


def check_analysis_safe(model: nn.Module) -> None:
    """Raise if an analysis forward of ``model`` would change it (an embedding with ``max_norm``
    rewrites its weight on every forward call), or its gradients are sparse (``sparse=True``)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and module.weight.requires_grad:
            raise ValueError(
                f"module '{name or type(model).__name__}' ({type(module).__name__}, sparse=True) gives sparse "
                "gradients, which genkernel's kernels, checks and splits do not take. Build it with sparse=False"
            )
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
            raise ValueError(
                f"module '{name or type(model).__name__}' ({type(module).__name__}, max_norm={module.max_norm}) "
                "renormalizes its weight in place on every forward call, so an analysis forward would change the "
                "model. Build it with max_norm=None (and renormalize in the training loop if you need to)."
            )


def check_per_example_safe(model: nn.Module, *, route: str | None = None, found: Sequence[str] = ()) -> None:
    """Raise if per-example analysis of ``model`` in its current mode would be wrong or would
    change the model.

    BatchNorm in training mode (or without running statistics, in any mode) mixes the examples of
    a batch, so per-example gradients are undefined; dropout in training mode makes a second
    forward differ from the training one; an embedding with ``max_norm`` rewrites its weight on
    every forward. ``route``: the tracker route that needs per-example gradients (named in the
    message, with the one that works). ``found``: couplings found otherwise (:func:`random_forward`).
    """
    check_analysis_safe(model)
    coupled = coupled_modules(model) + list(found)
    if not coupled:
        return
    if route is not None:
        raise ValueError(
            f"{route} needs per-example gradients, but {', '.join(coupled[:3])} couple or randomize the examples "
            "(batch statistics, fresh dropout masks, RReLU slopes, stochastic depth or label dropout draws). Use "
            "group_state='dense' with "
            "gradient_route='graph' (or 'auto'), which takes group gradients from the training step's own graph, "
            "or put those modules in eval mode (BatchNorm: with running statistics)."
        )
    raise ValueError(
        f"{', '.join(coupled[:3])} couple or randomize examples: BatchNorm with batch statistics mixes the examples "
        "of a batch and dropout (stochastic depth, label dropout) in training mode draws afresh, so per-example "
        "gradients of this model are undefined here. Put them in eval mode (module.eval()) for kernels and tangent features, and build "
        "BatchNorm with track_running_stats=True (without running statistics it uses the batch's in eval mode "
        "too); a tracker takes group gradients from the training graph."
    )


def _cuda_devices(inputs: tuple[torch.Tensor, ...]) -> list[int]:
    return sorted({t.device.index for t in inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"})


def generator_states(tensors: tuple[torch.Tensor, ...], own: Sequence[Any] = ()) -> list[torch.Tensor]:
    """The states of the generators a forward may draw from: torch's global CPU generator, those of the
    CUDA devices of ``tensors`` (the inputs, the model's parameters and buffers), ``own``, the
    generators the model's modules keep (:func:`restored_module_generators`: torch's, NumPy's and Python's), and
    Python's and NumPy's global ones (a LayerDrop written with ``random.uniform``, an augmentation drawing from
    ``np.random``). Two lists differ (:func:`drew_between`) when a pass between them drew random numbers."""
    return ([torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in _cuda_devices(tensors)]
            + [_generator_state(g) for g in own] + _host_generator_states())


def _digest(state: Any) -> torch.Tensor:
    """A host generator's state as a tensor :func:`drew_between` compares (its pickle's SHA-256)."""
    return torch.frombuffer(bytearray(hashlib.sha256(pickle.dumps(state)).digest()), dtype=torch.uint8)


def _generator_state(generator: Any) -> torch.Tensor:
    """A module's generator's state as a tensor :func:`drew_between` compares (a host generator's by digest)."""
    state = _saved_generator_state(generator)
    return state if isinstance(generator, torch.Generator) else _digest(state)


def _set_generator_state(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, random.Random):
        generator.setstate(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    else:
        generator.set_state(state)


def _saved_generator_state(generator: Any) -> Any:
    """What :func:`_set_generator_state` puts back: a torch, Python or NumPy (Generator, RandomState) generator's
    state."""
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, random.Random):
        return generator.getstate()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    return generator.get_state(legacy=False)


def _host_generator_states() -> list[torch.Tensor]:
    """Python's ``random`` and NumPy's global generator states (whatever NumPy's bit generator), as tensors
    :func:`drew_between` compares."""
    return [_digest(random.getstate()), _digest(np.random.get_state(legacy=False))]


@contextlib.contextmanager
def forked_generators(devices: Sequence[int] = ()) -> Iterator[None]:
    """Every global generator a pass inside may draw from, put back on exit: torch's (``torch.random.fork_rng``:
    the CPU one and those of the CUDA ``devices``) and Python's and NumPy's. (fork_rng forks torch's alone: a
    tracker's construction forward on a model drawing from ``random`` or ``np.random`` in its forward, a LayerDrop
    written with ``random.uniform``, moved training's parameters by up to 0.05 after three steps.)"""
    python_state, numpy_state = random.getstate(), np.random.get_state(legacy=False)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _watched(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The tensors whose devices a forward of ``model`` on ``inputs`` may draw on (a forward that moves CPU
    probes to the model's CUDA device draws there)."""
    return (*inputs, *model.parameters(), *model.buffers())


def drew_between(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    """Whether the generators moved between two :func:`generator_states` of the same inputs."""
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def check_deterministic(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise if a forward pass of ``model`` on ``inputs``, in the mode analysis passes use
    (:func:`analysis_mode`: eval mode, forked RNG, so training's random stream is untouched), draws
    from torch's global generators or gives another output a second time (hidden randomness).

    The draw is checked as well as the outputs: a random flip of the whole batch gives the same output
    twice half of the time, and noise scaled by a zero-initialized strength (StyleGAN's noise inputs)
    none at initialization and a different one once training has moved the strength."""
    watched = _watched(model, inputs)
    # Each pass runs on copies of the buffers (a forward may write them): the check must neither
    # advance them (training would change) nor see them move. A generator a module keeps of its own
    # is not forked by fork_rng: put back by restored_module_generators.
    # The draw is the second pass's: a forward that reseeds before drawing (fixed noise) ends both passes
    # in one state and repeats its output, while any other draw moves the state again.
    with torch.no_grad(), analysis_mode(model), forked_generators(devices=_cuda_devices(watched)), \
            restored_module_generators(model) as own:
        with preserved_buffers(model):
            first = checked_forward(model, inputs, name="probes")
        between = generator_states(watched, own)
        with preserved_buffers(model):
            second = checked_forward(model, inputs, name="probes")
        drew = drew_between(between, generator_states(watched, own))
    if drew or not torch.equal(first, second):
        what = "draws random numbers in its forward" if drew else "gives another output on a second forward pass"
        raise ValueError(
            f"{type(model).__name__} is not deterministic in eval mode: it {what} on the same input (noise "
            "injection, a random augmentation, or other randomness that eval mode does not switch off). Probes must "
            "have one output each: remove the randomness from eval mode (draw only when self.training), or apply "
            "the augmentation to the batch outside the model."
        )


def data_dependent_modules(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules that declare ``data_dependent_forward`` true (a forward whose path
    depends on its inputs' values: the GAN critic forms the input gradient only for a batch holding penalty
    rows). The factored engine leaves their layers to torch.func, whose per-example passes take every path,
    so "auto" routes take such a model's group gradients from the training graph (measured: 16–18 % less
    per analyzed DCGAN-64 iteration with R1 than vmapped per-example passes)."""
    return [name for name, module in model.named_modules() if getattr(module, "data_dependent_forward", False)]


def random_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """``["<model> (draws random numbers in its forward)"]`` if a forward of ``model`` on ``inputs`` in
    its current mode draws from torch's global generators, else ``[]``: a module of the user's own
    that randomizes (an augmentation inside D, DiffAugment's or ADA's, noise injection), which
    :func:`coupled_modules` cannot know by type. Such a forward is not repeated by a second pass, so
    a tracker takes its group gradients from the training graph. One forward without a graph,
    on copies of the buffers and a forked RNG: training is untouched. The modules that draw by type
    (dropout, :func:`randomizing_modules`) run in eval mode for it, so a draw of the model's own is
    recorded beside them too (a dropout later set to p = 0 leaves it the model's only draw). ``[]``
    when the forward fails in this mode on these inputs (training may call the model otherwise; the
    per-step checks of every route then stand). A ``torch.Generator`` a module keeps as an attribute (an augmentation
    seeded for reproducibility) counts as well, and is put back too; so are the generators of the
    CUDA devices holding the model's tensors (a forward that moves CPU probes to its device)."""
    watched = _watched(model, inputs)
    with torch.no_grad(), forked_generators(devices=_cuda_devices(watched)), preserved_buffers(model), \
            restored_module_generators(model) as own, _typed_draws_off(model):
        before = generator_states(watched, own)
        try:
            checked_forward(model, inputs, name="probes")
        except Exception:
            return []
        drew = drew_between(before, generator_states(watched, own))
    return [f"{type(model).__name__} (draws random numbers in its forward)"] if drew else []


def draws_between_passes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether a second forward on ``inputs`` draws other numbers than the first: the generators' states after the
    first pass and after the second differ. A forward that reseeds before it draws (torch.manual_seed(0) in it, a
    generator of its own reseeded) draws the same numbers every pass, so its derivatives are repeatable: the state
    after one pass (what :func:`random_forward` compares) moves, the state between passes does not. Without a graph, on copies of
    the buffers, every generator forked or put back, the typed draws off; False where the forward fails."""
    watched = _watched(model, inputs)
    with torch.no_grad(), forked_generators(devices=_cuda_devices(watched)), preserved_buffers(model), \
            restored_module_generators(model) as own, _typed_draws_off(model):
        try:
            checked_forward(model, inputs, name="probes")
            between = generator_states(watched, own)
            checked_forward(model, inputs, name="probes")
        except Exception:
            return False
        return drew_between(between, generator_states(watched, own))


COUPLING_EXAMPLES = 4  # probes the coupling check runs (at least two: one probe is paired with a changed copy)


def coupled_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """``["<model> (...)"]`` if an example's output of ``model`` in its current mode depends on the other examples
    of its batch, else ``[]``: what :func:`coupled_modules` cannot know by type, a statistic over the batch in plain
    operations (``h - h.mean(0)``, ``F.batch_norm(h, None, None, training=True)`` as BigGAN's hand-written batch
    norm, a minibatch-standard-deviation layer in a ProGAN or StyleGAN discriminator). Per-example gradients of
    such a model are not its examples' own: each example's would carry the others' (the per-example routes' group
    rows were 25-29 % off a centering layer's true split, silently, their totals exact), so a tracker takes its group
    gradients from the training graph.

    Two forwards of the first :data:`COUPLING_EXAMPLES` of ``inputs`` (a single example paired with a copy), the
    second with the first example changed: replaced by the first other example that differs from it, every input
    of any dtype (token ids too, and values the model takes, indices in range); where none differs, its floating
    values scaled by 3/4 (towards zero: a float index stays in range). The other examples' outputs must not move
    (the same shapes run the same kernels: a model whose examples are independent gives them bit for bit; a change
    past 64 units of rounding of their scale counts). Without a graph, on copies of the buffers, every global
    generator forked, the modules that draw by type in eval mode: training is untouched. Where the forward refuses
    that batch (a minibatch-std layer whose fixed groups must divide it), the same on all of ``inputs``. ``[]`` where
    the forward fails on both in this mode, where nothing of the first example can change (one example of integers,
    or of zeros), or where it draws random numbers (:func:`random_forward` reports that)."""
    watched = _watched(model, inputs)
    # The first COUPLING_EXAMPLES probes; where the forward refuses that batch (a minibatch-std layer whose groups
    # of 8 must divide it), every probe: the probes' own forward runs on them, so a batch the model takes is known.
    sizes = dict.fromkeys((min(batch_size(inputs), COUPLING_EXAMPLES), batch_size(inputs)))
    for take in sizes:
        batch = tuple(t[:take] if take > 1 else torch.cat([t[:1], t[:1]]) for t in inputs)
        other = next((k for k in range(1, take) if any(not torch.equal(t[k], t[0]) for t in batch)), None)
        if other is not None:
            changed = tuple(torch.cat([t[other:other + 1], t[1:]]) for t in batch)
        else:
            changed = tuple(torch.cat([t[:1] * 0.75, t[1:]]) if t.is_floating_point() else t for t in batch)
        if all(torch.equal(a, b) for a, b in zip(batch, changed)):
            return []
        outputs = _paired_forwards(model, watched, batch, changed)
        if outputs is not None:
            break
    else:
        return []
    first, second = outputs
    if first.is_floating_point() or first.is_complex():
        finite = first[torch.isfinite(first)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        tolerance = 64 * torch.finfo(first.dtype).eps * max(scale, 1.0)
        # (an entry non-finite alike in both forwards, inf == inf or NaN and NaN, stays; NaN in one moves)
        same = (first == second) | (first.isnan() & second.isnan()) | ((first - second).abs() <= tolerance)
        moved = not bool(same.all())
    else:
        moved = not torch.equal(first, second)
    if not moved:
        return []
    return [f"{type(model).__name__} (an example's output depends on the other examples of its batch: a statistic "
            "over the batch in plain operations, a hand-written batch norm or a minibatch standard deviation; or a "
            "model that does not take its examples on dimension 0 of its inputs, a sequence-first one)"]


def _paired_forwards(model: nn.Module, watched: Any, batch: tuple, changed: tuple) -> Any:
    """``(first, second)``: ``model``'s outputs past the first example on ``batch`` and on ``changed``, without a graph,
    on copies of the buffers, every generator forked or put back, typed draws off; None where a forward raises or
    draws random numbers."""
    outputs = []
    with torch.no_grad(), forked_generators(_cuda_devices(watched)), restored_module_generators(model) as own, \
            _typed_draws_off(model):
        before = generator_states(watched, own)
        for examples in (batch, changed):
            with preserved_buffers(model):
                try:
                    outputs.append(checked_forward(model, examples, name="probes")[1:])
                except Exception:
                    return None
        if drew_between(before, generator_states(watched, own)):
            return None
    return tuple(outputs)


def frozen_dtypes_used(module: nn.Module, probes: tuple[torch.Tensor, ...], trained: Any) -> set:
    """The floating dtypes of the frozen parameters of ``module`` (those not in ``trained``, a dict of the trained
    ones) that a forward on ``probes`` in analysis mode hands some torch operation: only their rounding can make the
    per-example passes differ from the batch's. A frozen parameter the forward never reads (a spare head, a teacher
    kept as a submodule) would otherwise set a float64 model's checks to float32's 1e-5. One forward without a
    graph, on copies of the buffers, every generator put back; none without frozen floating parameters."""
    from torch.overrides import TorchFunctionMode

    trained_ids = {id(p) for p in trained.values()}
    frozen = {id(p): p.dtype for p in module.parameters() if p.is_floating_point() and id(p) not in trained_ids}
    if not frozen:
        return set()
    seen: set = set()

    class _Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, torch.Tensor) and id(leaf) in frozen:
                    seen.add(frozen[id(leaf)])
            return func(*args, **(kwargs or {}))

    watched = _watched(module, probes)
    with torch.no_grad(), analysis_mode(module), preserved_buffers(module), \
            forked_generators(_cuda_devices(watched)), restored_module_generators(module), _Seen():
        checked_forward(module, probes, name="probes")
    return seen


CONTAINER_ITEMS_SEARCHED = 64  # a list, tuple, set or dict attribute longer than this is not searched for generators
# Not searched for generators: modules (searched as modules), tensors, strings, classes, bound methods (their
# instance is searched where it is held), and Python modules held as attributes (self.backend = torch: the whole
# library's namespace, 26 ms a check, whose deprecated names warn when read, and whose global generators are not a
# module's own)
SKIPPED_IN_GENERATOR_SEARCH = (nn.Module, torch.Tensor, str, bytes, type, types.ModuleType, types.MethodType,
                               types.BuiltinMethodType)


@contextlib.contextmanager
def restored_module_generators(model: nn.Module) -> Iterator[list[Any]]:
    """Yield the distinct generators ``model``'s modules hold as attributes (``torch.Generator``,
    ``np.random.Generator``, ``np.random.RandomState``, ``random.Random``), directly or up to three levels down (in
    a helper object that is not a module, in a list, tuple, set or dict of at most :data:`CONTAINER_ITEMS_SEARCHED`
    items), and put each one's state back on exit: the forks of the global generators leave these alone, so a
    check's forward would otherwise advance a module's own and shift training's draws."""
    kinds = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)
    found: dict[int, Any] = {}
    seen: dict[int, int] = {}  # id -> the most levels left it was searched with

    def visit(value: Any, depth: int) -> None:
        # a generator held a few levels down: in a helper object that is not a module (an augmentation object's
        # own generator), in a list, tuple or dict attribute (at module scope none can be found: see observing.md)
        if isinstance(value, kinds):
            found.setdefault(id(value), value)
            return
        if depth == 0 or seen.get(id(value), 0) >= depth or isinstance(value, SKIPPED_IN_GENERATOR_SEARCH):
            return
        # (an object reached again with more levels left is searched again: reached first from deeper in, from a
        # settings dict naming it, its own generator two levels down was left out)
        seen[id(value)] = depth
        if isinstance(value, (list, tuple, set, dict)) and len(value) > CONTAINER_ITEMS_SEARCHED:
            return  # (a data table kept on a module: not searched item by item at every check)
        if isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item, depth - 1)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth - 1)
        else:
            # the instance's own attributes, read without its __getattr__ (an attribute-style config raising
            # KeyError for a name it lacks, a proxy): an object without a __dict__ holds none to search
            try:
                attributes = object.__getattribute__(value, "__dict__")
            except Exception:
                return
            if isinstance(attributes, dict):
                for item in list(attributes.values()):
                    visit(item, depth - 1)

    for module in model.modules():
        for value in vars(module).values():
            visit(value, 3)
    own = list(found.values())
    states = [_saved_generator_state(g) for g in own]
    try:
        yield own
    finally:
        for generator, state in zip(own, states):
            _set_generator_state(generator, state)


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def tf32_hazard(model: nn.Module) -> str | None:
    """What of ``model``'s float32 CUDA work rounds to TF32, in words, or None.

    TF32 keeps a 10-bit mantissa (about 1e-3 relative). cuDNN convolutions use it by default on GPUs
    of compute capability 8 and above (``torch.backends.cudnn.allow_tf32``), matrix products when
    ``torch.get_float32_matmul_precision()`` is below "highest". A ledger's outputs and group
    gradients would then carry that rounding, far above the checks' float32 bounds.
    """
    devices = {p.device for p in model.parameters() if p.is_cuda and p.dtype == torch.float32}
    if not devices:  # the CPU, or a float64 model: nothing rounds to TF32
        return None
    capable = any(torch.cuda.get_device_capability(device)[0] >= 8 for device in devices)
    has_convolutions = any(isinstance(m, CONVOLUTIONS) for m in model.modules())
    return tf32_reason(capable, has_convolutions, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())


def tf32_reason(tf32_device: bool, has_convolutions: bool, cudnn_tf32: bool, matmul_precision: str) -> str | None:
    """:func:`tf32_hazard`'s rule on its facts: float32 parameters on a TF32-capable GPU, convolution
    layers, cuDNN's TF32 flag and the float32 matmul precision."""
    if not tf32_device:
        return None
    reasons = []
    if has_convolutions and cudnn_tf32:
        reasons.append("convolutions (torch.backends.cudnn.allow_tf32 is True, torch's default)")
    if matmul_precision != "highest":
        reasons.append(f"matrix products (torch.get_float32_matmul_precision() is {matmul_precision!r})")
    return " and ".join(reasons) or None


DETERMINISM = ("strict", "warn", "off")


def set_exact_cuda_mode(determinism: str = "strict") -> dict[str, Any]:
    """Set torch's global switches the way exact ledgers on CUDA need them, for the whole process:
    TF32 off for cuDNN convolutions and float32 matrix products (trackers refuse it,
    :func:`tf32_hazard`), no cuDNN autotuning (its choice of kernel can differ between runs), and
    deterministic algorithms, so that training with and without an analyzer is bit for bit the same.

    Call it before the first CUDA work: ``CUBLAS_WORKSPACE_CONFIG`` is read when cuBLAS starts.

    Args:
        determinism: "strict" (default: deterministic kernels; an op that has none raises, naming
            it), "warn" (such an op warns and runs its non-deterministic kernel: training is then
            not bit for bit the same from run to run, analyzed or not) or "off" (TF32 and
            autotuning only). Under "warn" the memory-efficient attention backward takes its
            non-deterministic algorithm (it warns once) and two bare runs of the DDPM CIFAR-10 UNet
            ended with other parameters; under "strict" that UNet with the noise-level analyzer,
            the 64×64 DCGAN with the GAN analyzer and the ``cuda`` tests ran bit for bit (measured
            on an H200, torch 2.11).

    Returns:
        The settings now in force (:func:`exact_cuda_settings`).
    """
    if determinism not in DETERMINISM:
        raise ValueError(f"determinism must be one of {DETERMINISM}, got {determinism!r}")
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    if determinism != "off":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=determinism == "warn")
    return exact_cuda_settings()


def exact_cuda_settings() -> dict[str, Any]:
    """The switches :func:`set_exact_cuda_mode` sets, as they are now, ``{name: value}`` (for a
    run's record)."""
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "deterministic": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Run a pass with a copy in every buffer slot of ``module`` and put the original tensors back
    after it, untouched: whatever the pass writes (running statistics, spectral norm's u and v)
    goes to the copies, and not even the originals' version counters move, so a graph that
    training's forward saved them in still backpropagates (restoring with ``copy_`` would break it)."""
    slots = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    try:
        with torch.no_grad():
            for m, name, b in slots:
                m._buffers[name] = b.clone()
        yield
    finally:
        for m, name, b in slots:
            m._buffers[name] = b


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """A pass through ``module`` that changes none of its buffers (:func:`preserved_buffers`) and draws from no
    global generator training sees: torch's CPU generator and those of the CUDA devices holding its parameters and
    buffers are forked (a measuring pass's dropout or noise leaves training's draws where they were)."""
    devices = _cuda_devices((*module.parameters(), *module.buffers()))
    with preserved_buffers(module), forked_generators(devices=devices):
        yield


def buffer_snapshot(*modules: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Copies of the buffers of ``modules`` (each submodule once, shared ones too): ``(module, name, copy)``,
    what :func:`restore_buffers` puts back after a step that failed part-way."""
    seen, saved = set(), []
    for model in modules:
        for module in model.modules():
            if id(module) not in seen:
                seen.add(id(module))
                saved.extend((module, name, b.clone()) for name, b in module.named_buffers(recurse=False))
    return saved


def restore_buffers(snapshot: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Put a :func:`buffer_snapshot` back into the buffers the modules hold now: in place where shape and
    dtype fit (a forward may have rebound one, ``self.mean = ...``: then the saved tensor is set)."""
    with torch.no_grad():
        for module, name, saved in snapshot:
            current = getattr(module, name, None)
            if isinstance(current, torch.Tensor) and current.shape == saved.shape and current.dtype == saved.dtype:
                current.copy_(saved)
            else:
                setattr(module, name, saved)


def seed_bits(seed: int) -> int:
    """The 32 bits a CPU ``torch.Generator`` reads of ``seed``: the seed itself in [0, 2**32), else the
    first 32 bits of the SHA-256 of its decimal digits. torch reads the low 32 bits only, so seed and
    seed + 2**32 (0 and 2**32) drew the same numbers; seeds in [0, 2**32) keep what they drew."""
    s = int(seed)
    return s if 0 <= s < 2**32 else int.from_bytes(hashlib.sha256(str(s).encode()).digest()[:4], "little")


def seeded_generator(seed: Any, name: str = "seed") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, an int in [0, 2**64) (:func:`seed_bits`); a bool,
    a float or a seed outside that range is refused (TypeError / ValueError naming ``name``)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} ({seed!r}); pass e.g. {name}=0")
    if not 0 <= int(seed) < 2**64:  # manual_seed takes 64 bits ("Overflow when unpacking long long")
        raise ValueError(f"{name} must be in [0, 2**64), got {int(seed)}")
    return torch.Generator(device="cpu").manual_seed(seed_bits(seed))


def first_tensor(module: nn.Module, what: str) -> torch.Tensor:
    """``module``'s first parameter (or, for a module without any, its first buffer): where it lives and
    in what dtype. A ValueError naming ``what`` for a module with neither (``next(module.parameters())``
    raised a bare StopIteration)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    if tensor is not None:
        return tensor
    raise ValueError(f"{what} ({type(module).__name__}) has no parameters or buffers: nothing says its device and dtype, "
                     "and nothing in it trains; pass the module that holds the weights")


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (any integral type, not a bool); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def seed_weights(seed: int | None) -> None:
    """``torch.manual_seed(seed)`` before a model builder draws its weights (None: no reseeding); a
    float or bool is refused (manual_seed truncates a float, seed=0.5 and seed=0.9 drawing seed 0's
    weights, and takes a bool as 0 or 1)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int (or None), got {type(seed).__name__} {seed!r}; pass e.g. seed=0")
    torch.manual_seed(int(seed))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside (dropout off, BatchNorm on its running statistics: the function
    sampled from, as the ledger's probes see it), every module's own mode restored afterwards
    (``model.train(was)`` would switch a submodule kept in eval mode, a frozen encoder or a dropout
    switched off, to training). Used by :func:`analysis_mode`, sampling and the diffusion kernels."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def full_precision(model: nn.Module | None = None) -> Iterator[None]:
    """The passes inside in the model's own precision: ``torch.autocast`` off (on every device
    type where it is on), TF32 off for cuDNN convolutions and float32 matrix products (torch's
    switches), and, for a model that accelerate prepared with ``mixed_precision`` (its forward
    wrapped in autocast, the original kept as ``_original_forward``), that original forward, on
    ``model`` and on every module inside it (a read-out wrapper around the prepared model);
    everything is put back afterwards.

    A kernel called under autocast (a mixed-precision validation step: Lightning's
    ``precision="bf16-mixed"``, or a model prepared by ``Accelerator(mixed_precision="bf16")``)
    would run its forwards and backwards in bfloat16 or float16 and return a float32 kernel about
    1e-3 off (measured: 2.5e-3 and 2.3e-3 relative on a small MLP), with no sign of it. A float32
    convolutional model on a GPU rounds to TF32 (a 10-bit mantissa: cuDNN's default,
    ``torch.backends.cudnn.allow_tf32``; measured on an H200, a small conv net's factored kernel
    9.5e-6 off the float64 one with it, 1.5e-7 without). The kernel is that of the model's own
    parameters, in their dtype."""
    cudnn_tf32, matmul_precision = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    wrapped = [] if model is None else [(m.__dict__, m.__dict__["forward"]) for m in model.modules()
                                        if "_original_forward" in m.__dict__ and "forward" in m.__dict__]
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        try:
            if cudnn_tf32:
                torch.backends.cudnn.allow_tf32 = False
            if matmul_precision != "highest":
                torch.set_float32_matmul_precision("highest")
            for slots, _ in wrapped:
                slots["forward"] = slots["_original_forward"]
            yield
        finally:
            if cudnn_tf32:
                torch.backends.cudnn.allow_tf32 = True
            if matmul_precision != "highest":
                torch.set_float32_matmul_precision(matmul_precision)
            for slots, forward in wrapped:
                slots["forward"] = forward


@contextlib.contextmanager
def loop_precision(like: torch.Tensor, precision: torch.dtype | None) -> Iterator[None]:
    """A pass repeated as a mixed-precision loop ran it: under ``torch.autocast`` to ``precision``
    (float16/bfloat16) on ``like``'s device type; ``precision=None``: as the caller's context is."""
    with torch.autocast(like.device.type, dtype=precision) if precision is not None else contextlib.nullcontext():
        yield


def floating_parameter(model: nn.Module) -> torch.Tensor | None:
    """The first floating-point parameter of ``model`` (its device and dtype are the model's own
    precision: what a mixed-precision loop's half-precision activations are read back in), or None."""
    return next((p for p in model.parameters() if p.is_floating_point()), None)


@contextlib.contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """Context for analysis passes that must not disturb training.

    Modules go to eval mode (restored afterwards, module by module), the passes run in the model's
    own precision (:func:`full_precision`: autocast and TF32 off, accelerate's autocast-wrapped
    forward swapped for the original), attention uses the math
    SDPA backend and no MultiheadAttention fast path (:func:`forward_ad_attention`: forward-mode AD
    on every device, the same values), and the global RNG state is
    forked and restored. Activation checkpointing switched on through a module's
    ``gradient_checkpointing`` flag (diffusers' and transformers' ``enable_gradient_checkpointing``)
    is off inside: it recomputes the same values, and torch.func cannot run it (diffusers checks
    the flag in eval mode too). Analysis passes then hold their activations like any forward.
    """
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})  # each device's RNG once
    try:
        for module in checkpointed:
            module.gradient_checkpointing = False
        with eval_mode(model), forked_generators(devices=devices), forward_ad_attention(), full_precision(model):
            yield
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True


@contextlib.contextmanager
def explained_torch_func_errors() -> Iterator[None]:
    """Re-raise torch.func's error on a checkpointed forward as :func:`checkpointing_error`'s."""
    try:
        yield
    except RuntimeError as error:
        clear = checkpointing_error(error)
        if clear is None:
            raise
        raise clear from error


def checkpointing_error(error: BaseException) -> ValueError | None:
    """The clear error for torch.func meeting ``torch.utils.checkpoint`` called directly in a
    model's forward (torch.func cannot run saved-tensor hooks), or None for any other error."""
    if "saved tensor hooks" not in str(error):
        return None
    return ValueError(
        "the model calls torch.utils.checkpoint in its forward, which torch.func's reverse mode (per-example "
        "gradients, Jacobians) cannot run. Skip the checkpoint call when the module's gradient_checkpointing "
        "attribute is False (as diffusers does: analysis passes switch that flag off), or use the routes that read "
        "layer factors with autograd: a tracker's gradient_route='example' or 'auto' with "
        "contribution_route='jvp', or group_state='factored' (plain SGD)"
    )


@contextlib.contextmanager
def forward_ad_attention() -> Iterator[None]:
    """Attention kernels that support forward-mode AD, with the same values: the math SDPA backend,
    and no ``nn.MultiheadAttention`` fast path (``_native_multi_head_attention`` has no forward AD,
    and in eval mode it is taken whenever the parameters do not require grad, as inside torch.func:
    a JVP push through a MultiheadAttention model failed). Both are restored afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def evaluated_at(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """The module with parameters and buffers replaced by ``values`` (by name) for the whole
    block, leaving it exactly as it was afterwards. A name the module does not have, or a
    parameter's value of another shape, is refused (ValueError): torch would use the module's own
    value for the first and broadcast the second, silently.

    A forward and its backward belong inside one block: activation checkpointing (diffusers'
    ``enable_gradient_checkpointing``, ``torch.utils.checkpoint``) recomputes forwards during the
    backward, and they must see the same values (measured: a capture at a quadrature node whose
    backward ran after ``functional_call`` returned used the module's own parameters there, a
    relative residual of 4e-3 on a checkpointed MLP, silently).

    ``torch.func.functional_call`` with ``tie_weights=True`` (needed so a parameter registered under
    two names is replaced under both) leaves the replacement tensor in the module when a module is
    registered twice (measured with torch 2.14: the model's Parameter became the analysis tensor,
    so training silently stopped updating it). Every parameter and buffer slot is recorded before
    the block and put back after it.
    """
    slots = [
        (module, table, name, value)
        for module in model.modules()
        for table in (module._parameters, module._buffers)
        for name, value in table.items()
    ]
    known = {f"{prefix}.{name}" if prefix else name: (table is module._parameters, value)
             for prefix, module in model.named_modules(remove_duplicate=False)
             for table in (module._parameters, module._buffers) for name, value in table.items()}
    unknown = [name for name in values if name not in known]
    if unknown:
        # torch would skip a name on an existing submodule (the module's own value is used, silently)
        raise ValueError(
            f"values name {unknown[:5]}, which are no parameter or buffer of {type(model).__name__}: pass names as "
            "model.named_parameters() / named_buffers() give them (a DistributedDataParallel or torch.compile "
            "wrapper adds 'module.' or '_orig_mod.': name the unwrapped module's)"
        )
    # A parameter of another shape may broadcast (a bias of shape [1]) and give other numbers silently.
    # (Buffers are not checked: caches such as rotary tables may change their shape in a forward.)
    reshaped = [f"{name}: {tuple(values[name].shape)} for {tuple(current.shape)}" for name, (parameter, current) in
                known.items() if parameter and current is not None and name in values
                and isinstance(values[name], torch.Tensor) and values[name].shape != current.shape]
    if reshaped:
        raise ValueError(f"values of another shape than the parameters they replace ({', '.join(reshaped[:3])}): pass "
                         "each parameter's value in its own shape")
    try:
        # functional_call's own context (torch.nn.utils.stateless), held across the backward too
        with _reparametrize_module(model, values, tie_weights=True, strict=False):
            yield model
    finally:
        for module, table, name, value in slots:
            if table.get(name) is not value:
                table[name] = value


def call_with(model: nn.Module, values: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Any:
    """``model(*inputs)`` with parameters and buffers replaced by ``values`` (by name), leaving the
    module exactly as it was (:func:`evaluated_at` for the forward only: a backward through a
    checkpointed model belongs inside that block)."""
    with evaluated_at(model, values):
        return model(*inputs)


def functional_model(
    model: nn.Module, buffers: dict[str, torch.Tensor] | None = None, *, flatten: bool = True
) -> Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, ...]], torch.Tensor]:
    """``f(params, inputs) -> Tensor[B, d]``: the model as a pure function of its parameters.

    ``params`` need only hold the trainable parameters; frozen parameters and buffers are
    taken from the module (or ``buffers``) as they are. ``flatten=False`` returns the output
    tensor in the model's own shape (what a ``loss_fn`` receives in training).
    """
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    fixed = {**dict(model.named_buffers()), **frozen, **(buffers or {})}

    def forward(params: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = call_with(model, {**fixed, **params}, inputs)
        return flat_output(out, inputs[0].shape[0]) if flatten else output_tensor(out)

    return forward


def under_torch_func(t: torch.Tensor) -> bool:
    """Whether ``t`` is inside a torch.func transform (vmap, grad, jvp): data-dependent checks
    cannot run there (a loss checks its values in the training step's own call instead)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


LOW_PRECISION = (torch.float16, torch.bfloat16)


def low_precision_in_graph(t: torch.Tensor, unrecorded: Any = None) -> torch.dtype | None | Any:
    """The coarsest float16/bfloat16 dtype among the gradients that flow through ``t``'s autograd
    graph (``Tensor[...]`` with a ``grad_fn``; bfloat16 where a graph mixes both, as its rounding is the
    larger), or None (``unrecorded`` where the graph keeps no record of its dtypes).

    A float32 loss can hide a mixed-precision forward: ``torch.autocast`` runs the matmuls and
    convolutions in bfloat16/float16 and the loss (cross-entropy, MSE) back in float32, so neither
    the loss's dtype nor the autocast state after the ``with`` block shows it; the graph does (each
    node records the dtypes of the gradients it receives). Returns None where this torch keeps no
    such record (``Node._input_metadata``)."""
    stack, seen, found = [t.grad_fn], set(), None
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        try:
            metadata = node._input_metadata
        except (AttributeError, RuntimeError):
            return unrecorded
        for dtype in (getattr(entry, "dtype", None) for entry in metadata):
            if dtype == torch.bfloat16:
                return torch.bfloat16  # nothing coarser to find
            if dtype == torch.float16:
                found = torch.float16
        stack.extend(child for child, _ in node.next_functions)
    return found


def targets_per_example(outputs: torch.Tensor, targets: Any, what: str) -> torch.Tensor:
    """``targets`` reshaped to ``outputs``' shape ``[B, ...]``; refuses targets with another batch
    size or another number of values per example, which a plain reshape or broadcast would pair
    with the wrong outputs without an error."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{what} needs targets as a Tensor, got {type(targets).__name__}")
    batch = outputs.shape[0]
    if targets.dim() == 0 or targets.shape[0] != batch or targets.numel() != outputs.numel():
        raise ValueError(
            f"{what}: targets of shape {tuple(targets.shape)} do not match outputs of shape {tuple(outputs.shape)}: "
            f"targets need the batch ({batch}) on dimension 0 and the same number of values per example as the "
            "outputs (pass targets shaped like the model's output)"
        )
    return targets.reshape(outputs.shape)


def not_fitting_inputs(error: BaseException) -> bool:
    """Whether a forward's ``error`` can mean that its inputs do not fit the model; not for an
    out-of-memory error or a failed collective (a peer process gone), which must reach the caller
    as they are (a loop may catch ``torch.OutOfMemoryError``; blaming the inputs would mislead)."""
    distributed_error = getattr(torch.distributed, "DistError", ())
    return isinstance(error, (RuntimeError, TypeError, ValueError, IndexError)) and not isinstance(
        error, (torch.OutOfMemoryError, distributed_error)) and not _out_of_memory(error)


# Allocation failures torch raises as a plain RuntimeError, not torch.OutOfMemoryError: the CPU allocator's
# ("DefaultCPUAllocator: can't allocate memory"), MPS's ("MPS backend out of memory"), a CUDA kernel launch's
# ("CUDA error: out of memory"), cuBLAS' and cuDNN's (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED).
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory", "_ALLOC_FAILED")


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error``'s message says an allocation failed (blamed on the inputs, a real CPU out-of-memory in a
    forward became "inputs of shapes ... do not fit", a ValueError a loop catching RuntimeError for it missed)."""
    message = str(error).lower()
    return any(marker.lower() in message for marker in _OUT_OF_MEMORY)


def not_fitting_message(name: str, model: nn.Module, inputs: Sequence[Any], error: BaseException) -> str:
    """The message of a ValueError for ``inputs`` (named ``name``: "inputs", "probes") that ``model`` refused with
    ``error``: their shapes, torch's own words, and where their floating dtypes or devices differ from the model's
    parameters, which is which and the fix (torch's "mat1 and mat2 must have the same dtype, but got Float and
    Double" said neither)."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    message = f"{name} of shapes {[tuple(t.shape) for t in tensors]} do not fit {type(model).__name__}: {error}"
    parameter = floating_parameter(model)
    if parameter is None:
        return message
    floats = [t for t in tensors if t.is_floating_point()]
    dtypes = sorted({str(t.dtype) for t in floats if t.dtype != parameter.dtype})
    devices = sorted({str(t.device) for t in tensors if t.device != parameter.device})
    if dtypes or devices:
        given = ", ".join(dtypes + [f"on {d}" for d in devices])
        message += (f" (the {name} are {given}; the model's parameters are {parameter.dtype} on {parameter.device}: "
                    f"pass the {name} as .to(device={str(parameter.device)!r}, dtype={parameter.dtype}), or move the "
                    "model before building the tracker)")
    return message


def checked_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, name: str) -> torch.Tensor:
    """Plain forward pass, ``Tensor[B, d]``, with a clear error when ``inputs`` do not fit."""
    try:
        out = model(*inputs)
    except Exception as error:
        if not not_fitting_inputs(error):
            raise
        raise ValueError(not_fitting_message(name, model, inputs, error)) from error
    return flat_output(out, batch_size(inputs, name=name))
