"""Review of GANTrainer(micro_batches=K) and GANKernelAnalyzer's owned micro-batch steps: a step that fails
part-way (in micro-batch j > 0, after earlier micro-batches' forwards have run) hands everything back, so that
train() again is the uninterrupted run bit for bit.

A training-mode spectral norm advances its power iteration (the buffers ``_u``, ``_v``) at every forward, also
D's forward inside a generator step (D's parameters are frozen there, not its mode). A failure after micro-batch
0's forward (an interrupt, an out-of-memory error, an analyzer's refusal in micro-batch 1) left those buffers
advanced: the retried step then trained with another power-iteration state, and every later step differed
(silently: G's weights 2e-9 apart after three iterations). K = 1 had the same hole for a failure after the
forward (an analyzer's refusal from the step's graph); micro-batches make it the rule for any failure in
micro-batch j > 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.data import gaussian_ring
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPGenerator
from test_resume import same

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    data, _ = gaussian_ring(32, radius=2.0, std=0.05, seed=0)
    return data.to(F64)


class _FailsInMicroBatch(TrainerCallback):
    """The ``count``-th step of ``phase`` raises in training's loss of micro-batch ``j`` (after micro-batch
    0's forward has run: D's power iteration advanced), as an interrupt or an out-of-memory error there does.
    Training's loss calls are the ones on outputs with a graph from the model (an analyzer's passes call the
    loss on a leaf, or without a graph)."""

    def __init__(self, phase, count=2, j=1):
        self.phase, self.count, self.j, self.seen = phase, count, j, 0

    def wrap_step(self, trainer, step, perform):
        if step.phase == self.phase:
            self.seen += 1
            if self.seen == self.count:
                loss_fn, calls = step.loss_fn, [0]

                def failing(outputs, targets):
                    if outputs.grad_fn is not None:  # training's micro-batch forward
                        if calls[0] == self.j:
                            raise RuntimeError("lost in micro-batch")
                        calls[0] += 1
                    return loss_fn(outputs, targets)

                step.loss_fn = failing
        return perform()


def _buffers(trainer):
    return {f"{who}.{name}": b.clone() for who, model in (("G", trainer.generator), ("D", trainer.discriminator))
            for name, b in model.named_buffers()}


class _NotesBuffers(TrainerCallback):
    """The players' buffers when the ``count``-th step of ``phase`` is handed to the callbacks (after its draws
    and, for a discriminator step, G's fake pass: the state the undo must give back for D)."""

    def __init__(self, phase, count=2):
        self.phase, self.count, self.seen, self.buffers = phase, count, 0, None

    def wrap_step(self, trainer, step, perform):
        if step.phase == self.phase:
            self.seen += 1
            if self.seen == self.count:
                self.buffers = _buffers(trainer)
        return perform()


def _sn_gan(*callbacks, analyzer=False):
    torch.manual_seed(0)
    G = MLPGenerator(2, 2, hidden=8, depth=2).to(F64)
    D = nn.Sequential(spectral_norm(nn.Linear(2, 8)), nn.SiLU(), nn.Linear(8, 1)).to(F64)  # training mode
    found = []
    if analyzer:
        probes = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
        found = [GANKernelAnalyzer(G, D, probes, num_groups=2, controls=1, window=2, eval_every=1)]
    return GANTrainer(G, D, _data(), batch_size=4, micro_batches=2, seed=3, callbacks=[*callbacks, *found])


def _state(trainer):
    return {"G": trainer.generator.state_dict(), "D": trainer.discriminator.state_dict(),
            "g_opt": trainer.g_optimizer.state_dict(), "d_opt": trainer.d_optimizer.state_dict(),
            "rng": trainer.rng.get_state()}


@pytest.mark.parametrize("phase, analyzer", [("generator", False), ("discriminator", False), ("generator", True)])
def test_a_step_failing_in_micro_batch_one_hands_back_the_power_iteration_and_the_run_is_the_straight_one(
        phase, analyzer):
    """A spectral-norm D in training mode, K = 2: the second ``phase`` step fails in micro-batch 1. Right after,
    both players' buffers are those before the step (on the code before: D's ``_u`` advanced by micro-batch 0's
    forward); train() again equals the uninterrupted run bit for bit (parameters, buffers, optimizers, the
    trainer's generator, the loss history, an attached analyzer's state); on the code before G's weights were
    2e-9 apart and the analyzer's ledger differed."""
    straight = _sn_gan(analyzer=analyzer)
    torch.manual_seed(5)
    straight.train(3)
    notes = _NotesBuffers(phase)
    failing = _sn_gan(_FailsInMicroBatch(phase), notes, analyzer=analyzer)
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="lost in micro-batch"):
        failing.train(3)
    if phase == "generator":  # (a discriminator step's G buffers are noted after its fake pass: D's only)
        same(notes.buffers, _buffers(failing), "buffers after the failure")
    else:
        same({k: v for k, v in notes.buffers.items() if k.startswith("D.")},
             {k: v for k, v in _buffers(failing).items() if k.startswith("D.")}, "D's buffers after the failure")
    failing.train(3)
    same(_state(straight), _state(failing), "trainer")
    assert failing.history == straight.history
    if analyzer:
        same(straight.state_dict()["callbacks"], failing.state_dict()["callbacks"], "analyzer")
