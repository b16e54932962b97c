"""GenkernelCallback's checkpoint and step-number faults: an evaluation loop with ckpt_path= before any fit leaves the
analyzer as it is (a later fit, with or without ckpt_path=, is the fit it would be without the evaluation, bit for
bit); a GAN fit resumed from a checkpoint numbers each player's steps as the uninterrupted fit does (its own count,
not the trainer's global_step, which under manual optimization counts both players' steps), or is refused where no
count says it; and the noise-level analyzer's step numbers are set through its public ``number_next_step``."""

import glob
import warnings

import pytest
import torch

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer
from test_integrations import T, ring
from test_lightning_review import SCHEDULER, Denoiser, analyzer, fit, trainer

pl = pytest.importorskip("lightning.pytorch")
from genkernel.integrations.lightning import GenkernelCallback  # noqa: E402
from test_workflow_lightning_gan import LR, LightningGAN, loader as gan_loader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = ("contributions", "rest", "residual", "delta")


class Evaluated(Denoiser):
    """The review's denoiser with a test and a predict loop (each calls the network; neither trains)."""

    def test_step(self, x0, index):
        return self.validation_step(x0, index)

    def predict_step(self, x0, index):
        return self.net(x0, torch.zeros(x0.shape[0], dtype=torch.long))


def data():
    return torch.utils.data.DataLoader(ring(48), batch_size=8)


def evaluation():
    return torch.utils.data.DataLoader(ring(16, seed=9), batch_size=8)


def evaluate(run, stage, module, checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = {} if stage == "predict" else {"verbose": False}
        getattr(run, stage)(module, evaluation(), ckpt_path=checkpoint, **quiet)


def assert_same_ledgers(ours, theirs):
    assert ours.ledger.steps == theirs.ledger.steps
    for name in FIELDS:
        assert torch.equal(getattr(ours.ledger, name), getattr(theirs.ledger, name)), name
    assert ours.global_steps == theirs.global_steps


@pytest.fixture(scope="module")
def step_checkpoint(tmp_path_factory):
    """A checkpoint written after 2 optimizer steps of a tracked fit (its analyzer numbered steps 1 and 2)."""
    directory = tmp_path_factory.mktemp("checkpoints")
    tracked = analyzer()
    fit(trainer([GenkernelCallback(tracked, model_attribute="net"),
                 pl.callbacks.ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_train_steps=2)],
                max_steps=2, enable_checkpointing=True), Evaluated(tracked), data())
    (checkpoint,) = directory.glob("*step=2.ckpt")
    return checkpoint


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_an_evaluation_with_ckpt_path_before_any_fit_leaves_the_analyzer_and_the_next_fits_are_exact(stage,
                                                                                                       step_checkpoint):
    """trainer.validate / test / predict(module, ckpt_path=...) before any fit, then trainer.fit(module) on the same
    trainer: the fit (from the checkpoint's weights, a new optimizer, global_step 0) has, bit for bit, the ledger and
    step numbers [1, 2] of the same fit with a fresh analyzer and no evaluation before it. A fit with ckpt_path= after
    such an evaluation equals the plain resumed fit (steps [1, 4], the checkpoint's ledger carried on), bit for bit.
    Fails on the old code: the evaluation loaded the checkpoint's analyzer state into the unbound analyzer, and the fit
    was refused, "bind(start_step=0) numbers the next step 1, but the saved analyzer already numbered steps up to 2"."""
    tracked = analyzer()
    module = Evaluated(tracked)
    run = trainer([GenkernelCallback(tracked, model_attribute="net")], max_steps=2)
    evaluate(run, stage, module, step_checkpoint)
    assert tracked.tracker is None and tracked.global_steps == []
    fit(run, module, data())

    reference = analyzer()
    plain = Evaluated(reference)
    plain.load_state_dict(torch.load(step_checkpoint, weights_only=False)["state_dict"])
    fit(trainer([GenkernelCallback(reference, model_attribute="net")], max_steps=2), plain, data())
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), plain.net.parameters()))
    assert_same_ledgers(tracked, reference)
    assert tracked.global_steps == [1, 2]

    resumed, straight = analyzer(), analyzer()
    module = Evaluated(resumed)
    run = trainer([GenkernelCallback(resumed, model_attribute="net")], max_steps=4)
    evaluate(run, stage, module, step_checkpoint)
    fit(run, module, data(), ckpt_path=step_checkpoint)
    fit(trainer([GenkernelCallback(straight, model_attribute="net")], max_steps=4), Evaluated(straight), data(),
        ckpt_path=step_checkpoint)
    assert_same_ledgers(resumed, straight)
    assert resumed.global_steps == [1, 2, 3, 4]


