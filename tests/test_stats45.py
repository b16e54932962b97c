"""genkernel.stats: what it reads as rounding (ROUNDING_UNITS), checked against exact rational references.

1. mean_interval called an interval undefined ("equal up to rounding") when the spread was within 64 x eps x the largest
   magnitude of the values: float32 values near 1000 spread over 5e-3 (80 float32 ulps, 5e-6 of the values) had no
   interval, though their exact (rational) t-interval is 2e-3 wide. The allowance is now 16 units (the share statistics
   equal by construction differ by at most 1.8 units: tests/test_edges44.py).
2. two_way_interval compared its standard error, not the units' spread, with the rounding: with other_clusters equal to
   clusters (documented to be mean_interval's interval) it was undefined where mean_interval was defined.
3. difference_interval read the rounding of the differences from the differences themselves (as float64): float32 sides
   that agree up to their own rounding (the same float32 cells summed in two orders) gave a defined interval of rounding
   alone; the exact sums are equal.
4. A bfloat16 tensor was widened to float32 before its eps was read: values one bfloat16 ulp apart (7.8e-3) were a
   defined interval, not rounding.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
import torch

from genkernel.stats import difference_interval, mean_interval, two_way_interval


def _exact_t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of ``values`` with the mean and the sample variance summed exactly in
    rationals (each float taken as the exact number it holds), rounded once at the end."""
    exact = [Fraction(float(v)) for v in values]
    n = len(exact)
    mean = sum(exact) / n
    variance = sum((v - mean) ** 2 for v in exact) / (n - 1)
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(variance) / math.sqrt(n)
    return float(mean), float(mean) - half, float(mean) + half


@pytest.mark.parametrize("offset", [1.0, 1000.0, 3.0e6])
def test_float32_values_with_a_common_offset_and_a_real_spread_have_their_exact_interval(offset):
    """Float32 values offset + d (d of spread 5e-6 of the offset: about 40 units of eps x magnitude, 80 ulps) have a
    defined interval equal to the exact rational t-interval of the same float32 numbers (to 1e-12 of the offset);
    clustered (3 values per unit) the same against the exact interval of the unit means.

    Fails on the old code: every one was "equal up to rounding" (64 units allowed)."""
    rng = np.random.default_rng(int(offset))
    for trial in range(20):
        n = 5 + trial % 7
        d = rng.permutation(np.linspace(0.0, 5e-6 * offset, n)) + rng.uniform(0.0, 1e-7 * offset, size=n)
        values = (offset + d).astype(np.float32)
        spread = float(values.max()) - float(values.min())
        assert spread >= 30 * np.finfo(np.float32).eps * float(np.abs(values).max())  # far above a few ulps
        mean, low, high = _exact_t_interval(values)
        got = mean_interval(values)
        assert got.defined and got.why is None, (offset, trial, got.why)
        for a, b in ((got.estimate, mean), (got.low, low), (got.high, high)):
            assert abs(a - b) <= 1e-12 * offset
        tensor = mean_interval(torch.from_numpy(values))  # a tensor reads the same
        assert (tensor.low, tensor.high) == (got.low, got.high)
    shifts = np.linspace(0.0, 5e-6 * offset, 6)[:, None] + rng.uniform(0.0, 1e-7 * offset, size=(6, 3))
    units = (offset + shifts).astype(np.float32)
    unit_means = [sum(Fraction(float(v)) for v in row) / 3 for row in units]
    mean, low, high = _exact_t_interval([float(m) for m in unit_means])
    got = mean_interval(units.reshape(-1), clusters=np.repeat(np.arange(6), 3))
    assert got.defined and abs(got.low - low) <= 1e-12 * offset and abs(got.high - high) <= 1e-12 * offset


def test_float32_values_a_few_ulps_apart_stay_rounding():
    """Values that differ by a few float32 ulps (at most 8: the rounding of a few operations) are still no spread,
    at every offset; as are unit means equal by construction up to that.

    Coverage: the old code (64 units) called these rounding too; this pins that the narrower allowance still does."""
    for offset in (1.0, 1000.0, 3.0e6):
        base = np.float32(offset)
        values = np.array([base, np.nextafter(base, np.float32(np.inf)), base,
                           base + 8 * np.spacing(base)], dtype=np.float32)
        got = mean_interval(values)
        assert not got.defined and "up to rounding" in got.why
        assert got.estimate == pytest.approx(float(np.mean(values.astype(np.float64))), rel=1e-15)


