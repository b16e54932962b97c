"""The factored per-layer kernel engine: gradient kernels without per-example gradients.

For a linear map z = W a + b applied at T positions of one example, the example's weight
gradient for output o of the model is G_o = Σ_t g_{o,t} a_tᵀ with g_{o,t} = ∂f_o/∂z_t, so

    ⟨G_o(x), G_o(x')⟩ = Σ_{t,s} (a_t · a'_s) (g_{o,t} · g'_{o,s})        (bias: a ← [a, 1])

and for T = 1 the trace kernel of the layer is (a · a') Σ_o (g_o · g'_o): a Hadamard product of
two small Gram matrices, with no P-sized object anywhere. This module computes gradient
kernels, per-example gradients and tangent features from such factors, captured with module
hooks in one forward pass and one (output-batched) backward pass:

- ``nn.Linear`` (any leading dimensions: positions t), ``nn.Conv1d`` / ``nn.Conv2d`` (unfolded
  patches; per layer and per chunk the engine picks the factored O(T²) form or a materialized
  per-example gradient Σ_t g_t a_tᵀ, whichever costs fewer operations), ``nn.Embedding``
  ((a_t · a'_s) becomes [index_t = index'_s]), and the affine parameters of ``nn.GroupNorm`` /
  ``nn.LayerNorm`` (per-example gradients Σ g ⊙ x̂ and Σ g, materialized: they are C-sized);
- every other trainable parameter (custom modules' own ``nn.Parameter``, grouped convolutions,
  tied weights, modules that do not keep the batch on dimension 0) is handled by ``torch.func``
  per-example Jacobians restricted to those parameters, and added into the same kernel.

The kernel of a model with d outputs is the trace over outputs, Σ_o J_o(x) · J_o(x') (``[M, N]``),
or the blocks J_o(x) · J_q(x') (``[M, N, d, d]``, ``reduce="none"``). Work is chunked over rows
and over outputs so that captured factors stay under ``memory_budget`` bytes.

Every path here is tested against the plain torch.func reference
(``gradient_kernel(..., engine="functional")``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from torch.func import functional_call

from .adapter import Batch, analysis_mode, as_tuple, batch_size, flat_output, output_tensor, trainable_parameters

DEFAULT_MEMORY_BUDGET = 512 * 2**20
ENGINES = ("auto", "factored", "functional")
_FACTORABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.GroupNorm, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# 1. The plan: which parameters go through which path.
# ---------------------------------------------------------------------------------------------
@dataclass
class _Block:
    """A supported module and the full names of its trainable parameters."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv" | "embedding" | "norm"
    weight: str | None
    bias: str | None

    @property
    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]


@dataclass
class Plan:
    """How the engine splits a model's trainable parameters.

    Attributes:
        blocks: supported modules, handled from captured factors.
        fallback: ``{name: parameter}`` handled by torch.func (may be empty).
        order: the trainable parameter names in ``named_parameters`` order.
    """

    blocks: list[_Block]
    fallback: dict[str, torch.Tensor]
    order: list[str]
    params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def factored_fraction(self) -> float:
        """Share of the trainable parameter count handled from factors."""
        total = sum(p.numel() for p in self.params.values())
        fb = sum(p.numel() for p in self.fallback.values())
        return 1.0 - fb / max(total, 1)


def _supported(module: nn.Module) -> str | None:
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


def make_plan(model: nn.Module, exclude: set[str] = frozenset()) -> Plan:
    """Split ``model``'s trainable parameters into factored blocks and a torch.func fallback.

    A module is factored when its type is supported, its configuration is (no grouped or
    non-zero-padded convolution, no embedding max_norm), none of its parameters is shared with
    another module, and its name is not in ``exclude``.
    """
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
        names = {pn: by_id.get(id(p)) for pn, p in own.items()}
        weight, bias = names.get("weight"), names.get("bias")
        if weight is None and bias is None:
            continue
        blocks.append(_Block(mname, module, kind, weight, bias))
        covered.update(n for n in (weight, bias) if n is not None)
    fallback = {n: p for n, p in params.items() if n not in covered}
    return Plan(blocks, fallback, list(params), params)


# ---------------------------------------------------------------------------------------------
# 2. Capture: one forward with hooks, one output-batched backward.
# ---------------------------------------------------------------------------------------------
class Unfactorable(RuntimeError):
    """A module cannot be factored for these inputs (it is moved to the torch.func fallback)."""

    def __init__(self, module_name: str, why: str):
        super().__init__(f"module '{module_name}': {why}")
        self.module_name = module_name


