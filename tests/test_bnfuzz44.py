"""Fuzz findings (bnfuzz44): PathKernelTracker on training passes that couple examples or keep state (BatchNorm in
training mode, dropout, a running buffer, tied weights), against a brute force written here, apart from genkernel:
the group gradients are autograd.grad of each group's share of the losses through the step's own (coupled)
forward, the optimizer's split is followed per group by hand (SGD momentum/Nesterov buffers, Adam's first moments
over the optimizer's own second moment) and J̄ is torch.func.jvp at the rule's nodes on a float64 copy.

A fuzz of about 1 050 random configurations (BatchNorm1d/2d with momentum None/0.1, affine on/off, running statistics
on/off, eval-mode BatchNorm, GroupNorm, LayerNorm, dropout, a running buffer, tied and frozen layers, SGD, momentum,
Nesterov, Adam, AdamW with amsgrad, maximize and weight decay, per-group hyperparameters, clipping by norm and by
value, micro-batches, StepLR, float32 and float64, owned and observed steps, every group state and gradient route)
and a model coupling its examples in plain operations: found every exact split within rounding, every refusal clear
and leaving the parameters and optimizer as they were, and training bit for bit unchanged, except the probes' pushes
of a model whose coupling persists in eval mode (a centering layer, below: routes.probes_coupled). The other tests
pin the hardest of the cases that held; they are coverage, labelled as such."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

from genkernel.core.tracking.step import OptimizerStep
from genkernel.core.tracking.tracker import PathKernelTracker


def _losses(outputs, targets):
    return ((outputs - targets) ** 2).mean(dim=1)


class _RunningMean(nn.Module):
    """Subtracts a running mean of its inputs, updated with the batch's mean before use in training mode: an
    example's output depends on the other examples of its batch (a coupling in plain operations)."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.mean


class _Centering(nn.Module):
    """h − h.mean(0) / 2: couples the examples in training and in eval mode alike (a hand-written batch statistic
    that keeps no running statistics)."""

    def forward(self, x):
        return x - 0.5 * x.mean(0, keepdim=True)


class _Tied(nn.Module):
    """One Linear applied twice (tied weights)."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def _data(step, batch=7, groups=3):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(batch, 3, generator=g, dtype=torch.float64), torch.randn(batch, 2, generator=g,
            dtype=torch.float64), torch.randint(0, groups, (batch,), generator=g))


def _state(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(optimizer.state_dict()))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _eval_outputs(model, probes):
    modes = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(probes).double()
    for m, mode in zip(model.modules(), modes):
        m.training = mode
    return out


def _pushed(model, probes, theta0, theta1, updates, nodes):
    """[M, G, d] Σ_q w_q J(probes; θ0 + s_q (θ1 − θ0)) u_g in eval mode with the model's buffers now, float64."""
    copy64 = copy.deepcopy(model).double().eval()
    fixed = {n: t.detach() for n, t in list(copy64.named_parameters()) + list(copy64.named_buffers())}
    names = list(theta0)
    rows = []
    for u in updates:
        total = 0
        for s, weight in nodes:
            def f(*values):
                return functional_call(copy64, {**fixed, **dict(zip(names, values))}, (probes.double(),))
            point = tuple(theta0[n].double() + s * (theta1[n].double() - theta0[n].double()) for n in names)
            total = total + weight * jvp(f, point, tuple(u[n] for n in names))[1]
        rows.append(total)
    return torch.stack(rows, dim=1)


