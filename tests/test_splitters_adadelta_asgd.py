"""Exact splits for torch.optim.Adadelta and torch.optim.ASGD (splitters.py), each checked against a brute force
from the optimizer's published update rule computed here from per-example gradients by a plain autograd loop (no
genkernel code in the reference): the rows equal the brute-force per-group updates, the rows add up to the real
step, and a tracked run's ledger equals the contributions pushed by hand and trains to the same parameters, bit for
bit, as the untracked loop. Before, both were refused (TypeError naming the supported optimizers), so every test
here fails on that code (the refusals too: a TypeError, not the variant's error)."""

import pytest
import torch

from genkernel import PathKernelTracker
from genkernel.core.grouping import Partitions
from genkernel.core.tracking.splitters import make_splitter
from genkernel.supervised import mlp, mse_loss

from test_splitters_more_optimizers import (
    _Rule, _drive, _groups, assert_flag_refused, assert_ledger_is_the_rule, assert_rows_are_the_rule, mlp_and_twin,
    track_against_rule,
)
from test_splitters_review2 import G, _f, _model, _relative

F64 = torch.float64


# -- the published rules, per row (groups, rest, rounding), their non-linear parts from the total ------------------
class _Adadelta(_Rule):
    """Zeiler's Adadelta as torch.optim.Adadelta documents it: v_k = ρ v_{k−1} + (1 − ρ) g_k²,
    Δx_k = sqrt(u_{k−1} + ε) / sqrt(v_k + ε) · g_k, u_k = ρ u_{k−1} + (1 − ρ) Δx_k², θ ← θ − η Δx_k (v, u from zeros).
    Per row: −η sqrt(u_{k−1} + ε) / sqrt(v_k + ε) · ĝ, the two accumulators from the whole gradient."""

    def update(self, st, rows, total, group):
        rho, eps, lr = group["rho"], group["eps"], _f(group["lr"])
        st["v"] = rho * st.get("v", torch.zeros_like(total)) + (1 - rho) * total ** 2
        previous = st.get("u", torch.zeros_like(total))
        scale = (previous + eps).sqrt() / (st["v"] + eps).sqrt()
        st["u"] = rho * previous + (1 - rho) * (scale * total) ** 2
        return -lr * scale * rows


class _ASGD(_Rule):
    """Polyak–Juditsky averaged SGD as torch.optim.ASGD runs it: θ ← θ (1 − λ_d η_k) − η_k g_k with η_1 the lr and,
    after step k, η_{k+1} = lr / (1 + λ_d lr k)^α (both held as float32, the default scalar dtype). Per row: −η_k ĝ,
    the rest also −λ_d η_k θ_k (the average the optimizer keeps is not the parameters). Needs ``foreach`` set."""

    def __call__(self, name, rows, theta, group):
        self.theta = theta
        return super().__call__(name, rows, theta, group)

    def update(self, st, rows, total, group):
        lr, lambd = _f(group["lr"]), group["lambd"]
        eta = st.get("eta", float(torch.tensor(lr, dtype=torch.float32)))
        out = -eta * rows
        out[self.rest] -= lambd * eta * self.theta
        # The single-tensor path forms η_{k+1} from k as a Python float, the foreach path from its float32 step count
        # tensor (in float32 arithmetic): the two differ by float32 roundings.
        k = torch.tensor(float(st["k"])) if group["foreach"] else st["k"]
        st["eta"] = float(torch.as_tensor(lr / (1 + lambd * lr * k) ** group["alpha"], dtype=torch.float32))
        return out


ASGD_OPTIONS = dict(lambd=0.01, alpha=0.75, t0=2.0)
CASES = {
    "adadelta": (torch.optim.Adadelta, dict(rho=0.8, weight_decay=0.05, foreach=False)),
    "adadelta-maximize-foreach": (torch.optim.Adadelta, dict(rho=0.9, eps=1e-4, weight_decay=0.05, maximize=True,
                                                             foreach=True)),
    "asgd": (torch.optim.ASGD, dict(ASGD_OPTIONS, weight_decay=0.05, foreach=False)),
    "asgd-maximize-foreach": (torch.optim.ASGD, dict(ASGD_OPTIONS, weight_decay=0.05, maximize=True, foreach=True)),
    "asgd-no-decay-term": (torch.optim.ASGD, dict(lambd=0.0, weight_decay=0.05, maximize=True, foreach=False)),
}