# -- a GAN resumed from a checkpoint -----------------------------------------------------------------------------


class GAN(LightningGAN):
    """The workflow test's Lightning GAN (a G step, then two D steps, per batch; 2 batches an epoch) with SGD or Adam
    for each player, and a predict loop."""

    def __init__(self, analyze, optimizers=("sgd", "sgd")):
        super().__init__(analyze=analyze, order="gd")
        self.kinds = optimizers

    def configure_optimizers(self):
        def build(kind, module):
            if kind == "adam":
                return torch.optim.Adam(module.parameters(), lr=LR, betas=(0.5, 0.999))
            return torch.optim.SGD(module.parameters(), lr=LR, momentum=0.5)

        return [build(self.kinds[0], self.G), build(self.kinds[1], self.D)]

    def predict_step(self, batch, index):
        return self.G(self.latents(batch[0].shape[0], 0))


def gan_fit(module, epochs, *, checkpoints=None, ckpt_path=None, run=None, **callback):
    callbacks = [] if module.analyzer is None else [GenkernelCallback(module.analyzer, **callback)]
    if checkpoints is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1))
    run = run or pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=checkpoints is not None,
                            callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, gan_loader(), ckpt_path=ckpt_path)
    return module.analyzer


def assert_same_gan_ledgers(ours, theirs):
    for name, ledger in theirs.generator_ledgers.items():
        for field in ("contributions", "rest", "residual", "f_end", "buffer_drift"):
            assert torch.equal(getattr(ours.generator_ledgers[name], field), getattr(ledger, field)), (name, field)
    for field in ("contributions", "rest", "residual"):
        assert torch.equal(getattr(ours.discriminator_ledger, field), getattr(theirs.discriminator_ledger, field)), field


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_coverage_a_gan_resumed_from_a_tracked_checkpoint_has_the_uninterrupted_numbers_and_ledgers(kind, tmp_path):
    """Coverage (passes on the old code too): 2 epochs of 2 batches (a G step and two D steps each, global_step 12) with
    SGD (no step count in its state) or Adam; the fit resumed with ckpt_path= from the epoch-0 checkpoint (global_step
    6) in fresh objects numbers G's steps [1, 2, 3, 4] and D's [1..8] as the uninterrupted fit does (not from
    global_step) and reaches its generator and discriminator ledgers bit for bit."""
    whole = gan_fit(GAN(True, (kind, kind)), 2, checkpoints=tmp_path)
    assert whole.g_loop_steps == [1, 2, 3, 4] and whole.d_loop_steps == list(range(1, 9))
    (first,) = glob.glob(str(tmp_path / "epoch=0*.ckpt"))
    resumed = gan_fit(GAN(True, (kind, kind)), 2, ckpt_path=first)
    assert resumed.g_loop_steps == whole.g_loop_steps and resumed.d_loop_steps == whole.d_loop_steps
    assert_same_gan_ledgers(resumed, whole)


@pytest.fixture(scope="module")
def untracked_checkpoint(tmp_path_factory):
    """The epoch-0 checkpoint (global_step 6: 2 G steps, 4 D steps) of the SGD GAN trained without an analyzer (no
    analyzer state in it), and the uninterrupted tracked 2-epoch fit's analyzer."""
    directory = tmp_path_factory.mktemp("gan")
    gan_fit(GAN(False), 1, checkpoints=directory)
    (first,) = glob.glob(str(directory / "epoch=0*.ckpt"))
    return first, gan_fit(GAN(True), 2)


