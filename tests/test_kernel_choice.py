"""The "auto" engine's choice for models with many outputs per example: above
AUTO_FACTORED_MAX_OUTPUTS outputs it counts both engines' multiply-adds (choose_engine; the
budget's chunks: tests/test_auto_engine.py). With as many passes on both sides the factored engine
counts less where parameters stay in the T² factored form (linear layers on one position) and no
more where they materialize (convolutions over many positions), and either way equals
per-example autograd."""

import pytest
import torch
from torch import nn

from genkernel.core.engine.factored import _probe_sizes
from genkernel.core.engine.factors import covering_plan, make_plan
from genkernel.core.engine.kernels import AUTO_FACTORED_MAX_OUTPUTS, choose_engine, gradient_kernel, kernel_plan

F64 = torch.float64


def brute_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians ``[B, d, P]``: one autograd call per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(x.shape[0]):
        out = model(x[b : b + 1]).reshape(-1)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[o], params, retain_graph=True)])
                                 for o in range(out.numel())]))
    return torch.stack(rows)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def wide_mlp(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, d)).to(F64)


def pixel_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1), nn.Flatten()).to(F64)


def test_auto_counts_the_factored_parameters_above_the_output_cut_off():
    """d = 100 > 64: the MLP's layers are kept factored (one position each), so auto takes the
    factored engine (it took torch.func, measured 16-85x slower on such MLPs at d = 128-256);
    the convnet's layers materialize (100 positions): its per-example gradients cost the factored
    engine what they cost torch.func (one pass each, no row chunks), so auto takes it too (the
    rule before counting passes took torch.func: measured 1.0x on this net, 1.0-1.6x on 16x16
    per-pixel nets of 16-32 channels). Both equal per-example autograd, trace and blocks."""
    d = 100
    assert d > AUTO_FACTORED_MAX_OUTPUTS
    g = torch.Generator().manual_seed(1)
    cases = ((wide_mlp(d), torch.randn(4, 3, generator=g, dtype=F64), "factored"),
             (pixel_convnet(), torch.randn(3, 1, 10, 10, generator=g, dtype=F64), "factored"))
    for model, x, want in cases:
        plan = covering_plan(model, (x,))
        _, kept = _probe_sizes(model, plan, (x,)).forward_and_factored(plan, d)
        total = sum(p.numel() for p in model.parameters())
        assert kept == (total if isinstance(model[0], nn.Linear) else 0)  # the count is unambiguous
        assert choose_engine(plan, d, rows=(4, 4), sizes=_probe_sizes(model, plan, (x,))) == want
        assert kernel_plan(model, x).engine == want
        jac = brute_jacobian(model, x)
        assert rel(gradient_kernel(model, x), torch.einsum("mdp,ndp->mn", jac, jac)) < 1e-12
        blocks = gradient_kernel(model, x, x[:2], reduce="none")
        assert rel(blocks, torch.einsum("mdp,nep->mnde", jac, jac[:2])) < 1e-12
    # Without counts (no sizes: nothing to count from), the fixed cut-off stands.
    plan = make_plan(wide_mlp(d))
    assert choose_engine(plan, AUTO_FACTORED_MAX_OUTPUTS) == "factored"
    assert choose_engine(plan, AUTO_FACTORED_MAX_OUTPUTS + 1) == "functional"
    with pytest.raises(ValueError, match="engine must be one of"):
        kernel_plan(wide_mlp(2), torch.randn(2, 3, dtype=F64), engine="fast")

