"""Layer factors: what a forward pass with hooks and one output-batched backward capture.

For a linear map z = W a + b applied at T positions of one example, the example's weight
gradient for output o of the model is G_o = Σ_t g_{o,t} a_tᵀ with g_{o,t} = ∂f_o/∂z_t, so

    ⟨G_o(x), G_o(x')⟩ = Σ_{t,s} (a_t · a'_s) (g_{o,t} · g'_{o,s})        (bias: a ← [a, 1])

and for T = 1 the trace kernel of the layer is (a · a') Σ_o (g_o · g'_o): a Hadamard product of
two small Gram matrices, with no P-sized object anywhere.

This module holds the three pieces every factored computation shares:

1. :class:`Plan` (:func:`make_plan`): which trainable parameters are read from factors (a
   :class:`Block` per supported module) and which go through torch.func (the fallback);
2. :func:`capture`: one forward pass with hooks and one backward with c cotangents, giving a
   :class:`Factors` per block;
3. :class:`Factors`: a block's captured factors and everything that can be read from them
   (per-example gradients, their batch totals, kernels between two sets of factors, scaled
   copies). Other modules read factors only through these methods: the layout (activation
   columns, the trailing bias column, embedding indices, materialized blocks) stays here.

Supported modules: ``nn.Linear`` (any leading dimensions: positions t), ``nn.Conv1d`` /
``nn.Conv2d`` (unfolded patches; ungrouped, zero padding), ``nn.Embedding`` ((a_t · a'_s)
becomes [index_t = index'_s]) and the affine parameters of ``nn.GroupNorm`` / ``nn.LayerNorm``
(per-example gradients Σ g ⊙ x̂ and Σ g, materialized: they are C-sized), each running its
class's own forward (a subclass that overrides it is not supported). A module whose
parameters are shared with another module, or that is used in a way the hooks cannot see, is
left to the fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..adapter import (
    analysis_mode, batch_size, data_dependent_modules, evaluated_at, flat_output, output_tensor, outside_inference_mode,
    trainable_parameters,
)
from .reference import RootSumSquares, in_common_scale, scaled_alike

DEFAULT_MEMORY_BUDGET = 512 * 2**20

# The forms a capture gives its blocks in (capture(form=...), TrainingCapture):
#   "outer"    activations and output gradients as recorded (what sketches read a weight's sketch from);
#   "compact"  per-example gradients materialized wherever a pair kernel costs fewer operations
#              that way (what Factors.compact gives; what kernels read);
#   "lean"     as "compact", but only where the materialized gradients are also no larger than the
#              outer form (c·I·O against T·(I + c·O) per example): never more memory than "outer",
#              what the factored tracker route holds through a whole step.
FACTOR_FORMS = ("outer", "compact", "lean")

_IN_ANALYSIS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("genkernel_in_analysis", default=frozenset())


@contextlib.contextmanager
def analysis(model: nn.Module) -> Iterator[None]:
    """:func:`~genkernel.core.adapter.analysis_mode`, entered once per model: inside it, nested
    ``analysis(model)`` calls cost nothing. (Entering walks every module twice; on a small
    UNet2DModel, 130 modules, that is 10-20 ms, and one kernel call entered it ten times.)"""
    inside = _IN_ANALYSIS.get()
    if id(model) in inside:
        yield
        return
    with analysis_mode(model):
        token = _IN_ANALYSIS.set(inside | {id(model)})
        try:
            yield
        finally:
            _IN_ANALYSIS.reset(token)


# ---------------------------------------------------------------------------------------------
# 1. The plan: which parameters go through which path.
# ---------------------------------------------------------------------------------------------
@dataclass
class Block:
    """A supported module and the full names of its trainable parameters."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv" | "embedding" | "norm"
    weight: str | None
    bias: str | None

    @property
    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]

    def parameter(self, name: str) -> torch.Tensor:
        """The module's own parameter behind the full name ``name``."""
        return self.module.weight if name == self.weight else self.module.bias


@dataclass
class Plan:
    """How the engine splits a model's trainable parameters.

    Attributes:
        blocks: supported modules, handled from captured factors.
        fallback: ``{name: parameter}`` handled by torch.func (may be empty).
        order: the trainable parameter names in ``named_parameters`` order.
    """

    blocks: list[Block]
    fallback: dict[str, torch.Tensor]
    order: list[str]
    params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def factored_fraction(self) -> float:
        """Share of the trainable parameter count handled from factors."""
        total = sum(p.numel() for p in self.params.values())
        fb = sum(p.numel() for p in self.fallback.values())
        return 1.0 - fb / max(total, 1)


# What a supported module's call runs: the stock methods of its class. A subclass that overrides
# one of them (a gain or gate on the weight, a permuted layout, a second read) runs code whose
# reads of the weight the hooks do not describe, and a numerical check at one point cannot prove
# it: a gain of exactly 1, or a gate far below the check's tolerance, hides the difference there.
_STOCK_METHODS = {
    nn.Linear: ("forward",), nn.Conv1d: ("forward", "_conv_forward"), nn.Conv2d: ("forward", "_conv_forward"),
    nn.Embedding: ("forward",), nn.GroupNorm: ("forward",), nn.LayerNorm: ("forward",),
}


def _runs_stock_forward(module: nn.Module) -> bool:
    """Whether ``module``'s call runs its supported base class's own methods (no override in a
    subclass, none set on the instance)."""
    for base, methods in _STOCK_METHODS.items():
        if isinstance(module, base):
            return all(getattr(type(module), m) is getattr(base, m) and m not in module.__dict__ for m in methods)
    return False


def _supported(module: nn.Module) -> str | None:
    if not _runs_stock_forward(module):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros":
            return None
        return "conv"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return None
        return "embedding"
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return "norm" if getattr(module, "weight", None) is not None or getattr(module, "bias", None) is not None else None
    return None


def make_plan(model: nn.Module, exclude: Iterable[str] = frozenset()) -> Plan:
    """Split ``model``'s trainable parameters into factored blocks and a torch.func fallback.

    A module is factored when its type is supported and its call runs that type's own forward (a
    subclass overriding ``forward``, or ``_conv_forward`` for convolutions, goes to torch.func), its
    configuration is (no grouped or non-zero-padded convolution, no embedding max_norm), none of
    its parameters is shared with another module, its name is not in ``exclude``, and it is not inside
    a module whose ``data_dependent_forward`` is true: a forward that takes another path depending on
    its inputs' values (the GAN critic's input gradient, formed only for a batch holding penalty rows),
    which a covering check on a sample of rows, remembered per kind of input, cannot stand for.
    """
    exclude = set(exclude)
    opaque = data_dependent_modules(model)
    exclude |= {name for name, _ in model.named_modules()
                if any(name == o or not o or name.startswith(o + ".") for o in opaque)}
    params = trainable_parameters(model)
    by_id = {id(p): n for n, p in params.items()}
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    blocks, covered = [], set()
    for mname, module in model.named_modules():
        kind = _supported(module)
        if kind is None or mname in exclude:
            continue
        own = {pn: p for pn, p in module.named_parameters(recurse=False)}
        if any(owners.get(id(p), 0) > 1 for p in own.values()):
            continue  # tied weights: torch.func handles them
        if any(p.numel() == 0 for p in own.values()):
            continue  # a parameter of no values (Linear(0, n), Linear(n, 0)): its factors have an empty side; torch.func
        names = {pn: by_id.get(id(p)) for pn, p in own.items()}
        weight, bias = names.get("weight"), names.get("bias")
        if weight is None and bias is None:
            continue
        blocks.append(Block(mname, module, kind, weight, bias))
        covered.update(n for n in (weight, bias) if n is not None)
    fallback = {n: p for n, p in params.items() if n not in covered}
    return Plan(blocks, fallback, list(params), params)


class Unfactorable(RuntimeError):
    """A module cannot be factored for these inputs (it is moved to the torch.func fallback)."""

    def __init__(self, module_name: str, why: str):
        super().__init__(f"module '{module_name}': {why}")
        self.module_name = module_name


COVERAGE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
COVERAGE_SAMPLE = 3  # examples the covering check runs on (each alone, and together in two orders)


