"""PathKernelTracker: exact path-kernel ledgers kept while a model trains.

Lifecycle::

    tracker = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=G)
    for inputs, targets, groups in data:
        tracker.step(inputs, targets, groups)      # replaces backward() + optimizer.step()
    tracker.ledger.summary()                       # contributions, rest, residual, shares

Several partitions of the same examples are split at once, each into its own ledger::

    tracker = PathKernelTracker(model, optimizer, loss_fn, probes,
                                num_groups={"level": 10, "control_0": 10})
    tracker.step(inputs, targets, {"level": bins, "control_0": permuted_bins})
    tracker.ledgers["level"], tracker.ledgers["control_0"]

Each ``step`` performs the real optimizer step through :class:`OptimizerStep` (the same code an
untracked trainer runs, so training is bit-for-bit unchanged) and around it:

1. group gradients at θ_k, ĝ_{k,g} = Σ_{n ∈ g} c_n ∇ℓ_n (times the clipping factor), for every
   group of every partition (the route decides which rows it keeps);
2. the real step; Δ_k = θ_{k+1} − θ_k read from the parameters;
3. the optimizer-aware split Δ_k = Σ_{g∈π} u_{k,g} + u_rest for every partition π
   (:mod:`genkernel.core.tracking.splitters`);
4. the check: for every partition Σ_g ĝ_g equals the real gradient, the summed group state
   equals the optimizer's buffers and Σ_g u_g + u_rest equals Δ_k (docs/optimizers.md, "The
   check");
5. contributions c_{k,g}(x) = J̄_k(x) u_{k,g} at every probe, by the group-state route
   (:mod:`genkernel.core.tracking.routes`: "dense", "factored", "sketched");
6. a fresh forward pass at θ_{k+1}; every partition's ledger records its contributions, the
   shared rest and traffic, and the residual.

Cost adds over partitions (Σ G_π group rows), it never multiplies: a grouping and k permuted
controls cost (k + 1) G rows, not G^(k+1).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import numbers
import os
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..adapter import (
    LOW_PRECISION,
    Batch,
    analysis_mode,
    as_tuple,
    batch_size as rows_of,
    check_analysis_safe,
    check_deterministic,
    check_finite,
    check_memory_budget,
    check_per_example_safe,
    checked_forward,
    coupled_modules,
    data_dependent_modules,
    has_state_outside_training,
    outside_inference_mode,
    is_compiled,
    low_precision_in_graph,
    positive_int,
    preserved_buffers,
    preserved_state,
    coupled_forward,
    frozen_dtypes_used,
    random_forward,
    tf32_hazard,
    trainable_parameters,
    unwrap,
    unwrap_optimizer,
)
from ..engine.factors import TrainingCapture
from ..engine.gradients import DEFAULT_GRADIENT_BUDGET, rounding_of
from ..engine.reference import largest_finite, norm_of
from ..push_memory import measure_push_memory
from ..errors import LedgerCheckError, NonFiniteError
from ..param_bytes import trains_float32, value_bytes
from ..cost import (
    COST_OPTIONS, GROUP_STATE_CHOICES, activation_elements, cost_options as checked_cost_options, estimate_cost,
    witness_counts,
)
from ..grouping import Partitions
from .checks import CheckScratch, largest_excess
from ..engine.projections import check_sketch_settings
from .rounding import ROUNDING_ALLOWANCE, ReplayedRounding, RoundingSample, TrainingReplay
from .distributed import StepAgreement, check_replicated, ddp_context, summed_over_ranks
from .ema import EMALedgers, check_ema_precision, ema_buffers, ema_callable, ema_parameters
from .io import atomic_save, load_state, to_device
from .ledger import PathKernelLedger
from .quadrature import quadrature_rule
from .routes import (
    CONTRIBUTION_ROUTES, DenseRoute, FactoredRoute, GroupStateRoute, RouteContributions, TrackedModel, plain_sgd,
    probes_coupled, push_rows,
)
from .sketched import SketchedRoute
from .splitters import make_splitter
from .step import LossFn, OptimizerStep, model_output

GROUP_STATES = ("auto", "dense", "factored", "sketched")
MEMORY_CHECKS = ("refuse", "warn")
MIXED_PRECISION = ("refuse", "observe")
CHECK_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# The power of two an observed float16 micro-batch's own backward passes are scaled by (GradScaler's
# initial scale), divided out exactly: the rows keep the digits the loop's scaled backward keeps.
HALF_ROW_SCALE = 2.0 ** 16
# A half-precision step whose residual exceeds this fraction of its change at the probes is mostly its
# rounding row (Adam divides by sqrt(v̂) + ε where the rounding is most of v̂): warned of, once per tracker.
PRECISION_WARNING = 1.0
FORMAT = "genkernel.PathKernelTracker/2"


# The key of an owned step's payload in an analyzer's per-micro-batch mirrors (observation numbers start at 1).
OWNED_STEP = 0


def _reentrant_checkpoint_in(losses: torch.Tensor) -> bool:
    """Whether ``losses``' graph holds a reentrant ``torch.utils.checkpoint`` node (its backward runs
    its own ``torch.autograd.backward`` and gives ``torch.autograd.grad`` nothing for the parameters)."""
    seen, stack = set(), [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def _least_precise(entries: list[dict[str, Any]]) -> torch.dtype | None:
    """The least precise half-precision dtype observed micro-batches ``entries`` ran in, or None when
    all ran in the model's precision."""
    precisions = [e["precision"] for e in entries if e.get("precision") is not None]
    return max(precisions, key=lambda p: torch.finfo(p).eps) if precisions else None


def _autocast_devices() -> list[str]:
    """The device types ("cpu", "cuda") on which ``torch.autocast`` is on here."""
    return [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]


