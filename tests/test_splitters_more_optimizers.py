"""Exact splits for torch.optim.Adagrad, Adamax, RAdam and NAdam (splitters.py), each checked against a brute
force from the optimizer's published update rule computed here from per-example gradients by a plain autograd
loop (no genkernel code in the reference): the rows equal the brute-force per-group updates, the rows add up to
the real step, and a tracked run's ledger equals the contributions pushed by hand and trains to the same
parameters, bit for bit, as the untracked loop. Before, all four were refused (TypeError naming the supported
optimizers), so every test here fails on that code (the refusals too: a TypeError, not the variant's error)."""

import math

import pytest
import torch
from torch.func import functional_call, jacrev

from genkernel import PathKernelTracker
from genkernel.core.grouping import Partitions
from genkernel.core.tracking.splitters import make_splitter
from genkernel.supervised import mlp, mse_loss

from test_splitters_review2 import G, N, _f, _model, _relative  # the same tiny float64 model and helpers
from test_splitters_review2 import _drive as _drive_with

F64 = torch.float64


# -- the published rules, per row (groups, rest, rounding), their non-linear parts from the total ------------------
class _Rule:
    """One optimizer's update of every row of one parameter: ``rows`` [R, *shape] are the rows' gradients with a
    zero rest row at ``rest``; returns the rows' updates. Keeps its own state per parameter name."""

    def __init__(self, rest):
        self.rest, self.state, self.branches = rest, {}, set()

    def __call__(self, name, rows, theta, group):
        rows = rows.clone()
        if group.get("maximize", False):
            rows = -rows
            rows[self.rest] = 0.0
        decay = _f(group.get("weight_decay", 0.0))
        decoupled = group.get("decoupled_weight_decay", False)
        if decay != 0 and not decoupled:
            rows[self.rest] = decay * theta  # coupled decay: the rest's gradient
        st = self.state.setdefault(name, {"k": 0})
        st["k"] += 1
        out = self.update(st, rows, rows.sum(0), group)
        if decay != 0 and decoupled:  # θ ← θ (1 − η λ) before the update
            out[self.rest] -= (1 - (1 - _f(group["lr"]) * decay)) * theta
        return out


class _Adagrad(_Rule):
    """s_k = s_{k−1} + g_k² (s_0 the initial accumulator value); u = −η / (1 + (k − 1) lr_decay) · ĝ / (sqrt(s_k) + ε)."""

    def __init__(self, rest, initial):
        super().__init__(rest)
        self.initial = initial

    def update(self, st, rows, total, group):
        st["s"] = st.get("s", torch.full_like(total, self.initial)) + total ** 2
        clr = _f(group["lr"]) / (1 + (st["k"] - 1) * group["lr_decay"])
        return -clr * rows / (st["s"].sqrt() + group["eps"])


def _moments(st, rows, total, group, second=True):
    b1, b2 = group["betas"]
    st["m"] = (1 - b1) * rows if "m" not in st else b1 * st["m"] + (1 - b1) * rows
    if second:
        st["v"] = (1 - b2) * total ** 2 if "v" not in st else b2 * st["v"] + (1 - b2) * total ** 2
    return b1, b2


class _Adamax(_Rule):
    """m as Adam's; u_k = max(β2 u_{k−1}, |g_k| + ε); update −η / (1 − β1^k) · m / u_k."""

    def update(self, st, rows, total, group):
        b1, b2 = _moments(st, rows, total, group, second=False)
        st["u"] = torch.maximum(b2 * st.get("u", torch.zeros_like(total)), total.abs() + group["eps"])
        return -_f(group["lr"]) / (1 - b1 ** st["k"]) * st["m"] / st["u"]


class _RAdam(_Rule):
    """Liu et al.'s rectified Adam as torch.optim.RAdam documents it (ρ_k > 5: rectified and adapted, else m̂ alone)."""

    def update(self, st, rows, total, group):
        b1, b2 = _moments(st, rows, total, group)
        k, lr = st["k"], _f(group["lr"])
        m_hat = st["m"] / (1 - b1 ** k)
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * k * b2 ** k / (1 - b2 ** k)
        self.branches.add(rho > 5)
        if rho <= 5:
            return -lr * m_hat
        rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        return -lr * m_hat * rect * math.sqrt(1 - b2 ** k) / (st["v"].sqrt() + group["eps"])


