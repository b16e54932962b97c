"""Seeded blockwise random projections of per-example gradients and tangent features.

A projection R: R^P → R^k with R = S / sqrt(k) and i.i.d. entries S of mean 0 and variance 1
(Rademacher ±1 or standard Gaussian) satisfies E[Rᵀ R] = I, so for any two vectors

    E[⟨R u, R v⟩] = ⟨u, v⟩,    Var[⟨R u, R v⟩] = (|u|² |v|² + ⟨u, v⟩²) / k   (Gaussian; Rademacher ≤)

and E|R u|² = |u|² with relative standard deviation sqrt(2 / k) (Gaussian; Rademacher ≤). A
sketched gradient kernel Σ_o ⟨R J_o(x), R J_o(x')⟩ is therefore unbiased, with expected squared
relative Frobenius error ((tr K)² / |K|²_F + 1) / k for d = 1 output (:func:`expected_relative_error`).
With d > 1 outputs entry (i, j) has variance (Σ_oq ⟨J_o, J_q⟩(x_i) ⟨J_o, J_q⟩(x_j) + Σ_oq ⟨J_o(x_i), J_q(x_j)⟩
⟨J_q(x_i), J_o(x_j)⟩) / k (Gaussian): at most twice the d = 1 expression's K_ii K_jj / k, and far below
it when the outputs' gradients are nearly orthogonal (measured, an MLP with d = 10, k = 32: rms relative
error 0.10 over 200 seeds, against 0.31 from the formula).

R is never held: the columns of parameter number i (in ``named_parameters`` order) are cut into
blocks of ``GENERATION_BLOCK`` columns, and block j is drawn from a generator seeded with
(seed, i, j) whenever it is needed, so at most k × GENERATION_BLOCK entries exist at once and the
same seed gives the same R whatever the chunking of examples or the engine.

Any int is a seed. torch's CPU generator keeps only the low 32 bits of its seed, which for the
formula of ``_generator_seed`` depend on seed mod 2**32 alone; a seed outside [0, 2**32) is
therefore hashed whole (SHA-256) to the 32 bits that pick its streams, so seed and seed + 2**32
give independent R. Seeds in [0, 2**32) draw the R they always drew.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from ..adapter import (
    Batch,
    analysis_mode,
    as_tuple,
    batch_size,
    check_finite,
    check_memory_budget,
    check_per_example_safe,
    outside_inference_mode,
    seed_bits,
    positive_int,
    trainable_parameters,
    unwrap,
)
from ..param_bytes import joined_dtype, parameter_bytes
from .factors import BatchDependent, capture, covering_plan, output_cotangents
from .kernels import ENGINES, first_reaching_output, in_full_precision
from .reference import per_example_jacobian, split_columns

GENERATION_BLOCK = 1024
KINDS = ("rademacher", "gaussian")
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def check_sketch_settings(k: int, kind: str, seed: Any = 0) -> None:
    """ValueError / TypeError unless ``k`` is a positive int, ``kind`` one of :data:`KINDS` and ``seed`` an int."""
    positive_int(k, "the projection dimension k")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")


def _generator_seed(seed: int, param_index: int, block: int) -> int:
    """The seed of the generator of (seed, parameter, block): (s·1000003 + i)·1000033 + j, taken
    modulo 2**64 where it leaves the range ``torch.Generator.manual_seed`` accepts (seeds above
    about 1.8e7, such as a date 20240101, overflowed it); values inside the range are unchanged.
    s is the seed itself in [0, 2**32), else the first 32 bits of the SHA-256 of its decimal
    digits: the generator reads 32 bits of its seed, which here depend on s mod 2**32 only, so
    without the hash seed and seed + 2**32 (or -1 and 2**32 - 1) drew the same R."""
    s = seed_bits(seed)
    value = (s * 1_000_003 + param_index) * 1_000_033 + block
    return value if -(2**63) <= value < 2**64 else value % 2**64


def projection_block(
    seed: int, param_index: int, block: int, k: int, columns: int, kind: str, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """Block j of parameter i's columns of R: ``Tensor[columns, k]`` (already divided by sqrt(k))."""
    generator = torch.Generator().manual_seed(_generator_seed(seed, param_index, block))
    if kind == "gaussian":
        s = torch.randn((columns, k), generator=generator, dtype=torch.float64)
    else:
        s = torch.randint(0, 2, (columns, k), generator=generator).to(torch.float64) * 2 - 1
    return (s / math.sqrt(k)).to(dtype=dtype, device=device)