def test_two_way_interval_with_one_grouping_twice_is_mean_intervals_interval_for_float32_near_1000():
    """two_way_interval(v, c, c) is documented to be mean_interval(v, clusters=c): on float32 values near 1000 with a
    real spread (2e-2: 170 units) both are defined and agree to 1e-12, and both equal the exact interval of the unit
    means; data whose unit means are equal up to a few ulps are undefined in both.

    Fails on the old code: two_way_interval compared the standard error (the spread over about sqrt(clusters)) with
    the rounding and was undefined while mean_interval was defined."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(8), 3)
    values = (1000.0 + rng.normal(size=24) * 2e-2).astype(np.float32)
    one = mean_interval(values, clusters=labels)
    two = two_way_interval(values, labels, labels)
    assert one.defined and two.defined, two.why
    assert abs(one.low - two.low) <= 1e-12 * 1000 and abs(one.high - two.high) <= 1e-12 * 1000
    unit_means = [float(sum(Fraction(float(v)) for v in values[labels == u]) / 3) for u in range(8)]
    _, low, high = _exact_t_interval(unit_means)
    assert abs(two.low - low) <= 1e-10 and abs(two.high - high) <= 1e-10
    flat = np.full(24, np.float32(1000.0))
    flat[::5] = np.nextafter(np.float32(1000.0), np.float32(2000.0))
    assert not mean_interval(flat, clusters=labels).defined
    assert not two_way_interval(flat, labels, labels).defined and "rounding" in two_way_interval(flat, labels, labels).why


def test_difference_of_float32_sides_equal_up_to_their_rounding_has_no_interval():
    """Measured and control: the same float32 cells (values up to 100, 40 per probe) summed in two orders. Their exact
    sums are equal (the rational reference: every difference 0), so the float32 differences (about 1e-4) are
    rounding alone: the interval is undefined, and says so. A real difference (1e-2 added to the measured side) is
    defined and equals the exact interval of the same float64 differences.

    Fails on the old code: the differences' rounding was read from the differences themselves (float64 eps times
    1e-4), and an interval of rounding alone came out defined."""
    g = torch.Generator().manual_seed(0)
    cells = torch.rand(12, 40, generator=g, dtype=torch.float64).float() * 100
    measured = cells.sum(dim=1)
    control = cells.flip(1).cumsum(dim=1)[:, -1]
    assert bool((measured != control).any())  # the two orders round apart
    exact = [sum(Fraction(float(v)) for v in row) for row in cells]
    assert all(e - e == 0 for e in exact)  # (the rational sums do not depend on order: the true differences are 0)
    got = difference_interval(measured, control)
    assert not got.defined and "up to rounding" in got.why
    clustered = difference_interval(measured, torch.stack([control, control]), clusters=torch.arange(12) // 3)
    assert not clustered.defined and "up to rounding" in clustered.why
    shifted = measured + torch.linspace(0.0, 1e-1, 12)
    real = difference_interval(shifted, control)
    differences = (shifted.double() - control.double()).numpy()
    mean, low, high = _exact_t_interval(differences)
    assert real.defined and abs(real.low - low) <= 1e-12 and abs(real.high - high) <= 1e-12


def test_bfloat16_values_read_their_own_rounding():
    """bfloat16 values one bfloat16 ulp apart (1 and 1 + 2**-7) are rounding; 0.5 apart they have the exact interval.

    Fails on the old code: the tensor was widened to float32 before its eps was read, and one bfloat16 ulp
    (7.8e-3, 65000 float32 units) was a defined interval."""
    close = torch.tensor([1.0, 1.0 + 2 ** -7, 1.0, 1.0 + 2 ** -7], dtype=torch.bfloat16)
    got = mean_interval(close)
    assert not got.defined and "up to rounding" in got.why and got.estimate == 1.0 + 2 ** -8
    apart = torch.tensor([1.0, 1.5, 1.25, 2.0], dtype=torch.bfloat16)
    mean, low, high = _exact_t_interval([1.0, 1.5, 1.25, 2.0])
    got = mean_interval(apart)
    assert got.defined and abs(got.low - low) <= 1e-15 and abs(got.high - high) <= 1e-15


def test_measured_minus_control_reads_a_float32_ledgers_rounding_from_its_own_dtype():
    """grouping.measured_minus_control on the float32 sides above (the same cells summed in two orders: equal up to
    float32 rounding) has no interval and is not held; a real difference (0.05 to 0.1 added) is held.

    Fails on the old code: the sides were converted to float64 before the interval, and the float32 rounding alone
    gave a defined interval."""
    from genkernel.core.grouping import measured_minus_control

    g = torch.Generator().manual_seed(0)
    cells = torch.rand(12, 40, generator=g, dtype=torch.float64).float() * 100
    measured, control = cells.sum(dim=1), cells.flip(1).cumsum(dim=1)[:, -1]
    rounding = measured_minus_control(measured, control)
    assert not rounding["held"] and all(math.isnan(v) for v in rounding["interval"])
    shifted = measured + torch.linspace(0.05, 1e-1, 12)
    assert measured_minus_control(shifted, control)["held"]
