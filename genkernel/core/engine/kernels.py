"""Gradient kernels and tangent features, functional: (model, inputs) -> tensor.

The gradient kernel of a model f(x; θ) with d outputs is K(x, x') = J(x) J(x')ᵀ (d×d), with
J = ∂f/∂θ over the trainable parameters. ``gradient_kernel`` returns its trace (``[M, N]``)
or the full blocks (``[M, N, d, d]``); ``tangent_features`` returns φ(x) = J(x) itself.

Two engines compute them: the torch.func reference (per-example Jacobians, ``functional_call``
+ ``vmap`` + ``jacrev``, :mod:`genkernel.core.engine.reference`), evaluated in row chunks sized
by ``memory_budget`` so that an M×N kernel never holds the M×d×P and N×d×P Jacobians at once,
and the factored engine (:mod:`genkernel.core.engine.factored`). :func:`kernel_plan` says which
one a call uses and how it chunks the rows. Every pass runs in :func:`analysis_mode`, so
computing a kernel never disturbs training.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from ..adapter import (
    Batch,
    as_tuple,
    batch_size,
    check_finite,
    check_memory_budget,
    check_per_example_safe,
    checked_forward,
    drew_between,
    flat_output,
    full_precision,
    functional_model,
    generator_states,
    outside_inference_mode,
    positive_int,
    preserved_buffers,
    restore_buffers,
    restored_module_generators,
    trainable_parameters,
    unwrap,
)
from ..param_bytes import joined_dtype, parameter_bytes, value_bytes
from .factored import _probe_sizes, _Sizes, chunk_sizes, chunks, factored_gradient_kernel, factored_jacobian
from .factors import (DEFAULT_MEMORY_BUDGET, BatchDependent, Plan, _any_attention, analysis, check_rows_alone,
                      covering_plan, make_plan, pair_covering_plan, rows_alone_known, same_kind)
from .reference import finite_peak, jacobian_pair_kernel, jacobian_self_kernel, per_example_jacobian, scaled_alike

ENGINES = ("auto", "factored", "functional")
REDUCTIONS = ("trace", "none")
AUTO_FACTORED_MAX_OUTPUTS = 64


@dataclass(frozen=True)
class KernelPlan:
    """What :func:`gradient_kernel` does for a model and inputs: decided, as the call decides it, before any kernel
    is formed.

    Attributes:
        engine: "factored" or "functional", the engine the call starts with. A "factored" call falls back to
            torch.func (the functional engine's passes and chunks, after the factored ones) where the kernel it forms
            cannot be returned: not finite (products of factors that overflow), or, normalizing, a k(x, x) that
            underflowed at the batch's one scale (a batch whose Jacobians span more than about 1e19 in float32; a
            trace kernel's k(x, x) of 0 whose example's gradient, read alone, is 0 is kept: :func:`_zero_by_right`);
            :func:`gradient_kernel` then warns (RuntimeWarning) that it did.
        outputs: d, outputs per example.
        rows: examples per chunk of work (functional: Jacobian rows held at once; factored: rows
            per capture, when one side's factors do not fit in half the budget and are recomputed
            per pair of chunks).
        cotangents: outputs per backward pass (factored; d for functional).
        factored_fraction: share of the trainable parameters read from layer factors (0 for functional).
    """

    engine: str
    outputs: int
    rows: int
    cotangents: int
    factored_fraction: float


class Chunking(NamedTuple):
    """How each engine splits an M×N kernel (what :func:`choose_engine` counts passes from):
    ``functional_rows``, torch.func's rows of Jacobians per chunk; ``rows`` and ``cotangents``,
    the factored engine's rows per capture and outputs per backward
    (:func:`~genkernel.core.engine.factored.chunk_sizes`); ``held``: whether one side's factors
    are held (every example captured once, else captured again for every pair of row chunks);
    ``symmetric``: x1 against itself."""

    functional_rows: int
    rows: int
    cotangents: int
    held: bool
    symmetric: bool


def example_passes(m: int, n: int, rows: int, symmetric: bool, held: bool, engine: str) -> int:
    """Per-example passes (a forward and a backward) an M×N kernel runs in row chunks of ``rows``.

    torch.func computes x1's Jacobians once per chunk and x2's again for every chunk of x1 (against
    itself, the chunk on the diagonal is reused): ⌈M/rows⌉·N, plus M for x2 ≠ x1. The factored engine
    with a held side captures each example once (M, or M + N); otherwise each pair of row chunks is
    captured together: ⌈M/rows⌉·M against itself, ⌈M/rows⌉·N + ⌈N/rows⌉·M."""
    cm, cn = -(-m // max(rows, 1)), -(-n // max(rows, 1))
    if engine == "functional":
        return cm * n if symmetric else m + cm * n
    if held:
        return m if symmetric else m + n
    return cm * m if symmetric else cm * n + cn * m


def choose_engine(plan: Plan, d: int, engine: str = "auto", *, rows: tuple[int, int] | None = None,
                  sizes: _Sizes | None = None, chunking: Chunking | None = None) -> str:
    """The engine a call runs: ``engine`` unless "auto", which decides by operation counts.

    "auto" picks "functional" when no module is factored, else the engine with fewer counted
    multiply-adds (ties: "factored"), from ``sizes`` (one example's counts,
    :func:`~genkernel.core.engine.factored._probe_sizes`: F, the factored blocks' forward, Σ T·I·O;
    F_mat, that of the blocks whose per-example gradients materialize at d cotangents; a pair of
    examples' kernel over the blocks, T²·(I + d·O) kept factored, d·I·O materialized), ``rows`` =
    (M, N) (default 1, 1) and ``chunking`` (default: each side in one chunk of d cotangents,
    x1 against another batch: M + N passes on both sides):

    - torch.func, per pass (:func:`example_passes`): one forward and a backward with d cotangents
      that forms the activations' and every weight's gradients, (1 + 2d)·F; per pair d·P.
    - factored, per pass: ⌈d/c⌉ forwards and backwards of c cotangents that form the activations'
      gradients, then the materialized blocks' per-example gradients (one grouped convolution of
      all d cotangents for a convolution): ⌈d/c⌉·F + d·(F + F_mat); per pair the blocks' count.
      Parameters left to torch.func (``plan.fallback``: modules the engine does not support or
      whose parameters are also read outside their forward) add torch.func's pass, (1 + 2d)·F,
      and d·P_fb per pair.

    With as many passes on both sides the factored count is never the larger without a fallback
    (F_mat ≤ F, and a block stays factored only where that costs less than materialized), so what
    decides is a fallback's extra pass against the pairs it saves, and passes: the memory budget
    splits large d into chunks of outputs and rows that the factored engine captures again per
    pair of chunks, while torch.func recomputes Jacobians per chunk of x1 (rows of d·P each).

    Measured (1 thread, 2 busy cores, float32, default budget, x1 against itself, M = 4-16,
    reduce "trace"; torch.func time / factored time, counted ratio in brackets): an MLP at
    d = 256-768, 30-310x (5.6-11x); 16x16 per-pixel conv nets of 16 and 32 channels (d = 256),
    equal passes: 1.0-1.6x (1.0x, factored); where the factored engine recaptures per pair of row
    chunks (32 channels at M = 8-16; a 28x28 net, d = 784, at M = 4-16): 0.58-0.99x (0.33-0.67x,
    torch.func); tiny UNet2DModels: 8/16 channels on 16x16 (d = 256) at M = 4, 2 rows per chunk
    on both sides, 0.90-0.96x (0.99x, torch.func), at M = 8, torch.func 2 rows and factored 5,
    2.1x (1.96x, factored; the rule before took torch.func); 8/16 on 12x12 (d = 144), 1.14x at
    M = 8 (0.99x, torch.func) and 1.75x at M = 16 (1.31x, factored); 16/32 on 12x12 at M = 4,
    torch.func 1 row, factored 2: 1.9x (1.97x, factored); a tiny DiTTransformer2DModel (2
    layers, 16x16, d = 256), 1.3x and 1.8x at M = 4 and 8 (1.08x, factored) and 1.13x at M = 16
    (0.83x: torch.func, where the rule before, by its kept share 0.66, took the factored engine).
    The count leans to torch.func: measured, the factored engine's passes cost it 1.0-2.2x less
    than counted against torch.func's, so near a tie (within about 20%) either may be faster, by
    up to 1.5x (a 4x4 conv net of 16 channels, d = 128, 32 MiB budget: counted 0.996x, measured
    1.46x). Reduce "none" (which the count does not tell apart) at M = 4: per-pixel 32 channels
    1.25x, DiT 2.2x, MLP 19x (factored); UNet 8/16 on 12x12 0.64x, the 28x28 net 0.69x
    (torch.func). Up to ``AUTO_FACTORED_MAX_OUTPUTS`` outputs, "auto" without a fallback takes
    "factored" without counting (no probe; measured faster on the kernel benchmark's models and
    the UNet above at d = 64, 1.3x); without ``sizes`` (nothing to count), "functional" above it.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    if not plan.blocks:
        return "functional"
    if sizes is None:  # no counts: the fixed cut-off
        return "functional" if d > AUTO_FACTORED_MAX_OUTPUTS else "factored"
    m, n = (1, 1) if rows is None else rows
    if chunking is None:
        chunking = Chunking(max(m, n), max(m, n), d, True, False)
    forward, materialized, pair = sizes.engine_counts(plan, d)
    total = sum(p.numel() for p in plan.params.values())
    fallback = sum(p.numel() for p in plan.fallback.values())
    torch_func_pass = (1 + 2 * d) * forward
    passes_f = example_passes(m, n, chunking.functional_rows, chunking.symmetric, False, "functional")
    passes_x = example_passes(m, n, chunking.rows, chunking.symmetric, chunking.held, "factored")
    out_chunks = -(-d // max(chunking.cotangents, 1))
    functional = passes_f * torch_func_pass + m * n * d * total
    factored = (passes_x * (out_chunks * forward + d * (forward + materialized)) + m * n * pair
                + (passes_x * torch_func_pass + m * n * d * fallback if fallback else 0))
    return "factored" if factored <= functional else "functional"


def in_full_precision(function: Callable) -> Callable:
    """``function(model, ...)`` run under :func:`full_precision` of the module inside ``model``'s
    wrappers (:func:`~genkernel.core.adapter.unwrap`)."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        model = args[0] if args else kwargs.get("model")
        with full_precision(unwrap(model) if isinstance(model, nn.Module) else None):
            return function(*args, **kwargs)

    return run


REPEAT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # else 1e-2 (half precision)


# Models inside repeat_checked_once: {model: {(example, parameters' versions): output}}.
_CHECKED_ONCE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def repeat_checked_once(model: nn.Module) -> Iterator[None]:
    """Within: :func:`repeatable_output`'s three passes on ``model`` run once per example (its tensors' storage,
    shape, strides, dtype and version) and state of the trained parameters (their versions), not at every engine
    call, for a caller that calls the engine on one model and inputs several times with only a linear read-out
    of the output changed between calls: :func:`~genkernel.diffusion.kernels.state_kernel`'s output directions
    (a buffer its wrapper multiplies the output by, which neither makes a pass random, nor writes a buffer, nor
    detaches the output). Its sketch's V directions each ran the check again: about half of an analyzer's kernel
    record on the examples' small UNets. A parameter or input changed in place (an optimizer step) is checked
    again; leaving the block forgets every verdict."""
    model = unwrap(model)
    outer = model in _CHECKED_ONCE
    if not outer:
        _CHECKED_ONCE[model] = {}
    try:
        yield
    finally:
        if not outer:
            _CHECKED_ONCE.pop(model, None)


def _example_key(one: tuple[Any, ...], params: dict[str, torch.Tensor]) -> tuple:
    """What :func:`repeat_checked_once` keeps a verdict under: the example's tensors as they are now (storage,
    shape, strides, dtype, device, version: a view of an input changed in place is another example) and the
    trained parameters' identities and versions."""
    tensors = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)
                    if isinstance(t, torch.Tensor) else ("object", id(t)) for t in one)
    return tensors, tuple((key, id(p), p._version) for key, p in params.items())


