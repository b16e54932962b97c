"""Second read of SupervisedTrainer, LedgerCallback and ``genkernel summarize`` on a supervised run, against
references written here: hand-written SGD-with-momentum and Adam ledgers of a model linear in its parameters
(where J(x) u_g is the exact contribution), uninterrupted runs, and the summary's formulas recomputed from the
ledger's tensors. Everything in float64."""

import copy
import io
import json

import pytest
import torch
from torch import nn

from genkernel.cli import main
from genkernel.core.tracking.tracker import PathKernelTracker
from genkernel.supervised import LedgerCallback, SupervisedTrainer, cross_entropy_loss, mse_loss


def regression_data(n=5, probes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64),
            torch.randn(probes, 2, generator=g, dtype=torch.float64))


def class_data(n=8, probes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g),
            torch.randn(probes, 2, generator=g, dtype=torch.float64))


def linear_model():
    torch.manual_seed(1)
    return nn.Linear(2, 1).double()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def hand_written_ledger(x, y, probes, batches, optimizer, lr, weight_decay, momentum=0.9, betas=(0.9, 0.99), eps=1e-8):
    """``(contributions [M, N], rest [M], θ_T [3])`` of f(x) = w·x + b trained on the mean squared error over
    ``batches`` (dataset indices) by SGD with momentum or Adam, both with coupled weight decay: each example n
    keeps its own momentum buffer / first moment of its share 2 r_n [x_n, 1] / B of the gradient (an example
    drawn twice in a batch adds twice), the decay λθ is the rest's, Adam's second moment is the shared one."""
    n = x.shape[0]
    features = lambda z: torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1)  # noqa: E731  J(x) of f
    theta = flat(linear_model()).clone()
    first = torch.zeros(n + 1, 3, dtype=torch.float64)  # rows 0..n-1: the examples; row n: the rest
    second = torch.zeros(3, dtype=torch.float64)
    contributions = torch.zeros(probes.shape[0], n, dtype=torch.float64)
    rest = torch.zeros(probes.shape[0], dtype=torch.float64)
    for k, idx in enumerate(batches, 1):
        rows = features(x[idx])
        shares = torch.zeros(n + 1, 3, dtype=torch.float64)
        shares.index_add_(0, idx, 2 * (rows @ theta - y[idx, 0])[:, None] * rows / len(idx))
        shares[n] = weight_decay * theta
        if optimizer == "sgd":
            first = shares.clone() if k == 1 else momentum * first + shares
            updates = -lr * first
        else:
            b1, b2 = betas
            first = b1 * first + (1 - b1) * shares
            second = b2 * second + (1 - b2) * shares.sum(0) ** 2
            updates = -lr * (first / (1 - b1 ** k)) / (torch.sqrt(second / (1 - b2 ** k)) + eps)
        contributions += features(probes) @ updates[:n].T
        rest += features(probes) @ updates[n]
        theta = theta + updates.sum(0)
    return contributions, rest, theta


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ledger_equals_a_hand_written_momentum_and_adam_ledger_with_an_example_drawn_twice(optimizer):
    """coverage: the per-example ledger of a linear model (exact: no quadrature) against the hand-written
    per-example momentum buffers / first moments, in one batch and in 3 micro-batches, over batches that
    span two epochs and hold one example twice. Measured: contributions within 1e-16, parameters 2e-16."""
    x, y, probes = regression_data()
    lr, decay, steps = (0.1, 0.01, 6) if optimizer == "sgd" else (0.05, 0.1, 6)
    batches = list(SupervisedTrainer(linear_model(), torch.optim.SGD(linear_model().parameters(), lr=lr), mse_loss,
                                     batch_size=4, seed=3).batches(5, steps))
    assert any(len(set(b.tolist())) < len(b) for b in batches)  # a batch across two epochs holds an example twice
    expected, expected_rest, expected_theta = hand_written_ledger(x, y, probes, batches, optimizer, lr, decay)
    for micro_batches in (1, 3):
        model = linear_model()
        opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=decay) if optimizer == "sgd" else
               torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=decay))
        tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=5)
        SupervisedTrainer(model, opt, mse_loss, batch_size=4, seed=3, micro_batches=micro_batches,
                          callbacks=[LedgerCallback(tracker, torch.arange(5))]).fit(x, y, steps=steps)
        ledger = tracker.ledger
        torch.testing.assert_close(ledger.contributions[..., 0], expected, rtol=0, atol=1e-14)
        torch.testing.assert_close(ledger.rest[:, 0], expected_rest, rtol=0, atol=1e-14)
        torch.testing.assert_close(flat(model), expected_theta, rtol=0, atol=1e-14)
        assert float(ledger.residual.abs().max()) < 1e-14  # linear in θ: the change is J Δθ exactly


