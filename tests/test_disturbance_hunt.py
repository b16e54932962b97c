"""Training untouched by analysis, in three places a helper's hunt found it was not (each silent).

1. A BatchNorm inside a non-reentrant activation checkpoint, in an observed loop: every backward the tracker takes
   through the loop's graph reran the checkpointed forward, and the BatchNorm updated its running statistics once
   more per pass (num_batches_tracked 9 for 6 after three steps, running_var 0.137 apart; the GAN analyzer's
   checkpointed D 30 for 18, and D's ledger booked that drift as buffer_drift).
2. A generator a module keeps below its direct attributes (in a helper object that is not a module, in a list
   attribute) was advanced by the construction's checks, whose forwards put back only the global generators and a
   module's direct ones: training drew other numbers (2.98e-3 apart after four steps).
3. The GAN analyzer's first grouping fit imported sklearn.cluster, whose import draws from Python's random (rich's
   style ids): a loop flipping its batch with random.random() trained on other data with the analyzer attached."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")


class CheckpointedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)

    def forward(self, x):
        return self.b(checkpoint(lambda h: F.silu(self.bn(self.a(h))), x, use_reentrant=False))


def observed_run(tracked: bool, steps: int = 3):
    torch.manual_seed(0)
    model = CheckpointedNorm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8 * steps, 4, generator=g), torch.randn(8 * steps, 2, generator=g)
    probes = torch.randn(5, 4, generator=g)
    tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=3) if tracked else None
    for k in range(steps):
        rows = torch.arange(8 * k, 8 * k + 8)
        losses = ((model(x[rows]) - y[rows]) ** 2).mean(1)
        if tracker is not None:
            tracker.observe(losses, rows % 3)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, tracker


def test_a_checkpointed_batch_norm_keeps_its_statistics_under_an_observing_tracker():
    bare, _ = observed_run(False)
    tracked, tracker = observed_run(True)
    # (6: each step's forward and the loop's own backward rerunning the checkpoint; the tracker's passes add none)
    assert int(bare.bn.num_batches_tracked) == int(tracked.bn.num_batches_tracked) == 6
    for name, value in bare.state_dict().items():
        assert torch.equal(value, tracked.state_dict()[name]), name
    ledger = tracker.ledger
    gap = (ledger.contributions.sum(1) + ledger.rest + ledger.residual - ledger.delta).abs().max()
    assert float(gap) <= 1e-6 * float(ledger.delta.abs().max())


class Jitter:
    """A helper object (not a module) with its own generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, h):
        return h + 0.01 * torch.randn(h.shape, generator=self.generator)


class NoisyDenoiser(nn.Module):
    def __init__(self, where: str):
        super().__init__()
        self.a, self.b, self.where = nn.Linear(5, 32), nn.Linear(32, 4), where
        if where == "helper object":
            self.jitter = Jitter(1)
        else:
            self.generators = [torch.Generator().manual_seed(1)]

    def forward(self, x, t):
        h = torch.tanh(self.a(torch.cat([x, t[:, None].float() / 50], 1)))
        if self.training:
            h = self.jitter(h) if self.where == "helper object" else h + 0.01 * torch.randn(
                h.shape, generator=self.generators[0])
        return self.b(h)


@pytest.mark.parametrize("where", ["helper object", "list attribute"])
def test_a_generator_kept_below_a_modules_attributes_is_put_back(where):
    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler

    def run(analyzed: bool):
        torch.manual_seed(0)
        model = NoisyDenoiser(where)
        data = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
        callbacks = [NoiseLevelAnalyzer(make_scheduler(50), torch.randn(6, 4, generator=torch.Generator().manual_seed(3)),
                                        num_bins=3, num_probes=6, controls=1, kernel_points=2, progress=False)
                     ] if analyzed else []
        trainer = DDPMTrainer(model, make_scheduler(50), data, batch_size=8, lr=1e-2, progress=False, callbacks=callbacks)
        trainer.train(3)
        return [p.detach().clone() for p in model.parameters()], trainer.losses

    (bare, bare_losses), (analyzed, analyzed_losses) = run(False), run(True)
    assert bare_losses == analyzed_losses
    assert all(torch.equal(p, q) for p, q in zip(bare, analyzed))


CHILD = r'''
import random, sys
import torch
torch.set_num_threads(1)
from genkernel.gan.geometry import make_grouping
random.seed(0)
before = random.getstate()
grouping = make_grouping("direction", num_groups=2, centers=None, seed=0)
g = torch.Generator().manual_seed(0)
z, x, w = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
grouping.fit(z, x, w, None)
print("same" if random.getstate() == before else "moved")
'''


def test_the_first_grouping_fit_leaves_pythons_random_alone():
    """In a fresh process (sklearn imported by the fit itself, as in a user's first run)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "same"