def test_a_gan_resumed_with_sgd_from_a_checkpoint_without_analyzer_state_is_refused_not_numbered_by_global_step(
        untracked_checkpoint):
    """The analyzer attached from a checkpoint written without it (the window workflow the track_steps refusal
    recommends), SGD for both players: nothing says how many of the 6 steps were G's. Fails on the old code: the
    players were numbered from global_step, G [7, 8] and D [7, 8, 9, 10], where the uninterrupted fit numbers those
    steps G [3, 4] and D [5, 6, 7, 8]. Now refused naming start_step=; with start_step=(2, 4) the numbers are the
    uninterrupted fit's, and so are the loop steps of the generator's alignment records."""
    checkpoint, whole = untracked_checkpoint
    module = GAN(True)
    with pytest.raises(ValueError, match=r"global_step=6.*generator.*SGD.*start_step=\(generator_steps, "
                                         r"discriminator_steps\)"):
        gan_fit(module, 2, ckpt_path=checkpoint)
    assert module.analyzer.g_loop_steps == [] and module.analyzer.g_tracker is None  # refused before any step

    resumed = gan_fit(GAN(True), 2, ckpt_path=checkpoint, start_step=(2, 4))
    assert resumed.g_loop_steps == [3, 4] and resumed.d_loop_steps == [5, 6, 7, 8]
    assert [a["loop_step"] for a in resumed.alignment] == [a["loop_step"] for a in whole.alignment][2:] == [3, 4]


def test_a_gan_start_step_contradicting_the_optimizers_count_or_given_for_one_network_is_refused(untracked_checkpoint):
    """start_step= is used only where no count says a player's steps: Adam's state["step"] (2 for G, 4 for D at the
    checkpoint) wins, and a pair that contradicts it is refused rather than ignored or used; with it, the Adam-resumed
    fit numbers as the uninterrupted one would, G [3, 4], D [5..8]. start_step= on a one-network analyzer, or not a
    pair of non-negative ints, is refused. Fails on the old code: GenkernelCallback took no start_step (TypeError)."""
    checkpoint, _ = untracked_checkpoint
    with pytest.raises(ValueError, match="is for a GANKernelAnalyzer"):
        GenkernelCallback(analyzer(), start_step=(1, 2))
    for bad in (3, (1,), (1, -1), (1.0, 2), (True, 2)):
        with pytest.raises(ValueError, match="must be a pair"):
            GenkernelCallback(GAN(True).analyzer, start_step=bad)

    adam = GAN(False, ("adam", "adam"))
    directory = str(checkpoint).rsplit("/", 1)[0] + "-adam"
    gan_fit(adam, 1, checkpoints=directory)
    (first,) = glob.glob(directory + "/epoch=0*.ckpt")
    with pytest.raises(ValueError, match=r"start_step=\(2, 5\).*discriminator has taken 5 steps.*says 4"):
        gan_fit(GAN(True, ("adam", "adam")), 2, ckpt_path=first, start_step=(2, 5))
    resumed = gan_fit(GAN(True, ("adam", "adam")), 2, ckpt_path=first, start_step=(2, 4))
    assert resumed.g_loop_steps == [3, 4] and resumed.d_loop_steps == [5, 6, 7, 8]


