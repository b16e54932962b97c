"""Review of the Adadelta and ASGD splitters (a979a7d) in the ways people train: observed loops with gradient
accumulation, clipping, a micro-batch refused for an inf loss, an lr scheduler and a resume from saved states
mid-run, checked against the published rules computed here by hand (per-example gradients by a plain autograd
loop, the rule per group, J at the midpoint by jacrev) and against the same loop without a tracker; parameters
with no gradient on some steps; and a step that makes the parameters non-finite, which the tracker's check let
through (NaN compares false) and recorded as a NaN ledger."""

import copy

import pytest
import torch
from torch.func import functional_call, jacrev

from genkernel import PathKernelTracker
from genkernel.core.errors import NonFiniteError
from genkernel.supervised import mse_loss

F64 = torch.float64
BATCH = 6
pytestmark = pytest.mark.usefixtures("one_thread")


def _adadelta_rule(state, total, rows, theta, group):
    """Zeiler's Adadelta as torch.optim.Adadelta documents it, per row: −η sqrt(u_{k−1} + ε) / sqrt(v_k + ε) ⊙ row,
    with v_k = ρ v_{k−1} + (1 − ρ) g_k², u_k = ρ u_{k−1} + (1 − ρ) Δx_k² from the whole gradient ``total`` (coupled
    decay included). ``rows``: [3, *shape] (groups 0, 1, the rest's decay gradient λθ in row 2). Returns [3, *shape]."""
    rho, eps, lr = group["rho"], group["eps"], group["lr"]
    state["v"] = rho * state.get("v", torch.zeros_like(theta)) + (1 - rho) * total ** 2
    previous = state.get("u", torch.zeros_like(theta))
    scale = (previous + eps).sqrt() / (state["v"] + eps).sqrt()
    state["u"] = rho * previous + (1 - rho) * (scale * total) ** 2
    return -lr * scale * rows


def _asgd_rule(state, total, rows, theta, group):
    """Averaged SGD as torch.optim.ASGD runs it (single-tensor path): −η_k ⊙ row, the rest also −λ_d η_k θ_k, with
    η_1 the lr and η_{k+1} = lr_k / (1 + λ_d lr_k k)^α after step k (lr_k this step's lr), held in float32.
    Returns [3, *shape]."""
    lr, lambd = group["lr"], group["lambd"]
    eta = state.get("eta", float(torch.tensor(lr, dtype=torch.float32)))
    out = -eta * rows
    out[2] -= lambd * eta * theta
    state["k"] = state.get("k", 0) + 1
    state["eta"] = float(torch.as_tensor(lr / (1 + lambd * lr * state["k"]) ** group["alpha"], dtype=torch.float32))
    return out


