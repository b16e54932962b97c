"""The grouping layer: partitions of the training contributions and what is read from a ledger.

A *partition* assigns every training contribution of a step one of its groups (a noise-level
bin, a discriminator-geometry cluster, a class, one example, a permuted control label). A
tracker splits every step for several partitions of the same examples at once
(:class:`Partitions`): each partition keeps its own group state and its own ledger, and for each
Σ_{g∈π} u_{k,g} + u_rest = Δ_k, so the partitions' ledgers share their rest and residual.

Everything an analyzer reports about a grouping is computed here, once, from the ledger's own
formulas (docs/summaries.md):

- :func:`net_shares` share(x, g) = ⟨C(x, g), Δf(x)⟩ / ‖Δf(x)‖² and :func:`cancellation_ratio`
  κ(x) = Σ_g ‖C(x, g)‖ / ‖Δf(x)‖ (report them together);
- :func:`traffic_shares` T(x, g) / Σ_g T(x, g);
- :func:`coarsen` sums groups into coarser ones; :func:`average_by_probe_group` averages probes
  sharing a label (the noise × noise and coupling matrices); :func:`band_total` and
  :func:`own_share` read one number per probe from such a matrix;
- :func:`measured_minus_control` compares a statistic of the measured partition with the same
  statistic of control partitions on the same trajectory (:mod:`genkernel.stats`), whose labels
  :func:`permuted_labels` draws.

Every function is pure tensor arithmetic: nothing here touches a model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import torch

from ..stats import difference_interval, few_units, mean_interval

DEFAULT_PARTITION = "groups"
# A permutation control of a batch (or an observed micro-batch) of fewer than CONTROL_POOL_BELOW examples draws from its
# own labels and those of up to CONTROL_POOL examples before it (permuted_labels).
CONTROL_POOL = 64
CONTROL_POOL_BELOW = 8
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
ABS_BLOCK_BYTES = 4 * 2**20  # rows × columns that abs_row_sum takes at once


class Partitions:
    """Named partitions of the same training contributions, laid out as consecutive rows.

    Args:
        sizes: ``{name: number of groups}`` in order; the first partition is the primary one
            (``tracker.ledger``). An int G means one partition named ``"groups"``.
    """

    def __init__(self, sizes: int | Mapping[str, int]):
        if isinstance(sizes, Mapping):
            items = list(sizes.items())
        else:
            items = [(DEFAULT_PARTITION, sizes)]
        if not items:
            raise ValueError("give at least one partition: num_groups=G or num_groups={'name': G, ...}")
        for name, size in items:
            if not isinstance(name, str) or not name:
                raise TypeError(f"partition names must be non-empty strings, got {name!r}")
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"num_groups: partition {name!r} needs a positive int number of groups, got {size!r}")
        self.sizes: dict[str, int] = {name: int(size) for name, size in items}
        self.names: list[str] = list(self.sizes)
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, size in self.sizes.items():
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.total = offset

    @property
    def primary(self) -> str:
        return self.names[0]

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Partitions) and self.sizes == other.sizes

    def __repr__(self) -> str:
        return f"Partitions({self.sizes})"

    def check(self, groups: torch.Tensor | Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """Validate one step's group ids: ``{name: LongTensor[B]}`` (a Tensor for a single partition)."""
        if isinstance(groups, Mapping):
            missing = [n for n in self.names if n not in groups]
            extra = [n for n in groups if n not in self.sizes]
            if missing or extra:
                raise ValueError(
                    f"groups must give ids for exactly the partitions {self.names}; missing {missing}, unknown {extra}"
                )
            items = [(n, groups[n]) for n in self.names]
        elif len(self.names) == 1:
            items = [(self.primary, groups)]
        else:
            raise TypeError(f"this tracker splits {len(self.names)} partitions: pass groups as a dict {{name: LongTensor[B]}}")
        out = {}
        for name, ids in items:
            label = "groups" if len(self.names) == 1 else f"groups[{name!r}]"
            if not isinstance(ids, torch.Tensor) or ids.dtype not in INTEGER_DTYPES:
                kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise TypeError(f"{label} must be an integer Tensor of shape [{batch}] (group ids), got {kind}")
            if ids.shape != (batch,):
                raise ValueError(f"{label} must have one id per example, shape [{batch}], got {tuple(ids.shape)}")
            size = self.sizes[name]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
                where = "" if len(self.names) == 1 else f"partition {name!r}: "
                raise ValueError(
                    f"{where}group ids must lie in [0, {size}); got ids from {int(ids.min())} to {int(ids.max())}"
                )
            out[name] = ids.to(torch.long)
        return out

    def state_dict(self) -> dict[str, int]:
        return dict(self.sizes)


