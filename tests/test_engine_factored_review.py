"""The factored engine (factored_gradient_kernel, factored_contributions) against an independent
brute force in float64: one torch.autograd.grad per example and output, each example alone."""

import copy

import pytest
import torch
from torch import nn

from genkernel.core.engine.factored import factored_gradient_kernel
from genkernel.core.engine.factors import analysis, covering_plan
from genkernel.core.engine.kernels import gradient_kernel
from genkernel.core.engine.per_example import capture_batch, factored_contributions

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # small problems: two threads only contend


def brute_jacobians(model, xs, theta=None):
    """[M, d, P] over the trainable parameters (at ``theta`` when given), one example at a time, of an
    eval-mode copy of ``model``."""
    model = copy.deepcopy(model).eval()
    if theta is not None:
        with torch.no_grad():
            for (name, p) in [(n, p) for n, p in model.named_parameters() if p.requires_grad]:
                p.copy_(theta[name])
    return jacobians_of(model, xs)


def jacobians_of(model, xs):
    """[M, d, P] over ``model``'s trainable parameters as they are (the model itself, in its mode), one
    autograd call per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(xs[0].shape[0]):
        out = model(*(t[n : n + 1] for t in xs)).reshape(-1)
        rows.append(torch.stack([
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                       for g, p in zip(torch.autograd.grad(out[i], params, retain_graph=True, allow_unused=True), params)])
            for i in range(out.shape[0])
        ]))
    return torch.stack(rows)


class Pooled(nn.Module):
    def __init__(self, body, channels):
        super().__init__()
        self.body, self.head = body, nn.Linear(channels, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h.mean(dim=tuple(range(2, h.dim()))) if h.dim() > 2 else h)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.proj = nn.Embedding(10, 4, padding_idx=1), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, i):
        return self.proj(torch.tanh(self.norm(self.emb(i)))).mean(1)


class TiedTwice(nn.Module):
    """A weight tied across two modules, one module called twice, a bare parameter used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.b.weight = self.a.weight
        self.s = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x)) * self.s))
        return self.head(torch.tanh(self.c(torch.tanh(self.c(h)))) * self.s)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(9, 5), nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, i, y):
        return self.head(torch.tanh(self.emb(i).mean(1) + self.lin(y)))


def _frozen_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    model[0].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    return model


