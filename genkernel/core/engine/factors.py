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
(per-example gradients Σ g ⊙ x̂ and Σ g, materialized: they are C-sized). A module whose
parameters are shared with another module, or that is used in a way the hooks cannot see, is
left to the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import analysis_mode, batch_size, call_with, flat_output, output_tensor, trainable_parameters

DEFAULT_MEMORY_BUDGET = 512 * 2**20


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


def make_plan(model: nn.Module, exclude: Iterable[str] = frozenset()) -> Plan:
    """Split ``model``'s trainable parameters into factored blocks and a torch.func fallback.

    A module is factored when its type is supported, its configuration is (no grouped or
    non-zero-padded convolution, no embedding max_norm), none of its parameters is shared with
    another module, and its name is not in ``exclude``.
    """
    exclude = set(exclude)
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


def covering_plan(model: nn.Module, inputs: tuple[torch.Tensor, ...], exclude: Iterable[str] = frozenset()) -> Plan:
    """:func:`make_plan`, checked on ``inputs``: a block whose factors do not give its parameters'
    whole gradient moves to the torch.func fallback.

    A module's hooks see only its own forward calls. A parameter also read elsewhere (attention's
    ``out_proj.weight`` inside ``F.multi_head_attention_forward``, an embedding tied to an output
    head through ``F.linear(h, emb.weight)``, any functional use) would silently lose that part of
    its gradient. The check is the gradient-sum identity on the first two examples: for a random
    cotangent E, Σ_n ∂⟨E_n, f(x_n)⟩/∂θ read from the factors must equal autograd's gradient of
    ⟨E, f(x)⟩ with respect to the parameter (relative 1e-9 in float64, 1e-4 in float32). Modules
    that do not keep the batch on dimension 0 move to the fallback too. Cost: two forward and
    backward passes on two examples.
    """
    exclude = set(exclude)
    sample = tuple(t[:2] for t in inputs)
    while True:
        plan = make_plan(model, exclude)
        if not plan.blocks:
            return plan
        try:
            with analysis_mode(model):
                uncovered = _uncovered_blocks(model, plan, sample)
        except Unfactorable as error:
            exclude.add(error.module_name)
            continue
        if not uncovered:
            return plan
        exclude.update(uncovered)


