"""Second read of this session's commits (read45): what their own tests left open.

1. lightning: StochasticWeightAveraging over BatchNorm was refused whenever max_epochs was finite, also where the fit's
   max_steps ends it before the extra BatchNorm epoch that callback adds (that epoch never runs, and the analyzed fit
   trains exactly as the plain one).
2. stats: a bfloat16 tensor's rounding is read with bfloat16's own eps (2**-7) and ROUNDING_UNITS of it; a difference
   of sides of two dtypes is judged by the less precise one (coverage: faults injected there passed test_stats45).
3. sketched: the magnitude the check's scale adds is carried through commit() and a state_dict (coverage: faults
   injected there passed test_sketch45).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from genkernel.stats import ROUNDING_UNITS, difference_interval, mean_interval


# -- 1. StochasticWeightAveraging whose extra BatchNorm epoch max_steps cuts off ----------------------------------
def _swa_fit(with_analyzer: bool, max_steps: int, accumulate: int = 1):
    """A fit of test_ifuzz45's BatchNorm denoiser (2 epochs of 2 batches of 4) with StochasticWeightAveraging from
    epoch 1 and ``max_steps``, with GenkernelCallback when ``with_analyzer``; returns (trainer, module, analyzer)."""
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from test_ifuzz45 import NormedDenoiser
    from test_integrations import _analyzer, _trainer, lightning_denoiser, ring

    from genkernel.integrations.lightning import GenkernelCallback

    analyzer = _analyzer() if with_analyzer else None
    module = lightning_denoiser(analyzer, net=NormedDenoiser)
    callbacks = [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)]
    if analyzer is not None:
        callbacks.append(GenkernelCallback(analyzer, model_attribute="net"))
    trainer = _trainer(callbacks, max_epochs=2, max_steps=max_steps, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(ring(8), batch_size=4))
    return trainer, module, analyzer


@pytest.mark.parametrize("accumulate, max_steps", [(1, 4), (2, 2)])
def test_stochastic_weight_averaging_over_batch_norm_cut_off_by_max_steps_before_its_extra_epoch_trains_as_without_analyzer(
        accumulate, max_steps):
    """max_steps equal to the steps of the epochs asked for (2 epochs x ceil(2 batches / accumulate)): Lightning
    stops before the BatchNorm epoch StochasticWeightAveraging adds, nothing changes the weights outside a step, and
    the analyzed fit takes every step with the module's weights bit for bit those of the same fit without the
    analyzer; one step more reaches that epoch and is still refused before any step.

    Fails on the old code: every such fit was refused at the start ("the fit has Lightning's
    StochasticWeightAveraging and the module has BatchNorm"), global_step 0."""
    plain_trainer, plain, _ = _swa_fit(False, max_steps, accumulate)
    trainer, module, analyzer = _swa_fit(True, max_steps, accumulate)
    assert trainer.global_step == plain_trainer.global_step == max_steps
    assert analyzer.tracker is not None and analyzer.tracker.ledger.steps == max_steps
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), plain.net.parameters()))
    with pytest.raises(ValueError, match="StochasticWeightAveraging and the module has BatchNorm"):
        _swa_fit(True, max_steps + 1, accumulate)


