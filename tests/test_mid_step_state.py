"""A trainer's state taken inside a step is refused. A callback saving ``trainer.state_dict()`` in its
``on_step_end`` (a checkpointing callback, as Lightning's) got the weights after the update with the step count,
loss history, EMA and learning-rate schedule from before it: resumed, the run trained one step more than the
uninterrupted one, without a word. Between steps the state is as before (the trainers' own checkpoints)."""

from __future__ import annotations

import pytest
import torch

from genkernel import TrainerCallback
from genkernel.diffusion import DDPMTrainer, make_scheduler
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.supervised import SupervisedTrainer, mse_loss
from test_ddpm_trainer import ring, small_mlp

F64 = torch.float64


class SavesInStep(TrainerCallback):
    """Takes the trainer's state in ``on_step_end`` (``where="end"``) or before performing (``"wrap"``)."""

    def __init__(self, where="end"):
        self.where = where

    def wrap_step(self, trainer, step, perform):
        if self.where == "wrap":
            trainer.state_dict()
        return perform()

    def on_step_end(self, trainer, step):
        if self.where == "end":
            trainer.state_dict()


def ddpm(*callbacks):
    return DDPMTrainer(small_mlp(), make_scheduler(20), ring(24), batch_size=8, lr=1e-2, progress=False,
                       callbacks=list(callbacks))


def gan(*callbacks):
    torch.manual_seed(0)
    return GANTrainer(MLPGenerator(2, 2, hidden=8, depth=1).double(), MLPDiscriminator(2, hidden=8, depth=1).double(),
                      ring(24), batch_size=8, callbacks=list(callbacks))


def supervised(*callbacks):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    return SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=4,
                             callbacks=list(callbacks))


def fit(run, steps):
    if isinstance(run, SupervisedTrainer):
        x = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        return run.fit(x, x.sum(1, keepdim=True), steps=steps)
    return run.train(steps)


@pytest.mark.parametrize("where", ["end", "wrap"])
@pytest.mark.parametrize("build", [ddpm, gan, supervised], ids=["ddpm", "gan", "supervised"])
def test_a_state_taken_inside_a_step_is_refused_naming_where_to_save(build, where):
    run = build(SavesInStep(where))
    with pytest.raises(RuntimeError, match=r"state_dict\(\) was called inside a .* step.*Save between steps"):
        fit(run, 1)


@pytest.mark.parametrize("build", [ddpm, gan, supervised], ids=["ddpm", "gan", "supervised"])
def test_between_steps_the_state_is_taken_as_before(build):
    """Coverage: after train() (also after a refused step's error) state_dict() works."""
    run = build(SavesInStep("end"))
    with pytest.raises(RuntimeError):
        fit(run, 1)
    assert isinstance(run.state_dict(), dict)
    run.callbacks.clear()
    fit(run, 1)
    assert isinstance(run.state_dict(), dict)
