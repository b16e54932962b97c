"""Benchmark: gradient kernels by every method, side by side (numbers, not timed tests).

    python -m recipes.benchmarks.kernels [--quick] [--out-dir figures] [--cap 60] [--skip-tracker]

(from the repository root; ``make bench`` runs it with ``--cap 20``).

Rows (M = N): MLP 2→512→512→1 at 1024, MLP 784→256→256→10 at 512 (trace over its 10 outputs),
a convnet on 1×28×28 with a scalar head at 256, a small UNet2DModel on 1×16×16 at 64 whose sample
is read out to one number per example by a fixed vector; ``--models`` also takes ``convnet10``
(the convnet with 10 outputs) and ``unet256`` (the UNet's whole 16×16 sample, d = 256: Gram
bound, about 15 minutes per method).

1. Speed, one process per row: ``vmap`` (torch.func ``vmap(jacrev)`` + matmul, chunked; PyTorch's
   NTK tutorial, method 1), ``linear_ref`` (a minimal hook-based factored kernel for Linear
   layers, :func:`linear_reference_kernel`; MLP rows only), and :func:`genkernel.core.gradient_kernel`
   ``auto`` and ``factored``, on the same inputs. Each method's first call is timed in a fresh
   process of its own after the same method-neutral warm-up (what a first call costs: tracing,
   the covering check; run after another method in one process, a first call skipped what that
   one had warmed), then the methods run, in one process, ``--repeats`` rounds interleaved, order
   rotated each round; steady state is the median (and min) of the rounds. Every method's kernel
   from its fresh first call, its in-process first call and its last round is compared with
   vmap's (the worst goes into the targets). ``vmap_work`` says how many per-example Jacobians
   vmap computes over the m + n it would with both sides held at once (x2's are recomputed per
   row chunk where BASELINE_BUDGET cannot hold them: the MLP rows). The machine's 1-minute load average is recorded after every call
   and reported per row (2 cores: above 2, the cores were shared and times are noisy).
2. Memory and exactness, one subprocess per method, so that its peak memory is its own: after a
   2 × 2 warm-up, one full call; working memory = peak RSS − the process's RSS after setup
   (:mod:`recipes.benchmarks.harness`). Further methods for this section (``--methods``):
   ``naive`` (a loop of ``torch.autograd.grad`` per example and output), ``ntk_vps`` (the
   tutorial's method 2), ``functional`` (genkernel's torch.func engine), ``captum`` (a note).
   Every method checks ``--cap`` seconds as it goes; a method stopped by the cap reports the time
   extrapolated by the share of kernel rows completed (``extrapolated_from: "rows"``, or
   ``"work"`` when not one row finished).

The parent compares every kernel with ``vmap`` (max |Δ| / max |K|), measures a float32 matmul's
FLOP/s in the same run, counts matmul-class FLOPs with ``torch.utils.flop_counter`` on a small
slice (:func:`~recipes.benchmarks.harness.counted_flops`: a grouped convolution's weight gradient,
per-example convolution gradients, divided by its groups), and checks the issue's targets (:data:`TARGETS`: steady-state speed of ``auto`` against
``vmap`` on the convnet and UNet rows, against ``linear_ref`` on the MLP rows, and working memory
below vmap's on every row); a missed target comes with a profile of ``auto``. It also measures
random-projection kernel error against the projection dimension k, and the tracker's cost
against a bare training step (``--skip-tracker`` leaves that out).

Writes ``OUT/benchmark_kernels.json`` and ``OUT/benchmark_kernels.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from genkernel.core import PathKernelTracker, gradient_kernel
from genkernel.core.engine import kernel_plan
from genkernel.core.engine.factors import DEFAULT_MEMORY_BUDGET
from genkernel.core.engine.projections import expected_relative_error, sketched_gradient_kernel
from .harness import (
    REPO_ROOT,
    Pacer,
    allocator_settings,
    count_flops,
    cpu_profile,
    interleaved,
    load_average,
    matmul_flops,
    peak_working_memory,
    print_ratios,
    run_child,
    timing,
    use_bench_threads,
    write_outputs,
)

MODULE = __spec__.name  # what child processes run: python -m MODULE --child ... (recipes.benchmarks.kernels)
METHODS = ("naive", "vmap", "ntk_vps", "captum", "linear_ref", "auto", "factored", "functional")
QUICK_METHODS = ("vmap", "linear_ref", "auto", "factored")  # --quick's default for the memory section
SPEED_METHODS = ("vmap", "linear_ref", "auto", "factored")  # the interleaved speed section
FULL = {"mlp2d": 1024, "mlp784": 512, "convnet": 256, "unet": 64}
QUICK = {"mlp2d": 256, "mlp784": 256, "convnet": 256, "unet": 32}
OPTIONAL = {"convnet10": (256, 64), "unet256": (64, 8)}  # --models only: (full, quick) sizes
LINEAR_ROWS = ("mlp2d", "mlp784")  # rows whose every trainable parameter is in an nn.Linear
TARGETS = {  # (baseline, minimum speed-up of "auto" over it at steady state, maximum memory ratio to vmap)
    "mlp2d": ("linear_ref", 1 / 1.5, 1.0),
    "mlp784": ("linear_ref", 1 / 1.5, 1.0),
    "convnet": ("vmap", 1.5, 1.0),
    "unet": ("vmap", 1.2, 1.0),
}
AGREEMENT_TOLERANCE = 1e-4  # max |K - K_vmap| / max |K_vmap| a timed method must reach for a target to count
# (float32 kernels; the committed runs agree to about 1e-6): a fast path that computes something else is no speed-up
BASELINE_BUDGET = 2 * 2**30  # bytes of Jacobians the chunked baselines may hold
QUICK_CAP = 5.0  # default --cap with --quick
REPEATS, QUICK_REPEATS = 7, 5  # default --repeats
SPEED_SECONDS = 60.0  # a method slower than this over its repeats (vmap on MLPs) takes fewer rounds


# ------------------------------------------------------------------------------------ models
def build(name: str, n: int, quick: bool):
    """(model, x1, x2): float32, seeded; x1 and x2 are distinct batches of n inputs."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp2d":
        model = nn.Sequential(nn.Linear(2, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, 1))
        return model, torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    if name == "mlp784":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        return model, torch.rand(n, 784, generator=g), torch.rand(n, 784, generator=g)
    if name in ("convnet", "convnet10"):
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10 if name == "convnet10" else 1),
        )
        return model, torch.rand(n, 1, 28, 28, generator=g), torch.rand(n, 1, 28, 28, generator=g)
    if name in ("unet", "unet256"):
        from diffusers import UNet2DModel

        model = UNet2DModel(
            sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8,
        )
        if name == "unet":
            model = Readout(model, 16 * 16)
        t1 = torch.randint(0, 1000, (n,), generator=g)
        t2 = torch.randint(0, 1000, (n,), generator=g)
        return model, (torch.randn(n, 1, 16, 16, generator=g), t1), (torch.randn(n, 1, 16, 16, generator=g), t2)
    raise ValueError(name)


