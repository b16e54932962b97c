"""What must hold on CUDA as on the CPU: exact ledgers, training that the analysis leaves
bit-for-bit unchanged (deterministic algorithms), engines that agree. Skipped without a GPU;
``make gpu-check`` runs them where one is present."""

import os

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler, tiny_unet
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).to(device=DEVICE, dtype=dtype)


def test_the_ledger_adds_up_on_cuda():
    model = mlp()
    g = torch.Generator().manual_seed(1)
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=1e-2), mse_loss,
                                torch.randn(8, 3, generator=g, dtype=torch.float64).to(DEVICE), num_groups={"a": 3, "b": 2},
                                quadrature="simpson")
    for _ in range(3):
        x = torch.randn(16, 3, generator=g, dtype=torch.float64).to(DEVICE)
        y = torch.randn(16, 2, generator=g, dtype=torch.float64).to(DEVICE)
        ids = torch.randint(0, 3, (16,), generator=g).to(DEVICE)
        tracker.step(x, y, {"a": ids, "b": ids % 2})
    for ledger in tracker.ledgers.values():
        torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                                   rtol=0, atol=1e-12)
        assert ledger.relative_residual() < 1e-6


def test_engines_agree_on_cuda():
    model = mlp(torch.float64)
    x = torch.randn(12, 3, dtype=torch.float64, device=DEVICE)
    reference = gradient_kernel(model, x, engine="functional")
    torch.testing.assert_close(gradient_kernel(model, x, engine="factored"), reference, rtol=1e-9, atol=1e-12)


def test_the_analyzer_leaves_unet_training_bit_for_bit_unchanged_on_cuda():
    scheduler = make_scheduler(100, clip_sample=True)
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(32, 1, 16, 16, generator=g) * 2 - 1).to(DEVICE)

    def trainer(analyze):
        torch.manual_seed(0)
        model = tiny_unet(16, 1, channels=(8, 16)).to(DEVICE)
        callbacks = []
        if analyze:
            callbacks.append(NoiseLevelAnalyzer(scheduler, data[:8], num_bins=4, num_probes=8, kernel_points=2,
                                                state_dtype=torch.float32, progress=False))
        t = DDPMTrainer(model, scheduler, data, batch_size=8, progress=False, callbacks=callbacks)
        t.train(3)
        return t

    bare, tracked = trainer(False), trainer(True)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    ledger = tracked.callbacks[0].ledger
    assert ledger.steps == 3 and ledger.relative_residual() < 1e-2
