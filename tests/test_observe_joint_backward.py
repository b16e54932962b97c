"""Observed micro-batches whose step the loop's backward decides (review: joint): several micro-batches
observed before one backward of their summed loss (a GAN discriminator's real and fake halves, a
multi-task loss), a micro-batch a loss-spike guard skipped after observe(), and a step a GradScaler
skipped. Each observed ledger is compared with a tracker that observes the same examples in ONE
observe() call with weights= (the path supported before), on the same training trajectory (same
forwards, same backward calls: bit-for-bit the same parameters), and checked against the exact ledger
identity (Σ contributions + rest + residual = the probes' output change; the model is linear in θ,
so the residual is rounding)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.diffusion import MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer
from genkernel.supervised import mse_loss

F64 = torch.float64
G = 3
PROBES = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)

pytestmark = pytest.mark.usefixtures("one_thread")


def data(steps=2, parts=3, rows=4, seed=1):
    """``steps`` lists of ``parts`` micro-batches (x [rows, 3], y [rows, 2], groups [rows])."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(rows, 3, generator=g, dtype=F64), torch.randn(rows, 2, generator=g, dtype=F64),
              torch.randint(0, G, (rows,), generator=g)) for _ in range(parts)] for _ in range(steps)]


def setup(optimizer="adam"):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(F64)  # linear in θ: every quadrature is exact, the residual is rounding
    opt = (torch.optim.Adam(model.parameters(), lr=0.05) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    tracker = PathKernelTracker(model, opt, mse_loss, PROBES, num_groups=G)
    booked = []
    tracker.listeners.append(lambda result: booked.append(list(getattr(tracker, "step_observations", [None]))))
    return model, opt, tracker, booked


def assert_identity(ledger):
    """Σ contributions + rest + residual = f_end − f_start to rounding, and the residual is rounding."""
    scale = max(1.0, float((ledger.f_end - ledger.f_start).abs().max()))
    gap = ledger.f_end - ledger.f_start - ledger.contributions.sum(1) - ledger.rest - ledger.residual
    assert float(gap.abs().max()) < 1e-14 * scale
    assert float(ledger.residual.abs().max()) < 1e-13 * scale


def assert_same_ledger(tracker, reference):
    assert tracker.ledger.steps == reference.ledger.steps
    scale = float(reference.ledger.contributions.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(tracker.ledger.contributions, reference.ledger.contributions, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(tracker.ledger.f_end, reference.ledger.f_end, rtol=0, atol=0)


def joint_loop(factors, observed_weights, *, one_call, optimizer="adam"):
    """Per step: the real and fake halves' forwards, observed one after another (or in one call with
    weights=), then ONE backward of Σ_i factor_i · mean(losses_i), then the step."""
    model, opt, tracker, booked = setup(optimizer)
    for parts in data(parts=2):
        opt.zero_grad()
        losses = [mse_loss(model(x), y) for x, y, _ in parts]
        weights = [torch.full((4,), w / 4, dtype=F64) for w in observed_weights]
        if one_call:
            tracker.observe(torch.cat(losses), torch.cat([g for _, _, g in parts]), weights=torch.cat(weights))
        else:
            for loss, (_, _, g), w in zip(losses, parts, weights):
                tracker.observe(loss, g, weights=w)
        sum(f * loss.mean() for f, loss in zip(factors, losses)).backward()
        opt.step()
    return model, tracker, booked


@pytest.mark.parametrize("optimizer", ["adam", "sgd_momentum"])
def test_two_micro_batches_observed_before_one_joint_backward_are_one_step(optimizer):
    """(a) observe(real), observe(fake), (real.mean() + fake.mean()).backward(): old code dropped the
    first micro-batch as a skipped step at the second observe() and refused the step."""
    model, tracker, booked = joint_loop((1.0, 1.0), (1.0, 1.0), one_call=False, optimizer=optimizer)
    reference_model, reference, _ = joint_loop((1.0, 1.0), (1.0, 1.0), one_call=True, optimizer=optimizer)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    assert_same_ledger(tracker, reference)
    assert_identity(tracker.ledger)
    assert tracker.skipped_steps == [] and booked == [[1, 2], [3, 4]]
    assert [(e["micro_batches"], e["dropped_micro_batches"]) for e in tracker.gradient_scales] == [(2, 0), (2, 0)]


def test_a_weighted_joint_backward_is_recorded_with_its_weights_and_refused_with_others():
    """(b) 0.5·real.mean() + 2·fake.mean(): observed with those weights, the step is the one-call
    reference's; observed as plain means (the wrong weighting), no scalar maps the observed sum to
    the real gradient and the step is refused, the parameters untouched."""
    model, tracker, _ = joint_loop((0.5, 2.0), (0.5, 2.0), one_call=False)
    reference_model, reference, _ = joint_loop((0.5, 2.0), (0.5, 2.0), one_call=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    assert_same_ledger(tracker, reference)
    assert_identity(tracker.ledger)
    assert [e["scale"] for e in tracker.gradient_scales] == pytest.approx([1.0, 1.0], rel=1e-12)

    model, opt, wrong, _ = setup()
    parts = data(parts=2)[0]
    theta = [p.detach().clone() for p in model.parameters()]
    losses = [mse_loss(model(x), y) for x, y, _ in parts]
    for loss, (_, _, g) in zip(losses, parts):
        wrong.observe(loss, g)  # means: the loop weighs them 0.5 and 2
    (0.5 * losses[0].mean() + 2 * losses[1].mean()).backward()
    with pytest.raises((LedgerCheckError, ValueError), match="do not add up|are all parallel"):
        opt.step()
    assert wrong.ledger.steps == 0 and wrong.gradient_scales == []
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))


def spike_loop(*, one_call):
    """Three micro-batches per step, each loss halved; a loss-spike guard skips the middle one of step 2
    after it was observed (no backward, its losses kept alive in a variable, gradients not cleared)."""
    model, opt, tracker, booked = setup("sgd_momentum")
    kept_alive = []
    for k, parts in enumerate(data(parts=3)):
        opt.zero_grad()
        losses = [mse_loss(model(x), y) for x, y, _ in parts]
        train = [0, 1, 2] if k == 0 else [0, 2]
        if one_call:
            tracker.observe(torch.cat([losses[i] for i in train]), torch.cat([parts[i][2] for i in train]),
                            weights=torch.full((4 * len(train),), 1 / 8, dtype=F64))
        for i, loss in enumerate(losses):
            if not one_call:
                tracker.observe(loss, parts[i][2], weights=torch.full((4,), 1 / 8, dtype=F64))
            if i not in train:  # the guard: `continue` after observe()
                kept_alive.append(loss)
                continue
            (loss.mean() / 2).backward()
        opt.step()
    return model, tracker, booked


def test_a_micro_batch_a_guard_skipped_after_observe_is_left_out_of_its_step():
    """(c) Old code: the step was refused (its gradient lacks the skipped micro-batch). Now it is the
    step of the two micro-batches the loop trained on, exactly, with the skipped one counted."""
    model, tracker, booked = spike_loop(one_call=False)
    reference_model, reference, _ = spike_loop(one_call=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    assert_same_ledger(tracker, reference)
    assert_identity(tracker.ledger)
    assert booked == [[1, 2, 3], [4, 6]] and tracker.skipped_steps == []
    assert [(e["micro_batches"], e["dropped_micro_batches"]) for e in tracker.gradient_scales] == [(3, 0), (2, 1)]


def test_a_step_the_loop_skips_after_backward_is_a_skipped_step():
    """(d) coverage: passes on the code before. observe A, backward A, zero_grad without a step (a
    GradScaler that found inf), observe B, backward B, step: A is a skipped step, the step is B's."""
    def loop(skip):
        model, opt, tracker, booked = setup()
        for parts in data(parts=2):
            opt.zero_grad()
            for i, (x, y, g) in enumerate(parts):
                if i == 0 and not skip:
                    continue
                losses = mse_loss(model(x), y)
                tracker.observe(losses, g)
                losses.mean().backward()
                if i == 0:
                    opt.zero_grad()
            opt.step()
        return model, tracker, booked

    model, tracker, booked = loop(skip=True)
    reference_model, reference, _ = loop(skip=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    assert_same_ledger(tracker, reference)
    assert_identity(tracker.ledger)
    assert tracker.skipped_steps == [{"after_step": 0, "micro_batches": 1}, {"after_step": 1, "micro_batches": 1}]


# -- the analyzers' per-micro-batch mirrors ----------------------------------------------------------

NZ, B = 2, 4


def gan_loop(*, halves):
    """D on real and generated rows: observed as two halves before one joint backward (or in one call),
    each half's forward on its own; then G. D has no BatchNorm (its halves' forwards are the call's)."""
    torch.manual_seed(0)
    g_net = nn.Sequential(nn.Linear(NZ, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    d_net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)).to(F64)
    g_opt = torch.optim.Adam(g_net.parameters(), lr=1e-2)
    d_opt = torch.optim.SGD(d_net.parameters(), lr=0.1, momentum=0.5)
    analyzer = GANKernelAnalyzer(g_net, d_net, torch.randn(4, NZ, generator=torch.Generator().manual_seed(3), dtype=F64),
                                 grouping="direction", num_groups=2, window=2, eval_every=1, controls=0,
                                 quadrature="gauss4",
                                 discriminator_probes=torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=F64))
    analyzer.bind(g_opt, d_opt)
    g = torch.Generator().manual_seed(1)
    ones, zeros = torch.ones(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for _ in range(2):
        real = torch.randn(B, 3, generator=g, dtype=F64) + 1.0
        z_d, z_g = torch.randn(B, NZ, generator=g, dtype=F64), torch.randn(B, NZ, generator=g, dtype=F64)
        with torch.no_grad():
            fake = g_net(z_d)
        d_opt.zero_grad()
        loss_real = F.binary_cross_entropy_with_logits(d_net(real), torch.ones(B, dtype=F64), reduction="none")
        loss_fake = F.binary_cross_entropy_with_logits(d_net(fake), torch.zeros(B, dtype=F64), reduction="none")
        if halves:
            analyzer.observe_discriminator(loss_real, ones, real)
            analyzer.observe_discriminator(loss_fake, zeros, fake)
        else:
            analyzer.observe_discriminator(torch.cat([loss_real, loss_fake]), torch.cat([ones, zeros]),
                                           torch.cat([real, fake]), weights=torch.full((2 * B,), 1 / B, dtype=F64))
        (loss_real.mean() + loss_fake.mean()).backward()
        d_opt.step()
        g_opt.zero_grad()
        fake = g_net(z_g)
        losses = F.binary_cross_entropy_with_logits(d_net(fake), torch.ones(B, dtype=F64), reduction="none")
        analyzer.observe_generator(losses, z_g, fake)
        losses.mean().backward()
        g_opt.step()
    return d_net, analyzer


def test_a_gan_discriminator_observed_as_halves_with_one_backward_counts_the_examples_it_booked():
    """(e) Old code: the fake half's observe() dropped the real half, and d_opt.step() was refused."""
    d_net, analyzer = gan_loop(halves=True)
    reference_net, reference = gan_loop(halves=False)
    assert all(torch.equal(p, q) for p, q in zip(d_net.parameters(), reference_net.parameters()))
    assert analyzer.d_group_counts == reference.d_group_counts == [[B, B, 0], [B, B, 0]]
    ledger, expected = analyzer.discriminator_ledger, reference.discriminator_ledger
    assert ledger.steps == 2
    scale = float(expected.contributions.abs().max())
    torch.testing.assert_close(ledger.contributions, expected.contributions, rtol=0, atol=1e-12 * scale)
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.f_end - ledger.f_start, rtol=0, atol=1e-13 * max(1.0, scale))
    assert analyzer.d_tracker.skipped_steps == [] and analyzer.g_group_counts == reference.g_group_counts


def test_the_noise_analyzer_counts_the_micro_batches_its_step_kept():
    """(f) Two micro-batches observed before one joint backward, and in step 2 a third the loop's
    guard skipped after observe(): the bins count exactly the examples of the micro-batches the step
    was made of. Old code: the second observe() dropped the first, and the step was refused."""
    scheduler = make_scheduler(100)

    def loop(one_call):
        torch.manual_seed(0)
        model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        analyzer = NoiseLevelAnalyzer(scheduler, torch.randn(4, 2, generator=torch.Generator().manual_seed(2),
                                                                dtype=F64), num_bins=4, num_probes=4, controls=0,
                                      kernel_points=2, kernel_every=0, bin_spacing="timestep")
        analyzer.bind(model, opt)
        g = torch.Generator().manual_seed(5)
        for k in range(2):
            opt.zero_grad()
            parts = []
            for i in range(3 if k else 2):
                t = torch.randint(0, 100, (3,), generator=g)
                clean = torch.randn(3, 2, generator=g, dtype=F64)
                noise = torch.randn(3, 2, generator=g, dtype=F64)
                losses = ((model(scheduler.add_noise(clean, noise, t), t) - noise) ** 2).mean(dim=1)
                parts.append((losses, t))
            train = [0, 1]
            if one_call:
                analyzer.observe(torch.cat([parts[i][0] for i in train]), torch.cat([parts[i][1] for i in train]))
            else:
                for losses, t in parts:
                    analyzer.observe(losses, t)
            sum(parts[i][0].mean() for i in train).backward()
            opt.step()
        return model, analyzer

    model, analyzer = loop(one_call=False)
    reference_model, reference = loop(one_call=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference_model.parameters()))
    assert analyzer.bin_counts == reference.bin_counts and [sum(c) for c in analyzer.bin_counts] == [6, 6]
    assert [e["dropped_micro_batches"] for e in analyzer.tracker.gradient_scales] == [0, 1]
    ledger, expected = analyzer.tracker.ledger, reference.tracker.ledger
    scale = float(expected.contributions.abs().max())
    torch.testing.assert_close(ledger.contributions, expected.contributions, rtol=0, atol=1e-12 * scale)
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.f_end - ledger.f_start, rtol=0, atol=1e-14 * max(1.0, scale))
