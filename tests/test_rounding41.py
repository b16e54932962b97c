"""Structurally null parameters (helper "rounding", session 41): a float32 bias feeding a training-mode BatchNorm has
per-example gradients that are exactly zero in exact arithmetic (the normalization subtracts any per-channel shift);
float32 leaves ~1e-9 of rounding noise, which an adaptive optimizer turns into a move of order lr that the probes see
(eval mode, running statistics). No example caused it: the tracker books that parameter's whole update to the rest,
and the ledger keeps it apart (``null_moves``, ``null_parameters``, summary's ``relative_null_moves``).

Checked against a brute force written here: per-group updates from float64 per-example gradients (autograd), the
optimizer's own second moments, pushed through the probes' Jacobian at the step's midpoint (torch.func.jvp); the
null part against the bias's real move pushed the same way.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, jvp

from genkernel import PathKernelTracker

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 1e-2


def _mse(outputs, targets):
    return ((outputs - targets) ** 2).mean(dim=1)


class _Shifted(nn.Module):
    """Linear → a scalar shift of every feature → LayerNorm → tanh → Linear: LayerNorm subtracts the shift again, so
    its gradient is zero in exact arithmetic, and the examples are independent (per-example routes take it)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.shift = nn.Parameter(torch.tensor(0.3))
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inner(x) + self.shift)))


def _model(seed, dtype=torch.float32, bias=True, dropout=False, shifted=False):
    torch.manual_seed(seed)
    if shifted:
        return _Shifted().to(dtype)
    layers = [nn.Linear(3, 4, bias=bias), nn.BatchNorm1d(4), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.2))
    return nn.Sequential(*layers, nn.Linear(4, 1)).to(dtype)


def _optimizer(kind, model):
    return {"Adam": lambda p: torch.optim.Adam(p, lr=LR), "Adagrad": lambda p: torch.optim.Adagrad(p, lr=LR),
            "RMSprop": lambda p: torch.optim.RMSprop(p, lr=LR), "SGD": lambda p: torch.optim.SGD(p, lr=LR)}[kind](
        model.parameters())


def _push(model_after, probes, theta0, theta1, update):
    """J(probes; (θ0 + θ1) / 2) u, eval mode, float64."""
    model = copy.deepcopy(model_after).double().eval()
    mid = {n: (theta0[n] + theta1[n]) / 2 for n in theta0}
    _, out = jvp(lambda p: functional_call(model, p, (probes,)), (mid,), (update,))
    return out


def _group_updates(kind, before, x, y, ids, groups, state, null):
    """Each group's float64 update at the first step of ``kind`` from the optimizer's state after it; zero for the
    parameters in ``null`` (their exact gradient is zero)."""
    train = copy.deepcopy(before).double().train()
    losses = _mse(train(x.double()), y.double())
    names = [n for n, _ in train.named_parameters()]
    params = [p for _, p in train.named_parameters()]
    out = []
    for g in range(groups):
        grads = torch.autograd.grad((losses * (ids == g) / x.shape[0]).sum(), params, retain_graph=True)
        update = {}
        for i, (n, v) in enumerate(zip(names, grads)):
            if kind == "Adam":
                u = -LR * v / (state[i]["exp_avg_sq"].double().sqrt() / math.sqrt(1 - 0.999) + 1e-8)
            elif kind == "Adagrad":
                u = -LR * v / (state[i]["sum"].double().sqrt() + 1e-10)
            elif kind == "RMSprop":
                u = -LR * v / (state[i]["square_avg"].double().sqrt() + 1e-8)
            else:
                u = -LR * v
            update[n] = torch.zeros_like(u) if n in null else u
        out.append(update)
    return out


