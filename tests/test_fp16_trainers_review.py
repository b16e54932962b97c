"""Review of float16 training with a GradScaler (``OptimizerStep(grad_scaler=)``, ``DDPMTrainer`` /
``GANTrainer(mixed_precision="fp16")``): an analyzer never changes what training does, also around the
scaler's skips and a step the tracker rolls back after its update."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from genkernel import NonFiniteError, OptimizerStep, PathKernelTracker, SkippedStep

pytestmark = pytest.mark.usefixtures("one_thread")

B, G = 8, 4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3 * B, 5, generator=g), torch.randn(3 * B, 2, generator=g), torch.randn(6, 5, generator=g)


def _loss(out, target):
    return ((out - target) ** 2).mean(dim=1)


def _identity_gap(ledger) -> float:
    return float((ledger.delta - ledger.contributions.sum(1) - ledger.rest - ledger.residual).abs().max())


def _owned_run(tracked: bool, *, autocast_dtype, scaler: torch.amp.GradScaler, fail_at: int | None = None):
    """Three updates of the MLP through OptimizerStep(grad_scaler=), each drawn again after a SkippedStep (as the
    trainers do), tracked or not; ``fail_at``: the tracker's finishing of that update raises once (an interrupt
    after the optimizer's step), and the step is run again."""
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y, probes = _data()
    tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=G, mixed_precision="observe") if tracked else None
    groups = torch.arange(B) % G
    skips = 0
    if fail_at is not None:
        finish, calls = tracker._finish, []

        def interrupted(pending):
            calls.append(1)
            if len(calls) == fail_at:
                raise KeyboardInterrupt("after the update")
            return finish(pending)

        tracker._finish = interrupted
    for k in range(3):
        while True:
            step = OptimizerStep(model, optimizer, _loss, x[k * B:(k + 1) * B], y[k * B:(k + 1) * B],
                                 autocast_dtype=autocast_dtype, grad_scaler=scaler)
            try:
                tracker.track(step, groups) if tracked else step.run()
                break
            except SkippedStep:
                skips += 1
            except KeyboardInterrupt:
                assert not step.applied
    return model, scaler, tracker, skips


def test_an_update_the_tracker_rolls_back_rolls_the_grad_scalers_update_back_too():
    """An interrupt after the optimizer's step (in the tracker's bookkeeping) rolls the update back; the step run
    again must run at the scale and growth count the uninterrupted run's did. Old code: the scaler kept the rolled-back
    update's update(), so at growth_interval=2 it grew one update early (scale 1024, growth count 0 after the three
    updates; the straight run's: 512, 1) and the weights differ from the straight run's."""
    scaler = lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)  # noqa: E731
    straight, straight_scaler, straight_tracker, skips = _owned_run(True, autocast_dtype=torch.float16, scaler=scaler())
    model, resumed_scaler, tracker, _ = _owned_run(True, autocast_dtype=torch.float16, scaler=scaler(), fail_at=2)
    assert skips == 0 and straight_scaler.get_scale() == 2.0 ** 9  # (grown once: at the second of three updates)
    assert resumed_scaler.state_dict() == straight_scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), model.parameters()))
    assert tracker.ledger.steps == 3 and torch.equal(tracker.ledger.delta, straight_tracker.ledger.delta)
    assert torch.equal(tracker.ledger.contributions, straight_tracker.ledger.contributions)


def test_a_float32_step_with_a_grad_scaler_is_booked_at_float32():
    """A float32 step (autocast_dtype=None) with a GradScaler: the loss scale (2^20) is in every signal of the
    training backward, the gradients are unscaled before the update. The tracker books the update exactly, in
    float32 (no half-precision entry), the weights bit for bit the untracked run's. Old code: LedgerCheckError "the
    group gradients of '0.weight' do not add up to the real gradient (gap 2.7e+08)": the rows read from the
    backward carried the scale."""
    plain, plain_scaler, _, _ = _owned_run(False, autocast_dtype=None, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 20))
    model, scaler, tracker, skips = _owned_run(True, autocast_dtype=None, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 20))
    assert skips == 0 and scaler.state_dict() == plain_scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    ledger = tracker.ledger
    assert ledger.steps == 3 and _identity_gap(ledger) < 1e-12
    assert tracker.gradient_scales == []  # (float32: no half-precision step to report)
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 1e-2  # measured 3.2e-4 (Adam, 3 steps)


