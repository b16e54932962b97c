"""Groups of generator contributions by the discriminator's gradient geometry (docs/gan.md, "Geometry groups").

A generator contribution is a latent z_i with weight w_i = ∇_x ℓ_G(D(x)) at x = G(z_i). A grouping
maps ``(z [B, k], x [B, ...], w [B, ...], scores [B])`` to group ids ``LongTensor[B]`` in
``[0, num_groups)``. Groupings that need data are fitted once on a reference batch (``fit``) and
then kept fixed, so a group means the same thing over the whole run.

- :class:`DirectionGroups`: k-means clusters of the normalized w_i.
- :class:`ModeGroups`: for mixtures, the real mode m maximizing cos(−w_i, μ_m − G(z_i)) (the mode
  the discriminator pushes the sample towards).
- :class:`NearestModeGroups`: the mode nearest to G(z_i) (where the sample is, not where it is pushed).
- :class:`MagnitudeGroups`: quantile bins of ‖w_i‖.
- :class:`ConfidenceGroups`: quantile bins of the score D(G(z_i)).
- :class:`LatentKMeansGroups`: k-means clusters of the latents z (ignores D and G: a spatial grouping
  to compare a geometry grouping with).
- :class:`FunctionGroups`: any user function of (z, x, w, scores).
- :class:`ClassGroups`: a conditional GAN's classes (example i in group y_i); the analyzer passes each
  example's class (``uses_classes``), so no geometry is read.

A fit refuses a reference batch with non-finite values, or one whose ties would leave a group empty by
construction (quantile bins), since the fit is kept for the whole run. An assignment is computed example by
example (an id never depends on the rest of the batch), refuses NaN inputs (a NaN has no nearest centre or
bin), and ids must be whole numbers: a fractional id is refused, never truncated.

:class:`NearestModeGroups` and :class:`LatentKMeansGroups` do not look at D: as the analyzer's
``comparison`` they measure how much coupling a grouping gets from the generator's smoothness alone
(nearby latents share a group and a kernel), which a discriminator-geometry grouping must exceed.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.adapter import positive_int


class GeometryGrouping:
    """Base class. Subclasses set ``num_groups`` and ``name`` and implement ``assign``."""

    num_groups: int = 1
    name: str = "geometry"
    fitted: bool = True
    uses_classes: bool = False  # True: called with classes=, a conditional GAN's LongTensor[B] (ClassGroups)
    # Whether the groups read the discriminator (its gradient w or its scores): such a grouping cannot be the
    # D-independent comparison of GANKernelAnalyzer(comparison=). None: not known (a user's function).
    reads_discriminator: bool | None = None

    def labels(self) -> list[str]:
        return [f"{self.name} {g}" for g in range(self.num_groups)]

    def fit(self, z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scores: torch.Tensor) -> "GeometryGrouping":
        """Fit on a reference batch (no-op by default). Returns self."""
        self.fitted = True
        return self

    def assign(self, z, x, w, scores) -> torch.Tensor:
        raise NotImplementedError

    def _ids(self, z, x, w, scores, classes) -> torch.Tensor:
        """The ids of a grouping that ``uses_classes`` (:class:`ClassGroups`)."""
        raise TypeError(f"{type(self).__name__} does not group by class: call it without classes=")

    def __call__(self, z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scores: torch.Tensor, *,
                 classes: torch.Tensor | None = None) -> torch.Tensor:
        """``LongTensor[B]`` group ids in ``[0, num_groups)`` (on the CPU); ``classes`` only for a grouping
        that ``uses_classes``."""
        if not self.fitted:
            raise _unfitted(type(self).__name__)
        raw = self.assign(z, x, w, scores) if classes is None else self._ids(z, x, w, scores, classes)
        ids = _integer_ids(raw, type(self).__name__).reshape(-1)
        if ids.shape[0] != z.shape[0]:
            raise ValueError(f"{type(self).__name__} returned {ids.shape[0]} group ids for {z.shape[0]} latents: return "
                             "one id per example, a LongTensor[B]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_groups):
            raise ValueError(
                f"{type(self).__name__} returned group ids from {int(ids.min())} to {int(ids.max())}; they must lie "
                f"in [0, {self.num_groups}) (num_groups={self.num_groups}): return ids in that range or raise num_groups"
            )
        return ids.cpu()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.fitted = True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` as ``[B, features]`` float64 on the CPU (``[B]`` as ``[B, 1]``; an empty batch too)."""
    return t.detach().reshape(t.shape[0], int(np.prod(t.shape[1:]))).to(torch.float64).cpu()


def _check_count(num_groups: int, name: str) -> int:
    return positive_int(num_groups, name)


