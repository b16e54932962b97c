"""Per-example ledgers without per-group copies: the tracker's factored route (plain SGD)."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss

from test_factored import Mixed, convnet


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2)
    ).to(dtype)


def sgd(model, **extra):
    """Two parameter groups with their own learning rates (biases apart, as in many recipes)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    biases = [p for n, p in trainable if n.endswith("bias")]
    others = [p for n, p in trainable if not n.endswith("bias")]
    return torch.optim.SGD([{"params": biases, "lr": 0.03}, {"params": others, "lr": 0.1, **extra}], lr=0.1)


def batches(kind, dtype, steps=3, batch=10):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        if kind == "mixed":
            x = torch.randint(0, 11, (batch, 7), generator=g)
            y = torch.randn(batch, 3, generator=g, dtype=dtype)
        elif kind == "convnet":
            x = torch.randn(batch, 1, 8, 8, generator=g, dtype=dtype)
            y = torch.randn(batch, 4, generator=g, dtype=dtype)
        else:
            x = torch.randn(batch, 3, generator=g, dtype=dtype)
            y = torch.randn(batch, 2, generator=g, dtype=dtype)
        out.append((x, y))
    return out


def build(kind, dtype):
    torch.manual_seed(0)
    if kind == "mixed":
        return Mixed().to(dtype), torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(2))
    if kind == "convnet":
        return convnet(dtype), torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return mlp(dtype), torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)


def run(kind, group_state, dtype=torch.float64, quadrature="simpson", **opt_extra):
    model, probes = build(kind, dtype)
    opt = sgd(model, **opt_extra)
    data = batches(kind, dtype)
    per_step = len(data[0][0])
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=per_step * len(data), quadrature=quadrature,
                                group_state=group_state, max_grad_norm=0.5)
    for k, (x, y) in enumerate(data):
        tracker.step(x, y, torch.arange(k * per_step, (k + 1) * per_step))
    return tracker, model


@pytest.mark.parametrize("kind", ["mlp", "mixed", "convnet"])
def test_factored_ledger_equals_the_dense_ledger(kind):
    """Embedding, Conv1d/2d, LayerNorm/GroupNorm, a custom parameter (torch.func), a module used
    twice; weight decay, clipping, two learning rates: the same ledger as the per-group copies."""
    dense, dense_model = run(kind, "dense", weight_decay=0.01)
    factored, factored_model = run(kind, "factored", weight_decay=0.01)
    assert factored.group_state == "factored"
    scale = dense.ledger.contributions.abs().max()
    assert float((factored.ledger.contributions - dense.ledger.contributions).abs().max() / scale) < 1e-10
    assert float((factored.ledger.rest - dense.ledger.rest).abs().max() / scale) < 1e-10
    assert float(dense.ledger.rest.abs().max()) > 0  # weight decay is in the rest
    torch.testing.assert_close(factored.ledger.residual, dense.ledger.residual, rtol=0, atol=1e-10 * float(scale))
    for a, b in zip(dense_model.parameters(), factored_model.parameters()):
        assert torch.equal(a, b)


def test_factored_handles_maximize_and_the_midpoint_rule():
    dense, _ = run("mlp", "dense", quadrature="midpoint", maximize=True)
    factored, _ = run("mlp", "factored", quadrature="midpoint", maximize=True)
    torch.testing.assert_close(factored.ledger.contributions, dense.ledger.contributions, rtol=1e-10, atol=1e-14)


def test_factored_float32_training_is_unchanged_and_the_ledger_adds_up():
    tracker, model = run("convnet", "factored", dtype=torch.float32, quadrature="midpoint")
    untracked, _ = build("convnet", torch.float32)
    opt = sgd(untracked)
    for x, y in batches("convnet", torch.float32):
        opt.zero_grad()
        mse_loss(untracked(x), y).mean().backward()
        # In the optimizer's parameter order, as OptimizerStep clips (the norm's float32 sum
        # depends on the order).
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 0.5)
        opt.step()
    for a, b in zip(model.parameters(), untracked.parameters()):
        assert torch.equal(a, b)
    ledger = tracker.ledger
    total = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12)
    # The residual (quadrature error: ReLU kinks, lr 0.1) is the dense route's, up to float32 rounding.
    dense, _ = run("convnet", "dense", dtype=torch.float32, quadrature="midpoint")
    gap = float((ledger.residual - dense.ledger.residual).norm() / ledger.delta.norm())
    assert gap < 1e-5, gap


def test_cost_does_not_grow_with_the_number_of_groups():
    """One group per example over a long run: the dense route would hold (G + 2) × P float64
    values per step (here 200 002 × 4 386 × 8 bytes ≈ 7 GB); the factored route holds none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = PathKernelTracker(model, opt, mse_loss, torch.randn(8, 2), num_groups=200_000)
    assert tracker.group_state == "factored"  # "auto" for plain SGD
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    ids = torch.arange(32) * 6000
    tracker.step(x, y, ids)
    assert tracker.ledger.contributions.shape == (8, 200_000, 1)
    touched = tracker.ledger.contributions[:, ids].abs().sum()
    assert float(tracker.ledger.contributions.abs().sum() - touched) == 0.0
    assert tracker.ledger.relative_residual() < 1e-2


def test_auto_chooses_dense_where_factors_cannot_carry_the_update():
    model, probes = build("mlp", torch.float64)
    adam = PathKernelTracker(model, torch.optim.Adam(model.parameters()), mse_loss, probes, num_groups=40)
    momentum = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mse_loss, probes,
                                 num_groups=40)
    # d = 4 outputs per probe, 2 groups: 3 JVPs beat 4 backward cotangents.
    wide, wide_probes = build("convnet", torch.float64)
    few_groups = PathKernelTracker(wide, torch.optim.SGD(wide.parameters(), lr=0.1), mse_loss, wide_probes,
                                   num_groups=2)
    assert (adam.group_state, momentum.group_state, few_groups.group_state) == ("dense", "dense", "dense")


def test_factored_refuses_what_it_cannot_follow():
    model, probes = build("mlp", torch.float64)
    with pytest.raises(ValueError, match="plain SGD"):
        PathKernelTracker(model, torch.optim.Adam(model.parameters()), mse_loss, probes, num_groups=4,
                          group_state="factored")
    with pytest.raises(ValueError, match="group_state must be one of"):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4,
                          group_state="sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=4, group_state="factored")
    (x, y), = batches("mlp", torch.float64, steps=1, batch=4)
    tracker.step(x, y, torch.arange(4))
    opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="no longer plain SGD"):
        tracker.step(x, y, torch.arange(4))


def test_resume_checks_the_group_state(tmp_path):
    model, probes = build("mlp", torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    factored = PathKernelTracker(model, opt, mse_loss, probes, num_groups=4, group_state="factored")
    (x, y), = batches("mlp", torch.float64, steps=1, batch=4)
    factored.step(x, y, torch.arange(4))
    factored.save(tmp_path / "t.pt")
    resumed = PathKernelTracker(model, opt, mse_loss, probes, num_groups=4, group_state="factored")
    resumed.load(tmp_path / "t.pt")
    assert torch.equal(resumed.ledger.contributions, factored.ledger.contributions)
    dense = PathKernelTracker(model, opt, mse_loss, probes, num_groups=4, group_state="dense")
    with pytest.raises(ValueError, match="group_state"):
        dense.load(tmp_path / "t.pt")
