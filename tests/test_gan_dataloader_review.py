"""Review of GANTrainer on a DataLoader (tests/test_gan_dataloader.py) and of the batches it reads
through (genkernel.core.tracking.batches).

Faults: a DataLoader of an ``IterableDataset`` (a streaming data set, the kind that does not fit in
memory) has no length, and every checkpoint of a GAN (or DDPM) run on it raised a TypeError; a
batch shaped unlike the generator's samples failed in ``torch.cat`` without saying so; a checkpoint
that records no loader position (written on Tensor data before the settings were recorded) was
half loaded into a DataLoader trainer before a TypeError. Coverage: BatchNorm G and D with an EMA and
two LR schedules, d_steps across epoch boundaries (drop_last either way) resumed at every
iteration; a conditional WGAN-GP's last smaller batch in the analyzer's discriminator ledger;
checkpoints of the other kind of data refused, older Tensor checkpoints still resumed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from genkernel.diffusion import DDPMTrainer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from test_conditional_gan import ConditionalD, ConditionalG
from test_ddpm_trainer import ring
from test_resume import elsewhere, same, small_mlp

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class Streamed(IterableDataset):
    """A streaming data set (webdataset, a Hugging Face streaming split): rows in order, no length."""

    def __init__(self, points):
        self.points = points

    def __iter__(self):
        return iter(self.points)


def mlp_gan(data, *callbacks, **kwargs):
    torch.manual_seed(0)
    generator, discriminator = MLPGenerator(2, 2, hidden=16, depth=2).double(), MLPDiscriminator(2, hidden=16, depth=2).double()
    settings = dict(d_steps=2, seed=3, loss="wgan-gp")
    settings.update(kwargs)
    return GANTrainer(generator, discriminator, data, callbacks=list(callbacks), **settings)


# ------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------
def test_a_gan_on_a_streaming_dataset_checkpoints_and_resumes_bit_for_bit(tmp_path):
    # fails before the fix: save_checkpoint raised "TypeError: object of type 'Streamed' has no len()"
    def data():
        return DataLoader(Streamed(ring(40)), batch_size=16)  # 16, 16, 8 per epoch

    straight = mlp_gan(data())
    straight.train(5)
    mlp_gan(data(), checkpoint_dir=tmp_path, checkpoint_every=2).train(2)  # 4 batches in: mid-epoch 2
    resumed = mlp_gan(data())
    elsewhere()
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.state_dict()["config"]["batches_per_epoch"] is None  # unknown: not compared
    resumed.train(5)
    same(straight.state_dict(), resumed.state_dict())


def test_a_ddpm_run_on_a_streaming_dataset_checkpoints_and_resumes_bit_for_bit(tmp_path):
    # fails before the fix (and before the refactor): save_checkpoint raised a TypeError (no len())
    def make(**kwargs):
        torch.manual_seed(0)
        return DDPMTrainer(small_mlp(), make_scheduler(10), DataLoader(Streamed(ring(40)), batch_size=16), lr=1e-2,
                           progress=False, **kwargs)

    straight = make()
    straight.train(7)
    make(checkpoint_dir=tmp_path, checkpoint_every=4).train(4)  # one epoch and a batch
    resumed = make()
    elsewhere()
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(3)
    same(straight.model.state_dict(), resumed.model.state_dict())
    assert straight.losses == resumed.losses


def test_a_batch_shaped_unlike_the_generators_samples_is_refused_naming_both_shapes():
    # fails before the fix: torch.cat's "RuntimeError: The size of tensor a (4) must match the size of tensor b (2)"
    run = mlp_gan([ring(8), ring(8).repeat(1, 2)], batch_size=8)
    with pytest.raises(ValueError, match=r"shaped \(4,\).*generator's samples are shaped \(2,\)"):
        run.train(2)
    assert run.d_steps_done == 1  # the first batch trained on, nothing of the second


def test_a_checkpoint_without_a_loader_position_is_refused_before_anything_is_loaded():
    # fails before the fix: a TypeError ('NoneType' object is not subscriptable) once G, D and both optimizers
    # were already overwritten with the checkpoint's
    saved = mlp_gan(ring(40), batch_size=16)
    saved.train(1)
    state = saved.state_dict()
    del state["config"]  # a checkpoint from before trainers recorded their settings: nothing is compared
    run = mlp_gan(DataLoader(TensorDataset(ring(40)), batch_size=16))
    before = {k: v.clone() for k, v in run.generator.state_dict().items()}
    with pytest.raises(ValueError, match="records no DataLoader position"):
        run.load_state_dict(state)
    same(before, run.generator.state_dict())
    assert run.iteration == 0


# ------------------------------------------------------------------------------------------
# coverage
# ------------------------------------------------------------------------------------------
class BatchNormG(nn.Module):
    latent_dim = 2

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, z):
        return self.net(z)


class BatchNormD(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batchnorm_players_with_an_ema_and_schedules_resume_at_every_iteration_across_epochs(tmp_path, drop_last):
    from diffusers.training_utils import EMAModel

    def make(**kwargs):
        torch.manual_seed(0)
        generator, discriminator = BatchNormG().double(), BatchNormD().double()
        data = DataLoader(TensorDataset(ring(40)), batch_size=16, shuffle=True, drop_last=drop_last)  # global-RNG order
        return GANTrainer(generator, discriminator, data, d_steps=3, seed=3, loss="hinge",
                          ema=EMAModel(generator.parameters(), decay=0.9),
                          lr_scheduler_g=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
                          lr_scheduler_d=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5), **kwargs)

    straight = make()
    straight.train(4)  # 12 batches: 4 epochs of 3, or 6 of 2 (drop_last)
    for k in range(1, 4):  # checkpoints at every iteration: epoch boundaries and mid-epoch
        make(checkpoint_dir=tmp_path / str(k), checkpoint_every=k).train(k)
        resumed = make()
        elsewhere()
        resumed.load_checkpoint(tmp_path / str(k) / "checkpoint.pt")
        resumed.train(4)
        same(straight.state_dict(), resumed.state_dict())
    assert straight.lr_scheduler_d.last_epoch == straight.d_steps_done == 12
    assert straight.lr_scheduler_g.last_epoch == straight.g_steps == 4


def test_a_conditional_wgan_gps_last_smaller_batch_fills_the_discriminator_ledgers_role_groups():
    points, classes = ring(30), torch.arange(30) % 3
    torch.manual_seed(0)
    generator, discriminator = ConditionalG().double(), ConditionalD().double()
    analyzer = GANKernelAnalyzer(generator, discriminator, torch.randn(6, 3, dtype=F64), probe_classes=torch.arange(6) % 3,
                                 num_classes=3, grouping="class", window=2, eval_every=1, discriminator_groups="role")
    data = DataLoader(TensorDataset(points, classes), batch_size=12)  # 12, 12, 6
    run = GANTrainer(generator, discriminator, data, num_classes=3, class_sampling="uniform", latent_dim=3,
                     loss="wgan-gp", d_steps=2, seed=3, callbacks=[analyzer])
    run.train(3)
    # every discriminator step: b real, b generated and b penalty rows (at the real rows' classes), each its role
    sizes = [12, 12, 6, 12, 12, 6]
    assert analyzer.d_steps == run.d_steps_done == 6
    assert [sorted(counts) for counts in analyzer.d_group_counts] == [[b, b, b] for b in sizes]
    assert run.batch_size == 12


def test_checkpoints_of_the_other_kind_of_data_are_refused_and_older_tensor_ones_still_resume(tmp_path):
    tensor_run = mlp_gan(ring(40), batch_size=16)
    tensor_run.train(1)
    tensor_state = tensor_run.state_dict()
    loader_run = mlp_gan(DataLoader(TensorDataset(ring(40)), batch_size=16))
    loader_run.train(1)
    with pytest.raises(ValueError, match="data: saved 'Tensor', here 'iterable'"):
        mlp_gan(DataLoader(TensorDataset(ring(40)), batch_size=16)).load_state_dict(tensor_state)
    with pytest.raises(ValueError, match="data: saved 'iterable', here 'Tensor'"):
        mlp_gan(ring(40), batch_size=16).load_state_dict(loader_run.state_dict())
    with pytest.raises(ValueError, match="batches_per_epoch: saved 3, here 4"):
        mlp_gan(DataLoader(TensorDataset(ring(64)), batch_size=16)).load_state_dict(loader_run.state_dict())
    # a checkpoint from before DataLoaders (no "data", "batches_per_epoch", "iterable") resumes a Tensor run
    older = dict(tensor_state, config={k: v for k, v in tensor_state["config"].items() if k not in ("data", "batches_per_epoch")})
    del older["iterable"]
    resumed = mlp_gan(ring(40), batch_size=16)
    elsewhere()
    resumed.load_state_dict(older)
    resumed.train(3)
    straight = mlp_gan(ring(40), batch_size=16)
    straight.train(3)
    same(straight.state_dict(), resumed.state_dict())