def _cases():
    g = torch.Generator().manual_seed(0)
    img = lambda n, c=4, s=6: torch.randn(n, c, s, s, generator=g, dtype=F64)  # noqa: E731
    conv = lambda **kw: Pooled(nn.Conv2d(4, 6, 3, **kw), 6)  # noqa: E731
    channels_last = img(3).to(memory_format=torch.channels_last)
    return {
        "conv stride": (conv(stride=2), img(3), img(2)),
        "conv padding dilation": (conv(padding=2, dilation=2), img(3), img(2, s=5)),
        "conv groups": (conv(groups=2), img(3), img(2)),
        "conv no bias": (conv(bias=False), img(3), None),
        "conv reflect": (conv(padding=1, padding_mode="reflect"), img(3), img(2)),
        "conv_transpose": (Pooled(nn.ConvTranspose2d(4, 3, 3, stride=2), 3), img(3, s=4), img(2, s=4)),
        "embedding padding_idx": (Tokens(), torch.randint(0, 4, (5, 3), generator=g), torch.randint(0, 10, (3, 6), generator=g)),
        "tied, twice": (TiedTwice(), torch.randn(5, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)),
        "frozen, buffers": (_frozen_buffers(), img(3, c=3, s=5), img(2, c=3, s=5)),
        "tuple inputs": (TwoInputs(), (torch.randint(0, 9, (5, 2), generator=g), torch.randn(5, 3, generator=g, dtype=F64)),
                         (torch.randint(0, 9, (3, 4), generator=g), torch.randn(3, 3, generator=g, dtype=F64))),
        "non-contiguous": (conv(padding=1), channels_last, img(4)[::2].transpose(2, 3)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_factored_kernel_equals_brute_force_at_every_budget(case):
    """Coverage: every layer configuration, both reductions, diagonals, 1 byte to 512 MiB."""
    torch.manual_seed(1)
    model, x1, x2 = _cases()[case]
    model = model.double()
    xs1 = x1 if isinstance(x1, tuple) else (x1,)
    xs2 = xs1 if x2 is None else x2 if isinstance(x2, tuple) else (x2,)
    j1, j2 = brute_jacobians(model, xs1), brute_jacobians(model, xs2)
    for reduce in ("trace", "none"):
        want = torch.einsum("mdp,ndp->mn", j1, j2) if reduce == "trace" else torch.einsum("mdp,nep->mnde", j1, j2)
        dims = "mdp,mdp->m" if reduce == "trace" else "mdp,mdp->md"
        for budget in (1, 3_000, 2**29):
            kernel, diag1, diag2 = factored_gradient_kernel(model, x1, x2, reduce=reduce, memory_budget=budget)
            scale = want.abs().max()
            assert float((kernel - want).abs().max() / scale) < 1e-12, (reduce, budget)
            assert float((diag1 - torch.einsum(dims, j1, j1)).abs().max() / scale) < 1e-12
            assert float((diag2 - torch.einsum(dims, j2, j2)).abs().max() / scale) < 1e-12


@pytest.mark.parametrize("form", ["outer", "lean", "compact"])
def test_factored_contributions_equal_brute_force(form):
    """Coverage: Σ_q w_q J(x; θ_q) u_n with u_n = scale_p c_n ∇ℓ_n, on a model with a tied weight,
    a module called twice, a bare parameter (fallback), at two nodes, probes of another kind (other
    length), row chunks of 1 byte and of 1 GiB, the outputs in one chunk and in two."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.b = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.c, self.head, self.s = nn.Linear(4, 4), nn.Linear(4, 2), nn.Parameter(torch.randn(4))

        def forward(self, i):
            h = torch.tanh(self.b(torch.tanh(self.a(self.emb(i)))) * self.s)
            return self.head(torch.tanh(self.c(torch.tanh(self.c(h))))).mean(1)

    torch.manual_seed(2)
    model = Model().double().eval()
    g = torch.Generator().manual_seed(3)
    x, probes = torch.randint(0, 10, (5, 3), generator=g), torch.randint(0, 10, (4, 6), generator=g)
    targets, coefficients = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)

    def loss_fn(out, y):
        return ((out - y) ** 2).mean(dim=1)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scale = {n: -0.1 * (k + 1) for k, n in enumerate(params)}
    updates = []
    for n in range(5):
        grads = torch.autograd.grad(coefficients[n] * loss_fn(model(x[n : n + 1]), targets[n : n + 1]).sum(), list(params.values()))
        updates.append(torch.cat([(gr * scale[name]).reshape(-1) for name, gr in zip(params, grads)]))
    nodes = [(w, {n: p.detach() + s * 0.1 * torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()})
             for w, s in ((0.3, 1.0), (0.7, 2.0))]
    want = sum(w * torch.einsum("mdp,bp->mbd", brute_jacobians(model, (probes,), theta), torch.stack(updates))
               for w, theta in nodes)
    for budget in (1, 2**30):
        with analysis(model):
            plan = covering_plan(model, (x,))
            batch = capture_batch(model, plan, (x,), targets, loss_fn, coefficients, budget, form=form)
            for outputs in ([slice(0, 2)], [slice(0, 1), slice(1, 2)]):
                got = factored_contributions(model, plan, (probes,), nodes, batch, scale, 2,
                                             ([slice(0, 1), slice(1, 4)], outputs), budget)
                assert float((got - want).abs().max() / want.abs().max()) < 1e-12, (budget, outputs)


def test_unknown_reduce_is_refused():
    """Fails on the old code: any reduce other than "trace" silently gave the [M, N, d, d] blocks
    (reduce="mean", "sum", "Trace" all returned shape (4, 4, 2, 2))."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=F64)
    for reduce in ("mean", "Trace"):
        with pytest.raises(ValueError, match="reduce must be"):
            factored_gradient_kernel(model, x, reduce=reduce)


@pytest.mark.parametrize("engine", ["functional", "factored"])
def test_reentrant_checkpoint_is_refused_with_the_setting_that_works(engine):
    """Fails on the old code: torch.func's raw RuntimeError ("must override the setup_context
    staticmethod"), after a RuntimeWarning that vmap could not batch the model and a retry one
    example at a time; the tracker already refused this with the remedy, the kernel did not."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=True))

    model = Checkpointed().double()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        gradient_kernel(model, torch.randn(4, 3, dtype=F64), engine=engine)


class _Branch(nn.Module):
    """Inputs of 4 features go through a Linear; other inputs take a branch no parameter reaches."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x) if x.shape[1] == 4 else x[:, :2] * 1.0


def test_held_side_without_any_gradient_gives_zero_diagonals():
    """Fails on the old code: when the held side (x2) reaches no block and there is no fallback
    (here x2 takes a branch without parameters; it requires grad, so its output has a graph),
    diag2 was the int 0, not an [N] tensor, and gradient_kernel(normalize=True) raised
    AttributeError ("'int' object has no attribute 'clamp_min'"); the functional engine gives 0."""

    model = _Branch().double()
    x1, x2 = torch.randn(3, 4, dtype=F64), torch.randn(2, 8, dtype=F64, requires_grad=True)
    for reduce, shape in (("trace", (2,)), ("none", (2, 2))):
        kernel, diag1, diag2 = factored_gradient_kernel(model, x1, x2, reduce=reduce)
        assert isinstance(diag2, torch.Tensor) and diag2.shape == shape and not diag2.any()
        assert not kernel.any()
    want = gradient_kernel(model, x1, x2, engine="functional", normalize=True)
    torch.testing.assert_close(gradient_kernel(model, x1, x2, engine="factored", normalize=True), want, rtol=0, atol=0)


def test_held_side_whose_outputs_have_no_graph_gives_the_functional_engines_zeros():
    """Fails on the old code: x2 without requires_grad taking a branch no parameter reaches has outputs
    with no graph, and the factored engine's covering check called autograd.grad on them ("element 0
    of tensors does not require grad"); the functional engine gives a zero kernel."""

    model = _Branch().double()
    x1, x2 = torch.randn(3, 4, dtype=F64), torch.randn(2, 8, dtype=F64)
    want = gradient_kernel(model, x1, x2, engine="functional")
    got = gradient_kernel(model, x1, x2, engine="factored")
    assert not want.any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