@dataclass
class Factors:
    """Captured factors of one block for a batch of B examples and c output cotangents.

    ``kind="outer"``: ``a [B, T, I]`` (bias: a trailing column of ones) and ``g [c, B, T, O]``;
    ``kind="embedding"``: ``a`` is ``LongTensor[B, T]`` of indices, ``g [c, B, T, D]``;
    ``kind="dense"``: ``g [c, B, P_block]`` per-example gradients, materialized.
    """

    kind: str
    a: torch.Tensor | None
    g: torch.Tensor

    def select(self, rows: slice) -> "Factors":
        if self.kind == "dense":
            return Factors("dense", None, self.g[:, rows])
        return Factors(self.kind, self.a[rows], self.g[:, rows])


def _pad_conv_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad a conv input explicitly (string paddings included); returns (x, kernel)."""
    dims = x.dim() - 2
    kernel = tuple(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [(0, 0)] * dims
        else:  # "same": PyTorch puts the extra element on the right
            pads = []
            for k, dil in zip(kernel, module.dilation):
                total = dil * (k - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in module.padding]
    flat = [v for pair in reversed(pads) for v in pair]
    return (F.pad(x, flat) if any(flat) else x), kernel


def _activation(block: _Block, inputs: tuple, batch: int) -> torch.Tensor:
    """Per-example activation factor of one call: ``[B, T, I]`` (or indices, or x̂)."""
    module = block.module
    x = inputs[0]
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
        raise Unfactorable(block.name, "its input does not keep the batch on dimension 0")
    x = x.detach()
    if block.kind == "linear":
        a = x.reshape(batch, -1, x.shape[-1])
        if block.weight is None:
            a = a.new_zeros((*a.shape[:2], 0))
        if block.bias is not None:
            a = torch.cat([a, a.new_ones((*a.shape[:2], 1))], dim=2)
        return a
    if block.kind == "conv":
        xp, kernel = _pad_conv_input(module, x)
        if x.dim() == 3:  # Conv1d as a Conv2d of height 1
            xp = xp.unsqueeze(2)
            kernel, dilation, stride = (1, kernel[0]), (1, module.dilation[0]), (1, module.stride[0])
        else:
            dilation, stride = tuple(module.dilation), tuple(module.stride)
        patches = F.unfold(xp, kernel, dilation=dilation, stride=stride)  # [B, I·k, T]
        a = patches.transpose(1, 2)
        if block.weight is None:
            a = a.new_zeros((*a.shape[:2], 0))
        if block.bias is not None:
            a = torch.cat([a, a.new_ones((*a.shape[:2], 1))], dim=2)
        return a
    if block.kind == "embedding":
        return x.reshape(batch, -1).clone()
    # norm: the normalized input x̂
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


def _block_factors(block: _Block, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> Factors:
    """Combine the calls of one block (a module used several times adds positions)."""
    module = block.module
    if block.kind in ("linear", "conv", "embedding"):
        acts, grads = [], []
        for a, g in calls:
            c = g.shape[0]
            if block.kind == "conv":
                g = g.reshape(c, batch, g.shape[2], -1).transpose(2, 3)  # [c, B, T, O]
            else:
                g = g.reshape(c, batch, -1, g.shape[-1])
            if block.kind == "embedding" and module.padding_idx is not None:
                g = g * (a != module.padding_idx).unsqueeze(-1).to(g.dtype)
            acts.append(a)
            grads.append(g)
        kind = "embedding" if block.kind == "embedding" else "outer"
        return Factors(kind, torch.cat(acts, dim=1), torch.cat(grads, dim=2))
    # norms: per-example gradients of weight and bias, summed over calls
    total = None
    for xhat, g in calls:
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
    return Factors("dense", None, total)


def capture(
    model: nn.Module,
    plan: Plan,
    inputs: tuple[torch.Tensor, ...],
    cotangents: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    parameters: dict[str, torch.Tensor] | None = None,
) -> tuple[list[Factors], torch.Tensor]:
    """Factors of every block for one batch.

    Args:
        inputs: the batch, B examples on dimension 0.
        cotangents: ``out -> (target, E)`` with ``E [c, *target.shape]``, where ``out`` is the
            model's output tensor in its own shape (what a loss function receives in training):
            the backward computes, for each of the c cotangents, ∂⟨E_k, target⟩/∂z at every
            block output z.
        parameters: trainable parameters to run the model at (``torch.func.functional_call``;
            they must require grad); by default the module's own.

    Returns:
        (one :class:`Factors` per block of ``plan``, the detached model output ``[B, d]``).
    """
    batch = batch_size(inputs)
    records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(plan.blocks))}
    handles = []

    def make_hook(index: int, block: _Block):
        def hook(module, args, output):
            a = _activation(block, args, batch)
            if not isinstance(output, torch.Tensor) or output.shape[0] != batch:
                raise Unfactorable(block.name, "its output does not keep the batch on dimension 0")
            # A clone for downstream use: in-place ops after the module cannot touch `output`.
            records[index].append((a, output))
            return output.clone()

        return hook

    try:
        for index, block in enumerate(plan.blocks):
            handles.append(block.module.register_forward_hook(make_hook(index, block)))
        with torch.enable_grad():
            if parameters is None:
                raw = output_tensor(model(*inputs))
            else:
                raw = output_tensor(functional_call(model, parameters, inputs, strict=False, tie_weights=True))
            out = flat_output(raw, batch)
    finally:
        for handle in handles:
            handle.remove()
    used = [(i, j) for i in range(len(plan.blocks)) for j in range(len(records[i]))]
    zs = [records[i][j][1] for i, j in used]
    with torch.enable_grad():  # callers may run under no_grad: the cotangents' target needs its graph
        target, cot = cotangents(raw)
        grads = _batched_grad(target, zs, cot)
    calls: dict[int, list] = {i: [] for i in range(len(plan.blocks))}
    for (i, j), g in zip(used, grads):
        z = records[i][j][1]
        g = torch.zeros((cot.shape[0], *z.shape), dtype=z.dtype, device=z.device) if g is None else g
        calls[i].append((records[i][j][0], g.detach()))
    factors = []
    for i, block in enumerate(plan.blocks):
        if not calls[i]:  # the module was not called: its gradients are zero
            factors.append(Factors("dense", None, out.new_zeros((cot.shape[0], batch, 0))))
            continue
        factors.append(_block_factors(block, calls[i], batch))
    return factors, out.detach()


def _batched_grad(target: torch.Tensor, zs: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor | None]:
    """∂⟨E_k, target⟩/∂z for every z and cotangent k: ``[c, *z.shape]`` each (None: unused)."""
    if not zs:
        return []
    if cot.shape[0] == 1:
        grads = torch.autograd.grad(target, zs, grad_outputs=cot[0], retain_graph=False, allow_unused=True)
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

    def make(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = raw.reshape(raw.shape[0], -1)
        cot = out.new_zeros((len(outputs), *out.shape))
        for k, o in enumerate(outputs):
            cot[k, :, o] = 1
        return out, cot

    return make


# ---------------------------------------------------------------------------------------------
# 3. Kernels between factors.
# ---------------------------------------------------------------------------------------------
def _as_dense(f: Factors) -> torch.Tensor:
    """Per-example gradients ``[c, B, P]`` of a block (materialized)."""
    if f.kind == "dense":
        return f.g
    if f.kind == "outer":
        c, b = f.g.shape[:2]
        return torch.einsum("cbto,bti->cboi", f.g, f.a).reshape(c, b, -1)
    raise TypeError("embedding factors are never materialized")


def _activation_gram(f1: Factors, f2: Factors) -> torch.Tensor:
    """S[b, e, t, s] = a_{b,t} · a'_{e,s} (embedding: [index_{b,t} = index'_{e,s}])."""
    if f1.kind == "embedding":
        return (f1.a[:, None, :, None] == f2.a[None, :, None, :]).to(f1.g.dtype)
    return torch.einsum("bti,esi->bets", f1.a, f2.a)


def _prefer_dense(f1: Factors, f2: Factors, budget: int) -> bool:
    """Step 3a: operation counts of the factored O(T²) form against materializing."""
    if f1.kind != "outer":
        return f1.kind == "dense"
    c, m, t, o = f1.g.shape
    n, s = f2.g.shape[1], f2.g.shape[2]
    i = f1.a.shape[2]
    if t == 1 and s == 1:
        return False
    factored = m * n * t * s * (i + c * o)
    dense = (m * t + n * s) * c * i * o + m * n * c * i * o
    too_big = m * n * t * s * f1.g.element_size() * 2 > budget
    return dense < factored or too_big


def pair_kernel(f1: Factors, f2: Factors, reduce: str, budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """One block's kernel between two batches of factors.

    Returns ``[m, n]`` (``reduce="trace"``: Σ over the c shared cotangents) or ``[m, n, c1, c2]``.
    """
    if _prefer_dense(f1, f2, budget):
        d1, d2 = _as_dense(f1), _as_dense(f2)
        # One matmul per cotangent (pair): an einsum would copy both sides into a [B, c·P] layout.
        if reduce == "trace":
            return sum(d1[k] @ d2[k].T for k in range(d1.shape[0]))
        out = d1.new_empty((d1.shape[1], d2.shape[1], d1.shape[0], d2.shape[0]))
        for k in range(d1.shape[0]):
            for q in range(d2.shape[0]):
                out[:, :, k, q] = d1[k] @ d2[q].T
        return out
    # 3b. Factored: S ⊙ (g g'ᵀ), summed over positions.
    if f1.a.shape[1] == 1 and f2.a.shape[1] == 1 and f1.kind == "outer":
        s = f1.a[:, 0] @ f2.a[:, 0].T  # [m, n]
        if reduce == "trace":
            gg = torch.einsum("cbo,ceo->be", f1.g[:, :, 0], f2.g[:, :, 0])
            return s * gg
        return s[:, :, None, None] * torch.einsum("cbo,deo->becd", f1.g[:, :, 0], f2.g[:, :, 0])
    s = _activation_gram(f1, f2)  # [m, n, T, S]
    c1, c2 = f1.g.shape[0], f2.g.shape[0]
    if reduce == "trace":
        out = s.new_zeros(s.shape[:2])
        for k in range(c1):
            out += torch.einsum("bets,bto,eso->be", s, f1.g[k], f2.g[k])
        return out
    out = s.new_zeros((s.shape[0], s.shape[1], c1, c2))
    for k in range(c1):
        for q in range(c2):
            out[:, :, k, q] = torch.einsum("bets,bto,eso->be", s, f1.g[k], f2.g[q])
    return out


def self_kernel(f: Factors, reduce: str) -> torch.Tensor:
    """Diagonal k(x, x) of one block: ``[B]`` (trace) or ``[B, c]`` (per output)."""
    c, t = f.g.shape[0], f.g.shape[2] if f.kind != "dense" else 1
    # Many positions: materializing Σ_t g_t a_tᵀ (T·c·I·O per example) beats the T² form
    # (T²·(I + c·O)), as in pair_kernel's choice.
    if f.kind == "outer" and t > 1 and t * (f.a.shape[2] + c * f.g.shape[3]) > c * f.a.shape[2] * f.g.shape[3]:
        f = Factors("dense", None, _as_dense(f))
    if f.kind == "dense":
        d = f.g
        per = (d * d).sum(dim=2)  # [c, B]
    elif f.kind == "outer" and f.a.shape[1] == 1:
        per = (f.a[:, 0] * f.a[:, 0]).sum(1)[None, :] * (f.g[:, :, 0] ** 2).sum(2)
    else:
        if f.kind == "embedding":
            s = (f.a[:, :, None] == f.a[:, None, :]).to(f.g.dtype)
        else:
            s = torch.einsum("bti,bsi->bts", f.a, f.a)
        per = torch.einsum("bts,cbto,cbso->cb", s, f.g, f.g)
    return per.sum(0) if reduce == "trace" else per.T


# ---------------------------------------------------------------------------------------------
# 4. Chunk sizes from a memory budget.
# ---------------------------------------------------------------------------------------------
def _probe_sizes(model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int, int]:
    """Per-example element counts: (activation factors, output-gradient factors per cotangent,
    all module outputs) from a forward pass on one example."""
    one = tuple(t[:1] for t in inputs)
    sizes = {"a": 0, "g": 0, "act": 0}
    block_modules = {id(b.module): b for b in plan.blocks}
    handles = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            sizes["act"] += output.numel()
            block = block_modules.get(id(module))
            if block is not None:
                if block.kind == "norm":
                    sizes["g"] += output.numel() + sum(p.numel() for p in module.parameters(recurse=False))
                    sizes["a"] += output.numel()
                elif block.kind == "conv":
                    k = math.prod(module.kernel_size) * module.in_channels + 1
                    positions = output[0, 0].numel()
                    sizes["a"] += positions * k
                    sizes["g"] += output.numel()
                else:
                    sizes["a"] += args[0].numel() + output.numel() // max(output.shape[-1], 1)
                    sizes["g"] += output.numel()

    for module in model.modules():
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*one)
    finally:
        for handle in handles:
            handle.remove()
    return sizes["a"], sizes["g"], sizes["act"]


def chunk_sizes(
    model: nn.Module, plan: Plan, inputs: tuple[torch.Tensor, ...], d: int, rows_total: int, memory_budget: int, held: int = 2
) -> tuple[int, int]:
    """(rows per chunk, cotangents per chunk) keeping ``held`` chunks of factors in the budget."""
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    itemsize = next(iter(plan.params.values())).element_size()
    a_size, g_size, act = _probe_sizes(model, plan, inputs)
    fb = sum(p.numel() for p in plan.fallback.values())

    def per_example(c: int) -> int:
        # factors + the graph (about 4 copies of every activation, clones included) + c output gradients, + fallback Jacobians
        return itemsize * (a_size + c * g_size + 4 * act + c * act + 2 * d * fb)

    c = d
    while c > 1 and memory_budget // (held * per_example(c)) < min(rows_total, 8):
        c = (c + 1) // 2
    rows = max(1, memory_budget // (held * per_example(c)))
    return min(rows, rows_total), c


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ---------------------------------------------------------------------------------------------
# 5. The kernel.
# ---------------------------------------------------------------------------------------------
def _fallback_jacobian(model: nn.Module, plan: Plan):
    from .kernels import per_example_jacobian  # the torch.func reference, restricted

    if not plan.fallback:
        return None
    return per_example_jacobian(model, plan.fallback)


def factored_gradient_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient kernel from captured factors (unnormalized) and both diagonals.

    Args:
        model: the network; outputs flattened to d values per example.
        x1, x2: M and N inputs (``x2=None``: x1 against itself).
        reduce: ``"trace"`` or ``"none"``.
        memory_budget: bytes of captured factors (and the graph they come from) held at once.

    Returns:
        ``(kernel, diag1, diag2)``: ``[M, N]`` and ``[M]``, ``[N]`` for ``"trace"``;
        ``[M, N, d, d]`` and ``[M, d]``, ``[N, d]`` for ``"none"``.

    Algorithm:
        1. Plan: supported modules are factored, every other parameter goes to torch.func; a
           module found not to keep the batch on dimension 0 moves to torch.func and the
           computation restarts.
        2. For each pair of row chunks (one chunk when x2 is None and fits), one forward pass of
           the concatenated chunk with hooks captures activations a; one backward with c output
           cotangents at once gives the output gradients g (chunks of outputs for large d).
        3. Per block, the kernel between the two chunks' factors (factored S ⊙ gg' or
           materialized, whichever is cheaper); fallback parameters add J_fb J_fbᵀ.
        4. Symmetric case: only blocks on and above the diagonal are computed, then mirrored.
    """
    excluded: set[str] = set()
    while True:
        plan = make_plan(model, excluded)
        try:
            return _factored_kernel(model, x1, x2, reduce=reduce, memory_budget=memory_budget, d=d, plan=plan)
        except Unfactorable as error:
            excluded.add(error.module_name)


