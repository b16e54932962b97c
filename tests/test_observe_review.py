"""Observed loops (tracker.observe + the loop's own optimizer.step()) against an independent float64
brute force: per-example gradients by torch.func, the real coefficients each loop gave them (sum or
mean, two backwards, clipping by any norm, a manual scale, a misplaced zero_grad), the per-group
momentum recurrence written by hand, and contributions J(θ_mid) u_g by forward-mode AD (review:
observe)."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.supervised import mse_loss

F64 = torch.float64
G = 3
PROBES = torch.randn(4, 3, generator=torch.Generator().manual_seed(7), dtype=F64)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)


def batches(steps=3, batch=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, generator=g, dtype=F64), torch.randn(batch, 2, generator=g, dtype=F64),
             torch.arange(batch) % G) for _ in range(steps)]


def two_groups(model):
    """SGD with momentum, two parameter groups with their own lr and momentum."""
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1, "momentum": 0.9},
                            {"params": model[2].parameters(), "lr": 0.03, "momentum": 0.5}])


def group_gradients(model, x, y, groups, coefficient):
    """{name: [G, *shape]} Σ_{n∈g} c_n ∇ℓ_n at the model's θ, per-example gradients by torch.func."""
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def loss(th, xi, yi):
        return mse_loss(functional_call(model, th, (xi[None],)), yi[None]).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y)
    one_hot = torch.nn.functional.one_hot(groups, G).to(F64).T * coefficient  # [G, B]
    return {n: torch.einsum("gb,b...->g...", one_hot, g) for n, g in per_example.items()}


class BruteForce:
    """The ledger by hand for torch.optim.SGD (momentum, dampening 0, one buffer per group and
    parameter, skipped where the gradient is None)."""

    def __init__(self, model):
        self.model, self.buffers = model, {}
        self.contributions = torch.zeros(PROBES.shape[0], G, 2, dtype=F64)
        self.pending = None

    def add(self, x, y, groups, coefficient):
        rows = group_gradients(self.model, x, y, groups, coefficient)
        self.pending = rows if self.pending is None else {n: self.pending[n] + rows[n] for n in rows}

    def scale(self, factor):
        self.pending = {n: factor * g for n, g in self.pending.items()}

    def step(self, optimizer):
        """Run the real optimizer.step() and add the step's contributions by hand."""
        params = dict(self.model.named_parameters())
        for n, p in params.items():  # the loop's real gradient is the brute force's sum
            real = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(real, self.pending[n].sum(0), rtol=1e-12, atol=1e-15)
        skipped = {n for n, p in params.items() if p.grad is None}
        hyper = {n: group for group in optimizer.param_groups for n, p in params.items()
                 if any(p is q for q in group["params"])}
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.step()
        updates = {}
        for n, rows in self.pending.items():
            if n in skipped:
                continue
            h = hyper[n]
            if h["momentum"]:
                rows = rows if n not in self.buffers else h["momentum"] * self.buffers[n] + rows
                self.buffers[n] = rows
            updates[n] = -h["lr"] * rows
        middle = {n: (before[n] + p.detach()) / 2 for n, p in params.items()}
        for g in range(G):
            tangent = {n: updates[n][g] if n in updates else torch.zeros_like(middle[n]) for n in middle}
            _, out = jvp(lambda th: functional_call(self.model, th, (PROBES,)), (middle,), (tangent,))
            self.contributions[:, g] += out
        self.pending = None


def run(loop, *, track):
    model = mlp()
    optimizer = two_groups(model)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=G) if track else None
    brute = BruteForce(model)
    loop(model, optimizer, tracker, brute)
    return model, tracker, brute


def observe(tracker, *args):
    if tracker is not None:
        tracker.observe(*args)


