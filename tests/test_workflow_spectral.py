"""CheckpointKernels against brute force: per-example gradients by explicit autograd loops in
float64, the path kernel K^p = Σ_k η_k k_θk with η_k the real step sizes written out, and the
Domingos sum against the real change."""

import pytest
import torch
from torch import nn

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.supervised import SupervisedTrainer, mse_loss
from genkernel.supervised.checkpoint_kernels import CheckpointKernels

from test_kernels import brute_jacobians

F64 = torch.float64


class _StepScheduler(TrainerCallback):
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def on_step_end(self, trainer, step):
        self.scheduler.step()


def test_checkpoint_weights_follow_a_scheduler_stepped_after_the_recorder():
    # A scheduler callback listed after the recorder used to give every checkpoint the rates of the steps
    # one earlier (weights [0.2, 0.108, 0.037] for the true [0.15, 0.078, 0.031]: the path kernel 33 % off).
    torch.manual_seed(0)
    x, y, xt = torch.randn(6, 2, dtype=F64), torch.randn(6, 1, dtype=F64), torch.randn(3, 2, dtype=F64)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    replay = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    replay.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_scheduler = _StepScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))
    at, steps = [0, 2, 5], 7
    rec = CheckpointKernels(x, xt, at=at, steps=steps)
    SupervisedTrainer(model, opt, mse_loss, batch_size=6, callbacks=[rec, step_scheduler]).fit(x, y, steps=steps)

    # Brute force: step s uses 0.1 / (1 + s); checkpoint k stands for steps at[k] .. at[k+1] - 1.
    rates = [0.1 / (1 + s) for s in range(steps)]
    ends = at[1:] + [steps]
    weights = [sum(rates[a:b]) for a, b in zip(at, ends)]
    gram, cross, self_k = torch.zeros(6, 6, dtype=F64), torch.zeros(3, 6, dtype=F64), torch.zeros(3, dtype=F64)
    change = torch.zeros(3, 1, dtype=F64)
    for s in range(steps):
        if s in at:
            w = weights[at.index(s)]
            jx, jt = brute_jacobians(replay, x), brute_jacobians(replay, xt)
            gram += w * torch.einsum("adp,bdp->ab", jx, jx)
            cross += w * torch.einsum("adp,bdp->ab", jt, jx)
            self_k += w * torch.einsum("adp,adp->a", jt, jt)
            with torch.no_grad():
                loss_weight = 2 * (replay(x) - y)
            change -= w / 6 * torch.einsum("adp,bep,be->ad", jt, jx, loss_weight)
        replay.zero_grad()
        mse_loss(replay(x), y).mean().backward()
        with torch.no_grad():
            for p in replay.parameters():
                p -= rates[s] * p.grad

    assert rec.weights == pytest.approx(weights, rel=1e-14)
    g, c, sk = rec.path_kernel()
    torch.testing.assert_close(g, gram, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, cross, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sk, self_k, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rec.kernel_machine_change(lambda f: 2 * (f - y)), change, rtol=1e-12, atol=1e-14)


def test_kernel_machine_change_refuses_batch_norm_trained_on_batch_statistics():
    # The steps normalize with the batch's statistics, the kernels with the running ones: the Domingos sum
    # gave [3.28, 0.35, 1.39] for a real change of [1.71, -0.29, 0.64], without a word.
    torch.manual_seed(0)
    x, y, xt = torch.randn(8, 2, dtype=F64), torch.randn(8, 1, dtype=F64), torch.randn(3, 2, dtype=F64)
    model = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    rec = CheckpointKernels(x, xt, every=1, steps=5)
    SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05), mse_loss, batch_size=8,
                      callbacks=[rec]).fit(x, y, steps=5)
    assert any("batch statistics" in r for r in rec.not_plain_steps)
    with pytest.raises(ValueError, match="batch statistics"):
        rec.kernel_machine_change(lambda f: 2 * (f - y))
    rec.path_kernel()  # the path kernel itself needs no plain steps


def test_path_kernel_of_a_float32_model_keeps_its_rounding_floor_for_the_spectral_tools():
    # Returned as float64, a float32 model's rank-deficient path kernel (40 inputs, 13 parameters) was refused by
    # eigendecompose as "not PSD" (eigenvalue -9.7e-8 against 6.5: float32 rounding read against float64's floor),
    # and with psd_tol raised its rounding-level eigenvalues (1e-8 λ_1) became O(1) "eigenfunctions".
    from genkernel.analysis.spectral import eigendecompose, nystrom_extend

    torch.manual_seed(0)
    x, y, xt = torch.randn(40, 1), torch.randn(40, 1), torch.randn(5, 1)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    exact = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)
    exact.load_state_dict({k: v.to(F64) for k, v in model.state_dict().items()})
    rec = CheckpointKernels(x, xt, at=[0], steps=1)
    SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, batch_size=40,
                      callbacks=[rec]).fit(x, y, steps=1)
    gram, cross, _ = rec.path_kernel()
    assert gram.dtype == torch.float32 and rec.kernel_dtype == torch.float32
    jx, jt = brute_jacobians(exact, x.to(F64)), brute_jacobians(exact, xt.to(F64))
    reference = nystrom_extend(eigendecompose(0.1 * torch.einsum("adp,bdp->ab", jx, jx)),
                               0.1 * torch.einsum("adp,bdp->ab", jt, jx))
    phi = nystrom_extend(eigendecompose(gram), cross)
    assert 1 <= phi.shape[1] <= reference.shape[1]
    sign = torch.sign((phi * reference[:, :phi.shape[1]]).sum(0))
    torch.testing.assert_close(phi * sign, reference[:, :phi.shape[1]], rtol=0, atol=1e-3 * float(reference.abs().max()))
