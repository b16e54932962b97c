"""Resume settings the saved analyzer states did not check (helper "resume43").

1. Record settings. A NoiseLevelAnalyzer state resumed by an analyzer of another ``snapshot_every`` or
   ``kernel_every`` was accepted: the resumed run appended history / kernel records of another cadence to the saved
   ones (rows every 5 tracked steps up to the save, every step after it, in one list). A GANKernelAnalyzer state
   resumed with another ``coverage_latents`` (count), ``coverage_sigmas``, ``mode_std`` or ``seed`` (which draws the
   coverage latents) was accepted: mode-coverage rows of two definitions in one list. Now refused, naming the
   setting with both values; states saved before these keys were kept still load.
2. Tracker settings of an analyzer loaded before its trackers are built. A DDPMTrainer checkpoint resumed by a
   trainer whose NoiseLevelAnalyzer had another ``quadrature``, ``group_state``, ``state_dtype``, ``sketch_dim``,
   ``ema_ledger`` or other probes (``seed``) was accepted by ``load_state_dict``: the analyzer kept the state
   pending, and the tracker refused it at the next ``train()``'s bind, after the trainer had loaded the
   checkpoint's model, optimizer and step count (a GANTrainer's analyzer: at the first iteration's steps, its
   ``quadrature``, ``probe_latents`` or ``ema_ledger``). Now refused inside ``load_state_dict`` before anything
   is loaded, naming the setting, saved and current values and the argument that fits, the trainer, its model,
   optimizer and the analyzer left bit for bit as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel.core.tracking.io import atomic_save, load_state
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from states import state_differences
from test_rfuzz42 import _ring

pytestmark = pytest.mark.usefixtures("one_thread")
F32 = torch.float32


# ------------------------------------------------------------------------------------------
# DDPM: a float32 denoiser, so that state_dtype may differ too
# ------------------------------------------------------------------------------------------
def _ddpm(ema: bool = False, **analyzer_settings):
    scheduler = make_scheduler(100)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=12, depth=2, time_dim=8)
    settings = dict(num_bins=3, num_probes=8, kernel_points=4, kernel_every=2, progress=False)
    settings.update(analyzer_settings)
    analyzer = NoiseLevelAnalyzer(scheduler, _ring(16, seed=3, dtype=F32), **settings)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if ema else None
    trainer = DDPMTrainer(model, scheduler, _ring(40, dtype=F32), batch_size=8, lr=1e-2, progress=False,
                          callbacks=[analyzer], ema=average)
    return trainer, analyzer


_DDPM_SAVED = {"base": {}, "ema": {"ema": True}, "ema_none": {"ema": True, "ema_ledger": "none"},
               "sketched": {"group_state": "sketched", "sketch_dim": 8}}


@pytest.fixture(scope="module")
def ddpm_checkpoints(tmp_path_factory):
    """Checkpoints at step 3 of the runs in ``_DDPM_SAVED`` (one each, shared by the cases below)."""
    folder = tmp_path_factory.mktemp("ddpm")
    paths = {}
    for name, settings in _DDPM_SAVED.items():
        trainer, _ = _ddpm(**settings)
        trainer.train(3)
        paths[name] = trainer.save_checkpoint(folder / f"{name}.pt")
    return paths


def _refused_bit_for_bit(trainer, analyzer, load, match):
    """``load()`` refused with a ValueError matching ``match``; the trainer's state (model, optimizer, step count,
    data position, callbacks' states) and the analyzer's bit for bit as before; the next ``train()`` refused too.
    Returns the error's message."""
    before = copy.deepcopy(trainer.state_dict())
    analyzer_before = copy.deepcopy(analyzer.state_dict())
    with pytest.raises(ValueError, match=match) as error:
        load()
    assert not state_differences(before, trainer.state_dict(), "trainer")
    assert not state_differences(analyzer_before, analyzer.state_dict(), "analyzer")
    with pytest.raises(ValueError):  # (the refused checkpoint stays refused: no silent training from the own state)
        trainer.train(1)
    assert not state_differences(before, trainer.state_dict(), "trainer after train()")
    return str(error.value)


