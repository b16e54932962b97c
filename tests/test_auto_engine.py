"""engine="auto" above AUTO_FACTORED_MAX_OUTPUTS outputs: the engine with fewer counted
multiply-adds (choose_engine), counting each engine's per-example passes under the memory budget
(example_passes, Chunking). The choices here are from counts (deterministic), the kernels equal
torch.func's to float64 rounding whichever engine "auto" takes, and the passes counted are the
passes the engines run."""

import pytest
import torch
from torch import nn

import genkernel.core.engine.kernels as kernels
from genkernel.core.engine.factored import _probe_sizes, factored_gradient_kernel
from genkernel.core.engine.factors import covering_plan
from genkernel.core.engine.kernels import (
    AUTO_FACTORED_MAX_OUTPUTS, Chunking, _chunking, choose_engine, example_passes, gradient_kernel, kernel_plan,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, many small operations at small budgets

F64 = torch.float64
MIB = 2**20


def channel_net() -> nn.Module:
    """Convolutions on 4x4 with 8 output channels: d = 128, every layer materializes (16 positions)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(16, 8, 3, padding=1), nn.Flatten()).to(F64)


def pixel_net() -> nn.Module:
    """A per-pixel convolutional net on 10x10: d = 100."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1), nn.Flatten()).to(F64)


def inputs(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def chunking(model, x, budget, rows=None):
    plan = covering_plan(model, (x,))
    sizes = _probe_sizes(model, plan, (x,))
    d = model(x[:1]).shape[1]
    m = x.shape[0] if rows is None else rows
    return plan, sizes, d, _chunking(model, plan, (x,), d, (m, m), True, sizes, budget)


def test_materialized_conv_net_above_the_cut_off_takes_the_factored_engine_at_equal_passes():
    """d = 128 > 64 and no layer kept factored (the old rule's kept share 0: torch.func). Both
    engines hold all 4 examples at the default budget (one pass each), every block materializes
    (F_mat = F, pairs d·P as torch.func's), so factored counts no more: ⌈d/c⌉·F + 2d·F against
    (1 + 2d)·F. Measured (float32, 16x16 per-pixel nets of 16 and 32 channels, d = 256, M = 4-8):
    factored 1.0-1.5x faster. The kernels equal torch.func's, trace and blocks."""
    model, x = channel_net(), inputs((4, 2, 4, 4))
    plan, sizes, d, chunks = chunking(model, x, kernels.DEFAULT_MEMORY_BUDGET)
    assert d == 128 > AUTO_FACTORED_MAX_OUTPUTS
    forward, materialized, pair = sizes.engine_counts(plan, d)
    assert materialized == forward and pair == d * sum(p.numel() for p in model.parameters())
    assert chunks.held and chunks.cotangents == d and chunks.functional_rows >= 4
    assert kernel_plan(model, x).engine == "factored"  # old rule: "functional" (no parameter kept factored)
    ref = gradient_kernel(model, x, engine="functional")
    assert rel(gradient_kernel(model, x), ref) < 1e-12
    blocks = gradient_kernel(model, x, x[:2], reduce="none")
    assert rel(blocks, gradient_kernel(model, x, x[:2], reduce="none", engine="functional")) < 1e-12


@pytest.mark.parametrize("budget, want", [(1 * MIB, "factored"), (4 * MIB, "factored"), (64 * MIB, "factored")])
def test_auto_takes_the_factored_engine_where_torch_func_recomputes_more(budget, want):
    """Budgets where torch.func's Jacobians (d·P values a row) fit fewer rows than the factored
    engine's captures: torch.func computes 16 example passes of d cotangents for M = 4, the
    factored engine 8 (or 4, a side held), so it counts fewer however its outputs are chunked;
    the old rule took torch.func at every budget. The kernel "auto" returns equals torch.func's."""
    model, x = channel_net(), inputs((4, 2, 4, 4))
    _, _, _, chunks = chunking(model, x, budget)
    passes_f = example_passes(4, 4, chunks.functional_rows, True, False, "functional")
    passes_x = example_passes(4, 4, chunks.rows, True, chunks.held, "factored")
    assert passes_f == (16 if budget < 64 * MIB else 4) and passes_x == (4 if chunks.held else 8)
    assert kernel_plan(model, x, memory_budget=budget).engine == want
    ref = gradient_kernel(model, x, engine="functional", memory_budget=budget)
    assert rel(gradient_kernel(model, x, memory_budget=budget), ref) < 1e-12


def test_auto_keeps_torch_func_where_the_factored_engine_captures_again_per_pair_of_chunks():
    """The per-pixel net with a 4 MiB budget: torch.func holds all 8 rows' Jacobians (one pass
    each), the factored engine captures 4 rows with 25 of the 100 outputs per backward and
    recaptures every pair of row chunks (16 passes of 4 output chunks): it counts about 2x more,
    so "auto" keeps torch.func (measured on a 28x28 per-pixel net, d = 784, whose factored
    engine chunks outputs at the default budget: factored 0.58-0.85x as fast). At the default
    budget both engines hold all rows: factored. Coverage with the previous test: the old rule
    took torch.func at both budgets."""
    model, x = pixel_net(), inputs((8, 1, 10, 10))
    for budget, want in ((4 * MIB, "functional"), (kernels.DEFAULT_MEMORY_BUDGET, "factored")):
        _, _, _, chunks = chunking(model, x, budget)
        if want == "functional":
            assert chunks == Chunking(17, 4, 25, False, True)
            assert example_passes(8, 8, 17, True, False, "functional") == 8
            assert example_passes(8, 8, 4, True, False, "factored") == 16
        assert kernel_plan(model, x, memory_budget=budget).engine == want
        ref = gradient_kernel(model, x, x[:3], engine="functional", memory_budget=budget)
        assert rel(gradient_kernel(model, x, x[:3], memory_budget=budget), ref) < 1e-12


def test_unet_above_the_cut_off_takes_the_engine_with_fewer_passes():
    """A tiny UNet2DModel on 12x12 (d = 144; P = 44905, 11% kept factored: the old rule took
    torch.func at every budget). float64, M = 3. At the default budget torch.func fits 2 rows of
    Jacobians and the factored engine 1 row per capture (its graph: every activation for 72
    cotangents): 6 passes against 9, torch.func. With 192 MiB torch.func fits 1 row (9 passes) and
    the factored engine 2 rows of 18 outputs (6 passes of 8 output chunks): factored (fails on the
    old rule). Measured (float32, M = N): 16/32 channels on 12x12, M = 4, torch.func at 1 row and
    the factored engine at 2: factored 1.9x faster (counted 1.97x); 8/16 channels on 16x16, M = 4,
    equal passes: 0.90-0.96x (counted 0.99x, torch.func). The kernel "auto" returns equals
    torch.func's at both budgets."""
    from genkernel.diffusion.models import tiny_unet

    class Sample(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.unet = tiny_unet(12, 1, channels=(8, 16)).to(F64)

        def forward(self, x, t):
            return self.unet(x, t).sample

    model = Sample()
    xs = (inputs((3, 1, 12, 12)), torch.tensor([1, 400, 900]))
    plan = covering_plan(model, xs)
    sizes = _probe_sizes(model, plan, xs)
    d = 144
    _, kept = sizes.forward_and_factored(plan, d)
    assert 0 < kept < sum(p.numel() for p in plan.params.values()) / 2
    cases = ((kernels.DEFAULT_MEMORY_BUDGET, Chunking(2, 1, 72, False, True), (6, 9), "functional"),
             (192 * MIB, Chunking(1, 2, 18, False, True), (9, 6), "factored"))
    for budget, chunks, passes, want in cases:
        assert _chunking(model, plan, xs, d, (3, 3), True, sizes, budget) == chunks
        assert example_passes(3, 3, chunks.functional_rows, True, False, "functional") == passes[0]
        assert example_passes(3, 3, chunks.rows, True, False, "factored") == passes[1]
        assert choose_engine(plan, d, rows=(3, 3), sizes=sizes, chunking=chunks) == want
        assert kernel_plan(model, xs, memory_budget=budget).engine == want
    # where auto takes the factored engine, its kernel is torch.func's (where it takes torch.func, it runs it)
    ref = gradient_kernel(model, xs, engine="functional")
    assert rel(gradient_kernel(model, xs, memory_budget=192 * MIB), ref) < 1e-12


@pytest.mark.parametrize("budget", [1 * MIB, 4 * MIB, 32 * MIB, 512 * MIB])
@pytest.mark.parametrize("other", [False, True])
def test_counted_passes_are_the_passes_each_engine_runs(budget, other, monkeypatch):
    """example_passes with _chunking's chunks equals the examples each engine runs a pass on:
    the factored engine's forwards (Σ batch sizes, ⌈d/c⌉ per pass), torch.func's Jacobian rows,
    x1 against itself and against another batch (5 rows against 4)."""
    model = channel_net()
    x1, x2 = inputs((5, 2, 4, 4)), inputs((4, 2, 4, 4), seed=2)
    m, n = 5, (4 if other else 5)
    plan = covering_plan(model, (x1,))
    sizes = _probe_sizes(model, plan, (x1,))
    d = 128
    chunks = _chunking(model, plan, (x1,), d, (m, n), not other, sizes, budget)
    seen = []
    handle = model.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    try:
        factored_gradient_kernel(model, x1, x2 if other else None, memory_budget=budget, d=d, plan=plan)
        seen.clear()  # the first call probed the model with its hook (one example's forward), the second does not
        factored_gradient_kernel(model, x1, x2 if other else None, memory_budget=budget, d=d, plan=plan)
    finally:
        handle.remove()
    out_chunks = 1 if chunks.held else -(-d // chunks.cotangents)
    assert sum(seen) == out_chunks * example_passes(m, n, chunks.rows, not other, chunks.held, "factored")

    rows_seen = []
    original = kernels.per_example_jacobian

    def counting(model_, params):
        jac = original(model_, params)

        def run(*batch):
            rows_seen.append(batch[0].shape[0])
            return jac(*batch)

        return run

    monkeypatch.setattr(kernels, "per_example_jacobian", counting)
    gradient_kernel(model, x1, x2 if other else None, engine="functional", memory_budget=budget)
    assert sum(rows_seen) == example_passes(m, n, chunks.functional_rows, not other, False, "functional")