def _one_step(kind, seed, *, group_state="auto", observe=False, shifted=False):
    model = _model(seed, shifted=shifted)
    null = "shift" if shifted else "0.bias"
    optimizer = _optimizer(kind, model)
    probes = torch.randn(5, 3)
    extra = {"sketch_dim": 64} if group_state == "sketched" else {}
    tracker = PathKernelTracker(model, optimizer, _mse, probes, num_groups=2, group_state=group_state, **extra)
    x, y, ids = torch.randn(8, 3), torch.randn(8, 1), torch.arange(8) % 2
    before = copy.deepcopy(model)
    if observe:
        optimizer.zero_grad()
        losses = _mse(model(x), y)
        tracker.observe(losses, ids)
        losses.mean().backward()
        optimizer.step()
    else:
        tracker.step(x, y, ids)
    theta0 = {n: p.detach().double() for n, p in before.named_parameters()}
    theta1 = {n: p.detach().double() for n, p in model.named_parameters()}
    with torch.no_grad():
        change = model.eval()(probes).double() - before.eval()(probes).double()
    model.train()
    bias_move = {n: (theta1[n] - theta0[n]) if n == null else torch.zeros_like(theta0[n]) for n in theta0}
    null_push = _push(model, probes.double(), theta0, theta1, bias_move)
    state = optimizer.state_dict()["state"]
    references = [_push(model, probes.double(), theta0, theta1, u)
                  for u in _group_updates(kind, before, x, y, ids, 2, state, {null})]
    return tracker, change, null_push, references


@pytest.mark.parametrize("kind, observe", [("Adam", False), ("Adagrad", False), ("RMSprop", False), ("Adam", True)])
def test_null_bias_booked_apart_dense(kind, observe):
    """A float32 Linear → BatchNorm1d (training mode) → tanh → Linear, two groups, one step (owned or observed): every
    group's contribution equals the float64 brute force with the bias's exact (zero) gradient, to 1e-4 of the change;
    the ledger's ``null_moves`` equals the bias's real move pushed through the probes (to 1e-4 of the change) and is
    part of the rest; the summary names the bias and its share; the identity holds (relative residual <= 1e-2).

    Fails on the old code: a group's contribution is 0.95 (Adam, owned or observed), 94 (Adagrad), 0.05 (RMSprop)
    times the change off the brute force (each group's row of the bias is its own float32 rounding noise times the preconditioner), and the ledger
    has no ``null_moves``."""
    tracker, change, null_push, references = _one_step(kind, 1, observe=observe)
    ledger = tracker.ledger
    scale = float(change.norm())
    for g, reference in enumerate(references):
        assert float((ledger.contributions[:, g] - reference).norm()) <= 1e-4 * scale
    assert float((ledger.null_moves - null_push).norm()) <= 1e-4 * scale
    # no weight decay, no old state: the rest is the bias's move and the running statistics' drift
    assert float((ledger.rest - ledger.null_moves - ledger.buffer_drift).norm()) <= 1e-4 * scale
    summary = ledger.summary()
    assert summary["null_parameters"] == "0.bias"
    assert summary["relative_null_moves"] == pytest.approx(float(ledger.null_moves.norm()) / scale)
    assert ledger.relative_residual() <= 1e-2  # (quadrature: RMSprop's first step is 10 lr)
    total = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual + ledger.sketch_error
    assert torch.allclose(total, ledger.delta, rtol=0, atol=1e-12 * scale)


def test_null_bias_sketched_total():
    """Coverage: the sketched route under Adam on a model whose scalar shift before a LayerNorm is null (per-example
    routes refuse a training-mode BatchNorm; here the move is invisible to the probes, as LayerNorm removes it in
    eval mode too): the examples' exact total (Σ sketched estimates + sketch error) equals the float64 brute force of
    the groups' total without the shift (1e-4 of the change), the shift's move is the ledger's ``null_moves``."""
    tracker, change, null_push, references = _one_step("Adam", 1, group_state="sketched", shifted=True)
    ledger = tracker.ledger
    scale = float(change.norm())
    total = ledger.contributions.sum(dim=1) + ledger.sketch_error
    assert float((total - sum(references)).norm()) <= 1e-4 * scale
    assert float((ledger.null_moves - null_push).norm()) <= 1e-4 * scale
    assert ledger.summary()["null_parameters"] == "shift"