def _gan(analyzer_kwargs=None, *, init_scale=2.0 ** 30, **scaler_kwargs):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_gan_observe import NZ, TinyD, TinyG

    from genkernel.gan import GANKernelAnalyzer, GANTrainer

    data = (0.5 * torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    probes = torch.randn(16, NZ, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    g, d = nn.Sequential(nn.Unflatten(1, (NZ, 1, 1)), TinyG()), TinyD()
    callbacks = [] if analyzer_kwargs is None else [GANKernelAnalyzer(
        g, d, probes, num_groups=2, window=2, eval_every=1, state_dtype=torch.float32, **analyzer_kwargs)]
    trainer = GANTrainer(g, d, data, latent_dim=NZ, batch_size=8, mixed_precision="fp16", callbacks=callbacks)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, **scaler_kwargs)
    return trainer, (callbacks[0] if callbacks else None)


def test_a_skipped_step_keeps_the_batchnorm_statistics_its_forward_advanced_with_the_analyzer_too():
    """GANTrainer fp16, the discriminator with BatchNorm, the scaler at 2^30: its first discriminator steps overflow
    and are skipped; their forwards advanced D's running statistics, as in the trainer without an analyzer, which
    trains on from them. With GANKernelAnalyzer(mixed_precision='observe') every tensor of both networks' state
    (buffers too) is bit for bit the plain run's, the loop steps are the trainer's counts. Old code: the tracker
    rolled D's running_mean/var/num_batches_tracked back at each skip (num_batches_tracked 2 fewer per skip)."""
    plain, _ = _gan()
    plain.train(2)
    trainer, analyzer = _gan(dict(mixed_precision="observe"))
    trainer.train(2)
    assert plain.skipped_steps == trainer.skipped_steps and trainer.skipped_steps["discriminator"] > 0  # measured 15
    for net in ("generator", "discriminator"):
        ours, theirs = getattr(trainer, net).state_dict(), getattr(plain, net).state_dict()
        assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    assert trainer.grad_scaler.state_dict() == plain.grad_scaler.state_dict()
    assert analyzer.g_loop_steps == [1, 2] and analyzer.d_loop_steps == [1, 2] == list(range(1, trainer.d_steps_done + 1))
    for tracker in (analyzer.g_tracker, analyzer.d_tracker):
        assert tracker.ledger.steps == 2 and _identity_gap(tracker.ledger) < 1e-12
        assert [e["gradient_precision"] for e in tracker.gradient_scales] == ["float16"] * 2


def test_a_gan_trainer_stopped_by_its_skip_streak_goes_on_once_the_scale_is_lowered():
    """64 skips in a row stop GANTrainer with the fixes named; train() again after lowering the scale (2^30: a
    few more skips, then updates) trains, as DDPMTrainer does. Old code: the streak was never reset, so the first
    skip after the stop stopped it again ("skipped 65 steps in a row")."""
    trainer, _ = _gan(init_scale=2.0 ** 60, backoff_factor=0.99)
    with pytest.raises(NonFiniteError, match="64 steps in a row.*mixed_precision='bf16'"):
        trainer.train(1)
    assert trainer.skipped_steps == {"generator": 0, "discriminator": 64} and trainer.d_steps_done == 0
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30)
    trainer.train(1)
    assert trainer.iteration == trainer.g_steps == trainer.d_steps_done == 1
    assert trainer.skipped_steps["discriminator"] > 64  # measured 64 + 15