@outside_inference_mode
def covering_plan(model: nn.Module, inputs: tuple[torch.Tensor, ...], exclude: Iterable[str] = frozenset()) -> Plan:
    """:func:`make_plan`, checked on ``inputs``: a block whose factors do not give its parameters'
    whole gradient moves to the torch.func fallback.

    A module's hooks see only its own forward calls. A parameter also read elsewhere (attention's
    ``out_proj.weight`` inside ``F.multi_head_attention_forward``, an embedding tied to an output
    head through ``F.linear(h, emb.weight)``, any functional use) would silently lose that part of
    its gradient; a module that sees the batch's rows in another order (a forward that sorts its
    batch, a sequence-first layout whose leading size happens to equal the batch's) would credit
    one example's gradient to another. The check (:func:`_uncovered_blocks`) is per example, on
    :data:`COVERAGE_SAMPLE` examples spread over ``inputs``: each example's gradient read from
    the factors of a batched pass must equal the gradient of a pass of that example alone, in
    two opposite orders of the sample, per block (relative to the block's gradient norm: 1e-9 in
    float64, 1e-4 in float32). Modules that do not keep the batch on dimension 0 move to the
    fallback too, and so does a block whose parameter the forward reads through the module's
    attribute outside the module's own calls, found from the graph whatever its gradient's value
    (:func:`_read_outside_their_calls`: behind a zero-initialized gate the read adds nothing to the
    sample's gradients, and the remembered outcome would drop it once the gate is trained). The
    check runs with the parameters' exact zeros filled in (:func:`_zeros_filled`): a zero gate or
    zero-initialized output layer would otherwise zero both sides of every comparison it covers.
    Cost: a forward and a backward of each sampled example alone, and three of the sample (two
    with the sample's per-example gradients formed; on the tiny UNet2DModel of the kernel
    benchmark, 2 CPU cores: 1.2-1.8 s once before the third was added, against 0.1-0.3 s for the
    batch-sum check it replaced). A check on a sample cannot see what the forward does only on
    other rows (a parameter read only where the data take a branch the sample does not): trackers
    check every step's group gradients against the real gradient besides.

    The outcome is remembered per model for the same structure and inputs of the same kind
    (:func:`_covering_key`: every module and parameter by identity, shape, dtype and
    trainability, instance-level ``forward`` overrides and hooks, global module hooks, the inputs'
    per-example shapes and dtypes, ``exclude``, and the number of examples sampled: an outcome
    checked on one example does not stand for a batch of several): a later call with any of them
    changed checks again. What the key cannot see (an attribute the forward branches on, changed
    between calls) is not checked again; a tracker's per-step check of the group gradients
    against the real gradient still sees a parameter read the hooks miss.
    """
    exclude = frozenset(exclude)
    rows = batch_size(inputs)
    sampled = min(COVERAGE_SAMPLE, rows)
    # A check on fewer examples sees less: one example alone cannot show a forward that mixes the
    # batch's rows (a minibatch-std layer), so its outcome never stands for a larger batch's.
    key = (_covering_key(model, inputs, exclude), sampled)
    known = _COVERED.get(model, {})
    if key in known:
        return make_plan(model, known[key])
    found = set(exclude)
    spread = torch.linspace(0, rows - 1, sampled).round().long().unique()
    sample = tuple(t[spread.to(t.device)] for t in inputs)
    while True:
        plan = make_plan(model, found)
        if not plan.blocks:
            break
        try:
            with analysis(model), _zeros_filled(model):
                uncovered = _uncovered_blocks(model, plan, sample)
        except Unfactorable as error:
            found.add(error.module_name)
            continue
        if not uncovered:
            break
        found.update(uncovered)
    if len(known) >= 8:  # a few kinds of inputs per model
        known.pop(next(iter(known)))
    known[key] = frozenset(found)
    _COVERED[model] = known
    return plan


_COVERED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def same_kind(xs1: tuple[torch.Tensor, ...], xs2: tuple[torch.Tensor, ...]) -> bool:
    """Whether two batches hold inputs of one kind: as many tensors, with the same per-example
    shapes, dtypes and devices (what a concatenation of their rows needs)."""
    return len(xs1) == len(xs2) and all(
        a.shape[1:] == b.shape[1:] and a.dtype == b.dtype and a.device == b.device for a, b in zip(xs1, xs2)
    )


def pair_covering_plan(model: nn.Module, xs1: tuple[torch.Tensor, ...], xs2: tuple[torch.Tensor, ...] | None,
                       exclude: Iterable[str] = frozenset()) -> Plan:
    """:func:`covering_plan` for factors of two batches (a kernel between them; a tracker's probes
    and training batches): checked on ``xs1`` and on ``xs2`` too when it holds inputs of another
    kind (:func:`same_kind`: other per-example shapes, a forward that may take another path) or
    its sample holds more examples (one example of ``xs1`` alone cannot show a forward that mixes
    the rows of ``xs2``'s batch); a block either check moves to the fallback is left to it."""
    plan = covering_plan(model, xs1, exclude)
    sampled = (min(COVERAGE_SAMPLE, batch_size(xs1)), 0 if xs2 is None else min(COVERAGE_SAMPLE, batch_size(xs2)))
    if xs2 is None or (same_kind(xs1, xs2) and sampled[1] <= sampled[0]):
        return plan
    other = covering_plan(model, xs2, exclude)
    kept = {block.name for block in plan.blocks} & {block.name for block in other.blocks}
    return make_plan(model, set(exclude) | {block.name for block in make_plan(model).blocks if block.name not in kept})


