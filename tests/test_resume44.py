"""Analyzers attached after a resume, loaded by hand, or interrupted at bind (helper "resume44").

1. A callback attached after ``resume()`` (trainer.resume, then trainer.callbacks.append) gets its state from the
   trainer's ``train()`` (``CallbackStates.claim``), which told the analyzer no trainer: the EMA ledger was not
   compared, and the tracker refused the state at bind. A NoiseLevelAnalyzer was left bound to a fresh tracker
   (the refused state dropped): the next ``train()`` was accepted and began a new ledger at the resume (steps 4
   and 5 of a run saved at step 3, reported alone). A GANKernelAnalyzer refused at its first generator step, after
   the iteration's discriminator step had moved D, and the next ``train()`` went on untracked. Now ``train()``
   tells the analyzers its trainer while it claims their states: refused there, before any step, each time.
2. A NoiseLevelAnalyzer loaded by hand (``load_state_dict``, no trainer) and bound with an EMA other than the saved
   run's (``bind(ema=)``): refused by the tracker after bind had built it, the analyzer left bound to the fresh
   tracker (a second bind: "already bound"), the loaded state held back. Now refused by bind before the tracker
   is built, naming ``ema_ledger`` / ``bind(ema=)``, and a failing load at bind leaves the analyzer unbound.
3. A saved "factored" state against ``group_state="auto"`` resolving to "dense" (a loop binding its dropout model
   in training mode where the saved run bound it in eval mode): the tracker's refusal named no fix and left the
   analyzer bound. Now refused by bind with the fix, the analyzer unbound.
4. Fuzz (interruption at every step of DDPM and GAN runs, EMA on and off, cadences, controls, micro-batches, state
   saved through the trainer's checkpoint files and loaded into new objects, exceptions raised by the model's
   forward anywhere in a run): the resumed runs matched bit for bit except where bind's first kernel record failed
   (a forward raising there): the analyzer stayed bound without it, the next ``train()`` did not bind again, and
   the kernel history lacked its step-0 record for good. Now bind unbinds again.
5. A fresh analyzer on a resumed trainer (no saved analyzer state) tracks from the resume on; its report said so
   nowhere but the step numbers (the GAN report's ``coupling_whole_run`` among its numbers). Now a note says
   which steps the ledgers cover, and that they are not the whole run.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from genkernel.diffusion import MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from states import state_differences
from test_resume43 import _ddpm, _gan
from test_rfuzz42 import _ring, _without_cost

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(make, path, steps, **settings):
    """A run of ``make(**settings)`` (``_ddpm`` or ``_gan``) trained ``steps`` steps (iterations), saved at ``path``;
    returns its analyzer."""
    trainer, analyzer = make(**settings)
    trainer.train(steps)
    trainer.save_checkpoint(path)
    return analyzer


# ------------------------------------------------------------------------------------------
# 1. attached after the resume
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved, here, match", [
    (dict(ema=True), dict(ema=True, ema_ledger="none"), r"EMA ledger: saved 'kept', here 'none'.*ema_ledger='trainer'"),
    (dict(ema=True, ema_ledger="none"), dict(ema=True), r"EMA ledger: saved 'none', here 'kept'.*ema_ledger='none'"),
])
def test_a_ddpm_analyzer_attached_after_resume_with_another_ema_ledger_is_refused_before_any_step(tmp_path, saved,
                                                                                                 here, match):
    """A DDPM checkpoint at step 3 resumed by a trainer without its analyzer; the analyzer, built with the other EMA
    ledger, appended after the resume: ``train()`` refused naming the setting and the fix, the trainer bit for bit
    the resumed one, and every later ``train()`` refused too (the state stays pending).

    Fails on the old code: refused at bind, the analyzer left bound to a fresh tracker (the trainer's state then held
    its empty ledger in place of the loaded one); the second ``train()`` went on, the ledger begun at the resume
    (global steps [4, 5], the saved steps 1-3 dropped)."""
    _checkpoint(_ddpm, tmp_path / "run.pt", 3, **saved)
    trainer, analyzer = _ddpm(**here)
    trainer.callbacks.clear()
    trainer.resume(tmp_path / "run.pt")
    trainer.callbacks.append(analyzer)
    before = copy.deepcopy(trainer.state_dict())
    for _ in range(2):
        with pytest.raises(ValueError) as error:
            trainer.train(2)
        assert not state_differences(before, trainer.state_dict(), "trainer")
        assert analyzer.tracker is None and trainer.global_step == 3
        assert re.search(match, str(error.value))


def test_a_gan_analyzer_attached_after_resume_with_another_ema_ledger_is_refused_before_d_moves(tmp_path):
    """A GAN checkpoint at iteration 2 (EMA ledger kept) resumed without its analyzer; the analyzer, built with
    ``ema_ledger="none"``, appended after: ``train()`` refused before the iteration's discriminator step, the
    trainer bit for bit the resumed one, and refused again at the next ``train()``.

    Fails on the old code: refused at the first generator step, after D's step (the discriminator's weights moved);
    the next ``train()`` went on with the generator untracked."""
    _checkpoint(_gan, tmp_path / "run.pt", 2, ema=True)
    trainer, analyzer = _gan(ema=True, ema_ledger="none")
    trainer.callbacks.clear()
    trainer.load_checkpoint(tmp_path / "run.pt")
    trainer.callbacks.append(analyzer)
    before = copy.deepcopy(trainer.state_dict())
    for _ in range(2):
        with pytest.raises(ValueError) as error:
            trainer.train(3)
        assert not state_differences(before, trainer.state_dict(), "trainer")
        assert re.search(r"EMA ledger: saved 'kept', here 'none'.*ema_ledger='trainer'", str(error.value))


def test_an_analyzer_attached_after_resume_with_the_saved_settings_goes_on_bit_for_bit(tmp_path):
    """The same attach-after-resume with the saved settings (EMA kept): the run ends bit for bit as the run trained
    straight through (trainer state, analyzer state, report). Coverage: passes on the old code too (it guards the
    trainer told to the claimed analyzer against changing an accepted resume)."""
    straight, analyzer = _ddpm(ema=True)
    straight.train(5)
    _checkpoint(_ddpm, tmp_path / "run.pt", 3, ema=True)
    trainer, resumed = _ddpm(ema=True)
    trainer.callbacks.clear()
    trainer.resume(tmp_path / "run.pt")
    trainer.callbacks.append(resumed)
    trainer.train(2)
    assert not state_differences(straight.state_dict(), trainer.state_dict(), "trainer")
    assert not state_differences(_without_cost(analyzer.report()), _without_cost(resumed.report()), "report")


# ------------------------------------------------------------------------------------------
# 2. loaded by hand, bound with another EMA
# ------------------------------------------------------------------------------------------
def test_a_noise_level_analyzer_loaded_by_hand_is_refused_at_bind_with_another_ema_and_binds_again(tmp_path):
    """A DDPM analyzer state with an EMA ledger loaded by hand into an analyzer built with ``ema_ledger="none"``
    (accepted: no trainer says whether an EMA will be bound) and bound in a loop of one's own without an EMA:
    refused by ``bind`` naming ``bind(..., ema=...)``, the analyzer left unbound with the state still held; bound
    again with the trainer's EMA it takes the state (global steps go on from 3); and the reverse (a state without
    an EMA ledger bound with one) is refused alike.

    Fails on the old code: the tracker refused at bind after it was built, and the analyzer stayed bound to it (the
    second bind: RuntimeError "already bound")."""
    trainer, saved = _ddpm(ema=True)
    trainer.train(3)
    state = copy.deepcopy(saved.state_dict())
    model, optimizer, ema = copy.deepcopy((trainer.model, trainer.optimizer, trainer.ema))
    _, analyzer = _ddpm(ema_ledger="none")
    analyzer.load_state_dict(state)
    with pytest.raises(ValueError) as error:
        analyzer.bind(model, optimizer, start_step=3)
    assert analyzer.tracker is None and analyzer.state_dict() is state
    assert re.search(r"EMA ledger: saved 'kept', here 'none'.*bind\(\.\.\., ema=the EMA", str(error.value))
    analyzer.bind(model, optimizer, ema=ema, start_step=3)
    assert analyzer.global_steps == [1, 2, 3] and analyzer.tracker.ema is not None
    plain_trainer, plain = _ddpm()
    plain_trainer.train(3)
    _, analyzer = _ddpm()
    analyzer.load_state_dict(copy.deepcopy(plain.state_dict()))
    with pytest.raises(ValueError, match=r"EMA ledger: saved 'none', here 'kept'.*bind\(\.\.\., ema=None\)"):
        analyzer.bind(model, optimizer, ema=ema, start_step=3)
    assert analyzer.tracker is None


def test_a_gan_analyzer_loaded_by_hand_is_refused_at_bind_with_another_ema_before_anything_is_set():
    """A GAN analyzer state with an EMA ledger loaded by hand and bound in a loop of one's own without the EMA:
    refused by ``bind`` naming ``bind(..., ema=...)`` before anything is set (not bound, no optimizer, no tracker,
    the loaded start step kept). Fails on the old code: the generator's tracker refused after bind had set the
    loop's start step and optimizer, naming ``track_ema``, not bind's argument."""
    trainer, saved = _gan(ema=True)
    trainer.train(2)
    state = copy.deepcopy(saved.state_dict())
    loop, analyzer = _gan(ema=True)  # (its networks, optimizers and EMA: those of a loop of one's own)
    analyzer.load_state_dict(state)
    with pytest.raises(ValueError, match=r"EMA ledger: saved 'kept', here 'none'.*bind\(\.\.\., ema=the EMA"):
        analyzer.bind(loop.g_optimizer, loop.d_optimizer, start_step=2)
    assert not analyzer._bound and analyzer._ema is None and analyzer._g_optimizer is None
    assert analyzer.g_tracker is None and analyzer._start_step == state["start_step"]


# ------------------------------------------------------------------------------------------
# 3. a saved "factored" state against "auto" resolving to "dense"
# ------------------------------------------------------------------------------------------
class _DroppedDenoiser(nn.Module):
    """The MLP denoiser followed by dropout: in eval mode nothing draws ("auto" resolves to "factored" under plain
    SGD), in training mode the dropout draws ("auto" resolves to "dense")."""

    def __init__(self):
        super().__init__()
        self.net = MLPDenoiser(hidden=12, depth=2, time_dim=8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, t):
        return self.drop(self.net(x, t))


def _dropped(training: bool, state=None):
    torch.manual_seed(0)
    model = _DroppedDenoiser().train(training)
    if state is not None:
        model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    analyzer = NoiseLevelAnalyzer(make_scheduler(100), _ring(16, seed=3, dtype=torch.float32), num_bins=3,
                                  num_probes=8, kernel_points=4, progress=False)
    return model, optimizer, analyzer


def test_a_factored_state_bound_where_auto_resolves_to_dense_is_refused_naming_the_fix():
    """A loop binds its dropout denoiser in eval mode ("auto": "factored"), takes 2 steps and saves; the resumed loop
    binds it in training mode ("auto": "dense"): refused by bind naming the route, the mode and
    ``group_state='factored'``, the analyzer left unbound with the state still held. Bound in eval mode, as saved,
    the state loads.

    Fails on the old code: the tracker's refusal ("the saved tracker had ... group_state='factored'; this one has
    ... 'dense'") named no fix, and the analyzer stayed bound to the fresh dense tracker."""
    model, optimizer, analyzer = _dropped(training=False)
    analyzer.bind(model, optimizer)
    assert analyzer.tracker.group_state == "factored"
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        analyzer.step(_ring(8, seed=5, dtype=torch.float32), torch.randn(8, 2, generator=g),
                      torch.randint(0, 100, (8,), generator=g))
    state, weights = copy.deepcopy(analyzer.state_dict()), copy.deepcopy(model.state_dict())
    model, optimizer, resumed = _dropped(training=True, state=weights)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError) as error:
        resumed.bind(model, optimizer, start_step=2)
    assert resumed.tracker is None and resumed.state_dict() is state
    assert re.search(r"kept the 'factored' group state and group_state='auto' resolves to 'dense'.*training mode.*"
                     r"group_state='factored'", str(error.value))
    resumed.bind(model.eval(), optimizer, start_step=2)
    assert resumed.tracker.group_state == "factored" and resumed.global_steps == [1, 2]


