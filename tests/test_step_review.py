"""OptimizerStep, perform_step, SupervisedTrainer, the supervised losses and mlp against brute-force
references: plain PyTorch loops with the same seeds, torch.nn.utils.clip_grad_norm_ on deep copies,
explicit formulas."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.core.errors import NonFiniteError
from genkernel.core.tracking.callbacks import TrainerCallback, perform_step
from genkernel.core.tracking.step import OptimizerStep
from genkernel.core.tracking.tracker import PathKernelTracker
from genkernel.supervised import LedgerCallback, SupervisedTrainer, cross_entropy_loss, mlp, mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def dropout_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()


def class_data(n=11, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -- OptimizerStep ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_factor_is_the_factor_clip_grad_norm_applied(dtype):
    """grad = raw grad * clip_factor exactly, the factor as clip_grad_norm_ computes it (in the
    norm's dtype); a float64 quotient was 1 ulp off in float32 for most seeds, 0.35 % in bfloat16."""
    for seed in range(8):
        torch.manual_seed(seed)
        model = mlp(3, [8], 2).to(dtype)
        x, y = torch.randn(6, 3, dtype=dtype), torch.randn(6, 2, dtype=dtype)
        reference = copy.deepcopy(model)
        ((reference(x) - y) ** 2).mean(1).mean().backward()
        raw = [p.grad.clone() for p in reference.parameters()]
        total = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.05)
        step = OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, x, y, max_grad_norm=0.05)
        step.compute_gradients()
        assert step.clip_factor == float(torch.clamp(0.05 / (total + 1e-6), max=1.0)) < 1.0
        factor = torch.tensor(step.clip_factor, dtype=dtype)
        for p, q, r in zip(model.parameters(), reference.parameters(), raw):
            assert torch.equal(p.grad, q.grad)
            assert torch.equal(p.grad, r * factor), seed


class Spread(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(100, dtype=torch.float16))

    def forward(self, x):
        return (x * self.w).sum(1, keepdim=True)


def test_a_gradient_norm_that_overflows_is_refused_before_the_update():
    """Finite float16 gradients (1e4 each) whose norm (1e5) overflows float16: clip_grad_norm_ scales
    them by max_norm / inf = 0 and Adam took a step on zero gradients (its state moved, silently)."""
    model = Spread()
    x = torch.tensor([1e4, -1e4], dtype=torch.float16).repeat(2, 50)  # the loss is 0, each gradient ±1e4
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    step = OptimizerStep(model, opt, lambda out, _: out[:, 0], x, max_grad_norm=1.0)
    with pytest.raises(NonFiniteError, match="overflows"):
        step.run()
    assert not step.applied and opt.state_dict()["state"] == {}
    assert torch.equal(model.w.detach(), torch.ones(100, dtype=torch.float16))


def test_weighted_and_mean_steps_match_plain_autograd():
    """Coverage: weights=None is losses.mean() bit for bit; weights c_n give ∇ Σ c_n ℓ_n (float64)."""
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    c = torch.tensor([0.5, -0.25, 0.0, 2.0, 1.0], dtype=torch.float64)
    for weights in (None, c):
        torch.manual_seed(1)
        model = mlp(3, [4], 2).double()
        reference = copy.deepcopy(model)
        step = OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, x, y, weights)
        losses = step.compute_gradients()
        per_example = ((reference(x) - y) ** 2).mean(1)
        (per_example.mean() if weights is None else (per_example * c).sum()).backward()
        assert torch.equal(losses, per_example.detach()) and losses.shape == (5,)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad) if weights is None else torch.allclose(p.grad, q.grad, rtol=1e-14)


@pytest.mark.parametrize("bad", [True, "1.0", float("nan"), 0.0, None])
def test_a_max_grad_norm_that_is_not_a_positive_number_is_refused(bad):
    model = mlp(2, [3], 1)
    with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
        OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, torch.randn(2, 2),
                      torch.randn(2), max_grad_norm=bad)
    with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
        SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, max_grad_norm=bad)


# -- perform_step -----------------------------------------------------------------------------


class Recorder(TrainerCallback):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wrap_step(self, trainer, step, perform):
        self.log.append(f"enter {self.name}")
        losses = perform()
        self.log.append(f"exit {self.name} applied={step.applied}")
        return losses

    def on_step_end(self, trainer, step):
        self.log.append(f"end {self.name}")


def test_callbacks_nest_first_outermost_and_end_in_order():
    """Coverage: the first callback's wrap_step is outermost; on_step_end runs after all, in order."""
    log = []
    model = mlp(2, [3], 1)
    step = OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, torch.randn(4, 2), torch.randn(4))
    perform_step([Recorder("a", log), Recorder("b", log), Recorder("c", log)], None, step)
    assert log == ["enter a", "enter b", "enter c", "exit c applied=True", "exit b applied=True", "exit a applied=True",
                   "end a", "end b", "end c"]