def _rule(kind, rest=G):
    return {torch.optim.Adadelta: _Adadelta, torch.optim.ASGD: _ASGD}[kind](rest)


@pytest.mark.parametrize("case", list(CASES))
def test_the_rows_are_the_brute_force_group_updates_and_add_up_to_the_real_step(case):
    """Two parameter groups (lr 0.5 and 0.2 for Adadelta, 0.05 and 0.02 for ASGD, the first halved before step 5,
    which ASGD's η takes up one step later), 8 steps: every group's and the rest's row equals the published rule
    applied to that group's gradient (≤ 1e-12 relative), and all rows add up to the real Δθ (≤ 1e-12)."""
    kind, options = CASES[case]
    model = _model()
    lrs = (0.5, 0.2) if kind is torch.optim.Adadelta else (0.05, 0.02)
    opt = kind(_groups(model, lrs), **options)
    reference = _rule(kind)
    assert_rows_are_the_rule(model, opt, reference, 8)


# -- a tracked run against the same rules, pushed by hand --------------------------------------------------------
@pytest.mark.parametrize("kind, options", [
    (torch.optim.Adadelta, dict(lr=0.5, weight_decay=0.05)),
    (torch.optim.Adadelta, dict(lr=0.5, maximize=True, foreach=True)),
    (torch.optim.ASGD, dict(ASGD_OPTIONS, lr=0.05, weight_decay=0.05)),
    (torch.optim.ASGD, dict(ASGD_OPTIONS, lr=0.05, maximize=True, foreach=True)),
], ids=["adadelta", "adadelta-maximize-foreach", "asgd", "asgd-maximize-foreach"])
def test_a_tracked_run_books_the_hand_pushed_contributions_and_trains_as_the_untracked_loop(kind, options):
    """The other optimizers' tracked run (test_splitters_more_optimizers), 7 steps: contributions and rest are the
    published rule's updates pushed by hand, the residual the midpoint rule's, training bit for bit untracked."""
    model, twin = mlp_and_twin()
    lr = options.pop("lr")
    opt, twin_opt = (kind(_groups(m, (lr, lr / 3)), **options) for m in (model, twin))
    gen = torch.Generator().manual_seed(4)
    probes = torch.randn(3, 3, generator=gen, dtype=F64)
    names = [n for n, _ in model.named_parameters()]
    owner = {n: opt.param_groups[0 if n.startswith("0.") else 1] for n in names}
    tracker, contributions, rest, f_start = track_against_rule(model, opt, twin, twin_opt, _rule(kind, rest=2), owner,
                                                               probes, gen, steps=7, new_lr=lr / 2)
    assert_ledger_is_the_rule(tracker, model, twin, contributions, rest, f_start, probes, 7)


@pytest.mark.parametrize("kind, options", [
    (torch.optim.Adadelta, dict(lr=1.0, weight_decay=0.01)),
    (torch.optim.ASGD, dict(lr=0.05, lambd=0.02, t0=3.0, weight_decay=0.01)),
], ids=["adadelta", "asgd"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
def test_a_float32_run_passes_the_trackers_checks_and_trains_as_the_untracked_loop(kind, options, foreach):
    """A float32 model (the parameters' rounding, ASGD's θ (1 − λ_d η) written in float32 on the single-tensor path
    and folded into the gradient on the foreach path) over 6 steps: every step passes the tracker's update and
    state checks, the parameters end bit-identical to the loop without the tracker, and the ledger identity holds
    with a small residual."""
    torch.manual_seed(5)
    model, twin = mlp(3, [16], 2), mlp(3, [16], 2)
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = (kind(m.parameters(), foreach=foreach, **options) for m in (model, twin))
    gen = torch.Generator().manual_seed(6)
    probes = torch.randn(4, 3, generator=gen)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2)
    f_start = model(probes).detach().double()
    for _ in range(6):
        x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
        tracker.step(x, y, torch.arange(8) % 2)
        twin_opt.zero_grad()
        mse_loss(twin(x), y).mean().backward()
        twin_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    ledger = tracker.ledger
    moved = model(probes).detach().double() - f_start
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, moved,
                               rtol=0, atol=1e-6 * float(moved.abs().max()))
    assert ledger.relative_residual() < 1e-2


