"""The tracker's ledger against an independent brute-force computation.

The reference below shares no code with genkernel: per-example gradients by a plain autograd loop,
each optimizer's update re-derived per group from PyTorch's documented algorithms, Jacobians at
the quadrature nodes by autograd over every output, all in float64.
"""

import math

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker

@pytest.fixture(autouse=True)
def _float64(float64):
    yield


NODES = {"left": ([0.0], [1.0]), "midpoint": ([0.5], [1.0]), "trapezoid": ([0.0, 1.0], [0.5, 0.5]),
         "simpson": ([0.0, 0.5, 1.0], [1 / 6, 4 / 6, 1 / 6]),
         # three-point Gauss–Legendre on [0, 1], written out: nodes ½ ∓ ½√(3/5), weights 5/18, 8/18, 5/18
         "gauss3": ([0.5 - 0.5 * math.sqrt(0.6), 0.5, 0.5 + 0.5 * math.sqrt(0.6)], [5 / 18, 8 / 18, 5 / 18])}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def loss_fn(out, y):
    return ((out - y) ** 2).mean(dim=1)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector, like):
    out, i = [], 0
    for p in like:
        out.append(vector[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def per_example_grads(model, x, y):
    grads = []
    for n in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[n : n + 1]), y[n : n + 1]).sum().backward()
        grads.append(flat([p.grad for p in model.parameters()]).clone())
    return torch.stack(grads)


