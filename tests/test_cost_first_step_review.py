"""Second read of the first step's cost estimate (tests/test_cost_first_step.py): a resumed tracker, owned steps in
micro-batches, and what the estimate made again at the first step leaves of training.

A tracker resumed from a saved state (a checkpoint) meets its "first" step anywhere in the run, often the last,
partial batch of an epoch (drop_last=False). It followed that step: without batch_size its estimate took the partial
batch (B = 4 where the run it resumes trained, and estimated, B = 12), and with the run's own batch_size it warned
that the batch differed. The state now keeps the first step's (B, K), and the resumed tracker takes them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.tracking.step import OptimizerStep
from genkernel.supervised import mse_loss
from genkernel.core.adapter import analysis_mode
from genkernel.core.cost import estimate_cost
from test_cost_first_step import loop_step  # (a hand-written loop of 2 micro-batches, observe() its added line)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
EPOCH = (12, 12, 4)  # 28 examples in batches of 12, drop_last=False: the epoch ends with a batch of 4


PROBES = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)  # M = 5


def direct_estimate(tracker, batch, micro_batches):
    """estimate_cost called directly (in analysis mode, as the tracker does) with its route and the given B and K."""
    with analysis_mode(tracker.module):
        return estimate_cost(tracker.module, tracker.optimizer, tracker.probes, outputs=2, rows=3, partitions=1,
                             group_state="dense", gradient_route="graph",
                             contribution_route=tracker.route.contribution_route, quadrature_nodes=1,
                             batch_size=batch, micro_batches=micro_batches)


def same_estimate(a, b):
    return a.memory == b.memory and a.work == b.work and a.bare_step == b.bare_step


def epoch(sizes=EPOCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, generator=g, dtype=F64), torch.randn(b, 2, generator=g, dtype=F64),
             torch.randint(0, 3, (b,), generator=g)) for b in sizes]


def model_and_optimizer(seed=0, batch_norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 16)] + ([nn.BatchNorm1d(16)] if batch_norm else []) + [nn.Tanh(), nn.Linear(16, 2)]
    model = nn.Sequential(*layers).to(F64)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def tracker_of(model, optimizer, **options):
    return PathKernelTracker(model, optimizer, mse_loss, PROBES, num_groups=3, group_state="dense",
                             gradient_route="graph", **options)


@pytest.mark.parametrize("batch_size", [None, 12])
def test_a_tracker_resumed_at_an_epochs_partial_batch_keeps_the_runs_first_step(batch_size):
    """Two steps of 12 (in 2 micro-batches), the state saved, a fresh tracker loads it and records the epoch's last
    batch of 4: its estimate is the uninterrupted run's (B = 12, K = 2), no warning. Before: without batch_size it
    took B = 4 (work ratio and memory of a batch a third the run's, silently); with batch_size=12, the run's own,
    it warned "batch_size=12 but this step's is 4"."""
    data = epoch()
    model, optimizer = model_and_optimizer()
    straight = tracker_of(model, optimizer, batch_size=batch_size)
    for x, y, groups in data[:2]:
        loop_step(model, optimizer, x, y, groups, tracker=straight)
    state = straight.state_dict()
    resumed_model = copy.deepcopy(model)
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05)
    resumed = tracker_of(resumed_model, resumed_optimizer, batch_size=batch_size)
    resumed.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the tracker was built with", category=UserWarning)
        loop_step(resumed_model, resumed_optimizer, *data[2], tracker=resumed)
    loop_step(model, optimizer, *data[2], tracker=straight)
    assert resumed.ledger.steps == straight.ledger.steps == 3
    assert (resumed.cost.settings["batch"], resumed.cost.settings["micro_batches"]) == (12, 2)
    assert same_estimate(resumed.cost, straight.cost) and same_estimate(resumed.cost, direct_estimate(resumed, 12, 2))
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), model.parameters()))
    # saved again after the resumed step (and before it): the first step's (B, K) go on to the next resume
    again_model = copy.deepcopy(resumed_model)
    again = tracker_of(again_model, torch.optim.SGD(again_model.parameters(), lr=0.05))
    again.load_state_dict(resumed.state_dict())
    assert again.state_dict()["cost_first_step"] == (12, 2)


def test_a_state_saved_before_the_first_step_leaves_the_resumed_tracker_to_follow_its_own():
    """A state saved before any step holds no first step: the tracker resumed from it follows its own first step
    (here the batch of 4), as a fresh one does. Fails on the parent of 10f5104 (no estimate followed a step: no
    ``batch_from``); passes on 10f5104 before this review's fix (which followed every resumed tracker's step)."""
    model, optimizer = model_and_optimizer()
    state = tracker_of(model, optimizer).state_dict()
    resumed = tracker_of(model, optimizer)
    resumed.load_state_dict(state)
    loop_step(model, optimizer, *epoch()[2], tracker=resumed)
    assert (resumed.cost.settings["batch"], resumed.cost.settings["batch_from"]) == (4, "first_step")
    assert same_estimate(resumed.cost, direct_estimate(resumed, 4, 2))


def test_an_owned_step_in_micro_batches_is_estimated_as_a_tracker_told_its_batch():
    """tracker.track(OptimizerStep(..., micro_batches=3)) of 12 examples, built without batch_size / micro_batches:
    after it the estimate is, number for number, that of a tracker built with batch_size=12, micro_batches=3 (the
    same route), and estimate_cost's. Fails on the parent of 10f5104 (M = 5 in one micro-batch); passes on 10f5104
    (coverage of its owned route in micro-batches)."""
    x, y, groups = epoch((12,))[0]
    followed_model, followed_optimizer = model_and_optimizer()
    told_model, told_optimizer = model_and_optimizer()
    followed = tracker_of(followed_model, followed_optimizer)
    told = tracker_of(told_model, told_optimizer, batch_size=12, micro_batches=3)
    for tracker, model, optimizer in ((followed, followed_model, followed_optimizer),
                                      (told, told_model, told_optimizer)):
        tracker.track(OptimizerStep(model, optimizer, mse_loss, x, y, None, micro_batches=3), groups)
    assert same_estimate(followed.cost, told.cost) and same_estimate(followed.cost, direct_estimate(followed, 12, 3))
    assert (followed.cost.settings["batch_from"], followed.cost.settings["micro_batches_from"]) == ("first_step",
                                                                                                   "first_step")
    assert all(torch.equal(p, q) for p, q in zip(followed_model.parameters(), told_model.parameters()))


def test_the_estimate_made_inside_optimizer_step_leaves_batch_norm_and_the_rng_as_without_a_tracker():
    """A BatchNorm model (running statistics moved by every training forward), an observed
    loop that steps through ``optimizer.step(closure)`` (Lightning's automatic optimization: the estimate is made
    inside the optimizer's step, under its no_grad) and draws from the global RNG between micro-batches: parameters,
    running statistics and the next draw are bit for bit the loop's without the tracker, and the estimate is
    estimate_cost's with the loop's B and K (the counting forward's autograd is its own). The bit-identity passes on
    the parent of 10f5104 and on 10f5104 (coverage); the estimate fails on the parent (M = 5 in one micro-batch)."""
    def run(tracked):
        model, optimizer = model_and_optimizer(batch_norm=True)
        tracker = tracker_of(model, optimizer) if tracked else None
        torch.manual_seed(5)
        for x, y, groups in epoch((12, 12, 12)):
            def closure():
                optimizer.zero_grad()
                for rows in (slice(0, 6), slice(6, 12)):
                    losses = mse_loss(model(x[rows]), y[rows])
                    if tracker is not None:
                        tracker.observe(losses, groups[rows])
                    (losses.mean() / 2).backward()
                    torch.rand(1)
                return losses.mean()
            optimizer.step(closure)
        return model, tracker, torch.rand(4)

    model, tracker, draw = run(True)
    bare, _, bare_draw = run(False)
    assert tracker.ledger.steps == 3 and torch.equal(draw, bare_draw)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bare.state_dict().values()))
    assert same_estimate(tracker.cost, direct_estimate(tracker, 12, 2))


def test_a_gan_trainer_resumed_at_a_dataloaders_partial_batch_estimates_as_the_run_it_resumes(tmp_path):
    """GANTrainer on a DataLoader of 40 points in batches of 16 (16, 16, 8 per epoch; WGAN-GP, d_steps=2), the
    analyzer attached: checkpointed after one iteration, the resumed run's first discriminator step is the epoch's
    last batch of 8 (24 rows with the penalty's). The analyzer builds its trackers at that step from its batch: the
    discriminator tracker estimated B = 24 (ratio 7.42 where the uninterrupted run's is 5.19, silently). It now takes
    the run's first step's from the loaded state (B = 48, the same estimate), without a warning; the generator's
    (always 16) is unchanged. Training is bit for bit the uninterrupted run's. Fails on the parent of 10f5104 and on
    10f5104 (B = 24)."""
    from torch.utils.data import DataLoader, TensorDataset

    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

    points = torch.randn(40, 2, generator=torch.Generator().manual_seed(4), dtype=F64)

    def run(**options):
        torch.manual_seed(0)
        generator = MLPGenerator(2, 2, hidden=16, depth=2).double()
        discriminator = MLPDiscriminator(2, hidden=16, depth=2).double()
        analyzer = GANKernelAnalyzer(generator, discriminator,
                                     torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64),
                                     num_groups=2, window=8, eval_every=1)
        trainer = GANTrainer(generator, discriminator, DataLoader(TensorDataset(points), batch_size=16), d_steps=2,
                             seed=3, loss="wgan-gp", callbacks=[analyzer], **options)
        return trainer, analyzer

    straight, straight_analyzer = run()
    straight.train(2)
    run(checkpoint_dir=tmp_path, checkpoint_every=1)[0].train(1)
    resumed, resumed_analyzer = run()
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*the tracker was built with", category=UserWarning)
        resumed.train(2)
    for phase in ("g_tracker", "d_tracker"):
        mine, theirs = getattr(resumed_analyzer, phase), getattr(straight_analyzer, phase)
        assert mine.ledger.steps == theirs.ledger.steps > 0
        assert mine.cost.settings["batch"] == theirs.cost.settings["batch"], phase
        assert same_estimate(mine.cost, theirs.cost), phase
    assert resumed_analyzer.d_tracker.cost.settings["batch"] == 48
    assert same_estimate(resumed_analyzer.cost, straight_analyzer.cost)
    assert all(torch.equal(p, q) for p, q in zip(resumed.discriminator.parameters(), straight.discriminator.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(resumed.generator.parameters(), straight.generator.parameters()))


def test_a_loader_whose_batch_exceeds_the_epoch_is_estimated_at_the_examples_it_trains():
    """DataLoader(batch_size=16) over 10 examples (drop_last=False) trains 10 a step: DDPMTrainer's batch_size, which
    it binds its analyzer with, and Lightning's examples per step (loader batch × accumulation) are capped by the
    sampler's examples (before: 16, so the analyzer's estimate stayed at 16 and the first step warned that the
    batch_size the trainer passed differed from the step's, advice the user could not act on); kept where the
    loader drops partial batches or holds more examples, and None where it does not say."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from diffusers import DDPMScheduler

    from genkernel.core.tracking.batches import loader_batch_size
    from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer

    ten, forty = TensorDataset(torch.randn(10, 2)), TensorDataset(torch.randn(40, 2))
    assert loader_batch_size(DataLoader(ten, batch_size=16)) == 10
    assert loader_batch_size(DataLoader(ten, batch_size=16, drop_last=True)) == 16
    assert loader_batch_size(DataLoader(forty, batch_size=16)) == 16
    assert loader_batch_size(DataLoader(forty, batch_size=16), batches=4) == 40  # (Lightning's accumulation)
    assert loader_batch_size(DataLoader(forty, batch_size=16), batches=2) == 32
    sharded = DistributedSampler(forty, num_replicas=4, rank=1, shuffle=False)  # 10 examples on this rank
    assert loader_batch_size(DataLoader(forty, batch_size=16, sampler=sharded)) == 10
    assert loader_batch_size(DataLoader(ten, batch_sampler=[[0, 1], [2, 3]])) is None

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, t):
            return self.net(torch.cat([x, t.float()[:, None] / 100], dim=1))

    scheduler = DDPMScheduler(num_train_timesteps=100)
    trainer = DDPMTrainer(Denoiser(), scheduler, DataLoader(ten, batch_size=16), lr=1e-2, progress=False)
    assert trainer.batch_size == 10
    analyzer = NoiseLevelAnalyzer(scheduler, torch.randn(4, 2), num_bins=2, kernel_every=0)
    trainer.callbacks.append(analyzer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"step \d+: the tracker was built with", category=UserWarning)
        trainer.train(2)
    assert analyzer.tracker.cost.settings["batch"] == 10
