"""GANKernelAnalyzer(track_steps=(first, last)): track only the iterations whose generator steps are
first..last under GANTrainer, then stop paying; stop() ends the window in a hand-written loop."""
import json

import pytest
import torch

from genkernel.data import gaussian_ring, ring_mode_centers
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
PROBES = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)


def _pair():
    torch.manual_seed(0)
    return MLPGenerator(2, 2, hidden=12, depth=2).double(), MLPDiscriminator(2, hidden=12, depth=2).double()


def _run(iterations, track_steps=None, analyze=True, checkpoint_dir=None, resume=False, checkpoint_every=0):
    data, modes = gaussian_ring(128, radius=2.0, std=0.05, seed=0)
    G, D = _pair()
    callbacks = []
    if analyze:
        callbacks.append(GANKernelAnalyzer(G, D, PROBES, num_groups=3, window=2, eval_every=1, controls=1,
                                           mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
                                           track_steps=track_steps))
    trainer = GANTrainer(G, D, data.double(), labels=modes, batch_size=16, d_steps=2, callbacks=callbacks, seed=3,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    trainer.train(iterations, resume=resume)
    return trainer, (callbacks[0] if callbacks else None)


def _same(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_a_window_tracks_its_iterations_only_and_training_is_unchanged():
    plain, _ = _run(7, analyze=False)
    trainer, analyzer = _run(7, track_steps=(3, 5))
    for a, b in ((plain.generator, trainer.generator), (plain.discriminator, trainer.discriminator)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert analyzer.stopped and analyzer.g_loop_steps == [3, 4, 5]
    assert analyzer.d_loop_steps == [5, 6, 7, 8, 9, 10]  # two discriminator steps before each generator step
    ledger = analyzer.generator_ledger()
    assert ledger.steps == 3 and analyzer.discriminator_ledger.steps == 6
    # the ledger runs from G after iteration 2 to G after iteration 5, exactly
    early, late = _run(2, analyze=False)[0].generator, _run(5, analyze=False)[0].generator
    with torch.no_grad():
        before, after = early.eval()(PROBES), late.eval()(PROBES)
    torch.testing.assert_close(ledger.f_start, before, rtol=0, atol=0)
    torch.testing.assert_close(ledger.f_end, after, rtol=0, atol=0)
    report = analyzer.report()
    assert report["track_steps"] == [3, 5] and report["stopped"] is True
    assert report["partial_window"]["loop_steps"] == [5, 5]  # windows of 2: (3, 4) closed, 5 left open at the stop
    assert [w["loop_steps"] for w in report["windows"]] == [[3, 4]]
    from genkernel.report import summarize

    (summary,) = summarize(analyzer.state_dict())["states"].values()
    assert summary["settings"]["track_steps"] == [3, 5] and summary["settings"]["stopped"] is True
    assert summary["generator_steps"] == 3 and _same(summary["partial_window"]["loop_steps"], [5, 5])


def test_a_window_over_every_step_is_the_untracked_analyzer():
    _, whole = _run(4, track_steps=(1, 4))
    _, every = _run(4)
    for name in ("geometry", "control_0"):
        assert torch.equal(whole.generator_ledgers[name].contributions, every.generator_ledgers[name].contributions)
    assert not whole.stopped  # the window's last step is the run's: nothing after it stopped it
    assert _same(whole.report()["windows"], every.report()["windows"])


def test_a_run_resumed_inside_or_after_the_window_keeps_the_uninterrupted_ledgers(tmp_path):
    _, straight = _run(7, track_steps=(2, 5))
    for stop_at in (4, 6):
        folder = tmp_path / str(stop_at)
        _run(stop_at, track_steps=(2, 5), checkpoint_dir=folder, checkpoint_every=stop_at)
        _, resumed = _run(7, track_steps=(2, 5), checkpoint_dir=folder, resume=True)
        assert resumed.stopped and resumed.g_loop_steps == [2, 3, 4, 5]
        for name, ledger in straight.generator_ledgers.items():
            assert torch.equal(resumed.generator_ledgers[name].contributions, ledger.contributions), (stop_at, name)
        assert torch.equal(resumed.discriminator_ledger.contributions, straight.discriminator_ledger.contributions)
        assert _same(resumed.report()["windows"], straight.report()["windows"])


def test_stop_in_a_hand_written_loop_records_no_later_step():
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=3, controls=0, window=2, eval_every=1,
                                 track_discriminator=False)
    optimizer = torch.optim.SGD(G.parameters(), lr=0.05)
    analyzer.bind(optimizer)
    for k in range(3):
        if k == 2:
            analyzer.stop()
            with pytest.raises(RuntimeError, match="stopped"):
                analyzer.observe_generator(torch.ones(4, dtype=F64), torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64))
        z = torch.randn(16, 2, generator=torch.Generator().manual_seed(k), dtype=F64)
        samples = G(z)
        losses = torch.nn.functional.softplus(-D(samples)).reshape(-1)
        if k < 2:
            analyzer.observe_generator(losses, z, samples=samples)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    assert analyzer.generator_ledger().steps == 2 and analyzer.report()["stopped"] is True


@pytest.mark.parametrize("window", [(0, 3), (4, 3), (1.5, 3), (1,), "1-3"])
def test_bad_windows_are_refused(window):
    G, D = _pair()
    with pytest.raises(ValueError, match="track_steps must be"):
        GANKernelAnalyzer(G, D, PROBES, num_groups=3, track_steps=window)


def test_a_window_is_refused_in_a_hand_written_loop_with_the_fix():
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=3, track_steps=(2, 4))
    with pytest.raises(ValueError, match="bind at the window's first step.*analyzer.stop"):
        analyzer.bind(torch.optim.SGD(G.parameters(), lr=0.1))


def test_a_checkpoint_at_the_windows_last_step_keeps_the_emas_last_update(tmp_path):
    """The EMA moves after the window's last generator step; the uninterrupted run records that
    update when the next step stops the analyzer. A run saved at that iteration's end and resumed
    lost it (its EMA ledger had 1 update of 2); the state is now saved stopped, with it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def run(iterations, **options):
        G, D = _pair()
        data = gaussian_ring(128, radius=2.0, std=0.05, seed=0)[0].double()
        analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=3, window=2, eval_every=1, controls=0,
                                     track_discriminator=False, track_steps=(2, 3))
        ema = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        GANTrainer(G, D, data, batch_size=16, ema=ema, callbacks=[analyzer], seed=2, **options).train(
            iterations, resume="checkpoint_every" not in options and "checkpoint_dir" in options)
        return analyzer

    straight = run(5)
    run(3, checkpoint_dir=tmp_path, checkpoint_every=3)
    resumed = run(5, checkpoint_dir=tmp_path)
    a, b = straight.generator_ema_ledgers["geometry"], resumed.generator_ema_ledgers["geometry"]
    assert a.steps == b.steps == 2
    assert torch.equal(a.contributions, b.contributions) and torch.equal(a.f_end, b.f_end)