@pytest.mark.parametrize("saved, here, match", [
    ("base", dict(snapshot_every=1), r"snapshot_every.*saved \{'snapshot_every': 5\}, here \{'snapshot_every': 1\}"),
    ("base", dict(kernel_every=1), r"kernel_every.*saved \{'kernel_every': 2\}, here \{'kernel_every': 1\}"),
    ("base", dict(quadrature="trapezoid"), r"quadrature: saved 'midpoint', here 'trapezoid'.*quadrature='midpoint'"),
    ("base", dict(state_dtype=F32), r"state_dtype: saved 'float64', here 'float32'.*state_dtype=torch\.float64"),
    ("base", dict(group_state="sketched"), r"group_state: saved 'dense', here 'sketched'.*group_state='dense'"),
    ("sketched", dict(group_state="auto"), r"group_state: saved 'sketched', here 'auto'.*group_state='sketched'"),
    ("sketched", dict(group_state="sketched", sketch_dim=16), r"sketch_dim: saved 8, here 16.*sketch_dim=8"),
    ("base", dict(seed=5), r"probes and kernel inputs were drawn from other inputs.*probe_data, num_probes"),
    ("ema_none", dict(ema=True), r"EMA ledger: saved 'none', here 'kept'.*ema_ledger='none'"),
    ("ema", dict(ema=True, ema_ledger="none"), r"EMA ledger: saved 'kept', here 'none'.*ema_ledger='trainer'"),
])
def test_a_ddpm_resume_to_other_analyzer_settings_is_refused_before_anything_is_loaded(ddpm_checkpoints, saved, here,
                                                                                          match):
    """A DDPM checkpoint at step 3 resumed by a trainer whose analyzer (not yet bound) was built with other record
    or tracker settings: refused by ``resume`` itself, naming the setting, both values and the argument that fits,
    and the trainer, its model, optimizer and analyzer left bit for bit (the next ``train()`` refused too).

    Fails on the old code: ``snapshot_every`` / ``kernel_every`` were accepted (records of two cadences in one
    list); the tracker settings were accepted by ``resume``, which loaded the model, optimizer and step count (3),
    and refused only at the next ``train()``'s bind."""
    trainer, analyzer = _ddpm(**here)
    _refused_bit_for_bit(trainer, analyzer, lambda: trainer.resume(ddpm_checkpoints[saved]), match)
    assert trainer.global_step == 0


def test_a_ddpm_state_saved_before_the_new_keys_loads_and_its_probes_are_still_compared(ddpm_checkpoints, tmp_path):
    """A checkpoint whose analyzer state lacks the keys kept now (``snapshot_every``, ``kernel_every``,
    ``probe_inputs``: an older version's) loads into an analyzer of other cadences (as it did), and one resumed with
    another ``seed`` (other probes) is still refused before anything is loaded: the probes as bind computes them on
    the trainer's model, compared with the saved tracker's digests. The same checkpoint with the same settings
    resumes and trains on.

    Fails on the old code: the other seed was accepted by ``resume`` and refused at ``train()``, after the load."""
    state = load_state(ddpm_checkpoints["base"])
    config = state["callbacks"]["NoiseLevelAnalyzer"]["config"]
    for key in ("snapshot_every", "kernel_every", "probe_inputs"):
        config.pop(key, None)  # (absent from the old code's states too)
    atomic_save(state, tmp_path / "older.pt")
    trainer, analyzer = _ddpm(seed=5)
    message = _refused_bit_for_bit(trainer, analyzer, lambda: trainer.resume(tmp_path / "older.pt"),
                                   r"probe values \(digests\)")
    assert "seed" in message
    trainer, analyzer = _ddpm(snapshot_every=1, kernel_every=1)
    assert trainer.resume(tmp_path / "older.pt")
    trainer.train(1)
    assert analyzer.global_steps == [1, 2, 3, 4]


