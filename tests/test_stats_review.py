"""Second review of genkernel.stats and the kernel statistics: each test checks a property against
a by-hand reference (coverage by simulation, explicit formulas, brute-force loops)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from genkernel.stats import bootstrap_interval, mean_interval, nan_median, proportion_interval


def test_no_spread_is_no_interval_not_certainty():
    # five 0/1 outcomes with p = 0.9 all come out 1 in 59 % of draws: a zero-width [1, 1] "95 %"
    # interval then misses p and claims "above 0.9"; scipy's own t interval at scale 0 is NaN
    rng = np.random.default_rng(0)
    covered = defined = 0
    for _ in range(400):
        interval = mean_interval(rng.binomial(1, 0.9, size=5).astype(float))
        if interval.defined:
            defined += 1
            covered += interval.low <= 0.9 <= interval.high
            assert interval.high > interval.low
    assert defined < 250 and covered == defined  # the defined ones (some spread) all cover here
    same = mean_interval([0.1, 0.1, 0.1])
    assert same.n == 3 and same.estimate == pytest.approx(0.1) and not same.defined
    assert not same.above(0.0) and not same.below(1.0)
    # clusters whose means are all equal: the same, over units
    units = mean_interval([1.0, 4.0, 2.0, 3.0], clusters=["a", "a", "b", "b"])
    assert units.n == 2 and not units.defined and not units.above(0.0)
    assert all(math.isnan(x) for x in scipy.stats.t.interval(0.95, 2, loc=0.1, scale=0.0))


def test_missing_cluster_labels_are_refused():
    # NaN labels made a NaN "unit" counted in n (n = 3 from 2 real units), None crashed in sorting
    with pytest.raises(ValueError, match="NaN or infinite labels"):
        mean_interval([1.0, 2.0, 3.0, 4.0], clusters=[0.0, math.nan, math.nan, 1.0])
    with pytest.raises(ValueError, match="None labels"):
        mean_interval([1.0, 2.0, 3.0, 4.0], clusters=["a", None, "b", "a"])


def test_bfloat16_tensors_are_read():
    values = torch.tensor([1.0, 2.0, 4.0]).bfloat16()
    got = mean_interval(values)
    low, high = scipy.stats.t.interval(0.95, 2, loc=7 / 3, scale=scipy.stats.sem([1.0, 2.0, 4.0]))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    assert nan_median(torch.tensor([1.0, 2.0, float("nan")]).bfloat16()) == 1.5


def test_bootstrap_and_wilson_edge_inputs():
    empty = bootstrap_interval([])
    assert empty.n == 0 and not empty.defined
    with pytest.raises(ValueError, match="single number"):
        bootstrap_interval(3.0)
    with pytest.raises(ValueError, match="count"):
        proportion_interval(-1, -5)


def test_kernel_distance_of_a_square_cross_kernel_is_not_symmetrized():
    from genkernel.analysis.kernel_stats import kernel_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4))
    x = rng.normal(size=(3, 4))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cross = a @ x.T  # 3 anchors × 3 other inputs: square, but not one set
    reference = np.linalg.norm(a[:, None] - x[None], axis=-1)
    with pytest.raises(ValueError, match="same_set=False"):
        kernel_distance(cross)  # the old code zeroed d(a_i, x_i) and averaged d(a_i, x_j) with d(a_j, x_i)
    assert np.allclose(kernel_distance(cross, same_set=False), reference, atol=1e-12)
    one_set = x @ x.T
    d = kernel_distance(one_set)
    assert np.allclose(d, np.linalg.norm(x[:, None] - x[None], axis=-1), atol=1e-7) and np.all(np.diag(d) == 0)


def test_centered_alignment_refuses_targets_of_another_shape():
    from genkernel.analysis.kernel_stats import centered_alignment

    rng = np.random.default_rng(1)
    features = rng.normal(size=(6, 3))
    gram = features @ features.T
    onehot = np.eye(3)[[0, 1, 2, 0, 1, 2]]  # [N, C]
    y_centered = onehot - onehot.mean(0)
    h = np.eye(6) - 1 / 6
    kc = h @ gram @ h
    reference = np.sum(kc * (y_centered @ y_centered.T)) / np.linalg.norm(kc) / np.linalg.norm(y_centered @ y_centered.T)
    assert centered_alignment(gram, onehot) == pytest.approx(reference, abs=1e-12)
    with pytest.raises(ValueError, match=r"\[N\] or \[N, d\]"):
        centered_alignment(gram, onehot.T)  # [C, N] was silently regrouped into [N, C] rows
    with pytest.raises(ValueError, match=r"\[N\] or \[N, d\]"):
        centered_alignment(gram, rng.normal(size=12))


def test_block_statistics_of_non_square_kernels_need_column_labels():
    from genkernel.analysis.kernel_stats import block_auc, within_between_gap

    k = np.random.default_rng(2).normal(size=(4, 1))
    for fn in (within_between_gap, block_auc):
        with pytest.raises(ValueError, match="pass col_labels"):
            fn(k, [0, 1, 0, 1])
        with pytest.raises(ValueError, match="pass col_labels"):
            fn(np.ones((2, 4)), [0, 1])


def test_block_auc_distance_ratio_is_infinite_when_same_label_pairs_coincide():
    from genkernel.analysis.kernel_stats import block_auc

    k = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    got = block_auc(k, [0, 0, 1])
    assert got.auc == 1.0 and got.distance_ratio == math.inf  # was 1.4e300


def test_bootstrap_with_constant_values_but_varying_paired_rows_is_defined():
    rng = np.random.default_rng(3)
    y = rng.normal(size=30)
    got = bootstrap_interval(np.zeros(30), lambda v, w: float(np.mean(w - v)), paired=(y,), method="percentile")
    assert got.defined and got.low < y.mean() < got.high  # was NaN: only the first array was looked at
    assert not bootstrap_interval(np.zeros(30), lambda v, w: 0.0, paired=(np.ones(30),)).defined


def test_percentile_bootstrap_of_a_statistic_without_resampling_spread_is_undefined():
    # varied data, but the statistic is the same on every resample: the percentile ends were a
    # zero-width [1, 1] that "held" above 0 (BCa was already NaN here)
    values = np.arange(10.0)
    for method in ("percentile", "BCa"):
        got = bootstrap_interval(values, lambda v: 1.0, method=method)
        assert got.estimate == 1.0 and not got.defined and not got.above(0.0)
    moving = bootstrap_interval(values, method="percentile")
    assert moving.defined and moving.low < 4.5 < moving.high