# ------------------------------------------------------------------------------------------
# 4. bind's first kernel record interrupted
# ------------------------------------------------------------------------------------------
def test_a_first_kernel_record_that_fails_at_bind_is_made_when_training_goes_on():
    """bind's kernel record at step 0 raising once (a forward interrupted: here ``kernel_structure``) stops the first
    ``train()`` before any step; ``train()`` again then ends bit for bit as the run trained straight through, its
    kernel history starting with the step-0 record.

    Fails on the old code: the analyzer stayed bound, the next ``train()`` did not bind again, and the step-0 record
    was never made (the history [3, 5] where the straight run's is [0, 2, 4, 5])."""
    straight, analyzer = _ddpm()
    straight.train(5)
    trainer, interrupted = _ddpm()
    structure = interrupted.kernel_structure
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("interrupted")
        return structure(*args, **kwargs)

    interrupted.kernel_structure = failing_once
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.train(5)
    assert trainer.global_step == 0 and interrupted.tracker is None
    trainer.train(5)
    assert [row["global_step"] for row in interrupted.kernel_history] == [0, 2, 4, 5]
    assert not state_differences(straight.state_dict(), trainer.state_dict(), "trainer")
    assert not state_differences(_without_cost(analyzer.report()), _without_cost(interrupted.report()), "report")


