"""Optimizer-aware splits against an independent float64 brute force (review of splitters.py,
sketched.py, routes.py): the settings the other split tests do not reach.

The reference shares no code with genkernel: per-example gradients by torch.func, each group's
update from PyTorch's update rule written here (the linear recurrences run per group by hand; the
nonlinear parts, Adam's v and step and RMSprop's square_avg and grad_avg, read from an untracked
twin's optimizer after its step), pushed through explicit probe Jacobians at the midpoint.
"""

import copy
import math

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from genkernel import PathKernelTracker
from test_trust import Staged

F64 = torch.float64
O = torch.optim


Branchy = Staged  # a branch switched off between steps: its parameters get no gradient then


def make_model(seed=0):
    torch.manual_seed(seed)
    return Branchy().to(F64)


def loss_fn(out, y):
    return ((out - y) ** 2).mean(dim=1)


def batches(steps=3, batch=6, groups=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g, dtype=F64), torch.randn(batch, 2, generator=g, dtype=F64),
             torch.randint(0, groups, (batch,), generator=g)) for _ in range(steps)]


PROBES = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
G = 3


def f(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class Reference:
    """Per-parameter rows (G groups, then the rest) of PyTorch's update rules."""

    def __init__(self, opt, params):
        self.opt, self.params, self.state = opt, params, {}
        key = "exp_avg" if isinstance(opt, O.Adam) else "momentum_buffer"
        for name, p in params.items():  # state from before tracking: the rest row's
            old = opt.state.get(p, {}).get(key)
            if old is not None:
                self.state[name] = torch.zeros(G + 1, *p.shape, dtype=F64)
                self.state[name][G] = old

    def hyper(self):
        return {n: dict(g) for g in self.opt.param_groups for n, p in self.params.items()
                if any(p is q for q in g["params"])}

    def updates(self, hyper, gg, theta, skipped):
        out, self.last = {}, {}
        for name, p in self.params.items():
            if name in skipped:
                out[name] = torch.zeros(G + 1, *p.shape, dtype=F64)
                self.last[name] = (0.0, out[name], 1.0)
                continue
            h, st = hyper[name], self.opt.state[p]
            lr, wd = f(h["lr"]), f(h.get("weight_decay", 0.0))
            decoupled = h.get("decoupled_weight_decay", isinstance(self.opt, O.AdamW))
            g = -gg[name] if h.get("maximize", False) else gg[name]
            rest = theta[name] * wd if wd and not decoupled else torch.zeros_like(theta[name])
            g = torch.cat([g, rest[None]])
            if type(self.opt) is O.SGD:
                mu, tau = f(h["momentum"]), f(h["dampening"])
                if mu == 0:
                    v = g
                else:
                    b = g.clone() if name not in self.state else mu * self.state[name] + (1 - tau) * g
                    self.state[name] = b
                    v = g + mu * b if h["nesterov"] else b
                d, u = -lr, -lr * v
            elif isinstance(self.opt, O.Adam):
                b1, b2 = map(f, h["betas"])
                m = b1 * self.state.get(name, torch.zeros_like(g)) + (1 - b1) * g
                self.state[name] = m
                k = f(st["step"])
                v = st["max_exp_avg_sq" if h["amsgrad"] else "exp_avg_sq"]
                d = -lr / (1 - b1 ** k) / (v.sqrt() / math.sqrt(1 - b2 ** k) + f(h["eps"]))
                v, u = m, d * m
                if decoupled and wd:
                    u[G] -= lr * wd * theta[name]
            else:  # RMSprop
                square = st["square_avg"] - (st["grad_avg"] ** 2 if h["centered"] else 0)
                a = square.sqrt() + f(h["eps"])
                mu = f(h["momentum"])
                if mu == 0:
                    v = g / a
                else:
                    self.state[name] = mu * self.state.get(name, torch.zeros_like(g)) + g / a
                    v = self.state[name]
                d, u = -lr, -lr * v
            self.last[name] = (d, v, -1.0 if h.get("maximize", False) else 1.0)
            out[name] = u
        return out


def group_gradients(model, params, x, y, groups):
    fixed = {n: p.detach() for n, p in params.items()}

    def one(pv, xi, yi):
        return loss_fn(functional_call(model, pv, (xi[None],)), yi[None])[0]

    per = vmap(grad(one), in_dims=(None, 0, 0))(fixed, x, y)
    return {n: torch.zeros(G, *p.shape, dtype=F64).index_add_(0, groups, per[n] / x.shape[0]) for n, p in params.items()}


def pushed(model, theta, probes, u):
    jac = jacrev(lambda pv: functional_call(model, pv, (probes,)))(theta)
    return sum(torch.einsum("mdp,rp->mrd", j.reshape(*j.shape[:2], -1), u[n].reshape(G + 1, -1)) for n, j in jac.items())


def pretrain(model, opt, steps=3):
    """Untracked steps before the tracker is built: their optimizer state is the rest's."""
    g = torch.Generator().manual_seed(77)
    for _ in range(steps):
        x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()


def compare(make_opt, steps, *, before=None, scheduler=None, checkpoint=False, observed=False, set_to_none=True,
            each_step=None, **tracker_kw):
    """The tracker, an untracked twin and the reference on the same steps: relative errors of the
    ledger's contributions and rest."""
    model, twin = make_model(), make_model()
    opt, twin_opt = make_opt(model), make_opt(twin)
    if checkpoint:  # model and optimizer loaded from a run trained elsewhere
        other = make_model(seed=9)
        other_opt = make_opt(other)
        pretrain(other, other_opt)
        for m, o in ((model, opt), (twin, twin_opt)):
            m.load_state_dict(other.state_dict())
            o.load_state_dict(copy.deepcopy(other_opt.state_dict()))
    schedules = [scheduler(o) for o in (opt, twin_opt)] if scheduler else []
    tracker = PathKernelTracker(model, opt, loss_fn, PROBES, num_groups=G, quadrature="midpoint", **tracker_kw)
    params = dict(twin.named_parameters())
    ref = Reference(twin_opt, params)
    contributions, rest = 0, 0
    for k, (x, y, groups) in enumerate(steps):
        if before:
            before(k, model, opt)
            before(k, twin, twin_opt)
        theta = {n: p.detach().clone() for n, p in params.items()}
        hyper = ref.hyper()
        gg = group_gradients(twin, params, x, y, groups)
        twin_opt.zero_grad(set_to_none=set_to_none)
        loss_fn(twin(x), y).mean().backward()
        skipped = {n for n, p in params.items() if p.grad is None}
        twin_opt.step()
        u = ref.updates(hyper, gg, theta, skipped)
        mid = {n: theta[n] + 0.5 * (p.detach() - theta[n]) for n, p in params.items()}
        c = pushed(twin, mid, PROBES, u)
        contributions, rest = contributions + c[:, :G], rest + c[:, G]
        if observed:  # the user's own loop; the tracker records through the optimizer's hooks
            opt.zero_grad(set_to_none=set_to_none)
            losses = loss_fn(model(x), y)
            tracker.observe(losses, groups)
            losses.mean().backward()
            opt.step()
        else:
            recorded = tracker.step(x, y, groups)
            if each_step:
                each_step(tracker, recorded, ref, twin, mid, c)
        for s in schedules:
            s.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b), "the tracked model must train bit for bit as its untracked twin"
    assert tracker.ledger.steps == len(steps)
    scale = float(contributions.abs().max())
    return tracker.ledger, contributions, rest, scale


