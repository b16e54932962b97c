"""An interrupt (KeyboardInterrupt, MemoryError) inside a trainer's update: "correct or refused, never silently wrong".

What must hold:

- inside ``optimizer.step()`` with no analyzer to roll it back (Adam without ``foreach`` updates the parameters one
  at a time, so an interrupt leaves the first parameter updated and the others not): the step raises a RuntimeError
  naming the torn update and the fix, and the trainer refuses every further step, ``state_dict`` and
  ``save_checkpoint`` until a saved state is loaded; after that load the run continues to exactly the straight
  run's state (bit for bit). The old trainers handed the batch back and made the step again on top of the partial
  update (the first parameter updated twice, its Adam step count one ahead): silently another run.
- inside the EMA's update: the update is in the weights, so it is counted (``global_step`` / ``g_steps``, the loss
  history, the optimizer's step count and the learning-rate schedule agree with a straight run's after the same
  number of updates), and, the EMA possibly half written, the trainer refuses to go on until a checkpoint is
  loaded, after which the run is the straight one bit for bit. The old trainers updated the EMA before the count
  (DDPM: ``global_step`` one behind the optimizer, so ``train()`` again made one update more than asked) or before
  the schedule (GAN: the generator's learning rate one step behind for the rest of the run).
- with an analyzer attached, its tracker rolls an interrupted ``optimizer.step()`` back, and ``train()`` again is
  the straight run (coverage: passes before; needs the tracker's roll-back to clear ``step.torn``).
"""

import copy
import math
import re

import pytest
import torch
from torch import nn

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from genkernel.supervised.trainer import SupervisedTrainer
from states import state_differences

F64 = torch.float64
TORN = r"optimizer\.step\(\) of .*step 3 raised KeyboardInterrupt part-way"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ring(n, seed=0):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)




def _torn(call, match):
    """The RuntimeError ``call()`` raises, matching ``match``; an interrupt that comes through instead fails the test
    (as pytest.raises would let it stop the whole session)."""
    try:
        call()
    except RuntimeError as error:
        assert re.search(match, str(error)), str(error)
        return error
    except (KeyboardInterrupt, MemoryError) as error:
        pytest.fail(f"the {type(error).__name__} came through, not the torn update's RuntimeError: the trainer treats "
                    "the update as never made, and train() again makes it on top of what was written")
    pytest.fail("no error")


def _interrupt_optimizer(opt, at, error=KeyboardInterrupt):
    """``opt.step`` interrupted at its ``at``-th call after the first parameter's update was written: the state of
    Adam's per-parameter loop (``foreach=False``) after its first iteration, then Ctrl-C. Returns a function that
    puts the optimizer's own ``step`` back."""
    n = {"calls": 0}
    real, own = opt.step, "step" in vars(opt)  # (a learning-rate schedule wraps the instance's step)

    def step(closure=None):
        n["calls"] += 1
        if n["calls"] != at:
            return real(closure)
        params = [p for g in opt.param_groups for p in g["params"]]
        before = [(p.detach().clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()})
                  for p in params]
        real(closure)
        with torch.no_grad():
            for p, (value, state) in list(zip(params, before))[1:]:
                p.copy_(value)
                if state:
                    opt.state[p] = state
                else:
                    opt.state.pop(p, None)
        raise error("Ctrl-C inside optimizer.step" if error is KeyboardInterrupt else "out of memory inside optimizer.step")

    opt.step = step

    def restore():
        if own:
            opt.step = real
        else:
            del opt.step

    return restore


def _adam_steps(opt):
    return sorted({int(s["step"]) for s in opt.state.values()})


# -- DDPMTrainer -------------------------------------------------------------------------------------------------------
T = 50


def _ddpm(tmp_path=None, *, ema=False, analyzer=False):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    scheduler, data = make_scheduler(T), _ring(40)
    kw = {}
    if ema:
        from diffusers.training_utils import EMAModel
        kw["ema"] = EMAModel(model.parameters(), decay=0.9)
        kw["lr_scheduler"] = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    if tmp_path is not None:
        kw.update(checkpoint_dir=tmp_path, checkpoint_every=2)
    callbacks = ([NoiseLevelAnalyzer(scheduler, data[:8], num_bins=2, num_probes=4, kernel_points=2, progress=False)]
                 if analyzer else [])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
    return DDPMTrainer(model, scheduler, data, batch_size=8, optimizer=optimizer, progress=False, callbacks=callbacks,
                       **kw)


