"""Review of gradient accumulation (OptimizerStep(micro_batches=K)) against independent brute force:
the whole batch at once (K = 1) and hand-written accumulation loops, in float64 on tiny MLPs.

Failures inside micro-batch j > 0 name the batch's example and leave no partial gradient sum;
custom weights (zeros, a sum other than 1), batches K does not divide, BatchNorm and dropout, stale
gradients, a DataLoader's short last batch and a rolled-back step are booked as the whole batch's."""

import math

import pytest
import torch
from torch import nn

from genkernel import NonFiniteError, OptimizerStep, PathKernelTracker
from genkernel.supervised import mse_loss

F64 = torch.float64


def _mlp(seed=0, batch_norm=False, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 8)] + ([nn.BatchNorm1d(8)] if batch_norm else []) + [nn.Tanh()]
    layers += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(8, 1)]
    return nn.Sequential(*layers).to(F64)


def _data(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64)


def _state(model):
    return torch.cat([t.detach().to(F64).reshape(-1) for t in (*model.parameters(), *model.buffers())])


def _probes():
    return torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)


def test_a_non_finite_loss_in_a_later_micro_batch_names_the_batch_s_example():
    """Micro-batches of 10 in 3 are rows 0-3, 4-6, 7-9: a NaN target at example 6 was reported as
    example 2 (its place in micro-batch 1), by the step and through the tracker."""
    x, y = _data(10)
    y[6] = float("nan")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in (1, 3, 10):
        with pytest.raises(NonFiniteError, match=r"non-finite loss at examples \[6\]$"):
            OptimizerStep(model, opt, mse_loss, x, y, micro_batches=k).run()
    tracker = PathKernelTracker(model, opt, mse_loss, _probes(), num_groups=2, group_state="dense")
    with pytest.raises(NonFiniteError, match=r"non-finite loss at examples \[6\];"):
        tracker.track(OptimizerStep(model, opt, mse_loss, x, y, micro_batches=3), torch.arange(10) % 2)


def test_a_step_failing_in_a_later_micro_batch_leaves_no_partial_gradient():
    """A failure after micro-batch 0's backward left .grad = the gradient of micro-batch 0 alone (97 %
    off, in norm, the gradient held before the step; 118 % off the whole batch's): an optimizer.step()
    on it would have applied part of a batch as a whole step. Now the gradients are cleared; a failure before any
    backward (K = 1, or micro-batch 0) leaves them as they were, and one after the last (a non-finite
    gradient) leaves the step's."""
    x, y = _data(10)
    bad = y.clone()
    bad[6] = float("nan")
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for k in (1, 3, 5):  # example 6 in micro-batch 0 of 1, 1 of 3 (rows 4-6), 3 of 5 (rows 6-7)
        OptimizerStep(model, opt, mse_loss, x, y, micro_batches=3).run()
        before = [p.grad.clone() for p in model.parameters()]
        theta = _state(model)
        with pytest.raises(NonFiniteError):
            OptimizerStep(model, opt, mse_loss, x, bad, micro_batches=k).run()
        if k == 1:
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
        else:
            assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        assert torch.equal(_state(model), theta)
    # an error raised by an analyzer's before_backward in micro-batch 1: cleared as well
    step = OptimizerStep(model, opt, mse_loss, x, y, micro_batches=3)

    def refuse(losses):
        if step.rows.start > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        step.compute_gradients(refuse)
    assert all(p.grad is None for p in model.parameters()) and not step.applied
    # a non-finite gradient (after the last backward): the step's gradients stay, to be inspected
    def blow_up(out, t):  # row 1 of each micro-batch: 0 * sqrt|out - t|, whose gradient at out = t is 0 * inf
        return torch.where(torch.arange(len(t)).unsqueeze(1) == 1, (out - t).abs().sqrt() * 0, (out - t) ** 2).mean(1)

    with torch.no_grad():
        y_exact = y.clone()
        y_exact[5] = model(x[5:6])[0]  # |out - t| = 0 at example 5 (row 1 of micro-batch 1): d sqrt = inf
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        OptimizerStep(model, opt, blow_up, x, y_exact, micro_batches=3).run()
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())


def _hand_loop(model, opt, x, y, weights, splits, clip):
    """The accumulation loop people write, in float64: Σ_j Σ_{n ∈ j} c_n ℓ_n, then clip, then step."""
    opt.zero_grad()
    for rows in splits:
        losses = ((model(x[rows]) - y[rows]) ** 2).mean(dim=1)
        (losses * weights[rows]).sum().backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def test_custom_weights_an_uneven_split_batch_norm_and_dropout_match_the_hand_written_loop():
    """coverage: weights with zeros summing to 2.7, 11 examples in 3 micro-batches (4, 4, 3), BatchNorm
    (statistics per micro-batch) and dropout (masks drawn micro-batch by micro-batch), clipping of the
    accumulated gradient, stale gradients before the step: parameters and buffers bit for bit."""
    x, y = _data(11)
    weights = torch.rand(11, generator=torch.Generator().manual_seed(2), dtype=F64)
    weights[[0, 5, 6]] = 0
    weights *= 2.7 / weights.sum()
    models = [_mlp(batch_norm=True, dropout=0.25) for _ in range(2)]
    opts = [torch.optim.Adam(m.parameters(), lr=0.02) for m in models]
    for p in models[0].parameters():
        p.grad = torch.full_like(p, 3.0)  # left over: the step's accumulation starts from zero
    torch.manual_seed(7)
    losses = [OptimizerStep(models[0], opts[0], mse_loss, x, y, weights, max_grad_norm=0.05, micro_batches=3).run()
              for _ in range(3)]
    torch.manual_seed(7)
    for _ in range(3):
        _hand_loop(models[1], opts[1], x, y, weights, (slice(0, 4), slice(4, 8), slice(8, 11)), 0.05)
    assert torch.equal(_state(models[0]), _state(models[1]))
    assert all(l.shape == (11,) for l in losses)


