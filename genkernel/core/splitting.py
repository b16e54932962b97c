"""Optimizer-aware update splitting (DESIGN.md section 2, "Update splitting").

An optimizer step Δ_k is written as Σ_g u_{k,g} + u_{k,rest}: one update per group of training
contributions plus a rest that no example caused (weight decay, optimizer state that existed
before tracking began). Each splitter keeps per-group copies of the optimizer's linear state
(momentum buffers, first moments) in float64, exactly as PyTorch updates its own, and reads the
optimizer's nonlinear shared state (Adam's second moment, RMSprop's square average) after the
real step.

Lifecycle per step: ``capture()`` before ``optimizer.step()`` (hyperparameters of every
parameter group, which may change between steps, and the pre-existing state on the first tracked
step); the real step; ``split(group_grads, theta_before, rounding)`` returning
``{name: [G + 2, *shape]}`` (row G is the rest, row G + 1 the batched gradient's rounding gap);
``check_state()`` comparing the summed group state with the optimizer's.

Memory: every per-group state is ``(G + 2) × P`` float64 values (one copy of the parameters per
group): fine for tens of groups, large for one group per example on a big model.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import LedgerCheckError

SUPPORTED_OPTIMIZERS = "torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop"


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _relative_gap(total: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> float:
    gap = (total - reference).norm()
    return _scalar(gap / scale.clamp_min(torch.finfo(torch.float64).tiny))


class UpdateSplitter:
    """Base class: maps group gradients to group updates for one optimizer."""

    state_names: tuple[str, ...] = ()  # per-group float64 state kept by the splitter
    optimizer_buffer: str | None = None  # optimizer state entry equal to Σ over groups

    def __init__(self, optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], num_groups: int):
        self.optimizer = optimizer
        self.params = params
        self.num_groups = num_groups
        self.group_of = self._group_index(optimizer, params)
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # name -> state_name -> [G+1, *shape]
        self.hyper: dict[str, dict[str, Any]] = {}
        self.before: dict[str, dict[str, Any]] = {}
        # The optimizer keeps its linear state in the parameters' dtype: where it cancels over
        # steps, its own rounding is relative to the magnitudes it summed, not to the result.
        # magnitude[name] follows the state's recurrence on |gradients| (one row, float64) and
        # rounding_scale[name] is the update that magnitude would make: the scale of that rounding.
        self.magnitude: dict[str, torch.Tensor] = {}
        self.rounding_scale: dict[str, torch.Tensor] = {}

    @staticmethod
    def _group_index(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> dict[str, int]:
        owner = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [name for name, p in params.items() if id(p) not in owner]
        if missing:
            raise ValueError(
                f"trainable parameters {missing[:5]} are not owned by the optimizer: add them to it, "
                "or freeze them with requires_grad_(False) so the ledger does not expect them to move"
            )
        tracked = {id(p) for p in params.values()}
        extra = [p.shape for group in optimizer.param_groups for p in group["params"] if id(p) not in tracked]
        if extra:
            raise ValueError(
                f"the optimizer owns {len(extra)} parameter(s) (shapes {[tuple(s) for s in extra[:5]]}) that "
                "are not trainable parameters of the tracked model: track the model that owns them, or "
                "give the tracker an optimizer over this model only"
            )
        return {name: owner[id(p)] for name, p in params.items()}

    # -- lifecycle ---------------------------------------------------------------------------
    def capture(self) -> None:
        """Read hyperparameters (and the pre-existing state on the first step) before the step."""
        for name, p in self.params.items():
            group = self.optimizer.param_groups[self.group_of[name]]
            self.hyper[name] = self._hyperparameters(group)
            # The optimizer's own buffer matters only until the splitter keeps its own split copy.
            if name not in self.state and self.optimizer_buffer is not None:
                existing = self.optimizer.state.get(p, {}).get(self.optimizer_buffer)
                self.before[name] = {self.optimizer_buffer: None if existing is None else existing.detach().clone()}

    def split(
        self,
        group_grads: dict[str, torch.Tensor],
        theta_before: dict[str, torch.Tensor],
        rounding: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-row updates ``{name: Tensor[G + 2, *shape]}`` in float64: rows 0..G−1 the groups,
        row G the rest, row G + 1 the rounding gap.

        ``rounding``: the optimizer's batched gradient minus Σ_g group gradients (rounding only). It
        is its own pseudo-group, carried through the optimizer's state like any other, so the rows
        add up to the real update (Adam magnifies the gap where a gradient cancels) while its
        effect on the probes stays in the residual, as rounding should.
        """
        updates = {}
        self.rounding_scale = {}
        for name, p in self.params.items():
            h = self.hyper[name]
            grads = group_grads[name].to(torch.float64)
            gap = torch.zeros_like(grads[0]) if rounding is None else rounding[name].to(torch.float64)
            if h.get("maximize", False):
                grads, gap = -grads, -gap
            theta = theta_before[name]
            # The rest's "gradient": coupled weight decay λθ_k (zero when decoupled or absent).
            rest = theta * h["weight_decay"] if not h.get("decoupled", False) else torch.zeros_like(theta)
            full = torch.cat([grads, rest.unsqueeze(0), gap.unsqueeze(0)], dim=0)
            updates[name] = self._update(name, p, full, theta)
        return updates

    def check_state(self, rtol: float) -> None:
        """Raise when the summed group state differs from the optimizer's own buffer."""
        if self.optimizer_buffer is None:
            return
        key = self.state_names[0]
        for name, p in self.params.items():
            if key not in self.state.get(name, {}):
                continue
            reference = self.optimizer.state[p][self.optimizer_buffer].to(torch.float64)
            groups = self.state[name][key]
            gap = _relative_gap(groups.sum(0), reference, reference.norm() + groups.abs().sum(0).norm())
            if gap > rtol:
                raise LedgerCheckError(
                    f"parameter '{name}': the groups' {key} sums to something other than the optimizer's "
                    f"{self.optimizer_buffer} (relative gap {gap:.2e} > {rtol:.0e})"
                )

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": {n: {k: v.clone() for k, v in s.items()} for n, s in self.state.items()},
            "magnitude": {n: v.clone() for n, v in self.magnitude.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {n: {k: v.clone() for k, v in s.items()} for n, s in state["state"].items()}
        self.magnitude = {n: v.clone() for n, v in state.get("magnitude", {}).items()}

    def _advance_magnitude(self, name: str, full: torch.Tensor, decay: float, gain: float) -> torch.Tensor:
        """magnitude ← decay · magnitude + gain · Σ_rows |full| (starting from |pre-existing buffer|)."""
        size = full.abs().sum(dim=0)
        if name not in self.magnitude:
            existing = self.before.get(name, {}).get(self.optimizer_buffer) if self.optimizer_buffer else None
            start = existing.abs().to(torch.float64) if isinstance(existing, torch.Tensor) else torch.zeros_like(size)
            self.magnitude[name] = start
        return self.magnitude[name].mul_(decay).add_(size, alpha=gain)

    # -- per optimizer ------------------------------------------------------------------------
    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _update(self, name: str, p: torch.Tensor, full: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _initial_state(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        """Per-group state at the first tracked step: zeros, with the optimizer's pre-existing
        buffer (if any) in the rest row, since no tracked example caused it."""
        state = torch.zeros_like(like)
        existing = self.before[name].get(self.optimizer_buffer) if self.optimizer_buffer else None
        if isinstance(existing, torch.Tensor):
            state[self.num_groups] = existing.to(torch.float64)
        return state


class SGDSplitter(UpdateSplitter):
    """torch.optim.SGD: momentum μ, dampening τ, Nesterov, coupled weight decay λ.

    PyTorch adds λθ_k to the gradient before the buffer and its very first step sets the buffer
    to the gradient without dampening: b_1 = g_1, b_k = μ b_{k−1} + (1 − τ) g_k;
    u = −η b, or −η (g + μ b) with Nesterov.
    """

    state_names = ("momentum_buffer",)
    optimizer_buffer = "momentum_buffer"

    def _hyperparameters(self, group):
        return {
            "lr": _scalar(group["lr"]),
            "momentum": _scalar(group.get("momentum", 0.0)),
            "dampening": _scalar(group.get("dampening", 0.0)),
            "nesterov": bool(group.get("nesterov", False)),
            "weight_decay": _scalar(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }

    def _update(self, name, p, full, theta):
        h = self.hyper[name]
        if h["momentum"] == 0:
            return -h["lr"] * full
        state = self.state.setdefault(name, {})
        if "momentum_buffer" not in state:
            if self.before[name].get("momentum_buffer") is None:
                state["momentum_buffer"] = full.clone()  # PyTorch's first step: b_1 = g_1
                buffer = state["momentum_buffer"]
                self.rounding_scale[name] = h["lr"] * self._advance_magnitude(name, full, h["momentum"], 1.0)
                return -h["lr"] * (full + h["momentum"] * buffer) if h["nesterov"] else -h["lr"] * buffer
            state["momentum_buffer"] = self._initial_state(name, "momentum_buffer", full)
        buffer = state["momentum_buffer"]
        buffer.mul_(h["momentum"]).add_(full, alpha=1 - h["dampening"])
        self.rounding_scale[name] = h["lr"] * self._advance_magnitude(name, full, h["momentum"], 1 - h["dampening"])
        return -h["lr"] * (full + h["momentum"] * buffer) if h["nesterov"] else -h["lr"] * buffer


class AdamSplitter(UpdateSplitter):
    """torch.optim.Adam and AdamW (amsgrad and maximize too).

    Per-group first moments m_{k,g} = β1 m_{k−1,g} + (1 − β1) ĝ_{k,g}; the shared second moment v_k
    (or its running maximum with amsgrad) and the step counter k are the optimizer's own:
    u_{k,g} = −η (m_{k,g} / (1 − β1^k)) ⊘ (sqrt(v_k / (1 − β2^k)) + ε). Coupled decay is the rest
    pseudo-group's gradient; decoupled decay (AdamW) adds −η λ θ_k to the rest.
    """

    state_names = ("exp_avg",)
    optimizer_buffer = "exp_avg"

    def __init__(self, optimizer, params, num_groups):
        super().__init__(optimizer, params, num_groups)
        self._adamw = isinstance(optimizer, torch.optim.AdamW)

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
        }

    def _update(self, name, p, full, theta):
        h = self.hyper[name]
        state = self.state.setdefault(name, {})
        if "exp_avg" not in state:
            state["exp_avg"] = self._initial_state(name, "exp_avg", full)
        m = state["exp_avg"]
        m.mul_(h["beta1"]).add_(full, alpha=1 - h["beta1"])
        opt_state = self.optimizer.state[p]
        step = _scalar(opt_state["step"])
        second = opt_state["max_exp_avg_sq" if h["amsgrad"] else "exp_avg_sq"].to(torch.float64)
        bias1 = 1 - h["beta1"] ** step
        bias2 = 1 - h["beta2"] ** step
        denom = second.sqrt() / bias2**0.5 + h["eps"]
        updates = -(h["lr"] / bias1) * m / denom
        magnitude = self._advance_magnitude(name, full, h["beta1"], 1 - h["beta1"])
        self.rounding_scale[name] = (h["lr"] / bias1) * magnitude / denom
        if h["decoupled"] and h["weight_decay"] != 0:
            updates[self.num_groups] -= h["lr"] * h["weight_decay"] * theta
        return updates


class RMSpropSplitter(UpdateSplitter):
    """torch.optim.RMSprop (momentum, centered, coupled weight decay, maximize).

    a_k = sqrt(v_k) + ε (centered: sqrt(v_k − ḡ_k²) + ε), read from the optimizer after its step.
    Without momentum u_{k,g} = −η ĝ_{k,g} ⊘ a_k; with momentum the buffer holds preconditioned
    gradients, b_{k,g} = μ b_{k−1,g} + ĝ_{k,g} ⊘ a_k, u_{k,g} = −η b_{k,g}.
    """

    state_names = ("momentum_buffer",)
    optimizer_buffer = "momentum_buffer"

    def _hyperparameters(self, group):
        return {
            "lr": _scalar(group["lr"]),
            "eps": _scalar(group["eps"]),
            "momentum": _scalar(group.get("momentum", 0.0)),
            "centered": bool(group.get("centered", False)),
            "weight_decay": _scalar(group.get("weight_decay", 0.0)),
            "maximize": bool(group.get("maximize", False)),
        }

    def _update(self, name, p, full, theta):
        h = self.hyper[name]
        opt_state = self.optimizer.state[p]
        square = opt_state["square_avg"].to(torch.float64)
        if h["centered"]:
            square = square - opt_state["grad_avg"].to(torch.float64) ** 2
        preconditioned = full / (square.sqrt() + h["eps"])
        if h["momentum"] == 0:
            return -h["lr"] * preconditioned
        state = self.state.setdefault(name, {})
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = self._initial_state(name, "momentum_buffer", full)
        buffer = state["momentum_buffer"]
        buffer.mul_(h["momentum"]).add_(preconditioned)
        self.rounding_scale[name] = h["lr"] * self._advance_magnitude(name, preconditioned, h["momentum"], 1.0)
        return -h["lr"] * buffer


def make_splitter(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], num_groups: int
) -> UpdateSplitter:
    """The splitter for ``optimizer``; a clear error names the supported optimizers."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return SGDSplitter(optimizer, params, num_groups)
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        return AdamSplitter(optimizer, params, num_groups)
    if kind is torch.optim.RMSprop:
        return RMSpropSplitter(optimizer, params, num_groups)
    raise TypeError(
        f"{kind.__module__}.{kind.__name__} is not supported: the ledger must reproduce the optimizer's "
        f"update exactly, and genkernel knows how for {SUPPORTED_OPTIMIZERS}"
    )
