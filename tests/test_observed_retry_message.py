"""After a refused observed step, a plain retry of ``optimizer.step()`` says what happened.

An observed step refused by the tracker (here the first step's memory check, a MemoryError) takes its observed
micro-batches with it: the loop must clear the gradients and run them again, each observed before its backward.
Before, a plain second ``optimizer.step()`` (the natural retry once the user has made room) said only that it was
"called without an observed micro-batch since the last step", as if the loop had never called observe(). Now the
error names the refused step, its reason and the way to run it again; once the loop observes again (and steps),
nothing of the old refusal is repeated."""

from __future__ import annotations

import copy

import pytest
import torch

import genkernel.core.cost as cost
from test_cost_first_step import BATCH, MICRO, batches, dense_tracker, direct_estimate, loop_step, model_and_optimizer

pytestmark = pytest.mark.usefixtures("one_thread", "batch_sets_the_peak")


def refused_first_step(monkeypatch):
    """A tracker whose first observed step was refused for memory; returns (model, optimizer, tracker, data)."""
    model, optimizer = model_and_optimizer()
    tracker = dense_tracker(model, optimizer)
    grown = direct_estimate(tracker, BATCH, MICRO).total_bytes - tracker.cost.total_bytes
    monkeypatch.setattr(cost, "available_memory", lambda device: grown - 1)
    data = batches()
    with pytest.raises(MemoryError):
        loop_step(model, optimizer, *data[0], tracker=tracker)
    return model, optimizer, tracker, data


def test_a_plain_retry_after_a_refused_step_names_the_refusal_and_the_way_to_run_it_again(monkeypatch):
    """The retry's RuntimeError names step 1's refusal (MemoryError, its reason), that the micro-batches went with
    it and that the model and optimizer are as before, and says zero_grad / observe again; the parameters did not
    move. Following it (one byte more free memory, the step rerun) trains exactly as a bare loop. Before: only
    "called without an observed micro-batch since the last step"."""
    model, optimizer, tracker, data = refused_first_step(monkeypatch)
    bare_model = copy.deepcopy(model)
    bare_optimizer = torch.optim.SGD(bare_model.parameters(), lr=0.05)
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="without an observed micro-batch") as retried:
        optimizer.step()
    message = str(retried.value)
    assert "for step 1, was refused (MemoryError:" in message and "batch_size" in message
    assert "were dropped with it" in message and "optimizer.zero_grad()" in message
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta)) and not optimizer.state
    assert tracker.ledger.steps == 0
    grown = direct_estimate(tracker, BATCH, MICRO).total_bytes - tracker.cost.total_bytes
    monkeypatch.setattr(cost, "available_memory", lambda device: grown)
    for x, y, groups in data:
        loop_step(model, optimizer, x, y, groups, tracker=tracker)
        loop_step(bare_model, bare_optimizer, x, y, groups)
    assert tracker.ledger.steps == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare_model.parameters()))


def test_the_refusal_is_forgotten_once_the_loop_observes_again(monkeypatch):
    """After the refusal the loop observes a new micro-batch: a step without observe() after the next recorded step
    gets the plain message, not the old refusal. Coverage of the reset (the plain message passed before too)."""
    model, optimizer, tracker, data = refused_first_step(monkeypatch)
    monkeypatch.setattr(cost, "available_memory", lambda device: 2**62)
    loop_step(model, optimizer, *data[0], tracker=tracker)
    assert tracker.ledger.steps == 1
    with pytest.raises(RuntimeError, match="without an observed micro-batch") as plain:
        optimizer.step()
    assert "was refused" not in str(plain.value)

