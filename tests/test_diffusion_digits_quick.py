"""diffusion_digits quick protocol: its tracked window lies after the untracked warm-up and the learning-rate
decay, with the time-blind null model on; the settings' ``lr_decay`` is applied to the denoiser and to its
null model alike (recipes/common.py ``lr_decay_schedule``), and a malformed one is refused.

All three fail on the code before: quick tracked 6 of 80 steps with no null model (``reference=None``) and
no decay, and common.py had no ``lr_decay`` (a setting it would have ignored silently: at a constant lr 2e-3
the quick window's change was mostly Adam's pre-window state in seed 1, median rest share 0.69)."""

from __future__ import annotations

import argparse

import pytest
import torch

from recipes.common import _make_analyzer, pick
from recipes.experiments import diffusion_digits


def test_quick_window_follows_the_warm_up_and_decay_with_the_null_model_on():
    """The analyzer tracks exactly steps warm-up + 1 .. warm-up + window (none of the warm-up), the decay
    happens inside the warm-up (the window runs at one rate), and the null model's ledger is kept."""
    from genkernel.data import gaussian_ring
    from genkernel.diffusion import make_scheduler

    s = pick("quick", **diffusion_digits.SETTINGS)
    warmup, window = s["warmup_steps"], s["window_steps"]
    assert s["reference"] == "ledger"  # kernel_locality and the ledger-locality claims need their null
    at, factor = s["lr_decay"]
    assert 1 <= at <= warmup and 0 < factor < 1
    analyzer = _make_analyzer(make_scheduler(100, "linear", "epsilon"), gaussian_ring(16, seed=0)[0], s, 0,
                              controls=1, snapshots=False, progress=False)
    assert analyzer.track_steps == (warmup + 1, warmup + window)
    # full and smoke keep their constant rate
    assert pick("full", **diffusion_digits.SETTINGS)["lr_decay"] is None
    assert pick("smoke", **diffusion_digits.SETTINGS)["lr_decay"] is None


def _tiny_spec():
    from genkernel.data import gaussian_ring
    from genkernel.diffusion import MLPDenoiser, make_scheduler
    from recipes.common import TimeBlind

    return {
        "load": lambda seed: (gaussian_ring(32, num_modes=4, radius=2.0, std=0.05, seed=seed)[0],
                              gaussian_ring(8, num_modes=4, radius=2.0, std=0.05, seed=seed + 1000)[0]),
        "model": lambda: MLPDenoiser(2, hidden=8, depth=2),
        "time_blind": lambda: TimeBlind(MLPDenoiser(2, hidden=8, depth=2)),
        "scheduler": lambda: make_scheduler(50, "linear", "epsilon"), "retrieval": {}, "images": False,
    }


def _settings(**over):
    s = dict(num_bins=2, num_probes=4, band=0, controls=1, reference="kernel", snapshot_every=0, kernel_every=0,
             kernel_points=3, kernel_sketch=None, warmup_steps=3, window_steps=2, batch_size=8, lr=2e-3,
             retrieval_samples=2, retrieval_train=8, retrieval_stages=2, inference_steps=3, checkpoint_every=1)
    return {**s, **over}


def test_lr_decay_reaches_the_denoiser_and_its_null_model(monkeypatch):
    """Both trainers of a seed run (the denoiser and the time-blind null model) train at lr up to the decay
    step and at lr × factor from it on; without lr_decay the rate stays constant."""
    import genkernel.diffusion as diffusion
    from recipes.common import diffusion_seed_run

    seen: list[list[float]] = []

    class Recording(diffusion.DDPMTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.rates = []
            seen.append(self.rates)

        def train(self, steps):
            for _ in range(steps):
                self.rates.append(self.optimizer.param_groups[0]["lr"])  # the rate the next update uses
                super().train(1)

    monkeypatch.setattr(diffusion, "DDPMTrainer", Recording)
    args = argparse.Namespace(torch_device=torch.device("cpu"), mode="smoke", checkpoint_dir=None)
    diffusion_seed_run(_tiny_spec(), args, _settings(lr_decay=(2, 0.25)), 0)
    assert len(seen) == 2  # the denoiser and the null model
    for rates in seen:
        assert rates == pytest.approx([2e-3, 2e-3, 5e-4, 5e-4, 5e-4], rel=1e-12)
    seen.clear()
    diffusion_seed_run(_tiny_spec(), args, _settings(lr_decay=None), 0)
    for rates in seen:
        assert rates == pytest.approx([2e-3] * 5, rel=1e-12)


@pytest.mark.parametrize("decay", [(0, 0.5), (10, 1.5), (10, 0.0), (10,)])
def test_malformed_lr_decay_is_refused_naming_the_setting(decay):
    from recipes.common import lr_decay_schedule

    with pytest.raises(ValueError, match="lr_decay"):
        lr_decay_schedule({"lr_decay": decay})
