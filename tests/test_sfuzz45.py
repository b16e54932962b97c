"""Faults a fuzz of genkernel.supervised found (a few hundred tiny runs against brute force written apart), pinned:
targets that this module's losses refuse are refused on the whole dataset before any step, and the SVMs refuse
no examples and non-Tensor inputs with a ValueError / TypeError naming the fix."""

import numpy as np
import pytest
import torch
from torch import nn

from genkernel.core.tracking.tracker import PathKernelTracker
from genkernel.supervised import LedgerCallback, SupervisedTrainer, cross_entropy_loss, logistic_loss, mse_loss
from genkernel.supervised.svm import fit_rbf_svm, fit_tangent_svm


def small_model(outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()


def inputs(n=6):
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def late_example(batch_size, seed):
    """A dataset index of 6 that the trainer's batch order draws only after its first batch."""
    first = next(iter(SupervisedTrainer(small_model(1), torch.optim.SGD(small_model(1).parameters(), lr=0.1), mse_loss,
                                        batch_size=batch_size, seed=seed).batches(6, 1)))
    return sorted(set(range(6)) - set(first.tolist()))[0]


@pytest.mark.parametrize("case", ["class id 3 of 3", "class id -1", "logistic label 0"])
@pytest.mark.parametrize("tracked", [False, True])
def test_a_target_the_loss_refuses_is_refused_on_every_example_before_any_step(case, tracked):
    """A bad target was refused only at the first step whose batch drew it: the steps before trained on the data
    (measured before the fix: refused at step 2, after one Adam step had moved every parameter). Now fit checks
    every target against the module's loss before the first step: the ValueError names the loss, and the model,
    the optimizer, the step count and the batch order are those before the call."""
    x = inputs()
    logistic = case == "logistic label 0"
    loss, outputs = (logistic_loss, 1) if logistic else (cross_entropy_loss, 3)
    targets = torch.tensor([1.0, -1.0] * 3, dtype=torch.float64).reshape(6, 1) if logistic \
        else torch.tensor([0, 1, 2, 0, 1, 2])
    bad_at = late_example(3, seed=2)
    targets[bad_at] = 0 if logistic else (3 if case == "class id 3 of 3" else -1)
    model = small_model(outputs)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    callbacks = [LedgerCallback(PathKernelTracker(model, opt, loss, x[:2], num_groups=6), torch.arange(6))] \
        if tracked else []
    trainer = SupervisedTrainer(model, opt, loss, batch_size=3, seed=2, callbacks=callbacks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    position = trainer.generator.get_state()
    with pytest.raises(ValueError, match="must lie in|needs labels in") as refused:
        trainer.fit(x, targets, steps=4)
    assert loss.__name__ in str(refused.value)
    assert trainer.global_step == 0 and trainer.history == [] and not opt.state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(trainer.generator.get_state(), position)


@pytest.mark.parametrize("fit", [fit_tangent_svm, fit_rbf_svm])
def test_svms_refuse_a_training_set_without_examples_with_a_value_error(fit):
    """No examples gave an IndexError (the tangent SVM's message read the first of no labels) or a torch
    RuntimeError (the RBF SVM's reshape [0, -1]); now a ValueError says the SVM needs examples."""
    x, y = inputs()[:0], np.array([], dtype=int)
    args = (small_model(1), x, y) if fit is fit_tangent_svm else (x, y)
    with pytest.raises(ValueError, match="no examples"):
        fit(*args)


def test_rbf_svm_refuses_inputs_that_are_not_a_tensor_with_a_type_error_naming_the_fix():
    """A list (or NumPy array) of inputs failed with AttributeError: 'list' object has no attribute 'detach'."""
    for x in (inputs().tolist(), inputs().numpy()):
        with pytest.raises(TypeError, match="torch.as_tensor"):
            fit_rbf_svm(x, [0, 1] * 3)