def repeatable_output(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
                      name: str) -> torch.Tensor:
    """The model's output ``[1, d]`` on one example, checked to be repeatable: two forward and
    backward passes (in analysis mode: one forked random stream) must give the same output and
    the same gradient of a fixed random combination of the outputs with respect to ``params``,
    up to rounding (:data:`REPEAT_RTOL` of their norms; NaN where both are NaN). Raises
    ValueError otherwise, and for an output that no trainable parameter reaches (a detached
    output, a forward under ``torch.no_grad()``: every engine's kernel would be all zeros).

    Randomness that eval mode does not switch off (a generator's noise injection, ``F.dropout``
    called with its default ``training=True``) draws other values in every pass, so each
    example's Jacobian would be taken at its own noise and the kernel would mix them, silently
    (measured: two calls on the same inputs differed by up to 6.4, and StyleGAN-style noise
    injection by 0.74 on entries up to 9.7). The gradients show it where the output does not: StyleGAN's noise injection starts with a zero
    weight, so its output is repeatable at initialization while its Jacobian (the noise) is not.
    The tolerance lets through the last bits of a GPU's atomic additions (scatter, index_add). A
    pass that draws from torch's generators is refused too, whatever the draws give: a random flip
    of the whole batch gives the same output twice half of the time; a generator a module keeps of its
    own is watched and put back as well.

    Inside :func:`repeat_checked_once` the verdict on one example is kept (a refusal never is)."""
    return _repeatable(model, one, params, name)[0]


def _repeatable(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
                name: str, index: int = 0) -> tuple[torch.Tensor, float]:
    """:func:`repeatable_output`'s output and the largest finite magnitude of its checked gradient (of a random
    combination of the outputs: the size of the example's Jacobian, within a small factor). ``index``: which example
    of ``name`` ``one`` is, for the refusals' messages."""
    memo = _CHECKED_ONCE.get(model)
    if memo is None:
        return _checked_output(model, one, params, name, index)
    key = _example_key(one, params)  # (the name is the message's: kernel_plan's "x" is gradient_kernel's "x1")
    if key not in memo:
        memo[key] = _checked_output(model, one, params, name, index)
    return memo[key]


