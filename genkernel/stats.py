"""Every interval genkernel and its recipes report, computed one way and returned as one type.

- :func:`mean_interval`: Student-t interval of a mean (right at small n, where a normal z is
  too narrow), optionally over clusters: when several values share a unit (probes in one group,
  steps of one seed), the unit means are the independent values.
- :func:`difference_interval`: the paired "measured minus control" difference, with several
  controls per unit averaged first.
- :func:`crossed_interval`: the mean over rows (samples) that share random columns (the training
  inputs they are compared with): the rows' variance plus a delete-one-column jackknife.
- :func:`bootstrap_interval`: ``scipy.stats.bootstrap`` (BCa by default, percentile on request)
  for statistics without a closed-form interval.
- :func:`proportion_interval`: Wilson score interval of a proportion (``scipy.stats.binomtest``).

Non-finite values are dropped and counted in ``dropped``; an interval that cannot be computed
(fewer than two independent values, or values without any spread beyond rounding: the standard error
is then unknown, not zero) has ``low = high = NaN`` and a ``why`` that says which, and
:meth:`Interval.above` and :meth:`Interval.below` are then False: "not shown", never "held".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import scipy.stats


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval.

    Attributes:
        estimate: the statistic on the data.
        low, high: the interval's ends (NaN where it is undefined).
        n: the number of independent values it rests on (clusters, when clustered).
        confidence: the nominal coverage, e.g. 0.95.
        method: "student-t", "bootstrap-bca", "bootstrap-percentile" or "wilson".
        dropped: non-finite values left out.
        why: for an undefined interval (NaN ends), why it could not be computed; None for a defined one.
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float
    method: str
    dropped: int = 0
    why: str | None = None

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def above(self, value: float = 0.0) -> bool:
        """True when the whole interval lies above ``value``."""
        return self.defined and self.low > value

    def below(self, value: float = 0.0) -> bool:
        """True when the whole interval lies below ``value``."""
        return self.defined and self.high < value

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (non-finite as None), for JSON; ``why`` only where the interval is undefined."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
                if k != "why" or v is not None}


def _finite(values: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """(values as float64, mask of the finite ones, the eps of the dtype they came in: :func:`_float64`)."""
    a, eps = _float64(values)
    a = a.reshape(-1)
    return a, np.isfinite(a), eps


# Unit means that differ by at most this many units of rounding (the eps of the values' dtype times the largest
# finite magnitude of what they were formed from here: the values, or a difference's two sides) have no spread to
# estimate a standard error from: a statistic whose unit means are equal by construction (the GAN interaction with
# two probe groups: each group's mean is the other's, 1 - x - (1 - y) against y - x) came out with a t-interval
# 1e-15 wide around its estimate, or NaN, by rounding alone. Its two unit means differ by at most 1.8 such units
# (200 random share matrices, tests/test_edges44.py), and a unit mean formed here adds at most log2(values) more
# (numpy's pairwise sum): 16 units is that with room. It was 64, which in float32 (eps 1.2e-7) called a real spread
# of 6e-6 of the values' magnitude rounding: float32 values near 1000 spread over 5e-3, 80 float32 ulps apart, had
# no interval (tests/test_stats45.py). (Unit means of random data differ by 5e11 such units and more.)
ROUNDING_UNITS = 16


def _rounding(finite: np.ndarray, eps: float) -> float:
    """The rounding scale of values formed from ``finite`` (float64, the finite ones): ``eps`` (their dtype's,
    :func:`_float64`) times the largest magnitude among them; 0 when there are none."""
    return eps * float(np.abs(finite).max()) if finite.size else 0.0


def _float64(values: Any) -> tuple[np.ndarray, float]:
    """(``values`` as a float64 array, the eps of the dtype they came in: float64's for integers, booleans and
    Python numbers, bfloat16's for a bfloat16 tensor, which numpy cannot hold and is widened exactly)."""
    a = np.asarray(_numpy(values))  # (a bfloat16 tensor arrives widened to float32: its eps is read before)
    if str(getattr(values, "dtype", "")) == "torch.bfloat16":
        eps = 2.0 ** -7
    else:
        eps = float(np.finfo(a.dtype).eps) if a.dtype.kind == "f" else float(np.finfo(np.float64).eps)
    return a.astype(np.float64, copy=False), eps


def _numpy(values: Any) -> Any:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":  # numpy has no bfloat16: widen (exactly) first
            values = values.float()
        return values.numpy()
    return values


def _cluster_labels(clusters: Any, n: int) -> np.ndarray:
    """``[n]`` cluster labels, refused when missing (NaN, None) or of the wrong count."""
    labels = np.asarray(_numpy(clusters)).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"clusters needs one label per value: {n} values, {labels.shape[0]} labels")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError("clusters contains NaN or infinite labels: give every value the id of its unit")
    if labels.dtype.kind == "O" and any(label is None for label in labels):
        raise ValueError("clusters contains None labels: give every value the id of its unit")
    return labels


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def mean_interval(values: Any, *, confidence: float = 0.95, clusters: Any | None = None) -> Interval:
    """Student-t interval of the mean of the finite ``values``.

    Args:
        values: a sequence, array or tensor of numbers.
        confidence: nominal coverage.
        clusters: optional labels, one per value: values with the same label are one unit. The
            interval is then over the unit means (n = number of units), and the estimate is the
            mean of the unit means. Labels must not be NaN or None.

    Returns:
        :class:`Interval` (``method="student-t"``); undefined (NaN ends, with a ``why``) with fewer than
        two independent values, or when they are all equal, or equal up to rounding (their spread at most
        :data:`ROUNDING_UNITS` times the values' eps times their largest magnitude).
    """
    _check_confidence(confidence)
    a, keep, eps = _finite(values)
    return _t_interval(a, keep, _rounding(a[keep], eps), confidence, clusters)