class Readout(nn.Module):
    """A model's output read out to one number per example by a fixed vector (a buffer, not a
    parameter): ``f(x) = ⟨w, sample(x)⟩``, w ~ N(0, 1/size), seeded."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model = model
        self.register_buffer("w", torch.randn(size, 1, generator=torch.Generator().manual_seed(7)) / size**0.5)

    def forward(self, *x):
        out = self.model(*x)
        return getattr(out, "sample", out).flatten(1) @ self.w


def _rows(batch, rows):
    """The rows ``rows`` of a batch (a tensor or a tuple of them), as a tuple of tensors."""
    return tuple(t[rows] for t in batch) if isinstance(batch, tuple) else (batch[rows],)


def _n(batch):
    """The batch's number of examples."""
    return (batch[0] if isinstance(batch, tuple) else batch).shape[0]


def _chunks(total: int, size: int):
    """Consecutive slices of at most ``size`` rows covering range(total)."""
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


# ----------------------------------------------------------------------------------- methods
def _single_fn(model):
    """``single(params, *x)``: the model on one example (x without its batch dimension), with
    ``params`` for its parameters; returns its d outputs flattened, ``Tensor[d]``."""
    from torch.func import functional_call

    def single(params, *x):
        out = functional_call(model, params, tuple(t.unsqueeze(0) for t in x))
        out = getattr(out, "sample", out)
        return out.reshape(-1)

    return single


