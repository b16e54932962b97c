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


def test_factored_convolutions_are_read_lean_from_the_training_pass_or_a_chunked_capture():
    """The factored route keeps the batch's convolution gradients materialized where that costs
    less and takes no more memory ("lean" factors), read from the training pass or, under a budget
    too small for it, from its own capture in chunks: both give the dense route's ledger."""
    from genkernel.core.cost import reads_training_pass
    from genkernel.core.engine.factored import row_chunks
    from genkernel.core.engine.per_example import capture_batch

    dense, _ = run("convnet", "dense")
    scale = float(dense.ledger.contributions.abs().max())
    data = batches("convnet", torch.float64)
    for budget, reads in ((256 * 2**20, True), (16 * 2**10, False)):
        model, probes = build("convnet", torch.float64)
        tracker = PathKernelTracker(model, sgd(model), mse_loss, probes, num_groups=30, group_state="factored",
                                    quadrature="simpson", max_grad_norm=0.5, memory_budget=budget)
        assert tracker.route.batch_form == "lean"
        assert reads_training_pass(tracker.route.model.record_bytes, 10, budget) == reads
        if not reads:
            assert len(row_chunks(model, tracker.route.plan, (data[0][0],), 1, budget)) > 1
        for k, (x, y) in enumerate(data):
            tracker.step(x, y, torch.arange(10 * k, 10 * k + 10))
        assert float((tracker.ledger.contributions - dense.ledger.contributions).abs().max()) < 1e-10 * scale
    x, y = data[0]
    batch = capture_batch(model, tracker.route.plan, (x,), y, mse_loss, torch.full((10,), 0.1, dtype=torch.float64),
                          budget, "lean")
    assert [f.kind for f in batch.factors] == ["dense", "dense", "dense", "outer"]  # convolutions, GroupNorm, Linear


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


# ------------------------------------------------------------------ sketched per-group state
def small_mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 1)).to(dtype)


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw_amsgrad_maximize": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True, maximize=True),
}


def sketched_run(opt_name, group_state, dtype=torch.float64, steps=4, **sketch):
    model = small_mlp(dtype)
    opt = OPTIMIZERS[opt_name](model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8 * steps, 3, generator=g, dtype=dtype), torch.randn(8 * steps, 1, generator=g, dtype=dtype)
    probes = torch.randn(4, 3, generator=g, dtype=dtype)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=8 * steps, group_state=group_state,
                                quadrature="simpson", **sketch)
    for k in range(steps):
        rows = slice(8 * k, 8 * k + 8)
        tracker.step(x[rows], y[rows], torch.arange(rows.start, rows.stop))
    return tracker, model


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_sketched_state_keeps_the_exact_totals_and_is_unbiased(opt_name):
    dense, dense_model = sketched_run(opt_name, "dense")
    ref = dense.ledger
    estimates, errors = [], []
    for seed in range(12):
        sketched, model = sketched_run(opt_name, "sketched", sketch_dim=64, sketch_seed=seed)
        led = sketched.ledger
        # Exact parts: training, the rest, the residual, and the examples' total (estimates + sketch error).
        for a, b in zip(dense_model.parameters(), model.parameters()):
            assert torch.equal(a, b)
        scale = float(ref.delta.abs().max())
        assert float((led.rest - ref.rest).abs().max()) < 1e-10 * scale
        assert float((led.residual - ref.residual).abs().max()) < 1e-10 * scale
        total = led.contributions.sum(dim=1) + led.sketch_error
        assert float((total - ref.contributions.sum(dim=1)).abs().max()) < 1e-10 * scale
        estimates.append(led.contributions)
        errors.append(float((led.contributions - ref.contributions).norm() / ref.contributions.norm()))
    # Unbiased: the mean of 12 independent sketches is much closer than a typical single one
    # (by about sqrt(12) ≈ 3.5 for independent errors).
    mean_error = float((torch.stack(estimates).mean(0) - ref.contributions).norm() / ref.contributions.norm())
    median_error = sorted(errors)[len(errors) // 2]
    assert mean_error < 0.5 * median_error, (mean_error, median_error)


def test_sketch_error_shrinks_with_the_projection_dimension():
    dense, _ = sketched_run("sgd_momentum", "dense")
    errors = []
    for k in (16, 256, 4096):
        per_seed = []
        for seed in range(3):
            sketched, _ = sketched_run("sgd_momentum", "sketched", sketch_dim=k, sketch_seed=seed)
            per_seed.append(float((sketched.ledger.contributions - dense.ledger.contributions).norm()))
        errors.append(sum(per_seed) / len(per_seed))
    # Expected ∝ k^-1/2: a factor 4 per 16× k; allow noise of 3 seeds.
    assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 2, errors


def test_sketched_resume_is_bit_exact(tmp_path):
    whole, _ = sketched_run("adam", "sketched", sketch_dim=32)
    model = small_mlp()
    opt = OPTIMIZERS["adam"](model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g, dtype=torch.float64)
    probes = torch.randn(4, 3, generator=g, dtype=torch.float64)
    make = lambda: PathKernelTracker(model, opt, mse_loss, probes, num_groups=32, group_state="sketched",  # noqa: E731
                                     quadrature="simpson", sketch_dim=32)
    first = make()
    for k in range(2):
        first.step(x[8 * k: 8 * k + 8], y[8 * k: 8 * k + 8], torch.arange(8 * k, 8 * k + 8))
    first.save(tmp_path / "t.pt")
    second = make()
    second.load(tmp_path / "t.pt")
    for k in range(2, 4):
        second.step(x[8 * k: 8 * k + 8], y[8 * k: 8 * k + 8], torch.arange(8 * k, 8 * k + 8))
    assert torch.equal(second.ledger.contributions, whole.ledger.contributions)
    assert torch.equal(second.ledger.sketch_error, whole.ledger.sketch_error)
    other = PathKernelTracker(model, opt, mse_loss, probes, num_groups=32, group_state="sketched",
                              quadrature="simpson", sketch_dim=64)
    with pytest.raises(ValueError, match="k=32"):
        other.load(tmp_path / "t.pt")


def test_sketched_refuses_what_it_cannot_sketch():
    model = small_mlp()
    probes = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="supports torch.optim.SGD"):
        PathKernelTracker(model, torch.optim.RMSprop(model.parameters()), mse_loss, probes, num_groups=4,
                          group_state="sketched")
    split = torch.optim.SGD([{"params": list(model.parameters())[:2], "momentum": 0.9},
                             {"params": list(model.parameters())[2:], "momentum": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match="same momentum"):
        PathKernelTracker(model, split, mse_loss, probes, num_groups=4, group_state="sketched")


def test_a_layer_the_forward_skips_has_zero_contributions():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 1)
            self.unused = nn.Linear(3, 1)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Skips().double()
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss,
                                torch.randn(3, 3, dtype=torch.float64), num_groups=4, group_state="factored")
    tracker.step(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64), torch.arange(4))
    assert tracker.ledger.relative_residual() < 1e-10  # linear in θ: the midpoint rule is exact
    assert model.unused.weight.grad is None  # and the tracker took its gradient as zero


