"""Adversarial checks of the optimizer splits (splitters.py) against an independent brute force.

The reference shares no code with genkernel: per-example gradients by a plain autograd loop, each
parameter's per-group update from PyTorch's published formulas in float64 with the
hyperparameters its parameter group holds at that step, and the ledger from explicit Jacobians at
the quadrature nodes.
"""

import copy

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.errors import LedgerCheckError


@pytest.fixture(autouse=True)
def _float64(float64):
    yield


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)

def loss_fn(out, y):
    return ((out - y) ** 2).mean(dim=1)

def batches(num_steps=3, batch=6, G=3, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        x = torch.randn(batch, 3, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn(batch, 2, generator=gen, dtype=torch.float64).to(dtype)
        out.append((x, y, torch.randint(0, G, (batch,), generator=gen)))
    return out

NODES = {"left": ([0.0], [1.0]), "midpoint": ([0.5], [1.0]), "trapezoid": ([0.0, 1.0], [0.5, 0.5]),
         "simpson": ([0.0, 0.5, 1.0], [1 / 6, 4 / 6, 1 / 6])}
def f(x): return float(x.item()) if isinstance(x, torch.Tensor) else float(x)

class Ref:
    """per-parameter brute-force, float64. hyper: dict of group hyperparameters at this step."""
    def __init__(self, kind): self.kind, self.st = kind, {}
    def step(self, i, g, theta, h, decoupled):
        # g [G, *shape] float64 group grads; returns [G+1, *shape]
        st = self.st.setdefault(i, {"k": 0})
        lr, wd = f(h["lr"]), f(h.get("weight_decay", 0))
        if h.get("maximize"): g = -g
        rest = theta * wd if (wd and not decoupled) else torch.zeros_like(theta)
        g = torch.cat([g, rest[None]]); tot = g.sum(0)
        st["k"] += 1; k = st["k"]
        if self.kind == "sgd":
            mu, tau = f(h["momentum"]), f(h["dampening"])
            if mu == 0: return -lr * g
            st["m"] = g.clone() if "m" not in st else mu * st["m"] + (1 - tau) * g
            return -lr * (g + mu * st["m"]) if h["nesterov"] else -lr * st["m"]
        if self.kind == "adam":
            b1, b2 = map(f, h["betas"]); eps = f(h["eps"])
            st["m"] = (1 - b1) * g if "m" not in st else b1 * st["m"] + (1 - b1) * g
            st["v"] = (1 - b2) * tot**2 if "v" not in st else b2 * st["v"] + (1 - b2) * tot**2
            v = st["v"]
            if h.get("amsgrad"):
                st["vm"] = v.clone() if "vm" not in st else torch.maximum(st["vm"], v); v = st["vm"]
            u = -lr * (st["m"] / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + eps)
            if decoupled and wd: u[-1] = u[-1] - lr * wd * theta
            return u
        if self.kind == "rmsprop":
            a, eps, mu = f(h["alpha"]), f(h["eps"]), f(h["momentum"])
            st["v"] = (1 - a) * tot**2 if "v" not in st else a * st["v"] + (1 - a) * tot**2
            d = st["v"]
            if h["centered"]:
                st["ga"] = (1 - a) * tot if "ga" not in st else a * st["ga"] + (1 - a) * tot
                d = d - st["ga"]**2
            A = torch.sqrt(d) + eps
            if mu == 0: return -lr * g / A
            st["m"] = g / A if "m" not in st else mu * st["m"] + g / A
            return -lr * st["m"]

def run(make_opt, kind, steps, probes, G=3, quadrature="midpoint", between=None, decoupled=False):
    """The tracker, a bare twin and the brute force on the same steps; returns the relative gaps."""
    model, bare = make_model(), make_model()
    opt, bopt = make_opt(model), make_opt(bare)
    tracker = PathKernelTracker(model, opt, loss_fn, probes, num_groups=G, quadrature=quadrature)
    refm = make_model()
    params, ref = list(refm.parameters()), Ref(kind)
    M, d = probes.shape[0], 2
    C, R = torch.zeros(M, G, d), torch.zeros(M, d)
    nodes, weights = NODES[quadrature]
    for k, (x, y, grp) in enumerate(steps):
        hyp = [dict(gr) for gr in opt.param_groups]
        owner = {id(p): j for j, gr in enumerate(opt.param_groups) for p in gr["params"]}
        mparams = list(model.parameters())
        theta = [p.detach().clone() for p in mparams]
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        gg = [torch.zeros(G, *p.shape) for p in params]
        for n in range(x.shape[0]):
            refm.zero_grad()
            (loss_fn(refm(x[n:n + 1]), y[n:n + 1]).sum() / x.shape[0]).backward()
            for j, p in enumerate(params):
                gg[j][grp[n]] += p.grad
        us = [ref.step(j, gg[j], theta[j], hyp[owner[id(p)]], decoupled) for j, p in enumerate(mparams)]
        tracker.step(x, y, grp)
        bopt.zero_grad()
        loss_fn(bare(x), y).mean().backward()
        bopt.step()
        new = [p.detach().clone() for p in mparams]
        for m in range(M):
            for s, w in zip(nodes, weights):
                with torch.no_grad():
                    for p, t, nt in zip(params, theta, new):
                        p.copy_(t + s * (nt - t))
                out = refm(probes[m:m + 1])[0]
                for i in range(d):
                    rows = torch.autograd.grad(out[i], params, retain_graph=True)
                    c = sum(us[j].reshape(G + 1, -1) @ rows[j].reshape(-1) for j in range(len(params))) * w
                    C[m, :, i] += c[:-1]
                    R[m, i] += c[-1]
        if between:
            between(k, opt, bopt)
    ledger = tracker.ledger
    scale = float(C.abs().max())
    identity = ledger.f_end - ledger.f_start - ledger.contributions.sum(1) - ledger.rest - ledger.residual
    return dict(bitexact=all(torch.equal(a, b) for a, b in zip(model.parameters(), bare.parameters())),
                contributions=float((ledger.contributions - C).abs().max()) / scale,
                rest=float((ledger.rest - R).abs().max()) / scale, identity=float(identity.abs().max()))


PROBES = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def assert_exact(result):
    assert result["bitexact"], "the tracked model must train bit for bit as without the tracker"
    assert result["contributions"] < 1e-12 and result["rest"] < 1e-12, result
    assert result["identity"] < 1e-12, result


def two_groups(model, first=None, second=None):
    return [{"params": list(model[0].parameters()), **(first or {})},
            {"params": list(model[2].parameters()), **(second or {})}]


def test_schedules_of_betas_decay_and_a_zero_lr_group_match_brute_force():
    def schedule(k, *optimizers):
        for o in optimizers:
            for i, g in enumerate(o.param_groups):
                g["lr"] *= 0.7 + 0.1 * i
                g["betas"] = (0.9 - 0.1 * k, 0.99 - 0.01 * k)
                g["weight_decay"] = 0.01 * k
    make = lambda m: torch.optim.Adam(two_groups(m, second={"lr": 0.0}), lr=0.02, amsgrad=True)  # noqa: E731
    assert_exact(run(make, "adam", batches(4), PROBES, between=schedule))


def test_momentum_switched_off_and_on_with_dampening_and_decay_schedules_match_brute_force():
    def schedule(k, *optimizers):
        for o in optimizers:
            for g in o.param_groups:
                g["lr"] *= 0.5
                g["momentum"] = [0.0, 0.9, 0.0, 0.5][k]
                g["dampening"] = 0.1 * k
                g["weight_decay"] = 0.01 * (k % 2)
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, maximize=True)  # noqa: E731
    assert_exact(run(make, "sgd", batches(4), PROBES, between=schedule))


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True)])
def test_adamw_implementations_match_brute_force(flags):
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.05, maximize=True, eps=1e-30,  # noqa: E731
                                       **flags)
    assert_exact(run(make, "adam", batches(3), PROBES, decoupled=True))


