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

:class:`NearestModeGroups` and :class:`LatentKMeansGroups` do not look at D: as the analyzer's
``comparison`` they measure how much coupling a grouping gets from the generator's smoothness alone
(nearby latents share a group and a kernel), which a discriminator-geometry grouping must exceed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..core.adapter import positive_int


class GeometryGrouping:
    """Base class. Subclasses set ``num_groups`` and ``name`` and implement ``assign``."""

    num_groups: int = 1
    name: str = "geometry"
    fitted: bool = True
    uses_classes: bool = False  # True: called with classes=, a conditional GAN's LongTensor[B] (ClassGroups)

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
            raise RuntimeError(f"{type(self).__name__} must be fitted on a reference batch first (call .fit)")
        raw = self.assign(z, x, w, scores) if classes is None else self._ids(z, x, w, scores, classes)
        ids = torch.as_tensor(raw).to(torch.long).reshape(-1)
        if ids.shape[0] != z.shape[0]:
            raise ValueError(f"{type(self).__name__} returned {ids.shape[0]} group ids for {z.shape[0]} latents")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_groups):
            raise ValueError(
                f"{type(self).__name__} returned group ids from {int(ids.min())} to {int(ids.max())}; they must lie "
                f"in [0, {self.num_groups})"
            )
        return ids.cpu()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.fitted = True


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64).cpu()


def _check_count(num_groups: int, name: str) -> int:
    return positive_int(num_groups, name)


class DirectionGroups(GeometryGrouping):
    """k-means clusters of the unit directions w_i / ‖w_i‖, fitted once (sklearn KMeans, seeded)."""

    name = "direction"

    def __init__(self, num_groups: int = 8, *, seed: int = 0) -> None:
        self.num_groups = _check_count(num_groups, "num_groups")
        self.seed = seed
        self.centers: torch.Tensor | None = None
        self.fitted = False

    @staticmethod
    def _unit(w: torch.Tensor) -> torch.Tensor:
        w = _flat(w)
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)

    def fit(self, z, x, w, scores):
        from sklearn.cluster import KMeans

        unit = self._unit(w).numpy()
        distinct = len(np.unique(np.round(unit, 12), axis=0))
        if distinct < self.num_groups:
            raise ValueError(
                f"DirectionGroups: the reference batch has {distinct} distinct gradient directions, fewer than "
                f"num_groups={self.num_groups}: the groups cannot all be filled. Use a larger reference batch or "
                "fewer groups."
            )
        km = KMeans(self.num_groups, n_init=4, random_state=self.seed).fit(unit)
        self.centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float64)
        self.fitted = True
        return self

    def assign(self, z, x, w, scores):
        return torch.cdist(self._unit(w), self.centers).argmin(dim=1)

    def state_dict(self):
        return {"centers": self.centers}

    def load_state_dict(self, state):
        self.centers = state["centers"]
        self.fitted = True


class ModeGroups(GeometryGrouping):
    """Real mode m maximizing cos(−w_i, μ_m − G(z_i)): where the discriminator sends the sample.

    Args:
        centers: ``[num_modes, dim]`` mode centres μ_m (samples must be ``[B, dim]``).
    """

    name = "pushed-to mode"

    def __init__(self, centers: torch.Tensor) -> None:
        centers = torch.as_tensor(centers, dtype=torch.float64, device="cpu")  # samples are read on the CPU
        if centers.dim() != 2 or centers.shape[0] < 1:
            raise ValueError(f"centers must be [num_modes, dim], got shape {tuple(centers.shape)}")
        self.centers = centers
        self.num_groups = centers.shape[0]

    def labels(self):
        return [f"mode {m}" for m in range(self.num_groups)]

    def assign(self, z, x, w, scores):
        x, w = _flat(x), _flat(w)
        if x.shape[1] != self.centers.shape[1]:
            raise ValueError(f"ModeGroups has {self.centers.shape[1]}-D centres but samples are {x.shape[1]}-D")
        to_mode = self.centers[None, :, :] - x[:, None, :]  # [B, M, dim]
        cos = torch.einsum("bmd,bd->bm", to_mode, -w) / (to_mode.norm(dim=2) * w.norm(dim=1, keepdim=True)).clamp_min(1e-300)
        return cos.argmax(dim=1)


class NearestModeGroups(ModeGroups):
    """The mode nearest to G(z_i)."""

    name = "nearest mode"

    def assign(self, z, x, w, scores):
        x = _flat(x)
        return torch.cdist(x, self.centers).argmin(dim=1)


