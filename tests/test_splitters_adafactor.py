"""Exact split of torch.optim.Adafactor (splitters.AdafactorSplitter), checked against a brute force of Adafactor's
published rule (Shazeer & Stern, as torch.optim.Adafactor documents it: lr caps the relative step size and scales
the decoupled decay) computed here from per-example gradients by a plain autograd loop (no genkernel code in the
reference): the rows equal the brute-force per-group updates, the rows add up to the real step, and a tracked run's
ledger equals the contributions pushed by hand and trains to the same parameters, bit for bit, as the untracked
loop. Before, Adafactor was refused (TypeError naming the supported optimizers), so every test here but one fails on
that code (the refusals too: a TypeError at construction, not the variant's error); the exception, labelled coverage,
pins the property of torch's foreach path the split relies on."""

import math

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.core.grouping import Partitions
from genkernel.core.tracking.splitters import make_splitter
from genkernel.supervised import mse_loss

from test_splitters_review2 import G, N, _f  # the same group count, batch and helpers
from test_splitters_review2 import _drive as _drive_with
from test_splitters_more_optimizers import assert_ledger_is_the_rule, assert_rows_are_the_rule, track_against_rule

F64 = torch.float64


class _Net(nn.Module):
    """[B, 3] -> [B, 2] through every shape Adafactor treats differently: a 4-D (conv-like) weight factored over its
    last two dims, a matrix, a vector and a 0-dim scale (full second moments)."""

    def __init__(self, seed=0, dtype=F64, output_scale=1.0):
        super().__init__()
        self.output_scale = output_scale
        gen = torch.Generator().manual_seed(seed)
        self.kernel = nn.Parameter(0.5 * torch.randn(2, 2, 4, 3, generator=gen, dtype=dtype))
        self.bias = nn.Parameter(0.5 * torch.randn(4, generator=gen, dtype=dtype))
        self.head = nn.Parameter(0.5 * torch.randn(2, 4, generator=gen, dtype=dtype))
        self.scale = nn.Parameter(torch.tensor(1.2, dtype=dtype))

    def forward(self, x):
        hidden = torch.tanh(torch.einsum("bj,pqkj->bk", x, self.kernel) / 2 + self.bias)
        return hidden @ self.head.T * self.scale * self.output_scale


def _groups(model, lrs):
    return [{"params": [model.kernel, model.bias], "lr": lrs[0]}, {"params": [model.head, model.scale], "lr": lrs[1]}]


class _Adafactor:
    """Adafactor's published rule per row (groups, a zero rest row at ``rest``, rounding): the second moment from the
    rows' total, the clipping from the total's update, each row's update −α / c · ĝ ⊘ max(sqrt(V̂), ε1)."""

    def __init__(self, rest):
        self.rest, self.state, self.seen = rest, {}, set()

    def __call__(self, name, rows, theta, group):
        rows = rows.clone()
        if group["maximize"]:
            rows = -rows
            rows[self.rest] = 0.0
        total = rows.sum(0)
        st = self.state.setdefault(name, {"k": 0})
        st["k"] += 1
        k, lr = st["k"], group["lr"]
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(theta.dtype).eps if eps1 is None else eps1
        weight = k ** group["beta2_decay"]  # 1 − β̂2_k
        rho = min(lr, 1 / math.sqrt(k))
        rms = float(theta.pow(2).mean().sqrt())
        alpha = max(eps2, rms) * rho  # a tensor lr: α in its dtype, as PyTorch forms it
        square = total ** 2
        if total.dim() > 1:
            r = square.mean(-1, keepdim=True)
            c = square.mean(-2, keepdim=True)
            st["R"] = r if "R" not in st else (1 - weight) * st["R"] + weight * r
            st["C"] = c if "C" not in st else (1 - weight) * st["C"] + weight * c
            floor = st["R"].mean(-2, keepdim=True)
            self.seen.add(("row mean floored", bool((floor < eps1).any())))
            estimate = st["R"] * st["C"] / floor.clamp_min(eps1)
        else:
            st["V"] = square if "V" not in st else (1 - weight) * st["V"] + weight * square
            estimate = st["V"]
        root = estimate.sqrt()
        self.seen.add(("root floored", bool((root < eps1).any())))
        root = root.clamp_min(eps1)
        clip = max(1.0, float((total / root).pow(2).mean().sqrt()) / group["d"])
        self.seen.add(("clipped", clip > 1.0))
        self.seen.add(("eps2 floor", eps2 > rms))
        out = _f(-alpha / clip) * rows / root
        if group["weight_decay"] != 0:  # θ ← θ (1 − η λ) before the update, the factor as PyTorch forms it
            out[self.rest] -= (1 - _f(1 - lr * group["weight_decay"])) * theta
        return out


