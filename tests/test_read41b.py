"""Second read of the structurally null parameters (commit 31c9ef6, tracking.null_params; helper "read2", session 41).

The float64 passes that find a parameter null see the first 8 probes and the parameters of the time they run; the
classification was kept for every later step of the same modes. Two real parameters look null there and are not:
a class embedding added before a training-mode BatchNorm when the first probes share one class (the shift is uniform
over the probes, the BatchNorm cancels it; on a mixed training batch its gradient is a third of the largest), and a
layer after a zero-initialised one before a BatchNorm (its input is rounding noise at first, real once that layer
moved). Their whole update was booked to the rest. The fix (routes.GroupStateRoute._refresh_null) also asks the
step's own gradient to be at rounding level, and runs the float64 passes only where some gradient is.

Checked against a float64 brute force written here: per-group Adam updates from float64 gradients and the
optimizer's own second moments, pushed through the probes' Jacobian at the step's midpoint (torch.func.jvp, eval mode).
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


class _Conditional(nn.Module):
    """x → Linear (no bias) + a class embedding → BatchNorm1d → tanh → Linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4, bias=False)
        self.emb = nn.Embedding(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x, c):
        return self.out(torch.tanh(self.bn(self.lin(x) + self.emb(c))))


class _AfterZero(nn.Module):
    """A Linear with zero-initialised weight (its bias as usual) → BatchNorm1d → Linear → tanh → Linear: at first
    the BatchNorm's input is constant over the batch, so ``out.weight`` sees rounding noise only."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        nn.init.zeros_(self.first.weight)
        self.bn = nn.BatchNorm1d(4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.bn(self.first(x)))))


def _push(model_after, probes, theta0, theta1, update):
    """J(probes; (θ0 + θ1) / 2) u, eval mode, float64."""
    model = copy.deepcopy(model_after).double().eval()
    mid = {n: (theta0[n] + theta1[n]) / 2 for n in theta0}
    _, out = jvp(lambda p: functional_call(model, p, probes), (mid,), (update,))
    return out


def _first_adam_group_updates(before, inputs, y, ids, groups, state):
    """Each group's float64 update at Adam's first step, from the optimizer's second moments after it."""
    train = copy.deepcopy(before).double().train()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    losses = _mse(train(*inputs), y.double())
    names = [n for n, _ in train.named_parameters()]
    params = [p for _, p in train.named_parameters()]
    out = []
    for g in range(groups):
        grads = torch.autograd.grad((losses * (ids == g) / y.shape[0]).sum(), params, retain_graph=True)
        out.append({n: -LR * v / (state[i]["exp_avg_sq"].double().sqrt() / math.sqrt(1 - 0.999) + 1e-8)
                    for i, (n, v) in enumerate(zip(names, grads))})
    return out


def test_class_embedding_with_probes_of_one_class_stays_the_groups():
    """A class embedding before a training-mode BatchNorm, probes sorted by class (their first 8 all of class 0), one
    Adam step on a mixed batch (its embedding gradient 0.4 of the largest): every group's contribution equals the
    float64 brute force with the embedding's real gradient (1e-4 of the change); nothing is booked as null moves.

    Fails on 31c9ef6 (passes on 31c9ef6^): the float64 passes on the first 8 probes find ``emb.weight`` null (a
    uniform shift there), its whole move goes to ``null_moves`` (0.13 of the change over three steps) and group 0 is off the brute force by
    1.5x the change."""
    torch.manual_seed(0)
    model = _Conditional()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    probes = (torch.randn(30, 3), torch.arange(3).repeat_interleave(10))
    tracker = PathKernelTracker(model, optimizer, _mse, probes, num_groups=2)
    x, c, y, ids = torch.randn(16, 3), torch.arange(16) % 3, torch.randn(16, 1), torch.arange(16) % 2
    before = copy.deepcopy(model)
    tracker.step((x, c), y, ids)
    theta0 = {n: p.detach().double() for n, p in before.named_parameters()}
    theta1 = {n: p.detach().double() for n, p in model.named_parameters()}
    pushed = (probes[0].double(), probes[1])
    with torch.no_grad():
        change = copy.deepcopy(model).eval()(*probes).double() - copy.deepcopy(before).eval()(*probes).double()
    scale = float(change.norm())
    ledger = tracker.ledger
    state = optimizer.state_dict()["state"]
    for g, u in enumerate(_first_adam_group_updates(before, (x, c), y, ids, 2, state)):
        reference = _push(model, pushed, theta0, theta1, u)
        assert float((ledger.contributions[:, g] - reference).norm()) <= 1e-4 * scale
    null_moves = getattr(ledger, "null_moves", None)
    assert null_moves is None or not bool(null_moves.any())
    assert getattr(ledger, "null_parameters", ()) == ()