def _example_words(name: str, index: int) -> str:
    """How the refusals name example ``index`` of ``name``: "the first example of x1", or, for one that
    :func:`first_reaching` checked because the examples before it reach no parameter, "example 3 of x1 (the first
    whose output a trainable parameter reaches)"."""
    if index == 0:
        return f"the first example of {name}"
    return f"example {index} of {name} (0-based; the first whose output a trainable parameter reaches)"


def _checked_output(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
                    name: str, index: int = 0) -> tuple[torch.Tensor, float]:
    """:func:`repeatable_output`'s passes, run: (the output, the gradient's largest finite magnitude). ``index``: which
    example of ``name`` ``one`` is (the messages name it)."""
    # the draw is the second pass's (a forward that reseeds before drawing ends both passes in one state)
    # every buffer slot by its name, with the tensor it holds and one copy of it: what the first pass is compared
    # with, and what is put back where the forward is refused
    slots = [(f"{path}.{name}" if path else name, module, name, b) for path, module in model.named_modules()
             for name, b in module._buffers.items() if b is not None]
    before = {key: (b, b.detach().clone()) for key, _, _, b in slots}
    with analysis(model), restored_module_generators(model) as own:
        # The first pass runs as any forward: a cache it binds anew for these inputs' shape (a positional table grown
        # to their length, transformers' dynamic RoPE inv_freq beside the attribute that records its length) stays,
        # consistent with the module's attributes. (Written to copies and put back, it was refused, and the attribute
        # kept a length its restored buffer no longer had: the model's later outputs moved.)
        out1, grad1, reached = _one_pass(model, one, params, name)
        now = dict(model.named_buffers())
        in_place = [key for key, b in now.items() if key in before and b is before[key][0]
                    and not _same(b, before[key][1])]
        rebound = [key for key, b in now.items() if key not in before or (b is not before[key][0]
                                                                        and not _same(b, before[key][1]))]
        again = []
        if rebound and not in_place:
            # a cache is bound once; a counter or a statistic kept by rebinding writes again on a pass over another
            # example of the same shape (the floating inputs scaled by 3/2, to copies)
            filled = {key: b.detach().clone() for key, b in now.items()}
            with preserved_buffers(model):
                _one_pass(model, tuple(t * 1.5 if t.is_floating_point() else t for t in one), params, name)
                again = [key for key, b in model.named_buffers() if key not in filled or not _same(b, filled[key])]
        if in_place or again:
            restore_buffers([(module, name, before[key][1]) for key, module, name, _ in slots])
            raise ValueError(
                f"{type(model).__name__}'s eval-mode forward writes its buffers {(in_place or again)[:5]} (a call "
                "counter, a quantization observer, a data-dependent initialization), so every analysis pass would "
                "change the model and the kernel's rows would come from different models. Stop the writes for the "
                "analysis (observers: model.apply(torch.ao.quantization.disable_observer)), or write them only when "
                "self.training"
            )
        with preserved_buffers(model):
            between = generator_states(one, own)
            out2, grad2, _ = _one_pass(model, one, params, name)
            drew = drew_between(between, generator_states(one, own))
        if not drew and _close(out1, out2) and _close(grad1, grad2):
            with preserved_buffers(model):
                substituted = _substituted_pass(model, one, params, out1)
            if substituted is not None and not _close(grad1, substituted):
                raise ValueError(
                    f"{type(model).__name__}'s forward reads a trainable parameter through a reference that torch.func "
                    "cannot substitute (a parameter kept in a plain list, tuple or dict, or captured by a closure or "
                    "functools.partial, rather than read as a module attribute): the per-example passes, which put "
                    "their own values in the modules' attributes, would miss that read and give a wrong kernel. Read "
                    "the parameter through its module (self.emb.weight) at every call"
                )
    if drew or not (_close(out1, out2) and _close(grad1, grad2)):
        what = "draw random numbers" if drew else "give other outputs or gradients"
        raise ValueError(
            f"{type(model).__name__} is not deterministic in eval mode: two passes on {_example_words(name, index)} "
            f"{what} (noise injection, F.dropout called with training=True, a random augmentation, or other "
            "randomness that eval mode does not switch off), so its gradient kernel and tangent features are "
            "undefined. Remove the randomness from eval mode (pass the noise as an input, or call F.dropout with "
            "training=self.training)"
        )
    if not reached:
        # (first_reaching looks at the other examples before this becomes the caller's refusal)
        raise Unreached(_unreached_message(model, _example_words(name, index), len(params)))
    return out1, finite_peak(grad1)


class Unreached(ValueError):
    """:func:`repeatable_output`'s refusal of an example whose output no trainable parameter reaches."""


def _unreached_message(model: nn.Module, where: str, count: int) -> str:
    return (f"{type(model).__name__}'s output on {where} depends on none of its {count} trainable parameters (no "
            "gradient reaches any of them), so its gradient kernel and tangent features would be all zeros: the "
            "forward detaches its output (.detach(), .data, .item(), a NumPy round trip) or runs under torch.no_grad() "
            "/ torch.inference_mode(), or it reads only frozen parameters. Compute the output with autograd on (remove "
            "the detach or the no_grad from forward), or set requires_grad=True on the parameters it reads")


def _alone(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor], name: str):
    """:func:`_one_pass` on one example ``one`` in analysis mode, the model's generators and buffers as they were
    after it: (the output, the gradient of a random combination of its outputs, whether a parameter is reached)."""
    with analysis(model), restored_module_generators(model), preserved_buffers(model):
        return _one_pass(model, one, params, name)


def first_reaching_output(model: nn.Module, xs: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
                          name: str) -> torch.Tensor:
    """:func:`first_reaching`'s output alone."""
    return first_reaching(model, xs, params, name)[0]


def first_reaching(model: nn.Module, xs: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
                   name: str) -> tuple[torch.Tensor, float]:
    """:func:`repeatable_output` of ``xs``' first example, or, where no trainable parameter reaches that example's
    output, of the first example whose output one reaches: (the output ``[1, d]``, the largest finite magnitude of its
    checked gradient). Raises ValueError (:class:`Unreached`) only when no example's output is reached: every engine
    would give a zero kernel (torch.func: zero Jacobians; the factored engine's capture has no graph to
    differentiate), which reads as a model without sensitivity rather than the usual cause, a forward run without
    autograd. An example, output component, or x2 that no parameter
    reaches still gets zeros, as its per-example gradient is.

    (The refusal read the first example alone: a forward that detaches by the data (a row computed under no_grad
    when its first feature is positive) was refused for a batch whose first example was such a row, though its
    kernel, zero in that row and column only, was well defined. The other examples are looked at only on the way to
    a refusal, one forward and backward each, until one is reached.)"""
    try:
        return _repeatable(model, tuple(t[:1] for t in xs), params, name)
    except Unreached:
        pass
    for i in range(1, batch_size(xs)):
        one = tuple(t[i : i + 1] for t in xs)
        if _alone(model, one, params, name)[2]:
            return _repeatable(model, one, params, name, i)
    count = batch_size(xs)
    where = f"the first example of {name}" if count == 1 else f"every one of the {count} examples of {name}"
    raise Unreached(_unreached_message(model, where, len(params))) from None


