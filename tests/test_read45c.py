"""A third read of the sketched state's check judged by units of the parameters' eps and of the supervised trainer's
targets check kept once per targets: targets made under ``torch.inference_mode`` (no version counter) made every
``fit`` raise a RuntimeError; the check's key is pinned for views of a tensor changed through its base; the float32
sketched check's margin under fast optimizers on cancelling batches is pinned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genkernel.core.tracking.sketched as sketched
from genkernel.core.errors import LedgerCheckError
from genkernel.core.tracking.step import OptimizerStep
from genkernel.supervised import SupervisedTrainer, cross_entropy_loss
from test_sketch45 import _loss, _setup  # the same sketched runs

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer() -> SupervisedTrainer:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    return SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy_loss, batch_size=5)


def test_targets_made_under_inference_mode_train_and_a_bad_id_written_later_is_refused_before_the_step():
    """Targets built under ``torch.inference_mode`` (a data pipeline's) have no version counter: old code read
    ``ys._version`` for its once-per-targets key and every ``fit`` raised "Inference tensors do not track version
    counter". Now they train, and as nothing tells whether they changed, each fit checks them: an id written out of
    range (in inference mode, where such tensors may be written) is refused before the next step."""
    x = torch.randn(20, 3)
    with torch.inference_mode():
        y = torch.arange(20) % 4
    trainer = _trainer()
    trainer.fit(x, y, steps=1)
    trainer.fit(x, y, steps=1)
    assert trainer.global_step == 2
    with torch.inference_mode():
        y[17] = 4
    with pytest.raises(ValueError, match=r"checked on all 20 examples before any step\): cross_entropy_loss: class ids "
                                         r"must lie in \[0, 4\)"):
        trainer.fit(x, y, steps=1)
    assert trainer.global_step == 2


def test_targets_that_are_a_view_changed_through_their_base_or_replaced_by_new_ones_are_checked_again():
    """Coverage (right on old code: a view shares its base's version counter, and a new tensor is not the one the
    weak reference holds): targets ``base[:20]`` passed once, then an id out of range written into ``base`` is refused
    before the next step; so is a new targets tensor of the same values but one bad id, given after the first was
    dropped (its id may be reused; the weak reference is dead)."""
    x = torch.randn(20, 3)
    base = torch.arange(40) % 4
    y = base[:20]
    trainer = _trainer()
    trainer.fit(x, y, steps=1)
    base[19] = 9
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 4\)"):
        trainer.fit(x, y, steps=1)
    assert trainer.global_step == 1
    del y, base
    for _ in range(3):  # (whether or not the new tensor lands at the old one's address)
        fresh = torch.arange(20) % 4
        fresh[3] = -2
        with pytest.raises(ValueError, match=r"class ids must lie in \[0, 4\)"):
            trainer.fit(x, fresh, steps=1)
        del fresh
    assert trainer.global_step == 1


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_float32_cancelling_steps_of_fast_optimizers_pass_the_sketched_check_at_a_sixteenth_of_its_units(
        kind, monkeypatch):
    """Coverage (passes on old code too: it pins the margin of SKETCH_ROUNDING_UNITS): float32 steps of 256 examples
    (two micro-batches) whose gradients cancel in pairs within their groups (exactly, the hardest case: the sums are
    rounding alone), under SGD with momentum 0.99 or Adam at lr 1e-2, are recorded with the units cut from 16 to 1
    (measured: they pass down to 0.25 units and are refused at 1/16)."""
    monkeypatch.setattr(sketched, "SKETCH_ROUNDING_UNITS", 1)
    model, optimizer, _, tracker = _setup(kind, 1, width=32, momentum=0.99, adam_lr=1e-2, groups=4)
    for _ in range(3):
        x, y = torch.randn(128, 3), torch.randn(128, 2)
        with torch.no_grad():
            f = model(x)
        inputs, targets = torch.cat([x, x]), torch.cat([y, 2 * f - y])
        tracker.track(OptimizerStep(model, optimizer, _loss, inputs, targets, None, micro_batches=2),
                      torch.arange(256) % 128 % 4)
    assert tracker.ledger.steps == 3


def test_a_drift_of_the_sketched_state_of_1e_8_is_refused_on_a_float64_step_whose_gradients_cancel(monkeypatch):
    """Coverage (refused before this file's fix too; it pins eeb85fb, before which this drift passed): a float64 step whose examples' gradients cancel
    in pairs to 1e-3, its examples' sketches all scaled by 1 + 1e-8, is refused: the float64 eps (16 units) bounds the
    drift, not float32's. Measured smallest refused drift here: 5e-10 (before eeb85fb: 2.5e-6, judged at rtol of the
    summed magnitude)."""
    model, optimizer, _, tracker = _setup("adam", 0, groups=4, dtype=torch.float64)
    project = sketched.SketchedRoute.project_batch
    for step in range(3):
        x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
        with torch.no_grad():
            f = model(x)
        inputs = torch.cat([x, x])
        targets = torch.cat([y, 2 * f - y + 1e-3 * torch.randn(32, 2, dtype=torch.float64)])
        step_of = OptimizerStep(model, optimizer, _loss, inputs, targets, None, micro_batches=1)
        if step < 2:
            tracker.track(step_of, torch.arange(64) % 32 % 4)
            continue
        monkeypatch.setattr(sketched.SketchedRoute, "project_batch",
                            lambda self, batch: project(self, batch) * (1 + 1e-8))
        with pytest.raises(LedgerCheckError, match="does not add up to the sketch"):
            tracker.track(step_of, torch.arange(64) % 32 % 4)
    assert tracker.ledger.steps == 2