def _construction_precision(params: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The half precision a tracker built now will observe, where it shows: the dtype of the ``torch.autocast`` on
    around the construction on the devices of ``params`` (one dtype on all of them); else None (not known: a loop's
    autocast usually starts after the tracker is built, and float16 and bfloat16 differ in what their witnesses
    hold, :func:`~genkernel.core.cost.witness_counts`)."""
    dtypes = {torch.get_autocast_dtype(device) for device in _autocast_devices()
              if any(p.device.type == device for p in params.values())}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16} else None


def _precision_name(entries: list[dict[str, Any]]) -> str | None:
    """:func:`_least_precise` by name ("bfloat16", "float16"), or None."""
    precision = _least_precise(entries)
    return None if precision is None else str(precision).removeprefix("torch.")


@contextlib.contextmanager
def _undone_on_error(undo) -> Iterator[None]:
    """Run ``undo`` (when given) if the block raises, then raise."""
    try:
        yield
    except BaseException:
        if undo is not None:
            undo()
        raise


def step_payloads(pending: dict[int, Any], booked: list[int]) -> list[Any]:
    """For a tracker's listener: the per-micro-batch payloads of the step just recorded, taken out of
    ``pending`` (keyed by the observation numbers :meth:`PathKernelTracker.observe` returned):
    those of the observations the step was made of (``booked``, its ``step_observations``, in
    order), every older one discarded (micro-batches left out of the step, or dropped with a skipped
    one); an owned step (``booked`` empty) takes them all. A number the caller never mirrored is
    skipped."""
    if not booked:
        taken = list(pending.values())
        pending.clear()
        return taken
    taken = [pending[n] for n in booked if n in pending]
    for n in [n for n in pending if n <= booked[-1]]:
        del pending[n]
    return taken


@dataclass
class StepContributions:
    """What one tracked step did at the probes.

    Attributes:
        step: 1-based index of the step in the ledgers.
        moved: the route's contributions of the groups this step moved (:class:`RouteContributions`:
            ``[M, U, d]`` per partition with their group ids); :attr:`partitions` spells them out.
        num_groups: ``{partition: G}``.
        rest: ``[M, d]`` J̄_k(x) u_{k,rest} plus buffer drift.
        residual: ``[M, d]`` this step's f(θ_{k+1}) − f(θ_k) − Σ_g contributions − rest − sketch_error
            (of the primary partition; the others' agree up to float64 rounding of their sums).
        losses: ``[B]`` the per-example training losses.
        group_updates: ``{name: [rows, *shape]}`` updates (the state dtype): on the dense route one
            row per group of every partition, then the rest, then each partition's rounding gap
            between the batched gradient and its Σ_g ĝ_g (whose effect stays in the residual);
            otherwise 3 rows (all groups together, the rest, the rounding gap).
        sketch_errors: ``{name: [M, d]}`` on the sketched route, the examples' exact total
            contribution minus the sum of the partition's sketched estimates (zero otherwise).
    """

    step: int
    moved: RouteContributions
    num_groups: dict[str, int]
    rest: torch.Tensor
    residual: torch.Tensor
    losses: torch.Tensor
    group_updates: dict[str, torch.Tensor]
    sketch_errors: dict[str, torch.Tensor]

    @property
    def partitions(self) -> dict[str, torch.Tensor]:
        """``{name: [M, G, d]}`` float64, J̄_k(x) u_{k,g} for every group of every partition
        (zeros for groups the step did not move; built on first use)."""
        if self._dense is None:
            self._dense = {name: self.moved.dense(name, size) for name, size in self.num_groups.items()}
        return self._dense

    @property
    def contributions(self) -> torch.Tensor:
        """``[M, G, d]`` of the primary (first) partition."""
        return next(iter(self.partitions.values()))

    @property
    def sketch_error(self) -> torch.Tensor:
        """``[M, d]`` sketch error of the primary partition."""
        return next(iter(self.sketch_errors.values()))

    _dense: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)


@dataclass
class _StepInProgress:
    """A step between its real gradient and its recording (owned: inside ``track``; observed:
    between the optimizer's pre- and post-step hooks)."""

    index: int
    phase: str
    ids: dict[str, torch.Tensor]
    theta_before: dict[str, torch.Tensor]
    saved: dict[str, Any]
    gradients: Any
    rounding: dict[str, torch.Tensor]
    f_before: torch.Tensor
    drift: torch.Tensor
    losses: torch.Tensor
    clip_factor: float


# A finished step's f(θ_{k+1}) [M, d] and θ_{k+1}, between _finish and _commit.
_After = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class _OwedListeners:
    """The listeners a committed step still owes (:meth:`PathKernelTracker._hear`): marked by ``_commit`` before its
    ledgers are written, cleared once the last listener returns."""

    result: StepContributions
    observations: list  # the step's observation numbers (step_observations while the listeners run); [] if owned
    next_listener: int = 0  # the position in ``listeners`` of the first listener not yet returned from


@dataclass
class _Batch:
    """What ``route.from_graph`` reads of an observed step: the examples and the gradient scale
    already applied."""

    batch: int
    clip_factor: float


def _backward_pass_id() -> int:
    """Which backward pass is running (autograd's graph task; -1 outside one): the seed check tells the loop's
    passes that reach a parameter from the others (an input gradient through the observed losses). torch's own
    private counter, there since 1.x (checkpointing reads it); without it every pass is one (-1), and every pass's
    seed counts."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current() if current is not None else -1


# The key (with the losses' output number) under which observe() marks the graph node of half-precision losses in
# its metadata, for the witness pass of the loop's own seed to start from where the losses are freed (_losses_edge).
_WITNESS_MARK = "genkernel observed losses"


def _losses_edge(output_nr: int, mark: object) -> torch.autograd.graph.GradientEdge:
    """From the hook the loop's backward fires on observed losses that are freed by then (the loop kept only the loss
    built from them: Lightning's ``training_step`` returning ``losses.mean()``), their gradient edge: the node the
    engine is running (torch's private current-node read, which checkpointing uses too), checked to be the one
    observe() marked with ``mark``, and their output number. RuntimeError where the read is missing or the node
    is another."""
    current = getattr(torch._C, "_current_autograd_node", None)
    node = current() if current is not None else None
    if node is None or node.metadata.get((_WITNESS_MARK, output_nr)) is not mark:
        raise RuntimeError("the observed losses were freed before the loop's backward, and the graph node the "
                           "backward runs is not theirs")
    return torch.autograd.graph.GradientEdge(node, output_nr)


@contextlib.contextmanager
def _parameter_hooks_held(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """A witness pass with the parameters' gradient hooks (``p.register_hook``: the loop's, the tracker's own) out
    of their tables, put back after it in their order: the pass is the tracker's, so a loop's hook neither runs an
    extra time (a hook that counts or accumulates would train otherwise than without the tracker) nor shapes the
    witness (an elementwise clip would be in the witness as in the loop's gradient, and the witness check would
    pass a gradient that is no scalar times the observed sum). Each hook is swapped in place for one that changes
    nothing, its key kept: a handle removed during the pass (by a hook of the loop's on an activation, which the
    pass runs) stays removed, where a table emptied and refilled brought the removed hook back into the loop's
    backward; a hook added during the pass stays, after the old ones. Returns nothing (a context manager)."""
    held = []
    try:
        for p in params:
            hooks = p._backward_hooks
            if hooks:
                saved = dict(hooks)
                held.append((hooks, saved))
                for key in saved:
                    hooks[key] = _unchanged
        yield
    finally:
        for hooks, saved in held:
            for key, hook in saved.items():
                if hooks.get(key) is _unchanged:  # (a key gone was removed by its handle in the pass: left gone)
                    hooks[key] = hook


def _unchanged(grad: torch.Tensor) -> None:
    """A parameter hook that leaves the gradient as it is (returns None), standing in for the loop's own hooks
    during the tracker's witness passes (:func:`_parameter_hooks_held`)."""
    return None


def _power_of_two_multiple(seed: torch.Tensor, fed: torch.Tensor) -> bool:
    """Whether ``seed`` (a loop's ∂loss/∂ℓ_n, float64) is one power of two (or zero) times ``fed`` (the c_n that
    observe()'s witness seeded, as rounded to the losses' dtype), element by element and exactly: then that
    witness, scaled, is the loop's gradient bit for bit (a power of two commutes with every rounding short of
    under- and overflow) and no witness with the loop's own seed is needed."""
    if seed.shape != fed.shape:
        return False
    fed_nonzero = fed != 0
    if bool(seed[~fed_nonzero].any()) or not bool(fed_nonzero.any()):  # (an example weighted 0 the loop seeded)
        return not bool(seed.any())
    ratio = seed[fed_nonzero] / fed[fed_nonzero]
    first = float(ratio[0])
    if first == 0.0:
        return not bool(seed.any())
    return math.isfinite(first) and math.frexp(abs(first))[0] == 0.5 and bool((ratio == first).all())


def _one_example_elements(module: nn.Module, probes: tuple[torch.Tensor, ...]) -> int:
    """:func:`~genkernel.core.cost.activation_elements` of the first probe alone; ValueError naming the cause where
    ``module`` cannot take a batch of one (the tracker measures and splits passes of single examples).

    Only the model's own failure on one probe is blamed on it, told by contrast: its forward ran on the whole probe
    batch (the tracker's outputs at the probes, before this), and it fails again on the first probe alone without the
    measure's hooks. An error of the device's memory, an interrupt (not an Exception), or a failure of the measure
    itself (the forward takes one probe without its hooks) is raised as it came: "the model must take a batch of one"
    was wrong for each of them."""
    one = tuple(t[:1] for t in probes)
    try:
        return activation_elements(module, one)
    except (torch.OutOfMemoryError, MemoryError):
        raise  # (the device's memory, not the model: raised as it came)
    except Exception as err:
        try:
            with torch.no_grad(), preserved_state(module):  # (a buffer a forward moves stays as training left it)
                module(*one)
        except (torch.OutOfMemoryError, MemoryError):
            raise err from None
        except Exception:
            pass  # the model's own forward fails on one probe, where it ran on all of them: the model's
        else:
            raise  # the forward takes one probe: the measure failed, not the model (its own error, as it came)
        # (called in analysis mode: a BatchNorm keeping no running statistics normalizes with the batch's own in eval
        # mode too, and BatchNorm1d refuses a batch of one there; the ProGAN advice below does not apply to it)
        batch_statistics = [f"{name or type(module).__name__} ({type(m).__name__})"
                            for name, m in module.named_modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)
                            and m.running_mean is None and m.running_var is None]
        if batch_statistics:
            raise ValueError(
                f"the model's forward fails on a batch of one probe ({type(err).__name__}: {err}): "
                f"the normalization layers {', '.join(batch_statistics)} keep no running statistics "
                "(track_running_stats=False), so they normalize every batch by its own statistics in eval mode too, "
                "and the tracker's analysis passes (single examples among them) run in eval mode. Build them with "
                "track_running_stats=True (the training pass is unchanged: batch statistics in training mode), or use "
                "GroupNorm or LayerNorm"
            ) from err
        raise ValueError(
            f"the model's forward fails on a batch of one probe ({type(err).__name__}: {err}): the tracker measures, "
            "and splits, passes of single examples, so the model must take a batch of one. A layer that needs its "
            "batch to be a multiple of a group size (a minibatch standard deviation over fixed groups) can take "
            "min(group_size, batch) as ProGAN and StyleGAN do"
        ) from err


# A listener (a function, or a method's function) with this attribute set true counts a step once however often it
# is called with it (the analyzers': they read their counts against the ledger), so the tracker calls it again after
# any failure before it returned; any other listener is called again only after an interrupt (PathKernelTracker._hear).
REPEATABLE_LISTENER = "genkernel_repeatable_listener"


class PathKernelTracker:
    """Keeps the exact path-kernel ledgers of ``model`` trained by ``optimizer``.

    Args:
        model: the trained module. BatchNorm with batch statistics and dropout in training mode
            couple or randomize examples: they are tracked exactly on the dense route (group
            gradients from the step's own graph) and refused by the per-example routes (factored,
            sketched) and under DistributedDataParallel (BatchNorm).
        optimizer: SGD (momentum, dampening, Nesterov, weight decay), Adam, AdamW (amsgrad,
            maximize), RMSprop (momentum, centered), Adagrad, Adamax, RAdam, NAdam, Adafactor,
            Adadelta or ASGD (docs/optimizers.md),
            one or several parameter groups, owning
            exactly the model's trainable parameters.
        loss_fn: ``loss_fn(outputs, targets) -> Tensor[B]`` per-example losses.
        probes: inputs x at which contributions are recorded (Tensor or tuple of Tensors).
        num_groups: G, the number of groups of training contributions; or ``{name: G}`` for
            several partitions of the same examples, each split exactly into its own ledger
            (``tracker.ledgers[name]``; the first is ``tracker.ledger``).
        quadrature: "left", "midpoint", "trapezoid", "simpson" or "gauss2" to "gauss8" (n-point
            Gauss–Legendre, for steps that move the outputs far; see :mod:`quadrature`).
        max_grad_norm: global-norm gradient clipping applied to the real step (inf: none); every
            group's share is scaled by the same factor.
        snapshot_every: copy the ledgers into their ``history`` every this many steps (0: never).
        memory_budget: bytes of per-example gradients (or probe Jacobians) alive at once.
        contribution_route: how J̄_k(x) u_g is computed on the dense route: "auto", "jvp" (one
            forward-mode pass per group) or "jacobian" (the probes' Jacobians times the updates);
            all exact.
        gradient_route: where the dense route's group gradients come from: "graph" (the training
            step's own graph, R backward passes, exact with BatchNorm and dropout in training
            mode), "example" (per-example gradients read from the training pass's layer factors,
            about one weight-gradient pass whatever R, or from a vmapped second pass when the
            records would not fit ``memory_budget``), "factored" (the same layer factors from a
            second pass in chunks), or "auto" ("graph" for few groups or a model that couples
            examples, else "example"). The per-example routes ("example", "factored", and
            group_state "factored" and "sketched") need a ``loss_fn`` whose ℓ_n reads example n's
            outputs only; a loss that couples the batch (a batch mean, a contrastive term) is
            refused at the step with the advice to use "graph".
        group_state: how the groups' updates are held (:mod:`genkernel.core.tracking.routes`):
            "dense": a float64 copy of the parameters per group and per kind of optimizer state,
            (Σ G + 2) × P values (any supported optimizer; cost grows with the groups);
            "factored": no per-group copy at all: each example's contribution is a cross kernel
            computed from layer factors; exact, plain SGD only (no momentum: a buffer mixes
            steps), one process; cost grows with B, not G;
            "sketched": each group keeps a k-dimensional random projection of its optimizer state
            (SGD with momentum, Adam, AdamW, one process): Σ G × k values; contributions are
            unbiased estimates, the exact totals are still checked every step, and
            ``ledger.sketch_error`` reports how far the estimates' sum is from the exact total of
            the examples' contributions;
            "auto": "factored" for plain SGD in one process when the probes' outputs are no more
            than the groups plus one (d ≤ Σ G + 1: d backward cotangents replace Σ G + 1 JVPs),
            else "dense" (never "sketched", which is approximate: ask for it).
        sketch_dim, sketch_seed, sketch_kind: k, the seed and the entries ("rademacher" or
            "gaussian") of the projection for ``group_state="sketched"``.
        state_dtype: dtype of the dense route's per-group gradients, optimizer state and updates:
            float64 (default), or float32 for a float32 model (half the memory; the checks keep the
            float32 tolerance); the ledgers stay float64.
        batch_size: the training batch B, for the cost estimate only (:attr:`cost`: the bare step it
            compares with, the activations training holds); default the number of probes until the first
            recorded step, whose batch (an observed step's kept micro-batches' rows, an owned step's
            batch) then replaces it: the estimate is made again with it and checked against the free
            memory as at construction (``memory_check``), before anything of that step is recorded.
            Given, it is kept; a first step of another batch warns once, naming both.
            ``cost.settings["batch_from"]`` says which: "batch_size", "probes" or "first_step".
        micro_batches: the micro-batches a step runs its batch in (``OptimizerStep(micro_batches=)``),
            for the cost estimate only (training holds one micro-batch's activations; step 1 runs a pass
            of its own). Default 1 until the first recorded step, whose count (the observed micro-batches
            it kept, an owned step's ``micro_batches``) then replaces it, as for ``batch_size``
            (``cost.settings["micro_batches_from"]``: "micro_batches", "default" or "first_step").
        step_overhead: example-forwards of the model a bare training step runs per example besides its forward
            and backward (a trainer's DREAM forward, a VAE's encode; :func:`~genkernel.core.cost.estimate_cost`),
            for the cost estimate's bare step only. Default 0.
        memory_check: what a cost estimate (:attr:`cost`) above the device's free memory does:
            "refuse" (default: MemoryError with the numbers and the cheaper options) or "warn" (a
            ResourceWarning with the same text, and the tracker is built). The estimate is within
            20 % of the measured peak on CPU; on CUDA it has been measured once, 2.35x above the
            peak (DDPM CIFAR-10 UNet, 100 probes, an H200; the GPU check now records each phase's
            peak for a fit), so on a GPU it may refuse a set-up that would fit: "warn" is for that
            case.
        cost_options: the settings a refusal may suggest changing (default all of
            :data:`~genkernel.core.cost.COST_OPTIONS`); a wrapper that fixes some of them (the GAN
            analyzer fixes the generator's route) names only those its user can change.
        mixed_precision: what a forward run under ``torch.autocast`` (or a float16/bfloat16 loss)
            does: "refuse" (default: RuntimeError naming the fixes) or "observe": an observed loop
            (:meth:`observe`) may run its forward and backward in half precision. Its group gradients
            come from that half-precision graph; the loop's weighting is checked at the model dtype's
            tolerance through the seed its backward hands the observed losses and one more backward
            of each micro-batch (float16: two; a loop seeding no power of two times c_n, loss / 3:
            one more, with its own seed, in its backward; a real gradient one scalar times their sum
            passes), else the groups' sum against the real gradient at ``torch.finfo(dtype).eps`` of the
            magnitudes. What the groups do not add up to is the rounding row, carried through the
            optimizer and left in the residual, so the residual reports the precision's cost
            (docs/observing.md, "Mixed precision"). The tracker's own passes (probes,
            contributions, checks) run in the model's precision. Owned steps (:meth:`step`,
            :meth:`track`) run under autocast (a step's ``autocast_dtype``: the built-in trainers'
            ``mixed_precision="bf16"``, or the caller's ``with torch.autocast``) are split the same
            way, from their own graph (the dense group state), their seed known: one more backward of
            each micro-batch is the witness.
        outputs_read_through: a module the loss reads the model's outputs through (a GAN generator's
            discriminator), or None. A parameter it cancels (G's output bias before a training-mode
            BatchNorm after D's first linear layer) is structurally null: its float32 rounding, which an
            adaptive optimizer turns into a move, is booked to the rest (``null_moves``), not split to
            the groups (:mod:`~genkernel.core.tracking.null_params`, ``through=``).

    Under torch.distributed, pass the DistributedDataParallel-wrapped model and each rank's shard:
    the ranks' group gradients are averaged as DDP averages gradients, so every rank keeps the
    ledger a single process would keep on the global batches (equal shard sizes required).
    """

    @outside_inference_mode
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        probes: Batch,
        *,
        num_groups: int | Mapping[str, int],
        quadrature: str = "midpoint",
        max_grad_norm: float = math.inf,
        snapshot_every: int = 0,
        memory_budget: int = DEFAULT_GRADIENT_BUDGET,
        contribution_route: str = "auto",
        group_state: str = "auto",
        gradient_route: str = "auto",
        sketch_dim: int = 512,
        sketch_seed: int = 0,
        sketch_kind: str = "rademacher",
        state_dtype: torch.dtype = torch.float64,
        batch_size: int | None = None,
        micro_batches: int | None = None,
        step_overhead: float = 0.0,
        memory_check: str = "refuse",
        cost_options: tuple[str, ...] = COST_OPTIONS,
        mixed_precision: str = "refuse",
        outputs_read_through: nn.Module | None = None,
    ) -> None:
        if memory_check not in MEMORY_CHECKS:
            raise ValueError(f"memory_check must be one of {MEMORY_CHECKS}, got {memory_check!r}")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        self.memory_check = memory_check
        self.mixed_precision = mixed_precision
        # on every route (not only the sketched one that reads them): a bad setting is refused, not carried unread
        # into a state that a sketched tracker would later be compared with
        check_sketch_settings(sketch_dim, sketch_kind, sketch_seed)
        cost_options = checked_cost_options(cost_options)
        self.partitions = Partitions(num_groups)
        if batch_size is not None:  # the training batch, for the cost estimate
            batch_size = positive_int(batch_size, "batch_size")
        if micro_batches is not None:
            micro_batches = positive_int(micro_batches, "micro_batches")
        # Where the estimate's B and K come from (cost.settings): given, or stand-ins (the probes' count, one
        # micro-batch) that the first recorded step replaces with its own (_follow_batch).
        self._cost_from = {"batch": "probes" if batch_size is None else "batch_size",
                           "micro_batches": "default" if micro_batches is None else "micro_batches"}
        self._batch_followed = False  # the first recorded step's B and K taken into the estimate
        self._batch_warned = False  # (the warning of a given batch_size / micro_batches the first step differs from)
        # The (B, K) the first recorded step had (its rows on this rank, its kept micro-batches), kept in the saved
        # state: a tracker resumed from it takes them, not those of its first step after the resume (an epoch's
        # last, partial batch: a resumed tracker estimated B = 4 where the run it resumes had B = 12).
        self._first_step: tuple[int, int] | None = None
        self._saved_first_step: tuple[int, int] | None = None  # (a loaded state's)
        # Checks of an analyzer's own passes beside the tracker's estimate, run again with it when the first step
        # replaces the stand-ins: callables of the tracker (self.cost the new estimate), raising to refuse the step
        # (leaving their records as they were), returning None or what puts their records back.
        self._cost_followers: list = []
        # (a float passed the old check and snapshotted at the multiples of it that step counts hit: 1.5 every third
        # step, 0.5 every step)
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, numbers.Integral) or snapshot_every < 0:
            raise ValueError(f"snapshot_every must be an int >= 0 (steps; 0: no snapshots), got {snapshot_every!r}")
        snapshot_every = int(snapshot_every)
        if contribution_route not in CONTRIBUTION_ROUTES:
            raise ValueError(f"contribution_route must be one of {CONTRIBUTION_ROUTES}, got {contribution_route!r}")
        self.model = model
        # Under DistributedDataParallel the real step runs through the wrapper (its gradient
        # averaging); the analysis runs on the wrapped module.
        self.module = unwrap(model)
        self.distributed = ddp_context(model, tuple(self.partitions.sizes.items()), as_tuple(probes, name="probes"))
        self.optimizer = optimizer = unwrap_optimizer(optimizer)
        self.loss_fn = loss_fn
        self.rule = quadrature_rule(quadrature)
        self.max_grad_norm = max_grad_norm
        self.snapshot_every = snapshot_every
        self.memory_budget = check_memory_budget(memory_budget)

        self.params = trainable_parameters(self.module)
        self._check_precision()  # before anything runs the model: autocast may hide in a wrapped forward
        self._check_frozen_precision()
        self._check_detached_weight_norms()
        check_analysis_safe(self.module)
        # The tracker's own copy: probes that are views of a buffer the loop refills (a batch sliced
        # from a loader's reused tensor) would otherwise change under the ledger between steps.
        self.probes = tuple(t.detach().clone() for t in as_tuple(probes, name="probes"))
        rows_of(self.probes, name="probes")  # refuses probes of unequal lengths
        check_finite(self.probes, name="probes")
        check_deterministic(self.module, self.probes)
        # A forward of the user's own that draws in training mode (an augmentation inside D, noise injection) is
        # not repeated by a per-example route's second pass: seen here, such a model is tracked on the graph route.
        self.random_forward = random_forward(self.module, self.probes)
        # So is one whose examples' outputs depend on each other through plain operations (a hand-written batch norm,
        # a minibatch standard deviation): a per-example route would give each example the others' gradients.
        self.coupled_forward = [] if self.random_forward else coupled_forward(self.module, self.probes)
        self._checked_modes = tuple(m.training for m in self.module.modules())  # (the mode they were found in)
        self._has_state = has_state_outside_training(self.module)
        self._optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._layout = {n: (p.dtype, p.device) for n, p in self.params.items()}  # model.double() / .to() is refused
        complex_params = [n for n, p in self.params.items() if p.is_complex()]
        if complex_params:
            raise ValueError(
                f"parameters {complex_params[:5]} are complex: the ledger's Jacobian-vector products and the optimizer "
                "split need real parameters. Hold each as a real tensor with a trailing dimension of 2 and use "
                "torch.view_as_complex(p) in the forward"
            )
        # A model of mixed dtypes (a float64 head on a float32 trunk) is checked at its least precise floating dtype's
        # tolerance, not its first parameter's: a float32 parameter's rounding would fail float64's 1e-10. Frozen
        # ones the forward reads too: a frozen float32 layer before trained float64 ones rounds the per-example passes
        # otherwise than the batch's (the factored gradient route was refused, a gap of 6.8e-9 of the scale); one it
        # never reads (a spare head) leaves the checks as they are.
        dtypes = {p.dtype for p in self.params.values()}
        self._check_dtypes = dtypes | frozen_dtypes_used(self.module, self.probes, self.params)
        self.rtol = max(CHECK_RTOL.get(t, 1e-3) for t in self._check_dtypes)
        # A float32 step's gradient check allows the rounding its own backward shows (tracking.rounding): sampled,
        # for every parameter, where any trained one is float32.
        self._samples_rounding = trains_float32(self.params)
        with torch.no_grad(), analysis_mode(self.module):
            f_start = self._probe_outputs()
        self.ledgers = {name: PathKernelLedger.empty(f_start, size) for name, size in self.partitions.sizes.items()}
        if state_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"state_dtype must be torch.float64 or torch.float32, got {state_dtype!r}")
        if state_dtype == torch.float32 and torch.float64 in dtypes:
            raise ValueError("state_dtype=torch.float32 is for float32 models (half the memory of the group state); a "
                             "float64 model keeps float64 state, or its exact checks could not hold")
        with analysis_mode(self.module):  # what step 1 would keep of a training pass, per example
            # (at the parameters' bytes per value, as the cost estimate counts the activations: param_bytes)
            record_bytes = int(_one_example_elements(self.module, self.probes) * value_bytes(self.params))
        # what a JVP pass through the probes holds, measured once (its passes' width and the estimate's pushes)
        push_memory = measure_push_memory(self.module, self.params, self.probes, record_bytes)
        tracked = TrackedModel(self.module, self.params, self.probes, self.partitions, f_start.shape[1], self.memory_budget,
                               self.distributed, self.rtol, state_dtype, record_bytes, tuple(self._forward_couplings),
                               push_memory, outputs_read_through)
        self._requested = {"group_state": group_state, "contribution_route": contribution_route,
                           "gradient_route": gradient_route}
        self.group_state = self._choose_group_state(group_state, f_start.shape[1], gradient_route)
        contribution_route = self._differentiable_route(tracked, contribution_route)
        self.route = self._make_route(tracked, contribution_route, gradient_route, sketch_dim, sketch_seed, sketch_kind)
        self._tracked = tracked
        # What a step will cost, before anything runs; refuse a set-up the device cannot hold.
        # A refusal names only the group states this tracker could be built with: dense alone under DDP, and
        # not the per-example ones (factored, sketched) for a model that couples or randomizes its examples.
        buildable = ("dense",) if self.distributed is not None or self._coupled() else GROUP_STATE_CHOICES
        # A half-precision step's witnesses, the worst case of its half precision (the loop's seed unknown here):
        # float16's two sums for the step and two of the micro-batch observed last (_fold_witness), and the one with
        # the loop's own seed (_witness_seeded), 5 copies, their backward passes 3 (two seed scales and the loop's
        # seed); bfloat16's one seed scale, 3 and 2. Where the loop's half precision is not known here (no autocast
        # on around the construction, :func:`_construction_precision`), float16's: never under the step's peak.
        witnesses = witness_counts(_construction_precision(self.params)) if mixed_precision == "observe" else (0, 0)
        self._cost_settings = dict(state_dtype=state_dtype, memory_budget=self.memory_budget, sketch_dim=sketch_dim,
                                   batch_size=batch_size, micro_batches=1 if micro_batches is None else micro_batches,
                                   step_overhead=step_overhead,
                                   options=cost_options, group_states=buildable,
                                   witness_copies=witnesses[0], witness_passes=witnesses[1])
        # The device's free memory differs between ranks (another process on one GPU): a set-up that fits on one rank
        # only is refused on every rank, or the ranks that built their trackers would wait for the others in the
        # first step's meeting until the process group's timeout.
        with StepAgreement(self.distributed, "building the tracker (its memory check)", points=1).meeting():
            self._check_cost(ema=False)
        self.ema: EMALedgers | None = None
        self.splitter = self.route.splitter
        self._f_prev = f_start.clone()
        # θ where the ledger starts (f_start's): a change before the first step is refused like one between
        # steps, or it would land in the residual (or rest) unexplained.
        self._theta_after: dict[str, torch.Tensor] | None = {n: p.detach().clone() for n, p in self.params.items()}
        # The buffers (BatchNorm's running statistics) as they were then: what f_prev was computed with, which
        # an average copied into the model at the end of training (WeightAveraging's use_buffers) overwrites.
        self._buffers_after: dict[str, torch.Tensor] | None = self._copy_buffers()
        self._grad_marks: dict[str, tuple[int, int]] | None = None
        self._observed: dict[str, Any] | None = None  # micro-batches observed since the last step
        # (step index, error) of the last observed step refused after its micro-batches were taken: they went
        # with it, and a plain retry of optimizer.step() must say so (cleared by the next observe or step)
        self._refused_observed: tuple[int, BaseException] | None = None
        self._observations = 0  # observe() calls so far: each micro-batch's observation number
        self._accumulations = 0  # the loop's backward passes into the tracked parameters (_follow_accumulation)
        self._accumulation_hooks = False
        self._parameter_passes: set[int] = set()  # the loop's backward passes that reached a parameter
        self._armed = False  # an observe() since the loop's last backward into the tracked parameters began
        # The observation numbers the step being recorded was made of, in order (set before the listeners
        # run; empty for an owned step, tracker.step/track, which observes nothing).
        self.step_observations: list[int] = []
        self._step_numbers: list[int] = []  # the observed step in progress' observation numbers
        self._pending_step: _StepInProgress | None = None  # an observed step between its hooks
        self._observing = False  # set by the first observe()
        self._own_pass = False  # observe()'s own passes through the losses (no backward of the loop's)
        self._closed = False  # close(): the tracked window ended
        self._check_scratch = CheckScratch()  # the update check's buffers, kept from step to step
        # Set while the EMA's weights and the model's are swapped (Lightning's WeightAveraging during a
        # validation loop): the EMA then holds the trained weights, a read of its ledger syncs nothing.
        self.ema_swapped_out = False
        self._broken: str | None = None  # why the ledgers no longer describe the run (a recording cut off half-way)
        self._scale_entry: dict[str, float] | None = None  # the observed step in progress' gradient scale
        self._precision_warned = False  # (the warning of _note_precision_cost, once)
        # Step hooks on the optimizer, inert until the tracker observes a loop: installed now because a
        # loop that steps with a closure calls observe() inside optimizer.step(), after the pre-hooks ran.
        # They hold the tracker weakly: a tracker that is dropped leaves inert hooks behind.
        this = weakref.ref(self)
        self._hooks = [
            optimizer.register_step_pre_hook(_TrackerHook(this, "_before_observed_step")),
            optimizer.register_step_post_hook(_TrackerHook(this, "_after_observed_step")),
        ]
        self.listeners: list = []  # callables given every recorded StepContributions
        # The last committed step's listeners not yet returned from (marked by _commit before anything can fail),
        # called by _hear; else None.
        self._unheard: _OwedListeners | None = None
        self._hearing = False  # inside _hear (a listener that settles its own records does not call itself again)
        self.gradient_scales: list[dict[str, float]] = []  # observed steps: real gradient / observed sum
        self.skipped_steps: list[dict[str, int]] = []  # observed micro-batches dropped with no step taken
        if not self.route.uses_graph():
            check_per_example_safe(self.module, route=f"group_state={self.group_state!r}", found=self._forward_couplings)
        # The gradients as the tracker found them: a backward of the loop's between the tracker's construction and its
        # first owned step (gradient accumulation, loss.backward() before tracker.step) is refused as one between
        # steps is; unchecked, the step's own backward started from zero and silently dropped it (the parameters
        # moved otherwise than the loop's). Gradients left from before (an untracked loop's last step) stay allowed.
        self._grad_marks = {n: (id(p.grad), p.grad._version) for n, p in self.params.items() if p.grad is not None}

    @property
    def ledger(self) -> PathKernelLedger:
        """The primary (first) partition's ledger."""
        return self.ledgers[self.partitions.primary]

    @property
    def attempted_steps(self) -> int:
        """The loop's optimizer steps since tracking began as a loop counts them: the recorded ones and those
        it skipped with their micro-batches observed (``skipped_steps``: a GradScaler that found inf), which
        accelerate's ``global_step`` and Lightning's count too. The analyzers number the loop's steps by it."""
        return self.ledger.steps + len(self.skipped_steps)

    @property
    def num_groups(self) -> int:
        """G of the primary partition."""
        return self.partitions.sizes[self.partitions.primary]

    def _differentiable_route(self, tracked: TrackedModel, requested: str) -> str:
        """The contribution route, checked before any step on one probe: forward-mode AD ("jvp")
        is not implemented for some layers (LSTM's fused kernel, EmbeddingBag); "auto" then uses
        the probes' Jacobians (reverse mode, exact) instead, and an explicit route that cannot run is
        refused here rather than after an optimizer step."""
        one = replace(tracked, probes=tuple(t[:1] for t in tracked.probes))
        tangent = {n: torch.ones((1, *p.shape), dtype=p.dtype, device=p.device) for n, p in self.params.items()}
        nodes = [(1.0, {n: p.detach() for n, p in self.params.items()})]
        errors = {}
        for route in (("jvp", "jacobian") if requested == "auto" else (requested,)):
            try:
                with torch.no_grad(), analysis_mode(self.module):
                    push_rows(one, tangent, nodes, route)
            except (RuntimeError, NotImplementedError) as error:
                errors[route] = str(error).splitlines()[0][:200]
                continue
            return requested if route == "jvp" else route
        detail = "; ".join(f"{route}: {message}" for route, message in errors.items())
        hint = "use contribution_route='auto'" if requested != "auto" else "replace the layer the message names"
        if any("setup_context" in message for message in errors.values()):
            # torch.func cannot run an autograd.Function written in the old style; the common one in
            # models is reentrant activation checkpointing
            hint = ("an autograd.Function without setup_context is in the forward: for torch.utils.checkpoint pass "
                    "use_reentrant=False (diffusers' enable_gradient_checkpointing already does), else give the "
                    "Function a setup_context")
        raise ValueError(
            f"the model cannot be differentiated the way the ledger needs ({detail}); {hint}"
        )

    def _gradient_route_of_estimate(self) -> str:
        """The group-gradient route the cost estimate counts: "graph", "factored" (the dense
        route's second pass of layer factors) or "example" (read from the training pass). An observed loop's
        rows come from its own graph (``observe()``) whatever the route."""
        if self.route.uses_graph() or getattr(self, "_observing", False):  # (set after the first estimate)
            return "graph"
        return "factored" if getattr(self.route, "gradient_route", None) == "factored" else "example"

    def _make_route(self, tracked: TrackedModel, contribution_route: str, gradient_route: str, k: int, seed: int,
                    kind: str) -> GroupStateRoute:
        if self.group_state == "dense":
            return DenseRoute(tracked, make_splitter(self.optimizer, self.params, self.partitions, tracked.state_dtype),
                              contribution_route, gradient_route)
        if gradient_route not in ("auto", "factored"):
            raise ValueError(
                f"gradient_route={gradient_route!r} belongs to group_state='dense'; group_state={self.group_state!r} "
                "reads its gradients from layer factors"
            )
        # The other routes' splitter keeps the exact totals only (one row: all groups together),
        # against which the tracker checks every step.
        splitter = make_splitter(self.optimizer, self.params, Partitions({"all": 1}))
        if self.group_state == "factored":
            return FactoredRoute(tracked, splitter, contribution_route)
        return SketchedRoute(tracked, splitter, contribution_route, k=k, seed=seed, kind=kind)

    # -- public verbs ---------------------------------------------------------------------------
    def step(
        self,
        inputs: Batch,
        targets: Batch | None,
        groups: torch.Tensor | Mapping[str, torch.Tensor],
        weights: torch.Tensor | None = None,
        **info: Any,
    ) -> StepContributions:
        """Perform one real optimizer step on the batch and record it in the ledgers.

        Args:
            inputs, targets: the batch (targets may be None when ``loss_fn`` needs none).
            groups: ``LongTensor[B]`` group id of every example, in [0, num_groups); with several
                partitions ``{name: LongTensor[B]}``.
            weights: per-example coefficients c_n ``Tensor[B]`` of the loss Σ_n c_n ℓ_n; default the
                mean (1/B), computed as ``losses.mean()`` like an untracked loop.

        Returns:
            :class:`StepContributions` of this step.
        """
        step = OptimizerStep(
            self.model, self.optimizer, self.loss_fn, inputs, targets, weights, max_grad_norm=self.max_grad_norm, info=info
        )
        return self.track(step, groups)

    def track(self, step: OptimizerStep, groups: torch.Tensor | Mapping[str, torch.Tensor]) -> StepContributions:
        """Perform and record a prepared :class:`OptimizerStep` (what trainers' callbacks use).

        The step is all-or-nothing: everything that can be checked is checked before the training
        forward, and a failure after it (a failed check, an error or an interrupt in the
        analysis) restores the parameters, buffers and optimizer state to θ_k (a step skipped for a
        non-finite loss or gradient, or by a GradScaler, keeps the buffers its forward advanced, as the
        loop without a tracker does, and its GradScaler's lowered scale) and leaves every ledger and
        group state as it was, so ``ledger.steps`` keeps counting the recorded steps (a
        failure while the partitions' ledgers are written puts back the ones already written). Only
        an interrupt after every ledger was written, while the group state is kept, cannot be undone:
        the tracker then refuses further steps and saves, saying so.
        """
        self._check_open()
        self._hear()  # (the listeners the last step owes, before this step changes what they read)
        if step.applied:  # (before the try: its roll-back would mark the applied step not applied)
            raise RuntimeError(
                f"this {step.phase} step was already applied: a step is performed once, by one analyzer"
            )
        if step.model is not self.model or unwrap_optimizer(step.optimizer) is not self.optimizer:
            raise ValueError("this step trains a different model or optimizer than the tracker was built for")
        if step.max_grad_norm != self.max_grad_norm:
            raise ValueError(f"the step clips at {step.max_grad_norm} but the tracker at {self.max_grad_norm}: build the "
                             f"PathKernelTracker with max_grad_norm={step.max_grad_norm} (the trainer's)")
        if self._observing:
            raise RuntimeError("this tracker observes a loop (tracker.observe): let the loop's optimizer.step() record steps")
        index = self.ledger.steps + 1
        # Under DDP the ranks meet before the forward, before the backward and before recording:
        # a step one rank refuses is refused on every rank (distributed.StepAgreement).
        together = StepAgreement(self.distributed, "this step", points=3)  # a NonFiniteError gets the index below
        try:
            ids = self.partitions.check(groups, step.batch)
            self._check_before(owned=True, autocast_dtype=step.autocast_dtype)
            # Under mixed_precision="observe" a step run under autocast (its own, a trainer's mixed_precision,
            # or the caller's) takes its group rows from its half-precision graph, as an observed loop's are; so
            # does a step with a GradScaler (its scale is in every signal of the training backward, which a capture
            # would read: the losses' own graph is unscaled, as the gradients are after unscale_).
            own_graph = ("a step run under torch.autocast" if step.autocast_dtype is not None or _autocast_devices()
                         else "a step with a GradScaler" if step.grad_scaler is not None else None)
            if own_graph is not None:
                self._need_dense(own_graph)
            undo = self._follow_batch(index, step.batch, step.micro_batches)  # (the first step's, before its forward)
        except BaseException as error:
            together.failed(error)
            raise
        with _undone_on_error(undo):  # (another rank refused: this one's estimate as it was, as theirs)
            together.passed()
        theta_before = {name: p.detach().clone() for name, p in self.params.items()}
        saved = self._save_state()
        self._grad_marks = None  # this step's own backward touches the gradients, even if it fails
        coefficients = (
            torch.full((step.batch,), 1.0 / step.batch, dtype=torch.float64) if step.weights is None else step.weights
        ).to(torch.float64)
        try:
            # 1. ĝ_{k,g} = Σ_{n ∈ g} c_n ∇ℓ_n at θ_k (from the step's own graph or layer factors, or a second pass).
            if self.route.uses_graph() or own_graph is not None:
                box: dict[str, Any] = {"entries": [], "witness": None}
                # A float64 step samples no rounding with its rows (two rows more in every backward): if a parameter
                # fails the plain tolerance, its micro-batches' training forward is run again from what it started
                # from, kept here just before it (tracking.rounding.TrainingReplay; a few kB, nothing else).
                replay = (TrainingReplay(self.module, self.params, step, saved["buffers"], self._checked_modes)
                          if not self._samples_rounding and own_graph is None and self.distributed is None else None)
                rounding = (RoundingSample() if replay is None else
                            ReplayedRounding(lambda: replay.rounding(coefficients)))

                def from_graph(graph_losses: torch.Tensor) -> None:
                    # one micro-batch's rows (the whole batch without accumulation), summed over them
                    precision = self._check_precision(graph_losses, owned=True, autocast_dtype=step.autocast_dtype)
                    rows = step.rows
                    rows_ids = {n: v[rows].to(graph_losses.device) for n, v in ids.items()}
                    if precision is None:
                        part, difference = self._graph_rows(graph_losses, rows_ids, coefficients[rows])
                        rounding.add(difference)
                        entry = {"precision": None, "witness": []}
                    else:  # the step's own seed: c_n times its GradScaler's scale (1 without), as its backward's
                        part, witness = self._half_precision_rows(graph_losses, rows_ids,
                                                                  coefficients[rows].to(graph_losses.device),
                                                                  precision, seed_scales=(step.loss_scale,))
                        entry = {"precision": precision, "witness": witness}
                    box["entries"].append(entry)
                    self._fold_witness(box, entry)
                    if "grads" in box:
                        for name, g in part.items():
                            box["grads"][name] += g
                    else:
                        box["grads"] = part
                    if rows.start == 0:
                        together.passed()

                # (the buffers of other modules its forward runs, a GAN's D, kept as it found them for a replay; not
                # around a compiled model's forward, whose guards a global hook changed every step would recompile)
                watched = None if replay is None or is_compiled(step.model) else replay.watching()
                with contextlib.nullcontext() if watched is None else watched:
                    losses = step.compute_gradients(from_graph)
                with torch.no_grad():
                    gradients = self.route.from_graph(box["grads"], losses, step)
                precision_entries, witnesses = box["entries"], box["witness"] or []
            else:
                # Hooks inside a compiled forward would change what torch.compile traces, and a capture
                # records one forward: the group gradients of a compiled model's step, or of a step run in
                # micro-batches, come from the route's own pass (in chunks its memory budget sets).
                own_pass = is_compiled(step.model) or step.micro_batches > 1
                recorded = TrainingCapture.idle() if own_pass else self.route.recording(step.inputs)
                with recorded:  # stops recording before the backward
                    losses = step.compute_gradients(lambda graph_losses: (
                        recorded.stop(graph_losses), self._refuse_hidden_precision(graph_losses),
                        self._check_separate_losses(graph_losses, step.outputs),
                        together.passed() if step.rows.start == 0 else None))
                with torch.no_grad(), analysis_mode(self.module), torch.enable_grad():
                    gradients = self.route.gradients(step, ids, coefficients.to(losses.device), recorded)
                precision_entries, witnesses = [], []
                # (the training graph is gone: taken again only if a parameter fails the plain tolerance)
                rounding = (ReplayedRounding(lambda: self._replayed_rounding(step, coefficients))
                            if self._samples_rounding else RoundingSample())
            pending = self._begin(index, step.phase, ids, theta_before, saved, gradients, losses, step.clip_factor,
                                  self._precision_rtol(precision_entries), witnesses, rounding)
            # 2. The real optimizer step.
            step.apply_update()
            result, after = self._finish(pending)
            scale_entry = None
            if _least_precise(precision_entries) is not None:  # (the entry an observed step's would be)
                scale_entry = {"step": index, "scale": step.clip_factor, "micro_batches": step.micro_batches,
                               # (its c_n already hold 1/B over all K micro-batches: the clip factor is what a
                               # loop averaging its micro-batches reports here, not clip × K)
                               "scale_times_micro_batches": step.clip_factor,
                               "dropped_micro_batches": 0, "gradient_precision": _precision_name(precision_entries)}
                self._note_precision_cost(pending, result, after, scale_entry)
            together.passed()
            # 6. Record: every ledger, the group state and the EMA's displacement, all or nothing.
            self._commit(pending, result, after, scale_entry=scale_entry, owned=True)
        except BaseException as error:
            together.failed(error)
            applied = step.applied
            self._roll_back(error, index, step.phase, saved, theta_before, applied=applied)
            if self._broken is None:
                step.applied = False  # undone: a trainer counting its applied steps does not count this one
                step.torn = False  # (θ_k, its buffers and the optimizer's state are back: an interrupted optimizer.step())
                if applied:  # (and its GradScaler's update(): the step run again runs at the scale it ran at)
                    step.undo_scaler_update()
            if isinstance(error, NonFiniteError) and not applied:
                raise type(error)(  # (a GradScaler's SkippedStep stays one: a trainer goes on after it)
                    f"step {index} ({step.phase}): {error}; the ledger keeps the {index - 1} steps before"
                ) from error
            raise
        self.step_observations = []  # an owned step observes nothing
        self._recorded(result)
        return result

    # -- the EMA of the weights -------------------------------------------------------------------
    def track_ema(self, ema: Any) -> EMALedgers:
        """Keep a second, exact ledger for an exponential moving average of the weights (diffusers'
        ``EMAModel``, ema-pytorch's ``EMA``, ``AveragedModel``, an averaged copy of the model, or a
        callable returning ``{name: tensor}``), from now on; read it with :attr:`ema_ledgers`.
        The EMA is updated by the loop as usual, after each optimizer step
        (:mod:`genkernel.core.tracking.ema`)."""
        read = ema_parameters(ema, list(self.params), self.module)
        # (an EMA less precise than the model fails the first update's check with a message about the update
        # order: refused here, naming the dtypes, before anything changes)
        check_ema_precision(ema, read(), dict(self.params))
        # (an EMA ledger that fits on one rank only is refused on every rank, as in __init__)
        with StepAgreement(self.distributed, "track_ema (its memory check)", points=1).meeting():
            self._need_dense("an EMA ledger", ema=True)
            ema_ledgers = EMALedgers(self._tracked, read, self.rtol, self.rule, ema_buffers(ema, self.module))
        self.ema = ema_ledgers
        return self.ema

    def _check_cost(self, *, ema: bool, first_step: tuple[str, str] | None = None) -> None:
        """:func:`~genkernel.core.cost.estimate_cost` of the route as it is now (with an EMA ledger
        when ``ema``) into ``self.cost``; MemoryError, with the numbers and the cheaper options, when
        the device cannot hold it (``self.cost`` is then left as it was). After steps (an EMA ledger
        added to a running tracker) the arrays the tracker holds are no longer free: the estimate must
        fit beside the one it replaces (:meth:`~genkernel.core.cost.CostEstimate.fits_beside`), not
        count them twice; so must the estimate :meth:`_follow_batch` makes at the first step
        (``first_step``: what a refusal says of that step's batch before and after the numbers)."""
        previous = getattr(self, "cost", None)
        with analysis_mode(self.module):
            cost = estimate_cost(
                self.module, self.optimizer, self.probes, outputs=self._tracked.outputs, rows=self.partitions.total,
                partitions=len(self.partitions), group_state=self.group_state,
                gradient_route=self._gradient_route_of_estimate(), contribution_route=self.route.contribution_route,
                quadrature_nodes=len(self.rule.nodes), ema=ema, push_memory=self._tracked.push_memory,
                # (the pushes' own decision, in the same analysis mode: a coupling the forward check found, a
                # centering h - h.mean(0), pushes the probes in one pass, which the estimate must count)
                probes_coupled=probes_coupled(self._tracked), **self._cost_settings,
            )
        cost.settings.update(batch_from=self._cost_from["batch"], micro_batches=self._cost_settings["micro_batches"],
                             micro_batches_from=self._cost_from["micro_batches"])
        after_steps = previous is not None and (self.ledger.steps > 0 or first_step is not None)
        if not (cost.fits_beside(previous) if after_steps else cost.fits):
            message = (f"this tracker would not fit on {cost.settings['device']}: {cost.describe()}. "
                       + ("Cheaper: " + "; ".join(cost.cheaper) if cost.cheaper
                          else "None of the settings it was built with would make it cheaper"))
            if first_step is not None:
                message = f"{first_step[0]}: {message}; {first_step[1]}"
            if self.memory_check == "refuse":
                raise MemoryError(message + ". If you know the device holds it (the estimate can be high on CUDA), "
                                  "build the tracker with memory_check='warn'")
            warnings.warn(message + " (memory_check='warn': " + ("recorded anyway)" if first_step else "built anyway)"),
                          ResourceWarning, stacklevel=3)
        self.cost = cost

    def add_cost_follower(self, follow: Callable[["PathKernelTracker"], Callable[[], None] | None]) -> None:
        """An analyzer's check of its own passes beside this tracker's estimate, run again when the first recorded
        step makes the estimate again (:meth:`_follow_batch`): ``follow(tracker)``, ``tracker.cost`` the new
        estimate, raises MemoryError to refuse that step (its records left as they were) and returns None or what
        puts its records back (another rank refused the step)."""
        self._cost_followers.append(follow)

    def mark_stand_ins(self, origin: str, *, batch: bool = True, micro_batches: bool = True) -> None:
        """Take the ``batch_size`` (``batch``) and ``micro_batches`` this tracker was given as stand-ins that the
        first recorded step replaces, as if they had not been given (``cost.settings["batch_from"]`` /
        ``["micro_batches_from"]`` say ``origin``): for an analyzer that built it from a step whose batch it cannot
        vouch for (an observed discriminator's first micro-batch, the first step after a resume). Values not given
        stand in already."""
        for key, setting, wanted in (("batch", "batch_from", batch), ("micro_batches", "micro_batches_from", micro_batches)):
            if wanted and self._cost_from[key] in ("batch_size", "micro_batches"):
                self._cost_from[key] = origin
                self.cost.settings[setting] = origin

    def set_step_overhead(self, overhead: float) -> None:
        """Count a bare training step's work outside the model's forward and backward again: ``overhead``
        example-forwards of the model per example (a VAE's encode, known once the first batch is drawn), in
        ``cost.bare_step`` and in the estimates made later (the first step's, an EMA ledger's). No memory part
        changes, so no fit check runs again."""
        if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not math.isfinite(overhead) or overhead < 0:
            raise ValueError(f"overhead must be a finite number of example-forwards >= 0, got {overhead!r}")
        cost = self.cost
        cost.bare_step += (overhead - cost.settings["step_overhead"]) * cost.settings["batch"]
        cost.settings["step_overhead"] = float(overhead)
        self._cost_settings["step_overhead"] = float(overhead)

    @property
    def saved_first_step(self) -> tuple[int, int] | None:
        """``(B, K)`` of the first recorded step of the run a loaded state was saved by (None: no state loaded, or
        one saved before its first step), which :meth:`_follow_batch` takes in place of the resumed run's."""
        return self._saved_first_step

    def _follow_batch(self, index: int, batch: int, micro_batches: int,
                      precision: torch.dtype | None = None) -> Callable[[], None] | None:
        """At the first recorded step (before anything of it changes, at its first meeting under DDP): the
        estimate made again with the step's batch ``batch`` (this rank's rows) and ``micro_batches`` in place
        of the stand-ins the tracker was built with (no ``batch_size``: the probes' count; no
        ``micro_batches``: one), into ``self.cost``, and checked as at construction, beside the estimate it
        replaces (the tracker's arrays exist by now), with the analyzers' checks of their own passes
        (``_cost_followers``); a refusal (MemoryError under ``memory_check="refuse"``) leaves the estimate
        and its settings as they were, so the step is refused again until it fits. A given ``batch_size`` or
        ``micro_batches`` is kept (the estimate is the one asked for); one the step differs from warns once,
        naming both. Once per tracker; an estimate whose B and K do not change is not made again. ``precision``:
        an observed step's half precision (None: full precision or not known), whose witnesses are counted where
        the construction counted fewer (built under a bfloat16 autocast, 3 copies; the loop runs float16, 5).
        Returns what puts the estimate back (another rank refused the step at the meeting after), or None."""
        if self._batch_followed:
            return None
        resumed = self._saved_first_step is not None
        if resumed:  # (a loaded state's first step: the run it resumes had that batch, not this step's)
            batch, micro_batches = self._saved_first_step
        settings, origin = self._cost_settings, self._cost_from
        given = {"batch": origin["batch"] == "batch_size", "micro_batches": origin["micro_batches"] == "micro_batches"}
        probes = int(self.probes[0].shape[0])
        before = (probes if settings["batch_size"] is None else settings["batch_size"], settings["micro_batches"])
        after = (before[0] if given["batch"] else batch, before[1] if given["micro_batches"] else micro_batches)
        seen_as = "the first step of the run it resumes had" if resumed else "this step's is"
        differ = [f"{name}={mine} but {seen_as} {seen}"
                  for name, mine, seen, kept in (("batch_size", before[0], batch, given["batch"]),
                                                 ("micro_batches", before[1], micro_batches, given["micro_batches"]))
                  if kept and mine != seen]
        if differ and not self._batch_warned:
            self._batch_warned = True
            warnings.warn(
                f"step {index}: the tracker was built with {' and '.join(differ)} (its examples on this rank, its "
                "micro-batches kept): its cost estimate (tracker.cost, an analyzer's cost, the reports') is for the "
                "batch given, not the one trained on. Build the tracker (or bind the analyzer) with the loop's own "
                "batch_size= and micro_batches= per optimizer step, or without them to take the first step's (shown "
                "once per tracker)", UserWarning, stacklevel=4)
        previous = (self.cost, dict(settings), dict(origin), self._first_step)
        witnesses = witness_counts(precision) if precision is not None and settings["witness_copies"] else None
        if witnesses is not None and witnesses[0] <= settings["witness_copies"]:
            witnesses = None  # (counted as many or more: an estimate is never lowered once made)

        followers_back: list = []  # what puts the analyzers' records back

        def undo() -> None:
            for back in reversed(followers_back):
                back()
            self.cost, previous_settings, previous_origin, self._first_step = previous
            settings.clear()
            settings.update(previous_settings)
            origin.clear()
            origin.update(previous_origin)
            self._batch_followed = False

        origin.update({key: "first_step" for key, kept in given.items() if not kept})
        try:
            # (an observed loop's first step: its rows came from the loop's graph, which a tracker built before its
            # first observe() did not count)
            route_changed = self.cost.settings.get("gradient_route") not in (None, self._gradient_route_of_estimate())
            if after == before and not route_changed and witnesses is None:  # only where its numbers came from changes
                self.cost = replace(self.cost, settings={**self.cost.settings, "batch_from": origin["batch"],
                                                         "micro_batches_from": origin["micro_batches"]})
            else:
                settings.update(batch_size=after[0], micro_batches=after[1])
                if witnesses is not None:
                    settings.update(witness_copies=witnesses[0], witness_passes=witnesses[1])
                stand_ins = [f"{name}= (the estimate took {was}, {why})"
                             for name, was, now, why in (("batch_size", before[0], after[0], "the probes' count"),
                                                         ("micro_batches", before[1], after[1], "one"))
                             if was != now]
                which = "the first step's batch of the run it resumes" if resumed else "this first step's batch"
                refused = (f"step {index} was refused before anything of it was recorded (the parameters, the "
                           "optimizer's state and the ledgers are as before it)")
                if stand_ins:
                    why = (f"{refused}: the tracker was built without {' and '.join(stand_ins)}, and with {which} of "
                           f"{batch} examples in {micro_batches} micro-batch{'es' if micro_batches > 1 else ''} as "
                           "batch_size and micro_batches")
                elif witnesses is not None:
                    why = (f"{refused}: the tracker was built under a bfloat16 autocast and counted its witnesses, but "
                           f"this step runs {str(precision).removeprefix('torch.')}, whose witnesses hold "
                           f"{witnesses[0]} parameter copies")
                else:
                    why = (f"{refused}: an observed loop forms the group rows from its own training graph, in batched "
                           "backward passes beside it that the estimate made before its first observe() did not count")
                smaller = "or a smaller batch per optimizer step (batch_size), in more micro-batches"
                self._check_cost(ema=self.ema is not None, first_step=(why, smaller))
                for follow in self._cost_followers:  # (an analyzer's passes beside the new estimate)
                    try:
                        back = follow(self)
                    except MemoryError as error:
                        raise MemoryError(f"{why}: {error}; {smaller}") from error
                    if back is not None:
                        followers_back.append(back)
        except BaseException:
            undo()
            raise
        self._batch_followed = True
        self._first_step = (int(batch), int(micro_batches))
        return undo

    def _need_dense(self, what: str, *, ema: bool = False) -> None:
        """Switch "auto" to the dense route (before any step), or refuse: ``what`` needs per-group rows
        taken from the training graph. The switch, and an EMA ledger (``ema``), are estimated again
        and refused, with the route left as it was, when the device cannot hold them (once: an
        observed loop calls this at every micro-batch)."""
        if self.group_state == "dense":
            if ema:
                self._check_cost(ema=True)
            return
        if self._requested["group_state"] != "auto" or self.ledger.steps:
            raise ValueError(f"{what} needs one update row per group from the training graph: build the tracker with "
                             "group_state='dense'")
        previous = self.group_state, self.route, self.splitter
        self.group_state = "dense"
        gradient_route = "graph" if self._requested["gradient_route"] == "auto" else self._requested["gradient_route"]
        self.route = self._make_route(self._tracked, self.route.contribution_route, gradient_route, 0, 0, "rademacher")
        self.splitter = self.route.splitter
        try:
            self._check_cost(ema=ema or self.ema is not None)
        except MemoryError:
            self.group_state, self.route, self.splitter = previous
            raise

    @property
    def ema_ledgers(self) -> dict[str, PathKernelLedger]:
        """The EMA weights' ledgers per partition, up to the EMA's latest update."""
        if self.ema is None:
            raise RuntimeError("no EMA is tracked: call tracker.track_ema(ema) first")
        if not self._closed and not self.ema_swapped_out:  # after close() the EMA follows untracked steps: its
            self.ema.sync(self.ledger.steps, self._last_theta())  # ledgers stay as they were
        return self.ema.ledgers

    # -- observing a loop the user owns ---------------------------------------------------------
    def observe(
        self,
        losses: torch.Tensor,
        groups: torch.Tensor | Mapping[str, torch.Tensor],
        weights: torch.Tensor | None = None,
    ) -> int:
        """Record one micro-batch of a training loop the user owns, before its backward.

        ``losses``: the ``[B]`` per-example losses with their graph, whose mean (or, with
        ``weights``, Σ_n c_n ℓ_n) is the micro-batch's loss. The group gradients are taken from
        this graph (``retain_graph=True``: the loop's own backward runs unchanged) and kept until the
        optimizer steps. ``optimizer.step()`` (through any wrapper: accelerate, Lightning) then
        records the step through the optimizer's step hooks: its real gradient must be the sum of
        the step's observed groups times one scalar (gradient accumulation, global-norm clipping, a
        constant loss scale; reported per step in ``gradient_scales``), else the step is refused
        before the parameters move. In half precision (``mixed_precision="observe"``) the entry's
        ``witness_lost`` names the micro-batches whose witness with the loop's own seed could not be
        taken (the step was then checked without a witness) and why.

        Which observed micro-batches a step is made of follows the loop's backward (a hook on
        ``losses``): several micro-batches may be observed before one backward of their summed loss;
        a micro-batch with no backward through it by the step (a loss-spike guard) is left out of the
        step and counted in its ``gradient_scales`` entry (``dropped_micro_batches``); micro-batches
        whose backward ran and whose gradients the loop then cleared without stepping (a GradScaler
        that found inf) are dropped at the next ``observe()`` as a skipped step (``skipped_steps``).
        When no backward was seen at all (a loop that sets ``p.grad`` itself) every observed
        micro-batch forms the step. The step's check decides in every case.

        Returns this micro-batch's observation number (1, 2, ... over the tracker's life); a recorded
        step lists the numbers it was made of in :attr:`step_observations` while its listeners run.
        """
        self._hear()  # (the listeners the last step owes, before this micro-batch of the next)
        # Under DDP a micro-batch one rank refuses is refused on every rank, before the loop's backward.
        together = StepAgreement(self.distributed, "observe() of this micro-batch", points=1)
        if self._observed is not None and any(e["tensor"]() is losses for e in self._observed["entries"]):
            error = ValueError(
                "these losses were already observed for the step to come (observe() called twice on one tensor: a "
                "callback and the loop both observing?): each micro-batch is observed once, before its backward"
            )
            together.failed(error)
            raise error
        if self._observed is not None:  # (only the representation changes: the sum before this micro-batch's rows)
            self._fold_backwarded(self._observed)
        self._own_pass = True  # (losses observed before may be these: their hooks must not count this pass)
        try:
            # (each of these backward passes through the loop's graph reruns a non-reentrant activation checkpoint's
            # forward, whose BatchNorm updated its running statistics once more per pass: the reruns write to copies)
            with preserved_buffers(self.model):
                ids, grads, precision, witnesses, coefficients, difference = self._observed_gradients(losses, groups,
                                                                                                      weights)
        except BaseException as error:
            together.failed(error)
            raise
        finally:
            self._own_pass = False
        together.passed()
        if self._observed is not None and self._gradients_cleared():
            self._drop_skipped()
        self._follow_accumulation()
        self._observations += 1
        number = self._observations
        backward = [False]  # set by the loop's backward through these losses
        if self._observed is None:
            self._parameter_passes.clear()
            self._observed = self._new_observed()
            self._refused_observed = None
        self._observed["entries"].append({"number": number, "grads": grads, "folded": False, "ids": ids,
                                          "losses": losses.detach(), "backward": backward,
                                          "tensor": weakref.ref(losses), "accumulations": self._accumulations,
                                          "precision": precision, "witness": witnesses, "rounding": difference,
                                          # (whether its backward puts anything into the gradients)
                                          "moves": any(bool(g.any()) for g in grads.values())})
        self._observing = True
        self._grad_marks = None  # an observed loop zeroes or keeps its gradients as it likes
        self._armed = True
        self._observed["entries"][-1]["backward_at"] = self._mark_observed(losses, backward)
        # (every observed micro-batch: a loop weighing its examples otherwise than observed is refused by the seed
        # where the gradient check cannot see it, gradients that span one direction, and in half precision)
        self._follow_seed(losses, self._observed["entries"][-1], coefficients)
        return number

    @staticmethod
    def _new_observed() -> dict[str, Any]:
        """The micro-batches observed for the step to come: ``entries`` (one per observe(), in order: its
        number, ids, detached losses, backward flag and, until folded, its group gradients) and the
        running sum ``grads`` of the folded ones (those whose loop backward was seen), with the
        parallel-directions bookkeeping of :meth:`_note_direction` over the folded ones."""
        return {"entries": [], "grads": None, "folded": 0, "direction": None, "moving": 0, "independent": False,
                "witness": None, "rounding": RoundingSample()}

    def _fold(self, observed: dict[str, Any], entry: dict[str, Any]) -> None:
        """Add one micro-batch's group gradients to the running sum (and to the directions followed)."""
        self._take_seeded_witness(entry)
        self._fold_witness(observed, entry)
        observed["rounding"].add(entry["rounding"])
        entry["rounding"] = None
        grads, entry["grads"], entry["folded"] = entry["grads"], None, True
        if observed["grads"] is None:  # the first: the sum holds it alone (its direction noted at the second)
            observed["grads"], observed["folded"] = grads, 1
            return
        if observed["folded"] == 1:  # (only steps of several micro-batches pay for this)
            self._note_direction(observed["grads"], observed)
        self._note_direction(grads, observed)
        for name, g in grads.items():
            observed["grads"][name] += g
        observed["folded"] += 1

    def _take_seeded_witness(self, entry: dict[str, Any]) -> None:
        """Where the loop's backward through a half-precision micro-batch was witnessed with its own seed s_n
        (:meth:`_witness_seeded`) in every pass of its that reached a parameter (as :meth:`_check_seeds` reads
        them), that witness, summed over those passes and divided by λ = s·c / c·c (the seed's one multiple of
        the coefficients c_n observed), replaces the micro-batch's own witnesses: theirs (seeds c_n times a
        power of two) cannot be the loop's rounding, this one is, to the division's (at most 2 units in the
        last place of the parameters' dtype per entry, 1.2e-7 in float32, against :meth:`_witnessed`'s model
        tolerance of 1e-5). Divided by λ it stands for the micro-batch at its observed c_n, as the witnesses it
        replaces do: the step's sum of witnesses still weighs every micro-batch alike. The division shows where
        a step's micro-batches are witnessed both ways, one seeded exactly a power of two times its c_n (its own
        witness, at c_n) and one seeded a hair off that (to :meth:`_check_seeds`' tolerance: the loop's own,
        at λ c_n): without it the sum would weigh them 1 : λ and fail the witness check of a loop that weighs
        them alike. A loop that weighs one micro-batch otherwise than the rest (its own λ, or a loss built beside
        the observed losses) still fails the witness. Where a pass that reached a parameter was seeded no power
        of two times c_n and its witness with that seed is missing (the pass failed, or the loop's seeds were a
        power of two in one pass and not in another), the micro-batch's own witnesses are not the loop's
        rounding either: it leaves the step no witness (``entry["witness"] = []``; the per-parameter check at
        the precision's eps decides, as before the witness of the loop's seed) and the reason in
        ``entry["witness_lost"]`` (the step's ``gradient_scales`` entry lists it). Frees the box's copies
        either way. Returns nothing."""
        box = entry.get("seed_box")
        seeded = None if box is None else box.get("witness")
        if box is not None:
            box["witness"] = None  # (a later pass through these losses adds to no witness: the check decides)
        if box is None or not box["passes"]:
            return
        reaching = [task for task in box["passes"] if task in self._parameter_passes] or list(box["passes"])
        needed = box.get("needed", set())
        if not any(task in needed for task in reaching):  # (every such pass seeded a power of two times c_n)
            return
        lost = box.get("lost")
        if lost is None and (not seeded or any(task not in seeded for task in reaching)):
            lost = "a backward pass through the losses seeded a power of two times c_n and another not"
        lam = 0.0
        if lost is None:
            seed = sum((box["passes"][task] for task in reaching[1:]), box["passes"][reaching[0]])
            c = entry["coefficients"]
            lam = float(seed @ c) / float(c @ c)
            if lam == 0.0 or not math.isfinite(lam):  # (no multiple to divide by)
                lost = f"the loop's seed is no multiple of the coefficients observed (λ = {lam})"
        if lost is not None:
            entry["witness"], entry["witness_lost"] = [], lost
            return
        total = seeded[reaching[0]]
        for task in reaching[1:]:
            for name, w in seeded[task].items():
                total[name] += w
        for w in total.values():
            w.div_(lam)
        entry["witness"] = [total]

    @staticmethod
    def _fold_witness(observed: dict[str, Any], entry: dict[str, Any]) -> None:
        """Add a half-precision micro-batch's witnesses (:meth:`_half_precision_rows`, one per seed scale)
        to the step's running sums, as its group gradients are added (the step holds the sums, not one
        copy per micro-batch); a micro-batch with fewer scales adds its last to the others. One without
        any (the model's precision, DDP) leaves the step none: the gradient check alone decides."""
        witness, entry["witness"] = entry.get("witness"), None
        total = observed["witness"]
        if not witness or total == []:
            observed["witness"] = []
            return
        if total is None:
            observed["witness"] = witness
            return
        total = total + [{n: w.clone() for n, w in total[-1].items()} for _ in range(len(witness) - len(total))]
        for k, sums in enumerate(total):
            for name, w in witness[min(k, len(witness) - 1)].items():
                sums[name] += w
        observed["witness"] = total

    def _fold_backwarded(self, observed: dict[str, Any]) -> None:
        """Fold the micro-batches whose loop backward has been seen (in an accumulation loop, the last one):
        they belong to the step to come unless the loop clears the gradients without stepping."""
        for entry in observed["entries"]:
            if not entry["folded"] and entry["backward"][0]:
                self._fold(observed, entry)

    def _drop_skipped(self) -> None:
        """At observe() with every gradient clear: the micro-batches observed so far whose backward ran were
        cleared without a step (a GradScaler that found inf or NaN skips optimizer.step()): they are no
        step's and go to ``skipped_steps``. Those with no backward yet stay: the loop may still backward
        them with this one (observe(real), observe(fake), (real.mean() + fake.mean()).backward())."""
        entries = self._observed["entries"]
        # A micro-batch whose backward ran: its losses' hook fired, or (a loop whose loss is built beside the
        # observed losses, F.mse_loss(outputs, y), whose backward passes no hook of theirs) a backward
        # accumulated into the parameters after it was observed.
        ran = [e["backward"][0] or self._accumulations > e["accumulations"] for e in entries]
        skipped = [e for e, r in zip(entries, ran) if r]
        # Clear gradients show a clear only after a backward that put something in them: a micro-batch whose
        # gradient is exactly zero (a perceptron or hinge loss it already satisfies, dead ReLUs) leaves them
        # as clear as a zero_grad() would, and is the step's like any other.
        if not any(e["moves"] for e in skipped):
            return
        self.skipped_steps.append({"after_step": self.ledger.steps, "micro_batches": len(skipped)})
        waiting = [e for e, r in zip(entries, ran) if not r]  # never folded (folding needs a backward)
        self._observed = None
        if waiting:
            self._observed = self._new_observed()
            self._observed["entries"] = waiting

    def _drop_cleared(self, at_pass: bool = False) -> None:
        """In the loop's backward through an observed micro-batch, with every gradient clear: the micro-batches
        whose backward ran in an earlier pass were cleared without a step (a GradScaler that found inf skipped
        optimizer.step(), and the loop cleared the gradients after observing the next micro-batch: observe(),
        zero_grad(), backward()). They are no step's and go to ``skipped_steps``, as :meth:`_drop_skipped`
        drops them where the clear came before observe(). ``at_pass``: called as a backward pass begins, before
        it accumulates: a micro-batch whose losses' hook never fired whose backward ran (the parameters
        accumulated since its observe()) is stale as well."""
        if self._observed is None:
            return
        entries = self._observed["entries"]
        # (folded: its backward ran before a later observe(); else its backward ran in a pass that accumulated
        # into the parameters since, which the clear then undid; one joint backward's hooks are not)
        stale = [e for e in entries if e["folded"] or (e["backward"][0] and e["backward_at"][0] is not None
                                                        and e["backward_at"][0] < self._accumulations)
                 or (at_pass and not e["backward"][0] and self._accumulations > e["accumulations"])]
        if not any(e["moves"] for e in stale) or not self._gradients_cleared():  # (as _drop_skipped; the scan
            # over the gradients only where it can drop)
            return
        self.skipped_steps.append({"after_step": self.ledger.steps, "micro_batches": len(stale)})
        waiting = [e for e in entries if not any(e is s for s in stale)]
        self._observed = None
        if waiting:
            self._observed = self._new_observed()
            self._observed["entries"] = waiting

    def _note_direction(self, grads: dict[str, torch.Tensor], observed: dict[str, Any] | None = None) -> None:
        """Follow whether the observed micro-batches' gradients (Σ over the primary partition's groups) are
        all parallel: then the one scale fitted at the step cannot tell how the loop weighted them against
        each other (:meth:`_scale_to_real` refuses). Keeps one unit vector until two directions are seen.
        Call before ``grads`` is added to the observed sum (it may be that sum's own storage)."""
        observed = self._observed if observed is None else observed
        if observed["independent"]:
            return
        total = self._primary_total(grads)
        norm = norm_of(total)
        if norm == 0.0 or not math.isfinite(norm):  # no gradient: its weight moves nothing (non-finite: refused later)
            return
        observed["moving"] += 1
        if observed["direction"] is None:
            observed["direction"] = total.div_(norm)
            return
        if not self._parallel(_sine_squared(total, observed["direction"]), observed["entries"]):
            observed["independent"], observed["direction"] = True, None

    def _primary_total(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[P]`` float64: the group gradients ``grads`` summed over the primary partition's groups, flattened
        over the tracked parameters (a micro-batch's, or a step's, whole gradient)."""
        first = self.partitions.slices[self.partitions.primary]
        return torch.cat([grads[name][first].sum(dim=0).reshape(-1).to(torch.float64) for name in self.params])

    def _parallel(self, sine_squared: float, entries: list[dict[str, Any]]) -> bool:
        """Whether two gradients at this squared sine (:func:`_sine_squared`) are parallel to within 100 rtol: a
        weighting that differs between them by a fraction δ would move the real gradient off the fitted multiple by
        only about δ·sin(angle), under the step's check for δ < 1 %. Micro-batches ``entries`` observed in half
        precision: within that precision's eps (their directions carry its rounding)."""
        return sine_squared <= self._parallel_limit(entries)

    def _parallel_limit(self, entries: list[dict[str, Any]]) -> float:
        """The squared sine under which :meth:`_parallel` calls two gradients parallel."""
        return max(100 * self.rtol, self._precision_rtol(entries)) ** 2

    def _precision_rtol(self, entries: list[dict[str, Any]]) -> float:
        """The gradient check's tolerance for a step of the observed micro-batches ``entries``: the model
        dtype's, or the eps of the least precise half precision their gradients passed through (each
        entry of a half-precision weight gradient is rounded once there, the groups' and the batch's
        alike: they differ by at most eps/2 of |real| + Σ_g |ĝ_g|, per entry)."""
        precision = _least_precise(entries)
        return self.rtol if precision is None else max(self.rtol, torch.finfo(precision).eps)

    def _follow_accumulation(self) -> None:
        """Count the loop's backward passes into the tracked parameters (``_accumulations``; hooks set at the
        first observe(), removed by close(); the tracker's own torch.autograd.grad passes accumulate nothing):
        :meth:`_drop_skipped` reads a skipped step from them where no hook on the observed losses fired."""
        if self._accumulation_hooks:
            return
        this = weakref.ref(self)

        def accumulated(_param: torch.Tensor) -> None:
            tracker = this()
            if tracker is not None:
                tracker._accumulations += 1

        def arriving(_grad: torch.Tensor) -> None:
            # The first gradient of the loop's first backward after an observe(), before it accumulates: the
            # gradients are then as the loop left them, where a clear shows also for a loss built beside the
            # observed losses (F.mse_loss(outputs, y)), whose backward passes no hook of theirs.
            tracker = this()
            if tracker is not None and not tracker._own_pass:  # (a pass of the loop's that reaches the parameters)
                tracker._parameter_passes.add(_backward_pass_id())
            if tracker is not None and tracker._armed and not tracker._own_pass:
                tracker._armed = False
                tracker._drop_cleared(at_pass=True)

        self._hooks.extend(p.register_post_accumulate_grad_hook(accumulated) for p in self.params.values())
        self._hooks.extend(p.register_hook(arriving) for p in self.params.values())
        self._accumulation_hooks = True

    def _follow_seed(self, losses: torch.Tensor, entry: dict[str, Any], coefficients: torch.Tensor) -> None:
        """For an observed micro-batch: the loop's seed ∂loss/∂ℓ_n (what its backward hands the observed losses)
        into ``entry["seed_box"]["passes"]``, summed by backward pass (:func:`_backward_pass_id`), beside the
        coefficients c_n observed (``[B]`` float64, :meth:`_observed_gradients`'), for :meth:`_check_seeds`, as
        rounded to the losses' dtype: the group rows and the witnesses are seeded with them so rounded, and so is
        a loop's losses.mean() (bfloat16 losses of micro-batches of 3 and 4: 1/3 is 0.333984375, and the seeds
        of a plain mean were refused as 0.998 times each other against the exact 1/3). The tracker held weakly;
        losses without a graph hand no seed."""
        this = weakref.ref(self)
        entry["coefficients"] = coefficients.detach().to(losses.dtype).to("cpu", torch.float64)
        box = entry["seed_box"] = {"passes": {}, "witness": {}}  # (the hook holds this, not the entry and its rows)
        if not losses.requires_grad:
            return
        # A half-precision micro-batch (no DDP): its witness again with the loop's own seed where that seed is no
        # power of two times the one observe() took it with (loss / 3 of a window of 3 micro-batches).
        witnessed = entry.get("precision") is not None and self.distributed is None
        tensor = weakref.ref(losses)  # (the hook on losses must not hold them: a cycle keeps the graph alive)
        fed = entry["coefficients"]  # the c_n observe()'s witness was fed
        # (their node marked, for the witness pass to start from where the loop frees the losses before its backward)
        where = (losses.output_nr, object())
        if witnessed and losses.grad_fn is not None:
            try:
                losses.grad_fn.metadata[(_WITNESS_MARK, where[0])] = where[1]
            except (AttributeError, RuntimeError):  # (a node without metadata: freed losses' witness is then lost)
                pass

        def seed_seen(grad: torch.Tensor) -> None:
            tracker = this()
            if tracker is not None and not tracker._own_pass:
                seed = grad.detach().to("cpu", torch.float64)
                # by backward pass: one that reaches no parameter (an input gradient, torch.autograd.grad(losses.sum(),
                # x) for an adversarial example) weighs nothing of the step's gradient
                task = _backward_pass_id()
                box["passes"][task] = box["passes"].get(task, 0) + seed
                if witnessed and not _power_of_two_multiple(seed, fed):
                    box.setdefault("needed", set()).add(task)
                    if box["witness"] is not None:
                        tracker._witness_seeded(tensor(), where, grad, task, box)

        losses.register_hook(seed_seen)

    def _witness_seeded(self, losses: torch.Tensor | None, where: tuple[int, object], seed: torch.Tensor, task: int,
                        box: dict[str, Any]) -> None:
        """In the loop's backward through an observed half-precision micro-batch, from the hook that sees its seed
        ``seed`` (before the graph under the losses has run): the micro-batch's own backward once more with that
        very seed, into ``box["witness"][task]`` (summed by pass; a parameter the graph misses: zeros). It is the
        loop's gradient of this micro-batch bit for bit, as the witnesses observe() takes with c_n times a power of
        two are for a loop seeding c_n times a power of two (rounding commutes with those): for any other seed
        (λ c_n with λ = 1/3) the half precision rounds the loop's backward otherwise than theirs, entry by entry,
        and a gradient summed over examples after that rounding (a bias's) differs from β times theirs by far more
        than the model dtype's tolerance. ``losses``: None where the loop freed them before its backward (it kept
        only the loss built from them), and the pass starts from their graph node (``where``: their output number
        and observe()'s mark on the node, :func:`_losses_edge`). The parameters' gradient hooks are out of their
        tables for the pass (:func:`_parameter_hooks_held`). Returns nothing: a pass that fails (any Exception: a
        graph it cannot enter, out of memory, a hook of the loop's on an activation) leaves the micro-batch no
        witness (``box["witness"] = None``) and its reason in ``box["lost"]``; the loop's backward goes on as
        without the tracker, and the step's check decides without a witness (:meth:`_take_seeded_witness`). An
        interrupt (KeyboardInterrupt, SystemExit) propagates, out of the loop's backward before the graph under
        the losses ran (the tracker out of its pass, the buffers its own): as after any backward that raised
        half-way, the loop zeroes the gradients and observes the step's micro-batches again."""
        self._own_pass = True  # (the tracker's hooks, this one's included, ignore this pass)
        try:
            outputs = losses if losses is not None else _losses_edge(*where)
            with preserved_buffers(self.model), _parameter_hooks_held(self.params.values()):
                # (a non-reentrant checkpoint's rerun writes to copies of the buffers)
                rows = torch.autograd.grad([outputs], list(self.params.values()), grad_outputs=[seed],
                                           retain_graph=True, allow_unused=True)
            sums = box["witness"].get(task)
            if sums is None:
                box["witness"][task] = {name: torch.zeros_like(p) if g is None else g.detach()
                                        for (name, p), g in zip(self.params.items(), rows)}
            else:  # (a second pass of the loop's through the same losses, retain_graph=True)
                for (name, _), g in zip(self.params.items(), rows):
                    if g is not None:
                        sums[name] += g
        except Exception as error:  # (the witness is only an aid to the check: the loop's backward must go on)
            box["witness"] = None
            reason = " ".join(str(error).split())
            box["lost"] = f"{type(error).__name__}: {reason[:200]}"
        except BaseException as error:
            box["witness"] = None
            box["lost"] = f"{type(error).__name__} in the witness pass"
            raise
        finally:
            self._own_pass = False

    def _check_seeds(self, index: int, kept: list[dict[str, Any]]) -> None:
        """A step whose kept micro-batches' losses all saw the loop's seed: refuse one that weighs its examples
        otherwise than observed, s_n ≠ λ c_n within a micro-batch (to ``rtol``: the seeds' rounding). In half
        precision, with one λ for the step across micro-batches and, under DDP, across ranks (the ranks' λ
        compared through two small all-reduces every rank makes at every observed step of a tracker
        built with ``mixed_precision="observe"``: the setting, not the step, decides). The gradient check
        allows the precision's eps of the magnitudes, under which a micro-batch weighted 1 % off passes
        (bfloat16); and it cannot see weights otherwise than observed where the per-example gradients span one
        direction (a scalar temperature over a frozen body: a class weighted 0.1 by the loop, observed as the
        plain mean, was credited 0.339 of the change for a true 0.050, the residual 5e-17). The seed shows both
        exactly. A loss built beside the observed losses (F.mse_loss(outputs, y)) hands them no seed: the
        gradient check alone decides."""
        seeded = bool(kept) and all(e.get("seed_box", {}).get("passes") for e in kept)
        lambdas = []
        for entry in kept if seeded else []:
            passes, c = entry["seed_box"]["passes"], entry["coefficients"]
            # (the passes that reach a parameter; where none does, the loop sets the gradients itself: every pass)
            reaching = [v for task, v in passes.items() if task in self._parameter_passes] or list(passes.values())
            seed = sum(reaching[1:], reaching[0])
            lam = float(seed @ c) / float(c @ c)
            off = norm_of(seed - lam * c)
            if not math.isfinite(lam) or off > self.rtol * norm_of(seed):
                raise LedgerCheckError(
                    f"step {index}: the observed group gradients do not add up to the real gradient: the loop's "
                    f"backward weighed the examples of observed micro-batch {entry['number']} otherwise than "
                    f"observe() was told (its seed ∂loss/∂ℓ_n is {off / max(norm_of(seed), 1e-300):.2e} off "
                    "every multiple of the coefficients): pass the loss's own per-example coefficients to "
                    "observe(losses, groups, weights=)")
            lambdas.append((entry["number"], lam))
        if not any(entry.get("precision") is not None for entry in kept):  # (full precision: within micro-batches)
            lambdas = []
        if lambdas:
            first = lambdas[0][1]
            for number, lam in lambdas[1:]:
                if abs(lam - first) > self.rtol * max(abs(first), abs(lam)):
                    raise LedgerCheckError(
                        f"step {index}: the observed group gradients do not add up to the real gradient: the loop's "
                        f"backward weighed observed micro-batch {number} {lam / first if first else math.inf:.6g} "
                        f"times micro-batch {lambdas[0][0]} (their seeds ∂loss/∂ℓ_n over the coefficients observed): "
                        "in an observed loop every micro-batch of a step enters as observed, one scalar for the whole "
                        "step (the mean over micro-batches, clipping); pass the loss's own coefficients to "
                        "observe(..., weights=)")
        if self.distributed is None or self.mixed_precision != "observe":  # (every rank holds the same setting)
            return
        world = self.distributed.world_size
        mine = lambdas[0][1] if lambdas else 0.0
        device = self.distributed.device
        summed = summed_over_ranks(torch.tensor([0.0 if lambdas else 1.0, mine], dtype=torch.float64, device=device),
                                   self.distributed)
        missing, mean = float(summed[0]), float(summed[1]) / world
        spread = float(summed_over_ranks(torch.tensor([(mine - mean) ** 2], dtype=torch.float64, device=device),
                                         self.distributed)[0])
        if missing == 0.0 and math.sqrt(spread) > self.rtol * abs(mean):
            raise LedgerCheckError(
                f"step {index}: the observed group gradients do not add up to the real gradient: the ranks' backward "
                f"passes weighed their micro-batches differently (this rank's seed ∂loss/∂ℓ_n is {mine / mean if mean else math.inf:.6g} "
                "times the ranks' mean over the coefficients observed); every rank's loss must weigh its examples as "
                "observe() was told there")

    def _mark_observed(self, losses: torch.Tensor, backward: list[bool]) -> list[int | None]:
        """A hook on the observed losses that the loop's backward through them fires (``backward[0] = True``;
        observe()'s own passes do not count; the loop's gradient is unchanged, the tracker held weakly):
        which micro-batches form the step (:meth:`_begin_observed`) and which a cleared gradient drops as a
        skipped step (:meth:`_drop_skipped`, :meth:`_drop_cleared`). Returns ``[n]``: the loop's backward
        passes into the parameters counted when the hook fired (None before)."""
        this = weakref.ref(self)
        at: list[int | None] = [None]

        def backward_seen(_grad: torch.Tensor) -> None:
            tracker = this()
            if tracker is not None and not tracker._own_pass:
                if not backward[0]:
                    tracker._drop_cleared()
                backward[0] = True
                at[0] = tracker._accumulations

        losses.register_hook(backward_seen)
        return at

    def _observed_gradients(self, losses, groups, weights):
        """observe()'s checks, then the micro-batch's group ids, group gradients, the half-precision dtype
        its gradients passed through (None: the model's precision), its witnesses
        (:meth:`_half_precision_rows`; none in the model's precision), its coefficients c_n (``[B]``
        float64: the mean's 1/B, or ``weights``) and its rounding sample (:meth:`_graph_rows`)."""
        self._check_open()
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(
                f"losses must be the per-example losses, a non-empty Tensor[B] with its graph, got "
                f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}"
            )
        if not losses.requires_grad:
            raise ValueError(
                "losses carry no graph (detached, or computed under torch.no_grad()): pass them before the loop's "
                "backward, as computed from the model's output"
            )
        batch = losses.shape[0]
        if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != (batch,)):
            raise ValueError(f"weights must be a Tensor of shape [{batch}] (one c_n per example)")
        precision = self._check_precision(losses)
        self._check_parameters()  # a layer frozen or unfrozen, a model.double(), before the graph is read
        check_replicated(self.module, self.distributed)
        if not bool(torch.isfinite(losses).all()):
            bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
            raise NonFiniteError(f"non-finite loss at examples {bad[:10]}: this micro-batch was not observed")
        ids = self.partitions.check(groups, batch)
        self._need_dense("observing a loop")
        coefficients = (torch.full((batch,), 1.0 / batch, dtype=torch.float64) if weights is None else weights).to(torch.float64)
        ids_on = {k: v.to(losses.device) for k, v in ids.items()}
        witnesses, difference = [], {}
        if precision is None:
            grads, difference = self._graph_rows(losses, ids_on, coefficients.to(losses.device))
        else:
            grads, witnesses = self._half_precision_rows(losses, ids_on, coefficients.to(losses.device), precision)
        if not any(bool(g.any()) for g in grads.values()) and _reentrant_checkpoint_in(losses):
            raise ValueError(
                "the losses' graph runs through torch.utils.checkpoint with use_reentrant=True, whose backward the "
                "tracker's passes (torch.autograd.grad with respect to the parameters) cannot enter: every group "
                "gradient of this micro-batch came back zero. Pass use_reentrant=False to torch.utils.checkpoint "
                "(diffusers' enable_gradient_checkpointing already does); this micro-batch was not observed"
            )
        return ids, grads, precision, witnesses, coefficients, difference

    def _graph_rows(self, losses: torch.Tensor, ids: dict[str, torch.Tensor], coefficients: torch.Tensor
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A micro-batch's group rows from its graph in the model's precision, and (a float32 model) the
        rounding sample d of its own gradient from the same batched backward (tracking.rounding; else ``{}``)."""
        if self._samples_rounding:
            return self.route.graph_gradients_and_rounding(losses, ids, coefficients)
        return self.route.graph_gradients(losses, ids, coefficients), {}

    def _replayed_rounding(self, step: OptimizerStep, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rounding sample d of an owned step whose rows came from another pass than its graph: each
        micro-batch's forward again, in analysis mode as the route's own pass (which reproduced the training
        losses), and its two seeded backward passes batched (tracking.rounding); summed over micro-batches,
        ``{name: Tensor[*shape]}`` float64. Runs inside the gradient check: the parameters are θ_k, and
        ``.grad`` (the optimizer's gradient) is not touched."""
        total = RoundingSample()
        with torch.enable_grad():
            for rows in step.micro_batch_slices():
                inputs, targets = step.micro_batch(rows)
                losses = step.loss_fn(model_output(self.module, inputs), targets)
                total.add(rounding_of(losses, self.params, coefficients[rows].to(losses.device)))
        return total.difference or {}

    def _half_precision_rows(self, losses, ids, coefficients, precision, seed_scales=None):
        """The group rows of a micro-batch whose gradients pass through ``precision`` (float16,
        bfloat16), and its witnesses: the batch's own backward ∇ Σ_n s c_n ℓ_n / s, one more pass
        through the same graph per seed scale s, rounded as the loop's backward rounds it whatever the
        model's kernels do (a CPU LayerNorm under autocast accumulates its weight gradient in
        half precision, rounding each entry many times). In float16 the rows are taken with the losses
        scaled by ``HALF_ROW_SCALE`` (a power of two, divided out exactly; lowered while a row
        overflows), as GradScaler scales the loop's: unscaled, gradients under float16's normal range
        (6e-5) lose their digits; its witnesses are taken unscaled and at that scale (a loop with and
        without GradScaler); ``seed_scales``: those scales instead (an owned step knows its own). Returns
        ``(rows, [witness, ...])``; no witness under DDP (the step is then checked against the groups alone)."""
        boost = HALF_ROW_SCALE if precision == torch.float16 else 1.0
        while True:
            grads = self.route.graph_gradients(losses, ids, coefficients * boost)
            if boost == 1.0 or all(bool(torch.isfinite(g).all()) for g in grads.values()):
                break
            boost = max(1.0, boost / 256)
        for g in grads.values():
            g.div_(boost)
        witnesses = []
        if self.distributed is None:
            for seed_scale in sorted({1.0, boost} if seed_scales is None else set(seed_scales)):
                # (the parameters' gradient hooks out of the pass: a loop's elementwise clip must not be in the witness)
                with _parameter_hooks_held(self.params.values()):
                    rows = torch.autograd.grad(losses, list(self.params.values()),
                                               grad_outputs=(coefficients * seed_scale).to(losses.dtype),
                                               retain_graph=True, allow_unused=True)
                # In the parameters' dtype, as the loop's gradient is (a power of two divided out exactly).
                witnesses.append({name: torch.zeros_like(p) if g is None else g.detach().div(seed_scale)
                                  for (name, p), g in zip(self.params.items(), rows)})
        return grads, witnesses

    @property
    def observed_micro_batches(self) -> int:
        """Micro-batches observed for the optimizer step to come (0 after a step is recorded, refused
        or rolled back, or its micro-batches were dropped as a skipped step's); the step may leave out
        those with no backward (:meth:`observe`)."""
        return 0 if self._observed is None else len(self._observed["entries"])

    def _gradients_cleared(self) -> bool:
        """Whether every tracked gradient is None or exactly zero (before this micro-batch's
        backward): after the earlier micro-batches' backward, only a zero_grad does that."""
        return all(p.grad is None or not bool(p.grad.any()) for p in self.params.values())

    def _check_open(self) -> None:
        self._check_consistent()
        if self._closed:
            raise RuntimeError("this tracker was closed (its tracked window ended): build a new one to track more steps")

    def _check_consistent(self) -> None:
        """Refuse to go on from a state the ledgers do not describe: a step whose recording was cut
        off half-way (:meth:`_commit`), or an observed step the loop's ``optimizer.step()`` never
        finished (:meth:`_abandon_observed_step`)."""
        if self._broken is not None:
            raise RuntimeError(
                f"this tracker refuses further steps: {self._broken}. Its ledgers and group state no longer describe "
                "one run; build a new tracker (from the model and optimizer as they are now) to track more steps"
            )
        self._abandon_observed_step()

    def _abandon_observed_step(self) -> None:
        """An observed step begun by the optimizer's pre-step hook whose post-step hook never ran: the
        loop's ``optimizer.step()`` raised in between (in the optimizer's own update, possibly after
        updating some parameters). Roll it back to θ_k (parameters, buffers, optimizer state; the
        ledgers never saw it) and raise, so that the loop runs its micro-batch again."""
        pending, self._pending_step = self._pending_step, None
        if pending is None:
            return
        self._restore_state(pending.saved, pending.theta_before)
        raise RuntimeError(
            f"step {pending.index} (observed) never finished: the loop's optimizer.step() raised after the tracker "
            "began it, possibly after updating some parameters. It was rolled back: the parameters, buffers and "
            f"optimizer state are those before it again and the ledgers keep their {pending.index - 1} recorded "
            "steps. A forward run since then saw the half-updated parameters: run the micro-batch again "
            "(forward, tracker.observe, backward, optimizer.step())"
        )

    def close(self, *, record_ema: bool = True) -> None:
        """Stop tracking (the end of a tracked window): record the EMA's update after the last tracked
        step, if it has been made (``record_ema=False``: not, as for a tracker restored after its
        window, whose EMA has since followed untracked steps), then keep every ledger as it is;
        remove the optimizer hooks and forget micro-batches not stepped on."""
        if self._pending_step is not None:  # an observed optimizer.step() that raised: back to θ_k
            pending, self._pending_step = self._pending_step, None
            self._restore_state(pending.saved, pending.theta_before)
        if self.ema is not None and not self._closed and record_ema and self._broken is None:
            self.ema.sync(self.ledger.steps, self._last_theta())
        self._closed = True
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._observed = None
        self._pending_step = None
        self._observing = False

    def _before_observed_step(self, optimizer, args, kwargs):
        """The optimizer's pre-step hook. With a closure (Lightning's automatic optimization runs the
        forward, the backward and gradient clipping inside ``optimizer.step(closure)``), the step
        is begun when the closure returns; otherwise now."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer itself
        if self._observing or self._pending_step is not None:
            self._check_consistent()  # a previous optimizer.step() that raised half-way is rolled back first
        if closure is None:
            if self._observed is not None or self._observing:
                self._begin_observed()
            return None  # an owned step (tracker.step) or a loop not observed

        def observed_closure():
            if self._pending_step is not None:
                raise RuntimeError(
                    "the optimizer called its closure a second time within one step (LBFGS-like): an observed step "
                    "must run its forward and backward once; use an optimizer that calls the closure once"
                )
            loss = closure()
            if self._observed is not None or self._observing:
                self._begin_observed()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": observed_closure}
        return (args[0], observed_closure, *args[2:]), kwargs

    def _begin_observed(self) -> None:
        observed, self._observed = self._observed, None
        index = self.ledger.steps + 1
        # Under DDP the ranks meet before the combination, before the real step and before recording
        # (the post-step hook): a step one rank refuses is refused on every rank.
        self._together = together = StepAgreement(self.distributed, f"step {index} (observed)", points=3)
        if observed is None:
            error = RuntimeError(self._no_observed_message(index))
            together.failed(error)
            raise error
        try:
            self._begin_observed_step(index, observed, together)
        except BaseException as error:
            self._refused_observed = (index, error)
            raise

    def _no_observed_message(self, index: int) -> str:
        """The error of an ``optimizer.step()`` with no micro-batch observed since the last step; after a refused
        step, it names the refusal (its micro-batches were dropped with it) and how to run the step again."""
        message = ("optimizer.step() was called without an observed micro-batch since the last step: call "
                   "tracker.observe(per_example_losses, groups) before every backward (or tracker.close() to stop "
                   "tracking)")
        if self._refused_observed is None:
            return message
        refused, error = self._refused_observed
        reason = " ".join(str(error).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        if self._broken is not None:  # (the step could not be undone: say that, not how to run it again)
            return f"{message}. The optimizer.step() before it, for step {refused}, failed ({reason}); {self._broken}"
        return (f"{message}. The optimizer.step() before it, for step {refused}, was refused ({type(error).__name__}: "
                f"{reason}) and the micro-batches observed for it were dropped with it; the parameters and the "
                f"optimizer are as they were before step {refused}. To run step {index}: call optimizer.zero_grad(), "
                "run its micro-batches again, each observed before its backward, then optimizer.step()")

    def _begin_observed_step(self, index: int, observed: dict[str, Any], together: StepAgreement) -> None:
        try:
            self._check_before(owned=False)
            entries = observed["entries"]
            # The step is made of the micro-batches whose loop backward was seen; one with none (a loss-spike guard
            # skipped it) put nothing into the real gradient and is left out. With no backward seen at all (a loop
            # that sets p.grad itself) every observed micro-batch forms the step. The check below decides either way.
            kept = [e for e in entries if e["backward"][0]] or entries
            # (the first step's batch into the cost estimate, checked before anything of the step runs; under DDP
            # at this first meeting, before any collective of the step, so a rank that refuses is heard by all)
            # (float16 where any micro-batch ran it: its witnesses hold the most, whatever _least_precise names)
            halves = {e.get("precision") for e in kept} - {None}
            undo = self._follow_batch(index, sum(int(e["losses"].shape[0]) for e in kept), len(kept),
                                      torch.float16 if torch.float16 in halves else _least_precise(kept))
        except BaseException as error:
            together.failed(error)
            raise
        left_out = [(i + 1, e) for i, e in enumerate(entries) if not any(e is k for k in kept)]
        dropped = [i for i, _ in left_out]
        # Under DDP the ranks must keep the same micro-batches (the kept count feeds the gradient average): a
        # rank that keeps another count meets the others at another place, and the step is refused on every rank.
        if dropped:
            together.what = f"step {index} (observed, {len(kept)} micro-batches kept, {len(dropped)} dropped)"
        with _undone_on_error(undo):  # (another rank refused: this one's estimate as it was, as theirs)
            together.passed()
        together.what = f"step {index} (observed)"
        theta_before = {name: p.detach().clone() for name, p in self.params.items()}
        saved = self._save_state()
        for entry in kept:  # (in observation order; the ones folded already are the sum)
            if not entry["folded"]:
                self._fold(observed, entry)
        losses = torch.cat([e["losses"] for e in kept])
        step = {"grads": observed["grads"], "micro_batches": len(kept), "dropped": len(dropped),
                "moving": observed["moving"], "independent": observed["independent"],
                "ids": [e["ids"] for e in kept], "numbers": [e["number"] for e in kept],
                "left_out": [(i, e["grads"]) for i, e in left_out], "entries": entries,
                "witnesses": observed["witness"] or [], "kept": kept, "rounding": observed["rounding"]}
        try:
            self._begin_observed_checked(index, step, losses, theta_before, saved, together)
        except LedgerCheckError as error:
            if dropped:
                raise LedgerCheckError(
                    f"step {index} (observed): micro-batch(es) {dropped[:10]} of the {len(entries)} observed for this "
                    "step had no backward through their losses while the others had, and were left out of it (a loop "
                    "that observed them and then skipped their backward: a loss-spike guard, a `continue`); the "
                    f"{len(kept)} kept do not add up to the optimizer's gradient either ({error})"
                ) from error
            raise

    def _begin_observed_checked(self, index, observed, losses, theta_before, saved, together) -> None:
        with torch.no_grad(), together.meeting():
            scale = self._scale_to_real(index, observed["grads"], observed["micro_batches"])
            self._check_seeds(index, observed["kept"])
            self._check_left_out_visible(index, observed["grads"], observed.get("left_out", []), observed["entries"])
            if observed["moving"] > 1 and not observed["independent"]:
                raise ValueError(
                    f"step {index}: the gradients of the {observed['moving']} observed micro-batches that move the "
                    "parameters are all parallel (a model whose per-example gradients span one direction, the same "
                    "examples in each micro-batch), so the one scale fitted to the optimizer's gradient cannot show "
                    "whether the loop weighted them as observe() was told: any weighting fits, and the groups' "
                    "shares would follow the observed weights, not the loop's. Observe the step's examples in one "
                    "call (losses = torch.cat of the micro-batches' losses, observe(losses, groups, weights= the "
                    "loss's coefficients), and the loop's loss built from those same losses, (weights * "
                    "losses).sum(), so that the weights it hands them are checked), or call tracker.step() with the "
                    "whole batch"
                )
            self._check_seedless_weighting(index, observed["grads"], observed["kept"])
            # Combined across ranks once, there, and scaled after (the rows are this step's own arrays).
            gradients = self.route.from_graph(observed["grads"], losses, _Batch(losses.shape[0], scale))
            # Kept once the step is recorded (a refused step leaves no entry).
            self._scale_entry = {"step": index, "scale": scale, "micro_batches": observed["micro_batches"],
                                 "scale_times_micro_batches": scale * observed["micro_batches"],
                                 "dropped_micro_batches": observed["dropped"],
                                 # the half precision the step's gradients were rounded in (None: the model's)
                                 "gradient_precision": _precision_name(observed["entries"]),
                                 # the micro-batches whose witness with the loop's own seed was lost, and why
                                 # (_take_seeded_witness): the step was checked without a witness
                                 "witness_lost": [f"micro-batch {e['number']}: {e['witness_lost']}"
                                                  for e in observed["kept"] if e.get("witness_lost")]}
            self._step_numbers = list(observed["numbers"])
            ids = {name: torch.cat([i[name] for i in observed["ids"]]) for name in self.partitions.names}
            self._pending_step = self._begin(index, "observed", ids, theta_before, saved, gradients, losses, scale,
                                             self._precision_rtol(observed["entries"]), observed["witnesses"],
                                             observed["rounding"])

    def _check_seedless_weighting(self, index: int, grads: dict[str, torch.Tensor], kept: list[dict[str, Any]]) -> None:
        """A kept micro-batch whose losses saw no seed (the loop's loss built beside them: recomputed from the
        outputs, or from a part or a copy of the observed losses) is checked by the gradient alone; where the
        primary partition's group rows all point one way (per-example gradients that span one direction: a
        scalar temperature over a frozen body) any weighting of the groups fits the one fitted scale: refused
        (a class the loop weighted 0.1, observed as the plain mean, was booked 0.20 of the largest contribution
        off). Two passes over the parameters, one row block at a time: no float64 copy of all the rows."""
        if all(e.get("seed_box", {}).get("passes") for e in kept):
            return
        first = self.partitions.slices[self.partitions.primary]
        blocks = [grads[name][first].reshape(grads[name][first].shape[0], -1) for name in self.params]

        def pieces():  # float64 copies of at most CHECK_ELEMENTS values at a time (a block whole was 6x its rows)
            for b in blocks:
                width = max(1, CHECK_ELEMENTS // max(1, b.shape[0]))
                for start in range(0, b.shape[1], width):
                    yield b[:, start:start + width].to(torch.float64)

        squares = sum((c ** 2).sum(dim=1) for c in pieces())  # [G] |g_k|²
        moving = torch.nonzero(squares > 0).reshape(-1)
        if moving.numel() < 2 or not bool(torch.isfinite(squares[moving]).all()):
            return  # (one direction or none: nothing to weigh against; non-finite: refused by the step's checks)
        reference = moving[0]
        # sin² from the residual of each row's projection on the first moving one: 1 − cos² carries cos's rounding
        dots = sum(c @ c[reference] for c in pieces())  # [G] g_k · g_r
        scale = dots / squares[reference]
        residual = sum(((c - scale[:, None] * c[reference]) ** 2).sum(dim=1) for c in pieces())
        sines_squared = residual[moving] / squares[moving]
        if bool((sines_squared <= self._parallel_limit(kept)).all()):
            raise ValueError(
                f"step {index}: the loop's loss is not built from the observed losses (no seed ∂loss/∂ℓ_n reached "
                "them) and the groups' gradients all point one way (per-example gradients that span one direction), "
                "so the gradient check cannot show how the loop weighted the groups: any weighting fits the one "
                "fitted scale. Build the loop's loss from the observed losses ((weights * losses).sum() with "
                "observe(losses, groups, weights=)), so that the weights it hands them are checked"
            )

    def _after_observed_step(self, optimizer, args, kwargs) -> None:
        pending, self._pending_step = self._pending_step, None
        if pending is None:
            return
        try:
            result, after = self._finish(pending)
            self._note_precision_cost(pending, result, after, self._scale_entry)
            self._together.passed()
            self._commit(pending, result, after, scale_entry=self._scale_entry)
        except BaseException as error:
            self._refused_observed = (pending.index, error)
            self._together.failed(error)
            self._roll_back(error, pending.index, pending.phase, pending.saved, pending.theta_before, applied=True)
            raise
        self._refused_observed = None
        self.step_observations = self._step_numbers
        self._recorded(result)

    def _note_precision_cost(self, pending: "_StepInProgress", result: StepContributions, after: "_After",
                             entry: dict[str, Any]) -> None:
        """A half-precision step's relative residual ‖R_k‖ / ‖f(θ_{k+1}) − f(θ_k)‖ at the probes, into its
        ``gradient_scales`` ``entry`` (``relative_residual``), and a RuntimeWarning (once per tracker) when it
        exceeds :data:`PRECISION_WARNING`: the step's change is then mostly what its groups do not add up
        to (its rounding row), and its shares say little. The ledger is recorded either way."""
        if entry.get("gradient_precision") is None:
            return
        change, residual = float((after[0] - pending.f_before).norm()), float(result.residual.norm())
        relative = residual / change if change > 0 else (0.0 if residual == 0 else math.inf)
        entry["relative_residual"] = relative
        if relative > PRECISION_WARNING and not self._precision_warned:
            self._precision_warned = True
            warnings.warn(
                f"step {pending.index}: its residual at the probes is {relative:.3g} times its change: in "
                f"{entry['gradient_precision']} the groups' gradients miss the real one by a rounding "
                "that this step magnified (an adaptive optimizer divides by the root of a second moment, Adam's "
                "sqrt(v) + eps, where that rounding is most of it), so its shares say little. Read "
                "gradient_scales[*]['relative_residual'] and the ledger's residual before the shares; a larger eps "
                "or a float32 window avoids it (shown once per tracker)",
                RuntimeWarning, stacklevel=2,
            )

    def _check_left_out_visible(self, index: int, grads: dict[str, torch.Tensor], left_out: list,
                                entries: list[dict[str, Any]]) -> None:
        """Refuse a step whose left-out micro-batches (no backward seen through their observed losses) the
        check could not tell from kept ones: when one's gradient (Σ over the primary partition's groups),
        or the left-out ones' sum, is parallel to the kept sum, the real gradient is one scalar times the
        kept sum whether or not the loop trained on them, and the scale fitted would silently give the kept
        micro-batches' groups the left-out ones' share."""
        if not left_out:
            return
        kept = self._primary_total(grads)
        kept_norm = norm_of(kept)
        if kept_norm == 0.0 or not math.isfinite(kept_norm):  # (then a left-out gradient fails the check itself)
            return
        candidates = [([i], self._primary_total(rows)) for i, rows in left_out]
        if len(candidates) > 1:
            candidates.append(([i for i, _ in left_out], sum(t for _, t in candidates)))
        for which, t in candidates:
            norm = norm_of(t)
            if norm == 0.0 or not math.isfinite(norm):
                continue
            if self._parallel(_sine_squared(t, kept), entries):
                raise ValueError(
                    f"step {index}: micro-batch(es) {which[:10]} of this step had no backward through the losses "
                    "observed for them and would be left out, but their gradient is parallel to the kept "
                    "micro-batches' sum, so the optimizer's gradient cannot show whether the loop trained on them "
                    "(one scale fits either way, and the kept groups would silently take their share). A backward "
                    "through another node than the observed tensor (loss = F.mse_loss(outputs, y) where observe() "
                    "got per-example losses computed beside it) reaches the parameters without the observed "
                    "losses' hook. Build the loop's loss from the observed tensor itself (loss = losses.mean()), "
                    "call observe() only once the loop decides to train on a micro-batch, or observe the step's "
                    "examples in one call"
                )

    def _scale_to_real(self, index: int, grads: dict[str, torch.Tensor], micro_batches: int) -> float:
        """The one scalar α that makes the observed group gradients' sum the optimizer's real gradient
        (least squares; the check of step 4 then bounds what is left by rounding). Under DDP the sum
        is averaged over the ranks as DDP averages gradients (one parameter-sized all-reduce: the
        rows themselves are combined once, in the route's ``from_graph``).

        Over several micro-batches that check is what shows they were weighted alike: with a
        gradient of one nonzero entry any weighting is "one scalar times" the sum, so such a step
        is refused."""
        first = self.partitions.slices[self.partitions.primary]
        totals = [grads[name][first].sum(dim=0).reshape(-1) for name in self.params]
        if self.distributed is not None:
            flat = summed_over_ranks(torch.cat(totals), self.distributed) / self.distributed.world_size
            totals = flat.split([t.numel() for t in totals])
        # α = (real · total) / (total · total), formed on each side divided by its largest finite magnitude (one
        # parameter at a time, as before): products formed directly overflowed past 1.3e154 (a finite float64
        # gradient refused as "not finite") or underflowed below 1.5e-154 (α read 1.0); an infinity or a NaN still
        # makes α non-finite
        total_peak = largest_finite(totals)
        real_peak = largest_finite(p.grad for p in self.params.values() if p.grad is not None)
        dot, norm, nonzero = 0.0, 0.0, 0
        for p, total in zip(self.params.values(), totals):
            # (one float64 copy of the gradient, divided in place: the same quotients as a division into a second)
            real = (torch.zeros_like(total) if p.grad is None
                    else p.grad.to(torch.float64, copy=True).reshape(-1).div_(real_peak))
            scaled = total / total_peak
            dot += float((real * scaled).sum())
            norm += float((scaled * scaled).sum())
            if micro_batches > 1 and nonzero < 2:
                nonzero += int(torch.count_nonzero(total))
        # (a step whose every row is zero, each micro-batch's examples already fit: no weighting changes its
        # shares, and the check below still asks for a zero real gradient)
        if micro_batches > 1 and nonzero < 2 and (nonzero or any(bool(grads[name].any()) for name in self.params)):
            raise ValueError(
                f"step {index}: the {micro_batches} observed micro-batches give a gradient with "
                f"{nonzero} nonzero entr{'y' if nonzero == 1 else 'ies'}, so the tracker cannot check that they "
                "were weighted alike (the one scale it fits would hide any weighting). Observe one micro-batch "
                "per optimizer step here, or call tracker.step() with the whole batch"
            )
        scale = (real_peak / total_peak) * (dot / norm) if norm > 0 else 1.0
        if not math.isfinite(scale):
            raise NonFiniteError(
                f"step {index}: the optimizer's gradient is not finite (a GradScaler hands a fused optimizer its "
                "overflowing steps to skip inside step(): use a non-fused optimizer, whose skipped steps the tracker "
                "follows)"
            )
        return scale

    def _recorded(self, result: StepContributions) -> None:
        """After a step is committed: the listeners (an error there leaves the recorded step as it is), through
        :meth:`_hear`: the step's ``result`` is the one :meth:`_commit` marked owed."""
        self._hear()

    def _hear(self) -> None:
        """Call the listeners the last committed step still owes (:meth:`_commit` marks them all owed before its
        ledgers are written): after the step, or, where an interrupt or an error came between the commit and a
        listener's return, at the next step, observed micro-batch or save. A listener is owed until its call returns,
        so one cut off is called again with the same result and :attr:`step_observations`: the analyzers' listeners
        count a step once (they see from their counts and the ledger that it is counted) and make what it still owes.
        A listener not marked :data:`REPEATABLE_LISTENER` (the user's own) that raises an error of its own (an
        Exception, not an interrupt) is not owed the step again: its call had the step (it may have recorded it
        before it raised: called again it would record it twice), and one failing on every call would refuse every
        further step and save; the listeners after it are owed still."""
        owed = self._unheard
        if owed is None or self._hearing:
            return
        self._hearing = True
        try:
            self.step_observations = owed.observations
            while owed.next_listener < len(self.listeners):
                position = owed.next_listener
                listener = self.listeners[position]
                try:
                    listener(owed.result)
                except Exception:
                    if not getattr(listener, REPEATABLE_LISTENER, False):
                        owed.next_listener = position + 1  # (its own error: the step was its, as before; not again)
                        if owed.next_listener >= len(self.listeners):
                            self._unheard = None
                    raise
                owed.next_listener = position + 1
            self._unheard = None
        finally:
            self._hearing = False

    # -- the numbered steps, shared by owned and observed steps ---------------------------------
    def _begin(self, index, phase, ids, theta_before, saved, gradients, losses, clip_factor,
               gradient_rtol: float, witnesses: list[dict[str, torch.Tensor]],
               rounding_sample: RoundingSample) -> "_StepInProgress":
        """Everything before the real optimizer step: the drift of state outside the trainable
        parameters, the gradient check (to ``gradient_rtol``: the model dtype's tolerance, or a half
        precision's the observed micro-batches ran in; ``witnesses``: a half-precision step's own backward
        passes, :meth:`_witnessed`, else empty; ``rounding_sample``: the step's (tracking.rounding), before its gradient
        scale ``clip_factor``) and the splitter's capture."""
        with torch.no_grad(), analysis_mode(self.module):
            # Buffers (running statistics, spectral norm) and frozen parameters may have changed since
            # the last step, or in the training forward: not an example's doing.
            f_before = self._probe_outputs() if self._has_state else self._f_prev
            # The optimizer will step on the batched gradient, which differs from Σ_g ĝ_g by
            # rounding (checked here): its own row of the split in step 3, left out of the
            # contributions (residual).
            try:
                rounding = self._check_gradients(index, gradients, losses, gradient_rtol, witnesses,
                                                 lambda: rounding_sample.norms(clip_factor))
            finally:  # (read only by the check: not held through the analysis, which cost.py does not count it in)
                rounding_sample.release()
        self.splitter.capture()
        self.route.before_step()
        return _StepInProgress(index, phase, ids, theta_before, saved, gradients, rounding, f_before,
                               f_before - self._f_prev, losses, clip_factor)

    def _finish(self, pending: "_StepInProgress") -> tuple[StepContributions, "_After"]:
        """Steps 3-5 and the fresh forward after the real optimizer step; changes no ledger or group state
        (:meth:`_commit` records). Returns the step's contributions and ``(f_after [M, d], θ_{k+1})``."""
        index, theta_before = pending.index, pending.theta_before
        with torch.no_grad(), analysis_mode(self.module):
            theta_after = {name: p.detach().clone() for name, p in self.params.items()}
            # 3. Δ_k = Σ_g u_{k,g} + u_rest (+ the rounding row), for every partition.
            updates = self.splitter.split(
                pending.gradients.grads, theta_before, pending.rounding
            )
            # 4. The check against what the optimizer really did.
            self._check_updates(index, updates, theta_before, theta_after)
            # 5. c_{k,g}(x) = Σ_q w_q J(x; θ_k + s_q Δ_k) u_{k,g}, and the rest's.
            nodes = self._nodes(theta_before, theta_after)
            result = self.route.contributions(updates, nodes, pending.gradients, pending.ids, pending.clip_factor)
            # 6. Fresh forward at θ_{k+1}; record.
            f_after = self._probe_outputs()
        primary = self.partitions.primary
        step_residual = (f_after - pending.f_before - result.contributions[primary].sum(dim=1) - result.rest
                         - result.sketch_error[primary])
        rest = result.rest + pending.drift
        return (StepContributions(index, result, dict(self.partitions.sizes), rest, step_residual, pending.losses,
                                  updates, result.sketch_error), (f_after, theta_after))

    def _commit(self, pending: "_StepInProgress", result: StepContributions, after: "_After",
                scale_entry: dict[str, float] | None = None, *, owned: bool = False) -> None:
        """Record a checked step, all or nothing: every partition's ledger, then the route's new group
        state, the EMA's displacement, f(θ_{k+1}) and θ_{k+1} (``after``).

        A failure while the ledgers are written (an interrupt, a MemoryError in a snapshot) puts the
        ledgers already written back (:meth:`PathKernelLedger.restore`), and the caller rolls the
        step back: no ledger counts a step the model and the other ledgers do not. The group state
        that follows cannot be put back: a failure there leaves the tracker refusing further steps."""
        f_after, theta_after = after
        moved = result.moved
        # The copies the commit keeps, made before any ledger is written: an allocation failing there (out of memory)
        # once the ledgers held the step left the tracker refusing every further step; what follows the ledgers now
        # only swaps and adds in place.
        buffers_after = self._copy_buffers()
        ema_buffers = self.ema.live_buffers_after() if self.ema is not None else None
        # The listeners owed the step (_hear), marked with the ledgers: an interrupt before they return is made up.
        unheard = _OwedListeners(result, [] if owned else list(self._step_numbers))
        written = []
        try:
            for name, ledger in self.ledgers.items():
                written.append((ledger, ledger.mark(moved.columns[name])))
                ledger.record(moved.contributions[name], result.rest, f_after, result.sketch_errors[name],
                              pending.drift, columns=moved.columns[name],
                              step_sketch_noise=None if moved.sketch_noise is None else moved.sketch_noise[name],
                              step_null=moved.null_rest, null_parameters=moved.null_names)
                if self.snapshot_every and ledger.steps % self.snapshot_every == 0:
                    ledger.snapshot()
        except BaseException:
            for ledger, mark in reversed(written):
                ledger.restore(mark)
            raise
        self._broken = (f"step {pending.index} ({pending.phase}) was interrupted after its ledgers were written, "
                        "while its group state was being kept")
        self._unheard = unheard
        self.route.commit()
        if self.ema is not None:
            self.ema.after_step(result.group_updates, live_buffers=ema_buffers, null_names=moved.null_names)
        self._f_prev = f_after
        self._theta_after = theta_after
        self._buffers_after = buffers_after
        if scale_entry is not None:  # an observed step, or an owned one split from half-precision gradients
            self.gradient_scales.append(scale_entry)
        if owned:
            self._grad_marks = {n: (id(p.grad), p.grad._version) for n, p in self.params.items() if p.grad is not None}
        else:  # an observed step: the loop zeroes or keeps its gradients as it likes
            self._grad_marks = None
        self._broken = None

    def _roll_back(self, error: BaseException, index: int, phase: str, saved, theta_before, *, applied: bool) -> None:
        """Put the parameters, buffers and optimizer state back to θ_k after a failed step (unless the
        step's ledgers were written already: the tracker then refuses further steps, :meth:`_commit`)."""
        if self._broken is not None:
            if hasattr(error, "add_note"):
                error.add_note(f"genkernel: {self._broken}; the ledgers hold step {index}, the group state does not: "
                               "this tracker refuses further steps")
            return
        if isinstance(error, NonFiniteError) and not applied:
            # A skipped step (a non-finite loss or gradient, a GradScaler's skip): nothing was updated, and the step's
            # forward advanced the buffers (BatchNorm's statistics) as it does in the loop without a tracker, which
            # goes on from them (the trainers keep a skipped step's draws and buffers): they are kept.
            self._restore_state({**saved, "buffers": []}, theta_before)
            return
        self._restore_state(saved, theta_before)
        note = (f"genkernel: step {index} ({phase}) was rolled back: the parameters, buffers and optimizer state "
                f"are those before it again and the ledgers keep their {index - 1} recorded steps; fix the cause and "
                "call the step again")
        if hasattr(error, "add_note"):
            error.add_note(note)

    def _check_frozen_precision(self) -> None:
        """Refuse frozen half-precision parameters beside full-precision trainable ones (diffusers' LoRA
        scripts: the base cast to ``weight_dtype``, the adapters to float32 by ``cast_training_params``).
        The ledger's own passes (probe outputs, contributions) run in the parameters' precision, so every
        activation is rounded to the base's half precision: a step's change at the probes is then mostly
        that rounding, which no group caused (measured on a LoRA UNet, bf16 base, AdamW at lr 1e-4: the
        residual was 0.99 of the change, the contributions summing to almost nothing, with no error)."""
        trainable = {t.dtype for t in self.params.values()}
        if trainable & set(LOW_PRECISION):
            return  # (half-precision trainable parameters: _check_precision's error)
        frozen = [(n, p.dtype) for n, p in self.module.named_parameters()
                  if p.dtype in LOW_PRECISION and n not in self.params]
        if frozen:
            names = ", ".join(n for n, _ in frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
            half = " and ".join(sorted({str(d).removeprefix("torch.") for _, d in frozen}))
            full = " and ".join(sorted({str(d).removeprefix("torch.") for d in trainable}))
            raise ValueError(
                f"the frozen parameters {names} are {half} while the trained ones are {full}: the ledger's passes "
                f"at the probes would run in {half}, and a step's change there would be mostly its rounding, which "
                "no group caused. Keep the frozen weights in float32 for the tracked window (diffusers' LoRA "
                "scripts: skip unet.to(weight_dtype), or call unet.to(torch.float32) before add_adapter); the "
                "forward still runs in half precision under torch.autocast with mixed_precision='observe'"
            )

    def _check_detached_weight_norms(self) -> None:
        """Refuse trained DoRA layers (peft's ``LoraConfig(use_dora=True)``): they divide by the weight
        norm ‖V + ΔV‖ detached from the graph (the DoRA paper's section 4.3, peft's only form), so autograd's
        derivative of the outputs is not their real derivative, and the contributions, made of it at the
        probes, miss the real change by that part whatever the quadrature (measured on a LoRA UNet: 0.22 of
        the change under midpoint and under gauss4, where LoRA's was 6e-6 and 1e-9; the brute force of the
        same autograd gradients agreed with the ledger to 1e-14, so nothing else flagged it)."""
        dora = [name for name, module in self.module.named_modules()
                if type(module).__name__.startswith("Dora") and type(module).__module__.startswith("peft")
                and any(p.requires_grad for p in module.parameters())]
        if dora:
            more = f" and {len(dora) - 3} more" if len(dora) > 3 else ""
            raise ValueError(
                f"{', '.join(dora[:3])}{more} are DoRA layers (peft, use_dora=True), which detach their weight norm "
                "from the gradient: autograd's derivative of the outputs is then not their real one, and the ledger's "
                "contributions would miss the real change by that part whatever the quadrature (measured: 0.22 of "
                "the change). Track a window trained with LoraConfig(use_dora=False)"
            )

    # -- all-or-nothing steps -------------------------------------------------------------------
    def _check_precision(self, losses: torch.Tensor | None = None, *, owned: bool = False,
                         autocast_dtype: torch.dtype | None = None) -> torch.dtype | None:
        """Refuse half precision in the training pass; under ``mixed_precision="observe"`` an observed
        micro-batch's ``losses``, or an owned step's (``owned``; ``autocast_dtype``: the dtype the step
        runs its own forward under autocast to, :attr:`OptimizerStep.autocast_dtype`), may come from one:
        returns the half-precision dtype its gradients passed through (None: the model's own precision,
        or nothing to tell yet)."""
        half = sorted({str(p.dtype).replace("torch.", "") for p in self.params.values() if p.dtype in LOW_PRECISION})
        if half:
            raise RuntimeError(
                f"mixed precision is not supported here (the model's trainable parameters are {' and '.join(half)}): each "
                "update is rounded into a half-precision weight (an update below half an ulp of its weight vanishes), "
                "which no split of the update into groups can follow. Keep float32 parameters and run the forward under "
                "torch.autocast (a loop you observe: mixed_precision='observe'; Lightning: precision='bf16-mixed', not "
                "'bf16-true'), or track in float32 / float64"
            )
        wrapped = hasattr(self.module, "_original_forward") or hasattr(self.model, "_original_forward")
        autocast = _autocast_devices()
        low = losses is not None and losses.dtype in LOW_PRECISION
        # A float32 loss from a forward run under autocast (the loop's `with` block closed before
        # observe(), or autocast inside the model's forward): the gradients pass through half precision.
        hidden = None if (wrapped or autocast or low or losses is None) else low_precision_in_graph(losses)
        precision = None
        if wrapped or autocast or low or hidden is not None or autocast_dtype is not None:
            if self.mixed_precision != "observe":
                where = "the model's forward is wrapped in autocast (accelerate's mixed_precision)" if wrapped else (
                    "autocast is on" if autocast else f"the losses are {losses.dtype}" if low else
                    f"the losses' graph runs in {hidden}: the forward ran under torch.autocast or in half precision"
                    if hidden is not None else f"the step runs its forward under torch.autocast to "
                    f"{str(autocast_dtype).removeprefix('torch.')} (a trainer's mixed_precision)")
                full = ("train the tracked steps in full precision: the built-in trainers' mixed_precision='no', or "
                        "outside torch.autocast") if owned else (
                        "track a window in full precision: build the Accelerator with mixed_precision='no' (Lightning: "
                        "Trainer(precision='32-true')), or run the tracked steps outside torch.autocast (a GradScaler "
                        "on float32 training is followed)")
                raise RuntimeError(
                    f"mixed precision is not supported here ({where}): the ledger must reproduce each update exactly. "
                    "Split the half-precision gradients: PathKernelTracker(..., mixed_precision='observe') (an analyzer "
                    f"takes the same option; the residual then reports the rounding, docs/observing.md); or {full}"
                )
            if losses is not None:
                # The dtype the gradients were rounded to: the losses', else the half precision the graph records
                # (none: the model's own precision, a float64 model's inside an autocast block that changed
                # nothing), else, where the graph keeps no record of dtypes, autocast's. None where nothing shows
                # it: the step is then checked at the model's precision (a half-precision gradient fails that
                # check: refused, never booked loosely).
                unrecorded = torch.get_autocast_dtype(autocast[0]) if autocast else autocast_dtype
                # (the coarsest: float16 losses from a graph that also ran bfloat16 carry bfloat16's rounding)
                precision = hidden or low_precision_in_graph(losses, unrecorded) or (losses.dtype if low else None)
        tf32 = tf32_hazard(self.module)
        if tf32 is not None:
            raise RuntimeError(
                f"TF32 is on for the model's float32 {tf32}: it rounds to a 10-bit mantissa (about 1e-3), and the "
                "ledger must reproduce each update exactly. Switch it off before training: "
                "genkernel.set_exact_cuda_mode() (or torch.backends.cudnn.allow_tf32 = False and "
                "torch.set_float32_matmul_precision('highest')), or track a float64 model"
            )
        return precision

    def _refuse_hidden_precision(self, losses: torch.Tensor) -> None:
        """An owned step on a route that takes its group gradients from a pass of its own (in the model's
        precision, not the training graph's): refuse a graph that runs in half precision all the same
        (autocast inside the model's forward: nothing before the forward showed it)."""
        precision = self._check_precision(losses, owned=True)
        if precision is not None:
            raise RuntimeError(
                f"the step's graph runs in {str(precision).removeprefix('torch.')} (autocast or a half-precision cast "
                f"inside the model's forward), but this tracker's route (group_state={self.group_state!r}) takes its "
                "group gradients from a pass of its own in the model's precision, which cannot follow that rounding: "
                "build the tracker with group_state='dense' and gradient_route='graph' (rows from the step's own "
                "graph), or run the autocast around the model (a step's autocast_dtype, a trainer's "
                "mixed_precision='bf16'), which the tracker sees before the forward"
            )

    def _check_before(self, *, owned: bool, autocast_dtype: torch.dtype | None = None) -> None:
        """Everything that can be refused before the training forward (or the observed step) changes anything."""
        self._check_precision(owned=owned, autocast_dtype=autocast_dtype)
        self._recheck_forward_couplings()
        if self.route.uses_graph():
            check_analysis_safe(self.module)
        else:
            check_per_example_safe(self.module, route=f"group_state={self.group_state!r}", found=self._forward_couplings)
        check_replicated(self.module, self.distributed)  # BatchNorm switched to training mode since binding
        self._check_parameters()
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if owned != self._optimizer_params:
            raise RuntimeError(
                "the optimizer's parameters changed since the tracker was built (optimizer.add_param_group?): the "
                "ledger cannot attribute updates of parameters it does not track. Build a new tracker after changing "
                "the optimizer"
            )
        hooks = [h for table in (self.optimizer._optimizer_step_pre_hooks, self.optimizer._optimizer_step_post_hooks)
                 for h in table.values() if not isinstance(h, _TrackerHook)]  # trackers' own hooks only read
        if hooks:
            raise RuntimeError(
                f"the optimizer has {len(hooks)} step hook(s) (register_step_pre_hook / register_step_post_hook): they may "
                "change the gradients or parameters in ways the split cannot see. Remove them while tracking"
            )
        # The model's own weights first: a model changed outside the step (a resumed run that did not load
        # it) would otherwise be reported as an EMA that moved in a way no EMA does.
        self._check_untouched()
        if self.ema is not None:
            self.ema.sync(self.ledger.steps, self._last_theta())  # the EMA's update after the previous step

    def _check_parameters(self) -> None:
        """Refuse a model whose trainable parameters are no longer the ones tracked (replaced, frozen
        or unfrozen) or moved to another dtype or device (``model.double()``, ``model.to(...)``) since
        the tracker was built: the group state, the probes and the saved θ belong to the old ones."""
        current = {name: p for name, p in self.module.named_parameters() if p.requires_grad}
        if current.keys() != self.params.keys() or any(current[n] is not p for n, p in self.params.items()):
            replaced = sorted(n for n in current.keys() | self.params.keys()
                              if current.get(n) is not self.params.get(n))
            raise RuntimeError(
                f"the model's trainable parameters changed since the tracker was built ({replaced[:5]}: replaced by new "
                "tensors, frozen or unfrozen): the optimizer and the ledger follow the old ones. Build the optimizer and "
                "a new tracker for the model as it is now"
            )
        moved = [f"{n}: {self._layout[n][0]} on {self._layout[n][1]} -> {p.dtype} on {p.device}"
                 for n, p in self.params.items() if (p.dtype, p.device) != self._layout[n]]
        if moved:
            raise RuntimeError(
                f"the model's parameters changed dtype or device since the tracker was built ({moved[:3]}): the "
                "probes, the ledger's outputs and the group state are in the old ones. Build a new tracker (and "
                "the optimizer, whose state keeps the old dtype) after moving the model"
            )

    def _save_state(self) -> dict[str, Any]:
        """What a rolled-back step restores: buffers and the optimizer's state (θ_k is saved by the caller)."""
        return {
            "buffers": [(b, b.detach().clone()) for b in self.module.buffers()],
            "optimizer": {p: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
                          for p, state in self.optimizer.state.items()},
        }

    def _restore_state(self, saved: dict[str, Any], theta_before: dict[str, torch.Tensor]) -> None:
        self.route.discard()
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(theta_before[name])
            for buffer, value in saved["buffers"]:
                buffer.copy_(value)
        for p in list(self.optimizer.state):
            if p not in saved["optimizer"]:
                del self.optimizer.state[p]
        for p, state in saved["optimizer"].items():
            self.optimizer.state[p] = state

    def _recheck_forward_couplings(self) -> None:
        """A model switched to another mode since its forward was checked (the tracker built in eval mode after an
        evaluation, trained in training mode: 17.7 % off the graph route's split, silently): its couplings found
        again in this mode (two forwards of the first probes, nothing changed), so that a batch statistic of
        training mode in plain operations takes the graph route ("auto", dense) or is refused by a per-example
        route, naming it."""
        modes = tuple(m.training for m in self.module.modules())
        if modes == self._checked_modes:
            return
        # (the draw check stays the construction's: the factored route takes its rows from the training pass's own
        # activations, exact with draws, tests/test_random_forward_review.py)
        self.coupled_forward = [] if self.random_forward else coupled_forward(self.module, self.probes)
        self._checked_modes = modes
        self._tracked.forward_couplings = tuple(self._forward_couplings)

    @property
    def _forward_couplings(self) -> list[str]:
        """What the construction's forwards found: a draw of random numbers (:func:`random_forward`) or examples
        coupled in plain operations (:func:`coupled_forward`)."""
        return self.random_forward + self.coupled_forward

    def _coupled(self) -> list[str]:
        """What couples or randomizes the examples: modules known by type (:func:`coupled_modules`, in their
        current mode) and what a forward at construction found (:attr:`_forward_couplings`)."""
        return coupled_modules(self.module) + self._forward_couplings

    def _choose_group_state(self, group_state: str, d: int, gradient_route: str = "auto") -> str:
        """The group state the tracker runs: ``group_state``, or what "auto" resolves to for outputs of size ``d``
        and the requested ``gradient_route``; ValueError for a choice the optimizer or the process rules out."""
        if group_state not in GROUP_STATES:
            raise ValueError(f"group_state must be one of {GROUP_STATES}, got {group_state!r}")
        plain = plain_sgd(self.optimizer)
        if group_state == "auto":
            # (a gradient_route asked for by name that only the dense route has, "graph" or "example", makes "auto"
            # dense: resolved to "factored" it was refused, naming a group_state the user never asked for)
            factored = (plain and self.distributed is None and d <= self.partitions.total + 1
                        and gradient_route in ("auto", "factored"))
            # (a forward that branches on its inputs' values leaves the factored route no layer factors: every
            # example through torch.func, slower than the dense route's graph)
            return "factored" if factored and not self._coupled() and not data_dependent_modules(self.module) else "dense"
        if group_state in ("factored", "sketched") and self.distributed is not None:
            raise ValueError(
                f"group_state={group_state!r} runs in one process; under DistributedDataParallel use "
                "group_state='dense'"
            )
        if group_state == "factored" and not plain:
            raise ValueError(
                f"group_state='factored' needs plain SGD (torch.optim.SGD without momentum), not "
                f"{type(self.optimizer).__name__}{' with momentum' if type(self.optimizer) is torch.optim.SGD else ''}: a momentum buffer or an adaptive optimizer's per-coordinate "
                "preconditioner mixes steps or coordinates, which the layer factors cannot carry; use "
                "group_state='dense'"
            )
        return group_state

    # -- copies ---------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> "PathKernelTracker":
        """A tracker of the copied model and optimizer that records on as this one would (``copy.deepcopy`` of a
        trainer, or of ``(model, optimizer, tracker)``: the copies made in the same call; a tracker copied alone
        takes copies of its own). What the tracker keeps by identity is taken again from the copies: the
        optimizer's parameters, the gradients its last owned step left, and its hooks (the copied optimizer's
        step hooks call the copy, and the copy counts its own loop's backward passes). Copied between steps:
        micro-batches observed for a step to come hold the loop's graph, which does not copy."""
        if self._observed is not None or self._pending_step is not None:
            raise RuntimeError(
                "a tracker cannot be copied in the middle of an observed step (micro-batches observed, the optimizer's "
                "step not yet taken): their losses hold the loop's graph. Copy it after optimizer.step()"
            )
        if self.distributed is not None:
            raise TypeError(
                "a tracker of a DistributedDataParallel model cannot be copied: every step meets the other ranks in "
                "its process group, which a copy in one process cannot join. Branch a distributed run through a "
                "checkpoint on every rank (tracker.save, then load into a tracker built for the branch)"
            )
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "_hooks"}, memo))
        if self.ema is not None and ema_callable(self.ema.read) is not None and \
                ema_callable(copied.ema.read) is ema_callable(self.ema.read):
            raise TypeError(
                "the tracker's EMA was given as a function (track_ema(callable)), which copy.deepcopy does not copy: "
                "the copy's EMA ledger would read the original run's EMA. Track the EMA object itself (diffusers' "
                "EMAModel, ema-pytorch's EMA, AveragedModel, the averaged module) to copy the tracker"
            )
        # 1. What the original kept by id() names the original's tensors.
        copied._optimizer_params = {id(p) for group in copied.optimizer.param_groups for p in group["params"]}
        if self._grad_marks is not None:  # a gradient left as the last owned step left it stays so in the copy (a
            # Parameter's deep copy drops .grad: then no mark matters, the copy's check reads its gradients only)
            copied._grad_marks = {}
            for name, mark in self._grad_marks.items():
                grad, twin = self.params[name].grad, copied.params[name].grad
                same = grad is not None and twin is not None and mark == (id(grad), grad._version)
                copied._grad_marks[name] = (id(twin), twin._version) if same else mark
        # 2. Hooks: a copied optimizer has none (torch's Optimizer copies its state and groups alone; one that
        # copied its hooks would hold this tracker's, inert there: _TrackerHook), and a tensor's hooks are not
        # copied with it: the copy sets its own.
        copied._hooks = []
        if not self._closed:
            for table in (copied.optimizer._optimizer_step_pre_hooks, copied.optimizer._optimizer_step_post_hooks):
                for key in [k for k, h in table.items() if isinstance(h, _TrackerHook) and h.tracker_ref() is self]:
                    del table[key]
            this = weakref.ref(copied)
            copied._hooks = [
                copied.optimizer.register_step_pre_hook(_TrackerHook(this, "_before_observed_step")),
                copied.optimizer.register_step_post_hook(_TrackerHook(this, "_after_observed_step")),
            ]
            copied._accumulation_hooks = False
            if self._accumulation_hooks:
                copied._follow_accumulation()
        return copied

    def __reduce_ex__(self, protocol):
        """Refused (pickle, ``torch.save`` of the object, ``copy.copy``): a tracker holds its model, optimizer,
        hooks and weak references, and a shallow copy would share its ledgers with the original."""
        raise TypeError(
            "a PathKernelTracker is not pickled or shallow-copied: save its state with tracker.save(path) (or an "
            "analyzer's save(path)) and load it into a tracker built on the same model and optimizer; copy.deepcopy "
            "gives an independent copy of a run"
        )

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Ledgers, per-group optimizer state and the last parameters (for the outside-change check)."""
        self._check_consistent()  # never save a state the ledgers do not describe
        self._hear()  # (the listeners a step owes, before a state is written: the state holds none owed)
        return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "ledgers": {name: ledger.state_dict() for name, ledger in self.ledgers.items()},
            "splitter": self.splitter.state_dict(),
            "route": self.route.state_dict(),
            # The structurally null parameters the route found, per set of module modes (routes.GroupStateRoute
            # ._refresh_null): found once, at the first step that asked, with the parameters of then. A resumed
            # tracker without them searched again at its first step, with later parameters: a parameter found null at
            # step 1 (a layer behind a nearly zero one) and not at the resume had its update booked to the groups
            # where the uninterrupted run booked it to the rest (null_moves), the ledgers no longer bit for bit.
            "null_found": [[list(modes), sorted(names)] for modes, names in self.route._null_found.items()],
            "f_prev": self._f_prev.clone(),
            "theta_after": None if self._theta_after is None else {k: v.clone() for k, v in self._theta_after.items()},
            "buffers_after": None if self._buffers_after is None else {k: v.clone() for k, v in self._buffers_after.items()},
            "partitions": self.partitions.state_dict(),
            "quadrature": self.rule.name,
            "group_state": self.group_state,
            "identity": self._identity(),
            "gradient_scales": list(self.gradient_scales), "skipped_steps": list(self.skipped_steps),
            "observations": self._observations,
            "ema": None if self.ema is None else self.ema.state_dict(),
            # the dtype of the group state kept in "splitter": loaded into a tracker of the other state_dtype, it
            # would go on in the saved dtype (SGD's momentum) or fail at the next step (Adam's lerp of mixed dtypes)
            "state_dtype": str(self._tracked.state_dtype).replace("torch.", ""),
            # the first recorded step's (B, K), for the cost estimate of a tracker resumed from this state
            "cost_first_step": self._first_step if self._first_step is not None else self._saved_first_step,
        }

    def _identity(self) -> dict[str, Any]:
        """What a saved state belongs to: the probes (shapes, dtypes and a digest of their values),
        the model's trainable parameters (names and shapes) and the optimizer's kind."""
        return {
            "probes": probe_identity(self.probes),
            "parameters": {name: tuple(p.shape) for name, p in self.params.items()},
            "optimizer": type(self.optimizer).__name__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a PathKernelTracker state (made by tracker.state_dict())")
        state = to_device(state, next(iter(self.params.values())).device)
        if state.get("group_state") == "dense" and self.group_state != "dense" \
                and self._requested["group_state"] == "auto" and not self.ledger.steps:
            # an observed loop (or track_ema) switched "auto" to the dense route; this fresh tracker resolved
            # "auto" again (plain SGD: "factored") and would refuse the state as another set-up
            self._need_dense("a state saved with the dense group state")
        settings = saved_tracker_settings(state)
        saved = (settings["partitions"], settings["quadrature"], settings["group_state"])
        mine = (self.partitions.state_dict(), self.rule.name, self.group_state)
        if saved != mine:
            raise ValueError(
                f"the saved tracker had partitions={saved[0]}, quadrature={saved[1]!r}, group_state={saved[2]!r}; "
                f"this one has partitions={mine[0]}, quadrature={mine[1]!r}, group_state={mine[2]!r}"
            )
        saved_dtype, my_dtype = settings["state_dtype"], str(self._tracked.state_dtype).replace("torch.", "")
        if saved_dtype is not None and saved_dtype != my_dtype:
            raise ValueError(
                f"the saved tracker kept its group state in {saved_dtype}, this one in {my_dtype}: build it with "
                f"state_dtype=torch.{saved_dtype}, as the saved run was built"
            )
        differences = _differences(state["identity"], self._identity())
        if differences:
            raise ValueError(
                "the saved tracker state belongs to another set-up: " + "; ".join(differences)
                + ". Load it into a tracker built with the same probes, model and optimizer"
            )
        if (state["ema"] is None) != (self.ema is None):
            saved_has = state["ema"] is not None
            raise ValueError(
                f"the saved tracker {'keeps an' if saved_has else 'keeps no'} EMA ledger and this one "
                f"{'does not' if saved_has else 'does'}: call track_ema(ema) on both or on neither before loading "
                "(an analyzer in your loop: bind(..., ema=) as the saved run did; attached to a trainer with ema=: "
                f"build it with ema_ledger='{'trainer' if saved_has else 'none'}', as the saved run's was)"
            )
        # All or nothing: a state refused half-way (another sketch, a damaged entry) leaves this
        # tracker as it was, not with saved ledgers over fresh group state.
        previous = self._state()
        try:
            self._load(state)
        except BaseException as error:
            self._load(to_device(previous, next(iter(self.params.values())).device))
            if isinstance(error, (KeyError, TypeError)):
                raise ValueError(f"the saved tracker state is damaged or incomplete ({type(error).__name__}: {error}); "
                                 "this tracker is left as it was: load a state written by tracker.save") from error
            raise

    def _load(self, state: dict[str, Any]) -> None:
        """Set every part of the tracker from a checked :meth:`state_dict` (the route first: it
        refuses another sketch before anything changes)."""
        self.route.load_state_dict(state["route"])
        found = state.get("null_found")  # (None in a state saved before it was kept: searched again at the next step)
        self.route._null_found = {} if found is None else {
            tuple(bool(m) for m in modes): frozenset(names) for modes, names in found}
        self.splitter.load_state_dict(state["splitter"])
        self.ledgers = {name: PathKernelLedger.from_state_dict(s) for name, s in state["ledgers"].items()}
        self._f_prev = state["f_prev"].clone()
        self._theta_after = state["theta_after"]
        self._buffers_after = state.get("buffers_after")  # (None in a state saved before it was kept: the live ones)
        self.gradient_scales = list(state["gradient_scales"])
        self.skipped_steps = list(state.get("skipped_steps", []))
        # Observation numbers never repeat in one tracker (an analyzer's mirrors are keyed by them).
        self._observations = max(self._observations, int(state.get("observations", 0)))
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self._grad_marks = None
        # A loaded state replaces whatever a failed step left: the caller loads the model and optimizer beside it.
        self._broken, self._pending_step = None, None
        self._unheard = None  # (the listeners of the replaced run's last step: its analyzer loads its own counts)
        # Micro-batches observed before the load belong to the run the state replaces (a state holds none): kept,
        # they came back as a skipped step or a dropped micro-batch of the loaded run's next step.
        self._observed = None
        first = state.get("cost_first_step")  # (None: saved before its first step, or before it was kept)
        self._saved_first_step = None if first is None else (int(first[0]), int(first[1]))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tracker state atomically (temporary file, then rename)."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save` (the model and optimizer are restored by the caller)."""
        self.load_state_dict(load_state(path, FORMAT))

    # -- internals ------------------------------------------------------------------------------
    def _probe_outputs(self) -> torch.Tensor:
        """``[M, d]`` float64 outputs at the probes; callers run it inside :func:`analysis_mode`."""
        return checked_forward(self.module, self.probes, name="probes").to(torch.float64)

    def _last_theta(self) -> dict[str, torch.Tensor]:
        """θ after the last tracked step (where the tracker was built, before any): what the ledger ends at
        and the EMA moved towards, whatever has been written into the model since."""
        if self._theta_after is None:  # (a state saved without it)
            return {n: p.detach() for n, p in self.params.items()}
        return self._theta_after

    def _copy_buffers(self) -> dict[str, torch.Tensor] | None:
        buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
        return buffers or None

    @contextlib.contextmanager
    def at_last_step(self) -> Iterator[nn.Module]:
        """The tracked module holding, inside the block, the parameters and buffers the ledger ends at
        (after the last tracked step, or where the tracker was built), its own put back afterwards bit
        for bit. An EMA copied into the model once training ends (diffusers' scripts before saving,
        Lightning's ``WeightAveraging``, its averaged BatchNorm statistics too) would otherwise put the
        EMA's weights where the ledger's last θ belongs. Only the tensors that differ are copied: a deep
        copy of the module would also copy whatever its attributes hold (a LightningModule's analyzer,
        with the tracker's group state)."""
        theta, buffers = self._last_theta(), self._buffers_after or {}
        live_buffers = dict(self.module.named_buffers())
        swaps = [(p, theta[n]) for n, p in self.params.items() if not torch.equal(p.detach(), theta[n].to(p.device))]
        swaps += [(live_buffers[n], b) for n, b in buffers.items()
                  if n in live_buffers and not torch.equal(live_buffers[n].detach(), b.to(live_buffers[n].device))]
        kept = [t.detach().clone() for t, _ in swaps]
        try:
            with torch.no_grad():
                for t, value in swaps:
                    t.copy_(value)
            yield self.module
        finally:
            with torch.no_grad():
                for (t, _), value in zip(swaps, kept):
                    t.copy_(value)

    def _check_untouched(self) -> None:
        if self._theta_after is not None:
            changed = [n for n, p in self.params.items() if not torch.equal(p.detach(), self._theta_after[n].to(p.device))]
            if changed and not self.ledger.steps:
                raise RuntimeError(
                    f"parameters {changed[:5]} changed since the tracker was built, before its first step (untracked "
                    "training: an optimizer.step() with no tracker.observe(per_example_losses, groups) before its "
                    "backward, or another tracker's or analyzer's step on this optimizer; a warm-up; a checkpoint loaded "
                    "into the model): its ledger starts at the outputs it saw when built, so that change would land in "
                    "the residual. Observe every step from the first, or build the tracker when tracking starts, after "
                    "the warm-up or the load"
                )
            if changed:
                raise RuntimeError(
                    f"parameters {changed[:5]} changed outside the tracked optimizer step (an EMA written into "
                    "the model, a manual edit, a second optimizer, or a resumed run whose model was not loaded from "
                    "the checkpoint the tracker's state came from): the ledger cannot attribute that change. "
                    "Make every update through tracker.step, or start a new tracker after the change; when "
                    "resuming, load the model's weights from the same checkpoint."
                )
        if self._grad_marks is not None:
            # (a gradient zeroed in place, optimizer.zero_grad(set_to_none=False) or a logged backward zeroed after,
            # is what the step's own backward starts from: nothing accumulated, nothing dropped)
            touched = [
                n for n, p in self.params.items()
                if p.grad is not None and self._grad_marks.get(n) != (id(p.grad), p.grad._version)
                and bool(p.grad.any())
            ]
            if touched:
                raise RuntimeError(
                    f"gradients of {touched[:5]} were accumulated outside tracker.step (gradient accumulation is "
                    "not supported): pass the whole accumulated batch to one tracker.step, with weights= for the "
                    "per-example coefficients"
                )

    def _check_separate_losses(self, losses: torch.Tensor, outputs: torch.Tensor | None) -> None:
        """Refuse a loss that couples examples on a per-example route.

        The per-example routes (gradient_route "example"/"factored", group_state "factored" and
        "sketched") read each example's gradient from its own rows of the forward pass: exact when
        ℓ_n reads example n's outputs only. A loss that mixes the batch (centred on the batch's mean
        output, contrastive, a discriminator with batch statistics inside ``loss_fn``) makes them
        attribute every ∂ℓ_m/∂out_n to example n instead of to m: the totals still agree, the groups
        do not. The test needs no batch layout: with J = ∂losses/∂outputs ``[B, E]`` and any
        weights a_n, every column of a separable J has one nonzero row, so
        (a²ᵀJ) ⊙ (1ᵀJ) = (aᵀJ)² elementwise; with two examples in a column and distinct a_n it fails
        (Cauchy–Schwarz). Three backward passes through the loss only (``retain_graph``).
        """
        if outputs is None or not outputs.requires_grad or losses.shape[0] < 2:
            return
        a = torch.rand(losses.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64).add_(0.5)
        a = a.to(device=losses.device, dtype=losses.dtype)
        parts = []
        for weights in (torch.ones_like(a), a, a * a):
            (grad,) = torch.autograd.grad(losses, outputs, weights, retain_graph=True, allow_unused=True)
            if grad is None:
                return
            parts.append(grad.to(torch.float64))
        ones, first, second = parts
        lhs, rhs = second * ones, first * first
        tolerance = 1e3 * torch.finfo(outputs.dtype).eps if outputs.is_floating_point() else 1e-10
        gap = norm_of(lhs - rhs)  # (norm_of: squares formed directly overflowed past 1e154, and inf > inf is False)
        if gap > tolerance * (norm_of(lhs) + norm_of(rhs)):
            raise ValueError(
                f"loss_fn couples the examples of a batch (an example's loss depends on other examples' outputs: a "
                f"batch mean, a contrastive term, batch statistics inside the loss), so the per-example route of "
                f"group_state={self.group_state!r} would give each example the gradients of other examples' "
                "losses. Build the tracker with group_state='dense', gradient_route='graph' (group gradients from "
                "the batch's own graph: exact for such losses)"
            )

    def _check_gradients(self, index: int, gradients, losses: torch.Tensor, gradient_rtol: float,
                         witnesses: list[dict[str, torch.Tensor]],
                         rounding_norms: Callable[[], dict[str, float]]) -> dict[str, dict[str, torch.Tensor]]:
        """Check step 1 against training (the groups' sum against the real gradient to ``gradient_rtol``
        of the magnitudes, plus, for a parameter past that, :data:`ROUNDING_ALLOWANCE` times the rounding
        its own backward shows: ``rounding_norms()``, read only then, tracking.rounding); returns every
        partition's rounding gap ``{partition: {name: real gradient − Σ_g ĝ_g}}``."""
        loss_tolerance = max(self.rtol, 1e-6) * 10
        scale = float(losses.abs().max()) if losses.numel() else 0.0
        analysis_losses = gradients.losses.to(losses)
        if not torch.allclose(analysis_losses, losses, rtol=loss_tolerance, atol=loss_tolerance * scale):
            gap = float((analysis_losses - losses).abs().max())
            raise LedgerCheckError(
                f"step {index}: the per-example analysis forward does not reproduce the training losses (max gap "
                f"{gap:.3e}); the model's output must depend only on its own example and parameters"
            )
        partitions = self.route.splitter_partitions
        real, scales = {}, {}
        for name, p in self.params.items():
            real[name] = torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.to(torch.float64, copy=True)
            scales[name] = norm_of(real[name]) + gradients.sizes[name]  # (norm_of: squares past 1e154 gave inf)
        rounding = {partition: {name: real[name] - gradients.grads[name][part].sum(dim=0) for name in self.params}
                    for partition, part in partitions.slices.items()}
        # A parameter whose true gradient is zero (a bias before a normalization) carries pure
        # rounding noise on both sides: compare it with rounding of the whole gradient too.
        # (the least precise floating dtype's eps, frozen parameters' too: a float64 first parameter's would hold a
        # float32 one's noise to 1e-16)
        eps = max(torch.finfo(dtype).eps for dtype in self._check_dtypes)
        floor = 16 * eps * math.hypot(*scales.values())
        if gradient_rtol > self.rtol and any(self._witnessed(real, w) for w in witnesses):
            return rounding
        measured: dict[str, float] | None = None
        for partition, part in partitions.slices.items():
            for name in self.params:
                gap = norm_of(rounding[partition][name])
                allowed = gradient_rtol * scales[name] + floor
                if gap > allowed:
                    measured = rounding_norms() if measured is None else measured
                    allowed += ROUNDING_ALLOWANCE * measured.get(name, 0.0)
                if gap > allowed:
                    where = "" if len(partitions) == 1 else f" of partition '{partition}'"
                    hint = "" if not self._observing else (
                        ": in an observed loop the optimizer's gradient must be one scalar times the observed sum "
                        "Σ_n c_n ∇ℓ_n over the step's micro-batches (c_n = 1/B of its micro-batch unless observe() "
                        "was given weights=). A loss weighted otherwise (losses.sum() over micro-batches of unequal "
                        "sizes, per-example weights, an added term such as a penalty on the weights) cannot be split: "
                        "pass the loss's own per-example coefficients to observe(losses, groups, weights=). Gradients "
                        "changed elementwise after the backward (torch.nn.utils.clip_grad_value_, a gradient hook) "
                        "are no scalar times that sum either: clip by the global norm (clip_grad_norm_) instead. "
                        "Gradients left over from an earlier backward that raised half-way or was never stepped on add "
                        "in too, and a micro-batch observed whose backward then raised adds nothing: zero the "
                        "gradients (optimizer.zero_grad()) before each step's first backward and observe the step's "
                        "micro-batches again")
                    rows = real[name] - rounding[partition][name]
                    if any(bool(((w[name] == 0) & (rows != 0)).any()) for w in witnesses):
                        # The step's own backward (the witness) gave exact zeros where the groups' rows, taken with
                        # the losses scaled up, are not: its half-precision gradients underflowed.
                        hint += ("; the step's own backward gave exact zeros where the groups' gradients are not: its "
                                 "gradients underflowed in the half precision of its forward (float16 without a "
                                 "GradScaler flushes values under 6e-8 to zero). Train in bfloat16 (mixed_precision="
                                 "'bf16', autocast_dtype=torch.bfloat16), or scale the loss (mixed_precision='fp16' "
                                 "runs a GradScaler; a loop you observe may run one)")
                    own = "" if not measured else f", its own backward's rounding {measured.get(name, 0.0):.3e}"
                    raise LedgerCheckError(
                        f"step {index}: the group gradients{where} of '{name}' do not add up to the real gradient "
                        f"(gap {gap:.3e}, scale {scales[name]:.3e}{own}){hint}"
                    )
        return rounding

    def _witnessed(self, real, witness) -> bool:
        """Whether a half-precision step's real gradient is one scalar β times the witness (the
        micro-batches' own backward passes, Σ_m ∇ Σ_n c_n ℓ_n, rounded as the loop's: equal bit for bit
        in a loop that seeds its backward with c_n times one power of two per step, clipping by the
        global norm after it; for a loop seeding λ c_n with λ no power of two, loss / 3 over 3
        micro-batches, each micro-batch's backward with the loop's own seed divided by its λ,
        :meth:`_take_seeded_witness`, to 1.2e-7) to the model dtype's tolerance. Then the loop weighted
        its examples as observed (to 1e-5, not to the precision's eps), and what the groups (masked
        passes through the same graph) do not add up to is the precision's rounding, however many times
        the model's kernels round an entry (a CPU LayerNorm's weight gradient under autocast): the
        step's rounding row, left in the residual. Otherwise (a loop weighing its micro-batches
        unequally, a term beside the observed losses, a witness lost) the per-parameter check against
        the groups decides, at the precision's eps."""
        dot = norm = real_norm = 0.0
        for name in self.params:
            w = witness[name]
            dot += float((real[name] * w).sum())
            norm += float((w * w).sum())
            real_norm += float((real[name] * real[name]).sum())
        if norm == 0.0 or real_norm == 0.0 or not math.isfinite(dot):
            return False
        beta = dot / norm
        gap = sum(float(((real[name] - beta * witness[name]) ** 2).sum()) for name in self.params)
        return math.sqrt(gap) <= self.rtol * math.sqrt(real_norm)

    def _check_updates(self, index, updates, theta_before, theta_after) -> None:
        """Step 4: every partition's rows (its groups, the rest and its rounding row) add up to the
        optimizer's real step Δ_k, elementwise, to ``rtol`` of the magnitudes summed plus one
        rounding of θ_{k+1} (ε|θ_{k+1}|, at least one ulp). Raises LedgerCheckError."""
        self.splitter.check_state(self.rtol)
        partitions = self.route.splitter_partitions
        rest = partitions.total
        layout = {partition: (part, [rest, self.splitter.rounding_rows[partition]])
                  for partition, part in partitions.slices.items()}
        for name, u in updates.items():
            before, after = theta_before[name].reshape(-1), theta_after[name].reshape(-1)
            info = torch.finfo(after.dtype)

            def reference(columns, delta, rounding_floor, spare, before=before, after=after, info=info):
                after64 = spare.copy_(after[columns])
                torch.sub(after64, before[columns], out=delta)  # exact in float64 for float32 or float64 parameters
                # The optimizer's write of θ_{k+1} rounds by at most half an ulp of it; ε|x| (plus the
                # subnormal spacing) is at least one ulp everywhere.
                torch.abs(after64, out=rounding_floor).mul_(info.eps).add_(info.tiny * info.eps)

            # (the optimizer's own state rounding, splitters.py, widens the scale)
            worst = largest_excess(u, layout, reference, self.rtol, self._check_scratch,
                                   extra_scale=self.splitter.rounding_scale.get(name))
            for partition, excess in worst.items():
                # (not "excess > 0": NaN compares false, and a step that made θ inf or NaN gives NaN here)
                if not excess <= 0:
                    if not bool(torch.isfinite(after).all()):
                        raise NonFiniteError(
                            f"step {index}: parameter '{name}' is non-finite (inf or NaN) after the optimizer's step "
                            "(from finite gradients: a learning rate or step size that is inf or NaN, or an update that "
                            "overflows the parameters' dtype); the step is rolled back. Lower the learning rate, or check the "
                            "optimizer's hyperparameters"
                        )
                    where = "" if len(partitions) == 1 else f" (partition '{partition}')"
                    raise LedgerCheckError(
                        f"step {index}: the split update of '{name}'{where} does not add up to the optimizer's real "
                        f"step (excess gap {excess:.3e}); was the optimizer's state or hyperparameters "
                        "changed in a way the tracker cannot see?"
                    )

    def _nodes(self, theta_before, theta_after) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """(w_q, θ_k + s_q Δ_k) for the quadrature rule's nodes, in the parameters' dtype (within an
        ulp of the exact node: rounding, like every other evaluation in that dtype)."""
        nodes = []
        for node, weight in zip(self.rule.nodes, self.rule.weights):
            if node == 0.0:
                theta = theta_before
            elif node == 1.0:
                theta = theta_after
            else:
                theta = {n: torch.lerp(b, theta_after[n], node) for n, b in theta_before.items()}
            nodes.append((weight, theta))
        return nodes


