"""The path-kernel ledger: who moved each probe's output, and by how much (DESIGN.md section 2).

    f(x; θ_T) − f(x; θ_0) = Σ_g C(x, g) + C_rest(x) + R(x)

All tensors are float64. ``f_end`` is a fresh forward pass at the latest parameters, so the
residual R = f_end − f_start − Σ_g C − C_rest holds quadrature error and rounding only, and is
always reported.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``: a save
    interrupted half-way leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class NetShares:
    """Net shares of the final change, share(x, g) = ⟨C(x, g), Δf(x)⟩ / ‖Δf(x)‖².

    ``groups [M, G]``, ``rest [M]``, ``residual [M]`` and ``sketch_error [M]`` (zero unless the
    groups' state was sketched) sum to 1 per probe. ``kappa [M]`` is the
    cancellation ratio Σ_g ‖C(x, g)‖ / ‖Δf(x)‖: with κ in the tens, shares are ill-conditioned.
    Probes whose output did not change get NaN.
    """

    groups: torch.Tensor
    rest: torch.Tensor
    residual: torch.Tensor
    kappa: torch.Tensor
    sketch_error: torch.Tensor


@dataclass
class PathKernelLedger:
    """Accumulated contributions at M probes from G groups (d outputs per probe).

    Attributes:
        contributions: ``[M, G, d]`` Σ_k J̄_k(x) u_{k,g}.
        rest: ``[M, d]`` what no tracked example caused: weight decay, optimizer state from before
            tracking, changes of buffers such as spectral norm's power iteration (``buffer_drift``).
        buffer_drift: ``[M, d]`` the part of ``rest`` due to buffers changing between steps.
        residual: ``[M, d]`` f_end − f_start − Σ_g contributions − rest − sketch_error: quadrature
            error and rounding, including the rounding gap between the optimizer's batched
            gradient and Σ_g ĝ_g (checked to be rounding-sized every step; Adam can magnify its
            effect where a gradient cancels).
        sketch_error: ``[M, d]`` with sketched per-group state, the exact total of the examples'
            contributions minus the sum of their sketched estimates (zero otherwise).
        f_start, f_end: ``[M, d]`` outputs at the first and latest parameters.
        traffic: ``[M, G]`` Σ_k ‖c_{k,g}(x)‖, norms of per-step contributions (no cancellation).
        steps: number of optimizer steps recorded.
        history: snapshots (dicts of the fields above plus ``step``) every ``snapshot_every`` steps.
    """

    contributions: torch.Tensor
    rest: torch.Tensor
    residual: torch.Tensor
    f_start: torch.Tensor
    f_end: torch.Tensor
    traffic: torch.Tensor
    buffer_drift: torch.Tensor
    sketch_error: torch.Tensor | None = None
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def empty(cls, f_start: torch.Tensor, num_groups: int) -> "PathKernelLedger":
        f_start = f_start.detach().to(torch.float64)
        m, d = f_start.shape
        zeros = torch.zeros_like(f_start)
        return cls(
            contributions=f_start.new_zeros((m, num_groups, d)),
            rest=zeros.clone(),
            residual=zeros.clone(),
            f_start=f_start.clone(),
            f_end=f_start.clone(),
            traffic=f_start.new_zeros((m, num_groups)),
            buffer_drift=zeros.clone(),
            sketch_error=zeros.clone(),
        )

    def __post_init__(self) -> None:
        if self.sketch_error is None:  # ledgers saved before sketched state existed
            self.sketch_error = torch.zeros_like(self.rest)

    @property
    def num_groups(self) -> int:
        return self.contributions.shape[1]

    @property
    def delta(self) -> torch.Tensor:
        """``[M, d]`` the real change f_end − f_start."""
        return self.f_end - self.f_start

    def record(
        self, step_contributions: torch.Tensor, step_rest: torch.Tensor, f_new: torch.Tensor,
        step_sketch_error: torch.Tensor | None = None,
    ) -> None:
        """Add one step: ``step_contributions [M, G, d]``, ``step_rest [M, d]``, new outputs ``[M, d]``
        and, with sketched state, the step's ``[M, d]`` sketch error."""
        self.contributions += step_contributions
        self.rest += step_rest
        if step_sketch_error is not None:
            self.sketch_error += step_sketch_error
        self.traffic += step_contributions.norm(dim=2)
        self.f_end = f_new.detach().to(torch.float64).clone()
        self.residual = self.f_end - self.f_start - self.contributions.sum(dim=1) - self.rest - self.sketch_error
        self.steps += 1

    def snapshot(self) -> None:
        """Append the current state to ``history``."""
        self.history.append(
            {
                "step": self.steps,
                **{key: getattr(self, key).clone()
                   for key in ("contributions", "rest", "residual", "f_end", "traffic", "sketch_error")},
            }
        )

    # -- summaries ----------------------------------------------------------------------------
    def shares(self) -> NetShares:
        """Net shares with their cancellation ratio (see :class:`NetShares`)."""
        delta = self.delta
        norm_sq = (delta * delta).sum(dim=1)
        safe = torch.where(norm_sq > 0, norm_sq, torch.full_like(norm_sq, float("nan")))
        return NetShares(
            groups=torch.einsum("mgd,md->mg", self.contributions, delta) / safe[:, None],
            rest=(self.rest * delta).sum(dim=1) / safe,
            residual=(self.residual * delta).sum(dim=1) / safe,
            kappa=self.cancellation_ratio(),
            sketch_error=(self.sketch_error * delta).sum(dim=1) / safe,
        )

    def cancellation_ratio(self) -> torch.Tensor:
        """``[M]`` κ(x) = Σ_g ‖C(x, g)‖ / ‖Δf(x)‖ (NaN where the output did not change)."""
        change = self.delta.norm(dim=1)
        safe = torch.where(change > 0, change, torch.full_like(change, float("nan")))
        return self.contributions.norm(dim=2).sum(dim=1) / safe

    def traffic_shares(self) -> torch.Tensor:
        """``[M, G]`` traffic normalized over groups per probe (rows sum to 1; NaN for no traffic)."""
        total = self.traffic.sum(dim=1, keepdim=True)
        return self.traffic / torch.where(total > 0, total, torch.full_like(total, float("nan")))

    def relative_residual(self) -> float:
        """‖R‖ / ‖Δf‖ over all probes (Frobenius norms)."""
        change = self.delta.norm()
        return float(self.residual.norm() / change) if change > 0 else float("nan")

    def grouped_contributions(self, mapping: torch.Tensor, num_new_groups: int) -> torch.Tensor:
        """``[M, G', d]`` contributions summed into coarser groups: old group g goes to ``mapping[g]``."""
        mapping = torch.as_tensor(mapping, dtype=torch.long, device=self.contributions.device)
        if mapping.shape != (self.num_groups,):
            raise ValueError(f"mapping needs one new id per group: shape [{self.num_groups}], got {tuple(mapping.shape)}")
        if mapping.numel() and (mapping.min() < 0 or mapping.max() >= num_new_groups):
            raise ValueError(f"mapping ids must lie in [0, {num_new_groups})")
        m, _, d = self.contributions.shape
        out = self.contributions.new_zeros((m, num_new_groups, d))
        return out.index_add_(1, mapping, self.contributions)

    def summary(self) -> dict[str, float]:
        """Plain numbers: steps, relative residual (overall and worst probe), κ median, change size."""
        change = self.delta.norm(dim=1)
        per_probe = self.residual.norm(dim=1) / torch.where(change > 0, change, torch.full_like(change, float("nan")))
        kappa = self.cancellation_ratio()
        return {
            "steps": self.steps,
            "probes": self.contributions.shape[0],
            "groups": self.num_groups,
            "relative_residual": self.relative_residual(),
            "max_probe_relative_residual": float(torch.nan_to_num(per_probe, nan=0.0).max()) if per_probe.numel() else 0.0,
            "median_kappa": float(kappa.nanmedian()) if kappa.numel() else float("nan"),
            "mean_change_norm": float(change.mean()) if change.numel() else 0.0,
            "rest_norm": float(self.rest.norm()),
            "relative_sketch_error": self.relative_sketch_error(),
        }

    def relative_sketch_error(self) -> float:
        """‖sketch_error‖ / ‖Δf‖ (0 without sketched state)."""
        change = self.delta.norm()
        return float(self.sketch_error.norm() / change) if change > 0 else float("nan")

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        fields = ("contributions", "rest", "residual", "f_start", "f_end", "traffic", "buffer_drift", "sketch_error")
        return {
            **{key: getattr(self, key).clone() for key in fields},
            "steps": self.steps,
            "history": [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in h.items()} for h in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PathKernelLedger":
        return cls(**state)

    def save(self, path: str | os.PathLike) -> None:
        """Write the ledger atomically (temporary file, then rename)."""
        atomic_save({"format": "genkernel.PathKernelLedger/1", **self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PathKernelLedger":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.pop("format", None) != "genkernel.PathKernelLedger/1":
            raise ValueError(f"{path} is not a genkernel ledger file (written by PathKernelLedger.save)")
        return cls.from_state_dict(state)