def jacobian(model, probe, theta):
    """[d, P] Jacobian of the model output at one probe, parameters set to theta."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), unflat(theta, list(model.parameters()))):
            p.copy_(v)
    out = model(probe.unsqueeze(0))[0]
    rows = []
    for i in range(out.shape[0]):
        g = torch.autograd.grad(out[i], list(model.parameters()), retain_graph=True)
        rows.append(flat(g))
    return torch.stack(rows)


class Reference:
    """Brute-force per-group optimizer; one dict of state per group plus the rest (index G)."""

    def __init__(self, kind, hp, num_groups, lr_of):
        self.kind, self.hp, self.G, self.lr_of = kind, hp, num_groups, lr_of
        self.m = None   # per-group first moment or momentum buffer [G+1, P]
        self.v = None   # shared second moment [P]
        self.vmax = None
        self.gavg = None
        self.k = 0

    def step(self, group_grads, theta):
        """group_grads [G, P]; returns updates [G+1, P] (last: rest) and the total update."""
        hp, k = self.hp, self.k + 1
        self.k = k
        lr = self.lr_of(k)
        wd = hp.get("weight_decay", 0.0)
        decoupled = self.kind == "adamw"
        rest_grad = theta * wd if not decoupled else torch.zeros_like(theta)
        if hp.get("maximize"):  # ascent on the loss; PyTorch adds weight decay after negating
            group_grads = -group_grads
        g = torch.cat([group_grads, rest_grad[None]])
        total_grad = g.sum(0)
        if self.kind == "sgd":
            mu, tau = hp.get("momentum", 0.0), hp.get("dampening", 0.0)
            if mu == 0:
                return -lr * g
            self.m = g.clone() if self.m is None else mu * self.m + (1 - tau) * g
            return -lr * (g + mu * self.m) if hp.get("nesterov") else -lr * self.m
        if self.kind in ("adam", "adamw"):
            b1, b2 = hp.get("betas", (0.9, 0.999))
            eps = hp.get("eps", 1e-8)
            self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
            self.v = (1 - b2) * total_grad**2 if self.v is None else b2 * self.v + (1 - b2) * total_grad**2
            v = self.v
            if hp.get("amsgrad"):
                self.vmax = v.clone() if self.vmax is None else torch.maximum(self.vmax, v)
                v = self.vmax
            u = -lr * (self.m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + eps)
            if decoupled:
                u[-1] = u[-1] - lr * wd * theta
            return u
        if self.kind == "rmsprop":
            alpha, eps, mu = hp.get("alpha", 0.99), hp.get("eps", 1e-8), hp.get("momentum", 0.0)
            self.v = (1 - alpha) * total_grad**2 if self.v is None else alpha * self.v + (1 - alpha) * total_grad**2
            denom = self.v
            if hp.get("centered"):
                self.gavg = (1 - alpha) * total_grad if self.gavg is None else alpha * self.gavg + (1 - alpha) * total_grad
                denom = self.v - self.gavg**2
            a = torch.sqrt(denom) + eps
            if mu == 0:
                return -lr * g / a
            self.m = g / a if self.m is None else mu * self.m + g / a
            return -lr * self.m
        raise AssertionError(self.kind)


CONFIGS = {
    "sgd": ("sgd", dict(lr=0.1)),
    "sgd_momentum_dampening_wd": ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "sgd_nesterov": ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02)),
    "adam_coupled_wd": ("adam", dict(lr=0.02, weight_decay=0.05)),
    "adam_amsgrad": ("adam", dict(lr=0.02, amsgrad=True, betas=(0.8, 0.9))),
    "adamw": ("adamw", dict(lr=0.02, weight_decay=0.1)),
    "sgd_maximize": ("sgd", dict(lr=0.01, momentum=0.5, weight_decay=0.01, maximize=True)),
    "adam_maximize": ("adam", dict(lr=0.01, maximize=True, weight_decay=0.01)),
    "rmsprop": ("rmsprop", dict(lr=0.005)),
    "rmsprop_centered_momentum_wd": ("rmsprop", dict(lr=0.003, momentum=0.7, centered=True, weight_decay=0.02)),
}
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}


def brute_force(kind, hp, steps, probes, num_groups, *, quadrature, max_grad_norm=math.inf, lr_of=None):
    """Independent ledger: contributions [M, G, d] and rest [M, d] over the given steps."""
    model = make_model()
    lr_of = lr_of or (lambda k: hp["lr"])
    ref = Reference(kind, hp, num_groups, lr_of)
    theta = flat(model.parameters()).detach().clone()
    M, d = probes.shape[0], 2
    contributions = torch.zeros(M, num_groups, d)
    rest = torch.zeros(M, d)
    nodes, weights = NODES[quadrature]
    for x, y, groups in steps:
        with torch.no_grad():
            for p, v in zip(model.parameters(), unflat(theta, list(model.parameters()))):
                p.copy_(v)
        g = per_example_grads(model, x, y) / x.shape[0]
        total = g.sum(0)
        factor = min(1.0, max_grad_norm / (float(total.norm()) + 1e-6)) if math.isfinite(max_grad_norm) else 1.0
        group_grads = torch.zeros(num_groups, g.shape[1]).index_add_(0, groups, g) * factor
        u = ref.step(group_grads, theta)
        new_theta = theta + u.sum(0)
        for m in range(M):
            jbar = sum(w * jacobian(model, probes[m], theta + s * (new_theta - theta)) for s, w in zip(nodes, weights))
            c = (jbar @ u.T).T  # [G+1, d]
            contributions[m] += c[:-1]
            rest[m] += c[-1]
        theta = new_theta
    return contributions, rest, theta


def batches(num_steps=3, batch=6, num_groups=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        x = torch.randn(batch, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(batch, 2, generator=gen, dtype=torch.float64)
        out.append((x, y, torch.randint(0, num_groups, (batch,), generator=gen)))
    return out


def run_tracker(kind, hp, steps, probes, num_groups, *, quadrature, max_grad_norm=math.inf, scheduler=None):
    model = make_model()
    optimizer = OPTIMIZERS[kind](model.parameters(), **hp)
    sched = scheduler(optimizer) if scheduler else None
    tracker = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=num_groups, quadrature=quadrature,
                                max_grad_norm=max_grad_norm)
    for x, y, groups in steps:
        tracker.step(x, y, groups)
        if sched:
            sched.step()
    return tracker, model


def assert_matches(tracker, model, contributions, rest, theta):
    ledger = tracker.ledger
    torch.testing.assert_close(flat(model.parameters()).detach(), theta, rtol=1e-10, atol=1e-12)
    scale = contributions.abs().max()
    torch.testing.assert_close(ledger.contributions, contributions, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(ledger.rest, rest, rtol=0, atol=1e-9 * scale + 1e-14)
    # The identity holds by definition of the residual; the check above is what proves the split.
    torch.testing.assert_close(ledger.f_end - ledger.f_start,
                               ledger.contributions.sum(1) + ledger.rest + ledger.residual, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ledger_matches_brute_force(name):
    kind, hp = CONFIGS[name]
    probes = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    steps = batches()
    tracker, model = run_tracker(kind, hp, steps, probes, 3, quadrature="midpoint")
    assert_matches(tracker, model, *brute_force(kind, hp, steps, probes, 3, quadrature="midpoint"))
    if hp.get("weight_decay"):
        assert tracker.ledger.rest.abs().max() > 0


@pytest.mark.parametrize("quadrature", ["left", "trapezoid", "simpson", "gauss3"])
def test_quadrature_rules_match_brute_force(quadrature):
    kind, hp = CONFIGS["sgd_momentum_dampening_wd"]
    probes = torch.randn(2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    steps = batches(num_steps=2)
    tracker, model = run_tracker(kind, hp, steps, probes, 3, quadrature=quadrature)
    assert_matches(tracker, model, *brute_force(kind, hp, steps, probes, 3, quadrature=quadrature))


def test_clipping_matches_brute_force():
    kind, hp = CONFIGS["sgd_momentum_dampening_wd"]
    probes = torch.randn(2, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    steps = batches()
    tracker, model = run_tracker(kind, hp, steps, probes, 3, quadrature="midpoint", max_grad_norm=0.05)
    assert_matches(tracker, model, *brute_force(kind, hp, steps, probes, 3, quadrature="midpoint", max_grad_norm=0.05))


def test_changing_learning_rate_matches_brute_force():
    kind, hp = CONFIGS["adam_coupled_wd"]
    probes = torch.randn(2, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    steps = batches()
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    tracker, model = run_tracker(kind, hp, steps, probes, 3, quadrature="midpoint", scheduler=sched)
    expected = brute_force(kind, hp, steps, probes, 3, quadrature="midpoint", lr_of=lambda k: hp["lr"] * 0.5 ** (k - 1))
    assert_matches(tracker, model, *expected)


def test_two_parameter_groups_with_their_own_hyperparameters():
    probes = torch.randn(2, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    steps = batches()
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = torch.optim.SGD([{"params": first, "lr": 0.1}, {"params": second, "lr": 0.02, "momentum": 0.5}])
    tracker = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=3)
    for x, y, g in steps:
        tracker.step(x, y, g)
    # Reference: one SGD per parameter group, combined.
    ref_model = make_model()
    params = list(ref_model.parameters())
    sizes = [p.numel() for p in params]
    theta = flat(params).detach().clone()
    split = sum(sizes[:2])
    buf = None
    contributions = torch.zeros(2, 3, 2)
    for x, y, groups in steps:
        with torch.no_grad():
            for p, v in zip(params, unflat(theta, params)):
                p.copy_(v)
        g = per_example_grads(ref_model, x, y) / x.shape[0]
        gg = torch.zeros(4, g.shape[1]).index_add_(0, groups, g)
        u = -0.1 * gg.clone()
        buf = gg[:, split:].clone() if buf is None else 0.5 * buf + gg[:, split:]
        u[:, split:] = -0.02 * buf
        new = theta + u.sum(0)
        for m in range(2):
            c = jacobian(ref_model, probes[m], (theta + new) / 2) @ u.T
            contributions[m] += c.T[:3]
        theta = new
    torch.testing.assert_close(tracker.ledger.contributions, contributions, rtol=0, atol=1e-9 * contributions.abs().max())
