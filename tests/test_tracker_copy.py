"""copy.deepcopy of a tracker (alone, or with its model and optimizer in one copy: a trainer, a
branch of a run) gives a tracker of the copied model and optimizer that records on as the
original would, and leaves the original recording its own loop; a copied optimizer never calls
the original tracker's hooks."""

import copy

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker

F64 = torch.float64


def _loss(out, target):
    return ((out - target) ** 2).sum(dim=1)


def _setup(optimizer="adam"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probes = torch.randn(5, 3, dtype=F64)
    tracker = PathKernelTracker(model, opt, _loss, probes, num_groups=3)
    return model, opt, tracker


def _batches(count):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64),
             torch.arange(6) % 3) for _ in range(count)]


def _observed_step(model, opt, tracker, batch):
    x, y, ids = batch
    opt.zero_grad()
    losses = _loss(model(x), y)
    tracker.observe(losses, ids)
    losses.mean().backward()
    opt.step()


def _same_ledgers(a, b):
    return (a.ledger.steps == b.ledger.steps and torch.equal(a.ledger.contributions, b.ledger.contributions)
            and torch.equal(a.ledger.residual, b.ledger.residual))


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_a_copy_of_model_optimizer_and_tracker_records_on_as_the_original(optimizer):
    """Fails on the old code: the copy kept the ids of the original's parameters and refused its first step
    ("the optimizer's parameters changed since the tracker was built")."""
    batches = _batches(5)
    model, opt, tracker = _setup(optimizer)
    for batch in batches[:2]:
        tracker.step(*batch)
    model2, opt2, tracker2 = copy.deepcopy((model, opt, tracker))
    assert tracker2.model is model2 and tracker2.optimizer is opt2
    for batch in batches[2:]:
        tracker.step(*batch)
        tracker2.step(*batch)
    assert _same_ledgers(tracker, tracker2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    # the copy's state is its own: a further step of the copy leaves the original as it was
    before = tracker.ledger.contributions.clone()
    tracker2.step(*batches[0])
    assert tracker.ledger.steps == 5 and tracker2.ledger.steps == 6 and torch.equal(tracker.ledger.contributions, before)


def test_a_tracker_copied_alone_takes_a_copy_of_its_model_and_optimizer():
    model, opt, tracker = _setup()
    batch = _batches(1)[0]
    copied = copy.deepcopy(tracker)
    assert copied.model is not model and copied.optimizer is not opt
    assert {id(p) for g in copied.optimizer.param_groups for p in g["params"]} == {id(p) for p in copied.model.parameters()}
    copied.step(*batch)
    tracker.step(*batch)
    assert _same_ledgers(tracker, copied)


def test_an_observed_loop_copied_mid_run_records_each_loop_in_its_own_tracker():
    """Fails on the old code: the copy kept the original's parameter ids (its first step refused), and its
    optimizer had no step hooks (torch's Optimizer copies none), so its loop's steps could not be recorded."""
    batches = _batches(5)
    model, opt, tracker = _setup()
    reference_model, reference_opt, reference = _setup()
    for batch in batches[:2]:
        _observed_step(model, opt, tracker, batch)
        _observed_step(reference_model, reference_opt, reference, batch)
    model2, opt2, tracker2 = copy.deepcopy((model, opt, tracker))
    for batch in batches[2:]:
        _observed_step(model2, opt2, tracker2, batch)  # the copy first: the original must not see its steps
        _observed_step(model, opt, tracker, batch)
        _observed_step(reference_model, reference_opt, reference, batch)
    assert tracker2.ledger.steps == tracker.ledger.steps == reference.ledger.steps == 5
    assert _same_ledgers(tracker, reference) and _same_ledgers(tracker2, reference)
    # one set of tracker hooks on each optimizer, each calling its own tracker
    for o, t in ((opt, tracker), (opt2, tracker2)):
        hooks = [h for d in (o._optimizer_step_pre_hooks, o._optimizer_step_post_hooks) for h in d.values()]
        assert len(hooks) == 2 and all(h.tracker_ref() is t for h in hooks)


def test_coverage_a_copied_optimizer_alone_never_calls_the_original_tracker():
    """Coverage (torch's Optimizer copies no hooks; the tracker's hooks also ignore an optimizer not theirs):
    stepping a copy of the optimizer between observe() and the loop's step leaves the observed step to the
    loop's own optimizer.step(), recorded as without the copy."""
    model, opt, tracker = _setup()
    reference_model, reference_opt, reference = _setup()
    for m, o, t in ((model, opt, tracker), (reference_model, reference_opt, reference)):
        x, y, ids = _batches(1)[0]
        o.zero_grad()
        losses = _loss(m(x), y)
        t.observe(losses, ids)
        losses.mean().backward()
        if t is tracker:
            copy.deepcopy(opt).step()  # (its parameters are copies; torch copies a Parameter without .grad)
            assert tracker.ledger.steps == 0 and tracker.observed_micro_batches == 1
        o.step()
    assert tracker.ledger.steps == 1 and _same_ledgers(tracker, reference)


def test_a_tracker_is_not_copied_in_the_middle_of_an_observed_step():
    model, opt, tracker = _setup()
    x, y, ids = _batches(1)[0]
    losses = _loss(model(x), y)
    tracker.observe(losses, ids)
    with pytest.raises(RuntimeError, match="in the middle of an observed step"):
        copy.deepcopy(tracker)
    losses.mean().backward()
    opt.step()
    assert tracker.ledger.steps == 1
    copied = copy.deepcopy((model, opt, tracker))[2]
    assert copied.ledger.steps == 1


def test_a_ddpm_trainer_copied_mid_run_with_its_analyzer_trains_and_books_as_the_original():
    """Fails on the old code (the copied analyzer's tracker refused the copy's first step). A trainer copied
    with its callbacks: the copy's analyzer follows the copy's model, both runs continue bit for bit alike."""
    from diffusers import DDPMScheduler

    from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer
    from test_ddpm_trainer import ring

    scheduler = DDPMScheduler(num_train_timesteps=100)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(8, seed=2), num_bins=4, num_probes=8, controls=1, kernel_points=2)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    trainer = DDPMTrainer(model, scheduler, ring(64), batch_size=16, lr=1e-2, progress=False, callbacks=[analyzer])
    trainer.train(2)
    twin = copy.deepcopy(trainer)
    (twin_analyzer,) = [c for c in twin.callbacks if isinstance(c, NoiseLevelAnalyzer)]
    assert twin_analyzer is not analyzer and twin_analyzer.tracker.model is twin.model
    trainer.train(2)
    twin.train(2)
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), twin.model.parameters()))
    assert twin_analyzer.tracker.ledger.steps == analyzer.tracker.ledger.steps == 4
    assert torch.equal(twin_analyzer.contributions, analyzer.contributions)


