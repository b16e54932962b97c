"""Exact on the training code people already run: observed loops, accumulation, BatchNorm,
dropout and the EMA of the weights (issue 14, the core)."""

import copy

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.supervised import mse_loss

F64 = torch.float64
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)


def data(steps=4, batch=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, generator=g, dtype=F64), torch.randn(batch, 2, generator=g, dtype=F64),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


PROBES = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)


def user_loop(model, optimizer, batches, *, tracker=None, clip=0.5, micro=2):
    """A hand-written loop with gradient accumulation over ``micro`` micro-batches and clipping;
    ``tracker.observe`` is its only added line."""
    for x, y, groups in batches:
        size = x.shape[0] // micro
        for i in range(micro):
            rows = slice(i * size, (i + 1) * size)
            losses = mse_loss(model(x[rows]), y[rows])
            if tracker is not None:
                ids = {k: v[rows] for k, v in groups.items()} if isinstance(groups, dict) else groups[rows]
                tracker.observe(losses, ids)  # added
            (losses.mean() / micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_an_observed_loop_keeps_the_ledger_an_owned_step_keeps(optimizer):
    observed_model = mlp()
    observed_opt = OPTIMIZERS[optimizer](observed_model.parameters())
    observed = PathKernelTracker(observed_model, observed_opt, mse_loss, PROBES, num_groups={"class": 3, "other": 2},
                                 quadrature="simpson")
    batches = data()
    user_loop(observed_model, observed_opt, [(x, y, {"class": g, "other": g % 2}) for x, y, g in batches],
              tracker=observed)
    owned_model = mlp()
    owned = PathKernelTracker(owned_model, OPTIMIZERS[optimizer](owned_model.parameters()), mse_loss, PROBES,
                              num_groups={"class": 3, "other": 2}, quadrature="simpson", max_grad_norm=0.5)
    for x, y, g in batches:
        owned.step(x, y, {"class": g, "other": g % 2})
    for name in ("class", "other"):
        a, b = observed.ledgers[name], owned.ledgers[name]
        scale = float(b.contributions.abs().max())
        for field in ("contributions", "rest", "residual", "traffic"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-12 * scale, msg=field)
    assert observed.ledger.steps == 4 and observed.ledger.relative_residual() < 1e-6
    # the scale each step's gradient carried: 1/2 for the accumulation times the clipping factor
    for entry in observed.gradient_scales:
        assert entry["micro_batches"] == 2 and 0 < entry["scale_times_micro_batches"] <= 1 + 1e-12
    assert any(entry["scale_times_micro_batches"] < 1 for entry in observed.gradient_scales)  # clipping happened


def test_observing_does_not_change_training_bit_for_bit():
    batches = data()
    bare_model = mlp()
    bare_opt = torch.optim.Adam(bare_model.parameters(), lr=0.01)
    user_loop(bare_model, bare_opt, batches)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3)
    user_loop(model, opt, batches, tracker=tracker)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare_model.parameters()))
    tracker.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_a_gradient_that_is_not_the_observed_sum_is_refused_before_the_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3)
    x, y, g = data(1)[0]
    losses = mse_loss(model(x), y)
    tracker.observe(losses, g)
    losses.mean().backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)  # clipping by value: not one scalar
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LedgerCheckError, match="do not add up to the real gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta)) and tracker.ledger.steps == 0


def test_a_step_without_an_observed_micro_batch_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3)
    user_loop(model, opt, data(1), tracker=tracker)
    x, y, _ = data(1, seed=3)[0]
    mse_loss(model(x), y).mean().backward()
    with pytest.raises(RuntimeError, match="without an observed micro-batch"):
        opt.step()
    assert tracker.ledger.steps == 1


def test_a_closure_step_is_observed_after_its_backward():
    # optimizer.step(closure), as Lightning's automatic optimization calls it
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3, quadrature="simpson")
    for x, y, g in data(3):
        def closure():
            opt.zero_grad()
            losses = mse_loss(model(x), y)
            tracker.observe(losses, g)
            losses.mean().backward()
            return losses.mean()

        opt.step(closure)
    assert tracker.ledger.steps == 3 and tracker.ledger.relative_residual() < 1e-6