def _t_interval(a: np.ndarray, keep: np.ndarray, rounding: float, confidence: float, clusters: Any | None) -> Interval:
    """:func:`mean_interval` of the float64 values ``a`` (``keep``: the finite ones) whose rounding scale is
    ``rounding`` (:func:`_rounding` of what they were formed from). Returns the :class:`Interval`."""
    dropped = int((~keep).sum())
    units = "values"
    if clusters is not None:
        labels = _cluster_labels(clusters, a.shape[0])[keep]
        a = a[keep]
        a = np.array([a[labels == u].mean() for u in np.unique(labels)], dtype=np.float64)
        units = "cluster means"
    else:
        a = a[keep]
    n = int(a.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence, "student-t", dropped,
                        f"no finite values ({dropped} dropped)")
    mean = float(a.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, n, confidence, "student-t", dropped,
                        f"1 independent value ({units}): a t-interval needs at least 2")
    spread = float(a.max() - a.min())
    if spread <= ROUNDING_UNITS * rounding:
        # No spread: the standard error is unknown, not 0. A zero-width interval here would claim
        # certainty, e.g. five 0/1 outcomes that all came out 1 (p = 0.9: 59 % of the time); one as
        # narrow as the rounding of the values is the same claim.
        what = "all equal" if spread == 0 else f"equal up to rounding (spread {spread:.3g})"
        return Interval(mean, math.nan, math.nan, n, confidence, "student-t", dropped,
                        f"the {n} independent {units} are {what}: no spread to estimate a standard error from")
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(a.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence, "student-t", dropped)


def difference_interval(measured: Any, controls: Any, *, confidence: float = 0.95, clusters: Any | None = None) -> Interval:
    """Paired "measured minus control": per value, measured minus the mean of its controls, then
    :func:`mean_interval` of those differences.

    Args:
        measured: ``[n]`` values.
        controls: ``[n]`` or ``[k, n]`` (k control replicates of every value, e.g. k permutations).
        clusters: as for :func:`mean_interval`.

    Returns:
        :class:`Interval` as :func:`mean_interval` gives it for the differences, except that their rounding is
        read from the two sides (their dtypes' eps times the largest magnitude among them): differences of sides
        equal up to their rounding have no spread, however small the differences themselves.
    """
    _check_confidence(confidence)
    m, eps_m = _float64(measured)
    c, eps_c = _float64(controls)
    m = m.reshape(-1)
    if c.ndim == 1:
        c = c[None]
    if c.ndim != 2 or c.shape[1] != m.shape[0]:
        raise ValueError(f"controls must be [{m.shape[0]}] or [k, {m.shape[0]}], got {tuple(c.shape)}")
    if c.shape[0] == 0:  # (no control replicate: no difference is defined; NumPy's mean of none warned)
        diff = np.full_like(m, np.nan)
    else:
        with np.errstate(invalid="ignore"):
            diff = m - c.mean(axis=0)
    keep = np.isfinite(diff)
    # The differences carry the rounding of their two sides, not their own: float32 sides near 1000 that agree up
    # to their float32 rounding differ by 1e-4, which read against the difference's float64 eps was a spread 1e11
    # roundings wide, and an interval of rounding alone came out defined.
    sides = np.concatenate([m[keep], c[:, keep].reshape(-1)])
    rounding = _rounding(sides[np.isfinite(sides)], max(eps_m, eps_c))
    return _t_interval(diff, keep, rounding, confidence, clusters)