@pytest.mark.parametrize("group_state,gradient_route", [("dense", "graph"), ("dense", "example"), ("factored", "auto")])
def test_custom_weights_are_booked_as_the_whole_batch_s(group_state, gradient_route):
    """coverage: weights with zeros summing to 1.9 (not the mean), 11 examples in 3 and in 11 micro-batches:
    every route's group contributions are the whole batch's (K = 1) to rounding, and the identity holds."""
    x, y = _data(11)
    weights = torch.rand(11, generator=torch.Generator().manual_seed(3), dtype=F64)
    weights[[1, 9]] = 0
    weights *= 1.9 / weights.sum()
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 1])
    clip = 0.2 if group_state == "dense" else math.inf
    ledgers = {}
    for k in (1, 3, 11):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5 if group_state == "dense" else 0.0)
        tracker = PathKernelTracker(model, opt, mse_loss, _probes(), num_groups=3, group_state=group_state,
                                    gradient_route=gradient_route, max_grad_norm=clip)
        for _ in range(2):
            tracker.track(OptimizerStep(model, opt, mse_loss, x, y, weights, max_grad_norm=clip, micro_batches=k), ids)
        ledger = tracker.ledger
        total = ledger.contributions.sum(1) + ledger.rest + ledger.sketch_error + ledger.residual
        torch.testing.assert_close(total, ledger.f_end - ledger.f_start, rtol=0, atol=1e-14)
        ledgers[k] = ledger
    for k in (3, 11):
        torch.testing.assert_close(ledgers[k].contributions, ledgers[1].contributions, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ledgers[k].rest, ledgers[1].rest, rtol=1e-12, atol=1e-14)


def test_a_skipped_micro_batched_step_leaves_the_run_as_the_untracked_skip_does():
    """BatchNorm and dropout on the dense graph route; a NaN in micro-batch 1 of step 2 is
    skipped: the parameters and Adam's state are rolled back, the BatchNorm statistics its forwards
    advanced are kept, as the untracked step (which raises after those forwards) leaves them, so the
    tracked run equals the untracked one bit for bit, and the ledger books the 3 good steps exactly.
    (Before 2026-12-05 the tracker also rolled the statistics back, and this test asserted that: a
    tracked run then differed from the untracked one in its buffers.)"""
    x, y = _data(12)
    bad = y.clone()
    bad[5] = float("nan")
    ids = torch.arange(12) % 3

    def parameters(model):
        return torch.cat([p.detach().to(F64).reshape(-1) for p in model.parameters()])

    def run(track):
        model = _mlp(batch_norm=True, dropout=0.2)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        tracker = PathKernelTracker(model, opt, mse_loss, _probes(), num_groups=3, group_state="dense",
                                    max_grad_norm=0.3) if track else None
        for i, targets in enumerate([y, bad, y, y]):
            before, adam = parameters(model), {k: v["exp_avg"].clone() for k, v in opt.state.items()}
            torch.manual_seed(10 + i)  # dropout's draws of the i-th step
            step = OptimizerStep(model, opt, mse_loss, x, targets, max_grad_norm=0.3, micro_batches=3)
            try:
                tracker.track(step, ids) if track else step.run()
            except NonFiniteError:
                assert i == 1 and torch.equal(parameters(model), before)
                assert all(torch.equal(opt.state[k]["exp_avg"], v) for k, v in adam.items())
        return model, tracker

    skipped, tracker = run(True)
    bare, _ = run(False)
    assert torch.equal(_state(skipped), _state(bare))
    assert tracker.ledger.steps == 3
    total = tracker.ledger.contributions.sum(1) + tracker.ledger.rest + tracker.ledger.residual
    torch.testing.assert_close(total, tracker.ledger.f_end - tracker.ledger.f_start, rtol=0, atol=1e-14)


def test_a_data_loader_s_short_last_batch_runs_in_fewer_micro_batches():
    """coverage: DDPMTrainer on a DataLoader of 10 examples in batches of 4 with micro_batches=3: the last
    batch of 2 runs in 2; the run is the whole-batch run's to rounding (float64)."""
    from genkernel.diffusion import DDPMTrainer, make_scheduler
    from genkernel.diffusion.models import MLPDenoiser

    data = torch.randn(10, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    runs, sizes = [], []
    for k in (1, 3):
        torch.manual_seed(0)
        model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
        trainer = DDPMTrainer(model, make_scheduler(20), loader, micro_batches=k, optimizer="adam", lr=1e-2,
                              max_grad_norm=1.0, progress=False)
        build = trainer.build_step

        def counted(batch, build=build):
            step = build(batch)
            sizes.append(step.micro_batches)
            return step

        trainer.build_step = counted
        trainer.train(3)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert sizes == [1, 1, 1, 3, 3, 2]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-14)