def test_mixed_precision_hidden_in_a_wrapped_forward_is_refused():
    model = mlp()
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, PROBES, num_groups=3)
    original = model.forward
    model._original_forward = original  # what accelerate does when it wraps the forward in autocast
    model.forward = lambda *a: original(*a)
    x, y, g = data(1)[0]
    with pytest.raises(RuntimeError, match="mixed_precision='no'"):
        tracker.observe(mse_loss(model(x), y), g)
    with pytest.raises(RuntimeError, match="fp32|full precision"):
        tracker.step(x, y, g)
    plain = mlp()
    tracker = PathKernelTracker(plain, torch.optim.SGD(plain.parameters(), lr=0.1), mse_loss, PROBES, num_groups=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="autocast is on"):
            tracker.observe(mse_loss(plain(x), y), g)


# ------------------------------------------------------------------------------------------
# BatchNorm and dropout in training mode
# ------------------------------------------------------------------------------------------
def batchnorm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).to(F64)


def test_batchnorm_group_gradients_are_the_losses_of_each_group_through_the_one_batch_forward():
    model = batchnorm_model()
    reference = copy.deepcopy(model)
    lr = 0.1
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=lr), mse_loss, PROBES, num_groups=2,
                                quadrature="simpson")
    x, y, _ = data(1)[0]
    groups = (torch.arange(12) % 2)
    result = tracker.step(x, y, groups)
    # hand-derived: each group owns its examples' losses, as shaped by the batch statistics
    out = reference(x)
    per_example = mse_loss(out, y)
    for g in (0, 1):
        mask = (groups == g).to(F64) / 12
        grads = torch.autograd.grad((per_example * mask).sum(), list(reference.parameters()), retain_graph=True)
        for (name, _), grad in zip(reference.named_parameters(), grads):
            torch.testing.assert_close(result.group_updates[name][g], -lr * grad, rtol=1e-10, atol=1e-14)
    # the two groups add up to the real gradient (the step's check), and the running statistics'
    # change is its own row: the ledger identity holds with it
    ledger = tracker.ledger
    assert float(ledger.buffer_drift.abs().max()) > 0
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-13)
    assert ledger.relative_residual() < 1e-6
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)  # statistics moved once


def test_dropout_group_gradients_use_the_masks_training_drew():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)).to(F64)
    reference = copy.deepcopy(model)
    lr = 0.1
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=lr), mse_loss, PROBES, num_groups=3)
    x, y, groups = data(1)[0]
    torch.manual_seed(11)
    result = tracker.step(x, y, groups)
    torch.manual_seed(11)  # the same masks: the mask-fixed reference
    per_example = mse_loss(reference(x), y)
    for g in range(3):
        mask = (groups == g).to(F64) / 12
        grads = torch.autograd.grad((per_example * mask).sum(), list(reference.parameters()), retain_graph=True)
        for (name, _), grad in zip(reference.named_parameters(), grads):
            torch.testing.assert_close(result.group_updates[name][g], -lr * grad, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------------
# The EMA of the weights
# ------------------------------------------------------------------------------------------
class PlainEMA:
    """A hand-written EMA with a step-dependent decay (as diffusers' warm-up), the brute force."""

    def __init__(self, model, decay=0.9):
        self.model, self.decay, self.steps = model, decay, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step(self):
        self.steps += 1
        beta = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for n, p in self.model.named_parameters():
            self.shadow[n].mul_(beta).add_(p.detach(), alpha=1 - beta)

    def __call__(self):
        return self.shadow


def ema_run(make_ema, *, warm=0):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    ema = make_ema(model)
    batches = data(6)
    for x, y, g in batches[:warm]:  # the EMA moves away from the weights before tracking starts
        mse_loss(model(x), y).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.step()
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3, quadrature="simpson")
    tracker.track_ema(ema)
    steps = []
    for x, y, g in batches[warm:]:
        result = tracker.step(x, y, g)
        steps.append(result.group_updates)
        ema.step()
    return tracker, ema, model, steps