def test_a_noise_level_analyzer_loaded_by_hand_before_bind_refuses_its_tracker_settings(ddpm_checkpoints):
    """The analyzer's own ``load_state_dict`` (a loop of the user's, no trainer): the tracker settings its
    constructor set are compared at load, the EMA ledger not (in a loop of one's own ``bind(ema=)`` says it), and
    the refused analyzer holds no pending state. Fails on the old code (the other quadrature was accepted)."""
    state = load_state(ddpm_checkpoints["ema"])["callbacks"]["NoiseLevelAnalyzer"]
    _, analyzer = _ddpm(quadrature="simpson")
    with pytest.raises(ValueError, match=r"quadrature: saved 'midpoint', here 'simpson'"):
        analyzer.load_state_dict(state)
    assert analyzer.state_dict() == {"format": state["format"], "bound": False}
    _, analyzer = _ddpm(ema_ledger="none")
    analyzer.load_state_dict(state)  # (no trainer: the EMA ledger is bind's to say)
    assert analyzer.state_dict() is state


# ------------------------------------------------------------------------------------------
# GAN
# ------------------------------------------------------------------------------------------
_CENTERS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)


def _gan(ema: bool = False, probe_seed: int = 0, **settings):
    torch.manual_seed(0)
    generator = MLPGenerator(2, 2, hidden=12, depth=2).double()
    discriminator = MLPDiscriminator(2, hidden=12, depth=2).double()
    options = dict(num_groups=3, window=2, eval_every=1, coverage_latents=32, mode_centers=_CENTERS, mode_std=0.5)
    options.update(settings)
    probes = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(probe_seed))
    analyzer = GANKernelAnalyzer(generator, discriminator, probes, **options)
    average = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if ema else None
    trainer = GANTrainer(generator, discriminator, _ring(48), batch_size=8, seed=3, latent_dim=2, callbacks=[analyzer],
                         ema=average)
    return trainer, analyzer


@pytest.fixture(scope="module")
def gan_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gan")
    paths = {}
    for name, settings in {"base": {}, "ema": {"ema": True}}.items():
        trainer, _ = _gan(**settings)
        trainer.train(2)
        paths[name] = folder / f"{name}.pt"
        trainer.save_checkpoint(paths[name])
    return paths


@pytest.mark.parametrize("saved, here, match", [
    ("base", dict(coverage_latents=16), r"coverage_latents.*saved \{'coverage_latents': 32\}, here \{'coverage_latents': 16\}"),
    ("base", dict(coverage_sigmas=2.0), r"coverage_sigmas.*saved \{'coverage_sigmas': 3\.0\}, here \{'coverage_sigmas': 2\.0\}"),
    ("base", dict(mode_std=0.25), r"mode_std.*saved \{'mode_std': 0\.5\}, here \{'mode_std': 0\.25\}"),
    ("base", dict(seed=4), r"seed.*saved \{'seed': 0\}, here \{'seed': 4\}"),
    ("base", dict(quadrature="trapezoid"), r"quadrature: saved 'midpoint', here 'trapezoid'.*quadrature='midpoint'"),
    ("base", dict(probe_seed=1),
     r"generator probes \(the probes have the same shapes but other values; shape, dtype, digest\): saved.*probe_latents"),
    ("ema", dict(ema=True, ema_ledger="none"), r"EMA ledger: saved 'kept', here 'none'.*ema_ledger='trainer'"),
])
def test_a_gan_resume_to_other_analyzer_settings_is_refused_before_anything_is_loaded(gan_checkpoints, saved, here,
                                                                                         match):
    """A GAN checkpoint at iteration 2 resumed by a trainer whose analyzer has another coverage definition or
    tracker setting: refused by ``load_checkpoint`` naming it, the trainer and the analyzer bit for bit as before.

    Fails on the old code: the coverage settings were accepted (coverage rows of 32 latents at 3 sigmas, then of 16
    or at 2 sigmas, in one list); the tracker settings were accepted and refused at the first iteration's steps,
    after the networks, optimizers and iteration count (2) were loaded."""
    trainer, analyzer = _gan(**here)
    _refused_bit_for_bit(trainer, analyzer, lambda: trainer.load_checkpoint(gan_checkpoints[saved]), match)
    assert trainer.iteration == 0