class Twice(TrainerCallback):
    def wrap_step(self, trainer, step, perform):
        perform()
        return perform()


class Stub:
    global_step = 0
    callbacks = ()


def test_a_callback_performing_twice_is_refused_before_a_second_forward():
    """The second perform() ran the forward and backward again (dropout drew new masks, BatchNorm's
    running statistics moved twice, the gradients were replaced) before apply_update refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 1)).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.manual_seed(7)
    step = OptimizerStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, x, y)
    with pytest.raises(RuntimeError, match="performed twice|already applied"):
        perform_step([Twice()], Stub(), step)
    rng_after = torch.get_rng_state()
    torch.manual_seed(7)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt.zero_grad()
    ((reference(x)[:, 0] - y) ** 2).mean().backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    opt.step()
    assert step.applied and params_equal(model, reference)
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), reference.buffers()))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_a_callback_performing_twice_around_a_ledger_leaves_the_step_applied():
    """The second perform() reached the tracker again: it took the applied step over, was refused,
    rolled back and marked the step not applied while the parameters held its update (a trainer
    would then hand the batch back and train on it twice)."""
    torch.manual_seed(0)
    model = mlp(2, [4], 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    tracker = PathKernelTracker(model, opt, mse_loss, x[:2], num_groups=4)
    step = OptimizerStep(model, opt, mse_loss, x, y, info={"indices": torch.arange(4)})
    trainer = Stub()
    trainer.callbacks = [Twice(), LedgerCallback(tracker, torch.arange(4))]
    with pytest.raises(RuntimeError):
        perform_step(trainer.callbacks, trainer, step)
    assert step.applied and tracker.ledger.steps == 1


# -- SupervisedTrainer ------------------------------------------------------------------------


def plain_loop(model, x, y, steps, *, batch, seed, lr, max_norm):
    """The documented stream: permutations of the dataset from Generator().manual_seed(seed), cut
    into batches that may span two epochs; Adam; clip_grad_norm_ on the model's parameters."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order, history, seen = torch.empty(0, dtype=torch.long), [], []
    for _ in range(steps):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(x.shape[0], generator=g)])
        idx, order = order[:batch], order[batch:]
        seen.append(idx)
        opt.zero_grad()
        losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        history.append(float(losses.detach().mean()))
    return history, seen


class Indices(TrainerCallback):
    def __init__(self):
        self.seen, self.steps = [], []

    def on_step_end(self, trainer, step):
        self.seen.append(step.info["indices"])
        self.steps.append(trainer.global_step)


def test_trainer_is_a_plain_float64_loop_over_epochs_with_partial_batches_and_clipping():
    """Coverage: 11 examples in batches of 4 over 9 steps (batches spanning epochs), clipping, dropout."""
    x, y = class_data()
    torch.manual_seed(3)
    model, reference = dropout_model(), dropout_model()
    spy = Indices()
    torch.manual_seed(3)
    history = SupervisedTrainer(model, torch.optim.Adam(model.parameters(), lr=0.05), cross_entropy_loss, batch_size=4,
                                max_grad_norm=0.3, seed=2, callbacks=[spy]).fit(x, y, steps=9)
    torch.manual_seed(3)
    ref_history, seen = plain_loop(reference, x, y, 9, batch=4, seed=2, lr=0.05, max_norm=0.3)
    assert params_equal(model, reference) and history == ref_history
    assert all(torch.equal(a, b) for a, b in zip(spy.seen, seen)) and spy.steps == list(range(9))
    assert torch.equal(torch.sort(torch.cat(seen[:2] + [seen[2][:3]])).values, torch.arange(11))


class FailOnce(TrainerCallback):
    """Raises once at global step ``at``: in wrap_step before performing, or in on_step_end."""

    def __init__(self, at, where):
        self.at, self.where, self.done = at, where, False

    def wrap_step(self, trainer, step, perform):
        if self.where == "before" and trainer.global_step == self.at and not self.done:
            self.done = True
            raise ValueError("refused")
        return perform()

    def on_step_end(self, trainer, step):
        if self.where == "after" and trainer.global_step == self.at and not self.done:
            self.done = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_step_that_fails_before_or_after_its_update_continues_to_the_straight_run(where):
    """Before its update: the batch and the dropout draws were used up, so fit again (here after a
    checkpoint and resume) trained on other batches. After it: the update was in the weights but not
    counted (global_step, history)."""
    x, y = class_data()

    def build(callbacks=()):
        model = dropout_model()
        return model, SupervisedTrainer(model, torch.optim.Adam(model.parameters(), lr=0.05), cross_entropy_loss,
                                        batch_size=4, seed=2, callbacks=list(callbacks))

    torch.manual_seed(11)
    straight, trainer = build()
    history = list(trainer.fit(x, y, steps=7))
    torch.manual_seed(11)
    model, trainer = build([FailOnce(3, where)])
    with pytest.raises((ValueError, KeyboardInterrupt)):
        trainer.fit(x, y, steps=7)
    assert trainer.global_step == (3 if where == "before" else 4) == len(trainer.history)
    saved = io.BytesIO()
    torch.save(trainer.state_dict(), saved)
    saved.seek(0)
    torch.manual_seed(12345)  # a resume in another process: another global RNG state
    model, trainer = build()
    trainer.load_state_dict(torch.load(saved, weights_only=False))
    trainer.fit(x, y, steps=7 - trainer.global_step)
    assert params_equal(model, straight) and trainer.history == history and trainer.global_step == 7


