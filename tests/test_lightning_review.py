"""GenkernelCallback in the Lightning runs people write: the ledger of a fit equals the ledger of the same
steps observed in a hand-written loop, and the usual slips fail with a message that names the fix."""

import warnings

import pytest
import torch

from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
from test_integrations import T, denoiser, per_example_loss, ring

pl = pytest.importorskip("lightning.pytorch")
from genkernel.integrations.lightning import GenkernelCallback  # noqa: E402

SCHEDULER = make_scheduler(T)


def analyzer(**kwargs):
    return NoiseLevelAnalyzer(SCHEDULER, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2, progress=False,
                              **kwargs)


def trainer(callbacks, **kwargs):
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu", "devices": 1, "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(callbacks=callbacks, **settings)


def fit(trainer, module, *loaders, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, *loaders, **kwargs)


def optimizer_and_schedule(params):
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


class Denoiser(pl.LightningModule):
    """The noise comes from one generator drawn in batch order; the validation loop calls the network (on
    other draws) and must leave the ledger and the training alone."""

    def __init__(self, analyzer=None, *, skip=None, shared=False):
        super().__init__()
        self.net = denoiser()
        self.analyzer = analyzer
        self.g = torch.Generator().manual_seed(5)
        self.skip = skip  # a batch index whose training_step returns None after observing
        self.shared = shared  # validation_step runs training_step's code, observe line included

    def training_step(self, x0, index):
        losses, t = per_example_loss(self.net, SCHEDULER, x0, self.g)
        if self.analyzer is not None:
            self.analyzer.observe(losses, t)
        self.log("loss", losses.mean())
        return None if index == self.skip else losses.mean()

    def validation_step(self, x0, index):
        if self.shared:
            return self.training_step(x0, index)
        losses, _ = per_example_loss(self.net, SCHEDULER, x0, torch.Generator().manual_seed(index))
        self.log("val", losses.mean())

    def configure_optimizers(self):
        optimizer, schedule = optimizer_and_schedule(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_fit_with_partial_accumulation_clipping_a_step_schedule_and_validation_has_a_hand_loops_ledger():
    """5 batches an epoch, accumulation over 3 (the epoch's last step has 2), clipping by norm, a StepLR
    halving the rate after every optimizer step, a sanity check and a validation loop calling the network: the
    parameters are bit-identical with a fit without the callback and the ledger is, bit for bit, that of
    the same micro-batches observed in a hand-written loop."""
    data = ring(40)
    validation = torch.utils.data.DataLoader(ring(16, seed=9), batch_size=8)

    def lightning(tracked):
        module = Denoiser(tracked)
        callbacks = [] if tracked is None else [GenkernelCallback(tracked, model_attribute="net")]
        fit(trainer(callbacks, max_epochs=2, accumulate_grad_batches=3, gradient_clip_val=0.3,
                    num_sanity_val_steps=2), module, torch.utils.data.DataLoader(data, batch_size=8), validation)
        return module

    bare = lightning(None)
    tracked = analyzer()
    module = lightning(tracked)
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), bare.net.parameters()))

    net, by_hand = denoiser(), analyzer()
    optimizer, schedule = optimizer_and_schedule(net.parameters())
    by_hand.bind(net, optimizer)
    g = torch.Generator().manual_seed(5)
    batches = list(torch.utils.data.DataLoader(data, batch_size=8))
    for _ in range(2):
        for i, x0 in enumerate(batches):
            losses, t = per_example_loss(net, SCHEDULER, x0, g)
            by_hand.observe(losses, t)
            (losses.mean() / 3).backward()
            if (i + 1) % 3 == 0 or i + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.3)
                optimizer.step()
                optimizer.zero_grad()
                schedule.step()
    by_hand.finish()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), bare.net.parameters()))
    ours, theirs = tracked.ledger, by_hand.ledger
    assert ours.steps == theirs.steps == 4
    for name in ("contributions", "rest", "residual", "delta"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=1e-12)
    assert [s["micro_batches"] for s in tracked.tracker.gradient_scales] == [3, 2, 3, 2]
    assert any(s["scale_times_micro_batches"] < 0.999 for s in tracked.tracker.gradient_scales)  # clipping acted
    assert tracked.report()["global_steps"] == by_hand.report()["global_steps"] == [1, 4]