class _NAdam(_Rule):
    """Dozat's NAdam as torch.optim.NAdam documents it; the running product of μ_k is kept as PyTorch keeps it, a
    0-dim tensor of the default scalar dtype (float32 here) multiplied in place."""

    def update(self, st, rows, total, group):
        b1, b2 = _moments(st, rows, total, group)
        k, lr, psi = st["k"], _f(group["lr"]), group["momentum_decay"]
        mu = b1 * (1 - 0.5 * 0.96 ** (k * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((k + 1) * psi))
        st.setdefault("product", torch.tensor(1.0, dtype=torch.get_default_dtype())).mul_(mu)
        product = float(st["product"])
        denom = (st["v"] / (1 - b2 ** k)).sqrt() + group["eps"]
        return (-lr * (1 - mu) / (1 - product) * rows - lr * mu_next / (1 - product * mu_next) * st["m"]) / denom


def _groups(model, lrs):
    return [{"params": list(model[0].parameters()), "lr": lrs[0]}, {"params": list(model[2].parameters()), "lr": lrs[1]}]


def _drive(model, opt, reference, steps):
    """test_splitters_review2's real steps split by the splitter, the first group's learning rate halved
    before step 4 (after the step's backward: the gradients do not depend on it). Yields (rows, Δ,
    reference rows) per step and parameter."""
    def halve(k, _splitter):
        if k == 4:
            opt.param_groups[0]["lr"] *= 0.5

    for _, rows, delta, expected in _drive_with(model, opt, steps, reference, before_capture=halve):
        yield rows, delta, expected

def assert_rows_are_the_rule(model, opt, reference, steps):
    """Over ``steps`` real steps (:func:`_drive`): every group's and the rest's row equals ``reference``'s (≤ 1e-12
    relative) and all rows add up to the real Δθ (≤ 1e-12)."""
    worst_row = worst_sum = 0.0
    for rows, delta, ref in _drive(model, opt, reference, steps):
        worst_row = max(worst_row, max(_relative(rows[g], ref[g]) for g in range(G + 1)))
        worst_sum = max(worst_sum, _relative(rows.sum(0), delta))
    assert worst_row < 1e-12 and worst_sum < 1e-12, (worst_row, worst_sum)


def assert_ledger_is_the_rule(tracker, model, twin, contributions, rest, f_start, probes, steps):
    """The tracked run of :func:`track_against_rule` against its hand-pushed rule: ``steps`` steps, the parameters bit
    for bit the untracked twin's, contributions and rest equal to 1e-12 of their scale, the residual the midpoint
    rule's error (f_end − f_start minus those, to 1e-13), small."""
    ledger = tracker.ledger
    assert ledger.steps == steps
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    scale = float(contributions.abs().max())
    torch.testing.assert_close(ledger.contributions, contributions, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(ledger.rest, rest, rtol=0, atol=1e-12 * scale)
    residual = model(probes).detach() - f_start - contributions.sum(1) - rest
    torch.testing.assert_close(ledger.residual, residual, rtol=0, atol=1e-13)
    assert 0 < ledger.relative_residual() < 1e-3



CASES = {
    "adagrad": (torch.optim.Adagrad, dict(lr_decay=0.1, weight_decay=0.05, initial_accumulator_value=0.1)),
    "adagrad-maximize-foreach": (torch.optim.Adagrad, dict(lr_decay=0.02, weight_decay=0.05, maximize=True,
                                                           foreach=True)),
    "adagrad-fused": (torch.optim.Adagrad, dict(lr_decay=0.1, weight_decay=0.05, fused=True)),
    "adamax": (torch.optim.Adamax, dict(weight_decay=0.05)),
    "adamax-maximize-foreach": (torch.optim.Adamax, dict(weight_decay=0.05, maximize=True, foreach=True)),
    "radam": (torch.optim.RAdam, dict(weight_decay=0.05)),
    "radam-decoupled-maximize": (torch.optim.RAdam, dict(weight_decay=0.1, decoupled_weight_decay=True,
                                                         maximize=True)),
    "radam-decoupled-foreach": (torch.optim.RAdam, dict(weight_decay=0.1, decoupled_weight_decay=True, foreach=True)),
    "nadam": (torch.optim.NAdam, dict(weight_decay=0.05, momentum_decay=0.1)),
    "nadam-decoupled-maximize": (torch.optim.NAdam, dict(weight_decay=0.1, decoupled_weight_decay=True,
                                                         maximize=True)),
    "nadam-decoupled-foreach": (torch.optim.NAdam, dict(weight_decay=0.1, decoupled_weight_decay=True,
                                                        momentum_decay=0.1, foreach=True)),
}


def _rule(kind, options):
    if kind is torch.optim.Adagrad:
        return _Adagrad(G, options.get("initial_accumulator_value", 0.0))
    return {torch.optim.Adamax: _Adamax, torch.optim.RAdam: _RAdam, torch.optim.NAdam: _NAdam}[kind](G)


@pytest.mark.parametrize("case", list(CASES))
def test_the_rows_are_the_brute_force_group_updates_and_add_up_to_the_real_step(case):
    """Two parameter groups (lr 0.05 and 0.02, the first halved before step 4), 9 steps (RAdam switches from
    m̂ alone to its rectified branch at step 6): every group's and the rest's row equals the published rule
    applied to that group's gradient (≤ 1e-12 relative), and all rows add up to the real Δθ (≤ 1e-12)."""
    kind, options = CASES[case]
    model = _model()
    opt = kind(_groups(model, (0.05, 0.02)), **options)
    reference = _rule(kind, options)
    assert_rows_are_the_rule(model, opt, reference, 9)
    if kind is torch.optim.RAdam:
        assert reference.branches == {False, True}


# -- a tracked run against the same rules, pushed by hand --------------------------------------------------------
def _jacobian(model, probes, theta):
    def outputs(p):
        return functional_call(model, p, (probes,)).reshape(-1)
    jac = jacrev(outputs)(theta)
    return {n: j.reshape(j.shape[0], -1) for n, j in jac.items()}


def mlp_and_twin():
    """Two float64 3-5-2 MLPs with the same weights: one tracked, one trained without the tracker."""
    torch.manual_seed(3)
    model = mlp(3, [5], 2).double()
    twin = mlp(3, [5], 2).double()
    twin.load_state_dict(model.state_dict())
    return model, twin


def track_against_rule(model, opt, twin, twin_opt, rule, owner, probes, gen, *, steps, new_lr):
    """A PathKernelTracker (two groups, dense route, midpoint rule) over ``steps`` steps of ``model`` beside the
    same loop on ``twin`` without it, the second parameter group's lr set to ``new_lr`` before step 4 in both.
    Per step, the groups' gradients by a plain autograd loop over the examples go through ``rule`` (the
    published update per row: groups 0, 1, rest 2; ``owner[name]`` the parameter's group) and J(θ_mid) by
    jacrev. Returns ``(tracker, contributions [M, 2, d], rest [M, d], f_start [M, d])``."""
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2)
    assert tracker.group_state == "dense"
    names = [n for n, _ in model.named_parameters()]
    m, d = probes.shape[0], model(probes).shape[1]
    contributions, rest = torch.zeros(m, 2, d, dtype=F64), torch.zeros(m, d, dtype=F64)
    f_start = model(probes).detach()
    for k in range(steps):
        if k == 3:
            for o in (opt, twin_opt):
                o.param_groups[1]["lr"] = new_lr
        x, y = torch.randn(N, 3, generator=gen, dtype=F64), torch.randn(N, 2, generator=gen, dtype=F64)
        groups = torch.arange(N) % 2
        params = dict(model.named_parameters())
        rows = {n: torch.zeros(3, *p.shape, dtype=F64) for n, p in params.items()}
        for i in range(N):
            loss = ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).mean() / N
            for n, g in zip(names, torch.autograd.grad(loss, list(params.values()))):
                rows[n][int(groups[i])] += g
        before = {n: p.detach().clone() for n, p in params.items()}
        tracker.step(x, y, groups)
        twin_opt.zero_grad()
        mse_loss(twin(x), y).mean().backward()
        twin_opt.step()
        middle = {n: torch.lerp(before[n], p.detach(), 0.5) for n, p in params.items()}
        jac = _jacobian(model, probes, middle)
        for n in names:
            u = rule(n, rows[n], before[n], owner[n]).reshape(3, -1)
            pushed = (jac[n] @ u.T).reshape(m, d, 3)  # [M, d, rows]
            contributions += pushed[..., :2].permute(0, 2, 1)
            rest += pushed[..., 2]
    return tracker, contributions, rest, f_start



