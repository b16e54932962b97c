"""gfuzz45: a fuzz of GANKernelAnalyzer over tiny configurations (losses, R1 / gradient penalty / DiffAugment,
n_critic, TTUR, SGD / momentum / Adam, EMA, BatchNorm / GroupNorm, conditional GANs, micro-batches, resume), in
GANTrainer and in a hand-written loop, against a float64 brute force, found one fault, pinned here.

A conditional analyzer attached to a GANTrainer that draws more classes than the analyzer's ``num_classes`` was
refused only at the first step whose batch happened to hold a class id of at least the analyzer's count: iterations
later, after both players had been updated, its message asking first to relabel the data. It is now refused when
training starts, before any step, naming the analyzer's count as the fix.
"""

import copy

import pytest
import torch
from torch import nn

from genkernel.gan import GANKernelAnalyzer, GANTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
LAT = 3


class _G(nn.Module):
    """G(z, y): latents beside a class embedding, one hidden SiLU layer, 2-D samples."""

    latent_dim = LAT

    def __init__(self, classes):
        super().__init__()
        self.num_classes = classes
        self.emb = nn.Embedding(classes, 2)
        self.net = nn.Sequential(nn.Linear(LAT + 2, 8), nn.SiLU(), nn.Linear(8, 2))

    def forward(self, z, y):
        return self.net(torch.cat([z, self.emb(y)], 1))


class _D(nn.Module):
    """D(x, y): a projection discriminator, ψ(φ(x)) + <embed(y), φ(x)>."""

    def __init__(self, classes):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(2, 8), nn.SiLU())
        self.psi = nn.Linear(8, 1)
        self.emb = nn.Embedding(classes, 8)

    def forward(self, x, y):
        h = self.phi(x)
        return self.psi(h) + (self.emb(y) * h).sum(1, keepdim=True)


def _run(analyzer_classes, trained_classes=3):
    torch.manual_seed(0)
    G, D = _G(3).to(F64), _D(3).to(F64)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(30, 2, generator=gen, dtype=F64)
    # class 2 is rare: the first batches hold classes 0 and 1 only, so a per-step check passes them
    labels = torch.tensor([0, 1] * 14 + [2, 2])
    probes = torch.randn(8, LAT, generator=gen, dtype=F64)
    analyzer = GANKernelAnalyzer(G, D, probes, probe_classes=torch.arange(8) % analyzer_classes,
                                 num_classes=analyzer_classes, grouping="class", window=2, eval_every=1,
                                 coverage_latents=8)
    trainer = GANTrainer(G, D, data, labels=labels, num_classes=trained_classes, batch_size=4, seed=3,
                         lr_g=0.01, lr_d=0.01, callbacks=[analyzer])
    return G, D, trainer, analyzer


def test_an_analyzer_with_fewer_classes_than_the_trainer_is_refused_before_any_step_with_nothing_moved():
    """Fails on the old code: there the run trained 6 iterations (G, D, their optimizers and the iteration count all
    moved) and was refused mid-run, at the batch that first held class 2, its message asking first to relabel the
    data ("relabel the classes to 0..1"), whose labels were right. Now train() refuses before the
    first step, naming both counts and the fix, and leaves the networks, the optimizers, the trainer's iteration and
    its random generator as they were."""
    G, D, trainer, analyzer = _run(2)
    before = (copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict()),
              copy.deepcopy(trainer.g_optimizer.state_dict()), copy.deepcopy(trainer.d_optimizer.state_dict()),
              trainer.rng.get_state().clone())
    with pytest.raises(ValueError, match=r"num_classes=3.*num_classes=2.*build the analyzer with num_classes=3"):
        trainer.train(10)
    assert trainer.iteration == 0 and trainer.g_steps == 0 and trainer.d_steps_done == 0
    assert analyzer.g_steps == 0 and analyzer.d_steps == 0
    after = (G.state_dict(), D.state_dict(), trainer.g_optimizer.state_dict(), trainer.d_optimizer.state_dict(),
             trainer.rng.get_state())
    for was, now in zip(before[:2], after[:2]):
        assert all(torch.equal(was[k], now[k]) for k in was)
    assert before[2]["state"] == {} and after[2]["state"] == {}
    assert before[3]["state"] == {} and after[3]["state"] == {}
    assert torch.equal(before[4], after[4])


def test_an_analyzer_with_the_trainers_class_count_trains_as_before():
    """coverage (passes before): the check refuses only a trainer that draws more classes than the analyzer takes;
    with the same count the run trains and books every step, the ledger adding up to its residual."""
    G, D, trainer, analyzer = _run(3)
    trainer.train(3)
    ledger = analyzer.generator_ledger()
    assert analyzer.g_steps == 3 and trainer.iteration == 3
    gap = ledger.delta - ledger.contributions.sum(1) - ledger.rest - ledger.sketch_error - ledger.residual
    assert float(gap.abs().max()) <= 1e-12 * float(ledger.traffic.max())