# -- shares, κ and traffic --------------------------------------------------------------------
def permuted_labels(labels: torch.Tensor, generator: torch.Generator, recent: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation control's labels ``[B]`` for a batch's ``labels [B]``: each example gets the label of another.

    Without ``recent``, a random permutation of the batch's own labels. ``recent`` (the labels of the examples before
    this batch or observed micro-batch, :func:`recent_labels`; the analyzers always pass theirs): a batch of fewer
    than ``CONTROL_POOL_BELOW`` examples draws its labels without replacement from those and its own, as a
    permutation of one example's labels is the identity (every control ledger the measured one) and of two, half the
    time; a larger one is permuted within itself, the same draw as without ``recent``."""
    pool = labels if recent is None or labels.numel() >= CONTROL_POOL_BELOW else torch.cat([recent.to(labels), labels])
    order = torch.randperm(pool.numel(), generator=generator)
    # (without a pool: labels[randperm(B)], the whole permutation)
    return pool[order[pool.numel() - labels.numel():].to(pool.device)]


def control_labels(labels: torch.Tensor, count: int, generator: torch.Generator, recent: torch.Tensor
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``count`` permutation controls' labels for a batch's ``labels`` (:func:`permuted_labels`, drawn in turn from
    ``generator``) and the recent labels the next batch draws beside its own (``recent`` as it is without controls)."""
    if count == 0:
        return [], recent
    return [permuted_labels(labels, generator, recent) for _ in range(count)], recent_labels(recent, labels)


