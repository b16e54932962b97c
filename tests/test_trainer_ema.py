"""DDPMTrainer(ema=): an EMA of the weights in the built-in trainer, as diffusers' scripts keep one.

What must hold: the trainer steps each kind of EMA (diffusers' EMAModel, ema-pytorch's EMA,
AveragedModel) exactly as a hand-written loop does, once per optimizer step, without changing
training; an attached NoiseLevelAnalyzer books the EMA weights' ledger exactly as the documented
user loop (``bind(ema=)``) does, and the ledger adds up; checkpoints resume model, EMA and ledgers
bit for bit; sampling with the EMA weights samples with them and leaves the model as it was; bad
set-ups are refused with the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.training_utils import EMAModel
from ema_pytorch import EMA
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler, reverse_sample
from genkernel.diffusion.objectives import diffusion_loss
from test_flow_matching import ring
from test_timestep_sampling import ddpm_mlp as mlp

F64 = torch.float64
T = 40

pytestmark = pytest.mark.usefixtures("one_thread")


EMAS = {
    "diffusers": lambda model: EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75),
    "ema_pytorch": lambda model: EMA(model, beta=0.8, update_after_step=1, update_every=1, include_online_model=False),
    "averaged": lambda model: AveragedModel(model),
}


def assert_ledger_adds_up(ledger, scale=None):
    """contributions + rest + residual = Δ at every probe, to 1e-12 of ``scale`` (default: the ledger's own largest
    change, which must not be 0)."""
    scale = float(ledger.delta.abs().max()) if scale is None else scale
    identity = ledger.contributions.sum(1) + ledger.rest + ledger.residual - ledger.delta
    assert scale > 0 and float(identity.abs().max()) < 1e-12 * scale


def step_by_hand(kind, ema, model):
    """The loop's own EMA update, as each library documents it."""
    {"diffusers": lambda: ema.step(model.parameters()), "ema_pytorch": lambda: ema.update(),
     "averaged": lambda: ema.update_parameters(model)}[kind]()


def averaged_weights(kind, ema, model):
    if kind == "diffusers":
        return [t.clone() for t in ema.shadow_params]
    module = ema.ema_model if kind == "ema_pytorch" else ema.module
    return [p.detach().clone() for p in module.parameters()]


def trainer(model, ema=None, callbacks=(), **kwargs):
    return DDPMTrainer(model, make_scheduler(T), ring(64), batch_size=16, lr=1e-2, ema=ema, progress=False,
                       callbacks=callbacks, **kwargs)


def analyzer(**kwargs):
    return NoiseLevelAnalyzer(make_scheduler(T), ring(12, seed=5), num_bins=4, num_probes=6, controls=1,
                              kernel_points=2, progress=False, **kwargs)


@pytest.mark.parametrize("kind", sorted(EMAS))
def test_the_trainer_steps_each_kind_of_ema_as_a_hand_written_loop_does_and_trains_unchanged(kind):
    model = mlp()
    ours = trainer(model, EMAS[kind](model))
    ours.train(4)
    # a trainer without an EMA, and the loop's own EMA stepped after every update
    theirs_model = mlp()
    theirs_ema = EMAS[kind](theirs_model)
    theirs = trainer(theirs_model)
    for _ in range(4):
        theirs.train_step()
        step_by_hand(kind, theirs_ema, theirs_model)
    assert all(torch.equal(p, q) for p, q in zip(ours.model.parameters(), theirs.model.parameters()))
    assert ours.losses == theirs.losses
    mine, expected = averaged_weights(kind, ours.ema, ours.model), averaged_weights(kind, theirs_ema, theirs_model)
    assert all(torch.equal(a, b) for a, b in zip(mine, expected))
    # the EMA moved, and is not the model (the averages lag behind the weights)
    assert any(not torch.equal(a, p) for a, p in zip(mine, ours.model.parameters()))


def user_loop_ema_ledgers(batches, ema_kind="diffusers"):
    """The documented user loop: bind(model, optimizer, ema=), observe, backward, step, EMA step."""
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = EMAS[ema_kind](model)
    watcher = analyzer()
    watcher.bind(model, optimizer, ema=ema)
    for batch in batches:
        losses = diffusion_loss(model(batch["noisy"], batch["timesteps"]), batch["target"])
        watcher.observe(losses, batch["timesteps"])
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        step_by_hand(ema_kind, ema, model)
    return watcher