def project_parameter(
    values: torch.Tensor, param_index: int, k: int, *, seed: int = 0, kind: str = "rademacher"
) -> torch.Tensor:
    """R_i v for per-row flattened values of parameter i: ``[..., numel] -> [..., k]``."""
    check_sketch_settings(k, kind, seed)
    if not values.is_floating_point():
        raise TypeError(f"values must be floating point (R's entries are ±1/sqrt(k)), got dtype {values.dtype}")
    lead, numel = values.shape[:-1], values.shape[-1]
    if numel == 0:  # a parameter of no values projects to zero (reshape(-1, 0) cannot infer the rows)
        return values.new_zeros((*lead, k))
    flat = values.reshape(-1, numel)
    out = flat.new_zeros((flat.shape[0], k))
    for block, start in enumerate(range(0, numel, GENERATION_BLOCK)):
        stop = min(start + GENERATION_BLOCK, numel)
        r = projection_block(seed, param_index, block, k, stop - start, kind, flat.dtype, flat.device)
        out += flat[:, start:stop] @ r
    return out.reshape(*lead, k)


# How much of a matrix parameter's [N, O, k] projection product is formed at once.
PROJECTION_CHUNK_BYTES = 64 * 2**20


class Projector:
    """R for a fixed (seed, k, kind), with each parameter's columns kept once they are drawn,
    while they fit in ``cache_bytes`` (beyond that, blocks are drawn again at every use).

    ``project(values, param_index)`` equals :func:`project_parameter` with the same arguments up
    to rounding (the same blocks from the same seeds, whatever is cached). For repeated projections (the tracker
    projects every step) drawing R once is most of the saving.
    """

    def __init__(self, k: int, *, seed: int = 0, kind: str = "rademacher", cache_bytes: int = DEFAULT_MEMORY_BUDGET):
        check_sketch_settings(k, kind, seed)
        self.k, self.seed, self.kind, self.cache_bytes = k, seed, kind, cache_bytes
        self._columns: dict[tuple[int, torch.dtype, Any], torch.Tensor] = {}
        self._cached_bytes = 0

    def columns(self, param_index: int, numel: int, dtype: torch.dtype, device=None) -> torch.Tensor | None:
        """``[numel, k]`` columns of parameter ``param_index`` when cached (or cacheable), else None."""
        key = (param_index, dtype, device)
        if key in self._columns:
            return self._columns[key]
        size = numel * self.k * torch.empty((), dtype=dtype).element_size()
        if self._cached_bytes + size > self.cache_bytes:
            return None
        blocks = [
            projection_block(self.seed, param_index, block, self.k, min(start + GENERATION_BLOCK, numel) - start,
                             self.kind, dtype, device)
            for block, start in enumerate(range(0, numel, GENERATION_BLOCK))
        ]
        self._columns[key] = torch.cat(blocks) if blocks else torch.zeros((0, self.k), dtype=dtype, device=device)
        self._cached_bytes += size
        return self._columns[key]

    def project(self, values: torch.Tensor, param_index: int) -> torch.Tensor:
        """R_i v: ``[..., numel] -> [..., k]``."""
        cached = self.columns(param_index, values.shape[-1], values.dtype, values.device)
        if cached is None:
            return project_parameter(values, param_index, self.k, seed=self.seed, kind=self.kind)
        return values @ cached


