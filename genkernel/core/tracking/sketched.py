"""The sketched group-state route: per-example ledgers for SGD with momentum, Adam and AdamW.

With one group per example, the dense route's per-group optimizer state is a float64 copy of
the parameters per example. Here each group keeps the random projection R s_g ∈ R^k of its
linear state s_g instead (:class:`genkernel.core.engine.projections.ParameterProjection`,
E[RᵀR] = I; weight matrices get Kronecker rows r_j ⊗ s_j, so per-example gradients of linear and
convolutional layers are sketched from their layer factors without being formed). The state
follows the optimizer's own linear recurrence, :meth:`UpdateSplitter.advance` (the same code
the dense route runs on full rows):

- SGD (momentum μ, dampening τ, Nesterov): s_g = b_g, the group's momentum buffer; the update
  is u_g = −η v_g with v_g = b_g, or ĝ_g + μ b_g with Nesterov (μ = 0: v_g = ĝ_g, and the
  buffers and their sketches stay as they are until momentum returns). A parameter whose first
  gradient comes after the others' (within the tracked window, or before it: buffers from before
  tracking for only some parameters) starts its buffer at b = g, not (1 − τ) g: refused when τ ≠ 0.
- Adam / AdamW: s_g = m_g, the group's first moment; u_g = −(η / (1 − β1^k)) m_g ⊘ (sqrt(v̂_k) + ε)
  with the optimizer's own second moment.

Both are u_g = D v_g with D diagonal (:meth:`UpdateSplitter.preconditioner`, read after the
step), so a contribution is J̄(x) D v_g = ⟨D J̄(x)ᵀ, v_g⟩ ≈ ⟨R D J̄(x)ᵀ, R v_g⟩: unbiased, with the
probe side ``[M, d, k]`` computed once per step from layer factors at the quadrature nodes and
shared by every partition.

Exactness is kept where it can be: the splitter keeps the exact totals (all groups together, the
rest, the rounding gap) and checks them against the optimizer every step; the total of the
examples' contributions is computed exactly (one JVP), and the difference between it and the sum
of a partition's sketched contributions is that partition's ``sketch_error``, reported apart from
the residual. Every step also checks Σ_g R s_g = R s_total for every partition.

Memory: (Σ G_π) × k float64 state, (O + I) × k numbers of R per weight matrix, and the i.i.d.
columns of the vector parameters (biases, norms) while they fit in the memory budget.
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapter import analysis_mode
from ..cost import plain_hyperparameter
from ..engine.factors import Factors
from ..engine.per_example import BatchFactors, probe_factors, probe_fallback_jacobians
from ..engine.projections import ParameterProjection
from ..engine.reference import norm_of, split_columns
from ..errors import LedgerCheckError
from ..grouping import abs_row_sum
from .routes import RouteContributions, TrackedModel, _FactorRoute, push_rows
from .splitters import UpdateSplitter, one_minus

SKETCH_OPTIMIZERS = "torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW"

# Traffic sums the norms of the per-step contributions; on this route they are unbiased estimates,
# whose norms overstate the true ones (measured over 100 seeds on a small MLP, mean sketched over
# dense traffic: SGD 1.28 at sketch_dim 8 and 1.03 at 64, Adam 2.86 and 1.37).
SKETCHED_TRAFFIC_NOTE = (
    "group_state='sketched': the group contributions are unbiased estimates and traffic sums their norms, which "
    "overstate the true ones (a small MLP: x1.03 under SGD and x1.37 under Adam at sketch_dim 64, x1.28 and x2.86 at "
    "8): read traffic and traffic shares from a run on the dense route"
)

# A sketched ledger whose estimates' sum misses the examples' exact total by more than this share of
# the change (‖sketch_error‖ / ‖Δf‖) is flagged in reports. Measured on a 2-512-512-1 MLP at
# sketch_dim 512 (the kernel benchmark): SGD with momentum 0.11, Adam 37-134. Under Adam the probe
# side is scaled by the preconditioner D = η / (sqrt(v̂) + ε), whose entries spread over orders of
# magnitude (D ~ 1/|g| after one step), so ‖D J̄ᵀ‖ ‖m_g‖ dwarfs ⟨D J̄ᵀ, m_g⟩.
SKETCH_ERROR_LIMIT = 0.1
# Units of the parameters' eps, times the magnitude the groups' sketched state was summed from (SketchedRoute.magnitude),
# that the state's check allows beside its rtol: each example's sketch rounds relative to its own norm.
SKETCH_ROUNDING_UNITS = 16


def sketch_error_note(relative_sketch_error: float | None, which: str = "the") -> str | None:
    """A report's note when a sketched ledger's estimates miss their exact total by more than
    :data:`SKETCH_ERROR_LIMIT` of the change; None otherwise (and for a ledger without sketched state,
    whose sketch error is 0). ``which``: the ledger's name in the note."""
    if relative_sketch_error is None or not relative_sketch_error > SKETCH_ERROR_LIMIT:
        return None
    return (
        f"{which} ledger's sketched group contributions sum to {relative_sketch_error:.3g} of the change away from "
        "the examples' exact total (‖sketch_error‖ / ‖Δf‖): the group contributions, their shares and every claim "
        "read from them carry sketch noise of that order. Raise sketch_dim (the noise falls as 1/sqrt(sketch_dim)) "
        "or use group_state='dense'; under Adam the preconditioner's spread makes this large at any affordable "
        "sketch_dim"
    )