def test_an_attached_analyzer_books_the_ema_ledger_as_the_user_loop_does_and_changes_nothing():
    bare_model = mlp()
    bare = trainer(bare_model, EMAS["diffusers"](bare_model))
    bare.train(4)
    model = mlp()
    watcher = analyzer()
    tracked = trainer(model, EMAS["diffusers"](model), callbacks=[watcher])
    tracked.train(4)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bare.ema.shadow_params, tracked.ema.shadow_params))
    # the same batches through the documented loop
    twin = trainer(mlp())
    reference = user_loop_ema_ledgers([twin.next_batch() for _ in range(4)])
    for name, ledger in watcher.ema_ledgers.items():
        expected = reference.ema_ledgers[name]
        scale = float(expected.delta.abs().max())
        assert torch.allclose(ledger.contributions, expected.contributions, rtol=0, atol=1e-12 * scale)
        assert torch.allclose(ledger.rest, expected.rest, rtol=0, atol=1e-12 * scale)
        assert_ledger_adds_up(ledger, scale)  # to the EMA weights' change at the probes
    assert watcher.residual(weights="ema")["relative_residual"] < 1e-3
    decays = watcher.report()["ema"]["decays"]
    assert len(decays) == 4 and decays[0] == 0.0 and 0 < decays[-1] < 0.9  # EMAModel's warm-up, read not assumed
    # ema_ledger="none": the model's ledgers only, the same numbers
    plain = analyzer(ema_ledger="none")
    trainer(mlp(), EMAS["diffusers"](mlp()), callbacks=[plain]).train(4)
    assert plain.tracker.ema is None and "ema" not in plain.report()
    assert torch.equal(plain.ledgers["level"].contributions, watcher.ledgers["level"].contributions)


def test_a_checkpoint_resumes_the_model_the_ema_and_the_ema_ledger_bit_for_bit(tmp_path):
    straight_model = mlp()
    straight_watcher = analyzer()
    straight = trainer(straight_model, EMAS["diffusers"](straight_model), callbacks=[straight_watcher])
    straight.train(4)
    first_model = mlp()
    first = trainer(first_model, EMAS["diffusers"](first_model), callbacks=[analyzer()], checkpoint_dir=tmp_path)
    first.train(2)
    first.save_checkpoint()
    resumed_model = mlp(seed=9)  # other weights: the checkpoint brings the saved ones
    watcher = analyzer()
    resumed = trainer(resumed_model, EMAS["diffusers"](resumed_model), callbacks=[watcher], checkpoint_dir=tmp_path)
    assert resumed.resume()
    resumed.train(2)
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params))
    assert resumed.ema.optimization_step == 4
    for name in straight_watcher.ema_ledgers:
        assert torch.equal(straight_watcher.ema_ledgers[name].contributions, watcher.ema_ledgers[name].contributions)
    # a trainer without an EMA refuses the checkpoint, and one with an EMA refuses a checkpoint without
    with pytest.raises(ValueError, match="ema"):
        trainer(mlp(), checkpoint_dir=tmp_path).resume()
    plain = trainer(mlp(), checkpoint_dir=tmp_path / "plain")
    plain.train(1)
    plain.save_checkpoint()
    with_ema_model = mlp()
    with pytest.raises(ValueError, match="ema"):
        trainer(with_ema_model, EMAS["diffusers"](with_ema_model), checkpoint_dir=tmp_path / "plain").resume()


@pytest.mark.parametrize("kind", ["diffusers", "averaged"])
def test_sampling_with_the_ema_weights_samples_with_them_and_leaves_the_model_alone(kind):
    model = mlp()
    run = trainer(model, EMAS[kind](model))
    run.train(3)
    before = [p.detach().clone() for p in run.model.parameters()]
    samples, _ = run.sample(5, weights="ema", num_inference_steps=10, seed=3)
    holder = copy.deepcopy(run.model)
    with torch.no_grad():
        for p, value in zip(holder.parameters(), averaged_weights(kind, run.ema, run.model)):
            p.copy_(value)
    expected, _ = reverse_sample(holder, run.scheduler, (5, 2), num_inference_steps=10, seed=3)
    assert torch.equal(samples, expected)
    assert all(torch.equal(p, q) for p, q in zip(before, run.model.parameters()))
    trained, _ = run.sample(5, num_inference_steps=10, seed=3)
    assert not torch.equal(trained, samples)


def test_bad_ema_set_ups_are_refused_with_the_fix():
    model = mlp()
    with pytest.raises(ValueError, match="averages 2 tensors.*EMAModel\\(model.parameters"):
        trainer(model, EMAModel(list(model.parameters())[:2]))
    with pytest.raises(TypeError, match="ema must be diffusers' EMAModel, ema-pytorch's EMA or.*AveragedModel"):
        trainer(model, ema=copy.deepcopy(model).state_dict())
    run = trainer(model)
    run.train(1)
    with pytest.raises(ValueError, match="weights='ema'.*ema="):
        run.sample(2, weights="ema")
    with pytest.raises(ValueError, match="weights must be 'model' or 'ema'"):
        run.sample(2, weights="averaged")
    with pytest.raises(ValueError, match="ema_ledger must be one of"):
        analyzer(ema_ledger="yes")
    # a sketched analyzer keeps no EMA ledger: refused at the trainer's start, with both fixes, and unbound
    sketched = analyzer(group_state="sketched")
    ema_model = mlp()
    with pytest.raises(ValueError, match="group_state='dense' or 'auto'.*ema_ledger='none'"):
        trainer(ema_model, EMAS["diffusers"](ema_model), callbacks=[sketched]).train(1)
    assert sketched.tracker is None