def assert_exact(make_opt, steps, **kwargs):
    ledger, contributions, rest, scale = compare(make_opt, steps, **kwargs)
    assert float((ledger.contributions - contributions).abs().max()) < 1e-12 * scale
    assert float((ledger.rest - rest).abs().max()) < 1e-12 * scale
    return ledger, rest


def branch_on(pattern):
    def set_branch(k, model, opt):
        model.use_branch = pattern[k]
    return set_branch


# -- coverage: settings no other test reaches, exact against the brute force -----------------------

def test_adam_with_decoupled_weight_decay_books_the_decay_in_the_rest_as_adamw():
    make = lambda m: O.Adam(m.parameters(), lr=0.02, weight_decay=0.1, decoupled_weight_decay=True)  # noqa: E731
    ledger, rest = assert_exact(make, batches())
    assert float(rest.abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_one_cycle_schedules_of_betas_and_momentum_match_brute_force(kind):
    make = ((lambda m: O.Adam(m.parameters(), lr=0.02, amsgrad=True)) if kind == "adam" else
            (lambda m: O.SGD(m.parameters(), lr=0.02, momentum=0.9, dampening=0.1)))
    scheduler = lambda o: O.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=6)  # noqa: E731
    assert_exact(make, batches(4), scheduler=scheduler)


@pytest.mark.parametrize("kind", ["adam", "sgd", "rmsprop"])
def test_state_loaded_from_a_checkpoint_before_tracking_is_the_rests(kind):
    make = {
        "adam": lambda m: O.Adam(m.parameters(), lr=0.02, amsgrad=True, weight_decay=0.05, maximize=True),
        "sgd": lambda m: O.SGD(m.parameters(), lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.05),
        "rmsprop": lambda m: O.RMSprop(m.parameters(), lr=0.01, momentum=0.5, centered=True, weight_decay=0.05),
    }[kind]
    ledger, rest = assert_exact(make, batches(), checkpoint=True)
    assert float(rest.abs().max()) > 0.1 * float(ledger.contributions.abs().max())


