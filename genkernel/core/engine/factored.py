"""The factored kernel engine: gradient kernels and Jacobians from layer factors.

Per-layer kernels between two batches come from their captured factors
(:class:`~genkernel.core.engine.factors.Factors`): no P-sized Gram matmul for linear layers, and
for convolutions, per layer and per chunk, the cheaper of the factored O(T²) form and
materialized per-example gradients. Every parameter outside a supported layer goes through the
torch.func reference (:mod:`genkernel.core.engine.reference`) in the same call. Work is chunked
over rows and over outputs so that captured factors stay under ``memory_budget`` bytes
(:func:`chunk_sizes`).

The kernel of a model with d outputs is the trace over outputs, Σ_o J_o(x) · J_o(x') (``[M, N]``),
or the blocks J_o(x) · J_q(x') (``[M, N, d, d]``, ``reduce="none"``). Every path here is tested
against the torch.func reference (``gradient_kernel(..., engine="functional")``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..adapter import Batch, as_tuple, batch_size, check_memory_budget, flat_output
from ..param_bytes import joined_dtype, parameter_bytes, value_bytes
from .factors import (
    DEFAULT_MEMORY_BUDGET, Plan, Unfactorable, _covering_key, _dense_is_cheaper, analysis, capture, covering_plan,
    output_cotangents, pair_covering_plan, same_kind,
)
from .reference import jacobian_pair_kernel, jacobian_self_kernel, per_example_jacobian, split_columns


# ---------------------------------------------------------------------------------------------
# 1. Chunk sizes from a memory budget.
# ---------------------------------------------------------------------------------------------
@dataclass
class _Sizes:
    """Per-example element counts of one forward pass (:func:`_probe_sizes`)."""

    a: int = 0  # activation factors in the outer form (unfolded convolution patches)
    g: int = 0  # output-gradient factors per cotangent
    act: int = 0  # outputs of every module, containers included
    leaf_act: int = 0  # outputs of modules without children (what the graph keeps, about)
    xhat: int = 0  # normalized inputs of norm blocks (recorded in the forward)
    # block index -> [T, I, O, P_block, T_back]: positions summed over calls, T_back of them in
    # calls whose input depends on a trainable parameter (a backward forms that input's gradient)
    blocks: dict = field(default_factory=dict)

    def forward_and_factored(self, plan: Plan, c: int) -> tuple[int, int]:
        """(multiply-adds of the linear and convolutional blocks' forward, Σ :func:`weight_macs`;
        parameters of the blocks whose pairs cost less in the factored form than materialized,
        with c cotangents) per example."""
        forward = kept = 0
        for index, block in enumerate(plan.blocks):
            if index not in self.blocks:
                continue
            t, i, o, p, _ = self.blocks[index]
            if block.kind in ("linear", "conv"):
                forward += weight_macs(block.kind, t, i, o, block.bias is not None)
                kept += 0 if _dense_is_cheaper(t, i, o, c) else p
            elif block.kind == "embedding":
                kept += p
        return forward, kept

    def engine_counts(self, plan: Plan, c: int) -> tuple[int, int, int]:
        """Multiply-adds per example of the factored blocks with c cotangents: (F, their forward,
        Σ :func:`weight_macs`; F_mat, the forward of the linear and convolutional blocks whose
        per-example gradients materialize, which forming them costs once per cotangent; the
        kernel of one pair of examples over the blocks: T²·(I + c·O) for a block kept in the
        factored form, c·P_block for one materialized, T²·c·O for an embedding)."""
        forward = materialized = pair = 0
        for index, block in enumerate(plan.blocks):
            if index not in self.blocks:
                continue
            t, i, o, p, _ = self.blocks[index]
            if block.kind in ("linear", "conv"):
                macs = weight_macs(block.kind, t, i, o, block.bias is not None)
                forward += macs
                if _dense_is_cheaper(t, i, o, c):
                    materialized += macs
                    pair += c * p
                else:
                    pair += t * t * (i + c * o)
            elif block.kind == "embedding":
                pair += t * t * c * o
            else:
                pair += c * p
        return forward, materialized, pair

    def compact_factors(self, plan: Plan, c: int) -> int:
        """Elements of the compact form (:func:`~genkernel.core.engine.factors.capture` with
        ``form="compact"``) per example with c cotangents."""
        total = 0
        for index, block in enumerate(plan.blocks):
            if index not in self.blocks:
                continue
            t, i, o, p, _ = self.blocks[index]
            if block.kind in ("linear", "conv"):
                total += c * p if _dense_is_cheaper(t, i, o, c) else t * i + c * t * o
            elif block.kind == "embedding":
                total += t + c * t * o
            else:
                total += c * p
        return total


CAPTURE_SHARE = 4  # a compact capture's estimated working memory: at most this share of the budget

_PROBED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _probe_sizes(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...]) -> _Sizes:
    """Per-example element counts (:class:`_Sizes`) from a forward pass on one example,
    remembered per model like :func:`~genkernel.core.engine.factors.covering_plan`'s outcome (same
    structure, per-example shapes and dtypes, and blocks)."""
    key = _covering_key(model, inputs, frozenset(b.name for b in plan.blocks))
    known = _PROBED.get(model, {})
    if key not in known:
        if len(known) >= 8:
            known.pop(next(iter(known)))
        known[key] = _probe(model, plan, inputs)
        _PROBED[model] = known
    return known[key]


def _probe(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...]) -> _Sizes:
    one = tuple(t[:1] for t in inputs)
    sizes = _Sizes()
    block_index = {id(b.module): i for i, b in enumerate(plan.blocks)}
    leaves = {id(m) for m in model.modules() if next(m.children(), None) is None}
    handles = []

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            return
        sizes.act += output.numel()
        if id(module) in leaves:
            sizes.leaf_act += output.numel()
        index = block_index.get(id(module))
        if index is None:
            return
        block = plan.blocks[index]
        numel = sum(block.parameter(n).numel() for n in block.names)
        # I as the compact form counts it: weight columns (when trainable) and a bias column
        i = (0 if block.weight is None else module.weight[0].numel()) + (block.bias is not None)
        if block.kind == "norm":
            sizes.g += output.numel() + numel
            sizes.a += output.numel()
            sizes.xhat += output.numel()
            t, o = 1, 1
        elif block.kind == "conv":
            t, o = output[0, 0].numel(), output.shape[1]
            sizes.a += t * (math.prod(module.kernel_size) * module.in_channels + 1)
            sizes.g += output.numel()
        elif block.kind == "linear":
            o = output.shape[-1]
            t = output.numel() // max(o, 1)
            sizes.a += args[0].numel() + t
            sizes.g += output.numel()
        else:  # embedding
            t, i, o = args[0].numel(), 1, output.shape[-1]
            sizes.a += args[0].numel() + output.numel() // max(output.shape[-1], 1)
            sizes.g += output.numel()
        old = sizes.blocks.get(index, [0, i, o, numel, 0])
        back = t if isinstance(args[0], torch.Tensor) and args[0].requires_grad else 0
        sizes.blocks[index] = [old[0] + t, i, o, numel, old[4] + back]

    for module in model.modules():
        handles.append(module.register_forward_hook(hook))
    try:
        # With a graph (of one example), so that the hook sees which inputs depend on parameters.
        with torch.enable_grad():
            model(*one)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def weight_macs(kind: str, positions: int, inputs: int, outputs: int, bias: bool) -> int:
    """Multiply-adds of one example's product with a block's weight at ``positions`` T, T·I·O,
    for a linear or convolutional block (0 for the others); ``inputs`` I counts a bias column
    when ``bias``, which this leaves out, as torch's operation count does. The forward unit of
    both the kernel engine's choice and the tracker's cost estimate."""
    return positions * (inputs - bias) * outputs if kind in ("linear", "conv") else 0


@dataclass(frozen=True)
class BlockShape:
    """One block of a model's covering plan, per example: ``kind`` (linear, conv, norm,
    embedding), ``positions`` T (summed over its calls), ``inputs`` I (weight columns and a bias
    column), ``outputs`` O, ``parameters`` P_block, and ``input_gradient_positions``: the positions
    whose input depends on a trainable parameter (a backward forms that input's gradient);
    ``bias``: whether one of ``inputs`` is a bias column."""

    kind: str
    positions: int
    inputs: int
    outputs: int
    parameters: int
    input_gradient_positions: int
    bias: bool

    def macs(self, positions: int | None = None) -> int:
        """:func:`weight_macs` of this block at all its positions, or at ``positions`` of them."""
        return weight_macs(self.kind, self.positions if positions is None else positions, self.inputs, self.outputs,
                           self.bias)


def block_shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[list[BlockShape], int]:
    """The blocks of ``model``'s covering plan on ``inputs`` (one example's forward, remembered
    like the plan) and the number of parameters outside them (torch.func's fallback)."""
    plan = covering_plan(model, inputs)
    sizes = _probe_sizes(model, plan, inputs)
    shapes = [BlockShape(block.kind, *sizes.blocks[index], block.bias is not None) for index, block in enumerate(plan.blocks)
              if index in sizes.blocks]
    return shapes, sum(p.numel() for p in plan.fallback.values())


def capture_bytes(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, compact: bool = False,
                  *, jacobian_outputs: str = "all") -> Callable[[int], int]:
    """``c -> bytes`` one example's capture holds with c output cotangents (of d outputs; see
    :func:`chunk_sizes` for ``compact`` and what is counted), with the fallback parameters' Jacobians over
    ``jacobian_outputs``: "all" d outputs (the kernels') or the capture's "chunk" of c (the probe side's,
    :func:`~genkernel.core.engine.per_example.probe_fallback_jacobians`)."""
    if jacobian_outputs not in ("all", "chunk"):
        raise ValueError(f"jacobian_outputs must be 'all' or 'chunk', got {jacobian_outputs!r}")
    # the factors and graph at the parameters' bytes per value, the fallback's Jacobians each in its own dtype
    itemsize = value_bytes(plan.params)
    fallback_bytes = parameter_bytes(plan.fallback)
    sizes = _probe_sizes(model, plan, inputs)

    def per_example(c: int) -> int:
        if compact:
            graph = sizes.compact_factors(plan, c) + sizes.xhat + (2 + c) * sizes.leaf_act
        else:  # factors + the graph (about 4 copies of every activation) + c output gradients
            graph = sizes.a + c * sizes.g + 4 * sizes.act + c * sizes.act
        return itemsize * graph + 2 * (d if jacobian_outputs == "all" else c) * fallback_bytes  # + fallback Jacobians

    return per_example


def chunk_sizes(
    model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, rows_total: int, memory_budget: int, held: int = 2,
    compact: bool = False,
) -> tuple[int, int]:
    """(rows per chunk, cotangents per chunk) keeping ``held`` chunks of factors in the budget.

    ``compact``: the captures keep the compact form (the kernel's): per block the smaller of
    the factors and the per-example gradients, and no unfolded patches. The graph is counted as
    2 copies of every leaf module's output plus c output gradients of that size (measured peak
    of a compact capture: 0.30 MiB per example on the benchmark's convnet and 2.5 MiB on its
    UNet, against 0.57 and 4.5 MiB counted), and one capture takes at most 1/``CAPTURE_SHARE`` of
    the budget: per example a capture is no faster past that, and the working memory grows with
    it (2 CPU cores, default budget: the convnet's 256 rows in one capture took 0.31 s and
    133 MiB, in two 0.28 s and 72 MiB, in four 0.31 s and 52 MiB; the UNet's 64 rows, 0.88 s
    in one, 0.79 s in two). Otherwise the outer form's factors, and the graph as about 4 copies
    of every module output plus c output gradients."""
    memory_budget = check_memory_budget(memory_budget)
    per_example = capture_bytes(model, plan, inputs, d, compact)
    c = d
    while c > 1 and memory_budget // (held * per_example(c)) < min(rows_total, 8):
        c = (c + 1) // 2
    rows = max(1, int(memory_budget // (held * per_example(c))))
    if compact:  # captures past an eighth of the budget are no faster per example, only larger
        rows = min(rows, max(1, int(memory_budget // (CAPTURE_SHARE * per_example(c)))))
    return min(rows, rows_total), c


def row_chunks(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, memory_budget: int) -> list[slice]:
    """The row chunks of :func:`capture_chunks` (with d > 1 cotangents the capture of a chunk of rows fits
    half of the budget only with the outputs chunked as well)."""
    return capture_chunks(model, plan, inputs, d, memory_budget)[0]


def capture_chunks(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, memory_budget: int
                   ) -> tuple[list[slice], list[slice]]:
    """(row chunks of ``inputs``, chunks of the d outputs) such that the capture of one chunk of rows
    with one chunk of output cotangents (:func:`~genkernel.core.engine.factors.capture_by_outputs`) and the
    fallback parameters' Jacobians of those outputs take at most half of the budget: every output at once where
    8 rows (or all) fit so, else of the sizes that fit, the one with the most rows × cotangents per pass."""
    total = batch_size(inputs)
    half = check_memory_budget(memory_budget) // 2
    per_example = _probe_side_bytes(model, plan, inputs, d)
    sizes = [(min(total, int(half // max(per_example(c), 1))), c) for c in _halvings(d)]
    rows, cotangents = sizes[0]
    if rows < min(total, 8):
        rows, cotangents = max(((r, c) for r, c in sizes if r >= 1), key=lambda rc: rc[0] * rc[1], default=(1, 1))
    return list(chunks(total, max(rows, 1))), list(chunks(d, cotangents))


def _probe_side_bytes(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int) -> Callable[[int], int]:
    """``c -> bytes`` an example's capture and fallback Jacobians hold with c of the d outputs: the larger of the
    count (:func:`capture_bytes`, the Jacobians by chunk) and, with d > 1, the measure (:func:`measured_capture`)."""
    modelled = capture_bytes(model, plan, inputs, d, jacobian_outputs="chunk")
    measured = measured_capture(model, plan, inputs, d) if d > 1 else None
    return modelled if measured is None else (lambda c: max(modelled(c), measured(c)))


def measured_capture(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int) -> Callable[[int], int]:
    """``c -> bytes`` one example's probe side holds with c output cotangents at once: the larger of its capture
    (:func:`~genkernel.core.engine.factors.capture_by_outputs`) and, with fallback parameters, jacrev forming c rows
    of their Jacobian, measured (push_memory.LiveBytes) on the first input at two values of c (min(d, 16) and a
    quarter of it) and extended linearly.
    Each cotangent is a backward through the whole graph: through attention, its [heads, T, T] scores, which the
    module outputs :func:`capture_bytes` counts do not see (measured 3.8x and 5.5x its count on a conv net with
    attention from Linear blocks at 10x10 and 12x12). In analysis mode, the buffers and the random state restored,
    once per architecture, input shape and d (push_memory's ``remembered``), under no_grad and outside inference
    mode whatever the caller's (the tracker's captures run under no_grad); 0 where the measure raises (the count
    alone then, the measure taken again at the next call: the capture itself reports its errors)."""
    from ..adapter import analysis_mode, preserved_state
    from ..push_memory import LiveBytes, architecture_key, remembered
    from .factors import capture_by_outputs

    one = tuple(t[:1] for t in inputs)
    # (two counts far apart: extended from 2 and 4 the measure under-counted a UNet2DModel's capture at 64 by 37 %)
    high = min(d, 16)
    low = max(1, high // 4)

    def lines() -> tuple[tuple[int, int], ...] | None:
        theta = {n: p.detach().requires_grad_(True) for n, p in plan.params.items()}
        fallback = {n: theta[n].detach() for n in plan.fallback}

        def peak(run) -> int:
            with LiveBytes((*model.parameters(), *theta.values(), *one)) as live:
                run()
            return live.peak

        def line(measure) -> tuple[int, int]:
            a, b = measure(low), measure(high)
            slope = max((b - a) // (high - low), 1)
            return max(a - low * slope, 0), slope

        try:
            with preserved_state(model), analysis_mode(model):
                found = [line(lambda c: peak(lambda: capture_by_outputs(model, plan, one, [slice(0, c)],
                                                                        lambda o, f: None, parameters=theta)))]
                if fallback:
                    found.append(line(lambda c: peak(
                        lambda: per_example_jacobian(model, fallback, outputs=slice(0, c))(*one))))
        except torch.OutOfMemoryError:
            raise
        except Exception:
            return None
        return tuple(found)

    key = (architecture_key(model, plan.params, one, d), tuple(b.name for b in plan.blocks))
    # In the mode of the captures it sizes (the tracker's step runs them under no_grad), whatever the caller's: under
    # inference mode the measure raised, and with grad enabled it held 1.6x more.
    with torch.inference_mode(False), torch.no_grad():
        measured = remembered("probe capture", key, lines)
    if measured is None:  # a measure that raised (not kept: the next call measures again)
        measured = ()
    return lambda c: max((fixed + c * slope for fixed, slope in measured), default=0)


def probe_capture_bytes(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int,
                        probe_chunks: tuple[list[slice], list[slice]]) -> int:
    """Bytes of the largest capture of ``probe_chunks`` (:func:`capture_chunks`' sizes): its rows times one
    example's capture and fallback Jacobians with its cotangents."""
    row_chunks, output_chunks = probe_chunks
    rows = max(s.stop - s.start for s in row_chunks)
    cotangents = max(s.stop - s.start for s in output_chunks)
    return rows * _probe_side_bytes(model, plan, inputs, d)(cotangents)


def _halvings(d: int) -> Iterator[int]:
    """d, ⌈d/2⌉, ⌈d/4⌉, ..., 1."""
    c = d
    while c > 1:
        yield c
        c = (c + 1) // 2
    yield 1


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)``, as few as that allows
    and of equal sizes (within one row): 256 rows at 236 per chunk are two chunks of 128, not
    236 + 20 (each chunk repeats the fixed costs of a pass)."""
    if n <= 0:
        return
    count = -(-n // max(size, 1))
    base, extra = divmod(n, count)
    start = 0
    for k in range(count):
        stop = start + base + (k < extra)
        yield slice(start, stop)
        start = stop


def fallback_jacobian(model: nn.Module, plan: Plan):
    """The torch.func reference restricted to the plan's fallback parameters (None if there are none)."""
    if not plan.fallback:
        return None
    return per_example_jacobian(model, plan.fallback)


# ---------------------------------------------------------------------------------------------
# 2. The kernel.
# ---------------------------------------------------------------------------------------------
def factored_gradient_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    d: int | None = None,
    diagonals: bool = True,
    plan: Plan | None = None,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradient kernel from captured factors (unnormalized) and both diagonals.

    Args:
        model: the network; outputs flattened to d values per example.
        x1, x2: M and N inputs (``x2=None``: x1 against itself).
        reduce: ``"trace"`` or ``"none"``.
        memory_budget: bytes of captured factors (and the graph they come from) held at once.
        diagonals: also compute k(x, x) and k(x', x') (what normalizing needs); False: None.
        plan: x1's covering plan, when the caller has it (else computed here).
        output_scale: σ, the kernel of the outputs times σ (σ² times the kernel): a power of two keeps every
            product exact, and brings a kernel that a normalization divides out into range.

    Returns:
        ``(kernel, diag1, diag2)``: ``[M, N]`` and ``[M]``, ``[N]`` for ``"trace"``;
        ``[M, N, d, d]`` and ``[M, d]``, ``[N, d]`` for ``"none"``.

    Algorithm:
        1. Plan: supported modules are factored, every other parameter goes to torch.func
           (:func:`~genkernel.core.engine.factors.pair_covering_plan` checks on a sample of x1,
           and of x2 when its inputs are of another kind, that every block's factors give each
           example its own whole gradient); a module found not to keep the batch on dimension 0
           moves to torch.func and the computation restarts. Inputs of two kinds (other
           per-example shapes, another number of tensors) are captured apart, never joined.
        2. When one side's factors fit in half the budget, that side is captured once and held
           in compact form while the other streams past it (:func:`_held_kernel`). Otherwise,
           for each pair of row chunks, one forward pass of the concatenated chunk with hooks
           captures activations; one backward with c output cotangents gives the output
           gradients (chunks of outputs for large d).
        3. Per block, the kernel between the two chunks' factors; fallback parameters add
           J_fb J_fbᵀ.
        4. Symmetric case: only blocks on and above the diagonal are computed, then mirrored.
    """
    if reduce not in ("trace", "none"):  # any other value silently gave the "none" blocks
        raise ValueError(f"reduce must be 'trace' or 'none', got {reduce!r}")
    excluded: set[str] = set()
    xs1 = as_tuple(x1, name="x1")
    xs2 = None if x2 is None else as_tuple(x2, name="x2")
    with analysis(model):
        while True:
            plan = pair_covering_plan(model, xs1, xs2, excluded) if plan is None or excluded else plan
            try:
                kernel, diag1, diag2 = _factored_kernel(model, x1, x2, reduce=reduce, memory_budget=memory_budget, d=d,
                                                        plan=plan, diagonals=diagonals, output_scale=output_scale)
            except Unfactorable as error:
                excluded.add(error.module_name)
                continue
            return (kernel, diag1, diag2) if diagonals else (kernel, None, None)


def _output_cotangents(outputs: list[int], scale: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`~genkernel.core.engine.factors.output_cotangents` times ``scale`` (they themselves for 1)."""
    make = output_cotangents(outputs)
    if scale == 1.0:
        return make

    def scaled(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target, cot = make(raw)
        return target, cot * scale

    return scaled


def _held_kernel(model, plan, xs1, xs2, m_total, n_total, reduce, memory_budget, d, jac_fb, rows, c, diagonals=True,
                 output_scale=1.0):
    """The kernel with one side's factors held: x2 (x1 when symmetric) is captured once and kept
    in compact form, x1 is streamed past it in chunks, so every example is captured once.
    Returns ``(kernel, diag1, diag2)`` (diagonals None unless ``diagonals``), or None when the
    held side would take more than half of ``memory_budget`` (the caller then recomputes factors
    per pair of row chunks). Captures are sized to the other half (``rows`` examples, all d
    outputs: ``c == d``, else None).

    Both sides are captured in compact form (:func:`~genkernel.core.engine.factors.capture`):
    per block the cheaper of the factored form and per-example gradients materialized straight
    from the recorded layouts, so a layer with many positions (a convolution) costs one grouped
    convolution backward per chunk and one matmul per pair of chunks."""
    if c < d:
        return None
    held_xs, held_total = (xs1, m_total) if xs2 is None else (xs2, n_total)

    def side_chunk(xs, r):
        batch = tuple(t[r] for t in xs)
        factors, _ = capture(model, plan, batch, _output_cotangents(list(range(d)), output_scale), form="compact",
                             alone=True)
        return factors, (None if jac_fb is None else jac_fb(*batch).detach())

    # 1. The held side: one capture, or chunk by chunk into preallocated storage.
    held, held_fb = None, None
    held_chunks = list(chunks(held_total, rows))
    for r in held_chunks:
        factors, fb = side_chunk(held_xs, r)
        chunk_bytes = sum(f.nbytes for f in factors) + (0 if fb is None else fb.numel() * fb.element_size())
        if held is None and chunk_bytes / (r.stop - r.start) * held_total > memory_budget // 2:
            return None
        if len(held_chunks) == 1:
            held, held_fb = factors, fb
            break
        if held is None:
            held = [f.allocate(held_total) for f in factors]
            held_fb = None if fb is None else fb.new_empty((held_total, *fb.shape[1:]))
        for target, f in zip(held, factors):
            target.write(r, f)
        if fb is not None:
            held_fb[r] = fb
        del factors, fb

    # 2. Stream x1 past it (symmetric: the held side's own chunks).
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    first = next(iter(plan.params.values()))  # held may be empty: every block moved to torch.func
    dtype = joined_dtype(plan.params)  # (the parameters' dtypes joined: not the first parameter's alone)
    kernel = torch.zeros(shape, dtype=dtype, device=first.device)
    diag_shape = () if reduce == "trace" else (d,)
    diag1 = torch.zeros((m_total, *diag_shape), dtype=dtype, device=first.device) if diagonals else None
    for r in chunks(m_total, rows):
        if xs2 is None:
            whole = r.start == 0 and r.stop == m_total
            factors = held if whole else [f.select(r) for f in held]
            fb = None if held_fb is None else held_fb[r]
        else:
            factors, fb = side_chunk(xs1, r)
        for f1, f2 in zip(factors, held):
            if f1.is_unused:
                continue
            f1.add_pair_kernel(kernel[r], f2, reduce, memory_budget)
            if diagonals:
                diag1[r] += f1.self_kernel(reduce)
        if fb is not None:
            kernel[r] += jacobian_pair_kernel(fb, held_fb, reduce)
            if diagonals:
                diag1[r] += jacobian_self_kernel(fb, reduce)
        del factors, fb
    if xs2 is None or not diagonals:
        return kernel, diag1, diag1
    # From zeros: with every held block unused and no fallback, sum() of nothing was the int 0
    diag2 = torch.zeros((n_total, *diag_shape), dtype=dtype, device=first.device)
    for f in held:
        if not f.is_unused:
            diag2 += f.self_kernel(reduce)
    if held_fb is not None:
        diag2 = diag2 + jacobian_self_kernel(held_fb, reduce)
    return kernel, diag1, diag2


def _factored_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    d: int | None = None,
    plan: Plan,
    diagonals: bool = True,
    output_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs1 = as_tuple(x1, name="x1")
    xs2 = xs1 if x2 is None else as_tuple(x2, name="x2")
    m_total, n_total = batch_size(xs1, name="x1"), batch_size(xs2, name="x2")
    first = next(iter(plan.params.values()))
    if d is None:
        with torch.no_grad(), analysis(model):
            d = flat_output(model(*(t[:1] for t in xs1)), 1).shape[1]
    with analysis(model):
        rows, c_fit = chunk_sizes(model, plan, xs1, d, max(m_total, n_total), memory_budget, held=2, compact=True)
    c = d if reduce == "none" else c_fit
    out_chunks = [list(range(s.start, s.stop)) for s in chunks(d, c)]
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    dtype = joined_dtype(plan.params)  # (the parameters' dtypes joined: not the first parameter's alone)
    kernel = torch.zeros(shape, dtype=dtype, device=first.device)
    diag_shape = () if reduce == "trace" else (d,)
    diag1 = torch.zeros((m_total, *diag_shape), dtype=dtype, device=first.device)
    diag2 = diag1 if x2 is None else torch.zeros((n_total, *diag_shape), dtype=dtype, device=first.device)
    jac_fb = fallback_jacobian(model, plan)
    if jac_fb is not None and output_scale != 1.0:
        unscaled = jac_fb

        def jac_fb(*inputs: torch.Tensor) -> torch.Tensor:
            return unscaled(*inputs) * output_scale

    symmetric = x2 is None
    joint = symmetric or same_kind(xs1, xs2)  # both sides' rows can share one capture

    with analysis(model):
        # 2. When one side's factors fit, capture each side once (no recomputation per pair).
        held = _held_kernel(model, plan, xs1, None if symmetric else xs2, m_total, n_total, reduce, memory_budget, d, jac_fb,
                            rows, c_fit, diagonals, output_scale)
        if held is not None:
            return held

        for r1 in chunks(m_total, rows):
            for r2 in chunks(n_total, rows):
                if symmetric and r2.start < r1.start:
                    continue
                same = symmetric and r2 == r1
                rows1, rows2 = tuple(t[r1] for t in xs1), tuple(t[r2] for t in xs2)
                # Inputs of one kind share a capture; of two kinds (other per-example shapes) they cannot.
                batch = rows1 if same else tuple(torch.cat([a, b]) for a, b in zip(rows1, rows2)) if joint else None
                m = r1.stop - r1.start
                first_pair = r2.start == 0 or (symmetric and same)
                # 2.-3. Factored blocks, per chunk of outputs.
                for outs in out_chunks:
                    if batch is not None:
                        factors, _ = capture(model, plan, batch, _output_cotangents(outs, output_scale), form="compact",
                                             alone=True)
                        pairs = [(f, f) if same else (f.select(slice(0, m)), f.select(slice(m, None))) for f in factors]
                    else:
                        cotangents = _output_cotangents(outs, output_scale)
                        pairs = list(zip(capture(model, plan, rows1, cotangents, form="compact", alone=True)[0],
                                         capture(model, plan, rows2, cotangents, form="compact", alone=True)[0]))
                    for f1, f2 in pairs:
                        if f1.is_unused and f2.is_unused:
                            continue
                        kernel[r1, r2] += f1.pair_kernel(f2, reduce, memory_budget)  # "none": c = d, whole blocks
                        if first_pair:
                            diag1[r1] += f1.self_kernel(reduce)
                        if not symmetric and r1.start == 0:
                            diag2[r2] += f2.self_kernel(reduce)
                    del pairs
                # 3. torch.func fallback parameters.
                if jac_fb is not None:
                    if batch is not None:
                        j = jac_fb(*batch).detach()  # [b, d, P_fb]
                        j1, j2 = (j, j) if same else (j[:m], j[m:])
                    else:
                        j1, j2 = jac_fb(*rows1).detach(), jac_fb(*rows2).detach()
                    kernel[r1, r2] += jacobian_pair_kernel(j1, j2, reduce)
                    if first_pair:
                        diag1[r1] += jacobian_self_kernel(j1, reduce)
                    if not symmetric and r1.start == 0:
                        diag2[r2] += jacobian_self_kernel(j2, reduce)
                # 4. Mirror the symmetric block.
                if symmetric and not same:
                    if reduce == "trace":
                        kernel[r2, r1] = kernel[r1, r2].T
                    else:
                        kernel[r2, r1] = kernel[r1, r2].permute(1, 0, 3, 2)
    return kernel, diag1, diag2


# ---------------------------------------------------------------------------------------------
# 3. Per-example Jacobians (tangent features) from factors.
# ---------------------------------------------------------------------------------------------
def factored_jacobian(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: list[int], plan: Plan | None = None
) -> torch.Tensor:
    """Per-example Jacobians ``[B, c, P]`` (P in ``named_parameters`` order) for model outputs
    ``outputs``, materialized per layer from factors (one forward and one batched backward)."""
    plan = covering_plan(model, inputs) if plan is None else plan
    factors, _ = capture(model, plan, inputs, output_cotangents(outputs), alone=True)
    grads: dict[str, torch.Tensor] = {}
    for f in factors:
        grads.update(f.gradients())
    if plan.fallback:
        j = fallback_jacobian(model, plan)(*inputs).detach()[:, outputs]  # [B, c, P_fb]
        for name, part in split_columns(j, plan.fallback).items():
            grads[name] = part.transpose(0, 1).reshape(len(outputs), -1, *plan.fallback[name].shape)
    b = batch_size(inputs)
    return torch.cat([grads[n].reshape(len(outputs), b, -1) for n in plan.order], dim=2).transpose(0, 1)


__all__ = [
    "BlockShape", "block_shapes", "chunk_sizes", "chunks", "factored_gradient_kernel", "factored_jacobian",
    "capture_chunks", "fallback_jacobian", "probe_capture_bytes", "row_chunks", "weight_macs",
]