def test_a_non_finite_step_keeps_its_batch_used_up_and_is_not_counted():
    """Coverage: as the other trainers (and a GradScaler) skip such a step."""
    x, y = class_data()
    bad = x.clone()
    model = dropout_model()
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy_loss, batch_size=4)
    order = list(trainer.batches(11, 2))
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy_loss, batch_size=4)
    bad[order[0][0]] = math.nan
    before = copy.deepcopy(model)
    with pytest.raises(NonFiniteError):
        trainer.fit(bad, y, steps=1)
    assert params_equal(model, before) and trainer.global_step == 0 and trainer.history == []
    spy = Indices()
    trainer.callbacks = [spy]
    trainer.fit(x, y, steps=1)
    assert torch.equal(spy.seen[0], order[1])


def test_trainer_refuses_a_seed_that_is_not_an_int():
    model = mlp(2, [3], 1)
    with pytest.raises(ValueError, match="seed must be an int"):
        SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, seed=1.5)


# -- losses and models ------------------------------------------------------------------------


def test_cross_entropy_ids_and_one_hot_match_the_explicit_formula():
    """Coverage: −log softmax(f)_y per example, for int64 / int32 / column ids and float / int one-hot."""
    logits = torch.randn(5, 4, dtype=torch.float64)
    ids = torch.tensor([0, 3, 1, 1, 2])
    expected = -(logits - logits.exp().sum(1, keepdim=True).log()).gather(1, ids[:, None])[:, 0]
    for targets in (ids, ids.int(), ids[:, None], F.one_hot(ids, 4).double(), F.one_hot(ids, 4)):
        torch.testing.assert_close(cross_entropy_loss(logits, targets), expected, rtol=1e-14, atol=1e-14)
    smooth = F.one_hot(ids, 4).double() * 0.9 + 0.025
    torch.testing.assert_close(cross_entropy_loss(logits, smooth),
                               -(smooth * torch.log_softmax(logits, 1)).sum(1), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("targets, match", [
    (torch.tensor([[1, 1, 0], [0, 1, 0]]), "probabilities"),      # multi-hot: sum of two classes' losses
    (torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.0]]), "probabilities"),
    (torch.tensor([0, 3]), r"\[0, 3\)"),                            # IndexError (a device assert on CUDA)
    (torch.tensor([[0.0], [2.0]]), "reshape"),                      # float ids as a column
    (torch.tensor([0, 1, 2]), "fit neither"),
])
def test_cross_entropy_refuses_targets_that_are_not_classes_or_distributions(targets, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy_loss(torch.randn(2, 3), targets)


def test_cross_entropy_refuses_outputs_that_are_not_batch_by_class():
    with pytest.raises(ValueError, match=r"outputs \[B, C\]"):
        cross_entropy_loss(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_mlp_builds_the_widths_it_is_given_and_refuses_others():
    """A generator of widths was used up by the check and built no hidden layer; an int hidden
    width failed with "'int' object is not iterable"; a bool width built Linear(True, ...)."""
    torch.manual_seed(4)
    built = mlp(2, (h for h in [5, 7]), 1, act="silu")
    torch.manual_seed(4)
    reference = nn.Sequential(nn.Linear(2, 5), nn.SiLU(), nn.Linear(5, 7), nn.SiLU(), nn.Linear(7, 1))
    assert [type(m) for m in built] == [type(m) for m in reference] and params_equal(built, reference)
    with pytest.raises(TypeError, match=r"sequence of layer widths \(e.g. \[16\]"):
        mlp(2, 16, 1)
    for args in ((True, [5], 1), (2, [5.0], 1), (2, [5], 1.5)):
        with pytest.raises(TypeError, match="layer widths must be ints"):
            mlp(*args)


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": -4}, {"width": 0}, {"num_classes": 2.0}])
def test_small_convnet_refuses_sizes_it_cannot_build(kwargs):
    """size=0 built a net whose head takes 0 features (Linear(0, 10)); width=0 a 0-channel GroupNorm."""
    from genkernel.supervised.models import SmallConvNet

    with pytest.raises(ValueError, match="positive ints"):
        SmallConvNet(**kwargs)
