"""Review of gan_ring2d's quick protocol: an untracked warm-up before the tracked span (with a step decay of
the learning rates) and the ``formula_matches_each_step`` tool check on a ledger so exact that every
seed's mean cosine is exactly 1.0."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from recipes.experiments import gan_ring2d

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def _run(seed: int, cos_formula: float) -> dict:
    """A run as gan_ring2d stores it: three evaluation steps, every ``cos_formula`` the same value."""
    alignment = [{"step": 5 * k, "cos_formula": cos_formula, "cos_kernel_field": 0.8 + 0.01 * k + 0.02 * seed,
                  "cos_local_push": 0.5 - 0.01 * k} for k in range(3)]
    return {"seed": seed, "convergence": {"converged": False, "why": "hand-made"},
            "report": {"generator": {"relative_residual": 1e-10}, "discriminator": {"relative_residual": 1e-9},
                       "alignment": alignment, "windows": [], "group_labels": [f"m{m}" for m in range(8)],
                       "coverage": []}}


def test_formula_tool_check_holds_when_every_seed_matches_exactly():
    """Fails on the old code: at the quick settings' decayed learning rate the ledger is exact to 1e-10 and every
    seed's mean cosine between ΔG(z') and the ledger's prediction is exactly 1.0; the Student-t interval of
    three equal values is undefined, and the old rule (its lower end above 0.99) reported the tool check
    "did NOT hold" with value 1. With no spread the verdict is the common value against the limit: 1.0 holds,
    0.5 (equally without spread) does not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no coupling windows in these runs: NaN medians
        exact = gan_ring2d.gan_claims([_run(s, 1.0) for s in range(3)], require_convergence=False)
        wrong = gan_ring2d.gan_claims([_run(s, 0.5) for s in range(3)], require_convergence=False)
        one = gan_ring2d.gan_claims([_run(0, 1.0)], require_convergence=False)  # one run: its three equal steps
    c = exact["formula_matches_each_step"]
    assert c["value"] == 1.0 and c["held"] is True  # old: held False (interval [None, None])
    assert c["interval"] == [1.0, 1.0] and c["n"] == 3
    assert "no spread" in c["no_spread"]
    assert wrong["formula_matches_each_step"]["held"] is False
    assert one["formula_matches_each_step"]["held"] is True


def _smoke_settings(**changes) -> dict:
    s = gan_ring2d.settings_for("smoke")
    s.update(controls=1, null_model=False, **changes)
    return s


def test_warmup_runs_untracked_and_the_tracked_ledgers_stay_exact():
    """Fails on the old code (no warm-up: every iteration tracked from 1, the learning rates constant):
    with ``warmup`` W the analyzer's ledgers cover iterations W+1..T only (G's loop steps W+1..T, D's
    d_steps per iteration), both learning rates are ``lr × factor`` from iteration ``lr_decay[0]`` on, and
    the ledgers stay exact with Adam's state from the warm-up carried (its first moment is the ledgers' rest:
    nonzero, and the residual still tiny)."""
    args = argparse.Namespace(torch_device=torch.device("cpu"), mixture="ring", spectral_norm=False,
                              loss="nonsaturating", mode="smoke")
    s = _smoke_settings(iterations=9, warmup=3, window=3, eval_every=1, lr_decay=(3, 0.2))
    trainer, analyzer, _ = gan_ring2d.build(args, s, 0, null=False)
    assert analyzer.track_steps == (4, 9)
    trainer.train(3)
    assert analyzer.g_steps == 0 and analyzer.d_steps == 0  # the warm-up is not tracked
    assert [g["lr"] for g in trainer.g_optimizer.param_groups] == [pytest.approx(s["lr"] * 0.2)]
    assert [g["lr"] for g in trainer.d_optimizer.param_groups] == [pytest.approx(s["lr"] * 0.2)]
    trainer.train(9)
    report = analyzer.report()
    assert report["loop_steps"]["generator"] == [4, 9]
    assert report["loop_steps"]["discriminator"] == [4 * s["d_steps"] - s["d_steps"] + 1, 9 * s["d_steps"]]
    assert len(report["windows"]) == 2 and report["windows"][0]["loop_steps"] == [4, 6]
    assert report["generator"]["rest_norm"] > 0  # Adam's first moment from the warm-up
    assert report["generator"]["relative_residual"] < 1e-6 and report["discriminator"]["relative_residual"] < 1e-6


def test_warmup_that_leaves_a_partial_window_is_refused():
    """A tracked span that is not a whole number of windows would leave its last window out of the coupling
    claims: refused, naming the fix; a warm-up as long as training tracks nothing: refused."""
    with pytest.raises(ValueError, match="multiple of window"):
        gan_ring2d.tracked_steps(_smoke_settings(iterations=10, warmup=3, window=3))
    with pytest.raises(ValueError, match="tracked span would be empty"):
        gan_ring2d.tracked_steps(_smoke_settings(iterations=6, warmup=6, window=3))
    assert gan_ring2d.tracked_steps(_smoke_settings(iterations=6, warmup=0, window=3)) is None
