"""Owned steps in mixed precision: ``OptimizerStep(autocast_dtype=)``, ``DDPMTrainer`` and ``GANTrainer``
with ``mixed_precision="bf16"``, analyzers built with ``mixed_precision="observe"``.

An owned step run under autocast takes its group rows from its own half-precision graph, as an observed
loop's are: the ledger of an owned step equals the one an observed loop running the same forward, loss
and backward keeps; training is bit for bit the trainer's without the analyzer; every step reports its
precision and relative residual; the identity closes; a default analyzer refuses before anything moves."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from genkernel import OptimizerStep, PathKernelTracker
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler, tiny_unet
from genkernel.gan import GANKernelAnalyzer, GANTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

B, G, STEPS, MAX_NORM = 8, 4, 3, 0.5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * B, 5, generator=g), torch.randn(STEPS * B, 2, generator=g), torch.randn(6, 5, generator=g)


def _loss(out, target):
    return ((out - target) ** 2).mean(dim=1)


def _identity_gap(ledger) -> float:
    return float((ledger.delta - ledger.contributions.sum(1) - ledger.rest - ledger.residual).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_owned_step_under_autocast_books_its_half_precision_group_gradients(dtype):
    """Owned steps of two micro-batches under autocast, clipped (test_mixed_precision's loop, run as
    OptimizerStep(micro_batches=2, autocast_dtype=)): the parameters bit for bit the hand-written loop's, the
    ledger the groups' gradients of the half-precision graph pushed by hand (masked torch.autograd.grad, the
    clip factor exactly: the owned step knows its scale, an observed loop fits it), each step booked at its
    precision, the identity closed. Old code: no autocast_dtype."""
    from test_mixed_precision import B as LOOP_B, G as LOOP_G, MAX_NORM as LOOP_MAX_NORM, STEPS as LOOP_STEPS
    from test_mixed_precision import _data as loop_data, _loop, _model, _pushed

    reference = []
    plain, _ = _loop(dtype, reference=reference)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y, probes = loop_data()
    tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=LOOP_G, max_grad_norm=LOOP_MAX_NORM,
                                mixed_precision="observe")
    for k in range(LOOP_STEPS):
        rows = slice(2 * k * LOOP_B, 2 * (k + 1) * LOOP_B)
        step = OptimizerStep(model, optimizer, _loss, x[rows], y[rows], micro_batches=2, max_grad_norm=LOOP_MAX_NORM,
                             autocast_dtype=dtype)
        tracker.track(step, torch.arange(2 * LOOP_B) % LOOP_G)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    name = str(dtype).removeprefix("torch.")
    assert [e["gradient_precision"] for e in tracker.gradient_scales] == [name] * LOOP_STEPS
    assert [e["scale"] for e in tracker.gradient_scales] == [pytest.approx(r["clip"], rel=1e-6) for r in reference]
    # (the loop's rows are each micro-batch's mean: 2 times the owned step's 1/(2B) coefficients)
    expected = _pushed(model, reference, [r["clip"] / 2 for r in reference])
    scale = float(expected.abs().max())
    assert float((tracker.ledger.contributions - expected).abs().max()) < 1e-6 * scale
    assert _identity_gap(tracker.ledger) < 1e-12
    assert all(e["relative_residual"] < 0.05 for e in tracker.gradient_scales)


def test_a_step_under_autocast_needs_the_dense_group_state_or_is_refused_before_it_runs():
    """A factored group state reads per-example factors from a pass of its own, in float32, which cannot
    follow the step's bfloat16 rounding: refused before the forward (the model as it was), naming the fix."""
    x, y, probes = _data()
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=G, group_state="factored",
                                mixed_precision="observe")
    step = OptimizerStep(model, optimizer, _loss, x[:B], y[:B], autocast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group_state='dense'"):
        tracker.track(step, torch.arange(B) % G)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not step.applied


class _CastingMLP(nn.Module):
    """An MLP whose forward runs its own autocast: nothing before the forward shows the half precision."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x)


def test_autocast_inside_the_model_on_a_route_with_a_pass_of_its_own_is_refused_and_rolled_back():
    """The per-example route (dense, gradient_route='example') takes its rows from its own float32 pass: a
    bfloat16 graph found only after the forward is refused with the fix, the step rolled back."""
    x, y, probes = _data()
    model = _CastingMLP()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=G, group_state="dense",
                                gradient_route="example", mixed_precision="observe")
    with pytest.raises(RuntimeError, match="runs in bfloat16.*gradient_route='graph'"):
        tracker.step(x[:B], y[:B], torch.arange(B) % G)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and tracker.ledger.steps == 0


def _ddpm(mixed_precision, analyzer_kwargs=None, **trainer_kwargs):
    scheduler = make_scheduler(num_train_timesteps=100)
    torch.manual_seed(0)
    model = tiny_unet(sample_size=8, in_channels=1, channels=(8, 16))
    data = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    callbacks = [] if analyzer_kwargs is None else [NoiseLevelAnalyzer(
        scheduler, data, num_bins=4, num_probes=2, kernel_points=2, progress=False, **analyzer_kwargs)]
    trainer = DDPMTrainer(model, scheduler, data, batch_size=6, mixed_precision=mixed_precision,
                          callbacks=callbacks, progress=False, **trainer_kwargs)
    return trainer, (callbacks[0] if callbacks else None)


def test_the_ddpm_trainer_trains_in_bf16_with_the_analyzer_as_without_it():
    """DDPMTrainer(mixed_precision='bf16') with micro-batches, clipping and an EMA: the UNet and the EMA bit for
    bit the trainer's without the analyzer (and not the float32 run's), every step of the model's and the
    EMA's ledgers booked, in bfloat16, the identity closed, the report strict JSON naming the rounding."""
    from diffusers.training_utils import EMAModel

    def run(mixed_precision, analyzer_kwargs=None):
        trainer, analyzer = _ddpm(mixed_precision, analyzer_kwargs, micro_batches=2, max_grad_norm=1.0)
        trainer.ema = EMAModel(trainer.model.parameters(), decay=0.9)
        trainer.train(STEPS)
        return trainer, analyzer

    plain, _ = run("bf16")
    trainer, analyzer = run("bf16", dict(mixed_precision="observe"))
    full, _ = run("no")
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(plain.ema.shadow_params, trainer.ema.shadow_params))
    assert any(not torch.equal(a, b) for a, b in zip(full.model.parameters(), trainer.model.parameters()))
    ledger = analyzer.ledger
    assert ledger.steps == STEPS and _identity_gap(ledger) < 1e-12
    assert [e["gradient_precision"] for e in analyzer.tracker.gradient_scales] == ["bfloat16"] * STEPS
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 0.1  # measured 0.03 (Simpson-free midpoint rule)
    for ema_ledger in analyzer.ema_ledgers.values():
        assert ema_ledger.steps == STEPS and _identity_gap(ema_ledger) < 1e-12
    report = analyzer.report()
    json.dumps(report, allow_nan=False)
    assert "bfloat16 gradients" in json.dumps(report)