def bn_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("tracked", [False, True])
def test_a_step_interrupted_in_its_second_micro_batch_gives_batchnorm_statistics_back(tracked):
    """A step interrupted in micro-batch 2 handed its batch and dropout draws back, but not the BatchNorm
    statistics that micro-batches 1 and 2 had already advanced (the tracker restores them, the untracked trainer
    did not): fit again ran the step's forwards twice, and the run was not the uninterrupted one. Measured
    before the fix, untracked: running_mean 0.057 and running_var 0.081 off, num_batches_tracked +2, with
    identical weights (a training-mode BatchNorm uses batch statistics), so only the eval-mode model differed.
    tracked=True is coverage (the tracker's roll-back restored them before the fix too)."""
    x, y, probes = class_data()
    calls = {"count": 0, "interrupt_at": None}

    def interrupting_loss(outputs, targets):
        calls["count"] += 1
        if calls["count"] == calls["interrupt_at"]:
            raise KeyboardInterrupt
        return cross_entropy_loss(outputs, targets)

    def trainer_of(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        callbacks = [LedgerCallback(PathKernelTracker(model, opt, cross_entropy_loss, probes, num_groups=3), y)] \
            if tracked else []
        return SupervisedTrainer(model, opt, interrupting_loss, batch_size=4, micro_batches=2, callbacks=callbacks)

    straight = bn_model()
    trainer_of(straight).fit(x, y, steps=5)
    model = bn_model()
    trainer = trainer_of(model)
    calls.update(count=0, interrupt_at=6)  # step 3's second micro-batch (two loss calls a step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(x, y, steps=5)
    assert trainer.global_step == 2
    calls["interrupt_at"] = None
    trainer.fit(x, y, steps=3)
    for name, value in straight.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_coverage_tracked_training_is_bit_identical_and_resumes_with_its_ledger():
    """coverage: Adam, dropout, two micro-batches, clipping, two partitions: the tracked run trains bit for bit
    as the untracked one; the trainer's and tracker's states saved after 4 steps and loaded into fresh objects
    (another global RNG) continue to the uninterrupted run's parameters, history and ledgers exactly; the class
    partition equals the example partition summed by class (3e-16)."""
    x, y, probes = class_data(n=9)

    def build(track):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()
        opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)
        tracker = PathKernelTracker(model, opt, cross_entropy_loss, probes, num_groups={"cls": 3, "ex": 9},
                                    max_grad_norm=0.5) if track else None
        trainer = SupervisedTrainer(model, opt, cross_entropy_loss, batch_size=4, micro_batches=2, max_grad_norm=0.5,
                                    seed=4)
        if track:
            trainer.callbacks = [LedgerCallback(tracker, {"cls": y, "ex": torch.arange(9)})]
        return model, trainer, tracker

    torch.manual_seed(5)
    plain, plain_trainer, _ = build(False)
    plain_trainer.fit(x, y, steps=6)
    torch.manual_seed(5)
    model, trainer, tracker = build(True)
    trainer.fit(x, y, steps=6)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    assert trainer.history == plain_trainer.history
    by_class = torch.stack([tracker.ledgers["ex"].contributions[:, y == c].sum(1) for c in range(3)], 1)
    torch.testing.assert_close(tracker.ledgers["cls"].contributions, by_class, rtol=0, atol=1e-15)

    torch.manual_seed(5)
    _, first, first_tracker = build(True)
    first.fit(x, y, steps=4)
    saved = io.BytesIO()
    torch.save({"trainer": first.state_dict(), "tracker": first_tracker.state_dict()}, saved)
    saved.seek(0)
    torch.manual_seed(123)
    resumed, second, second_tracker = build(True)
    state = torch.load(saved, weights_only=False)
    second.load_state_dict(state["trainer"])
    second_tracker.load_state_dict(state["tracker"])
    second.fit(x, y, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert second.history == trainer.history
    for name, ledger in tracker.ledgers.items():
        for part in ("contributions", "rest", "residual", "traffic"):
            assert torch.equal(getattr(second_tracker.ledgers[name], part), getattr(ledger, part)), (name, part)


def test_ledger_callback_checks_every_group_id_against_the_tracker_before_training():
    """An id outside [0, G) of an example first drawn at step 2 was refused only there, after step 1 had
    trained, in the tracker's words ("groups must give ids for exactly the partitions ['groups']" for a
    partition named wrongly); now fit refuses before any step and names group_of."""
    x, y, probes = class_data()
    trainer = SupervisedTrainer(linear_model(), torch.optim.SGD(linear_model().parameters(), lr=0.1), mse_loss,
                                batch_size=4, seed=0)
    late = [i for i in trainer.batches(8, 2)][1][0]  # an example of the second batch
    model = nn.Linear(2, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    bad = y.clone()
    bad[late] = 3
    for group_of in (bad, {"classes": y}):
        tracker = PathKernelTracker(model, opt, cross_entropy_loss, probes, num_groups=3)
        trainer = SupervisedTrainer(model, opt, cross_entropy_loss, batch_size=4, seed=0,
                                    callbacks=[LedgerCallback(tracker, group_of)])
        with pytest.raises(ValueError, match="group_of"):
            trainer.fit(x, y, steps=2)
        assert trainer.global_step == 0 and tracker.ledger.steps == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    built = []
    callback = LedgerCallback(lambda: built.append(1) or PathKernelTracker(model, opt, cross_entropy_loss, probes,
                                                                          num_groups=3), bad, start_step=1)
    trainer = SupervisedTrainer(model, opt, cross_entropy_loss, batch_size=4, seed=0, callbacks=[callback])
    with pytest.raises(ValueError, match="group_of"):  # a tracker built when tracking starts is checked when built
        trainer.fit(x, y, steps=2)
    assert trainer.global_step == 1 and callback.tracker is None


def test_trainer_refuses_what_it_cannot_call_at_construction_and_batches_shorter_than_batch_size():
    """A loss that is not a function and a callback without the hooks failed only inside fit (TypeError "'str'
    object is not callable", AttributeError "'function' object has no attribute 'on_train_start'");
    batches(n) with n < batch_size yielded batches of n examples, shorter than batch_size, without a word."""
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        SupervisedTrainer(model, opt, "mse", batch_size=2)
    with pytest.raises(TypeError, match="TrainerCallback"):
        SupervisedTrainer(model, opt, mse_loss, batch_size=2, callbacks=[lambda trainer, step: None])
    trainer = SupervisedTrainer(model, opt, mse_loss, batch_size=4)
    with pytest.raises(ValueError, match="at least batch_size=4"):
        next(trainer.batches(3, 1))
    assert [len(b) for b in trainer.batches(5, 3)] == [4, 4, 4]


def test_coverage_summarize_json_of_a_supervised_ledger_recomputes_from_its_tensors(tmp_path, capsys):
    """coverage: `genkernel summarize --json` of a tracker saved after supervised training: net shares
    ⟨C, Δf⟩/‖Δf‖², κ = Σ_g ‖C‖/‖Δf‖ and ‖R‖/‖Δf‖ recomputed from the ledger's tensors (equal to 1e-15), and
    each probe's top groups are the largest traffic shares, for both partitions."""
    x, y, probes = class_data(n=9)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = PathKernelTracker(model, opt, cross_entropy_loss, probes, num_groups={"cls": 3, "ex": 9})
    SupervisedTrainer(model, opt, cross_entropy_loss, batch_size=4,
                      callbacks=[LedgerCallback(tracker, {"cls": y, "ex": torch.arange(9)})]).fit(x, y, steps=6)
    path = tmp_path / "tracker.pt"
    tracker.save(path)
    assert main(["summarize", str(path), "--json", "--top", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)["states"]["(top level)"]
    change = model(probes).detach() - tracker.ledger.f_start
    for name, ledger in tracker.ledgers.items():
        numbers = summary["ledgers"][name]
        torch.testing.assert_close(ledger.delta, change, rtol=0, atol=1e-15)
        shares = torch.einsum("mgd,md->mg", ledger.contributions, change) / (change ** 2).sum(1, keepdim=True)
        kappa = ledger.contributions.norm(dim=2).sum(1) / change.norm(dim=1)
        torch.testing.assert_close(torch.tensor(numbers["net_shares"], dtype=torch.float64), shares, rtol=0, atol=1e-15)
        torch.testing.assert_close(torch.tensor(numbers["kappa"], dtype=torch.float64), kappa, rtol=1e-15, atol=0)
        assert numbers["relative_residual"] == pytest.approx(float(ledger.residual.norm() / change.norm()), rel=1e-12)
        traffic = ledger.traffic / ledger.traffic.sum(1, keepdim=True)
        for row in numbers["top_groups"]:
            assert [g["group"] for g in row["top_groups"]] == torch.argsort(traffic[row["probe"]], descending=True)[:2].tolist()