# -- 2. bfloat16's own rounding, and the less precise side of a difference -----------------------------------------
def test_bfloat16_values_are_rounding_up_to_rounding_units_of_bfloat16_eps_and_a_spread_beyond_is_an_interval():
    """bfloat16 values 1 and 1 + k·2**-7 (k bfloat16 ulps at 1; the largest magnitude 1 + k·2**-7): a spread of
    k ulps is rounding while k·2**-7 <= ROUNDING_UNITS · 2**-7 · (1 + k·2**-7), i.e. up to k = ROUNDING_UNITS and one
    more, and a defined interval two ulps beyond. The eps read is bfloat16's own (torch.finfo: 2**-7), not float32's
    nor half of it.

    Coverage: HEAD reads it so (before 13e21c4 the tensor was widened to float32, eps 2**-23, and every spread here
    was an interval); test_stats45 passed with bfloat16's eps halved (2**-8) or ROUNDING_UNITS at 64, this fails."""
    eps = torch.finfo(torch.bfloat16).eps
    assert eps == 2.0 ** -7
    for k, rounding in ((ROUNDING_UNITS // 2, True), (ROUNDING_UNITS, True), (ROUNDING_UNITS + 3, False)):
        values = torch.tensor([1.0, 1.0, 1.0 + k * eps, 1.0 + k * eps], dtype=torch.bfloat16)
        assert float(values[2]) == 1.0 + k * eps  # (exact in bfloat16)
        got = mean_interval(values)
        assert got.defined is not rounding, (k, got.why)
        assert got.estimate == 1.0 + k * eps / 2
    # (2**-8, half bfloat16's eps, would call 16 ulps at 1 an interval: the bound above is at 16 of 2**-7)


def test_a_difference_of_a_float32_side_and_a_float64_side_is_judged_by_float32_rounding():
    """Measured float32 sums and the float64 sums of the same float32 cells (exactly equal in rationals up to the
    float32 rounding of the measured side): the differences are float32 rounding alone, and the interval is
    undefined ("up to rounding") whichever side is the float32 one; 1e-2 added is defined.

    Coverage: HEAD judges them so (before 13e21c4 the differences were read with float64's eps and had an
    interval); test_stats45 passed with the smaller of the two sides' eps taken, this fails."""
    g = torch.Generator().manual_seed(1)
    cells = torch.rand(12, 40, generator=g, dtype=torch.float64).float() * 100
    low, high = cells.sum(dim=1), cells.double().sum(dim=1)
    assert bool((low.double() != high).any())
    for measured, control in ((low, high), (high, low)):
        got = difference_interval(measured, control)
        assert not got.defined and "up to rounding" in got.why
    assert difference_interval(low.double() + torch.linspace(0.01, 0.1, 12, dtype=torch.float64), high).defined


# -- 3. the sketched check's magnitude carried through a step and a state_dict ---------------------------------------
@pytest.mark.parametrize("kind", ["momentum", "adam"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_sketched_run_after_a_cancelling_step_keeps_its_magnitude_through_commit_and_a_state_dict(kind, resume):
    """A float32 sketched step whose examples' gradients cancel (test_sketch45's batch: per-example sketches about
    1000x their sums), then, in the same tracker or in a new one loaded from its state_dict, a step whose every
    example's gradient is tiny (targets 1e-6 off the outputs): the state still holds the first step's float32 rounding
    (relative to its examples' norms, about 4e-8), far above 1e-5 of the second step's own sums, and only the
    magnitude carried from the first step (SketchedRoute.magnitude) covers it. Both steps are recorded.

    Coverage: HEAD carries the magnitude; a fault injected into it (magnitude not committed, not saved, or not loaded)
    refused the second step ("does not add up to the sketch of the optimizer's total", gap 3.6e-08 at scale 1.5e-03),
    and test_sketch45 passed with each of those faults."""
    from test_sketch45 import _cancelling_batch, _loss, _setup

    from genkernel.core.tracking.step import OptimizerStep
    from genkernel.core.tracking.tracker import PathKernelTracker

    model, optimizer, probes, tracker = _setup(kind, 0)
    inputs, targets, groups = _cancelling_batch(model, 1e-3)
    tracker.track(OptimizerStep(model, optimizer, _loss, inputs, targets, None, micro_batches=2), groups)
    if resume:
        state = tracker.state_dict()
        tracker = PathKernelTracker(model, optimizer, _loss, probes, num_groups=2, group_state="sketched", sketch_dim=64)
        tracker.load_state_dict(state)
    inputs = torch.randn(8, 3)
    with torch.no_grad():
        targets = model(inputs) + 1e-6 * torch.randn(8, 2)
    tracker.track(OptimizerStep(model, optimizer, _loss, inputs, targets, None, micro_batches=2), torch.arange(8) % 2)
    assert tracker.ledger.steps == 2
    assert float(tracker.route.magnitude.min()) > 1e3 * float(tracker.route.state.norm())