def assert_exact(loop):
    """The observed ledger equals the brute force to rounding, adds up, and training is bit-for-bit
    that of the same loop without the tracker."""
    model, tracker, brute = run(loop, track=True)
    bare, _, _ = run(loop, track=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    ledger = tracker.ledger
    assert ledger.steps == 3
    scale = float(brute.contributions.abs().max())
    torch.testing.assert_close(ledger.contributions, brute.contributions, rtol=0, atol=1e-12 * scale)
    identity = ledger.f_end - ledger.f_start - ledger.contributions.sum(1) - ledger.rest - ledger.residual
    assert float(identity.abs().max()) < 1e-14  # (the residual itself is the midpoint rule's: the brute force's too)
    return tracker


# -- refusals (fail on the old code) ---------------------------------------------------------------

def test_the_same_losses_observed_twice_are_refused_at_the_second_observe():
    # Old code: accepted; the second observe() took the still-clear gradients for a skipped step, added an
    # entry to skipped_steps that no loop skipped, and the step went on with the second copy.
    model = mlp()
    optimizer = two_groups(model)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=G)
    brute = BruteForce(model)
    x, y, groups = batches(1)[0]
    losses = mse_loss(model(x), y)
    tracker.observe(losses, groups)
    with pytest.raises(ValueError, match="already observed for the step to come"):
        tracker.observe(losses, groups)  # a callback and the loop both observing
    assert tracker.observed_micro_batches == 1 and tracker.skipped_steps == []
    brute.add(x, y, groups, torch.full((8,), 1 / 8, dtype=F64))
    losses.mean().backward()
    brute.step(optimizer)  # the step goes on with the one observation
    scale = float(brute.contributions.abs().max())
    torch.testing.assert_close(tracker.ledger.contributions, brute.contributions, rtol=0, atol=1e-12 * scale)


def test_micro_batches_whose_gradients_are_parallel_are_refused():
    # Old code: a silent wrong split. Every per-example gradient of this model is parallel to (1, 1)
    # (a duplicated input feature), so any weighting of the two micro-batches is "one scalar times" the
    # observed sum: the loop weighted the first micro-batch by 1/4 and the second by 1 (observed as means),
    # and the ledger credited group 0 with 2.5x and group 1 with 0.625x their contributions (0.086 off
    # at a contribution of 0.228), its check passing.
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=F64),
                                num_groups=2)
    t = torch.linspace(-1, 1, 8, dtype=F64)
    x, y = torch.stack([t, t], 1), torch.sin(3 * t)[:, None]
    groups = torch.tensor([0] * 4 + [1] * 4)
    for rows, factor in ((slice(0, 4), 0.25), (slice(4, 8), 1.0)):
        losses = mse_loss(model(x[rows]), y[rows])
        tracker.observe(losses, groups[rows])
        (losses.sum() * factor).backward()
    theta = model.weight.detach().clone()
    with pytest.raises(ValueError, match="are all parallel"):
        optimizer.step()
    assert torch.equal(model.weight, theta) and tracker.ledger.steps == 0


def test_a_skipped_step_after_observing_is_still_detected_with_gradients_set_to_none():
    # The fix tells "no backward since the last observe" from a skip: a backward ran through the
    # observed losses, the step was skipped and zero_grad(set_to_none=True) cleared its gradients.
    model = mlp()
    optimizer = two_groups(model)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=G)
    brute = BruteForce(model)
    for k, (x, y, groups) in enumerate(batches(4)):
        losses = mse_loss(model(x), y)
        tracker.observe(losses, groups)
        losses.mean().backward()
        if k == 1:  # the loop skips this step (a loss spike, an overflow)
            optimizer.zero_grad(set_to_none=True)
            continue
        brute.add(x, y, groups, torch.full((8,), 1 / 8, dtype=F64))
        brute.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    assert tracker.skipped_steps == [{"after_step": 1, "micro_batches": 1}]
    scale = float(brute.contributions.abs().max())
    torch.testing.assert_close(tracker.ledger.contributions, brute.contributions, rtol=0, atol=1e-12 * scale)


def test_a_micro_batch_observed_then_skipped_by_the_loop_is_left_out_of_the_step():
    # Old code: refused (its gradient lacks the skipped micro-batch), naming the micro-batch. Now the
    # backward hooks say which micro-batches the real gradient holds: the skipped one is left out and
    # counted, and the step is the first micro-batch's, to rounding.
    model = mlp()
    optimizer = two_groups(model)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=G)
    brute = BruteForce(model)
    x, y, groups = batches(1)[0]
    for i, rows in enumerate((slice(0, 4), slice(4, 8))):
        losses = mse_loss(model(x[rows]), y[rows])
        tracker.observe(losses, groups[rows])
        if i == 1:  # a loss-spike guard after observe(): no backward for this micro-batch
            continue
        brute.add(x[rows], y[rows], groups[rows], torch.full((4,), 1 / 8, dtype=F64))
        (losses.mean() / 2).backward()
    brute.step(optimizer)
    assert tracker.ledger.steps == 1 and tracker.skipped_steps == []
    entry = tracker.gradient_scales[0]
    assert entry["micro_batches"] == 1 and entry["dropped_micro_batches"] == 1
    assert entry["scale"] == pytest.approx(0.5, rel=1e-12)
    scale = float(brute.contributions.abs().max())
    torch.testing.assert_close(tracker.ledger.contributions, brute.contributions, rtol=0, atol=1e-12 * scale)