def test_a_tracker_started_mid_training_splits_from_the_optimizers_existing_state():
    """Adadelta's accumulated update and ASGD's η from three untracked steps (the tracker sees them only in the
    optimizer's state): the split's rows still add up to the real Δθ at every step (≤ 1e-12), and ASGD's
    η (not its lr) is the groups' step size."""
    for kind, options in ((torch.optim.Adadelta, dict(lr=0.5)), (torch.optim.ASGD, dict(ASGD_OPTIONS, lr=0.05))):
        model = _model()
        opt = kind(model.parameters(), **options)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 3, dtype=F64)).pow(2).sum().backward()
            opt.step()
        worst = 0.0
        for rows, delta, _ in _drive(model, opt, lambda *args: None, 3):
            worst = max(worst, _relative(rows.sum(0), delta))
        assert worst < 1e-12, (kind, worst)
    eta = float(opt.state[model[0].weight]["eta"])
    assert eta != 0.05 and abs(eta - 0.05) < 1e-3


# -- the cost estimate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [torch.optim.Adadelta, torch.optim.ASGD], ids=lambda k: k.__name__)
def test_the_cost_estimate_counts_the_optimizers_state(kind):
    """The memory estimate's optimizer state equals the parameter-sized tensors the optimizer really holds after a
    step (Adadelta's square average and accumulated update, ASGD's average), and neither keeps per-row state."""
    from genkernel.core.cost import linear_state_rows, optimizer_state_copies
    model = _model()
    opt = kind(model.parameters())
    tracker = PathKernelTracker(model, opt, mse_loss, torch.randn(2, 3, dtype=F64), num_groups=2)
    tracker.step(torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64), torch.arange(4) % 2)
    held = {sum(1 for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape) for p in model.parameters()}
    assert held == {optimizer_state_copies(opt)}
    assert tracker.route.splitter.state_key is None and not linear_state_rows(opt)
    assert tracker.cost.memory["group_state"] == 0


# -- refusals and tensor hyperparameters ------------------------------------------------------------------------
def _splitter(opt, model):
    return make_splitter(opt, dict(model.named_parameters()), Partitions(G))


@pytest.mark.parametrize("kind", [torch.optim.Adadelta, torch.optim.ASGD], ids=lambda k: k.__name__)
def test_variants_the_split_cannot_follow_are_refused_with_the_fix(kind):
    """differentiable=True and capturable=True are refused when the splitter is built, and again before a step
    when a loop sets them later; a sparse gradient is refused before the step (PyTorch raises on it mid-step,
    after earlier parameter groups have moved)."""
    model = _model()
    for flag in ("differentiable", "capturable"):
        assert_flag_refused(kind, flag, model)
    splitter = _splitter(kind(model.parameters()), model)
    model[0].weight.grad = torch.zeros_like(model[0].weight).to_sparse()
    with pytest.raises(TypeError, match=rf"'0.weight' has a sparse gradient: {kind.__name__} does not support sparse "
                                        r"gradients.*nn.Embedding\(\.\.\., sparse=False\)"):
        splitter.capture()


@pytest.mark.parametrize("kind", [torch.optim.Adadelta, torch.optim.ASGD], ids=lambda k: k.__name__)
@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
def test_a_float32_tensor_lr_is_followed_on_both_paths(kind, foreach):
    """A float32 tensor lr (and, for ASGD, a float32 tensor λ_d) on float64 parameters: PyTorch uses lr only as its
    value (Adadelta's final alpha, ASGD's η held in float32 anyway) and forms ASGD's 1 − λ_d η in λ_d's dtype on
    the single-tensor path, as the split does: the rows add up to the real Δθ (≤ 1e-12) over 4 steps."""
    model = _model()
    options = dict(lr=torch.tensor(0.3), foreach=foreach)
    if kind is torch.optim.ASGD:
        options.update(lr=torch.tensor(0.05), lambd=torch.tensor(0.03), t0=1.0)
    opt = kind(model.parameters(), **options)
    worst = 0.0
    for rows, delta, _ in _drive(model, opt, lambda *args: None, 4):
        worst = max(worst, _relative(rows.sum(0), delta))
    assert worst < 1e-12, worst