@pytest.mark.parametrize("kind, options", [
    (torch.optim.Adagrad, dict(lr_decay=0.05, weight_decay=0.05)),
    (torch.optim.Adamax, dict(weight_decay=0.05, maximize=True)),
    (torch.optim.RAdam, dict(weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.NAdam, dict(weight_decay=0.05, momentum_decay=0.1)),
], ids=["adagrad", "adamax", "radam", "nadam"])
def test_a_tracked_run_books_the_hand_pushed_contributions_and_trains_as_the_untracked_loop(kind, options):
    """PathKernelTracker (dense route, midpoint rule) over 8 steps with two parameter groups and a mid-run lr
    change: its contributions and rest equal J(θ_mid) u_g with u_g from the published rule (≤ 1e-12 of their
    scale), its residual is the midpoint rule's error (f_end − f_start minus those, to 1e-13), small, and the
    parameters end bit-identical to the same loop without the tracker."""
    model, twin = mlp_and_twin()
    opt, twin_opt = (kind(_groups(m, (0.03, 0.01)), **options) for m in (model, twin))
    gen = torch.Generator().manual_seed(4)
    probes = torch.randn(3, 3, generator=gen, dtype=F64)
    names = [n for n, _ in model.named_parameters()]
    owner = {n: opt.param_groups[0 if n.startswith("0.") else 1] for n in names}
    rule = _rule(kind, options)
    rule.rest = 2
    tracker, contributions, rest, f_start = track_against_rule(model, opt, twin, twin_opt, rule, owner, probes, gen,
                                                               steps=8, new_lr=0.02)
    assert_ledger_is_the_rule(tracker, model, twin, contributions, rest, f_start, probes, 8)


# -- the cost estimate and the routes ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [torch.optim.Adagrad, torch.optim.Adamax, torch.optim.RAdam, torch.optim.NAdam],
                         ids=lambda k: k.__name__)
