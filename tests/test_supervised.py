"""The supervised trainer, its callbacks, checkpoint kernels, tangent SVMs and losses against
brute-force references (plain autograd loops on deep copies, sklearn on explicit features)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from genkernel.core.tracking.tracker import PathKernelTracker
from genkernel.supervised import (
    LedgerCallback, SupervisedTrainer, cross_entropy_loss, logistic_loss, mlp, mse_loss,
)
from genkernel.supervised.checkpoint_kernels import CheckpointKernels
from genkernel.supervised.svm import TANGENT_CS, fit_rbf_svm, fit_tangent_svm


def data(n=8, m=3, d_in=2, d_out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return x, y, torch.randn(m, d_in, generator=g, dtype=torch.float64)


def model_of(d_out=1, seed=1):
    torch.manual_seed(seed)
    return mlp(2, [5], d_out).double()


def jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, d, P]`` per-example Jacobians, one autograd call per example and output."""
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        rows.append(torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[o], list(model.parameters()), retain_graph=True)])
            for o in range(out.shape[0])
        ]))
    return torch.stack(rows).double()


def plain_run(model, x, y, steps, lr=0.1, batch=3, seed=1):
    """A plain loop over the trainer's own batches; deep copies of the model at every step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    copies = [copy.deepcopy(model)]
    for idx in SupervisedTrainer(model, opt, mse_loss, batch_size=batch, seed=seed).batches(x.shape[0], steps):
        opt.zero_grad()
        ((model(x[idx]) - y[idx]) ** 2).mean().backward()
        opt.step()
        copies.append(copy.deepcopy(model))
    return copies


# -- checkpoint kernels ------------------------------------------------------------------------


@pytest.mark.parametrize("at", [None, [0, 1, 3, 6]])
def test_checkpoint_kernels_match_brute_force_grams_on_deep_copies(at):
    x, y, xt = data()
    model, reference = model_of(), model_of()
    rec = CheckpointKernels(x, xt, every=2, steps=7, at=at)
    SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=3, seed=1,
                      callbacks=[rec]).fit(x, y, steps=7)
    copies = plain_run(reference, x, y, 7)
    expected = [0, 2, 4, 6] if at is None else at
    assert rec.checkpoints == expected
    ends = expected[1:] + [7]
    assert rec.weights == pytest.approx([0.1 * (b - a) for a, b in zip(expected, ends)])
    for k, step in enumerate(expected):
        j, jt = jacobians(copies[step], x), jacobians(copies[step], xt)
        torch.testing.assert_close(rec.grams[k], torch.einsum("ndp,mdp->nm", j, j))
        torch.testing.assert_close(rec.crosses[k], torch.einsum("mdp,ndp->mn", jt, j))
        torch.testing.assert_close(rec.probe_self[k], torch.einsum("mdp,mdp->m", jt, jt))
        torch.testing.assert_close(rec.probe_outputs[k], copies[step](xt).detach())
    # The callbacks leave training bit for bit as the plain loop.
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_checkpoint_kernels_leave_a_spectral_norm_model_training_unchanged():
    """The recorded outputs come from an eval-mode forward: a training-mode one would advance the
    power iteration and change training."""
    x, y, xt = (t.float() for t in data())

    def run(callbacks):
        torch.manual_seed(1)
        model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(2, 6)), nn.Tanh(), nn.Linear(6, 1))
        SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=4,
                          callbacks=callbacks).fit(x, y, steps=4)
        return model.state_dict()

    plain, recorded = run([]), run([CheckpointKernels(x, xt, every=1, steps=4)])
    assert all(torch.equal(plain[k], recorded[k]) for k in plain)


@pytest.mark.parametrize("trained", [3, 7])
def test_checkpoint_kernels_refuse_a_run_of_another_length(trained):
    x, y, xt = data()
    model = model_of()
    rec = CheckpointKernels(x, xt, every=2, steps=5)
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=4,
                                callbacks=[rec])
    with pytest.raises(ValueError, match="steps=5"):
        trainer.fit(x, y, steps=trained)


def test_checkpoint_kernels_refuse_train_and_probe_inputs_that_differ():
    x, _, xt = data()
    with pytest.raises(ValueError, match="shape per example"):
        CheckpointKernels(x, torch.randn(3, 4, dtype=torch.float64), steps=3)
    with pytest.raises(ValueError, match="dtype"):
        CheckpointKernels(x, xt.float(), steps=3)


def test_kernel_machine_change_reproduces_small_steps_and_refuses_several_outputs():
    x, y, xt = data(d_out=2)
    for d in (1, 2):
        model = model_of(d)
        rec = CheckpointKernels(x, xt, every=1, steps=10)
        SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), mse_loss, batch_size=8,
                          callbacks=[rec]).fit(x, y[:, :d], steps=10)
        weight = lambda f: 2 * (f - y[:, :d]) / d  # noqa: E731 (mse_loss averages over the d outputs)
        if d == 1:
            real = model(xt).detach() - rec.probe_outputs[0]
            assert float((rec.kernel_machine_change(weight) - real).norm() / real.norm()) < 1e-2  # left Riemann sum
        else:  # the trace kernel would give a Domingos sum 80% off
            with pytest.raises(ValueError, match="one output"):
                rec.kernel_machine_change(weight)


def test_kernel_machine_change_refuses_weights_that_broadcast():
    x, y, xt = data()
    model = model_of()
    rec = CheckpointKernels(x, xt, every=1, steps=2)
    SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), mse_loss, batch_size=8,
                      callbacks=[rec]).fit(x, y, steps=2)
    with pytest.raises(ValueError, match=r"reshape\(-1, 1\)"):
        rec.kernel_machine_change(lambda f: 2 * (f - y.reshape(-1)))  # [N, 1] - [N] -> [N, N]


# -- trainer and ledger callback ---------------------------------------------------------------


def test_trainer_refuses_targets_of_another_length_and_negative_steps():
    x, y, _ = data()
    model = model_of()
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=4)
    for targets in (y[:6], torch.cat([y, y])):
        with pytest.raises(ValueError, match="one target per input"):
            trainer.fit(x, targets, steps=2)
    with pytest.raises(ValueError, match="non-negative"):
        trainer.fit(x, y, steps=-1)


def test_ledger_callback_adds_up_and_leaves_training_bit_identical():
    x, y, xt = data()
    model, reference = model_of(), model_of()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = PathKernelTracker(model, opt, mse_loss, xt, num_groups=8)
    f0 = model(xt).detach()
    SupervisedTrainer(model, opt, mse_loss, batch_size=4, seed=3,
                      callbacks=[LedgerCallback(tracker, torch.arange(8))]).fit(x, y, steps=5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    SupervisedTrainer(reference, ref_opt, mse_loss, batch_size=4, seed=3).fit(x, y, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    ledger = tracker.ledger
    change = model(xt).detach() - f0
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, change)
    assert float(ledger.residual.abs().max()) < 0.01 * float(change.abs().max())


def test_ledger_callback_with_a_warm_up_builds_its_tracker_when_tracking_starts():
    x, y, xt = data()
    model = model_of()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prebuilt = PathKernelTracker(model, opt, mse_loss, xt, num_groups=8)
    trainer = SupervisedTrainer(model, opt, mse_loss, batch_size=4, seed=3,
                                callbacks=[LedgerCallback(prebuilt, torch.arange(8), start_step=2)])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="built before the warm-up"):  # its ledger would book the warm-up as residual
        trainer.fit(x, y, steps=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any step

    seen = {}

    def make_tracker():
        seen["f"] = model(xt).detach().clone()
        return PathKernelTracker(model, opt, mse_loss, xt, num_groups=8)

    callback = LedgerCallback(make_tracker, torch.arange(8), start_step=2)
    SupervisedTrainer(model, opt, mse_loss, batch_size=4, seed=3, callbacks=[callback]).fit(x, y, steps=4)
    ledger = callback.tracker.ledger
    assert ledger.steps == 2
    torch.testing.assert_close(ledger.f_start, seen["f"])
    change = model(xt).detach() - seen["f"]
    assert float(ledger.residual.abs().max()) < 0.01 * float(change.abs().max())


def test_ledger_callback_refuses_group_ids_it_would_truncate_or_misindex():
    x, y, xt = data()
    model = model_of()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = PathKernelTracker(model, opt, mse_loss, xt, num_groups=2)
    with pytest.raises(ValueError, match="integer"):
        LedgerCallback(tracker, torch.tensor([0.0, 0.7, 1.2, 1.0, 0.0, 1.0, 0.0, 1.0]))
    for wrong in (torch.zeros(6, dtype=torch.long), torch.zeros(10, dtype=torch.long)):
        trainer = SupervisedTrainer(model, opt, mse_loss, batch_size=4, callbacks=[LedgerCallback(tracker, wrong)])
        with pytest.raises(ValueError, match="one group id per training example"):
            trainer.fit(x, y, steps=1)


# -- tangent and RBF SVMs ----------------------------------------------------------------------


def svm_data():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(30, 2, generator=g), torch.randn(10, 2, generator=g)
    return x, xt, torch.where(x[:, 0] ** 2 + 0.5 * x[:, 1] > 0.5, 1, -1)


def scaled(features_train, features_test):
    mean = features_train.mean(0)
    scale = np.linalg.norm(features_train - mean, axis=1).mean()
    return (features_train - mean) / scale, (features_test - mean) / scale


@pytest.mark.parametrize("encode", ["pm1", "01", "strings"])
def test_tangent_svm_is_a_linear_svm_on_brute_force_features(encode):
    from sklearn.svm import SVC

    x, xt, y = svm_data()
    torch.manual_seed(0)
    model = mlp(2, [8], 3)
    labels = {"pm1": y, "01": (y > 0).long(), "strings": np.where(y.numpy() > 0, "pos", "neg")}[encode]
    f, ft = scaled(jacobians(model, x)[:, 2].numpy(), jacobians(model, xt)[:, 2].numpy())
    reference = SVC(kernel="linear", C=3.0).fit(f, labels)
    svm = fit_tangent_svm(model, x, labels, C=3.0, output_index=-1)
    np.testing.assert_allclose(svm.decision_function(xt), reference.decision_function(ft), atol=1e-9)
    assert (svm.predict(xt) == reference.predict(ft)).all()


def test_tuned_tangent_svm_matches_a_manual_stratified_search():
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    x, _, y = svm_data()
    torch.manual_seed(0)
    svm = fit_tangent_svm(mlp(2, [8], 1), x, y, tune=True, folds=4, seed=3)
    k, labels = svm.train_features @ svm.train_features.T, y.numpy()
    scores = {}
    for c in TANGENT_CS:
        folds = StratifiedKFold(4, shuffle=True, random_state=3).split(k, labels)
        scores[c] = np.mean([(SVC(kernel="precomputed", C=c).fit(k[np.ix_(a, a)], labels[a]).predict(k[np.ix_(b, a)])
                              == labels[b]).mean() for a, b in folds])
    best = max(scores, key=scores.get)  # the first of equal scores, as GridSearchCV
    assert svm.tuning["best"]["C"] == best and svm.tuning["cv_accuracy"] == pytest.approx(scores[best])


def test_tangent_svm_refuses_several_outputs_without_output_index_and_a_changed_model():
    x, xt, y = svm_data()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="output_index"):
        fit_tangent_svm(mlp(2, [8], 3), x, y)  # would silently use output 0
    model = mlp(2, [8], 1)
    svm = fit_tangent_svm(model, x, y)
    svm.predict(xt)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="changed since the tangent SVM was fitted"):
        svm.predict(xt)


def test_svms_refuse_one_class_and_labels_of_another_length():
    x, _, y = svm_data()
    torch.manual_seed(0)
    model = mlp(2, [8], 1)
    for tune in (False, True):
        with pytest.raises(ValueError, match="at least two classes"):
            fit_tangent_svm(model, x, torch.ones(30), tune=tune)
        with pytest.raises(ValueError, match="at least two classes"):
            fit_rbf_svm(x, torch.ones(30), tune=tune)
    with pytest.raises(ValueError, match="one label per example"):
        fit_tangent_svm(model, x, y[:20])


# -- losses ------------------------------------------------------------------------------------


def test_mse_loss_pairs_targets_by_example_and_refuses_another_layout():
    out, y = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(mse_loss(out, y), ((out - y) ** 2).mean(1))
    torch.testing.assert_close(mse_loss(out[:, :1], y[:, 0]), (out[:, 0] - y[:, 0]) ** 2)  # [B, 1] against [B]
    with pytest.raises(ValueError, match="batch"):
        mse_loss(out, y.T.contiguous())  # a reshape would pair them with the wrong outputs


def test_logistic_loss_refuses_01_labels_and_runs_under_per_example_transforms():
    f = torch.randn(4, 1)
    y = torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(logistic_loss(f, y), torch.log1p(torch.exp(-y * f[:, 0])))
    with pytest.raises(ValueError, match=r"\{-1, \+1\}"):
        logistic_loss(f, (y > 0).float())  # y = 0: a constant log 2, no gradient
    with pytest.raises(ValueError, match="one output"):
        logistic_loss(torch.randn(4, 2), y)
    w = torch.randn(1, 3)
    per_example = torch.func.vmap(torch.func.grad(lambda w, x, t: logistic_loss(x[None] @ w.T, t[None]).sum()),
                                  in_dims=(None, 0, 0))(w, torch.randn(4, 3), y)
    assert per_example.shape == (4, 1, 3)


def test_cross_entropy_loss_takes_a_column_of_class_ids_and_refuses_float_ids():
    out, ids = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(cross_entropy_loss(out, ids[:, None]), cross_entropy_loss(out, ids))
    with pytest.raises(ValueError, match="integer class ids"):
        cross_entropy_loss(out, ids.float())


def test_tangent_svm_accuracy_refuses_labels_that_would_broadcast():
    x, xt, y = svm_data()
    torch.manual_seed(0)
    svm = fit_tangent_svm(mlp(2, [8], 1), x, y)
    assert svm.accuracy(x, y) == pytest.approx(float((svm.predict(x) == y.numpy()).mean()))
    with pytest.raises(ValueError, match="one label per input"):
        svm.accuracy(xt, torch.tensor([1]))  # one label against all ten predictions