@pytest.mark.parametrize("kind", ["adam", "sgd", "rmsprop"])
def test_state_of_only_some_parameters_before_tracking(kind):
    """The branch was off in the untracked steps: the other parameters carry state into the window."""
    make = {
        "adam": lambda m: O.Adam(m.parameters(), lr=0.02, weight_decay=0.05),
        "sgd": lambda m: O.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05),
        "rmsprop": lambda m: O.RMSprop(m.parameters(), lr=0.01, momentum=0.5, weight_decay=0.05),
    }[kind]

    def make_pretrained(m):
        o = make(m)
        m.use_branch = False
        pretrain(m, o)
        m.use_branch = True
        return o
    assert_exact(make_pretrained, batches())


def test_rmsprop_centered_with_momentum_decay_maximize_and_two_parameter_groups():
    make = lambda m: O.RMSprop([  # noqa: E731
        {"params": list(m.a.parameters()), "lr": 0.01, "centered": True, "alpha": 0.7, "momentum": 0.6},
        {"params": list(m.b.parameters()) + list(m.branch.parameters()), "lr": 0.03, "momentum": 0.4,
         "maximize": True, "weight_decay": 0.1, "centered": True}])
    assert_exact(make, batches())


@pytest.mark.parametrize("kind", ["adamw", "rmsprop", "sgd"])
def test_zero_gradients_left_by_zero_grad_set_to_none_false_advance_the_state(kind):
    """An observed loop with optimizer.zero_grad(set_to_none=False): the branch's parameters, off at
    some steps, get a zero gradient and the optimizer advances their state anyway (Adam's moments
    decay, its step counter moves on)."""
    make = {
        "adamw": lambda m: O.AdamW(m.parameters(), lr=0.02, weight_decay=0.1),
        "rmsprop": lambda m: O.RMSprop(m.parameters(), lr=0.01, momentum=0.5, centered=True),
        "sgd": lambda m: O.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1),
    }[kind]
    assert_exact(make, batches(4), before=branch_on([False, True, False, True]), observed=True, set_to_none=False)


def test_a_learning_rate_held_as_a_float64_tensor_under_a_scheduler():
    make = lambda m: O.AdamW(m.parameters(), lr=torch.tensor(0.02, dtype=F64), weight_decay=0.1, fused=True)  # noqa: E731
    assert_exact(make, batches(), scheduler=lambda o: O.lr_scheduler.ExponentialLR(o, 0.5))


# -- the sketched route: unbiased where it applies --------------------------------------------------

def sketched_estimate(projection, ref, twin, mid):
    """⟨R D J̄(x)ᵀ, R v_g⟩ for every probe and group, with the tracker's own R and the reference's D and v.
    The route's sketches hold the groups' gradients' state, not negated under maximize (its D is):
    the sign moves to D, the same value in expectation (E[RᵀR] = I) and exactly the route's estimate."""
    jac = jacrev(lambda pv: functional_call(twin, pv, (PROBES,)))(mid)
    probe_side, group_side = 0, 0
    for name, j in jac.items():
        d, v, sign = ref.last[name]
        m, out = j.shape[:2]
        probe_side = probe_side + projection.project(name, (sign * d * j).reshape(m * out, *j.shape[2:])).reshape(m, out, -1)
        group_side = group_side + projection.project(name, sign * v[:G])
    return torch.einsum("mdk,gk->mgd", probe_side, group_side)


@pytest.mark.parametrize("kind", ["sgd", "sgd_dampened", "adam", "adamw_one_cycle"])
def test_sketched_estimates_are_the_sketch_of_the_brute_force(kind):
    """Each step's sketched contribution is ⟨R D J̄(x)ᵀ, R v_g⟩ with the brute force's D and direction
    v_g (buffer, Nesterov direction, first moment) and the route's own R, to rounding: so the
    estimates are unbiased under Nesterov, dampening, maximize, per-group learning rates and decay,
    amsgrad and state loaded before tracking; the rest is exact."""
    make = {
        "sgd": lambda m: O.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
        "sgd_dampened": lambda m: O.SGD([{"params": list(m.a.parameters()), "lr": 0.1, "maximize": True},
                                         {"params": list(m.b.parameters()) + list(m.branch.parameters()), "lr": 0.02,
                                          "weight_decay": 0.1}], momentum=0.8, dampening=0.3),
        "adam": lambda m: O.Adam([{"params": list(m.a.parameters()), "lr": 0.05, "maximize": True},
                                  {"params": list(m.b.parameters()) + list(m.branch.parameters()), "lr": 0.01,
                                   "weight_decay": 0.1}], amsgrad=True),
        "adamw_one_cycle": lambda m: O.AdamW(m.parameters(), lr=0.02, weight_decay=0.1),
    }[kind]
    scheduler = ((lambda o: O.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=6)) if kind == "adamw_one_cycle"
                 else None)  # betas cycle too
    gaps = []

    def each_step(tracker, recorded, ref, twin, mid, c):
        expected = sketched_estimate(tracker.route.projection, ref, twin, mid)
        gaps.append(float((recorded.contributions - expected).abs().max() / expected.abs().max()))
        scale = float(c[:, :G].abs().max())
        assert float((recorded.rest - c[:, G]).abs().max()) < 1e-12 * scale
    compare(make, batches(), checkpoint=True, each_step=each_step, scheduler=scheduler, group_state="sketched",
            sketch_dim=32)
    assert max(gaps) < 1e-12, gaps