@pytest.mark.parametrize("warm", [0, 2])
def test_the_ema_ledger_adds_up_and_equals_the_ema_of_the_group_displacements(warm):
    tracker, ema, model, steps = ema_run(PlainEMA, warm=warm)
    ledgers = tracker.ema_ledgers
    ledger = ledgers["groups"]
    # identity: EMA output change = Σ contributions + rest (start included) + residual
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-13)
    assert ledger.relative_residual() < 1e-5 and ledger.steps == len(steps)
    if warm:
        assert float(tracker.ema.start.abs().max()) > 0  # the EMA did not start at θ_0
    # brute force: the EMA of per-group displacements, E_{k+1} = β E_k + (1 − β) D_{k+1}
    decays = tracker.ema.decays
    assert len(decays) == len(steps)
    names = list(dict(model.named_parameters()))
    D = {n: torch.zeros_like(steps[0][n]) for n in names}
    E = {n: torch.zeros_like(steps[0][n]) for n in names}
    for update, beta in zip(steps, decays):
        for n in names:
            D[n] += update[n]
            E[n] = beta * E[n] + (1 - beta) * D[n]
    for n in names:
        torch.testing.assert_close(tracker.ema.offset[n][:-1], E[n], rtol=1e-12, atol=1e-15)
    # the decay read equals the one the EMA used
    expected = [min(0.9, (1 + k) / (10 + k)) for k in range(warm + 1, warm + len(steps) + 1)]
    torch.testing.assert_close(torch.tensor(decays, dtype=F64), torch.tensor(expected, dtype=F64), rtol=1e-9, atol=1e-12)


def test_the_ema_ledger_reads_diffusers_ema_pytorch_and_averaged_model():
    from diffusers.training_utils import EMAModel
    from ema_pytorch import EMA

    makers = {
        "diffusers": lambda m: EMAModel(m.parameters(), decay=0.9, use_ema_warmup=True, inv_gamma=1.0, power=0.5),
        "ema_pytorch": lambda m: _EmaPytorchStep(EMA(m, beta=0.8, update_after_step=1, update_every=1)),
        "averaged_model": lambda m: torch.optim.swa_utils.AveragedModel(m),
    }
    for name, make in makers.items():
        if name == "diffusers":
            make_ema = lambda m: _DiffusersStep(make(m), m)  # noqa: E731
        elif name == "averaged_model":
            make_ema = lambda m, make=make: _AveragedStep(make(m), m)  # noqa: E731
        else:
            make_ema = make
        tracker, _, _, steps = ema_run(make_ema)
        ledger = tracker.ema_ledgers["groups"]
        assert ledger.steps == len(steps), name
        assert ledger.relative_residual() < 1e-5, name


class _DiffusersStep:
    def __init__(self, ema, model):
        self.ema, self.model, self.shadow_params = ema, model, ema.shadow_params

    def step(self):
        self.ema.step(self.model.parameters())


class _EmaPytorchStep:
    def __init__(self, ema):
        self.ema, self.ema_model = ema, ema.ema_model

    def step(self):
        self.ema.update()


class _AveragedStep:
    def __init__(self, ema, model):
        self.module, self.ema, self.model = ema.module, ema, model

    def step(self):
        self.ema.update_parameters(self.model)


def test_an_ema_updated_with_other_weights_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3)
    tracker.track_ema(lambda: shadow)
    x, y, g = data(1)[0]
    tracker.step(x, y, g)
    for t in shadow.values():
        t.add_(0.01)  # not an interpolation toward the model's weights
    with pytest.raises(LedgerCheckError, match="not β θ̄ \\+ \\(1 − β\\) θ"):
        tracker.ema_ledgers


@pytest.mark.parametrize("kind", ["ema_pytorch", "averaged_use_buffers", "averaged_copies_buffers"])
def test_the_ema_ledger_sees_the_ema_models_own_buffers(kind):
    """With BatchNorm, the model people sample from is the EMA module with its own buffers
    (averaged, or copied at each update): the EMA ledger starts and ends at that model's outputs,
    its buffers' moves are booked in buffer_drift, and the identity holds."""
    from ema_pytorch import EMA
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    if kind == "ema_pytorch":
        ema = _EmaPytorchStep(EMA(model, beta=0.8, update_after_step=0, update_every=1))
        sampled = ema.ema_model
    else:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=kind == "averaged_use_buffers")
        ema, sampled = _AveragedStep(averaged, model), averaged.module
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3, quadrature="simpson")
    tracker.track_ema(ema)

    def sampled_outputs():
        with torch.no_grad():
            return sampled.eval()(PROBES)

    start = sampled_outputs()
    for x, y, g in data(5):
        model.train()
        tracker.step(x, y, g)
        ema.step()
    ledger = tracker.ema_ledgers["groups"]
    torch.testing.assert_close(ledger.f_start, start, rtol=0, atol=1e-14)
    torch.testing.assert_close(ledger.f_end, sampled_outputs(), rtol=0, atol=1e-14)
    assert float(ledger.buffer_drift.abs().max()) > 1e-3  # the EMA's buffers moved, and are booked apart
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-13)
    assert ledger.relative_residual() < 1e-4