class ParameterProjection:
    """A projection R of a model's parameter space to R^k, one parameter at a time, built for
    repeated use on per-example gradients (the tracker's sketched state).

    - A parameter with two or more dimensions, seen as a matrix W ``[O, I]`` (O = shape[0]), gets
      rows (r_j ⊗ s_j) / sqrt(k) with r_j ∈ R^O, s_j ∈ R^I of i.i.d. entries of mean 0 and
      variance 1 (Rademacher or Gaussian): R vec(W) = (r_jᵀ W s_j)_j / sqrt(k), and for an outer
      product R vec(g aᵀ) = ((r_j · g)(s_j · a))_j / sqrt(k). So the per-example gradients of
      linear and convolutional layers are sketched from their factors without being formed, and
      R costs (O + I) k numbers instead of O I k. Still E[RᵀR] = E[r rᵀ] ⊗ E[s sᵀ] = I (unbiased
      inner products); its variance is larger than an i.i.d. R's for some inputs.
    - Every other parameter: the i.i.d. blockwise projection (:class:`Projector`).

    Args:
        shapes: ``{name: shape}`` of the parameters in ``named_parameters`` order (the index of a
            name seeds its part of R).
        k, seed, kind: as for :func:`project_parameter`.
        cache_bytes: how much of the vectors' i.i.d. columns may be kept between uses.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], k: int, *, seed: int = 0, kind: str = "rademacher",
                 cache_bytes: int = DEFAULT_MEMORY_BUDGET):
        check_sketch_settings(k, kind, seed)
        self.k, self.seed, self.kind = k, seed, kind
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.index = {name: i for i, name in enumerate(shapes)}
        self.vectors = Projector(k, seed=seed, kind=kind, cache_bytes=cache_bytes)
        self._factors: dict[tuple[str, torch.dtype, Any], tuple[torch.Tensor, torch.Tensor]] = {}

    def is_matrix(self, name: str) -> bool:
        return len(self.shapes[name]) >= 2

    def factors(self, name: str, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(r ``[k, O]``, s ``[k, I]``) of a matrix parameter, s already divided by sqrt(k)."""
        key = (name, dtype, device)
        if key not in self._factors:
            shape = self.shapes[name]
            rows, cols = shape[0], math.prod(shape[1:])
            generator = torch.Generator().manual_seed(_generator_seed(self.seed, self.index[name], 999_983))
            if self.kind == "gaussian":
                r = torch.randn((self.k, rows), generator=generator, dtype=torch.float64)
                s = torch.randn((self.k, cols), generator=generator, dtype=torch.float64)
            else:
                r = torch.randint(0, 2, (self.k, rows), generator=generator).to(torch.float64) * 2 - 1
                s = torch.randint(0, 2, (self.k, cols), generator=generator).to(torch.float64) * 2 - 1
            self._factors[key] = (r.to(dtype=dtype, device=device), (s / math.sqrt(self.k)).to(dtype=dtype, device=device))
        return self._factors[key]

    def project(self, name: str, values: torch.Tensor, chunk_bytes: int = PROJECTION_CHUNK_BYTES) -> torch.Tensor:
        """R v for rows of values of parameter ``name``: ``[N, *shape]`` (or ``[N, numel]``) -> ``[N, k]``."""
        n = values.shape[0]
        if math.prod(values.shape[1:]) == 0:  # a parameter of no values projects to zero (reshape(n, -1) cannot infer it)
            return values.new_zeros((n, self.k))
        flat = values.reshape(n, -1)
        if not self.is_matrix(name):
            return self.vectors.project(flat, self.index[name])
        r, s = self.factors(name, values.dtype, values.device)
        rows = self.shapes[name][0]
        matrices = flat.reshape(n, rows, -1)
        out = flat.new_empty((n, self.k))
        step = max(1, chunk_bytes // max(rows * self.k * flat.element_size(), 1))
        for start in range(0, n, step):
            part = matrices[start : start + step] @ s.T  # [n, O, k]
            # Σ_o r_ko part_nok as a product and a sum: einsum makes it k batched products of
            # n × O by O × 1, 10-20x slower (measured, 2 CPU cores, n = 640, O = 16-32, k = 512).
            out[start : start + step] = torch.sum(part.mul_(r.T), dim=1)
        return out

    def project_outer(self, name: str, a: torch.Tensor, g: torch.Tensor, chunk_bytes: int = PROJECTION_CHUNK_BYTES) -> torch.Tensor:
        """R vec(Σ_t g_t a_tᵀ) for a matrix parameter from factors ``a [N, T, I]``, ``g [N, T, O]``:
        ``[N, k]``, the cheaper of two exact ways (:func:`weight_projection_macs`): from the factors,
        Σ_t (r·g_t)(s·a_t), or with each example's matrix Σ_t g_t a_tᵀ formed, ``chunk_bytes`` of them
        at a time, and projected (many positions: a convolution's patches)."""
        (n, t, i), o = a.shape, g.shape[2]
        if weight_projection_route(t, i, o, self.k) == "factors":
            r, s = self.factors(name, a.dtype, a.device)
            return (torch.einsum("nto,ko->ntk", g, r) * torch.einsum("nti,ki->ntk", a, s)).sum(dim=1)
        out = a.new_empty((n, self.k))
        step = max(1, chunk_bytes // max(o * i * a.element_size(), 1))
        for start in range(0, n, step):
            rows = slice(start, start + step)
            out[rows] = self.project(name, torch.bmm(g[rows].transpose(1, 2), a[rows]), chunk_bytes)
        return out


def weight_projection_macs(t: int, i: int, o: int, k: int) -> dict[str, int]:
    """Multiply-adds per example of R vec(Σ_t g_t a_tᵀ) (T positions, I inputs, O outputs, sketch
    dimension k) by each route of :meth:`ParameterProjection.project_outer`: ``"factors"``
    T·k·(I + O + 1), ``"matrix"`` T·I·O to form the matrix, then O·I·k + O·k."""
    return {"factors": t * k * (i + o + 1), "matrix": t * i * o + o * i * k + o * k}


def weight_projection_route(t: int, i: int, o: int, k: int) -> str:
    """The cheaper route of :func:`weight_projection_macs`."""
    macs = weight_projection_macs(t, i, o, k)
    return "factors" if macs["factors"] <= macs["matrix"] else "matrix"


def project_gradients(
    grads: dict[str, torch.Tensor], order: list[str], k: int, *, seed: int = 0, kind: str = "rademacher"
) -> torch.Tensor:
    """Project per-example gradients ``{name: [B, *shape]}`` to ``[B, k]``.

    ``order`` lists every parameter name of the model in ``named_parameters`` order (the index
    of a name seeds its columns); names missing from ``grads`` contribute zero. A name of
    ``grads`` that is not in ``order`` is refused (it would be left out of the projection).
    """
    check_sketch_settings(k, kind, seed)
    unknown = [name for name in grads if name not in order]
    if unknown:
        raise ValueError(
            f"gradients {unknown[:5]} are not in `order`, so they would be left out of the projection: pass "
            "every parameter name of the model in named_parameters order (the same names as the gradients')"
        )
    total = None
    for index, name in enumerate(order):
        if name not in grads:
            continue
        g = grads[name]
        part = project_parameter(g.reshape(g.shape[0], -1), index, k, seed=seed, kind=kind)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("none of the gradients' names is in `order`: pass the model's parameter names")
    return total


@outside_inference_mode
@in_full_precision
def sketched_tangent_features(
    model: nn.Module,
    x: Batch,
    *,
    k: int,
    seed: int = 0,
    kind: str = "rademacher",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    engine: str = "auto",
) -> torch.Tensor:
    """R φ(x): projected tangent features ``Tensor[M, d, k]``.

    Algorithm:
        1. Rows in chunks sized by ``memory_budget``; per chunk, one block's per-example
           gradients at a time (factored engine: materialized from captured factors, one layer
           at a time; torch.func for the rest).
        2. Each block's gradients are multiplied by R's columns for that block, generated on the
           fly, and summed into ``[m, d, k]``.
    """
    check_sketch_settings(k, kind, seed)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    memory_budget = check_memory_budget(memory_budget)
    model = unwrap(model)
    check_per_example_safe(model)
    params = trainable_parameters(model)
    order = list(params)
    xs = as_tuple(x, name="x")
    m_total = batch_size(xs, name="x")
    check_finite(xs, name="x")
    d = first_reaching_output(model, xs, params, "x").shape[1]
    first = next(iter(params.values()))
    plan = covering_plan(model, xs) if engine != "functional" else None
    use_factored = plan is not None and (engine == "factored" or plan.blocks)
    # A row's gradients of the largest parameter (factored: one layer at a time) or of all of them (torch.func), each
    # in its parameter's dtype: not the first parameter's item size for all (a float32 first layer of a float64
    # model halved the bytes and doubled the rows of a chunk)
    largest = max(p.numel() * p.element_size() for p in params.values())
    per_row = 2 * d * (largest if use_factored else parameter_bytes(params))
    rows = max(1, memory_budget // max(per_row, 1))
    # (in the parameters' dtypes joined, as the sum of their projections is: a float32 first layer rounded the
    # projections of a float64 model's other parameters to float32)
    out = torch.zeros((m_total, d, k), dtype=joined_dtype(params), device=first.device)
    with analysis_mode(model):
        for start in range(0, m_total, rows):
            chunk = slice(start, min(start + rows, m_total))
            batch = tuple(t[chunk] for t in xs)
            m = chunk.stop - chunk.start
            if use_factored:
                try:
                    factors, _ = capture(model, plan, batch, output_cotangents(list(range(d))), alone=True)
                except BatchDependent:  # a forward that depends on the batch: every example alone, through torch.func
                    use_factored, factors = False, []
                for f in factors:
                    for name, g in f.gradients().items():  # [d, m, *shape]
                        flat = g.detach().reshape(d, m, -1).transpose(0, 1)
                        out[chunk] += project_parameter(flat, order.index(name), k, seed=seed, kind=kind)
                    del f
            if use_factored:
                fallback = plan.fallback
            else:
                fallback = params
            if fallback:
                j = per_example_jacobian(model, fallback)(*batch).detach()  # [m, d, P_fb]
                for name, part in split_columns(j, fallback).items():
                    out[chunk] += project_parameter(part, order.index(name), k, seed=seed, kind=kind)
    return out


@outside_inference_mode
@in_full_precision
def sketched_gradient_kernel(
    model: nn.Module,
    x1: Batch,
    x2: Batch | None = None,
    *,
    k: int,
    seed: int = 0,
    kind: str = "rademacher",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    engine: str = "auto",
) -> torch.Tensor:
    """Unbiased sketch of the trace gradient kernel: Σ_o ⟨R J_o(x), R J_o(x')⟩, ``[M, N]``.

    For a model with one output its expected squared relative Frobenius error is
    ((tr K)² / |K|²_F + 1) / k (:func:`expected_relative_error`; with d > 1 outputs usually far
    less, see the module docstring); the same ``seed`` gives the same R for x1 and x2.
    """
    f1 = sketched_tangent_features(model, x1, k=k, seed=seed, kind=kind, memory_budget=memory_budget, engine=engine)
    f2 = f1 if x2 is None else sketched_tangent_features(
        model, x2, k=k, seed=seed, kind=kind, memory_budget=memory_budget, engine=engine
    )
    if f2.shape[1] != f1.shape[1]:
        raise ValueError(f"x1 gives {f1.shape[1]} outputs per example but x2 gives {f2.shape[1]}")
    return torch.einsum("mdk,ndk->mn", f1, f2)


def expected_relative_error(kernel: torch.Tensor, k: int) -> float:
    """sqrt(E|K̂ − K|²_F) / |K|_F of a Gaussian sketch of a d = 1 PSD ``kernel`` (Rademacher: at most this).

    Entry (i, j) of K̂ has variance (K_ii K_jj + K_ij²) / k, so E|K̂ − K|²_F = ((tr K)² + |K|²_F) / k.
    ``kernel`` is a square ``[M, M]`` kernel of a batch against itself: a cross kernel ``[M, N]``
    has no K_ii on its diagonal and is refused, as are blocks ``[M, M, d, d]``. For the trace
    kernel of a model with d > 1 outputs this is not the sketch's error: the error is at most
    sqrt(2) times this, and usually far below it (the module docstring).
    """
    k = positive_int(k, "the projection dimension k")
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"kernel must be a square [M, M] Tensor (a batch against itself, reduce='trace'), got "
            f"{tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__}"
        )
    fro2 = float((kernel.double() * kernel.double()).sum())
    if not (math.isfinite(fro2) and fro2 > 0):
        raise ValueError(f"kernel must be finite and not all zero (|K|²_F = {fro2}): the relative error is undefined")
    return math.sqrt((float(kernel.diagonal().sum()) ** 2 + fro2) / (k * fro2))


__all__ = [
    "GENERATION_BLOCK", "KINDS", "PROJECTION_CHUNK_BYTES", "ParameterProjection", "Projector", "expected_relative_error",
    "project_gradients", "project_parameter",
    "projection_block", "sketched_gradient_kernel", "sketched_tangent_features", "weight_projection_macs",
    "weight_projection_route",
]
