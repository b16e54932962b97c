"""The path-kernel ledger: who moved each probe's output, and by how much (docs/ledger.md).

    f(x; θ_T) − f(x; θ_0) = Σ_g C(x, g) + C_rest(x) + R(x)

One ledger per partition of the training contributions (:mod:`genkernel.core.grouping`); the
partitions of one tracker share ``rest``, ``f_start``, ``f_end`` and (up to float64 rounding of
their sums) the residual. All tensors are float64. ``f_end`` is a fresh forward pass at the
latest parameters, so the residual R = f_end − f_start − Σ_g C − C_rest holds quadrature error
and rounding only, and is always reported.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import grouping
from .io import atomic_save, load_state
from ...stats import nan_median

FORMAT = "genkernel.PathKernelLedger/1"
_FIELDS = ("contributions", "rest", "residual", "f_start", "f_end", "traffic", "buffer_drift", "sketch_error",
           "sketch_noise", "null_moves")


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
        null_moves: ``[M, d]`` the part of ``rest`` that is the whole update of structurally null parameters
            (:mod:`genkernel.core.tracking.null_params`: a float32 bias before a training-mode BatchNorm, whose
            gradient is rounding noise that an adaptive optimizer turns into a real move no example caused);
            ``null_parameters`` names them.
        residual: ``[M, d]`` f_end − f_start − Σ_g contributions − rest − sketch_error: quadrature
            error and rounding, including the rounding gap between the optimizer's batched
            gradient and Σ_g ĝ_g (checked to be rounding-sized every step; Adam can magnify its
            effect where a gradient cancels).
        sketch_error: ``[M, d]`` with sketched per-group state, the exact total of the examples'
            contributions minus the sum of their sketched estimates (zero otherwise).
        sketch_noise: ``[M, G]`` with sketched per-group state, each group's estimated standard error
            Σ_k sqrt(Σ_o Var̂[c_{k,g,o}(x)]) (summed over steps: one R, correlated errors); zero otherwise.
            ``sketch_error`` is the error of the groups' sum only, which cancels where the groups do.
        f_start, f_end: ``[M, d]`` outputs at the first and latest parameters.
        traffic: ``[M, G]`` Σ_k ‖c_{k,g}(x)‖, norms of per-step contributions (no cancellation);
            biased upward on the sketched route, whose contributions are estimates.
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
    sketch_noise: torch.Tensor | None = None
    null_moves: torch.Tensor | None = None
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    null_parameters: tuple[str, ...] = ()

    @classmethod
    def empty(cls, f_start: torch.Tensor, num_groups: int) -> "PathKernelLedger":
        if not isinstance(f_start, torch.Tensor) or f_start.dim() != 2:
            raise ValueError(f"f_start must be the probes' outputs as an [M, d] tensor (flatten each output), got "
                             f"{tuple(f_start.shape) if isinstance(f_start, torch.Tensor) else type(f_start).__name__}")
        try:
            size = -1 if isinstance(num_groups, bool) else operator.index(num_groups)
        except TypeError:
            size = -1
        if size < 0:
            raise ValueError(f"num_groups must be a non-negative int, got {num_groups!r}")
        num_groups = size
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
            sketch_noise=f_start.new_zeros((m, num_groups)),
            null_moves=zeros.clone(),
        )

    def __post_init__(self) -> None:
        if self.null_moves is None:  # ledgers saved before the null parameters' moves were kept apart
            self.null_moves = torch.zeros_like(self.rest) if isinstance(self.rest, torch.Tensor) else None
        self.null_parameters = tuple(self.null_parameters)
        if self.sketch_error is None:  # ledgers saved before sketched state existed
            self.sketch_error = torch.zeros_like(self.rest) if isinstance(self.rest, torch.Tensor) else None
        if self.sketch_noise is None:  # ledgers saved before the groups' sketch noise was kept
            # zero where nothing was sketched; unknown (NaN) for a sketched ledger's saved steps, not zero: resumed,
            # it would report only the steps after the resume
            sketched = isinstance(self.sketch_error, torch.Tensor) and bool(self.sketch_error.any())
            self.sketch_noise = (torch.full_like(self.traffic, float("nan")) if sketched else torch.zeros_like(self.traffic)
                                 ) if isinstance(self.traffic, torch.Tensor) else None
        _check_fields(self)

    @property
    def num_groups(self) -> int:
        return self.contributions.shape[1]

    @property
    def delta(self) -> torch.Tensor:
        """``[M, d]`` the real change f_end − f_start."""
        return self.f_end - self.f_start

    def record(
        self, step_contributions: torch.Tensor, step_rest: torch.Tensor, f_new: torch.Tensor,
        step_sketch_error: torch.Tensor | None = None, step_drift: torch.Tensor | None = None,
        columns: torch.Tensor | None = None, step_sketch_noise: torch.Tensor | None = None,
        step_null: torch.Tensor | None = None, null_parameters: tuple[str, ...] = (),
    ) -> None:
        """Add one step: ``step_contributions [M, G, d]`` (or ``[M, U, d]`` for the distinct
        groups ``columns [U]`` when only those moved: a plain-SGD step touches the batch's
        groups only), ``step_rest [M, d]`` (buffer drift included, ``step_drift`` being its part),
        new outputs ``[M, d]`` and, with sketched state, the step's ``[M, d]`` sketch error; ``step_null [M, d]``
        the part of ``step_rest`` that is the whole update of the structurally null parameters ``null_parameters``."""
        # Everything is checked before anything is written: a wrong shape would otherwise broadcast
        # (a [M, 1, d] step into every group, a [d] rest into every probe) or an id outside
        # [0, G) drop a group's contribution, while the running residual kept its old value.
        m, _, d = self.contributions.shape
        span = _contiguous_span(columns, self.num_groups)
        width = self.num_groups if columns is None else columns.numel()
        step_contributions = _as_float64(step_contributions, "step_contributions", (m, width, d),
                                         self.contributions.device)
        step_rest = _as_float64(step_rest, "step_rest", (m, d), self.rest.device)
        f_new = _as_float64(f_new, "f_new", (m, d), self.f_end.device)
        step_sketch = (torch.zeros_like(step_rest) if step_sketch_error is None
                       else _as_float64(step_sketch_error, "step_sketch_error", (m, d), self.rest.device))
        if step_drift is not None:
            step_drift = _as_float64(step_drift, "step_drift", (m, d), self.rest.device)
        if step_sketch_noise is not None:
            step_sketch_noise = _as_float64(step_sketch_noise, "step_sketch_noise", (m, width), self.rest.device)
        if step_null is not None:
            step_null = _as_float64(step_null, "step_null", (m, d), self.rest.device)
        # One layout for the reductions below: on a permuted view (an einsum's result) torch's
        # norm over d runs 30-40x slower than on contiguous rows (measured: [64, 2304, 10] float64).
        step_contributions = step_contributions.contiguous()
        step_traffic = step_contributions.norm(dim=2)
        if span is not None:  # every group, or a batch of consecutive ids: a view, no scattered writes
            self.contributions[:, span] += step_contributions
            self.traffic[:, span] += step_traffic
            if step_sketch_noise is not None:
                self.sketch_noise[:, span] += step_sketch_noise
        else:  # O(M U d) instead of O(M G d): with a group per training example G grows with the data
            self.contributions.index_add_(1, columns, step_contributions)
            self.traffic.index_add_(1, columns, step_traffic)
            if step_sketch_noise is not None:
                self.sketch_noise.index_add_(1, columns, step_sketch_noise)
        self.rest += step_rest
        if step_drift is not None:
            self.buffer_drift += step_drift
        if step_null is not None:
            self.null_moves += step_null
            self.null_parameters = tuple(dict.fromkeys((*self.null_parameters, *null_parameters)))
        self.sketch_error += step_sketch
        f_new = f_new.clone()
        # R = f_end − f_start − Σ_g C − C_rest − sketch error, updated by this step's terms (the same
        # identity without an O(M G d) sum over every group; tests check it against the definition).
        self.residual = self.residual + (f_new - self.f_end) - step_contributions.sum(dim=1) - step_rest - step_sketch
        self.f_end = f_new
        self.steps += 1

    def mark(self, columns: torch.Tensor | None = None) -> dict[str, Any]:
        """What :meth:`record` with these ``columns`` (and a :meth:`snapshot`) is about to change,
        for :meth:`restore`: copies of the touched ``[M, U, d]`` columns and of the ``[M, d]`` totals,
        the step count and the history's length (O(M U d), the cost of the record itself).

        A tracker writes several ledgers per step: one that fails half-way (an interrupt, a
        MemoryError in a snapshot) puts the ones already written back with this, so that no ledger
        counts a step the others and the model do not."""
        span = _contiguous_span(columns, self.num_groups)
        index = span if span is not None else columns.clone()  # the caller may reuse its tensor
        return {
            "index": index,
            "contributions": self.contributions[:, index].clone(),
            "traffic": self.traffic[:, index].clone(),
            "sketch_noise": self.sketch_noise[:, index].clone(),
            **{key: getattr(self, key).clone()
               for key in ("rest", "residual", "f_end", "buffer_drift", "sketch_error", "null_moves")},
            "null_parameters": self.null_parameters,
            "steps": self.steps,
            "history": len(self.history),
        }

    def restore(self, mark: dict[str, Any]) -> None:
        """Put back what :meth:`mark` saved (undo the :meth:`record` and :meth:`snapshot` since)."""
        index = mark["index"]
        if isinstance(index, slice):
            self.contributions[:, index] = mark["contributions"]
            self.traffic[:, index] = mark["traffic"]
            self.sketch_noise[:, index] = mark["sketch_noise"]
        else:
            self.contributions.index_copy_(1, index, mark["contributions"])
            self.traffic.index_copy_(1, index, mark["traffic"])
            self.sketch_noise.index_copy_(1, index, mark["sketch_noise"])
        for key in ("rest", "buffer_drift", "sketch_error", "null_moves"):  # record adds into these in place
            getattr(self, key).copy_(mark[key])
        self.null_parameters = mark["null_parameters"]
        self.residual, self.f_end = mark["residual"], mark["f_end"]
        self.steps = mark["steps"]
        del self.history[mark["history"]:]

    def snapshot(self) -> None:
        """Append the current state to ``history``."""
        self.history.append(
            {
                "step": self.steps,
                **{key: getattr(self, key).clone()
                   for key in ("contributions", "rest", "residual", "f_end", "traffic", "buffer_drift", "sketch_error",
                                "sketch_noise", "null_moves")},
            }
        )

    def since(self, earlier: "PathKernelLedger") -> "PathKernelLedger":
        """The ledger of the steps after ``earlier`` (a copy of this ledger taken then): contributions,
        rest, traffic and sketch error are differences, ``f_start`` is ``earlier.f_end``."""
        same_start = (earlier.f_start.shape == self.f_start.shape
                      and torch.equal(earlier.f_start, self.f_start.to(earlier.f_start.device)))
        if earlier.contributions.shape != self.contributions.shape or earlier.steps > self.steps or not same_start:
            raise ValueError("`earlier` must be an earlier copy of this same ledger (ledger.copy()): same shape, same "
                             f"f_start and no more steps (it has {earlier.steps}, this one {self.steps})")
        window = PathKernelLedger(
            contributions=self.contributions - earlier.contributions,
            rest=self.rest - earlier.rest,
            residual=torch.zeros_like(self.rest),
            f_start=earlier.f_end.clone(),
            f_end=self.f_end.clone(),
            traffic=self.traffic - earlier.traffic,
            buffer_drift=self.buffer_drift - earlier.buffer_drift,
            sketch_error=self.sketch_error - earlier.sketch_error,
            sketch_noise=self.sketch_noise - earlier.sketch_noise,
            null_moves=self.null_moves - earlier.null_moves,
            steps=self.steps - earlier.steps,
            null_parameters=self.null_parameters,
        )
        window.residual = window.delta - window.contributions.sum(dim=1) - window.rest - window.sketch_error
        return window

    def copy(self) -> "PathKernelLedger":
        """A deep copy (history excluded)."""
        return PathKernelLedger(**{key: getattr(self, key).clone() for key in _FIELDS}, steps=self.steps,
                                null_parameters=self.null_parameters)

    # -- summaries ----------------------------------------------------------------------------
    def shares(self) -> NetShares:
        """Net shares with their cancellation ratio (see :class:`NetShares`)."""
        delta = self.delta
        return NetShares(
            groups=grouping.net_shares(self.contributions, delta),
            rest=grouping.part_share(self.rest, delta),
            residual=grouping.part_share(self.residual, delta),
            kappa=self.cancellation_ratio(),
            sketch_error=grouping.part_share(self.sketch_error, delta),
        )

    def cancellation_ratio(self) -> torch.Tensor:
        """``[M]`` κ(x) = Σ_g ‖C(x, g)‖ / ‖Δf(x)‖ (NaN where the output did not change)."""
        return grouping.cancellation_ratio(self.contributions, self.delta)

    def traffic_shares(self) -> torch.Tensor:
        """``[M, G]`` traffic normalized over groups per probe (rows sum to 1; NaN for no traffic)."""
        return grouping.traffic_shares(self.traffic)

    def relative_residual(self) -> float:
        """‖R‖ / ‖Δf‖ over all probes (Frobenius norms)."""
        change = self.delta.norm()
        return float(self.residual.norm() / change) if change > 0 else float("nan")

    def probe_relative_residual(self) -> torch.Tensor:
        """``[M]`` ‖R(x)‖ / ‖Δf(x)‖ (NaN where the output did not change)."""
        change = self.delta.norm(dim=1)
        return self.residual.norm(dim=1) / torch.where(change > 0, change, torch.full_like(change, float("nan")))

    def grouped_contributions(self, mapping: torch.Tensor, num_new_groups: int) -> torch.Tensor:
        """``[M, G', d]`` contributions summed into coarser groups: old group g goes to ``mapping[g]``."""
        return grouping.coarsen(self.contributions, mapping, num_new_groups)

    def summary(self) -> dict[str, float]:
        """Plain numbers: steps, relative residual (overall and worst probe), κ median, change size."""
        change = self.delta.norm(dim=1)
        per_probe = self.probe_relative_residual()[change > 0]  # a probe that did not move has no ratio
        kappa = self.cancellation_ratio()
        still = ~(change > 0)
        if not bool(torch.isfinite(self.residual).all()):
            worst = float("nan")  # a non-finite residual must not be summarized as a finite number
        elif bool(self.residual[still].any()):
            # A probe that did not move while the ledger books a change there (R ≠ 0) has no finite
            # ratio: NaN, as when no probe moved, not the moved probes' maximum (which hid it).
            worst = float("nan")
        else:
            # No probe moved: no ratio; 0 only when the residual is 0 too, as relative_residual says.
            worst = float(per_probe.max()) if per_probe.numel() else (0.0 if not bool(self.residual.any()) else float("nan"))
        return {
            "steps": self.steps,
            "probes": self.contributions.shape[0],
            "groups": self.num_groups,
            "relative_residual": self.relative_residual(),
            "max_probe_relative_residual": worst,
            "median_kappa": nan_median(kappa),
            "mean_change_norm": float(change.mean()) if change.numel() else 0.0,
            "rest_norm": float(self.rest.norm()),
            "relative_sketch_error": self.relative_sketch_error(),
            "relative_sketch_noise": self.relative_sketch_noise(),
            # the share of the change booked to the rest as structurally null parameters' moves, and their names
            "relative_null_moves": self.relative_null_moves(),
            **({"null_parameters": ", ".join(self.null_parameters)} if self.null_parameters else {}),
        }

    def relative_null_moves(self) -> float:
        """‖null_moves‖ / ‖Δf‖: the share of the change booked to the rest as structurally null parameters' moves
        (0 without them; NaN where no probe moved)."""
        change = self.delta.norm()
        if not bool(self.null_moves.any()):
            return 0.0
        return float(self.null_moves.norm() / change) if change > 0 else float("nan")

    def relative_sketch_error(self) -> float:
        """‖sketch_error‖ / ‖Δf‖ (0 without sketched state; NaN where no probe moved)."""
        change = self.delta.norm()
        return float(self.sketch_error.norm() / change) if change > 0 else float("nan")

    def relative_sketch_noise(self) -> float:
        """‖sketch_noise‖_F / ‖Δf‖: the groups' own estimated sketch noise (0 without sketched state; NaN
        where no probe moved). Where groups cancel (κ large) it exceeds :meth:`relative_sketch_error`,
        which sees only their sum."""
        change = self.delta.norm()
        return float(self.sketch_noise.norm() / change) if change > 0 else float("nan")

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **{key: getattr(self, key).clone() for key in _FIELDS},
            "steps": self.steps,
            "history": [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in h.items()} for h in self.history],
            "null_parameters": list(self.null_parameters),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PathKernelLedger":
        """A ledger from :meth:`state_dict`'s output: its own float64 copies of the tensors (the
        state is left as it is: two ledgers built from one state do not share memory, and
        :meth:`record` adds in place)."""
        if not isinstance(state, dict) and not hasattr(state, "items"):
            raise TypeError(f"from_state_dict needs a ledger's state_dict(), got {type(state).__name__}")
        allowed = {*_FIELDS, "steps", "history", "format", "null_parameters"}  # format: a saved file's tag, read by load
        required = set(_FIELDS) - {"sketch_error", "sketch_noise", "null_moves", "null_parameters"}  # sketch_error: states saved before sketched state existed
        missing, unexpected = sorted(required - set(state)), sorted(set(state) - allowed)
        if missing or unexpected:
            raise ValueError(f"not a PathKernelLedger state (missing {missing}, unexpected {unexpected}); pass "
                             "ledger.state_dict() or a file written by ledger.save")
        copy = lambda v: v.detach().to(torch.float64, copy=True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        fields = {key: copy(value) for key, value in state.items() if key in _FIELDS}
        history = [{k: copy(v) for k, v in h.items()} for h in state.get("history", [])]
        return cls(**fields, steps=int(state.get("steps", 0)), history=history,
                   null_parameters=tuple(str(n) for n in state.get("null_parameters", ())))

    def save(self, path: str | os.PathLike) -> None:
        """Write the ledger atomically (temporary file, then rename)."""
        atomic_save({"format": FORMAT, **self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PathKernelLedger":
        state = dict(load_state(path, FORMAT))
        state.pop("format")
        return cls.from_state_dict(state)


def _contiguous_span(columns: torch.Tensor | None, num_groups: int) -> slice | None:
    """``slice(a, a + U)`` when ``columns [U]`` is the ascending run a, a+1, …, a+U−1 (``None``:
    every group); otherwise None. Adding into such a view is 2-3x faster than ``index_add_`` along
    the ledger's middle dimension (measured: [64, 7680, 10] float64, 512 columns).

    ``columns`` must be distinct integer group ids in [0, G) (a ValueError otherwise): an id past
    the end made an empty slice that the step broadcast into (its contributions vanished), a
    negative one a slice from the end, and a repeated one summed norms of pieces into traffic."""
    if columns is None:
        return slice(0, num_groups)
    if not isinstance(columns, torch.Tensor) or columns.dim() != 1 or columns.dtype.is_floating_point \
            or columns.dtype.is_complex or columns.dtype == torch.bool:
        raise ValueError("columns must be a 1-D integer tensor of distinct group ids, got "
                         f"{type(columns).__name__} {getattr(columns, 'dtype', '')} {tuple(getattr(columns, 'shape', ()))}")
    if columns.numel() == 0:
        return slice(0, 0)
    start = int(columns[0])
    run = torch.arange(start, start + columns.numel(), device=columns.device, dtype=columns.dtype)
    if torch.equal(columns, run):
        if start < 0 or start + columns.numel() > num_groups:
            raise ValueError(f"columns must be group ids in [0, {num_groups}), got {start} to {start + columns.numel() - 1}")
        return slice(start, start + columns.numel())
    low, high = (int(v) for v in torch.aminmax(columns))
    if low < 0 or high >= num_groups:
        raise ValueError(f"columns must be group ids in [0, {num_groups}), got ids from {low} to {high}")
    if torch.unique(columns).numel() != columns.numel():
        raise ValueError("columns must be distinct group ids (sum a group's pieces into one column first: its traffic "
                         "is the norm of the group's whole step contribution)")
    return None


def _as_float64(value: Any, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``value`` as a float64 tensor of exactly ``shape`` (a ValueError naming ``name`` otherwise)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {list(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (probes, {'groups or columns, ' if len(shape) == 3 else ''}"
                         f"outputs), got {list(value.shape)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got {value.dtype}")
    return value.detach().to(device=device, dtype=torch.float64)


def _check_fields(ledger: "PathKernelLedger") -> None:
    """ValueError unless the ledger's tensors have consistent shapes: contributions [M, G, d],
    traffic [M, G], the rest [M, d]."""
    for key in _FIELDS:
        if not isinstance(getattr(ledger, key), torch.Tensor):
            raise TypeError(f"PathKernelLedger.{key} must be a tensor, got {type(getattr(ledger, key)).__name__}")
    if ledger.contributions.dim() != 3:
        raise ValueError(f"PathKernelLedger.contributions must be [M, G, d], got {list(ledger.contributions.shape)}")
    m, g, d = ledger.contributions.shape
    expected = {key: (m, d) for key in ("rest", "residual", "f_start", "f_end", "buffer_drift", "sketch_error",
                                        "null_moves")}
    expected["traffic"] = expected["sketch_noise"] = (m, g)
    wrong = [f"{key} {list(getattr(ledger, key).shape)}" for key, shape in expected.items()
             if tuple(getattr(ledger, key).shape) != shape]
    if wrong:
        raise ValueError(f"PathKernelLedger fields disagree with contributions [M={m}, G={g}, d={d}]: {', '.join(wrong)} "
                         "(rest, residual, f_start, f_end, buffer_drift, sketch_error must be [M, d], traffic [M, G])")