def test_a_parameter_moved_to_another_parameter_group_steps_with_that_groups_hyperparameters():
    def move(k, *optimizers):
        if k == 1:
            for o in optimizers:
                first, second = o.param_groups
                second["params"].append(first["params"].pop())
    make = lambda m: torch.optim.SGD(two_groups(m, {"lr": 0.1}, {"lr": 0.05, "momentum": 0.5}))  # noqa: E731
    assert_exact(run(make, "sgd", batches(4), PROBES, between=move))


def test_a_float32_tensor_learning_rate_or_beta_of_adam_on_a_float64_model_is_refused_clearly():
    # PyTorch's Adam computes lr / (1 − β1^k) in the tensor's dtype: float32-rounded, not splittable exactly.
    for kwargs in (dict(lr=torch.tensor(1e-2, dtype=torch.float32)), dict(betas=(torch.tensor(0.9, dtype=torch.float32), torch.tensor(0.999, dtype=torch.float32)))):
        model = make_model()
        with pytest.raises(ValueError, match="float32 tensor.*Python float"):
            PathKernelTracker(model, torch.optim.Adam(model.parameters(), foreach=False, **kwargs), loss_fn, PROBES,
                              num_groups=3)
    # ... also when a scheduler sets one later: refused before the parameters move
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
    tracker = PathKernelTracker(model, optimizer, loss_fn, PROBES, num_groups=3)
    (x, y, g), = batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.param_groups[0]["lr"] = torch.tensor(1e-2, dtype=torch.float32)
    with pytest.raises(ValueError, match="float32 tensor"):
        tracker.step(x, y, g)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert tracker.ledger.steps == 0
    # A tensor of the parameters' dtype is exact.
    make = lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(1e-2, dtype=torch.float64),  # noqa: E731
                                      foreach=False)
    assert_exact(run(make, "adam", batches(2), PROBES))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_loaded_mid_run_is_refused_naming_the_cause(kind):
    model = make_model()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if kind == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=0.01))
    tracker = PathKernelTracker(model, optimizer, loss_fn, PROBES, num_groups=3)
    steps = batches(3)
    tracker.step(*steps[0])
    older = copy.deepcopy(optimizer.state_dict())
    tracker.step(*steps[1])
    optimizer.load_state_dict(older)
    with pytest.raises(LedgerCheckError, match="load_state_dict"):
        tracker.step(*steps[2])
    assert tracker.ledger.steps == 2