class _TrackerHook:
    """An optimizer step hook that calls ``method`` of the tracker behind a weak reference (nothing
    once it is gone, nor when another optimizer calls it: a copy of the tracker's that kept its
    hooks); trackers recognize each other's hooks by this type."""

    def __init__(self, tracker_ref, method: str):
        self.tracker_ref, self.method = tracker_ref, method

    def __call__(self, optimizer, *args):
        tracker = self.tracker_ref()
        if tracker is None or optimizer is not tracker.optimizer:  # (a copy of the optimizer: not the tracker's)
            return None
        return getattr(tracker, self.method)(optimizer, *args)


CHECK_ELEMENTS = 1 << 22  # float64 values the seedless check converts at a time (32 MiB)


def _sine_squared(a: torch.Tensor, b: torch.Tensor) -> float:
    """sin² of the angle between two flat vectors, from the residual of a's projection on b: exact to the
    rounding of the residual, where 1 − cos² carries cos's own rounding (a few ε: exactly parallel float64
    gradients gave 1 − cos² ≈ 4e-16, past the (100 rtol)² = 1e-16 that the parallel test allows)."""
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    na, nb = norm_of(a), norm_of(b)
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):  # (na · nb overflowed past 1e154)
        return 1.0
    unit_a, unit_b = a / na, b / nb
    return float((unit_a - (unit_a @ unit_b) * unit_b).norm()) ** 2


