"""A refused checkpoint stays refused, and a truncated one is named (a helper's hunt).

Before:
1. A resume whose analyzer state this analyzer refuses (other num_bins) raised after the model, the optimizer and
   the step count were loaded (the trainer is to be "left as it was"), and the state had been popped from the
   pending ones before it was tried: the next train() went on silently, the analyzer starting a new ledger in the
   middle of the resumed run (ledger steps [4, 5] of a run at step 5).
2. A checkpoint cut off past its first records raised torch's bare ``OSError: [Errno 22] Invalid argument``, with
   no path and no word of truncation."""

from __future__ import annotations

import math

import pytest
import torch

from genkernel.core.tracking.io import atomic_save, load_state
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def ring(n: int) -> torch.Tensor:
    angle = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def trainer(bins: int, **settings):
    scheduler, data = make_scheduler(100), ring(40)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=bins, num_probes=8, kernel_points=4, progress=False)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    return DDPMTrainer(model, scheduler, data, batch_size=16, lr=1e-2, progress=False, callbacks=[analyzer],
                       **settings), analyzer


def test_a_refused_analyzer_state_keeps_training_refused(tmp_path):
    first, _ = trainer(3, checkpoint_dir=tmp_path, checkpoint_every=3)
    first.train(3)
    other, analyzer = trainer(4, checkpoint_dir=tmp_path)
    fresh = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError):
        other.resume()
    # left as it was (before: the model, optimizer and step count were loaded before the analyzer refused)
    assert other.global_step == 0 and not other.optimizer.state
    assert all(torch.equal(v, fresh[k]) for k, v in other.model.state_dict().items())
    with pytest.raises(ValueError):  # (before: trained on, a new ledger from step 4)
        other.train(2)
    assert analyzer.global_steps == []  # (nothing tracked)


@pytest.mark.parametrize("kept", [0.5, 0.9, 0.99])
def test_a_truncated_checkpoint_is_named(tmp_path, kept):
    path = tmp_path / "state.pt"
    atomic_save({"format": "x", "a": torch.randn(1000, dtype=F64), "b": list(range(10))}, path)
    whole = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: int(len(whole) * kept)])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable genkernel state file \(truncated"):
        load_state(cut)