def test_the_ema_ledgers_read_after_close_while_training_and_the_ema_go_on():
    """close() ends the tracked window: it records the EMA's update after the last tracked step,
    and later untracked steps (the EMA following them) leave the EMA ledgers as they were."""
    tracker, ema, model, steps = ema_run(PlainEMA)
    opt = tracker.optimizer
    tracker.close()
    frozen = tracker.ema_ledgers["groups"].copy()
    for x, y, g in data(2, seed=9):
        mse_loss(model(x), y).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.step()
    after = tracker.ema_ledgers["groups"]
    assert after.steps == frozen.steps == len(steps)
    torch.testing.assert_close(after.contributions, frozen.contributions, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="closed"):
        tracker.step(*data(1, seed=9)[0])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_step_a_grad_scaler_skips_is_no_step_of_the_ledger(set_to_none):
    """A GradScaler that finds inf skips optimizer.step() and the loop clears the gradients: the
    micro-batch observed for it belongs to no step. The ledger equals that of the same loop without
    the overflowing batch (the scales are powers of two: exact), training is untouched."""
    batches = [(x.float(), y.float(), g) for x, y, g in data(4)]
    overflow = 1

    def loop(track, skip_overflowing_batch):
        model = mlp().float()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
        tracker = (PathKernelTracker(model, opt, mse_loss, PROBES.float(), num_groups=3, quadrature="simpson")
                   if track else None)
        for k, (x, y, groups) in enumerate(batches):
            if k == overflow:
                if skip_overflowing_batch:
                    continue
                y = y * 1e15  # its scaled gradient overflows float32: the scaler skips the step
            losses = mse_loss(model(x), y)
            if tracker is not None:
                tracker.observe(losses, groups)
            scaler.scale(losses.mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=set_to_none)
        return model, tracker

    bare, _ = loop(False, False)
    model, tracker = loop(True, False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    assert tracker.skipped_steps == [{"after_step": 1, "micro_batches": 1}]
    assert tracker.attempted_steps == 4  # (the loop's count: three recorded, one skipped)
    _, without = loop(True, True)
    assert tracker.ledger.steps == without.ledger.steps == 3
    torch.testing.assert_close(tracker.ledger.contributions, without.ledger.contributions, rtol=1e-6, atol=1e-9)
    assert tracker.ledger.relative_residual() < 1e-3


def test_micro_batches_weighted_unlike_the_observed_means_are_refused_with_the_fix():
    """losses.sum() over micro-batches of 8 and 4 examples is no scalar times the observed means'
    sum: refused, naming observe's weights=; with the loss's own coefficients (ones) the observed
    ledger is the owned step's with those weights."""
    x, y, g = data(1)[0]
    parts = [slice(0, 8), slice(8, 12)]

    def loop(tracker, weights):
        for rows in parts:
            losses = mse_loss(model(x[rows]), y[rows])
            tracker.observe(losses, g[rows], weights=None if weights is None else torch.ones(rows.stop - rows.start, dtype=F64))
            losses.sum().backward()
        opt.step()
        opt.zero_grad()

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3)
    with pytest.raises(LedgerCheckError, match="weights="):
        loop(tracker, None)
    assert tracker.ledger.steps == 0 and tracker.observed_micro_batches == 0
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3)
    loop(tracker, "ones")
    owned_model = mlp()
    owned = PathKernelTracker(owned_model, torch.optim.Adam(owned_model.parameters(), lr=0.01), mse_loss, PROBES,
                              num_groups=3)
    owned.step(x, y, g, weights=torch.ones(12, dtype=F64))
    scale = float(owned.ledger.contributions.abs().max())
    torch.testing.assert_close(tracker.ledger.contributions, owned.ledger.contributions, rtol=0, atol=1e-12 * scale)
