"""The sketched route's per-step check Σ_g R s_g = R s_total, in float32, when the examples' gradients cancel.

Each example's sketch R c_n ∇ℓ_n is computed in the parameters' dtype, so the groups' sums carry a rounding relative
to the examples' own norms. The check judged the gap against the sums' norms only: a float32 step whose examples'
gradients cancel within their groups (near a minimum, the mean gradient is far smaller than the examples') was refused
("does not add up to the sketch of the optimizer's total", gap 2e-5 to 5e-5 of the scale against 1e-5) though nothing
was wrong. The check now also counts Σ_n ‖R c_n ∇ℓ_n‖, carried through the optimizer's recurrence.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel.core.tracking.sketched import SketchedRoute
from genkernel.core.tracking.step import OptimizerStep
from genkernel.core.tracking.tracker import PathKernelTracker
from genkernel.core.errors import LedgerCheckError


def _loss(out, y):
    return ((out - y) ** 2).mean(1)


def _setup(kind: str, seed: int, *, width: int = 16, momentum: float = 0.9, adam_lr: float = 1e-3, groups: int = 2,
           dtype: torch.dtype = torch.float32):
    """``(model, optimizer, probes, tracker)``: a 3-``width``-2 tanh MLP in ``dtype`` seeded with ``seed``, SGD (lr 0.05,
    ``momentum``) for ``kind`` "momentum" else Adam (``adam_lr``), 4 probes, a sketched tracker of ``groups`` groups
    (tests/test_read45c.py builds its runs here too)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(dtype)
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum) if kind == "momentum" else
                 torch.optim.Adam(model.parameters(), lr=adam_lr))
    probes = torch.randn(4, 3, dtype=dtype)
    tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=groups, group_state="sketched",
                                sketch_dim=64)
    return model, optimizer, probes, tracker


def _cancelling_batch(model, delta: float):
    """8 examples in pairs (x, y) and (x, 2 f(x) - y + delta noise): a pair's loss gradients cancel up to delta (and
    float32 rounding); pair members share their group (examples n and n + 4, group n % 2)."""
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with torch.no_grad():
        f = model(x)
    return torch.cat([x, x]), torch.cat([y, 2 * f - y + delta * torch.randn(4, 2)]), torch.arange(8) % 4 % 2


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_float32_steps_whose_example_gradients_cancel_are_not_refused_and_balance(kind):
    """Three float32 steps (two micro-batches each) whose examples' gradients cancel to 1e-3 of their norms within
    each group: every step is recorded, and the reported residual is the real change of the probes' outputs (eval
    mode, computed here) minus the groups' sketched contributions, their sketch error and the rest, to float32
    rounding of the change.

    Fails on the old code: the first step was refused ("does not add up to the sketch of the optimizer's total",
    gap 4.0e-08 at scale 1.7e-03 under momentum)."""
    for seed in range(2):
        model, optimizer, probes, tracker = _setup(kind, seed)
        for _ in range(3):
            inputs, targets, groups = _cancelling_batch(model, 1e-3)
            with torch.no_grad():
                before = model(probes).double()
            result = tracker.track(OptimizerStep(model, optimizer, _loss, inputs, targets, None, micro_batches=2),
                                   groups)
            with torch.no_grad():
                real = model(probes).double() - before
            booked = result.contributions.sum(1) + result.sketch_error + result.rest
            scale = float(real.abs().max())
            assert float((real - booked - result.residual).abs().max()) <= 1e-5 * scale
        assert tracker.ledger.steps == 3


def _lose_last_example(sketches: torch.Tensor) -> torch.Tensor:
    """The batch's sketches with the last example's left out (an example missing from its group)."""
    sketches = sketches.clone()
    sketches[-1] = 0.0
    return sketches


def test_float32_sketches_that_drift_or_lose_an_example_are_still_refused():
    """The batch's sketches 0.1 % too large (a sketch that drifted from the optimizer's state) on ordinary float32
    data, and one example's sketch lost on the cancelling data above: refused, nothing recorded.

    Coverage: the old code refused these too; this pins that counting the examples' norms in the rounding scale
    (Σ_n ‖R c_n ∇ℓ_n‖ x 1e-5, where the gaps of rounding measured 5e-8 of it) does not let them through."""
    original = SketchedRoute.project_batch
    for fault, delta in ((lambda s: s * 1.001, None), (_lose_last_example, 1e-3)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SketchedRoute, "project_batch", lambda self, batch, f=fault: f(original(self, batch)))
            model, optimizer, probes, tracker = _setup("momentum", 0)
            inputs, targets, groups = _cancelling_batch(model, 1.0 if delta is None else delta)
            if delta is None:
                targets = torch.randn(8, 2)  # (no cancelling)
            with pytest.raises(LedgerCheckError, match="does not add up to the sketch of the optimizer's total"):
                tracker.track(OptimizerStep(model, optimizer, _loss, inputs, targets, None, micro_batches=2), groups)
            assert tracker.ledger.steps == 0


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_a_drift_of_the_sketched_state_of_8e_5_is_refused_on_an_ordinary_float32_step(kind, monkeypatch):
    """Ordinary steps (64 examples, no cancellation), then one whose examples' sketches are all scaled by 1 + 8e-5 (a
    drift of the groups' state against the exact total): refused. The magnitude the state was summed from is judged
    by float32 units (SKETCH_ROUNDING_UNITS eps), not at rtol: at rtol (1e-5 of the summed magnitude) a drift up to
    1.2e-4 passed here; by units it is refused from about 5e-5, as before the magnitude was counted (3e-5)."""
    model, optimizer, _, tracker = _setup(kind, 0, groups=4)
    project = SketchedRoute.project_batch
    for step in range(3):
        x, y = torch.randn(64, 3), torch.randn(64, 2)
        if step == 2:
            monkeypatch.setattr(SketchedRoute, "project_batch", lambda self, batch: project(self, batch) * (1 + 8e-5))
            with pytest.raises(LedgerCheckError, match="does not add up to the sketch"):
                tracker.track(OptimizerStep(model, optimizer, _loss, x, y, None, micro_batches=1), torch.arange(64) % 4)
        else:
            tracker.track(OptimizerStep(model, optimizer, _loss, x, y, None, micro_batches=1), torch.arange(64) % 4)