def _digest(t: torch.Tensor) -> str:
    """A short SHA-256 of a tensor's values (bytes of its CPU copy)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def probe_identity(probes: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], str, str]]:
    """``[(shape, dtype, digest)]`` of each probe tensor: what a saved state records of its probes (``identity``),
    the digest a SHA-256 of the values' bytes (:func:`_digest`: the same on any device)."""
    return [(tuple(t.shape), str(t.dtype), _digest(t)) for t in probes]


def saved_tracker_settings(state: dict[str, Any]) -> dict[str, Any]:
    """What a saved tracker state (:meth:`PathKernelTracker.state_dict`) was built with, as its load compares it with
    the tracker it is loaded into, for a caller that checks a state before building that tracker (an analyzer
    loaded before its trackers are built). Returns ``{"partitions": {name: G}, "quadrature": rule name,
    "group_state": route, "state_dtype": "float64" / "float32" or None (:func:`_saved_state_dtype`), "sketch":
    (k, seed, kind) of a sketched route's projection or None, "probes": [(shape, dtype, digest)]
    (:func:`probe_identity`), "optimizer": class name, "ema": whether it keeps an EMA ledger}``."""
    route = state.get("route")
    sketch = None
    if state.get("group_state") == "sketched" and isinstance(route, dict) and "k" in route:
        sketch = (int(route["k"]), int(route["seed"]), str(route["kind"]))
    identity = state.get("identity") or {}
    return {
        "partitions": state["partitions"], "quadrature": state["quadrature"], "group_state": state["group_state"],
        "state_dtype": _saved_state_dtype(state), "sketch": sketch,
        "probes": [(tuple(shape), str(dtype), str(digest)) for shape, dtype, digest in identity.get("probes", [])],
        "optimizer": identity.get("optimizer"), "ema": state.get("ema") is not None,
    }


