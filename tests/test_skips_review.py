"""Review of the skipped-step bookkeeping (tracker._drop_skipped / _drop_cleared, attempted_steps): a
micro-batch whose gradient is exactly zero (a perceptron or hinge loss it already satisfies) leaves the
gradients as clear as a zero_grad() does, and must stay in its step, not count as a skipped step that
shifts every later step number the analyzers give; and a GradScaler skip cleared after observe() is
dropped also where the loop's loss is built beside the observed losses (no hook of theirs fires)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss

from test_gan_observe import B, analyzer_for, batches, nets, optimizers

F64 = torch.float64
PROBES = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)


def perceptron_data(zero_step):
    """Three steps of 12 examples; step 1's first six (``zero_step``: all twelve) are classified right by the
    initial model, so their perceptron loss relu(-y f(x)) has an exactly zero gradient."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(12, 3, generator=g, dtype=F64) for _ in range(3)]
    groups = [torch.randint(0, 3, (12,), generator=g) for _ in range(3)]
    with torch.no_grad():
        ys = [torch.sign(mlp()(x)).squeeze(1) for x in xs]
    ys[1], ys[2][::2] = -ys[1], -ys[2][::2]
    if not zero_step:
        ys[0][6::2] = -ys[0][6::2]
    return list(zip(xs, ys, groups))