def _group_gradients(model, x, y, groups, num_groups, micro_batches):
    """Σ_{n ∈ g} c_n ∇ℓ_n (c_n = 1/B) through each micro-batch's own training forward, then the loop's backward of
    Σ_n ℓ_n / B per micro-batch (the gradient the optimizer steps on): a plain accumulation loop."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in range(num_groups)]
    batch = x.shape[0]
    for part in torch.arange(batch).tensor_split(micro_batches):
        losses = _losses(model(x[part]), y[part])
        for g in range(num_groups):
            share = (losses * (groups[part] == g).double()).sum() / batch
            for n, grad in zip(params, torch.autograd.grad(share, list(params.values()), retain_graph=True,
                                                           allow_unused=True)):
                if grad is not None:
                    rows[g][n] += grad
        (losses.sum() / batch).backward()
    return params, rows


def test_batchnorm_training_mode_with_dropout_and_a_running_buffer_split_exactly_by_nesterov_momentum_over_micro_batches():
    """Coverage (the old code passes): BatchNorm1d in training mode (cumulative-average statistics, momentum None),
    dropout and a running buffer that couples the batch, SGD with Nesterov momentum, global-norm clipping and a
    StepLR, steps of 7 examples in micro-batches of 4 and 3 (each its own batch statistics). The tracker resolves to
    the dense graph route; its group contributions equal the brute force's (autograd.grad of each group's share
    through the coupled forward, per-group momentum buffers, J̄ at the midpoint) to float64 rounding, each step's
    residual is |real change − Σ contributions − rest| as measured here, and the parameters, buffers and optimizer
    state are bit for bit those of the same loop without the tracker."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, momentum=None), nn.Tanh(), nn.Dropout(0.3),
                          _RunningMean(6), nn.Linear(6, 2)).double()
    plain = copy.deepcopy(model)
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
    optimizer, plain_optimizer = make(model), make(plain)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (optimizer, plain_optimizer)]
    probes = torch.randn(4, 3, dtype=torch.float64)
    tracker = PathKernelTracker(model, optimizer, _losses, probes, num_groups=3, max_grad_norm=0.5)
    assert tracker.group_state == "dense"
    buffers = None
    for step in range(3):
        x, y, groups = _data(step)
        torch.manual_seed(50 + step)
        result = tracker.track(OptimizerStep(model, optimizer, _losses, x, y, max_grad_norm=0.5, micro_batches=2),
                               groups)
        schedulers[0].step()

        torch.manual_seed(50 + step)
        before = _eval_outputs(plain, probes)
        lr = plain_optimizer.param_groups[0]["lr"]
        plain_optimizer.zero_grad()
        params, rows = _group_gradients(plain, x, y, groups, 3, 2)
        total = torch.nn.utils.clip_grad_norm_(list(params.values()), 0.5)
        clip = float(torch.clamp(0.5 / (total + 1e-6), max=1.0))
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        plain_optimizer.step()
        schedulers[1].step()
        assert _same(_state(model, optimizer), _state(plain, plain_optimizer)), f"step {step}: training disturbed"

        rows = [{n: clip * r for n, r in row.items()} for row in rows]
        buffers = rows if buffers is None else [{n: 0.9 * b[n] + r[n] for n in r} for b, r in zip(buffers, rows)]
        updates = [{n: -lr * (r[n] + 0.9 * b[n]) for n in r} for r, b in zip(rows, buffers)]
        theta1 = {n: p.detach().clone() for n, p in params.items()}
        expected = _pushed(plain, probes, theta0, theta1, updates, [(0.5, 1.0)])
        scale = float(expected.abs().max())
        assert float((result.contributions - expected).abs().max()) <= 1e-9 * scale, f"step {step}"
        change = _eval_outputs(plain, probes) - before
        mine = change - result.contributions.sum(dim=1) - result.rest
        assert float((mine - result.residual).abs().max()) <= 1e-12 * float(change.abs().max()), f"step {step}"