def crossed_interval(
    row_values: Any, column_estimates: Any, *, estimate: float | None = None, confidence: float = 0.95,
) -> Interval:
    """Student-t interval of a mean over the rows of a rows × columns design in which the columns are random
    too (samples × the training inputs they are compared with): the rows share every column, so the row
    values are independent only given the columns, and a t-interval over them misses the columns' spread.

    The variance is the rows' s²/R plus the delete-one-column jackknife variance (N − 1)/N Σ (θ₋ₙ − θ̄)²
    (Owen's crossed random-effects bound: it counts the interaction twice, so it errs wide); the degrees of
    freedom are min(R, N) − 1 (Welch-Satterthwaite's plug-in degrees missed 12 % at a nominal 5 % with two rows).

    Args:
        row_values: ``[R]`` per-row values of the full design (non-finite ones dropped and counted).
        column_estimates: ``[N]`` the statistic with column n left out (θ₋ₙ, the mean over rows of the row
            values recomputed without column n); every one must be finite.
        estimate: the statistic on the full design (default: the mean of the finite row values).

    Returns:
        :class:`Interval` (``method="crossed-jackknife-t"``, ``n = min(R, N)``); undefined (NaN ends) with
        fewer than two finite rows, fewer than three columns, a non-finite θ₋ₙ, or no spread at all.
    """
    _check_confidence(confidence)
    a, keep, _ = _finite(row_values)
    dropped = int((~keep).sum())
    a = a[keep]
    c = np.asarray(_numpy(column_estimates), dtype=np.float64).reshape(-1)
    rows, columns = int(a.size), int(c.size)
    mean = float(a.mean()) if rows else math.nan
    estimate = mean if estimate is None else float(estimate)
    n = min(rows, columns)
    why = (f"{rows} finite row(s): the interval needs at least 2" if rows < 2 else
           f"{columns} column(s): the jackknife needs at least 3" if columns < 3 else
           "a column's leave-one-out estimate is not finite" if not np.isfinite(c).all() else
           "the estimate is not finite" if not math.isfinite(estimate) else None)
    if why is not None:
        return Interval(estimate, math.nan, math.nan, n, confidence, "crossed-jackknife-t", dropped, why)
    v_rows = float(a.var(ddof=1)) / rows
    v_columns = (columns - 1) / columns * float(((c - c.mean()) ** 2).sum())
    variance = v_rows + v_columns
    if not variance > 0:  # no spread: the standard error is unknown, not 0 (as in mean_interval)
        return Interval(estimate, math.nan, math.nan, n, confidence, "crossed-jackknife-t", dropped,
                        "no spread in the rows or the columns: the standard error is unknown")
    # min(R, N) − 1 degrees of freedom: Welch-Satterthwaite's, from the two parts' estimated variances, missed the
    # mean 12 % of the time (nominal 5 %) with 2 rows and 50 columns of equal spread, 7.5 % with 50 rows and 3 columns:
    # a part with few degrees of freedom that happens to come out small also makes the plug-in degrees large.
    df = n - 1
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(variance)
    return Interval(estimate, estimate - half, estimate + half, n, confidence, "crossed-jackknife-t", dropped)


