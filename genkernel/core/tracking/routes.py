"""How a tracker holds its groups' share of every update: one class per group-state route.

A route is chosen once, when the tracker is built, and answers the tracker's numbered steps
(:mod:`genkernel.core.tracking.tracker`) with the same small set of verbs:

- :meth:`GroupStateRoute.recording` and :meth:`GroupStateRoute.gradients` (step 1): what the
  training forward and backward leave for the route to read (layer factors, when they fit the
  memory budget: no second pass), then the rows of group gradients the splitter keeps, with the
  analysis losses and the sizes their rounding is judged against;
- :meth:`GroupStateRoute.before_step` (step 2): anything read just before ``optimizer.step()``;
- :meth:`GroupStateRoute.contributions` (step 5): every partition's ``[M, G, d]`` contributions,
  the rest's ``[M, d]`` and the per-partition sketch error;
- :meth:`GroupStateRoute.commit` / :meth:`GroupStateRoute.discard`: the group state a step
  computed is kept only once the whole step is recorded;
- ``state_dict`` / ``load_state_dict``.

Routes:

- :class:`DenseRoute`: a float64 copy of the parameters per group of every partition and per
  kind of optimizer state ((Σ G_π + 2) × P values); exact, every supported optimizer.
- :class:`FactoredRoute` (plain SGD, exact): no per-group copy; each example's contribution is a
  cross kernel of layer factors (:mod:`genkernel.core.engine.per_example`), summed into the
  groups of every partition; cost grows with the batch, not with the groups.
- :class:`~genkernel.core.tracking.sketched.SketchedRoute`: k-dimensional sketches of each
  group's optimizer state (SGD with momentum, Adam, AdamW).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from ..adapter import (
    analysis_mode, batch_size, check_per_example_safe, coupled_forward, coupled_modules, data_dependent_modules,
    explained_torch_func_errors, not_fitting_inputs, not_fitting_message,
)
from ..cost import plain_sgd, push_pass_shape, push_route, reads_training_pass
from ..param_bytes import parameter_bytes
from ..push_memory import DEFAULT_PUSH_MEMORY, PushMemory, jvp_pass
from ..engine.factored import capture_chunks
from ..engine.factors import COVERAGE_SAMPLE, Plan, TrainingCapture, Unfactorable, covering_plan, pair_covering_plan
from ..engine.gradients import (factor_rows, gradients_and_rounding, gradients_from_losses, group_gradients,
                                membership_matrix)
from ..engine.per_example import BatchFactors, batch_totals, capture_batch, factored_contributions, training_batch
from ..engine.reference import batch_jacobian, norm_of, per_example_jacobian
from ..grouping import Partitions, abs_row_sum
from .distributed import DistributedContext, combine_group_gradients
from .null_params import structurally_null
from .splitters import UpdateSplitter

# A structurally null parameter's float32 gradient is rounding noise: measured 0.2-40 units of float32 rounding of the
# step's largest gradient entry (conv biases before BatchNorm2d, batches 8-512 of 8x8-32x32 images). Real gradients
# can be as small as 1e2 units (a random CIFAR-10 UNet's mid-block query bias): the test only removes parameters the
# float64 passes found, where those were wrong (a class embedding they found null on one-class probes: 3e6 units).
NULL_STEP_TOLERANCE = 1e4

CONTRIBUTION_ROUTES = ("auto", "jvp", "jacobian")
GRADIENT_ROUTES = ("auto", "graph", "example", "factored")
ALL_GROUPS = Partitions({"all": 1})  # what the splitter keeps on routes without per-group rows


@dataclass
class TrackedModel:
    """What every route reads: the analysed module, its trainable parameters, the probes and the
    partitions, the memory budget and (under DDP) the process group."""

    module: nn.Module
    params: dict[str, torch.Tensor]
    probes: tuple[torch.Tensor, ...]
    partitions: Partitions
    outputs: int  # d
    memory_budget: int
    distributed: DistributedContext | None
    check_rtol: float  # relative tolerance of the exact checks (float64: 1e-10, float32: 1e-5)
    state_dtype: torch.dtype = torch.float64  # of the groups' gradients, optimizer state and updates
    record_bytes: int = 0  # per example, the activations: what step 1 keeps of the training pass, what a JVP row scales with
    # the model's forward seen drawing random numbers (adapter.random_forward) or coupling its examples in plain
    # operations (adapter.coupled_forward): per-example gradients are not its examples' own
    forward_couplings: tuple[str, ...] = ()
    push_memory: PushMemory = DEFAULT_PUSH_MEMORY  # what its JVP pass holds per probe and record byte (core.push_memory)
    # A module the loss reads the model's outputs through (a GAN generator's discriminator), for the null search
    # (:func:`~genkernel.core.tracking.null_params.structurally_null`'s ``through``); None: the model's own outputs.
    read_through: nn.Module | None = None
    # (probes_coupled's: ((forward_couplings, the modules' modes), whether a forward of the probes in those modes
    # couples them), so that the two forwards of that check run once per mode, not at every push)
    probe_coupling: tuple[tuple, bool] | None = None


@dataclass
class StepGradients:
    """Step 1's result.

    Attributes:
        grads: ``{name: [rows, *shape]}`` group gradients (the state dtype) times the clipping factor,
            one row per group of the splitter's partitions.
        losses: ``[B]`` per-example losses of the analysis forward.
        sizes: per parameter, the size against which the gradient's rounding is judged.
        batch: the batch's layer factors (factored and sketched routes), else None.
    """

    grads: dict[str, torch.Tensor]
    losses: torch.Tensor
    sizes: dict[str, float]
    batch: BatchFactors | None = None


@dataclass
class RouteContributions:
    """Step 5's result, float64: ``contributions {partition: [M, U, d]}`` for the groups
    ``columns {partition: [U]}`` (distinct group ids, in any order; every group ``arange(G)``
    except on the factored route, where a step moves only its batch's groups), ``rest [M, d]``
    and ``sketch_error {partition: [M, d]}`` (zeros except on the sketched route)."""

    contributions: dict[str, torch.Tensor]
    columns: dict[str, torch.Tensor]
    rest: torch.Tensor
    sketch_error: dict[str, torch.Tensor]
    sketch_noise: dict[str, torch.Tensor] | None = None  # sketched route: {partition: [M, G]} standard errors
    # The part of ``rest`` [M, d] that is the structurally null parameters' whole update (tracking.null_params), and
    # their names; None and () where the step had none.
    null_rest: torch.Tensor | None = None
    null_names: tuple[str, ...] = ()

    @classmethod
    def every_group(cls, contributions: dict[str, torch.Tensor], rest: torch.Tensor,
                    sketch_error: dict[str, torch.Tensor],
                    sketch_noise: dict[str, torch.Tensor] | None = None) -> "RouteContributions":
        """Contributions ``{partition: [M, G, d]}`` of every group of each partition."""
        columns = {name: torch.arange(c.shape[1], device=c.device) for name, c in contributions.items()}
        return cls(contributions, columns, rest, sketch_error, sketch_noise)

    def with_null(self, null_rest: torch.Tensor | None, names: tuple[str, ...]) -> "RouteContributions":
        """This result with the structurally null parameters' part of the rest (None: none this step)."""
        if null_rest is not None:
            self.null_rest, self.null_names = null_rest, tuple(names)
        return self

    def dense(self, name: str, num_groups: int) -> torch.Tensor:
        """``[M, G, d]`` partition ``name``'s contributions with zeros for the groups that did not move."""
        compact, columns = self.contributions[name], self.columns[name]
        if compact.shape[1] == num_groups and torch.equal(columns, torch.arange(num_groups, device=columns.device)):
            return compact
        m, _, d = compact.shape
        return compact.new_zeros((m, num_groups, d)).index_copy_(1, columns, compact)


def push_rows(
    model: TrackedModel, updates: dict[str, torch.Tensor], nodes: list[tuple[float, dict[str, torch.Tensor]]],
    route: str = "auto",
) -> torch.Tensor:
    """``[M, rows, d]`` float64: Σ_q w_q J(x; θ_q) u_r for every row r of ``updates`` at the probes.

    Two exact routes: one JVP per row and node ("jvp", cost ∝ rows), or the probes' Jacobians
    J(x) ``[M, d, P]`` times the updates ("jacobian", cost ∝ d, memory M·d·P). "auto" takes the
    Jacobian route when 8 d <= rows (measured: a reverse-mode Jacobian pass costs several JVPs)
    and the Jacobians fit in the memory budget.
    """
    names = list(model.params)
    # each row in its own parameter's dtype (a model of mixed dtypes: the first one's for all was refused by the
    # JVP, "expected scalar type Double but found Float")
    tangents = {n: updates[n].to(nodes[0][1][n].dtype) for n in names}
    rows = updates[names[0]].shape[0]
    m, d = model.probes[0].shape[0], model.outputs
    if route == "auto":
        route = push_route(rows, m, d, parameter_bytes(t[0] for t in tangents.values()), model.memory_budget)
    # Probes whose outputs depend on each other in the analysis passes (BatchNorm without running statistics
    # normalizes with the probe batch's statistics in eval mode too; a statistic over the batch in plain operations):
    # f(probes) is one forward of them all, and so is its Jacobian. Each probe's alone (per_example_jacobian) or a
    # chunk of them was not (a conv net's BatchNorm2d(track_running_stats=False): groups 4-10 % off, an 11 % residual
    # at any lr).
    together = probes_coupled(model)
    total = None
    for weight, theta in nodes:
        if route == "jacobian":
            jacobian = batch_jacobian if together else per_example_jacobian
            jac = jacobian(model.module, theta)(*model.probes)  # [M, d, P]
            flat = torch.cat([tangents[n].reshape(rows, -1) for n in names], dim=1)  # [rows, P]
            value = torch.einsum("mdp,gp->gmd", jac, flat)
        else:
            value = _jvp_rows(model, theta, tangents, rows, together=together)
        value = value.to(torch.float64) * weight  # [rows, M, d]
        total = value if total is None else total + value
    return total.permute(1, 0, 2).contiguous()


def probes_coupled(model: TrackedModel) -> bool:
    """Whether the probes' outputs depend on each other in the analysis passes (their eval mode): a module known by
    type to couple its examples in its current mode (BatchNorm without running statistics), or, where a forward
    found a coupling in plain operations in the mode it was checked in (``forward_couplings``, usually training's),
    :func:`~genkernel.core.adapter.coupled_forward` of the probes in the current mode: two forwards of the first
    probes, once per mode and set of couplings (``model.probe_coupling``). Their pushes then run all the probes
    together. (``forward_couplings`` alone would send every model with a training-mode BatchNorm to one pass of all
    the probes, the Jacobian route's vector-Jacobian products each through the whole probe batch; ignored, a
    centering ``h - h.mean(0)``, which couples in eval mode too, had each probe's Jacobian taken alone on the
    Jacobian route: the groups' contributions 17-25 % off, silently, the difference left in the residual.)"""
    if coupled_modules(model.module):
        return True
    if not model.forward_couplings:
        return False
    key = (tuple(model.forward_couplings), tuple(m.training for m in model.module.modules()))
    if model.probe_coupling is None or model.probe_coupling[0] != key:
        model.probe_coupling = (key, bool(coupled_forward(model.module, model.probes)))
    return model.probe_coupling[1]


def _jvp_rows(model: TrackedModel, theta, tangents, rows: int, *, together: bool = False) -> torch.Tensor:
    """``[rows, M, d]``: J(x; θ) u_r by forward-mode AD, vmapped over chunks of rows, each pass
    through all the probes or, when one row through all of them does not fit the memory budget,
    through a chunk of them (:func:`~genkernel.core.cost.push_pass_shape`); ``together``: always all of
    them (probes whose outputs depend on each other, :func:`probes_coupled`)."""
    probes = model.probes
    m = probes[0].shape[0]
    rows_per_pass, probes_per_pass = push_pass_shape(model.memory_budget, m, model.record_bytes, model.push_memory)
    if together:
        probes_per_pass = m
    pushes = [jvp_pass(model.module, theta, tuple(t[start : start + probes_per_pass] for t in probes))
              for start in range(0, m, probes_per_pass)]
    parts = []
    for start in range(0, rows, rows_per_pass):
        rows_tangents = {n: t[start : start + rows_per_pass] for n, t in tangents.items()}
        with explained_torch_func_errors():
            parts.append(torch.cat([vmap(push)(rows_tangents) for push in pushes], dim=1))
    return torch.cat(parts)


class GroupStateRoute:
    """Base class of the group-state routes (see the module docstring)."""

    name = ""

    def __init__(self, model: TrackedModel, splitter: UpdateSplitter, contribution_route: str):
        self.model = model
        self.splitter = splitter
        self.contribution_route = contribution_route
        self._checked: set[tuple] = set()  # kinds of training inputs a layer plan was checked on (input_kind)
        self._null_found: dict[tuple[bool, ...], frozenset[str]] = {}  # per set of modes seen (a loop that evaluates)
        self._refresh_null()

    def _refresh_null(self) -> None:
        """The structurally null parameters (:func:`~genkernel.core.tracking.null_params.structurally_null`) of the
        module in its current modes that are null at this step too, for the splitter. A parameter is a candidate where
        its gradient at this step (``p.grad``, the optimizer's) is at its dtype's rounding level (≤
        :data:`NULL_STEP_TOLERANCE` units of it, of the largest entry of the step's gradient); the float64 passes run
        only where one is, once per set of modes (the invariance is training mode's: a BatchNorm in eval mode does not
        cancel its input's bias). They see the probes and the parameters of the time they ran: a class embedding whose
        first probes share one class (a shift BatchNorm cancels there, not on a mixed batch) or a layer after a
        zero-initialised one (its input rounding at first, real once that layer moved) look null there and are not;
        the step's own gradient keeps their update the groups'. Before any gradient (construction) none."""
        self.splitter.null = frozenset()
        grads = {n: p.grad for n, p in self.model.params.items()
                 if p.grad is not None and p.grad.numel() and p.grad.is_floating_point()}
        if not grads:
            return
        by_device: dict[torch.device, list[str]] = {}
        for n, g in grads.items():
            by_device.setdefault(g.device, []).append(n)
        sizes = {}
        for names in by_device.values():  # (one transfer per device, not one per parameter)
            maxima = torch.stack([grads[n].detach().abs().max().to(torch.float64) for n in names]).tolist()
            sizes.update(zip(names, maxima))
        sizes = {n: sizes[n] for n in grads}
        scale = max(sizes.values())
        if not math.isfinite(scale) or not scale > 0:
            return
        small = {n: s for n, s in sizes.items() if s <= NULL_STEP_TOLERANCE * torch.finfo(grads[n].dtype).eps * scale}
        through = self.model.read_through
        modes = tuple(m.training for m in self.model.module.modules())
        if through is not None:
            modes += tuple(m.training for m in through.modules())
        if not small or (modes not in self._null_found and not any(s > 0 for s in small.values())):
            return  # (no parameter's gradient is rounding noise: the float64 passes are not run)
        if modes not in self._null_found:
            found = structurally_null(self.model.module, self.model.params, self.model.probes)
            if through is not None:  # (a superset where the pass through it runs; else the model's own)
                found += structurally_null(self.model.module, self.model.params, self.model.probes, through=through)
            self._null_found[modes] = frozenset(found)
        self.splitter.null = self._null_found[modes] & small.keys()

    @property
    def null_names(self) -> tuple[str, ...]:
        """The structurally null parameters that move at this step (in the parameters' order)."""
        null = self.splitter.null
        return tuple(n for n in self.model.params if n in null and n not in self.splitter.skipped)

    def _null_row(self, updates: dict[str, torch.Tensor], rest_row: int) -> dict[str, torch.Tensor] | None:
        """``{name: [1, *shape]}`` the rest row of ``updates`` on the structurally null parameters only (zero
        elsewhere), or None where none moves at this step."""
        names = set(self.null_names)
        if not names:
            return None
        return {n: (u[rest_row : rest_row + 1] if n in names else torch.zeros_like(u[rest_row : rest_row + 1]))
                for n, u in updates.items()}

    def _plan_for_new_kind(self, inputs: tuple[torch.Tensor, ...], exclude: frozenset | set) -> Plan | None:
        """:func:`training_plan` on ``inputs`` when their kind (:func:`input_kind`) was not checked
        yet; None when it was (the plan checked then stands)."""
        kind = input_kind(inputs)
        if kind in self._checked:
            return None
        plan = training_plan(self.model, inputs, exclude)
        self._checked.add(kind)
        return plan

    @property
    def splitter_partitions(self) -> Partitions:
        """The rows the splitter keeps: every partition's groups (dense) or their total."""
        return ALL_GROUPS

    def uses_graph(self) -> bool:
        """Whether step 1 takes the group gradients from the training step's own graph
        (:meth:`graph_gradients`, before the backward) rather than from a second pass (:meth:`gradients`)."""
        return False

    def graph_gradients(self, losses: torch.Tensor, ids: dict[str, torch.Tensor], coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of group gradients from the per-example ``losses`` with their graph (before clipping)."""
        raise ValueError(
            f"group_state={self.name!r} reads its group gradients from per-example layer factors, not from the "
            "training graph: observing a loop (or BatchNorm or dropout in training mode) needs group_state='dense'"
        )

    def graph_gradients_and_rounding(self, losses: torch.Tensor, ids: dict[str, torch.Tensor], coefficients: torch.Tensor
                                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`graph_gradients` and, from the same batched backward, the rounding sample d of the batch's
        own gradient (:func:`~genkernel.core.engine.gradients.gradients_and_rounding`, tracking.rounding)."""
        return self.graph_gradients(losses, ids, coefficients), {}

    def from_graph(self, grads: dict[str, torch.Tensor], losses: torch.Tensor, step) -> StepGradients:
        """Step 1's result from :meth:`graph_gradients` (summed over micro-batches), times the
        step's gradient scale (clipping, loss scaling), averaged across ranks under DDP."""
        raise NotImplementedError

    def recording(self, inputs: tuple[torch.Tensor, ...]) -> TrainingCapture:
        """What step 1 reads from the training pass on ``inputs`` (entered around it): nothing here."""
        return TrainingCapture.idle()

    def _capture_if_it_fits(self, plan: Plan, batch: int, form: str = "outer") -> TrainingCapture:
        """A capture of ``plan``'s layers when its records fit the memory budget, else one that
        records nothing (step 1 then runs its own pass, in chunks)."""
        if not reads_training_pass(self.model.record_bytes, batch, self.model.memory_budget):
            return TrainingCapture.idle()
        return TrainingCapture(plan, batch, form)

    def gradients(self, step, ids: dict[str, torch.Tensor], coefficients: torch.Tensor,
                  recorded: TrainingCapture) -> StepGradients:
        """Step 1 after the training pass (``recorded``: what :meth:`recording` kept of it)."""
        raise NotImplementedError

    def before_step(self) -> None:
        """Just before ``optimizer.step()``: the structurally null parameters, found again if a mode changed."""
        self._refresh_null()

    def contributions(self, updates, nodes, gradients: StepGradients, ids: dict[str, torch.Tensor],
                      clip_factor: float) -> RouteContributions:
        raise NotImplementedError

    def commit(self) -> None:
        """Keep this step's new group state (the whole step was recorded)."""
        self.splitter.commit()

    def discard(self) -> None:
        """Forget this step's new group state (the step was rolled back)."""
        self.splitter.discard()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def _no_sketch_error(self, rest: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(rest) for name in self.model.partitions.names}


class DenseRoute(GroupStateRoute):
    """One float64 row per group of every partition: the splitter keeps each row's optimizer
    state and update, and step 5 pushes every row through the probes (:func:`push_rows`).

    Group gradients (``gradient_route``): "graph" takes them from the training step's own graph
    (R backward passes, no second forward: exact with BatchNorm's batch statistics and dropout's
    masks); "example" from per-example gradients read from the training pass's layer factors
    (:class:`~genkernel.core.engine.factors.TrainingCapture`: one block at a time, summed into the
    groups; about one weight-gradient pass, whatever R), with torch.func for parameters outside
    the blocks and a vmapped second pass when the training pass cannot be read; "factored" from
    the same layer factors captured by a second pass in chunks; "example" and "factored" need
    independent examples. "auto" takes "graph" when the model couples examples in training mode (or there is
    one row), else "example": measured on the tiny UNet (B = 32, 2 CPU cores), vmapped
    per-example gradients cost about two bare steps at any R, the graph's R backward passes grow
    with R and already cost more at R = 2 (``recipes/benchmarks/diffusion.py`` times the
    analyzer with either).
    """

    name = "dense"

    def __init__(self, model: TrackedModel, splitter: UpdateSplitter, contribution_route: str, gradient_route: str = "auto"):
        super().__init__(model, splitter, contribution_route)
        if gradient_route not in GRADIENT_ROUTES:
            raise ValueError(f"gradient_route must be one of {GRADIENT_ROUTES}, got {gradient_route!r}")
        self.gradient_route = gradient_route
        self._plan: Plan | None = None  # the blocks read from the training pass, planned at the first step

    @property
    def splitter_partitions(self) -> Partitions:
        return self.model.partitions

    def recording(self, inputs: tuple[torch.Tensor, ...]) -> TrainingCapture:
        """The training pass's per-example gradients, for gradient_route "example" (and "auto"),
        when its records fit in the memory budget."""
        if self.gradient_route == "factored":
            return TrainingCapture.idle()
        self._plan = self._plan_for_new_kind(inputs, frozenset()) or self._plan
        return self._capture_if_it_fits(self._plan, batch_size(inputs), form="compact")

    def uses_graph(self) -> bool:
        if self.gradient_route != "auto":
            return self.gradient_route == "graph"
        return (self.model.partitions.total <= 1 or bool(coupled_modules(self.model.module))
                or bool(self.model.forward_couplings) or bool(data_dependent_modules(self.model.module)))

    def _membership(self, ids, coefficients) -> torch.Tensor:
        partitions = self.model.partitions
        return membership_matrix([ids[n] for n in partitions.names], coefficients, list(partitions.sizes.values()))

    def graph_gradients(self, losses, ids, coefficients):
        return gradients_from_losses(losses, self.model.params, self._membership(ids, coefficients),
                                     dtype=self.model.state_dtype)

    def graph_gradients_and_rounding(self, losses, ids, coefficients):
        return gradients_and_rounding(losses, self.model.params, self._membership(ids, coefficients), coefficients,
                                      dtype=self.model.state_dtype)

    def from_graph(self, grads, losses, step):
        return self._finish(grads, losses.detach(), step.batch, step.clip_factor)

    def gradients(self, step, ids, coefficients, recorded):
        model = self.model
        check_per_example_safe(model.module, route=f"gradient_route={self.gradient_route!r}", found=model.forward_couplings)
        blocks = recorded.blocks()
        if blocks is not None:
            return self._finish(self._from_training_pass(blocks, step, ids, coefficients), step.losses, step.batch,
                                step.clip_factor)
        grads, losses = group_gradients(
            model.module, model.params, step.inputs, step.targets, step.loss_fn, self._membership(ids, coefficients),
            memory_budget=model.memory_budget, route="factored" if self.gradient_route == "factored" else "example",
        )
        return self._finish({n: g.to(model.state_dtype) for n, g in grads.items()}, losses, step.batch, step.clip_factor)

    def _from_training_pass(self, blocks, step, ids, coefficients) -> dict[str, torch.Tensor]:
        """Every partition's group rows from the training pass's blocks (c_n already in them) and,
        for the plan's fallback parameters, torch.func per-example gradients."""
        model = self.model
        ones = torch.ones(step.batch, dtype=torch.float64, device=step.losses.device)
        factored = {name: p for name, p in model.params.items() if name not in self._plan.fallback}
        grads = factor_rows(self._membership(ids, ones), blocks, factored, model.state_dtype)
        if self._plan.fallback:
            fallback, _ = group_gradients(
                model.module, dict(self._plan.fallback), step.inputs, step.targets, step.loss_fn,
                self._membership(ids, coefficients), memory_budget=model.memory_budget, route="example",
            )
            grads.update(fallback)
        return {name: grads[name].to(model.state_dtype) for name in model.params}

    def _finish(self, grads, losses, batch: int, scale: float) -> StepGradients:
        model = self.model
        if model.distributed is not None:
            grads = combine_group_gradients(grads, batch, model.distributed)
        if scale != 1.0:  # clipping or loss scaling; the rows are this step's own arrays (R × P each: no copy)
            grads = {name: g.mul_(scale) for name, g in grads.items()}
        first = model.partitions.slices[model.partitions.primary]
        # (norm_of: squares formed directly overflowed past 1e154, and the check then allowed an infinite gap)
        sizes = {name: norm_of(abs_row_sum(g[first])) for name, g in grads.items()}
        return StepGradients(grads, losses, sizes)

    def contributions(self, updates, nodes, gradients, ids, clip_factor):
        partitions = self.model.partitions
        rows = partitions.total
        null = self._null_row(updates, rows)
        pushed = {n: u[: rows + 1] for n, u in updates.items()}
        if null is not None:  # one more row: the null parameters' part of the rest, reported apart
            pushed = {n: torch.cat([u, null[n]]) for n, u in pushed.items()}
        both = push_rows(self.model, pushed, nodes, self.contribution_route)
        rest = both[:, rows]
        contributions = {name: both[:, part] for name, part in partitions.slices.items()}
        result = RouteContributions.every_group(contributions, rest, self._no_sketch_error(rest))
        return result.with_null(None if null is None else both[:, rows + 1], self.null_names)


class _FactorRoute(GroupStateRoute):
    """Shared by the factored and sketched routes: the batch's layer factors at θ_k (step 1), the
    exact totals the splitter keeps, and the probes' chunks (of rows and of outputs)."""

    batch_form = "outer"  # the batch factors' form (factors.FACTOR_FORMS): the sketched route reads outer products

    def __init__(self, model: TrackedModel, splitter: UpdateSplitter, contribution_route: str):
        super().__init__(model, splitter, contribution_route)
        self._exclusions: set[str] = set()
        self.plan: Plan = covering_plan(model.module, model.probes)
        self._probe_chunks: tuple[list[slice], list[slice]] | None = None  # fixed probes: sized once per plan

    def recording(self, inputs: tuple[torch.Tensor, ...]) -> TrainingCapture:
        """The batch's factors from the training pass's own forward and backward (no second pass),
        when its records fit in the memory budget (else the capture pass runs in chunks)."""
        self._plan_for(inputs)
        return self._capture_if_it_fits(self.plan, batch_size(inputs), self.batch_form)

    def _plan_for(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Check the plan on the training batch too (:func:`training_plan`); a block moved to
        torch.func there resizes the probes' chunks. Once per kind of input (:func:`input_kind`)."""
        plan = self._plan_for_new_kind(inputs, self._exclusions)
        if plan is not None and [b.name for b in plan.blocks] != [b.name for b in self.plan.blocks]:
            self.plan, self._probe_chunks = plan, None

    def gradients(self, step, ids, coefficients, recorded):
        model = self.model
        check_per_example_safe(model.module, route=f"group_state={self.name!r}", found=model.forward_couplings)
        self._plan_for(step.inputs)  # (a compiled model's step records nothing: checked here)
        batch = training_batch(model.module, self.plan, recorded, step.inputs, step.targets, step.loss_fn,
                               coefficients, step.losses, model.memory_budget)
        while batch is None:  # the training pass could not be read: a capture pass of its own
            try:
                batch = capture_batch(
                    model.module, self.plan, step.inputs, step.targets, step.loss_fn, coefficients, model.memory_budget,
                    self.batch_form,
                )
            except Unfactorable as error:  # a module that mixes the batch: torch.func handles it
                self._exclusions.add(error.module_name)
                self.plan = covering_plan(model.module, step.inputs, self._exclusions)
                self._probe_chunks, self._checked = None, set()
        totals, sizes = batch_totals(batch)
        grads = {n: (totals[n] * step.clip_factor).unsqueeze(0) for n in model.params}
        sizes = {n: sizes[n] * step.clip_factor for n in model.params}
        return StepGradients(grads, batch.losses, sizes, batch)

    def probe_chunks(self) -> tuple[list[slice], list[slice]]:
        """(Row chunks of the probes, chunks of their outputs) for their captures (under analysis_mode)."""
        if self._probe_chunks is None:
            model = self.model
            with analysis_mode(model.module):
                self._probe_chunks = capture_chunks(model.module, self.plan, model.probes, model.outputs,
                                                    model.memory_budget)
        return self._probe_chunks

    def _rest(self, updates, nodes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[M, d]`` the rest row pushed to the probes (zero without weight decay, old state or structurally null
        parameters), and ``[M, d]`` its structurally null parameters' part (None where none moves)."""
        rest_update = {n: u[1:2] for n, u in updates.items()}
        null = self._null_row(updates, 1)
        if null is not None:
            both = push_rows(self.model, {n: torch.cat([u, null[n]]) for n, u in rest_update.items()}, nodes,
                             self.contribution_route)
            return both[:, 0], both[:, 1]
        if any(bool(u.any()) for u in rest_update.values()):
            return push_rows(self.model, rest_update, nodes, self.contribution_route)[:, 0], None
        return torch.zeros((self.model.probes[0].shape[0], self.model.outputs), dtype=torch.float64,
                           device=next(iter(updates.values())).device), None


class FactoredRoute(_FactorRoute):
    """Plain SGD, exact, no per-group copy: per-example cross kernels with u_n = −η_p s c_n ∇ℓ_n,
    summed into the groups of every partition."""

    name = "factored"
    # Its batch totals, sizes and every node's cross kernels all read per-example gradients where
    # those are cheaper: formed once, from the training pass, never larger than the outer form.
    batch_form = "lean"

    def gradients(self, step, ids, coefficients, recorded):
        if not plain_sgd(self.splitter.optimizer):
            raise ValueError(
                "the optimizer is no longer plain SGD (momentum was switched on?): the factored route "
                "cannot follow it; build the tracker with group_state='dense'"
            )
        return super().gradients(step, ids, coefficients, recorded)

    def contributions(self, updates, nodes, gradients, ids, clip_factor):
        model = self.model
        scale = {}
        null = set(self.null_names)
        for name in model.params:
            h = self.splitter.hyper[name]
            # (a structurally null parameter's update is the rest's: the splitter's rest row, pushed by _rest)
            scale[name] = 0.0 if name in null else -h["lr"] * clip_factor * (-1.0 if h["maximize"] else 1.0)
        per_example = factored_contributions(
            model.module, self.plan, model.probes, nodes, gradients.batch, scale, model.outputs, self.probe_chunks(),
            model.memory_budget,
        ).to(torch.float64)  # [M, B, d]
        m, _, d = per_example.shape
        contributions, columns = {}, {}
        shared = False  # per_example handed to a partition already: the next one gets its own copy
        for name in model.partitions.names:  # only the batch's groups moved: [M, U, d], not [M, G, d]
            group_ids = ids[name].to(per_example.device)
            columns[name], position = torch.unique(group_ids, return_inverse=True)
            if columns[name].numel() == group_ids.numel():  # one example per group: the examples' own order
                # (a copy: ids[name] may be the caller's own tensor, which a loop may refill before the step's
                # contributions are read, and would then place them in other groups)
                columns[name] = group_ids.clone()
                contributions[name] = per_example.clone() if shared else per_example
                shared = True
            else:
                contributions[name] = per_example.new_zeros((m, columns[name].numel(), d)).index_add_(1, position, per_example)
        rest, null_rest = self._rest(updates, nodes)
        result = RouteContributions(contributions, columns, rest, self._no_sketch_error(rest))
        return result.with_null(null_rest, self.null_names)


def training_plan(model: TrackedModel, inputs: tuple[torch.Tensor, ...], exclude: frozenset | set) -> Plan:
    """The layer plan for factors read from training batches, checked on the probes and on a
    sample of ``inputs`` (:func:`~genkernel.core.engine.factors.pair_covering_plan`; remembered per
    kind of input). The probes alone cannot stand for the batch: one probe cannot show a forward
    that mixes the batch's rows (a minibatch-std layer), and a batch of other per-example shapes
    may take another path. Unchecked, a route would credit one example's gradient to another while
    the groups' sum stayed the real gradient (no check would see it). Inputs that do not fit the
    model are refused as the training forward would refuse them (this check runs before it)."""
    try:
        return pair_covering_plan(model.module, model.probes, inputs, exclude)
    except Exception as error:
        if not not_fitting_inputs(error):
            raise
        raise ValueError(not_fitting_message("inputs", model.module, inputs, error)) from error


def input_kind(inputs: tuple[torch.Tensor, ...]) -> tuple:
    """What a plan checked on a training batch stands for: batches of the same per-example shapes,
    dtypes and devices, and as many examples sampled (a route's plan is checked once
    per kind; the per-step check of the groups' sum against the real gradient runs at every step)."""
    return (tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in inputs), min(COVERAGE_SAMPLE, batch_size(inputs)))


__all__ = [
    "ALL_GROUPS", "CONTRIBUTION_ROUTES", "DenseRoute", "FactoredRoute", "GroupStateRoute", "RouteContributions",
    "StepGradients", "TrackedModel", "plain_sgd", "input_kind", "push_rows", "training_plan",
]