def _drive(model, opt, reference, steps):
    """test_splitters_review2's real steps split by the splitter, the first group's learning rate halved by hand
    before step 4 (after the step's backward). Yields (rows, Δ, reference rows) per step and parameter."""
    def halve(k, _splitter):
        if k == 4:
            opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * 0.5

    for _, rows, delta, expected in _drive_with(model, opt, steps, reference, before_capture=halve):
        yield rows, delta, expected


CASES = {
    # lr 0.6 caps ρ_k = min(η, 1/sqrt(k)) for the first steps and 1/sqrt(k) takes over (then η halves to 0.3).
    "decay": dict(lrs=(0.6, 0.02), weight_decay=0.1),
    "decay-foreach": dict(lrs=(0.6, 0.02), weight_decay=0.1, foreach=True),
    "maximize-eps1-floors": dict(lrs=(0.05, 0.3), eps=(0.5, 1e-3), maximize=True, weight_decay=0.05),
    "maximize-eps1-floors-foreach": dict(lrs=(0.05, 0.3), eps=(0.5, 1e-3), maximize=True, foreach=True),
    "eps2-floor-wide-d": dict(lrs=(0.2, 0.1), eps=(None, 2.0), d=3.0, beta2_decay=-0.5),
    # Gradients near 1e-9: float64's ε1 (2.2e-16) leaves V̂ ≈ 1e-18 alone where float32's (1.2e-7) would floor it.
    "eps1-none-tiny-gradients": dict(lrs=(0.2, 0.1), weight_decay=0.1, output_scale=1e-8),
    "tensor-lr": dict(lrs=(torch.tensor(0.4), torch.tensor(0.05)), weight_decay=0.1),
    "tensor-lr-foreach": dict(lrs=(torch.tensor(0.4), torch.tensor(0.05)), weight_decay=0.1, foreach=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_rows_are_the_brute_force_group_updates_and_add_up_to_the_real_step(case):
    """Two parameter groups, 8 steps (the first group's lr halved before step 5): every group's and the rest's row
    equals Adafactor's published rule applied to that group's gradient (≤ 1e-12 relative) and all rows add up to the
    real Δθ (≤ 1e-12), for the factored 4-D and 2-D weights, the vector and the 0-dim scale, single-tensor and foreach,
    ε1 given and None (the parameters' eps), float and float32-tensor learning rates. The rule's branches are
    all taken across the cases (clipping on and off; ε1 flooring the row mean and the root; ε2 flooring RMS(θ))."""
    options = dict(CASES[case])
    model = _Net(output_scale=options.pop("output_scale", 1.0))
    opt = torch.optim.Adafactor(_groups(model, options.pop("lrs")), **options)
    reference = _Adafactor(G)
    assert_rows_are_the_rule(model, opt, reference, 8)
    expected = {
        "decay": {("clipped", True), ("clipped", False)},
        "maximize-eps1-floors": {("row mean floored", True), ("root floored", True), ("clipped", True)},
        "eps2-floor-wide-d": {("eps2 floor", True), ("clipped", False)},
        "eps1-none-tiny-gradients": {("root floored", False)},
    }.get(case, set())
    assert expected <= reference.seen, reference.seen


def test_foreach_and_single_tensor_steps_hold_the_same_state_and_move_within_a_rounding():
    """Coverage (no genkernel code: passes before the change too). The split reads Adafactor's state after its step
    and forms Q = 1 / sqrt(max(V̂, ε1²)) and the clipping c_k from it with the single-tensor path's operations: the
    foreach path must leave the same factors bit for bit as the single-tensor one (it does on CPU), and its
    parameters differ only by the rounding of the last write (it multiplies then adds where the single-tensor path
    adds with alpha)."""
    runs = []
    for foreach in (False, True):
        model = _Net()
        opt = torch.optim.Adafactor(_groups(model, (0.6, 0.02)), weight_decay=0.1, foreach=foreach)
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            opt.step()
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
        torch.testing.assert_close(p, q, rtol=0, atol=4 * torch.finfo(F64).eps * float(p.detach().abs().max()))


# -- a tracked run against the same rule, pushed by hand ---------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
def test_a_tracked_run_books_the_hand_pushed_contributions_and_trains_as_the_untracked_loop(foreach):
    """PathKernelTracker (dense route, midpoint rule) over 6 steps with two parameter groups, decay, clipping and a
    mid-run lr change: its contributions and rest equal J(θ_mid) u_g with u_g from the published rule (≤ 1e-12 of
    their scale), the ledger closes (Δf = Σ_g C_g + rest + residual to 1e-12), its residual is the midpoint rule's
    error, small, and the parameters end bit-identical to the same loop without the tracker."""
    model, twin = _Net(), _Net()
    opt, twin_opt = (torch.optim.Adafactor(_groups(m, (0.02, 0.01)), weight_decay=0.1, foreach=foreach)
                     for m in (model, twin))
    gen = torch.Generator().manual_seed(4)
    probes = torch.randn(3, 3, generator=gen, dtype=F64)
    owner = {n: opt.param_groups[0 if n in ("kernel", "bias") else 1] for n, _ in model.named_parameters()}
    rule = _Adafactor(2)
    tracker, contributions, rest, f_start = track_against_rule(model, opt, twin, twin_opt, rule, owner, probes, gen,
                                                               steps=6, new_lr=0.005)
    assert ("clipped", True) in rule.seen
    assert_ledger_is_the_rule(tracker, model, twin, contributions, rest, f_start, probes, 6)
    ledger, delta = tracker.ledger, model(probes).detach() - f_start
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, delta, rtol=0, atol=1e-12)


def test_a_float32_run_with_clipping_passes_the_trackers_own_checks():
    """A float32 model (Adafactor's default ε1 is then float32's eps) over 5 steps with decoupled decay and the update
    clipped at every step after the first: every step's split adds up to the real float32 step within the tracker's
    check (no LedgerCheckError) and the ledger closes."""
    model, twin = _Net(seed=2, dtype=torch.float32), _Net(seed=2, dtype=torch.float32)
    opt, twin_opt = (torch.optim.Adafactor(m.parameters(), lr=0.05, weight_decay=0.01) for m in (model, twin))
    gen = torch.Generator().manual_seed(6)
    probes = torch.randn(3, 3, generator=gen)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=3)
    clipped = 0
    for _ in range(5):
        x, y = torch.randn(N, 3, generator=gen), torch.randn(N, 2, generator=gen)
        tracker.step(x, y, torch.arange(N) % 3)
        twin_opt.zero_grad()
        mse_loss(twin(x), y).mean().backward()
        twin_opt.step()
        rms_updates = []
        for p in model.parameters():
            state = opt.state[p]
            estimate = (state["row_var"] @ state["col_var"] / state["row_var"].mean(-2, keepdim=True)
                        if "row_var" in state else state["variance"])
            rms_updates.append(float((p.grad * estimate.rsqrt()).pow(2).mean().sqrt()))
        clipped += max(rms_updates) > 1.0
    assert clipped >= 4
    assert tracker.ledger.steps == 5
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    ledger = tracker.ledger
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-5 * float(ledger.delta.abs().max()))
    assert ledger.relative_residual() < 1e-2