def _chunked_kernel(jac, contract, x1, x2, rows, pacer, units_per_example=1):
    """Row chunks of x1 against column chunks of x2, Jacobians recomputed for every chunk (the
    chunked baselines), stopping once the cap is spent (checked before every x2 chunk, and
    inside ``jac`` if it can; ``jac`` returns None when it stopped there).

    Returns ``(kernel rows done, fraction of rows done)``; only row chunks whose every entry is
    computed count. Work: ``units_per_example`` per example's Jacobian, for m + n · (number of
    row chunks) Jacobians in all.
    """
    m, n = _n(x1), _n(x2)
    pacer.work_total = (m + n * -(-m // rows)) * units_per_example
    kernel = torch.zeros(m, n)
    done = 0
    for r1 in _chunks(m, rows):
        j1 = jac(_rows(x1, r1))
        if j1 is None or not _fill_row_chunk(kernel, r1, j1, jac, contract, x2, rows, pacer):
            break
        done = r1.stop
        if pacer.spent():
            break
    return kernel[:done], done / m


def _fill_row_chunk(kernel, r1, j1, jac, contract, x2, rows, pacer) -> bool:
    """Kernel rows r1 against every x2 chunk; True when all of them were computed."""
    for r2 in _chunks(_n(x2), rows):
        j2 = None if pacer.spent() else jac(_rows(x2, r2))
        if j2 is None:
            return False
        kernel[r1, r2] = contract(j1, j2)
    return True


def method_vmap(model, x1, x2, pacer):
    """torch.func vmap(jacrev) + matmul, chunked to BASELINE_BUDGET (the NTK tutorial, method 1).

    Returns ``(kernel rows done, fraction of rows done)``; the cap is checked between vmap calls.
    """
    from torch.func import jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    num = sum(p.numel() for p in params.values())
    d = model_outputs(model, x1)
    rows = max(1, BASELINE_BUDGET // (2 * d * num * 4))
    batched = vmap(jacrev(_single_fn(model)), in_dims=(None,) + (0,) * len(_rows(x1, slice(0, 1))))

    def jac(batch):
        out = batched(params, *batch)
        pacer.add_work(_n(batch))
        return out

    def contract(j1, j2):
        return sum(torch.einsum("Naf,Maf->NM", j1[k].flatten(2), j2[k].flatten(2)) for k in params)

    return _chunked_kernel(jac, contract, x1, x2, rows, pacer)


def method_naive(model, x1, x2, pacer):
    """A loop of torch.autograd.grad per example and output, then matmul (chunked like vmap).

    Returns ``(kernel rows done, fraction of rows done)``; the cap is checked before every
    example's every output (a UNet example is 256 backward passes), and a work unit is one
    output's gradient.
    """
    params = [p for p in model.parameters()]
    num = sum(p.numel() for p in params)
    d = model_outputs(model, x1)
    rows = max(1, BASELINE_BUDGET // (2 * d * num * 4))

    def jac(batch):
        out = torch.zeros(_n(batch), d, num)
        for e in range(_n(batch)):
            y = model(*_rows(batch, slice(e, e + 1)))
            y = getattr(y, "sample", y).reshape(-1)
            for o in range(d):
                if pacer.spent():
                    return None
                grads = torch.autograd.grad(y[o], params, retain_graph=o < d - 1)
                out[e, o] = torch.cat([g.reshape(-1) for g in grads])
                pacer.add_work(1)
        return out

    def contract(j1, j2):
        return torch.einsum("mdp,ndp->mn", j1, j2)

    return _chunked_kernel(jac, contract, x1, x2, rows, pacer, units_per_example=d)


def method_ntk_vps(model, x1, x2, pacer):
    """NTK-vector products (the tutorial's method 2): vjp then jvp for every pair, vmapped.

    Returns ``(kernel rows done, fraction of rows done)``. Rows go in blocks of at most the
    budget's rows (one row unless the method is fast), columns in paced blocks, so the cap is
    checked between blocks of pairs. Work: pairs, m · n in all.
    """
    from torch.func import jvp, vjp, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {k: v.detach() for k, v in model.named_parameters()}
    single = _single_fn(model)
    num = sum(p.numel() for p in params.values())
    d = model_outputs(model, x1)
    m, n = _n(x1), _n(x2)
    rows = max(1, BASELINE_BUDGET // (4 * n * d * num * 4)) if pacer.fast() else 1
    basis = torch.eye(d)

    def get_ntk(a, b):
        out, vjp_fn = vjp(lambda p: single(p, *a), params)

        def slice_(vec):
            (v,) = vjp_fn(vec)
            return jvp(lambda p: single(p, *b), (params,), (v,))[1]

        return vmap(slice_)(basis).diagonal().sum()

    nargs = len(_rows(x1, slice(0, 1)))

    def pair(*ab):
        return get_ntk(ab[:nargs], ab[nargs:])

    inner = vmap(pair, in_dims=(None,) * nargs + (0,) * nargs)
    outer = vmap(inner, in_dims=(0,) * nargs + (None,) * nargs)
    pacer.work_total = m * n
    kernel = torch.zeros(m, n)
    done = 0
    for r1 in _chunks(m, rows):
        cols = 0
        for r2 in pacer.blocks(n, n if pacer.fast() else 1):
            with sdpa_kernel([SDPBackend.MATH]):  # forward-mode AD needs the math attention backend on CPU
                kernel[r1, r2] = outer(*_rows(x1, r1), *_rows(x2, r2))
            pacer.add_work((r1.stop - r1.start) * (r2.stop - r2.start))
            cols = r2.stop
        if cols < n:
            break
        done = r1.stop
    return kernel[:done], done / m


def linear_reference_kernel(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The trace kernel ``[M, N]`` of a model whose trainable parameters all sit in ``nn.Linear``
    layers applied once each to ``[B, I]`` inputs: the minimal hook-based factored kernel, the
    baseline for genkernel's MLP rows.

    Per side, one forward with a hook on every Linear keeps its input a ``[B, I]`` and output z;
    one backward with the d one-hot output cotangents (batched) gives g = ∂f_o/∂z ``[d, B, O]``.
    For a Linear, ⟨∂f_o(x)/∂(W, b), ∂f_o(x')/∂(W, b)⟩ = (a·a' + 1)(g_o·g'_o), so the kernel is
    Σ_layers (A1 A2ᵀ + 1) ⊙ (G1 G2ᵀ) with G the d output gradients side by side ``[B, d·O]``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable != {id(p) for m in linears for p in m.parameters() if p.requires_grad}:
        raise ValueError("linear_reference_kernel needs every trainable parameter in an nn.Linear")
    if any(m.bias is None or not m.weight.requires_grad or not m.bias.requires_grad for m in linears):
        raise ValueError("linear_reference_kernel needs every Linear with a trainable weight and bias")

    def side(x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        acts, outs = [], []

        def hook(module, args, out):
            if args[0].dim() != 2:
                raise ValueError("linear_reference_kernel needs [B, I] inputs to every Linear")
            acts.append(args[0].detach())
            outs.append(out)

        handles = [m.register_forward_hook(hook) for m in linears]
        try:
            with torch.enable_grad():
                y = model(x)
        finally:
            for handle in handles:
                handle.remove()
        if len(acts) != len(linears):  # a shared Linear's gradient sums its uses: cross terms this form leaves out
            raise ValueError(f"linear_reference_kernel needs every Linear applied exactly once per forward "
                             f"({len(linears)} Linear layers, {len(acts)} applications)")
        b, d = y.shape
        if d == 1:
            grads = [g[None] for g in torch.autograd.grad(y.sum(), outs)]
        else:
            eye = torch.eye(d, dtype=y.dtype, device=y.device)[:, None, :].expand(d, b, d)
            grads = torch.autograd.grad(y, outs, grad_outputs=eye, is_grads_batched=True)
        # [B, d·O]: the d output gradients of each example side by side
        return acts, [g.detach().transpose(0, 1).reshape(b, -1) for g in grads]

    a1, g1 = side(x1)
    a2, g2 = side(x2)
    kernel = torch.zeros(x1.shape[0], x2.shape[0], dtype=a1[0].dtype, device=a1[0].device)
    for a, b, g, h in zip(a1, a2, g1, g2):
        kernel.addcmul_((a @ b.T).add_(1), g @ h.T)
    return kernel


def method_linear_ref(model, x1, x2, pacer):
    """:func:`linear_reference_kernel` on the whole batch (one call): ``(kernel, 1.0)``."""
    pacer.work_total = 1
    kernel = linear_reference_kernel(model, *_rows(x1, slice(0, None)), *_rows(x2, slice(0, None)))
    pacer.add_work(1)
    return kernel, 1.0


def _engine_blocks(model, x1, x2, engine: str, pacer) -> tuple[int, int]:
    """(first block's rows, rows per unit) for a genkernel engine.

    Where the engine runs torch.func (``functional``; ``auto`` where genkernel's own choice,
    :func:`~genkernel.core.engine.kernel_plan`, says so: models with more than 64 outputs), blocks
    are whole multiples of its own row chunk: it recomputes x2's Jacobians per chunk anyway, so
    such blocks cost what one call costs. The factored route computes x2's factors once per call:
    one block for a fast method, else paced blocks from one row (which repeat that cost, so the
    time is an upper bound).
    """
    plan = kernel_plan(model, x1, engine=engine, memory_budget=DEFAULT_MEMORY_BUDGET, rows_total=max(_n(x1), _n(x2)))
    if plan.engine == "functional":
        return plan.rows, plan.rows
    return (_n(x1) if pacer.fast() else 1), 1


def method_genkernel(engine):
    """The runner of one :func:`genkernel.core.gradient_kernel` engine (see ``run``)."""

    def run(model, x1, x2, pacer):
        """:func:`genkernel.core.gradient_kernel` on paced row blocks of x1 against all of x2.

        Returns ``(kernel rows done, fraction of rows done)``.
        """
        m = _n(x1)
        first, unit = _engine_blocks(model, x1, x2, engine, pacer)
        kernel = torch.zeros(m, _n(x2))
        done = 0
        for r1 in pacer.blocks(m, first, unit):
            kernel[r1] = gradient_kernel(model, _rows(x1, r1), x2, engine=engine)
            done = r1.stop
        return kernel[:done], done / m

    return run


def model_outputs(model, x) -> int:
    """d: the model's outputs per example (``.sample`` for diffusers models)."""
    with torch.no_grad():
        y = model(*_rows(x, slice(0, 1)))
    return getattr(y, "sample", y).numel()


RUNNERS = {
    "naive": method_naive, "vmap": method_vmap, "ntk_vps": method_ntk_vps, "linear_ref": method_linear_ref,
    "auto": method_genkernel("auto"), "factored": method_genkernel("factored"),
    "functional": method_genkernel("functional"),
}


def child(model_name: str, method: str, n: int, cap: float, out: str, quick: bool, profile: bool) -> None:
    """One method on one model, in its own process; saves ``{"kernel", "result"}`` to ``out``.

    ``result``: time (see :func:`~recipes.benchmarks.harness.timing`), working memory, FLOPs;
    with ``profile``, only the warm-up and a profile of the method on up to 64 × 64 rows
    (``{"profile": table}``).
    """
    use_bench_threads()
    model, x1, x2 = build(model_name, n, quick)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    runner = RUNNERS[method]
    # Warm-up on 2 rows (first-call allocations and kernel selection), within a quarter of the
    # cap; a second 2-row call, free of first-call costs (tracing, the covering check), tells the
    # timed run whether the method is fast (Pacer: then one block of all rows, whose peak memory
    # is the whole call's). Then the baseline RSS.
    began = time.perf_counter()
    runner(model, _rows(x1, slice(0, 2)), _rows(x2, slice(0, 2)), Pacer(cap / 4))
    if time.perf_counter() - began <= cap / 4:
        began = time.perf_counter()
        runner(model, _rows(x1, slice(0, 2)), _rows(x2, slice(0, 2)), Pacer(cap / 4))
    warm_s = time.perf_counter() - began
    if profile:
        k = min(_n(x1), 64)
        pacer = Pacer(cap, warm_s)
        table = cpu_profile(lambda: runner(model, _rows(x1, slice(0, k)), _rows(x2, slice(0, k)), pacer))
        torch.save({"kernel": None, "result": {"profile": table}}, out)
        return
    pacer = Pacer(cap, warm_s)
    (kernel, fraction), working, baseline = peak_working_memory(lambda: runner(model, x1, x2, pacer))
    seconds = pacer.elapsed()
    result = timing(seconds, fraction, pacer.work_fraction(fraction))
    result.update(warm_up_s=warm_s, working_memory_bytes=working, rss_after_setup_bytes=baseline)

    def run_slice(k: int) -> bool:
        _, done = runner(model, _rows(x1, slice(0, k)), _rows(x2, slice(0, k)), Pacer(cap, warm_s))
        return done == 1.0

    result["flops_estimate"] = count_flops(run_slice, _n(x1), _n(x2)) if fraction == 1.0 and seconds <= 30 else None
    torch.save({"kernel": kernel, "result": result}, out)


def _speed_setup(model_name: str, n: int, quick: bool):
    """``(model, x1, x2)`` of a speed process, after the warm-up every method's first call would
    otherwise pay in a fresh process, whatever the method: thread pools, matmul and convolution
    kernels, and the autograd engine (one forward and backward of a copy of the model on 2
    examples, its gradients dropped). Without it, whichever method ran first in a process paid
    them: on the convnet at 64 rows, auto's first call took 0.68 s when it ran first and 0.14 s
    after vmap's."""
    import copy

    use_bench_threads()
    model, x1, x2 = build(model_name, n, quick)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    torch.randn(256, 256) @ torch.randn(256, 256)
    nn.functional.conv2d(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3))
    twin = copy.deepcopy(model)
    out = twin(*_rows(x1, slice(0, 2)))
    getattr(out, "sample", out).sum().backward()
    return model, x1, x2


def _speed_calls(model_name: str, x1, x2) -> dict:
    """``{method: call(model) -> kernel [M, N]}`` of the speed section, on the whole batches."""
    calls = {
        "vmap": lambda m: method_vmap(m, x1, x2, Pacer(float("inf")))[0],
        "linear_ref": lambda m: linear_reference_kernel(m, x1, x2),  # LINEAR_ROWS: tensor batches
        "auto": lambda m: gradient_kernel(m, x1, x2, engine="auto"),
        "factored": lambda m: gradient_kernel(m, x1, x2, engine="factored"),
    }
    return {name: calls[name] for name in SPEED_METHODS if name != "linear_ref" or model_name in LINEAR_ROWS}


def _rel_diff(kernel: torch.Tensor, ref: torch.Tensor) -> float:
    """max |K - K_ref| / max |K_ref| (NaN when the shapes differ or K holds a NaN: never agreement)."""
    if kernel.shape != ref.shape:
        return float("nan")
    return float((kernel.detach() - ref).abs().max() / ref.abs().max())


def _worst(values) -> float | None:
    """The largest of the differences measured; NaN when one is NaN (never agreement), None when
    none was measured."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return math.nan if any(v != v for v in got) else max(got)


def vmap_jacobian_work(model, x1, x2) -> dict:
    """How much Jacobian work :func:`method_vmap` does on these batches: its rows per chunk, and the
    per-example Jacobians it computes (x1's once, x2's once per row chunk) over the m + n a
    method holding both sides' Jacobians at once would compute (1.0: no recomputation; above 1
    where BASELINE_BUDGET cannot hold them, the MLP rows: part of vmap's time there is that)."""
    num = sum(p.numel() for p in model.parameters())
    rows = max(1, BASELINE_BUDGET // (2 * model_outputs(model, x1) * num * 4))
    m, n = _n(x1), _n(x2)
    return {"rows_per_chunk": rows, "row_chunks": -(-m // rows),
            "jacobians_over_needed": (m + n * -(-m // rows)) / (m + n)}


def first_child(model_name: str, method: str, n: int, out: str, quick: bool) -> None:
    """One speed method's first call, alone in this fresh process after :func:`_speed_setup`'s
    warm-up: ``{"first_call_s", "first_call_load", "kernel"}`` saved to ``out``. Timed apart from
    the other methods, so that no method's first call is cheaper for running after another's."""
    model, x1, x2 = _speed_setup(model_name, n, quick)
    call = _speed_calls(model_name, x1, x2)[method]
    began = time.perf_counter()
    kernel = call(model).detach()
    seconds = time.perf_counter() - began
    torch.save({"first_call_s": seconds, "first_call_load": load_average(), "kernel": kernel}, out)


def speed_child(model_name: str, n: int, repeats: int, out: str, quick: bool) -> None:
    """Section 1 for one row, in its own process: every speed method's in-process first call (on
    its own copy of the model, made before the clock starts; order-dependent, so the row's
    first-call times come from :func:`first_child` instead), then ``repeats`` interleaved rounds
    (:func:`~recipes.benchmarks.harness.interleaved`), each method's on the copy its first call
    warmed (never a model the method has not run on: the rounds are steady state); every method's kernel from its first call
    and from its last round is compared with vmap's. Saves ``{"methods": {method: timing},
    "plan": kernel_plan of auto, "max_rel_diff_vs_vmap" (the worse of the two per method),
    "max_rel_diff_vs_vmap_by_call", "vmap_work", "reference_kernel" (vmap's)}``."""
    import copy

    model, x1, x2 = _speed_setup(model_name, n, quick)
    calls = _speed_calls(model_name, x1, x2)
    firsts: dict[str, torch.Tensor] = {}
    lasts: dict[str, torch.Tensor] = {}
    copies = {name: copy.deepcopy(model) for name in calls}  # nothing cached for a copy yet

    def first_call(name):
        def run():
            firsts[name] = calls[name](copies[name]).detach()
        return run

    # Each method's rounds run on the copy its first call warmed: genkernel caches per model (the covering
    # check, the probed layers), so rounds on a model no call had seen made round 0 a second first call
    # (the committed UNet row: auto's round 0 took 0.361 s against 0.252-0.259 s in rounds 1-6), and
    # whichever of auto and factored ran first on a shared model paid it for the other.
    def steady_call(name):
        def run():
            lasts[name] = calls[name](copies[name])
        return run

    timings = interleaved({name: steady_call(name) for name in calls}, repeats,
                          first={name: first_call(name) for name in calls}, seconds=SPEED_SECONDS)
    for entry in timings.values():  # order-dependent (see _speed_setup); run_speed puts fresh-process times in
        entry["in_process_first_call_s"] = entry["first_call_s"]
    ref = firsts.get("vmap")
    by_call = {name: {"first": _rel_diff(firsts[name], ref) if name in firsts else None,
                      "steady": _rel_diff(lasts[name], ref) if name in lasts else None}
               for name in calls} if ref is not None else {}
    diffs = {name: _worst(d.values()) for name, d in by_call.items()}
    plan = kernel_plan(model, x1, rows_total=max(_n(x1), _n(x2)))
    torch.save({"methods": timings, "plan": dict(plan.__dict__), "max_rel_diff_vs_vmap": diffs,
                "max_rel_diff_vs_vmap_by_call": by_call, "vmap_work": vmap_jacobian_work(model, x1, x2),
                "reference_kernel": ref, "threads": torch.get_num_threads()}, out)


def run_speed(model_name: str, n: int, repeats: int, quick: bool) -> dict:
    """Section 1 for one row: the interleaved rounds in one subprocess (:func:`speed_child`), and
    each method's first call in a fresh subprocess of its own (:func:`first_child`; its kernel is
    compared with vmap's too), with each method's steady-state speed-up over vmap and time over
    linear_ref, the same ratios of first calls, and the row's load; ``{"error": ...}`` when the
    speed child failed."""
    args = ["--speed-child", model_name, str(n), str(repeats)] + ["--quick"] * quick
    data = run_child(MODULE, args, timeout=3600.0)
    if "error" in data:
        return data
    ref = data.pop("reference_kernel", None)
    methods = data["methods"]
    for name, entry in methods.items():
        first = run_child(MODULE, ["--first-child", model_name, name, str(n)] + ["--quick"] * quick, timeout=3600.0)
        if "error" in first:
            entry.update(first_call_s=None, first_call_load=None, first_call_error=first["error"])
            continue
        entry.update(first_call_s=first["first_call_s"], first_call_load=first["first_call_load"])
        if ref is not None:
            diff = _rel_diff(first["kernel"], ref)
            data["max_rel_diff_vs_vmap_by_call"].setdefault(name, {})["fresh_first"] = diff
            data["max_rel_diff_vs_vmap"][name] = _worst(data["max_rel_diff_vs_vmap_by_call"][name].values())
    loads = [x for entry in methods.values() for x in entry["steady_load"] + [entry["first_call_load"]] if x is not None]
    data["load"] = {"mean": sum(loads) / len(loads), "min": min(loads), "max": max(loads)}
    for name, entry in methods.items():
        for base in ("vmap", "linear_ref"):
            if base in methods:
                entry[f"speedup_vs_{base}"] = methods[base]["steady_median_s"] / entry["steady_median_s"]
                firsts = (methods[base]["first_call_s"], entry["first_call_s"])
                entry[f"first_call_speedup_vs_{base}"] = firsts[0] / firsts[1] if None not in firsts else None
    return data


def describe_speed(model_name: str, n: int, data: dict) -> str:
    """The row's speed table: first call, steady median and min, speed-up over vmap (and time over
    linear_ref), load."""
    if "error" in data:
        return f"{model_name}: speed section failed: {data['error'][-300:]}"
    lines = [f"{model_name} (M = N = {n}, load mean {data['load']['mean']:.2f}, min {data['load']['min']:.2f}, "
             f"max {data['load']['max']:.2f}; auto runs {data['plan']['engine']})",
             f"  {'method':10s} {'first s':>9s} {'steady s':>9s} {'min s':>9s} {'x vmap':>7s} {'/ ref':>7s} "
             f"{'load':>5s} {'rel diff':>9s}"]
    for name, e in data["methods"].items():
        over_ref = e["steady_median_s"] / data["methods"]["linear_ref"]["steady_median_s"] if "linear_ref" in data["methods"] else None
        first = e["first_call_s"] if e["first_call_s"] is not None else float("nan")
        lines.append(f"  {name:10s} {first:9.4f} {e['steady_median_s']:9.4f} {e['steady_min_s']:9.4f} "
                     f"{e.get('speedup_vs_vmap', float('nan')):7.2f} "
                     f"{over_ref if over_ref is not None else float('nan'):7.2f} {e['load_mean']:5.2f} "
                     f"{_num(data['max_rel_diff_vs_vmap'].get(name)):9.1e}")
    return "\n".join(lines)


def run_method(model_name: str, method: str, n: int, cap: float, quick: bool, profile: bool = False):
    """Runs :func:`child` in a subprocess: ``(kernel or None, result)``, result ``{"error": ...}``
    when the child failed or ran past 5 caps, at least 150 s (a method whose warm-up on 2 × 2 rows
    alone takes minutes, such as NTK-vector products or the factored engine with d = 256 on the
    UNet, is recorded as too slow instead of holding the run)."""
    args = ["--child", model_name, method, str(n), str(cap)] + ["--quick"] * quick + ["--profile"] * profile
    data = run_child(MODULE, args, timeout=max(150.0, 5 * cap))
    if "error" in data:
        return None, data
    return data["kernel"], data["result"]


# --------------------------------------------------------------------------- extra sections
def projection_errors(quick: bool) -> list[dict]:
    """Sketched kernels against the exact one on the 784-input MLP, per projection dimension k.

    Returns one row per k: the relative Frobenius error per seed (3 seeds) and its mean, the
    error :func:`~genkernel.core.engine.projections.expected_relative_error` predicts, and the seconds
    per sketch. That formula is derived for d = 1 PSD kernels; this MLP has d = 10 outputs, and
    its trace kernel, PSD too, goes in as is, so the key's name says which formula it is (for
    d > 1 it is not the exact expectation: the outputs' cross terms differ).
    """
    model, x1, _ = build("mlp784", 64 if quick else 128, quick)
    exact = gradient_kernel(model, x1)
    rows = []
    for k in (64, 256, 1024) if quick else (64, 256, 1024, 4096):
        errs, secs = [], []
        for seed in range(3):
            began = time.perf_counter()
            approx = sketched_gradient_kernel(model, x1, k=k, seed=seed)
            secs.append(time.perf_counter() - began)
            errs.append(float((approx - exact).norm() / exact.norm()))
        rows.append({"k": k, "relative_frobenius_error_mean": sum(errs) / len(errs), "per_seed": errs,
                     "expected_relative_error_d1_formula": expected_relative_error(exact, k),
                     "seconds_per_sketch": sum(secs) / len(secs)})
    return rows


TRACKER_TARGET = 3.0  # plain SGD, one group per example, 64 probes: tracked step <= 3x a bare step


def _tracker_run(optimizer: str, group_state: str, batch: int, steps: int, profile: bool = False) -> dict:
    """Bare and tracked steps interleaved on two copies of the 2-D MLP (the first step of each is
    a warm-up), the order within each pair alternating (the step run second finds the caches and the
    allocator as the first left them): min seconds per step of each, their ratio, the median of the
    pairs' ratios, and the ledger's residual and sketch error."""
    import cProfile
    import io
    import pstats

    make_opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-2),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    }[optimizer]
    bare_model, x, _ = build("mlp2d", batch * steps, False)
    tracked_model, _, _ = build("mlp2d", 1, False)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    probes = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))

    def loss_fn(o, t):
        return ((o - t) ** 2).mean(dim=1)

    bare_opt, tracked_opt = make_opt(bare_model.parameters()), make_opt(tracked_model.parameters())
    tracker = PathKernelTracker(tracked_model, tracked_opt, loss_fn, probes, num_groups=batch * steps,
                                group_state=group_state, sketch_dim=512)
    bare_times, tracked_times = [], []
    profiler = cProfile.Profile() if profile else None
    def bare_step(rows: slice) -> None:
        start = time.perf_counter()
        bare_opt.zero_grad()
        loss_fn(bare_model(x[rows]), y[rows]).mean().backward()
        bare_opt.step()
        bare_times.append(time.perf_counter() - start)

    def tracked_step(rows: slice) -> None:
        profiling = profiler is not None and len(tracked_times) > 0
        if profiling:
            profiler.enable()
        start = time.perf_counter()
        tracker.step(x[rows], y[rows], torch.arange(rows.start, rows.stop))
        tracked_times.append(time.perf_counter() - start)
        if profiling:
            profiler.disable()

    for s in range(steps):
        rows = slice(s * batch, (s + 1) * batch)
        for run in ((bare_step, tracked_step) if s % 2 == 0 else (tracked_step, bare_step)):
            run(rows)
    bare, tracked = min(bare_times[1:]), min(tracked_times[1:])
    pair_ratios = [t / b for t, b in zip(tracked_times[1:], bare_times[1:])]
    # the same steps on the same batches from the same start: a tracked step that trained differently is no step made slower
    same = all(torch.equal(p, q) for p, q in zip(bare_model.parameters(), tracked_model.parameters()))
    out = {"optimizer": optimizer, "group_state": tracker.group_state, "batch": batch, "groups": batch * steps,
           "bare_step_s": bare, "tracked_step_s": tracked, "ratio": tracked / bare,
           # a median (of an even count, the mean of the middle two: the upper one was the larger of 2 pairs' ratios)
           "median_pair_ratio": statistics.median(pair_ratios), "order": "alternating", "training_unchanged": same,
           "bare_steps_s": bare_times, "tracked_steps_s": tracked_times,  # the first of each a warm-up, left out
           "relative_residual": tracker.ledger.relative_residual(),
           "relative_sketch_error": tracker.ledger.relative_sketch_error()}
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        out["profile"] = text.getvalue()[-6000:]
    return out


def tracker_ratio(quick: bool) -> dict:
    """The tracker with 64 probes and one group per example on the 2-D MLP, against a bare step:
    plain SGD on the factored route (the target) and the dense route it replaces, SGD with
    momentum and Adam on the sketched route (k = 512), at several batch sizes."""
    rows = []
    batches = (64,) if quick else (64, 256, 1024)
    steps = 3 if quick else 6
    for batch in batches:
        for optimizer, group_state in (("sgd", "factored"), ("sgd_momentum", "sketched"), ("adam", "sketched")):
            try:
                rows.append(_tracker_run(optimizer, group_state, batch, steps))
            except Exception as error:  # noqa: BLE001 - one failure must not lose the others
                rows.append({"optimizer": optimizer, "group_state": group_state, "batch": batch, "error": repr(error)[:500]})
            print("tracker", json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
    # The dense route at one group per example, for comparison (its cost grows with G = B x steps): at the first
    # batch's B and steps, so its G is that of the factored row it is compared with (it ran 3 steps, half the G)
    try:
        rows.append(_tracker_run("sgd", "dense", batches[0], steps))
    except Exception as error:  # noqa: BLE001
        rows.append({"optimizer": "sgd", "group_state": "dense", "batch": batches[0], "error": repr(error)[:500]})
    print("tracker", json.dumps(rows[-1]), flush=True)
    target = [r for r in rows if r.get("group_state") == "factored" and "ratio" in r]
    entry = {"target_ratio": TRACKER_TARGET, "runs": rows,
             "met_at_batch": {r["batch"]: r["ratio"] <= TRACKER_TARGET and r["training_unchanged"] is True for r in target}}
    if target and not all(entry["met_at_batch"].values()):
        entry["profile_of_factored_step_at_batch_64"] = _tracker_run("sgd", "factored", 64, 4, profile=True)["profile"]
    return entry


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    """Runs the benchmark (or, with ``--child``, one method of it); returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and caps: a smoke test (minutes)")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "figures"))
    parser.add_argument("--cap", type=float, default=None, help="seconds per method before extrapolating")
    parser.add_argument("--models", default=",".join(FULL), help=f"rows; also {', '.join(OPTIONAL)}")
    parser.add_argument("--methods", default=None,
                        help=f"methods of the memory section (default: all; with --quick {','.join(QUICK_METHODS)})")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds of the speed section")
    parser.add_argument("--skip-tracker", action="store_true", help="leave out the tracker-vs-bare-step section")
    parser.add_argument("--skip-projection", action="store_true", help="leave out the sketch-error-vs-k section")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "METHOD", "N", "CAP"), help=argparse.SUPPRESS)
    parser.add_argument("--speed-child", nargs=3, metavar=("MODEL", "N", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--first-child", nargs=3, metavar=("MODEL", "METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child_out is None:
            parser.error("--child needs --child-out PATH")
        model_name, method, n, cap = args.child
        child(model_name, method, int(n), float(cap), args.child_out, args.quick, args.profile)
        return {}
    if args.speed_child:
        if args.child_out is None:
            parser.error("--speed-child needs --child-out PATH")
        model_name, n, repeats = args.speed_child
        speed_child(model_name, int(n), int(repeats), args.child_out, args.quick)
        return {}

    if args.first_child:
        if args.child_out is None:
            parser.error("--first-child needs --child-out PATH")
        model_name, method, n = args.first_child
        first_child(model_name, method, int(n), args.child_out, args.quick)
        return {}

    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({name: pair[1 if args.quick else 0] for name, pair in OPTIONAL.items()})
    cap = args.cap if args.cap is not None else (QUICK_CAP if args.quick else 60.0)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else REPEATS)
    methods = (args.methods or ",".join(QUICK_METHODS if args.quick else METHODS)).split(",")
    check_arguments(parser, cap, repeats, args.models.split(","), methods, sizes)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peak = matmul_flops()
    print(f"float32 matmul on this machine: {peak / 1e9:.1f} GFLOP/s")
    report = {"settings": {"quick": args.quick, "cap_s": cap, "repeats": repeats, "sizes": sizes,
                           "threads": torch.get_num_threads(), "allocator": allocator_settings()},
              "matmul_flops_per_s": peak, "models": {}, "targets": {}}
    started = time.perf_counter()
    speed_text = []
    for model_name in args.models.split(","):
        n = sizes[model_name]
        speed = run_speed(model_name, n, repeats, args.quick)
        speed_text.append(describe_speed(model_name, n, speed))
        print(speed_text[-1], flush=True)
        wanted = [m for m in methods if m != "linear_ref" or model_name in LINEAR_ROWS]
        rows, kernels = run_methods(model_name, wanted, n, cap, args.quick)
        compare(rows, kernels, n, peak)
        report["models"][model_name] = {"n": n, "speed": speed, "methods": rows}
        if model_name in TARGETS:
            report["targets"][model_name] = check_target(model_name, speed, rows, n, cap, args.quick)
    report["projection_error_vs_k"] = [] if args.skip_projection else projection_errors(args.quick)
    report["tracker_vs_bare_step"] = {"skipped": "--skip-tracker"} if args.skip_tracker else tracker_ratio(args.quick)
    report["wall_s"] = time.perf_counter() - started
    print("\n".join(speed_text), flush=True)
    print_ratios("steady-state speed-up over vmap (method × model, interleaved)", _speed_table(report, "speedup_vs_vmap"))
    print_ratios("steady-state time / linear_ref's (method × model, interleaved)", {
        name: {model: (1 / v if v else None) for model, v in cells.items()}
        for name, cells in _speed_table(report, "speedup_vs_linear_ref").items()})
    print_ratios("speed-up over vmap (memory section's single call)", _ratio_table(report, "speedup_vs_vmap"))
    print_ratios("working memory / vmap's (method × model)", _ratio_table(report, "memory_ratio_vs_vmap"))
    write_outputs(report, out_dir / "benchmark_kernels.json", out_dir / "benchmark_kernels.png", plot)
    print(json.dumps({"targets": {k: {kk: vv for kk, vv in v.items() if kk != "profile_of_auto"}
                                  for k, v in report["targets"].items()},
                      "projection": report["projection_error_vs_k"],
                      "tracker": {k: v for k, v in report["tracker_vs_bare_step"].items() if not k.startswith("profile")}},
                     indent=1))
    return report


def check_arguments(parser, cap: float, repeats: int, models: list[str], methods: list[str], sizes: dict) -> None:
    """Refuses (``parser.error``) what would otherwise fail late or measure nothing: a cap that is
    not a positive finite number of seconds (every method would stop before its first row), fewer
    than one round, and model or method names the benchmark does not know (a KeyError after the
    first rows had run, or an error row)."""
    if not (math.isfinite(cap) and cap > 0):
        parser.error(f"--cap must be a positive number of seconds, got {cap!r}")
    if repeats < 1:
        parser.error(f"--repeats must be at least 1 (the steady state is timed in the rounds), got {repeats!r}")
    unknown = [m for m in models if m not in sizes]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown or models!r}; choose from {', '.join(sizes)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown or methods!r}; choose from {', '.join(METHODS)}")


def captum_note() -> dict:
    """The captum row: always a skip note, saying why."""
    try:
        import captum  # noqa: F401
    except ImportError:
        return {"skipped": "captum is not installed (pip install genkernel[captum])"}
    return {"skipped": "captum TracInCP computes loss-gradient products, not the output kernel; "
                       "not wired in this benchmark yet"}


def run_methods(model_name: str, methods: list[str], n: int, cap: float, quick: bool) -> tuple[dict, dict]:
    """Every method on one model, each in its own process: ``({method: result}, {method: kernel})``."""
    rows, kernels = {}, {}
    for method in methods:
        if method == "captum":
            rows[method] = captum_note()
            continue
        kernel, result = run_method(model_name, method, n, cap, quick)
        rows[method] = result
        if kernel is not None:
            kernels[method] = kernel
        print(f"{model_name:8s} {method:10s} {describe(result)}", flush=True)
    return rows, kernels


def describe(result: dict) -> str:
    """One line: seconds (``*``: extrapolated from rows, ``~``: from work units), done, memory."""
    if "error" in result:
        return "error: " + result["error"][-300:]
    if result["seconds"] is None:
        return f"nothing finished in {result['seconds_measured']:.1f} s"
    mark = {"rows": "*", "work": "~"}.get(result["extrapolated_from"], " ")
    return (f"{result['seconds']:9.3f} s{mark} ({result['fraction_done']:.0%} of rows in "
            f"{result['seconds_measured']:.1f} s) {result['working_memory_bytes'] / 2**20:9.1f} MiB")


def compare(rows: dict, kernels: dict, n: int, peak: float) -> None:
    """Adds throughput, share of matmul peak, and speed, memory and kernel difference against
    ``vmap`` to each timed result, in place."""
    ref, base = kernels.get("vmap"), rows.get("vmap", {})
    for method, result in rows.items():
        if result.get("seconds") is None:
            continue
        result["entries_per_s"] = n * n / result["seconds"]
        if result.get("flops_estimate"):
            result["flops_per_s"] = result["flops_estimate"] / result["seconds"]
            result["fraction_of_matmul_peak"] = result["flops_per_s"] / peak
        if base.get("seconds") is not None:
            result["speedup_vs_vmap"] = base["seconds"] / result["seconds"]
            result["memory_ratio_vs_vmap"] = result["working_memory_bytes"] / max(base["working_memory_bytes"], 1)
        if ref is not None and method in kernels:
            k = min(len(ref), len(kernels[method]))
            if k:
                result["max_rel_diff_vs_vmap"] = float((kernels[method][:k] - ref[:k]).abs().max() / ref[:k].abs().max())


def check_target(model_name: str, speed: dict, rows: dict, n: int, cap: float, quick: bool) -> dict:
    """The issue's target for "auto" (:data:`TARGETS`): steady-state speed-up over its baseline
    (vmap, or linear_ref on the MLP rows: at most 1.5x its time), working memory below vmap's, and
    auto's and the baseline's kernels equal to vmap's within :data:`AGREEMENT_TOLERANCE` (a speed-up
    of a method that computes something else is none), met (None when a number is missing), the row's load, and a profile of "auto" when missed."""
    baseline, want_speed, want_mem = TARGETS[model_name]
    timed = speed.get("methods", {})
    got = timed.get("auto", {})
    entry = {"baseline": baseline, "speedup_target": want_speed, "memory_ratio_target": want_mem,
             "speedup": got.get(f"speedup_vs_{baseline}"), "speedup_vs_vmap": got.get("speedup_vs_vmap"),
             "first_call_speedup": got.get(f"first_call_speedup_vs_{baseline}"),
             "memory_ratio": rows.get("auto", {}).get("memory_ratio_vs_vmap"),
             "load": speed.get("load"), "auto_engine": speed.get("plan", {}).get("engine"), "met": None}
    # the timed calls must compute the same kernel: auto's and the baseline's against vmap's (first calls)
    diffs = speed.get("max_rel_diff_vs_vmap", {})
    entry["max_rel_diff_vs_vmap"] = {name: diffs.get(name) for name in dict.fromkeys(("auto", baseline))}
    entry["agreement_tolerance"] = AGREEMENT_TOLERANCE
    if entry["speedup"] is None or entry["memory_ratio"] is None or None in entry["max_rel_diff_vs_vmap"].values():
        print(f"{model_name}: target not checked (a time, a memory or a kernel comparison is missing)", flush=True)
        return entry
    entry["kernels_agree"] = all(d <= AGREEMENT_TOLERANCE for d in entry["max_rel_diff_vs_vmap"].values())
    entry["met"] = entry["kernels_agree"] and entry["speedup"] >= want_speed and entry["memory_ratio"] < want_mem
    if not entry["met"]:
        _, prof = run_method(model_name, "auto", n, cap, quick, profile=True)
        entry["profile_of_auto"] = prof.get("profile", prof.get("error"))
    print(f"{model_name}: auto is {entry['speedup']:.2f}x {baseline} at steady state (target >= {want_speed:.2f}x), "
          f"working memory {entry['memory_ratio']:.3f} of vmap's (target < {want_mem}), kernels "
          f"{'agree' if entry['kernels_agree'] else 'DIFFER'} (max rel diff vs vmap {entry['max_rel_diff_vs_vmap']}, "
          f"tolerance {AGREEMENT_TOLERANCE:g}), load "
          f"{entry['load']['mean']:.2f}: {'met' if entry['met'] else 'MISSED'}", flush=True)
    return entry


def _speed_table(report: dict, key: str) -> dict[str, dict[str, float | None]]:
    """``{method: {model: speed[method][key] or None}}`` of the interleaved speed section."""
    models = report["models"]
    return {method: {name: entry.get("speed", {}).get("methods", {}).get(method, {}).get(key)
                     for name, entry in models.items()} for method in SPEED_METHODS}


def _ratio_table(report: dict, key: str) -> dict[str, dict[str, float | None]]:
    """``{method: {model: result[key] or None}}`` over the report's models and the timed methods
    that ran on any of them."""
    models = report["models"]
    methods = [m for m in METHODS if m != "captum" and any(m in entry["methods"] for entry in models.values())]
    return {method: {name: entry["methods"].get(method, {}).get(key) for name, entry in models.items()}
            for method in methods}


def _num(value) -> float:
    """``value``, or NaN for None (a bar matplotlib leaves out)."""
    return float("nan") if value is None else value


def plot(report: dict, path: Path | BinaryIO) -> None:
    """Seconds and working memory per model and method; sketch error (measured, expected) vs k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    names = list(report["models"])
    methods = [m for m in METHODS if m != "captum"]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        results = [report["models"][n]["methods"].get(method, {}) for n in names]
        speed = [report["models"][n].get("speed", {}).get("methods", {}).get(method, {}) for n in names]
        # steady state of the interleaved section where the method ran there, else the single call
        secs = [_num(t.get("steady_median_s", r.get("seconds"))) for t, r in zip(speed, results)]
        mem = [_num(r.get("working_memory_bytes")) / 2**20 for r in results]
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, secs, width, label=method)
        axes[1].bar(xs, mem, width, label=method)
    for ax, label in ((axes[0], "seconds, steady state (log)"), (axes[1], "working memory, MiB (log)")):
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 for j in range(len(names))], names)
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    proj = report.get("projection_error_vs_k") or []
    if proj:
        ks = [r["k"] for r in proj]
        axes[2].loglog(ks, [r["relative_frobenius_error_mean"] for r in proj], "o-", label="measured (mean of 3 seeds)")
        axes[2].loglog(ks, [r["expected_relative_error_d1_formula"] for r in proj], "k--", label="expected (d = 1 formula)")
        axes[2].legend()
    axes[2].set_title("sketched kernel: relative Frobenius error vs k")
    axes[2].set_xlabel("projection dimension k")
    runs = [r for r in (report.get("tracker_vs_bare_step") or {}).get("runs", []) if "ratio" in r]
    for label in sorted({(r["optimizer"], r["group_state"]) for r in runs}):
        mine = sorted((r for r in runs if (r["optimizer"], r["group_state"]) == label), key=lambda r: r["batch"])
        axes[3].plot([r["batch"] for r in mine], [r["ratio"] for r in mine], "o-", label=f"{label[0]}, {label[1]}")
    if runs:
        axes[3].axhline(report["tracker_vs_bare_step"]["target_ratio"], color="k", ls="--", label="target (plain SGD)")
        axes[3].set_xscale("log")
        axes[3].set_yscale("log")
        axes[3].legend(fontsize=7)
    axes[3].set_title("tracker (64 probes, one group per example): step / bare step")
    axes[3].set_xlabel("batch size")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