def _same(now: torch.Tensor, was: torch.Tensor) -> bool:
    """Whether a buffer holds what it held (NaN where it held NaN)."""
    if now.shape != was.shape or now.dtype != was.dtype:
        return False
    return torch.equal(now, was) or (now.is_floating_point() and torch.allclose(now, was, rtol=0, atol=0, equal_nan=True))


def _one_pass(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
              name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(output ``[1, d]``, gradient of Σ_o v_o f_o over ``params`` flattened, v fixed and random; whether the
    output's graph reaches any of ``params`` at all: False for an output that depends on none of them)."""
    with torch.enable_grad():
        out = checked_forward(model, one, name=name)
        v = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out)
        grads = torch.autograd.grad((out * v).sum(), list(params.values()), allow_unused=True) if out.requires_grad \
            else [None] * len(params)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).detach().reshape(-1) for g, p in zip(grads, params.values())])
    return out.detach(), flat, any(g is not None for g in grads)


def _substituted_pass(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
                      out: torch.Tensor) -> torch.Tensor | None:
    """The gradient of :func:`_one_pass` with the parameters substituted as torch.func substitutes them
    (:func:`~genkernel.core.adapter.functional_model`, the reference's per-example passes): copies put in
    the modules' attributes. A read the copies do not reach (a reference held elsewhere) keeps the gradient
    of the parameter itself, not of its copy. None where the substituted forward gives no graph."""
    copies = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    try:
        with torch.enable_grad():
            flat = functional_model(model)(copies, one)
            if not flat.requires_grad:
                return None
            v = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(flat)
            grads = torch.autograd.grad((flat * v).sum(), list(copies.values()), allow_unused=True)
    except Exception:  # a forward torch.func cannot run: the reference's own passes say so, with their message
        return None
    return torch.cat([(torch.zeros_like(p) if g is None else g).detach().reshape(-1) for g, p in zip(grads, params.values())])


def _close(first: torch.Tensor, second: torch.Tensor) -> bool:
    if bool((first.isnan() ^ second.isnan()).any()):
        return False
    # NaN in both, or the same infinity in both (an output that overflowed, a diverged model's: inf − inf made the
    # norm NaN and the model was refused as "not deterministic in eval mode")
    same = first.isnan() | (first.isinf() & (first == second))
    if bool(((first.isinf() | second.isinf()) & ~same).any()):
        # an infinity in one pass only, or of the other sign: the norms below would be inf <= inf, accepted
        return False
    # divided by their largest magnitude first: formed directly, the norms overflow for outputs past about 1.3e154
    # (inf <= rtol * inf accepted any difference) and underflow below about 1.5e-154 (0 <= rtol * 0 did too)
    (a, b), _ = scaled_alike(first.masked_fill(same, 0), second.masked_fill(same, 0))
    return float((a - b).norm()) <= REPEAT_RTOL.get(first.dtype, 1e-2) * float(a.norm())


@outside_inference_mode
@in_full_precision
def kernel_plan(model: nn.Module, x: Batch, x2: Batch | None = None, *, engine: str = "auto",
                memory_budget: int = DEFAULT_MEMORY_BUDGET, rows_total: int | None = None) -> KernelPlan:
    """The engine and chunk sizes :func:`gradient_kernel` starts with for ``model`` on inputs like ``x`` (a plan: the
    factored engine's fallback to torch.func for a kernel it cannot return is known only once the kernel is formed,
    and is warned of then: :class:`KernelPlan`): against
    themselves, or against ``x2`` (the plan of ``gradient_kernel(model, x, x2)``: the second side's
    batches are row-checked too, and the chunks are those of an M×N kernel). ``rows_total``: for ``x``
    against itself, the example count to plan for, default ``x``'s (a positive int); with ``x2``, the
    sides' own counts are planned for and ``rows_total`` is refused."""
    memory_budget = check_memory_budget(memory_budget)
    if rows_total is not None:  # 0, -5 or True planned chunks of 0, -5 or True rows, silently
        rows_total = positive_int(rows_total, "rows_total")
        if x2 is not None:
            raise ValueError("rows_total plans x against itself at another example count; with x2 the plan is that "
                             "of x against x2 at their own counts: pass x2 or rows_total, not both")
    model = unwrap(model)
    check_per_example_safe(model)
    with analysis(model):
        params, xs, n, d, _ = _prepare(model, x, "x", checked=True)
        if x2 is not None:
            xs2 = _second_side(model, xs, x2, d, "x", "x2")
            return _pair_plan(model, params, xs, xs2, d, engine, memory_budget)
        return _plan(model, params, xs, d, n if rows_total is None else rows_total, engine, memory_budget)


def _second_side(model: nn.Module, xs1: tuple[torch.Tensor, ...], x2: Batch, d: int, name1: str,
                 name2: str) -> tuple[torch.Tensor, ...]:
    """``x2`` as a tuple of tensors, checked (finite, a batch, and, where its inputs are of another kind than
    ``xs1``'s, giving as many outputs per example, d)."""
    xs2 = as_tuple(x2, name=name2)
    batch_size(xs2, name=name2)
    check_finite(xs2, name=name2)
    if _kind(xs2) != _kind(xs1):  # inputs like x1's give x1's d outputs
        with torch.no_grad(), analysis(model):
            d2 = checked_forward(model, tuple(t[:1] for t in xs2), name=name2).shape[1]
        if d2 != d:
            raise ValueError(f"{name1} gives {d} outputs per example but {name2} gives {d2}")
    return xs2


def _plan(model, params, xs, d: int, rows_total: int, engine: str, memory_budget: int) -> KernelPlan:
    n = batch_size(xs)
    plan = _engine_plan(model, xs, d, (n, rows_total), engine, memory_budget=memory_budget)
    if plan is not None:
        chunking = _chunking(model, plan, xs, d, (rows_total, rows_total), True, _probe_sizes(model, plan, xs),
                             memory_budget)
        if _rows_alone(model, xs, rows_total, chunking.rows, joined=not chunking.held):
            return KernelPlan("factored", d, chunking.rows, chunking.cotangents, plan.factored_fraction)
        # (else the factored kernel's capture finds the batch's rows not its examples' own and runs torch.func)
    return KernelPlan("functional", d, min(_functional_rows(params, d, memory_budget), rows_total), d, 0.0)


def _pair_plan(model, params, xs1, xs2, d: int, engine: str, memory_budget: int) -> KernelPlan:
    """:func:`_plan` for an M×N kernel between ``xs1`` and ``xs2`` (what :func:`_gradient_kernel` decides for them)."""
    m, n = batch_size(xs1), batch_size(xs2)
    plan = _engine_plan(model, xs1, d, (m, n), engine, xs2, memory_budget)
    if plan is not None:
        chunking = _chunking(model, plan, xs1, d, (m, n), False, _probe_sizes(model, plan, xs1), memory_budget)
        if _pair_rows_alone(model, xs1, xs2, chunking, d):
            return KernelPlan("factored", d, chunking.rows, chunking.cotangents, plan.factored_fraction)
    return KernelPlan("functional", d, min(_functional_rows(params, d, memory_budget), max(m, n)), d, 0.0)