def _integer_ids(raw: Any, who: str) -> torch.Tensor:
    """``raw`` group ids as a LongTensor. Integer and bool ids pass; floating ids only when every value is a
    whole number (a float id such as 0.7 would otherwise be truncated silently to a group it does not name)."""
    try:
        ids = raw.detach() if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{who} must return group ids as a LongTensor[B], got {type(raw).__name__}") from error
    if ids.is_complex():
        raise TypeError(f"{who} must return integer group ids (a LongTensor[B]), got dtype {ids.dtype}")
    if ids.is_floating_point():
        bad = ~torch.isfinite(ids) | (ids != torch.round(ids))
        if bool(bad.any()):
            value = float(ids[bad].reshape(-1)[0])
            raise TypeError(
                f"{who} returned floating group ids with non-integer values (e.g. {value!r}); ids are not rounded or "
                "truncated for you: return a LongTensor[B] of ids in [0, num_groups) (e.g. .long() after deciding how "
                "to round)"
            )
    return ids.to(torch.long)


def _check_seed(seed: Any) -> int:
    """A k-means seed: an int in [0, 2**32). ``None`` would draw from NumPy's global random state (training's)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32) (k-means is seeded so that a fit is reproducible and never "
                         f"draws from NumPy's global random state), got {seed!r}")
    return int(seed)


def _check_finite(values: torch.Tensor, who: str, what: str) -> None:
    """A reference batch must be finite: a NaN or inf would fix the groups (centres, bin edges) for the whole run."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = int(bad.reshape(values.shape[0], -1).any(dim=1).sum()) if values.dim() else 1
        raise ValueError(f"{who}: the reference batch has non-finite {what} (NaN or inf) in {rows} of "
                         f"{values.shape[0] if values.dim() else 1} examples; the groups are fitted once and kept for the "
                         "whole run, so fit on a batch where D and G are finite (e.g. reference_latents= at a sound θ)")


def _finite_rows(values: torch.Tensor, who: str, what: str, *, allow_inf: bool = False) -> torch.Tensor:
    """``values`` (``[B, ...]``), refused when a row holds a NaN (or an inf, unless ``allow_inf``: a quantile bin
    orders ±inf correctly). A NaN has no nearest centre, direction or bin: argmin and bucketize would put it in
    group 0 or in the top bin without a word."""
    bad = torch.isnan(values) if allow_inf else ~torch.isfinite(values)
    if bool(bad.any()):
        rows = bad.reshape(values.shape[0], -1).any(dim=1)
        raise ValueError(
            f"{who}: non-finite {what} ({'NaN' if allow_inf else 'NaN or inf'}) in {int(rows.sum())} of "
            f"{values.shape[0]} examples (first {torch.nonzero(rows).flatten()[:10].tolist()}): no group can be named "
            "for them. D or G has diverged at these samples; pass finite inputs"
        )
    return values


def _nearest(points: torch.Tensor, centers: torch.Tensor, who: str, what: str) -> torch.Tensor:
    """Index of each row's nearest centre, every row on its own (no matrix-product shortcut, which
    torch.cdist takes above 25 rows and which can move a near-tie with the batch's size or contents)."""
    if points.shape[1] != centers.shape[1]:
        raise ValueError(f"{who} was fitted on {centers.shape[1]}-D {what} but got {points.shape[1]}-D ones (flattened "
                         "per example): assign with the same kind of examples it was fitted on")
    return torch.cdist(points, centers, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)