def perceptron_loop(data, *, track, split, joint=False, set_to_none=True):
    """zero_grad, then two micro-batches of six (``split``; ``joint``: observed both, one backward of their
    sum) or one observe of all twelve, then optimizer.step(): the loss is the mean over the twelve."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=3) if track else None
    for x, y, groups in data:
        opt.zero_grad(set_to_none=set_to_none)
        parts = (slice(0, 6), slice(6, 12)) if split else (slice(0, 12),)
        pending = []
        for rows in parts:
            losses = torch.relu(-y[rows] * model(x[rows]).squeeze(1))
            if tracker is not None:
                tracker.observe(losses, groups[rows])
            pending.append(losses.mean() / len(parts))
            if not joint:
                pending.pop().backward()
        if joint:
            sum(pending).backward()
        opt.step()
    return model, tracker


@pytest.mark.parametrize("zero_step, joint", [(False, False), (True, False), (True, True)],
                         ids=["half_zero", "all_zero", "all_zero_joint_backward"])
def test_a_micro_batch_with_an_exactly_zero_gradient_stays_in_its_step(zero_step, joint):
    """Gradient accumulation (zero_grad(set_to_none=False) first) whose first micro-batch of step 1 has an
    exactly zero gradient (its examples already classified right; ``zero_step``: the second's too): no step
    was skipped. The tracker keeps both micro-batches in the step and its ledger is the one of the same loop
    observing the twelve in one call. The code before dropped the first as a skipped step (skipped_steps
    [{'after_step': 0, 'micro_batches': 1}], attempted_steps 4 for the loop's 3: the analyzers number the
    loop's steps by it), and refused the all-zero step of one joint backward of both (ValueError: "0 nonzero
    entries", though no weighting can change a step whose every row is zero)."""
    data = perceptron_data(zero_step)
    bare, _ = perceptron_loop(data, track=False, split=True, joint=joint, set_to_none=False)
    model, tracker = perceptron_loop(data, track=True, split=True, joint=joint, set_to_none=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    assert tracker.skipped_steps == []
    assert tracker.attempted_steps == tracker.ledger.steps == 3
    assert [e["micro_batches"] for e in tracker.gradient_scales] == [2, 2, 2]
    _, whole = perceptron_loop(data, track=True, split=False)
    scale = float(whole.ledger.contributions.abs().max())
    torch.testing.assert_close(tracker.ledger.contributions, whole.ledger.contributions, rtol=0, atol=1e-12 * scale)


def test_a_hinge_discriminator_already_past_the_margin_on_the_reals_keeps_the_loops_step_numbers():
    """A hinge GAN loop (D on real, then on generated rows, two backwards; the DCGAN example's order) whose D
    already scores every real of step 1 past the margin: the real micro-batch's gradient is exactly zero.
    The analyzer numbers D's steps 1, 2, 3 as the loop does (the code before: [2, 3, 4], the real micro-batch
    dropped as a step the loop skipped), and training is untouched."""
    from genkernel.gan import GeneratorLoss

    def run(track):
        G, D = nets(batch_norm=False)
        g_opt, d_opt = optimizers(G, D)
        data = batches(3)
        with torch.no_grad():  # D scores the first reals past the hinge's margin (all its outputs > 1)
            out = D(data[0][0])
            D.main[-2].weight.mul_(torch.sign(out.mean()) * 1.5 / out.abs().min())
        analyzer = analyzer_for(G, D, generator_loss=GeneratorLoss(D, kind="hinge")) if track else None
        if analyzer is not None:
            analyzer.bind(g_opt, d_opt)
        for real, z, _ in data:
            D.zero_grad()
            loss_real = F.relu(1 - D(real))
            if analyzer is not None:
                analyzer.observe_discriminator(loss_real, torch.ones(B, dtype=torch.long), real)
            loss_real.mean().backward()
            fake = G(z)
            loss_fake = F.relu(1 + D(fake.detach()))
            if analyzer is not None:
                analyzer.observe_discriminator(loss_fake, torch.zeros(B, dtype=torch.long), fake.detach())
            loss_fake.mean().backward()
            d_opt.step()
            G.zero_grad()
            loss_g = -D(fake)
            if analyzer is not None:
                analyzer.observe_generator(loss_g, z, fake)
            loss_g.mean().backward()
            g_opt.step()
        return [*G.parameters(), *D.parameters()], analyzer

    bare, _ = run(False)
    params, analyzer = run(True)
    assert all(torch.equal(p, q) for p, q in zip(params, bare))
    assert analyzer.d_tracker.skipped_steps == []
    assert analyzer.d_loop_steps == [1, 2, 3] and analyzer.g_loop_steps == [1, 2, 3]


def test_a_gradscaler_skip_cleared_after_observe_is_dropped_for_a_loss_built_beside_the_observed_losses():
    """Accumulation over two micro-batches whose loss is built beside the observed losses
    (F.mse_loss(outputs, y): its backward passes no hook of theirs), ordered observe -> zero_grad -> backward
    on a step's first micro-batch, with a GradScaler that skips step 2 (its scaled gradient overflows):
    the skip is dropped as in the same loop with zero_grad first (skipped_steps, equal ledgers), training is
    untouched. The code before kept step 2's micro-batches into step 3 and refused it (LedgerCheckError
    naming weights=, though the loop weighted nothing otherwise)."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 3, generator=g), torch.randn(12, 2, generator=g), torch.randint(0, 3, (12,), generator=g))
            for _ in range(4)]

    def loop(track, clear_first):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
        tracker = PathKernelTracker(model, opt, mse_loss, PROBES.float(), num_groups=3) if track else None
        for k, (x, y, groups) in enumerate(data):
            y = y * 1e15 if k == 1 else y
            if clear_first:
                opt.zero_grad()
            for i, rows in enumerate((slice(0, 6), slice(6, 12))):
                outputs = model(x[rows])
                if tracker is not None:
                    tracker.observe(mse_loss(outputs, y[rows]), groups[rows])
                if i == 0 and not clear_first:
                    opt.zero_grad()
                scaler.scale(F.mse_loss(outputs, y[rows]) / 2).backward()
            scaler.step(opt)
            scaler.update()
        return model, tracker

    bare, _ = loop(False, False)
    model, tracker = loop(True, False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    _, canonical = loop(True, True)
    assert tracker.skipped_steps == canonical.skipped_steps == [{"after_step": 1, "micro_batches": 2}]
    assert tracker.attempted_steps == 4 and tracker.ledger.steps == 3
    torch.testing.assert_close(tracker.ledger.contributions, canonical.ledger.contributions, rtol=0, atol=0)