def test_a_gan_trainer_copied_mid_run_with_its_analyzer_trains_and_reports_as_the_original():
    """Fails on the old code (the copied analyzer's trackers refused the copy's first steps)."""
    from genkernel.data import ring_mode_centers
    from genkernel.gan import GANKernelAnalyzer, GANTrainer
    from test_gan import _pair, _probes, _ring

    data, modes = _ring()
    G, D = _pair(sn=True)
    analyzer = GANKernelAnalyzer(G, D, _probes(8), grouping="mode", mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
                                 window=3, eval_every=1, discriminator_groups="role_mode")
    trainer = GANTrainer(G, D, data, labels=modes, loss="nonsaturating", batch_size=16, lr_g=2e-3, lr_d=2e-3,
                         callbacks=[analyzer])
    trainer.train(2)
    twin = copy.deepcopy(trainer)
    (twin_analyzer,) = [c for c in twin.callbacks if isinstance(c, GANKernelAnalyzer)]
    trainer.train(4)
    twin.train(4)
    models = [(trainer.generator, twin.generator), (trainer.discriminator, twin.discriminator)]
    assert all(torch.equal(p, q) for a, b in models for p, q in zip(a.parameters(), b.parameters()))
    report, twin_report = analyzer.report(), twin_analyzer.report()
    assert twin_report["generator"]["steps"] == report["generator"]["steps"] > 0 and twin_report == report


def test_a_tracker_is_not_pickled_or_shallow_copied():
    """Fails on the old code (copy.copy gave a tracker sharing its ledgers with the original; pickling failed on
    whatever unpicklable object it met first, a lambda or a weak reference, naming neither the tracker nor the
    fix)."""
    import io
    import pickle

    model, opt, tracker = _setup()
    tracker.step(*_batches(1)[0])
    for attempt in (lambda: pickle.dumps(tracker), lambda: torch.save(tracker, io.BytesIO()), lambda: copy.copy(tracker)):
        with pytest.raises(TypeError, match=r"tracker.save\(path\)"):
            attempt()
    assert copy.deepcopy(tracker).ledger.steps == 1
