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

import contextlib
import functools
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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
    outside_inference_mode,
    trainable_parameters,
    unwrap,
)
from .factored import _probe_sizes, _Sizes, chunk_sizes, chunks, factored_gradient_kernel, factored_jacobian
from .factors import DEFAULT_MEMORY_BUDGET, Plan, analysis, covering_plan, make_plan, pair_covering_plan
from .reference import jacobian_pair_kernel, jacobian_self_kernel, per_example_jacobian

ENGINES = ("auto", "factored", "functional")
REDUCTIONS = ("trace", "none")
AUTO_FACTORED_MAX_OUTPUTS = 64


@dataclass(frozen=True)
class KernelPlan:
    """What :func:`gradient_kernel` does for a model and inputs.

    Attributes:
        engine: "factored" or "functional", the engine the call runs.
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


def choose_engine(plan: Plan, d: int, engine: str = "auto", *, rows: tuple[int, int] | None = None,
                  sizes: _Sizes | None = None) -> str:
    """The engine a call runs: ``engine`` unless "auto", which decides by operation counts.

    "auto" picks:

    1. "functional" when no module is factored. For more than ``AUTO_FACTORED_MAX_OUTPUTS``
       outputs, "functional" unless at least half of the trainable parameters stay in the T²
       factored form at d cotangents (``sizes``' count P_kept: linear layers over few positions,
       embeddings; without ``sizes``, "functional"). With d cotangents the blocks that
       materialize (convolutions over many positions) cost the factored engine what they cost
       torch.func, only slower (a Python loop over cotangents, the older batched backward);
       the kept ones save the d·P pair products. Measured (1 thread, M = N = 4-16, d = 128-768,
       reduce "trace" and "none"): kept share 1 on an MLP, factored 12-180x faster; 0.65-0.82
       on a tiny DiTTransformer2DModel, factored 1.0-2.4x faster (d = 256, trace, M = 4: 1.4x
       slower); 0-0.11 on a per-pixel conv net and a tiny UNet2DModel, factored 1.2-2.2x slower
       (the UNet at d = 256, where torch.func's chunks of 2 rows recompute Jacobians: 1.8x
       faster factored, left to torch.func). These times are from before a convolution's
       per-example gradients took every cotangent in one pass (the UNet at d = 256: 6.5 s to
       4.3 s factored, 10.7 s torch.func), which the rule does not yet count.
    2. "factored" when every trainable parameter is in a factored block (``plan.fallback`` is
       empty). Per example, both engines run one forward and one output-batched backward;
       torch.func's backward also forms every per-example weight gradient, the factored one only
       the activations' gradients. Per block, the factored engine then takes the cheaper of the
       T² factored form (T²·(I + d·O) per pair) and per-example gradients materialized from the
       factors (T·I·O per example, a grouped convolution for convolutions, then d·I·O per pair:
       the count torch.func pays for that block), so it never counts more than torch.func.
    3. With parameters left to torch.func (``plan.fallback``, a covering plan's: modules the
       engine does not support or whose parameters are also read outside their forward), the
       factored engine runs torch.func's pass for them on top of its own capture: one more
       forward and backward per example, about 3·F multiply-adds with F those of the factored
       layers' forward (Σ T·I·O). It saves the pairs of the layers it keeps factored (P1 of
       their parameters, T·T·(I + d·O) < d·I·O): about M·N·d·P1. So "factored" when
       M·N·d·P1 > 3·(M + N)·F, else "functional". ``rows`` = (M, N) and ``sizes`` (one
       example's counts, :func:`~genkernel.core.engine.factored.chunk_sizes`' probe) give the
       counts; without them such a plan stays "factored".
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    if not plan.blocks:
        return "functional"
    if sizes is None:  # no counts: the fixed cut-off
        return "functional" if d > AUTO_FACTORED_MAX_OUTPUTS else "factored"
    forward, kept = sizes.forward_and_factored(plan, d)
    if d > AUTO_FACTORED_MAX_OUTPUTS and 2 * kept < sum(p.numel() for p in plan.params.values()):
        return "functional"
    if not plan.fallback or rows is None:
        return "factored"
    m, n = rows
    return "factored" if m * n * d * kept > 3 * (m + n) * forward else "functional"