def _saved_state_dtype(state: dict[str, Any]) -> str | None:
    """The group state's dtype of a saved dense tracker state ("float64" / "float32"): its ``state_dtype`` entry, or
    for a state saved before it was kept, the dtype of the splitter's saved rows; None where nothing tells (no group
    state kept yet) or it does not matter (the sketched route keeps float64 sketches, the factored one no state)."""
    if state.get("group_state") != "dense":
        return None
    if state.get("state_dtype") is not None:
        return str(state["state_dtype"])
    splitter = state.get("splitter")
    rows = splitter.get("state") if isinstance(splitter, dict) else None
    for entries in (rows or {}).values():
        for value in (entries or {}).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return str(value.dtype).replace("torch.", "")
    return None


def _differences(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """What differs between a saved set-up and this one, in words."""
    out = []
    if saved["optimizer"] != mine["optimizer"]:
        out.append(f"the optimizer was {saved['optimizer']}, here {mine['optimizer']}")
    old, new = saved["parameters"], mine["parameters"]
    if old != new:
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        reshaped = sorted(n for n in set(old) & set(new) if tuple(old[n]) != tuple(new[n]))
        out.append(f"the model's trainable parameters differ (saved only: {missing[:5]}, here only: {extra[:5]}, "
                   f"other shapes: {reshaped[:5]})")
    old_probes, new_probes = saved["probes"], mine["probes"]
    if [(tuple(a), b) for a, b, _ in old_probes] != [(tuple(a), b) for a, b, _ in new_probes]:
        out.append(f"the probes had shapes/dtypes {[(tuple(a), b) for a, b, _ in old_probes]}, here "
                   f"{[(tuple(a), b) for a, b, _ in new_probes]}")
    elif [c for _, _, c in old_probes] != [c for _, _, c in new_probes]:
        out.append("the probes have the same shapes but other values")
    return out


__all__ = ["GROUP_STATES", "PathKernelTracker", "StepContributions"]
