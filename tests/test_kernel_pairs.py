"""Per-output-pair kernel blocks (``reduce="none"``, ``[M, N, d, d]``) of the factored engine
against per-example autograd in float64, where blocks keep the T² factored form (several
positions, few of them against their inputs) and d >= 32 outputs."""

import pytest
import torch
from torch import nn

from genkernel.core.engine.factors import _factored_blocks, capture, make_plan, output_cotangents
from genkernel.core.engine.kernels import gradient_kernel, kernel_plan


class Positions(nn.Module):
    """A linear layer over 2 positions, an embedding over 3 and a convolution over 2, each kept in
    the factored form with d = 40 outputs (T² (I + d·O) below d·I·O), and a head over positions."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 4)
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(16, 4, 3)
        self.head = nn.Linear(28, 40)

    def forward(self, x, tokens, signal):
        h = torch.cat([torch.tanh(self.lin(x)), self.emb(tokens), torch.tanh(self.conv(signal)).transpose(1, 2)], dim=1)
        return self.head(h.flatten(1))  # [B, 40]


def positions_model():
    torch.manual_seed(0)
    return Positions().double().eval()


def positions_batch(seed, b):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 2, 32, generator=gen, dtype=torch.float64), torch.randint(0, 10, (b, 3), generator=gen),
            torch.randn(b, 16, 4, generator=gen, dtype=torch.float64))


def brute_jacobian(model, xs):
    """Per-example Jacobians ``[B, d, P]``, one autograd pass per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(xs[0].shape[0]):
        out = model(*(t[n : n + 1] for t in xs)).reshape(-1)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
                                 for o in out]))
    return torch.stack(rows)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_the_model_keeps_blocks_with_several_positions_in_the_factored_form():
    model = positions_model()
    factors, _ = capture(model, make_plan(model), positions_batch(0, 3), output_cotangents(list(range(40))), form="compact")
    kinds = {f.block.name: (f.kind, None if f.a is None else f.a.shape[1]) for f in factors}
    assert kinds["lin"] == ("outer", 2) and kinds["emb"] == ("embedding", 3) and kinds["conv"] == ("outer", 2)


@pytest.mark.parametrize("engine", ["auto", "factored", "functional"])
@pytest.mark.parametrize("budget", [512 * 2**20, 20_000])
def test_output_pair_blocks_equal_per_example_autograd(engine, budget):
    model = positions_model()
    x1, x2 = positions_batch(1, 5), positions_batch(2, 4)
    j1, j2 = brute_jacobian(model, x1), brute_jacobian(model, x2)
    want = torch.einsum("mdp,nep->mnde", j1, j2)
    got = gradient_kernel(model, x1, x2, reduce="none", engine=engine, memory_budget=budget)
    assert got.shape == (5, 4, 40, 40)
    assert rel(got, want) < 1e-12
    symmetric = gradient_kernel(model, x1, reduce="none", engine=engine, memory_budget=budget)
    assert rel(symmetric, torch.einsum("mdp,nep->mnde", j1, j1)) < 1e-12
    # Normalized blocks: each output pair by its own diagonals.
    diag1, diag2 = torch.einsum("mdp,mdp->md", j1, j1), torch.einsum("ndp,ndp->nd", j2, j2)
    normalized = gradient_kernel(model, x1, x2, reduce="none", normalize=True, engine=engine, memory_budget=budget)
    assert rel(normalized, want / (diag1.sqrt()[:, None, :, None] * diag2.sqrt()[None, :, None, :])) < 1e-12


def test_auto_takes_the_factored_engine_for_output_pair_blocks_with_every_parameter_factored():
    model = positions_model()
    assert kernel_plan(model, positions_batch(1, 5)).engine == "factored"


@pytest.mark.parametrize("budget", [1, 16_128, 10**9])  # one cotangent per chunk, chunks of 3, 3, 1, one chunk
def test_factored_blocks_equal_the_sum_over_positions(budget):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
    g1 = torch.randn(6, 3, 4, 7, generator=gen, dtype=torch.float64)
    g2 = torch.randn(7, 2, 5, 7, generator=gen, dtype=torch.float64)
    want = torch.zeros(3, 2, 6, 7, dtype=torch.float64)
    for b in range(3):
        for e in range(2):
            for k in range(6):
                for q in range(7):
                    want[b, e, k, q] = (s[b, e] * (g1[k, b] @ g2[q, e].T)).sum()
    assert rel(_factored_blocks(s, g1, g2, budget), want) < 1e-13