def two_way_interval(values: Any, clusters: Any, other_clusters: Any, *, confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of ``values``' cluster means (:func:`mean_interval` with ``clusters``) when the
    values are dependent along a second, crossed grouping too (``other_clusters``): a per-probe difference of two
    partitions' statistics (the GAN analyzer's geometry minus spatial) shares its geometry group's source columns
    and its spatial group's. Clustered by one grouping alone, the other's dependence is missed: with the traffic
    driven by the probes' spatial groups, geometry minus spatial clustered by geometry group held 11.9 ± 1.0 % of
    1000 null windows at a nominal 2.5 % (4 groups of each, 16 probes).

    Two-way clustered variance (Cameron, Gelbach and Miller 2011) from delete-one-group jackknives of the estimate:
    V = V_clusters + V_other − V_cells (cells: values sharing both labels), and at least the larger one-way part
    (the sum can come out below it, or negative; floored at V_clusters alone, the null above held 4.1 %): V_clusters
    is the cluster means' s²/R of :func:`mean_interval`, so the interval is never narrower than the one clustered by
    ``clusters`` alone, and is that one when ``other_clusters`` equals ``clusters``. Degrees of freedom
    min(R, S) − 1 (n = min(R, S)), as :func:`crossed_interval`. A group deleted with every value of a cluster drops
    that cluster from the mean. Non-finite values are dropped and counted; undefined (NaN ends) with fewer than 2
    clusters, fewer than 2 other groups, or no spread beyond rounding (the unit means of both groupings within
    :data:`ROUNDING_UNITS` roundings of the values, as in :func:`mean_interval`).
    """
    _check_confidence(confidence)
    a, keep, eps = _finite(values)
    dropped = int((~keep).sum())
    first = _cluster_labels(clusters, a.shape[0])[keep]
    second = _cluster_labels(other_clusters, a.shape[0])[keep]
    a = a[keep]
    _, first = np.unique(first, return_inverse=True)
    _, second = np.unique(second, return_inverse=True)
    r = int(first.max()) + 1 if a.size else 0
    s = int(second.max()) + 1 if a.size else 0

    def estimate_without(mask: np.ndarray) -> float:
        means = [a[mask & (first == u)].mean() for u in range(r) if (mask & (first == u)).any()]
        return float(np.mean(means)) if means else math.nan

    def jackknife(labels: np.ndarray) -> float:
        groups = np.unique(labels)
        theta = np.array([estimate_without(labels != g) for g in groups], dtype=np.float64)
        k = groups.size
        return (k - 1) / k * float(((theta - theta.mean()) ** 2).sum()) if np.isfinite(theta).all() else math.nan

    estimate = estimate_without(np.ones(a.size, dtype=bool))
    n = min(r, s)

    def undefined(why: str) -> Interval:
        return Interval(estimate, math.nan, math.nan, n, confidence, "two-way-jackknife-t", dropped, why)

    if r < 2 or s < 2:
        return undefined(f"{r} cluster(s) and {s} other group(s) with finite values: the interval needs at least 2 "
                         "of each")
    rows = np.array([a[first == u].mean() for u in range(r)], dtype=np.float64)
    v_first = float(rows.var(ddof=1)) / r
    v_second = jackknife(second)
    v_cells = jackknife(first * s + second)
    variance = max(v_first + v_second - v_cells, v_first, v_second)
    if not math.isfinite(variance):
        return undefined("a leave-one-group-out estimate is not finite")
    columns = np.array([a[second == v].mean() for v in range(s)], dtype=np.float64)
    if not variance > 0 or max(np.ptp(rows), np.ptp(columns)) <= ROUNDING_UNITS * _rounding(a, eps):
        # (as in mean_interval, on the unit means of each grouping: a standard error compared with the rounding
        # instead called a real spread rounding where mean_interval of the same clusters had an interval, the
        # standard error being the spread over about sqrt(clusters))
        return undefined("no spread beyond rounding between the clusters or the other groups: the standard error "
                         "is unknown")
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(variance)
    return Interval(estimate, estimate - half, estimate + half, n, confidence, "two-way-jackknife-t", dropped)


def bootstrap_interval(
    values: Any,
    statistic: Callable[..., float] = np.mean,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    method: str = "BCa",
    paired: Sequence[Any] = (),
) -> Interval:
    """Bootstrap interval of ``statistic`` by ``scipy.stats.bootstrap``.

    Args:
        values: ``[n]`` (or ``[n, ...]``) data; rows with a non-finite entry are dropped.
        statistic: ``statistic(values, *paired) -> float`` (resampled together, rows paired).
        method: "BCa" (default) or "percentile".
        paired: further arrays with the same first dimension, resampled with ``values``.

    Undefined (NaN ends) below 3 rows, when no array varies, when the statistic takes one value on
    every resample, or when it is not finite on the data. At small n bootstrap intervals are
    too narrow (a 95 % BCa interval of a normal mean misses about 15 % of the time at n = 5, 6 %
    at n = 30): for a mean use :func:`mean_interval`.
    """
    _check_confidence(confidence)
    arrays = [np.asarray(_numpy(values), dtype=np.float64)] + [np.asarray(_numpy(p), dtype=np.float64) for p in paired]
    if any(a.ndim == 0 for a in arrays):
        raise ValueError("bootstrap_interval needs [n] or [n, ...] arrays, got a single number")
    n_total = arrays[0].shape[0]
    if any(a.shape[0] != n_total for a in arrays):
        raise ValueError("bootstrap_interval: every paired array needs the same number of rows as values")
    label = f"bootstrap-{method.lower()}"
    if n_total == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence, label, why="no values")
    keep = np.ones(n_total, dtype=bool)
    for a in arrays:
        keep &= np.isfinite(a.reshape(n_total, -1)).all(axis=1)
    arrays = [a[keep] for a in arrays]
    n = int(keep.sum())
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence, label, n_total - n,
                        f"no finite rows ({n_total} dropped)")
    estimate = float(statistic(*arrays))
    if n < 3 or all(np.all(a == a[0]) for a in arrays):  # nothing varies: no resampling spread
        return Interval(estimate, math.nan, math.nan, n, confidence, label, n_total - n,
                        f"{n} finite row(s): a bootstrap needs at least 3" if n < 3 else
                        "no array varies: no resampling spread")
    # Resample row indices: scipy's bootstrap treats every axis but the first of an [n, ...] array
    # as a batch of separate samples, so rows of several numbers are resampled as whole rows here.
    result = scipy.stats.bootstrap(
        (np.arange(n),), lambda rows: statistic(*(a[rows] for a in arrays)), vectorized=False,
        confidence_level=confidence, n_resamples=resamples, method=method, random_state=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    spread = result.bootstrap_distribution
    if not np.isfinite(estimate) or np.all(spread == spread[0]):
        # the statistic took one value on every resample (BCa is then NaN in scipy; the percentile
        # ends would be a zero-width [c, c]) or is not finite on the data: no interval, as above
        low = high = math.nan
    why = None if math.isfinite(low) and math.isfinite(high) else (
        "the statistic is not finite on the data" if not np.isfinite(estimate) else
        "the statistic took one value on every resample" if np.all(spread == spread[0]) else
        "scipy's bootstrap gave no finite interval")
    return Interval(estimate, low, high, n, confidence, label, n_total - n, why)


def nan_median(values: Any) -> float:
    """The median of the values that are not NaN (±inf kept), as numpy's ``nanmedian``: the mean of
    the two middle ones for an even count (torch's ``nanmedian`` takes the lower); NaN when none."""
    a = np.asarray(_numpy(values), dtype=np.float64).reshape(-1)
    return float(np.nanmedian(a)) if not np.isnan(a).all() else math.nan  # (all NaN: numpy warns)


def proportion_interval(successes: int, total: int, *, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion ``successes / total`` (``scipy.stats.binomtest``)."""
    _check_confidence(confidence)
    if not (isinstance(successes, (int, np.integer)) and isinstance(total, (int, np.integer))):
        raise TypeError(f"successes and total must be integers, got {successes!r} and {total!r}")
    if total < 0:
        raise ValueError(f"total must be a count (>= 0), got {total}")
    if total == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence, "wilson", why="no trials (total = 0)")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must lie in [0, total={total}], got {successes}")
    ci = scipy.stats.binomtest(int(successes), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / total, float(ci.low), float(ci.high), int(total), confidence, "wilson")


MIN_UNITS = 3  # a within-run interval over fewer independent units is not read as evidence
# The GAN analyzer's probe groups: a probe's shares over the source groups sum to one, so the groups' means are
# slightly correlated, and over three groups the interaction claim held 4.0-5.3 % of null runs at a nominal 2.5 %
# (2000 runs; four groups 2.7-3.9 %, eight 2.3 %; tests/test_gan_claims_few_groups.py)
MIN_PROBE_GROUPS = 4


def few_units(result: dict[str, Any], *, minimum: int = MIN_UNITS, units: str = "probe groups") -> dict[str, Any]:
    """``result`` (an interval as a dict with ``"n"`` and ``"held"``) with ``held`` False and a ``why``
    when it rests on fewer than ``minimum`` independent ``units`` (the GAN analyzer's probe groups, the diffusion
    analyzer's probe levels). With two probe groups the interaction statistic's two cluster means can be equal by
    construction (each group's column entry is the other's complement), which gives a zero-width interval: not
    evidence of anything; with two probe levels a t-interval has one degree of freedom. The interval is left as it
    is (:func:`mean_interval` leaves one of unit means equal up to rounding undefined, with a ``why`` that is kept
    after this one)."""
    n = result.get("n") or 0
    if n < minimum:
        why = f"{n} independent unit(s) ({units}); a within-run interval needs at least {minimum}"
        if result.get("why"):  # (an undefined interval's own reason, from Interval.as_dict: kept beside this one)
            why = f"{why}; {result['why']}"
        result = {**result, "held": False, "why": why}
    return result


__all__ = ["Interval", "MIN_PROBE_GROUPS", "MIN_UNITS", "bootstrap_interval", "crossed_interval", "difference_interval", "few_units",
           "mean_interval", "nan_median", "proportion_interval", "two_way_interval"]
