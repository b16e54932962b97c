"""Loss gradients summed into groups (docs/optimizers.md, "Group gradients"): ĝ_r = Σ_n W[r, n] ∇_θ ℓ_n.

A *membership* matrix ``W [R, B]`` says how much of example n's loss gradient row r holds:
W[r, n] = c_n when example n is in the group of row r, else 0. Rows may come from several
partitions of the same batch stacked on top of each other (:func:`membership_matrix`); every
route below costs the same whatever the rows mean. Three exact routes:

- "example": per-example gradients (``vmap`` over ``grad`` of a one-example
  ``functional_call``), in example chunks sized by a memory budget, multiplied into the rows in
  float64 straight away; cost ∝ B gradients of size P, whatever R.
- "group": one forward of the whole batch and R backward passes batched (``is_grads_batched``),
  each with the cotangent W[r]; no per-example gradient is formed; cost ∝ R backward passes. The
  only route for models whose examples interact in the forward (BatchNorm with batch
  statistics: the batch's own, as in training; its running statistics are not advanced).
- "factored": one forward with hooks and one backward of Σ_n ℓ_n per chunk give each example's
  layer factors (:mod:`genkernel.core.engine.factors`); each layer's per-example gradients are
  materialized one layer at a time and multiplied into the rows; parameters outside supported
  layers take the "example" route. Cost ∝ one batch backward plus B·P multiply-adds per row block.

"auto" takes "group" when 2 R <= B (few rows, e.g. noise-level bins), else "example".
"example" and "factored" multiply into the rows with :func:`add_rows`, which the tracker's
dense route also uses for the per-example gradients it reads from the training pass
(:func:`factor_rows`: summed in float64 one layer at a time, then cast to the state dtype).

:func:`gradients_from_losses` is the same sum taken from the training step's own graph (the
per-example losses before the user's backward): R backward passes with ``retain_graph=True``, no
second forward, so BatchNorm's batch statistics and dropout's masks are the ones training used.
:func:`gradients_and_rounding` adds, in the same batched backward, a sample of how the batch's own
gradient rounds (the gradient check's allowance for a long float32 reduction, tracking.rounding).

:func:`group_gradients` refuses (ValueError) on every route a model that draws random numbers in
its forward (dropout, RReLU, stochastic depth in training mode: its own forward would draw other
masks than training's; two calls gave per-example gradients 51-106% apart, relative) and one whose
forward rewrites its parameters (an embedding with ``max_norm``); "example" and "factored" also
refuse BatchNorm with batch statistics, whose per-example gradients are undefined.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import nn
from torch.func import grad_and_value
from torch.utils._pytree import tree_leaves

from ..adapter import (
    batch_size,
    check_analysis_safe,
    check_memory_budget,
    coupled_modules,
    evaluated_at,
    functional_model,
    output_tensor,
    preserved_buffers,
    preserved_state,
    randomizing_modules,
)
from ..param_bytes import parameter_bytes, value_bytes
from ..push_memory import LiveBytes
from .factors import Factors, capture, covering_plan, loss_cotangents
from .reference import per_example

DEFAULT_GRADIENT_BUDGET = 256 * 2**20
GRADIENT_ROUTES = ("auto", "example", "group", "factored")
WIDEN_BLOCK_BYTES = 8 * 2**20  # float64 columns add_rows widens at once
# What the "example" route's vmapped per-example pass (:func:`_example_chunks`, a chunk of c examples at once) holds
# per activation element of its chunk (every leaf module's output of one example, :func:`example_pass_measure`,
# times c), beside its per-example gradients (twice: c x P) and add_rows' float64 widening block
# (:func:`example_pass_bytes`): measured 1.50 on a conv net (3 -> 16 -> 16 -> 32 channels at 64x64, stride 2 twice,
# a Linear head, P = 40k, float32, Adam; the "gradients" call's peak RSS growth at c = 8, 16 and 32 in a warmed
# process, glibc returning every block: 14.9, 28.0 and 56.1 MiB). The cost estimate's ``example_pass`` and
# :func:`example_chunk` count the pass with it.
EXAMPLE_PASS_ACTIVATIONS = 1.5
# What one group row of a batched backward through a batch's graph holds (``gradients_from_losses``: the rows'
# activation gradients at once, ``is_grads_batched``) per example, besides the row's parameter gradients: a few
# activations' gradients alive at once. Measured under push_memory.LiveBytes (float32, eval mode; the slope of the
# per-row growth from 1 to 8 rows between B = 16 and 32), as multiples of the largest leaf output and shares of
# all leaf outputs (every leaf module's output, engine and estimate alike): chains of convolutions 2.92-3.00 times
# the largest (shares 0.49-1.03: 3 -> 16 -> 16 channels at 64x64; with two stride-2 layers after the first, 1.03;
# three ReLU or GroupNorm + SiLU layers of 32 channels at 32x32), the tiny UNet2DModel 4.7 (0.21: the skip
# connections' gradients wait for their consumers), a two-layer transformer encoder 5.0 (0.56), an MLP nothing
# beyond its parameters'. The row is counted at the smaller of GRAPH_ROW_ACTIVATIONS of all outputs and
# GRAPH_ROW_LARGEST_OUTPUTS times the largest (:func:`graph_row_elements`): the chains 1.4-2.0 times over, the UNet
# 1.3, the transformer 1.2. (It was 0.625 of all outputs, from the peak RSS of the first net: 0.6 of the strided
# net's rows, and 3-11 times the UNet's and the transformer's.) Leaf outputs miss what a forward computes with plain
# operations: attention's probabilities written with matmul and softmax (a row held 4.8-37 times the count at
# T = 64-512), diffusers' AttnProcessor (1.1-11 times in a tiny UNet at 16-64 pixels), an LSTM's gates (1.45),
# F.interpolate (3.4), an outer product (173); a one-layer encoder 1.06. So the "group" route measures its first
# row and the cost estimate a row on the probes (cost.graph_row_bytes), each counting the larger.
GRAPH_ROW_ACTIVATIONS = 1.05
GRAPH_ROW_LARGEST_OUTPUTS = 6.0


def graph_row_elements(activation_elements: float, largest_output: float) -> float:
    """Elements one group row of a batched backward holds through a graph of ``activation_elements`` leaf outputs
    whose largest leaf output has ``largest_output`` (per example, or over a batch: both scale with it): the
    smaller of :data:`GRAPH_ROW_ACTIVATIONS` x the first and :data:`GRAPH_ROW_LARGEST_OUTPUTS` x the second."""
    return min(GRAPH_ROW_ACTIVATIONS * activation_elements, GRAPH_ROW_LARGEST_OUTPUTS * largest_output)


def example_pass_bytes(chunk: int, num_params: int, largest: int, itemsize: int, activation_elements: int,
                       fixed_bytes: int = 0) -> int:
    """Bytes the "example" route's vmapped per-example pass (:func:`_example_chunks`) holds over ``chunk`` examples
    of ``num_params`` parameter values (``largest``: the largest parameter's, ``itemsize`` bytes each): the chunk's
    activations (:data:`EXAMPLE_PASS_ACTIVATIONS` x ``activation_elements``, one example's, :func:`example_pass_measure`,
    x ``chunk``), its per-example gradients twice (``chunk`` x P), the float64 block :func:`add_rows` widens a
    narrower dtype's gradients in (at most :data:`WIDEN_BLOCK_BYTES`) and ``fixed_bytes``, what the pass holds once
    whatever the chunk (:attr:`ExamplePass.fixed_bytes`). What the cost estimate counts as ``example_pass`` (measured
    0.98 of the pass's peak RSS growth on a conv net, chunk 32)."""
    widened = 0 if itemsize >= 8 else min(WIDEN_BLOCK_BYTES, chunk * max(largest, 1) * 8)
    return int(chunk * (EXAMPLE_PASS_ACTIVATIONS * activation_elements + 2 * num_params) * itemsize) + widened + fixed_bytes


def example_chunk(memory_budget: int, num_params: int, largest: int, itemsize: int, activation_elements: int,
                  fixed_bytes: int = 0) -> int:
    """Examples per chunk of the "example" route's vmapped per-example pass (:func:`_example_chunks`), the one rule
    the engine runs and the cost estimate counts: the most examples whose pass (:func:`example_pass_bytes`: the
    chunk's activations, its per-example gradients and add_rows' widening block) fits in ``memory_budget`` beside
    ``fixed_bytes``, what the pass holds once whatever the chunk (a matrix built from the parameters, a mask made in
    ``forward``: :attr:`ExamplePass.fixed_bytes`; before, the budget went to the examples alone, and a net building a
    1024 x 1024 float32 product of two factors in its forward held 1.52x an 8 MiB budget).

    At least one example: a single example whose pass alone exceeds the budget still runs alone (as before), and the
    pass then exceeds the budget by that one example's. With neither parameter values nor activations, the whole
    budget in examples (every batch in one chunk). (The chunk was sized to 3 x P values an example alone: on a conv
    net whose activations outweigh its parameters, 3 -> 16 -> 16 -> 32 channels at 64x64, P = 40k, one chunk's pass
    held 3.4-4.0x a 4-16 MiB budget.)"""
    memory_budget = max(0, memory_budget - fixed_bytes)  # (what is left for the examples)
    base = (EXAMPLE_PASS_ACTIVATIONS * activation_elements + 2 * num_params) * itemsize  # per example
    widen = 0 if itemsize >= 8 else max(largest, 1) * 8  # per example, until the block reaches its cap
    if base + widen <= 0:
        return max(1, memory_budget)
    candidates = [memory_budget // (base + widen)]  # the widening block below its cap
    if widen and base > 0 and memory_budget > WIDEN_BLOCK_BYTES:
        candidates.append((memory_budget - WIDEN_BLOCK_BYTES) // base)  # the block at its cap
    chunk = max(1, int(max(candidates)))
    while chunk > 1 and example_pass_bytes(chunk, num_params, largest, itemsize, activation_elements) > memory_budget:
        chunk -= 1  # (a float product rounded up past the budget)
    return chunk


def group_row_chunk(memory_budget: int, num_params: int, itemsize: int, batch_activation_elements: int,
                    batch_largest_output: int) -> int:
    """Group rows per batched backward of the "group" route (:func:`_group_route`): as many as keep what each row
    holds, its gradients (3 x P values: the row in the parameters' dtype, its float64 copy counted as two) and its
    activation gradients through the whole batch's graph (:func:`graph_row_elements` of
    ``batch_activation_elements``, every leaf module's output over the batch, and ``batch_largest_output``, the
    largest one's), in ``itemsize`` bytes each, within ``memory_budget``; at least one row (a row whose backward
    alone exceeds the budget runs alone). The batch's own forward graph, which every row goes through, is held
    whatever the rows: not bounded by the budget."""
    per_row = (3 * num_params + graph_row_elements(batch_activation_elements, batch_largest_output)) * itemsize
    return max(1, int(memory_budget // per_row)) if per_row > 0 else max(1, memory_budget)


def output_elements(output: Any) -> int:
    """Elements of the tensors a module's forward returned: a tensor, or those in a tuple, list or dict (an LSTM's
    ``(out, (h, c))``, a leaf returning ``{"h": ...}``: none of them was counted)."""
    leaves = [output] if isinstance(output, torch.Tensor) else tree_leaves(output)
    return sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))


class _LeafOutputs:
    """Counts the elements of every leaf module's output while open (forward hooks): every element of every tensor
    it returns (:func:`output_elements`), in all (``elements``) and the largest one call returned (``largest``). On
    one example's forward (batch dimension 1) that is the example's activations whatever the layout: ``output[:1]``
    counted the first row of dimension 0, which is one example's only where dimension 0 is the batch's (a
    sequence-first ``[T, 1, d]`` inside the model counted d of T·d values; a tuple's or dict's tensors none)."""

    def __init__(self, model: nn.Module):
        self.model, self.elements, self.largest, self.handles = model, 0, 0, []

    def _hook(self, module, args, output) -> None:
        elements = output_elements(output)
        self.elements += elements
        self.largest = max(self.largest, elements)

    def __enter__(self) -> "_LeafOutputs":
        self.handles = [m.register_forward_hook(self._hook) for m in self.model.modules() if not list(m.children())]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class ExamplePass(NamedTuple):
    """What the "example" route's vmapped per-example pass holds (:func:`example_pass_measure`): ``activations``,
    elements per example of the chunk (sized by :data:`EXAMPLE_PASS_ACTIVATIONS`), and ``fixed_bytes``, bytes held
    once whatever the chunk's size (a matrix built from the parameters, a mask made in ``forward``)."""

    activations: int
    fixed_bytes: int


SIGNATURES_KEPT = 6


class _Measures(weakref.WeakKeyDictionary):
    """Measures of a model's passes, remembered: {model: {signature: (weak references to its modules, parameters and
    loss objects, value)}}, a few signatures a model (:data:`SIGNATURES_KEPT`). A signature is the caller's key with
    the modules' configuration (:func:`_module_signature`) and the loss's (:func:`_loss_signature`); a value is
    recalled only while the same modules, parameters and loss objects are in place (a module or parameter replaced,
    or a module reconfigured, measures again). Past :data:`SIGNATURES_KEPT` the least recently used goes: a loop
    that alternates one steady signature with a stream of new ones keeps measuring only the new ones."""

    @staticmethod
    def _signature(model: nn.Module, key: tuple, loss_fn: Callable | None) -> tuple[tuple, list]:
        modules = list(model.modules())
        loss_key, loss_objects = _loss_signature(loss_fn)
        objects = modules + [p for m in modules for p in m._parameters.values() if p is not None] + loss_objects
        return (key, _module_signature(modules), loss_key), objects

    def recall(self, model: nn.Module, key: tuple, loss_fn: Callable | None) -> Any:
        """The value remembered for ``model``, ``key`` and ``loss_fn``, or None."""
        signature, objects = self._signature(model, key, loss_fn)
        kept = self.get(model, {})
        known = kept.get(signature)
        if known is not None and len(known[0]) == len(objects) and all(r() is o for r, o in zip(known[0], objects)):
            kept[signature] = kept.pop(signature)  # most recently used last: eviction takes the least recently used
            return known[1]
        return None

    def remember(self, model: nn.Module, key: tuple, loss_fn: Callable | None, value: Any) -> None:
        """Keep ``value`` for ``model``, ``key`` and ``loss_fn`` (not kept where a loss object takes no weak
        reference: measured again each call)."""
        signature, objects = self._signature(model, key, loss_fn)
        try:
            references = tuple(weakref.ref(o) for o in objects)
        except TypeError:
            return
        kept = self.setdefault(model, {})
        kept.pop(signature, None)
        kept[signature] = (references, value)
        while len(kept) > SIGNATURES_KEPT:  # (a model whose modules or inputs change does not grow the cache)
            kept.pop(next(iter(kept)))


# one example's pass by model, inputs, differentiated parameters and loss (:func:`example_pass_measure`: the route's
# parameters and its fallback's, the estimate's stand-in loss and the engine's own)
_ACTIVATIONS = _Measures()
# the factored route's first two chunks' peaks by model, inputs, parameters, rows and loss (:func:`_factored_captures`)
_FACTORED_PEAKS = _Measures()


def _module_signature(modules: list[nn.Module]) -> tuple:
    """What one example's activation count depends on besides the inputs and the modules' and parameters' identities
    (checked through weak references beside it), module by module: its type, training flag, ``extra_repr`` (a layer's
    sizes, an Upsample's scale factor) and its buffers' shapes. (The count was cached by the modules' ids alone: an
    id, ``id(m)``, is reused by the next object once a module is freed, so a new module built in a freed one's slot,
    or a layer reconfigured in place, kept the old count.)"""
    return tuple((type(m), m.training, m.extra_repr(), tuple(b.shape for b in m._buffers.values() if b is not None))
                 for m in modules)


def _loss_signature(loss_fn: Callable | None) -> tuple[tuple, list]:
    """``(key, objects)``: what identifies ``loss_fn`` for the measure's cache, and the objects whose identity the
    cache checks through weak references. A function by its code (a closure made afresh each step is the same loss),
    a bound method by its function's code and its object, a loss module by its modules' signature and the modules;
    anything else by its type and itself."""
    if loss_fn is None:
        return ("stand-in",), []
    code = getattr(loss_fn, "__code__", None)
    if code is not None:  # (and what it captures: one factory's closures share their code, not their arrays)
        return ("function", code, _captured_signature(loss_fn)), []
    owner, function = getattr(loss_fn, "__self__", None), getattr(loss_fn, "__func__", None)
    if owner is not None and getattr(function, "__code__", None) is not None:
        return ("method", function.__code__, _captured_signature(function), _attributes_signature(owner)), [owner]
    if isinstance(loss_fn, nn.Module):
        modules = list(loss_fn.modules())
        return ("module", _module_signature(modules), tuple(_attributes_signature(m) for m in modules)), modules
    return ("object", type(loss_fn)), [loss_fn]


def _value_signature(value: Any) -> Any:
    """What a loss's captured value changes of its pass: a tensor's shape, dtype and device, a module's signature,
    a tuple's or list's items, else its type."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, nn.Module):
        return ("module", _module_signature(list(value.modules())))
    if isinstance(value, (bool, int, float, str, type(None))):  # (a scale, a weight: by type, not measured again)
        return type(value)
    if isinstance(value, (tuple, list)):
        return tuple(_value_signature(v) for v in value)
    return ("other", type(value))


def _captured_signature(function: Callable) -> tuple:
    """A function's closure cells and defaults, by :func:`_value_signature`."""
    cells = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            cells.append(_value_signature(cell.cell_contents))
        except ValueError:  # (an empty cell)
            cells.append(None)
    defaults = getattr(function, "__defaults__", None) or ()
    keywords = getattr(function, "__kwdefaults__", None) or {}
    return (tuple(cells), tuple(_value_signature(v) for v in defaults),
            tuple(sorted((k, _value_signature(v)) for k, v in keywords.items())))


def _attributes_signature(owner: Any) -> tuple:
    """An object's tensor attributes outside parameters and buffers (``self.W = torch.randn(...)``), by name."""
    items = getattr(owner, "__dict__", {})
    return tuple(sorted((k, _value_signature(v)) for k, v in items.items() if isinstance(v, torch.Tensor)))


def _tensor_signature(tensors: Any) -> tuple:
    return tuple((tuple(t.shape[1:]), t.dtype, t.device.type) for t in tree_leaves(tensors) if isinstance(t, torch.Tensor))


def example_pass_measure(model: nn.Module, forward: Callable, params: dict[str, torch.Tensor],
                         example: tuple[torch.Tensor, ...], loss_fn: Callable | None = None,
                         target: Any = None) -> ExamplePass:
    """What a chunk of the "example" route's pass over ``params`` is sized by (:func:`example_chunk`), from one
    example (``example``: its inputs, batch dimension 1; ``target``: its targets, a tensor or a tuple as the batch's,
    or None): the activations an example, the larger of every leaf module's output (every tensor's whole,
    :class:`_LeafOutputs`, as ``cost.hooked_forward_counts`` counts them; one hooked ``forward(params, example)``
    without grad) and what the pass is measured to hold (:func:`_measured_pass`: what a forward computes with plain
    operations, attention's probabilities in matmul and softmax, an LSTM's gates, is no leaf's output; and what
    ``loss_fn`` builds, an outer product of the output, a frozen network's features), and what it holds once
    whatever the chunk (measured). Without ``loss_fn`` (the cost estimate's, before any batch) a sum of squares of
    the output stands in for the loss.

    Once per model, input shapes and dtypes, modules, differentiated parameters, kernel context and loss (cached:
    the route runs it on its first call only, not per step; a module or parameter replaced, or a module
    reconfigured, measures again). Where the measured pass raises (a user's hook, an interrupted pass), the leaf
    outputs alone, not cached: the next call measures again."""
    key = (_tensor_signature(example), tuple(sorted(params)), kernel_context(example), _tensor_signature(target))
    known = _ACTIVATIONS.recall(model, key, loss_fn)
    if known is not None:
        return known
    with torch.no_grad(), _LeafOutputs(model) as counted:
        forward(params, example)
    measured = _measured_pass(model, forward, params, example, loss_fn, target)
    if measured is None:  # (the pass raised: the leaf outputs alone, not kept, or that fallback would size every
        # later call's chunks of the model in the process where the measure would pass, as a fresh process's does)
        return ExamplePass(counted.elements, 0)
    found = ExamplePass(max(counted.elements, measured.activations), measured.fixed_bytes)
    _ACTIVATIONS.remember(model, key, loss_fn, found)
    return found


def kernel_context(example: tuple[torch.Tensor, ...]) -> tuple:
    """What else the measured pass holds depends on: the SDPA backends allowed (``adapter.analysis_mode`` allows the
    math one alone, which keeps attention's T x T probabilities where the fused CPU or CUDA kernels do not: a
    TransformerEncoderLayer at T = 256 measured 675 288 elements an example under it, 124 376 outside), the
    MultiheadAttention fast path and autocast on the inputs' devices. (Without it the first measure of a model in
    eval mode was taken for every later one: the estimate's, under analysis_mode, for the engine's pass, or the
    other way round.)"""
    cuda = torch.backends.cuda
    mha = getattr(torch.backends, "mha", None)
    return (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
            getattr(cuda, "cudnn_sdp_enabled", lambda: None)(), mha.get_fastpath_enabled() if mha is not None else None,
            tuple(sorted((d, torch.is_autocast_enabled(d)) for d in {t.device.type for t in example})))


def _one_example_loss(forward: Callable, loss_fn: Callable, tensor_targets: bool) -> Callable:
    """ℓ_n(θ) = loss_fn(f(x_n; θ), y_n) of one example as a function of ``(θ, x_n, y_n)`` (``x_n``, ``y_n``: tuples
    of one example's tensors, no batch dimension; ``y_n`` None without targets; ``tensor_targets``: the batch's
    targets are one tensor, which ``loss_fn`` gets as one), a scalar: what the route's pass and its measure vmap."""

    def example_loss(p, x, y):
        out = forward(p, tuple(t.unsqueeze(0) for t in x))
        target = None if y is None else tuple(t.unsqueeze(0) for t in y)
        if target is not None and tensor_targets:
            target = target[0]
        loss = loss_fn(out, target)
        if loss.numel() != 1:  # (an unreduced [1, d] loss: torch's reshape error named no cause)
            raise ValueError(f"loss_fn must return one loss per example (shape [B]; e.g. reduction='none' averaged "
                             f"over non-batch dimensions), got shape {tuple(loss.shape)} for one example")
        return loss.reshape(())

    return example_loss


def _measured_pass(model: nn.Module, forward: Callable, params: dict[str, torch.Tensor],
                   example: tuple[torch.Tensor, ...], loss_fn: Callable | None, target: Any) -> ExamplePass | None:
    """The vmapped per-example pass measured: per-example gradients (``torch.func.vmap`` of ``grad`` of ``loss_fn``,
    as :func:`_example_chunks` runs them, or of a sum of squares of the output standing in for the loss) over 1 and
    2 copies of ``example`` (and ``target``) under ``push_memory.LiveBytes``; buffers and the random state kept. The
    growth per example less its per-example gradients twice, over :data:`EXAMPLE_PASS_ACTIVATIONS`, is the
    activations; what one copy holds beyond that slope is held once whatever the chunk (``fixed_bytes``; the pass is
    linear in its copies, measured to the byte from 1 to 4 on a conv net, an MLP, a UNet and an encoder, where it is
    0 or 17 KiB of 8 MiB).

    Measured against the leaf outputs: a self-attention in plain operations (one block, d = 32) 4.8 times at T = 64
    and 18 at T = 256 (a chunk sized by the leaf outputs held 143 MB for a 16 MiB budget), an LSTM 45; convolutional
    nets and MLPs under them (the leaf outputs count). A loss building an outer product of a 256-wide output held
    4.9x a 4 MiB budget, measured with the stand-in. The measure holds two examples' pass once, beside no other.
    None where the pass raises (nothing measured: the leaf outputs alone then, not kept; the route's own pass reports
    its errors)."""
    if not params:
        return ExamplePass(0, 0)
    # (each per-example gradient in its parameter's dtype; the activations at the parameters' bytes per value, as the
    # cost estimate counts them: param_bytes)
    gradient_bytes = parameter_bytes(params)
    itemsize = value_bytes(params)
    detached = {name: p.detach() for name, p in params.items()}
    tensor_targets = isinstance(target, torch.Tensor)
    target_tuple = None if target is None else ((target,) if tensor_targets else tuple(target))
    if loss_fn is None:
        def stand_in(out, y):
            return output_tensor(out).pow(2).sum()
        loss_fn = stand_in
    pass_of = torch.func.vmap(torch.func.grad(_one_example_loss(forward, loss_fn, tensor_targets)),
                              (None, 0, 0 if target_tuple is not None else None))
    peaks = []

    def copies_of(tensors, copies):
        return None if tensors is None else tuple(t[:1].repeat(copies, *([1] * (t.dim() - 1))) for t in tensors)

    try:
        with preserved_state(model):
            for copies in (1, 2):
                inputs, targets = copies_of(example, copies), copies_of(target_tuple, copies)
                with LiveBytes((*params.values(), *detached.values(), *inputs, *(targets or ()))) as live:
                    pass_of(detached, inputs, targets)
                peaks.append(live.peak)
    except torch.OutOfMemoryError:  # (as push_memory's measure: the device's, not the model's)
        raise
    except Exception:
        return None
    slope = peaks[1] - peaks[0]
    beyond = (slope - 2 * gradient_bytes) / itemsize
    return ExamplePass(max(0, int(beyond / EXAMPLE_PASS_ACTIVATIONS)), max(0, int(peaks[0] - slope)))


def membership_matrix(
    groups: Sequence[torch.Tensor], coefficients: torch.Tensor, sizes: Sequence[int], *, dtype=torch.float64
) -> torch.Tensor:
    """``W [Σ sizes, B]``: for each partition p (ids ``groups[p]`` in [0, sizes[p])), rows
    offset_p + g hold c_n for the examples of group g. An id outside [0, sizes[p]) is refused
    (ValueError): it would land in another partition's row (or, negative, count from the end)."""
    if len(groups) != len(sizes):
        raise ValueError(f"groups ({len(groups)} partitions) and sizes ({len(sizes)}) need one entry per partition")
    batch = coefficients.shape[0]
    device = coefficients.device
    for p, ids in enumerate(groups):
        if tuple(ids.shape) != (batch,):
            raise ValueError(f"groups[{p}] must hold one group id per example, shape ({batch},), got {tuple(ids.shape)}")
    bad = [((ids.to(device) < 0) | (ids.to(device) >= size)).any() for ids, size in zip(groups, sizes)]
    if bad and bool(torch.stack(bad).any()):  # one synchronization for every partition
        p = int(torch.stack(bad).nonzero()[0])
        raise ValueError(f"groups[{p}] holds ids from {int(groups[p].min())} to {int(groups[p].max())}, outside "
                         f"[0, {sizes[p]}): pass group ids in [0, sizes[{p}])")
    out = torch.zeros((sum(sizes), batch), dtype=dtype, device=device)
    columns = torch.arange(batch, device=device)
    offset = 0
    for ids, size in zip(groups, sizes):
        out[offset + ids.to(device), columns] = coefficients.to(dtype)
        offset += size
    return out


def group_gradients(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor | tuple[torch.Tensor, ...] | None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    membership: torch.Tensor,
    *,
    memory_budget: int = DEFAULT_GRADIENT_BUDGET,
    route: str = "auto",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Row-summed loss gradients and the per-example losses of the analysis forward.

    Args:
        params: the trainable parameters (θ_k), by name.
        inputs, targets: the batch (batch on dim 0); ``targets`` may be None.
        membership: ``W [R, B]`` (see the module docstring; :func:`membership_matrix`).
        route: "auto", "example", "group" or "factored" (see the module docstring).

    Returns:
        ``({name: Tensor[R, *shape] float64}, losses Tensor[B])``.
    """
    if route not in GRADIENT_ROUTES:
        raise ValueError(f"route must be one of {GRADIENT_ROUTES}, got {route!r}")
    memory_budget = check_memory_budget(memory_budget)
    _check_params(params)
    batch = batch_size(inputs)
    _check_membership(membership, batch)
    group = route == "group" or (route == "auto" and 2 * membership.shape[0] <= batch)
    _check_model(model, "group" if group else route)
    if group:
        return _group_route(model, params, inputs, targets, loss_fn, membership, memory_budget)
    if route == "factored":
        return _factored_route(model, params, inputs, targets, loss_fn, membership, memory_budget)
    return _example_route(model, params, inputs, targets, loss_fn, membership, memory_budget)


def _check_params(params: dict[str, torch.Tensor]) -> None:
    """ValueError for no parameters at all (the routes read the first one's dtype and the largest one's size: an
    empty dict failed inside them, "max() arg is an empty sequence" or a bare StopIteration)."""
    if not params:
        raise ValueError("params is empty: there is no parameter to take gradients of; pass the trainable parameters "
                         "by name (e.g. dict(model.named_parameters()))")


def _check_model(model: nn.Module, route: str) -> None:
    """Refuse a model whose analysis forward would rewrite it (:func:`check_analysis_safe`), draw
    random numbers (other masks than training's: dropout, RReLU, stochastic depth, label dropout
    in training mode) or, for a per-example ``route`` ("example", "factored", "auto"), couple the
    examples (BatchNorm with batch statistics)."""
    check_analysis_safe(model)
    random = randomizing_modules(model)
    if random:
        raise ValueError(
            f"{', '.join(random[:3])} draw random numbers in the forward (training mode), so group_gradients' own "
            "forward would use other masks than the training step's and two calls would give other gradients. Take "
            "the gradients from the training step's losses with gradients_from_losses (its masks), or put those "
            "modules in eval mode"
        )
    coupled = coupled_modules(model) if route != "group" else []  # (BatchNorm only, the draws refused above)
    if coupled:
        raise ValueError(
            f"{', '.join(coupled[:3])} normalize with the batch's statistics, so per-example gradients (route "
            f"{route!r}) are undefined. Use route='group' (one forward of the whole batch), gradients_from_losses "
            "on the training step's losses, or put BatchNorm in eval mode (with running statistics)"
        )


def gradients_from_losses(
    losses: torch.Tensor, params: dict[str, torch.Tensor], membership: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """ĝ_r = ∇_θ Σ_n W[r, n] ℓ_n through the graph ``losses [B]`` already carry.

    Returns ``{name: Tensor[R, *shape]}`` in ``dtype`` (zeros for a parameter the losses do not reach).
    The graph is retained, so the caller's own backward runs afterwards unchanged. The R backward
    passes are batched (``is_grads_batched``) and taken one row at a time where an operation has
    no batching rule.
    """
    _check_membership(membership, losses.shape[0])
    grads = _batched_backward(losses, params, membership)
    return _own_rows(params, grads, membership.shape[0], dtype)


def gradients_and_rounding(
    losses: torch.Tensor, params: dict[str, torch.Tensor], membership: torch.Tensor, coefficients: torch.Tensor, *,
    dtype: torch.dtype = torch.float64
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`gradients_from_losses`' rows and, from the same batched backward (two rows more), a sample of
    how the batch's own gradient ∇ Σ_n c_n ℓ_n rounds in the model's precision: its two copies seeded at
    the scales s of :data:`ROUNDING_SEEDS`, divided back,

        d = ∇ Σ_n s₁ c_n ℓ_n / s₁ − ∇ Σ_n s₂ c_n ℓ_n / s₂   (s₁, s₂ = 3/4, 5/8),

    zero in exact arithmetic; in floating point every term of every reduction rounds anew at each seed,
    so d is the difference of two roundings of the reductions the training backward makes (a long
    convolution bias reduction's included), whatever the kernels. ``coefficients``: c_n ``[B]``.

    Returns ``(rows, d)``: the rows as :func:`gradients_from_losses` gives them and ``{name:
    Tensor[*shape]}`` float64. (A seed s c_n rounds to the losses' dtype, which moves d by at most one
    unit roundoff of |∇|: far below what it measures.)
    """
    _check_membership(membership, losses.shape[0])
    if coefficients.shape != (losses.shape[0],):
        raise ValueError(f"coefficients must be [{losses.shape[0]}], got {tuple(coefficients.shape)}")
    seeds = torch.tensor(ROUNDING_SEEDS, dtype=torch.float64, device=membership.device)
    seeded = seeds[:, None] * coefficients.to(device=membership.device, dtype=torch.float64)[None, :]
    rows = membership.shape[0]
    grads = _batched_backward(losses, params, torch.cat([membership.to(torch.float64), seeded]))
    difference = {}
    for name, p, g in zip(params, params.values(), grads):
        difference[name] = (torch.zeros(p.shape, dtype=torch.float64, device=p.device) if g is None else
                            g[rows].to(torch.float64) / ROUNDING_SEEDS[0] - g[rows + 1].to(torch.float64) / ROUNDING_SEEDS[1])
    return _own_rows(params, grads, rows, dtype), difference


def rounding_of(losses: torch.Tensor, params: dict[str, torch.Tensor], coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`gradients_and_rounding`'s rounding sample d alone (no group rows): ``{name: Tensor[*shape]}`` float64."""
    empty = torch.zeros((0, losses.shape[0]), dtype=torch.float64, device=losses.device)
    return gradients_and_rounding(losses, params, empty, coefficients)[1]


# The two seed scales of :func:`gradients_and_rounding`: no power of two apart, nor from 1, so that no
# product of a seed keeps the mantissa of another's (a power of two would round every term identically);
# below 1, so that no seeded gradient overflows where the real one does not (3 and 5 did past 6.8e37 in
# float32, an infinite sample; 3/4 and 5/8 round as they did).
ROUNDING_SEEDS = (0.75, 0.625)


def _check_membership(membership: torch.Tensor, batch: int) -> None:
    """ValueError unless ``membership`` is ``[rows, batch]``."""
    if membership.dim() != 2 or membership.shape[1] != batch:
        raise ValueError(f"membership must be [rows, {batch}], got {tuple(membership.shape)}")


def _batched_backward(losses: torch.Tensor, params: dict[str, torch.Tensor],
                      membership: torch.Tensor) -> list[torch.Tensor | None]:
    """∇_θ Σ_n W[r, n] ℓ_n for every row r, in one batched backward (the graph retained): one
    ``Tensor[R, *shape]`` per parameter in the losses' dtype, None for a parameter they do not reach."""
    inputs = list(params.values())
    weights = membership.to(device=losses.device, dtype=losses.dtype)
    try:
        return list(torch.autograd.grad(losses, inputs, grad_outputs=weights, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True))
    except RuntimeError as error:  # an operation without a batching rule: one backward per row
        if "donated buffers" in str(error):
            raise ValueError(
                "the model is compiled (torch.compile) with buffers its backward frees, so its graph cannot be "
                "differentiated twice, as group gradients need. Attach the tracker before the compiled model's first "
                "backward, or set torch._functorch.config.donated_buffer = False before compiling"
            ) from error
        rows = [torch.autograd.grad(losses, inputs, grad_outputs=w, retain_graph=True, allow_unused=True) for w in weights]
        return [None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs))]


def _own_rows(params: dict[str, torch.Tensor], grads: list[torch.Tensor | None], rows: int,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The first ``rows`` rows of :func:`_batched_backward`'s gradients as ``{name: Tensor[rows, *shape]}``
    in ``dtype``, each parameter's in dense storage of its own (zeros where the losses do not reach).
    Empties ``grads`` as it goes: a copy is made beside one parameter's raw rows at a time, not all."""
    out, seen = {}, set()
    for i, (name, p) in enumerate(params.items()):
        g, grads[i] = grads[i], None
        if g is None:
            out[name] = torch.zeros((rows, *p.shape), dtype=dtype, device=p.device)
            continue
        whole = g.shape[0] == rows
        g = g.detach()[:rows].to(dtype)
        # Callers scale and sum the rows in place (clipping, accumulation over micro-batches, a float16
        # boost divided back), so each parameter gets dense storage of its own: autograd may hand two
        # parameters one tensor (θ_a + θ_b passes its gradient to both unchanged), or a row as an expanded
        # view, one element for many values (a weight summed over in the forward, einsum("bj,pqkj->bk")),
        # and rows cut from a longer batch (the rounding sample's two) would keep its storage.
        if g.data_ptr() in seen or not g.is_contiguous() or (not whole and g.untyped_storage().nbytes() > g.nbytes):
            g = g.clone(memory_format=torch.contiguous_format)
        seen.add(g.data_ptr())
        out[name] = g
    return out


def _target_rows(targets, rows: slice):
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets[rows]
    return tuple(t[rows] for t in targets)


def _example_route(model, params, inputs, targets, loss_fn, membership, memory_budget, fixed=None):
    """Per-example gradients in chunks, multiplied into the rows (see the module docstring);
    ``fixed``: values of other parameters (default: the module's)."""
    sums = {name: torch.zeros((membership.shape[0], *p.shape), dtype=torch.float64, device=p.device)
            for name, p in params.items()}
    losses = []
    for rows, grads, values in _example_chunks(model, params, inputs, targets, loss_fn, memory_budget, fixed):
        losses.append(values)
        # 3. ĝ_r += Σ_{n ∈ chunk} W[r, n] ∇ℓ_n in float64.
        add_rows(sums, membership[:, rows], grads)
    return sums, torch.cat(losses)


def per_example_gradients(model: nn.Module, params: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...],
                          targets: Any, loss_fn: Callable, coefficients: torch.Tensor, *,
                          memory_budget: int = DEFAULT_GRADIENT_BUDGET) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` float64 c_n ∇ℓ_n of ``params`` for every example n of the batch
    (``coefficients`` c ``[B]``), vmapped in chunks as the "example" route forms them: each example's
    gradient scaled by its own coefficient (B·P multiply-adds; :func:`group_gradients` with the
    diagonal of c as its membership summed them into B rows by a B × B product, B²·P)."""
    _check_params(params)
    _check_model(model, "example")
    coefficients = coefficients.detach().to(torch.float64)
    out = {name: torch.empty((coefficients.shape[0], *p.shape), dtype=torch.float64, device=p.device)
           for name, p in params.items()}
    for rows, grads, _ in _example_chunks(model, params, inputs, targets, loss_fn, check_memory_budget(memory_budget)):
        for name, g in grads.items():
            c = coefficients[rows].to(g.device).reshape(-1, *([1] * (g.dim() - 1)))
            torch.mul(g.detach().to(torch.float64), c, out=out[name][rows])
    return out


def _example_chunks(model, params, inputs, targets, loss_fn, memory_budget, fixed=None):
    """Yields ``(rows, {name: [c, *shape]} per-example gradients ∇ℓ_n, losses [c])`` for chunks of the batch
    sized to the memory budget (torch.func.vmap of one example's gradient)."""
    forward = functional_model(model, fixed, flatten=False)  # loss_fn sees outputs shaped as in training
    detached = {name: p.detach() for name, p in params.items()}
    batch = inputs[0].shape[0]

    # 1. One example's loss as a function of θ: ℓ_n(θ) = loss_fn(f(x_n; θ), y_n).
    example_loss = _one_example_loss(forward, loss_fn, isinstance(targets, torch.Tensor))
    per_example_grads = per_example(grad_and_value(example_loss), (None, 0, 0 if targets is not None else None))
    target_tuple = None if targets is None else ((targets,) if isinstance(targets, torch.Tensor) else tuple(targets))

    num_params = sum(p.numel() for p in params.values())
    largest = max(p.numel() for p in params.values())
    itemsize = value_bytes(params)  # (bytes per value over every parameter's own dtype: param_bytes)
    # the chunk sized by what the pass holds, measured with this loss on the first example
    measured = example_pass_measure(model, forward, detached, tuple(t[:1] for t in inputs), loss_fn,
                                    _target_rows(targets, slice(0, 1)))
    chunk = example_chunk(memory_budget, num_params, largest, itemsize, measured.activations, measured.fixed_bytes)
    for start in range(0, batch, chunk):
        rows = slice(start, min(start + chunk, batch))
        # 2. Per-example gradients ∇ℓ_n for a chunk of examples: {name: [c, *shape]}.
        grads, values = per_example_grads(
            detached,
            tuple(t[rows] for t in inputs),
            None if target_tuple is None else tuple(t[rows] for t in target_tuple),
        )
        yield rows, grads, values.detach()


def add_rows(sums: dict[str, torch.Tensor], weights: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
    """``sums[name][r] += Σ_n weights[r, n] grads[name][n]`` in float64, in place, for one chunk of
    examples (``weights [R, b]``, ``grads {name: [b, *shape]}``; ``sums`` contiguous).

    The rows' R × P float64 pass is what costs (the products are b deep): one in-place ``addmm_``
    over every row, unless the chunk reaches under a sixth of them (several partitions, small
    chunks of a large model), where a product over the reached rows alone, added by index, costs
    less (measured, 2 CPU cores, P = 2M, b = 4: in place 32 ms over 10 rows, reached rows through
    a temporary 167 ms for 8 of them)."""
    weights = weights.to(torch.float64)
    touched = _reached_rows(weights)
    if not touched.numel():
        return
    in_place = 6 * touched.numel() >= weights.shape[0]
    for name, g in grads.items():
        if g.numel() == 0:  # a parameter of no values: nothing to add
            continue
        total = sums[name].view(weights.shape[0], -1)
        flat = g.detach().reshape(g.shape[0], -1)
        w, reached = weights.to(flat.device), touched.to(flat.device)
        # Lower-precision gradients are widened to float64 a block of columns at a time: a block
        # that stays in cache, not a fresh b × P float64 array (3.3x faster measured, b = 16,
        # P = 3.6M, 8 MiB blocks; the same products, bit for bit).
        step = flat.shape[1] if flat.dtype == torch.float64 else max(1, WIDEN_BLOCK_BYTES // (8 * flat.shape[0]))
        for start in range(0, flat.shape[1], step):
            columns = slice(start, start + step)
            block = flat[:, columns].to(torch.float64)
            if in_place:
                total[:, columns].addmm_(w, block)
            else:
                total[:, columns].index_add_(0, reached, w[reached] @ block)


def _reached_rows(weights: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``weights [R, b]`` that some example of the chunk reaches."""
    return weights.abs().sum(dim=1).nonzero().flatten()


def add_factor_rows(sums: dict[str, torch.Tensor], weights: torch.Tensor, blocks: Iterable[Factors]) -> None:
    """:func:`add_rows` for the per-example gradients of captured layer factors (one cotangent),
    one block at a time, for the parameters ``sums`` holds.

    A weight kept as one outer product per example (a Linear layer on one position: g_n a_nᵀ) is
    summed into the rows from its factors, Σ_n W[r, n] g_n a_nᵀ = (W[r] ⊙ g)ᵀ a, one batched matrix
    product over the rows reached: R·O·b·I operations against b·O·I to form the per-example
    gradients and R·b·O·I to add them, and no b × P array (measured, 2 CPU cores, a 2048 × 2048
    layer, b = 16, R = 10: 0.19 s of 1.33 s per tracked step saved)."""
    for factors in blocks:
        if factors.is_unused:  # zero gradients
            continue
        names = [name for name in factors.block.names if name in sums]
        outer = factors.weight_outer()
        weight = factors.block.weight
        if outer is not None and outer[0].shape[1] == 1 and weight in names:
            _add_outer_rows(sums[weight], weights, *outer)
            names.remove(weight)
        if names:
            add_rows(sums, weights, {name: g[0] for name, g in factors.gradients(names).items()})


def _add_outer_rows(total: torch.Tensor, weights: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> None:
    """``total[r] += Σ_n weights[r, n] g_n a_nᵀ`` in float64, in place, for ``a [b, 1, I]``,
    ``g [b, 1, O]`` and ``total [R, O, I]``, over the rows the chunk reaches."""
    weights = weights.to(device=total.device, dtype=torch.float64)
    reached = _reached_rows(weights)
    if not reached.numel():
        return
    rows, o = total.shape[0], g.shape[2]
    a64, g64 = a[:, 0].to(torch.float64), g[:, 0].to(torch.float64)  # [b, I], [b, O]
    flat = total.view(rows, o, -1)
    # The reached rows formed apart in blocks of as many rows as one example reaches (one a partition), whether or
    # not the chunk reaches every row: what a chunk holds beside its factors is then one block whatever its size,
    # as the factored route's chunks, sized by the first two chunks' peaks (factored_chunk_sizes), take it. (An
    # in-place product where the chunk reached every row, and [reached, O, I] at once where not, held more in a
    # chunk of one example than in one of two reaching every row: a conv net with a 64-wide Linear head, 2 rows,
    # held 137.8 MiB for a 16 MiB budget, its slope hidden; the rows it reached grew past the first chunks'.)
    block = max(1, int((weights[:, 0] != 0).sum()) if weights.shape[1] else 1)
    for start in range(0, reached.numel(), block):
        some = reached[start:start + block]
        part = torch.bmm((weights[some][:, :, None] * g64).transpose(1, 2), a64.expand(some.numel(), *a64.shape))
        flat.index_add_(0, some, part)
        del part


def factor_rows(weights: torch.Tensor, blocks: Iterable[Factors], params: dict[str, torch.Tensor],
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Group rows of one batch's layer factors: ``{name: [R, *shape]}`` in ``dtype``, on the
    parameter's device, for every parameter in ``params`` (zero where no block holds it).

    Each block's rows are summed in float64 (:func:`add_factor_rows`) and then cast, so a float32
    state never holds a float64 copy of every row at once (2.9 GB on the CIFAR UNet's 10 rows),
    only one block's, in a buffer the blocks share: the same values, bit for bit, as summing every
    row in float64 and casting at the end.
    """
    rows = weights.shape[0]
    out: dict[str, torch.Tensor] = {}
    scratch: dict[torch.device, torch.Tensor] = {}  # per device, grown to the largest block
    for factors in blocks:
        names = [name for name in factors.block.names if name in params]
        if not names:
            continue
        if dtype == torch.float64:
            sums = {n: torch.zeros((rows, *params[n].shape), dtype=torch.float64, device=params[n].device) for n in names}
        else:
            needed: dict[torch.device, int] = {}
            for n in names:
                needed[params[n].device] = needed.get(params[n].device, 0) + rows * params[n].numel()
            for device, size in needed.items():
                if device not in scratch or scratch[device].numel() < size:
                    scratch[device] = torch.empty(size, dtype=torch.float64, device=device)
            sums, offsets = {}, dict.fromkeys(needed, 0)
            for n in names:
                device, size = params[n].device, rows * params[n].numel()
                start = offsets[device]
                sums[n] = scratch[device][start : start + size].view(rows, *params[n].shape).zero_()
                offsets[device] = start + size
        add_factor_rows(sums, weights, [factors])
        for n in names:
            out[n] = sums[n].to(dtype)
    for name, p in params.items():
        if name not in out:
            out[name] = torch.zeros((rows, *p.shape), dtype=dtype, device=p.device)
    return out


def _group_route(model, params, inputs, targets, loss_fn, membership, memory_budget):
    """ĝ_r as R batched backward passes through one batch forward (see the module docstring).

    The forward runs with plain autograd, on copies of the buffers (:func:`preserved_buffers`):
    BatchNorm in training mode normalizes with the batch's statistics and writes its running
    statistics to the copies, not the model's (torch.func refused the write, RuntimeError)."""
    batch = inputs[0].shape[0]
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    rows_total = membership.shape[0]
    num_params = sum(p.numel() for p in leaves.values())
    # 1. One forward of the batch at θ: the per-example losses ℓ_n, with their graph (its activations counted).
    with torch.enable_grad(), preserved_buffers(model), evaluated_at(model, leaves):
        with _LeafOutputs(model) as counted:
            out = output_tensor(model(*inputs))
        chunk = group_row_chunk(memory_budget, num_params, value_bytes(leaves), counted.elements, counted.largest)
        losses = loss_fn(out, targets)
        if losses.numel() != batch:
            raise ValueError(f"loss_fn must return one loss per example (shape [{batch}]; e.g. reduction='none'), "
                             f"got shape {tuple(losses.shape)}")
        losses = losses.reshape(batch)
        sums = {name: torch.empty((rows_total, *p.shape), dtype=torch.float64, device=p.device)
                for name, p in leaves.items()}
        # 2. ĝ_r = ∇_θ Σ_n W[r, n] ℓ_n for a chunk of rows at once (W in the parameters' dtype). The first row
        # alone, measured (push_memory.LiveBytes): the chunks are sized by the larger of the count and what that
        # row held. The count sees leaf modules' outputs only: what the forward computes with plain operations (an
        # attention's probabilities [heads, T, T] written with matmul and softmax, diffusers' AttnProcessor, an
        # LSTM's gates, F.interpolate) was not in it, and a row held 4.8-37 times the count (T = 64-512).
        start = 0
        if rows_total > 1:
            with LiveBytes((*leaves.values(), *(t for t in inputs if isinstance(t, torch.Tensor)), losses)) as live:
                for name, g in gradients_from_losses(losses, leaves, membership[:1], dtype=torch.float64).items():
                    sums[name][:1] = g
            if live.peak > 0:
                chunk = max(1, min(chunk, int(memory_budget // live.peak)))
            start = 1
        for start in range(start, rows_total, chunk):
            rows = slice(start, min(start + chunk, rows_total))
            for name, g in gradients_from_losses(losses, leaves, membership[rows], dtype=torch.float64).items():
                sums[name][rows] = g
    return sums, losses.detach()


def _factored_route(model, params, inputs, targets, loss_fn, membership, memory_budget):
    """ĝ_r from captured layer factors: one forward and one backward of Σ_n ℓ_n per chunk.

    Algorithm:
        1. One forward of a chunk with hooks; per-example losses ℓ_n = loss_fn(f(x_n), y_n).
        2. One backward of Σ_n ℓ_n gives each example's output gradients (examples are
           independent); per layer, per-example gradients Σ_t g_t a_tᵀ are materialized one block
           at a time and multiplied into the rows in float64. The chunks: :func:`factored_chunk_sizes`.
        3. Parameters outside supported modules: the "example" route, restricted to them.

    ``params`` other than the module's own parameters (θ_k elsewhere than where the module is) are
    where the forward and backward run, as in the other routes.
    """
    rows_total = membership.shape[0]
    sums = {n: torch.zeros((rows_total, *p.shape), dtype=torch.float64, device=p.device) for n, p in params.items()}
    losses, _ = _factored_captures(model, params, inputs, targets, loss_fn, membership, memory_budget, sums)
    plan = covering_plan(model, inputs)
    fallback = {n: params[n] for n in plan.fallback if n in params}
    if fallback:
        others = {n: p.detach() for n, p in params.items() if n not in fallback}
        extra, _ = _example_route(model, fallback, inputs, targets, loss_fn, membership, memory_budget, others)
        sums.update(extra)
    return sums, torch.cat(losses)


def second_chunk_measured(batch: int, memory_budget: int, one: int) -> bool:
    """Whether the factored route runs and measures a second chunk (of two examples, or the one left): where the
    batch has more than one example and one example's chunk, ``one`` bytes at its peak, is under the budget (where
    it is not, every chunk is one example, and a chunk of two would hold more than the budget for nothing)."""
    return batch > 1 and one < memory_budget


def factored_chunk_sizes(batch: int, memory_budget: int, one: int, two: int) -> list[int]:
    """The factored gradient route's chunks of ``batch`` examples, in order, the rule the engine runs and the cost
    estimate counts: the first of one example (``one``: the bytes it held at its peak) and, where
    :func:`second_chunk_measured`, the second of two (``two``); the rest as many examples as keep a chunk within
    ``memory_budget``: what an example adds (the slope, ``two - one``) beside what a chunk holds once whatever its
    size (``one`` less the slope), one example at a time where one alone takes the budget. The second chunk is held
    once whatever the budget: one example more than it allows at most (a model that builds a large array once per
    chunk would otherwise run one example at a time, the array built for each). (Chunks were sized by the largest
    parameter alone, budget / (4 x its bytes): a conv net's factors, its recorded inputs and output gradients at
    every position, held 2.8x a 4-16 MiB budget, 3 -> 16 -> 16 -> 32 channels at 64x64.)"""
    if batch <= 1:
        return [batch]
    if not second_chunk_measured(batch, memory_budget, one):
        return [1] * batch
    sizes = [1, min(2, batch - 1)]
    slope = two - one
    rest = max(1, int((memory_budget - max(0, one - slope)) // slope)) if slope > 0 else batch
    left = batch - sum(sizes)
    return sizes + [rest] * (left // rest) + ([left % rest] if left % rest else [])


def factored_steady_chunk(batch: int, memory_budget: int, one: int, two: int) -> int:
    """Examples per chunk of the factored route's later calls on the same model, inputs, rows and loss, its first
    two chunks' peaks (``one``, ``two``) remembered: the size :func:`factored_chunk_sizes` gives the chunks after
    the measured two (one where one example takes the budget), in equal chunks of the batch; what the cost
    estimate counts as a step's chunks."""
    sizes = factored_chunk_sizes(batch, memory_budget, one, two)
    return max(sizes[2:]) if len(sizes) > 2 else max(sizes)


def _factored_captures(model, params, inputs, targets, loss_fn, membership, memory_budget, sums
                       ) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Steps 1-2 of :func:`_factored_route` over the batch, in :func:`factored_chunk_sizes`' chunks, the first two
    measured (``push_memory.LiveBytes``), into ``sums`` (the covering plan's parameters; the fallback's left as they
    are). Returns (the chunks' per-example losses, (one, two): the bytes the first and second chunks held at their
    peaks, two 0 where no second chunk was measured)."""
    plan = covering_plan(model, inputs)
    own = dict(model.named_parameters())
    at = None if all(own.get(n) is p for n, p in params.items()) else {
        n: p.detach().requires_grad_(True) for n, p in params.items()  # capture needs θ with a graph
    }
    batch = batch_size(inputs)
    losses = []

    def add_chunk(chunk: slice) -> None:
        # 1-2. The chunk's factors (a forward with hooks, one backward of Σ_n ℓ_n), multiplied into the rows.
        cotangents, box = loss_cotangents(loss_fn, _target_rows(targets, chunk))
        factors, _ = capture(model, plan, tuple(t[chunk] for t in inputs), cotangents, parameters=at)
        losses.append(box["losses"])
        add_factor_rows(sums, membership[:, chunk], factors)

    kept = (*params.values(), *(at or {}).values(), *sums.values(), membership,
            *(t for t in tree_leaves((inputs, targets)) if isinstance(t, torch.Tensor)))

    def measured(chunk: slice) -> int:
        with LiveBytes(kept) as live:
            add_chunk(chunk)
        return live.peak

    # (measured once per model, inputs, parameters, rows and loss, as the example route's pass: the later calls run
    # chunks of the size the first two chunks gave, unmeasured; measuring every call cost 1.4-1.9x a small MLP's)
    key = (_tensor_signature(inputs), _tensor_signature(targets), tuple(sorted(params)), at is None,
           membership.shape[0], int((membership[:, 0] != 0).sum()), kernel_context(inputs))
    known = _FACTORED_PEAKS.recall(model, key, loss_fn)
    if known is not None:
        one, two = known
        if two or not second_chunk_measured(batch, memory_budget, one):
            step = factored_steady_chunk(batch, memory_budget, one, two)
            for start in range(0, batch, step):
                add_chunk(slice(start, min(start + step, batch)))
            return losses, (one, two)
    one = measured(slice(0, 1))
    two = measured(slice(1, min(3, batch))) if second_chunk_measured(batch, memory_budget, one) else 0
    sizes = factored_chunk_sizes(batch, memory_budget, one, two)
    start = sum(sizes[:2]) if two else 1
    for size in sizes[2 if two else 1:]:
        add_chunk(slice(start, start + size))
        start += size
    _FACTORED_PEAKS.remember(model, key, loss_fn, (one, two))
    return losses, (one, two)


@contextlib.contextmanager
def _covering_outcomes_kept(model: nn.Module):
    """Inside, covering_plan's remembered outcomes for ``model`` are what they were before, after: a check run on
    copies of one example (factored_chunk_peaks') sees no forward that reorders or mixes the batch's rows, and its
    outcome, kept under the key of any batch of three or more, stood for the engine's own batches."""
    from . import factors
    before = dict(factors._COVERED.get(model, {}))
    try:
        yield
    finally:
        factors._COVERED[model] = before


def factored_chunk_peaks(model: nn.Module, params: dict[str, torch.Tensor], example: tuple[torch.Tensor, ...],
                         rows: int, partitions: int) -> tuple[int, int] | None:
    """``(one, two)``: the bytes the factored gradient route's first two chunks hold at their peaks
    (:func:`_factored_captures`), on copies of one example (``example``: its inputs, batch dimension 1), a sum of
    squares of the output standing in for the loss: what the cost estimate sizes the route's chunks by
    (:func:`factored_chunk_sizes`). The rows a chunk reaches set what it holds (a Linear weight's rows summed from
    its factors are formed apart, [reached, O, I], where the chunk does not reach every row): the three examples
    are put each in a row of its own in every one of ``partitions`` partitions, of ``rows`` rows in all (at most
    three a partition). Buffers and the random state kept; None where the pass raises (nothing measured: the cost
    estimate then counts (0, 0) without keeping it for the architecture,
    :func:`~genkernel.core.cost.factored_chunk_bytes`)."""
    per_partition = max(1, min(3, rows // max(partitions, 1)))
    inputs = tuple(t[:1].repeat(3, *([1] * (t.dim() - 1))) for t in example)
    groups = [torch.arange(3) % per_partition for _ in range(partitions)]
    membership = membership_matrix(groups, torch.ones(3, dtype=torch.float64), [per_partition] * partitions
                                   ).to(inputs[0].device)
    sums = {n: torch.zeros((membership.shape[0], *p.shape), dtype=torch.float64, device=p.device)
            for n, p in params.items()}

    def stand_in(out, y):
        out = output_tensor(out)
        return out.pow(2).reshape(out.shape[0], -1).sum(1)

    try:
        with preserved_state(model), _covering_outcomes_kept(model):
            _, peaks = _factored_captures(model, params, inputs, None, stand_in, membership, 2**62, sums)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        return None  # (push_memory.remembered keeps no None)
    return peaks


__all__ = [
    "DEFAULT_GRADIENT_BUDGET", "EXAMPLE_PASS_ACTIVATIONS", "GRADIENT_ROUTES", "GRAPH_ROW_ACTIVATIONS",
    "GRAPH_ROW_LARGEST_OUTPUTS", "graph_row_elements",
    "WIDEN_BLOCK_BYTES", "ExamplePass", "add_factor_rows", "add_rows", "example_chunk", "example_pass_measure",
    "factored_chunk_peaks", "factored_chunk_sizes", "factored_steady_chunk",
    "example_pass_bytes", "factor_rows", "output_elements",
    "gradients_from_losses", "group_gradients", "group_row_chunk", "membership_matrix",
]
