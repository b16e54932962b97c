"""genkernel.stats: one interval type, computed the way each statistic needs."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from genkernel.stats import Interval, bootstrap_interval, difference_interval, mean_interval, proportion_interval


def test_mean_interval_is_student_t_and_covers_at_small_n():
    values = [1.0, 2.5, 0.5, 3.0]
    got = mean_interval(values)
    low, high = scipy.stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert got.method == "student-t" and got.n == 4
    assert got.low == pytest.approx(low) and got.high == pytest.approx(high)
    # coverage at n = 4: the t interval keeps its 95 %, a normal-z interval (the old form) does not
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(4000, 4))
    covered = np.mean([mean_interval(s).low <= 0 <= mean_interval(s).high for s in samples[:1000]])
    z_half = 1.96 * samples.std(axis=1, ddof=1) / 2
    covered_z = np.mean(np.abs(samples.mean(axis=1)) <= z_half)
    assert covered > 0.93 and covered_z < 0.9


def test_undefined_intervals_never_hold():
    one = mean_interval([3.0, float("nan")])
    assert one.estimate == 3.0 and one.n == 1 and one.dropped == 1
    assert not one.defined and not one.above(0) and not one.below(10)
    empty = mean_interval(torch.tensor([float("nan")]))
    assert math.isnan(empty.estimate) and empty.n == 0
    assert empty.as_dict()["low"] is None  # JSON-ready: no NaN


def test_clusters_are_the_independent_units():
    # 64 values in 2 clusters: 2 independent units, not 64
    values = np.concatenate([np.full(32, 1.0), np.full(32, 3.0)]) + np.linspace(-0.01, 0.01, 64)
    labels = np.repeat([0, 1], 32)
    plain, clustered = mean_interval(values), mean_interval(values, clusters=labels)
    assert plain.n == 64 and clustered.n == 2
    assert clustered.high - clustered.low > 20 * (plain.high - plain.low)
    with pytest.raises(ValueError, match="one label per value"):
        mean_interval(values, clusters=labels[:3])


def test_difference_averages_the_controls_first():
    measured = torch.tensor([1.0, 2.0, 3.0, 4.0])
    controls = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    got = difference_interval(measured, controls)
    assert got.estimate == pytest.approx(0.5) and got.n == 4
    with pytest.raises(ValueError, match=r"\[k, 4\]"):
        difference_interval(measured, torch.zeros(2, 3))


def test_wilson_interval_is_scipys():
    got = proportion_interval(7, 20)
    ci = scipy.stats.binomtest(7, 20).proportion_ci(method="wilson")
    assert (got.low, got.high, got.estimate, got.method) == (pytest.approx(ci.low), pytest.approx(ci.high), 0.35, "wilson")
    assert proportion_interval(0, 0).n == 0
    with pytest.raises(ValueError, match=r"\[0, total=5\]"):
        proportion_interval(6, 5)
    with pytest.raises(TypeError, match="integers"):
        proportion_interval(0.5, 5)


def test_bootstrap_interval_uses_scipy_and_pairs_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = x + rng.normal(scale=0.5, size=60)
    got = bootstrap_interval(x, lambda a, b: float(np.corrcoef(a, b)[0, 1]), paired=(y,), seed=3)
    assert isinstance(got, Interval) and got.method == "bootstrap-bca"
    assert got.low < got.estimate < got.high and got.low > 0.6
    again = bootstrap_interval(x, lambda a, b: float(np.corrcoef(a, b)[0, 1]), paired=(y,), seed=3)
    assert again == got  # seeded
    constant = bootstrap_interval(np.ones(10))
    assert constant.estimate == 1.0 and not constant.defined
    with pytest.raises(ValueError, match="same number of rows"):
        bootstrap_interval(x, paired=(y[:5],))


def test_summaries_read_the_same_rows_and_the_usual_median():
    """measured − control as reported: its parts averaged as the difference is (paired rows, by
    cluster); κ's median of an even count is the middle two's mean; a residual with no probe that
    moved is no ratio (NaN), not 0."""
    from genkernel.core.grouping import measured_minus_control
    from genkernel.core.tracking.ledger import PathKernelLedger

    result = measured_minus_control(torch.tensor([1.0, 3.0, 5.0, 3.0], dtype=torch.float64),
                                    torch.zeros(4, dtype=torch.float64), clusters=torch.tensor([0, 0, 0, 1]))
    assert result["measured"] - result["control"] == pytest.approx(result["difference"])
    result = measured_minus_control(torch.tensor([2.0, 4.0], dtype=torch.float64),
                                    torch.tensor([0.0, float("nan")], dtype=torch.float64))
    assert (result["measured"], result["control"], result["difference"]) == (2.0, 0.0, 2.0)

    ledger = PathKernelLedger.empty(torch.zeros(2, 1, dtype=torch.float64), 2)
    ledger.contributions = torch.tensor([[[1.0], [-0.5]], [[3.0], [-1.0]]], dtype=torch.float64)
    ledger.traffic = ledger.contributions.abs().sum(-1)
    ledger.f_end = ledger.f_start + ledger.contributions.sum(1)
    ledger.steps = 1
    kappa = ledger.cancellation_ratio()
    assert bool(torch.isfinite(kappa).all()) and float(kappa[0]) != float(kappa[1])
    assert ledger.summary()["median_kappa"] == pytest.approx(float(np.median(kappa.numpy())))
    still = PathKernelLedger.empty(torch.zeros(2, 1, dtype=torch.float64), 2)
    still.residual = torch.tensor([[-1.0], [0.0]], dtype=torch.float64)
    still.steps = 1
    assert math.isnan(still.summary()["max_probe_relative_residual"])


def test_bootstrap_resamples_rows_of_several_numbers_whole():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    rows = np.stack([x, x + 1.0], axis=1)  # the difference is exactly -1 in every row
    interval = bootstrap_interval(rows, lambda v: float(v[:, 0].mean() - v[:, 1].mean()))
    assert interval.estimate == pytest.approx(-1.0) and interval.n == 40