def test_a_default_analyzer_refuses_a_bf16_trainer_before_anything_moves():
    """The refusal names the option and the trainer's setting; the UNet, the optimizer and the draws are as
    before, so the trainer without the analyzer then trains exactly as a fresh one."""
    trainer, analyzer = _ddpm("bf16", {})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="mixed_precision='observe'.*mixed_precision='no'"):
        trainer.train(1)
    assert trainer.global_step == 0 and not trainer.optimizer.state
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.callbacks.clear()
    trainer.train(2)
    fresh, _ = _ddpm("bf16")
    fresh.train(2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), trainer.model.parameters()))


def test_trainer_precision_settings_are_checked_and_kept_in_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        _ddpm(torch.bfloat16)
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        OptimizerStep(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), _loss, torch.zeros(2, 5),
                      torch.zeros(2, 2), grad_scaler=object())
    scheduler = make_scheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="float64 parameters"):
        DDPMTrainer(tiny_unet(sample_size=8, in_channels=1, channels=(8, 16)).double(), scheduler,
                    torch.zeros(4, 1, 8, 8, dtype=torch.float64), mixed_precision="bf16", progress=False)
    with pytest.raises(ValueError, match="autocast_dtype must be one of"):
        OptimizerStep(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), _loss, torch.zeros(2, 5),
                      torch.zeros(2, 2), autocast_dtype=torch.float32)
    trainer, _ = _ddpm("bf16", checkpoint_dir=tmp_path)
    trainer.train(1)
    trainer.save_checkpoint()
    other, _ = _ddpm("no", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="mixed_precision"):
        other.resume()


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_the_gan_trainer_trains_in_half_precision_with_the_analyzer_as_without_it(mixed_precision):
    """GANTrainer(mixed_precision=), DCGAN-like pair with BatchNorm: both networks bit for bit the trainer's
    without the analyzer (and not the float32 run's), every step of both players booked at its precision,
    identities closed; fp16's one GradScaler, started at 2^30, skips the discriminator steps that overflow
    (drawn again) the same way with the analyzer; a default analyzer refuses at the first step with both
    players as before."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_gan_observe import NZ, TinyD, TinyG

    data = (0.5 * torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    probes = torch.randn(16, NZ, generator=torch.Generator().manual_seed(5))

    def run(mixed_precision, analyzer_kwargs=None):
        torch.manual_seed(0)
        g, d = nn.Sequential(nn.Unflatten(1, (NZ, 1, 1)), TinyG()), TinyD()
        callbacks = [] if analyzer_kwargs is None else [GANKernelAnalyzer(
            g, d, probes, num_groups=2, window=STEPS, eval_every=1, state_dtype=torch.float32, **analyzer_kwargs)]
        trainer = GANTrainer(g, d, data, latent_dim=NZ, batch_size=8, mixed_precision=mixed_precision,
                             callbacks=callbacks)
        if trainer.grad_scaler is not None:
            trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30)
        return trainer, (callbacks[0] if callbacks else None)

    plain, _ = run(mixed_precision)
    plain.train(STEPS)
    trainer, analyzer = run(mixed_precision, dict(mixed_precision="observe"))
    trainer.train(STEPS)
    full, _ = run("no")
    full.train(STEPS)
    networks = lambda t: [*t.generator.parameters(), *t.discriminator.parameters()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(networks(plain), networks(trainer)))
    assert any(not torch.equal(a, b) for a, b in zip(networks(full), networks(trainer)))
    name = {"bf16": "bfloat16", "fp16": "float16"}[mixed_precision]
    for tracker in (analyzer.g_tracker, analyzer.d_tracker):
        assert tracker.ledger.steps == STEPS and _identity_gap(tracker.ledger) < 1e-12
        assert [e["gradient_precision"] for e in tracker.gradient_scales] == [name] * STEPS
    assert trainer.skipped_steps == plain.skipped_steps and trainer.g_steps == trainer.d_steps_done == STEPS
    if mixed_precision == "fp16":
        assert trainer.skipped_steps["discriminator"] > 0  # measured 15
        assert trainer.grad_scaler.get_scale() == plain.grad_scaler.get_scale()
    refused, _ = run(mixed_precision, {})
    before = [p.detach().clone() for p in networks(refused)]
    with pytest.raises(RuntimeError, match="mixed_precision='observe'"):
        refused.train(1)
    assert all(torch.equal(a, b) for a, b in zip(before, networks(refused)))


def _fp16_ddpm(analyzer_kwargs=None, *, init_scale=2.0 ** 20, **scaler_kwargs):
    """A DDPMTrainer in fp16 whose GradScaler starts far too high: its first steps overflow and are skipped."""
    trainer, analyzer = _ddpm("fp16", analyzer_kwargs)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, **scaler_kwargs)
    return trainer, analyzer


def test_the_ddpm_trainer_in_fp16_skips_overflowing_steps_and_the_analyzer_books_the_updates():
    """DDPMTrainer(mixed_precision='fp16'): a GradScaler at 2^20 skips the steps that overflow (the scale halved
    each time, nothing updated), train(n) still makes n updates; with the analyzer the UNet and the scaler are
    bit for bit the same, every update booked in float16 (its witness taken at the scale the step ran at), the
    identity closed. Old code: no 'fp16'."""
    plain, _ = _fp16_ddpm()
    plain.train(STEPS)
    trainer, analyzer = _fp16_ddpm(dict(mixed_precision="observe"))
    trainer.train(STEPS)
    assert plain.skipped_steps > 0 and trainer.skipped_steps == plain.skipped_steps  # measured 3
    assert trainer.global_step == STEPS and len(trainer.losses) == STEPS
    assert trainer.grad_scaler.get_scale() == plain.grad_scaler.get_scale() == 2.0 ** (20 - plain.skipped_steps)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), trainer.model.parameters()))
    ledger = analyzer.ledger
    assert ledger.steps == STEPS and _identity_gap(ledger) < 1e-12
    assert [e["gradient_precision"] for e in analyzer.tracker.gradient_scales] == ["float16"] * STEPS
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 0.1  # measured 0.026


def test_an_fp16_run_resumes_bit_for_bit_with_its_scaler(tmp_path):
    """The checkpoint keeps the GradScaler's scale and growth count and the skipped count: a resumed run is the
    straight one (UNet, scale, skips)."""
    straight, _ = _fp16_ddpm()
    straight.train(4)
    first, _ = _fp16_ddpm()
    first.checkpoint_dir = tmp_path
    first.train(2)
    first.save_checkpoint()
    resumed, _ = _fp16_ddpm(init_scale=2.0 ** 16)  # (the checkpoint's scale replaces it)
    resumed.checkpoint_dir = tmp_path
    assert resumed.resume()
    resumed.train(2)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))
    assert resumed.grad_scaler.state_dict() == straight.grad_scaler.state_dict()
    assert resumed.skipped_steps == straight.skipped_steps


def test_a_step_abandoned_after_its_unscale_leaves_the_scaler_as_it_was():
    """A callback that fails between the gradients (unscaled) and the update: the step is handed back, and the
    next try unscales again (old scaler state: "unscale_() has already been called"), training as a fresh run."""
    from genkernel import TrainerCallback

    class FailOnce(TrainerCallback):
        failed = False

        def wrap_step(self, trainer, step, perform):
            if not self.failed:
                self.failed = True
                step.compute_gradients()
                raise RuntimeError("refused after the gradients")
            return perform()

    trainer, _ = _fp16_ddpm(init_scale=2.0 ** 10)
    trainer.callbacks.append(FailOnce())
    with pytest.raises(RuntimeError, match="refused after the gradients"):
        trainer.train(1)
    trainer.train(2)
    fresh, _ = _fp16_ddpm(init_scale=2.0 ** 10)
    fresh.train(2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), trainer.model.parameters()))
    assert trainer.grad_scaler.state_dict() == fresh.grad_scaler.state_dict()


def test_gradients_that_overflow_at_every_scale_stop_the_trainer():
    """A scaler that barely backs off keeps overflowing: 64 skips in a row stop train() with the fixes named,
    nothing updated."""
    from genkernel import NonFiniteError

    from genkernel.diffusion import MLPDenoiser

    torch.manual_seed(0)
    trainer = DDPMTrainer(MLPDenoiser(2, hidden=16, depth=2), make_scheduler(num_train_timesteps=100),
                          torch.randn(16, 2), batch_size=8, mixed_precision="fp16", progress=False)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60, backoff_factor=0.99)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteError, match="64 steps in a row.*mixed_precision='bf16'"):
        trainer.train(1)
    assert trainer.skipped_steps == 64 and trainer.global_step == 0
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_the_supervised_trainer_in_half_precision_keeps_its_ledger_as_without_it(mixed_precision):
    """SupervisedTrainer(mixed_precision=) with a LedgerCallback (tracker under mixed_precision='observe'): the
    model bit for bit the trainer's without it, every update booked at its precision, the identity closed; fp16's
    scaler (started at 2^24) skips the same steps either way and fit(steps=n) still makes n updates; a saved state
    resumes the straight run. Old code: no mixed_precision."""
    from genkernel.supervised import LedgerCallback, SupervisedTrainer

    x, y, probes = _data()

    def trainer(callbacks=()):
        model = _mlp()
        made = SupervisedTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), _loss, batch_size=B,
                                 mixed_precision=mixed_precision, micro_batches=2, callbacks=list(callbacks))
        if made.grad_scaler is not None:
            made.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
        return made

    plain = trainer()
    plain.fit(x, y, steps=STEPS)
    tracked = trainer()
    tracker = PathKernelTracker(tracked.model, tracked.optimizer, _loss, probes, num_groups=G,
                                mixed_precision="observe")
    tracked.callbacks.append(LedgerCallback(tracker, torch.arange(x.shape[0]) % G))
    tracked.fit(x, y, steps=STEPS)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), tracked.model.parameters()))
    assert tracked.global_step == STEPS and tracked.skipped_steps == plain.skipped_steps
    if mixed_precision == "fp16":
        assert plain.skipped_steps > 0
    name = {"bf16": "bfloat16", "fp16": "float16"}[mixed_precision]
    assert [e["gradient_precision"] for e in tracker.gradient_scales] == [name] * STEPS
    assert tracker.ledger.steps == STEPS and _identity_gap(tracker.ledger) < 1e-12
    half = trainer()
    half.fit(x, y, steps=1)
    state = half.state_dict()
    resumed = trainer()
    resumed.load_state_dict(state)
    resumed.fit(x, y, steps=STEPS - 1)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), resumed.model.parameters()))
    assert resumed.skipped_steps == plain.skipped_steps


def test_a_non_finite_loss_under_fp16_is_skipped_as_a_grad_scaler_skips_it():
    """A point at 1e6 overflows the float16 forward: its batch's loss is not finite. An AMP loop's backward would
    overflow and its scaler skip the step, halving the scale and resetting the growth count; the fp16 trainer does
    the same without the backward (old code: NonFiniteError stopped training), with the analyzer bit for bit."""
    from genkernel.diffusion import MLPDenoiser

    scheduler = make_scheduler(num_train_timesteps=100)
    data = torch.randn(12, 2, generator=torch.Generator().manual_seed(2))
    data[3] = 1e6

    def run(analyzer_kwargs=None):
        torch.manual_seed(0)
        callbacks = [] if analyzer_kwargs is None else [NoiseLevelAnalyzer(
            scheduler, data[4:], num_bins=4, num_probes=2, kernel_points=2, progress=False, **analyzer_kwargs)]
        trainer = DDPMTrainer(MLPDenoiser(2, hidden=16, depth=2), scheduler, data, batch_size=6, mixed_precision="fp16",
                              callbacks=callbacks, progress=False)
        trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        trainer.train(STEPS)
        return trainer, (callbacks[0] if callbacks else None)

    plain, _ = run()
    trainer, analyzer = run(dict(mixed_precision="observe"))
    assert plain.skipped_steps >= 1 and trainer.skipped_steps == plain.skipped_steps and trainer.global_step == STEPS
    state = trainer.grad_scaler.state_dict()
    assert state["scale"] == 2.0 ** (10 - plain.skipped_steps) and state == plain.grad_scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), trainer.model.state_dict().values()))
    assert analyzer.ledger.steps == STEPS and _identity_gap(analyzer.ledger) < 1e-12


def test_a_skipped_generator_step_neither_ends_its_iteration_nor_writes_a_checkpoint(tmp_path):
    """GANTrainer(mixed_precision='fp16', checkpoint_every=1): a callback raises the scale to 2^40 before the first
    generator step, which skips until the scale falls back; the iteration draws its generator step again and
    ends once, so 3 iterations write 3 checkpoints (old code wrote one more for every skipped generator step:
    iteration 0 % 1 == 0) and make 3 generator updates."""
    from test_gan_observe import NZ, TinyD, TinyG

    from genkernel import TrainerCallback

    class RaiseScaleOnce(TrainerCallback):
        done = False

        def wrap_step(self, trainer, step, perform):
            if step.phase == "generator" and not self.done:
                self.done = True
                trainer.grad_scaler.update(new_scale=2.0 ** 40)
            return perform()

    torch.manual_seed(0)
    data = (0.5 * torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    trainer = GANTrainer(nn.Sequential(nn.Unflatten(1, (NZ, 1, 1)), TinyG()), TinyD(), data, latent_dim=NZ,
                         batch_size=8, mixed_precision="fp16", callbacks=[RaiseScaleOnce()],
                         checkpoint_dir=tmp_path, checkpoint_every=1)
    saves = []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda path: (saves.append(trainer.iteration), save(path))
    trainer.train(STEPS)
    assert trainer.skipped_steps["generator"] > 0 and trainer.g_steps == STEPS
    assert saves == [1, 2, 3]