def _uncovered_blocks(model: nn.Module, plan: Plan, sample: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of the blocks whose factors miss part of their parameters' gradient on ``sample``."""
    generator = torch.Generator().manual_seed(0)
    box: dict[str, torch.Tensor] = {}

    def cotangent(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "E" not in box:
            box["E"] = torch.randn(raw.shape, generator=generator, dtype=torch.float64).to(raw)
        return raw, box["E"][None]

    factors, _ = capture(model, plan, sample, cotangent)
    params = [p for block in plan.blocks for p in (block.parameter(n) for n in block.names)]
    with torch.enable_grad():
        raw = output_tensor(model(*sample))
        true = torch.autograd.grad((raw * box["E"]).sum(), params, allow_unused=True)
    true_by_id = {id(p): g for p, g in zip(params, true)}
    uncovered = []
    for f in factors:
        for name, total in f.totals().items():
            p = f.block.parameter(name)
            reference = true_by_id[id(p)]
            reference = torch.zeros_like(total) if reference is None else reference.to(torch.float64)
            gap = float((total - reference).norm())
            scale = float(reference.norm() + total.norm())
            if gap > COVERAGE_RTOL.get(p.dtype, 1e-3) * scale + torch.finfo(torch.float64).tiny:
                uncovered.append(f.block.name)
                break
    return uncovered


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

    @staticmethod
    def concat(chunks: list["Factors"]) -> "Factors":
        """Factors of consecutive row chunks of one block, joined along the batch."""
        first = chunks[0]
        if len(chunks) == 1:
            return first
        a = None if first.a is None else torch.cat([f.a for f in chunks])
        return Factors(first.block, first.kind, a, torch.cat([f.g for f in chunks], dim=1))

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
        if self.kind == "outer" and self.a.shape[1] > 1:
            c, _, t, o = self.g.shape
            i = self.a.shape[2]
            if t * t * (i + c * o) > c * i * o:
                return Factors(self.block, "dense", None, self.as_dense())
        return self

    # -- gradients --------------------------------------------------------------------------
    def as_dense(self) -> torch.Tensor:
        """Per-example gradients ``[c, B, P_block]`` of the block (materialized)."""
        if self.kind == "dense":
            return self.g
        if self.kind == "outer":
            c, b = self.g.shape[:2]
            return torch.einsum("cbto,bti->cboi", self.g, self.a).reshape(c, b, -1)
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
        # Many positions: materializing Σ_t g_t a_tᵀ (T·c·I·O per example) beats the T² form
        # (T²·(I + c·O)), as in pair_kernel's choice.
        if f.kind == "outer" and t > 1 and t * (f.a.shape[2] + c * f.g.shape[3]) > c * f.a.shape[2] * f.g.shape[3]:
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

    def pair_kernel(self, other: "Factors", reduce: str, budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
        """The block's kernel between these factors and ``other``'s.

        Returns ``[m, n]`` (``reduce="trace"``: Σ over the c shared cotangents) or
        ``[m, n, c1, c2]``. Per pair the cheaper of the factored S ⊙ (g g'ᵀ) form and
        materialized per-example gradients is used (operation counts, and the factored form's
        memory against ``budget``).
        """
        f1, f2 = self, other
        if _prefer_dense(f1, f2, budget):
            d1, d2 = f1.as_dense(), f2.as_dense()
            # One matmul per cotangent (pair): an einsum would copy both sides into a [B, c·P] layout.
            if reduce == "trace":
                return sum(d1[k] @ d2[k].T for k in range(d1.shape[0]))
            out = d1.new_empty((d1.shape[1], d2.shape[1], d1.shape[0], d2.shape[0]))
            for k in range(d1.shape[0]):
                for q in range(d2.shape[0]):
                    out[:, :, k, q] = d1[k] @ d2[q].T
            return out
        # Factored: S ⊙ (g g'ᵀ), summed over positions.
        if f1.a.shape[1] == 1 and f2.a.shape[1] == 1 and f1.kind == "outer":
            s = f1.a[:, 0] @ f2.a[:, 0].T  # [m, n]
            if reduce == "trace":
                gg = torch.einsum("cbo,ceo->be", f1.g[:, :, 0], f2.g[:, :, 0])
                return s * gg
            return s[:, :, None, None] * torch.einsum("cbo,deo->becd", f1.g[:, :, 0], f2.g[:, :, 0])
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
        out = s.new_zeros((s.shape[0], s.shape[1], c1, c2))
        for k in range(c1):
            for q in range(c2):
                out[:, :, k, q] = torch.einsum("bets,bto,eso->be", s, f1.g[k], f2.g[q])
        return out


def _prefer_dense(f1: Factors, f2: Factors, budget: int) -> bool:
    """Operation counts of the factored O(T²) form against materializing."""
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


# ---------------------------------------------------------------------------------------------
# 3. Capture: one forward with hooks, one output-batched backward.
# ---------------------------------------------------------------------------------------------
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


def _activation(block: Block, inputs: tuple, batch: int) -> torch.Tensor:
    """Per-example activation factor of one call: ``[B, T, I]`` (or indices, or x̂)."""
    module = block.module
    x = inputs[0]
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
        raise Unfactorable(block.name, "its input does not keep the batch on dimension 0")
    x = x.detach()
    if block.kind in ("linear", "conv"):
        if block.kind == "linear":
            a = x.reshape(batch, -1, x.shape[-1])
        else:
            xp, kernel = _pad_conv_input(module, x)
            if x.dim() == 3:  # Conv1d as a Conv2d of height 1
                xp = xp.unsqueeze(2)
                kernel, dilation, stride = (1, kernel[0]), (1, module.dilation[0]), (1, module.stride[0])
            else:
                dilation, stride = tuple(module.dilation), tuple(module.stride)
            a = F.unfold(xp, kernel, dilation=dilation, stride=stride).transpose(1, 2)  # [B, T, I·k]
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


def _block_factors(block: Block, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> Factors:
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
        return Factors(block, kind, torch.cat(acts, dim=1), torch.cat(grads, dim=2))
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
    return Factors(block, "dense", None, total)


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

    def make_hook(index: int, block: Block):
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
                raw = output_tensor(call_with(model, parameters, inputs))
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
            factors.append(Factors.unused(block, cot.shape[0], batch, out))
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


def loss_cotangents(loss_fn: Callable, targets) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], dict]:
    """Cotangents of the per-example losses: ``(make, box)``; ``make(out)`` evaluates
    ``loss_fn(out, targets)`` and returns it with a cotangent of ones, and ``box["losses"]``
    then holds the detached per-example losses ``[B]``."""
    box: dict[str, torch.Tensor] = {}

    def make(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = loss_fn(out, targets).reshape(-1)
        box["losses"] = values.detach()
        return values, torch.ones((1, *values.shape), dtype=values.dtype, device=values.device)

    return make, box


__all__ = [
    "Block", "DEFAULT_MEMORY_BUDGET", "Factors", "Plan", "Unfactorable", "capture", "covering_plan", "loss_cotangents", "make_plan",
    "output_cotangents",
]