# ------------------------------------------------------------------------------------------
# 5. a fresh analyzer on a resumed trainer
# ------------------------------------------------------------------------------------------
def test_a_fresh_analyzer_on_a_resumed_trainer_reports_the_steps_its_ledgers_cover(tmp_path):
    """A DDPM run saved at step 3 without an analyzer, resumed by a trainer with a fresh one and trained to step 5:
    the ledger covers steps 4-5 and the report's notes say so (not the whole run); the analyzer of the run trained
    from step 0 has no such note. The same for a GAN run saved at iteration 2 and trained to 4 (generator steps 3-4,
    its ``coupling_whole_run`` named).

    Fails on the old code: no note (the report's numbers read as the whole run's)."""
    trainer, _ = _ddpm()
    trainer.callbacks.clear()
    trainer.train(3)
    trainer.save_checkpoint(tmp_path / "ddpm.pt")
    trainer, fresh = _ddpm()
    trainer.resume(tmp_path / "ddpm.pt")
    trainer.train(2)
    notes = [n for n in fresh.report()["notes"] if "not the whole run" in n]
    assert fresh.global_steps == [4, 5] and len(notes) == 1
    assert "begin at step 4" in notes[0] and "steps 4-5 only" in notes[0]
    whole, analyzer = _ddpm()
    whole.train(5)
    assert not [n for n in analyzer.report()["notes"] if "not the whole run" in n]
    trainer, _ = _gan()
    trainer.callbacks.clear()
    trainer.train(2)
    trainer.save_checkpoint(tmp_path / "gan.pt")
    trainer, fresh = _gan()
    trainer.load_checkpoint(tmp_path / "gan.pt")
    trainer.train(4)
    notes = [n for n in fresh.report()["notes"] if "not the whole run" in n]
    assert fresh.g_loop_steps == [3, 4] and len(notes) == 1
    assert "generator step 3" in notes[0] and "coupling_whole_run cover generator steps 3-4" in notes[0]
    whole, analyzer = _gan()
    whole.train(4)
    assert not [n for n in analyzer.report()["notes"] if "not the whole run" in n]