def skip_guard(model, optimizer, tracker, brute):
    """A guard after observe() skips batch 1 (no backward, no step); nothing keeps its losses."""
    for k, (x, y, groups) in enumerate(batches(4)):
        losses = mse_loss(model(x), y)
        observe(tracker, losses, groups)
        if k == 1:
            continue
        brute.add(x, y, groups, torch.full((8,), 1 / 8, dtype=F64))
        losses.mean().backward()
        brute.step(optimizer)
        optimizer.zero_grad()


def test_a_batch_skipped_after_observe_is_dropped_at_the_next_observe():
    # coverage (exact on the old code too): the fix keeps dropping micro-batches whose losses are gone
    model, tracker, brute = run(skip_guard, track=True)
    bare, _, _ = run(skip_guard, track=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    # (the skipped batch had no backward: it is left out of the next step and counted there, not a skipped step)
    assert tracker.skipped_steps == [] and tracker.ledger.steps == 3
    assert [e["dropped_micro_batches"] for e in tracker.gradient_scales] == [0, 1, 0]
    scale = float(brute.contributions.abs().max())
    torch.testing.assert_close(tracker.ledger.contributions, brute.contributions, rtol=0, atol=1e-12 * scale)


# -- coverage: loops whose gradient is one scalar times the observed sum --------------------------

def plain(weighting, *, twice=False, after=None):
    def loop(model, optimizer, tracker, brute):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda k: 0.5 ** k, lambda k: 1.0 + k])
        for k, (x, y, groups) in enumerate(batches()):
            losses = mse_loss(model(x), y)
            observe(tracker, losses, groups)
            coefficient = torch.full((8,), 1.0 if weighting == "sum" else 1 / 8, dtype=F64)
            brute.add(x, y, groups, coefficient * (2 if twice else 1))
            loss = losses.sum() if weighting == "sum" else losses.mean()
            if twice:
                loss.backward(retain_graph=True)
            loss.backward()
            if after is not None:
                after(model, optimizer, brute, k)
            brute.step(optimizer)
            optimizer.zero_grad()
            scheduler.step()
    return loop


def clip(norm_type, **options):
    def after(model, optimizer, brute, k):
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, norm_type=norm_type, **options)
        rows = torch.cat([g.sum(0).reshape(-1) for g in brute.pending.values()])
        expected = float(rows.abs().max() if norm_type == math.inf else rows.norm(p=norm_type))
        assert float(total) == pytest.approx(expected, rel=1e-12)
        brute.scale(min(1.0, 0.05 / (expected + 1e-6)))
    return after


def times_three(model, optimizer, brute, k):
    for p in model.parameters():
        p.grad.mul_(3.0)
    brute.scale(3.0)


def zero_grad_before_step(model, optimizer, brute, k):
    if k == 1:  # misplaced zero_grad: SGD skips every parameter (its momentum buffers stay as they were)
        optimizer.zero_grad(set_to_none=True)
        brute.pending = {n: torch.zeros_like(g) for n, g in brute.pending.items()}


@pytest.mark.parametrize("loop", [
    plain("sum"), plain("mean", twice=True), plain("mean", after=clip(math.inf, foreach=True)),
    plain("sum", after=clip(1.0, error_if_nonfinite=True)), plain("mean", after=times_three),
    plain("mean", after=zero_grad_before_step),
], ids=["sum", "two_backwards", "clip_inf_foreach", "clip_l1_error_if_nonfinite", "manual_scale",
        "zero_grad_between_backward_and_step"])
def test_observed_loops_match_the_brute_force(loop):
    assert_exact(loop)


# -- coverage: gradients that are no scalar times the observed sum are refused before the step ----

def noise(model, optimizer, brute, k):
    gen = torch.Generator().manual_seed(k)
    for p in model.parameters():
        p.grad.add_(1e-3 * torch.randn(p.shape, generator=gen, dtype=F64))


def manual_weight_decay(model, optimizer, brute, k):
    for p in model.parameters():
        p.grad.add_(p.detach(), alpha=1e-2)


@pytest.mark.parametrize("change", [noise, manual_weight_decay], ids=["gradient_noise", "manual_weight_decay"])
def test_gradients_changed_after_the_backward_are_refused_before_the_step(change):
    model = mlp()
    optimizer = two_groups(model)
    tracker = PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=G)
    x, y, groups = batches(1)[0]
    losses = mse_loss(model(x), y)
    tracker.observe(losses, groups)
    losses.mean().backward()
    change(model, optimizer, None, 0)
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LedgerCheckError, match="do not add up to the real gradient"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta)) and tracker.ledger.steps == 0
