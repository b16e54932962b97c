"""A resume stopped by a callback's refusal is not continued from the trainer's own state.

The trainers load the callbacks' states first, so a callback that refuses its saved state (an analyzer built with
other settings) leaves the model, the optimizer and the counts as they were, and its state pending. The refusal of
the next ``train()`` then told the user, once the callback was detached, to "call
trainer.discard_callback_states([...]) to continue without them": doing so trained on from the trainer's own state
(a fresh model at step 0), silently not the resumed run. What must hold: after such a refusal, ``train()`` and
``discard_callback_states`` are refused with words saying the checkpoint was not loaded, and resuming again with the
callback detached (its state then pending) and discarding it continues the checkpoint's run bit for bit.
"""

import math

import pytest
import torch

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, make_scheduler
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
from states import state_differences

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Setting(TrainerCallback):
    """A callback whose saved state holds a setting it refuses to differ (as an analyzer refuses other bins)."""

    def __init__(self, setting):
        self.setting = setting

    def state_dict(self):
        return {"setting": self.setting}

    def load_state_dict(self, state):
        if state["setting"] != self.setting:
            raise ValueError(f"saved with setting {state['setting']}, this callback has {self.setting}")


def _ring(n):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def _ddpm(setting, tmp_path):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    return DDPMTrainer(model, make_scheduler(50), _ring(40), batch_size=8, lr=1e-2, progress=False,
                       callbacks=[Setting(setting)], checkpoint_dir=tmp_path)


def _gan(setting, tmp_path):
    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=8, depth=2).double(), MLPDiscriminator(2, hidden=8, depth=2).double()
    return GANTrainer(G, D, _ring(32), batch_size=8, d_steps=1, seed=3, loss="hinge", progress=False,
                      callbacks=[Setting(setting)], checkpoint_dir=tmp_path)




@pytest.mark.parametrize("build", [_ddpm, _gan], ids=["ddpm", "gan"])
def test_a_refused_resume_is_not_continued_from_the_trainers_own_state(build, tmp_path):
    straight = build(1, tmp_path / "straight")
    straight.train(5)
    first = build(1, tmp_path / "run")
    first.train(3)
    first.save_checkpoint(tmp_path / "run" / "checkpoint.pt")
    other = build(2, tmp_path / "run")
    callback = other.callbacks[0]
    with pytest.raises(ValueError, match="saved with setting 1"):
        other.load_checkpoint(tmp_path / "run" / "checkpoint.pt") if isinstance(other, GANTrainer) else other.resume()
    other.callbacks.remove(callback)  # the user gives up that callback's state ...
    with pytest.raises(ValueError, match="not the checkpoint's"):
        other.train(2 if isinstance(other, DDPMTrainer) else 5)
    with pytest.raises(ValueError, match="not the checkpoint's"):  # ... and may not discard it into a fresh run
        other.discard_callback_states([callback.state_key])
    # resumed again without the callback: its state waits for the discard, and the run goes on from the checkpoint
    other.load_checkpoint(tmp_path / "run" / "checkpoint.pt") if isinstance(other, GANTrainer) else other.resume()
    other.discard_callback_states([callback.state_key])
    other.train(2 if isinstance(other, DDPMTrainer) else 5)
    mine, theirs = other.state_dict(), straight.state_dict()
    mine.pop("callbacks"), theirs.pop("callbacks")
    assert state_differences(mine, theirs) == []