# -- faults found in review -------------------------------------------------------------------------

def test_betas_set_as_a_list_between_steps_on_the_sketched_route():
    """A loop or scheduler that sets betas as a list: the sketched route compared the parameter
    groups' betas in a set and failed with 'unhashable type: list' (the step rolled back)."""
    def set_betas(k, model, opt):
        if k == 1:
            for group in opt.param_groups:
                group["betas"] = [0.8, 0.99]
    make = lambda m: O.Adam(m.parameters(), lr=0.02)  # noqa: E731
    steps = batches()
    sketched, contributions, rest, scale = compare(make, steps, before=set_betas, group_state="sketched",
                                                   sketch_dim=64)
    # The examples' exact total is booked (the estimates plus the sketch error) and the rest is exact.
    total = sketched.contributions.sum(1) + sketched.sketch_error
    assert float((total - contributions.sum(1)).abs().max()) < 1e-12 * scale
    assert float((sketched.rest - rest).abs().max()) < 1e-12 * scale


class Lookahead(O.Optimizer):
    """A Lookahead wrapper (as torch_optimizer's): the inner optimizer in ``.optimizer``, and every
    k steps the parameters pulled towards slow weights inside step()."""

    def __init__(self, inner, k=2, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.count = inner, k, alpha, 0
        self.slow = [p.detach().clone() for g in inner.param_groups for p in g["params"]]

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        self.optimizer.step()
        self.count += 1
        if self.count % self.k == 0:
            with torch.no_grad():
                for slow, p in zip(self.slow, [p for g in self.param_groups for p in g["params"]]):
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)


def test_a_wrapper_whose_step_does_more_than_the_inner_optimizers_is_refused():
    """unwrap_optimizer took any Optimizer holding another in ``.optimizer`` for a pass-through
    wrapper: tracker.step() then stepped the inner Adam and silently trained without Lookahead's
    slow-weight pulls (parameters different from the untracked loop's). Needs the patch of
    genkernel/core/adapter.py (unwrap only accelerate's and Lightning's wrappers)."""
    model = make_model()
    with pytest.raises(TypeError, match="Lookahead wraps Adam.*accelerate"):
        PathKernelTracker(model, Lookahead(O.Adam(model.parameters(), lr=0.01)), loss_fn, PROBES, num_groups=G)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_maximize_switched_mid_run_is_followed_densely_and_refused_clearly_by_the_sketched_route(kind):
    """The optimizer's buffer then mixes ascent and descent gradients. The dense route follows it
    exactly; the sketched route keeps its sketches with one sign per parameter and cannot, and was
    stopped only after the real step by a LedgerCheckError that did not name the cause (the step
    rolled back). It is refused before the step, naming maximize and the fix."""
    make = {"adam": lambda m: O.Adam(m.parameters(), lr=0.02),
            "sgd": lambda m: O.SGD(m.parameters(), lr=0.05, momentum=0.9)}[kind]

    def toggle(k, model, opt):
        if k == 1:
            opt.param_groups[0]["maximize"] = True
    assert_exact(make, batches(), before=toggle)
    model = make_model()
    optimizer = make(model)
    tracker = PathKernelTracker(model, optimizer, loss_fn, PROBES, num_groups=G, group_state="sketched", sketch_dim=16)
    steps = batches()
    tracker.step(*steps[0])
    optimizer.param_groups[0]["maximize"] = True
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="maximize changed.*group_state='dense'"):
        tracker.step(*steps[1])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert tracker.ledger.steps == 1
    optimizer.param_groups[0]["maximize"] = False  # back as the sketches hold it: tracked again
    tracker.step(*steps[1])
    assert tracker.ledger.steps == 2