def test_a_gan_predict_with_ckpt_path_before_a_fit_leaves_the_analyzer_and_the_fit_starts_at_step_one(
        untracked_checkpoint, tmp_path):
    """trainer.predict(module, ckpt_path=...) with a GAN analyzer, then a fit on the same trainer: the fit numbers G
    [1, 2], D [1..4] and its ledgers are, bit for bit, those of the same fit (from the checkpoint's weights) without
    the prediction. Fails on the old code: the prediction loaded the checkpoint's analyzer state into the unbound
    analyzer (G numbered [1, 2] before any fit); the fit then went on from it, numbering its steps G [3, 4] where
    Lightning's are 1, 2, and its first step failed the ledger check of the loaded groups' momentum against the new
    optimizer's (with momentum-free SGD nothing failed: a 4-step ledger of two fits, G [1, 2, 3, 4])."""
    tracked = GAN(True)
    gan_fit(tracked, 1, checkpoints=tmp_path)
    (first,) = glob.glob(str(tmp_path / "epoch=0*.ckpt"))
    weights = torch.load(first, weights_only=False)["state_dict"]

    module = GAN(True)
    run = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     callbacks=[GenkernelCallback(module.analyzer)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.predict(module, gan_loader(), ckpt_path=first)
    assert module.analyzer.g_loop_steps == [] and module.analyzer.g_tracker is None
    gan_fit(module, 1, run=run)
    plain = GAN(True)
    plain.load_state_dict(weights)
    gan_fit(plain, 1)
    assert module.analyzer.g_loop_steps == plain.analyzer.g_loop_steps == [1, 2]
    assert module.analyzer.d_loop_steps == plain.analyzer.d_loop_steps == [1, 2, 3, 4]
    assert_same_gan_ledgers(module.analyzer, plain.analyzer)


# -- step numbers through a public verb -------------------------------------------------------------------------


class Numbered(NoiseLevelAnalyzer):
    """Records every number it is told (and numbers as the analyzer does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.told = []

    def number_next_step(self, step):
        self.told.append(step)
        super().number_next_step(step)


def test_number_next_step_numbers_the_next_recorded_step_only_and_refuses_what_is_no_step_number():
    """A hand loop of 3 steps bound at start_step=10: told 20 before its second step, the analyzer numbers the steps
    [11, 20, 13] (the told number holds for one step; the others count from start_step), and None numbers from
    start_step. 0, -1, 1.5, True and "3" are refused. Fails on the old code: no such verb (AttributeError)."""
    net = MLPDenoiser(2, hidden=16, depth=2).to(torch.float64)
    an = NoiseLevelAnalyzer(SCHEDULER, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2, progress=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    an.bind(net, optimizer, start_step=10)
    g = torch.Generator().manual_seed(0)
    for k, told in enumerate((None, 20, None)):
        if told is not None:
            an.number_next_step(told)
        x0 = ring(8, seed=k)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        t = torch.randint(0, T, (8,), generator=g)
        losses = ((net(SCHEDULER.add_noise(x0, noise, t), t) - noise) ** 2).mean(1)
        an.observe(losses, t)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    assert an.global_steps == [11, 20, 13]
    an.number_next_step(None)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="1-based number"):
            an.number_next_step(bad)


def test_the_callback_and_the_built_in_trainer_number_steps_through_number_next_step():
    """GenkernelCallback (automatic optimization: Lightning's global_step + 1 before each step) and DDPMTrainer (its
    global_step + 1, through the analyzer's wrap_step) tell the analyzer each step's number through number_next_step,
    not a private slot: told [1, 2, 3], numbered [1, 2, 3]. Fails on the old code: both set the analyzer's
    _global_step, so nothing was told."""
    tracked = Numbered(SCHEDULER, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2, progress=False)
    fit(trainer([GenkernelCallback(tracked, model_attribute="net")], max_steps=3), Denoiser(tracked), data())
    assert tracked.told == [1, 2, 3] and tracked.global_steps == [1, 2, 3]

    tracked = Numbered(SCHEDULER, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2, progress=False)
    net = MLPDenoiser(2, hidden=16, depth=2).to(torch.float64)
    DDPMTrainer(net, SCHEDULER, ring(48), batch_size=8, lr=1e-2, progress=False, callbacks=[tracked]).train(3)
    assert tracked.told == [1, 2, 3] and tracked.global_steps == [1, 2, 3]
