"""Learning-rate schedules in the built-in trainers (genkernel.core.tracking.lr_schedules).

What must hold: the trainer steps the schedule once after every update, as a loop that steps it after
``optimizer.step()`` does (bit for bit); the analyzer's ledger books each step at the rate it used
(per-example SGD by hand at the schedule's rates); a checkpoint resumes the schedule bit for bit and
another schedule is refused; schedules that cannot be stepped by count, or of another optimizer, are
refused with the fix.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_scheduler

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
from test_ddpm_trainer import ring
from test_flow_matching import brute_force_sgd
from test_resume import elsewhere, same
from test_timestep_sampling import ddpm_mlp

F64 = torch.float64
T = 50

pytestmark = pytest.mark.usefixtures("one_thread")


def cosine(warmup=2, total=8):
    """diffusers' cosine schedule with a linear warm-up, as its training scripts build it."""
    return lambda optimizer: get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total)


def trainer(*callbacks, optimizer="sgd", lr=5e-2, **kwargs):
    return DDPMTrainer(ddpm_mlp(), make_scheduler(T), ring(64), batch_size=16, optimizer=optimizer, lr=lr,
                       progress=False, callbacks=list(callbacks), **kwargs)


class RateRecorder(TrainerCallback):
    """The learning rate each step is taken at (read in the step, before the update)."""

    def __init__(self):
        self.rates = {}

    def wrap_step(self, trainer, step, perform):
        optimizer = step.optimizer
        self.rates.setdefault(step.phase, []).append(optimizer.param_groups[0]["lr"])
        return perform()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_schedule_is_stepped_after_every_update_as_a_hand_written_loop_steps_it(optimizer):
    recorder = RateRecorder()
    ours = trainer(recorder, optimizer=optimizer, lr_scheduler=cosine())
    ours.train(6)
    theirs = trainer(optimizer=optimizer)
    schedule = cosine()(theirs.optimizer)
    for _ in range(6):
        theirs.train_step()
        schedule.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.model.parameters(), theirs.model.parameters()))
    assert ours.losses == theirs.losses
    # the warm-up from 0: step k is taken at 5e-2 · λ(k)
    expected = [5e-2 * schedule.lr_lambdas[0](k) for k in range(6)]
    assert recorder.rates["train"] == pytest.approx(expected, rel=1e-15, abs=0)
    assert recorder.rates["train"][0] == 0.0 and max(recorder.rates["train"]) == 5e-2


def test_the_ledger_books_each_step_at_the_rate_the_schedule_gave_it():
    steps, num_bins = 4, 4
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), ring(12, seed=5), num_bins=num_bins, num_probes=6, controls=1,
                                  kernel_points=2)
    recorder = RateRecorder()
    tracked = trainer(recorder, analyzer, lr_scheduler=cosine(warmup=1, total=4))  # (outermost: sees every step)
    tracked.train(steps)
    bare = trainer(lr_scheduler=cosine(warmup=1, total=4))
    bare.train(steps)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    twin = trainer()
    batches = [twin.next_batch() for _ in range(steps)]
    batches = [(b["noisy"], b["timesteps"], b["target"], torch.full((16,), 1 / 16, dtype=F64)) for b in batches]
    rates = recorder.rates["train"]
    assert rates[0] == 0.0 and len(set(rates)) == steps  # (the first step contributes nothing)
    expected = brute_force_sgd(ddpm_mlp(), batches, analyzer.probes(torch.zeros((), dtype=F64))[:2], analyzer.bins,
                               num_bins, rates)
    assert torch.allclose(analyzer.contributions, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert analyzer.residual()["relative_residual"] < 1e-3


def test_a_scheduled_run_resumes_bit_for_bit_and_another_schedule_is_refused(tmp_path):
    straight = trainer(optimizer="adamw", lr_scheduler=cosine())
    straight.train(6)
    trainer(optimizer="adamw", lr_scheduler=cosine(), checkpoint_dir=tmp_path, checkpoint_every=3).train(3)
    resumed = trainer(optimizer="adamw", lr_scheduler=cosine())
    elsewhere()
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(3)
    same(straight.state_dict(), resumed.state_dict())
    for other in (dict(lr_scheduler=cosine(warmup=3)), dict(lr_scheduler=cosine(total=9)), {},
                  dict(lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2))):
        with pytest.raises(ValueError, match="lr_scheduler"):
            trainer(optimizer="adamw", **other).resume(tmp_path / "checkpoint.pt")