# ------------------------------------------------------------------------------------------
# GANTrainer(ema=): an EMA of the generator
# ------------------------------------------------------------------------------------------
def gan_run(ema_kind=None, analyzer_options=None, iterations=3, checkpoint_dir=None, resume=False):
    from genkernel.data import gaussian_ring
    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=8, depth=2).double(), MLPDiscriminator(2, hidden=8, depth=2).double()
    data = gaussian_ring(128, radius=2.0, std=0.05, seed=0)[0].double()
    callbacks = []
    if analyzer_options is not None:
        probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
        callbacks.append(GANKernelAnalyzer(G, D, probes, grouping="direction", num_groups=3, window=3, eval_every=1,
                                           controls=0, track_discriminator=False, **analyzer_options))
    ema = None if ema_kind is None else EMAS[ema_kind](G)
    trainer = GANTrainer(G, D, data, batch_size=16, ema=ema, callbacks=callbacks, seed=2,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=0 if checkpoint_dir is None else 2)
    trainer.train(iterations, resume=resume)
    return trainer, (callbacks[0] if callbacks else None)


def test_the_gan_trainer_steps_its_generator_ema_after_each_generator_step_and_the_analyzer_books_it():
    plain, _ = gan_run()
    with_ema, _ = gan_run("diffusers")
    tracked, analyzer = gan_run("diffusers", {})
    for run in (with_ema, tracked):  # the EMA changes no update, and the analyzer changes nothing
        assert all(torch.equal(p, q) for p, q in zip(plain.generator.parameters(), run.generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(with_ema.ema.shadow_params, tracked.ema.shadow_params))
    assert with_ema.ema.optimization_step == 3  # once per generator step, not per discriminator step
    ledger = analyzer.generator_ema_ledgers["geometry"]
    assert_ledger_adds_up(ledger)
    assert ledger.relative_residual() < 1e-3
    # β read from the EMA's moves: EMAModel's warm-up decays 1 - (1 + k)^-power, 0 at its first step
    expected = [min(0.9, 1 - (1 + k) ** -0.75) if k > 0 else 0.0 for k in range(3)]
    assert analyzer.report()["generator_ema"]["decays"] == pytest.approx(expected, rel=1e-9)
    plain_ledger = gan_run(None, {})[1].generator_ledger()
    assert torch.equal(plain_ledger.contributions, analyzer.generator_ledger().contributions)
    _, none = gan_run("diffusers", {"ema_ledger": "none"})
    assert none.g_tracker.ema is None and "generator_ema" not in none.report()


def test_the_gan_trainer_resumes_its_ema_and_samples_with_it(tmp_path):
    straight, _ = gan_run("averaged", iterations=4)
    gan_run("averaged", iterations=2, checkpoint_dir=tmp_path)
    resumed, _ = gan_run("averaged", iterations=4, checkpoint_dir=tmp_path, resume=True)
    assert resumed.iteration == 4
    assert all(torch.equal(p, q) for p, q in zip(straight.ema.module.parameters(), resumed.ema.module.parameters()))
    assert int(resumed.ema.n_averaged) == 4
    z = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(resumed.sample(z, weights="ema"), resumed.ema.module(z))
    assert not torch.equal(resumed.sample(z, weights="ema"), resumed.sample(z))
    with pytest.raises(ValueError, match="ema"):  # a checkpoint with an EMA, a trainer without
        gan_run(None, iterations=4, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="weights='ema'.*ema="):
        gan_run(None, iterations=1)[0].sample(z, weights="ema")


@pytest.mark.parametrize("kind, other", [
    ("diffusers", lambda model: EMAModel(model.parameters(), decay=0.8, use_ema_warmup=True, power=0.75)),
    ("ema_pytorch", lambda model: EMA(model, beta=0.9, update_after_step=1, update_every=1,
                                      include_online_model=False)),
    ("averaged", lambda model: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))),
])
def test_a_resume_with_another_ema_schedule_is_refused(tmp_path, kind, other):
    # EMAModel would silently take the checkpoint's decay, the others would continue on the new one
    model = mlp()
    first = trainer(model, EMAS[kind](model), checkpoint_dir=tmp_path)
    first.train(1)
    first.save_checkpoint()
    same_model = mlp()
    assert trainer(same_model, EMAS[kind](same_model), checkpoint_dir=tmp_path).resume()
    other_model = mlp()
    with pytest.raises(ValueError, match="ema: saved"):
        trainer(other_model, other(other_model), checkpoint_dir=tmp_path).resume()