@contextlib.contextmanager
def full_precision(model: nn.Module | None = None) -> Iterator[None]:
    """The passes inside in the model's own precision: ``torch.autocast`` off (on every device
    type where it is on), TF32 off for cuDNN convolutions and float32 matrix products (torch's
    switches), and, for a model that accelerate prepared with ``mixed_precision`` (its forward
    wrapped in autocast, the original kept as ``_original_forward``), that original forward;
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
    slots = {} if model is None else model.__dict__
    wrapped = slots.get("forward") if "_original_forward" in slots else None
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        try:
            if cudnn_tf32:
                torch.backends.cudnn.allow_tf32 = False
            if matmul_precision != "highest":
                torch.set_float32_matmul_precision("highest")
            if wrapped is not None:
                slots["forward"] = slots["_original_forward"]
            yield
        finally:
            if cudnn_tf32:
                torch.backends.cudnn.allow_tf32 = True
            if matmul_precision != "highest":
                torch.set_float32_matmul_precision(matmul_precision)
            if wrapped is not None:
                slots["forward"] = wrapped


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


def repeatable_output(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
                      name: str) -> torch.Tensor:
    """The model's output ``[1, d]`` on one example, checked to be repeatable: two forward and
    backward passes (in analysis mode: one forked random stream) must give the same output and
    the same gradient of a fixed random combination of the outputs with respect to ``params``,
    up to rounding (:data:`REPEAT_RTOL` of their norms; NaN where both are NaN). Raises
    ValueError otherwise.

    Randomness that eval mode does not switch off (a generator's noise injection, ``F.dropout``
    called with its default ``training=True``) draws other values in every pass, so each
    example's Jacobian would be taken at its own noise and the kernel would mix them, silently
    (measured: two calls on the same inputs differed by up to 6.4, and StyleGAN-style noise
    injection by 0.74 on entries up to 9.7). The gradients show it where the output does not: StyleGAN's noise injection starts with a zero
    weight, so its output is repeatable at initialization while its Jacobian (the noise) is not.
    The tolerance lets through the last bits of a GPU's atomic additions (scatter, index_add)."""
    with analysis(model):
        passes = [_one_pass(model, one, params, name) for _ in range(2)]
    (out1, grad1), (out2, grad2) = passes
    if not (_close(out1, out2) and _close(grad1, grad2)):
        raise ValueError(
            f"{type(model).__name__} is not deterministic in eval mode: two passes on the first example of {name} "
            "give other outputs or gradients (noise injection, F.dropout called with training=True, or other "
            "randomness that eval mode does not switch off), so its gradient kernel and tangent features are "
            "undefined. Remove the randomness from eval mode (pass the noise as an input, or call F.dropout with "
            "training=self.training)"
        )
    return out1