def _build(kind, options, model):
    """The optimizer over ``model`` (Sequential: layer 0 in group 0, layer 2 at half the lr in group 1)."""
    return kind([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": options["lr"] / 2}],
                **options)


CASES = {
    "adadelta": (torch.optim.Adadelta, dict(lr=1.0, rho=0.8, eps=1e-6, weight_decay=0.05), _adadelta_rule),
    # t0 = 1: the average ax starts moving from the second step on.
    "asgd": (torch.optim.ASGD, dict(lr=0.05, lambd=0.01, alpha=0.75, t0=1.0, weight_decay=0.05), _asgd_rule),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_observed_loop_with_accumulation_a_refused_micro_batch_and_a_resume_books_the_published_rule(case):
    """Coverage. An observed loop over 6 steps of 2 micro-batches each (observe, the loop's own backward of half the
    mean loss), clip_grad_norm_(0.05) (active), StepLR(2, 0.5); step 3's second micro-batch has an inf loss, which
    observe() refuses, so the loop drops that step; before step 4 the run is resumed into a fresh model, optimizer,
    scheduler and tracker from their state_dicts. The ledger's contributions and rest equal the published rule per
    group pushed through J(θ_mid) by jacrev (≤ 1e-13 of their scale; ASGD's rest books the decay term as applied,
    ≤ 1e-13), and the parameters end bit for bit as the same loop without a tracker."""
    kind, options, rule = CASES[case]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(F64)
    twin = copy.deepcopy(model)
    opt, twin_opt = _build(kind, options, model), _build(kind, options, twin)
    sched, twin_sched = (torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (opt, twin_opt))
    gen = torch.Generator().manual_seed(3)
    probes = torch.randn(3, 3, generator=gen, dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, group_state="dense")
    names = [n for n, _ in model.named_parameters()]
    owner = {n: 0 if n.startswith("0.") else 1 for n in names}
    rule_state = {n: {} for n in names}
    contributions, rest = torch.zeros(3, 2, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    recorded = 0
    for k in range(6):
        if k == 4:  # resume from saved states into fresh objects
            saved_tracker, saved_opt, saved_sched = tracker.state_dict(), opt.state_dict(), sched.state_dict()
            model = copy.deepcopy(model)
            opt = _build(kind, options, model)
            opt.load_state_dict(saved_opt)
            sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
            sched.load_state_dict(saved_sched)
            tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, group_state="dense")
            tracker.load_state_dict(saved_tracker)
        params = dict(model.named_parameters())
        rows = {n: torch.zeros(3, *p.shape, dtype=F64) for n, p in params.items()}
        opt.zero_grad()
        twin_opt.zero_grad()
        dropped = False
        for micro in range(2):
            x, y = torch.randn(BATCH, 3, generator=gen, dtype=F64), torch.randn(BATCH, 2, generator=gen, dtype=F64)
            if k == 3 and micro == 1:
                y[0, 0] = float("inf")
            groups = torch.arange(BATCH) % 2
            losses = mse_loss(model(x), y)
            try:
                tracker.observe(losses, groups)
            except NonFiniteError:
                dropped = True
                break
            (losses.mean() / 2).backward()
            (mse_loss(twin(x), y).mean() / 2).backward()
            for i in range(BATCH):
                loss = ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).mean() / BATCH / 2
                for n, g in zip(names, torch.autograd.grad(loss, list(params.values()))):
                    rows[n][int(groups[i])] += g
        if dropped:
            opt.zero_grad()
            twin_opt.zero_grad()
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
            clip = min(1.0, 0.05 / (float(norm) + 1e-6))
            assert clip < 1.0
            before = {n: p.detach().clone() for n, p in params.items()}
            hyper = {n: dict(opt.param_groups[owner[n]]) for n in names}
            opt.step()
            twin_opt.step()
            recorded += 1
            middle = {n: torch.lerp(before[n], p.detach(), 0.5) for n, p in params.items()}
            jac = jacrev(lambda theta: functional_call(model, theta, (probes,)))(middle)
            for n in names:
                group_rows = rows[n] * clip
                group_rows[2] = hyper[n]["weight_decay"] * before[n]
                total = params[n].grad.to(F64) + group_rows[2]
                update = rule(rule_state[n], total, group_rows, before[n], hyper[n]).reshape(3, -1)
                pushed = (jac[n].reshape(6, -1) @ update.T).reshape(3, 2, 3)
                contributions += pushed[..., :2].permute(0, 2, 1)
                rest += pushed[..., 2]
        sched.step()
        twin_sched.step()
    ledger = tracker.ledger
    assert ledger.steps == recorded == 5
    scale = float(contributions.abs().max())
    assert float((ledger.contributions - contributions).abs().max()) <= 1e-13 * scale
    assert float((ledger.rest - rest).abs().max()) <= 1e-13 * scale
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


class _Branchy(torch.nn.Module):
    """Two linear heads; the second is left out of the forward while ``use_second`` is False (no gradient)."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.use_second = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), True

    def forward(self, x):
        out = self.first(x)
        return out + self.second(x) if self.use_second else out


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_head_without_gradient_on_some_steps_is_skipped_as_the_optimizer_skips_it(case, foreach):
    """Coverage. The second head gets no gradient on steps 2, 3 and 5 of 6 (its Adadelta accumulators, ASGD step
    count and η stay as they were, so its η lags the first head's): the tracker's steps train bit for bit as the
    loop without it, and the ledger's identity f_end − f_start = Σ contributions + rest + residual holds with a
    residual at rounding (≤ 1e-14: the model is linear in each head's parameters)."""
    kind, options, _ = CASES[case]
    torch.manual_seed(0)
    model = _Branchy().double()
    twin = copy.deepcopy(model)
    opt, twin_opt = (kind(m.parameters(), foreach=foreach, **options) for m in (model, twin))
    gen = torch.Generator().manual_seed(1)
    probes = torch.randn(3, 3, generator=gen, dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, group_state="dense")
    for k in range(6):
        model.use_second = twin.use_second = k not in (1, 2, 4)
        x, y = torch.randn(BATCH, 3, generator=gen, dtype=F64), torch.randn(BATCH, 2, generator=gen, dtype=F64)
        tracker.step(x, y, torch.arange(BATCH) % 2)
        twin_opt.zero_grad(set_to_none=True)
        mse_loss(twin(x), y).mean().backward()
        twin_opt.step()
        model.use_second = twin.use_second = True
    if kind is torch.optim.ASGD:
        assert float(opt.state[model.first.weight]["eta"]) != float(opt.state[model.second.weight]["eta"])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    ledger = tracker.ledger
    gap = ledger.f_end - ledger.f_start - ledger.contributions.sum(1) - ledger.rest - ledger.residual
    assert float(gap.abs().max()) <= 1e-14 and float(ledger.residual.abs().max()) <= 1e-14


@pytest.mark.parametrize("case", list(CASES))
def test_a_step_that_makes_the_parameters_non_finite_is_refused_and_rolled_back(case):
    """A step whose update is not finite (here an lr of inf for Adadelta; for ASGD, whose η takes the lr up a step
    later, the step after it, from η_{k+1} = inf / inf = NaN) is refused with a NonFiniteError naming the
    parameter, and rolled back: the parameters and the optimizer's state are those before it and the ledger keeps
    its earlier steps, all finite. On a979a7d the check compared NaN gaps (always false) and recorded the step:
    the parameters inf or NaN and a NaN ledger, no error."""
    kind, options, _ = CASES[case]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(F64)
    opt = kind(model.parameters(), **options)
    gen = torch.Generator().manual_seed(2)
    probes = torch.randn(3, 3, generator=gen, dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, group_state="dense")
    x, y = torch.randn(BATCH, 3, generator=gen, dtype=F64), torch.randn(BATCH, 2, generator=gen, dtype=F64)
    groups = torch.arange(BATCH) % 2
    tracker.step(x, y, groups)
    opt.param_groups[0]["lr"] = float("inf")
    if kind is torch.optim.ASGD:
        tracker.step(x, y, groups)  # η of this step is still finite; the next one's is NaN
    recorded = tracker.ledger.steps
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(NonFiniteError, match="non-finite"):
        tracker.step(x, y, groups)
    assert tracker.ledger.steps == recorded
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for p, s in opt.state.items():
        for key, value in s.items():
            assert torch.equal(value, state_before[id(p)][key]) or (value.isnan().all() and state_before[id(p)][key].isnan().all())
    ledger = tracker.ledger
    assert all(bool(t.isfinite().all()) for t in (ledger.contributions, ledger.rest, ledger.residual))