@pytest.mark.parametrize("group_state,opt_name", [("factored", None), ("sketched", "adam")])
def test_a_small_memory_budget_chunks_the_batch_and_probes_without_changing_the_ledger(group_state, opt_name):
    """Captures of the batch and of the probes go in chunks under memory_budget; the ledger is the same."""
    ledgers = []
    for budget in (256 * 2**20, 64 * 2**10):  # the default, and a budget of a few examples
        model = small_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05) if opt_name is None else OPTIMIZERS[opt_name](model.parameters())
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 1, generator=g, dtype=torch.float64)
        probes = torch.randn(40, 3, generator=g, dtype=torch.float64)
        tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=64, group_state=group_state,
                                    memory_budget=budget, sketch_dim=32)
        for k in range(2):
            tracker.step(x[32 * k: 32 * k + 32], y[32 * k: 32 * k + 32], torch.arange(32 * k, 32 * k + 32))
        ledgers.append(tracker.ledger)
    from genkernel.core.engine.per_example import row_chunks
    from genkernel.core.engine.factors import make_plan
    assert len(row_chunks(model, make_plan(model), (x[:32],), 1, 64 * 2**10)) > 1  # really chunked
    scale = float(ledgers[0].contributions.abs().max())
    assert float((ledgers[0].contributions - ledgers[1].contributions).abs().max()) < 1e-12 * scale
    assert float((ledgers[0].sketch_error - ledgers[1].sketch_error).abs().max()) < 1e-12 * scale


def test_per_example_gradients_are_each_examples_scaled_gradient_in_chunks():
    """engine.gradients.per_example_gradients (the fallback parameters' c_n ∇ℓ_n): each row equals autograd's
    gradient of that example's loss alone times c_n, with the batch split into chunks by a small memory budget
    (it replaced a B × B diagonal product, B²·P multiply-adds, by B·P)."""
    from genkernel.core.engine.gradients import per_example_gradients

    model = mlp()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    c = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    params = dict(model.named_parameters())
    got = per_example_gradients(model, params, (x,), y, mse_loss, c, memory_budget=4 * 1024)
    for n in range(7):
        expected = torch.autograd.grad(mse_loss(model(x[n:n + 1]), y[n:n + 1]).sum(), list(params.values()))
        for (name, g), e in zip(params.items(), expected):
            torch.testing.assert_close(got[name][n], c[n] * e, rtol=0, atol=1e-14, msg=name)