def test_layer_after_zero_initialised_one_is_not_null_once_it_moved():
    """``out.weight`` behind a zero-initialised Linear and a training-mode BatchNorm: its gradient is rounding noise
    at the first Adam step only. At the third step the ledger's step window books as null moves exactly the real
    move of ``first.bias`` (the one structural null: a bias before the BatchNorm) pushed through the probes (1e-4 of
    the step's change).

    Fails on 31c9ef6: the classification of the first step is kept, ``out.weight``'s real move is in ``null_moves``
    (off by 0.05 of the step's change). (31c9ef6^ had no ``null_moves``: it fails there on the attribute.)"""
    torch.manual_seed(3)
    model = _AfterZero()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    probes = torch.randn(10, 3)
    tracker = PathKernelTracker(model, optimizer, _mse, probes, num_groups=2)
    x, y, ids = torch.randn(16, 3), torch.randn(16, 1), torch.arange(16) % 2
    for _ in range(2):
        tracker.step(x, y, ids)
    earlier = tracker.ledger.copy()
    before = copy.deepcopy(model)
    tracker.step(x, y, ids)
    window = tracker.ledger.since(earlier)
    theta0 = {n: p.detach().double() for n, p in before.named_parameters()}
    theta1 = {n: p.detach().double() for n, p in model.named_parameters()}
    move = {n: (theta1[n] - theta0[n]) if n == "first.bias" else torch.zeros_like(theta0[n]) for n in theta0}
    reference = _push(model, (probes.double(),), theta0, theta1, move)
    scale = float(window.delta.norm())
    assert float((window.null_moves - reference).norm()) <= 1e-4 * scale
    assert float(reference.norm()) > 1e-3 * scale  # (the bias's own move is seen by the probes)


def test_no_float64_passes_without_a_rounding_level_gradient(monkeypatch):
    """A float32 MLP without normalization under Adam (no gradient at rounding level): the float64 copy and passes of
    tracking.null_params never run (at construction or at the steps), and a BatchNorm model's run them once.

    Fails on 31c9ef6: they run at construction for every float32 model, whatever its gradients (a 35.7M-parameter
    CIFAR-10 UNet: 57 s and 2.3 GB on one CPU thread, 8x a float32 training pass of its 8 probes; there they still
    run once, at the first step: 110 of its 322 gradients are below the tolerance). (31c9ef6^ has no such passes:
    fails on the attribute.)"""
    from genkernel.core.tracking import routes

    calls = []
    real = routes.structurally_null
    monkeypatch.setattr(routes, "structurally_null", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    tracker = PathKernelTracker(plain, torch.optim.Adam(plain.parameters(), lr=LR), _mse, torch.randn(10, 3),
                                num_groups=2)
    x, y, ids = torch.randn(16, 3), torch.randn(16, 1), torch.arange(16) % 2
    for _ in range(2):
        tracker.step(x, y, ids)
    assert calls == []
    normed = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    tracker = PathKernelTracker(normed, torch.optim.Adam(normed.parameters(), lr=LR), _mse, torch.randn(10, 3),
                                num_groups=2)
    for _ in range(2):
        tracker.step(x, y, ids)
    assert calls == [1]
    assert tracker.ledger.null_parameters == ("0.bias",)


class _Logger:
    """A forward hook's object that cannot be deep-copied (it holds a lock, as loggers and trainers do)."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.calls = 0

    def hook(self, module, inputs, output):
        self.calls += 1


def test_module_with_a_bound_method_hook_still_searched():
    """A Linear → BatchNorm1d (training mode) → tanh → Linear with a forward hook bound to an object that holds a
    lock: the float64 copy is made without the hooks, the bias is found null and booked apart after an Adam step,
    and the hook saw only the real module's passes (the step's forward and the tracker's own, none of the copy's).

    Fails on 31c9ef6: ``copy.deepcopy`` of the module deep-copies the hook's object first (the lock refuses), the
    search returns nothing and the bias's rounding-driven move is split to the groups (``null_parameters == ()``).
    (31c9ef6^ has no ``null_parameters``.)"""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    logger = _Logger()
    model[0].register_forward_hook(logger.hook)
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=LR), _mse, torch.randn(10, 3),
                                num_groups=2)
    x, y, ids = torch.randn(16, 3), torch.randn(16, 1), torch.arange(16) % 2
    from genkernel.core.tracking import null_params

    calls = logger.calls
    null_params.structurally_null(model, dict(model.named_parameters()), (torch.randn(10, 3),))
    assert logger.calls == calls  # (the copy's passes do not reach the real module's hook)
    tracker.step(x, y, ids)
    assert tracker.ledger.null_parameters == ("0.bias",)
    assert bool(tracker.ledger.null_moves.any())