def split_columns(jac: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of a Jacobian ``[m, d, P]`` whose columns run over ``params`` in order: ``{name: [m, d, numel]}``."""
    out, offset = {}, 0
    for name, p in params.items():
        out[name] = jac[:, :, offset : offset + p.numel()]
        offset += p.numel()
    return out


def jacobian_pair_kernel(j1: torch.Tensor, j2: torch.Tensor, reduce: str) -> torch.Tensor:
    """Kernel between per-example Jacobians ``[m, d, P]`` and ``[n, d, P]``: ``[m, n]`` (trace)
    or ``[m, n, d, d]`` (``reduce="none"``)."""
    return torch.einsum("mdp,ndp->mn", j1, j2) if reduce == "trace" else torch.einsum("mdp,nep->mnde", j1, j2)


def jacobian_self_kernel(j: torch.Tensor, reduce: str) -> torch.Tensor:
    """Diagonal of :func:`jacobian_pair_kernel` for ``[m, d, P]``: ``[m]`` or ``[m, d]``."""
    return (j * j).sum(dim=(1, 2)) if reduce == "trace" else (j * j).sum(dim=2)


def _compact(f: Factors) -> Factors:
    """A block's factors in the cheaper form for pair kernels: per-example gradients Σ_t g_t a_tᵀ
    where a pair costs less materialized (c·I·O) than in the T² factored form (T²·(I + c·O))."""
    if f.kind == "outer" and f.a.shape[1] > 1:
        c, _, t, o = f.g.shape
        i = f.a.shape[2]
        if t * t * (i + c * o) > c * i * o:
            return Factors("dense", None, _as_dense(f))
    return f


def _factor_bytes(f: Factors) -> int:
    return sum(t.numel() * t.element_size() for t in (f.a, f.g) if t is not None)


def concat_factors(chunks: list[Factors]) -> Factors:
    """Factors of consecutive row chunks of one block, joined along the batch."""
    first = chunks[0]
    if len(chunks) == 1:
        return first
    a = None if first.a is None else torch.cat([f.a for f in chunks])
    return Factors(first.kind, a, torch.cat([f.g for f in chunks], dim=1))


def _held_kernel(model, plan, xs1, xs2, m_total, n_total, reduce, memory_budget, d, jac_fb):
    """The kernel with one side's factors held: x2 (x1 when symmetric) is captured once and kept
    in compact form, x1 is streamed past it in chunks, so every example is captured once.
    Returns ``(kernel, diag1, diag2)``, or None when the held side would take more than half of
    ``memory_budget`` (the caller then recomputes factors per pair of row chunks). Captures are
    sized to the other half."""
    rows, c = chunk_sizes(model, plan, xs1, d, max(m_total, n_total), memory_budget, held=2)
    if c < d:
        return None
    held_xs, held_total = (xs1, m_total) if xs2 is None else (xs2, n_total)

    def side_chunk(xs, r):
        batch = tuple(t[r] for t in xs)
        factors, _ = capture(model, plan, batch, output_cotangents(list(range(d))))
        return [_compact(f) for f in factors], (None if jac_fb is None else jac_fb(*batch).detach())

    # 1. The held side, chunk by chunk into preallocated storage (no concatenated copy).
    held, held_fb = None, None
    for r in _chunks(held_total, rows):
        factors, fb = side_chunk(held_xs, r)
        if held is None:
            chunk_bytes = sum(_factor_bytes(f) for f in factors) + (0 if fb is None else fb.numel() * fb.element_size())
            per_example = chunk_bytes / (r.stop - r.start)
            if per_example * held_total > memory_budget // 2:
                return None
            held = [_allocate(f, held_total) for f in factors]
            held_fb = None if fb is None else fb.new_empty((held_total, *fb.shape[1:]))
        for target, f in zip(held, factors):
            _write(target, f, r)
        if fb is not None:
            held_fb[r] = fb
        del factors, fb

    # 2. Stream x1 past it (symmetric: the held side's own chunks).
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    first = held[0].g
    kernel = torch.zeros(shape, dtype=first.dtype, device=first.device)
    diag_shape = () if reduce == "trace" else (d,)
    diag1 = torch.zeros((m_total, *diag_shape), dtype=first.dtype, device=first.device)
    for r in _chunks(m_total, rows):
        if xs2 is None:
            factors, fb = [f.select(r) for f in held], (None if held_fb is None else held_fb[r])
        else:
            factors, fb = side_chunk(xs1, r)
        for f1, f2 in zip(factors, held):
            if f1.kind == "dense" and f1.g.shape[-1] == 0:
                continue
            kernel[r] += pair_kernel(f1, f2, reduce, memory_budget)
            diag1[r] += self_kernel(f1, reduce)
        if fb is not None:
            kernel[r] += jacobian_pair_kernel(fb, held_fb, reduce)
            diag1[r] += jacobian_self_kernel(fb, reduce)
    if xs2 is None:
        return kernel, diag1, diag1
    diag2 = sum(self_kernel(f, reduce) for f in held if not (f.kind == "dense" and f.g.shape[-1] == 0))
    if held_fb is not None:
        diag2 = diag2 + jacobian_self_kernel(held_fb, reduce)
    return kernel, diag1, diag2


def _allocate(f: Factors, total: int) -> Factors:
    """Empty factors like ``f`` for ``total`` examples."""
    a = None if f.a is None else f.a.new_empty((total, *f.a.shape[1:]))
    return Factors(f.kind, a, f.g.new_empty((f.g.shape[0], total, *f.g.shape[2:])))


def _write(target: Factors, f: Factors, rows: slice) -> None:
    if f.a is not None:
        target.a[rows] = f.a
    target.g[:, rows] = f.g


def _factored_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    reduce: str = "trace",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    d: int | None = None,
    plan: Plan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs1 = as_tuple(x1, name="x1")
    xs2 = xs1 if x2 is None else as_tuple(x2, name="x2")
    m_total, n_total = batch_size(xs1, name="x1"), batch_size(xs2, name="x2")
    first = next(iter(plan.params.values()))
    if d is None:
        with torch.no_grad(), analysis_mode(model):
            d = flat_output(model(*(t[:1] for t in xs1)), 1).shape[1]
    with analysis_mode(model):
        rows, c = chunk_sizes(model, plan, xs1, d, max(m_total, n_total), memory_budget, held=2)
    if reduce == "none":
        c = d
    out_chunks = [list(range(s.start, s.stop)) for s in _chunks(d, c)]
    shape = (m_total, n_total) if reduce == "trace" else (m_total, n_total, d, d)
    kernel = torch.zeros(shape, dtype=first.dtype, device=first.device)
    diag_shape = () if reduce == "trace" else (d,)
    diag1 = torch.zeros((m_total, *diag_shape), dtype=first.dtype, device=first.device)
    diag2 = diag1 if x2 is None else torch.zeros((n_total, *diag_shape), dtype=first.dtype, device=first.device)
    jac_fb = _fallback_jacobian(model, plan)
    symmetric = x2 is None

    with analysis_mode(model):
        # 2'. When both sides' factors fit, capture each side once (no recomputation per pair).
        held = _held_kernel(model, plan, xs1, None if symmetric else xs2, m_total, n_total, reduce, memory_budget, d, jac_fb)
        if held is not None:
            return held

        for r1 in _chunks(m_total, rows):
            for r2 in _chunks(n_total, rows):
                if symmetric and r2.start < r1.start:
                    continue
                same = symmetric and r2 == r1
                batch = tuple(t[r1] for t in xs1) if same else tuple(
                    torch.cat([a[r1], b[r2]]) for a, b in zip(xs1, xs2)
                )
                m = r1.stop - r1.start
                first_pair = r2.start == 0 or (symmetric and same)
                # 2.-3. Factored blocks, per chunk of outputs.
                for outs in out_chunks:
                    factors, _ = capture(model, plan, batch, output_cotangents(outs))
                    for f in factors:
                        if f.kind == "dense" and f.g.shape[-1] == 0:
                            continue
                        f1 = f if same else f.select(slice(0, m))
                        f2 = f if same else f.select(slice(m, None))
                        kernel[r1, r2] += pair_kernel(f1, f2, reduce, memory_budget)  # "none": c = d, whole blocks
                        if first_pair:
                            diag1[r1] += self_kernel(f1, reduce)
                        if not symmetric and r1.start == 0:
                            diag2[r2] += self_kernel(f2, reduce)
                    del factors
                # 3. torch.func fallback parameters.
                if jac_fb is not None:
                    j = jac_fb(*batch).detach()  # [b, d, P_fb]
                    j1, j2 = (j, j) if same else (j[:m], j[m:])
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
# 6. Per-example gradients (tangent features, loss gradients) from factors.
# ---------------------------------------------------------------------------------------------
def block_gradients(block: _Block, f: Factors) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: [c, B, *shape]}`` of one block, from its factors."""
    module = block.module
    c = f.g.shape[0]
    b = f.g.shape[1]
    out: dict[str, torch.Tensor] = {}
    if f.kind == "embedding":
        weight = module.weight
        grad = f.g.new_zeros((c, b, weight.shape[0], weight.shape[1]))
        index = f.a[None, :, :, None].expand(c, -1, -1, weight.shape[1])
        grad.scatter_add_(2, index, f.g)
        out[block.weight] = grad
        return out
    if f.kind == "outer":
        if block.weight is not None:
            w = module.weight
            a = f.a[..., :-1] if block.bias is not None else f.a
            out[block.weight] = torch.einsum("cbto,bti->cboi", f.g, a).reshape(c, b, *w.shape)
        if block.bias is not None:
            out[block.bias] = f.g.sum(dim=2)
        return out
    offset = 0
    for name, p in ((block.weight, module.weight), (block.bias, module.bias)):
        if name is None:
            continue
        out[name] = f.g[:, :, offset : offset + p.numel()].reshape(c, b, *p.shape)
        offset += p.numel()
    return out


def factored_jacobian(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: list[int], plan: Plan | None = None
) -> torch.Tensor:
    """Per-example Jacobians ``[B, c, P]`` (P in ``named_parameters`` order) for model outputs
    ``outputs``, materialized per layer from factors (one forward and one batched backward)."""
    plan = make_plan(model) if plan is None else plan
    factors, _ = capture(model, plan, inputs, output_cotangents(outputs))
    grads: dict[str, torch.Tensor] = {}
    for block, f in zip(plan.blocks, factors):
        grads.update(block_gradients(block, f))
    if plan.fallback:
        j = _fallback_jacobian(model, plan)(*inputs).detach()[:, outputs]  # [B, c, P_fb]
        for name, part in split_columns(j, plan.fallback).items():
            grads[name] = part.transpose(0, 1).reshape(len(outputs), -1, *plan.fallback[name].shape)
    b = batch_size(inputs)
    return torch.cat([grads[n].reshape(len(outputs), b, -1) for n in plan.order], dim=2).transpose(0, 1)


def factored_group_gradients(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    targets,
    loss_fn,
    groups: torch.Tensor,
    coefficients: torch.Tensor,
    num_groups: int,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ĝ_g = Σ_{n ∈ g} c_n ∇ℓ_n from captured factors: the same contract as
    :func:`genkernel.core.pergrad.group_gradients` (the torch.func reference it is tested against).

    Algorithm:
        1. One forward of a chunk with hooks; per-example losses ℓ_n = loss_fn(f(x_n), y_n).
        2. One backward of Σ_n ℓ_n gives each example's output gradients (examples are
           independent); per layer, per-example gradients Σ_t g_t a_tᵀ are materialized one block
           at a time, scaled by c_n and index-added into the G groups in float64.
        3. Parameters outside supported modules: the torch.func reference, restricted to them.

    Returns:
        ``({name: Tensor[G, *shape] float64}, losses Tensor[B])``.
    """
    from .pergrad import group_gradients

    plan = make_plan(model)
    targets_tuple = None if targets is None else ((targets,) if isinstance(targets, torch.Tensor) else tuple(targets))
    batch = batch_size(inputs)
    sums = {n: torch.zeros((num_groups, *p.shape), dtype=torch.float64, device=p.device) for n, p in params.items()}
    largest = max(p.numel() for p in params.values())
    rows = max(1, memory_budget // (4 * largest * next(iter(params.values())).element_size()))
    losses = []
    for start in range(0, batch, rows):
        chunk = slice(start, min(start + rows, batch))
        xs = tuple(t[chunk] for t in inputs)
        ys = None if targets_tuple is None else tuple(t[chunk] for t in targets_tuple)
        y = None if ys is None else (ys[0] if isinstance(targets, torch.Tensor) else ys)
        box = {}

        def cotangents(out):
            value = loss_fn(out, y)
            box["losses"] = value.detach()
            return value, torch.ones((1, *value.shape), dtype=value.dtype, device=value.device)

        factors, _ = capture(model, plan, xs, cotangents)
        losses.append(box["losses"])
        scale = coefficients[chunk].to(torch.float64)
        index = groups[chunk]
        for block, f in zip(plan.blocks, factors):
            if f.kind == "dense" and f.g.shape[-1] == 0:
                continue
            for name, g in block_gradients(block, f).items():
                if name in sums:
                    g = g[0].to(torch.float64)
                    sums[name].index_add_(0, index, g * scale.view(-1, *([1] * (g.dim() - 1))))
    fallback = {n: params[n] for n in plan.fallback if n in params}
    if fallback:
        extra, _ = group_gradients(
            model, fallback, inputs, targets, loss_fn, groups, coefficients, num_groups, memory_budget=memory_budget
        )
        sums.update(extra)
    return sums, torch.cat(losses)


__all__ = [
    "ENGINES", "Factors", "Plan", "Unfactorable", "capture", "factored_gradient_kernel", "factored_group_gradients",
    "factored_jacobian",
    "make_plan", "output_cotangents", "pair_kernel", "self_kernel",
]