# -- the cost estimate, the routes and what is refused -------------------------------------------------------------
def test_the_cost_estimate_counts_a_vectors_variance_and_only_the_dense_route_takes_adafactor():
    """Adafactor keeps one parameter-sized tensor for a vector or 0-dim parameter (its full variance) and only row
    and column factors for the others: the estimate's copies equal the most any parameter holds (0 for a model of
    matrices alone), and no per-row state (the splitter keeps none). Before: 0 copies for any model. The sketched
    route refuses it by name and "auto" takes the dense route."""
    from genkernel.core.cost import linear_state_rows, optimizer_state_copies, sketchable
    model = _Net()
    opt = torch.optim.Adafactor(model.parameters())
    probes = torch.randn(2, 3, dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2)
    tracker.step(torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64), torch.arange(4) % 2)
    held = [sum(1 for key, v in opt.state[p].items() if key != "step" and v.shape == p.shape) for p in model.parameters()]
    assert max(held) == optimizer_state_copies(opt) == 1
    assert optimizer_state_copies(torch.optim.Adafactor([model.kernel, model.head])) == 0
    assert tracker.route.splitter.state_key is None and not linear_state_rows(opt)
    assert tracker.group_state == "dense" and tracker.cost.memory["group_state"] == 0
    assert not sketchable(opt)
    with pytest.raises(ValueError, match=r"group_state='sketched' supports .*; got Adafactor \(use group_state='dense'\)"):
        PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, group_state="sketched")