def test_a_fit_resumed_mid_epoch_from_a_step_checkpoint_continues_the_uninterrupted_ledger(tmp_path):
    """A checkpoint every 2 optimizer steps (mid-epoch: 3 steps an epoch), Adam and a per-step schedule; the
    batches and noise come from each batch's position (Lightning restarts a plain loader's iterator on a
    mid-epoch resume), so the resumed fit trains on the uninterrupted one's draws."""

    class Positional(Denoiser):
        def training_step(self, x0, index):
            g = torch.Generator().manual_seed(1000 * self.current_epoch + index)
            x0 = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            t = torch.randint(0, T, (x0.shape[0],), generator=g)
            losses = ((self.net(SCHEDULER.add_noise(x0, noise, t), t) - noise) ** 2).mean(dim=1)
            self.analyzer.observe(losses, t)
            return losses.mean()

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def run(max_steps, checkpoints=None, ckpt_path=None):
        tracked = analyzer()
        module = Positional(tracked)
        callbacks = [GenkernelCallback(tracked, model_attribute="net")]
        if checkpoints is not None:
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_train_steps=2))
        fit(trainer(callbacks, max_steps=max_steps, accumulate_grad_batches=2,
                    enable_checkpointing=checkpoints is not None),
            module, torch.utils.data.DataLoader(ring(48), batch_size=8), ckpt_path=ckpt_path)
        return tracked, module

    straight, straight_module = run(5)
    run(2, checkpoints=tmp_path)
    (checkpoint,) = tmp_path.glob("*step=2.ckpt")
    resumed, resumed_module = run(5, ckpt_path=checkpoint)
    assert all(torch.equal(p, q) for p, q in zip(resumed_module.net.parameters(), straight_module.net.parameters()))
    assert resumed.ledger.steps == straight.ledger.steps == 5
    for name in ("contributions", "rest", "residual", "delta"):
        assert torch.equal(getattr(resumed.ledger, name), getattr(straight.ledger, name)), name
    assert resumed.report()["global_steps"] == straight.report()["global_steps"] == [1, 5]


def test_a_track_steps_window_is_refused_not_silently_widened_to_the_whole_fit():
    """The callback tracks every step of a fit: an analyzer built with track_steps=(3, 4) used to keep a
    ledger of all 12 steps while its report's config named the window (3, 4)."""
    tracked = analyzer(track_steps=(3, 4))
    module = Denoiser(tracked)
    with pytest.raises(ValueError, match=r"track_steps=\(3, 4\).*every step of the fit.*without track_steps"):
        fit(trainer([GenkernelCallback(tracked, model_attribute="net")], max_epochs=2), module,
            torch.utils.data.DataLoader(ring(48), batch_size=8))
    assert tracked.tracker is None  # refused before binding: no step was tracked


def test_a_module_without_forward_bound_as_a_whole_is_refused_naming_model_attribute():
    """Without model_attribute the callback binds the LightningModule itself, whose probes call its forward:
    a module that defines none used to fail inside the binding (probes "do not fit" the module)."""
    tracked = analyzer()
    module = Denoiser(tracked)
    with pytest.raises(ValueError, match="defines no forward.*model_attribute='net'"):
        fit(trainer([GenkernelCallback(tracked)], max_steps=1), module,
            torch.utils.data.DataLoader(ring(16), batch_size=8))
    assert tracked.tracker is None


def test_observing_in_a_shared_validation_step_names_the_validation_loop():
    """A validation_step that runs training_step's code observes in the sanity check, before the callback
    binds: the error used to say only "call analyzer.bind(model, optimizer) before analyzer.observe"."""
    tracked = analyzer()
    module = Denoiser(tracked, shared=True)
    with pytest.raises(RuntimeError) as error:
        fit(trainer([GenkernelCallback(tracked, model_attribute="net")], max_steps=2, num_sanity_val_steps=1), module,
            torch.utils.data.DataLoader(ring(16), batch_size=8), torch.utils.data.DataLoader(ring(8), batch_size=8))
    notes = getattr(error.value, "__notes__", [])
    assert any("sanity check" in note and "if self.training:" in note for note in notes), notes


