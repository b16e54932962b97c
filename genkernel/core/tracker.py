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
5. contributions c_{k,g}(x) = J̄_k(x) u_{k,g} at every probe: one JVP per group and quadrature
   node ("dense"), per-example cross kernels from layer factors summed into groups ("factored",
   plain SGD), or sketched estimates beside an exact total ("sketched");
6. a fresh forward pass at θ_{k+1}; the ledger records contributions, rest, traffic and residual.

Memory: with ``group_state="dense"`` the per-group updates and optimizer state are (G + 2) × P
float64 values each; with ``"factored"`` (plain SGD) there is no per-group copy: step 1 keeps the
batch's layer factors and step 5 computes each example's contribution from them
(:mod:`genkernel.core.per_example`), so one group per example costs O(B) per step, not O(G·P).
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
from .factored import Unfactorable, make_plan
from .kernels import per_example_jacobian
from .ledger import PathKernelLedger, atomic_save
from .per_example import BatchFactors, batch_totals, capture_batch, factored_contributions, row_chunks
from .pergrad import DEFAULT_GRADIENT_BUDGET, group_gradients
from .quadrature import quadrature_rule
from .sketched_state import SketchedGroupState
from .splitting import make_splitter
from .step import LossFn, OptimizerStep

CONTRIBUTION_ROUTES = ("auto", "jvp", "jacobian")
GROUP_STATES = ("auto", "dense", "factored", "sketched")
CHECK_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class StepContributions:
    """What one tracked step did at the probes.

    Attributes:
        step: 1-based index of the step in the ledger.
        contributions: ``[M, G, d]`` float64, J̄_k(x) u_{k,g}.
        rest: ``[M, d]`` J̄_k(x) u_{k,rest} plus buffer drift.
        residual: ``[M, d]`` this step's f(θ_{k+1}) − f(θ_k) − Σ_g contributions − rest − sketch_error.
        losses: ``[B]`` the per-example training losses.
        group_updates: ``{name: [rows, *shape]}`` float64 updates: with ``group_state="dense"``
            G + 2 rows (row G: the rest, row G + 1: the batched gradient's rounding gap, whose
            effect stays in the residual); otherwise 3 rows (all groups together, the rest, the
            rounding gap).
        sketch_error: ``[M, d]`` with ``group_state="sketched"``, the examples' exact total
            contribution minus the sum of the groups' sketched estimates (zero otherwise).
    """

    step: int
    contributions: torch.Tensor
    rest: torch.Tensor
    residual: torch.Tensor
    losses: torch.Tensor
    group_updates: dict[str, torch.Tensor]
    sketch_error: torch.Tensor


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
        contribution_route: how J̄_k(x) u_g is computed on the dense route: "auto", "jvp" (one
            forward-mode pass per group) or "jacobian" (the probes' Jacobians times the updates);
            all exact.
        group_state: how the groups' updates are held:
            "dense": a float64 copy of the parameters per group and per kind of optimizer state,
            (G + 2) × P values (any supported optimizer; cost grows with G);
            "factored": no per-group copy at all: each example's contribution is a cross kernel
            computed from layer factors (:mod:`genkernel.core.per_example`); exact, plain SGD
            only (no momentum: a buffer mixes steps), one process; cost grows with B, not G;
            "sketched": each group keeps a k-dimensional random projection of its optimizer state
            (:mod:`genkernel.core.sketched_state`; SGD with momentum, Adam, AdamW, one process):
            G × k values; contributions are unbiased estimates, the exact totals are still checked
            every step, and ``ledger.sketch_error`` reports how far the estimates' sum is from
            the exact total of the examples' contributions;
            "auto": "factored" for plain SGD in one process when the probes' outputs are no more
            than the groups plus one (d ≤ G + 1: d backward cotangents replace G + 1 JVPs),
            else "dense" (never "sketched", which is approximate: ask for it).
        sketch_dim, sketch_seed, sketch_kind: k, the seed and the entries ("rademacher" or
            "gaussian") of the projection for ``group_state="sketched"``.

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
        group_state: str = "auto",
        sketch_dim: int = 512,
        sketch_seed: int = 0,
        sketch_kind: str = "rademacher",
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
        self.probes = as_tuple(probes, name="probes")
        batch_size(self.probes, name="probes")
        check_deterministic(self.module, self.probes)
        self._has_buffers = any(True for _ in self.module.buffers())
        dtype = next(iter(self.params.values())).dtype
        self.rtol = CHECK_RTOL.get(dtype, 1e-3)
        with torch.no_grad(), analysis_mode(self.module):
            self.ledger = PathKernelLedger.empty(self._probe_outputs(), num_groups)
        self.group_state = self._choose_group_state(group_state, self.ledger.f_end.shape[1])
        # Dense: one row per group. Otherwise the splitter keeps the exact totals only (row 0: all
        # groups together), against which the tracker checks every step.
        self.splitter = make_splitter(optimizer, self.params, num_groups if self.group_state == "dense" else 1)
        self._factor_exclusions: set[str] = set()
        self.plan = None if self.group_state == "dense" else make_plan(self.module)
        self._probe_row_chunks: list[slice] | None = None  # fixed probes: sized once per plan
        self.sketch = None
        if self.group_state == "sketched":
            self.sketch = SketchedGroupState(optimizer, self.params, num_groups, k=sketch_dim, seed=sketch_seed,
                                             kind=sketch_kind, cache_bytes=memory_budget)
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
            # 1. ĝ_{k,g} = Σ_{n ∈ g} c_n ∇ℓ_n at θ_k, times the clipping factor (dense: one row per
            #    group; factored: the total only, with the batch's factors for step 5).
            with torch.enable_grad():
                grads, analysis_losses, sizes, batch = self._gradients(step, groups, coefficients.to(losses.device))
            # The optimizer will step on the batched gradient, which differs from Σ_g ĝ_g by
            # rounding (checked here): its own row of the split in step 3, left out of the
            # contributions (residual).
            rounding = self._check_gradients(index, grads, losses, analysis_losses, sizes)

        # 2. The real optimizer step.
        self.splitter.capture()
        if self.sketch is not None:
            self.sketch.before_step()
        step.apply_update()

        with torch.no_grad(), analysis_mode(self.module):
            theta_after = {name: p.detach().clone() for name, p in self.params.items()}
            # 3. Δ_k = Σ_g u_{k,g} + u_rest (+ the rounding row).
            updates = self.splitter.split(grads, {n: t.to(torch.float64) for n, t in theta_before.items()}, rounding)
            # 4. The check against what the optimizer really did.
            self._check_updates(index, updates, theta_before, theta_after)
            # 5. c_{k,g}(x) = Σ_q w_q J(x; θ_k + s_q Δ_k) u_{k,g}, and the rest's.
            nodes = self._nodes(theta_before, theta_after)
            contributions, rest, sketch_error = self._step_contributions(updates, nodes, batch, groups, step.clip_factor)
            # 6. Fresh forward at θ_{k+1}; record.
            f_after = self._probe_outputs()
        step_residual = f_after - f_before - contributions.sum(dim=1) - rest - sketch_error
        rest = rest + drift
        self.ledger.buffer_drift += drift
        self.ledger.record(contributions, rest, f_after, sketch_error)
        if self.snapshot_every and self.ledger.steps % self.snapshot_every == 0:
            self.ledger.snapshot()
        self._f_prev = f_after
        self._theta_after = theta_after
        self._grad_marks = {n: (id(p.grad), p.grad._version) for n, p in self.params.items() if p.grad is not None}
        return StepContributions(index, contributions, rest, step_residual, losses, updates, sketch_error)

    # -- the routes: dense, factored, sketched -------------------------------------------------
    def _gradients(self, step: OptimizerStep, groups: torch.Tensor, coefficients: torch.Tensor):
        """Step 1: ``(grads {name: [rows, *shape]} float64, analysis losses [B], sizes, batch)``.

        Dense: one row per group, by :func:`group_gradients`. Factored and sketched: one row (Σ_n c_n ∇ℓ_n,
        from the batch's layer factors, which are returned for step 5). ``sizes[name]`` is the
        size against which the gradient's rounding is judged.
        """
        if self.group_state == "dense":
            grads, analysis_losses = group_gradients(
                self.module, self.params, step.inputs, step.targets, step.loss_fn, groups,
                coefficients, self.num_groups, memory_budget=self.memory_budget,
            )
            if self.distributed is not None:
                grads = combine_group_gradients(grads, step.batch, self.distributed)
            grads = {name: g * step.clip_factor for name, g in grads.items()}
            sizes = {name: float(g.abs().sum(dim=0).norm()) for name, g in grads.items()}
            return grads, analysis_losses, sizes, None
        if self.group_state == "factored":
            self._require_plain_sgd()
        while True:
            try:
                batch = capture_batch(
                    self.module, self.plan, step.inputs, step.targets, step.loss_fn, coefficients, self.memory_budget
                )
                break
            except Unfactorable as error:  # a module that mixes the batch: torch.func handles it
                self._factor_exclusions.add(error.module_name)
                self.plan = make_plan(self.module, self._factor_exclusions)
                self._probe_row_chunks = None
        totals, sizes = batch_totals(self.plan, batch)
        grads = {n: (totals[n] * step.clip_factor).unsqueeze(0) for n in self.params}
        sizes = {n: sizes[n] * step.clip_factor for n in self.params}
        return grads, batch.losses, sizes, batch

    def _step_contributions(self, updates, nodes, batch: BatchFactors | None, groups, clip_factor):
        """Step 5: ``([M, G, d] group contributions, [M, d] the rest's, [M, d] sketch error)``,
        float64 (the sketch error is zero except on the sketched route)."""
        if self.group_state == "dense":
            both = self._contributions({n: u[: self.num_groups + 1] for n, u in updates.items()}, nodes)
            return both[:, :-1], both[:, -1], torch.zeros_like(both[:, -1])
        if self.group_state == "sketched":
            return self._sketched_contributions(updates, nodes, batch, groups, clip_factor)
        # Factored: per-example cross kernels with u_n = −η_p s c_n ∇ℓ_n, summed into the groups.
        scale = {}
        for name in self.params:
            h = self.splitter.hyper[name]
            scale[name] = -h["lr"] * clip_factor * (-1.0 if h["maximize"] else 1.0)
        d = self._f_prev.shape[1]
        per_example = factored_contributions(
            self.module, self.plan, self.probes, nodes, batch, scale, d, self._probe_chunks(), self.memory_budget
        ).to(torch.float64)  # [M, B, d]
        m = per_example.shape[0]
        contributions = per_example.new_zeros((m, self.num_groups, d)).index_add_(1, groups.to(per_example.device), per_example)
        rest_update = {n: u[1:2] for n, u in updates.items()}
        if any(bool(u.any()) for u in rest_update.values()):
            rest = self._contributions(rest_update, nodes)[:, 0]
        else:
            rest = per_example.new_zeros((m, d))
        return contributions, rest, torch.zeros_like(rest)

    def _sketched_contributions(self, updates, nodes, batch: BatchFactors, groups, clip_factor):
        """Sketched route: ⟨R D J̄(x)ᵀ, R v_g⟩ per group; the examples' exact total and the rest by
        JVP; the sketch error is their difference (see :mod:`genkernel.core.sketched_state`)."""
        sketch = self.sketch
        # R c_n ∇ℓ_n (times clipping), then the groups' sketched state and update directions.
        directions = sketch.advance(groups.to(self._f_prev.device), sketch.project_batch(self.plan, batch) * clip_factor)
        key = self.splitter.state_names[0] if self.splitter.state_names else None
        if key is not None and key in self.splitter.state.get(next(iter(self.params)), {}):
            sketch.check({n: self.splitter.state[n][key][0] for n in self.params}, self.splitter.hyper, self.rtol)
        d = self._f_prev.shape[1]
        probe_side = sketch.project_probes(
            self.module, self.plan, self.probes, nodes, sketch.preconditioner(self.splitter.hyper), d, self._probe_chunks()
        ).to(directions.device)  # [M, d, k]
        contributions = torch.einsum("mdk,gk->mgd", probe_side, directions)
        exact = self._contributions({n: u[0:2] for n, u in updates.items()}, nodes)  # [M, 2, d]
        return contributions, exact[:, 1], exact[:, 0] - contributions.sum(dim=1)

    def _probe_chunks(self) -> list[slice]:
        """Row chunks of the probes for the factored and sketched routes (under analysis_mode)."""
        if self._probe_row_chunks is None:
            self._probe_row_chunks = row_chunks(self.module, self.plan, self.probes, self._f_prev.shape[1], self.memory_budget)
        return self._probe_row_chunks

    def _choose_group_state(self, group_state: str, d: int) -> str:
        if group_state not in GROUP_STATES:
            raise ValueError(f"group_state must be one of {GROUP_STATES}, got {group_state!r}")
        plain = _plain_sgd(self.optimizer)
        if group_state == "auto":
            return "factored" if plain and self.distributed is None and d <= self.num_groups + 1 else "dense"
        if group_state in ("factored", "sketched") and self.distributed is not None:
            raise ValueError(
                f"group_state={group_state!r} runs in one process; under DistributedDataParallel use "
                "group_state='dense'"
            )
        if group_state == "factored":
            if not plain:
                raise ValueError(
                    "group_state='factored' needs plain SGD (torch.optim.SGD without momentum): a momentum "
                    "buffer or Adam's preconditioner mixes steps or coordinates, which the layer factors "
                    "cannot carry; use group_state='dense'"
                )
        return group_state

    def _require_plain_sgd(self) -> None:
        if not _plain_sgd(self.optimizer):
            raise ValueError(
                "the optimizer is no longer plain SGD (momentum was switched on?): the factored route "
                "cannot follow it; build the tracker with group_state='dense'"
            )

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
            "group_state": self.group_state,
            "sketch": None if self.sketch is None else self.sketch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "genkernel.PathKernelTracker/1":
            raise ValueError("not a PathKernelTracker state (made by tracker.state_dict())")
        saved = (state["num_groups"], state["quadrature"], state.get("group_state", "dense"))
        if saved != (self.num_groups, self.rule.name, self.group_state):
            raise ValueError(
                f"the saved tracker had num_groups={saved[0]}, quadrature={saved[1]!r}, group_state={saved[2]!r}; "
                f"this one has num_groups={self.num_groups}, quadrature={self.rule.name!r}, "
                f"group_state={self.group_state!r}"
            )
        self.ledger = PathKernelLedger.from_state_dict(state["ledger"])
        self.splitter.load_state_dict(state["splitter"])
        if self.sketch is not None:
            self.sketch.load_state_dict(state["sketch"])
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

    def _check_gradients(self, index, grads, losses, analysis_losses, sizes) -> dict[str, torch.Tensor]:
        """Check step 1 against training; returns the rounding gap {name: real gradient − Σ_g ĝ_g}."""
        loss_tolerance = max(self.rtol, 1e-6) * 10
        scale = float(losses.abs().max()) if losses.numel() else 0.0
        if not torch.allclose(analysis_losses.to(losses), losses, rtol=loss_tolerance, atol=loss_tolerance * scale):
            gap = float((analysis_losses.to(losses) - losses).abs().max())
            raise LedgerCheckError(
                f"step {index}: the per-example analysis forward does not reproduce the training losses (max gap "
                f"{gap:.3e}); the model's output must depend only on its own example and parameters"
            )
        gaps, scales, rounding = {}, {}, {}
        for name, p in self.params.items():
            real = torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.to(torch.float64, copy=True)
            scales[name] = float(real.norm()) + sizes[name]
            rounding[name] = real.sub_(grads[name].sum(dim=0))
            gaps[name] = float(rounding[name].norm())
        # A parameter whose true gradient is zero (a bias before a normalization) carries pure
        # rounding noise on both sides: compare it with rounding of the whole gradient too.
        floor = 16 * torch.finfo(next(iter(self.params.values())).dtype).eps * math.sqrt(sum(v * v for v in scales.values()))
        for name in self.params:
            if gaps[name] > self.rtol * scales[name] + floor:
                raise LedgerCheckError(
                    f"step {index}: the group gradients of '{name}' do not add up to the real gradient (gap "
                    f"{gaps[name]:.3e}, scale {scales[name]:.3e})"
                )
        return rounding

    def _check_updates(self, index, updates, theta_before, theta_after) -> None:
        self.splitter.check_state(self.rtol)
        for name, u in updates.items():
            before, after = theta_before[name], theta_after[name]
            # In place where possible: on a per-example route this check is a fair part of a step.
            size = after.abs()
            ulp = torch.nextafter(size, size.new_tensor(math.inf)).sub_(size).to(torch.float64)
            delta = after.to(torch.float64, copy=True).sub_(before.to(torch.float64))
            gap = u.sum(dim=0).sub_(delta).abs_()
            size = u.abs().sum(dim=0).add_(delta.abs_())
            if name in self.splitter.rounding_scale:  # the optimizer's own state rounding (splitting.py)
                size.add_(self.splitter.rounding_scale[name])
            tolerance = size.mul_(self.rtol).add_(ulp, alpha=2)
            if bool((gap > tolerance).any()):
                worst = float((gap - tolerance).max())
                raise LedgerCheckError(
                    f"step {index}: the split update of '{name}' does not add up to the optimizer's real step "
                    f"(excess gap {worst:.3e}); was the optimizer's state or hyperparameters changed in a way "
                    "the tracker cannot see?"
                )

    def _nodes(self, theta_before, theta_after) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """(w_q, θ_k + s_q Δ_k) for the quadrature rule's nodes, in the parameters' dtype."""
        nodes = []
        for node, weight in zip(self.rule.nodes, self.rule.weights):
            if node == 0.0:
                theta = theta_before
            elif node == 1.0:
                theta = theta_after
            else:
                theta = {
                    n: (b.to(torch.float64) + node * (theta_after[n].to(torch.float64) - b.to(torch.float64))).to(b.dtype)
                    for n, b in theta_before.items()
                }
            nodes.append((weight, theta))
        return nodes

    def _contributions(self, updates, nodes) -> torch.Tensor:
        """``[M, rows, d]`` float64: Σ_q w_q J(x; θ_q) u_r for every row r of ``updates``.

        Two exact routes: one JVP per row and node (cost ∝ rows), or the probes' Jacobians
        J(x) ``[M, d, P]`` times the updates (cost ∝ d, memory M·d·P). "auto" takes the
        Jacobian route when 8 d <= rows (measured: a reverse-mode Jacobian pass costs several
        JVPs) and the Jacobians fit in the memory budget.
        """
        names = list(self.params)
        dtype = nodes[0][1][names[0]].dtype
        tangents = {n: updates[n].to(dtype) for n in names}
        rows = updates[names[0]].shape[0]
        num_params = sum(t[0].numel() for t in tangents.values())
        m, d = self._f_prev.shape
        route = self.contribution_route
        if route == "auto":
            fits = 2 * m * d * num_params * tangents[names[0]].element_size() <= self.memory_budget
            route = "jacobian" if (8 * d <= rows and fits) else "jvp"
        total = None
        for weight, theta in nodes:
            if route == "jacobian":
                jac = per_example_jacobian(self.module, theta)(*self.probes)  # [M, d, P]
                flat = torch.cat([tangents[n].reshape(rows, -1) for n in names], dim=1)  # [rows, P]
                value = torch.einsum("mdp,gp->gmd", jac, flat)
            else:
                value = self._jvp_contributions(theta, tangents, rows, num_params)
            value = value.to(torch.float64) * weight  # [rows, M, d]
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


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """torch.optim.SGD with no momentum in any parameter group (its update is −η ĝ, stateless)."""
    return type(optimizer) is torch.optim.SGD and all(float(g.get("momentum", 0.0)) == 0.0 for g in optimizer.param_groups)