def test_a_gan_state_saved_before_the_coverage_keys_loads_and_one_without_mode_centers_reads_none(gan_checkpoints,
                                                                                                  tmp_path):
    """Coverage: a state without the coverage keys (an older version's) loads into an analyzer of other coverage
    settings and trains on; without ``mode_centers`` no coverage is measured, so the coverage settings are not
    record settings there (``None`` in the config, another ``seed`` accepted)."""
    state = load_state(gan_checkpoints["base"])
    config = state["callbacks"]["GANKernelAnalyzer"]["config"]
    for key in ("coverage_latents", "coverage_sigmas", "mode_std", "seed"):
        config.pop(key, None)  # (absent from the old code's states too)
    atomic_save(state, tmp_path / "older.pt")
    trainer, analyzer = _gan(coverage_latents=16, seed=4)
    trainer.load_checkpoint(tmp_path / "older.pt")
    trainer.train(3)  # (to iteration 3)
    assert [row["step"] for row in analyzer.coverage] == [1, 2, 3]
    _, plain = _gan(mode_centers=None, mode_std=None, seed=4)
    assert {k: plain._config()[k] for k in ("coverage_latents", "coverage_sigmas", "mode_std", "seed")} == dict.fromkeys(
        ("coverage_latents", "coverage_sigmas", "mode_std", "seed"))


# ------------------------------------------------------------------------------------------
# 3. the structurally null parameters found before the save
# ------------------------------------------------------------------------------------------
def _tiny_head_tracker():
    """A float32 MLP whose output layer starts at 1e-14 of its default scale, under Adam (lr 1e-5): at step 1 the
    first layer's gradient is at float64 rounding level (found structurally null, routes._refresh_null); Adam then
    moves the head by about lr a step, so the first layer's gradient stays under the step test's tolerance (its
    update is booked to the rest, null_moves) while a search at a later θ finds it not null."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        model[2].weight.mul_(1e-14)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    probes = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    from genkernel import PathKernelTracker

    tracker = PathKernelTracker(model, optimizer, lambda out, y: ((out - y) ** 2).mean(1), probes, num_groups=2,
                                group_state="dense")
    return model, optimizer, tracker


def test_a_resumed_tracker_keeps_the_null_parameters_found_before_the_save(tmp_path, monkeypatch):
    """Straight: 6 steps, one null search (step 1: the first layer's weight and bias). Saved at step 3 and resumed
    into a new tracker: no search after the resume, and the ledger (contributions, rest, null_moves) equals the
    straight run's bit for bit. A state without the kept result (an older version's) still loads, and searches
    again at its next step (as before).

    Fails on the old code: the result was not saved; the resumed tracker searched again at step 4, with the head
    moved (about 3e-5), found nothing null, and booked the first layer's updates to the groups: null_moves 5.2e-9
    where the straight run's is 1.7e-8, the contributions 4.2e-9 off (of 2.2e-4)."""
    import genkernel.core.tracking.routes as routes

    searches = []
    search = routes.structurally_null
    monkeypatch.setattr(routes, "structurally_null", lambda *a, **k: searches.append(1) or search(*a, **k))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 2, generator=g), torch.randn(16, 1, generator=g)) for _ in range(6)]
    groups = torch.arange(16) % 2
    _, _, straight = _tiny_head_tracker()
    for x, y in batches:
        straight.step(x, y, groups)
    assert len(searches) == 1 and straight.ledger.null_moves.abs().max() > 0
    model, optimizer, first = _tiny_head_tracker()
    for x, y in batches[:3]:
        first.step(x, y, groups)
    first.save(tmp_path / "tracker.pt")
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    searches.clear()
    model, optimizer, resumed = _tiny_head_tracker()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(copy.deepcopy(saved[1]))
    resumed.load(tmp_path / "tracker.pt")
    for x, y in batches[3:]:
        resumed.step(x, y, groups)
    assert searches == []
    assert not state_differences(straight.ledger.state_dict(), resumed.ledger.state_dict(), "ledger")
    # an older state (without the result) loads and searches again
    state = load_state(tmp_path / "tracker.pt")
    del state["null_found"]
    model, optimizer, older = _tiny_head_tracker()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(copy.deepcopy(saved[1]))
    older.load_state_dict(state)
    older.step(*batches[3], groups)
    assert searches == [1]