class LatentKMeansGroups(GeometryGrouping):
    """k-means clusters of the latents z (flattened), fitted once (sklearn KMeans, seeded).

    Neither D nor G enters: a grouping that is spatial in latent space, for comparison with a
    discriminator-geometry grouping of the same size on the same steps.
    """

    name = "latent cluster"

    def __init__(self, num_groups: int = 8, *, seed: int = 0) -> None:
        self.num_groups = _check_count(num_groups, "num_groups")
        self.seed = seed
        self.centers: torch.Tensor | None = None
        self.fitted = False

    def fit(self, z, x, w, scores):
        from sklearn.cluster import KMeans

        flat = _flat(z).numpy()
        if len(np.unique(np.round(flat, 12), axis=0)) < self.num_groups:
            raise ValueError(f"LatentKMeansGroups: the reference batch has fewer distinct latents than num_groups={self.num_groups}")
        km = KMeans(self.num_groups, n_init=4, random_state=self.seed).fit(flat)
        self.centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float64)
        self.fitted = True
        return self

    def assign(self, z, x, w, scores):
        return torch.cdist(_flat(z), self.centers).argmin(dim=1)

    def state_dict(self):
        return {"centers": self.centers}

    def load_state_dict(self, state):
        self.centers = state["centers"]
        self.fitted = True


class _QuantileBins(GeometryGrouping):
    """Quantile bins of a scalar, edges fitted on the reference batch."""

    def __init__(self, num_groups: int = 4) -> None:
        self.num_groups = _check_count(num_groups, "num_groups")
        self.edges: torch.Tensor | None = None
        self.fitted = False

    def value(self, z, x, w, scores) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, z, x, w, scores):
        v = self.value(z, x, w, scores)
        qs = torch.linspace(0, 1, self.num_groups + 1, dtype=torch.float64)[1:-1]
        edges = torch.quantile(v, qs)
        if edges.numel() and (len(torch.unique(edges)) < edges.numel() or len(torch.unique(v)) < self.num_groups):
            raise ValueError(
                f"{type(self).__name__}: the reference batch's values have only {len(torch.unique(v))} distinct levels, "
                f"too few for {self.num_groups} quantile bins: some groups could never be filled. Use fewer groups."
            )
        self.edges = edges
        self.fitted = True
        return self

    def assign(self, z, x, w, scores):
        return torch.bucketize(self.value(z, x, w, scores), self.edges)

    def state_dict(self):
        return {"edges": self.edges}

    def load_state_dict(self, state):
        self.edges = state["edges"]
        self.fitted = True


class MagnitudeGroups(_QuantileBins):
    """Quantile bins of ‖w_i‖ (how hard the discriminator pushes), low to high."""

    name = "|w| bin"

    def value(self, z, x, w, scores):
        return _flat(w).norm(dim=1)


class ConfidenceGroups(_QuantileBins):
    """Quantile bins of the score D(G(z_i)) (how real the sample looks to D), low to high."""

    name = "D(G(z)) bin"

    def value(self, z, x, w, scores):
        return scores.detach().to(torch.float64).reshape(-1).cpu()


class FunctionGroups(GeometryGrouping):
    """A user function ``fn(z, x, w, scores) -> LongTensor[B]`` in ``[0, num_groups)``."""

    def __init__(self, fn: Callable, num_groups: int, *, name: str = "group", labels: Sequence[str] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(z, x, w, scores) -> LongTensor[B], got {type(fn).__name__}")
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

    def __init__(self, num_classes: int) -> None:
        self.num_groups = _check_count(num_classes, "num_classes")

    def assign(self, z, x, w, scores):
        raise ValueError("ClassGroups groups by class: call it with classes= (GANKernelAnalyzer(..., probe_classes=, "
                         "grouping='class') does)")

    def _ids(self, z, x, w, scores, classes):
        return classes


GROUPINGS = {"direction": DirectionGroups, "mode": ModeGroups, "nearest_mode": NearestModeGroups,
             "magnitude": MagnitudeGroups, "confidence": ConfidenceGroups, "latent_kmeans": LatentKMeansGroups}


def make_grouping(spec, *, num_groups: int = 8, centers: torch.Tensor | None = None, seed: int = 0) -> GeometryGrouping:
    """A grouping from a name ("direction", "mode", "nearest_mode", "magnitude", "confidence", "latent_kmeans"), a
    :class:`GeometryGrouping`, or a callable ``fn(z, x, w, scores)`` (then ``num_groups`` is required)."""
    if isinstance(spec, GeometryGrouping):
        return spec
    if callable(spec):
        return FunctionGroups(spec, num_groups)
    if spec in ("mode", "nearest_mode"):
        if centers is None:
            raise ValueError(f"grouping {spec!r} needs the real mode centres (mode_centers=[num_modes, dim])")
        return GROUPINGS[spec](centers)
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
