"""Sketched per-group optimizer state: per-example ledgers for SGD with momentum, Adam and AdamW.

With one group per example, the dense route's per-group optimizer state is a float64 copy of
the parameters per example. Here each group keeps the random projection R s_g ∈ R^k of its
linear state s_g instead (:class:`genkernel.core.projections.ParameterProjection`, E[RᵀR] = I;
weight matrices get Kronecker rows r_j ⊗ s_j, so per-example gradients of linear and
convolutional layers are sketched from their layer factors without being formed):

- SGD (momentum μ, dampening τ, Nesterov): s_g = b_g, the group's momentum buffer,
  b_{k,g} = μ b_{k−1,g} + (1 − τ) ĝ_{k,g} (PyTorch's first step: b_1 = ĝ_1); the update is
  u_g = −η v_g with v_g = b_g, or ĝ_g + μ b_g with Nesterov (μ = 0: v_g = ĝ_g).
- Adam / AdamW: s_g = m_g, the group's first moment, m_{k,g} = β1 m_{k−1,g} + (1 − β1) ĝ_{k,g};
  u_g = −(η / (1 − β1^k)) m_g ⊘ (sqrt(v̂_k) + ε) with the optimizer's own second moment.

Both are u_g = D v_g with D diagonal (−η, or Adam's preconditioner read after the step), so a
contribution is J̄(x) D v_g = ⟨D J̄(x)ᵀ, v_g⟩ ≈ ⟨R D J̄(x)ᵀ, R v_g⟩: unbiased, with the probe side
``[M, d, k]`` computed once per step from layer factors at the quadrature nodes.

Exactness is kept where it can be: the tracker's splitter keeps the exact totals (all groups
together, the rest, the rounding gap) and checks them against the optimizer every step; the
total of the examples' contributions is computed exactly (one JVP), and the difference between
it and the sum of the sketched contributions is the ledger's ``sketch_error``, reported apart
from the residual. Every step also checks Σ_g R s_g = R s_total (the sketch adds up).

Memory: G × k float64 state, (O + I) × k numbers of R per weight matrix, and the i.i.d. columns
of the vector parameters (biases, norms) while they fit in the memory budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter import batch_size as batch_size_of
from .errors import LedgerCheckError
from .factored import Factors, Plan, block_gradients, split_columns
from .per_example import BatchFactors, probe_factors
from .projections import ParameterProjection

SKETCH_OPTIMIZERS = "torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW"


class SketchedGroupState:
    """Per-group linear optimizer state as k-dimensional sketches (see the module docstring).

    Args:
        optimizer: SGD, Adam or AdamW; all parameter groups share momentum, dampening and
            Nesterov (SGD) or β1 (Adam), since the groups' state mixes every parameter.
        params: the tracked parameters by name, in ``named_parameters`` order (it seeds R).
        num_groups: G.
        k: the projection dimension.
        seed, kind: R's seed and entries ("rademacher" or "gaussian").
        cache_bytes: how much of R may be kept between steps.
    """

    def __init__(self, optimizer, params: dict[str, torch.Tensor], num_groups: int, *, k: int, seed: int,
                 kind: str, cache_bytes: int):
        if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            raise ValueError(
                f"group_state='sketched' supports {SKETCH_OPTIMIZERS}; got {type(optimizer).__name__} "
                "(use group_state='dense')"
            )
        self.optimizer = optimizer
        self.params = params
        self.index = {name: i for i, name in enumerate(params)}
        self.num_groups = num_groups
        self.projection = ParameterProjection({n: tuple(p.shape) for n, p in params.items()}, k, seed=seed, kind=kind,
                                              cache_bytes=cache_bytes)
        self.adam = type(optimizer) is not torch.optim.SGD
        self.state: torch.Tensor | None = None  # [G, k] float64
        self._fresh: bool | None = None
        self._shared_hyperparameters()

    @property
    def k(self) -> int:
        return self.projection.k

    # -- lifecycle ---------------------------------------------------------------------------
    def _shared_hyperparameters(self) -> dict[str, Any]:
        keys = ("betas",) if self.adam else ("momentum", "dampening", "nesterov")
        values = {tuple(_plain(group.get(key)) for key in keys) for group in self.optimizer.param_groups}
        if len(values) != 1:
            raise ValueError(
                f"group_state='sketched' needs the same {', '.join(keys)} in every parameter group (one "
                f"sketched state per group of examples mixes all parameters); got {sorted(values)}"
            )
        (shared,) = values
        if self.adam:
            return {"beta1": shared[0][0]}
        return {"momentum": shared[0], "dampening": shared[1], "nesterov": bool(shared[2])}

    def before_step(self) -> None:
        """Call before ``optimizer.step()``: reads the shared hyperparameters and, on the first
        step, whether SGD starts its momentum buffers now (b_1 = ĝ_1) or had them already."""
        self.hyper = self._shared_hyperparameters()
        if self.state is None and not self.adam:
            has = {"momentum_buffer" in self.optimizer.state.get(p, {}) for p in self.params.values()}
            if len(has) != 1:
                raise ValueError(
                    "some parameters have SGD momentum buffers and others not: start the sketched tracker "
                    "before the first step or after every parameter has stepped"
                )
            self._fresh = not has.pop()

    def advance(self, groups: torch.Tensor, sketched_grads: torch.Tensor) -> torch.Tensor:
        """Update the state with this step's ``[B, k]`` sketches R c_n ∇ℓ_n (times clipping);
        returns the groups' sketched update directions R v_g ``[G, k]`` float64."""
        step = sketched_grads.new_zeros((self.num_groups, self.k)).index_add_(0, groups, sketched_grads)
        if self.adam:
            beta1 = self.hyper["beta1"]
            self.state = step * (1 - beta1) if self.state is None else self.state.mul_(beta1).add_(step, alpha=1 - beta1)
            return self.state
        mu, tau = self.hyper["momentum"], self.hyper["dampening"]
        if mu == 0:
            return step
        if self.state is None:
            self.state = step.clone() if self._fresh else step * (1 - tau)
        else:
            self.state.mul_(mu).add_(step, alpha=1 - tau)
        return step + mu * self.state if self.hyper["nesterov"] else self.state

    def check(self, exact_state: dict[str, torch.Tensor], hyper: dict[str, dict[str, Any]], rtol: float) -> None:
        """Σ_g R s_g must equal R s_total, the projection of the exact state the splitter keeps
        for all groups together (``{name: [*shape]}``; under ``maximize`` it holds negated
        gradients, the sketches do not)."""
        if self.state is None:
            return
        reference = sum(
            self.projection.project(n, exact_state[n].unsqueeze(0).to(self._dtype()))[0].to(torch.float64)
            * (-1.0 if hyper[n].get("maximize", False) else 1.0)
            for n in exact_state
        )
        total = self.state.sum(dim=0)
        scale = float(reference.norm() + self.state.abs().sum(dim=0).norm())
        gap = float((total - reference).norm())
        if gap > rtol * scale + 1e-300:
            raise LedgerCheckError(
                f"the sketched per-group state does not add up to the sketch of the optimizer's total "
                f"(gap {gap:.3e}, scale {scale:.3e})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"state": None if self.state is None else self.state.clone(), "fresh": self._fresh,
                "k": self.k, "seed": self.projection.seed, "kind": self.projection.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["k"], state["seed"], state["kind"]) != (self.k, self.projection.seed, self.projection.kind):
            raise ValueError(
                f"the saved sketch has k={state['k']}, seed={state['seed']}, kind={state['kind']!r}; this "
                f"tracker has k={self.k}, seed={self.projection.seed}, kind={self.projection.kind!r}"
            )
        self.state = None if state["state"] is None else state["state"].clone()
        self._fresh = state["fresh"]

    # -- the two sides of ⟨R D J̄(x)ᵀ, R v_g⟩ --------------------------------------------------
    def project_batch(self, plan: Plan, batch: BatchFactors) -> torch.Tensor:
        """``[B, k]`` float64: R c_n ∇ℓ_n; weight matrices of linear and convolutional layers from
        their factors, everything else from per-example gradients, one block at a time."""
        ones = {name: 1.0 for name in self.params}
        parts = [self._project_block(block, f, 0, ones) for block, f in zip(plan.blocks, batch.factors)]
        parts += [self.projection.project(n, g.to(self._dtype())).to(torch.float64) for n, g in batch.fallback.items()]
        return sum(p for p in parts if p is not None)

    def project_probes(
        self, model: nn.Module, plan: Plan, probes: tuple[torch.Tensor, ...],
        nodes: list[tuple[float, dict[str, torch.Tensor]]], preconditioner: dict[str, Any], d: int,
        probe_chunks: list[slice],
    ) -> torch.Tensor:
        """``[M, d, k]`` float64: Σ_q w_q R D J(x; θ_q)ᵀ with D per parameter: a number (SGD: from
        the layer factors) or a tensor of the parameter's shape (Adam: the Jacobian block is
        formed, scaled and projected). Probes go in ``probe_chunks`` (see
        :func:`genkernel.core.per_example.row_chunks`)."""
        total = torch.zeros((batch_size_of(probes), d, self.k), dtype=torch.float64, device=probes[0].device)
        for weight, theta in nodes:
            for rows in probe_chunks:
                total[rows] += weight * self._project_chunk(model, plan, tuple(t[rows] for t in probes), theta,
                                                            preconditioner, d)
        return total

    def _project_chunk(self, model, plan, probes, theta, preconditioner, d) -> torch.Tensor:
        """``[m, d, k]`` float64: R D J(x; θ)ᵀ for one chunk of probes at one node."""
        m = batch_size_of(probes)
        factors, fb = probe_factors(model, plan, probes, theta, d)
        value = torch.zeros((d, m, self.k), dtype=torch.float64, device=probes[0].device)
        for block, f in zip(plan.blocks, factors):
            for c in range(d):  # one output at a time: [m, k] each
                part = self._project_block(block, f, c, preconditioner)
                if part is not None:
                    value[c] += part
        if fb is not None:
            for name, part in split_columns(fb, plan.fallback).items():
                jac = part.transpose(0, 1).reshape(d * m, *plan.fallback[name].shape)
                scaled = jac * _as(preconditioner[name], jac)
                value += self.projection.project(name, scaled).to(torch.float64).reshape(d, m, self.k)
        return value.transpose(0, 1)

    def _project_block(self, block, f, cotangent: int, scale: dict[str, Any]) -> torch.Tensor | None:
        """R D of one block's per-example gradients for one cotangent: ``[N, k]`` float64 (None for
        a block without parameters in use). ``scale``: D per parameter name."""
        if f.kind == "dense" and f.g.shape[-1] == 0:
            return None
        one = Factors(f.kind, f.a, f.g[cotangent : cotangent + 1])
        total = None
        if f.kind == "outer" and block.weight is not None and not isinstance(scale[block.weight], torch.Tensor):
            # A number for D: the weight's sketch straight from the factors, Σ_t (r·g_t)(s·a_t).
            a = f.a[..., :-1] if block.bias is not None else f.a
            total = self.projection.project_outer(block.weight, a, one.g[0]).to(torch.float64) * scale[block.weight]
            grads = {block.bias: one.g[0].sum(dim=1)} if block.bias is not None else {}
        else:
            grads = {n: g[0] for n, g in block_gradients(block, one).items()}
        for name in grads:
            values = grads[name] * _as(scale[name], grads[name])
            part = self.projection.project(name, values).to(torch.float64)
            total = part if total is None else total + part
        return total

    def preconditioner(self, hyper: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """D per parameter, read after the real step: −η (SGD) or −η / (1 − β1^k) / (sqrt(v̂) + ε)
        (Adam); negated under ``maximize`` (the groups' state holds gradients, not ascent steps)."""
        out = {}
        for name, p in self.params.items():
            h = hyper[name]
            sign = -1.0 if h.get("maximize", False) else 1.0
            if not self.adam:
                out[name] = -h["lr"] * sign
                continue
            state = self.optimizer.state[p]
            step = float(state["step"])
            second = state["max_exp_avg_sq" if h["amsgrad"] else "exp_avg_sq"].to(torch.float64)
            denom = second.sqrt() / (1 - h["beta2"] ** step) ** 0.5 + h["eps"]
            out[name] = (-(h["lr"] / (1 - h["beta1"] ** step)) * sign / denom).to(p.dtype)
        return out

    def _dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype


def _as(value: Any, like: torch.Tensor) -> Any:
    return value.to(like.device) if isinstance(value, torch.Tensor) else value


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return float(value.item())
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


__all__ = ["SKETCH_OPTIMIZERS", "SketchedGroupState"]
