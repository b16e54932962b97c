"""Checkpoint and resume of the trainers, against uninterrupted runs.

A run interrupted at step k and resumed from its checkpoint in a fresh trainer (the global RNG
moved elsewhere, as in a new process) must end bit for bit where the uninterrupted run ends:
parameters, optimizer state, generators, the global RNG (dropout), the data order and the
analyzers' states. A checkpoint of another set-up is refused before anything is loaded, and a
file that is not a genkernel state is a clear error.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genkernel.core.tracking.io import atomic_save, load_state
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator
from test_ddpm_trainer import ring

T = 100
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def small_mlp(seed=0, hidden=16):
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=hidden, depth=2, time_dim=8).double()


class DropoutDenoiser(nn.Module):
    """An MLP denoiser with dropout on its output: its masks come from the global RNG."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = small_mlp(seed)
        self.drop = nn.Dropout(0.3)

    def forward(self, x_t, t):
        return self.drop(self.net(x_t, t))


class DropoutCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def same(a, b, where="state"):
    """Assert two nested states are equal bit for bit (tensors: dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def elsewhere():
    """A fresh process: the global RNG is not where the interrupted run left it (called after the
    models are built, which seed it)."""
    torch.manual_seed(12345)


def assert_resumes_bit_for_bit(build, directory, total: int, stop: int):
    """A trainer from ``build(**kwargs)`` trained ``total`` steps straight, and one stopped at a checkpoint after
    ``stop`` and resumed by a fresh trainer "elsewhere", end with the same model and losses, bit for bit;
    returns ``(straight, resumed)``."""
    straight = build()
    straight.train(total)
    build(checkpoint_dir=directory, checkpoint_every=stop).train(stop)
    resumed = build()
    elsewhere()
    assert resumed.resume(directory / "checkpoint.pt")
    resumed.train(total - stop)
    same(straight.state_dict()["model"], resumed.state_dict()["model"], "model")
    assert straight.losses == resumed.losses
    return straight, resumed


# ------------------------------------------------------------------------------------------
# bit-for-bit resume
# ------------------------------------------------------------------------------------------
def test_a_ddpm_run_with_its_analyzer_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    scheduler, data = make_scheduler(T), ring(40)

    def make(**kwargs):
        analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=3, num_probes=8, kernel_points=4, progress=False)
        return DDPMTrainer(small_mlp(), scheduler, data, batch_size=16, lr=1e-2, max_grad_norm=0.5, progress=False,
                           callbacks=[analyzer], **kwargs)

    straight = make()
    straight.train(6)
    make(checkpoint_dir=tmp_path, checkpoint_every=3).train(3)  # step 3: 8 rows into the second epoch
    resumed = make()
    elsewhere()
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(3)
    same(straight.state_dict(), resumed.state_dict())
    assert straight.global_step == resumed.global_step == 6


def test_a_model_with_dropout_resumes_bit_for_bit(tmp_path):
    scheduler, data = make_scheduler(T), ring(40)
    straight = DDPMTrainer(DropoutDenoiser(), scheduler, data, batch_size=16, lr=1e-2, progress=False)
    straight.train(6)
    DDPMTrainer(DropoutDenoiser(), scheduler, data, batch_size=16, lr=1e-2, progress=False, checkpoint_dir=tmp_path,
                checkpoint_every=3).train(3)
    resumed = DDPMTrainer(DropoutDenoiser(), scheduler, data, batch_size=16, lr=1e-2, progress=False)
    elsewhere()
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(3)
    same(straight.model.state_dict(), resumed.model.state_dict(), "model")
    same(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    assert straight.losses == resumed.losses


@pytest.mark.parametrize("interrupt_at", [3, 5])  # mid-epoch, and at the end of the first epoch (5 batches)
def test_a_loader_shuffled_by_the_global_rng_resumes_to_the_same_order(tmp_path, interrupt_at):
    scheduler, data = make_scheduler(T), ring(40)

    def make(**kwargs):  # DataLoader(shuffle=True) without generator=: its order comes from the global RNG
        loader = DataLoader(TensorDataset(data), batch_size=8, shuffle=True)
        return DDPMTrainer(small_mlp(), scheduler, loader, lr=1e-2, progress=False, **kwargs)

    straight = make()
    torch.manual_seed(5)
    straight.train(8)
    interrupted = make(checkpoint_dir=tmp_path, checkpoint_every=interrupt_at)
    torch.manual_seed(5)
    interrupted.train(interrupt_at)
    resumed = make()
    elsewhere()
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(8 - interrupt_at)
    same(straight.model.state_dict(), resumed.model.state_dict(), "model")
    assert straight.losses == resumed.losses


def _gan(critic="dropout", **kwargs):
    torch.manual_seed(0)
    generator = MLPGenerator(2, 2, hidden=16, depth=2).double()
    discriminator = (DropoutCritic() if critic == "dropout" else MLPDiscriminator(2, hidden=16, depth=2)).double()
    settings = dict(batch_size=16, d_steps=2, seed=3, loss="hinge", max_grad_norm=1.0)
    settings.update(kwargs)
    return GANTrainer(generator, discriminator, ring(64), **settings)


def test_a_gan_with_dropout_in_its_discriminator_resumes_bit_for_bit(tmp_path):
    straight = _gan()
    straight.train(4)
    _gan(checkpoint_dir=tmp_path, checkpoint_every=2).train(2)
    resumed = _gan(checkpoint_dir=tmp_path)
    elsewhere()
    resumed.train(4, resume=True)
    same(straight.state_dict(), resumed.state_dict())


# ------------------------------------------------------------------------------------------
# another set-up is refused, before anything is loaded
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (dict(batch_size=8), "batch_size: saved 16, here 8"),
    (dict(data=ring(30)), r"data_shape: saved \[40, 2\], here \[30, 2\]"),
    (dict(data=ring(50)), r"data_shape: saved \[40, 2\], here \[50, 2\]"),
    (dict(dtype=torch.float32), "dtype: saved 'torch.float64', here 'torch.float32'"),
    (dict(optimizer="sgd"), "optimizer: saved 'Adam', here 'SGD'"),
    (dict(optimizer="adamw"), "optimizer: saved 'Adam', here 'AdamW'"),
    (dict(shuffle=False), "shuffle: saved True, here False"),
    (dict(hidden=32), "model does not fit this model"),
])
def test_a_ddpm_checkpoint_of_another_setup_is_refused_and_loads_nothing(tmp_path, change, match):
    scheduler = make_scheduler(T)
    saved = DDPMTrainer(small_mlp(), scheduler, ring(40), batch_size=16, progress=False, checkpoint_dir=tmp_path)
    saved.train(3)
    saved.save_checkpoint()
    settings = dict(data=ring(40), batch_size=16, dtype=F64, optimizer="adam", shuffle=True, hidden=16)
    settings.update(change)
    model = small_mlp(seed=1, hidden=settings.pop("hidden")).to(settings.pop("dtype"))
    data = settings.pop("data").to(next(model.parameters()).dtype)
    other = DDPMTrainer(model, scheduler, data, progress=False, checkpoint_dir=tmp_path, **settings)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        other.resume()
    same(before, other.model.state_dict(), "model after the refusal")
    assert other.global_step == 0 and not other.optimizer.state


@pytest.mark.parametrize("change,match", [
    (dict(batch_size=8), "batch_size: saved 16, here 8"),
    (dict(d_steps=1), "d_steps: saved 2, here 1"),
    (dict(loss="nonsaturating"), "loss: saved 'hinge', here 'nonsaturating'"),
])
def test_a_gan_checkpoint_of_another_setup_is_refused_and_loads_nothing(tmp_path, change, match):
    _gan(critic="mlp", checkpoint_dir=tmp_path, checkpoint_every=1).train(1)
    other = _gan(critic="mlp", checkpoint_dir=tmp_path, **change)
    before = {k: v.clone() for k, v in other.generator.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        other.train(2, resume=True)
    same(before, other.generator.state_dict(), "generator after the refusal")
    assert other.iteration == 0


def test_a_gan_checkpoint_in_another_dtype_is_refused(tmp_path):
    _gan(critic="mlp", checkpoint_dir=tmp_path, checkpoint_every=1).train(1)
    torch.manual_seed(0)
    other = GANTrainer(MLPGenerator(2, 2, hidden=16, depth=2), MLPDiscriminator(2, hidden=16, depth=2),
                       ring(64).float(), batch_size=16, d_steps=2, loss="hinge", max_grad_norm=1.0,
                       checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="dtype: saved 'torch.float64', here 'torch.float32'"):
        other.train(2, resume=True)


def test_gan_trainer_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="resume=True reads checkpoint_dir"):
        _gan(critic="mlp").train(2, resume=True)  # would silently train from scratch
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        _gan(critic="mlp").train(-1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        _gan(critic="mlp", batch_size=2.5)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 0"):
        _gan(critic="mlp", checkpoint_every=-1, checkpoint_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------
class NotAState:
    pass


def test_files_that_are_not_genkernel_states_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save({"format": "x", "a": torch.ones(1000)}, good)
    raw = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"hello world\n")
    torch.save({"format": "x", "object": NotAState()}, tmp_path / "object.pt")
    for name in ("truncated", "empty", "text"):
        with pytest.raises(ValueError, match="is not a readable genkernel state file"):
            load_state(tmp_path / f"{name}.pt", "x")
    with pytest.raises(ValueError, match="objects other than tensors, numbers, strings and containers"):
        load_state(tmp_path / "object.pt", "x")
    trainer = DDPMTrainer(small_mlp(), make_scheduler(T), ring(40), progress=False)
    with pytest.raises(ValueError, match="is not a readable genkernel state file"):
        trainer.resume(tmp_path / "empty.pt")
    assert load_state(good, "x")["a"].sum() == 1000


def test_a_save_over_a_left_over_temporary_file_replaces_the_file_and_removes_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "x", "v": torch.zeros(3)}, path)
    stale = tmp_path / ".checkpoint.pt.abcdefgh.tmp"  # what a save killed half-way leaves
    stale.write_bytes(b"half a file")
    atomic_save({"format": "x", "v": torch.ones(3)}, path)
    assert torch.equal(load_state(path, "x")["v"], torch.ones(3))
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