def recent_labels(recent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The last ``CONTROL_POOL`` of ``recent`` followed by ``labels`` (on the CPU): what the next batch's
    :func:`permuted_labels` draws from beside its own."""
    return torch.cat([recent, labels.detach().cpu().long()])[-CONTROL_POOL:]


def _safe(values: torch.Tensor) -> torch.Tensor:
    """``values`` with zeros replaced by NaN (a ratio with a zero denominator is undefined)."""
    return torch.where(values > 0, values, torch.full_like(values, math.nan))


def abs_row_sum(rows: torch.Tensor) -> torch.Tensor:
    """``Σ_r |rows[r]|`` (shape ``rows.shape[1:]``), a block of columns at a time. The tracker's
    checks sum the magnitudes of its group rows every step; this way they make no temporary of the
    rows' size (R × P values: gigabytes for a large model), only a block that stays in cache: on
    CPU, 2x faster than one row at a time and 3x faster than ``rows.abs().sum(0)`` (measured,
    11 float64 rows of 3.6M)."""
    flat = rows.reshape(rows.shape[0], -1)
    total = torch.empty(flat.shape[1], dtype=rows.dtype, device=rows.device)
    step = max(1, ABS_BLOCK_BYTES // max(1, flat.shape[0] * flat.element_size()))
    for start in range(0, flat.shape[1], step):
        torch.sum(flat[:, start : start + step].abs(), dim=0, out=total[start : start + step])
    return total.view(rows.shape[1:])


def contiguous_rows(part: slice, shared: Sequence[int]) -> tuple[tuple[int, int], list[int]]:
    """``((first, stop), others)``: a partition's rows ``part`` with the ``shared`` rows that continue
    it, as one range to read together, and the shared rows left to add one at a time."""
    stop = part.stop
    others = list(shared)
    while others and others[0] == stop:
        others.pop(0)
        stop += 1
    return (part.start, stop), others


def rows_sum_and_size(rows: torch.Tensor, part: slice, shared: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_r rows[r], Σ_r |rows[r]|)`` over the rows of ``part`` and the single rows ``shared``
    (indices outside it), each of shape ``rows.shape[1:]``: what the ledger's checks compare a
    partition's total with, and the magnitudes its rounding is judged against. Shared rows that
    continue ``part`` are read with it as one slice; the others are added one at a time, so no
    row is copied."""
    (first, stop), shared = contiguous_rows(part, shared)
    block = rows[first:stop]
    total, size = block.sum(dim=0), abs_row_sum(block)
    for index in shared:
        total.add_(rows[index])
        size.add_(rows[index].abs())
    return total, size


def net_shares(contributions: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[M, G]`` ⟨C(x, g), Δf(x)⟩ / ‖Δf(x)‖² from ``contributions [M, G, d]`` and ``delta [M, d]``
    (NaN for probes whose output did not change)."""
    return torch.einsum("mgd,md->mg", contributions, delta) / _safe((delta * delta).sum(dim=1))[:, None]


def part_share(part: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[M]`` ⟨part(x), Δf(x)⟩ / ‖Δf(x)‖² for one ``[M, d]`` term (rest, residual, sketch error)."""
    return (part * delta).sum(dim=1) / _safe((delta * delta).sum(dim=1))


def cancellation_ratio(contributions: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[M]`` κ(x) = Σ_g ‖C(x, g)‖ / ‖Δf(x)‖ (NaN where the output did not change)."""
    return contributions.norm(dim=2).sum(dim=1) / _safe(delta.norm(dim=1))


def traffic_shares(traffic: torch.Tensor) -> torch.Tensor:
    """``[M, G]`` traffic normalized over groups per probe (rows sum to 1; NaN for no traffic)."""
    return traffic / _safe(traffic.sum(dim=1, keepdim=True))


# -- coarser views ----------------------------------------------------------------------------
def coarsen(contributions: torch.Tensor, mapping: torch.Tensor, num_new_groups: int) -> torch.Tensor:
    """``[M, G', ...]`` groups summed into coarser ones: old group g goes to ``mapping[g]``."""
    num_groups = contributions.shape[1]
    if isinstance(mapping, torch.Tensor) and (mapping.is_floating_point() or mapping.is_complex()
                                              or mapping.dtype == torch.bool):
        # (cast to long, 0.7 and 1.2 would silently go to groups 0 and 1)
        raise ValueError(f"mapping must hold integer group ids, got dtype {mapping.dtype}: pass mapping.long() of "
                         "whole ids")
    mapping = torch.as_tensor(mapping, dtype=torch.long, device=contributions.device)
    if mapping.shape != (num_groups,):
        raise ValueError(f"mapping needs one new id per group: shape [{num_groups}], got {tuple(mapping.shape)}")
    if mapping.numel() and (mapping.min() < 0 or mapping.max() >= num_new_groups):
        raise ValueError(f"mapping ids must lie in [0, {num_new_groups})")
    out = contributions.new_zeros((contributions.shape[0], num_new_groups, *contributions.shape[2:]))
    return out.index_add_(1, mapping, contributions)


def check_probe_groups(probe_groups: torch.Tensor, rows: int, num_groups: int) -> None:
    """ValueError unless ``probe_groups`` is ``[rows]`` of integer ids in [0, num_groups)."""
    if probe_groups.dim() != 1 or probe_groups.shape[0] != rows:
        raise ValueError(f"probe_groups must be [M] with one group id per row ({rows}), got {tuple(probe_groups.shape)}")
    if probe_groups.dtype.is_floating_point or probe_groups.dtype.is_complex or probe_groups.dtype == torch.bool:
        raise ValueError(f"probe_groups must hold integer group ids, got dtype {probe_groups.dtype}")
    if probe_groups.numel() and (int(probe_groups.min()) < 0 or int(probe_groups.max()) >= num_groups):
        raise ValueError(f"probe_groups must be group ids in [0, {num_groups}), got ids from {int(probe_groups.min())} "
                         f"to {int(probe_groups.max())}: a probe outside would be left out of every group's mean (or "
                         f"index another column); relabel the probes' groups 0..{num_groups - 1}")


def average_by_probe_group(values: torch.Tensor, probe_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[L, ...]`` mean of ``values [M, ...]`` over the probes of each label in [0, L) (entry-wise,
    ignoring NaN; NaN for labels without probes): the noise × noise matrix when labels are probe
    levels, the coupling matrix when they are the probes' own geometry groups."""
    check_probe_groups(probe_groups, values.shape[0], num_groups)
    out = torch.full((num_groups, *values.shape[1:]), math.nan, dtype=torch.float64)
    labels = probe_groups.to(values.device)
    for label in range(num_groups):
        rows = values[labels == label].to(torch.float64)
        if rows.shape[0]:
            out[label] = rows.nanmean(dim=0).cpu()
    return out


def band_mask(probe_groups: torch.Tensor, num_groups: int, band: int) -> torch.Tensor:
    """``[M, G]`` True where |g − group(probe)| <= band (ordered groups, e.g. noise-level bins)."""
    if band < 0:
        raise ValueError(f"band must be >= 0 groups, got {band}")
    g = torch.arange(num_groups, device=probe_groups.device)
    return (g[None, :] - probe_groups[:, None]).abs() <= band


def band_total(matrix: torch.Tensor, probe_groups: torch.Tensor, band: int) -> torch.Tensor:
    """``[M]`` Σ over the band around each probe's own group of ``matrix [M, G]`` (NaN rows stay NaN).
    ``probe_groups`` must be ``[M]`` integer ids in [0, G) (:func:`check_probe_groups`): one id would be
    broadcast to every probe, and an id outside would sum a band cut short."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be [M, G] (probes × groups), got {tuple(matrix.shape)}")
    check_probe_groups(probe_groups, matrix.shape[0], matrix.shape[1])
    mask = band_mask(probe_groups.to(matrix.device), matrix.shape[1], band).to(matrix.dtype)
    return (matrix * mask).sum(dim=1)


def band_covers(groups: torch.Tensor, band: int, num_groups: int) -> torch.Tensor:
    """Bool tensor shaped as ``groups``: whether the band of ``band`` groups around each group id holds all
    ``num_groups`` groups (nothing lies outside it, so its locality is the whole share, measured and control alike:
    :func:`band_locality` never holds it, overall or per level)."""
    return (groups - band <= 0) & (groups + band >= num_groups - 1)


def band_locality(
    traffic: torch.Tensor,
    share: torch.Tensor,
    control_traffic: Sequence[torch.Tensor],
    control_share: Sequence[torch.Tensor],
    probe_groups: torch.Tensor,
    band: int,
    num_groups: int,
    probe_level: torch.Tensor,
    level_bins: Sequence[tuple[Any, int]],
) -> dict[str, Any]:
    """Traffic and net-share locality of ``[M, G]`` share matrices (measured, and each control partition's):
    the share within ``band`` groups of each probe's own group, ``{"traffic", "share"}`` as "measured minus
    control" (:func:`measured_minus_control`, its interval over the probe levels' means) with ``"per_level"`` rows (probe level i, whose probes are
    ``probe_level == i``, at ``level_bins[i] = (level, group)``); without controls, the measured means only.
    A band that holds all ``num_groups`` groups around every probe's own group leaves nothing outside it
    (measured and control are the whole share alike): never held, with the reason in ``"why"``; a level whose own
    band does (:func:`band_covers`) is never held in ``"per_level"`` either, its ``"why"`` naming the band that reads
    it. The
    diffusion analyzer's ``locality()`` and the saved-state summary both read it here."""
    traffic_band, share_band = band_total(traffic, probe_groups, band), band_total(share, probe_groups, band)
    covering = bool(band_covers(probe_groups, band, num_groups).all())
    why = (f"band={band} holds all {num_groups} bins around every probe's level: nothing lies outside it, so the "
           f"locality is the whole share for the measured and the control partitions alike (pass band <= "
           f"{num_groups - 2} with num_bins >= 3)") if covering else None
    out: dict[str, Any] = {}
    if not control_traffic:
        out["traffic"] = {"measured": float(traffic_band.nanmean())}
        out["share"] = {"measured": float(share_band.nanmean())}
        if why is not None:
            out["traffic"]["why"] = out["share"]["why"] = why
        return out
    traffic_c = torch.stack([band_total(t, probe_groups, band) for t in control_traffic])
    share_c = torch.stack([band_total(s, probe_groups, band) for s in control_share])
    # Clustered by probe level: probes at one level share its band of source bins and every training step, so they
    # are not independent (unclustered, the claims held 5.0 % of the time under a null of two controls, at a
    # nominal 2.5 %; the GAN analyzer's intervals are clustered by probe group likewise).
    # (a cluster per distinct level: probe_levels that list a level twice are one level, as the saved-state summary,
    # whose rows are the distinct levels, reads them)
    distinct = torch.unique(torch.tensor([float(level) for level, _ in level_bins], dtype=torch.float64),
                            return_inverse=True)[1]
    clusters = distinct[torch.as_tensor(probe_level, device="cpu", dtype=torch.long)]
    # (and not held on fewer than three levels: with two a t-interval has one degree of freedom, as the GAN analyzer's
    # intervals on fewer than three probe groups)
    out["traffic"] = few_units(measured_minus_control(traffic_band, traffic_c, clusters=clusters), units="probe levels")
    out["share"] = few_units(measured_minus_control(share_band, share_c, clusters=clusters), units="probe levels")
    if why is not None:
        for key in ("traffic", "share"):
            out[key] = {**out[key], "held": False, "why": why}
    # Per probe level: an average over levels can hide a sign flip between them. A level's probes share its draw of
    # every partition (the measured one and each control alike), so the replicates of the null at one level are the
    # control partitions, not its probes: the interval over its probes held at 46 % of levels under a null of
    # exchangeable partitions (nominal 2.5 %). The level's interval is the measured partition's level mean against
    # the spread of the controls' level means (between_partitions), not held on fewer than three controls.
    # A level whose own band holds all num_groups groups has nothing outside it either (its measured and control
    # totals are the whole share, equal but for rounding): never held, as the covering band above. (Its interval over
    # the partitions is then a rounding-sized one: band=4 of 6 bins, a level in bin 1 read traffic "held" with a
    # difference of 3.3e-16 and the interval [1.1e-17, 6.6e-16].)
    out["per_level"] = []
    for i, (level, group) in enumerate(level_bins):
        rows = probe_level == i
        entry = {"level": level, "bin": int(group),
                 "traffic": between_partitions(traffic_band[rows], traffic_c[:, rows]),
                 "share": between_partitions(share_band[rows], share_c[:, rows])}
        if bool(band_covers(torch.tensor(int(group)), band, num_groups)):
            widest = max(int(group), num_groups - 1 - int(group)) - 1  # (the widest band that leaves a bin outside)
            level_why = (f"band={band} holds all {num_groups} bins around this level's bin {int(group)}: nothing lies "
                         "outside it, so its locality is the whole share for the measured and the control partitions "
                         "alike (" + (f"pass band <= {widest} to read this level)" if widest >= 0 else
                                      "one bin: pass num_bins >= 2)"))
            for key in ("traffic", "share"):
                entry[key] = {**entry[key], "held": False, "why": level_why}
        out["per_level"].append(entry)
    return out


def between_partitions(measured: torch.Tensor, controls: torch.Tensor, *, confidence: float = 0.95,
                       minimum: int = 3) -> dict[str, Any]:
    """:func:`measured_minus_control` of probes that share one draw of every partition (e.g. one probe level's), with
    its interval over the partitions: the measured partition is one draw and the K control partitions' means (over
    the same probes) K more, exchangeable with it under the null, so measured − mean(controls) has the standard error
    s_c·sqrt(1 + 1/K) with K − 1 degrees of freedom (s_c: the controls' means' standard deviation). A control with no
    finite value here is left out; the rest, and the measured partition, are averaged over the same probes (those
    finite in all of them, the others counted in ``dropped``), so that the difference is the measured mean minus the
    controls' means' mean. Fewer than
    ``minimum`` controls, or no such probe: no interval, held False with a ``why``."""
    import scipy.stats

    measured = measured.to(torch.float64).reshape(-1)
    controls = controls.to(torch.float64)
    if controls.dim() == 1:
        controls = controls[None]
    kept = controls[torch.isfinite(controls).any(dim=1)]
    paired = torch.isfinite(measured) & torch.isfinite(kept).all(dim=0)
    k = int(kept.shape[0])
    out = {**measured_minus_control(measured[paired], kept[:, paired], confidence=confidence),
           "units": "control partitions", "n": k, "controls": int(controls.shape[0]),
           "dropped": int(measured.numel() - int(paired.sum()))}
    if k < minimum:
        return {**out, "interval": [math.nan, math.nan], "held": False,
                "why": f"{k} control partition(s) with a value at these probes: a level's probes share every "
                       f"partition's draw, so its interval is over the partitions and needs at least {minimum}"}
    if not bool(paired.any()):
        return {**out, "interval": [math.nan, math.nan], "held": False,
                "why": "no probe here has a finite value in the measured partition and in every control partition"}
    means = kept[:, paired].mean(dim=1)
    difference = out["difference"]
    spread = float(means.std(unbiased=True))
    if not spread > 0:
        return {**out, "interval": [math.nan, math.nan], "held": False,
                "why": "the control partitions' means are all equal: no spread to judge the difference by"}
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, k - 1)) * spread * math.sqrt(1 + 1 / k)
    return {**out, "interval": [difference - half, difference + half], "method": "between-partitions-t",
            "held": bool(difference - half > 0)}


def own_share(matrix: torch.Tensor, probe_groups: torch.Tensor) -> torch.Tensor:
    """``[M]`` each probe's entry for its own group, matrix[m, group(m)] (band 0)."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be [M, G] (probes × groups), got {tuple(matrix.shape)}")
    check_probe_groups(probe_groups, matrix.shape[0], matrix.shape[1])
    return matrix.gather(1, probe_groups.view(-1, 1).to(device=matrix.device, dtype=torch.long)).squeeze(1).to(torch.float64)


# -- measured minus control -------------------------------------------------------------------
def measured_minus_control(
    measured: torch.Tensor, controls: torch.Tensor, *, clusters: torch.Tensor | None = None, confidence: float = 0.95
) -> dict[str, Any]:
    """A per-probe statistic of the measured partition against the same statistic of control
    partitions on the same trajectory.

    Args:
        measured: ``[M]``.
        controls: ``[K, M]`` (K control partitions; ``[M]`` for one).
        clusters: optional ``[M]`` labels of probes that are not independent (the interval is
            then over cluster means, :func:`genkernel.stats.mean_interval`).

    Returns:
        ``{"measured", "control", "difference", "interval", "confidence", "n", "controls", "dropped",
        "method", "held"}``: the means, the paired difference's Student-t interval and ``held`` (the whole
        interval above zero). ``n`` counts the independent values the interval rests on (the clusters with
        a finite difference, when clustered) and ``dropped`` the probes left out because their measured
        value or their controls' mean is not finite (NaN: a probe whose output did not move, or without
        traffic); with ``clusters``, ``"clusters"`` is the number of distinct labels given and
        ``"clusters_dropped"`` how many of them had no finite difference at all and are in no mean. A
        dropped probe or cluster does not by itself refuse ``held``: the interval is over the clusters
        left (:func:`~genkernel.stats.few_units` judges whether they are enough), and the counts say
        what it is not over.
    """
    # (the interval reads the sides' rounding from their own dtype: a float32 ledger's shares converted first were
    # judged by float64's eps)
    interval = difference_interval(measured, controls if controls.dim() > 1 else controls[None], confidence=confidence,
                                   clusters=clusters)
    measured = measured.to(torch.float64)
    controls = controls.to(torch.float64)
    if controls.dim() == 1:
        controls = controls[None]
    control_mean = controls.mean(dim=0)
    # "measured" and "control" are averaged as "difference" is (its paired rows, by cluster when
    # clustered), so that difference = measured − control.
    paired = torch.isfinite(measured) & torch.isfinite(control_mean)
    sides = [mean_interval(side[paired], clusters=None if clusters is None else torch.as_tensor(clusters)[paired])
             .estimate if bool(paired.any()) else math.nan for side in (measured, control_mean)]
    out = {
        "measured": sides[0],
        "control": sides[1],
        "difference": interval.estimate,
        "interval": [interval.low, interval.high],
        "confidence": confidence,
        "n": interval.n,
        "controls": int(controls.shape[0]),
        # (the interval's own count: a NaN probe used to shrink n without a word)
        "dropped": int(interval.dropped),
        "method": interval.method,
        "held": interval.above(0.0),
    }
    if clusters is not None:
        labels = torch.as_tensor(clusters).detach().cpu().reshape(-1)
        out["clusters"] = int(torch.unique(labels).numel())
        out["clusters_dropped"] = out["clusters"] - int(interval.n)
    return out


__all__ = [
    "DEFAULT_PARTITION", "Partitions", "abs_row_sum", "average_by_probe_group", "band_mask", "band_total", "contiguous_rows",
    "cancellation_ratio", "coarsen", "measured_minus_control", "net_shares", "own_share", "part_share", "rows_sum_and_size",
    "traffic_shares",
]