def _covering_key(model: nn.Module, inputs: tuple[torch.Tensor, ...], exclude: frozenset) -> tuple:
    """What :func:`covering_plan`'s outcome depends on, short of running the model."""
    hooks = tuple(tuple(table) for table in (nn.modules.module._global_forward_hooks,
                                             nn.modules.module._global_forward_pre_hooks))
    modules = tuple(
        (name, id(m), type(m), id(m.__dict__.get("forward")), tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
         tuple((pn, id(p), tuple(p.shape), p.dtype, p.requires_grad) for pn, p in m._parameters.items() if p is not None))
        for name, m in model.named_modules(remove_duplicate=False)
    )
    xs = tuple((tuple(t.shape[1:]), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else type(t) for t in inputs)
    return modules, hooks, xs, exclude


@contextlib.contextmanager
def _zeros_filled(model: nn.Module) -> Iterator[None]:
    """Inside: every trainable parameter with exact zeros replaced by a copy whose zeros are small
    values of a fixed seed (1 % of the parameter's mean nonzero magnitude, or 0.01); the parameters
    themselves are untouched and back in their modules afterwards.

    The covering check compares gradients, and an exact zero hides what it multiplies: behind a
    zero-initialized gate (adaLN-Zero, ReZero, a "zero convolution", LoRA's B) or a zero-initialized
    output layer every block upstream has a zero gradient on both sides, so the check passes
    whatever the factors miss, and its outcome is kept for the whole of a tracker's run, at
    parameters training soon moves. The swap (``module._parameters``, as for tied parameters: one
    copy per parameter) leaves the parameters and their version counters alone, so a graph the
    user's forward built before an observed step's check still backpropagates."""
    generator = torch.Generator().manual_seed(0)
    copies: dict[int, nn.Parameter] = {}
    swapped = []
    with torch.no_grad():
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is None or not param.requires_grad or not param.is_floating_point():
                    continue
                if id(param) not in copies:
                    zero = param == 0
                    if not bool(zero.any()):
                        continue
                    nonzero = param[~zero].abs()
                    scale = 0.01 * (float(nonzero.mean()) if nonzero.numel() else 1.0)
                    fill = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param) * scale
                    copies[id(param)] = nn.Parameter(torch.where(zero, fill, param.detach()))
                swapped.append((module, name, param))
    try:
        for module, name, param in swapped:
            module._parameters[name] = copies[id(param)]
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def _uncovered_blocks(model: nn.Module, plan: Plan, sample: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of the blocks whose factors do not give each example's own gradient on ``sample``.

    1. Reference: for a random cotangent E, each example's gradient ∂⟨E_n, f(x_n)⟩/∂θ from a
       forward and backward of that example alone (what a per-example gradient means; it holds
       every read of the parameter, seen by the hooks or not).
    2. Factors: one forward with hooks and one backward of ⟨E, f(x)⟩ over the sample, read per
       example (row n of a block's factors must be example n's).
    3. The same with the sample's rows reversed (E's rows with them): a forward that reorders
       its batch by the data (sorting by a key and restoring the order) keeps the rows in place
       for at most one of two opposite orders of distinct examples.

    A block fails when its per-example gradients differ from the reference by more than
    :data:`COVERAGE_RTOL` of their norm. The tolerance is one per block, over its parameters and
    the sample's examples: a parameter whose gradient is zero in exact arithmetic (the bias of
    attention keys: softmax ignores a shift shared by all keys) has rounding noise on both sides,
    which no relative test on that parameter alone can pass.
    """
    generator = torch.Generator().manual_seed(0)
    batch = batch_size(sample)
    params = [p for block in plan.blocks for p in (block.parameter(n) for n in block.names)]
    # 2-3. The sample's factors in both orders (three examples' activations and output gradients).
    E, passes = None, []
    for order in (torch.arange(batch), torch.arange(batch - 1, -1, -1)):
        records, raw, out = _recorded_forward(model, plan, tuple(t[order.to(t.device)] for t in sample))
        if E is None:
            E = torch.randn(raw.shape, generator=generator, dtype=torch.float64).to(raw)
        edges = [edge for calls in records.values() for _, edge, _ in calls]
        with torch.enable_grad():
            # (an output that no parameter reaches has no graph: every edge's gradient is zero, as the reference's)
            grads = (torch.autograd.grad((raw * E[order.to(E.device)]).sum(), edges, allow_unused=True)
                     if edges and raw.requires_grad else [None] * len(edges))
        grads = [None if g is None else g.unsqueeze(0) for g in grads]
        # A block whose calls do not fit its layout comes back as its name (moved to the fallback).
        passes.append((order.tolist(), list(_assembled(plan, records, grads, 1, out, "outer", tolerant=True))))
    # 1. Each example alone (the sample's parameter-sized gradients, in the parameters' dtype).
    reference = []
    for n in range(batch):
        with torch.enable_grad(), _any_attention():
            raw = output_tensor(model(*(t[n : n + 1] for t in sample)))
            if not raw.requires_grad:  # an output that no parameter reaches: every gradient is zero
                reference.append({})
                continue
            reference.append(dict(zip(map(id, params), torch.autograd.grad((raw * E[n : n + 1]).sum(), params,
                                                                           allow_unused=True))))
    # gap, reference and factors norms, over the block's parameters and examples (kept scale-safe: squares formed
    # directly overflowed past 1.3e154, an OverflowError, and underflowed to 0 below 1.5e-154)
    sums = {block.name: (RootSumSquares(), RootSumSquares(), RootSumSquares()) for block in plan.blocks}
    unreadable = set()
    for order, factors in passes:
        for f in factors:  # each block's per-example gradients formed once, one block at a time
            if isinstance(f, str):
                unreadable.add(f)
                continue
            acc = sums[f.block.name]
            try:
                gradients = f.gradients()
            except RuntimeError:  # factors of a call whose output is not the module's own (a hook's)
                unreadable.add(f.block.name)
                continue
            for name, rows in gradients.items():
                for row, example in enumerate(order):
                    got = rows[0, row]
                    want = reference[example].get(id(f.block.parameter(name)))
                    want = torch.zeros_like(got) if want is None else want
                    (got, want), scale = scaled_alike(got, want)
                    acc[0].add(got - want, scale)
                    acc[1].add(want, scale)
                    acc[2].add(got, scale)
    uncovered = _read_outside_their_calls(model, plan, sample, E) | unreadable
    for block in plan.blocks:
        (gap, ref, got), scale = in_common_scale(*sums[block.name])
        rtol = COVERAGE_RTOL.get(block.parameter(block.names[0]).dtype, 1e-3)
        if gap > rtol * (ref + got) + torch.finfo(torch.float64).tiny / scale:
            uncovered.add(block.name)
    return [block.name for block in plan.blocks if block.name in uncovered]


def _read_outside_their_calls(model: nn.Module, plan: Plan, sample: tuple[torch.Tensor, ...],
                              E: torch.Tensor) -> set[str]:
    """Names of the blocks with a parameter that the forward reads outside the module's own calls
    (attention's ``out_proj.weight`` in ``F.multi_head_attention_forward``, an embedding's weight in
    ``F.linear(h, emb.weight)``), found from the graph rather than from values.

    The numerical check compares gradients: a read outside the hooks whose gradient is zero on the
    sample passes it, and the outcome is remembered for the model's later parameters. A zero-
    initialized gate (adaLN-Zero, ReZero, a zero-initialized residual scale) makes exactly that: at
    initialization the outside read adds nothing, after training it does, and the block's factors
    then silently missed it (a kernel 10-12 % off). Here every block parameter is replaced by a
    copy (a separate leaf) everywhere but inside its module's own calls (a forward pre-hook, run
    after the user's, puts the parameter back, a forward hook, run first, takes it out again: a
    user's hook on the module reads the copy); a copy that ⟨E, f(x)⟩ reaches in the graph, with
    any gradient, zero included, is a read the hooks cannot see. Reads through a
    reference kept elsewhere (not the module attribute) are left to the numerical check. A forward
    that fails on the copies leaves every block to the fallback."""
    swaps: dict[int, list] = {}  # id(module) -> [(module, name, parameter, copy)]
    for block in plan.blocks:
        module = block.module
        for full in block.names:
            name = "weight" if full == block.weight else "bias"
            real = module._parameters[name]
            swaps.setdefault(id(module), []).append((module, name, real, nn.Parameter(real.detach().clone())))
    depth: dict[int, int] = {}

    def inside(module, args):
        depth[id(module)] = depth.get(id(module), 0) + 1
        for m, name, real, _ in swaps[id(module)]:
            m._parameters[name] = real

    def outside(module, args, output):
        depth[id(module)] -= 1
        if depth[id(module)] == 0:
            for m, name, _, copy in swaps[id(module)]:
                m._parameters[name] = copy

    handles, copies = [], []
    try:
        for entries in swaps.values():
            module = entries[0][0]
            # Last of the pre-hooks: a user's pre-hook that reads the weight runs on the copy (its
            # read is outside what the factors describe); first of the forward hooks (below), so
            # the user's forward hooks run on the copy too.
            handles.append(module.register_forward_pre_hook(inside))
            handles.append(module.register_forward_hook(outside, prepend=True))
            for m, name, _, copy in entries:
                m._parameters[name] = copy
                copies.append((m, name, copy))
        with torch.enable_grad(), _any_attention():
            raw = output_tensor(model(*sample))
            if not raw.requires_grad:
                return set()
            grads = torch.autograd.grad((raw * E.to(raw)).sum(), [c for _, _, c in copies], allow_unused=True)
    except Exception:  # a forward that cannot run on copies (it holds on to the parameters): none is trusted
        return {block.name for block in plan.blocks}
    finally:
        for handle in handles:
            handle.remove()
        for entries in swaps.values():
            for m, name, real, _ in entries:
                m._parameters[name] = real
    read = {id(m) for (m, _, _), g in zip(copies, grads) if g is not None}
    return {block.name for block in plan.blocks if id(block.module) in read}


# ---------------------------------------------------------------------------------------------
# 2. Factors and what can be read from them.
# ---------------------------------------------------------------------------------------------
@dataclass
class Factors:
    """Captured factors of one block for a batch of B examples and c output cotangents.

    The layout is private to this module: ``"outer"`` keeps ``a [B, T, I]`` (with a trailing
    column of ones when the block has a bias) and ``g [c, B, T, O]``; ``"embedding"`` keeps the
    indices ``a LongTensor[B, T]`` and ``g [c, B, T, D]``; ``"dense"`` keeps materialized
    per-example gradients ``g [c, B, P_block]`` (weight columns, then bias).
    """

    block: Block
    kind: str
    a: torch.Tensor | None
    g: torch.Tensor

    # -- shape ------------------------------------------------------------------------------
    @classmethod
    def unused(cls, block: Block, cotangents: int, batch: int, like: torch.Tensor) -> "Factors":
        """Factors of a block the forward did not call: every gradient is zero."""
        return cls(block, "dense", None, like.new_zeros((cotangents, batch, 0)))

    @property
    def is_unused(self) -> bool:
        """True for a block the forward did not call (its gradients are zero)."""
        return self.kind == "dense" and self.g.shape[-1] == 0

    @property
    def cotangents(self) -> int:
        return self.g.shape[0]

    @property
    def batch(self) -> int:
        return self.g.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.g) if t is not None)

    def select(self, rows: slice) -> "Factors":
        """Examples ``rows``."""
        return Factors(self.block, self.kind, None if self.a is None else self.a[rows], self.g[:, rows])

    def cotangent(self, index: int) -> "Factors":
        """The factors of cotangent ``index`` alone (c = 1)."""
        return Factors(self.block, self.kind, self.a, self.g[index : index + 1])

    def allocate(self, total: int) -> "Factors":
        """Empty factors like these for ``total`` examples (filled with :meth:`write`)."""
        a = None if self.a is None else self.a.new_empty((total, *self.a.shape[1:]))
        return Factors(self.block, self.kind, a, self.g.new_empty((self.g.shape[0], total, *self.g.shape[2:])))

    def write(self, rows: slice, other: "Factors") -> None:
        """Copy ``other`` (same block and form) into examples ``rows``."""
        if other.a is not None:
            self.a[rows] = other.a
        self.g[:, rows] = other.g

    # -- scaled copies ----------------------------------------------------------------------
    def per_example_scaled(self, weights: torch.Tensor) -> "Factors":
        """Factors of w_n ∇ (the output-gradient side scaled per example by ``weights [B]``)."""
        w = weights.to(dtype=self.g.dtype, device=self.g.device)
        return Factors(self.block, self.kind, self.a, self.g * w.view(1, -1, *([1] * (self.g.dim() - 2))))

    def parameter_scaled(self, scale: dict[str, float]) -> "Factors":
        """Factors of the gradient with each parameter's part times its own number ``scale[name]``."""
        block = self.block
        if self.kind == "outer":
            a = self.a.clone()
            if block.bias is not None:
                if block.weight is not None:
                    a[..., :-1] *= scale[block.weight]
                a[..., -1] *= scale[block.bias]
            else:
                a *= scale[block.weight]
            return Factors(block, "outer", a, self.g)
        if self.kind == "embedding":
            return Factors(block, "embedding", self.a, self.g * scale[block.weight])
        g = self.g.clone()
        for name, columns in self._dense_columns():
            g[..., columns] *= scale[name]
        return Factors(block, "dense", None, g)

    def compact(self) -> "Factors":
        """The cheaper form for pair kernels: per-example gradients Σ_t g_t a_tᵀ where a pair
        costs less materialized (c·I·O) than in the T² factored form (T²·(I + c·O))."""
        if self.kind == "outer" and _dense_is_cheaper(self.a.shape[1], self.a.shape[2], self.g.shape[3], self.g.shape[0]):
            return Factors(self.block, "dense", None, self.as_dense())
        return self

    # -- gradients --------------------------------------------------------------------------
    def as_dense(self) -> torch.Tensor:
        """Per-example gradients ``[c, B, P_block]`` of the block (materialized; weight columns,
        then bias)."""
        if self.kind == "dense":
            return self.g
        if self.kind == "outer":
            return _dense_from_calls(self.block, [(self.a, self.g)], outer=True)
        raise TypeError("embedding factors are never materialized")

    def gradients(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Per-example gradients ``{name: [c, B, *shape]}`` of the block's parameters ``names``
        (default: all of them)."""
        block, module = self.block, self.block.module
        wanted = set(block.names if names is None else names)
        c, b = self.g.shape[:2]
        out: dict[str, torch.Tensor] = {}
        if self.is_unused:
            for name in block.names:
                if name in wanted:
                    out[name] = self.g.new_zeros((c, b, *block.parameter(name).shape))
            return out
        if self.kind == "embedding":
            if block.weight in wanted:
                weight = module.weight
                grad = self.g.new_zeros((c, b, weight.shape[0], weight.shape[1]))
                index = self.a[None, :, :, None].expand(c, -1, -1, weight.shape[1])
                out[block.weight] = grad.scatter_add_(2, index, self.g)
            return out
        if self.kind == "outer":
            if block.weight is not None and block.weight in wanted:
                out[block.weight] = torch.einsum("cbto,bti->cboi", self.g, self.weight_activations()).reshape(
                    c, b, *module.weight.shape
                )
            if block.bias is not None and block.bias in wanted:
                out[block.bias] = self.g.sum(dim=2)
            return out
        for name, columns in self._dense_columns():
            if name in wanted:
                out[name] = self.g[:, :, columns].reshape(c, b, *block.parameter(name).shape)
        return out

    def weight_outer(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(a [B, T, I], g [B, T, O])`` with the weight's per-example gradient Σ_t g_t a_tᵀ of the
        first cotangent, when the block keeps it as an outer product; otherwise None."""
        if self.kind != "outer" or self.block.weight is None:
            return None
        return self.weight_activations(), self.g[0]

    def weight_activations(self) -> torch.Tensor:
        """``a [B, T, I]`` without the bias column (outer factors only)."""
        return self.a[..., :-1] if self.block.bias is not None else self.a

    def totals(self) -> dict[str, torch.Tensor]:
        """Σ over the batch of the first cotangent's gradients ``{name: float64 [*shape]}``.

        Weight matrices of outer factors are summed in the model's dtype, like the batched
        gradient they are checked against (the two differ by rounding only)."""
        block, module = self.block, self.block.module
        if self.is_unused:
            return {n: torch.zeros(block.parameter(n).shape, dtype=torch.float64, device=self.g.device) for n in block.names}
        g = self.g[0]  # [B, T, O] or [B, P_block]
        out: dict[str, torch.Tensor] = {}
        if self.kind == "outer":
            if block.weight is not None:
                out[block.weight] = torch.einsum("bto,bti->oi", g, self.weight_activations()).reshape(
                    module.weight.shape
                ).to(torch.float64)
            if block.bias is not None:
                out[block.bias] = g.to(torch.float64).sum(dim=(0, 1)).reshape(module.bias.shape)
            return out
        g = g.to(torch.float64)
        if self.kind == "embedding":
            total = g.new_zeros(module.weight.shape)
            total.index_add_(0, self.a.reshape(-1), g.reshape(-1, g.shape[-1]))
            out[block.weight] = total
            return out
        summed = Factors(block, "dense", None, self.g[:1].sum(dim=1, keepdim=True).to(torch.float64))
        return {name: value[0, 0] for name, value in summed.gradients().items()}

    def _dense_columns(self) -> list[tuple[str, slice]]:
        """(name, columns) of each parameter in a materialized block: weight first, then bias."""
        out, offset = [], 0
        for name in self.block.names:
            numel = self.block.parameter(name).numel()
            out.append((name, slice(offset, offset + numel)))
            offset += numel
        return out

    # -- kernels ----------------------------------------------------------------------------
    def self_kernel(self, reduce: str) -> torch.Tensor:
        """Diagonal k(x, x) of the block: ``[B]`` (trace) or ``[B, c]`` (per output)."""
        f = self
        c, t = f.g.shape[0], f.g.shape[2] if f.kind != "dense" else 1
        if f.kind == "outer" and self_kernel_materializes(t, f.a.shape[2], f.g.shape[3], c):
            f = Factors(f.block, "dense", None, f.as_dense())
        if f.kind == "dense":
            per = (f.g * f.g).sum(dim=2)  # [c, B]
        elif f.kind == "outer" and f.a.shape[1] == 1:
            per = (f.a[:, 0] * f.a[:, 0]).sum(1)[None, :] * (f.g[:, :, 0] ** 2).sum(2)
        else:
            if f.kind == "embedding":
                s = (f.a[:, :, None] == f.a[:, None, :]).to(f.g.dtype)
            else:
                s = torch.einsum("bti,bsi->bts", f.a, f.a)
            per = torch.einsum("bts,cbto,cbso->cb", s, f.g, f.g)
        return per.sum(0) if reduce == "trace" else per.T

    def add_pair_kernel(self, out: torch.Tensor, other: "Factors", reduce: str, budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        """``out += self.pair_kernel(other, reduce, budget)``, in place (one matmul per
        cotangent for materialized blocks, with no temporary kernel); returns nothing."""
        dense = self.kind == "dense" and other.kind == "dense" and not (self.is_unused or other.is_unused)
        if reduce == "trace" and dense:  # (a block one side did not call has no columns: pair_kernel's zeros)
            for k in range(self.g.shape[0]):
                out.addmm_(self.g[k], other.g[k].T)
            return
        out += self.pair_kernel(other, reduce, budget)

    def pair_kernel(self, other: "Factors", reduce: str, budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
        """The block's kernel between these factors and ``other``'s.

        Returns ``[m, n]`` (``reduce="trace"``: Σ over the c shared cotangents) or
        ``[m, n, c1, c2]``. Per pair the cheaper of the factored S ⊙ (g g'ᵀ) form and
        materialized per-example gradients is used (operation counts, and the factored form's
        memory against ``budget``).
        """
        f1, f2 = self, other
        if f1.is_unused or f2.is_unused:  # a module one side's forward did not call: no gradient there
            c1, m, c2, n = f1.g.shape[0], f1.g.shape[1], f2.g.shape[0], f2.g.shape[1]
            shape = (m, n) if reduce == "trace" else (m, n, c1, c2)
            return f1.g.new_zeros(shape)
        if _prefer_dense(f1, f2, budget):
            d1, d2 = f1.as_dense(), f2.as_dense()
            # One matmul per cotangent (pair): an einsum would copy both sides into a [B, c·P] layout.
            if reduce == "trace":
                return sum(d1[k] @ d2[k].T for k in range(d1.shape[0]))
            (c1, m, p), (c2, n) = d1.shape, d2.shape[:2]  # every (k, q) pair in one matmul
            return (d1.reshape(c1 * m, p) @ d2.reshape(c2 * n, p).T).view(c1, m, c2, n).permute(1, 3, 0, 2)
        # Factored: S ⊙ (g g'ᵀ), summed over positions.
        if f1.a.shape[1] == 1 and f2.a.shape[1] == 1 and f1.kind == "outer":
            s = f1.a[:, 0] @ f2.a[:, 0].T  # [m, n]
            g1, g2 = f1.g[:, :, 0], f2.g[:, :, 0]  # [c, m, O], [c', n, O]
            (c1, m, o), (c2, n) = g1.shape, g2.shape[:2]
            if reduce == "trace":  # Σ_c g_c g'_cᵀ as one matmul over (c, O)
                if c1 == 1:
                    return s.mul_(g1[0] @ g2[0].T)
                return s.mul_(g1.transpose(0, 1).reshape(m, c1 * o) @ g2.transpose(0, 1).reshape(n, c2 * o).T)
            gg = (g1.reshape(c1 * m, o) @ g2.reshape(c2 * n, o).T).view(c1, m, c2, n).permute(1, 3, 0, 2)
            return s[:, :, None, None] * gg
        if f1.kind == "embedding":
            s = (f1.a[:, None, :, None] == f2.a[None, :, None, :]).to(f1.g.dtype)
        else:
            s = torch.einsum("bti,esi->bets", f1.a, f2.a)  # [m, n, T, S]
        c1, c2 = f1.g.shape[0], f2.g.shape[0]
        if reduce == "trace":
            out = s.new_zeros(s.shape[:2])
            for k in range(c1):
                out += torch.einsum("bets,bto,eso->be", s, f1.g[k], f2.g[k])
            return out
        return _factored_blocks(s, f1.g, f2.g, budget)


def _factored_blocks(s: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, budget: int) -> torch.Tensor:
    """Every output pair's block of the T² factored form at once: ``[m, n, c1, c2]`` with

        out[b, e, k, q] = Σ_{t,s} S[b, e, t, s] (g1[k, b, t] · g2[q, e, s])

    for ``s [m, n, T, S]``, ``g1 [c1, m, T, O]``, ``g2 [c2, n, S, O]``. First U[b, t, o, e, q] =
    Σ_s S[b, e, t, s] g2[q, e, s, o] (m·n·T·S·c2·O multiply-adds), then one batched matmul over
    the examples b of x1, contracting (t, o) with g1 (m·n·T·O·c1·c2): no Python loop over the
    c1·c2 pairs (measured, 1 thread: one einsum per pair made a tiny DiT's [6, 5, 64, 64] kernel
    take 0.73 s, against 0.03 s this way and 0.09 s for torch.func). U holds m·n·T·O·c2 values,
    and its einsum a permuted copy: the cotangents q go in chunks that keep both within half of
    ``budget`` (at least one cotangent per chunk)."""
    (c1, m, t, o), (c2, n) = g1.shape, g2.shape[:2]
    out = s.new_empty((m, n, c1, c2))
    step = max(1, budget // (4 * g1.element_size() * max(m * n * t * o, 1)))
    left = g1.permute(1, 0, 2, 3).reshape(m, c1, t * o)  # [m, c1, T·O]
    for start in range(0, c2, step):
        part = g2[start : start + step]  # [q, n, S, O]
        u = torch.einsum("bets,qeso->btoeq", s, part).reshape(m, t * o, n * part.shape[0])
        out[:, :, :, start : start + part.shape[0]] = torch.bmm(left, u).view(m, c1, n, -1).permute(0, 2, 1, 3)
    return out


def _prefer_dense(f1: Factors, f2: Factors, budget: int) -> bool:
    """Operation counts of the factored O(T²) form against materializing."""
    if f1.kind != "outer" or f2.kind != "outer":  # a materialized side: materialize the other too
        return "dense" in (f1.kind, f2.kind)
    c, m, t, o = f1.g.shape
    n, s = f2.g.shape[1], f2.g.shape[2]
    return dense_pair_is_cheaper(m, n, t, s, f1.a.shape[2], o, c, f1.g.element_size(), budget)


def dense_pair_is_cheaper(m: int, n: int, t: int, s: int, i: int, o: int, c: int, itemsize: int, budget: int) -> bool:
    """Whether :meth:`Factors.pair_kernel` materializes a pair of outer-form blocks: m and n
    examples with t and s positions, I inputs, O outputs, c cotangents on the first side. The
    factored form costs m·n·t·s·(I + c·O) and holds an [m, n, t, s] product (against
    ``budget``); materializing costs (m·t + n·s)·c·I·O to form and m·n·c·I·O for the matmul."""
    if t == 1 and s == 1:
        return False
    factored = m * n * t * s * (i + c * o)
    dense = (m * t + n * s) * c * i * o + m * n * c * i * o
    too_big = m * n * t * s * itemsize * 2 > budget
    return dense < factored or too_big


# ---------------------------------------------------------------------------------------------
# 3. Capture: one forward with hooks, one output-batched backward.
# ---------------------------------------------------------------------------------------------
def _conv2d_call(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple, tuple, tuple]:
    """A convolution's call as a 2-D one: ``(x [B, C, H, W], kernel, stride, padding, dilation)``.

    Conv1d becomes a Conv2d of height 1; string paddings become numbers ("same" puts the extra
    element on the right, as PyTorch does: such an input is zero-padded here, explicitly)."""
    dims = x.dim() - 2
    kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [(0, 0)] * dims
        else:
            pads = [(dil * (k - 1) // 2, dil * (k - 1) - dil * (k - 1) // 2) for k, dil in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in module.padding]
    if any(lo != hi for lo, hi in pads):
        x = F.pad(x, [v for pair in reversed(pads) for v in pair])
        pads = [(0, 0)] * dims
    padding = tuple(lo for lo, _ in pads)
    if dims == 1:
        return x.unsqueeze(2), (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    return x, kernel, stride, padding, dilation


def _unfold(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches of a convolution's input, ``[B, I·k, T]`` (F.unfold's own layout)."""
    x, kernel, stride, padding, dilation = _conv2d_call(module, x)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


# Per-example weight gradients of a convolution: a grouped convolution's weight gradient (the B
# examples as B groups: no unfolded copy of the input) or unfolded patches and one batched matmul.
# Both are exact; which is faster depends on the backend (measured on 2 CPU cores: see
# _conv_weight_by_groups).
def _conv_weight_by_groups(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_t g_t a_tᵀ of every example by one grouped convolution backward: ``g [B, O, *spatial]``
    -> ``[B, O·I·k]``."""
    x, kernel, stride, padding, dilation = _conv2d_call(module, x)
    b, ch = x.shape[:2]
    g = g.unsqueeze(2) if g.dim() == 3 else g  # Conv1d: height 1
    o = g.shape[1]
    weight = x.new_empty(()).expand(b * o, ch, *kernel)
    grad = torch.ops.aten.convolution_backward(
        g.reshape(1, b * o, *g.shape[2:]), x.reshape(1, b * ch, *x.shape[2:]), weight, None,
        list(stride), list(padding), list(dilation), False, [0, 0], b, [False, True, False],
    )[1]
    return grad.reshape(b, -1)


def _conv_weight_by_unfold(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The same from unfolded patches: ``g [B, O, *spatial]`` -> ``[B, O·I·k]``."""
    a = _unfold(module, x)  # [B, I·k, T]
    return torch.bmm(g.reshape(g.shape[0], g.shape[1], -1), a.transpose(1, 2)).reshape(g.shape[0], -1)


def _dense_from_calls(block: Block, calls: list[tuple[torch.Tensor, torch.Tensor]], outer: bool = False) -> torch.Tensor:
    """Per-example gradients ``[c, B, P_block]`` (weight columns, then bias) of a linear or
    convolutional block, materialized from its calls' raw activations and output gradients
    (Linear: ``a [B, T, I]``, ``g [c, B, T, O]``; Conv: the input, ``g [c, B, O, *spatial]``;
    ``outer``: the outer form's ``a [B, T, I]`` with its bias column, which
    :meth:`Factors.parameter_scaled` may have scaled)."""
    module = block.module
    linear = outer or block.kind == "linear"
    weight = bias = None
    for x, g in calls:
        c, b = g.shape[:2]
        column = None
        if outer and block.bias is not None:
            x, column = x[..., :-1], x[..., -1]
        if block.weight is not None:
            if not linear:
                w = _conv_weight(module, x, g)
            elif c == 1:
                w = torch.bmm(g[0].transpose(1, 2), x).reshape(1, b, -1)
            else:
                w = torch.einsum("cbto,bti->cboi", g, x).reshape(c, b, -1)
            weight = w if weight is None else weight + w
        if block.bias is not None:
            if column is not None:
                s = torch.einsum("cbto,bt->cbo", g, column)
            else:
                s = g.sum(dim=2) if linear else g.reshape(c, b, g.shape[2], -1).sum(dim=3)
            bias = s if bias is None else bias + s
    parts = [p for p in (weight, bias) if p is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _conv_weight(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients ``[c, B, O·I·k]`` of one call for c cotangents ``g [c, B, O,
    *spatial]``, all in one pass: the c cotangents side by side as c·O output channels of each
    example, so the input is read once, not once per cotangent (a tiny UNet2DModel's kernel at
    d = 256 outputs: 6.5 s with one pass per cotangent, 4.3 s). A 1x1 convolution with stride 1 and
    no padding is a Linear over positions (one batched matmul, nothing unfolded); any other, a
    grouped convolution backward (measured on 2 CPU cores against unfold + bmm on the layers of a
    small UNet2DModel: 0.09 s against 0.26 s per 64 examples, 1.2-6x per layer)."""
    c, b, o = g.shape[:3]
    stacked = g.transpose(0, 1).reshape(b, c * o, *g.shape[3:])
    unpadded = isinstance(module.padding, str) or all(p == 0 for p in module.padding)  # a 1-wide "same" pads nothing
    if unpadded and all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride):
        w = torch.bmm(stacked.reshape(b, c * o, -1), x.reshape(b, x.shape[1], -1).transpose(1, 2))
    else:
        w = _conv_weight_by_groups(module, x, stacked)
    return w.reshape(b, c, -1).transpose(0, 1)


def _check_form(form: str) -> None:
    if form not in FACTOR_FORMS:
        raise ValueError(f"form must be one of {FACTOR_FORMS}, got {form!r}")


def _dense_is_cheaper(t: int, i: int, o: int, c: int) -> bool:
    """Whether a pair costs less materialized (c·I·O) than in the T² factored form (T²·(I + c·O))."""
    return t > 1 and t * t * (i + c * o) > c * i * o


def self_kernel_materializes(t: int, i: int, o: int, c: int) -> bool:
    """Whether :meth:`Factors.self_kernel` materializes an outer-form block: with many positions,
    forming Σ_t g_t a_tᵀ (T·c·I·O per example) beats the T² form (T²·(I + c·O))."""
    return t > 1 and t * (i + c * o) > c * i * o


def lean_materializes(t: int, i: int, o: int, c: int) -> bool:
    """Whether ``form="lean"`` materializes a block of T positions, I inputs, O outputs and c
    cotangents: its pairs cost less materialized, and per example the c·I·O materialized values
    are no more than the outer form's T·(I + c·O)."""
    return _dense_is_cheaper(t, i, o, c) and c * i * o <= t * (i + c * o)


def _activation(block: Block, inputs: tuple, batch: int) -> torch.Tensor:
    """Per-example activation of one call, as the hook records it: ``[B, T, I]`` (Linear), the
    input itself (Conv: unfolded or differentiated after the backward; norms: normalized after
    it), or indices."""
    if not inputs:
        raise Unfactorable(block.name, "it is called with its input as a keyword argument, which hooks do not see")
    x = inputs[0]
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
        raise Unfactorable(block.name, "its input does not keep the batch on dimension 0")
    x = x.detach()
    if block.kind == "linear":
        return x.reshape(batch, -1, x.shape[-1])
    if block.kind == "conv":
        return x
    if block.kind == "embedding":
        return x.reshape(batch, -1).clone()
    return x  # norm: the input, normalized after the backward (_normalized_input: one block at a time)


def _normalized_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ of a norm block's recorded input (the input is kept alive by the graph anyway: the
    norm's backward saves it)."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


def _outer_activation(block: Block, x: torch.Tensor) -> torch.Tensor:
    """``a [B, T, I]`` of the outer form from a recorded activation, with a trailing column of
    ones when the block has a bias."""
    a = _unfold(block.module, x).transpose(1, 2) if block.kind == "conv" else x
    if block.weight is None:
        a = a.new_zeros((*a.shape[:2], 0))
    if block.bias is not None:
        a = torch.cat([a, a.new_ones((*a.shape[:2], 1))], dim=2)
    return a


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)``, without a copy for one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _block_factors(block: Block, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int, form: str = "outer") -> Factors:
    """Combine the calls of one block (a module used several times adds positions), in ``form``
    (:data:`FACTOR_FORMS`); a materialized block is formed straight from the recorded layouts."""
    module = block.module
    if block.kind in ("linear", "conv"):
        c = calls[0][1].shape[0]
        if block.kind == "linear":
            calls = [(x, g.reshape(c, batch, -1, g.shape[-1])) for x, g in calls]
        if form != "outer":
            t = sum(g.shape[2] if block.kind == "linear" else g[0, 0, 0].numel() for _, g in calls)
            i = (0 if block.weight is None else module.weight[0].numel()) + (block.bias is not None)
            o = module.weight.shape[0]
            # "compact": wherever cheaper; "lean": also no larger than the outer factors.
            materialize = lean_materializes(t, i, o, c) if form == "lean" else _dense_is_cheaper(t, i, o, c)
            if materialize:
                return Factors(block, "dense", None, _dense_from_calls(block, calls))
        acts, grads = [], []
        for x, g in calls:
            if block.kind == "conv":
                g = g.reshape(c, batch, g.shape[2], -1).transpose(2, 3)  # [c, B, T, O]
            acts.append(_outer_activation(block, x))
            grads.append(g)
        return Factors(block, "outer", _joined(acts, 1), _joined(grads, 2))
    if block.kind == "embedding":
        acts, grads = [], []
        for a, g in calls:
            g = g.reshape(g.shape[0], batch, -1, g.shape[-1])
            if module.padding_idx is not None:
                g = g * (a != module.padding_idx).unsqueeze(-1).to(g.dtype)
            acts.append(a)
            grads.append(g)
        return Factors(block, "embedding", _joined(acts, 1), _joined(grads, 2))
    # norms: per-example gradients of weight and bias, summed over calls
    total = None
    for x, g in calls:
        xhat = _normalized_input(module, x)
        c = g.shape[0]
        if isinstance(module, nn.GroupNorm):
            dims = tuple(range(3, g.dim()))
            parts = []
            if block.weight is not None:
                parts.append((g * xhat).sum(dim=dims) if dims else g * xhat)
            if block.bias is not None:
                parts.append(g.sum(dim=dims) if dims else g)
        else:
            nd = len(module.normalized_shape)
            dims = tuple(range(2, g.dim() - nd))
            parts = []
            if block.weight is not None:
                parts.append(((g * xhat).sum(dim=dims) if dims else g * xhat).reshape(c, batch, -1))
            if block.bias is not None:
                parts.append((g.sum(dim=dims) if dims else g).reshape(c, batch, -1))
        dense = torch.cat([p.reshape(c, batch, -1) for p in parts], dim=2)
        total = dense if total is None else total + dense
    return Factors(block, "dense", None, total)


def _recorded_forward(
    model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...]
) -> tuple[dict[int, list], torch.Tensor, torch.Tensor]:
    """The forward pass of :func:`capture`: ``(records, raw output, flat output [B, d])`` with
    ``records[i]`` one ``(activation, gradient edge, (shape, dtype, device))`` per call of block i.

    The gradient edge of a block's output is recorded in the hook: an in-place operation after
    the module (``ReLU(inplace=True)``, ``h += r``) moves the tensor's own edge, not the
    recorded one, so no output is copied."""
    batch = batch_size(inputs)
    records: dict[int, list] = {i: [] for i in range(len(plan.blocks))}
    handles = []

    def make_hook(index: int, block: Block):
        def hook(module, args, output):
            records[index].append(_record_call(block, args, output, batch))

        return hook

    try:
        for index, block in enumerate(plan.blocks):
            handles.append(block.module.register_forward_hook(make_hook(index, block)))
        # Reverse mode only: every attention backend may run (analysis_mode keeps the math one,
        # which forward-mode AD needs); on CPU the fused one is 2x faster forward and backward.
        with torch.enable_grad(), _any_attention():
            raw = output_tensor(model(*inputs))
            out = flat_output(raw, batch)
    finally:
        for handle in handles:
            handle.remove()
    return records, raw, out


def _record_call(block: Block, args: tuple, output, batch: int) -> tuple:
    """One call's record ``(activation, gradient edge of the output, (shape, dtype, device))``;
    raises Unfactorable when the call does not keep the batch on dimension 0."""
    a = _activation(block, args, batch)
    if not isinstance(output, torch.Tensor) or output.shape[0] != batch:
        raise Unfactorable(block.name, "its output does not keep the batch on dimension 0")
    if not output.requires_grad:
        raise Unfactorable(block.name, "it is called without a graph (under torch.no_grad)")
    return a, get_gradient_edge(output), (output.shape, output.dtype, output.device)


class TrainingCapture:
    """Factors of the training step's own forward and backward: the second capture pass that
    per-example routes otherwise run, saved.

    Lifecycle: :meth:`start` before the training forward registers a forward hook on every block
    of the plan; :meth:`stop` once the losses exist (``OptimizerStep.compute_gradients`` calls it
    before the backward, so a recomputing checkpoint's forward in the backward is not recorded)
    removes them; the backward then runs as training runs it, and a pre-hook on each recorded
    output's autograd node keeps the gradient flowing into it. :meth:`factors` assembles them.

    Reading never changes training: the forward hooks keep detached inputs, the pre-hooks return
    None, so parameters, gradients and optimizer state are bit for bit those of an untracked step.
    The step's loss is Σ_n c_n ℓ_n, so the output gradients already carry each example's c_n.
    A pass that cannot be read (a block's call that does not keep the batch on dimension 0, or
    has no graph) gives no factors, and the caller runs its own capture pass.
    """

    def __init__(self, plan: Plan | None, batch: int, form: str = "outer"):
        _check_form(form)
        self.plan, self.batch, self.form = plan, batch, form
        self.records: dict[int, list] = {} if plan is None else {i: [] for i in range(len(plan.blocks))}
        self.readable = plan is not None
        self._gradients: dict[tuple[int, int], torch.Tensor | None] = {}  # (block, call) -> ∂loss/∂output
        self._handles: list = []

    def __enter__(self) -> "TrainingCapture":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @classmethod
    def idle(cls) -> "TrainingCapture":
        """A capture that records nothing (routes that take group gradients another way)."""
        return cls(None, 0)

    def start(self) -> None:
        if self.plan is None:
            return
        for index, block in enumerate(self.plan.blocks):
            self._handles.append(block.module.register_forward_hook(self._forward_hook(index, block)))

    def stop(self, losses: torch.Tensor | None = None) -> None:
        """Remove the forward hooks (idempotent); ``losses`` is ignored (the callback's argument)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, index: int, block: Block):
        def hook(module, args, output):
            if not self.readable:
                return
            # Under no_grad (a reentrant checkpoint) the output has no graph to read.
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                self.readable = False
                return
            try:  # whatever happens here, the training forward goes on untouched
                record = _record_call(block, args, output, self.batch)
                edge = record[1]
                slot = (index, len(self.records[index]))
                edge.node.register_prehook(self._gradient_hook(slot, edge.output_nr))
            except Exception:  # Unfactorable, or an output autograd cannot hook
                self.readable = False
                return
            self.records[index].append(record)
            self._gradients[slot] = None  # stays None if the loss does not reach this output

        return hook

    def _gradient_hook(self, slot: tuple[int, int], position: int):
        def prehook(grad_outputs):
            self._gradients[slot] = grad_outputs[position]

        return prehook

    def factors(self) -> list["Factors"] | None:
        """One :class:`Factors` per block, one cotangent (the step's loss, c_n included), in the
        capture's ``form``; or None when nothing readable was recorded.
        Read once: the capture lets go of its records (see :meth:`blocks`)."""
        blocks = self.blocks()
        return None if blocks is None else list(blocks)

    def blocks(self) -> Iterator["Factors"] | None:
        """:meth:`factors` one block at a time, each assembled when asked for, or None. The capture
        hands its records over (a second read gives None), so each block's activations and output
        gradients are freed once the caller is done with that block, not at the end of the step."""
        records, gradients = self.records, self._gradients
        self.records, self._gradients = {}, {}
        if not self.readable:  # idle captures are never readable
            return None
        self.readable = False
        metas = [meta for calls in records.values() for _, _, meta in calls]
        if not metas:
            return None
        grads = [None if g is None else g.detach().unsqueeze(0) for _, g in sorted(gradients.items())]
        _, dtype, device = metas[0]
        like = torch.empty((self.batch, 0), dtype=dtype, device=device)
        return _assembled(self.plan, records, grads, 1, like, self.form)


def _any_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    names = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    return sdpa_kernel([getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)])


def _assemble(plan: Plan, records: dict[int, list], grads: list, cotangents: int, out: torch.Tensor,
              form: str = "outer") -> list[Factors]:
    """One :class:`Factors` per block from the recorded calls and their output gradients
    (``grads``: ``[c, *z.shape]`` or None per call, in the order of ``records``)."""
    return list(_assembled(plan, records, grads, cotangents, out, form))


def _assembled(plan: Plan, records: dict[int, list], grads: list, cotangents: int, out: torch.Tensor,
               form: str, tolerant: bool = False) -> Iterator[Factors]:
    """:func:`_assemble` one block at a time (a caller that reduces each block at once holds one).
    Consumes ``records`` and ``grads`` (emptied once the calls are sorted by block). ``tolerant``
    (the covering check): a block whose recorded calls do not fit its layout (a user's forward hook
    that returns another shape than the module's output, which is what the hooks see) gives its
    name instead of factors, for the check to move it to the fallback rather than fail."""
    batch = out.shape[0]
    calls: dict[int, list] = {i: [] for i in range(len(plan.blocks))}
    position = 0
    for i in range(len(plan.blocks)):
        for a, _, (shape, dtype, device) in records[i]:
            g = grads[position]
            position += 1
            g = torch.zeros((cotangents, *shape), dtype=dtype, device=device) if g is None else g.detach()
            calls[i].append((a, g))
    records.clear()  # the calls hold what is left: each block's is dropped once it is assembled
    grads.clear()
    for i, block in enumerate(plan.blocks):
        if not calls[i]:  # the module was not called: its gradients are zero
            yield Factors.unused(block, cotangents, batch, out)
            continue
        if not tolerant:
            yield _block_factors(block, calls.pop(i), batch, form)
            continue
        try:
            factors = _block_factors(block, calls.pop(i), batch, form)
        except RuntimeError:
            factors = block.name
        yield factors


class BatchDependent(ValueError):
    """A batch's forward gives one of its rows another output than that example alone: the
    model's function depends on the batch (its size or its other rows) in a way the covering
    check, run on a sample of at most :data:`COVERAGE_SAMPLE` examples, did not see."""


# (model -> batch sizes checked, per covering key): a forward that depends on the batch's size does so
# structurally, so each size is checked once per structure and kind of input
_ALONE_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def check_rows_alone(model: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    """Raise :class:`BatchDependent` unless the first and last rows of ``out`` (a batch's flat output
    ``[B, d]``) equal the outputs of those examples alone, up to :data:`COVERAGE_RTOL` of their norms (of the
    least precise dtype among the output's, the parameters' and the inputs').

    The covering check compares per-example gradients on a sample of at most three examples, alone
    and together; a forward that mixes or reorders the rows only of larger batches (a centring, a
    flip or a grouping applied from some batch size on) passes it, and the factors of a chunk of
    another size then give each example another function's gradient (measured: kernels 11-31 % of
    their scale off, with no error). Checked once per batch size, structure and kind of input."""
    batch = out.shape[0]
    if batch <= 1:
        return
    key = (_covering_key(model, inputs, frozenset()), batch)
    seen = _ALONE_CHECKED.get(model)
    if seen is not None and key in seen:
        return
    # the least precise of the output's, the parameters' and the inputs' dtypes sets the rounding (a float32
    # first layer of a float64 model rounds its outputs at float32's precision)
    dtypes = {out.dtype} | {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtypes |= {t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()}
    rtol = max(COVERAGE_RTOL.get(dtype, 1e-3) for dtype in dtypes)
    for row in sorted({0, batch - 1}):
        with torch.enable_grad(), _any_attention():  # as the capture's forward: no inference fast paths
            alone = flat_output(model(*(t[row : row + 1] for t in inputs)), 1)[0].detach()
        want = out[row].detach()
        if alone.shape != want.shape or bool((alone.isnan() ^ want.isnan()).any()):
            raise BatchDependent(_batch_dependent_message(model, batch, row))
        both = alone.isnan()
        # in a common scale (formed directly, norms of outputs past about 1.3e154 overflowed: inf > rtol * 2inf is
        # false, and any difference passed; below 1.5e-154 they underflowed to 0); the absolute floor read in it
        (a, b), scale = scaled_alike(alone.masked_fill(both, 0), want.masked_fill(both, 0))
        if float((a - b).norm()) > rtol * (float(a.norm()) + float(b.norm())) + torch.finfo(torch.float64).tiny / scale:
            raise BatchDependent(_batch_dependent_message(model, batch, row))
    if seen is None:
        seen = _ALONE_CHECKED[model] = set()
    if len(seen) >= 64:
        seen.clear()
    seen.add(key)


def rows_alone_known(model: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int) -> bool:
    """Whether :func:`check_rows_alone` has passed ``model`` on inputs like ``inputs`` in a batch of ``batch`` (it
    is remembered then, and a caller may skip the batch's forward too)."""
    seen = _ALONE_CHECKED.get(model)
    return batch <= 1 or (seen is not None and (_covering_key(model, inputs, frozenset()), batch) in seen)


def _batch_dependent_message(model: nn.Module, batch: int, row: int) -> str:
    return (f"{type(model).__name__}'s forward on a batch of {batch} gives row {row} another output than that example "
            "alone: the model depends on the batch (its size or its other rows), so the factored engine's per-example "
            "factors are not each example's own gradient. engine='functional' computes every example alone.")


def capture(
    model: nn.Module,
    plan: Plan,
    inputs: tuple[torch.Tensor, ...],
    cotangents: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    parameters: dict[str, torch.Tensor] | None = None,
    form: str = "outer",
    alone: bool = False,
) -> tuple[list[Factors], torch.Tensor]:
    """Factors of every block for one batch.

    Args:
        inputs: the batch, B examples on dimension 0.
        cotangents: ``out -> (target, E)`` with ``E [c, *target.shape]``, where ``out`` is the
            model's output tensor in its own shape (what a loss function receives in training):
            the backward computes, for each of the c cotangents, ∂⟨E_k, target⟩/∂z at every
            block output z.
        parameters: trainable parameters to run the model at (:func:`~genkernel.core.adapter.evaluated_at`
            around the forward and the backward; they must require grad); by default the module's own.
        form: one of :data:`FACTOR_FORMS`. The materialized blocks of "compact" and "lean" are
            formed straight from the recorded layouts: per-example convolution gradients by a
            grouped convolution, with no unfolded copy of the input.
        alone: check that the batch's rows are its examples' own outputs (:func:`check_rows_alone`,
            once per batch size; raises :class:`BatchDependent`): what kernels and tangent features,
            defined per example alone, need.

    Returns:
        (one :class:`Factors` per block of ``plan``, the detached model output ``[B, d]``).
    """
    _check_form(form)
    # At other parameters, the forward and the backward run inside one reparametrized block (a
    # checkpointed model recomputes its forward in the backward, and must see the same values).
    with contextlib.nullcontext() if parameters is None else evaluated_at(model, parameters):
        records, raw, out = _recorded_forward(model, plan, inputs)
        if alone:
            check_rows_alone(model, inputs, out)
        edges = [edge for i in range(len(plan.blocks)) for _, edge, _ in records[i]]
        if alone and edges and not raw.requires_grad:
            # Blocks ran but the batch's output has no graph: a forward that detaches by the data (a branch on any
            # row), which would give every row a zero gradient where examples alone may have one (the first example's
            # was checked to have one: kernels.repeatable_output). torch.func takes each example alone, exactly.
            raise BatchDependent(
                f"{type(model).__name__}'s output on a batch of {batch_size(inputs)} has no graph to the parameters "
                "(a forward that detaches by the data), so the factored engine's per-example factors would all be "
                "zero. engine='functional' computes every example alone.")
        with torch.enable_grad():  # callers may run under no_grad: the cotangents' target needs its graph
            target, cot = cotangents(raw)
            grads = _batched_grad(target, edges, cot)
        del target, raw
    return _assemble(plan, records, grads, cot.shape[0], out, form), out.detach()


def capture_by_outputs(
    model: nn.Module,
    plan: Plan,
    inputs: tuple[torch.Tensor, ...],
    output_chunks: list[slice],
    consume: Callable[[slice, list[Factors]], None],
    parameters: dict[str, torch.Tensor] | None = None,
    form: str = "outer",
) -> None:
    """:func:`capture` with :func:`output_cotangents` in chunks of the outputs, from one forward:
    ``consume(outputs, factors)`` once per chunk (its factors over ``outputs.stop - outputs.start``
    cotangents; drop them before returning for the chunk's memory to be freed).

    One capture over all d outputs holds d output gradients of every block (an MNIST-sized UNet's
    256 outputs at 16×16: [256, 4, 64, 16, 16] per activation, 64 MiB each, 1.4 GiB for four
    probes); a chunk holds as many as it has outputs, and the graph is kept between chunks."""
    _check_form(form)
    with contextlib.nullcontext() if parameters is None else evaluated_at(model, parameters):
        records, raw, out = _recorded_forward(model, plan, inputs)
        edges = [edge for i in range(len(plan.blocks)) for _, edge, _ in records[i]]
        detached = out.detach()
        del out
        for k, outputs in enumerate(output_chunks):
            last = k == len(output_chunks) - 1
            with torch.enable_grad():  # callers may run under no_grad: the cotangents' target needs its graph
                target, cot = output_cotangents(list(range(outputs.start, outputs.stop)))(raw)
                grads = _batched_grad(target, edges, cot, keep_graph=not last)
            del target
            # (a copy of the records: _assemble consumes them, and the next chunk reads them again)
            consume(outputs, _assemble(plan, {i: list(calls) for i, calls in records.items()}, grads, cot.shape[0],
                                       detached, form))
            del grads, cot


def _batched_grad(target: torch.Tensor, zs: list, cot: torch.Tensor, keep_graph: bool = False
                  ) -> list[torch.Tensor | None]:
    """∂⟨E_k, target⟩/∂z for every z (a tensor or a gradient edge) and cotangent k:
    ``[c, *z.shape]`` each (None: unused). ``keep_graph``: another backward through the graph follows."""
    if not zs:
        return []
    if not target.requires_grad:  # an output that no parameter reaches (detached for this batch): every z unused
        return [None] * len(zs)
    if cot.shape[0] == 1:
        grads = torch.autograd.grad(target, zs, grad_outputs=cot[0], retain_graph=keep_graph, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        return list(
            torch.autograd.grad(target, zs, grad_outputs=cot, retain_graph=True, allow_unused=True, is_grads_batched=True)
        )
    except RuntimeError:  # an op without a batching rule: one backward per cotangent
        per = [torch.autograd.grad(target, zs, grad_outputs=e, retain_graph=True, allow_unused=True) for e in cot]
        return [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(zs))]


def output_cotangents(outputs: list[int]) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Cotangents selecting model outputs ``outputs``: E_k = e_{outputs[k]} for every example."""
    k, first = len(outputs), (int(outputs[0]) if len(outputs) else 0)
    # outputs a, a + 1, ... (every engine's chunks): a diagonal view of E filled in one op, with no index tensor
    # (an index made on the CPU and moved to a GPU synchronizes the host with the device, every call)
    contiguous = first >= 0 and [int(o) for o in outputs] == list(range(first, first + k))
    columns, on_device = torch.as_tensor(outputs, dtype=torch.long), {}

    def make(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = raw.reshape(raw.shape[0], -1)
        cot = out.new_zeros((k, *out.shape))
        if contiguous and first + k > out.shape[1]:
            # (the diagonal of a slice cut short at the last output is shorter than k: the outputs past it would get
            # a zero cotangent, a zero Jacobian row, where the indexed write raised)
            raise IndexError(f"outputs {first}..{first + k - 1} past the model's {out.shape[1]} outputs")
        if contiguous:
            cot[:, :, first:first + k].diagonal(dim1=0, dim2=2).fill_(1)  # [B, k]: entry (b, i) is E_i[b, first + i]
        else:  # E_k[:, outputs[k]] = 1 in one indexed write, the index moved to the device once
            if cot.device not in on_device:
                on_device[cot.device] = (torch.arange(k, device=cot.device), columns.to(cot.device))
            rows, cols = on_device[cot.device]
            cot[rows, :, cols] = 1
        return out, cot

    return make


def loss_cotangents(loss_fn: Callable, targets) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], dict]:
    """Cotangents of the per-example losses: ``(make, box)``; ``make(out)`` evaluates
    ``loss_fn(out, targets)`` and returns it with a cotangent of ones, and ``box["losses"]``
    then holds the detached per-example losses ``[B]``. A loss of any other size is refused
    (ValueError): a batch-reduced loss would give every example's gradient divided by B (and one
    loss), an unreduced [B, d] one B·d losses."""
    box: dict[str, torch.Tensor] = {}

    def make(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = loss_fn(out, targets)
        batch = out.shape[0] if out.dim() else 1
        if values.numel() != batch:
            raise ValueError(f"loss_fn must return one loss per example (shape [{batch}]; e.g. reduction='none'), "
                             f"got shape {tuple(values.shape)}")
        values = values.reshape(-1)
        box["losses"] = values.detach()
        return values, torch.ones((1, *values.shape), dtype=values.dtype, device=values.device)

    return make, box


__all__ = [
    "Block", "DEFAULT_MEMORY_BUDGET", "Factors", "Plan", "TrainingCapture", "Unfactorable", "capture", "capture_by_outputs",
    "covering_plan",
    "dense_pair_is_cheaper", "lean_materializes", "loss_cotangents", "make_plan", "output_cotangents",
    "pair_covering_plan", "same_kind", "self_kernel_materializes",
]
