"""The cost estimate's bare step holds what a built-in trainer's step does besides its model's forward and
backward: a ``DDPMTrainer(dream=)``'s no-grad forward (one example-forward each) and a ``vae=`` trainer's encode
(the encoder's multiply-adds over the model's), so the ratio an analyzer prints at bind compares with the step the
trainer really runs (both were left out: the printed ratio about a third high under DREAM)."""

from __future__ import annotations

import pytest
import torch

from genkernel.diffusion import NoiseLevelAnalyzer
from recipes.benchmarks.harness import counted_flops
from test_trainer_dream import data, trainer as dream_trainer
from test_trainer_vae import analyzer_for, images, make_vae, trainer as vae_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def bound_cost(run, analyzer):
    run.callbacks.append(analyzer)
    run.train(1)
    return analyzer.tracker.cost


def probe_analyzer(run):
    return NoiseLevelAnalyzer(run.scheduler, data(4), num_bins=2, num_probes=4, controls=1, kernel_points=2,
                              progress=False)


def test_dreams_forward_is_one_example_forward_of_the_bare_step():
    plain, dream = dream_trainer(), dream_trainer(dream=1.0)
    with_dream, without = bound_cost(dream, probe_analyzer(dream)), bound_cost(plain, probe_analyzer(plain))
    assert with_dream.bare_step == pytest.approx(without.bare_step + 4)  # batch 4, one forward each
    assert with_dream.settings["step_overhead"] == 1.0 and with_dream.ratio < without.ratio


def test_a_vaes_encode_is_its_multiply_adds_over_the_models():
    """The encode's share, counted independently (torch's operation count of one image's encode over one latent's
    forward of the denoiser), equals what the bare step gained per example, to the attention the estimate's
    count of linear and convolutional layers leaves out (the VAE's mid-block attention: a few %)."""
    plain = vae_trainer()
    latent = plain.encode(images(1))
    cost = bound_cost(plain, analyzer_for(plain))
    assert cost.settings["step_overhead"] > 0
    vae, unet = make_vae(), plain.model
    encode = counted_flops(lambda: vae.encode(images(1)))[0]
    forward = counted_flops(lambda: unet(latent, torch.tensor([3])))[0]
    assert cost.settings["step_overhead"] == pytest.approx(encode / forward, rel=0.1)  # (0.357 against 0.373)


def test_set_step_overhead_recounts_the_bare_step_and_refuses_nonsense():
    """tracker.set_step_overhead(c): the bare step grows by (c − before) · B example-forwards, the setting says c, and
    the first step's estimate made again keeps it (the analyzer's VAE recount went through the tracker's private
    settings before); a negative or non-finite count is a ValueError."""
    from genkernel import PathKernelTracker
    from genkernel.supervised import mse_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(4, 3, dtype=torch.float64), num_groups=2,
                                group_state="dense")
    before = tracker.cost.bare_step
    tracker.set_step_overhead(0.5)
    assert tracker.cost.bare_step == pytest.approx(before + 0.5 * tracker.cost.settings["batch"], rel=1e-12)
    assert tracker.cost.settings["step_overhead"] == 0.5
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    tracker.step(x, y, torch.tensor([0, 1, 0, 1, 0, 1]))  # B = 6 replaces the probes' 4: estimated again
    assert tracker.cost.settings["batch"] == 6 and tracker.cost.settings["step_overhead"] == 0.5
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="overhead"):
            tracker.set_step_overhead(bad)
