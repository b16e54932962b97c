"""Permutation controls of loops observed one small micro-batch at a time (gradient accumulation).

Before: a control's labels were a permutation of each observed micro-batch's own labels. A loop of one example per
micro-batch got the identity permutation: every control ledger equalled the measured one, to its rounding, and a
measured-minus-control statistic was exactly 0 (the noise-level analyzer: found by a hunt, pinned in
tests/test_diffusion_variants_hunt.py; the GAN analyzer drew its controls the same way, and a step of 2 examples
had the same weakness). Now a batch or micro-batch of fewer than 8 examples draws its control labels without
replacement from its own and the last 64 examples' labels (:func:`genkernel.core.grouping.permuted_labels`), the
same in a trainer's steps and an observed loop's."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from genkernel.core.grouping import CONTROL_POOL, CONTROL_POOL_BELOW, permuted_labels, recent_labels
from genkernel.gan import GANKernelAnalyzer
from test_gan_bruteforce_hunt import F64, LAT, LR_G, PROBES, _by_sign, _pair

pytestmark = pytest.mark.usefixtures("one_thread")


def test_permuted_labels_without_a_pool_is_a_permutation_of_the_batchs_own():
    """Coverage: a whole batch (or a micro-batch of 8 or more) is permuted within itself, as before: the same draw
    as ``labels[randperm(B)]``."""
    labels = torch.arange(10) % 4
    for recent in (None, torch.arange(50)):
        got = permuted_labels(labels, torch.Generator().manual_seed(3), recent)
        assert torch.equal(got, labels[torch.randperm(10, generator=torch.Generator().manual_seed(3))])


def test_a_small_micro_batch_draws_from_the_pool_without_replacement():
    """Coverage of the helpers: one example's control label comes from the pool (not always its own); a pair's two
    labels are two distinct entries of pool + pair; the pool keeps the last CONTROL_POOL labels."""
    recent = torch.arange(20)
    drawn = Counter(int(permuted_labels(torch.tensor([99]), torch.Generator().manual_seed(s), recent)[0])
                    for s in range(400))
    assert set(drawn) <= set(range(20)) | {99} and len(drawn) > 15 and drawn[99] < 60
    for s in range(50):
        pair = permuted_labels(torch.tensor([98, 99]), torch.Generator().manual_seed(s), recent)
        assert pair.shape == (2,) and len(set(pair.tolist())) == 2
    assert torch.equal(recent_labels(torch.arange(100), torch.tensor([7])), torch.cat([torch.arange(37, 100),
                                                                                       torch.tensor([7])]))
    assert CONTROL_POOL == 64 and CONTROL_POOL_BELOW == 8


def _analyzer():
    return GANKernelAnalyzer(*_pair(), PROBES, grouping=_by_sign, num_groups=2, window=1, eval_every=1, controls=2,
                             track_discriminator=False, seed=5)


def _observed_gan(batches, analyzer, state=None):
    """A GAN generator loop that accumulates micro-batches of 2 latents, observed (the analyzer's own G and D);
    returns (G, g_opt) and the partitions' ids each observe handed the tracker."""
    G, D = analyzer._g, analyzer._d
    g_opt = torch.optim.SGD(G.parameters(), lr=LR_G)
    if state is not None:
        G.load_state_dict(state[0])
        g_opt.load_state_dict(state[1])
    analyzer.bind(g_opt, None, **({} if state is None else {"start_step": state[2]}))
    seen, observe = [], analyzer.g_tracker.observe

    def recorded(losses, groups, weights=None):
        seen.append({k: v.clone() for k, v in groups.items()})
        return observe(losses, groups, weights)

    analyzer.g_tracker.observe = recorded
    D.requires_grad_(False)
    for z in batches:
        g_opt.zero_grad()
        for n in range(0, z.shape[0], 2):
            x = G(z[n:n + 2])
            losses = F.softplus(-D(x).reshape(-1))
            analyzer.observe_generator(losses, z[n:n + 2], x)
            (losses.sum() / z.shape[0]).backward()
        g_opt.step()
    return G, g_opt, seen


def test_a_gan_loop_of_two_latents_per_micro_batch_draws_controls_beyond_its_own_ids(tmp_path):
    """Fails on the old code: every control's ids were a permutation of its micro-batch's geometry ids (the same
    two ids, half the time in the same order), so each step's control groups had the geometry groups' sizes. Now
    some micro-batch's control ids are not its geometry ids in any order; and a run saved after its second step and
    resumed draws the controls of the uninterrupted run (the pools are in the saved state)."""
    generator = torch.Generator().manual_seed(11)
    batches = [torch.randn(8, LAT, generator=generator, dtype=F64) for _ in range(4)]
    straight = _analyzer()
    _, _, seen = _observed_gan(batches, straight)
    straight.finish()
    assert any(sorted(ids[name].tolist()) != sorted(ids["geometry"].tolist())
               for ids in seen for name in straight.control_names)
    first = _analyzer()
    G, g_opt, _ = _observed_gan(batches[:2], first)
    first.save(tmp_path / "analyzer.pt")
    resumed = _analyzer()
    resumed.load(tmp_path / "analyzer.pt")
    _observed_gan(batches[2:], resumed, (G.state_dict(), g_opt.state_dict(), 2))
    resumed.finish()
    for name, ledger in straight.g_tracker.ledgers.items():
        assert torch.equal(ledger.contributions, resumed.g_tracker.ledgers[name].contributions), name


def test_a_refused_gan_micro_batch_draws_no_control_ids():
    """Fails on the old code: a micro-batch refused after its control ids were drawn (here the tracker's observe
    raising once) left the analyzer's generator advanced, so the loop that observed it again drew other controls
    than the uninterrupted run. Now the generator and the pools are put back."""
    generator = torch.Generator().manual_seed(25)  # (every micro-batch of two groups)
    batches = [torch.randn(8, LAT, generator=generator, dtype=F64) for _ in range(2)]
    straight = _analyzer()
    _observed_gan(batches, straight)
    straight.finish()
    retried = _analyzer()
    calls = {"n": 0}

    class Refused(ValueError):
        pass

    bind = retried.bind

    def bind_and_fail_once(*args, **kwargs):
        bind(*args, **kwargs)
        inner = retried.g_tracker.observe

        def failing(losses, groups, weights=None):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Refused("refused once")
            return inner(losses, groups, weights)

        retried.g_tracker.observe = failing

    retried.bind = bind_and_fail_once
    observe_generator = retried.observe_generator

    def observe_again(*args, **kwargs):
        try:
            observe_generator(*args, **kwargs)
        except Refused:
            observe_generator(*args, **kwargs)

    retried.observe_generator = observe_again
    _observed_gan(batches, retried)
    retried.finish()
    assert calls["n"] == 9
    for name, ledger in straight.g_tracker.ledgers.items():
        assert torch.equal(ledger.contributions, retried.g_tracker.ledgers[name].contributions), name


def _accumulated_gan(batches, per_micro_batch):
    """The generator loop of ``_observed_gan`` in micro-batches of ``per_micro_batch`` latents; the analyzer."""
    analyzer = _analyzer()
    G, D = analyzer._g, analyzer._d
    g_opt = torch.optim.SGD(G.parameters(), lr=LR_G)
    analyzer.bind(g_opt, None)
    D.requires_grad_(False)
    for z in batches:
        g_opt.zero_grad()
        for n in range(0, z.shape[0], per_micro_batch):
            x = G(z[n:n + per_micro_batch])
            losses = F.softplus(-D(x).reshape(-1))
            analyzer.observe_generator(losses, z[n:n + per_micro_batch], x)
            (losses.sum() / z.shape[0]).backward()
        g_opt.step()
    analyzer.finish()
    return analyzer


def test_a_gan_loop_of_one_latent_per_micro_batch_is_observed():
    """Fails on the old code: the first observed micro-batch (one latent) was refused for having fewer examples than
    the 2 groups, though the step accumulates 8. Now the step's total is what is checked, and the geometry ledger
    equals the same steps observed as whole batches (to rounding), its controls drawn from the pool."""
    generator = torch.Generator().manual_seed(25)
    batches = [torch.randn(8, LAT, generator=generator, dtype=F64) for _ in range(2)]
    ones, whole = _accumulated_gan(batches, 1), _accumulated_gan(batches, 8)
    a, b = ones.g_tracker.ledgers["geometry"].contributions, whole.g_tracker.ledgers["geometry"].contributions
    assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
    controls = ones.g_tracker.ledgers["control_0"].contributions
    assert float((controls - a).abs().max()) > 1e-3 * float(a.abs().max())


def test_a_step_too_small_for_the_groups_is_warned_of():
    """Fails on the old code (a ValueError at the first micro-batch, not a warning at the recorded step): a loop
    whose whole step is one latent cannot fill 2 groups."""
    batches = [torch.randn(1, LAT, generator=torch.Generator().manual_seed(3), dtype=F64)]
    with pytest.warns(UserWarning, match="first observed generator step.*2 groups but the batch has only 1"):
        _accumulated_gan(batches, 1)