def _pair_rows_alone(model: nn.Module, xs1: tuple[torch.Tensor, ...], xs2: tuple[torch.Tensor, ...],
                     chunking: Chunking, d: int) -> bool:
    """:func:`_rows_alone` for the captures of the factored kernel between ``xs1`` and ``xs2``
    (:func:`~genkernel.core.engine.factored._factored_kernel`): with all d outputs in one backward, the held side's
    (x2's) chunks, its first at least (captured before the held factors' size is measured); where x2 is held,
    x1's chunks; else each pair of chunks joined into one batch (inputs of one kind) or each side's chunks alone."""
    rows = chunking.rows
    parts1 = [tuple(t[r] for t in xs1) for r in chunks(batch_size(xs1), rows)]  # (views: no copies)
    parts2 = [tuple(t[r] for t in xs2) for r in chunks(batch_size(xs2), rows)]

    def joined() -> Iterator[tuple[torch.Tensor, ...]]:
        # Each pair of chunks joined, the first of each size alone: a later one of a size checked is not run again
        # (_batches_rows_alone), and all of them made at once held M·N/rows² joined copies of the inputs.
        sizes = set()
        for p1 in parts1:
            for p2 in parts2:
                size = batch_size(p1) + batch_size(p2)
                if size not in sizes:
                    sizes.add(size)
                    yield tuple(torch.cat([a, b]) for a, b in zip(p1, p2))

    batches: list | Iterator = []
    if chunking.cotangents >= d:
        batches += parts2 if chunking.held else parts2[:1]
    if chunking.held:
        batches += parts1
    elif same_kind(xs1, xs2):
        batches = itertools.chain(batches, joined())
    else:
        batches += parts1 + parts2
    return _batches_rows_alone(model, batches)


def _rows_alone(model: nn.Module, xs: tuple[torch.Tensor, ...], total: int, rows: int, *, joined: bool) -> bool:
    """Whether the factored kernel's captures of ``total`` examples in chunks of ``rows`` pass the row check they
    make (:func:`~genkernel.core.engine.factors.check_rows_alone`, remembered per batch size where it passes): on
    batches of every size a capture runs, each chunk and, where no side is held (``joined``), two chunks joined
    (the kernel's pairs of chunks), made of ``xs``' examples (cycled where a batch is larger). A forward that mixes
    the rows only of larger batches passes the covering check's sample; the kernel then falls back to torch.func,
    which the plan has to say."""
    sizes = [s.stop - s.start for s in chunks(total, rows)]
    pairs = {a + b for i, a in enumerate(sizes) for b in sizes[i + 1 :]} if joined else set()
    n = batch_size(xs)
    # (made one at a time as they are checked: a joined pair of chunks is twice a chunk's inputs)
    return _batches_rows_alone(model, (tuple(t[torch.arange(size, device=xs[0].device) % n] for t in xs)
                                       for size in sorted(set(sizes) | pairs)))