def test_a_training_step_returning_none_is_followed_after_observe_and_explained_before_it():
    """Lightning steps the optimizer, with no gradient, after a training_step returning None: observed
    first, that step is recorded as one that moves nothing (the parameters stay bit-identical and the
    ledger adds up); not observed, the tracker's refusal now says why under Lightning."""
    loader = torch.utils.data.DataLoader(ring(48), batch_size=8)
    bare = Denoiser(skip=2)
    fit(trainer([], max_epochs=1), bare, loader)
    tracked = analyzer()
    module = Denoiser(tracked, skip=2)
    fit(trainer([GenkernelCallback(tracked, model_attribute="net")], max_epochs=1), module, loader)
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), bare.net.parameters()))
    ledger = tracked.ledger
    assert ledger.steps == 6 and tracked.report()["global_steps"] == [1, 6]
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta, rtol=0,
                               atol=1e-13)
    assert tracked.tracker.gradient_scales[2]["scale"] == 0.0  # the skipped step: no gradient reached it

    class SkipsBeforeObserving(Denoiser):
        def training_step(self, x0, index):
            return None if index == 1 else super().training_step(x0, index)

    tracked = analyzer()
    with pytest.raises(RuntimeError, match="without an observed micro-batch") as error:
        fit(trainer([GenkernelCallback(tracked, model_attribute="net")], max_epochs=1), SkipsBeforeObserving(tracked),
            loader)
    assert any("return None" in note for note in getattr(error.value, "__notes__", []))


def test_a_true_half_precision_trainer_is_named_in_the_refusal():
    """precision="bf16-true" casts the module (no autocast): the tracker refuses the bf16 losses, and the
    refusal now names the Trainer's setting as it did for "bf16-mixed"."""

    class Cast(Denoiser):
        def training_step(self, x0, index):
            noise = torch.randn(x0.shape, generator=self.g, dtype=torch.float64).to(x0.dtype)
            t = torch.randint(0, T, (x0.shape[0],), generator=self.g)
            losses = ((self.net(SCHEDULER.add_noise(x0, noise, t).to(x0.dtype), t) - noise) ** 2).mean(1)
            self.analyzer.observe(losses, t)
            return losses.mean()

    tracked = analyzer()
    with pytest.raises(RuntimeError, match="mixed precision is not supported") as error:
        fit(trainer([GenkernelCallback(tracked, model_attribute="net")], max_steps=1, precision="bf16-true"),
            Cast(tracked), torch.utils.data.DataLoader(ring(16), batch_size=8))
    notes = getattr(error.value, "__notes__", [])
    assert any("precision='bf16-true'" in note and "'32-true'" in note for note in notes), notes


def test_validating_a_checkpoint_after_the_fit_keeps_the_fits_ledger(tmp_path):
    """trainer.validate / test(ckpt_path=...) restore the callbacks' states too: the fit's analyzer used to be
    handed the checkpoint's older state, refused with "bind(start_step=0) numbers the next step 1, but the
    saved analyzer already numbered steps up to 2", so no checkpoint of the fit could be evaluated."""
    tracked = analyzer()
    module = Denoiser(tracked)
    validation = torch.utils.data.DataLoader(ring(16, seed=9), batch_size=8)
    run = trainer([GenkernelCallback(tracked, model_attribute="net"),
                   pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2)],
                  max_steps=4, enable_checkpointing=True)
    fit(run, module, torch.utils.data.DataLoader(ring(48), batch_size=8), validation)
    before = {name: getattr(tracked.ledger, name).clone() for name in ("contributions", "delta", "residual")}
    (checkpoint,) = tmp_path.glob("*step=2.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = run.validate(module, validation, ckpt_path=checkpoint, verbose=False)
    assert "val" in metrics
    assert tracked.ledger.steps == 4 and tracked.report()["global_steps"] == [1, 4]
    assert all(torch.equal(getattr(tracked.ledger, name), value) for name, value in before.items())