def test_null_bias_factored_sgd():
    """Coverage: plain SGD (factored route) on the LayerNorm-shift model: the shift's move is lr times its rounding
    noise, booked the same way: groups equal the brute force (1e-6 of the change), ``null_moves`` the shift's real
    move pushed (1e-9 of the change)."""
    tracker, change, null_push, references = _one_step("SGD", 2, shifted=True)
    assert tracker.group_state == "factored"
    ledger = tracker.ledger
    scale = float(change.norm())
    for g, reference in enumerate(references):
        assert float((ledger.contributions[:, g] - reference).norm()) <= 1e-6 * scale
    assert float((ledger.null_moves - null_push).norm()) <= 1e-9 * scale
    assert ledger.null_parameters == ("shift",)


def test_mode_change_finds_null_parameters_again():
    """A tracker built on the model in eval mode (the bias is not null there: BatchNorm uses running statistics),
    then trained in training mode under Adam: the bias is found null at the step and booked apart; the groups equal
    the brute force (1e-4 of the change).

    Fails on the old code: the groups carry the bias's rounding-driven move (0.95 of the change off)."""
    model = _model(1)
    model.eval()
    optimizer = _optimizer("Adam", model)
    probes = torch.randn(5, 3)
    tracker = PathKernelTracker(model, optimizer, _mse, probes, num_groups=2)
    assert getattr(tracker.route.splitter, "null", frozenset()) == frozenset()
    model.train()
    x, y, ids = torch.randn(8, 3), torch.randn(8, 1), torch.arange(8) % 2
    before = copy.deepcopy(model)
    tracker.step(x, y, ids)
    theta0 = {n: p.detach().double() for n, p in before.named_parameters()}
    theta1 = {n: p.detach().double() for n, p in model.named_parameters()}
    with torch.no_grad():
        change = copy.deepcopy(model).eval()(probes).double() - copy.deepcopy(before).eval()(probes).double()
    state = optimizer.state_dict()["state"]
    for g, u in enumerate(_group_updates("Adam", before, x, y, ids, 2, state, {"0.bias"})):
        reference = _push(model, probes.double(), theta0, theta1, u)
        assert float((tracker.ledger.contributions[:, g] - reference).norm()) <= 1e-4 * float(change.norm())
    assert tracker.ledger.null_parameters == ("0.bias",)


def test_detection():
    """Coverage: the detection finds a Linear's and a Conv2d's bias before a training-mode BatchNorm and nothing
    else; nothing in eval mode, in float64, or without the bias; it leaves the module's running statistics, its
    parameters and the global random generator as they were."""
    from genkernel.core.tracking.null_params import structurally_null

    model = _model(0, dropout=True)
    params = dict(model.named_parameters())
    probes = (torch.randn(6, 3),)
    rng, stats = torch.get_rng_state(), [b.clone() for b in model.buffers()]
    values = [p.detach().clone() for p in model.parameters()]
    assert structurally_null(model, params, probes) == ("0.bias",)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(values, model.parameters()))
    assert structurally_null(model.eval(), params, probes) == ()
    model64 = _model(0, dtype=torch.float64)
    assert structurally_null(model64, dict(model64.named_parameters()), (probes[0].double(),)) == ()
    plain = _model(0, bias=False)
    assert structurally_null(plain, dict(plain.named_parameters()), probes) == ()
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    assert structurally_null(conv, dict(conv.named_parameters()), (torch.randn(4, 2, 4, 4),)) == ("0.bias",)


