"""Review of the GAN analyzer under mixed precision (GANKernelAnalyzer(mixed_precision="observe")):
a float16 loop with a GradScaler that skips a step (found inf) and clears the gradients after
observing the next micro-batch (observe, zero_grad, backward, scaler.step: the order of
tests/test_gan_mixed_precision.py's loop)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from test_gan_mixed_precision import B, _analyzer, _batches, _equal, _nets, _state
from test_gan_mixed_precision import _train as _train_loop

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
# GradScaler's first scale: the first iteration's scaled float16 backward of D overflows (its D step
# skipped, the scale halved), no later one does.
OVERFLOWING_SCALE = 2.0 ** 17


def _train(*, analyze, observe_first):
    """The float16 loop of tests/test_gan_mixed_precision.py (D on real and generated rows, then a
    non-saturating G step, Adam, one GradScaler starting at OVERFLOWING_SCALE), observed before zero_grad
    (``observe_first``) or after it. Returns G, D, the analyzer and the optimizers' step counts."""
    taken = []
    G, D, analyzer = _train_loop(torch.float16, analyze=analyze, clear_first=not observe_first,
                                 init_scale=OVERFLOWING_SCALE, taken=taken)
    return G, D, analyzer, taken


def test_a_step_the_gradscaler_skipped_before_a_zero_grad_after_observe_is_dropped():
    """The first iteration's D step overflows and is skipped; the loop observes the next micro-batch
    and only then clears the gradients. That skipped micro-batch must be dropped (as it is where zero_grad
    comes first): training bit for bit as without the analyzer, every step taken booked at float16 (2 of D,
    3 of G), and the ledgers those of the same loop with zero_grad before observe. Before: the next step was refused inside
    scaler.step with a LedgerCheckError blaming the loop's weighting ("micro-batch 2 0.5 times micro-batch
    1", the halved scale) and naming weights=, which is no fix."""
    G0, D0, _, taken = _train(analyze=False, observe_first=True)
    assert taken == [STEPS, STEPS - 1]  # (G's steps, D's: the first iteration's D step skipped)
    _, _, reference, _ = _train(analyze=True, observe_first=False)
    G1, D1, analyzer, _ = _train(analyze=True, observe_first=True)
    assert _equal(_state(G0), _state(G1)) and _equal(_state(D0), _state(D1))
    pairs = ((analyzer.g_tracker, reference.g_tracker), (analyzer.d_tracker, reference.d_tracker))
    for (tracker, other), steps, skipped in zip(pairs, taken, ([], [{"after_step": 0, "micro_batches": 1}])):
        assert tracker.ledger.steps == steps
        assert [e["gradient_precision"] for e in tracker.gradient_scales] == ["float16"] * steps
        assert tracker.skipped_steps == other.skipped_steps == skipped
        assert torch.equal(tracker.ledger.contributions, other.ledger.contributions)
        assert torch.equal(tracker.ledger.residual, other.ledger.residual)
    # The loop's step numbers count the skipped D step, as the loop's own count does (it was numbered 1, 2).
    assert analyzer.d_loop_steps == reference.d_loop_steps == [2, 3] and analyzer.g_loop_steps == [1, 2, 3]


def _guarded_loop(*, analyze, skip_iteration=0, steps=STEPS, probe_check=None):
    """A float32 loop (no autocast) whose generator step is skipped by a guard at ``skip_iteration`` after its
    backward (a loss-spike guard, as a GradScaler skips), the gradients cleared only after the next observe:
    observe, zero_grad, backward, step. ``probe_check(G, D, analyzer)`` runs right after each observe_generator.
    Returns G, D, the analyzer."""
    G, D = _nets()
    g_opt = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
    analyzer = None
    if analyze:
        analyzer = _analyzer(G, D)
        analyzer.bind(g_opt, d_opt)
    for k, (real, z_d, z_g) in enumerate(_batches(steps)):
        roles = torch.cat([torch.ones(B), torch.zeros(B)]).long()
        x = torch.cat([real, G(z_d).detach()])
        d_losses = F.binary_cross_entropy_with_logits(D(x).view(-1), roles.float(), reduction="none")
        if analyzer is not None:
            analyzer.observe_discriminator(d_losses, roles, x)
        d_opt.zero_grad()
        d_losses.mean().backward()
        d_opt.step()
        fake = G(z_g)
        g_losses = F.softplus(-D(fake).view(-1))
        if analyzer is not None:
            analyzer.observe_generator(g_losses, z_g, fake)
            if probe_check is not None:
                probe_check(G, D, analyzer)
        g_opt.zero_grad()
        g_losses.mean().backward()
        if k != skip_iteration:
            g_opt.step()
    return G, D, analyzer


def test_probes_are_read_again_when_the_step_that_read_them_was_skipped_and_d_moved():
    """The first generator step is skipped (its micro-batch observed, backpropagated, no step) and D steps
    before the next generator micro-batch, observed before the loop clears the gradients: that micro-batch
    opens the step that is taken, so the probes' geometry w(z') is read at D as it is then, equal to a hand
    computation (float32 G in eval mode, D in training mode on copies of its modules) to 1e-6. Before, the
    probes kept the geometry read at the skipped step, before D's step (0.29 of w's largest entry away).
    Training is bit for bit that of the loop without the analyzer, and the generator books the two steps
    taken, one skipped."""
    checked = []

    def probe_check(G, D, analyzer):
        g, d = copy.deepcopy(G).eval(), copy.deepcopy(D)
        x = g(analyzer.probe_latents).detach().requires_grad_(True)
        (w,) = torch.autograd.grad(F.softplus(-d(x).view(-1)).sum(), x)
        checked.append(float((analyzer._probe_state["w"] - w).abs().max() / w.abs().max()))

    G0, D0, _ = _guarded_loop(analyze=False)
    G1, D1, analyzer = _guarded_loop(analyze=True, probe_check=probe_check)
    assert _equal(_state(G0), _state(G1)) and _equal(_state(D0), _state(D1))
    assert analyzer.g_tracker.ledger.steps == STEPS - 1
    assert analyzer.g_tracker.skipped_steps == [{"after_step": 0, "micro_batches": 1}]
    assert analyzer.g_loop_steps == [2, 3] and analyzer.d_loop_steps == [1, 2, 3]
    assert len(checked) == STEPS and max(checked) < 1e-6, checked
