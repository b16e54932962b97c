"""Review of DDPMTrainer(ema=) / GANTrainer(ema=) (commits 7e917ae, ae7249d).

What must hold beyond tests/test_trainer_ema.py: the EMA follows every update that is in the weights,
also one after which a callback raised (the GAN trainer counts such an update, and a run continued
after it equals the straight run); an EMA the trainer cannot average correctly (weights of a less
precise dtype than the model's, ema-pytorch's EMA built over another model) is refused when the
trainer is built, with the fix; a resume whose analyzer keeps the EMA ledger the saved one did not
names ``ema_ledger``. Coverage: ema-pytorch's own warm-up and ``update_every`` schedule (with the
online model in its state) through training, the EMA ledger and a resume in the middle of the
warm-up; a GAN resumed with an analyzer and each EMA; a tracked window and an analyzer attached
late against the documented user loop; BatchNorm buffers; sampling with the EMA touches no RNG.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ema_pytorch import EMA
from torch import nn
from torch.optim.swa_utils import AveragedModel

from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.core.tracking.ema import ema_weights
from genkernel.diffusion import MLPDenoiser, reverse_sample
from genkernel.diffusion.objectives import diffusion_loss
from test_trainer_ema import EMAS, F64, analyzer, assert_ledger_adds_up, gan_run, mlp, step_by_hand, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(list(a), list(b), strict=True))


def ema_params(run_ema, model):
    with ema_weights(run_ema, model) as averaged:
        return [p.detach().clone() for p in averaged.parameters()]


class RaiseAfterUpdate(TrainerCallback):
    """Raises in ``on_step_end`` (the update is in the weights) of its ``at``-th step of ``phase``."""

    def __init__(self, at, phase=None):
        self.at, self.phase, self.seen = at, phase, 0

    def on_step_end(self, trainer, step):
        if self.phase is None or step.phase == self.phase:
            self.seen += 1
            if self.seen == self.at:
                raise KeyboardInterrupt("stopped after the update")


def gan_trainer(kind, callbacks=(), ema=None):
    from genkernel.data import gaussian_ring
    from genkernel.gan import GANTrainer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=8, depth=2).double(), MLPDiscriminator(2, hidden=8, depth=2).double()
    data = gaussian_ring(128, radius=2.0, std=0.05, seed=0)[0].double()
    ema = EMAS[kind](G) if ema is None else ema(G)
    return GANTrainer(G, D, data, batch_size=16, ema=ema, callbacks=list(callbacks), seed=2)


# ------------------------------------------------------------------------------------------
# Faults (fail on 7e917ae/ae7249d)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["diffusers", "averaged"])
def test_the_gan_ema_follows_a_generator_update_after_which_a_callback_raised(kind):
    straight = gan_trainer(kind)
    straight.train(4)
    stopped = gan_trainer(kind, [RaiseAfterUpdate(2, "generator")])
    with pytest.raises(KeyboardInterrupt):
        stopped.train(4)
    assert stopped.g_steps == 2  # the trainer counts the update: it is in G's weights
    stopped.train(4)
    assert same(straight.generator.parameters(), stopped.generator.parameters())  # the run continued exactly
    assert same(ema_params(straight.ema, straight.generator), ema_params(stopped.ema, stopped.generator))
    updates = stopped.ema.optimization_step if kind == "diffusers" else int(stopped.ema.n_averaged)
    assert updates == stopped.g_steps == 4


def test_the_ddpm_ema_follows_an_update_after_which_a_callback_raised():
    model = mlp()
    run = trainer(model, EMAS["averaged"](model), callbacks=[RaiseAfterUpdate(2)])
    with pytest.raises(KeyboardInterrupt):
        run.train(3)
    # the hand-written loop: the EMA updated after each of the two updates in the weights
    twin_model = mlp()
    twin_ema = EMAS["averaged"](twin_model)
    twin = trainer(twin_model)
    for _ in range(2):
        twin.train_step()
        step_by_hand("averaged", twin_ema, twin_model)
    assert same(run.model.parameters(), twin.model.parameters())
    assert int(run.ema.n_averaged) == 2
    assert same(run.ema.module.parameters(), twin_ema.module.parameters())
    # the update is counted as the GAN trainer counts one (the step numbers and losses follow the updates)
    assert run.global_step == 2 and run.losses == twin.losses
    # continued for two more updates: model and EMA are the straight four-update run's
    run.train(2)
    straight_model = mlp()
    straight = trainer(straight_model, EMAS["averaged"](straight_model))
    straight.train(4)
    assert same(run.model.parameters(), straight.model.parameters())
    assert same(run.ema.module.parameters(), straight.ema.module.parameters())


def mlp32(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=16, depth=2, time_dim=8)


@pytest.mark.parametrize("kind", sorted(EMAS))
def test_an_ema_of_less_precise_weights_than_the_model_is_refused_with_the_fix(kind):
    # built before the model was cast: the EMA averages in float32 a float64 run (ema-pytorch's lerp then
    # fails after an update, the EMA ledger blames the update's order, AveragedModel samples float32)
    model = mlp32()
    ema = EMAS[kind](model)
    model.double()
    with pytest.raises(ValueError, match=r"float32.*float64.*(cast|build)"):
        trainer(model, ema)


def test_ema_pytorch_needs_coerce_dtype_for_weights_of_another_dtype():
    model = mlp32()
    ema = EMA(model, beta=0.8, update_after_step=1, update_every=1, include_online_model=False)
    ema.ema_model.double()  # a float64 EMA of a float32 model: more precise, but lerp_ needs coerce_dtype
    with pytest.raises(ValueError, match="coerce_dtype=True"):
        trainer(model, ema)
    coerced = EMA(model, beta=0.8, update_after_step=1, update_every=1, include_online_model=False, coerce_dtype=True)
    coerced.ema_model.double()
    start = [p.clone() for p in coerced.ema_model.parameters()]
    trainer(model, coerced).train(3)  # accepted, and it trains
    assert all(p.dtype == F64 for p in coerced.ema_model.parameters())
    assert not same(start, coerced.ema_model.parameters())


def test_an_ema_pytorch_ema_of_another_model_is_refused():
    model = mlp()
    ema = EMA(copy.deepcopy(model), beta=0.8, update_after_step=1, update_every=1)  # averages the copy, never the run
    with pytest.raises(ValueError, match="another model.*EMA\\(model"):
        trainer(model, ema)
    with pytest.raises(ValueError, match="another model"):
        gan_trainer("ema_pytorch", ema=lambda G: EMA(copy.deepcopy(G), beta=0.8, update_after_step=1, update_every=1))
    # the same EMA over the trainer's own model (wrapped in nothing) is accepted
    trainer(model, EMA(model, beta=0.8, update_after_step=1, update_every=1))


@pytest.mark.parametrize("saved, now", [("none", "trainer"), ("trainer", "none")])
def test_a_resume_whose_analyzer_keeps_another_ema_ledger_names_ema_ledger(tmp_path, saved, now):
    model = mlp()
    first = trainer(model, EMAS["diffusers"](model), callbacks=[analyzer(ema_ledger=saved)], checkpoint_dir=tmp_path)
    first.train(2)
    first.save_checkpoint()
    model = mlp()
    resumed = trainer(model, EMAS["diffusers"](model), callbacks=[analyzer(ema_ledger=now)], checkpoint_dir=tmp_path)
    # refused when the checkpoint is loaded, before the trainer loads anything of it; train() stays refused
    with pytest.raises(ValueError, match=f"ema_ledger='{saved}'"):
        resumed.resume()
    assert resumed.global_step == 0
    with pytest.raises(ValueError, match=f"ema_ledger='{saved}'"):
        resumed.train(1)


# ------------------------------------------------------------------------------------------
# Coverage (pass on the reviewed code)
# ------------------------------------------------------------------------------------------
def hand_loop(build, make_ema, steps):
    """A trainer without an EMA, and the loop's own EMA updated after each of its ``steps`` updates:
    ``(trainer, ema)``."""
    model = build()
    ema = make_ema(model)
    hand = trainer(model)
    for _ in range(steps):
        hand.train_step()
        ema.update() if isinstance(ema, EMA) else ema.update_parameters(model)
    return hand, ema


def ema_pytorch_schedule(model):
    """ema-pytorch's copy-then-average schedule, shortened: copies at steps 0 and 2, averages from 4, every 2nd
    update a no-op; the online model kept in its state (its default)."""
    return EMA(model, beta=0.8, update_after_step=3, update_every=2)


def test_coverage_ema_pytorch_schedule_trains_books_and_resumes_mid_warm_up_bit_for_bit(tmp_path):
    model = mlp()
    watcher = analyzer()
    straight = trainer(model, ema_pytorch_schedule(model), callbacks=[watcher])
    straight.train(7)
    _, hand_ema = hand_loop(mlp, ema_pytorch_schedule, 7)
    assert same(straight.ema.ema_model.parameters(), hand_ema.ema_model.parameters())
    # β read: copies (0) at updates 0 and 2, nothing at the odd ones, then 1 - (1 + epoch)^(-2/3)
    decays = watcher.report()["ema"]["decays"]
    assert decays[:2] == [0.0, 0.0] and len(decays) == 4
    assert decays[2:] == pytest.approx([1 - 2 ** (-2 / 3), 1 - 4 ** (-2 / 3)], rel=1e-6)
    for ledger in watcher.ema_ledgers.values():
        assert_ledger_adds_up(ledger)
    # a checkpoint at step 3 (after a copy, before the averaging starts) resumes everything bit for bit
    first_model = mlp()
    first = trainer(first_model, ema_pytorch_schedule(first_model), callbacks=[analyzer()], checkpoint_dir=tmp_path)
    first.train(3)
    first.save_checkpoint()
    resumed_model = mlp(seed=9)
    resumed_watcher = analyzer()
    resumed = trainer(resumed_model, ema_pytorch_schedule(resumed_model), callbacks=[resumed_watcher],
                      checkpoint_dir=tmp_path)
    assert resumed.resume()
    assert int(resumed.ema.step) == 3 and bool(resumed.ema.initted)
    resumed.train(4)
    assert same(straight.model.parameters(), resumed.model.parameters())
    assert same(straight.ema.ema_model.parameters(), resumed.ema.ema_model.parameters())
    assert resumed_watcher.report()["ema"]["decays"] == decays
    for name, ledger in watcher.ema_ledgers.items():
        assert torch.equal(ledger.contributions, resumed_watcher.ema_ledgers[name].contributions)


@pytest.mark.parametrize("kind", ["diffusers", "ema_pytorch_online"])
def test_coverage_a_gan_with_its_analyzer_resumes_generator_ema_and_ema_ledger_bit_for_bit(tmp_path, kind, monkeypatch):
    key = "diffusers" if kind == "diffusers" else "ema_pytorch"
    if kind == "ema_pytorch_online":  # ema-pytorch's default: the online model is in the EMA's state_dict
        monkeypatch.setitem(EMAS, "ema_pytorch", lambda G: EMA(G, beta=0.8, update_after_step=1, update_every=1))
    straight, straight_analyzer = gan_run(key, {}, iterations=4)
    gan_run(key, {}, iterations=2, checkpoint_dir=tmp_path)
    resumed, resumed_analyzer = gan_run(key, {}, iterations=4, checkpoint_dir=tmp_path, resume=True)
    assert same(straight.generator.parameters(), resumed.generator.parameters())
    assert same(ema_params(straight.ema, straight.generator), ema_params(resumed.ema, resumed.generator))
    a, b = straight_analyzer.generator_ema_ledgers["geometry"], resumed_analyzer.generator_ema_ledgers["geometry"]
    assert torch.equal(a.contributions, b.contributions) and torch.equal(a.rest, b.rest)
    assert straight_analyzer.report()["generator_ema"]["decays"] == resumed_analyzer.report()["generator_ema"]["decays"]


def user_loop(batches, kind, bind_before, stop_after):
    """The documented loop, bound with ema= before step ``bind_before``, stopped after step ``stop_after``."""
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = EMAS[kind](model)
    watcher = analyzer()
    for index, batch in enumerate(batches, 1):
        if index == bind_before:
            watcher.bind(model, optimizer, ema=ema, start_step=index - 1)
        losses = diffusion_loss(model(batch["noisy"], batch["timesteps"]), batch["target"])
        if bind_before <= index <= stop_after:
            watcher.observe(losses, batch["timesteps"])
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        step_by_hand(kind, ema, model)
        if index == stop_after:
            watcher.stop()
    return watcher


def assert_same_ema_ledgers(ours, theirs):
    assert ours.report()["ema"]["decays"] == pytest.approx(theirs.report()["ema"]["decays"], rel=1e-12)
    for name, ledger in ours.ema_ledgers.items():
        expected = theirs.ema_ledgers[name]
        scale = float(expected.delta.abs().max())
        for field in ("contributions", "rest", "delta", "residual"):
            gap = float((getattr(ledger, field) - getattr(expected, field)).abs().max())
            assert gap < 1e-12 * scale, (name, field, gap)


@pytest.mark.parametrize("kind", ["diffusers", "ema_pytorch"])
def test_coverage_a_tracked_window_and_a_late_analyzer_book_the_ema_as_the_user_loop_does(kind):
    twin = trainer(mlp())
    batches = [twin.next_batch() for _ in range(6)]
    # track_steps=(3, 5): bound before step 3 (the EMA already away from the model), closed after step 5's EMA update
    model = mlp()
    windowed = analyzer(track_steps=(3, 5))
    trainer(model, EMAS[kind](model), callbacks=[windowed]).train(6)
    assert len(windowed.report()["ema"]["decays"]) == 3
    assert_same_ema_ledgers(windowed, user_loop(batches, kind, 3, 5))
    # attached after 3 steps (trainer.callbacks.append), 3 more
    model = mlp()
    run = trainer(model, EMAS[kind](model))
    run.train(3)
    late = analyzer()
    run.callbacks.append(late)
    run.train(3)
    assert_same_ema_ledgers(late, user_loop(batches, kind, 4, 6))


class BatchNormDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)

    def forward(self, x, t):
        h = torch.cat([x, (t.to(x.dtype) / 40).unsqueeze(-1)], -1)
        return self.out(torch.tanh(self.norm(self.inp(h))))


def bn_model():
    torch.manual_seed(0)
    return BatchNormDenoiser().double()


@pytest.mark.parametrize("make", [lambda m: AveragedModel(m, use_buffers=True),
                                  lambda m: EMA(m, beta=0.8, update_after_step=1, update_every=1)],
                         ids=["averaged_use_buffers", "ema_pytorch"])
def test_coverage_an_ema_of_a_batchnorm_model_averages_its_buffers_as_by_hand_and_its_ledger_adds_up(make):
    model = bn_model()
    watcher = analyzer()
    run = trainer(model, make(model), callbacks=[watcher])
    run.train(4)
    hand, hand_ema = hand_loop(bn_model, make, 4)
    with ema_weights(run.ema, run.model) as ours, ema_weights(hand_ema, hand.model) as theirs:
        assert same(ours.parameters(), theirs.parameters()) and same(ours.buffers(), theirs.buffers())
        assert not torch.equal(ours.norm.running_mean, run.model.norm.running_mean)  # averaged, not the live ones
    for ledger in watcher.ema_ledgers.values():
        assert_ledger_adds_up(ledger)
    assert watcher.residual(weights="ema")["relative_residual"] < 1e-3
    # the samples are the EMA module's, with its own buffers, and sampling leaves it in training mode
    samples, _ = run.sample(4, weights="ema", num_inference_steps=5, seed=1)
    expected, _ = reverse_sample(copy.deepcopy(theirs), run.scheduler, (4, 2), num_inference_steps=5, seed=1)
    assert torch.equal(samples, expected)
    assert ours.training


def test_coverage_sampling_with_the_ema_leaves_every_rng_and_state_as_it_was():
    from diffusers import DDIMScheduler

    model = mlp()
    run = trainer(model, EMAS["diffusers"](model))
    run.train(2)
    global_rng, trainer_rng = torch.get_rng_state(), run.generator.get_state()
    shadow = [t.clone() for t in run.ema.shadow_params]
    samples, kept = run.sample(3, weights="ema", num_inference_steps=4, seed=5, sampler=DDIMScheduler, keep=[])
    assert torch.equal(torch.get_rng_state(), global_rng) and torch.equal(run.generator.get_state(), trainer_rng)
    assert same(shadow, run.ema.shadow_params) and run.ema.optimization_step == 2
    holder = copy.deepcopy(run.model)
    run.ema.copy_to(holder.parameters())
    expected, _ = reverse_sample(holder, run.scheduler, (3, 2), num_inference_steps=4, seed=5, sampler=DDIMScheduler)
    assert torch.equal(samples, expected)
    # training goes on as if nothing was sampled
    other_model = mlp()
    other = trainer(other_model, EMAS["diffusers"](other_model))
    other.train(3)
    run.train(1)
    assert same(run.model.parameters(), other.model.parameters()) and same(run.ema.shadow_params, other.ema.shadow_params)