def test_training_untouched_and_float64_unchanged():
    """Coverage: training with the tracker (dropout drawing from the global generator, Adam, three steps) is bit for
    bit that of an untracked twin; a float64 model books nothing apart (``null_moves`` exactly zero, no names)."""
    runs = []
    for tracked in (False, True):
        model = _model(3, dropout=True)
        optimizer = _optimizer("Adam", model)
        torch.manual_seed(5)
        data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)]
        tracker = PathKernelTracker(model, optimizer, _mse, torch.randn(5, 3), num_groups=2) if tracked else None
        torch.manual_seed(7)
        for x, y in data:
            if tracker is None:
                optimizer.zero_grad()
                _mse(model(x), y).mean().backward()
                optimizer.step()
            else:
                tracker.step(x, y, torch.arange(8) % 2)
        runs.append([p.detach().clone() for p in model.parameters()] + [torch.get_rng_state()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    model = _model(3, dtype=torch.float64)
    tracker = PathKernelTracker(model, _optimizer("Adam", model), _mse, torch.randn(5, 3, dtype=torch.float64),
                                num_groups=2)
    tracker.step(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64), torch.arange(8) % 2)
    assert not bool(tracker.ledger.null_moves.any()) and tracker.ledger.null_parameters == ()
    assert tracker.ledger.summary()["relative_null_moves"] == 0.0


def test_ledger_keeps_null_moves():
    """Coverage: ``null_moves`` and ``null_parameters`` survive state_dict / from_state_dict, copy, since and a
    restore of a marked step; a state saved before they existed loads with zeros."""
    tracker, change, _, _ = _one_step("Adam", 1)
    ledger = tracker.ledger
    again = type(ledger).from_state_dict(ledger.state_dict())
    assert torch.equal(again.null_moves, ledger.null_moves) and again.null_parameters == ("0.bias",)
    assert torch.equal(ledger.copy().null_moves, ledger.null_moves)
    start = type(ledger).empty(ledger.f_start, ledger.num_groups)
    assert torch.equal(ledger.since(start).null_moves, ledger.null_moves)
    mark = ledger.mark()
    ledger.record(torch.zeros_like(ledger.contributions), torch.ones_like(ledger.rest), ledger.f_end,
                  step_null=torch.ones_like(ledger.rest), null_parameters=("other",))
    assert ledger.null_parameters == ("0.bias", "other")
    ledger.restore(mark)
    assert torch.equal(ledger.null_moves, again.null_moves) and ledger.null_parameters == ("0.bias",)
    old = {k: v for k, v in ledger.state_dict().items() if k not in ("null_moves", "null_parameters")}
    loaded = type(ledger).from_state_dict(old)
    assert not bool(loaded.null_moves.any()) and loaded.null_parameters == ()


def test_multi_step_residual_and_ema():
    """Adam on the float32 BatchNorm model, five owned steps with an EMA (AveragedModel, decay 0.9) tracked: the
    ledger's and the EMA ledger's relative residuals stay at quadrature size (<= 1e-3; measured 3.7e-5 and 2.3e-5),
    the bias's move is booked apart (named, a nonzero share).

    Fails on the old code: relative residual 0.11 (model) and 0.40 (EMA): the bias's rounding gap (the batched
    gradient minus Σ_g ĝ_g, of the size of the groups' own noise) went through Adam's state as its own row, whose
    lr-sized move the probes saw and the ledger left in the residual."""
    torch.manual_seed(1)
    model = _model(1)
    optimizer = _optimizer("Adam", model)
    tracker = PathKernelTracker(model, optimizer, _mse, torch.randn(5, 3), num_groups=2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema_ledgers = tracker.track_ema(ema)
    for _ in range(4):
        tracker.step(torch.randn(8, 3), torch.randn(8, 1), torch.arange(8) % 2)
        ema.update_parameters(model)
    tracker.step(torch.randn(8, 3), torch.randn(8, 1), torch.arange(8) % 2)
    assert tracker.ledger.relative_residual() <= 1e-3
    assert getattr(tracker.ledger, "null_parameters", ()) == ("0.bias",)
    assert tracker.ledger.summary()["relative_null_moves"] > 0
    for ledger in ema_ledgers.ledgers.values():
        assert ledger.steps == 4 and ledger.relative_residual() <= 1e-3