def _one_pass(model: nn.Module, one: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor],
              name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(output ``[1, d]``, gradient of Σ_o v_o f_o over ``params`` flattened, v fixed and random)."""
    with torch.enable_grad():
        out = checked_forward(model, one, name=name)
        v = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out)
        grads = torch.autograd.grad((out * v).sum(), list(params.values()), allow_unused=True) if out.requires_grad \
            else [None] * len(params)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).detach().reshape(-1) for g, p in zip(grads, params.values())])
    return out.detach(), flat


def _close(first: torch.Tensor, second: torch.Tensor) -> bool:
    if bool((first.isnan() ^ second.isnan()).any()):
        return False
    both_nan = first.isnan()
    a, b = first.double().masked_fill(both_nan, 0), second.double().masked_fill(both_nan, 0)
    return float((a - b).norm()) <= REPEAT_RTOL.get(first.dtype, 1e-2) * float(a.norm())


@outside_inference_mode
@in_full_precision
def kernel_plan(model: nn.Module, x: Batch, *, engine: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                rows_total: int | None = None) -> KernelPlan:
    """The engine and chunk sizes :func:`gradient_kernel` uses for ``model`` on inputs like ``x``
    (``rows_total``: the larger side's example count, default ``x``'s)."""
    memory_budget = check_memory_budget(memory_budget)
    model = unwrap(model)
    check_per_example_safe(model)
    with analysis(model):
        params, xs, n, d = _prepare(model, x, "x", checked=True)
        return _plan(model, params, xs, d, n if rows_total is None else rows_total, engine, memory_budget)


def _plan(model, params, xs, d: int, rows_total: int, engine: str, memory_budget: int) -> KernelPlan:
    n = batch_size(xs)
    plan = _engine_plan(model, xs, d, (n, rows_total), engine)
    if plan is None:
        return KernelPlan("functional", d, min(_functional_rows(params, d, memory_budget), rows_total), d, 0.0)
    rows, c = chunk_sizes(model, plan, xs, d, rows_total, memory_budget, held=2, compact=True)
    return KernelPlan("factored", d, rows, c, plan.factored_fraction)


def _engine_plan(model: nn.Module, xs: tuple[torch.Tensor, ...], d: int, rows: tuple[int, int], engine: str,
                 xs2: tuple[torch.Tensor, ...] | None = None) -> Plan | None:
    """The covering plan the factored engine runs, or None where :func:`choose_engine` picks
    torch.func (called in analysis mode). The covering check runs for a model with factored
    layers (engine "auto" or "factored"); for a kernel against ``xs2`` of another kind, on both
    (:func:`~genkernel.core.engine.factors.pair_covering_plan`). "auto" counts (one example's
    forward, :func:`~genkernel.core.engine.factored._probe_sizes`) where its choice needs them:
    parameters left to torch.func, or more than ``AUTO_FACTORED_MAX_OUTPUTS`` outputs."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "functional" or not make_plan(model).blocks:
        return None
    plan = pair_covering_plan(model, xs, xs2)
    if not plan.blocks:  # every parameter goes through torch.func: that is the functional engine
        return None
    if engine == "auto" and (plan.fallback or d > AUTO_FACTORED_MAX_OUTPUTS):
        if choose_engine(plan, d, engine, rows=rows, sizes=_probe_sizes(model, plan, xs)) == "functional":
            return None
    return plan


def _functional_rows(params: dict[str, torch.Tensor], d: int, memory_budget: int) -> int:
    """Rows of the functional engine's chunks: two chunks of Jacobians in the budget."""
    first = next(iter(params.values()))
    return _rows_per_chunk(memory_budget, d, sum(p.numel() for p in params.values()), first.element_size(), held=2)


def _rows_per_chunk(memory_budget: int, d: int, num_params: int, itemsize: int, held: int) -> int:
    """Rows of Jacobians that fit when ``held`` chunks are alive at once (vmap roughly doubles)."""
    per_row = 2 * d * num_params * itemsize
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
    d = repeatable_output(model, tuple(t[:1] for t in xs), params, name).shape[1]
    return params, xs, n, d


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
            the same call); ``"functional"`` materializes per-example Jacobians with torch.func
            (the reference); ``"auto"``: :func:`choose_engine`.

    Returns:
        ``Tensor[M, N]`` for ``reduce="trace"``, ``Tensor[M, N, d, d]`` for ``reduce="none"``,
        in the model's dtype (computed in its own precision, autocast and TF32 off:
        :func:`full_precision`).

    Raises:
        ValueError: for a model whose eval-mode forward is random (two passes on one example
            differ: :func:`repeatable_output`), or that couples examples (BatchNorm with batch
            statistics, dropout in training mode).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    memory_budget = check_memory_budget(memory_budget)
    model = unwrap(model)
    check_per_example_safe(model)  # before analysis mode, which puts every module in eval mode
    with analysis(model):  # entered once for the whole call
        return _gradient_kernel(model, x1, x2, normalize, reduce, memory_budget, engine)