def test_the_ddpm_trainer_keeps_the_batchnorm_statistics_of_its_skipped_steps_with_the_analyzer_too():
    """DDPMTrainer fp16, a class-conditional denoiser with BatchNorm, class dropout, a logger, the scaler at 2^30:
    its first steps are skipped (13); the UNet's whole state (running statistics too) is bit for bit the plain
    run's, the logger and the analyzer number the three updates 1, 2, 3 as the trainer counts them, each booked in
    float16, the identity closed. Old code: the analyzer's tracker rolled the running statistics back at each skip
    (bn.running_mean/var/num_batches_tracked differ; sampling reads them)."""
    from test_doc_snippets import TinyDenoiser

    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler

    class Normalized(TinyDenoiser):
        def __init__(self):
            super().__init__(num_class_embeds=4)
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x, t, labels=None):
            return super().forward(self.bn(x), t, labels)

    data = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.arange(12) % 3

    def run(analyzer_kwargs=None):
        scheduler = make_scheduler(num_train_timesteps=100)
        torch.manual_seed(0)
        logged = []
        callbacks = [] if analyzer_kwargs is None else [NoiseLevelAnalyzer(
            scheduler, data, num_bins=4, num_probes=2, kernel_points=2, progress=False, probe_conditioning=labels,
            num_classes=4, **analyzer_kwargs)]
        trainer = DDPMTrainer(Normalized(), scheduler, data, labels=labels, batch_size=6, mixed_precision="fp16",
                              conditional=True, class_dropout=0.2, null_class=3, callbacks=callbacks, progress=False,
                              log=lambda metrics, step: logged.append(step))
        trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30)
        trainer.train(3)
        return trainer, (callbacks[0] if callbacks else None), logged

    plain, _, plain_logged = run()
    trainer, analyzer, logged = run(dict(mixed_precision="observe"))
    assert trainer.skipped_steps == plain.skipped_steps > 0  # measured 13
    ours, theirs = trainer.model.state_dict(), plain.model.state_dict()
    assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    assert trainer.grad_scaler.state_dict() == plain.grad_scaler.state_dict()
    assert logged == plain_logged == analyzer.global_steps == [1, 2, 3]
    assert analyzer.ledger.steps == 3 and _identity_gap(analyzer.ledger) < 1e-12
    assert [e["gradient_precision"] for e in analyzer.tracker.gradient_scales] == ["float16"] * 3


def test_a_step_skipped_for_a_non_finite_loss_keeps_the_buffers_its_forward_advanced_with_a_tracker_too():
    """A float32 step whose loss is not finite (an inf target) is skipped by SupervisedTrainer with its batch used up
    and the BatchNorm statistics its forward advanced kept; with a LedgerCallback the tracker rolled the buffers back
    (old code, after training on to 6 updates: running_mean 5.0e-2 and running_var 9.7e-2 apart, num_batches_tracked
    2 short; the parameters equal), so a run continued after the error differed in eval mode."""
    from genkernel import NonFiniteError, PathKernelTracker
    from genkernel.supervised import LedgerCallback, SupervisedTrainer

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 5, generator=g), torch.randn(24, 2, generator=g)
    y[5, 0] = float("inf")
    loss = lambda out, t: ((out - t) ** 2).mean(dim=1)  # noqa: E731

    def run(tracked):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, batch_size=6)
        if tracked:
            tracker = PathKernelTracker(model, trainer.optimizer, loss, torch.randn(4, 5, generator=g), num_groups=2)
            trainer.callbacks.append(LedgerCallback(tracker, torch.arange(24) % 2))
        failures = 0
        while trainer.global_step < 6:
            try:
                trainer.fit(x, y, steps=1)
            except NonFiniteError:
                failures += 1
        return model, failures

    plain, plain_failures = run(False)
    model, failures = run(True)
    assert failures == plain_failures >= 1
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