def _loaded(value: Any, who: str, key: str, shape: tuple) -> torch.Tensor:
    """A saved tensor (centres, edges) back on the CPU in float64, with the shape this grouping needs."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{who}.load_state_dict: state[{key!r}] must be a Tensor, got {type(value).__name__}")
    value = value.detach().to(device="cpu", dtype=torch.float64)
    if value.dim() != len(shape) or any(n is not None and value.shape[i] != n for i, n in enumerate(shape)):
        want = "[" + ", ".join("*" if n is None else str(n) for n in shape) + "]"
        raise ValueError(f"{who}.load_state_dict: state[{key!r}] has shape {tuple(value.shape)}, this grouping needs "
                         f"{want}: load a state saved by a grouping with the same num_groups")
    return value


def _unfitted(who: str) -> RuntimeError:
    return RuntimeError(f"{who} must be fitted on a reference batch first (call .fit)")


class _KMeansGroups(GeometryGrouping):
    """k-means clusters of one per-example feature (sklearn KMeans, seeded), fitted once; a subclass names the
    feature (``what``: the input read, ``distinct``: what the fit counts) and reads it (``_features``)."""

    what = "inputs"
    distinct = "inputs"

    def __init__(self, num_groups: int = 8, *, seed: int = 0) -> None:
        self.num_groups = _check_count(num_groups, "num_groups")
        self.seed = _check_seed(seed)
        self.centers: torch.Tensor | None = None
        self.fitted = False

    def _raw(self, z, x, w) -> torch.Tensor:
        """The input the feature is made from, ``[B, features]`` float64 on the CPU."""
        raise NotImplementedError

    def _features(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def fit(self, z, x, w, scores):
        from ..core.adapter import forked_generators

        with forked_generators():  # (importing sklearn.cluster draws from Python's random: rich's style ids)
            from sklearn.cluster import KMeans

        who = type(self).__name__
        raw = self._raw(z, x, w)
        _check_finite(raw, who, self.what)
        features = self._features(raw).numpy()
        distinct = len(np.unique(np.round(features, 12), axis=0))
        if distinct < self.num_groups:
            raise ValueError(
                f"{who}: the reference batch has {distinct} distinct {self.distinct}, fewer than "
                f"num_groups={self.num_groups}: the groups cannot all be filled. Use a larger reference batch or "
                "fewer groups."
            )
        with forked_generators():
            km = KMeans(self.num_groups, n_init=4, random_state=self.seed).fit(features)
        self.centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float64)
        self.fitted = True
        return self

    def assign(self, z, x, w, scores):
        who = type(self).__name__
        if self.centers is None:
            raise _unfitted(who)
        features = self._features(_finite_rows(self._raw(z, x, w), who, self.what))
        return _nearest(features, self.centers, who, self.what)

    def state_dict(self):
        return {"centers": self.centers}

    def load_state_dict(self, state):
        self.centers = _loaded(state["centers"], type(self).__name__, "centers", (self.num_groups, None))
        self.fitted = True


class DirectionGroups(_KMeansGroups):
    """k-means clusters of the unit directions w_i / ‖w_i‖, fitted once (sklearn KMeans, seeded)."""

    name = "direction"
    reads_discriminator = True
    what = "gradients w"
    distinct = "gradient directions"

    def _raw(self, z, x, w) -> torch.Tensor:
        return _flat(w)

    def _features(self, raw: torch.Tensor) -> torch.Tensor:
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-300)


class ModeGroups(GeometryGrouping):
    """Real mode m maximizing cos(−w_i, μ_m − G(z_i)): where the discriminator sends the sample.

    Args:
        centers: ``[num_modes, dim]`` mode centres μ_m (samples must be ``[B, dim]``).
    """

    name = "pushed-to mode"
    reads_discriminator = True

    def __init__(self, centers: torch.Tensor) -> None:
        # samples are read on the CPU; a copy, so that changing the caller's tensor cannot move the groups
        centers = torch.as_tensor(centers).detach().to(device="cpu", dtype=torch.float64).clone()
        if centers.dim() != 2 or centers.shape[0] < 1 or centers.shape[1] < 1:
            raise ValueError(f"centers must be [num_modes, dim], got shape {tuple(centers.shape)}")
        if not bool(torch.isfinite(centers).all()):
            raise ValueError(f"{type(self).__name__}: the mode centres have non-finite values (NaN or inf): pass the real "
                             "mixture's finite mode centres [num_modes, dim]")
        self.centers = centers
        self.num_groups = centers.shape[0]

    def labels(self):
        return [f"mode {m}" for m in range(self.num_groups)]

    def assign(self, z, x, w, scores):
        x = _finite_rows(_flat(x), type(self).__name__, "samples x")
        w = _finite_rows(_flat(w), type(self).__name__, "gradients w")
        if x.shape[1] != self.centers.shape[1] or w.shape != x.shape:
            raise ValueError(f"ModeGroups has {self.centers.shape[1]}-D centres but samples are {x.shape[1]}-D and "
                             f"gradients w {w.shape[1]}-D (flattened per example): pass samples G(z) and their w of the "
                             "centres' dimension")
        to_mode = self.centers[None, :, :] - x[:, None, :]  # [B, M, dim]
        cos = torch.einsum("bmd,bd->bm", to_mode, -w) / (to_mode.norm(dim=2) * w.norm(dim=1, keepdim=True)).clamp_min(1e-300)
        return cos.argmax(dim=1)


class NearestModeGroups(ModeGroups):
    """The mode nearest to G(z_i)."""

    name = "nearest mode"
    reads_discriminator = False

    def assign(self, z, x, w, scores):
        x = _finite_rows(_flat(x), "NearestModeGroups", "samples x")
        return _nearest(x, self.centers, "NearestModeGroups", "mode centres and samples")


class LatentKMeansGroups(_KMeansGroups):
    """k-means clusters of the latents z (flattened), fitted once (sklearn KMeans, seeded).

    Neither D nor G enters: a grouping that is spatial in latent space, for comparison with a
    discriminator-geometry grouping of the same size on the same steps.
    """

    name = "latent cluster"
    reads_discriminator = False
    what = "latents z"
    distinct = "latents"

    def _raw(self, z, x, w) -> torch.Tensor:
        return _flat(z)


class _QuantileBins(GeometryGrouping):
    """Quantile bins of a scalar, edges fitted on the reference batch."""

    value_name = "values"

    def __init__(self, num_groups: int = 4) -> None:
        self.num_groups = _check_count(num_groups, "num_groups")
        self.edges: torch.Tensor | None = None
        self.fitted = False

    def value(self, z, x, w, scores) -> torch.Tensor:
        raise NotImplementedError

    def _values(self, z, x, w, scores) -> torch.Tensor:
        v = self.value(z, x, w, scores).contiguous()
        if v.shape != (z.shape[0],):
            raise ValueError(f"{type(self).__name__}: {v.numel()} values for {z.shape[0]} examples: pass one score per "
                             "example (scores [B]) and w [B, ...]")
        return v

    def fit(self, z, x, w, scores):
        who = type(self).__name__
        v = self._values(z, x, w, scores)
        _check_finite(v, who, self.value_name)
        levels = len(torch.unique(v))
        if levels < self.num_groups:
            raise ValueError(
                f"{who}: the reference batch's values have only {levels} distinct levels, "
                f"too few for {self.num_groups} quantile bins: some groups could never be filled. Use fewer groups."
            )
        qs = torch.linspace(0, 1, self.num_groups + 1, dtype=torch.float64)[1:-1]
        edges = torch.quantile(v, qs)
        # Bins are (e_{j-1}, e_j]: a tie at an edge goes to the lower bin, so a block of equal values (a saturated
        # D) can leave a bin empty on the very batch that fixed the edges: two equal edges, or a top edge at the
        # maximum.
        counts = torch.bincount(torch.bucketize(v, edges), minlength=self.num_groups)
        if bool((counts == 0).any()):
            empty = [int(g) for g in torch.nonzero(counts == 0).reshape(-1)]
            raise ValueError(
                f"{who}: with {self.num_groups} quantile bins the reference batch leaves bin(s) {empty} empty (tied values "
                f"at the bin edges {[round(float(e), 6) for e in edges]}; counts {counts.tolist()}): those groups would be "
                "empty by construction. Use fewer groups or a reference batch with fewer ties."
            )
        self.edges = edges
        self.fitted = True
        return self

    def assign(self, z, x, w, scores):
        if self.edges is None:
            raise _unfitted(type(self).__name__)
        v = _finite_rows(self._values(z, x, w, scores), type(self).__name__, self.value_name, allow_inf=True)
        return torch.bucketize(v, self.edges)

    def state_dict(self):
        return {"edges": self.edges}

    def load_state_dict(self, state):
        self.edges = _loaded(state["edges"], type(self).__name__, "edges", (self.num_groups - 1,))
        self.fitted = True


class MagnitudeGroups(_QuantileBins):
    """Quantile bins of ‖w_i‖ (how hard the discriminator pushes), low to high."""

    name = "|w| bin"
    reads_discriminator = True
    value_name = "gradient norms ‖w‖"

    def value(self, z, x, w, scores):
        return _flat(w).norm(dim=1)


class ConfidenceGroups(_QuantileBins):
    """Quantile bins of the score D(G(z_i)) (how real the sample looks to D), low to high."""

    name = "D(G(z)) bin"
    reads_discriminator = True
    value_name = "scores D(G(z))"

    def value(self, z, x, w, scores):
        return scores.detach().to(torch.float64).reshape(-1).cpu()


class FunctionGroups(GeometryGrouping):
    """A user function ``fn(z, x, w, scores) -> LongTensor[B]`` in ``[0, num_groups)``."""

    def __init__(self, fn: Callable, num_groups: int, *, name: str = "group", labels: Sequence[str] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(z, x, w, scores) -> LongTensor[B], got {type(fn).__name__}")
        _refuse_grouping_class(fn)
        self.fn = fn
        self.num_groups = _check_count(num_groups, "num_groups")
        self.name = name
        self._labels = list(labels) if labels is not None else None
        if self._labels is not None and len(self._labels) != self.num_groups:
            raise ValueError(f"labels has {len(self._labels)} names for {self.num_groups} groups")

    def labels(self):
        return self._labels or super().labels()

    def assign(self, z, x, w, scores):
        return self.fn(z, x, w, scores)


class ClassGroups(GeometryGrouping):
    """A conditional GAN's classes as groups: example i (a training latent or a probe) is in group y_i,
    ``num_groups = num_classes``. Called with ``classes=`` (``LongTensor[B]``), which
    :class:`~genkernel.gan.GANKernelAnalyzer` passes for ``grouping="class"`` (it needs
    ``probe_classes=``). No fit: a class means the same thing over the run."""

    name = "class"
    uses_classes = True
    reads_discriminator = False

    def __init__(self, num_classes: int) -> None:
        self.num_groups = _check_count(num_classes, "num_classes")

    def assign(self, z, x, w, scores):
        raise ValueError("ClassGroups groups by class: call it with classes= (GANKernelAnalyzer(..., probe_classes=, "
                         "grouping='class') does)")

    def _ids(self, z, x, w, scores, classes):
        return classes


def _refuse_grouping_class(spec: Any) -> None:
    """A GeometryGrouping class (not an instance) is callable too: it would be taken for fn(z, x, w, scores)."""
    if isinstance(spec, type) and issubclass(spec, GeometryGrouping):
        raise TypeError(f"got the class {spec.__name__}, not a grouping: pass an instance, e.g. {spec.__name__}(...) "
                        "with its arguments, or a name such as 'direction'")


GROUPINGS = {"direction": DirectionGroups, "mode": ModeGroups, "nearest_mode": NearestModeGroups,
             "magnitude": MagnitudeGroups, "confidence": ConfidenceGroups, "latent_kmeans": LatentKMeansGroups}


# The groups of a grouping that takes a count, where ``num_groups`` is not given.
DEFAULT_NUM_GROUPS = 8


def refuse_other_count(described: str, count: int, num_groups, also: str = "") -> None:
    """ValueError where a ``num_groups`` is given beside a grouping whose count is fixed (``count``; ``described``:
    "DirectionGroups has 4 groups", "'mode' has one group per mode centre (8 in mode_centers)") and differs from it
    (it was ignored, silently); ``also``: another fix, appended."""
    if num_groups is not None and (isinstance(num_groups, bool) or num_groups != count):
        raise ValueError(f"grouping {described}, but num_groups={num_groups!r}: leave num_groups out "
                         f"(or pass {count}){also}")


def make_grouping(spec, *, num_groups: int | None = None, centers: torch.Tensor | None = None,
                  seed: int = 0) -> GeometryGrouping:
    """A grouping from a name ("direction", "mode", "nearest_mode", "magnitude", "confidence", "latent_kmeans"), a
    :class:`GeometryGrouping`, or a callable ``fn(z, x, w, scores)`` (then ``num_groups`` is required).
    ``num_groups`` (default :data:`DEFAULT_NUM_GROUPS` for the groupings that take a count): "mode" and
    "nearest_mode" have one group per mode centre, and a ``num_groups`` other than the centres' count is refused
    (it was ignored: 4 asked, the centres' 8 given, silently)."""
    if isinstance(spec, GeometryGrouping):
        refuse_other_count(f"{type(spec).__name__} has {spec.num_groups} groups", spec.num_groups, num_groups)
        return spec
    _refuse_grouping_class(spec)
    if not callable(spec) and isinstance(spec, str) and spec in ("mode", "nearest_mode"):
        if centers is None:
            raise ValueError(f"grouping {spec!r} needs the real mode centres (mode_centers=[num_modes, dim])")
        grouping = GROUPINGS[spec](centers)
        count = grouping.num_groups
        refuse_other_count(f"{spec!r} has one group per mode centre ({count} in mode_centers)", count, num_groups,
                           ", or pass as many mode centres as groups")
        return grouping
    num_groups = DEFAULT_NUM_GROUPS if num_groups is None else num_groups
    if callable(spec):
        return FunctionGroups(spec, num_groups)
    if spec == "direction":
        return DirectionGroups(num_groups, seed=seed)
    if spec == "latent_kmeans":
        return LatentKMeansGroups(num_groups, seed=seed)
    if spec in ("magnitude", "confidence"):
        return GROUPINGS[spec](num_groups)
    raise ValueError(f"unknown grouping {spec!r}; choose one of {sorted(GROUPINGS)}, a GeometryGrouping or a callable")


__all__ = [
    "GeometryGrouping", "DirectionGroups", "ModeGroups", "NearestModeGroups", "MagnitudeGroups", "ConfidenceGroups",
    "LatentKMeansGroups", "FunctionGroups", "ClassGroups", "make_grouping", "GROUPINGS",
]