def _gradient_kernel(model, x1, x2, normalize, reduce, memory_budget, engine) -> torch.Tensor:
    params, x1s, m_total, d = _prepare(model, x1, "x1", checked=True)
    x2s = x1s if x2 is None else as_tuple(x2, name="x2")
    n_total = batch_size(x2s, name="x2")
    check_finite(x2s, name="x2")
    if x2 is not None and _kind(x2s) != _kind(x1s):  # inputs like x1's give x1's d outputs
        with torch.no_grad(), analysis(model):
            d2 = checked_forward(model, tuple(t[:1] for t in x2s), name="x2").shape[1]
        if d2 != d:
            raise ValueError(f"x1 gives {d} outputs per example but x2 gives {d2}")

    plan = _engine_plan(model, x1s, d, (m_total, n_total), engine, None if x2 is None else x2s)
    if plan is not None:
        kernel, diag1, diag2 = factored_gradient_kernel(
            model, x1s, None if x2 is None else x2s, reduce=reduce, memory_budget=memory_budget, d=d, diagonals=normalize,
            plan=plan,
        )
        return _normalized(kernel, diag1, diag2) if normalize else kernel

    first = next(iter(params.values()))
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    kernel = torch.empty(shape, dtype=first.dtype, device=first.device)
    diag_shape = (d,) if reduce == "none" else ()
    diag1 = torch.empty((m_total, *diag_shape), dtype=first.dtype, device=first.device)
    diag2 = torch.empty((n_total, *diag_shape), dtype=first.dtype, device=first.device)
    jac = per_example_jacobian(model, params)
    rows = _functional_rows(params, d, memory_budget)

    with analysis(model):
        # 1. Outer loop over row chunks of x1: J1 [m, d, P].
        for rows1 in chunks(m_total, rows):
            j1 = jac(*(t[rows1] for t in x1s)).detach()
            diag1[rows1] = jacobian_self_kernel(j1, reduce)
            # 2. Inner loop over row chunks of x2: J2 [n, d, P]; K = J1 J2ᵀ (Section 2, K_θ).
            for rows2 in chunks(n_total, rows):
                j2 = j1 if (x2 is None and rows2 == rows1) else jac(*(t[rows2] for t in x2s)).detach()
                if rows1.start == 0:
                    diag2[rows2] = jacobian_self_kernel(j2, reduce)
                kernel[rows1, rows2] = jacobian_pair_kernel(j1, j2, reduce)
    # 3. Normalized kernel k̂ = k / sqrt(k(x, x) k(x', x')) (Section 2).
    return _normalized(kernel, diag1, diag2) if normalize else kernel


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
    params, xs, m_total, d = _prepare(model, x, "x")
    if output_index is not None and (isinstance(output_index, bool) or not isinstance(output_index, numbers.Integral)):
        raise TypeError(f"output_index must be None or an int, got {type(output_index).__name__} ({output_index!r})")
    if output_index is not None and not (-d <= output_index < d):
        raise ValueError(f"output_index {output_index} is out of range for a model with {d} outputs")
    first = next(iter(params.values()))
    num_params = sum(p.numel() for p in params.values())
    # Both engines hold each parameter's per-example block and their concatenation besides the
    # chunk's Jacobian (torch.func also its backward buffers): a peak of about three chunks
    # (measured: 1.4-1.7x the budget with one).
    rows = _rows_per_chunk(memory_budget, d, num_params, first.element_size(), held=3)
    width = 1 if output_index is not None else d
    features = torch.empty((m_total, width, num_params), dtype=first.dtype, device=first.device)
    if choose_engine(make_plan(model), d, engine) == "factored":
        outs = list(range(d)) if output_index is None else [output_index % d]
        plan = covering_plan(model, xs)

        def jac(*chunk_inputs: torch.Tensor) -> torch.Tensor:
            return factored_jacobian(model, chunk_inputs, outs, plan)
    else:
        jac = per_example_jacobian(model, params)

    with analysis(model):
        for chunk in chunks(m_total, rows):
            j = jac(*(t[chunk] for t in xs)).detach()
            if j.shape[1] != width:
                j = j[:, output_index % d : output_index % d + 1]
            features[chunk] = j
    return features[:, 0] if output_index is not None else features


def normalize_kernel(kernel: torch.Tensor, diag1: torch.Tensor, diag2: torch.Tensor | None = None) -> torch.Tensor:
    """k / sqrt(k(x, x) k(x', x')) for a ``[M, N]`` kernel and its diagonals ``[M]``, ``[N]``:
    ``[M, N]``. An example with k(x, x) = 0 (a zero gradient) gets 0 against every example,
    itself included, rather than 0/0."""
    diag2 = diag1 if diag2 is None else diag2
    scale = _roots(diag1)[:, None] * _roots(diag2)[None, :]
    return kernel / scale.clamp_min(torch.finfo(kernel.dtype).tiny)


__all__ = [
    "AUTO_FACTORED_MAX_OUTPUTS", "DEFAULT_MEMORY_BUDGET", "ENGINES", "KernelPlan", "choose_engine", "gradient_kernel",
    "kernel_plan", "normalize_kernel", "tangent_features",
]