def _batches_rows_alone(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> bool:
    """Whether every batch of ``batches`` passes the row check a capture of it makes
    (:func:`~genkernel.core.engine.factors.check_rows_alone`): a batch of a kind and size checked before, here or
    by an earlier pass (remembered where it passed), is not run again; False at the first that fails."""
    checked = set()
    for batch in batches:
        size = batch_size(batch)
        key = (_kind(batch), size)
        if key in checked or rows_alone_known(model, batch, size):  # (passed before: no forward again)
            continue
        checked.add(key)
        try:
            with torch.enable_grad(), _any_attention():  # (as the capture's forward)
                out = flat_output(model(*batch), size).detach()
            check_rows_alone(model, batch, out)
        except BatchDependent:
            return False
    return True


def _engine_plan(model: nn.Module, xs: tuple[torch.Tensor, ...], d: int, rows: tuple[int, int], engine: str,
                 xs2: tuple[torch.Tensor, ...] | None = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Plan | None:
    """The covering plan the factored engine runs, or None where :func:`choose_engine` picks
    torch.func (called in analysis mode). The covering check runs for a model with factored
    layers (engine "auto" or "factored"); for a kernel against ``xs2`` of another kind, on both
    (:func:`~genkernel.core.engine.factors.pair_covering_plan`). "auto" counts (one example's
    forward, :func:`~genkernel.core.engine.factored._probe_sizes`, and both engines' chunks of
    ``rows`` = (M, N) examples in ``memory_budget``) where its choice needs them: parameters
    left to torch.func, or more than ``AUTO_FACTORED_MAX_OUTPUTS`` outputs."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "functional" or not make_plan(model).blocks:
        return None
    plan = pair_covering_plan(model, xs, xs2)
    if not plan.blocks:  # every parameter goes through torch.func: that is the functional engine
        return None
    if engine == "auto" and (plan.fallback or d > AUTO_FACTORED_MAX_OUTPUTS):
        sizes = _probe_sizes(model, plan, xs)
        chunking = _chunking(model, plan, xs, d, rows, xs2 is None, sizes, memory_budget)
        if choose_engine(plan, d, engine, rows=rows, sizes=sizes, chunking=chunking) == "functional":
            return None
    return plan


def _chunking(model: nn.Module, plan: Plan, xs: tuple[torch.Tensor, ...], d: int, rows: tuple[int, int],
              symmetric: bool, sizes: _Sizes, memory_budget: int) -> Chunking:
    """Both engines' chunks for an M×N kernel (``rows``), as :func:`_gradient_kernel` and
    :func:`~genkernel.core.engine.factored.factored_gradient_kernel` take them; a side is held
    when all d outputs fit one backward and its compact factors (and fallback Jacobians) take at
    most half of the budget, the check the factored engine makes on its first chunk."""
    m, n = rows
    rows_f = _functional_rows(plan.params, d, memory_budget)
    rows_x, c = chunk_sizes(model, plan, xs, d, max(m, n), memory_budget, held=2, compact=True)
    # the factors at the parameters' bytes per value, the fallback's Jacobians each in its parameter's dtype
    per_example = value_bytes(plan.params) * sizes.compact_factors(plan, d) + d * parameter_bytes(plan.fallback)
    held = c >= d and per_example * (m if symmetric else n) <= memory_budget // 2
    return Chunking(rows_f, rows_x, c, held, symmetric)


def _functional_rows(params: dict[str, torch.Tensor], d: int, memory_budget: int) -> int:
    """Rows of the functional engine's chunks: two chunks of Jacobians in the budget."""
    return _rows_per_chunk(memory_budget, d, parameter_bytes(params), held=2)


def _rows_per_chunk(memory_budget: int, d: int, param_bytes: int, held: int) -> int:
    """Rows of Jacobians that fit when ``held`` chunks are alive at once (vmap roughly doubles); ``param_bytes``:
    one row's Jacobian of one output, Σ numel × item size over the parameters."""
    per_row = 2 * d * param_bytes
    return max(1, memory_budget // (held * per_row))


def _kind(xs: tuple[torch.Tensor, ...]) -> tuple:
    """Per-example shapes, dtypes and devices of a batch."""
    return tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in xs)


def _prepare(model: nn.Module, x: Batch, name: str, checked: bool = False):
    if not checked:
        check_per_example_safe(model)  # before analysis mode, which puts every module in eval mode
    params = trainable_parameters(model)
    xs = as_tuple(x, name=name)
    n = batch_size(xs, name=name)
    check_finite(xs, name=name)
    out, peak = first_reaching(model, xs, params, name)
    return params, xs, n, out.shape[1], peak


@outside_inference_mode
@in_full_precision
def gradient_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    normalize: bool = False,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    engine: str = "auto",
) -> torch.Tensor:
    """The gradient kernel between two batches of inputs.

    Args:
        model: any ``nn.Module``; outputs are flattened per example to d values.
        x1: M inputs (Tensor or tuple of Tensors, batch on dim 0).
        x2: N inputs, or ``None`` for ``x1`` against itself.
        normalize: divide by sqrt(k(x, x) k(x', x')) so that values lie in [-1, 1]; with
            ``reduce="none"`` each output pair (i, j) is normalized by its own diagonals. An
            example (or output) with a zero gradient gets 0, not 0/0.
        reduce: ``"trace"`` sums J(x)_i · J(x')_i over outputs i; ``"none"`` keeps the blocks.
        memory_budget: bytes of per-example Jacobians (or captured factors) held at once.
        engine: ``"factored"`` computes per-layer kernels from activations and output gradients
            (:mod:`genkernel.core.engine.factored`; unsupported modules go through torch.func in
            the same call; a kernel that comes out not finite from factors, or, normalizing, with a
            k(x, x) that underflowed, is formed again through torch.func with finite parameters, and a
            RuntimeWarning says so); ``"functional"`` materializes per-example Jacobians with
            torch.func (the reference); ``"auto"``: :func:`choose_engine`.

    Returns:
        ``Tensor[M, N]`` for ``reduce="trace"``, ``Tensor[M, N, d, d]`` for ``reduce="none"``,
        in the model's dtype (computed in its own precision, autocast and TF32 off:
        :func:`full_precision`). Each example's gradient is that of the model applied to the
        example alone, in eval mode: a forward that mixes a batch's examples in plain operations
        (``h - h.mean(0)`` whatever the mode) gives the kernel of its one-example function, not of
        a batch's (the factored engine's check moves such layers to per-example passes).

    Raises:
        ValueError: for a model whose eval-mode forward is random (two passes on one example
            differ: :func:`repeatable_output`) or writes its buffers (a call counter, a quantization
            observer), or that couples examples by module type (BatchNorm with batch statistics,
            dropout in training mode), or whose output on every example of x1 depends on no trainable
            parameter (a detached output, a forward under ``torch.no_grad()``); examples and output
            components that no parameter reaches get zero rows and columns. With ``normalize``, for a
            kernel that is not finite though the parameters are (a Jacobian that itself overflows the
            dtype: compute in float64).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(normalize, (bool, np.bool_)):  # normalize="no" was taken as true
        raise TypeError(f"normalize must be True or False, got {type(normalize).__name__} ({normalize!r})")
    memory_budget = check_memory_budget(memory_budget)
    model = unwrap(model)
    check_per_example_safe(model)  # before analysis mode, which puts every module in eval mode
    with analysis(model):  # entered once for the whole call
        return _gradient_kernel(model, x1, x2, normalize, reduce, memory_budget, engine)


def _gradient_kernel(model, x1, x2, normalize, reduce, memory_budget, engine) -> torch.Tensor:
    params, x1s, m_total, d, peak = _prepare(model, x1, "x1", checked=True)
    sigma = _normalizing_scale(peak) if normalize else 1.0
    x2s = x1s if x2 is None else _second_side(model, x1s, x2, d, "x1", "x2")
    n_total = batch_size(x2s, name="x2")

    plan = _engine_plan(model, x1s, d, (m_total, n_total), engine, None if x2 is None else x2s, memory_budget)
    if plan is not None:
        try:
            kernel, diag1, diag2 = factored_gradient_kernel(
                model, x1s, None if x2 is None else x2s, reduce=reduce, memory_budget=memory_budget, d=d,
                diagonals=normalize, plan=plan, output_scale=sigma,
            )
        except BatchDependent:  # a forward that depends on the batch: every example alone, through torch.func
            pass
        else:
            # Products of factors overflow where the gradients they make do not: activations past about 1.8e19 in
            # float32 (a·a' = inf) times output gradients of 0 (a saturated tanh) gave inf · 0 = NaN, or inf, where
            # the Jacobians' own kernel is finite. And the factors are formed at one scale (the first reached
            # example's, normalizing): in a batch whose Jacobians span more than about 1e19 in float32, another
            # example's k(x, x) overflowed (NaN) or underflowed (0 or a few bits: k̂(x, x) of 0, or 3e-4, not 1).
            # torch.func forms the Jacobians themselves, each example at its own scale when normalizing: such a
            # kernel is formed again there (with finite parameters; it is then the reference's own), and the
            # warning says so (kernel_plan's "factored" was decided before any kernel was formed).
            why = _unreliable(kernel, diag1, diag2, normalize)
            sides = ((x1s, diag1, "x1"),) if x2 is None else ((x1s, diag1, "x1"), (x2s, diag2, "x2"))
            if why is not None and _finite(kernel, diag1, diag2) and all(
                    _zero_by_right(model, params, xs, diag, name, reduce) for xs, diag, name in sides):
                why = None  # (k(x, x) = 0 of examples whose gradient is 0: torch.func would give the same kernel)
            if why is None or not _finite(*params.values()):
                return _normalized(kernel, diag1, diag2) if normalize else kernel
            warnings.warn(
                f"the factored engine's kernel {why}, though the parameters are finite: it is formed again with "
                "torch.func (the functional engine's time and memory; kernel_plan, decided before any kernel is "
                "formed, says 'factored')", RuntimeWarning, stacklevel=5)

    first = next(iter(params.values()))
    # (in the parameters' dtypes joined, as their Jacobians' concatenation is: not the first parameter's alone)
    dtype = joined_dtype(params)
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    kernel = torch.empty(shape, dtype=dtype, device=first.device)
    diag_shape = (d,) if reduce == "none" else ()
    diag1 = torch.empty((m_total, *diag_shape), dtype=dtype, device=first.device)
    diag2 = torch.empty((n_total, *diag_shape), dtype=dtype, device=first.device)
    jac = per_example_jacobian(model, params)
    rows = _functional_rows(params, d, memory_budget)

    with analysis(model):
        # 1. Outer loop over row chunks of x1: J1 [m, d, P].
        for rows1 in chunks(m_total, rows):
            j1 = _scaled(jac(*(t[rows1] for t in x1s)).detach(), reduce, normalize)
            diag1[rows1] = jacobian_self_kernel(j1, reduce)
            # 2. Inner loop over row chunks of x2: J2 [n, d, P]; K = J1 J2ᵀ (Section 2, K_θ).
            for rows2 in chunks(n_total, rows):
                j2 = j1 if (x2 is None and rows2 == rows1) else _scaled(jac(*(t[rows2] for t in x2s)).detach(), reduce,
                                                                        normalize)
                if rows1.start == 0:
                    diag2[rows2] = jacobian_self_kernel(j2, reduce)
                kernel[rows1, rows2] = jacobian_pair_kernel(j1, j2, reduce)
    # 3. Normalized kernel k̂ = k / sqrt(k(x, x) k(x', x')) (Section 2).
    if not normalize:
        return kernel
    if not _finite(kernel, diag1, diag2) and _finite(*params.values()):
        # Each example's Jacobian was brought near 1: what is left is a Jacobian not finite in the dtype itself (an
        # output gradient past 3.4e38 in float32), whose cosines no scale gives back. (Non-finite parameters: the
        # kernel of a diverged model, NaN as its outputs are.)
        sides = (("x1", diag1),) if x2 is None else (("x1", diag1), ("x2", diag2))
        where = [f"{name}'s example(s) {rows[:5]}" for name, rows in ((n, _not_finite_rows(d)) for n, d in sides) if rows]
        raise ValueError(
            f"the normalized gradient kernel is not finite though the parameters are: the Jacobian of "
            f"{' and '.join(where) or 'an example'} is not finite in {dtype} (a gradient past its range, or a NaN of "
            "its backward), so no cosine can be formed from it. Compute in float64 (model.double() and float64 "
            "inputs), or bring the outputs into range")
    return _normalized(kernel, diag1, diag2)


NORMALIZING_RANGE = 32  # Jacobians within 2^±32 (the first example's; torch.func: each example's): formed as they are


def _normalizing_scale(peak: float) -> float:
    """σ for a normalized kernel whose first example's Jacobian is of magnitude ``peak``: 1 where ``peak`` lies within
    2^±:data:`NORMALIZING_RANGE` (or is 0 or not finite), else the power of two that brings it to 1.

    Normalized, the kernel is that of the outputs times any σ, and a power of two scales every product exactly (the
    same bits, in range). Formed at the outputs' own magnitude, float32 kernels overflowed past Jacobians of about
    1e19 (inf / inf: NaN) and underflowed below 1e-19 (k̂ of an example with itself came out 0, or 3e-4, not 1). This is
    the factored engine's one scale, the first reached example's: where the batch's Jacobians span more than it
    leaves room for, a k(x, x) comes out of range and the kernel is formed again through torch.func, each example at
    its own scale (:func:`_scaled`)."""
    if not 0 < peak < math.inf:
        return 1.0
    exponent = round(math.log2(peak))
    return 1.0 if abs(exponent) <= NORMALIZING_RANGE else 2.0 ** -exponent


def _finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every entry of the tensors (None: none) is finite."""
    return all(t is None or bool(t.isfinite().all()) for t in tensors)


def _not_finite_rows(diag: torch.Tensor) -> list[int]:
    """The examples (rows of ``diag [M]`` or ``[M, d]``) with a diagonal entry that is not finite."""
    return (~diag.isfinite()).reshape(diag.shape[0], -1).any(dim=1).nonzero().reshape(-1).tolist()


def _underflow_floor(dtype: torch.dtype) -> float:
    """tiny / eps of ``dtype``: a k(x, x) below it summed squares that lost their bits to underflow."""
    return torch.finfo(dtype).tiny / torch.finfo(dtype).eps


def _unreliable(kernel: torch.Tensor, diag1: torch.Tensor | None, diag2: torch.Tensor | None,
                normalize: bool) -> str | None:
    """Why the factored engine's kernel (and, normalizing, its diagonals) cannot be returned, or None where it can:
    an entry that is not finite, or, normalizing, a diagonal below tiny / eps of the dtype (0 included), where the
    squares it sums lost their bits to underflow and k̂ of the example with itself would not be 1. (A diagonal of
    an example, or an output, that no parameter reaches is 0 by right: the factors cannot tell it from one that
    underflowed, and the caller reads such examples alone, :func:`_zero_by_right`.)"""
    if not _finite(kernel, diag1, diag2):
        return "is not finite (a product of factors, or a k(x, x) at the first example's scale, overflowed)"
    if normalize and math.log2(torch.finfo(kernel.dtype).max) > NORMALIZING_RANGE:  # (float16: no room to scale in)
        floor = _underflow_floor(kernel.dtype)
        if any(bool((d < floor).any()) for d in (diag1, diag2) if d is not None):
            return (f"has a k(x, x) below {floor:.3g} (its squares underflowed at the first example's scale, or, "
                    "for blocks or many such examples, the example's gradient is 0)")
    return None


ZERO_CHECKS = 16  # examples with k(x, x) = 0 the factored engine reads alone before it forms the kernel again


def _zero_by_right(model: nn.Module, params: dict[str, torch.Tensor], xs: tuple[torch.Tensor, ...],
                   diag: torch.Tensor, name: str, reduce: str) -> bool:
    """Whether the factored engine's normalized trace kernel may be returned though ``diag [M]`` (its k(x, x) over
    ``xs``) has entries below :func:`_unreliable`'s floor: every finite entry there is 0 exactly, and the example's
    gradient (of a random combination of its outputs, one forward and backward of it alone: :func:`_one_pass`) is 0
    in the dtype, as its Jacobian and torch.func's kernel row are (a ReLU network whose units are all off for it, an
    example no parameter reaches). Without this one such example formed the whole kernel again through torch.func
    (5.5 times the factored engine's time on a 3-layer ReLU MLP at 256 examples, and a warning). False for blocks
    (``reduce="none"``), for a k(x, x) that is small but not 0 (its squares underflowed), for a gradient that is
    not 0 (it underflowed in the factors' products only), and for more than :data:`ZERO_CHECKS` such examples (one
    batched pass of torch.func is then cheaper)."""
    if reduce != "trace" or diag.dim() != 1 or not bool(diag.isfinite().all()):
        return False
    floor = _underflow_floor(diag.dtype)
    low = (diag < floor).nonzero().reshape(-1).tolist()
    if len(low) > ZERO_CHECKS or any(float(diag[i]) != 0.0 for i in low):
        return False
    for i in low:
        one = tuple(t[i : i + 1] for t in xs)
        if bool(_alone(model, one, params, name)[1].any()):
            return False
    return True


def _scaled(j: torch.Tensor, reduce: str, normalize: bool) -> torch.Tensor:
    """Jacobians ``j [m, d, P]`` for a normalized kernel (``normalize``; else ``j`` itself): each example's (each
    example's output's, for ``reduce="none"``, whose blocks are normalized output by output) times the power of
    two that brings its largest magnitude to [1/2, 1), where that lies outside 2^±:data:`NORMALIZING_RANGE`.

    k̂ is the same for any positive scale of an example's Jacobian, and a power of two scales every product, sum
    and square root of the kernel exactly (the same bits, short of under- and overflow): one scale for the batch
    (the first example's) overflowed or underflowed the others' k(x, x) where the batch's Jacobians span more than
    about 1e19 in float32. Each scale is applied as two factors, each in range where 2^-e itself is not (2^149 in
    float32, for a Jacobian of subnormals)."""
    if not normalize or j.numel() == 0:
        return j
    # (reduced without a temporary of j's size: the chunks fill the memory budget. A row with an infinity or a NaN is
    # left as it is: its kernel is not finite at any scale.)
    peak = torch.maximum(j.amax(dim=-1), -j.amin(dim=-1))  # [m, d]
    if reduce == "trace":
        peak = peak.amax(dim=1, keepdim=True)  # [m, 1]: one scale per example, the trace sums over its outputs
    exponent = torch.frexp(peak).exponent  # peak = mantissa · 2^exponent, mantissa in [1/2, 1) (0 for peak 0)
    shift = torch.where((peak > 0) & peak.isfinite() & (exponent.abs() > NORMALIZING_RANGE), -exponent,
                        torch.zeros_like(exponent))
    if not bool(shift.any()):
        return j
    half = torch.div(shift, 2, rounding_mode="floor")
    two = torch.tensor(2.0, dtype=j.dtype, device=j.device)
    return j * two.pow(half.to(j.dtype))[..., None] * two.pow((shift - half).to(j.dtype))[..., None]


def _normalized(kernel: torch.Tensor, diag1: torch.Tensor, diag2: torch.Tensor) -> torch.Tensor:
    """k̂ for a trace kernel ``[M, N]`` (diagonals ``[M]``, ``[N]``) or blocks ``[M, N, d, d]``
    (diagonals ``[M, d]``, ``[N, d]``: each output pair normalized by its own diagonals)."""
    if kernel.dim() == 2:
        return normalize_kernel(kernel, diag1, diag2)
    root1, root2 = _roots(diag1), _roots(diag2)
    scale = root1[:, None, :, None] * root2[None, :, None, :]
    return kernel / scale.clamp_min(torch.finfo(kernel.dtype).tiny)


def _roots(diag: torch.Tensor) -> torch.Tensor:
    """sqrt k(x, x), rounding's negative diagonals taken as 0. The product of two diagonals is
    never formed: in float32 it overflows past 1.8e38 (k(x, x) > 1.3e19, k̂ came out 0) and
    underflows below 1.2e-38 (k̂ came out far below 1), while the product of roots stays in range."""
    return diag.clamp_min(0).sqrt()


@outside_inference_mode
@in_full_precision
def tangent_features(
    model: nn.Module,
    x: Batch,
    *,
    output_index: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    engine: str = "auto",
) -> torch.Tensor:
    """Tangent features φ(x) = ∂f(x; θ)/∂θ, flattened over the trainable parameters.

    Returns:
        ``Tensor[M, d, P]``, or ``Tensor[M, P]`` for output ``output_index``. Their inner
        products (summed over outputs) equal :func:`gradient_kernel` with ``reduce="trace"``.
        P follows the order of ``model.named_parameters()`` (trainable ones only).
        ``engine="factored"`` (or ``"auto"``, :func:`choose_engine`) materializes each layer's
        per-example gradient from captured factors instead of torch.func's per-example
        Jacobians; ``"functional"`` is the reference. Computed in the model's own precision
        (:func:`full_precision`); a model whose eval-mode forward is random is refused
        (:func:`repeatable_output`).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    memory_budget = check_memory_budget(memory_budget)
    model = unwrap(model)
    params, xs, m_total, d, _ = _prepare(model, x, "x")
    if output_index is not None and (isinstance(output_index, bool) or not isinstance(output_index, numbers.Integral)):
        raise TypeError(f"output_index must be None or an int, got {type(output_index).__name__} ({output_index!r})")
    if output_index is not None and not (-d <= output_index < d):
        raise ValueError(f"output_index {output_index} is out of range for a model with {d} outputs")
    first = next(iter(params.values()))
    num_params = sum(p.numel() for p in params.values())
    # Both engines hold each parameter's per-example block and their concatenation besides the
    # chunk's Jacobian (torch.func also its backward buffers): a peak of about three chunks
    # (measured: 1.4-1.7x the budget with one).
    rows = _rows_per_chunk(memory_budget, d, parameter_bytes(params), held=3)
    width = 1 if output_index is not None else d
    # (in the parameters' dtypes joined: a float32 first layer would round a float64 head's Jacobians)
    features = torch.empty((m_total, width, num_params), dtype=joined_dtype(params), device=first.device)
    if choose_engine(make_plan(model), d, engine) == "factored":
        outs = list(range(d)) if output_index is None else [output_index % d]
        plan = covering_plan(model, xs)

        def jac(*chunk_inputs: torch.Tensor) -> torch.Tensor:
            return factored_jacobian(model, chunk_inputs, outs, plan)
    else:
        jac = per_example_jacobian(model, params)

    with analysis(model):
        for chunk in chunks(m_total, rows):
            try:
                j = jac(*(t[chunk] for t in xs)).detach()
            except BatchDependent:  # a forward that depends on the batch: every example alone, through torch.func
                jac = per_example_jacobian(model, params)
                j = jac(*(t[chunk] for t in xs)).detach()
            if j.shape[1] != width:
                j = j[:, output_index % d : output_index % d + 1]
            features[chunk] = j
    return features[:, 0] if output_index is not None else features


def normalize_kernel(kernel: torch.Tensor, diag1: torch.Tensor, diag2: torch.Tensor | None = None) -> torch.Tensor:
    """k / sqrt(k(x, x) k(x', x')) for a ``[M, N]`` kernel and its diagonals ``[M]``, ``[N]``:
    ``[M, N]``. An example with k(x, x) = 0 (a zero gradient) gets 0 against every example,
    itself included, rather than 0/0. ``diag2=None`` (x1 against itself) needs a square kernel."""
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 2:
        raise ValueError(f"kernel must be a [M, N] Tensor, got {tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__}")
    m, n = kernel.shape
    if diag2 is None and m != n:
        # diag1 for both sides broadcast a [M, 1] kernel to [M, M], divided by the wrong diagonal (silently)
        raise ValueError(f"kernel is {m}×{n}: a kernel between two sets needs both diagonals, "
                         "normalize_kernel(kernel, diag1 [M], diag2 [N])")
    diag2 = diag1 if diag2 is None else diag2
    if tuple(diag1.shape) != (m,) or tuple(diag2.shape) != (n,):
        raise ValueError(f"diagonals of shapes {tuple(diag1.shape)} and {tuple(diag2.shape)} do not fit a {m}×{n} "
                         "kernel: pass k(x, x) of its rows [M] and of its columns [N]")
    scale = _roots(diag1)[:, None] * _roots(diag2)[None, :]
    return kernel / scale.clamp_min(torch.finfo(kernel.dtype).tiny)


__all__ = [
    "AUTO_FACTORED_MAX_OUTPUTS", "DEFAULT_MEMORY_BUDGET", "ENGINES", "KernelPlan", "choose_engine", "gradient_kernel",
    "kernel_plan", "normalize_kernel", "tangent_features",
]
