"""The DataLoader position the trainers checkpoint (genkernel.core.tracking.batches), for the samplers
people build: a batch sampler drawing from its own generator, and DistributedSampler, whose order is
drawn from seed + epoch. What must hold: every epoch's batches are the loader's as PyTorch's own loops
see them (set_epoch called per epoch, as Lightning and accelerate call it), and a run resumed in a
later epoch is the uninterrupted one bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, TensorDataset

from genkernel.diffusion import DDPMTrainer, make_scheduler
from test_ddpm_trainer import StepRecorder, ring
from test_resume import elsewhere, same, small_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = TensorDataset(ring(24))  # 6 batches of 4 per epoch


def batch_sampled():
    sampler = RandomSampler(DATA, generator=torch.Generator().manual_seed(3))
    return DataLoader(DATA, batch_sampler=BatchSampler(sampler, batch_size=4, drop_last=False))


def distributed():
    return DataLoader(DATA, batch_size=4, sampler=DistributedSampler(DATA, num_replicas=1, rank=0, shuffle=True, seed=7))


def trainer(loader, *callbacks, **kwargs):
    return DDPMTrainer(small_mlp(), make_scheduler(50), loader, lr=1e-2, progress=False, callbacks=list(callbacks),
                       **kwargs)


def epochs_by_hand(loader, epochs):
    """Each epoch's batches as PyTorch's loop sees them: set_epoch(e) on a sampler that takes it, then iterate."""
    out = []
    for epoch in range(epochs):
        sampler = loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        out.extend(batch for (batch,) in loader)
    return out


@pytest.mark.parametrize("make", [batch_sampled, distributed], ids=["batch_sampler", "distributed_sampler"])
def test_every_epoch_is_the_loaders_own_and_a_resume_in_a_later_epoch_is_the_straight_run(tmp_path, make):
    recorder = StepRecorder()
    straight = trainer(make(), recorder)
    straight.train(15)  # two epochs and a half
    expected = epochs_by_hand(make(), 3)[:15]
    assert all(torch.equal(a, b) for a, b in zip(recorder.clean, expected))
    assert not torch.equal(torch.stack(expected[:6]), torch.stack(expected[6:12]))  # the second epoch reshuffled
    trainer(make(), checkpoint_dir=tmp_path, checkpoint_every=8).train(8)  # 2 batches into the second epoch
    resumed = trainer(make())
    elsewhere()
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(7)
    same(straight.model.state_dict(), resumed.model.state_dict(), "model")
    assert straight.losses == resumed.losses