def test_adamw_with_per_group_betas_decay_and_amsgrad_splits_a_tied_layer_norm_model_exactly_under_simpson():
    """Coverage (the old code passes): LayerNorm and a Linear used twice (tied weights), a frozen first layer,
    AdamW with amsgrad, two parameter groups of different learning rates, betas and weight decays, Simpson's rule.
    Each group's contribution is −η (m_g / (1 − β1^k)) ⊘ (sqrt(v̂_k / (1 − β2^k)) + ε) pushed through Simpson's
    J̄ (m_g the group's own first moment, v̂_k the optimizer's max second moment after its step), as measured here."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), _Tied(6), nn.Linear(6, 2)).double()
    for p in model[0].parameters():
        p.requires_grad_(False)
    plain = copy.deepcopy(model)

    def make(m):
        trained = [p for p in m.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": trained[:2], "lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.1},
                                  {"params": trained[2:]}], lr=0.01, weight_decay=0.01, amsgrad=True)

    optimizer, plain_optimizer = make(model), make(plain)
    probes = torch.randn(5, 3, dtype=torch.float64)
    tracker = PathKernelTracker(model, optimizer, _losses, probes, num_groups=3, quadrature="simpson")
    moments = None
    for step in range(3):
        x, y, groups = _data(step, batch=6)
        result = tracker.step(x, y, groups)
        plain_optimizer.zero_grad()
        params, rows = _group_gradients(plain, x, y, groups, 3, 1)
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        plain_optimizer.step()
        assert _same(_state(model, optimizer), _state(plain, plain_optimizer)), f"step {step}: training disturbed"
        group_of = {n: g for n, p in params.items() for g in plain_optimizer.param_groups
                    if any(p is q for q in g["params"])}
        beta1 = {n: group_of[n]["betas"][0] for n in params}
        moments = [{n: (1 - beta1[n]) * r[n] + (0 if moments is None else beta1[n] * m[n]) for n in r}
                   for r, m in zip(rows, moments or rows)]
        updates = []
        for m in moments:
            u = {}
            for n, p in params.items():
                b1, b2 = group_of[n]["betas"]
                state = plain_optimizer.state[p]
                k = float(state["step"])
                u[n] = -group_of[n]["lr"] * (m[n] / (1 - b1 ** k)) / (
                    (state["max_exp_avg_sq"] / (1 - b2 ** k)).sqrt() + group_of[n]["eps"])
            updates.append(u)
        theta1 = {n: p.detach().clone() for n, p in params.items()}
        expected = _pushed(plain, probes, theta0, theta1, updates, [(0.0, 1 / 6), (0.5, 2 / 3), (1.0, 1 / 6)])
        assert float((result.contributions - expected).abs().max()) <= 1e-9 * float(expected.abs().max())


@pytest.mark.parametrize("group_state, gradient_route", [("factored", "auto"), ("dense", "example"),
                                                          ("sketched", "auto")])
def test_a_batchnorm_model_built_in_eval_mode_then_trained_is_refused_by_per_example_routes_leaving_it_untouched(
        group_state, gradient_route):
    """Coverage (the old code passes): a tracker built while the model is in eval mode (its BatchNorm reads running
    statistics then: nothing couples the probes) and stepped after ``model.train()`` (batch statistics: every
    example's gradient carries the others') on a per-example route must not split silently: the step is refused,
    naming the coupling and the graph route, with the parameters, buffers and optimizer state as they were."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05) if group_state != "sketched"
                 else torch.optim.Adam(model.parameters(), lr=0.01))
    model.eval()
    tracker = PathKernelTracker(model, optimizer, _losses, torch.randn(4, 3, dtype=torch.float64), num_groups=2,
                                group_state=group_state, gradient_route=gradient_route)
    model.train()
    x, y, _ = _data(0, batch=8)
    before = _state(model, optimizer)
    with pytest.raises(ValueError, match=r"BatchNorm1d.*gradient_route='graph'"):
        tracker.step(x, y[:, :1], torch.arange(8) % 2)
    assert _same(_state(model, optimizer), before)
    assert tracker.ledger.steps == 0


