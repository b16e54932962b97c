"""Optimizer-aware update splitting (docs/optimizers.md).

An optimizer step Δ_k is written as Σ_g u_{k,g} + u_{k,rest}: one update per group of training
contributions plus a rest that no example caused (weight decay, optimizer state that existed
before tracking began). Each splitter writes its optimizer's rule once, as two pieces every
route uses:

- :meth:`UpdateSplitter.advance`: the optimizer's *linear* recurrence on a stack of rows (SGD's
  momentum buffer, the first moment of Adam, Adamax, RAdam and NAdam, RMSprop's momentum of
  preconditioned gradients), exactly as PyTorch updates its own buffer, returning the rows' update
  directions;
- :meth:`UpdateSplitter.preconditioner`: the diagonal D read from the optimizer *after* its step
  (−η, Adam's −η / (1 − β1^k) / (sqrt(v̂_k) + ε), Adagrad's −η_k / (sqrt(Σ g²) + ε), Adamax's
  −η / (1 − β1^k) / u_k, Adafactor's −α_k / c_k / sqrt(V̂_k), ...) that turns a direction into an
  update. What is not linear in the gradients (second moments, infinity norms, Adagrad's sums,
  RAdam's choice of branch, Adafactor's factored second moment and update clipping) is read from
  the optimizer after its step, never split (Adadelta's accumulated update and ASGD's η, which the
  step overwrites, before it).

The dense route keeps the rows as float64 copies of the parameters (:meth:`UpdateSplitter.split`);
the sketched route (:mod:`genkernel.core.tracking.sketched`) runs the same ``advance`` on k-dim
sketches of the rows and applies D on the probes' side.

A structurally null parameter (:mod:`genkernel.core.tracking.null_params`: its exact gradient is zero, a float32
bias before a training-mode BatchNorm) has group rows that are rounding noise only: :attr:`UpdateSplitter.null`
names them, and their gradients and state go to the rest row (its groups' and rounding rows are zero).

Rows: every partition's groups in order (:class:`~genkernel.core.grouping.Partitions`), then the
rest, then each partition's rounding gap (the batched gradient minus that partition's Σ_g ĝ_g:
different groupings round differently). The recurrences are linear per row, so one stack serves any
number of partitions, and for each partition its rows plus the rest and its rounding row add up to
the optimizer's update.

Lifecycle per step: ``capture()`` before ``optimizer.step()`` (hyperparameters of every
parameter group, which may change between steps, and the pre-existing state on the first tracked
step); the real step; ``split(group_grads, theta_before, rounding)`` returning
``{name: [R + 1 + Π, *shape]}`` (Π partitions) and computing the new state aside; ``check_state()`` comparing each
partition's summed new state with the optimizer's; ``commit()`` once the whole step is recorded
(or ``discard()`` when it is rolled back: the state stays that of the step before).

Memory: every per-group state is ``(R + 1 + Π) × P`` float64 values (one copy of the parameters per
row): fine for tens of groups, large for one group per example on a big model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach, _get_scalar_dtype  # (ASGD: PyTorch's own choices)

from ..errors import LedgerCheckError
from ..grouping import Partitions, abs_row_sum, rows_sum_and_size

def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _plain(value: Any) -> Any:
    """A hyperparameter as PyTorch's optimizers take it (``_to_scalar``): a one-element tensor squeezed
    to 0-dim (its dtype kept, so arithmetic with it rounds as theirs does), anything else as it is."""
    return value.detach().squeeze() if isinstance(value, torch.Tensor) else value


def decay_multiplier(group: dict[str, Any]) -> Any:
    """1 − η λ of a parameter group as PyTorch's decoupled decay forms it, ``param.mul_(1 − lr·λ)``: a
    tensor of its dtype (rounded there) when lr or λ is a tensor, else a Python float."""
    return 1 - _plain(group["lr"]) * _plain(group.get("weight_decay", 0.0))


def one_minus(value: Any) -> float:
    """1 − ``value`` as PyTorch's optimizers form it: a float32 tensor hyperparameter (SGD's dampening
    τ) gives a float32 1 − τ, rounded there, which a float64 1 − τ misses by up to 5e-9."""
    return _scalar(1 - _plain(value))


def _refuse_imprecise_tensor(kind: str, label: str, value: Any, name: str, p: torch.Tensor, why: str) -> None:
    """Refuse hyperparameter ``value`` (``label`` of optimizer ``kind``) held as a floating tensor less
    precise than parameter ``name``'s ``p``: PyTorch then forms the step from it in the tensor's dtype
    (``why``), a rounding the exact split, in the parameters' precision, cannot reproduce."""
    if (isinstance(value, torch.Tensor) and value.is_floating_point()
            and torch.finfo(value.dtype).eps > torch.finfo(p.dtype).eps):
        raise ValueError(
            f"{kind}'s {label} is a {value.dtype} tensor but parameter '{name}' is {p.dtype}: {why}, a rounding the "
            f"exact split cannot reproduce. Pass it as a Python float, or as a tensor of the parameters' dtype ({p.dtype})"
        )


