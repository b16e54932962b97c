"""Save / resume fuzz findings (helper "rfuzz"): states loaded into objects built with other settings, and a few of the
fuzzed configurations pinned as resumes that must be bit for bit.

The fuzzer (kept outside the repository) ran DDPMTrainer + NoiseLevelAnalyzer, GANTrainer + GANKernelAnalyzer and a
hand-written observed DDPM loop over random settings (optimizers, schedules, EMA, micro-batches, group states, state
dtypes, controls, snapshot and kernel cadences, track_steps windows, BatchNorm with a bias before it, conditioning,
GAN losses, R1, n_critic, windows, groupings), each run straight and stopped, saved, rebuilt from its constructors,
loaded and continued. The resumed runs matched; what it found were states accepted by objects of other settings:

- a tracker's group state saved under one ``state_dtype`` loaded into a tracker built with the other: accepted, then
  under SGD with momentum the run went on with the saved dtype's state (the float64 tracker keeping float32 rows,
  its ledger 6.5e-9 off the float64 run's, silently), under Adam its next step failed with torch's "expected dtype
  float for `end` but got dtype double";
- a NoiseLevelAnalyzer state loaded by an analyzer of another ``track_steps`` (a ledger that booked step 1 reported
  as the window (2, 8), or a window's ledger reported as the whole run) or of another ``kernel_points`` (kernel
  records of one run at two input counts, the report naming the last): accepted silently. The GAN analyzer refuses
  both kinds (its config check);
- a GANKernelAnalyzer state loaded by an analyzer of another ``track_discriminator``: accepted silently; resumed
  without it, the report kept the saved discriminator ledger of 3 steps for a run whose D made 5, resumed with it, D's
  ledger began at the save and reported 2 steps where the straight run's has 5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator
from states import state_differences

pytestmark = pytest.mark.usefixtures("one_thread")


def _ring(n, seed=0, dtype=torch.float64):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * math.pi
    return (2 * torch.stack([angle.cos(), angle.sin()], dim=1)).to(dtype)


def _without_cost(report):
    """A report less its memory and time estimate (``cost``: the memory free now, and what the estimate of a resumed
    tracker reads, which this file does not check)."""
    report = dict(report)
    report.pop("cost", None)
    if isinstance(report.get("config"), dict):
        report["config"] = {k: v for k, v in report["config"].items() if k != "cost"}
    return report


_differences = state_differences  # (every place two nested states differ, tensors bit for bit)


# ------------------------------------------------------------------------------------------
# a tracker's group state in another dtype
# ------------------------------------------------------------------------------------------
def _tracker(state_dtype, optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = (torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    probes = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    tracker = PathKernelTracker(model, opt, lambda out, y: ((out - y) ** 2).mean(1), probes, num_groups=2,
                                state_dtype=state_dtype, group_state="dense")
    return model, opt, tracker


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("saved,here", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_a_tracker_state_of_another_state_dtype_is_refused_at_load(tmp_path, optimizer, saved, here):
    """A float32 model's tracker saved with ``state_dtype=saved`` and loaded into one built with ``here``: refused at
    load, naming both dtypes, and the tracker left as it was (its next step from its own start is the straight run's).

    Fails on the old code: the load was accepted; SGD's momentum then went on in the saved dtype (float32 rows in a
    float64 tracker: 6.5e-9 off the float64 run), Adam's next step failed with torch's lerp dtype error."""
    g = torch.Generator().manual_seed(2)
    x, y, groups = torch.randn(16, 2, generator=g), torch.randn(16, 1, generator=g), torch.arange(16) % 2
    model, opt, tracker = _tracker(saved, optimizer)
    for _ in range(2):
        tracker.step(x, y, groups)
    tracker.save(tmp_path / "tracker.pt")
    other_model, other_opt, other = _tracker(here, optimizer)
    before = other.state_dict()
    with pytest.raises(ValueError, match=f"group state in {str(saved)[6:]}, this one in {str(here)[6:]}.*state_dtype"):
        other.load(tmp_path / "tracker.pt")
    assert not _differences(before, other.state_dict(), "tracker after the refusal")
    # the same dtype loads, and the resumed ledger is the straight run's bit for bit
    again_model, again_opt, again = _tracker(saved, optimizer)
    again_model.load_state_dict(model.state_dict())
    again_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict steps the dict's tensors in place)
    again.load(tmp_path / "tracker.pt")
    again.step(x, y, groups)
    tracker.step(x, y, groups)
    assert not _differences(tracker.ledger.state_dict(), again.ledger.state_dict(), "ledger")


def test_a_sketched_tracker_state_loads_whatever_state_dtype_it_names():
    """Coverage: the sketched route keeps float64 sketches whatever ``state_dtype`` says, so the dtype check (dense
    states only) does not refuse a sketched state, nor a factored one, which keeps no state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probes = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    make = lambda dtype: PathKernelTracker(model, opt, lambda out, y: ((out - y) ** 2).mean(1), probes,
                                           num_groups=2, state_dtype=dtype, group_state="sketched", sketch_dim=8)
    g = torch.Generator().manual_seed(2)
    saved = make(torch.float32)
    saved.step(torch.randn(16, 2, generator=g), torch.randn(16, 1, generator=g), torch.arange(16) % 2)
    state = saved.state_dict()
    twin = make(torch.float32)
    twin.load_state_dict(state)
    assert not _differences(state["ledgers"], twin.state_dict()["ledgers"])


