"""The factored engine against an independent brute force (one autograd call per example and
output, float64) where a block parameter is read outside its module's calls through a
zero-initialized gate: the covering check's values cannot see that read at initialization, and
its outcome is remembered for the model's later parameters."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.core import gradient_kernel
from genkernel.core.engine.factors import analysis, covering_plan
from genkernel.core.engine.per_example import batch_totals, capture_batch, factored_contributions
from test_engine_factored_review import brute_jacobians as brute_jacobians_of_inputs

F64 = torch.float64


def brute_jacobians(model, x):
    """[M, d, P]: one torch.autograd.grad per example and output (eval mode, trainable parameters);
    the model is left in eval mode, as the tests here use it next."""
    model.eval()
    return brute_jacobians_of_inputs(model, (x,))


class GatedAttention(nn.Module):
    """adaLN-Zero style: attention behind a zero-initialized gate. ``nn.MultiheadAttention`` reads
    ``out_proj.weight`` in ``F.multi_head_attention_forward``, never through ``out_proj``'s forward."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(x + self.gate * self.attn(x, x, x)[0]).mean(1)


class GatedTiedHead(nn.Module):
    """An embedding also read as an output head (``F.linear(h, emb.weight)``) behind a zero gate."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(7, 4), nn.Linear(4, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, i):
        h = torch.tanh(self.emb(i))
        return self.proj(h).sum(1) + self.gate * F.linear(h, self.emb.weight).sum(1)[:, :3]


def _build(cls):
    torch.manual_seed(0)
    model = cls().to(F64)
    g = torch.Generator().manual_seed(1)
    if cls is GatedAttention:
        return model, torch.randn(4, 3, 8, generator=g, dtype=F64)
    return model, torch.randint(0, 7, (4, 3), generator=g)


# (GatedAttention under "auto" runs torch.func: kernel_plan picks it for this small model.)
@pytest.mark.parametrize("cls, engine", [(GatedAttention, "factored"), (GatedTiedHead, "factored"), (GatedTiedHead, "auto")])
def test_a_read_outside_the_hooks_behind_a_zero_gate_is_not_dropped_once_the_gate_opens(cls, engine):
    """Checked at the zero gate, the outside read added nothing and the block stayed factored; the
    remembered plan then dropped that read once the gate was trained (10-12 % off the brute force)."""
    model, x = _build(cls)
    j = brute_jacobians(model, x)
    torch.testing.assert_close(gradient_kernel(model, x, engine=engine), torch.einsum("mdp,ndp->mn", j, j),
                               rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        model.gate.fill_(0.7)  # the same parameters, trained: nothing the remembered plan's key sees
    j = brute_jacobians(model, x)
    torch.testing.assert_close(gradient_kernel(model, x, engine=engine), torch.einsum("mdp,ndp->mn", j, j),
                               rtol=1e-10, atol=1e-12)
    blocks = torch.einsum("mdp,nep->mnde", j, j[:3])
    torch.testing.assert_close(gradient_kernel(model, x, x[:3], engine=engine, reduce="none"), blocks,
                               rtol=1e-10, atol=1e-12)


def test_per_example_gradients_of_a_plan_checked_at_a_zero_gate():
    """The tracker's factored route keeps the plan checked at its start: its per-example gradients
    and their batch totals must still hold once the gate is trained."""
    model, x = _build(GatedTiedHead)
    with analysis(model):
        plan = covering_plan(model, (x,))  # at the zero gate, as a tracker's first step sees it
    with torch.no_grad():
        model.gate.fill_(0.7)
    targets = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    coefficients = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=F64)

    def loss_fn(out, y):
        return ((out - y) ** 2).mean(dim=1)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = []
    for n in range(4):
        loss = coefficients[n] * loss_fn(model(x[n : n + 1]), targets[n : n + 1]).sum()
        want.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    with analysis(model):  # the plan checked at the zero gate, kept (as a tracker keeps it)
        batch = capture_batch(model, plan, (x,), targets, loss_fn, coefficients, 2**30)
    got = {}
    for f in batch.factors:
        got.update({name: g[0] for name, g in f.gradients().items()})
    got.update(batch.fallback)
    for name in params:
        torch.testing.assert_close(got[name], torch.stack([w[name] for w in want]), rtol=1e-10, atol=1e-12)
    totals, _ = batch_totals(batch)
    for name in params:
        torch.testing.assert_close(totals[name], sum(w[name] for w in want), rtol=1e-10, atol=1e-12)


def test_contributions_at_quadrature_nodes_past_a_zero_gate():
    """The tracker's factored route checks its plan at θ_k and reads the probes' factors at the
    quadrature nodes θ_q, where the gate is already open: checked at the zero gate, the tied head's
    read was dropped there (the ledger of one SGD step came out 0.55 % off the dense route's)."""
    model, x = _build(GatedTiedHead)
    probes = torch.randint(0, 7, (3, 3), generator=torch.Generator().manual_seed(3))
    targets = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    coefficients = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=F64)

    def loss_fn(out, y):
        return ((out - y) ** 2).mean(dim=1)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    updates = []  # scale_p c_n ∇ℓ_n, flattened in parameter order
    scale = {n: -0.1 * (i + 1) for i, n in enumerate(params)}
    for n in range(4):
        loss = coefficients[n] * loss_fn(model(x[n : n + 1]), targets[n : n + 1]).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        updates.append(torch.cat([(g * scale[name]).reshape(-1) for name, g in zip(params, grads)]))
    nodes = [(w, {n: p.detach() + step * 0.5 * (n == "gate") for n, p in params.items()}) for w, step in ((0.5, 1.0), (0.5, 2.0))]
    want = 0
    for w, theta in nodes:
        at = _build(GatedTiedHead)[0]
        with torch.no_grad():
            for n, p in at.named_parameters():
                p.copy_(theta[n])
        want = want + w * torch.einsum("mdp,bp->mbd", brute_jacobians(at, probes), torch.stack(updates))
    with analysis(model):
        plan = covering_plan(model, (x,))  # at the zero gate
        batch = capture_batch(model, plan, (x,), targets, loss_fn, coefficients, 2**30)
        got = factored_contributions(model, plan, (probes,), nodes, batch, scale, 3, ([slice(0, 3)], [slice(0, 3)]), 2**30)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class GatedLinear(nn.Linear):
    """A Linear subclass whose own forward reads its weight a second time behind a zero gate: a read
    inside the module's call that its hooks do not describe."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.gate * F.linear(torch.tanh(x), self.weight)


class GatedSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = GatedLinear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)))


def test_a_plan_checked_at_zero_parameters_still_holds_once_they_move():
    """The check's outcome is remembered whatever the values; checked at the zero gate (where the
    second read adds nothing), the kernel came out 22 % off once the gate was trained. The check
    now fills the zeros in, so the plan it remembers holds at both gates."""
    torch.manual_seed(0)
    model = GatedSubclass().to(F64)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    for gate in (0.0, 0.7):
        with torch.no_grad():
            model.inner.gate.fill_(gate)
        j = brute_jacobians(model, x)
        torch.testing.assert_close(gradient_kernel(model, x, engine="factored"), torch.einsum("mdp,ndp->mn", j, j),
                                   rtol=1e-10, atol=1e-12)


def test_outside_reads_go_to_torch_func_whatever_their_values():
    """The reads are found from the graph (a copy of the parameter outside its module's calls), so
    the plan does not depend on the gate's value."""
    for cls, name in [(GatedAttention, "attn.out_proj.weight"), (GatedTiedHead, "emb.weight")]:
        model, x = _build(cls)
        with analysis(model):
            plan = covering_plan(model, (x,))
        assert name in plan.fallback
        assert plan.blocks  # the other layers stay factored


class ZeroOutput(nn.Module):
    """A zero-initialized output layer (DiT's final layer, a ControlNet zero convolution) after a
    layer that reads its weight twice: at initialization every upstream gradient is zero, so a
    check of values at θ₀ passes whatever the upstream factors miss."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = GatedLinear(4, 5), nn.Linear(5, 2)
        with torch.no_grad():
            self.inner.gate.fill_(0.5)
            self.head.weight.zero_()
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)))


@pytest.mark.parametrize("cls", [GatedSubclass, ZeroOutput])
def test_the_trackers_factored_route_checked_at_zeros_books_what_the_dense_route_books(cls):
    """A tracker keeps the plan it checked at its first step for the whole run, and evaluates that
    step at quadrature nodes where the zeros have moved: the check sees the model with its exact
    zeros filled in (1 % of the parameter's scale), so the twice-read weight goes to torch.func and
    the factored route's first step equals the dense route's (it was 0.08 % off, then refused)."""
    from genkernel import PathKernelTracker
    from genkernel.supervised import mse_loss

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen, dtype=F64)
    probes = torch.randn(5, 4, generator=gen, dtype=F64)
    ledgers = {}
    for group_state in ("dense", "factored"):
        torch.manual_seed(0)
        model = cls().to(F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=8, group_state=group_state)
        for _ in range(3):
            tracker.step(x, y, torch.arange(8))
        ledgers[group_state] = tracker.ledger
    dense, factored = ledgers["dense"], ledgers["factored"]
    scale = float(dense.contributions.abs().max())
    torch.testing.assert_close(factored.contributions, dense.contributions, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(factored.delta, dense.delta, rtol=0, atol=0)


def test_filling_zeros_for_the_check_leaves_the_parameters_and_a_pending_graph_alone():
    """The check runs on copies: the model's parameters keep their values and version counters, so a
    loss the user's forward built before an observed step's check still backpropagates."""
    torch.manual_seed(0)
    model = ZeroOutput().to(F64)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    loss = model(x).pow(2).sum() + model.head.weight.sum()  # a graph holding the zero parameters
    before = [(p.detach().clone(), p._version) for p in model.parameters()]
    with analysis(model):
        plan = covering_plan(model, (x,))
    assert "inner.weight" in plan.fallback  # the twice-read weight, seen once the zeros are filled
    assert all(torch.equal(p, q) and p._version == v for p, (q, v) in zip(model.parameters(), before))
    loss.backward()