def test_schedules_that_cannot_be_stepped_by_the_trainer_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="ReduceLROnPlateau steps on a validation metric"):
        trainer(lr_scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o))
    other = torch.optim.SGD(ddpm_mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="schedules another optimizer"):
        trainer(lr_scheduler=torch.optim.lr_scheduler.StepLR(other, step_size=2))
    with pytest.raises(TypeError, match="function optimizer -> LRScheduler"):
        trainer(lr_scheduler="cosine")
    # a scheduler built over the optimizer passed is taken as it is
    model = ddpm_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    run = DDPMTrainer(model, make_scheduler(T), ring(64), batch_size=16, optimizer=optimizer, lr_scheduler=schedule,
                      progress=False)
    run.train(4)
    assert optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** 2 and schedule.last_epoch == 4


class HandSchedules(TrainerCallback):
    """Steps schedules of the trainer's two optimizers after each of their updates: the reference."""

    def __init__(self, make_g, make_d):
        self.make_g, self.make_d, self.schedules = make_g, make_d, None

    def on_step_end(self, trainer, step):
        if self.schedules is None:
            self.schedules = {"generator": self.make_g(trainer.g_optimizer),
                              "discriminator": self.make_d(trainer.d_optimizer)}
        self.schedules[step.phase].step()


def gan(*callbacks, **kwargs):
    torch.manual_seed(0)
    generator, discriminator = MLPGenerator(2, 2, hidden=16, depth=2).double(), MLPDiscriminator(2, hidden=16, depth=2).double()
    return GANTrainer(generator, discriminator, ring(64), batch_size=16, d_steps=2, seed=3, loss="hinge",
                      callbacks=list(callbacks), **kwargs)


def test_a_gans_two_schedules_each_follow_their_own_updates_and_resume_bit_for_bit(tmp_path):
    g_schedule, d_schedule = cosine(warmup=1, total=4), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5)
    recorder = RateRecorder()
    ours = gan(recorder, lr_scheduler_g=g_schedule, lr_scheduler_d=d_schedule)
    ours.train(4)
    # the reference: schedules built before the first step (their first rates) and stepped by hand
    theirs = gan()
    hand = HandSchedules(g_schedule, d_schedule)
    hand.schedules = {"generator": g_schedule(theirs.g_optimizer), "discriminator": d_schedule(theirs.d_optimizer)}
    theirs.callbacks.append(hand)
    theirs.train(4)
    for mine, other in ((ours.generator, theirs.generator), (ours.discriminator, theirs.discriminator)):
        same(other.state_dict(), mine.state_dict())
    assert recorder.rates["discriminator"] == [1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 2
    assert recorder.rates["generator"][0] == 0.0 and len(recorder.rates["generator"]) == 4
    # resume mid-run
    gan(lr_scheduler_g=g_schedule, lr_scheduler_d=d_schedule, checkpoint_dir=tmp_path, checkpoint_every=2).train(2)
    resumed = gan(lr_scheduler_g=g_schedule, lr_scheduler_d=d_schedule)
    elsewhere()
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    resumed.train(4)
    same(ours.generator.state_dict(), resumed.generator.state_dict())
    same(ours.d_optimizer.state_dict(), resumed.d_optimizer.state_dict())
    assert resumed.lr_scheduler_d.state_dict() == ours.lr_scheduler_d.state_dict()
    with pytest.raises(ValueError, match="lr_scheduler_d"):
        gan(lr_scheduler_g=g_schedule).load_checkpoint(tmp_path / "checkpoint.pt")