# ------------------------------------------------------------------------------------------
# a NoiseLevelAnalyzer state loaded by an analyzer of another window or kernel inputs
# ------------------------------------------------------------------------------------------
def _ddpm(**analyzer_settings):
    scheduler = make_scheduler(100)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=12, depth=2, time_dim=8).double()
    settings = dict(num_bins=3, num_probes=8, kernel_points=4, kernel_every=2, progress=False)
    settings.update(analyzer_settings)
    analyzer = NoiseLevelAnalyzer(scheduler, _ring(16, seed=3), **settings)
    trainer = DDPMTrainer(model, scheduler, _ring(40), batch_size=8, lr=1e-2, progress=False, callbacks=[analyzer])
    return trainer, analyzer


@pytest.mark.parametrize("saved,here,match", [
    (dict(), dict(track_steps=(2, 8)), r"track_start.*saved \{'track_start': None\}, here \{'track_start': 2\}"),
    (dict(track_steps=(2, 8)), dict(), r"track_start.*saved \{'track_start': 2\}, here \{'track_start': None\}"),
    # (the window's end may move, not before a step the saved ledger holds: a run stopped inside its window and
    # resumed with a longer one goes on, tests/test_diffusion_recipes.py)
    (dict(track_steps=(1, 8)), dict(track_steps=(1, 2)), r"holds step 3, past this analyzer's window"),
    (dict(kernel_points=4), dict(kernel_points=3), r"kernel_points.*saved \{'kernel_points': 4\}, here \{'kernel_points': 3\}"),
])
def test_a_noise_level_analyzer_state_of_another_window_or_kernel_inputs_is_refused(tmp_path, saved, here, match):
    """A DDPM checkpoint whose analyzer was built with ``saved`` settings, resumed by a trainer whose analyzer has
    ``here``: refused at load naming the setting, the trainer left untrained (as for the GAN analyzer's
    ``track_steps`` and its other record settings).

    Fails on the old code: accepted; with ``track_steps=(2, 8)`` resumed from a whole-run state the ledger booked 6
    steps (step 1 among them) where the report says the window (2, 8) (the straight run books 5), the reverse 5
    steps reported as the whole run; with another ``kernel_points`` the kernel records mixed two input counts."""
    trainer, _ = _ddpm(**saved)
    trainer.train(3)
    trainer.save_checkpoint(tmp_path / "checkpoint.pt")
    other, _ = _ddpm(**here)
    with pytest.raises(ValueError, match=match):
        other.resume(tmp_path / "checkpoint.pt")
    assert other.global_step == 0 and not other.optimizer.state


def test_a_noise_level_analyzer_state_of_the_same_window_resumes_bit_for_bit(tmp_path):
    """Coverage (the settings now checked do not refuse their own state): a window (2, 5) stopped at step 3 and resumed
    by a trainer of the same settings ends where the straight run ends: trainer state (model, optimizer, data
    position, the analyzer's ledgers, kernel records and counts) and report (less its cost estimate) bit for bit."""
    straight, straight_analyzer = _ddpm(track_steps=(2, 5))
    straight.train(6)
    first, _ = _ddpm(track_steps=(2, 5))
    first.train(3)
    first.save_checkpoint(tmp_path / "checkpoint.pt")
    resumed, resumed_analyzer = _ddpm(track_steps=(2, 5))
    torch.manual_seed(12345)  # a fresh process: the global RNG elsewhere
    assert resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train(3)
    assert not _differences(straight.state_dict(), resumed.state_dict())
    assert not _differences(_without_cost(straight_analyzer.report()), _without_cost(resumed_analyzer.report()), "report")
    assert resumed_analyzer.ledger.steps == 4 and resumed_analyzer.global_steps == [2, 3, 4, 5]