def _relative_gap(total: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> float:
    gap = (total - reference).norm()
    return _scalar(gap / scale.clamp_min(torch.finfo(torch.float64).tiny))


class UpdateSplitter:
    """Base class: maps group gradients to group updates for one optimizer.

    Args:
        optimizer: the optimizer whose steps are split.
        params: the tracked trainable parameters by name.
        partitions: the partitions whose groups are the rows (one partition of one group, "all",
            for routes that keep only the groups' total).
    """

    state_key: str | None = None  # the optimizer's linear state, kept per row by the splitter

    def __init__(self, optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], partitions: Partitions,
                 dtype: torch.dtype = torch.float64):
        self.optimizer = optimizer
        self.dtype = dtype  # of the rows' state and updates (float64, or float32 for large float32 models)
        self.params = params
        self.partitions = partitions
        self.rows = partitions.total  # also the rest row's index
        self.rounding_rows = {name: self.rows + 1 + i for i, name in enumerate(partitions.names)}
        self.num_rows = self.rows + 1 + len(partitions.names)
        self.group_of = self._group_index(optimizer, params)
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # name -> state_key -> [R + 1 + Π, *shape]
        self.pending: dict[str, torch.Tensor] = {}  # this step's new state, until commit()
        self.hyper: dict[str, dict[str, Any]] = {}
        self.before: dict[str, torch.Tensor | None] = {}
        # Parameters without a gradient at this step (a branch the batch did not take): PyTorch's
        # optimizers skip them, so they do not move and their state stays as it was.
        self.skipped: set[str] = set()
        # The optimizer keeps its linear state in the parameters' dtype: where it cancels over
        # steps, its own rounding is relative to the magnitudes it summed, not to the result.
        # magnitude[name] follows the state's recurrence on |gradients| (one row, float64) and
        # rounding_scale[name] is the update that magnitude would make: the scale of that rounding.
        self.magnitude: dict[str, torch.Tensor] = {}
        self.pending_magnitude: dict[str, torch.Tensor] = {}
        self.rounding_scale: dict[str, torch.Tensor] = {}
        # Structurally null parameters (tracking.null_params, set by the route): their whole update is the rest's.
        self.null: frozenset[str] = frozenset()

    @staticmethod
    def _group_index(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> dict[str, int]:
        owner = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [name for name, p in params.items() if id(p) not in owner]
        if missing and len(missing) == len(params):  # (freezing them all is not the fix: another model's optimizer)
            raise ValueError(
                f"the optimizer owns none of the tracked model's {len(params)} trainable parameters (another "
                "model's optimizer?): pass the optimizer that trains this model"
            )
        if missing:
            raise ValueError(
                f"trainable parameters {missing[:5]} are not owned by the optimizer: add them to it, "
                "or freeze them with requires_grad_(False) so the ledger does not expect them to move"
            )
        tracked = {id(p) for p in params.values()}
        # Frozen parameters the optimizer holds (AdamW(model.parameters()) with some frozen) get no
        # gradient, so PyTorch's optimizers skip them: they never move (capture() refuses a step where one
        # still has a .grad from before it was frozen).
        extra = [p.shape for group in optimizer.param_groups for p in group["params"]
                 if id(p) not in tracked and p.requires_grad]
        if extra:
            raise ValueError(
                f"the optimizer owns {len(extra)} parameter(s) (shapes {[tuple(s) for s in extra[:5]]}) that "
                "are not trainable parameters of the tracked model: track the model that owns them, or "
                "give the tracker an optimizer over this model only"
            )
        return {name: owner[id(p)] for name, p in params.items()}

    def _check_untracked_gradients(self) -> None:
        """Refuse a step that would move a parameter the split does not follow: PyTorch's optimizers
        step every parameter whose ``.grad`` is not None, ``requires_grad`` or not, so a frozen
        parameter the optimizer holds with a gradient left from before it was frozen (a
        ``zero_grad(set_to_none=False)`` loop keeps it as zeros) moves by its weight decay, momentum
        or Adam moments: a change of the model no group, rest or check would see."""
        tracked = {id(p) for p in self.params.values()}
        stale = [tuple(p.shape) for group in self.optimizer.param_groups for p in group["params"]
                 if id(p) not in tracked and p.grad is not None]
        if stale:
            raise ValueError(
                f"the optimizer holds {len(stale)} frozen parameter(s) (shapes {stale[:5]}) that still have a .grad: "
                "PyTorch's optimizers step every parameter with a gradient, requires_grad or not, so they would move "
                "(weight decay, momentum, Adam's moments) outside the tracked split. Set their .grad to None before the "
                "step (p.grad = None once after freezing them, or optimizer.zero_grad() with its default "
                "set_to_none=True), or leave them out of the optimizer"
            )

    def _stepped_in(self, index: int) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of parameter group ``index`` that this step moves (a gradient; read in
        :meth:`capture`, which fills :attr:`skipped`)."""
        return [(name, p) for name, p in self.params.items()
                if self.group_of[name] == index and name not in self.skipped]

    # -- the optimizer's rule, written once -------------------------------------------------
    @staticmethod
    def advance(state: torch.Tensor | None, grads: torch.Tensor, h: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One step of the optimizer's linear recurrence on rows ``grads`` (any trailing shape).

        ``state``: the rows' state before the step (left as it is: a rolled-back step keeps it), or
        None when the optimizer starts its state at this step. Returns ``(new state, update
        directions)``: the new state a new array, written in one pass where the rule allows (None
        for a stateless rule); the directions in the rows' shape.
        """
        raise NotImplementedError

    def preconditioner(self, name: str) -> float | torch.Tensor:
        """D for parameter ``name``, read after the real step: the update of a row is D ⊙ direction
        (a number, or a float64 tensor of the parameter's shape)."""
        raise NotImplementedError

    def prepare(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """The rows' gradients as the recurrence takes them (RMSprop: preconditioned first)."""
        return grads

    # -- lifecycle ---------------------------------------------------------------------------
    def capture(self) -> None:
        """Read hyperparameters (and the pre-existing state on the first step) before the step, and
        which parameters the optimizer will skip (no gradient)."""
        self.skipped = {name for name, p in self.params.items() if p.grad is None}
        # Re-read which parameter group holds each parameter: the set of parameters is checked by the
        # tracker, but a parameter moved between groups steps with its new group's hyperparameters.
        self.group_of = self._group_index(self.optimizer, self.params)
        self._check_untracked_gradients()
        for name, p in self.params.items():
            group = self.optimizer.param_groups[self.group_of[name]]
            self.hyper[name] = self._hyperparameters(group)
            # The optimizer's own buffer matters only until the splitter keeps its own split copy.
            if name not in self.state and self.state_key is not None:
                existing = self.optimizer.state.get(p, {}).get(self.state_key)
                self.before[name] = None if existing is None else existing.detach().clone()

    def split(
        self,
        group_grads: dict[str, torch.Tensor],
        theta_before: dict[str, torch.Tensor],
        rounding: dict[str, dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Per-row updates ``{name: Tensor[R + 1 + Π, *shape]}`` in the state dtype: rows 0..R−1 the
        groups of every partition, row R the rest, then one rounding row per partition.

        ``rounding``: ``{partition: {name: gap}}``, the optimizer's batched gradient minus the
        partition's Σ_g group gradients (rounding only). Each is its own pseudo-group, carried
        through the optimizer's state like any other, so a partition's rows add up to the real update
        (Adam magnifies the gap where a gradient cancels) while its effect on the probes stays in the
        residual, as rounding should.
        """
        updates = {}
        self.rounding_scale = {}
        self.discard()
        first = self.partitions.slices[self.partitions.primary]
        for name in self.params:
            if name in self.skipped:  # no row moves it; its rows' state is kept as it is
                updates[name] = torch.zeros((self.num_rows, *group_grads[name].shape[1:]), dtype=self.dtype,
                                            device=group_grads[name].device)
                continue
            h = self.hyper[name]
            decay = h["weight_decay"]
            theta = theta_before[name].to(self.dtype) if decay != 0 else None
            # Every row (R + 1 + Π of them) in one array written in place: on a large model each
            # fresh R × P array costs its page faults, about three passes over it on CPU.
            full = self._rows_of(group_grads[name], [rounding[partition][name] for partition in self.partitions.names])
            if h.get("maximize", False):
                full.neg_()
                full[self.rows].zero_()  # +0, not −0
            # The rest's "gradient": coupled weight decay λθ_k (zero when decoupled or absent).
            if decay != 0 and not h.get("decoupled", False):
                torch.mul(theta, decay, out=full[self.rows])
            full = self.prepare(name, full)
            before = self._state_before(name, full)
            if name in self.null:
                # A structurally null parameter (tracking.null_params): its group rows are rounding noise that an
                # adaptive optimizer turns into a move no example caused. Every row of its gradients and state goes to
                # the rest row (one partition's rows, the rest and its rounding row add up to the whole): each
                # partition's rows still add up to the update, the groups' are zero. (The rounding scale below is
                # that of the rows as they were.)
                size_rows = full.clone()
                full = self._collapsed(full)
                before = None if before is None else self._collapsed(before.clone())
            else:
                size_rows = full
            # 1. The recurrence on every row (the optimizer's own buffer goes to the rest row).
            state, direction = self.advance(before, full, h)
            preconditioner = self.preconditioner(name)
            if state is not None:
                self.pending[name] = state
                # 2. The rounding scale: the same recurrence on the magnitudes of one partition's rows.
                primary = self.rounding_rows[self.partitions.primary]
                size = (abs_row_sum(size_rows[first]).add_(size_rows[self.rows].abs()).add_(size_rows[primary].abs())
                        .unsqueeze(0))
                previous = self.magnitude.get(name)
                if previous is None and self.before.get(name) is not None:
                    previous = self.before[name].abs().to(self.dtype).unsqueeze(0)
                magnitude, _ = self.advance(previous, size, h)
                self.pending_magnitude[name] = magnitude
                self.rounding_scale[name] = (preconditioner * magnitude[0]).abs()
            # 3. u = D ⊙ direction, written over the rows' gradients (no longer needed: the state
            # and direction are computed), and decoupled weight decay in the rest row.
            update = torch.mul(direction, preconditioner, out=full)
            if h.get("decoupled", False) and decay != 0:
                # The optimizer multiplies θ by (1 − η λ) rounded to the parameter's dtype: in float32
                # 1 − 1e-6 is 1 − 1.0133e-6, a decay 1.3 % larger than η λ (enough to fail the step's
                # check on a weight near 1), and 1 − 1e-10 is 1, no decay at all. The rest row books
                # the decay applied, 1 − fl(1 − η λ).
                # A tensor lr or weight decay makes 1 − η λ a tensor of its dtype (float32: rounded there).
                update[self.rows] -= self._decay_applied(theta_before[name], theta, h)
            updates[name] = update
        return updates

    def _collapsed(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` ``[R + 1 + Π, *shape]`` with the primary partition's groups and rounding row added into the rest
        row and every other row zero (in place; returned)."""
        first = self.partitions.slices[self.partitions.primary]
        rows[self.rows] += rows[first].sum(dim=0) + rows[self.rounding_rows[self.partitions.primary]]
        rows[: self.rows].zero_()
        rows[self.rows + 1:].zero_()
        return rows

    @staticmethod
    def _decay_applied(theta_before: torch.Tensor, theta: torch.Tensor, h: dict[str, Any]) -> torch.Tensor:
        """θ_k − θ_k (1 − η λ) as the rest books it, (1 − fl(1 − η λ)) θ_k (``theta``: θ_k in the state dtype)."""
        factor = torch.tensor(h.get("decay_factor", 1.0 - float(h["lr"]) * h["weight_decay"]),
                              dtype=theta_before.dtype).item()
        return (1.0 - factor) * theta

    def _rows_of(self, grads: torch.Tensor, gaps: list[torch.Tensor]) -> torch.Tensor:
        """``[R + 1 + Π, *shape]`` in the state dtype: the group gradients, a zero rest row and the
        partitions' rounding gaps (copied in, converted in the copy)."""
        full = torch.empty((self.num_rows, *grads.shape[1:]), dtype=self.dtype, device=grads.device)
        full[: self.rows].copy_(grads)
        full[self.rows].zero_()
        for offset, gap in enumerate(gaps, start=self.rows + 1):
            full[offset].copy_(gap)
        return full

    def commit(self) -> None:
        """Keep this step's new state (the step was recorded)."""
        for name, state in self.pending.items():
            self.state.setdefault(name, {})[self.state_key] = state
        self.magnitude.update(self.pending_magnitude)
        self.discard()

    def discard(self) -> None:
        """Forget this step's new state (the step was rolled back)."""
        self.pending, self.pending_magnitude = {}, {}

    def current(self, name: str) -> torch.Tensor | None:
        """The rows' state of ``name`` after this step's split (before commit), else the committed one."""
        if name in self.pending:
            return self.pending[name]
        return self.state.get(name, {}).get(self.state_key)

    def _state_before(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """The rows' state before this step (read, not written: :meth:`advance` makes a new one):
        the splitter's own, else None when the optimizer starts its state now, else zeros with the
        optimizer's pre-existing buffer in the rest row (no tracked example caused it)."""
        if self.state_key is None:
            return None
        own = self.state.get(name, {}).get(self.state_key)
        if own is not None:
            return own
        existing = self.before.get(name)
        if existing is None:
            return None
        state = torch.zeros_like(like)
        state[self.rows] = existing.to(self.dtype)
        return state

    def check_state(self, rtol: float) -> None:
        """Raise when a partition's summed state differs from the optimizer's own buffer."""
        if self.state_key is None:
            return
        for name, p in self.params.items():
            rows = self.current(name)
            if rows is None:
                continue
            # Under maximize both the optimizer and the rows hold the negated gradients' state.
            own = self.optimizer.state.get(p, {}).get(self.state_key)
            if own is None:
                # The groups hold state the optimizer no longer has: its state was cleared, and this
                # parameter (no gradient at this step) was skipped, so PyTorch has not started it again.
                raise LedgerCheckError(
                    f"parameter '{name}': the groups hold its {self.state_key} but the optimizer has none; "
                    f"{self._state_changed_hint}"
                )
            reference = own.to(torch.float64)
            for partition, part in self.partitions.slices.items():
                total, size = rows_sum_and_size(rows, part, [self.rows, self.rounding_rows[partition]])
                scale = reference.norm() + size.norm()
                gap = _relative_gap(total, reference, scale)
                if gap > rtol:
                    where = "" if len(self.partitions) == 1 else f" of partition '{partition}'"
                    raise LedgerCheckError(
                        f"parameter '{name}': the groups' {self.state_key}{where} sums to something other than the "
                        f"optimizer's {self.state_key} (relative gap {gap:.2e} > {rtol:.0e}); {self._state_changed_hint}"
                    )

    _state_changed_hint = (
        "was the optimizer's state loaded, reset or edited since the tracker's previous step "
        "(optimizer.load_state_dict, optimizer.state.clear())? The split cannot follow state it did not see: build a "
        "new tracker after changing the optimizer's state. When resuming: optimizer.load_state_dict(sd) keeps the "
        "tensors of sd (same dtype and device) and steps them in place, so a state dict held in memory and loaded "
        "again (a second resume in one process) holds the moments of the run that loaded it first: load from the "
        "checkpoint file or from copy.deepcopy(sd)"
    )

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": {n: {k: v.clone() for k, v in s.items()} for n, s in self.state.items()},
            "magnitude": {n: v.clone() for n, v in self.magnitude.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {n: {k: v.clone() for k, v in s.items()} for n, s in state["state"].items()}
        self.magnitude = {n: v.clone() for n, v in state.get("magnitude", {}).items()}

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class SGDSplitter(UpdateSplitter):
    """torch.optim.SGD: momentum μ, dampening τ, Nesterov, coupled weight decay λ.

    PyTorch adds λθ_k to the gradient before the buffer and its very first step sets the buffer
    to the gradient without dampening: b_1 = g_1, b_k = μ b_{k−1} + (1 − τ) g_k;
    u = −η b, or −η (g + μ b) with Nesterov.
    """

    state_key = "momentum_buffer"

    def _hyperparameters(self, group):
        return {
            "lr": _scalar(group["lr"]),
            "momentum": _scalar(group.get("momentum", 0.0)),
            "dampening": _scalar(group.get("dampening", 0.0)),
            # As PyTorch's alpha=1 − τ: a float32 tensor τ gives a float32 1 − τ (rounded in float32).
            "undamped": one_minus(group.get("dampening", 0.0)),
            "nesterov": bool(group.get("nesterov", False)),
            "weight_decay": _scalar(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }

    @staticmethod
    def advance(state, grads, h):
        mu = h["momentum"]
        if mu == 0:
            return None, grads
        if state is None:
            state = grads.clone()  # PyTorch's first step: b_1 = g_1
        else:
            state = torch.mul(state, mu).add_(grads, alpha=h.get("undamped", 1 - h["dampening"]))
        return state, (grads + mu * state if h["nesterov"] else state)

    def preconditioner(self, name):
        return -self.hyper[name]["lr"]


def _first_moment(state, grads, h):
    """m_k = lerp(m_{k−1}, ĝ_k, 1 − β1) as torch.optim's Adam, Adamax, RAdam and NAdam update their
    ``exp_avg`` (from zeros on the first step: (1 − β1) ĝ_1), in one pass."""
    if state is None:
        return torch.mul(grads, 1 - h["beta1"])
    return torch.lerp(state, grads, 1 - h["beta1"])


def _first_moment_advance(state, grads, h):
    """:meth:`UpdateSplitter.advance` for a rule whose direction is the first moment itself."""
    state = _first_moment(state, grads, h)
    return state, state


class AdamSplitter(UpdateSplitter):
    """torch.optim.Adam and AdamW (amsgrad and maximize too).

    Per-group first moments m_{k,g} = β1 m_{k−1,g} + (1 − β1) ĝ_{k,g}; the shared second moment v_k
    (or its running maximum with amsgrad) and the step counter k are the optimizer's own:
    u_{k,g} = −η (m_{k,g} / (1 − β1^k)) ⊘ (sqrt(v_k / (1 − β2^k)) + ε). Coupled decay is the rest
    pseudo-group's gradient; decoupled decay (AdamW) adds −η λ θ_k to the rest.
    """

    state_key = "exp_avg"

    def __init__(self, optimizer, params, partitions, dtype=torch.float64):
        super().__init__(optimizer, params, partitions, dtype)
        self._adamw = isinstance(optimizer, torch.optim.AdamW)
        self._check_tensor_hyperparameters()

    def capture(self) -> None:
        super().capture()
        self._check_tensor_hyperparameters()  # a scheduler may have set them since

    def _check_tensor_hyperparameters(self) -> None:
        """Refuse lr or betas held as tensors less precise than the parameters: PyTorch's Adam (not
        fused) then computes its step size and bias corrections in the tensor's dtype (float32 for
        ``lr=torch.tensor(1e-3)``), a rounding of the whole update the split, in the parameters'
        precision, cannot reproduce to the checks' tolerance."""
        for name, p in self.params.items():
            group = self.optimizer.param_groups[self.group_of[name]]
            if group.get("fused"):
                continue
            beta1, beta2 = group["betas"]
            for key, value in (("lr", group["lr"]), ("betas[0]", beta1), ("betas[1]", beta2)):
                _refuse_imprecise_tensor(type(self.optimizer).__name__, key, value, name, p,
                                         "PyTorch computes Adam's step size and bias corrections in the tensor's dtype")

    def _hyperparameters(self, group):
        beta1, beta2 = group["betas"]
        return {
            "lr": _scalar(group["lr"]),
            "beta1": _scalar(beta1),
            "beta2": _scalar(beta2),
            "eps": _scalar(group["eps"]),
            "weight_decay": _scalar(group.get("weight_decay", 0.0)),
            "amsgrad": bool(group.get("amsgrad", False)),
            "maximize": bool(group.get("maximize", False)),
            "decoupled": bool(group.get("decoupled_weight_decay", self._adamw)),
            # PyTorch's param.mul_(1 − lr·λ) (single-tensor and foreach): with lr or λ a tensor, 1 − lr·λ is a
            # tensor of its dtype. The fused kernel computes in the parameters' precision: left to the default.
            **({} if group.get("fused") else
               {"decay_factor": _scalar(decay_multiplier(group))}),
        }

    advance = staticmethod(_first_moment_advance)

    def preconditioner(self, name):
        h = self.hyper[name]
        opt_state = self.optimizer.state[self.params[name]]
        step = _scalar(opt_state["step"])
        second = opt_state["max_exp_avg_sq" if h["amsgrad"] else "exp_avg_sq"].to(self.dtype)
        denom = second.sqrt() / (1 - h["beta2"] ** step) ** 0.5 + h["eps"]
        return -(h["lr"] / (1 - h["beta1"] ** step)) / denom


class RMSpropSplitter(UpdateSplitter):
    """torch.optim.RMSprop (momentum, centered, coupled weight decay, maximize).

    a_k = sqrt(v_k) + ε (centered: sqrt(v_k − ḡ_k²) + ε), read from the optimizer after its step.
    Without momentum u_{k,g} = −η ĝ_{k,g} ⊘ a_k; with momentum the buffer holds preconditioned
    gradients, b_{k,g} = μ b_{k−1,g} + ĝ_{k,g} ⊘ a_k, u_{k,g} = −η b_{k,g}.
    """

    state_key = "momentum_buffer"

    def _hyperparameters(self, group):
        return {
            "lr": _scalar(group["lr"]),
            "eps": _scalar(group["eps"]),
            "momentum": _scalar(group.get("momentum", 0.0)),
            "centered": bool(group.get("centered", False)),
            "weight_decay": _scalar(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }

    def prepare(self, name, grads):
        h = self.hyper[name]
        opt_state = self.optimizer.state[self.params[name]]
        square = opt_state["square_avg"].to(self.dtype)
        if h["centered"]:
            square = square - opt_state["grad_avg"].to(self.dtype) ** 2
        return grads / (square.sqrt() + h["eps"])

    @staticmethod
    def advance(state, grads, h):
        mu = h["momentum"]
        if mu == 0:
            return None, grads
        state = grads.clone() if state is None else torch.mul(state, mu).add_(grads)
        return state, state

    def preconditioner(self, name):
        return -self.hyper[name]["lr"]


class _ReadAfterStepSplitter(UpdateSplitter):
    """Adagrad, Adamax, RAdam, NAdam, Adafactor, Adadelta and ASGD: each step is linear in the gradients given
    what is read from the optimizer after it (its step count, second moments or sums, NAdam's μ product; Adadelta's
    accumulated update and ASGD's η from before it). Refuses the
    variants whose arithmetic the split cannot reproduce to the checks' tolerance (checked at
    construction and again before every step, as a scheduler or a loop may change them)."""

    # Hyperparameters PyTorch combines with the step count in the tensor's own dtype when they are
    # tensors (step sizes, bias corrections, NAdam's μ_k); the rest enter as exact scalars.
    step_size_keys: tuple[str, ...] = ("lr", "betas")

    def __init__(self, optimizer, params, partitions, dtype=torch.float64):
        super().__init__(optimizer, params, partitions, dtype)
        self._check_variant()

    # Why a sparse gradient is refused (Adafactor's step raises on one instead).
    sparse_consequence = "'s sparse update touches only the rows the batch used, which the dense split does not follow"

    def capture(self) -> None:
        super().capture()
        self._check_variant()
        for name, p in self.params.items():
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(
                    f"parameter '{name}' has a sparse gradient: {type(self.optimizer).__name__}"
                    f"{self.sparse_consequence}. Build the layer with dense gradients (nn.Embedding(..., sparse=False))"
                )

    def _check_variant(self) -> None:
        kind = type(self.optimizer).__name__
        for name, p in self.params.items():
            group = self.optimizer.param_groups[self.group_of[name]]
            for flag, why in (
                ("differentiable", "steps inside autograd, for differentiating through the optimizer"),
                ("capturable", "forms its step sizes and bias corrections as float32 tensors on the device"),
            ):
                if group.get(flag):
                    raise ValueError(
                        f"{kind}({flag}=True) {why}: the exact split does not follow it. Build the optimizer with "
                        f"{flag}=False (the default)"
                    )
            if group.get("fused"):  # Adagrad's fused kernel forms its step size in float64 from lr's value
                continue
            for key in self.step_size_keys:
                values = group.get(key)
                pairs = ([(f"{key}[{i}]", v) for i, v in enumerate(values)] if isinstance(values, (tuple, list))
                         else [(key, values)])
                for label, value in pairs:
                    _refuse_imprecise_tensor(kind, label, value, name, p,
                                             f"PyTorch forms {kind}'s step size in the tensor's dtype on one code path "
                                             "and in float64 on the other (foreach)")

    def _common(self, group, **extra) -> dict[str, Any]:
        decay = group.get("weight_decay", 0.0)
        return {
            "lr": _scalar(group["lr"]),
            "eps": _scalar(group["eps"]),
            "weight_decay": _scalar(decay),
            "maximize": bool(group.get("maximize", False)),
            **extra,
        }

    def _adam_like(self, group, **extra) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        decoupled = bool(group.get("decoupled_weight_decay", False))
        return self._common(
            group, beta1=_scalar(beta1), beta2=_scalar(beta2), decoupled=decoupled,
            # param.mul_(1 − lr·λ): with λ (or lr) a tensor, 1 − lr·λ is a tensor of its dtype, rounded there.
            decay_factor=_scalar(decay_multiplier(group)), **extra,
        )

    def _step(self, name: str) -> float:
        return _scalar(self.optimizer.state[self.params[name]]["step"])


class _NoLinearStateSplitter(_ReadAfterStepSplitter):
    """Adagrad, Adafactor, Adadelta and ASGD: no linear state per row. A group's update is its gradient times
    what :meth:`preconditioner` reads from the optimizer around the step, so the rows advance as the
    gradients themselves."""

    state_key = None

    @staticmethod
    def advance(state, grads, h):
        return None, grads


class AdagradSplitter(_NoLinearStateSplitter):
    """torch.optim.Adagrad (lr_decay, coupled weight decay, initial_accumulator_value, maximize, foreach,
    fused).

    No linear state: u_{k,g} = −η_k ĝ_{k,g} ⊘ (sqrt(s_k) + ε) with η_k = η / (1 + (k − 1) lr_decay)
    and the optimizer's sum s_k = s_0 + Σ_{j≤k} ĝ_j² read after its step (s_0 the initial accumulator
    value). Coupled decay λθ_k is the rest's gradient (it enters s_k too, as in PyTorch).
    """

    step_size_keys = ("lr", "lr_decay")

    def _hyperparameters(self, group):
        return self._common(group, lr_decay=_scalar(group.get("lr_decay", 0.0)))

    def preconditioner(self, name):
        h = self.hyper[name]
        step = self._step(name)
        clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])  # as PyTorch: step a Python float
        total = self.optimizer.state[self.params[name]]["sum"].to(self.dtype)
        return -clr / (total.sqrt() + h["eps"])


class AdamaxSplitter(_ReadAfterStepSplitter):
    """torch.optim.Adamax (coupled weight decay, maximize).

    Per-group first moments as Adam's, m_{k,g} = β1 m_{k−1,g} + (1 − β1) ĝ_{k,g}; the infinity norm
    u_k = max(β2 u_{k−1}, |ĝ_k| + ε) is the optimizer's own, read after its step:
    u_{k,g} = −η / (1 − β1^k) · m_{k,g} ⊘ u_k.
    """

    state_key = "exp_avg"
    advance = staticmethod(_first_moment_advance)

    def _hyperparameters(self, group):
        beta1, beta2 = group["betas"]
        return self._common(group, beta1=_scalar(beta1), beta2=_scalar(beta2))

    def preconditioner(self, name):
        h = self.hyper[name]
        clr = h["lr"] / (1 - h["beta1"] ** self._step(name))
        return -clr / self.optimizer.state[self.params[name]]["exp_inf"].to(self.dtype)


class RAdamSplitter(_ReadAfterStepSplitter):
    """torch.optim.RAdam (coupled or decoupled weight decay, maximize).

    Per-group first moments as Adam's; with ρ_∞ = 2 / (1 − β2) − 1 and
    ρ_k = ρ_∞ − 2k β2^k / (1 − β2^k), the branch is chosen per step and parameter (step count k):
    ρ_k > 5: u_{k,g} = −η r_k m_{k,g} / (1 − β1^k) ⊙ sqrt(1 − β2^k) / (sqrt(v_k) + ε) with
    r_k = sqrt((ρ_k − 4)(ρ_k − 2) ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2) ρ_k)); otherwise the un-adapted
    u_{k,g} = −η m_{k,g} / (1 − β1^k). v_k is the optimizer's second moment after its step.
    """

    state_key = "exp_avg"
    advance = staticmethod(_first_moment_advance)

    def _hyperparameters(self, group):
        return self._adam_like(group)

    def preconditioner(self, name):
        h = self.hyper[name]
        beta1, beta2 = h["beta1"], h["beta2"]
        step = self._step(name)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
        if not rho_t > 5.0:
            return -h["lr"] / bias_correction1
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        second = self.optimizer.state[self.params[name]]["exp_avg_sq"].to(self.dtype)
        return -(h["lr"] / bias_correction1 * rect * bias_correction2 ** 0.5) / (second.sqrt() + h["eps"])


class NAdamSplitter(_ReadAfterStepSplitter):
    """torch.optim.NAdam (momentum_decay ψ, coupled or decoupled weight decay, maximize).

    μ_k = β1 (1 − 0.96^(kψ) / 2), μ_{k+1} likewise, Π_k = Π_{j≤k} μ_j (the optimizer's
    ``mu_product``, read after its step); per-group first moments as Adam's and
    u_{k,g} = −η [(1 − μ_k) / (1 − Π_k) ĝ_{k,g} + μ_{k+1} / (1 − Π_k μ_{k+1}) m_{k,g}] ⊘ (sqrt(v_k / (1 − β2^k)) + ε).
    The rows' direction is m_{k,g} + c ĝ_{k,g} (c the ratio of the two weights) and D carries the
    first moment's weight, so the rounding scale is that of the first moment as for Adam.
    """

    state_key = "exp_avg"
    step_size_keys = ("lr", "betas", "momentum_decay")

    def _hyperparameters(self, group):
        return self._adam_like(group, momentum_decay=_scalar(group.get("momentum_decay", 4e-3)),
                               decay_multiplier=decay_multiplier(group))

    @staticmethod
    def _decay_applied(theta_before, theta, h):
        # NAdam's single-tensor step writes θ three times (param.mul_(1 − η λ), then two addcdiv_ calls),
        # each write rounded to the parameter's dtype: 1.5 ulp in all, more than the check's one rounding
        # of θ_{k+1} (float32 with lr 1e-4 and decoupled decay 0.01 failed its first steps). The rest books
        # the decay as the optimizer applied it, θ_k − fl(θ_k (1 − η λ)) (the same multiplication, exact
        # in float64), so only the two writes of the update are rounding.
        return theta - theta_before.mul(h["decay_multiplier"]).to(theta.dtype)

    def prepare(self, name, grads):
        # The step's two weights, as PyTorch forms them (Python floats; Π_k as the optimizer stored it).
        h = self.hyper[name]
        state = self.optimizer.state[self.params[name]]
        step, lr, beta1, psi = self._step(name), h["lr"], h["beta1"], h["momentum_decay"]
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        product = _scalar(state["mu_product"])
        h["grad_weight"] = -lr * (1.0 - mu) / (1.0 - product)
        h["avg_weight"] = (-lr * mu_next) / (1.0 - product * mu_next)
        return grads

    @staticmethod
    def advance(state, grads, h):
        state = _first_moment(state, grads, h)
        avg_weight = h.get("avg_weight", 1.0)
        if avg_weight == 0:  # β1 = 0: the first moment is the gradient and carries no weight of its own
            return state, grads
        return state, torch.add(state, grads, alpha=h.get("grad_weight", 0.0) / avg_weight)

    def preconditioner(self, name):
        h = self.hyper[name]
        state = self.optimizer.state[self.params[name]]
        denom = (state["exp_avg_sq"].to(self.dtype) / (1 - h["beta2"] ** self._step(name))).sqrt() + h["eps"]
        weight = h["avg_weight"] if h["avg_weight"] != 0 else h["grad_weight"]
        return weight / denom


# The sparse-gradient refusal's reason for the optimizers whose own step raises on one.
RAISES_ON_SPARSE = " does not support sparse gradients (its step raises, after earlier parameter groups have moved)"


class AdafactorSplitter(_NoLinearStateSplitter):
    """torch.optim.Adafactor (factored or full second moment, decoupled weight decay, update clipping d,
    eps1 given or None, maximize, foreach).

    No linear state: with step count k, ρ_k = min(η, 1 / sqrt(k)), α_k = max(ε2, RMS(θ_k)) ρ_k (θ_k before the
    decay), the optimizer's variance estimate V̂_k after its step (R_k C_k / max(mean(R_k), ε1) over the last two
    dims of a matrix or conv weight, the full v_k of a vector) and Q = 1 / sqrt(max(V̂_k, ε1²)),

        u_{k,g} = −α_k / c_k · Q ⊙ ĝ_{k,g},   c_k = max(1, RMS(Q ⊙ g_k) / d),

    g_k the step's whole gradient. α_k needs θ_k, so :meth:`capture` reads RMS(θ_k) before the step;
    Q and c_k are formed after it from the optimizer's own factors and the gradient it stepped on, with
    PyTorch's operations in the parameter's dtype, so both scalars are the ones the step used. The rest
    books the decay applied, θ_k − θ_k fl(1 − η λ), as AdamW's. A tensor lr is followed as PyTorch
    uses it (α_k and α_k / c_k formed in its dtype); complex parameters and sparse gradients are
    refused before the step (PyTorch refuses them mid-step, after earlier parameter groups moved), and so
    is ε1 = None in a parameter group mixing dtypes (PyTorch's two paths take ε1 from different dtypes).
    """

    step_size_keys = ()  # a tensor lr enters α_k as PyTorch forms it on both paths (preconditioner)

    def __init__(self, optimizer, params, partitions, dtype=torch.float64):
        super().__init__(optimizer, params, partitions, dtype)
        self._refuse_complex()
        self.parameter_rms: dict[str, float] = {}
        # The gradient each parameter steps on, held (not copied) from capture() until the preconditioner
        # has read its clipping denominator c_k, then only c_k (a number) is kept.
        self.gradient: dict[str, tuple[torch.Tensor, int]] = {}
        self.clip_denominator: dict[str, float] = {}

    def _refuse_complex(self) -> None:
        for name, p in self.params.items():
            if p.is_complex():
                raise TypeError(
                    f"parameter '{name}' is complex ({p.dtype}): torch.optim.Adafactor does not support complex "
                    "parameters (its step raises). Use real parameters (torch.view_as_real) or another optimizer"
                )

    sparse_consequence = RAISES_ON_SPARSE

    def capture(self) -> None:
        self._refuse_complex()
        super().capture()  # (reads the hyperparameters and refuses a sparse gradient: nothing has moved yet)
        self.gradient, self.clip_denominator, self.parameter_rms = {}, {}, {}
        for index, group in enumerate(self.optimizer.param_groups):
            stepped = [p for p in group["params"] if p.grad is not None]  # (untracked ones too: PyTorch steps them)
            eps1 = group["eps"][0]
            if eps1 is None and stepped:
                # PyTorch sets ε1 once per parameter group, from the first parameter it steps, and keeps it for the
                # group's other parameters whatever their dtype; which one is first differs between the
                # single-tensor and foreach paths (foreach orders the parameters by dtype) when the dtypes differ.
                dtypes = sorted({str(p.dtype) for p in stepped})
                if len(dtypes) > 1:
                    raise ValueError(
                        f"Adafactor's parameter group {index} mixes parameter dtypes ({', '.join(dtypes)}) with "
                        "eps=(None, ...): PyTorch then takes ε1 from one dtype's eps for all of them, and which one "
                        "depends on the code path (single-tensor or foreach). Give ε1 explicitly (eps=(1e-16, 1e-3)), "
                        "or put each dtype in a parameter group of its own"
                    )
                eps1 = torch.finfo(stepped[0].dtype).eps
            for name, p in self._stepped_in(index):
                self.hyper[name]["eps1"] = eps1
                # RMS(θ_k) before the decoupled decay, as PyTorch reads it: a Python float from the parameter's norm.
                self.parameter_rms[name] = p.detach().norm(2).item() / (p.numel() ** 0.5)
                self.gradient[name] = (p.grad, p.grad._version)

    def _hyperparameters(self, group):
        return {
            "lr": _scalar(group["lr"]),
            # As PyTorch's _to_scalar(lr): a tensor lr (squeezed to 0-dim) makes ρ_k and α_k tensors of its dtype.
            "step_lr": _plain(group["lr"]),
            "eps2": group["eps"][1],
            "d": group["d"],
            "weight_decay": _scalar(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
            "decoupled": True,
            "decay_factor": _scalar(decay_multiplier(group)),
        }

    def _inverse_root(self, name: str, eps1: Any) -> torch.Tensor:
        """Q = 1 / sqrt(max(V̂_k, ε1²)) from the optimizer's state after its step, with PyTorch's operations in
        the parameter's dtype (bit for bit the Q its step multiplied the gradient by): parameter-shaped."""
        state = self.optimizer.state[self.params[name]]
        if "row_var" in state:
            row_var, col_var = state["row_var"], state["col_var"]
            estimate = row_var @ col_var
            estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            estimate = state["variance"].clone()
        return estimate.clamp_(min=eps1 * eps1).rsqrt_()

    def preconditioner(self, name):
        h = self.hyper[name]
        inverse_root = self._inverse_root(name, h["eps1"])
        if name not in self.clip_denominator:
            grad, version = self.gradient.pop(name)
            if grad._version != version:
                raise LedgerCheckError(
                    f"parameter '{name}': its gradient was changed in place after the optimizer step began, so the "
                    "split cannot read the update clipping Adafactor applied; leave the gradients as they are until "
                    "the tracker has recorded the step"
                )
            # PyTorch's update Q ⊙ g (under maximize Q ⊙ (−g): the same norm), its RMS over d, at least 1.
            update = inverse_root * grad
            self.clip_denominator[name] = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * h["d"]))
            del update
        step = self._step(name)
        rho = min(h["step_lr"], 1 / (step ** 0.5))
        alpha = max(h["eps2"], self.parameter_rms[name]) * rho
        scale = _scalar(-alpha / self.clip_denominator[name])
        return inverse_root.to(self.dtype).mul_(scale)


class AdadeltaSplitter(_NoLinearStateSplitter):
    """torch.optim.Adadelta (coupled weight decay, maximize, foreach; a tensor lr).

    No linear state: with the optimizer's square average v_k after its step (v_k = ρ v_{k−1} + (1 − ρ) g_k²) and
    its accumulated update a_{k−1} *before* the step (zeros on its first step),

        u_{k,g} = −η sqrt(a_{k−1} + ε) ⊘ sqrt(v_k + ε) ⊙ ĝ_{k,g}.

    a_{k−1} is gone once the step has updated it (a_k = ρ a_{k−1} + (1 − ρ) δ_k², δ_k the whole update over η, not
    linear in the gradient), so :meth:`capture` copies it before the step: one copy of the parameters in their
    dtype, held until the step is recorded. Coupled decay λθ_k is the rest's gradient (it enters v_k too). A tensor
    lr is followed as it is: PyTorch uses it only as the final ``alpha`` (its value, on both code paths).
    """

    step_size_keys = ()  # lr enters only as param.add_(δ, alpha=−lr): its value, whatever its dtype
    sparse_consequence = RAISES_ON_SPARSE

    def __init__(self, optimizer, params, partitions, dtype=torch.float64):
        super().__init__(optimizer, params, partitions, dtype)
        # name -> the optimizer's acc_delta before this step (None: the optimizer starts it now, from zeros).
        self.accumulated_before: dict[str, torch.Tensor | None] = {}

    def capture(self) -> None:
        super().capture()
        self.accumulated_before = {}
        for name, p in self.params.items():
            if name in self.skipped:  # no gradient: the optimizer leaves its acc_delta as it is
                continue
            existing = self.optimizer.state.get(p, {}).get("acc_delta")
            self.accumulated_before[name] = None if existing is None else existing.detach().clone()

    def commit(self) -> None:
        super().commit()
        self.accumulated_before = {}  # the copy is needed only until the step is recorded

    def _hyperparameters(self, group):
        return self._common(group, rho=_scalar(group["rho"]))

    def preconditioner(self, name):
        h = self.hyper[name]
        eps = h["eps"]
        before = self.accumulated_before[name]
        numerator = eps ** 0.5 if before is None else before.to(self.dtype).add(eps).sqrt_()  # (the copy kept)
        square_avg = self.optimizer.state[self.params[name]]["square_avg"].to(self.dtype)
        return (-h["lr"] * numerator) / square_avg.add(eps).sqrt_()


def _uses_foreach(group: dict[str, Any]) -> bool:
    """Whether PyTorch steps parameter group ``group`` on its foreach path: ``foreach`` as given, else PyTorch's
    own default for the parameters it will step (those with a gradient): foreach on CUDA and other accelerators,
    single-tensor on CPU."""
    foreach = group.get("foreach")
    if foreach is None:
        stepped = [p for p in group["params"] if p.grad is not None]
        foreach = _default_to_fused_or_foreach(stepped, bool(group.get("differentiable", False)), use_fused=False)[1]
    return bool(foreach)


class ASGDSplitter(_NoLinearStateSplitter):
    """torch.optim.ASGD (coupled weight decay, the decay term λ_d, maximize, foreach; a tensor lr).

    No linear state: with η_k the step size the optimizer holds *before* its step (its ``eta``: the learning rate on
    the first step, rounded to the default scalar dtype, then η_{k+1} = lr / (1 + λ_d lr k)^α computed after step
    k from the lr of that step),

        θ_{k+1} = θ_k (1 − λ_d η_k) − η_k (g_k + λ θ_k),   u_{k,g} = −η_k ĝ_{k,g},

    and the rest books the coupled decay, −η_k λ θ_k, and the decay term, −λ_d η_k θ_k. :meth:`capture` reads η_k
    before the step (the step overwrites it), never recomputed: the foreach path forms η_{k+1} from its float32 step
    count in float32 arithmetic, the single-tensor path in float64. The single-tensor path applies the decay term first,
    ``param.mul_(1 − λ_d η_k)``, a write rounded to the parameters' dtype that the rest books as applied,
    θ_k − fl(θ_k (1 − λ_d η_k)); the foreach path folds λ_d θ_k into the gradient, −η_k λ_d θ_k exactly. The
    average ``ax`` the optimizer keeps is not the parameters and is not tracked.
    """

    step_size_keys = ()  # lr enters only through eta, read from the optimizer's state before the step
    sparse_consequence = RAISES_ON_SPARSE

    def capture(self) -> None:
        super().capture()
        for index, group in enumerate(self.optimizer.param_groups):
            foreach = _uses_foreach(group)
            for name, p in self._stepped_in(index):
                eta = self.optimizer.state.get(p, {}).get("eta")
                if eta is None:  # PyTorch's first step starts eta from lr, as a tensor of the default scalar dtype
                    eta = torch.as_tensor(_plain(group["lr"]), dtype=_get_scalar_dtype())
                h = self.hyper[name]
                h["eta"], h["foreach"] = _scalar(eta), foreach
                # As PyTorch's single-tensor path forms it: 1 − λ_d · eta.item() (a tensor λ_d keeps its dtype).
                h["decay_term_multiplier"] = 1 - h["lambd_plain"] * h["eta"]

    def _hyperparameters(self, group):
        return {
            "lr": _scalar(group["lr"]),
            "lambd": _scalar(group["lambd"]),
            "lambd_plain": _plain(group["lambd"]),
            "weight_decay": _scalar(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }

    def preconditioner(self, name):
        return -self.hyper[name]["eta"]

    def split(self, group_grads, theta_before, rounding):
        updates = super().split(group_grads, theta_before, rounding)
        for name, update in updates.items():
            if name in self.skipped:
                continue
            h = self.hyper[name]
            if h["lambd"] == 0:
                continue
            theta = theta_before[name]
            if h["foreach"]:
                update[self.rows] -= theta.to(self.dtype) * (h["lambd"] * h["eta"])
            else:
                update[self.rows] -= theta.to(self.dtype) - theta.mul(h["decay_term_multiplier"]).to(self.dtype)
        return updates


# Each supported optimizer's splitter (the exact class: a subclass may change the rule).
SPLITTERS: dict[type, type[UpdateSplitter]] = {
    torch.optim.SGD: SGDSplitter, torch.optim.Adam: AdamSplitter, torch.optim.AdamW: AdamSplitter,
    torch.optim.RMSprop: RMSpropSplitter, torch.optim.Adagrad: AdagradSplitter, torch.optim.Adamax: AdamaxSplitter,
    torch.optim.RAdam: RAdamSplitter, torch.optim.NAdam: NAdamSplitter, torch.optim.Adafactor: AdafactorSplitter,
    torch.optim.Adadelta: AdadeltaSplitter, torch.optim.ASGD: ASGDSplitter,
}
SUPPORTED_OPTIMIZERS = ", ".join(f"torch.optim.{kind.__name__}" for kind in SPLITTERS)


# Why the split cannot follow some of torch.optim's other optimizers: their step is not linear in the gradient
# given what the optimizer holds, so no sum of per-group updates reproduces it.
NOT_LINEAR = {
    "Muon": "Muon orthogonalizes its momentum (Newton–Schulz iterations), a non-linear map of the gradients",
    "Rprop": "Rprop steps by the sign of each gradient coordinate, not by its size",
    "LBFGS": "L-BFGS evaluates the loss several times a step and solves for its direction from past gradients",
    "SparseAdam": "SparseAdam updates only the rows a sparse gradient touches",
}


def make_splitter(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], partitions: Partitions,
                  dtype: torch.dtype = torch.float64) -> UpdateSplitter:
    """The splitter for ``optimizer``; a clear error names the supported optimizers (and, for the ones whose
    step is not linear in the gradient, why)."""
    kind = type(optimizer)
    if kind in SPLITTERS:
        return SPLITTERS[kind](optimizer, params, partitions, dtype)
    reason = NOT_LINEAR.get(kind.__name__) if kind.__module__.startswith("torch.optim") else None
    why = f" ({reason}, which no split of the update into groups can follow)" if reason else ""
    raise TypeError(
        f"{kind.__module__}.{kind.__name__} is not supported{why}: the ledger must reproduce the optimizer's "
        f"update exactly, and genkernel knows how for {SUPPORTED_OPTIMIZERS}"
    )


__all__ = ["SPLITTERS", "SUPPORTED_OPTIMIZERS", "ASGDSplitter", "AdadeltaSplitter", "AdafactorSplitter", "AdagradSplitter", "AdamSplitter", "AdamaxSplitter",
           "NAdamSplitter", "RAdamSplitter", "RMSpropSplitter", "SGDSplitter", "UpdateSplitter", "make_splitter",
           "one_minus"]
