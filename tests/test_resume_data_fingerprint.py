"""A checkpoint records a fingerprint of its Tensor data (core.tracking.io.data_fingerprint), so a
resume on other data of the same shape (another subset, normalization, order or labels) is refused:
before, only the shape was compared and the run went on with the new data mixed in."""

import pytest
import torch

from genkernel.core.tracking.io import data_fingerprint
from genkernel.diffusion import DDPMTrainer, make_scheduler
from genkernel.diffusion.models import MLPDenoiser
from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

F64 = torch.float64


def _points(seed=3):
    return torch.randn(24, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_the_fingerprint_reads_values_order_dtype_and_labels():
    x = _points()
    assert data_fingerprint(x) == data_fingerprint(x.clone())
    assert data_fingerprint(x) != data_fingerprint(x * (1 + 1e-12))
    assert data_fingerprint(x) != data_fingerprint(x.flip(0))
    assert data_fingerprint(x) != data_fingerprint(x.float())
    labels = torch.arange(24) % 3
    assert data_fingerprint(x, labels) != data_fingerprint(x, labels.flip(0))
    big = torch.randn(5000, 3)
    changed = big.clone()
    changed[4999, 0] += 1  # the last row is always read
    assert data_fingerprint(big) != data_fingerprint(changed)


def _ddpm(data, tmp_path):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=8, depth=2, time_dim=4).double()
    return DDPMTrainer(model, make_scheduler(20), data, batch_size=6, checkpoint_dir=tmp_path, progress=False)


def test_a_ddpm_checkpoint_resumes_on_its_own_data_only(tmp_path):
    trainer = _ddpm(_points(), tmp_path)
    trainer.train(2)
    trainer.save_checkpoint()
    with pytest.raises(ValueError, match="data_fingerprint"):
        _ddpm(_points(seed=4), tmp_path).resume()  # before: resumed, training on other points
    with pytest.raises(ValueError, match="data_fingerprint"):
        _ddpm(_points() * 2, tmp_path).resume()
    assert _ddpm(_points(), tmp_path).resume()


def _gan(data, tmp_path, labels=None):
    torch.manual_seed(0)
    G, D = MLPGenerator(3, 2, hidden=6).double(), MLPDiscriminator(2, hidden=6).double()
    return GANTrainer(G, D, data, labels=labels, batch_size=6, checkpoint_dir=tmp_path, progress=False)


def test_a_gan_checkpoint_resumes_on_its_own_data_only(tmp_path):
    trainer = _gan(_points(), tmp_path)
    trainer.train(2)
    path = tmp_path / "checkpoint.pt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="data_fingerprint"):
        _gan(_points(seed=4), tmp_path).load_checkpoint(path)  # before: resumed, training on other points
    _gan(_points(), tmp_path).load_checkpoint(path)
