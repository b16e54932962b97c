"""A step that fails before its update hands its draws back: the run continued after the error (the
same trainer, or a fresh one resumed from a checkpoint written right after it) is the uninterrupted run.

The failure is a callback that refuses the step before performing it, as an analyzer does when a
step cannot be booked, after drawing from the global RNG as a half-run forward with dropout does.
What must hold, bit for bit against a run without the failure: parameters, optimizer state, the
trainers' generators, the losses, the data order (Tensor data, a DataLoader with its own generator,
a DataLoader shuffled by the global RNG), dropout masks, and an attached analyzer's state. On the
code before this, the retried step drew the next batch, timesteps and noise: the failed batch was
skipped and every later step differed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genkernel.core.errors import NonFiniteError
from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANTrainer, MLPGenerator
from test_ddpm_trainer import ring
from test_resume import DropoutCritic, DropoutDenoiser, elsewhere, same, small_mlp

T = 100

pytestmark = pytest.mark.usefixtures("one_thread")


class RefusesOnce(TrainerCallback):
    """Refuses the ``count``-th step of ``phase`` before it is performed, after drawing from the global RNG
    (a forward that ran half-way with dropout); keeps the refused step."""

    def __init__(self, count, phase="train"):
        self.count, self.phase, self.seen, self.refused = count, phase, 0, None

    def wrap_step(self, trainer, step, perform):
        if step.phase == self.phase:
            self.seen += 1
            if self.seen == self.count:
                torch.rand(7)
                self.refused = step
                raise RuntimeError("refused: the step cannot be booked")
        return perform()


def ddpm(data, *callbacks, analyzer=True, model=DropoutDenoiser, **kwargs):
    found = [NoiseLevelAnalyzer(make_scheduler(T), ring(16, seed=4), num_bins=3, num_probes=8, kernel_points=4,
                                progress=False)] if analyzer else []
    settings = dict(batch_size=16) if isinstance(data, torch.Tensor) else {}
    return DDPMTrainer(model(), make_scheduler(T), data, lr=1e-2, progress=False,
                       callbacks=[*callbacks, *found], **settings, **kwargs)


def fail_then_continue(trainer, steps):
    """Train until the refusal, then on to ``steps`` updates in all."""
    with pytest.raises(RuntimeError, match="refused"):
        trainer.train(steps)
    trainer.train(steps - trainer.global_step)


@pytest.mark.parametrize("count", [2, 3])  # mid-epoch, and the first step of an epoch (a new permutation)
def test_a_ddpm_step_refused_before_its_update_is_drawn_again_and_the_run_is_the_uninterrupted_one(count):
    data = ring(40)
    straight = ddpm(data, RefusesOnce(count=10**6))
    torch.manual_seed(5)
    straight.train(5)
    refused = ddpm(data, RefusesOnce(count))
    torch.manual_seed(5)
    fail_then_continue(refused, 5)
    same(straight.state_dict()["callbacks"], refused.state_dict()["callbacks"], "analyzer")
    state, theirs = straight.state_dict(), refused.state_dict()
    for key in ("model", "optimizer", "generator", "global_step", "losses", "order", "cursor", "global_rng"):
        same(state[key], theirs[key], key)


def test_after_a_refused_step_next_batch_draws_the_refused_batch_so_one_call_skips_it():
    trainer = ddpm(ring(40), RefusesOnce(2), analyzer=False)
    with pytest.raises(RuntimeError, match="refused"):
        trainer.train(3)
    refused = trainer.callbacks[0].refused
    batch = trainer.next_batch()
    assert torch.equal(batch["noisy"], refused.inputs[0]) and torch.equal(batch["timesteps"], refused.inputs[1])
    assert torch.equal(batch["target"], refused.targets)
    assert not torch.equal(trainer.next_batch()["noisy"], refused.inputs[0])


def loader(data, order):
    """A DataLoader of 5 batches per epoch, shuffled by its own generator or by the global RNG."""
    generator = torch.Generator().manual_seed(9) if order == "own generator" else None
    return DataLoader(TensorDataset(data), batch_size=8, shuffle=True, generator=generator)


@pytest.mark.parametrize("order", ["own generator", "global RNG"])
@pytest.mark.parametrize("count", [3, 6])  # mid-epoch, and the first batch of the second epoch
def test_a_refused_step_on_a_dataloader_keeps_its_batch_and_a_checkpoint_written_then_resumes_to_the_same_run(
        tmp_path, order, count):
    data = ring(40)
    straight = ddpm(loader(data, order), analyzer=False)
    torch.manual_seed(5)
    straight.train(8)
    refused = ddpm(loader(data, order), RefusesOnce(count), analyzer=False)
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="refused"):
        refused.train(8)
    assert refused.global_step == count - 1
    refused.save_checkpoint(tmp_path / "after_the_refusal.pt")
    refused.train(8 - refused.global_step)
    resumed = ddpm(loader(data, order), analyzer=False)
    elsewhere()
    assert resumed.resume(tmp_path / "after_the_refusal.pt")
    resumed.train(8 - resumed.global_step)
    for run in (refused, resumed):
        same(straight.model.state_dict(), run.model.state_dict(), "model")
        same(straight.optimizer.state_dict(), run.optimizer.state_dict(), "optimizer")
        assert run.losses == straight.losses


def gan(*callbacks):
    torch.manual_seed(0)
    generator = MLPGenerator(2, 2, hidden=16, depth=2).double()
    return GANTrainer(generator, DropoutCritic().double(), ring(64), batch_size=16, d_steps=2, seed=3, loss="hinge",
                      callbacks=list(callbacks))


@pytest.mark.parametrize("phase,count", [("discriminator", 3), ("generator", 2)])
def test_a_gan_step_refused_before_its_update_is_drawn_again_also_after_a_resume(tmp_path, phase, count):
    straight = gan()
    torch.manual_seed(5)
    straight.train(4)
    refused = gan(RefusesOnce(count, phase))
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="refused"):
        refused.train(4)
    refused.save_checkpoint(tmp_path / "after_the_refusal.pt")
    refused.train(4)
    resumed = gan()
    elsewhere()
    resumed.load_checkpoint(tmp_path / "after_the_refusal.pt")
    resumed.train(4)
    for run in (refused, resumed):
        for mine, theirs in ((run.generator, straight.generator), (run.discriminator, straight.discriminator)):
            same(theirs.state_dict(), mine.state_dict())
        assert torch.equal(run.rng.get_state(), straight.rng.get_state())
        assert run.history == straight.history
        assert (run.iteration, run.g_steps, run.d_steps_done) == (straight.iteration, straight.g_steps, straight.d_steps_done)


class NonFiniteOnce(TrainerCallback):
    """Makes the ``count``-th step of ``phase`` non-finite (its targets NaN), noting the trainer's generator's
    state once the step has drawn everything."""

    def __init__(self, count, phase="train"):
        self.count, self.phase, self.seen, self.drawn = count, phase, 0, None

    def wrap_step(self, trainer, step, perform):
        if step.phase == self.phase:
            self.seen += 1
            if self.seen == self.count:
                self.drawn = (trainer.generator if isinstance(trainer, DDPMTrainer) else trainer.rng).get_state()
                if isinstance(step.inputs, torch.Tensor):
                    step.inputs = step.inputs * float("nan")
                else:  # (x or z first, then roles or classes)
                    step.inputs = (step.inputs[0] * float("nan"), *step.inputs[1:])
        return perform()


def test_a_ddpm_step_skipped_for_a_non_finite_loss_keeps_its_draws_used_up_as_a_grad_scaler_skips_it():
    # drawn again it would fail again: the run goes on with the next batch, as the run that skipped it does
    # (no dropout: the skipped step's forward drew its masks, the skipping run's did not)
    skipping = ddpm(ring(40), analyzer=False, model=small_mlp)
    skipping.train(2)
    skipping.next_batch()
    skipping.train(2)
    failing = ddpm(ring(40), NonFiniteOnce(3), analyzer=False, model=small_mlp)
    with pytest.raises(NonFiniteError, match="non-finite"):
        failing.train(4)
    assert torch.equal(failing.generator.get_state(), failing.callbacks[0].drawn)
    failing.train(4 - failing.global_step)
    same(skipping.model.state_dict(), failing.model.state_dict(), "model")
    assert skipping.losses == failing.losses


@pytest.mark.parametrize("phase", ["discriminator", "generator"])
def test_a_gan_step_skipped_for_a_non_finite_loss_keeps_its_draws_used_up(phase):
    trainer = gan(NonFiniteOnce(2, phase))
    with pytest.raises(NonFiniteError, match="skipped"):
        trainer.train(3)
    assert torch.equal(trainer.rng.get_state(), trainer.callbacks[0].drawn)
    trainer.train(3)
    assert trainer.g_steps == 3 and trainer.d_steps_done == 6


def test_a_batch_its_check_refuses_is_passed_over_alike_by_the_next_step_and_by_a_resume(tmp_path):
    # the third batch holds integer points: refused by the trainer's check after the iterator moved past it
    batches = [ring(8, seed=1), ring(8, seed=2), torch.zeros(8, 2, dtype=torch.long), ring(8, seed=4), ring(8, seed=5)]
    run = ddpm(batches, analyzer=False)
    run.train(2)
    with pytest.raises(TypeError, match="floating Tensor"):
        run.train(1)
    run.save_checkpoint(tmp_path / "after_the_refusal.pt")
    run.train(2)
    resumed = ddpm(batches, analyzer=False)
    assert resumed.resume(tmp_path / "after_the_refusal.pt")
    resumed.train(2)
    same(run.model.state_dict(), resumed.model.state_dict(), "model")
    assert run.losses == resumed.losses and run.global_step == 4


class FailingBatchNormDenoiser(torch.nn.Module):
    """A denoiser with BatchNorm in training mode whose ``fail_at``-th forward runs out of memory (after the
    forwards before it advanced the running statistics)."""

    def __init__(self, fail_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.bn, self.out = torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x, t):
        self.calls += 1
        if self.calls == self.fail_at:
            raise torch.OutOfMemoryError("refused: planted out-of-memory error in this forward")
        h = torch.cat([x, t.to(x.dtype)[:, None] / T], dim=1)
        return self.out(torch.tanh(self.bn(self.inp(h))))


def test_a_ddpm_step_failing_in_micro_batch_one_hands_back_the_batchnorm_statistics():
    """A step in 2 micro-batches that fails in the second (an interrupt, an analyzer's refusal after the first
    micro-batch's forward) left BatchNorm's running statistics advanced by the first: the continued run's
    running_mean was 0.063 off the uninterrupted run's, num_batches_tracked 2 higher (losses equal, eval-mode
    sampling not). The step now hands them back with its draws: bit for bit the uninterrupted run."""
    data = ring(40)
    runs = []
    for fail_at in (None, 4):  # step 2's second micro-batch (two forwards a step)
        trainer = DDPMTrainer(FailingBatchNormDenoiser(fail_at), make_scheduler(T), data, lr=1e-2, batch_size=8,
                              micro_batches=2, progress=False)
        torch.manual_seed(5)
        if fail_at is None:
            trainer.train(4)
        else:
            fail_then_continue(trainer, 4)
        runs.append(trainer.state_dict())
    for key in ("model", "optimizer", "generator", "global_step", "losses", "global_rng"):
        same(runs[0][key], runs[1][key], key)