def test_the_cost_estimate_counts_the_optimizers_state_and_only_the_dense_route_takes_it(kind):
    """The memory estimate's optimizer state equals the parameter-sized tensors the optimizer really holds after a
    step (Adagrad's sum; Adamax's exp_avg and exp_inf; RAdam's and NAdam's two moments), and it counts per-row
    state exactly where the splitter keeps one (a first moment; none for Adagrad). Before: 0 copies and no row
    state for all four. The sketched route refuses them by name and "auto" takes the dense route."""
    from genkernel.core.cost import linear_state_rows, optimizer_state_copies, sketchable
    model = _model()
    opt = kind(model.parameters())
    probes = torch.randn(2, 3, dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2)
    tracker.step(torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64), torch.arange(4) % 2)
    held = {sum(1 for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape) for p in model.parameters()}
    assert held == {optimizer_state_copies(opt)}
    keeps_rows = tracker.route.splitter.state_key is not None
    assert keeps_rows == (kind is not torch.optim.Adagrad) == linear_state_rows(opt)
    assert tracker.group_state == "dense" and (tracker.cost.memory["group_state"] > 0) == keeps_rows
    assert not sketchable(opt)
    with pytest.raises(ValueError, match=rf"group_state='sketched' supports .*; got {kind.__name__} \(use group_state='dense'\)"):
        PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, group_state="sketched")


# -- refusals --------------------------------------------------------------------------------------------------
def _splitter(opt, model):
    return make_splitter(opt, dict(model.named_parameters()), Partitions(G))


def assert_flag_refused(kind, flag, model):
    """``kind(..., flag=True)`` (differentiable, capturable) is refused when the splitter is built and again before a
    step when a loop sets it later, naming the fix."""
    with pytest.raises(ValueError, match=rf"{kind.__name__}\({flag}=True\).*Build the optimizer with {flag}=False"):
        _splitter(kind(model.parameters(), **{flag: True}), model)
    opt = kind(model.parameters())
    splitter = _splitter(opt, model)
    opt.param_groups[0][flag] = True
    with pytest.raises(ValueError, match=rf"{flag}=False"):
        splitter.capture()


@pytest.mark.parametrize("kind, flag", [
    (torch.optim.Adagrad, "differentiable"), (torch.optim.Adamax, "capturable"),
    (torch.optim.RAdam, "capturable"), (torch.optim.NAdam, "differentiable"),
])
def test_variants_the_split_cannot_follow_are_refused_with_the_fix(kind, flag):
    """differentiable=True and capturable=True are refused when the splitter is built, and again before a step
    when a loop sets them later; a float32 tensor lr (or β, or ψ) on float64 parameters is refused (PyTorch
    rounds the step size in float32 on one path and in float64 on the other)."""
    model = _model()
    assert_flag_refused(kind, flag, model)
    with pytest.raises(ValueError, match=r"lr is a torch.float32 tensor.*Pass it as a Python float"):
        _splitter(kind(model.parameters(), lr=torch.tensor(0.01)), model)
    if kind is torch.optim.NAdam:
        with pytest.raises(ValueError, match=r"momentum_decay is a torch.float32 tensor"):
            _splitter(kind(model.parameters(), momentum_decay=torch.tensor(0.004)), model)


def test_a_sparse_gradient_is_refused_before_the_step_with_the_fix():
    """Adagrad's sparse update touches only the rows a batch used, which the dense split does not follow."""
    model = _model()
    opt = torch.optim.Adagrad(model.parameters())
    splitter = _splitter(opt, model)
    model[0].weight.grad = torch.zeros_like(model[0].weight).to_sparse()
    with pytest.raises(TypeError, match=r"'0.weight' has a sparse gradient.*nn.Embedding\(\.\.\., sparse=False\)"):
        splitter.capture()
