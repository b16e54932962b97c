"""What a vmapped JVP pass through the probes holds, measured on the model.

The tracker pushes update rows to the probes by forward-mode AD, vmapped over the rows
(``tracking.routes._jvp_rows``, through :func:`jvp_pass`), as many rows a pass as its memory budget
allows (:func:`genkernel.core.cost.push_pass_shape`); the cost estimate counts the same pass
(``probe_pushes``, ``ema_sync``). A pass holds the probes' primal activations and, per row, their
tangents, and how much of the activations each takes depends on the layers. Measured
(:class:`PushMemory`, per probe and activation byte, float32, the allocator's slack in): the DDPM
CIFAR-10 UNet 0.26 a row (0.18 besides, the primal), an MNIST-sized UNet 0.42 (0.29), the tiny UNet
0.35 (0.26), an MLP 784-2048-2048-10 1.56 (0.62), the DCGAN 64×64 generator 5.2 (a parameter-sized
copy a row at 2 probes, extrapolated per probe: its passes of 8 probes hold 0.12-0.30 of what is
counted). One constant (1.25 a row, the primal unbudgeted) made a UNet's passes 3-5 times narrower
than its budget allows, each with a primal forward of the probes, and its estimate that much high.

:func:`measure_push_memory` runs the pass the tracker runs on ``min(M, 2)`` probes at 1 and 2 rows
(and one row through one probe) under :class:`LiveBytes` (a ``TorchDispatchMode`` counting every
storage an operation returns that did not exist before, while it lives: the device's allocations,
not the process's), and returns a :class:`PushMemory`: bytes of a row and of the primal per probe and
activation byte, times :data:`ALLOCATOR_SLACK`. It runs once, at the tracker's construction (three
small passes: 4.1 s on the CIFAR UNet on one CPU thread, its 2-row tangents 286 MB); a model the measurement cannot
run is given :data:`DEFAULT_PUSH_MEMORY`, the old constant.

Known limits (a second read's measures, held / counted over the tracker's own passes at five budgets,
the CPU allocator's events as the reference): an operation's own workspace, allocated and freed inside
it, is not seen: a CPU convolution's unfolded columns held 1.20-1.36 times the count on a 7×7
convolution of 3 and 4 channels at 128² (cuDNN's and cuBLAS's workspaces on CUDA likewise), so such a
pass can exceed its budget by a third; what a pass holds whatever its probes (a transformer encoder's
per-row arrays, the DCGAN generator's copy) is extrapolated per probe, an over-count (0.08-0.13 on a
transformer encoder): narrower passes than the budget allows, never wider. Every other model measured
held 0.2-0.8 of its count.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.func import jvp, vmap
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .adapter import analysis_mode, functional_model

# The allocator's share over the live bytes: the peak RSS of a pass over its live storages measured
# 1.2-1.25 on three UNet2DModels and an MLP (glibc returning every block of 64 KiB or more).
ALLOCATOR_SLACK = 1.25
# Probes of the measured pass: per probe, a pass of one (the DCGAN generator's) held a parameter-sized
# copy a row that two or more did not.
MEASURED_PROBES = 2


@dataclass(frozen=True)
class PushMemory:
    """Bytes of a vmapped JVP pass, per probe and per byte of one probe's activations
    (``activation_elements × element size``): ``row`` for each tangent row it pushes, ``primal``
    once (the probes' own forward); a pass of R rows through M' probes holds about
    ``M' × activation_bytes × (primal + R × row)`` besides its parameter-sized copy of tangents."""

    row: float
    primal: float

    def __post_init__(self) -> None:
        for name in ("row", "primal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"PushMemory.{name} must be a number >= 0, got {value!r}")


# What a model the measurement cannot run is given: a row 1.25 of the activations (measured on an MLP, the
# largest of the models above after the DCGAN generator's one-probe pass), the primal in it.
DEFAULT_PUSH_MEMORY = PushMemory(row=1.25, primal=0.0)


def jvp_pass(module: nn.Module, theta: dict[str, torch.Tensor],
             probes: tuple[torch.Tensor, ...]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``push(tangents) -> J(probes; θ) u`` for one tangent row ``u`` (``{name: Tensor[*shape]}``),
    to be vmapped over rows: the pass the tracker runs and the one measured here."""
    forward = functional_model(module)
    return lambda tangent: jvp(lambda p: forward(p, probes), (theta,), (tangent,))[1]


class LiveBytes(TorchDispatchMode):
    """Inside it, :attr:`peak` is the most bytes of storages alive at once among those the operations
    returned that were not among ``existing`` (tensors made before: the parameters, the tangents, the
    probes; a storage an operation is given without one inside having made it is taken as made before,
    too: the frozen parameters and buffers an ``existing`` leaves out). A storage is followed by a weak
    reference and dropped once freed (checked at every operation, before its outputs count); views share
    their base's storage and count once; one resized in place counts at its new size. An operation's
    temporaries freed inside it are not seen (a kernel's workspace)."""

    def __init__(self, existing: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self._existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # (what was freed since the last operation first: it was gone before this one's outputs existed)
        is_expired = _STORAGE_EXPIRED
        for key in [key for key, (ref, _) in self._live.items() if is_expired(ref.cdata)]:
            self.current -= self._live.pop(key)[1]
        # An output on the storage of a tensor the operation was given (a view, an in-place operation, the input
        # returned) is nothing new unless an earlier operation made that storage: every storage made inside is
        # followed from the operation that made it, so one given and not followed was made before (a frozen
        # weight's transpose in F.linear, a buffer updated in place), whether or not ``existing`` names it.
        given = None
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live:  # grown or shrunk in place since (resize_, an out= variant)
                held = self._live[key][1]
                if storage.nbytes() != held:
                    self._live[key] = (self._live[key][0], storage.nbytes())
                    self.current += storage.nbytes() - held
                continue
            if key in self._existing:
                continue
            if given is None:
                given = {x.untyped_storage()._cdata for x in _tensors((args, kwargs))}
            if key not in given:
                self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


_STORAGE_EXPIRED = torch.UntypedStorage._expired  # (StorageWeakRef.expired without its frame: every operation asks)


def _tensors(value):
    """The tensors in an operation's arguments or outputs (tensors, lists, tuples and dicts of them, nested)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def measure_push_memory(module: nn.Module, params: dict[str, torch.Tensor], probes: tuple[torch.Tensor, ...],
                        activation_bytes: int) -> PushMemory:
    """:class:`PushMemory` of ``module``'s JVP pass, measured: the pass of :func:`jvp_pass` on the first
    ``min(M, 2)`` probes at 1 and 2 tangent rows under :class:`LiveBytes` (in analysis mode, as the
    tracker pushes), row = peak(2) − peak(1) and primal = peak(1) − row per probe and per ``activation_bytes`` (one probe's
    activation elements × element size), times :data:`ALLOCATOR_SLACK`.
    Where M >= 2, also one row through the first probe alone, the smallest pass the tracker runs (one row
    through a chunk of one): the primal is at least what that pass holds besides its row, so that what a pass
    holds whatever its probes (a zero tangent torch.func materializes for a frozen weight after a trained
    layer: a LoRA base) is counted whole in a pass of one probe, not as half of a two-probe pass.
    A model whose pass raises (no forward-mode rule: the tracker then takes the Jacobian route) gets
    :data:`DEFAULT_PUSH_MEMORY`. A model of the same architecture (its class, its modules as ``repr`` lists
    them, their attention processors, the settings ``repr`` leaves out: :func:`module_settings`), parameter and buffer shapes, trained parameters and probe shapes as
    one measured before in this process gets that measure again (:data:`MEASURES_KEPT` kept): the passes
    cost several plain passes under the counter (0.25 s on the tiny UNet), which a test suite or a
    sweep building many trackers of one model would pay at every one."""
    if activation_bytes <= 0 or not params:
        return DEFAULT_PUSH_MEMORY
    return remembered("push", architecture_key(module, params, probes, activation_bytes),
                      lambda: _measured(module, params, probes, activation_bytes))


# Measures kept per process, of every kind (the least recently used dropped first).
MEASURES_KEPT = 256
_MEASURED: OrderedDict[tuple, Any] = OrderedDict()


def remembered(kind: str, key: tuple, measure: Callable[[], Any]) -> Any:
    """``measure()``, taken once per process for a ``kind`` of measure (this module's pass, ``cost.graph_row_bytes``'
    row) and a model's :func:`architecture_key`: a later call with the same gets the value again
    (:data:`MEASURES_KEPT` kept, of all kinds together). A measure that returns None (it could not be taken) is not
    kept: the next call measures again."""
    full = (kind, key)
    if full in _MEASURED:
        _MEASURED.move_to_end(full)
        return _MEASURED[full]
    with torch.inference_mode(False):  # (passes that cannot record a graph would measure, and be kept, wrong)
        value = measure()
    if value is None:
        return None
    _MEASURED[full] = value
    if len(_MEASURED) > MEASURES_KEPT:
        _MEASURED.popitem(last=False)
    return value


def architecture_key(module: nn.Module, params: dict[str, torch.Tensor], probes: tuple[torch.Tensor, ...],
                      activation_bytes: int) -> tuple:
    """What a pass's memory depends on besides the values: the module's class and structure (its ``repr``,
    which names every submodule with its settings, and the attention processors diffusers keeps outside it),
    the settings ``repr`` leaves out (:func:`module_settings`: every module's plain attributes, its hooks and an
    instance's own ``forward``), every parameter's and buffer's name, shape, dtype and device, which parameters
    are trained, and the probes' shapes."""
    processors = tuple(type(getattr(m, "processor")).__qualname__ for m in module.modules() if hasattr(m, "processor"))
    return (type(module), repr(module), processors, module_settings(module),
            tuple((n, tuple(p.shape), p.dtype, str(p.device), n in params) for n, p in module.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype, str(b.device)) for n, b in module.named_buffers()),
            tuple((tuple(t.shape), t.dtype, str(t.device)) for t in probes), activation_bytes)


# nn.Module's own slots (the parameters, buffers, submodules and hook tables, keyed apart) and its mode
# (cost.per_architecture keys the modes itself; the push pass runs in analysis mode whatever the mode)
_MODULE_SLOTS = frozenset(vars(nn.Module()).keys()) | {"training"}
_NOT_PLAIN = object()


def module_settings(module: nn.Module) -> tuple:
    """What a forward can branch on that ``repr`` does not name, for every submodule: its plain attributes
    (numbers, strings, flags, dtypes, devices and tuples, lists and dicts of them: a token count, a tied-weight
    switch, a LoRA scaling or adapter switch, ``gradient_checkpointing``, a config dict), the names of its forward
    hooks and pre-hooks and of an instance's own ``forward``, the values of its small boolean buffers (a switch
    saved with the state dict), and the global module hooks'. Returns a tuple of
    them, comparable by equality. Measured counts, chunk sizes and covering-plan shapes shared by two models
    equal in ``repr`` alone were another model's: a module repeating its tokens by an attribute (64 copies)
    kept the one-copy model's activations, its estimate 64 times low. (Tensors, other objects and a hook's
    captured values are not seen.)"""
    out = []
    for name, m in module.named_modules(remove_duplicate=False):
        attributes = []
        for key, value in vars(m).items():
            if key in _MODULE_SLOTS:
                continue
            plain = _plain(value)
            if plain is not _NOT_PLAIN:
                attributes.append((key, plain))
        # a flag kept as a buffer (a switch saved with the state dict): its value, as a plain attribute's
        flags = tuple((key, tuple(b.reshape(-1).tolist())) for key, b in m._buffers.items()
                      if b is not None and b.dtype == torch.bool and b.numel() <= 64)
        hooks = tuple(_callable_name(h) for table in (m._forward_hooks, m._forward_pre_hooks) for h in table.values())
        out.append((name, tuple(sorted(attributes, key=lambda item: item[0])), flags, hooks,
                    _callable_name(m.__dict__["forward"]) if "forward" in m.__dict__ else None))
    hooks = tuple(_callable_name(h) for table in (nn.modules.module._global_forward_hooks,
                                                  nn.modules.module._global_forward_pre_hooks) for h in table.values())
    return tuple(out), hooks


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as a key where it is a plain setting (None, a number, a string, a dtype, a device, or a tuple,
    list or dict of them, three levels deep at most), else ``_NOT_PLAIN``."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(value).__name__, repr(value))  # (repr: a NaN equal to itself, 1 apart from True)
    if depth >= 3:
        return _NOT_PLAIN
    if isinstance(value, (tuple, list)):  # (one kind: a config saved and loaded turns tuples into lists)
        items = tuple(_plain(v, depth + 1) for v in value)
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else ("sequence", items)
    if isinstance(value, dict):
        # (a dict's private keys are bookkeeping, not settings: diffusers' config carries the folder a model was
        # loaded from, its version and which entries took defaults, and a model loaded from a checkpoint missed
        # every measure of the same model built in the process)
        items = tuple((repr(k), _plain(v, depth + 1)) for k, v in value.items()
                      if not (isinstance(k, str) and k.startswith("_")))
        return _NOT_PLAIN if any(v is _NOT_PLAIN for _, v in items) else ("dict", tuple(sorted(items, key=lambda i: i[0])))
    return _NOT_PLAIN


def _callable_name(function: Any) -> str:
    """A hook's or forward's module, qualified name and first line (its class's, for a callable object; a bound
    method's function's): two lambdas of one function are told apart."""
    function = getattr(function, "__func__", function)
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    line = getattr(getattr(function, "__code__", None), "co_firstlineno", None)
    return f"{getattr(function, '__module__', None) or type(function).__module__}.{name}:{line}"


def _measured(module: nn.Module, params: dict[str, torch.Tensor], probes: tuple[torch.Tensor, ...],
              activation_bytes: int) -> PushMemory:
    """:func:`measure_push_memory`'s passes, run."""
    chunk = tuple(t[:MEASURED_PROBES] for t in probes)
    count = chunk[0].shape[0]
    theta = {name: p.detach() for name, p in params.items()}
    shapes = [(chunk, 1), (chunk, 2)] + ([(tuple(t[:1] for t in probes), 1)] if count > 1 else [])
    peaks = []
    try:
        with torch.no_grad(), analysis_mode(module):
            for inputs, rows in shapes:
                push = jvp_pass(module, theta, inputs)
                tangents = {name: torch.ones((rows, *p.shape), dtype=p.dtype, device=p.device) for name, p in theta.items()}
                with LiveBytes((*theta.values(), *tangents.values(), *inputs)) as live:
                    vmap(push)(tangents)
                peaks.append(live.peak)
                del tangents
    except torch.OutOfMemoryError:
        # (not the model's: the constant in its place would be another rank's other pass shape under DDP, and
        # 1.3 times too few bytes on a transformer encoder's pass)
        raise
    except Exception:  # (any failure of a measurement leaves the constant; the tracker's own pass reports its errors)
        return DEFAULT_PUSH_MEMORY
    unit = count * activation_bytes
    row = max(peaks[1] - peaks[0], 0) / unit
    primal = max(peaks[0] / unit - row, *((peaks[2] / activation_bytes - row,) if count > 1 else ()), 0)
    return PushMemory(row=ALLOCATOR_SLACK * row, primal=ALLOCATOR_SLACK * primal)