def sketch_noise_note(relative_sketch_noise: float | None, which: str = "the") -> str | None:
    """A report's note when a sketched ledger's groups' own estimated noise (``ledger.relative_sketch_noise()``,
    ‖sketch_noise‖_F / ‖Δf‖) exceeds :data:`SKETCH_ERROR_LIMIT` of the change; None otherwise. The sum's sketch
    error cannot show it where the groups cancel (their sum small, each large)."""
    if relative_sketch_noise is None or not relative_sketch_noise > SKETCH_ERROR_LIMIT:
        return None
    return (
        f"{which} ledger's groups, sketched, each carry an estimated standard error of "
        f"{relative_sketch_noise:.3g} of the change (‖sketch_noise‖ / ‖Δf‖), whatever their sum's sketch error: the "
        "group contributions, their shares and every claim read from them carry sketch noise of that order. Raise "
        "sketch_dim (the noise falls as 1/sqrt(sketch_dim)) or use group_state='dense'"
    )


class SketchedRoute(_FactorRoute):
    """Per-group linear optimizer state as k-dimensional sketches (see the module docstring).

    Args:
        model, splitter, contribution_route: as for every route; the optimizer must be SGD,
            Adam or AdamW with the same momentum, dampening and Nesterov (SGD) or β1 (Adam) in
            every parameter group, since a group's sketched state mixes every parameter.
        k: the projection dimension.
        seed, kind: R's seed and entries ("rademacher" or "gaussian").
    """

    name = "sketched"

    def __init__(self, model: TrackedModel, splitter: UpdateSplitter, contribution_route: str, *, k: int, seed: int,
                 kind: str):
        optimizer = splitter.optimizer
        if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            raise ValueError(
                f"group_state='sketched' supports {SKETCH_OPTIMIZERS}; got {type(optimizer).__name__} "
                "(use group_state='dense')"
            )
        super().__init__(model, splitter, contribution_route)
        self.projection = ParameterProjection({n: tuple(p.shape) for n, p in model.params.items()}, k, seed=seed,
                                              kind=kind, cache_bytes=model.memory_budget)
        self.adam = type(optimizer) is not torch.optim.SGD
        self.state: torch.Tensor | None = None  # [Σ G_π, k] float64
        self._pending: torch.Tensor | None = None  # this step's new state, until commit()
        # The magnitude the groups' sketched state was summed from: the recurrence of the state run on Σ_n ‖R c_n ∇ℓ_n‖
        # (``[1, 1]`` float64), the scale of its rounding in :meth:`_check`; with its pending value until commit().
        self.magnitude: torch.Tensor | None = None
        self._pending_magnitude: torch.Tensor | None = None
        self._fresh: bool | None = None
        # maximize per parameter at the steps the sketches hold (they hold the groups' gradients, not
        # negated: the sign is applied on the probes' side, so it must not change under them).
        self._maximize: dict[str, bool] | None = None
        self._pending_maximize: dict[str, bool] | None = None
        self.hyper = self._shared_hyperparameters()

    @property
    def k(self) -> int:
        return self.projection.k

    # -- the recurrence ------------------------------------------------------------------------
    def _shared_hyperparameters(self) -> dict[str, Any]:
        keys = ("betas",) if self.adam else ("momentum", "dampening", "nesterov")
        values = {tuple(plain_hyperparameter(group.get(key)) for key in keys) for group in self.splitter.optimizer.param_groups}
        if len(values) != 1:
            raise ValueError(
                f"group_state='sketched' needs the same {', '.join(keys)} in every parameter group (one "
                f"sketched state per group of examples mixes all parameters); got {sorted(values)}"
            )
        (shared,) = values
        if self.adam:
            return {"beta1": shared[0][0]}
        # PyTorch's alpha = 1 − τ in a tensor τ's dtype (the splitter's rule, UpdateSplitter.advance)
        undamped = one_minus(self.splitter.optimizer.param_groups[0].get("dampening", 0.0))
        return {"momentum": shared[0], "dampening": shared[1], "nesterov": bool(shared[2]), "undamped": undamped}

    def before_step(self) -> None:
        """Reads the shared hyperparameters and, on the first step, whether SGD starts its momentum
        buffers now (b_1 = ĝ_1) or had them already (all, or some: the groups' then start from zero);
        refuses what one sketch of all parameters' state cannot follow."""
        super().before_step()  # (the structurally null parameters: their update is the rest's, sketched nowhere)
        self.hyper = self._shared_hyperparameters()
        maximize = {n: bool(self.splitter.hyper[n].get("maximize", False)) for n in self.model.params}
        if self.state is not None and self._maximize is not None:
            flipped = [n for n, value in maximize.items() if n in self._maximize and value != self._maximize[n]]
            if flipped:
                raise ValueError(
                    f"maximize changed for parameters {flipped[:5]} while the groups hold sketched optimizer state: "
                    "the optimizer's buffers now mix ascent and descent gradients, which the sketches (kept with "
                    "one sign per parameter) cannot follow. Use group_state='dense', or keep maximize fixed"
                )
        self._pending_maximize = maximize
        stateful = self.adam or self.hyper["momentum"] != 0
        skipped = sorted(self.splitter.skipped)
        held = [n for n in skipped if stateful and self.splitter.current(n) is not None
                and bool(self.splitter.current(n).any())]
        if held:
            raise ValueError(
                f"parameters {held[:5]} have no gradient at this step but optimizer state from earlier ones: the "
                "optimizer leaves their state as it is while every other parameter's decays, which one sketch of "
                "all parameters' state cannot follow. Use group_state='dense', or give those parameters a "
                "gradient at every step (zero is enough: optimizer.zero_grad(set_to_none=False))"
            )
        if not self.adam:
            # Which parameters SGD starts a momentum buffer for at this step (b = ĝ, undampened).
            optimizer = self.splitter.optimizer
            has = {n: optimizer.state.get(p, {}).get("momentum_buffer") is not None
                   for n, p in self.model.params.items() if n not in skipped}
            if self.state is None:
                # No buffer anywhere: b_1 = ĝ_1 for every group. Buffers from before tracking (all, or only
                # some parameters': a branch off then) are the rest's: the groups' start from zero,
                # b = μ 0 + (1 − τ) ĝ, which is SGD's b = ĝ for a parameter starting now when τ = 0.
                self._fresh = not any(has.values())
            momentum, dampening = self.hyper["momentum"], self.hyper["dampening"]
            starting = [n for n, buffered in has.items() if not buffered]
            if momentum != 0 and dampening != 0 and starting and (self.state is not None or not self._fresh):
                raise ValueError(
                    f"parameters {starting[:5]} get their first gradient at this step, after the others: SGD starts "
                    f"their momentum buffers with the whole gradient (b = g) while every other parameter's takes "
                    f"(1 - dampening) g with dampening={dampening}, which one sketch of all parameters' "
                    "state cannot follow. Use group_state='dense' or dampening=0, or give those parameters a gradient "
                    "from the first step on (untracked steps before the tracker included)"
                )

    def _advance(self, ids: dict[str, torch.Tensor], sketched_grads: torch.Tensor) -> torch.Tensor:
        """Advance every partition's groups with this step's ``[B, k]`` sketches R c_n ∇ℓ_n (times
        clipping); returns the groups' sketched update directions R v_g ``[Σ G_π, k]`` float64."""
        partitions = self.model.partitions
        step = sketched_grads.new_zeros((partitions.total, self.k))
        for name, part in partitions.slices.items():
            step.index_add_(0, ids[name].to(step.device) + part.start, sketched_grads)
        state = self.state  # advance() leaves it as it is: committed only at commit()
        magnitude = self.magnitude
        size = sketched_grads.norm(dim=1).sum().reshape(1, 1)  # Σ_n ‖R c_n ∇ℓ_n‖: what the groups' sums round from
        if state is None and not self.adam and not self._fresh and self.hyper["momentum"] != 0:
            state = torch.zeros_like(step)  # the optimizer's buffers predate tracking: their part is the rest's
        if magnitude is None and state is not None:
            magnitude = torch.zeros_like(size)  # (a state loaded without its magnitude, or zeros as above)
        pending, direction = self.splitter.advance(state, step, self.hyper)
        pending_magnitude, _ = self.splitter.advance(magnitude, size, self.hyper)
        # SGD with momentum 0 at this step (a schedule through 0) leaves the optimizer's buffers as
        # they are, to be used again when momentum returns: so are the groups' sketches.
        self._pending = self.state if pending is None else pending
        self._pending_magnitude = self.magnitude if pending is None else pending_magnitude.abs()
        return direction

    def commit(self) -> None:
        self.state = self._pending
        self._pending = None
        self.magnitude, self._pending_magnitude = self._pending_magnitude, None
        if self._pending_maximize is not None:
            self._maximize = self._pending_maximize
        super().commit()

    def discard(self) -> None:
        self._pending = None
        self._pending_magnitude = None
        super().discard()

    def _check(self, rtol: float) -> None:
        """Σ_g R s_g must equal R s_total for every partition, s_total being the exact state the
        splitter keeps for all groups together (under ``maximize`` it holds negated gradients,
        the sketches do not).

        The gap is judged against the sketches' norms and the magnitude the groups' state was summed from
        (:attr:`magnitude`: each example's sketch R c_n ∇ℓ_n is rounded in the parameters' dtype, relative to its own
        norm): near a minimum the examples' gradients cancel, and a float32 step whose gradients summed to 1e-3 of
        their norms was refused for a gap of 4e-5 of its sums, rounding alone (tests/test_sketch45.py).

        A parameter without exact state (one the optimizer has not stepped with state since tracking
        began: a branch or head without gradients) has none in any group either, and adds nothing:
        the check runs whenever the groups hold state, not only once every parameter has some."""
        exact = {n: v for n in self.model.params if (v := self.splitter.current(n)) is not None}
        if self._pending is None or not exact:
            return
        reference = sum(
            self.projection.project(n, v[0].unsqueeze(0).to(self._dtype(n)))[0].to(torch.float64)
            * (-1.0 if self.splitter.hyper[n].get("maximize", False) else 1.0)
            for n, v in exact.items()
        )
        # The examples' sketches round in their parameters' dtype, relative to their own norms: SKETCH_ROUNDING_UNITS
        # of that eps times the magnitude they were summed from (the gap of correct float32 steps: at most 0.4 units
        # of it, cancelling or not). Judged at rtol instead (1e-5, 84 float32 units) it let a drift of the state 2.5-4.6
        # times larger pass than before it was added (read45).
        eps = max(torch.finfo(p.dtype).eps for p in self.model.params.values())
        summed = 0.0 if self._pending_magnitude is None else float(self._pending_magnitude.sum())
        for name, part in self.model.partitions.slices.items():
            rows = self._pending[part]
            # (norm_of: squares formed directly overflowed past 1e154)
            scale = norm_of(reference) + norm_of(abs_row_sum(rows))
            gap = norm_of(rows.sum(dim=0) - reference)
            allowed = rtol * scale + SKETCH_ROUNDING_UNITS * eps * summed
            if gap > allowed + 1e-300:
                raise LedgerCheckError(
                    f"the sketched per-group state of partition '{name}' does not add up to the sketch of the "
                    f"optimizer's total (gap {gap:.3e}, scale {scale:.3e}, the examples' sketches summed from "
                    f"{summed:.3e})"
                )

    # -- step 5 ------------------------------------------------------------------------------
    def contributions(self, updates, nodes, gradients, ids, clip_factor):
        """⟨R D J̄(x)ᵀ, R v_g⟩ per group of every partition; the examples' exact total and the rest
        by JVP; each partition's sketch error is their difference."""
        model = self.model
        directions = self._advance(ids, self.project_batch(gradients.batch) * clip_factor)
        self._check(model.check_rtol)
        probe_side = self.project_probes(nodes).to(directions.device)  # [M, d, k]
        estimates = torch.einsum("mdk,gk->mgd", probe_side, directions).contiguous()  # the sums below run along G
        null = self._null_row(updates, 1)
        pushed = {n: u[0:2] if null is None else torch.cat([u[0:2], null[n]]) for n, u in updates.items()}
        exact = push_rows(model, pushed, nodes, self.contribution_route)  # [M, 2 (+1: the null parameters' part), d]
        contributions = {name: estimates[:, part] for name, part in model.partitions.slices.items()}
        sketch_error = {name: exact[:, 0] - c.sum(dim=1) for name, c in contributions.items()}
        # Each estimate's own standard error, Var[⟨Ra, Rv⟩] <= (c |a|² |v|² + ⟨a, v⟩²) / k, from the sketches' norms
        # (unbiased for |a|², |v|²): the sum's error above cancels where the groups do, a group's does not. c = 1 for
        # an i.i.d. R; a weight matrix's Kronecker rows r ⊗ s add 2‖AᵀV‖² + 2‖AVᵀ‖² + 2 tr((AVᵀ)²) <= 6 |A|² |V|²
        # per row (Gaussian; Rademacher less): c = 7 (rank-one A = V, an MLP layer's per-example gradient, reaches it).
        spread = 7.0 if any(self.projection.is_matrix(n) for n in model.params) else 1.0
        variance = (spread * probe_side.square().sum(dim=2)[:, None, :] * directions.square().sum(dim=1)[None, :, None]
                    + estimates.square()) / self.k  # [M, ΣG, d]
        noise = variance.sum(dim=2).sqrt()
        sketch_noise = {name: noise[:, part] for name, part in model.partitions.slices.items()}
        result = RouteContributions.every_group(contributions, exact[:, 1], sketch_error, sketch_noise)
        return result.with_null(None if null is None else exact[:, 2], self.null_names)

    # -- the two sides of ⟨R D J̄(x)ᵀ, R v_g⟩ --------------------------------------------------
    def project_batch(self, batch: BatchFactors) -> torch.Tensor:
        """``[B, k]`` float64: R c_n ∇ℓ_n; weight matrices of linear and convolutional layers from
        their factors, everything else from per-example gradients, one block at a time."""
        null = set(self.null_names)  # (a structurally null parameter's update is the rest's: no group sketches it)
        ones = {name: 0.0 if name in null else 1.0 for name in self.model.params}
        parts = [self._project_block(f, 0, ones) for f in batch.factors]
        parts += [self.projection.project(n, g.to(self._dtype(n))).to(torch.float64) for n, g in batch.fallback.items()
                  if n not in null]
        return sum(p for p in parts if p is not None)

    def project_probes(self, nodes: list[tuple[float, dict[str, torch.Tensor]]]) -> torch.Tensor:
        """``[M, d, k]`` float64: Σ_q w_q R D J(x; θ_q)ᵀ with D per parameter: a number (SGD: from
        the layer factors) or a tensor of the parameter's shape (Adam: the Jacobian block is
        formed, scaled and projected)."""
        model = self.model
        preconditioner = self.preconditioner()
        probes = model.probes
        total = torch.zeros((probes[0].shape[0], model.outputs, self.k), dtype=torch.float64, device=probes[0].device)
        row_chunks, output_chunks = self.probe_chunks()
        with analysis_mode(model.module):
            for weight, theta in nodes:
                for rows in row_chunks:
                    total[rows] += weight * self._project_chunk(tuple(t[rows] for t in probes), theta, preconditioner,
                                                                output_chunks)
        return total

    def _project_chunk(self, probes, theta, preconditioner, output_chunks: list[slice]) -> torch.Tensor:
        """``[m, d, k]`` float64: R D J(x; θ)ᵀ for one chunk of probes at one node."""
        d, m = self.model.outputs, probes[0].shape[0]
        value = torch.zeros((d, m, self.k), dtype=torch.float64, device=probes[0].device)

        def add(outputs: slice, factors: list[Factors]) -> None:
            for f in factors:
                for c in range(outputs.stop - outputs.start):  # one output at a time: [m, k] each
                    part = self._project_block(f, c, preconditioner)
                    if part is not None:
                        value[outputs.start + c] += part

        probe_factors(self.model.module, self.plan, probes, theta, output_chunks, add)

        def add_fallback(outputs: slice, fb: torch.Tensor) -> None:  # fb [m, c, P_fb]
            c = outputs.stop - outputs.start
            for name, part in split_columns(fb, self.plan.fallback).items():
                jac = part.transpose(0, 1).reshape(c * m, *self.plan.fallback[name].shape)
                scaled = jac * _as(preconditioner[name], jac)
                value[outputs] += self.projection.project(name, scaled).to(torch.float64).reshape(c, m, self.k)

        probe_fallback_jacobians(self.model.module, self.plan, probes, theta, output_chunks, add_fallback)
        return value.transpose(0, 1)

    def _project_block(self, f: Factors, cotangent: int, scale: dict[str, Any]) -> torch.Tensor | None:
        """R D of one block's per-example gradients for one cotangent: ``[N, k]`` float64 (None for
        a block the forward did not call). ``scale``: D per parameter name."""
        if f.is_unused:
            return None
        one = f.cotangent(cotangent)
        block = f.block
        total, names = None, block.names
        outer = one.weight_outer()
        if outer is not None and not isinstance(scale[block.weight], torch.Tensor):
            # A number for D: the weight's sketch straight from the factors, Σ_t (r·g_t)(s·a_t).
            total = self.projection.project_outer(block.weight, *outer).to(torch.float64) * scale[block.weight]
            names = [n for n in names if n != block.weight]
        for name, grads in one.gradients(names).items():
            values = grads[0] * _as(scale[name], grads[0])
            part = self.projection.project(name, values).to(torch.float64)
            total = part if total is None else total + part
        return total

    def preconditioner(self) -> dict[str, Any]:
        """D per parameter from the splitter (read after the real step), negated under
        ``maximize``: the groups' sketched state holds gradients, not ascent directions."""
        out = {}
        for name, p in self.model.params.items():
            if name in self.splitter.skipped or name in self.splitter.null:
                # the optimizer does not move it at this step, or its move is the rest's (structurally null)
                out[name] = 0.0
                continue
            sign = -1.0 if self.splitter.hyper[name].get("maximize", False) else 1.0
            value = self.splitter.preconditioner(name)
            out[name] = (value * sign).to(p.dtype) if isinstance(value, torch.Tensor) else value * sign
        return out

    def _dtype(self, name: str) -> torch.dtype:
        """The dtype parameter ``name``'s values are projected in: its own (the first parameter's for all rounded a
        float64 parameter's sketches to a float32 first layer's dtype)."""
        return self.model.params[name].dtype

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"state": None if self.state is None else self.state.clone(), "fresh": self._fresh,
                "magnitude": None if self.magnitude is None else self.magnitude.clone(),
                "k": self.k, "seed": self.projection.seed, "kind": self.projection.kind,
                "maximize": None if self._maximize is None else dict(self._maximize),
                "order": list(self.projection.index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["k"], state["seed"], state["kind"]) != (self.k, self.projection.seed, self.projection.kind):
            raise ValueError(
                f"the saved sketch has k={state['k']}, seed={state['seed']}, kind={state['kind']!r}; this "
                f"tracker has k={self.k}, seed={self.projection.seed}, kind={self.projection.kind!r}"
            )
        # R's part for a parameter is seeded by its position among the parameters: a model that registers
        # its modules in another order since the state was saved (same names and shapes) keeps the
        # saved positions, so the sketches go on in the R they were made with.
        order = state.get("order")  # absent from states saved before it was kept
        if order is not None and list(order) != list(self.projection.index):
            if sorted(order) != sorted(self.projection.index):
                raise ValueError(
                    f"the saved sketch covers parameters {sorted(order)[:5]}..., this tracker "
                    f"{sorted(self.projection.index)[:5]}...: load it into a tracker of the same model"
                )
            projection = self.projection
            self.projection = ParameterProjection({n: projection.shapes[n] for n in order}, projection.k,
                                                  seed=projection.seed, kind=projection.kind,
                                                  cache_bytes=self.model.memory_budget)
        self.state = None if state["state"] is None else state["state"].clone()
        magnitude = state.get("magnitude")  # absent from states saved before it was kept: judged from zero on
        self.magnitude = None if magnitude is None else magnitude.clone()
        self._fresh = state["fresh"]
        maximize = state.get("maximize")  # absent from states saved before it was kept
        self._maximize = None if maximize is None else dict(maximize)


def _as(value: Any, like: torch.Tensor) -> Any:
    return value.to(like.device) if isinstance(value, torch.Tensor) else value


__all__ = ["SKETCH_OPTIMIZERS", "SketchedRoute"]
