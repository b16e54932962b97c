"""PathKernelTracker: an exact path-kernel ledger kept while a model trains.

Lifecycle::

    tracker = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=G)
    for inputs, targets, groups in data:
        tracker.step(inputs, targets, groups)      # replaces backward() + optimizer.step()
    tracker.ledger.summary()                       # contributions, rest, residual, shares

Each ``step`` performs the real optimizer step through :class:`OptimizerStep` (the same code an
untracked trainer runs, so training is bit-for-bit unchanged) and around it:

1. per-example gradients at θ_k, summed into groups with their coefficients c_n (ĝ_{k,g});
2. the real step; Δ_k = θ_{k+1} − θ_k read from the parameters;
3. the optimizer-aware split Δ_k = Σ_g u_{k,g} + u_rest (:mod:`genkernel.core.splitting`);
4. the check: Σ_g ĝ_g equals the real gradient, the summed group state equals the optimizer's
   buffers and Σ_g u_g + u_rest equals Δ_k (DESIGN.md section 2, "The check");
5. contributions c_{k,g}(x) = J̄_k(x) u_{k,g} at every probe, one JVP per group and quadrature
   node (never per example);
6. a fresh forward pass at θ_{k+1}; the ledger records contributions, rest, traffic and residual.

Memory: the per-group updates and optimizer state are (G + 2) × P float64 values each.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import jvp, vmap

from .adapter import (
    Batch,
    analysis_mode,
    as_tuple,
    batch_size,
    check_deterministic,
    check_per_example_safe,
    checked_forward,
    functional_model,
    trainable_parameters,
)
from .distributed import combine_group_gradients, ddp_context, unwrap
from .errors import LedgerCheckError, NonFiniteError
from .kernels import per_example_jacobian
from .ledger import PathKernelLedger, atomic_save
from .pergrad import DEFAULT_GRADIENT_BUDGET, group_gradients
from .quadrature import quadrature_rule
from .splitting import make_splitter
from .step import LossFn, OptimizerStep

CONTRIBUTION_ROUTES = ("auto", "jvp", "jacobian")
CHECK_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class StepContributions:
    """What one tracked step did at the probes.

    Attributes:
        step: 1-based index of the step in the ledger.
        contributions: ``[M, G, d]`` float64, J̄_k(x) u_{k,g}.
        rest: ``[M, d]`` J̄_k(x) u_{k,rest} plus buffer drift.
        residual: ``[M, d]`` this step's f(θ_{k+1}) − f(θ_k) − Σ_g contributions − rest.
        losses: ``[B]`` the per-example training losses.
        group_updates: ``{name: [G + 2, *shape]}`` float64 updates (row G: the rest, row G + 1:
            the batched gradient's rounding gap, whose effect stays in the residual).
    """

    step: int
    contributions: torch.Tensor
    rest: torch.Tensor
    residual: torch.Tensor
    losses: torch.Tensor
    group_updates: dict[str, torch.Tensor]


class PathKernelTracker:
    """Keeps the exact path-kernel ledger of ``model`` trained by ``optimizer``.

    Args:
        model: the trained module. BatchNorm or dropout in training mode are refused.
        optimizer: SGD (momentum, dampening, Nesterov, weight decay), Adam, AdamW (amsgrad,
            maximize) or RMSprop (momentum, centered), one or several parameter groups, owning
            exactly the model's trainable parameters.
        loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]`` per-example losses.
        probes: inputs x at which contributions are recorded (Tensor or tuple of Tensors).
        num_groups: G, the number of groups of training contributions.
        quadrature: "left", "midpoint", "trapezoid" or "simpson" (see :mod:`quadrature`).
        max_grad_norm: global-norm gradient clipping applied to the real step (inf: none); every
            group's share is scaled by the same factor.
        snapshot_every: copy the ledger into ``ledger.history`` every this many steps (0: never).
        memory_budget: bytes of per-example gradients (or probe Jacobians) alive at once.
        contribution_route: how J̄_k(x) u_g is computed: "auto", "jvp" (one forward-mode pass per
            group) or "jacobian" (the probes' Jacobians times the updates); all exact.

    Under torch.distributed, pass the DistributedDataParallel-wrapped model and each rank's shard:
    the ranks' group gradients are averaged as DDP averages gradients, so every rank keeps the
    ledger a single process would keep on the global batches (equal shard sizes required).

    Per-group state costs (G + 2) × P float64 values per kind of optimizer state (momentum
    buffer or first moment) plus the same for each step's updates.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        probes: Batch,
        *,
        num_groups: int,
        quadrature: str = "midpoint",
        max_grad_norm: float = math.inf,
        snapshot_every: int = 0,
        memory_budget: int = DEFAULT_GRADIENT_BUDGET,
        contribution_route: str = "auto",
    ) -> None:
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0 (0: no snapshots), got {snapshot_every}")
        self.model = model
        # Under DistributedDataParallel the real step runs through the wrapper (its gradient
        # averaging); the analysis runs on the wrapped module (genkernel.core.distributed).
        self.module = unwrap(model)
        self.distributed = ddp_context(model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.num_groups = num_groups
        self.rule = quadrature_rule(quadrature)
        self.max_grad_norm = max_grad_norm
        self.snapshot_every = snapshot_every
        self.memory_budget = memory_budget
        if contribution_route not in CONTRIBUTION_ROUTES:
            raise ValueError(f"contribution_route must be one of {CONTRIBUTION_ROUTES}, got {contribution_route!r}")
        self.contribution_route = contribution_route

        check_per_example_safe(self.module)
        self.params = trainable_parameters(self.module)
        self.splitter = make_splitter(optimizer, self.params, num_groups)
        self.probes = as_tuple(probes, name="probes")
        batch_size(self.probes, name="probes")
        check_deterministic(self.module, self.probes)
        self._has_buffers = any(True for _ in self.module.buffers())
        dtype = next(iter(self.params.values())).dtype
        self.rtol = CHECK_RTOL.get(dtype, 1e-3)
        with torch.no_grad(), analysis_mode(self.module):
            self.ledger = PathKernelLedger.empty(self._probe_outputs(), num_groups)
        self._f_prev = self.ledger.f_end.clone()
        self._theta_after: dict[str, torch.Tensor] | None = None
        self._grad_marks: dict[str, tuple[int, int]] | None = None

    # -- public verbs ---------------------------------------------------------------------------
    def step(
        self,
        inputs: Batch,
        targets: Batch | None,
        groups: torch.Tensor,
        weights: torch.Tensor | None = None,
        **info: Any,
    ) -> StepContributions:
        """Perform one real optimizer step on the batch and record it in the ledger.

        Args:
            inputs, targets: the batch (targets may be None when ``loss_fn`` needs none).
            groups: ``LongTensor[B]`` group id of every example, in [0, num_groups).
            weights: per-example coefficients c_n ``Tensor[B]`` of the loss Σ_n c_n ℓ_n; default the
                mean (1/B), computed as ``losses.mean()`` like an untracked loop.

        Returns:
            :class:`StepContributions` of this step.
        """
        step = OptimizerStep(
            self.model, self.optimizer, self.loss_fn, inputs, targets, weights, max_grad_norm=self.max_grad_norm, info=info
        )
        return self.track(step, groups)

    def track(self, step: OptimizerStep, groups: torch.Tensor) -> StepContributions:
        """Perform and record a prepared :class:`OptimizerStep` (what trainers' callbacks use)."""
        if step.model is not self.model or step.optimizer is not self.optimizer:
            raise ValueError("this step trains a different model or optimizer than the tracker was built for")
        if step.max_grad_norm != self.max_grad_norm:
            raise ValueError(f"the step clips at {step.max_grad_norm} but the tracker at {self.max_grad_norm}")
        index = self.ledger.steps + 1
        groups = self._check_groups(groups, step.batch)
        self._check_untouched()
        self._grad_marks = None  # this step's own backward touches the gradients, even if it fails
        if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
            raise RuntimeError(
                "mixed precision (autocast, GradScaler) is not supported: the ledger must reproduce each "
                "update exactly; train the tracked model in float32 or float64"
            )
        coefficients = (
            torch.full((step.batch,), 1.0 / step.batch, dtype=torch.float64) if step.weights is None else step.weights
        ).to(torch.float64)

        try:
            losses = step.compute_gradients()
        except NonFiniteError as error:
            raise NonFiniteError(f"step {index} ({step.phase}): {error}; the ledger keeps the {index - 1} steps before") from error
        theta_before = {name: p.detach().clone() for name, p in self.params.items()}

        with torch.no_grad(), analysis_mode(self.module):
            # Buffers may have changed in the training forward (spectral norm): not an example's doing.
            f_before = self._probe_outputs() if self._has_buffers else self._f_prev
            drift = f_before - self._f_prev
            # 1. ĝ_{k,g} = Σ_{n ∈ g} c_n ∇ℓ_n at θ_k, times the clipping factor.
            with torch.enable_grad():
                grads, analysis_losses = group_gradients(
                    self.module, theta_before, step.inputs, step.targets, step.loss_fn, groups,
                    coefficients.to(losses.device), self.num_groups, memory_budget=self.memory_budget,
                )
            if self.distributed is not None:
                grads = combine_group_gradients(grads, step.batch, self.distributed)
            grads = {name: g * step.clip_factor for name, g in grads.items()}
            self._check_gradients(index, grads, losses, analysis_losses)

        # 2. The real optimizer step.
        self.splitter.capture()
        step.apply_update()

        with torch.no_grad(), analysis_mode(self.module):
            theta_after = {name: p.detach().clone() for name, p in self.params.items()}
            # 3. Δ_k = Σ_g u_{k,g} + u_rest.
            # The optimizer stepped on the batched gradient, which differs from Σ_g ĝ_g by rounding
            # (checked above): its own row of the split, left out of the contributions (residual).
            rounding = {
                n: (torch.zeros_like(grads[n][0]) if p.grad is None else p.grad.to(torch.float64)) - grads[n].sum(dim=0)
                for n, p in self.params.items()
            }
            updates = self.splitter.split(grads, {n: t.to(torch.float64) for n, t in theta_before.items()}, rounding)
            # 4. The check against what the optimizer really did.
            self._check_updates(index, updates, theta_before, theta_after)
            # 5. c_{k,g}(x) = Σ_q w_q J(x; θ_k + s_q Δ_k) u_{k,g}.
            contributions = self._contributions({n: u[: self.num_groups + 1] for n, u in updates.items()},
                                                theta_before, theta_after)
            # 6. Fresh forward at θ_{k+1}; record.
            f_after = self._probe_outputs()
        rest = contributions[:, -1] + drift
        step_residual = f_after - f_before - contributions[:, :-1].sum(dim=1) - contributions[:, -1]
        self.ledger.buffer_drift += drift
        self.ledger.record(contributions[:, :-1], rest, f_after)
        if self.snapshot_every and self.ledger.steps % self.snapshot_every == 0:
            self.ledger.snapshot()
        self._f_prev = f_after
        self._theta_after = theta_after
        self._grad_marks = {n: (id(p.grad), p.grad._version) for n, p in self.params.items() if p.grad is not None}
        return StepContributions(index, contributions[:, :-1], rest, step_residual, losses, updates)

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Ledger, per-group optimizer state and the last parameters (for the outside-change check)."""
        return {
            "format": "genkernel.PathKernelTracker/1",
            "ledger": self.ledger.state_dict(),
            "splitter": self.splitter.state_dict(),
            "f_prev": self._f_prev.clone(),
            "theta_after": None if self._theta_after is None else {k: v.clone() for k, v in self._theta_after.items()},
            "num_groups": self.num_groups,
            "quadrature": self.rule.name,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "genkernel.PathKernelTracker/1":
            raise ValueError("not a PathKernelTracker state (made by tracker.state_dict())")
        if state["num_groups"] != self.num_groups or state["quadrature"] != self.rule.name:
            raise ValueError(
                f"the saved tracker had num_groups={state['num_groups']}, quadrature={state['quadrature']!r}; "
                f"this one has num_groups={self.num_groups}, quadrature={self.rule.name!r}"
            )
        self.ledger = PathKernelLedger.from_state_dict(state["ledger"])
        self.splitter.load_state_dict(state["splitter"])
        self._f_prev = state["f_prev"].clone()
        self._theta_after = state["theta_after"]
        self._grad_marks = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the tracker state atomically (temporary file, then rename)."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save` (the model and optimizer are restored by the caller)."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # -- internals ------------------------------------------------------------------------------
    def _probe_outputs(self) -> torch.Tensor:
        """``[M, d]`` float64 outputs at the probes; callers run it inside :func:`analysis_mode`."""
        return checked_forward(self.module, self.probes, name="probes").to(torch.float64)

    def _check_groups(self, groups: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(groups, torch.Tensor) or groups.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"groups must be an integer Tensor of shape [{batch}] (a LongTensor of group ids)")
        if groups.shape != (batch,):
            raise ValueError(f"groups must have one id per example, shape [{batch}], got {tuple(groups.shape)}")
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise ValueError(
                f"group ids must lie in [0, {self.num_groups}); got ids from {int(groups.min())} to {int(groups.max())}"
            )
        return groups.to(torch.long)

    def _check_untouched(self) -> None:
        if self._theta_after is not None:
            changed = [n for n, p in self.params.items() if not torch.equal(p.detach(), self._theta_after[n].to(p.device))]
            if changed:
                raise RuntimeError(
                    f"parameters {changed[:5]} changed outside the tracked optimizer step (an EMA written into "
                    "the model, a manual edit, a second optimizer): the ledger cannot attribute that change. "
                    "Make every update through tracker.step, or start a new tracker after the change."
                )
        if self._grad_marks is not None:
            touched = [
                n for n, p in self.params.items()
                if p.grad is not None and self._grad_marks.get(n) != (id(p.grad), p.grad._version)
            ]
            if touched:
                raise RuntimeError(
                    f"gradients of {touched[:5]} were accumulated outside tracker.step (gradient accumulation is "
                    "not supported): pass the whole accumulated batch to one tracker.step, with weights= for the "
                    "per-example coefficients"
                )

    def _check_gradients(self, index, grads, losses, analysis_losses) -> None:
        loss_tolerance = max(self.rtol, 1e-6) * 10
        scale = float(losses.abs().max()) if losses.numel() else 0.0
        if not torch.allclose(analysis_losses.to(losses), losses, rtol=loss_tolerance, atol=loss_tolerance * scale):
            gap = float((analysis_losses.to(losses) - losses).abs().max())
            raise LedgerCheckError(
                f"step {index}: the per-example analysis forward does not reproduce the training losses (max gap "
                f"{gap:.3e}); the model's output must depend only on its own example and parameters"
            )
        gaps, scales = {}, {}
        for name, p in self.params.items():
            real = torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.to(torch.float64)
            gaps[name] = float((grads[name].sum(dim=0) - real).norm())
            scales[name] = float(real.norm() + grads[name].abs().sum(dim=0).norm())
        # A parameter whose true gradient is zero (a bias before a normalization) carries pure
        # rounding noise on both sides: compare it with rounding of the whole gradient too.
        floor = 16 * torch.finfo(next(iter(self.params.values())).dtype).eps * math.sqrt(sum(v * v for v in scales.values()))
        for name in self.params:
            if gaps[name] > self.rtol * scales[name] + floor:
                raise LedgerCheckError(
                    f"step {index}: the group gradients of '{name}' do not add up to the real gradient (gap "
                    f"{gaps[name]:.3e}, scale {scales[name]:.3e})"
                )

    def _check_updates(self, index, updates, theta_before, theta_after) -> None:
        self.splitter.check_state(self.rtol)
        for name, u in updates.items():
            before, after = theta_before[name], theta_after[name]
            delta = after.to(torch.float64) - before.to(torch.float64)
            ulp = (torch.nextafter(after.abs(), torch.full_like(after, math.inf)) - after.abs()).to(torch.float64)
            tolerance = 2 * ulp + self.rtol * (delta.abs() + u.abs().sum(dim=0))
            gap = (u.sum(dim=0) - delta).abs()
            if bool((gap > tolerance).any()):
                worst = float((gap - tolerance).max())
                raise LedgerCheckError(
                    f"step {index}: the split update of '{name}' does not add up to the optimizer's real step "
                    f"(excess gap {worst:.3e}); was the optimizer's state or hyperparameters changed in a way "
                    "the tracker cannot see?"
                )

    def _contributions(self, updates, theta_before, theta_after) -> torch.Tensor:
        """``[M, G + 1, d]`` float64: Σ_q w_q J(x; θ_k + s_q Δ_k) u_g, for every group and the rest.

        Two exact routes: one JVP per group and node (cost ∝ G + 1), or the probes' Jacobians
        J(x) ``[M, d, P]`` times the updates (cost ∝ d, memory M·d·P). "auto" takes the
        Jacobian route when 8 d <= G + 1 (measured: a reverse-mode Jacobian pass costs several
        JVPs) and the Jacobians fit in the memory budget.
        """
        names = list(self.params)
        dtype = theta_before[names[0]].dtype
        tangents = {n: updates[n].to(dtype) for n in names}
        rows = updates[names[0]].shape[0]
        num_params = sum(t[0].numel() for t in tangents.values())
        m, d = self._f_prev.shape
        route = self.contribution_route
        if route == "auto":
            fits = 2 * m * d * num_params * tangents[names[0]].element_size() <= self.memory_budget
            route = "jacobian" if (8 * d <= rows and fits) else "jvp"
        total = None
        for node, weight in zip(self.rule.nodes, self.rule.weights):
            if node == 0.0:
                theta = theta_before
            elif node == 1.0:
                theta = theta_after
            else:
                theta = {
                    n: (theta_before[n].to(torch.float64) + node * (theta_after[n].to(torch.float64) - theta_before[n].to(torch.float64))).to(dtype)
                    for n in names
                }
            if route == "jacobian":
                jac = per_example_jacobian(self.module, theta)(*self.probes)  # [M, d, P]
                flat = torch.cat([tangents[n].reshape(rows, -1) for n in names], dim=1)  # [G + 1, P]
                value = torch.einsum("mdp,gp->gmd", jac, flat)
            else:
                value = self._jvp_contributions(theta, tangents, rows, num_params)
            value = value.to(torch.float64) * weight  # [G + 1, M, d]
            total = value if total is None else total + value
        return total.permute(1, 0, 2).contiguous()

    def _jvp_contributions(self, theta, tangents, rows, num_params) -> torch.Tensor:
        """``[G + 1, M, d]``: J(x; θ) u_g by forward-mode AD, vmapped over chunks of groups."""
        forward = functional_model(self.module)
        probes = self.probes

        def push(tangent):
            return jvp(lambda p: forward(p, probes), (theta,), (tangent,))[1]

        first = next(iter(tangents.values()))
        chunk = max(1, self.memory_budget // (4 * num_params * first.element_size()))
        parts = []
        for start in range(0, rows, chunk):
            parts.append(vmap(push)({n: t[start : start + chunk] for n, t in tangents.items()}))
        return torch.cat(parts)