def _refused(trainer, calls):
    for call in calls:
        with pytest.raises(RuntimeError, match="refused: .*part-way.*(last checkpoint|last saved state)"):
            call()


def test_ddpm_torn_optimizer_step_refuses_until_resumed(tmp_path):
    straight = _ddpm()
    straight.train(5)
    trainer = _ddpm(tmp_path)
    restore = _interrupt_optimizer(trainer.optimizer, 3)
    error = _torn(lambda: trainer.train(5), TORN + r".*Resume from the last checkpoint")
    assert isinstance(error.__cause__, KeyboardInterrupt)
    # (the state the old trainer went on from: the first parameter's Adam count one ahead of the others)
    assert trainer.global_step == 2 and _adam_steps(trainer.optimizer) == [2, 3]
    restore()
    _refused(trainer, [lambda: trainer.train(1), trainer.train_step, trainer.attempt_step, trainer.state_dict,
                       trainer.save_checkpoint])
    assert trainer.global_step == 2 and _adam_steps(trainer.optimizer) == [2, 3]  # (nothing trained on the torn state)
    assert trainer.resume()  # the checkpoint of step 2
    assert trainer.global_step == 2 and _adam_steps(trainer.optimizer) == [2]
    trainer.train(3)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []


def test_ddpm_interrupted_ema_update_counts_the_update_and_refuses(tmp_path):
    straight = _ddpm(ema=True)
    straight.train(3)
    after_three = (straight.global_step, _adam_steps(straight.optimizer), straight.optimizer.param_groups[0]["lr"],
                   list(straight.losses))
    straight.train(2)
    trainer = _ddpm(tmp_path, ema=True)
    ema, real = trainer.ema, trainer.ema.step
    calls = {"n": 0}

    def half_written(parameters):  # the third update: half the shadow parameters written, then Ctrl-C
        calls["n"] += 1
        if calls["n"] != 3:
            return real(parameters)
        parameters = list(parameters)
        decay = ema.get_decay(ema.optimization_step + 1)
        with torch.no_grad():
            for shadow, p in list(zip(ema.shadow_params, parameters))[: len(parameters) // 2]:
                shadow.sub_((1 - decay) * (shadow - p))
        raise KeyboardInterrupt("Ctrl-C inside the EMA's update")

    ema.step = half_written
    _torn(lambda: trainer.train(5), r"the EMA's update after step 3 raised KeyboardInterrupt part-way")
    # the update in the weights is counted, and its schedule step made: the optimizer, global_step, the losses and
    # the learning rate are the straight run's after three updates (before: global_step 2, the optimizer at 3)
    assert (trainer.global_step, _adam_steps(trainer.optimizer), trainer.optimizer.param_groups[0]["lr"],
            list(trainer.losses)) == after_three
    ema.step = real
    _refused(trainer, [lambda: trainer.train(2), trainer.train_step, trainer.state_dict, trainer.save_checkpoint])
    assert trainer.global_step == 3 and trainer.ema.optimization_step == 2  # (the refused calls trained nothing)
    assert trainer.resume()
    assert trainer.global_step == 2
    trainer.train(3)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []


def test_ddpm_analyzer_rolls_a_torn_optimizer_step_back():
    """coverage: passes before (the tracker rolls the step back; needs its roll-back to clear step.torn)."""
    straight = _ddpm(analyzer=True)
    straight.train(4)
    trainer = _ddpm(analyzer=True)
    restore = _interrupt_optimizer(trainer.optimizer, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(4)
    assert trainer.global_step == 2 and _adam_steps(trainer.optimizer) == [2]  # (rolled back)
    restore()
    trainer.train(2)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []


# -- SupervisedTrainer -------------------------------------------------------------------------------------------------
def _supervised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
    return SupervisedTrainer(model, optimizer, lambda a, b: ((a - b) ** 2).mean(dim=1), batch_size=8, seed=4)


def test_supervised_torn_optimizer_step_refuses_until_loaded():
    x = torch.randn(30, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(30, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    straight = _supervised()
    straight.fit(x, y, steps=5)
    trainer = _supervised()
    trainer.fit(x, y, steps=2)
    saved = copy.deepcopy(trainer.state_dict())
    restore = _interrupt_optimizer(trainer.optimizer, 1, MemoryError)
    _torn(lambda: trainer.fit(x, y, steps=3), r"optimizer\.step\(\) of step 3 raised MemoryError part-way.*load_state_dict")
    assert trainer.global_step == 2 and _adam_steps(trainer.optimizer) == [2, 3]
    restore()
    _refused(trainer, [lambda: trainer.fit(x, y, steps=3), trainer.state_dict])
    trainer.load_state_dict(saved)
    trainer.fit(x, y, steps=3)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []


# -- GANTrainer --------------------------------------------------------------------------------------------------------
def _gan(*, ema=False, analyzer=False):
    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=8, depth=2).double(), MLPDiscriminator(2, hidden=8, depth=2).double()
    kw = {}
    if analyzer:
        z = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
        kw["callbacks"] = [GANKernelAnalyzer(G, D, z, num_groups=2, window=4, eval_every=2)]
    if ema:
        from ema_pytorch import EMA
        kw["ema"] = EMA(G, beta=0.9, update_after_step=0, update_every=1, include_online_model=False)
        kw["lr_scheduler_g"] = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    return GANTrainer(G, D, _ring(32), batch_size=8, d_steps=1, seed=3, loss="hinge", progress=False,
                      g_optimizer=torch.optim.Adam(G.parameters(), lr=1e-2, foreach=False),
                      d_optimizer=torch.optim.Adam(D.parameters(), lr=1e-2, foreach=False), **kw)


@pytest.mark.parametrize("player", ["g_optimizer", "d_optimizer"])
def test_gan_torn_optimizer_step_refuses_until_loaded(player, tmp_path):
    straight = _gan()
    straight.train(5)
    trainer = _gan()
    trainer.train(2)
    trainer.save_checkpoint(tmp_path / "checkpoint.pt")
    restore = _interrupt_optimizer(getattr(trainer, player), 1)
    phase = "generator" if player == "g_optimizer" else "discriminator"
    _torn(lambda: trainer.train(5), rf"optimizer\.step\(\) of {phase} step 3 raised KeyboardInterrupt part-way.*"
                                   r"load_checkpoint")
    assert _adam_steps(getattr(trainer, player)) == [2, 3] and trainer.g_steps == 2
    restore()
    _refused(trainer, [lambda: trainer.train(5), trainer.generator_step, trainer.discriminator_step,
                       trainer.state_dict, lambda: trainer.save_checkpoint(tmp_path / "other.pt")])
    trainer.load_checkpoint(tmp_path / "checkpoint.pt")
    trainer.train(5)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []


def test_gan_interrupted_ema_update_steps_the_schedule_and_refuses(tmp_path):
    straight = _gan(ema=True)
    straight.train(3)
    after_three = (straight.g_steps, _adam_steps(straight.g_optimizer), straight.g_optimizer.param_groups[0]["lr"],
                   list(straight.history["g_loss"]))
    straight.train(5)
    trainer = _gan(ema=True)
    trainer.train(2)
    trainer.save_checkpoint(tmp_path / "checkpoint.pt")
    real = trainer.ema.update

    def interrupted():
        raise KeyboardInterrupt("Ctrl-C inside the EMA's update")

    trainer.ema.update = interrupted
    _torn(lambda: trainer.train(5), r"the EMA's update after generator step 3 raised KeyboardInterrupt part-way")
    # counted and scheduled (before: the schedule's step skipped, lr_g one step behind for the rest of the run)
    assert (trainer.g_steps, _adam_steps(trainer.g_optimizer), trainer.g_optimizer.param_groups[0]["lr"],
            list(trainer.history["g_loss"])) == after_three
    assert trainer.iteration == 3
    trainer.ema.update = real
    _refused(trainer, [lambda: trainer.train(5), trainer.generator_step, trainer.state_dict])
    trainer.load_checkpoint(tmp_path / "checkpoint.pt")
    assert trainer.iteration == 2
    trainer.train(5)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []


@pytest.mark.parametrize("player", ["g_optimizer", "d_optimizer"])
def test_gan_analyzer_rolls_a_torn_optimizer_step_back(player):
    """coverage: passes before (the tracker rolls the step back; needs its roll-back to clear step.torn)."""
    straight = _gan(analyzer=True)
    straight.train(4)
    trainer = _gan(analyzer=True)
    restore = _interrupt_optimizer(getattr(trainer, player), 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(4)
    assert _adam_steps(getattr(trainer, player)) == [2]  # (rolled back)
    restore()
    trainer.train(4)
    assert state_differences(straight.state_dict(), trainer.state_dict()) == []