def test_an_observed_loop_clipping_by_value_is_refused_before_its_parameters_move():
    """Coverage (the old code passes): an observed loop over a training-mode BatchNorm model that clips its
    gradients elementwise (``clip_grad_value_``: no scalar times the observed groups' sum) is refused at
    ``optimizer.step()``, naming clip_grad_value_ and clip_grad_norm_ as the fix, before the parameters or the
    optimizer's state move."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = PathKernelTracker(model, optimizer, _losses, torch.randn(4, 3, dtype=torch.float64), num_groups=3,
                                group_state="dense")
    x, y, groups = _data(0, batch=8)
    optimizer.zero_grad()
    losses = _losses(model(x), y)
    tracker.observe(losses, groups)
    losses.mean().backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.02)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(Exception, match=r"clip_grad_value_.*clip_grad_norm_"):
        optimizer.step()
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert optimizer.state_dict()["state"] == {}
    assert tracker.ledger.steps == 0


def test_a_coupling_that_persists_in_eval_mode_is_pushed_through_all_the_probes_together_on_the_jacobian_route():
    """A centering layer in plain operations couples the probes in the analysis passes' eval mode too: f(probes) is
    one forward of them all, and so is J̄. The Jacobian route took each probe's Jacobian alone (probes_coupled read
    only the modules known by type), so each group's contribution was 17-25 % off the brute force (J̄ of the whole
    probe batch at the midpoint, group gradients through the step's own graph), the difference left silently in a
    residual of 16-49 % of the change. Fixed: the groups within float64 rounding, the residual quadrature-sized."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), _Centering(), nn.Tanh(), nn.Linear(6, 2)).double()
    plain = copy.deepcopy(model)
    optimizer, plain_optimizer = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, plain))
    probes = torch.randn(5, 3, dtype=torch.float64)
    tracker = PathKernelTracker(model, optimizer, _losses, probes, num_groups=3, contribution_route="jacobian")
    buffers = None
    for step in range(2):
        x, y, groups = _data(step)
        before = _eval_outputs(plain, probes)
        result = tracker.step(x, y, groups)
        plain_optimizer.zero_grad()
        params, rows = _group_gradients(plain, x, y, groups, 3, 1)
        theta0 = {n: p.detach().clone() for n, p in params.items()}
        plain_optimizer.step()
        buffers = rows if buffers is None else [{n: 0.9 * b[n] + r[n] for n in r} for b, r in zip(buffers, rows)]
        updates = [{n: -0.1 * b[n] for n in b} for b in buffers]
        theta1 = {n: p.detach().clone() for n, p in params.items()}
        expected = _pushed(plain, probes, theta0, theta1, updates, [(0.5, 1.0)])
        assert float((result.contributions - expected).abs().max()) <= 1e-9 * float(expected.abs().max()), step
        change = _eval_outputs(plain, probes) - before
        assert float(result.residual.abs().max()) <= 1e-2 * float(change.abs().max()), step


def _proposed_losses(outputs, targets):
    return ((outputs - targets) ** 2).mean(dim=1)


def test_group_state_auto_with_a_dense_only_gradient_route_resolves_to_dense_instead_of_refusing_factored():
    """group_state='auto' (the default) with gradient_route='example' or 'graph' asked for by name, plain SGD and
    d <= G + 1: "auto" resolved to "factored" and the tracker refused the user's gradient_route, naming
    group_state='factored', which the user never asked for. The dense route that gradient_route belongs to runs."""
    torch.manual_seed(0)
    for route in ("example", "graph"):
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), _proposed_losses,
                                    torch.randn(4, 3, dtype=torch.float64), num_groups=2, gradient_route=route)
        assert tracker.group_state == "dense"
        tracker.step(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64),
                     torch.arange(6) % 2)
        assert tracker.ledger.summary()["relative_residual"] < 1e-3


def test_a_batchnorm1d_without_running_statistics_is_refused_naming_track_running_stats():
    """BatchNorm1d(track_running_stats=False) normalizes with batch statistics in eval mode too, and refuses the
    tracker's single-example analysis passes: the refusal named a ProGAN minibatch-std fix that does not apply;
    it names the layer and track_running_stats=True (or GroupNorm/LayerNorm)."""
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Tanh(),
                          nn.Linear(6, 1)).double()
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*track_running_stats=True"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), _proposed_losses,
                          torch.randn(4, 3, dtype=torch.float64), num_groups=2)
