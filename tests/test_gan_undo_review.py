"""Review of GANTrainer's undo of a failed step's draws (StepDraws, _undo).

What must hold: a step that fails before its update (in G's fake pass of a discriminator step, in the draws of a
generator step, after a checkpoint was written) leaves the trainer as it was before the step: its generator, the
global RNG, G's buffers (BatchNorm's running statistics, spectral norm's power iteration), so that train() again,
or a resume from the checkpoint, is the uninterrupted run bit for bit.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genkernel.gan import GANTrainer, MLPDiscriminator
from test_ddpm_trainer import ring
from test_resume import same

F64 = torch.float64
C = 3

pytestmark = pytest.mark.usefixtures("one_thread")


class Lost(RuntimeError):
    pass


class BombG(nn.Module):
    """G(z[, y]): Linear, BatchNorm, ReLU, Dropout[, a spectral-norm Linear], then a point that raises in the first
    no-grad pass (a discriminator step's fake pass) after ``armed`` is set: BatchNorm's statistics, dropout's global
    RNG draws and the power iteration are already made when it raises."""

    latent_dim = 4

    def __init__(self, conditional=False, spectral=False, running=False):
        super().__init__()
        self.conditional = conditional
        self.inp = nn.Linear(4 + (C if conditional else 0), 12)
        self.norm = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.3)
        self.mid = nn.utils.parametrizations.spectral_norm(nn.Linear(12, 12)) if spectral else nn.Identity()
        self.out = nn.Linear(12, 2)
        self.running = running
        self.register_buffer("feature_mean", torch.zeros(12))
        self.armed = False

    def forward(self, z, y=None):
        if self.conditional:
            z = torch.cat([z, F.one_hot(y, C).to(z)], dim=1)
        h = self.mid(self.drop(torch.relu(self.norm(self.inp(z)))))
        if self.running and self.training:
            # a hand-written moving average that rebinds its buffer (as VQ-VAE EMA codebooks commonly do)
            self.feature_mean = 0.9 * self.feature_mean + 0.1 * h.detach().mean(0)
        if self.armed and not torch.is_grad_enabled():
            self.armed = False
            raise Lost("device lost in G's fake pass")
        return self.out(h)


class ConditionalCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + C, 12), nn.SiLU(), nn.Linear(12, 1))

    def forward(self, x, y):
        return self.net(torch.cat([x, F.one_hot(y, C).to(x)], dim=1)).squeeze(1)


def make(conditional=False, spectral=False, running=False, dataloader=False, **kwargs):
    torch.manual_seed(0)
    g = BombG(conditional, spectral, running).double()
    d = ConditionalCritic().double() if conditional else MLPDiscriminator(2, hidden=12, depth=2).double()
    points = ring(24)
    labels = torch.arange(24) % C
    if dataloader:
        data = DataLoader(TensorDataset(points), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
        extra = {}
    else:
        data = points
        extra = {"labels": labels, "num_classes": C} if conditional else {}
    settings = dict(batch_size=8, seed=3, **extra)
    settings.update(kwargs)
    return GANTrainer(g, d, data, **settings)


def snapshot(trainer):
    return {"rng": trainer.rng.get_state(), "global_rng": torch.get_rng_state(),
            "generator": {k: v.clone() for k, v in trainer.generator.state_dict().items()},
            "d_steps_done": trainer.d_steps_done, "g_steps": trainer.g_steps}


def run_state(trainer):
    return {"generator": trainer.generator.state_dict(), "discriminator": trainer.discriminator.state_dict(),
            "g_optimizer": trainer.g_optimizer.state_dict()["state"], "d_optimizer": trainer.d_optimizer.state_dict()["state"],
            "rng": trainer.rng.get_state(), "global_rng": torch.get_rng_state(), "history": trainer.history}


def straight_run(iterations=3, **kwargs):
    trainer = make(**kwargs)
    torch.manual_seed(5)
    trainer.train(iterations)
    return run_state(trainer)


SETUPS = {
    "nonsaturating": {},
    "conditional": {"conditional": True},
    "wgan-gp": {"loss": "wgan-gp"},
    "conditional-wgan-gp-uniform": {"conditional": True, "loss": "wgan-gp", "class_sampling": "uniform"},
    "spectral-norm-in-G": {"spectral": True},
    "d_steps=2": {"d_steps": 2},
    # G's forward rebinds a buffer (self.feature_mean = ...), as hand-written moving averages do: the undo must
    # restore the buffer G holds now, not write into the tensor it held before the pass (failed before the fix)
    "rebound-buffer-in-G": {"running": True},
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_tensor_data_discriminator_step_failing_in_gs_fake_pass_is_undone(setup):
    kwargs = SETUPS[setup]
    straight = straight_run(**kwargs)
    trainer = make(**kwargs)
    torch.manual_seed(5)
    trainer.train(1)
    before = snapshot(trainer)
    trainer.generator.armed = True
    with pytest.raises(Lost):
        trainer.train(3)
    # nothing of the failed step is left: its rows, latents, dropout draws, BatchNorm/power-iteration updates
    same(before, snapshot(trainer))
    trainer.train(3)
    same(straight, run_state(trainer))


def test_g_in_eval_mode_keeps_its_buffers_and_the_run_is_the_straight_one():
    def eval_run(fail):
        trainer = make(spectral=True)
        trainer.generator.eval()  # a G trained in eval mode: its BatchNorm uses running statistics, fixed
        buffers = {k: v.clone() for k, v in trainer.generator.named_buffers()}
        torch.manual_seed(5)
        trainer.train(1)
        if fail:
            trainer.generator.armed = True
            with pytest.raises(Lost):
                trainer.train(3)
        trainer.train(3)
        same(buffers, dict(trainer.generator.named_buffers()))  # eval mode: no buffer ever moves
        return run_state(trainer)

    same(eval_run(False), eval_run(True))


class FailingDraw:
    """Wraps a trainer's sample_latents / sample_classes: the ``count``-th call draws, then raises (an interrupt)."""

    def __init__(self, draw, count):
        self.draw, self.count, self.calls = draw, count, 0

    def __call__(self, *args, **kwargs):
        out = self.draw(*args, **kwargs)
        self.calls += 1
        if self.calls == self.count:
            raise KeyboardInterrupt
        return out


@pytest.mark.parametrize("where", ["sample_latents", "sample_classes"])
def test_a_generator_step_failing_in_its_draws_undoes_them(where):
    conditional = where == "sample_classes"
    straight = straight_run(conditional=conditional)
    trainer = make(conditional=conditional)
    torch.manual_seed(5)
    trainer.train(1)
    # sample_latents is called by each discriminator step's fake pass and each generator step: with d_steps=1 the
    # second call from here is the generator step's; sample_classes only by generator steps
    setattr(trainer, where, FailingDraw(getattr(trainer, where), 2 if where == "sample_latents" else 1))
    trainer.discriminator_step()
    trainer._iteration_d_steps = 1  # (the loop's count of this iteration's discriminator updates)
    before = snapshot(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(3)
    same(before, snapshot(trainer))
    del trainer.__dict__[where]
    trainer.train(3)
    same(straight, run_state(trainer))


@pytest.mark.parametrize("dataloader", [False, True], ids=["tensor", "dataloader"])
def test_a_step_failing_after_a_checkpoint_leaves_the_checkpointed_state(tmp_path, dataloader):
    straight = straight_run(iterations=4, dataloader=dataloader)
    trainer = make(dataloader=dataloader, checkpoint_dir=tmp_path, checkpoint_every=1)
    torch.manual_seed(5)
    trainer.train(2)
    trainer.generator.armed = True
    with pytest.raises(Lost):
        trainer.train(4)
    (tmp_path / "at_failure").mkdir()
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "at_failure" / "checkpoint.pt")  # (train() writes on)
    saved = torch.load(tmp_path / "at_failure" / "checkpoint.pt", weights_only=False)
    now = trainer.state_dict()
    for key in ("rng", "global_rng", "generator", "discriminator", "iteration", "g_steps", "d_steps_done", "history"):
        same(saved[key], now[key], key)
    # the failed trainer trained on, and a new one resumed from the checkpoint, are both the straight run
    trainer.train(4)
    same(straight, run_state(trainer))
    resumed = make(dataloader=dataloader, checkpoint_dir=tmp_path / "at_failure", checkpoint_every=1)
    torch.manual_seed(123)  # the checkpoint's global RNG replaces this
    resumed.train(4, resume=True)
    same(straight, run_state(resumed))