# ------------------------------------------------------------------------------------------
# fuzzed configurations pinned
# ------------------------------------------------------------------------------------------
class _BatchNormGenerator(nn.Module):
    """A bias before BatchNorm (structurally null in training mode)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 2))

    def forward(self, z):
        return self.net(z)


def _gan(tmp_path=None, **settings):
    torch.manual_seed(0)
    generator, discriminator = _BatchNormGenerator().double(), MLPDiscriminator(2, hidden=12, depth=2).double()
    torch.manual_seed(1)
    analyzer = GANKernelAnalyzer(generator, discriminator, torch.randn(8, 2, dtype=torch.float64), grouping="direction",
                                 num_groups=3, controls=1, window=2, eval_every=1, field_snapshots=4, coverage_latents=32,
                                 comparison="latent_kmeans", track_steps=(2, 5))
    trainer = GANTrainer(generator, discriminator, _ring(48), loss="nonsaturating", r1_gamma=1.0, r1_interval=2, d_steps=2,
                         batch_size=8, seed=3, latent_dim=2, discriminator_batches="separate", max_grad_norm=1.0,
                         g_optimizer=torch.optim.SGD(generator.parameters(), lr=1e-2, momentum=0.9),
                         d_optimizer=torch.optim.SGD(discriminator.parameters(), lr=1e-2, momentum=0.9),
                         lr_scheduler_g=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
                         callbacks=[analyzer], checkpoint_dir=tmp_path)
    return trainer, analyzer


def test_a_fuzzed_gan_configuration_resumes_bit_for_bit(tmp_path):
    """Coverage: a GAN configuration of the fuzz (BatchNorm generator with a bias before it, SGD momentum, a step
    schedule, lazy R1 every 2nd discriminator step, 2 critic steps, separate discriminator batches, a track_steps
    window (2, 5), a latent k-means comparison), saved twice (before the window, right after its last iteration),
    each time rebuilt and loaded: trainer state and the analyzer's report (less its cost estimate)
    equal the straight run's bit for bit."""
    straight, straight_analyzer = _gan()
    straight.train(6)
    trainer, analyzer = _gan(tmp_path)
    for stop in (1, 5):
        trainer.train(stop)
        trainer.save_checkpoint(tmp_path / "checkpoint.pt")
        trainer, analyzer = _gan(tmp_path)
        torch.manual_seed(12345)
        trainer.load_checkpoint(tmp_path / "checkpoint.pt")
    trainer.train(6)
    assert not _differences(straight.state_dict(), trainer.state_dict())
    assert not _differences(_without_cost(straight_analyzer.report()), _without_cost(analyzer.report()), "report")


@pytest.mark.parametrize("saved,here", [(True, False), (False, True)])
def test_a_gan_analyzer_state_of_another_track_discriminator_is_refused(tmp_path, saved, here):
    """A GAN checkpoint whose analyzer tracked D (or not), resumed by one built the other way: refused at load naming
    ``track_discriminator``, the trainer left at iteration 0.

    Fails on the old code: accepted; resumed without D's tracking the report kept the saved D ledger (3 steps) for a
    run whose D made 5, resumed with it D's ledger started at the save (2 steps reported, 5 in the straight run)."""
    def make():
        torch.manual_seed(0)
        generator, discriminator = MLPGenerator(2, 2, hidden=12, depth=2).double(), MLPDiscriminator(2, hidden=12, depth=2).double()
        analyzer = GANKernelAnalyzer(generator, discriminator, torch.randn(8, 2, dtype=torch.float64), num_groups=3,
                                     window=2, eval_every=1, coverage_latents=32, track_discriminator=flag)
        return GANTrainer(generator, discriminator, _ring(48), batch_size=8, seed=3, latent_dim=2, callbacks=[analyzer],
                          checkpoint_dir=tmp_path)

    flag = saved
    first = make()
    first.train(3)
    first.save_checkpoint(tmp_path / "checkpoint.pt")
    flag = here
    other = make()
    with pytest.raises(ValueError, match=f"track_discriminator.*saved {{'track_discriminator': {saved}}}, "
                                         f"here {{'track_discriminator': {here}}}"):
        other.load_checkpoint(tmp_path / "checkpoint.pt")
    assert other.iteration == 0