def _splitter(opt, params):
    return make_splitter(opt, params, Partitions(G))


def test_what_adafactor_cannot_step_is_refused_before_anything_moves():
    """PyTorch's Adafactor raises on a complex parameter or a sparse gradient in the middle of its step, after the
    earlier parameter groups have moved: the splitter refuses both before the step, naming the fix; so it does a
    parameter group mixing dtypes with ε1 = None (torch's two paths take ε1 from different dtypes there). A gradient
    edited in place between the step and the split (the clipping c_k is read from it) is a LedgerCheckError."""
    weight = nn.Parameter(torch.randn(3, 2, dtype=torch.complex128))
    with pytest.raises(TypeError, match=r"'w' is complex.*does not support complex parameters.*view_as_real"):
        _splitter(torch.optim.Adafactor([weight]), {"w": weight})

    embedding = nn.Embedding(5, 3, sparse=True).double()
    opt = torch.optim.Adafactor(embedding.parameters())
    splitter = _splitter(opt, dict(embedding.named_parameters()))
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"'weight' has a sparse gradient.*Adafactor does not support sparse.*"
                                        r"nn.Embedding\(\.\.\., sparse=False\)"):
        splitter.capture()

    # eps=(None, ...) over mixed dtypes: ε1 is the first stepped parameter's eps, the float32 one single-tensor and the
    # float64 one foreach (it orders by dtype), so torch's two paths step differently.
    low, high = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4, dtype=F64))
    splitter = _splitter(torch.optim.Adafactor([low, high]), {"low": low, "high": high})
    low.grad, high.grad = torch.ones(4), torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"group 0 mixes parameter dtypes \(torch.float32, torch.float64\) with "
                                         r"eps=\(None, \.\.\.\).*Give ε1 explicitly"):
        splitter.capture()

    model = _Net()
    params = dict(model.named_parameters())
    opt = torch.optim.Adafactor(model.parameters())
    splitter = _splitter(opt, params)
    mse_loss(model(torch.randn(4, 3, dtype=F64)), torch.randn(4, 2, dtype=F64)).mean().backward()
    theta = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: torch.zeros(G, *p.shape, dtype=F64) for n, p in params.items()}
    rounding = {"groups": {n: p.grad.clone() for n, p in params.items()}}
    splitter.capture()
    opt.step()
    model.head.grad.mul_(2.0)
    with pytest.raises(LedgerCheckError, match=r"'head': its gradient was changed in place after the optimizer step"):
        splitter.split(grads, theta, rounding)
