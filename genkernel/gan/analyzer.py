"""GANKernelAnalyzer: the generator's exact path-kernel ledger split by discriminator gradient geometry.

docs/gan.md. For a generator step with latents z_i and weights w_i = ∇_x ℓ_G(D(x)) at
x = G(z_i), the change of the generator at a probe latent z' is, exactly up to the measured residual,

    ΔG(z') = Σ_g C(z', g) + C_rest(z') + R(z'),   C(z', g) = Σ_k J̄_k(z') u_{k,g},

and for one plain SGD step u_{k,g} = −η Σ_{i∈g} c_i J_G(z_i)ᵀ w_i, i.e. ΔG(z') ≈ −(η/B) Σ_i K_G(z', z_i) w_i:
a kernel-smoothed field of discriminator input gradients. Groups g follow the discriminator's
geometry (:mod:`genkernel.gan.geometry`). The discriminator keeps its own ledger at fixed probe
points, grouped into generated / real / gradient-penalty examples (and by mode for mixtures).

Per generator step, owned (:meth:`GANKernelAnalyzer._generator_step`) or observed
(:meth:`GANKernelAnalyzer.observe_generator`) alike:

1. w_i, G(z_i), D(G(z_i)) at θ_k as training sees them: observed, w_i comes from the user's own graph
   (``torch.autograd.grad(losses.sum(), samples)``), so BatchNorm batch statistics (in G and D) and
   dropout masks are training's; owned, from a pass in the networks' current modes before the
   training forward (buffers written back, RNG forked: the same values training is about to use; a
   step in micro-batches, one pass per micro-batch in training's order, concatenated);
2. group ids from the geometry grouping (fitted once, on the first batch together with the probes,
   and then kept fixed), and, for each of the ``controls`` control partitions, label-permuted ids on
   the *same* step: the tracker splits the geometry partition and every control partition at once,
   each into its own exact ledger;
3. at evaluation steps, the probes' own geometry (w(z'), group) and the plain kernel-smoothed
   field −J_G(z'; θ_k) Σ_i c_i J_G(z_i; θ_k)ᵀ w_i (the pulled-back vector from training's batch, one
   JVP at the probes: K_G is never formed);
4. the real step, recorded by the core tracker (exact split, check, contributions, fresh forward);
5. bookkeeping in the tracker's listener, shared by owned and observed steps: windows are
   differences of the ledgers between their first and last step (:meth:`PathKernelLedger.since`);
   alignment cosines of the step's actual ΔG(z'), mode coverage, the loop's step numbers.

**What the coupling claims read** (``windows[i]["statistics"]``, :func:`partition_statistics`). Own-group
share minus a permutation control is confounded by source-group strength (a group that pushes every
probe hard makes its whole column of the coupling matrix large), so each window also reports the
*interaction statistic*: a probe's share from its own group minus the other probe groups' mean share
from that same group, minus the same under the controls. Intervals are clustered by probe group
(probes in one group share their column: 64 probes in 2 groups are about 2 units, and fewer than 3
units never count as held). With ``comparison=`` a discriminator-independent grouping of the same size
(nearest mode, k-means of z) is split on the same steps with its own controls, and each window reports
geometry minus spatial: coupling that G's smoothness alone produces is not credited to D. A null model
(G trained on a loss that ignores D, ``geometry_loss=GeneratorLoss(D)``) shows what the statistics
give when G does not depend on D.

**Examples D is flat at.** A training example with w_i = 0 exactly (a saturated or dead-ReLU D) has no
direction: under ``"direction"`` and ``"mode"`` its group is the grouping's tie-break (the centre nearest the
origin, mode 0), which the geometry does not give. Its ledger rows stay there (zero for the training loss),
but the group counts (``g_group_counts``, a window's ``training_group_counts`` and occupancy) leave it out and
count it apart (``g_zero_counts``, ``training_zero_gradient``, the report's ``zero_gradient_total`` and a note).
A *probe* with w = 0 when the probes are grouped has no group either: the coupling statistics leave it out
(NaN per probe; not in the matrices, intervals or occupied count) and count it (``probe_zero_gradient``, a note).

**Analysis never changes D.** Every analysis pass through D (geometry of a batch or of the probes,
the loss check) runs in D's current mode with all its buffers (BatchNorm's running statistics,
spectral norm's u, v) saved and written back, and the RNG forked (:mod:`genkernel.gan.passes`);
after the training forward (observed loops) spectral norm reads the u, v that forward left rather
than iterating again, so the pass uses the very weight training used. D's parameters and buffers
compare ``torch.equal`` before and after every verb of this class.

Use it as a :class:`TrainerCallback` of :class:`GANTrainer`, observing your own loop::

    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(64, nz, 1, 1))
    analyzer.bind(g_optimizer, d_optimizer, ema=None, start_step=0)
    for real in loader:
        # discriminator step
        fake = G(torch.randn(b, nz, 1, 1))
        x = torch.cat([real, fake.detach()]); roles = torch.cat([ones, zeros]).long()   # 1 real, 0 generated
        d_losses = F.binary_cross_entropy_with_logits(D(x).view(-1), roles.float(), reduction="none")
        analyzer.observe_discriminator(d_losses, roles, x)              # added
        d_optimizer.zero_grad(); d_losses.mean().backward(); d_optimizer.step()
        # generator step
        z = torch.randn(b, nz, 1, 1); fake = G(z)
        g_losses = F.binary_cross_entropy_with_logits(D(fake).view(-1), ones, reduction="none")
        analyzer.observe_generator(g_losses, z, fake)                   # added
        g_optimizer.zero_grad(); g_losses.mean().backward(); g_optimizer.step()
    analyzer.finish(); analyzer.report()

A class-conditional GAN, G(z, y) and D(x, y), is first-class: pass the probes' classes
(``probe_classes=``, a ``LongTensor[M]``, and ``num_classes=``). The ledger is then G's change at
(z'_m, y'_m), the geometry w_i = ∇_x ℓ_G(D(x, y_i)) at x = G(z_i, y_i) uses each example's own class,
``grouping="class"`` splits the steps by class, and the trainer's steps carry their classes
(``GANTrainer(..., labels=, num_classes=)``); your loop passes them by name
(``observe_generator(..., classes=y)``, ``observe_discriminator(..., classes=y)``).

A :class:`GANTrainer` with ``augment=`` (DiffAugment) is followed exactly: each row's augmentation parameters
ride in its step (the critic D∘T's inputs, the generator step's targets), so every re-evaluation sees
training's augmentation. Its geometry (the batch's groups, the probes' w, the field) is the un-augmented D's,
w = ∇_x ℓ_G(D(x)) (the step's ``AugmentedGeneratorLoss.geometry``; ``geometry_loss=`` overrides it), as an
observed DiffAugment loop's with ``geometry_loss=GeneratorLoss(D)``, and D's probes are read at the identity
augmentation, where D∘T is D.

or performing prepared steps yourself::

    step = OptimizerStep(G, g_opt, GeneratorLoss(D), z, phase="generator")
    with frozen(D):                       # D's parameters frozen, modules keep their mode
        analyzer.perform(step)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from ..core import grouping as grouping_layer
from ..core.adapter import (
    analysis_mode, call_with, explained_torch_func_errors, floating_parameter, forked_generators, full_precision,
    like_parameter, loop_precision, not_fitting_inputs, output_tensor, positive_int, preserved_buffers, seed_bits,
    seeded_generator, trainable_parameters, unwrap, unwrap_optimizer,
)
from ..core.cost import GiB, CostEstimate, hooked_forward_counts, ledger_bytes, with_analysis_passes
from ..core.param_bytes import parameter_bytes, value_bytes
from ..core.errors import NonFiniteError
from ..core.tracking.callbacks import TrainerCallback, perform_step
from ..core.tracking.distributed import (StepAgreement, averaged_over_ranks, ddp_group, gathered_over_ranks,
                                         summed_over_ranks)
from ..core.tracking.ema import EMA_LEDGERS, ema_update_count
from ..core.tracking.io import (atomic_save, check_saved_settings, jsonable, load_state, refuse_tracker_settings,
                                to_device)
from ..core.tracking.ledger import PathKernelLedger
from ..core.tracking.owed import OwedRecord, make_owed
from ..core.tracking.quadrature import residual_remedy
from ..core.tracking.step import OptimizerStep, micro_batch_rows
from ..core.tracking.tracker import (
    MEMORY_CHECKS, MIXED_PRECISION, REPEATABLE_LISTENER, PathKernelTracker, StepContributions, probe_identity,
    saved_tracker_settings, step_payloads,
)
from ..logging import LoggingCallback
from ..stats import MIN_PROBE_GROUPS, mean_interval, nan_median, two_way_interval
from .geometry import (ClassGroups, DirectionGroups, GeometryGrouping, ModeGroups, NearestModeGroups, make_grouping,
                       refuse_other_count)
from .losses import (
    GENERATED, PENALTY, REAL, ROLE_NAMES, AugmentedDiscriminatorObjective, AugmentedGeneratorLoss, DiscriminatorObjective,
    GeneratorLoss, check_classes, class_inputs, scores_of,
)
from .metrics import check_coverage, cosine, few_units, mode_coverage, own_minus_others
from .passes import classes_taken, power_iteration_modules, preserved

GEOMETRY = "geometry"
SPATIAL = "spatial"
KINDS = ("traffic", "net")
FORMAT = "genkernel.GANKernelAnalyzer/3"
RESIDUAL_NOTE = 1e-3  # a ledger's relative residual above this gets a note suggesting Simpson's rule
# What a memory refusal may ask of this analyzer's user: its trackers' routes are fixed (the generator's
# group gradients come from the training graph).
GAN_COST_OPTIONS = ("groups", "state_dtype", "probes", "window", "quadrature")


class _ObservedOnly:
    """The loss function of a tracker that only observes a loop: it never performs a step itself."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            f"this {self.phase} tracker observes your own loop (GANKernelAnalyzer.bind) and has no loss function of "
            "its own: it cannot perform a step. Let the loop's optimizer.step() record the steps (observe_generator / "
            "observe_discriminator before each backward), or use a separate analyzer with GANTrainer or analyzer.perform"
        )


def _stand_in_after_resume(tracker: PathKernelTracker, loss_fn: Any) -> None:
    """An owned step's tracker is built at its phase's first step from that step's batch and micro-batches, which
    are then the run's first step's; built at the first step after a resume they are that step's (a DataLoader's
    last, partial batch: a WGAN-GP discriminator's 24 rows where the run's steps had 48, its ratio 7.42 for 5.19;
    given, they were kept and warned of against the state's first step). Where the loaded state kept the run's
    first step, they only stand in for it: the
    tracker takes the run's at its first step (:meth:`PathKernelTracker._follow_batch`), the analyzer's passes
    with it (``_follow_generator_batch``). An observed loop's tracker is built without them."""
    if not isinstance(loss_fn, _ObservedOnly) and tracker.saved_first_step is not None:
        tracker.mark_stand_ins("resumed_step")


def field_stride(last_evaluation: int, keep: int) -> int:
    """The spacing of the evaluations whose snapshots :attr:`GANKernelAnalyzer.fields` keeps once evaluations
    0..``last_evaluation`` ran (-1: none yet): the smallest power of two s with at most ``keep`` multiples of s
    among them (evaluations 0, s, 2s, ...)."""
    stride = 1
    while last_evaluation >= 0 and last_evaluation // stride + 1 > keep:
        stride *= 2
    return stride


def _buffers_kept(method):
    """An observe_* of a loop's micro-batch with G's and D's buffer slots holding copies: its backward passes through
    the loop's graph rerun a non-reentrant activation checkpoint's forward, and a BatchNorm in it updated its running
    statistics once more per pass (a checkpointed D's BatchNorm ended 12 updates ahead after 3 iterations)."""

    @functools.wraps(method)
    def observed(self, *args, **kwargs):
        with preserved_buffers(self._g), preserved_buffers(self._d):
            return method(self, *args, **kwargs)

    return observed


class GANKernelAnalyzer(TrainerCallback):
    """Generator and discriminator path-kernel ledgers of a GAN, split by discriminator geometry.

    Args:
        generator, discriminator: G (latents ``[B, ...]``, any shape G takes, e.g. DCGAN's
            ``[B, nz, 1, 1]``, -> samples) and D (samples -> one score each). Either may be wrapped
            (DistributedDataParallel, ``torch.compile``); analysis passes run on the wrapped module.
            BatchNorm in training mode is fine in both: group gradients come from training's graph.
        probe_latents: ``[M, ...]`` fixed probe latents z', shaped like G's input (64 is a good size).
            A generator with a ``latent_dim`` attribute must get ``latent_dim`` values per example.
        probe_classes: a conditional GAN (G(z, y), D(x, y)): the probes' classes y', a ``LongTensor[M]``
            in ``[0, num_classes)``. The generator's ledger is then G's change at (z'_m, y'_m); the
            geometry w_i = ∇_x ℓ_G(D(x, y_i)) at x = G(z_i, y_i) uses each example's own class (owned
            steps read the classes from the step's inputs ``(z, classes)``, observed loops from
            ``observe_generator(..., classes=)``). None (default): an unconditional GAN, G(z), D(x).
        num_classes: the number of classes of a conditional GAN (default ``generator.num_classes``);
            every class id the analyzer sees is checked against it.
        reference_classes, discriminator_probe_classes: a conditional GAN's classes of
            ``reference_latents`` and ``discriminator_probes`` (``LongTensor[R]``, ``LongTensor[P]``).
        grouping: "direction" (k-means of w/|w|), "mode" (pushed-to mode, needs ``mode_centers``),
            "nearest_mode", "magnitude", "confidence", "class" (a conditional GAN's classes,
            :class:`~genkernel.gan.geometry.ClassGroups`, ``num_classes`` groups), a
            :class:`GeometryGrouping`, or a callable
            ``fn(z, x, w, scores) -> LongTensor[B]`` (with ``num_groups``). Groupings see latents
            flattened per example, ``z [B, k]``.
        num_groups: G for the groupings that take a count (default 8); "mode" and "nearest_mode" have one group
            per mode centre: a ``num_groups`` other than their count is refused.
        comparison: a discriminator-independent grouping of the same size (one that reads D's gradient or
            scores, "direction", "mode", "magnitude", "confidence", is refused), tracked as a second partition
            ``"spatial"`` on the same steps (with its own permutation controls ``"spatial_control_i"``):
            "nearest_mode" (the mode nearest to G(z_i), needs ``mode_centers``), "latent_kmeans"
            (k-means of z), a :class:`GeometryGrouping` or None (default: none). Nearby latents share a
            spatial group and, through G's smoothness, a kernel: the spatial partition measures the
            coupling that smoothness alone gives, and each window reports the geometry grouping's
            statistics minus the spatial grouping's (``windows[i]["statistics"]``).
        mode_centers, mode_std: real mixture modes ``[num_modes, dim]`` and their std (2-D): enables
            mode coverage, the direction-to-nearest-mode alignment and mode groups for D.
        controls: number of label-permutation control partitions kept on the same trajectory
            (0: none), each an independent permutation of every step's ids; each adds G group rows to
            every generator step's cost (2G with a ``comparison``: the spatial ids get their own).
        window: generator steps per coupling window (coupling over training).
        eval_every: generator steps between alignment / coverage evaluations (must divide ``window``).
        field_snapshots: how many evaluations' probe snapshots (:attr:`fields`: the probes' samples, their
            geometry, the kernel field and the change, ``[M, ...]`` each) are kept: at most this many, evenly
            spaced from the first evaluation (every s-th, s the smallest power of two that keeps them within the
            number: every other one is dropped when one more would not fit), so a long run's memory and saved
            states stay bounded (on a 64×64 DCGAN with 128 probes a snapshot is about 24 MiB); ``"all"``: every
            evaluation's, growing with the run. The alignment and coverage rows are kept for every evaluation.
        coverage_latents: number of fixed latents for mode coverage (a conditional GAN's at classes
            ``i % num_classes``, every class in turn, trained or not).
        coverage_sigmas: a sample is "on" a mode within this many std.
        reference_latents: ``[R, ...]`` latents the grouping is fitted on (default: the first batch
            together with the probes). The grouping is never refitted: a window whose probes or
            training examples fall in fewer than half the groups is reported ``"collapsed"``.
        track_discriminator: keep D's ledger too.
        discriminator_probes: ``[P, ...]`` fixed points for D's ledger (default: the first 32 real and
            32 generated rows of the first discriminator batch). Given, an observed loop's D tracker is
            built at :meth:`bind`, so a loop that steps D with a closure (``observe_discriminator`` inside
            ``d_optimizer.step(closure)``) is followed from its first step; without them such a loop is
            refused at its second discriminator step (the first ran before the tracker existed).
        discriminator_groups: "role" (generated / real / penalty) or "role_mode" (real by mode,
            generated by nearest mode, penalty; needs ``mode_centers``).
        quadrature: quadrature rule of both trackers (docs/ledger.md, "Quadrature and the residual").
        ema_ledger: attached to a trainer that keeps an EMA of the generator (``GANTrainer(ema=)``),
            "trainer" (default) keeps a ledger for the EMA weights, the ones people sample from (two more
            float64 copies of G's parameters per group row); "none" the generator's ledgers only. In your
            own loop, ``bind(..., ema=)`` says it.
        memory_check: both trackers' answer to a cost estimate above the free memory: "refuse"
            (MemoryError) or "warn" (built anyway; the estimate can be high on CUDA), see
            :class:`~genkernel.core.PathKernelTracker`. A refusal names only what this analyzer can
            change: fewer groups or controls, fewer probes, ``state_dtype``, a shorter ``track_steps``
            window, a one-node quadrature (the generator's group gradients always come from the
            training graph, dense).
        mixed_precision: what a loop you observe whose forwards ran under ``torch.autocast`` (or
            accelerate's bf16/fp16 ``mixed_precision``) gets: "refuse" (default; at the first
            ``observe_*``, before any analysis pass) or "observe": both trackers split the half-precision
            gradients as :class:`~genkernel.core.PathKernelTracker` does (each step checked at its
            precision's rounding, which the residual then holds), the batch's geometry w_i is read from
            the loop's own graph in G's dtype, the probes' geometry, the field and every pass through D
            run in the networks' own precision, and the first generator micro-batch's losses are
            compared with ``generator_loss`` repeated under autocast at two eps of that precision.
            Owned steps under autocast (``GANTrainer(mixed_precision="bf16")``, :meth:`perform` inside
            the caller's autocast) are refused under the default and split under "observe", their
            batch geometry from a pass run as training's forward runs (docs/observing.md, "Mixed
            precision").
        track_steps: ``(first, last)`` generator steps (1-based, inclusive) to track under a built-in
            trainer (``GANTrainer``): the discriminator steps of those iterations (the ones before each
            of those generator steps) and the generator steps themselves. Steps before ``first`` run
            untracked and cost nothing; the trackers are built at the window's first step (optimizer
            state from before it is the ledgers' rest); after ``last`` the analyzer stops
            (:meth:`stop`). None (default): every step. In your own loop, bind at the window's first
            step and call :meth:`stop` after its last.
        state_dtype: dtype of both trackers' per-group gradients, optimizer state and updates:
            torch.float64 (default) or torch.float32 for float32 networks (half the group arrays; on
            a GPU also much faster); the ledgers stay float64 and the checks keep float32's tolerance.
        generator_loss: ℓ_G as a function of samples, ``fn(samples) -> [B]`` (a conditional GAN's
            ``fn(samples, classes) -> [B]``) (default ``GeneratorLoss(discriminator)``, conditional as the
            analyzer is, for logits with the non-saturating loss;
            ``GeneratorLoss(D, output="probability")`` for a D ending in a sigmoid, ``kind="hinge"``
            ...). Observed loops use it for the probes' geometry; on the first observed generator
            micro-batch it must reproduce the loop's own losses, else the analyzer refuses with the
            likely cause. (Owned steps use their step's ``loss_fn``.)
        geometry_loss: ``fn(samples) -> [B]`` (conditional: ``fn(samples, classes)``) whose input
            gradient defines the geometry instead of the
            training loss's: the groups, the probes' pushes −w(z') and the kernel-smoothed field. Default
            None: w is what training sees (the ledger's own weights). For a null model: train G on a
            loss that ignores D and pass ``GeneratorLoss(D)`` here, so that every discriminator-based
            statistic is computed as for the GAN while G's corrections do not depend on D (observed
            loops then skip the check that ``generator_loss`` reproduces the loop's losses).
        seed: the analyzer's own random generator (permutation control, coverage latents).
        name: the key of this analyzer's state in a trainer's checkpoint (default the class name).
        log: a logger ``log(metrics, step)`` (:mod:`genkernel.logging`: TensorBoard, CSV, or any
            callable). The analyzer logs its own numbers (:func:`~genkernel.logging.analyzer_metrics`:
            the generator's residual and shares, coupling against its controls, window statistics,
            alignment, coverage, the discriminator's residual) at the tracked generator steps whose loop
            step number is a multiple of ``log_every``, and the latest window's coupling matrices as
            images every ``image_every`` steps (0: when training ends, :meth:`finish`).
        log_every, image_every: see ``log``.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        probe_latents: torch.Tensor,
        *,
        probe_classes: torch.Tensor | None = None,
        num_classes: int | None = None,
        reference_classes: torch.Tensor | None = None,
        discriminator_probe_classes: torch.Tensor | None = None,
        grouping: str | GeometryGrouping | Callable = "direction",
        num_groups: int | None = None,
        comparison: str | GeometryGrouping | Callable | None = None,
        mode_centers: torch.Tensor | None = None,
        mode_std: float | None = None,
        controls: int = 1,
        window: int = 20,
        eval_every: int = 5,
        field_snapshots: int | str = 32,
        coverage_latents: int = 512,
        coverage_sigmas: float = 3.0,
        reference_latents: torch.Tensor | None = None,
        track_discriminator: bool = True,
        discriminator_probes: torch.Tensor | None = None,
        discriminator_groups: str = "role",
        quadrature: str = "midpoint",
        memory_check: str = "refuse",
        mixed_precision: str = "refuse",
        state_dtype: torch.dtype = torch.float64,
        track_steps: tuple[int, int] | None = None,
        ema_ledger: str = "trainer",
        generator_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        geometry_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        name: str | None = None,
        log: Callable[[Mapping[str, float], int], None] | None = None,
        log_every: int = 1,
        image_every: int = 0,
    ) -> None:
        if isinstance(controls, bool) or not isinstance(controls, int) or controls < 0:
            raise ValueError(f"controls must be a non-negative int (permutation control partitions), got {controls!r}")
        # (ints: window=3, eval_every=1.5 passed the divisibility check and evaluated every third step, the report
        # and the cost estimate saying 1.5; window=2.0 failed later, slicing with a float)
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (window, eval_every)) \
                or window < 1 or eval_every < 1 or window % eval_every:
            raise ValueError(f"window ({window!r}) and eval_every ({eval_every!r}) must be positive ints, eval_every "
                             "dividing window")
        window, eval_every = int(window), int(eval_every)
        if field_snapshots != "all" and (isinstance(field_snapshots, bool) or not isinstance(field_snapshots, int)
                                         or field_snapshots < 1):
            raise ValueError(f"field_snapshots must be a positive int (the most evaluations' probe snapshots kept) or "
                             f"'all', got {field_snapshots!r}")
        self.field_snapshots = field_snapshots
        if memory_check not in MEMORY_CHECKS:
            raise ValueError(f"memory_check must be one of {MEMORY_CHECKS}, got {memory_check!r}")
        self.memory_check = memory_check
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        self.mixed_precision = mixed_precision
        if state_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"state_dtype must be torch.float64 or torch.float32, got {state_dtype!r}")
        self.state_dtype = state_dtype
        if track_steps is not None and (
                not isinstance(track_steps, (tuple, list)) or len(track_steps) != 2
                or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in track_steps)
                or not 1 <= track_steps[0] <= track_steps[1]):
            raise ValueError(f"track_steps must be (first, last) generator steps with 1 <= first <= last, got {track_steps!r}")
        self.track_steps = None if track_steps is None else (int(track_steps[0]), int(track_steps[1]))
        self.stopped = False  # stop(): the tracked window ended, later steps run untracked
        if ema_ledger not in EMA_LEDGERS:
            raise ValueError(f"ema_ledger must be one of {EMA_LEDGERS}, got {ema_ledger!r}")
        self.ema_ledger = ema_ledger
        if discriminator_groups not in ("role", "role_mode"):
            raise ValueError(f"discriminator_groups must be 'role' or 'role_mode', got {discriminator_groups!r}")
        if discriminator_groups == "role_mode" and mode_centers is None:
            raise ValueError("discriminator_groups='role_mode' needs mode_centers")
        if mode_centers is not None and mode_std is None:
            raise ValueError("mode_centers needs mode_std (the std of each real mode) for mode coverage")
        for what, fn in (("generator_loss", generator_loss), ("geometry_loss", geometry_loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what} must be callable as fn(samples) -> [B] losses, got {type(fn).__name__}")
            if isinstance(fn, AugmentedGeneratorLoss):  # (it failed at the first generator step, after D's update)
                raise ValueError(
                    f"{what} is an AugmentedGeneratorLoss, ℓ_G(D(T(x; params))), which has no value at a probe (no "
                    f"augmentation parameters are drawn for one): pass {what}=loss.geometry (ℓ_G(D(x)), the "
                    "un-augmented D's geometry, what GANTrainer(augment=)'s steps are read with)"
                )
        self.generator = generator
        self.discriminator = discriminator
        self._g = unwrap(generator)  # analysis passes run on the modules inside any wrapper
        self._d = unwrap(discriminator)
        wide = [n for n, m in (("generator", self._g), ("discriminator", self._d))
                if any(p.dtype == torch.float64 for p in m.parameters())]
        if state_dtype == torch.float32 and wide:
            verb = "has" if len(wide) == 1 else "have"
            raise ValueError(f"state_dtype=torch.float32 is for float32 networks; the {' and '.join(wide)} {verb} float64 "
                             "parameters, whose exact checks need float64 state: leave state_dtype at torch.float64")
        # On the CPU, where the groupings and coverage read samples (centres may come from any device).
        # A copy: a caller that reuses its tensor must not move the modes (groups, coverage) during the run.
        self.mode_centers = None if mode_centers is None else torch.as_tensor(mode_centers).detach().to(
            device="cpu", dtype=torch.float64).clone()
        if self.mode_centers is not None and (self.mode_centers.dim() != 2 or not bool(torch.isfinite(self.mode_centers).all())):
            raise ValueError(f"mode_centers must be a finite [num_modes, dim] tensor of the real modes' centres, got shape "
                             f"{tuple(self.mode_centers.shape)}" + ("" if self.mode_centers.dim() != 2 else " with NaN or inf"))
        self.mode_std = mode_std
        if self.mode_centers is not None:  # (as the first coverage will, rather than fail there mid-run)
            check_coverage(mode_std, coverage_sigmas, self.mode_centers.shape[1])
        self._set_conditional(probe_classes, num_classes, reference_classes, discriminator_probes,
                              discriminator_probe_classes)
        for what, fn in (("generator_loss", generator_loss), ("geometry_loss", geometry_loss)):
            self._check_loss_conditioning(fn, what)
        self.rng = seeded_generator(seed)  # (checks the seed: seed and seed + 2**32 drew the same controls)
        # (what drew the coverage latents: a resumed run's coverage rows must use the same, _config). A Python int:
        # a NumPy integer, which the seed check accepts, in the saved config made the state one the safe loader refuses
        self.seed = int(seed)
        # the geometry and spatial ids of the last examples (grouping.recent_labels)
        self._control_pools = {GEOMETRY: torch.zeros(0, dtype=torch.long), SPATIAL: torch.zeros(0, dtype=torch.long)}
        # k-means takes 32-bit seeds: the same bits the generator reads
        self.grouping = self._make_grouping(grouping, num_groups, seed_bits(seed))
        self.num_groups = self.grouping.num_groups
        # (a mode comparison has the centres' count, checked against the grouping's below)
        # (as a grouping object or the classes: its own count, checked against the grouping's below too)
        fixed = (isinstance(comparison, str) and comparison in ("mode", "nearest_mode", "class")
                 or isinstance(comparison, GeometryGrouping))
        self.comparison = None if comparison is None else self._make_grouping(
            comparison, None if fixed else self.num_groups, seed_bits(seed))
        if self.comparison is not None and self.comparison.reads_discriminator:
            # geometry minus spatial credits D with what the comparison does not explain; a comparison that reads
            # D (its w or scores) explains part of D's own coupling, and the examples D is flat at (w = 0) take its
            # tie-break group
            raise ValueError(
                f"comparison={type(self.comparison).__name__} groups by the discriminator (its gradient w or scores): "
                "the comparison must not depend on D; use 'nearest_mode', 'latent_kmeans' or a grouping of z or G(z)"
            )
        if self.comparison is not None and self.comparison.num_groups != self.num_groups:
            raise ValueError(
                f"comparison has {self.comparison.num_groups} groups but the geometry grouping {self.num_groups}: compare "
                "groupings of the same size (own-group shares grow as groups get fewer and larger)"
            )
        self.controls = controls
        self.name = name
        self.window = window
        self.eval_every = eval_every
        self.coverage_sigmas = coverage_sigmas
        self.track_discriminator = track_discriminator
        self.discriminator_groups = discriminator_groups
        self.quadrature = quadrature
        self._generator_loss = generator_loss
        self._geometry_loss = geometry_loss
        # Copies of every fixed input the caller passed (probes, their classes, reference latents, D's probes), as of
        # mode_centers: the trackers clone theirs when they are built (at the first step), so a caller reusing its
        # tensor in place would otherwise move the probes of the analysis away from the ledgers' probes.
        self.probe_latents = _copied(self._checked_latents(probe_latents, "probe_latents", probe_classes,
                                                           "probe_classes"))
        self.probe_classes = None if probe_classes is None else probe_classes.detach().long().to(
            probe_latents.device).clone()
        self.coverage_latents = torch.randn(
            coverage_latents, *probe_latents.shape[1:], generator=self.rng, dtype=torch.float64
        ).to(probe_latents)
        # A conditional generator's coverage samples cycle through the classes (no draw: the rng's stream is kept).
        self.coverage_classes = None if not self.conditional else (
            torch.arange(coverage_latents, device=probe_latents.device) % self.num_classes)
        self.discriminator_probes = _copied(discriminator_probes)
        reference_latents = _copied(reference_latents)
        self.reference_latents = reference_latents
        if self.conditional and reference_latents is not None:  # refused now rather than at the first step
            self._checked_latents(reference_latents, "reference_latents", reference_classes, "reference_classes")
            # kept as checked class ids (LongTensor): G's embedding refuses uint8 ids, and indexing by uint8 is a mask
            self.reference_classes = check_classes(reference_classes, reference_latents.shape[0], self.num_classes,
                                                   "reference_classes").to(reference_latents.device).clone()
        elif reference_classes is not None:
            raise ValueError("reference_classes are the classes of reference_latents: pass both, or neither")
        self.logging = None if log is None else LoggingCallback(
            log, analyzer=self, every=log_every, analysis_every=log_every, image_every=image_every
        )

        self.g_tracker: PathKernelTracker | None = None
        self.d_tracker: PathKernelTracker | None = None
        self._pass_record: dict[str, Any] | None = None  # analysis_pass_cost() when the generator tracker was built
        self._pending: dict[str, Any] | None = None
        # The trainer whose load_state_dict is loading this analyzer's state, set by the built-in trainers for that
        # call alone: a loaded state is compared with the EMA ledger that trainer's steps would track
        # (_check_saved_trackers); None otherwise.
        self.resuming_trainer: Any = None
        self.g_steps = 0
        self.d_steps = 0
        self._steps_at_bind = (0, 0)  # each player's attempted steps (_attempted) when the loop's count was start_step
        self.alignment: list[dict[str, float]] = []
        self.coverage: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self.partial_window: dict[str, Any] | None = None  # finish(): the window in progress
        # probe snapshots at evaluation steps (for figures): at most field_snapshots, evenly spaced (_keep_field)
        self.fields: list[dict[str, torch.Tensor]] = []
        self.g_loop_steps: list[int] = []  # the loop's number of every tracked generator step
        self.d_loop_steps: list[int] = []
        self.g_group_counts: list[list[int]] = []  # training examples per geometry group, per tracked step
        self.g_spatial_counts: list[list[int]] = []  # ... per spatial group (with a comparison)
        # per tracked step, training examples with w = 0 under a grouping by w's direction (no geometry group):
        # left out of g_group_counts (see _zero_gradient)
        self.g_zero_counts: list[int] = []
        self.d_group_counts: list[list[int]] = []
        self.notes: list[str] = []  # what the report must say about how the numbers were made
        self._window_start: dict[str, PathKernelLedger] | None = None  # the ledgers when the window opened
        self._window_groups: torch.Tensor | None = None  # the probes' geometry groups at the window's start
        self._run_groups: torch.Tensor | None = None  # ... at the first tracked step (whole-run coupling)
        # the probes whose geometry group was undefined (w = 0) at those evaluations (BoolTensor[M], CPU)
        self._window_zero: torch.Tensor | None = None
        self._run_zero: torch.Tensor | None = None
        self._window_spatial: torch.Tensor | None = None  # the probes' spatial groups (comparison), likewise
        self._run_spatial: torch.Tensor | None = None
        self._probe_state: dict[str, torch.Tensor] | None = None
        self._probe_d_clock: int | None = None  # D's booked steps when the probes' geometry was last read
        self._g_f_prev: torch.Tensor | None = None  # the generator ledger's f_end before the step
        self._g_drift_prev: torch.Tensor | None = None  # and its buffer drift
        self._g_pending: dict[str, Any] | None = None  # the generator step in progress (ids, loop step)
        self._d_pending: dict[str, Any] | None = None
        # Why the bookkeeping no longer matches the ledgers: a listener cut off after its step was recorded.
        self._broken: str | None = None
        # The records the last generator step still owes (its alignment row, the window it closes, its log: a failure
        # there cut them off), made at the next opportunity (_settle), at that step's ledgers, probes and θ; else None.
        self._g_owed: dict[str, Any] | None = None
        self._settling = False  # inside _settle (a log callable reading report() while the records are made)
        # observe mode (bind)
        self._bound = False
        self._g_optimizer: torch.optim.Optimizer | None = None
        self._d_optimizer: torch.optim.Optimizer | None = None
        self._ema: Any = None
        self._ema_count_at_step: int | None = None  # own loop: the EMA's update count when a G step began
        self._start_step = 0
        self._loss_checked = False
        self._d_fill_checked = False  # the first observed discriminator micro-batch can fill D's groups
        self._d_first_theta: list[torch.Tensor] | None = None  # D's weights when its tracker was built at a micro-batch

    # -- validation ----------------------------------------------------------------------------
    def _set_conditional(self, probe_classes, num_classes, reference_classes, discriminator_probes,
                         discriminator_probe_classes) -> None:
        """Whether the GAN is conditional (``probe_classes`` given) and its ``num_classes``; the refusals
        of a conditional G without classes and of classes for an unconditional G."""
        self.conditional = probe_classes is not None
        takes = classes_taken(self._g)
        if not self.conditional:
            extra = [n for n, v in (("num_classes", num_classes), ("reference_classes", reference_classes),
                                    ("discriminator_probe_classes", discriminator_probe_classes)) if v is not None]
            if extra:
                raise ValueError(f"{extra[0]} belongs to a conditional GAN: pass probe_classes= (the probes' classes, a "
                                 "LongTensor[M]) too, or drop it for an unconditional GAN")
            # a conditional G given no classes is refused by the probes' check (its TypeError and the fix)
            self.num_classes = None
            self.reference_classes = None
            self.discriminator_probe_classes = None
            return
        if takes is False:
            raise ValueError(
                "probe_classes were given but the generator's forward takes latents only (an unconditional G(z)): drop "
                "probe_classes (and num_classes), or give G a forward(z, classes)"
            )
        if num_classes is None:
            num_classes = getattr(self._g, "num_classes", None)
        if num_classes is None:
            raise ValueError("a conditional GAN (probe_classes=) needs num_classes= (the number of classes; or a "
                             "generator.num_classes attribute), so that every class id can be checked")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.reference_classes = reference_classes  # checked with reference_latents when the grouping is fitted
        if discriminator_probes is not None:
            if discriminator_probe_classes is None:
                raise ValueError("a conditional GAN's discriminator_probes need their classes: pass "
                                 f"discriminator_probe_classes=<LongTensor[{discriminator_probes.shape[0]}]>")
            discriminator_probe_classes = check_classes(discriminator_probe_classes, discriminator_probes.shape[0],
                                                        self.num_classes, "discriminator_probe_classes").clone()
        elif discriminator_probe_classes is not None:
            raise ValueError("discriminator_probe_classes are the classes of discriminator_probes: pass both, or neither")
        self.discriminator_probe_classes = discriminator_probe_classes

    def _check_loss_conditioning(self, fn: Callable | None, what: str) -> None:
        """``generator_loss`` / ``geometry_loss`` must be called as the analyzer calls it: ``fn(samples,
        classes)`` for a conditional GAN, ``fn(samples)`` otherwise. A :class:`GeneratorLoss` built for
        the other kind of GAN, or a function of the samples alone given to a conditional analyzer, is
        refused here with the fix (else D(x) without its classes fails at the first step, or later)."""
        if fn is None:
            return
        if isinstance(fn, GeneratorLoss):
            if self.conditional and not fn.conditional:
                raise ValueError(
                    f"{what} is GeneratorLoss(D) for an unconditional D(x), but this analyzer is conditional "
                    f"(probe_classes=): pass GeneratorLoss(D, kind={fn.kind!r}, output={fn.output!r}, conditional=True)"
                )
            if not self.conditional and fn.conditional:
                raise ValueError(
                    f"{what} is GeneratorLoss(D, conditional=True) (D(x, y)), but this analyzer is unconditional: drop "
                    "conditional=True, or build the analyzer with probe_classes= and num_classes="
                )
            return
        if self.conditional and _positional_inputs(fn) == 1:
            raise ValueError(
                f"{what} takes the samples alone, but this analyzer is conditional (probe_classes=) and calls it as "
                f"{what}(samples, classes) (D(x, y) needs each sample's class): give it a second argument, e.g. "
                "lambda x, y: -torch.nn.functional.softplus(D(x, y).view(-1)), or pass "
                "GeneratorLoss(D, ..., conditional=True)"
            )

    def _make_grouping(self, spec: Any, num_groups: int | None, seed: int) -> GeometryGrouping:
        """:func:`make_grouping`, plus ``"class"``: a conditional GAN's classes (:class:`ClassGroups`)."""
        if isinstance(spec, str) and spec == "class":
            if not self.conditional:
                raise ValueError("grouping 'class' groups a conditional GAN's examples by class: pass probe_classes= and "
                                 "num_classes=, or choose a geometry grouping")
            refuse_other_count(f"'class' has one group per class ({self.num_classes}, num_classes)", self.num_classes,
                               num_groups)
            return ClassGroups(self.num_classes)
        grouping = make_grouping(spec, num_groups=num_groups, centers=self.mode_centers, seed=seed)
        if grouping.uses_classes and not self.conditional:
            raise ValueError(f"{type(grouping).__name__} groups by class: it needs a conditional GAN (probe_classes=)")
        return grouping

    def _assign(self, grouping: GeometryGrouping, geo: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``grouping``'s ids for the examples of ``geo`` (latents flattened per example; a grouping that
        ``uses_classes`` gets the examples' classes)."""
        z = _flat_latents(geo["z"])
        if grouping.uses_classes:
            return grouping(z, geo["x"], geo["w"], geo["scores"], classes=geo["classes"].cpu())
        return grouping(z, geo["x"], geo["w"], geo["scores"])

    def _step_classes(self, classes: Any, batch: int, what: str) -> torch.Tensor | None:
        """A step's classes: required and checked for a conditional GAN, refused for an unconditional one."""
        if not self.conditional:
            if classes is not None:
                raise ValueError(f"{what}: classes were given but this analyzer is unconditional (no probe_classes): drop "
                                 "them, or build the analyzer with probe_classes= and num_classes=")
            return None
        if classes is None:
            raise ValueError(f"{what}: this analyzer is conditional (probe_classes=): pass the step's classes, a "
                             f"LongTensor[{batch}] (classes=)")
        return check_classes(classes, batch, self.num_classes, f"{what}'s classes")

    def _checked_latents(self, latents: torch.Tensor, name: str, classes: torch.Tensor | None = None,
                         classes_name: str = "classes") -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.dim() < 1 or latents.shape[0] < 1:
            raise ValueError(
                f"{name} must be a Tensor [M, ...] of latents shaped as the generator takes them, got "
                f"{getattr(latents, 'shape', type(latents).__name__)}"
            )
        if self.conditional:
            if classes is None:
                raise ValueError(f"{name} of a conditional GAN need their classes: pass {classes_name}="
                                 f"<LongTensor[{latents.shape[0]}]>")
            classes = check_classes(classes, latents.shape[0], self.num_classes, classes_name).to(latents.device)
        conditions = class_inputs(classes)
        expected = getattr(self._g, "latent_dim", None)
        size = latents[0].numel()
        if isinstance(expected, int) and size != expected:
            raise ValueError(
                f"{name} have latent dimension {size} but the generator expects {expected}: "
                f"pass a Tensor [M, {expected}] (or [M, {expected}, 1, 1], whatever the generator takes)"
            )
        try:  # a shape check: eval mode, nothing written
            with torch.no_grad(), preserved(self._g), analysis_mode(self._g), preserved(self._d), analysis_mode(self._d):
                samples = output_tensor(self._g(latents, *conditions))
                scores = self._d(samples, *conditions)
        except (RuntimeError, TypeError, IndexError) as error:
            if not not_fitting_inputs(error):  # (an out-of-memory, a failed collective: not the latents' shape)
                raise
            if self.conditional:
                raise ValueError(
                    f"{name} of shape {tuple(latents.shape)} with their classes do not fit the conditional "
                    f"generator/discriminator: {error}. The analyzer calls generator(latents, classes) and "
                    "discriminator(samples, classes)"
                ) from error
            raise ValueError(
                f"{name} of shape {tuple(latents.shape)} do not fit the generator/discriminator: {error}. The analyzer "
                "calls generator(latents) and discriminator(samples), one tensor each, unless told the classes: for a "
                "conditional GAN (G(z, y), D(x, y)) pass probe_classes= (a LongTensor[M], the probes' classes) and "
                "num_classes= (or analyse it through wrappers that carry the class one-hot, as in "
                "tests/test_conditional_gan.py)"
            ) from error
        scores_of(scores, latents.shape[0])  # one value per example, or a clear error
        return latents

    def _check_step_latents(self, latents: torch.Tensor) -> None:
        if latents.shape[1:] != self.probe_latents.shape[1:]:
            raise ValueError(
                f"the generator step's latents have shape {tuple(latents.shape)} but the probe latents are "
                f"[M, {', '.join(str(n) for n in self.probe_latents.shape[1:])}]: probes and training latents must have "
                "the same shape per example"
            )

    def _check_generator_fillable(self, batch: int) -> None:
        """ValueError where a batch of ``batch`` latents cannot fill the generator's groups
        (:meth:`_generator_fill_problem`)."""
        problem = self._generator_fill_problem(batch)
        if problem is not None:
            raise ValueError(problem)

    def _generator_fill_problem(self, batch: int) -> str | None:
        """Why a batch cannot fill the generator's groups (None where it can, and always by class, ``grouping="class"``:
        a class absent from a batch is an empty group by the data, not by construction, and a conditional GAN may
        have more classes than a batch has examples, CIFAR-100 at batch 64)."""
        if self.grouping.uses_classes and (self.comparison is None or self.comparison.uses_classes):
            return None
        return _fill_problem(self.num_groups, batch, f"grouping {type(self.grouping).__name__}")

    def _warn_unfillable(self, batch: int) -> None:
        """An observed loop's first step, recorded: a warning (the step is taken) where its ``batch`` examples over
        all its micro-batches cannot fill the generator's groups."""
        problem = self._generator_fill_problem(batch)
        if problem is not None:
            warnings.warn(f"the first observed generator step: {problem}", stacklevel=4)

    def _check_fillable(self, groups: int, batch: int, what: str) -> None:
        problem = _fill_problem(groups, batch, what)
        if problem is not None:
            raise ValueError(problem)

    # -- protocol ------------------------------------------------------------------------------
    def _check_consistent(self) -> None:
        """Refuse to go on (steps, saves, reports) after a step's bookkeeping or a state's loading was
        cut off half-way: its windows, alignment and loop step numbers would no longer match the ledgers."""
        if self._broken is not None:
            raise RuntimeError(
                f"this analyzer refuses further steps, saves and reports: {self._broken}, so its windows, alignment and loop "
                "step numbers no longer match its ledgers. Resume from the last checkpoint (trainer.train(..., "
                "resume=True), or load_state_dict) or build a new analyzer"
            )

    @contextlib.contextmanager
    def _bookkeeping(self, which: str) -> Iterator[None]:
        """A listener's bookkeeping after a ``which`` step was recorded: cut off half-way (an interrupt),
        the analyzer refuses to go on (:meth:`_check_consistent`)."""
        try:
            yield
        except BaseException as error:
            self._broken = (f"the bookkeeping of a {which} step was interrupted ({type(error).__name__}) after the "
                            "step was recorded in the ledgers")
            if hasattr(error, "add_note"):
                error.add_note(f"genkernel: {self._broken}; this analyzer refuses further steps, saves and reports")
            raise

    def _settle(self) -> None:
        """The bookkeeping owed: the trackers' listeners an interrupt kept from a recorded step (their counts), then
        the records the last generator step owes (:meth:`_book_generator`: its alignment row, the coupling window it
        closes, its log), each unless made already, at that step's ledgers, probes and θ, which nothing changes before
        the next generator step. Made before every step, observed micro-batch, save, report, finish and stop."""
        self._check_consistent()
        for tracker in (self.g_tracker, self.d_tracker):
            if tracker is not None:
                tracker._hear()
        owed = self._g_owed
        if owed is None or self._settling:
            return
        index = owed["index"]
        if self._view("g_tracker") is None or self.g_steps != index or self._view("g_tracker").ledger.steps != index:
            self._broken = (f"the records of generator step {index} (alignment, window, log) were interrupted and a "
                            "later step was recorded before they could be made")
            self._check_consistent()
        self._settling = True
        try:
            make_owed(owed, (
                OwedRecord("alignment", lambda: bool(self.alignment) and self.alignment[-1]["step"] == index,
                           lambda: self._record_alignment(index, owed["result"], owed["change"], owed["drift"])),
                OwedRecord("window", lambda: bool(self.windows) and self.windows[-1]["steps"][1] == index,
                           lambda: self._close_window(index)),
                # (after the window closed: its statistics are in the numbers)
                OwedRecord("log", lambda: self.logging is None,
                           lambda: self.logging.log_step(self.g_loop_steps[-1], phase="generator"), once=True),
            ), label=f"generator step {index} (alignment, window, log)", retry="step, save or report")
        finally:
            self._settling = False
        self._g_owed = None

    def _outside_window(self, trainer: Any) -> bool:
        """Whether the trainer's step about to run is outside ``track_steps`` (stopping the analyzer
        once past it): each of its steps belongs to the iteration that ends with generator step
        ``g_steps + 1``."""
        if self.stopped:
            return True
        if self.track_steps is None:
            return False
        upcoming = _count(trainer, "g_steps")
        if upcoming is None:
            raise ValueError("track_steps needs a trainer that counts its generator steps (g_steps, as GANTrainer): "
                             "in your own loop, bind at the window's first step and call analyzer.stop() after its last")
        if upcoming > self.track_steps[1]:
            self.stop()
            return True
        return upcoming < self.track_steps[0]

    def stop(self) -> None:
        """Stop tracking (the end of the tracked window): the coupling window in progress is closed
        as a partial one, the trackers stop (an EMA's update after the last tracked step is
        recorded) and their ledgers are kept and reported; later steps are not analysed and cost
        nothing. In your own loop the optimizers' steps are no longer recorded after it; call it after the last
        step's EMA update (``bind(..., ema=)``): the EMA ledger records an update when the next step begins or the
        trackers close, so a ``stop()`` between ``g_optimizer.step()`` and ``ema.update`` leaves that update out
        (a RuntimeWarning says so when the EMA's update was not called, or it has not moved, since the last step
        began)."""
        if self.stopped:
            return
        self._settle()
        self._warn_pending_ema()
        self._close_partial_window()
        for tracker in (self.g_tracker, self.d_tracker):
            if tracker is not None:
                tracker.close()
        self.stopped = True

    def _warn_pending_ema(self) -> None:
        """stop() in your own loop: an EMA whose update was not called since the last generator step began
        (by its own update counter; an EMA without one: whose weights have not moved since) has not been
        updated after that step yet: its update, made after the trackers close, would be missing from the EMA
        ledger. A skipped update (ema-pytorch's ``update_every``) is counted, so it does not warn."""
        tracker = self.g_tracker
        ema = None if tracker is None else tracker.ema
        if not self._bound or ema is None or tracker._closed or len(ema.decays) >= tracker.ledger.steps:
            return  # (every step's update recorded already)
        count = ema_update_count(self._ema)
        counted = count is not None and self._ema_count_at_step is not None
        if counted:
            pending = count == self._ema_count_at_step  # no update call since (a skipped one is counted)
        else:
            bar = ema.read()
            pending = all(torch.equal(bar[n].detach().to(torch.float64), ema.last_bar[n]) for n in bar)
        if pending:
            warnings.warn(
                f"analyzer.stop(): the generator's EMA has not {'been updated' if counted else 'moved'} since its last "
                "tracked step began; if the loop "
                "updates it after this call, that update is not in generator_ema_ledgers (the trackers close now). "
                "Call stop() after the EMA's update of the window's last step",
                RuntimeWarning, stacklevel=3)

    def wrap_step(self, trainer: Any, step: OptimizerStep, perform: Callable[[], torch.Tensor]) -> torch.Tensor:
        if step.phase in ("generator", "discriminator"):
            self._check_consistent()
            if not self.stopped and not self._bound:
                self._settle()  # (what the last step owes, at its ledgers and θ, before this step changes them)
        if step.phase in ("generator", "discriminator") and not self._bound and self._outside_window(trainer):
            return perform()
        if self._bound and step.phase in ("generator", "discriminator"):
            raise RuntimeError(
                "this analyzer observes your own loop (bind): its optimizers' step() records the steps. Use another "
                "analyzer for steps a trainer or analyzer.perform performs"
            )
        if step.phase == "generator":
            if self.g_tracker is None and self.ema_ledger == "trainer":  # the trainer's EMA, if it keeps one
                self._ema = getattr(trainer, "ema", None)
            # A step that fails before its update puts the analyzer's generator back (its control permutations):
            # the step run again (GANTrainer hands its draws back) draws what the uninterrupted run draws.
            rng_state, pools = self.rng.get_state(), dict(self._control_pools)
            try:
                return self._generator_step(step, _count(trainer, "g_steps"))
            except BaseException:
                if not step.applied:
                    self.rng.set_state(rng_state)
                    self._control_pools = pools
                raise
        if step.phase == "discriminator":
            return self._discriminator_step(step, _count(trainer, "d_steps_done")) if self.track_discriminator else perform()
        return perform()

    def perform(self, step: OptimizerStep) -> torch.Tensor:
        """Run one prepared step through this analyzer (for your own training loop)."""
        return perform_step([self], None, step)

    # -- observe mode --------------------------------------------------------------------------
    def bind(
        self,
        g_optimizer: Any = None,
        d_optimizer: Any = None,
        *,
        ema: Any = None,
        start_step: int | tuple[int, int] = 0,
    ) -> None:
        """Observe a loop you own: its ``g_optimizer.step()`` and ``d_optimizer.step()`` record the steps.

        Args:
            g_optimizer, d_optimizer: the players' optimizers (either may be None: that player is not
                tracked); wrapped ones (accelerate, Lightning) are read through.
            ema: an EMA of the generator's weights (ema-pytorch's ``EMA``, ``AveragedModel``, diffusers'
                ``EMAModel``, ...) that the loop updates after each generator step: a second ledger
                (``generator_ema_ledgers``) for the weights people sample from.
            start_step: the loop's step count now; reports number the tracked steps from it
                (``start_step + 1``, ``start_step + 2``, ... for each player; a step the loop skipped with its
                micro-batches observed, a GradScaler's, is counted as the loop counts it). A pair
                ``(generator_steps, discriminator_steps)`` gives each player's own count (a loop with
                several discriminator steps per generator step, e.g. WGAN's five). After
                :meth:`load_state_dict`, a count below the saved analyzer's last number of that player is
                refused (its steps would be numbered again): pass that player's own count.

        Then call :meth:`observe_generator` / :meth:`observe_discriminator` before each backward. The
        analyzer's probes follow G and D here to the device and dtype they have now (Lightning moves and
        casts a module after its ``__init__`` built the analyzer).
        """
        if self._bound:
            raise RuntimeError("this analyzer is already bound to a loop; build a new one for another run")
        if self.track_steps is not None:
            raise ValueError(
                f"track_steps={self.track_steps} is followed by genkernel's built-in trainer only: in your own loop, build "
                "the analyzer without it, bind at the window's first step (start_step= the loop's count) and call "
                "analyzer.stop() after its last")
        if self.g_tracker is not None or self.d_tracker is not None:
            raise RuntimeError("this analyzer already tracks steps a trainer performs; build a new one to observe a loop")
        if g_optimizer is None and d_optimizer is None:
            raise ValueError("bind needs g_optimizer, d_optimizer or both")
        _check_not_swapped(g_optimizer, d_optimizer, self._g, self._d)
        if ema is not None and g_optimizer is None:
            raise ValueError("ema is an EMA of the generator's weights: bind it with the g_optimizer")
        start_step = list(start_step) if isinstance(start_step, (tuple, list)) else start_step
        _check_start_step(start_step, self.g_loop_steps, self.d_loop_steps)  # after a load: no step numbered again
        if g_optimizer is not None:  # (a state loaded by hand: the EMA given here decides, before anything is set)
            self._check_pending_ema(ema is not None, "bind(..., ema={})")
        if self._generator_loss is None and self._geometry_loss is None:
            self._generator_loss = self._default_generator_loss()
        self._follow_networks()
        self._start_step = start_step
        self._steps_at_bind = (self._attempted("g_tracker"), self._attempted("d_tracker"))
        self._ema = ema
        if g_optimizer is not None:
            self._g_optimizer = unwrap_optimizer(g_optimizer)
            self._build_generator_tracker(self._g_optimizer, _ObservedOnly("generator"), math.inf)
        if d_optimizer is not None:
            self._d_optimizer = unwrap_optimizer(d_optimizer)
        self._bound = True
        self._build_bound_discriminator()

    def _build_bound_discriminator(self) -> None:
        """Observe mode: build D's tracker now when its probes are known (``discriminator_probes=``, or a
        loaded state's), before any step, as the generator's is. Its step hooks must exist before a step
        begins: a loop that calls ``observe_discriminator`` inside ``d_optimizer.step(closure)`` is
        followed from its first step only then. Without known probes the tracker is built at the first
        observed micro-batch, from its rows."""
        if not self.track_discriminator or self._d_optimizer is None or self.d_tracker is not None \
                or self.discriminator_probes is None:
            return
        like = floating_parameter(self._d)
        probes = self.discriminator_probes if like is None else self.discriminator_probes.to(like)
        if self.conditional and self.discriminator_probe_classes is None:
            raise ValueError("a conditional GAN's discriminator_probes need their classes: pass discriminator_probe_classes=")
        with preserved(self._d):
            self._build_discriminator_tracker(self.discriminator, self._d_optimizer, _ObservedOnly("discriminator"),
                                              math.inf, probes, None, None, wrap_critic=False)

    def _follow_networks(self) -> None:
        """Move the analyzer's fixed inputs (probe, coverage and reference latents, D's probes) to the
        device and floating dtype of the network they feed, and a loaded state's tensors to G's device.
        For a framework that moves or casts the networks after the analyzer was built: Lightning builds
        the module (and so the analyzer, in its ``__init__``) on the CPU, restores a checkpoint there,
        and only then moves it to the GPU or casts it (``precision="64-true"``). Called by :meth:`bind`;
        integer latents keep their dtype."""
        def like(t: torch.Tensor | None, module: nn.Module) -> torch.Tensor | None:
            p = floating_parameter(module)
            if t is None or p is None:
                return t
            return like_parameter(t, p)

        self.probe_latents = like(self.probe_latents, self._g)
        self.coverage_latents = like(self.coverage_latents, self._g)
        self.reference_latents = like(self.reference_latents, self._g)
        self.discriminator_probes = like(self.discriminator_probes, self._d)
        self.probe_classes = like(self.probe_classes, self._g)
        self.coverage_classes = like(self.coverage_classes, self._g)
        self.reference_classes = like(self.reference_classes, self._g)
        self.discriminator_probe_classes = like(self.discriminator_probe_classes, self._d)
        device = self.probe_latents.device
        self._probe_state = to_device(self._probe_state, device)
        if self._window_start is not None:
            self._window_start = {k: PathKernelLedger.from_state_dict(to_device(v.state_dict(), device))
                                  for k, v in self._window_start.items()}
        self._window_groups, self._run_groups, self._window_spatial, self._run_spatial = to_device(
            (self._window_groups, self._run_groups, self._window_spatial, self._run_spatial), device)

    @property
    def generator_loss(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """ℓ_G as a function of samples (``generator_loss=``; ``GeneratorLoss(D)`` once bound)."""
        if self._generator_loss is None:
            return self._default_generator_loss()
        return self._generator_loss

    def _default_generator_loss(self) -> GeneratorLoss:
        return GeneratorLoss(self._d, conditional=self.conditional, num_classes=self.num_classes)

    def _loss_fn(self, samples: torch.Tensor, targets: Any = None) -> torch.Tensor:
        """``generator_loss(samples)``; a conditional GAN's ``generator_loss(samples, classes)``."""
        return self.generator_loss(samples, *class_inputs(targets))

    def _geometry_fn(self, default: Callable) -> Callable:
        """The loss whose input gradient w defines groups, probe pushes and the field: ``geometry_loss``
        when given (as ``fn(samples, targets)``; a conditional GAN's targets are the classes, passed on
        as ``geometry_loss(samples, classes)``), else ``default`` (the training loss)."""
        if self._geometry_loss is None:
            return default
        geometry = self._geometry_loss
        return lambda samples, targets=None: geometry(samples, *class_inputs(targets))

    @_buffers_kept
    def observe_generator(
        self, losses: torch.Tensor, latents: torch.Tensor, samples: torch.Tensor, *, weights: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
    ) -> None:
        """Report one generator micro-batch of your loop, before its backward.

        Args:
            losses: ``[B]`` per-example generator losses with their graph (your loss is their mean,
                or Σ_n c_n ℓ_n with ``weights``).
            latents: the latents ``[B, ...]`` your generator took (any shape, e.g. ``[B, nz, 1, 1]``).
            samples: ``G(latents)`` from the same forward, with its graph: the weights
                w_i = ∂ℓ/∂x_i are read from it, so they are exactly what training saw (BatchNorm
                batch statistics included).
            weights: per-example coefficients c_n ``[B]`` (default the mean).
            classes: a conditional GAN's classes ``LongTensor[B]`` (``samples = G(latents, classes)``,
                the losses from ``D(samples, classes)``); required with ``probe_classes``, refused without.

        The loop's ``g_optimizer.step()`` then records the step (gradient accumulation over several
        observed micro-batches and global-norm clipping are followed exactly).
        """
        # A refused micro-batch draws nothing: the loop that catches the error and observes again (or the same loop
        # resumed) gets the control permutations an uninterrupted run draws.
        rng_state, pools = self.rng.get_state(), dict(self._control_pools)
        try:
            self._observe_generator(losses, latents, samples, weights, classes)
        except BaseException:
            self.rng.set_state(rng_state)
            self._control_pools = pools
            raise

    def _observe_generator(self, losses, latents, samples, weights, classes) -> None:
        if not self._bound or self.g_tracker is None:
            raise RuntimeError("call analyzer.bind(g_optimizer, d_optimizer) before analyzer.observe_generator(...)")
        if self.stopped:
            raise RuntimeError("the analyzer was stopped (its tracked window ended): do not observe later steps")
        self._check_consistent()
        # A previous g_optimizer.step() that raised half-way is rolled back (and refused) before any analysis
        # reads this micro-batch, whose forward saw the half-updated generator.
        self.g_tracker._check_consistent()
        self._settle()  # (what the last step owes, before this micro-batch's analysis reads the probes)
        # Under DDP the analyzer's own checks of this micro-batch (a non-finite loss or D gradient on one rank's shard)
        # are agreed before its first collective: a rank that refuses it alone would skip to the loop's next
        # collective (D's step) while the others wait in this micro-batch's, and the ranks fall apart (a crash or a
        # hang until the process group's timeout); every rank now refuses it, with the failing rank's kind.
        together = StepAgreement(self.g_tracker.distributed, "observe_generator() of this micro-batch (the analyzer's "
                                 "checks)", points=1)
        with together.meeting():
            batch = _check_losses(losses)
            for what, t in (("latents", latents), ("samples", samples)):
                if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != batch:
                    raise ValueError(f"{what} must be a Tensor [{batch}, ...] (one row per loss), got "
                                     f"{getattr(t, 'shape', type(t).__name__)}")
            if not samples.requires_grad:
                raise ValueError("samples carry no graph: pass samples = G(latents) as computed in the forward that gave the losses")
            self._check_step_latents(latents)
            classes = self._step_classes(classes, batch, "observe_generator")
            if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != (batch,)):
                raise ValueError(f"weights must be a Tensor of shape [{batch}] (one c_n per example)")
            # A forward under autocast is refused here under the default, before any analysis pass meets its
            # half-precision samples; observed, its precision is the tolerance of the losses' check, and the
            # geometry is read in G's own dtype (the analysis passes run D in its own precision).
            precision = self.g_tracker._check_precision(losses)
            dtype = getattr(floating_parameter(self._g), "dtype", samples.dtype)
            # Whether this micro-batch may open the step (nothing observed since the last step, or the gradients
            # cleared): the probes' geometry at θ_k is taken then (again, at the same θ, for a second micro-batch
            # observed before a joint backward). Which micro-batches the step counts is the tracker's decision,
            # read at the step (step_observations), not guessed here.
            first = _opens_step(self.g_tracker)
            index = self.g_steps + 1
            evaluate = (index - 1) % self.eval_every == 0
            if not first and evaluate and not self._probes_read_at_this_discriminator():
                # The micro-batch that read this step's probes was left without a step (a GradScaler that found inf, a
                # loss guard) and D stepped since: it is dropped when the loop clears the gradients (after this
                # observe), so this one opens the step, and the probes' geometry is read again at D as it is now.
                first = True
            with torch.enable_grad():
                (w,) = torch.autograd.grad(losses.sum(), samples, retain_graph=True, allow_unused=True)
            if w is None:
                raise ValueError("the losses do not depend on samples: pass samples = G(latents), the tensor your loss fed to D")
            w = w.detach().to(dtype)
            if not torch.isfinite(losses).all() or not torch.isfinite(w).all():
                bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
                raise NonFiniteError(
                    f"generator step {index} (phase generator): non-finite generator loss or discriminator gradient "
                    f"(examples {bad[:10]}); this micro-batch was not observed"
                )
            loss_fn = self._geometry_fn(self._loss_fn)
            if self._geometry_loss is None:
                if not self._loss_checked:
                    self._check_generator_losses(losses.detach(), samples.detach(), classes, precision)
                x = samples.detach().to(dtype)
                geo = {"z": latents.detach(), "x": x, "w": w, "losses": losses.detach().to(dtype),
                       "scores": self._scores(x, after_forward=True, classes=classes)}
                if classes is not None:
                    geo["classes"] = classes
            else:  # the geometry of another loss (a null model): w from D at the samples, D's buffers kept
                geo = self._push(latents.detach(), samples.detach().to(dtype), loss_fn, after_forward=True, classes=classes)
                if not torch.isfinite(geo["losses"]).all() or not torch.isfinite(geo["w"]).all():
                    bad = torch.nonzero(~torch.isfinite(geo["losses"])).flatten().tolist()
                    raise NonFiniteError(
                        f"generator step {index} (phase generator): non-finite geometry_loss or its gradient (examples "
                        f"{bad[:10]}); this micro-batch was not observed"
                    )
            # (no fill check on a micro-batch: a loop accumulating micro-batches of 2 latents fills 4 groups over its
            # step; the step's total is checked when its first step is recorded, _book_generator)
        self._fit_grouping(geo, loss_fn, after_forward=True)
        tracked = self._partition_ids(geo)
        vector = self._pull(samples, geo["w"], _coefficients(weights, batch, geo["w"])) if evaluate else None
        if first:
            self._begin_generator_step(index, vector, loss_fn, after_forward=True)
        # This micro-batch's pull's field: the step's field is the sum over the micro-batches it keeps (linear).
        field = (self._probe_state["field"] if first else self._field(vector)) if evaluate else None
        number = self.g_tracker.observe(losses, {k: v.to(losses.device) for k, v in tracked.items()}, weights)
        if self._g_pending is None:
            self._g_pending = {"observed": {}, "loop_step": None}
        self._g_pending["observed"][number] = {"ids": tracked[GEOMETRY], "zero": self._zero_gradient(geo),
                                               "spatial": tracked.get(SPATIAL), "field": field, "rows": batch,
                                               "given": weights is not None}
        self._loss_checked = True

    @_buffers_kept
    def observe_discriminator(
        self,
        losses: torch.Tensor,
        roles: torch.Tensor,
        inputs: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
        real_labels: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
    ) -> None:
        """Report one discriminator micro-batch of your loop, before its backward.

        Args:
            losses: ``[B]`` per-example discriminator losses with their graph.
            roles: ``LongTensor[B]``: 0 generated, 1 real, 2 gradient penalty.
            inputs: the discriminator batch ``[B, ...]`` (its first 32 real and 32 generated rows
                become D's probes on the first call, unless ``discriminator_probes`` were given).
            weights: per-example coefficients c_n ``[B]`` (default the mean; a loop whose loss is
                mean(real) + mean(generated) is followed as well: the scale is reported per step).
            real_labels: mode ids of the real rows (``discriminator_groups="role_mode"``).
            classes: a conditional GAN's classes of the rows, ``LongTensor[B]`` (the losses came from
                ``D(inputs, classes)``); required with ``probe_classes``, refused without.

        The loop's ``d_optimizer.step()`` records the step. A loop that shows D its real and
        generated rows in two micro-batches (the DCGAN example) is followed as accumulation.
        """
        if self.stopped:
            raise RuntimeError("the analyzer was stopped (its tracked window ended): do not observe later steps")
        if not self.track_discriminator:
            return
        if not self._bound or self._d_optimizer is None:
            raise RuntimeError("call analyzer.bind(g_optimizer, d_optimizer) before analyzer.observe_discriminator(...)")
        self._check_consistent()
        if self.d_tracker is not None:
            self.d_tracker._check_consistent()  # as in observe_generator
        self._settle()
        batch = _check_losses(losses)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] != batch:
            raise ValueError(f"inputs must be the discriminator batch, a Tensor [{batch}, ...], got "
                             f"{getattr(inputs, 'shape', type(inputs).__name__)}")
        roles = _check_roles(roles, batch)
        classes = self._step_classes(classes, batch, "observe_discriminator")
        ids = self._discriminator_ids(roles, inputs, real_labels)
        if not self._d_fill_checked:
            self._check_fillable(self._d_num_groups, batch, f"discriminator grouping {self.discriminator_groups!r}")
            self._d_fill_checked = True
        if self.d_tracker is None:
            # Built now, after the loop's forward: its checks run on copies of D's buffers, so the graph
            # that forward saved them in (training-mode BatchNorm) still backpropagates.
            with preserved(self._d):
                self._build_discriminator_tracker(self.discriminator, self._d_optimizer, _ObservedOnly("discriminator"),
                                                  math.inf, inputs, roles, batch, wrap_critic=False, classes=classes)
            self._d_first_theta = [p.detach().clone() for p in self._d.parameters()]
        else:
            self._check_first_discriminator_step()
        number = self.d_tracker.observe(losses, ids.to(losses.device), weights)
        if self._d_pending is None:  # (keyed by observation number: the step counts the micro-batches it keeps)
            self._d_pending = {"observed": {}, "loop_step": None}
        self._d_pending["observed"][number] = ids

    def _check_first_discriminator_step(self) -> None:
        """A D tracker built at an observed micro-batch inside ``d_optimizer.step(closure)`` missed that
        step (its pre-step hook did not exist when the step began): D moved with no step recorded, and
        its ledger would start from the weights before. Refused with what to change."""
        if self._d_first_theta is None:
            return
        if self.d_tracker.ledger.steps > 0:
            self._d_first_theta = None
            return
        if all(torch.equal(p.detach(), before) for p, before in zip(self._d.parameters(), self._d_first_theta)):
            return
        raise ValueError(
            "the discriminator moved after its first observed micro-batch without a recorded step: its tracker is "
            "built at the first observe_discriminator (its probes default to that batch's rows), and that call came "
            "inside d_optimizer.step(closure), after the step had begun, so the step ran untracked. Pass "
            "discriminator_probes= (a Tensor [P, ...] of fixed discriminator inputs) to GANKernelAnalyzer, which then "
            "builds the discriminator's tracker at bind, before any step; or call observe_discriminator and the "
            "backward before d_optimizer.step(), without a closure"
        )

    def on_train_start(self, trainer: Any) -> None:
        trained = getattr(trainer, "num_classes", None)
        if (self.conditional and isinstance(trained, numbers.Integral) and not isinstance(trained, bool)
                and trained > self.num_classes):
            # (checked per step only, it was refused at the first batch that happened to hold a class id of at least
            # the analyzer's count: iterations later, both players updated and the run cut off mid-way)
            raise ValueError(
                f"the trainer draws classes 0..{int(trained) - 1} (num_classes={int(trained)}) but this analyzer takes "
                f"class ids in [0, {self.num_classes}) (num_classes={self.num_classes}): build the analyzer with "
                f"num_classes={int(trained)}, as the trainer's"
            )
        # A state loaded before the trainer's run (by hand, or claimed by a train() after the trainer's resume) keeps
        # the generator's tracker until the first generator step rebuilds it: its EMA ledger compared now, before the
        # iteration's discriminator steps move D (refused at the rebuild, the trainer was left one D update on).
        if not self._bound:
            ema = self.ema_ledger == "trainer" and getattr(trainer, "ema", None) is not None
            self._check_pending_ema(ema, "ema_ledger={}")

    def _check_pending_ema(self, ema: bool, fix: str) -> None:
        """Refuse a loaded generator tracker state (not rebuilt yet) whose EMA ledger the tracker built now would not
        have (``ema``) or would lack: its load would refuse it at the rebuild. ``fix``: the argument that fits, with a
        ``{}`` for its value. A state saved after its window ended rebuilds no tracker: nothing compared."""
        saved = (self._pending or {}).get("g_tracker")
        if saved is None or self.stopped:
            return
        kept = saved_tracker_settings(saved)["ema"]
        if kept != ema:
            value = ("'trainer'" if kept else "'none'") if fix.startswith("ema_ledger") else (
                "the EMA the saved run updated" if kept else "None")
            refuse_tracker_settings([("EMA ledger", "kept" if kept else "none", "kept" if ema else "none",
                                      fix.format(value))], "trackers")

    def on_train_end(self, trainer: Any) -> None:
        self.finish()

    def finish(self) -> None:
        """Close the coupling window in progress as a partial one (``partial_window`` in the report;
        training may go on: the next full window is unaffected), and log the final numbers and
        matrices when the analyzer has a ``log``. After :meth:`stop` the window it closed stays."""
        if not self.stopped:
            if self._broken is None:  # (a refusing analyzer refuses at its next step, save or report)
                self._settle()
            self._close_partial_window()
        if self.logging is not None:
            self.logging.on_train_end(None)

    def _close_partial_window(self) -> None:
        """``partial_window``: the coupling window in progress, closed as a partial one (None when
        no window is open)."""
        self.partial_window = None
        if self._view("g_tracker") is None or self._window_start is None or not self.g_steps % self.window:
            return
        first = self.g_steps - (self.g_steps - 1) % self.window  # the open window's first step
        record = self._window_record(first, self.g_steps, self._window_start, self._window_groups, self._window_spatial,
                                     self._window_zero)
        record["partial"] = True
        self.partial_window = record

    # -- generator -----------------------------------------------------------------------------
    def _scores(self, x: torch.Tensor, *, after_forward: bool, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` D(x) (a conditional GAN's D(x, classes)), D's buffers kept."""
        with torch.no_grad(), preserved(self._d, reuse_power_iteration=after_forward), full_precision(self._d):
            return scores_of(self._d(x, *class_inputs(classes)), x.shape[0]).detach()

    def _geometry(self, latents: torch.Tensor, loss_fn, *, after_forward: bool,
                  classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"z", "x", "w", "losses", "scores"}`` (and ``"classes"``) of probe (or reference) latents
        ``[M, ...]`` (with their classes ``[M]``) at the current θ: G in eval mode (as the tracker
        evaluates probes), D in its current mode, every buffer kept."""
        with torch.no_grad(), preserved(self._g), analysis_mode(self._g):
            x = output_tensor(self._g(latents, *class_inputs(classes))).detach()
        return self._push(latents, x, loss_fn, after_forward=after_forward, classes=classes)

    def _push(self, latents: torch.Tensor, x: torch.Tensor, loss_fn, *, after_forward: bool,
              classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """w = ∇_x ℓ_G(D(x)) at samples ``x [B, ...]`` (``loss_fn(x, None)`` closes over D; a conditional
        GAN's w_i = ∇_x ℓ_G(D(x, y_i)), ``loss_fn(x, classes)``, each example at its own class), D's
        losses and scores: D in its current mode, its buffers kept (:func:`~genkernel.gan.passes.preserved`)."""
        with torch.enable_grad(), preserved(self._d, reuse_power_iteration=after_forward), full_precision(self._d):
            xr = x.clone().requires_grad_(True)
            losses = loss_fn(xr, classes)
            if not isinstance(losses, torch.Tensor) or losses.shape != (x.shape[0],):
                raise ValueError(f"the generator loss must return per-example losses of shape [{x.shape[0]}]")
            (w,) = torch.autograd.grad(losses.sum(), xr)
        geo = {"z": latents.detach(), "x": x, "w": w.detach(), "losses": losses.detach(),
               "scores": self._scores(x, after_forward=after_forward, classes=classes)}
        if classes is not None:
            geo["classes"] = classes
        return geo

    def _check_generator_losses(self, losses: torch.Tensor, samples: torch.Tensor,
                                classes: torch.Tensor | None = None, precision: torch.dtype | None = None) -> None:
        """The first observed micro-batch: ``generator_loss(samples)`` (a conditional GAN's
        ``generator_loss(samples, classes)``) must give the loop's losses; a forward observed in half
        ``precision`` is repeated under autocast to it and compared at two of its eps."""
        with torch.no_grad(), preserved(self._d, reuse_power_iteration=True), loop_precision(samples, precision):
            mine = self.generator_loss(samples, *class_inputs(classes))
        if not isinstance(mine, torch.Tensor) or mine.shape != losses.shape:
            raise ValueError(f"generator_loss(samples) must return per-example losses of shape {tuple(losses.shape)}, "
                             f"got {getattr(mine, 'shape', type(mine).__name__)}")
        tol = _loss_tolerance(losses, precision)
        scale = max(1.0, float(losses.abs().max()))
        if torch.allclose(mine.to(losses), losses, rtol=tol, atol=tol * scale):
            return
        gap = float((mine.to(losses) - losses).abs().max())
        if precision is None and torch.allclose(mine.to(losses), losses, rtol=1e-4, atol=1e-4 * scale):
            cause = (
                "They agree only roughly: the loss is right, but your losses came from another evaluation of D than "
                "D(samples) now (D changed in between, randomness in D such as dropout in training mode, or samples "
                "other than the tensor fed to D). Compute the losses from D(samples) just before observe_generator."
            )
        else:
            cause = self._diagnose(losses, samples, classes, precision)
        raise ValueError(
            f"the analyzer's generator_loss does not reproduce your generator losses on the first observed micro-batch "
            f"(max gap {gap:.3g}); the probes' geometry w(z') needs your loss as a function of the samples. " + cause
        )

    def _diagnose(self, losses: torch.Tensor, samples: torch.Tensor, classes: torch.Tensor | None = None,
                  precision: torch.dtype | None = None) -> str:
        with torch.no_grad(), preserved(self._d, reuse_power_iteration=True), loop_precision(samples, precision):
            s = scores_of(self._d(samples, *class_inputs(classes)), samples.shape[0]).detach().to(torch.float64)
        user = losses.to(torch.float64)
        # a conditional analyzer calls its loss as fn(samples, classes): the fixes say so
        more, args, call = (", conditional=True", "x, y", "D(x, y)") if self.conditional else ("", "x", "D(x)")
        candidates = [
            ("D returns logits and the loss is the non-saturating one (BCEWithLogitsLoss against 1)",
             F.softplus(-s), f"generator_loss=GeneratorLoss(D{more}) (output='logit')"),
            ("the hinge / WGAN generator loss −D(x)", -s, f"generator_loss=GeneratorLoss(D, kind='hinge'{more})"),
            ("the saturating minimax loss log(1 − σ(D(x)))", -F.softplus(s),
             f"generator_loss=lambda {args}: -torch.nn.functional.softplus({call}.view(-1))"),
        ]
        if bool(((s >= 0) & (s <= 1)).all()):
            candidates.insert(0, ("D returns probabilities (it ends in a sigmoid) and the loss is BCELoss against 1",
                                  -torch.log(s).clamp_min(-100.0),
                                  f"generator_loss=GeneratorLoss(D, output='probability'{more})"))
        scale, tol = max(1.0, float(user.abs().max())), max(1e-4, _loss_tolerance(losses, precision))
        for text, value, fix in candidates:
            if torch.allclose(value, user, rtol=tol, atol=tol * scale):
                return f"Your losses look like {text}: pass {fix}."
        return (
            "Likely causes: D outputs probabilities (a final sigmoid) but the loss expects logits, or the other way round "
            "(GeneratorLoss(D, output='probability')); another loss kind (GeneratorLoss(D, kind='hinge')); or losses "
            "from another forward of D than D(samples). Pass generator_loss=<fn(samples) -> [B] losses> matching your loop"
            + (" (conditional: fn(samples, classes), e.g. GeneratorLoss(D, ..., conditional=True))." if self.conditional
               else ".")
            # (a random augmentation has no deterministic loss of the samples to reproduce; the ledgers need none)
            + " A loop that shows D its rows through a random differentiable augmentation (DiffAugment, ADA) has no "
            "such function: pass geometry_loss=GeneratorLoss(D) (the geometry of D on the samples themselves; the "
            "ledgers take the loop's own gradients, augmentation included, and stay exact)."
        )

    def _fit_grouping(self, geo: dict[str, torch.Tensor], loss_fn, *, after_forward: bool) -> None:
        """Fit the grouping (and the comparison) once, on the first batch and the probes (or ``reference_latents``)."""
        if self.grouping.fitted and (self.comparison is None or self.comparison.fitted):
            return
        if self.reference_latents is not None:
            ref = self._geometry(self._checked_latents(self.reference_latents, "reference_latents", self.reference_classes,
                                                       "reference_classes"), loss_fn,
                                 after_forward=after_forward, classes=self.reference_classes)
        else:
            probe = self._geometry(self.probe_latents, loss_fn, after_forward=after_forward, classes=self.probe_classes)
            # Under DDP "the first batch" is the global one, every rank's shard in rank order, as one process holds
            # it: fitted on its own shard, each rank's group g would be another cluster, and the ranks' group rows,
            # summed row by row, would mix them (silently: the groups' sum stays exact).
            group = ddp_group(self.generator, self.discriminator)
            ref = {k: torch.cat([gathered_over_ranks(_flat_latents(geo[k]) if k == "z" else geo[k], group),
                                 _flat_latents(probe[k]) if k == "z" else probe[k]]) for k in ("z", "x", "w", "scores")}
        for grouping in (self.grouping, self.comparison):
            if grouping is not None and not grouping.fitted:
                grouping.fit(_flat_latents(ref["z"]), ref["x"], ref["w"], ref["scores"])

    def _partition_ids(self, geo: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """2. Geometry ids (and the comparison's spatial ids) and the permuted control ids of the same step (or
        observed micro-batch): each control an independent permutation of its ids, under 8 examples with the last
        examples' ids beside its own (:func:`~genkernel.core.grouping.permuted_labels`: a micro-batch of two latents
        would otherwise give a control its own ids half the time)."""
        ids = self._assign(self.grouping, geo)
        tracked = {GEOMETRY: ids}
        if self.comparison is not None:
            tracked[SPATIAL] = self._assign(self.comparison, geo)
        for measured, names in ((GEOMETRY, self.control_names), (SPATIAL, self.spatial_control_names)):
            if names:
                controls, self._control_pools[measured] = grouping_layer.control_labels(
                    tracked[measured], len(names), self.rng, self._control_pools[measured])
                tracked.update(zip(names, controls))
        return tracked

    def _zero_gradient(self, geo: dict[str, torch.Tensor]) -> torch.Tensor:
        """``BoolTensor[B]`` (CPU): the examples whose geometry group is undefined, w_i = 0 exactly under a grouping
        by w's direction (``"direction"``, ``"mode"``): D is flat there (a saturated or dead-ReLU region), and the
        grouping's tie-break (the centre nearest the origin, mode 0) names a group the geometry does not give. Their
        ledger rows stay where the grouping put them (a plain training loss gives them zero contributions; a
        ``geometry_loss`` other than the training loss need not), but the group counts leave them out and count
        them apart (``g_zero_counts``, a window's ``training_zero_gradient``), so that a flat D does not fill a
        group, nor mark a collapsed window occupied."""
        batch = geo["w"].shape[0]
        if not isinstance(self.grouping, (DirectionGroups, ModeGroups)) or isinstance(self.grouping, NearestModeGroups):
            return torch.zeros(batch, dtype=torch.bool)
        return (geo["w"].detach().reshape(batch, -1) == 0).all(dim=1).cpu()

    def _begin_generator_step(self, index: int, vector, loss_fn, *, after_forward: bool) -> None:
        """3. At evaluation steps the probes' geometry and the kernel field at θ_k; window openings."""
        if self._bound and self._ema is not None:
            self._ema_count_at_step = ema_update_count(self._ema)
        if (index - 1) % self.eval_every == 0:
            probe = self._geometry(self.probe_latents, loss_fn, after_forward=after_forward, classes=self.probe_classes)
            probe["groups"] = self._assign(self.grouping, probe)
            probe["zero"] = self._zero_gradient(probe)
            if self.comparison is not None:
                probe["spatial_groups"] = self._assign(self.comparison, probe)
            probe["field"] = self._field(vector() if callable(vector) else vector)
            self._probe_state = probe
            self._probe_d_clock = self._discriminator_clock()
        if (index - 1) % self.window == 0:
            self._window_start = {name: ledger.copy() for name, ledger in self.g_tracker.ledgers.items()}
            self._window_groups = self._probe_state["groups"].clone()
            self._window_zero = self._probe_zero()
            if self.comparison is not None:
                self._window_spatial = self._probe_state["spatial_groups"].clone()
        if self._run_groups is None:
            self._run_groups = self._probe_state["groups"].clone()
            self._run_zero = self._probe_zero()
            if self.comparison is not None:
                self._run_spatial = self._probe_state["spatial_groups"].clone()

    def _discriminator_clock(self) -> int | None:
        """D's steps as far as the analyzer sees them (its tracker's booked steps), None where it cannot tell
        (D untracked, or its tracker not built yet)."""
        return None if self.d_tracker is None else self.d_tracker.ledger.steps

    def _probes_read_at_this_discriminator(self) -> bool:
        """Whether the probes' geometry was read at D as it is now (no D step booked since); False where
        that cannot be told: the geometry is then read again (the same θ, so only D can differ)."""
        clock = self._discriminator_clock()
        return clock is not None and clock == self._probe_d_clock

    def _probe_zero(self) -> torch.Tensor:
        """``BoolTensor[M]`` the probes at the last evaluation whose geometry group is undefined (w = 0,
        :meth:`_zero_gradient`); none for a probe state loaded from a version that did not keep it."""
        zero = self._probe_state.get("zero")
        return torch.zeros(self.probe_latents.shape[0], dtype=torch.bool) if zero is None else zero.cpu().clone()

    def _build_generator_tracker(self, optimizer, loss_fn, max_grad_norm: float, batch: int | None = None,
                                 micro_batches: int | None = None) -> None:
        # Group gradients from the training step's own graph (R masked backward passes), never from a
        # second per-example pass: that pass would run D again after the training forward (a
        # training-mode D would advance spectral norm once more, and BatchNorm would see single examples).
        # Kept only once built and loaded: a saved state refused (another probe set, model or optimizer) leaves
        # no tracker behind, or the next step would track from scratch without the analyzer's bookkeeping.
        probes = self.probe_latents if not self.conditional else (self.probe_latents, self.probe_classes)
        tracker = PathKernelTracker(
            self.generator, optimizer, loss_fn, probes,
            num_groups=self.partitions, quadrature=self.quadrature, max_grad_norm=max_grad_norm,
            group_state="dense", gradient_route="graph", batch_size=batch, micro_batches=micro_batches,
            memory_check=self.memory_check, state_dtype=self.state_dtype, cost_options=GAN_COST_OPTIONS,
            mixed_precision=self.mixed_precision,
            # G's loss reads its samples through D: a parameter D cancels (G's output bias before a training-mode
            # BatchNorm after D's first linear layer) is structurally null, its float32 rounding times Adam no group's.
            outputs_read_through=self._d,
        )
        try:
            if self._ema is not None:
                tracker.track_ema(self._ema)
            if self._pending and self._pending.get("g_tracker") is not None:
                tracker.load_state_dict(self._pending["g_tracker"])
                _stand_in_after_resume(tracker, loss_fn)
            # The analyzer's own passes (geometry, probes, field): counted once, checked beside the tracker.
            # (bind builds it before the analyzer is marked bound: an observing tracker's loss function says it)
            # (a loop bound before its first step: the probes' count and one micro-batch stand in for B and K until
            # that step, when the tracker estimates again with its own and _follow_generator_batch counts these again)
            self._pass_record = self.analysis_pass_cost(batch=tracker.cost.settings["batch"],
                                                        micro_batches=tracker.cost.settings["micro_batches"],
                                                        observed=isinstance(loss_fn, _ObservedOnly))
            self._check_passes_fit(tracker.cost)
        except BaseException:
            tracker.close(record_ema=False)
            raise
        tracker.add_cost_follower(self._follow_generator_batch)
        if self._pending:
            self._pending["g_tracker"] = None
        tracker.listeners.append(self._record_generator)
        self.g_tracker = tracker
        self._g_f_prev = self.g_tracker.ledger.f_end.clone()
        self._g_drift_prev = self.g_tracker.ledger.buffer_drift.clone()

    def analysis_pass_cost(self, batch: int | None = None, micro_batches: int | None = None, *,
                           observed: bool | None = None) -> dict[str, Any]:
        """What the analyzer's own passes through G and D cost, besides its trackers' steps, in the generator
        tracker's unit (one example's forward through G): ``{"work": {part: per tracked generator step},
        "once": {part: at the first step}, "bytes": the largest pass's peak, "cheaper": [...], "settings": {...}}``
        (:func:`~genkernel.core.cost.with_analysis_passes` adds it to the tracker's estimate: :attr:`cost`).

        ``batch`` (B) and ``micro_batches`` (K) of a generator step, default the generator tracker's estimate's (in
        a loop of your own bound before its first step the probes' count and 1, then that step's own: the tracker
        estimates again with them there, and :attr:`cost` follows); ``observed``: the steps of a loop of
        your own (:meth:`bind`) or steps the analyzer performs (default: whether it is bound to a loop). Counted,
        with M probes, u a D forward over a G forward (one example each, as the tracker counts its unit:
        :func:`~genkernel.core.cost.hooked_forward_counts`, the products of D's passes in G's forwards),
        u_x D's input-gradient share (every layer downstream of x), b = β + share G's backward through its
        trained parameters (no input gradient of the latents), j = 1 + one-sided + b a JVP of G's parameters:

        - ``batch_geometry``, every step: owned (:meth:`_micro_batch_geometry`), G's forward of the batch, w_i
          from D's forward with a graph and its backward to x alone (``torch.autograd.grad`` w.r.t. x: D's weight
          gradients are not formed), D's scores (a no-grad forward): B (1 + 2u + u_x), and D's no-grad loss forward
          of every micro-batch but the last, (B − b_K) u; observed (:meth:`observe_generator`), w_i from the loop's
          own graph (a backward through D to the samples) and the scores: B (u_x + u), with ``geometry_loss``
          its push in place of the scores, B (u_x + 2u + u_x);
        - ``probe_geometry``: at evaluation steps (every ``eval_every``-th), the probes' samples (G, no grad) and
          their push, M (1 + 2u + u_x), over ``eval_every``; in a loop of your own whose D the analyzer does not
          track, once per micro-batch (K M (1 + 2u + u_x)): it cannot tell whether D stepped between them;
        - ``kernel_field``: at evaluation steps the pulled vector Σ_i c_i J_G(z_i)ᵀ w_i (G's backward of the batch,
          B b: owned, from the batch pass's graph; observed, from the loop's) and the field's JVP at the probes,
          M j (observed: one per micro-batch, K M j), over ``eval_every``;
        - ``coverage`` (with ``mode_centers``): G's forward of the coverage latents at evaluation steps, over
          ``eval_every``;
        - once: ``grouping_fit``, the geometry of the reference latents (or the probes) a grouping is fitted on
          at the first step, n (1 + 2u + u_x), and reference latents' shape check, n (1 + u); none for groupings
          fitted from the start (classes, nearest mode, a function); ``loss_check``, an observed loop's first
          micro-batch's losses reproduced, b_1 u; ``cost_counts``, this estimate's own one-row passes, 2 + u.

        Memory: the largest pass's peak, ``"peaks"`` by pass: a graph at 1.25× its activations (what autograd saves
        of a forward, about each layer's input or output, and what the modules' outputs miss: attention's inner
        products, a GELU's input; a D push also holds x's copy and w, two samples a row) and the pulled vector (G's
        parameters; with micro-batches the sum, the next micro-batch's and their new sum: three). Against the peak
        resident memory measured on CPU (float32) the predictions are 1.2–1.3× a D push's on the 64×64 DCGAN
        (probes, batch 8–64), 1.0× on a two-layer transformer D and 1.1× on a GELU/LayerNorm MLP D (256 rows),
        1.5–1.9× the DCGAN's batch pass, 1.6–1.7× its field; the training step's 3× the activations had put the
        DCGAN's passes at 2.8–4.2× their peak (refusing runs that fit).

        ``"held"``: what the analyzer keeps from step to step (the window's start ledgers, the probe state, the
        previous f_end and drift, the last evaluation's snapshot); ``"listener"``: the [M, d] float64 arrays its
        bookkeeping after each step holds at once, beside the recorded step the tracker still holds
        (:func:`~genkernel.core.cost.with_analysis_passes` counts both; uncounted before, the estimate was 0.44-0.49
        of the measured peak on the 64×64 DCGAN G at M = 32-128). ``"held"`` counts the most ``fields`` keeps
        (``field_snapshots``, ``settings["analysis_history_per_evaluation"]`` bytes each); with ``"all"``, the
        snapshots grow with the run and only the last one is counted.

        Besides, what the generator tracker's estimate leaves out of a GAN's step (it counts G alone): ``bare_step``,
        D's forward of the samples and its backward to them in training's loss, B (u + u_x), added to the bare step
        (in a loop of your own whose backward also forms D's weight gradients, those are not counted); and
        ``discriminator_backward``, the tracker's R backward passes of the batch (its group gradients, one per group
        row) through D to the samples, R B u_x per step."""
        tracker_cost = None if self.g_tracker is None else self.g_tracker.cost
        if batch is None:
            if tracker_cost is None:
                raise RuntimeError("pass batch=, or let the analyzer build its generator tracker first (bind, or a "
                                   "step)")
            batch = int(tracker_cost.settings["batch"])
        if micro_batches is None:
            micro_batches = 1 if self.g_tracker is None else int(self.g_tracker.cost.settings["micro_batches"])
        batch = positive_int(batch, "batch")
        micro_batches = positive_int(micro_batches, "micro_batches")
        g_param, d_param = floating_parameter(self._g), floating_parameter(self._d)
        z = self.probe_latents[:1]
        y = class_inputs(None if self.probe_classes is None else self.probe_classes[:1])
        # One example through each network, counted as the tracker counts its unit (hooked_forward_counts, in eval
        # mode, every buffer kept): G's backward and JVP through its trained parameters, D's layers downstream of x.
        with preserved(self._g), analysis_mode(self._g):
            with torch.no_grad():
                x = output_tensor(self._g(z, *y)).detach()
            g_acts, g_macs, g_trained, g_layers = hooked_forward_counts(self._g, (z, *y), grad=True)
        x = x if d_param is None else x.to(d_param.dtype)
        held = {name: p for name, p in self._d.named_parameters() if p.requires_grad}
        with preserved(self._d), analysis_mode(self._d):
            d_acts, d_macs, _, d_layers = hooked_forward_counts(_FromInput(self._d), (x, *y), grad=True, constants=held)
        unit = max(g_macs, 1)
        u, u_x = d_macs / unit, d_layers.input_gradients / unit
        back = (g_layers.input_gradients + g_trained) / unit
        jvp_pass = 1.0 + g_layers.one_sided / unit + back
        push = 2.0 * u + u_x  # w at given samples: D's forward with a graph, its backward to x, the scores
        geometry = 1.0 + push  # the samples themselves first (G, no grad)
        m = int(self.probe_latents.shape[0])
        rows = micro_batch_rows(batch, micro_batches)
        first, last = rows[0].stop - rows[0].start, rows[-1].stop - rows[-1].start
        observed = self._bound if observed is None else bool(observed)
        if observed:
            # the loop's graph's backward to the samples, then the scores, or with a geometry_loss its own push
            batch_geometry = batch * u_x + (batch * push if self._geometry_loss is not None else batch * u)
            field_passes = micro_batches
        else:
            batch_geometry = batch * geometry + (batch - last) * u
            field_passes = 1
        every = self.eval_every
        # An observed loop whose D the analyzer does not track cannot tell whether D stepped between the micro-batches
        # of a step (_probes_read_at_this_discriminator): each of an evaluation step's K reads the probes' geometry
        # again (left out before: on the conv pair, B = 6 in 2 micro-batches, 21 example-forwards every 2 steps).
        probe_reads = micro_batches if observed and not (self.track_discriminator and self._d_optimizer is not None) \
            else 1
        work = {"batch_geometry": batch_geometry, "probe_geometry": probe_reads * m * geometry / every,
                "kernel_field": (batch * back + field_passes * m * jvp_pass) / every}
        coverage = int(self.coverage_latents.shape[0]) if self.mode_centers is not None else 0
        if coverage:
            work["coverage"] = coverage / every
        fit_rows, checked = 0, 0
        if not (self.grouping.fitted and (self.comparison is None or self.comparison.fitted)):
            fit_rows = m if self.reference_latents is None else int(self.reference_latents.shape[0])
            checked = 0 if self.reference_latents is None else fit_rows  # their shape check: G and D, no grad
        # (and this estimate's own hooked passes of one row: G's sample, G's and D's counts)
        once = {"grouping_fit": fit_rows * geometry + checked * (1.0 + u), "cost_counts": 2.0 + u}
        if observed and self._geometry_loss is None and not self._loss_checked:
            once["loss_check"] = first * u
        # Memory (bytes): a graph holds about its activations once, 1.25x here for what the modules' outputs miss
        # (attention's inner products, a GELU's or LayerNorm's saved inputs), not training's 3x, which counts a
        # step's gradients and temporaries too; a push of D also holds x's copy that requires grad and w (two
        # samples a row). The pulled vector: one micro-batch's, or with several the sum, the next one's and their
        # new sum.
        # (bytes per value over every parameter's own dtype, and the pulled vector in each of G's: param_bytes)
        gb = 4 if g_param is None else value_bytes([p for p in self._g.parameters() if p.is_floating_point()])
        db = gb if d_param is None else value_bytes([p for p in self._d.parameters() if p.is_floating_point()])
        g_graph, d_graph = int(int(1.25 * g_acts) * gb), int((int(1.25 * d_acts) + 2 * x[0].numel()) * db)
        vector = parameter_bytes(trainable_parameters(self._g))
        pulled = (1 if micro_batches == 1 else 3) * vector
        micro = first
        peaks = {
            # owned: a micro-batch's G graph (kept for the pull at evaluation steps), D's graph of its push, and
            # the pulled vector (with micro-batches, the sum too); observed: each micro-batch's pull (its own field)
            # and a geometry_loss's push
            "batch_geometry": (vector + (0 if self._geometry_loss is None else micro * d_graph)) if observed
            else micro * (g_graph + d_graph) + pulled,
            "probe_geometry": m * d_graph + vector,  # the pulled vector is held until the field
            # the JVP's primal and tangent activations (no graph), the vector and its tangents, the field
            "kernel_field": 2 * m * g_acts * gb + 2 * vector + m * x[0].numel() * 8,
            "grouping_fit": fit_rows * d_graph,
            "coverage": coverage * g_acts * gb,
        }
        largest = max(peaks, key=peaks.get)
        cheaper, cheaper_memory = [], []
        per_eval = work["probe_geometry"] + work["kernel_field"] + work.get("coverage", 0.0)
        if per_eval > 0.25 * sum(work.values()) or largest in ("probe_geometry", "kernel_field"):
            cheaper.append(
                f"the GAN analyzer's evaluations ({per_eval * every:.0f} example-forwards of G each: the probes' "
                f"geometry and the kernel field{', coverage' if coverage else ''}): a larger eval_every (now {every}; "
                f"it must divide window), fewer probe_latents (now {m})"
                + (f", fewer coverage_latents (now {coverage})" if coverage else ""))
        if largest == "grouping_fit" and self.reference_latents is not None:
            cheaper_memory.append(f"fewer reference_latents (now {fit_rows}: their geometry, once, is the analyzer's "
                                  "largest pass)")
        if largest == "batch_geometry" and not observed:
            cheaper_memory.append(f"more micro_batches (now {micro_batches}: the analyzer's batch geometry holds one "
                                  "micro-batch's graphs of G and D)")
        if observed and self._geometry_loss is not None:
            cheaper.append(f"no geometry_loss (its push of every batch: {batch * push:.0f} example-forwards a step)")
        # What the tracker's estimate of a GAN's generator step leaves out (it counts G alone): training's loss runs
        # through D, a forward and its backward to the samples (D frozen: no weight gradient), in the bare step; and
        # each of the dense graph route's R backward passes (one per group row) runs through D to the samples too.
        work["discriminator_backward"] = sum(self.partitions.values()) * batch * u_x
        # Kept from step to step (uncounted before: the estimate 0.44 of the measured peak on the 64×64 DCGAN G at
        # M = 128, d = 12288): the window's start ledgers (a copy of every partition's, _window_start), the probe
        # state's field (float64) and its samples x and geometry w, the generator ledger's f_end and buffer drift
        # before the step (_g_f_prev, _g_drift_prev), and the snapshots in ``fields``: each its change and the
        # field, x and w of its evaluation (``settings["analysis_history_per_evaluation"]``), the last
        # evaluation's sharing the probe state's. At most field_snapshots are kept, the newest not always the last
        # evaluation's (a thinned list keeps evaluations 0, s, 2s, ...): counted as that many whole snapshots; with
        # "all", the last one's change alone, the list growing by one snapshot every evaluation beyond any per-step
        # estimate.
        d = x[0].numel()
        groups, partitions = sum(self.partitions.values()), len(self.partitions)
        per_evaluation = m * d * (16 + gb + db)
        snapshots = 8 * m * d if self.field_snapshots == "all" else self.field_snapshots * per_evaluation
        state = ledger_bytes(m, d, groups, partitions) + 3 * m * d * 8 + m * d * (gb + db) + snapshots
        # The listener (_record_generator, inside the tracker's track, beside the recorded step), [M, d] float64
        # arrays alive at once, counted (live storages under a dispatch mode, tests/test_cost_listener.py):
        # 9 at an evaluation step (the change, the step's drift, the predicted change, the local push and the
        # cosines' unit rows), 7 + R + 7 P when a window closes (its ledgers' differences, every partition's
        # [M, G, d] and seven [M, d] fields, the null parameters' moves among them, beside 7).
        listener = 8 * m * d * max(9, 7 + groups + 7 * partitions)
        return {"work": work, "once": once, "bytes": int(peaks[largest]), "held": int(state), "listener": int(listener),
                "peaks": {k: int(v) for k, v in peaks.items()}, "cheaper": cheaper,
                "cheaper_memory": cheaper_memory, "bare_step": batch * (u + u_x),
                "settings": {"analysis_discriminator_forward": u, "analysis_discriminator_input_gradient": u_x,
                             "analysis_eval_every": every, "analysis_largest_pass": largest,
                             "analysis_micro_batches": micro_batches, "analysis_observed": observed,
                             "analysis_history_per_evaluation": int(per_evaluation),
                             "analysis_field_snapshots": self.field_snapshots}}

    @property
    def cost(self) -> CostEstimate:
        """The generator tracker's estimate (:attr:`PathKernelTracker.cost`) with the analyzer's own passes added
        (:meth:`analysis_pass_cost`: the batch's geometry every step, the probes' geometry and the kernel field at
        evaluation steps amortized over ``eval_every``, the grouping's fit once in ``settings["analysis_once"]``;
        memory ``analysis_passes``, the largest pass's peak beyond the step's temporaries:
        :func:`~genkernel.core.cost.with_analysis_passes`), and what the tracker's estimate, which counts G alone,
        leaves out of a GAN's step: D's forward and backward in the bare step, and its group gradients' backward
        passes through D (``discriminator_backward``). ``g_tracker.cost`` stays the tracker's alone. The
        discriminator tracker's estimate is ``d_tracker.cost`` (the analyzer runs no pass of its own for D's steps
        but its probes' first rows)."""
        if self.g_tracker is None or self.g_tracker.cost is None or self._pass_record is None:
            raise RuntimeError("the analyzer has no generator tracker yet: bind it (your own loop) or run a generator "
                               "step")
        return with_analysis_passes(self.g_tracker.cost, self._pass_record)

    def _follow_generator_batch(self, tracker: PathKernelTracker) -> Callable[[], None] | None:
        """The generator tracker estimated again at its first step, with that step's batch and micro-batches in
        place of the stand-ins (a loop bound before its first step: the probes' count, one): the analyzer's own
        passes counted again with them (the batch's geometry, the pulled vector, D's share of the step and of the
        group gradients' backward passes), and checked beside the new estimate as at bind
        (:meth:`_check_passes_fit`; a refusal leaves the record as it was, and the tracker its estimate and the
        step). The one-off passes keep their count from bind (the grouping's fit, the losses' check, which ran at
        the first micro-batch: that check with the first micro-batch's rows now), this count's own passes added.
        Returns what puts the record back (another rank refused the step)."""
        previous = self._pass_record
        if previous is None:
            return None
        settings = tracker.cost.settings
        batch, micro_batches = int(settings["batch"]), int(settings["micro_batches"])
        record = self.analysis_pass_cost(batch=batch, micro_batches=micro_batches,
                                         observed=previous["settings"]["analysis_observed"])
        once = dict(previous["once"])
        once["cost_counts"] = once.get("cost_counts", 0.0) + record["once"].get("cost_counts", 0.0)
        if "loss_check" in once:
            first = micro_batch_rows(batch, micro_batches)[0]
            once["loss_check"] = (first.stop - first.start) * record["settings"]["analysis_discriminator_forward"]
        record["once"] = once
        self._pass_record = record
        try:
            self._check_passes_fit(tracker.cost)  # (its refusal named by the tracker: the step and its batch)
        except BaseException:
            self._pass_record = previous
            raise

        def back() -> None:
            self._pass_record = previous

        return back

    def _check_passes_fit(self, tracker_cost: CostEstimate) -> None:
        """Refuse (``memory_check="refuse"``: MemoryError, as the trackers refuse) or warn (ResourceWarning) where the
        analyzer's largest pass, beside what the generator tracker holds, is more than the device had free when the
        tracker was estimated: the tracker's own check does not see the analyzer's passes."""
        if self.stopped:  # (a state saved after its window ended, bound to be read: no pass runs again)
            return
        cost = with_analysis_passes(tracker_cost, self._pass_record)
        if cost.memory["analysis_passes"] == 0 or cost.fits_beside(tracker_cost):
            return
        gib = self._pass_record["bytes"] / GiB
        message = (f"this GAN analyzer's own passes would not fit on {cost.settings.get('device')}: its largest, "
                   f"{cost.settings['analysis_largest_pass']}, takes {gib:.2f} GiB; {cost.describe()}. Cheaper: "
                   + "; ".join(cost.cheaper))
        if self.memory_check == "refuse":
            raise MemoryError(message + ". If you know the device holds it (the estimate can be high on CUDA), "
                              "build the analyzer with memory_check='warn'")
        warnings.warn(message + " (memory_check='warn': built anyway)", ResourceWarning, stacklevel=3)

    def _generator_step(self, step: OptimizerStep, loop_step: int | None = None) -> torch.Tensor:
        if unwrap(step.model) is not self._g:
            raise ValueError("the generator step trains a different model than the analyzer's generator")
        index = self.g_steps + 1
        latents = step.inputs[0]
        self._check_step_latents(latents)
        classes = self._owned_step_classes(step)
        evaluate = (index - 1) % self.eval_every == 0
        if self.g_tracker is None:
            self._check_generator_fillable(step.batch)
            self._build_generator_tracker(step.optimizer, step.loss_fn, step.max_grad_norm, step.batch,
                                          step.micro_batches)
        # A step under autocast (GANTrainer(mixed_precision="bf16")) is refused under the default before the passes
        # below run (the tracker would refuse at track()); under "observe" they run as training's forward does.
        self.g_tracker._check_precision(owned=True, autocast_dtype=step.autocast_dtype)
        # The analysis before the training forward runs G on copies of its buffers, advanced by the batch
        # pass exactly as the training forward will advance the real ones: the probes then see G as the
        # tracker (and an observed loop) sees it at θ_k, after the step's forward.
        # An augmented step's loss ℓ_G(D(T(x; params))) has no value at a probe (no params are drawn for it): the
        # geometry is D's on the samples themselves, its loss without T (geometry_loss= still chooses another).
        loss_fn = self._geometry_fn(step.loss_fn.geometry if isinstance(step.loss_fn, AugmentedGeneratorLoss)
                                    else step.loss_fn)
        with preserved(self._g):
            # 1. The batch at θ_k as training's forward computes it (G's current mode, the same RNG). D's pass
            # draws its random numbers (dropout masks) after G's, as training's D(G(z)) does: one fork for both.
            # Micro-batch by micro-batch (one for a step without them), as training runs them; the field pull too.
            geo, vector = self._micro_batch_geometry(step, latents, classes, loss_fn, evaluate)
            if not torch.isfinite(geo["losses"]).all() or not torch.isfinite(geo["w"]).all():
                bad = torch.nonzero(~torch.isfinite(geo["losses"])).flatten().tolist()
                raise NonFiniteError(
                    f"generator step {index} (phase generator): non-finite generator loss or discriminator gradient "
                    f"(examples {bad[:10]}); the step was not applied and the ledgers keep the {index - 1} generator "
                    "steps before"
                )
            self._fit_grouping(geo, loss_fn, after_forward=False)
            # 2. Group ids (and permuted control ids on the same step).
            tracked = self._partition_ids(geo)
            # 3. Probe geometry and the plain kernel-smoothed field (its pulled vector from 1.) at evaluation steps.
            self._begin_generator_step(index, vector, loss_fn, after_forward=False)
        # 4. The real step, tracked; 5. the listener's bookkeeping.
        self._g_pending = {"ids": [tracked[GEOMETRY]], "spatial": [tracked[SPATIAL]] if SPATIAL in tracked else [],
                           "zero": [self._zero_gradient(geo)], "loop_step": loop_step}
        device = latents.device
        try:
            contributions = self.g_tracker.track(step, {name: t.to(device) for name, t in tracked.items()})
        finally:
            if self.g_tracker._unheard is None:  # (else the step's listener, owed, books them: _settle)
                self._g_pending = None
        return contributions.losses

    def _micro_batch_geometry(self, step: OptimizerStep, latents: torch.Tensor, classes: torch.Tensor | None, loss_fn,
                              evaluate: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """1. for a generator step (in micro-batches: ``step.rows`` j = ``step.micro_batch_slices()`` j, in order): each
        micro-batch's geometry read as training's micro-batch forward j computes it, concatenated over the step,
        and (``evaluate``) the field's pulled vector Σ_i c_i J_G(z_i)ᵀ w_i summed over the micro-batches (it is
        linear in the batch; each micro-batch's graph freed after its pull: the memory of one micro-batch).

        Training's micro-batch j runs G on latents j, then ``step.loss_fn`` (D) on its samples; the
        forwards before it have advanced G's and D's buffers (BatchNorm's statistics, spectral norm's u, v)
        and the RNG j times. Here, inside the caller's ``preserved(G)`` and one fork of the RNG: G's forward
        on latents j (its buffer copies advance as training's), w_j from D as it is then (D's own pass keeps
        D's buffers and the RNG, :meth:`_push`), then, before micro-batch j + 1, ``step.loss_fn`` once on
        the samples without a graph, on copies of D's buffers: D's buffers and the RNG advance as training's
        loss forward j advances them. D's real buffers are put back after the last; the probes then see D
        as training's first micro-batch does, G after the step's last forward, as without micro-batches."""
        parts, vector = [], None
        with forked_generators(_cuda(latents)), preserved(self._d):
            for rows in step.micro_batch_slices():
                z, y = latents[rows], None if classes is None else classes[rows]
                with torch.set_grad_enabled(evaluate), step.precision():
                    samples = output_tensor(self._g(z, *class_inputs(y)))
                # (D's passes run in its own precision: a step under autocast gives half-precision samples)
                geo = self._push(z, samples.detach().to(latents.dtype), loss_fn, after_forward=False, classes=y)
                parts.append(geo)
                if evaluate:
                    pulled = self._pull(samples, geo["w"], _coefficients(step.weights, step.batch, geo["w"])[rows])
                    vector = pulled if vector is None else {n: vector[n] + g for n, g in pulled.items()}
                if rows.stop < step.batch:  # D's buffers and the RNG advanced as training's loss forward j does
                    targets = step.targets
                    if targets is not None:
                        targets = targets[rows] if isinstance(targets, torch.Tensor) else tuple(t[rows] for t in targets)
                    with torch.no_grad(), step.precision():
                        step.loss_fn(samples.detach(), targets)
                del samples
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, vector

    def _owned_step_classes(self, step: OptimizerStep) -> torch.Tensor | None:
        """A performed generator step's classes: ``inputs = (z, classes)`` with ``targets = classes`` for
        a conditional GAN (as :class:`GANTrainer` builds it), ``inputs = z`` for an unconditional one."""
        if not self.conditional:
            if len(step.inputs) > 1 and classes_taken(self._g) is not False:
                raise ValueError(
                    f"the generator step passes {len(step.inputs)} inputs to G but this analyzer is unconditional: for a "
                    "conditional GAN build it with probe_classes= and num_classes="
                )
            return None
        if len(step.inputs) != 2:
            raise ValueError(
                f"a conditional generator step needs inputs (latents, classes), got {len(step.inputs)} input(s): build the "
                "trainer with num_classes= and labels= (GANTrainer), or the step as OptimizerStep(G, opt, loss_fn, (z, "
                "classes), classes, phase='generator')"
            )
        classes = self._step_classes(step.inputs[1], step.batch, "the generator step")
        targets = step.targets
        if isinstance(step.loss_fn, AugmentedGeneratorLoss):  # (targets (classes, params))
            targets = step.loss_fn.split_targets(targets)[0]
        if not isinstance(targets, torch.Tensor) or not torch.equal(targets.to(classes), classes):
            raise ValueError(
                "a conditional generator step's targets must be its classes (loss_fn(samples, classes) reads D(samples, "
                "classes)): build it as OptimizerStep(G, opt, GeneratorLoss(D, conditional=True), (z, classes), classes)"
            )
        return classes

    def _pull(self, samples: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_i c_i J_G(z_i)ᵀ w_i at θ_k from the graph of ``samples`` = G(z) (training's, or the batch pass's)."""
        params = trainable_parameters(self._g)
        with torch.enable_grad():
            seed = (c.view(-1, *([1] * (w.dim() - 1))) * w).to(samples.dtype)  # (a half-precision graph's dtype)
            grads = torch.autograd.grad(samples, list(params.values()), grad_outputs=seed,
                                        retain_graph=True, allow_unused=True)
        pulled = {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(params.items(), grads)}
        # Under DDP the field is the global batch's, averaged over the ranks as DDP averages the gradient (each rank's
        # own is its shard's alone: every rank's cos_kernel_field would compare the step with another field).
        return averaged_over_ranks(pulled, ddp_group(self.generator))

    def _field(self, vector: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[M, d]`` −J_G(z') v at θ_k for the pulled vector v = Σ_i c_i J_G(z_i)ᵀ w_i: the plain
        kernel-smoothed field −Σ_i c_i K_G(z', z_i) w_i (one JVP; K_G is never formed)."""
        params = {n: p.detach() for n, p in trainable_parameters(self._g).items()}

        def probes(p):
            return output_tensor(call_with(self._g, p, (self.probe_latents, *class_inputs(self.probe_classes))))

        with preserved(self._g), analysis_mode(self._g):
            with explained_torch_func_errors():
                _, field = jvp(probes, (params,), ({n: -vector[n].to(p) for n, p in params.items()},))
        return field.detach().reshape(field.shape[0], -1).to(torch.float64)

    def _record_generator(self, result: StepContributions) -> None:
        """5. The generator tracker's listener: bookkeeping after every recorded step, owned or observed. Its counts
        cut off half-way (an interrupt), the analyzer refuses to go on; its records (alignment, window, log) cut off
        are owed and made at the next opportunity (:meth:`_settle`). Called again for a step it counted (the tracker
        repeats a listener cut off before it returned, :meth:`PathKernelTracker._hear`), it counts nothing."""
        if self.g_steps == self.g_tracker.ledger.steps:
            return
        with self._bookkeeping("generator"):
            self._book_generator(result)
        self._settle()

    setattr(_record_generator, REPEATABLE_LISTENER, True)  # (it counts a step once: the tracker may call it again)

    def _book_generator(self, result: StepContributions) -> None:
        booked = self.g_tracker.step_observations
        if booked and self.g_steps == 0:  # (before anything is booked: a warning raised as an error changes nothing)
            observed = (self._g_pending or {}).get("observed", {})  # (read: step_payloads below takes them out)
            self._warn_unfillable(sum(int(observed[n]["ids"].shape[0]) for n in booked if n in observed))
        if booked:  # an observed step: the micro-batches the tracker kept, in order; older ones discarded
            observed = (self._g_pending or {}).get("observed", {})
            parts = step_payloads(observed, booked)
            self._g_pending = {"observed": observed, "loop_step": None} if observed else None
            pending = {"ids": [p["ids"] for p in parts], "zero": [p["zero"] for p in parts],
                       "spatial": [p["spatial"] for p in parts if p["spatial"] is not None], "loop_step": None}
            fields = [p for p in parts if p["field"] is not None]
            if fields and self._probe_state is not None:
                # A micro-batch observed without weights= pulled at c = 1/b of its own b rows; the step's field is at
                # c = 1/B of the step's B rows, as an owned step's (a loop's loss.mean() / K is then the owned field,
                # not K times it). Explicit weights are the loop's own coefficients, taken as given.
                rows = sum(p.get("rows", 0) for p in parts)
                self._probe_state["field"] = torch.stack(
                    [p["field"] if p.get("given", True) else p["field"] * (p["rows"] / rows) for p in fields]).sum(dim=0)
        else:
            pending, self._g_pending = self._g_pending or {"ids": [], "spatial": [], "zero": [], "loop_step": None}, None
        index = self.g_steps + 1
        self.g_steps = index
        # A window finish() closed as partial is out of date once a step goes on from it (it is closed again at
        # the next finish(), or as a full window): reports and saved states must not show it as the run's last.
        self.partial_window = None
        ids = torch.cat(pending["ids"]) if pending["ids"] else torch.zeros(0, dtype=torch.long)
        zero = torch.cat(pending["zero"]) if pending.get("zero") else torch.zeros(ids.shape[0], dtype=torch.bool)
        # Under DDP each rank saw its shard: the counts are the global batch's.
        context = self.g_tracker.distributed
        self.g_group_counts.append(
            summed_over_ranks(torch.bincount(ids.cpu()[~zero], minlength=self.num_groups), context).tolist())
        self.g_zero_counts.append(int(summed_over_ranks(zero.sum().reshape(1), context)[0]))
        if self.comparison is not None:
            spatial = torch.cat(pending["spatial"]) if pending.get("spatial") else torch.zeros(0, dtype=torch.long)
            self.g_spatial_counts.append(
                summed_over_ranks(torch.bincount(spatial.cpu(), minlength=self.num_groups), context).tolist())
        loop = pending["loop_step"]
        self.g_loop_steps.append(int(loop) if loop is not None
                                 else _start_pair(self._start_step)[0] + self._attempted("g_tracker") - self._steps_at_bind[0])
        f_end = self.g_tracker.ledger.f_end
        drift = self.g_tracker.ledger.buffer_drift
        # What training moved: the outputs' change less what G's buffers (BatchNorm's running
        # statistics) moved them by, which no gradient step did.
        step_drift = (drift - self._g_drift_prev).cpu()
        change = (f_end - self._g_f_prev).cpu() - step_drift
        self._g_f_prev, self._g_drift_prev = f_end.clone(), drift.clone()
        # The records (made by _settle now, or at the next opportunity if they fail): they read this step's counts,
        # ledgers, probes and θ, which nothing changes before the next generator step.
        self._g_owed = {"index": index, "result": result, "change": change, "drift": step_drift,
                        "alignment": (index - 1) % self.eval_every == 0 and self._probe_state is not None,
                        "window": index % self.window == 0 and self._window_start is not None,
                        "log": self.logging is not None}

    @property
    def partitions(self) -> dict[str, int]:
        """The generator tracker's partitions: ``{"geometry": G, "control_0": G, ...}``, and with a
        comparison ``"spatial"`` and ``"spatial_control_i"`` too (cost adds over partitions)."""
        g = self.num_groups
        out = {GEOMETRY: g}
        if self.comparison is not None:
            out[SPATIAL] = g
        out.update({name: g for name in self.control_names})
        out.update({name: g for name in self.spatial_control_names})
        return out

    @property
    def control_names(self) -> list[str]:
        return [f"control_{i}" for i in range(self.controls)]

    @property
    def spatial_control_names(self) -> list[str]:
        """The comparison's permutation controls (none without a comparison)."""
        return [] if self.comparison is None else [f"spatial_control_{i}" for i in range(self.controls)]

    def _coupling(self, ledgers: dict[str, PathKernelLedger], probe_groups: torch.Tensor, first: int, last: int,
                  spatial_groups: torch.Tensor | None, zero: torch.Tensor | None) -> dict[str, Any]:
        """Coupling matrices of traffic and net shares, measured and (averaged over the controls)
        control, and each probe's share from its own geometry group against the controls', from
        ledgers over tracked generator steps ``first..last`` (a window, or the whole run).

        ``"statistics"`` holds what claims should read (:func:`partition_statistics`): per partition
        (geometry, and spatial with a comparison) the own share and the interaction statistic, each
        minus control, with intervals clustered by probe group, and ``"geometry_minus_spatial"``. The
        Probes with w = 0 at the evaluation that grouped them (``zero``, BoolTensor[M]; D flat there) have
        no geometry group (the grouping's tie-break named one): they are left out of the geometry
        partition's statistics and counted in ``probe_zero_gradient``. The top-level ``{kind}_matrix``, ``{kind}_own``, ``{kind}_own_control`` and
        ``{kind}_own_minus_control`` keys (the older layout, kept for saved windows) are the geometry
        partition's entries of ``"statistics"``, clustered likewise; own minus control is confounded
        by source-group strength, not a claim: the report, the summary and the streamed metrics read
        the interaction statistic."""
        g = self.num_groups
        measured = ledgers[GEOMETRY]
        delta = measured.delta.cpu()

        kappa = measured.cancellation_ratio().cpu()
        counts = torch.tensor(self.g_group_counts[first - 1:last], dtype=torch.long).reshape(-1, g).sum(0)
        zero_training = sum(self.g_zero_counts[first - 1:last])
        undefined = torch.zeros(probe_groups.shape[0], dtype=torch.bool) if zero is None else zero.cpu()
        probe_occupied = int(torch.unique(probe_groups.cpu()[~undefined]).numel())
        training_occupied = int((counts > 0).sum())
        out: dict[str, Any] = {
            "steps": [first, last],
            "loop_steps": [self.g_loop_steps[first - 1], self.g_loop_steps[last - 1]],
            "probe_groups": probe_groups.tolist(),
            "training_group_counts": counts.tolist(),
            # examples with w = 0 (no direction: D flat there), left out of training_group_counts
            "training_zero_gradient": zero_training,
            # probes with w = 0 (their geometry group undefined), left out of the geometry statistics
            "probe_zero_gradient": int(undefined.sum()),
            "probe_groups_occupied": probe_occupied,
            "training_groups_occupied": training_occupied,
            "collapsed": min(probe_occupied, training_occupied) < g / 2,
            "kappa_median": nan_median(kappa[torch.isfinite(kappa)]),
            "residual_share_mean": float(grouping_layer.part_share(measured.residual.cpu(), delta).nanmean()),
        }
        if out["collapsed"]:
            out["note"] = (
                f"collapsed: the probes fall in {probe_occupied} and the training examples in {training_occupied} of "
                f"{g} geometry groups. The grouping was fitted on the first batch (with the probes) and is kept fixed, "
                "so a group means the same thing over the run; the geometry has moved away from it. Own-group shares "
                "here compare few groups with themselves: read them with care (a new analyzer with reference_latents= "
                "refits)"
            )
        if out["probe_zero_gradient"]:
            out["probe_note"] = (
                f"{out['probe_zero_gradient']} of {probe_groups.shape[0]} probes had a zero discriminator gradient w (D "
                "flat at their samples) when they were grouped: they have no geometry group (the grouping's tie-break "
                "named one), so the geometry statistics leave them out (their ledger rows stay)")
        out["statistics"] = self._statistics(ledgers, probe_groups, spatial_groups, first, last, undefined)
        # The older top-level keys (saved windows keep their layout) carry the geometry partition's own
        # statistics, clustered by probe group: an interval over probes that share a column would
        # count 64 probes in 2 groups as 64 independent values and could "hold" on 2 units.
        for kind in KINDS:
            geometry = out["statistics"][GEOMETRY][kind]
            for key in ("matrix", "own", "matrix_control", "own_control", "own_minus_control"):
                if key in geometry:
                    out[f"{kind}_{key}"] = geometry[key]
        return out

    def _statistics(self, ledgers: dict[str, PathKernelLedger], probe_groups: torch.Tensor,
                    spatial_groups: torch.Tensor | None, first: int, last: int, undefined: torch.Tensor) -> dict[str, Any]:
        g = self.num_groups
        delta = ledgers[GEOMETRY].delta.cpu()
        stats: dict[str, Any] = {
            GEOMETRY: partition_statistics(ledgers[GEOMETRY], [ledgers[n] for n in self.control_names], delta, probe_groups, g,
                                           undefined=undefined),
            "clusters": "each partition's probe groups; the geometry probe groups for geometry_minus_spatial",
        }
        if self.comparison is None or spatial_groups is None:
            return stats
        spatial = partition_statistics(ledgers[SPATIAL], [ledgers[n] for n in self.spatial_control_names], delta,
                                       spatial_groups, g)
        counts = torch.tensor(self.g_spatial_counts[first - 1:last], dtype=torch.long).reshape(-1, g).sum(0)
        spatial["training_group_counts"] = counts.tolist()
        spatial["grouping"] = type(self.comparison).__name__
        stats[SPATIAL] = spatial
        if self.controls:
            stats["geometry_minus_spatial"] = {}
            for kind in KINDS:
                mine = torch.tensor(_floats(stats[GEOMETRY][kind]["per_probe"]["interaction_minus_control"]), dtype=torch.float64)
                theirs = torch.tensor(_floats(spatial[kind]["per_probe"]["interaction_minus_control"]), dtype=torch.float64)
                diff = mine - theirs
                # (clustered by both groupings: a probe's difference shares its geometry group's source columns and
                # its spatial group's; by geometry group alone it held 11.9 % of null windows at a nominal 2.5 %)
                interval = two_way_interval(diff, probe_groups.cpu(), spatial_groups.cpu())
                stats["geometry_minus_spatial"][kind] = few_units({
                    **interval.as_dict(), "held": interval.above(0.0), "per_probe": diff.tolist(),
                    "statistic": f"{kind}: (geometry interaction − control) − (spatial interaction − control), per probe",
                }, minimum=MIN_PROBE_GROUPS)
        return stats

    def _window_record(self, first: int, last: int, start: dict[str, PathKernelLedger], groups: torch.Tensor,
                       spatial: torch.Tensor | None, zero: torch.Tensor | None) -> dict[str, Any]:
        window = {name: ledger.since(start[name]) for name, ledger in self.generator_ledgers.items()}
        record = self._coupling(window, groups, first, last, spatial, zero)
        if self.mode_centers is not None and self.coverage:
            record["coverage"] = self.coverage[-1]
        return record

    def _close_window(self, index: int) -> None:
        self.windows.append(self._window_record(index - self.window + 1, index, self._window_start, self._window_groups,
                                                self._window_spatial, self._window_zero))

    def _record_alignment(self, index: int, contributions: StepContributions, change: torch.Tensor,
                          drift: torch.Tensor) -> None:
        """One alignment row; ``change``: the probes' output change less the step's buffer drift
        ``drift`` (both ``[M, d]``), so every cosine compares what the gradient step moved."""
        probe = self._probe_state
        predicted = (contributions.contributions.sum(dim=1) + contributions.rest).cpu() - drift
        local = -probe["w"].reshape(probe["w"].shape[0], -1).to(torch.float64).cpu()
        row: dict[str, Any] = {
            "step": index,
            "loop_step": self.g_loop_steps[-1],
            "cos_local_push": float(cosine(change, local).nanmean()),
            "cos_formula": float(cosine(change, predicted).nanmean()),
            "cos_kernel_field": float(cosine(change, probe["field"].cpu()).nanmean()),
            "cos_field_vs_local": float(cosine(probe["field"].cpu(), local).nanmean()),
            "step_relative_residual": float(contributions.residual.norm().cpu() / change.norm().clamp_min(1e-300)),
            "change_norm": float(change.norm(dim=1).mean()),
            "buffer_drift_norm": float(drift.norm(dim=1).mean()),
        }
        snapshot = {"step": index, "x": probe["x"].cpu(), "w": probe["w"].cpu(), "field": probe["field"].cpu(), "change": change.cpu()}
        if self.mode_centers is not None:
            x = probe["x"].reshape(probe["x"].shape[0], -1).to(torch.float64).cpu()
            nearest = self.mode_centers[torch.cdist(x, self.mode_centers).argmin(dim=1)]
            row["cos_nearest_mode"] = float(cosine(change, nearest - x).nanmean())
            with torch.no_grad(), preserved(self._g), analysis_mode(self._g):
                samples = output_tensor(self._g(self.coverage_latents, *class_inputs(self.coverage_classes)))
                samples = samples.detach().cpu()
            cov = mode_coverage(samples, self.mode_centers, self.mode_std, self.coverage_sigmas)
            cov["step"] = index
            cov["loop_step"] = self.g_loop_steps[-1]
            self.coverage.append(cov)
        self.alignment.append(row)
        self._keep_field(snapshot, len(self.alignment) - 1)

    def _keep_field(self, snapshot: dict[str, Any], evaluation: int) -> None:
        """Keep the snapshot of evaluation number ``evaluation`` (0-based) if it falls on the current spacing
        (:func:`field_stride`), then drop every other kept one when they outnumber ``field_snapshots``: the
        kept ones are then evaluations 0, s, 2s, ... for the smallest power of two s that keeps them within it."""
        if self.field_snapshots == "all":
            self.fields.append(snapshot)
            return
        if evaluation % field_stride(evaluation - 1, self.field_snapshots) == 0:
            self.fields.append(snapshot)
        if len(self.fields) > self.field_snapshots:
            self.fields = self.fields[::2]

    # -- discriminator -------------------------------------------------------------------------
    def _discriminator_ids(self, roles: torch.Tensor, inputs: torch.Tensor, real_labels: torch.Tensor | None) -> torch.Tensor:
        roles = roles.cpu().long()
        if self.discriminator_groups == "role":
            return roles
        k = self.mode_centers.shape[0]
        x = inputs.detach().reshape(inputs.shape[0], -1).to(torch.float64).cpu()
        nearest = torch.cdist(x, self.mode_centers).argmin(dim=1)
        if real_labels is not None:
            real_labels = _check_real_labels(real_labels, roles, k)
        real_mode = nearest if real_labels is None else torch.where(real_labels >= 0, real_labels, nearest)
        ids = torch.where(roles == REAL, real_mode, k + nearest)
        return torch.where(roles == PENALTY, torch.full_like(ids, 2 * k), ids)

    def _discriminator_groups(self, step: OptimizerStep) -> torch.Tensor:
        roles = step.info.get("roles")
        if roles is None and isinstance(step.targets, torch.Tensor) and step.targets.dtype == torch.long:
            roles = step.targets
        if not isinstance(roles, torch.Tensor) or roles.shape != (step.batch,):
            raise ValueError(
                "discriminator steps need step.info['roles'], a LongTensor[B] with 0 for generated, 1 for real and 2 "
                "for gradient-penalty examples (GANTrainer sets it)"
            )
        # A conditional trainer's real_labels are its rows' classes (GANTrainer(labels=, num_classes=)), not mixture
        # modes: its real rows are grouped by their nearest mode, as the generated rows are.
        real_labels = None if self.conditional else step.info.get("real_labels")
        return self._discriminator_ids(roles, step.inputs[0], real_labels)

    def discriminator_group_labels(self) -> list[str]:
        if self.discriminator_groups == "role":
            return list(ROLE_NAMES)
        k = self.mode_centers.shape[0]
        return [f"real m{m}" for m in range(k)] + [f"generated m{m}" for m in range(k)] + ["penalty"]

    @property
    def _d_num_groups(self) -> int:
        return 3 if self.discriminator_groups == "role" else 2 * self.mode_centers.shape[0] + 1

    def _build_discriminator_tracker(self, model, optimizer, loss_fn, max_grad_norm, x, roles, batch, *, wrap_critic,
                                     classes: torch.Tensor | None = None, graph: bool = False,
                                     micro_batches: int = 1) -> None:
        """D's tracker; ``classes [B]``: a conditional GAN's classes of the rows ``x [B, ...]`` (the
        default probes keep theirs, in ``discriminator_probe_classes``)."""
        num = self._d_num_groups
        if batch is not None:  # None: built at bind (observe mode), checked at the first observed micro-batch
            self._check_fillable(num, batch, f"discriminator grouping {self.discriminator_groups!r}")
        if self.discriminator_probes is None:
            # Under DDP the first batch is the global one (every rank's rows in rank order): each rank's own rows
            # would give each rank other probes, and the ranks' ledgers of D would describe other points.
            group = ddp_group(self.discriminator, model)
            x, roles = gathered_over_ranks(x.detach(), group), gathered_over_ranks(roles.to(x.device), group)
            if self.conditional:
                classes = gathered_over_ranks(classes.to(x.device), group)
            roles = roles.to(x.device)
            real, generated = x[roles == REAL][:32], x[roles == GENERATED][:32]
            # (in D's own dtype: the rows of a loop under autocast can be half precision, D's passes on its probes are not)
            self.discriminator_probes = torch.cat([real, generated]).detach().to(
                getattr(floating_parameter(self._d), "dtype", x.dtype)).clone()
            if self.conditional:
                classes = classes.to(x.device)
                self.discriminator_probe_classes = torch.cat(
                    [classes[roles == REAL][:32], classes[roles == GENERATED][:32]]).detach().clone()
            if not real.shape[0] or not generated.shape[0]:
                missing = "real" if not real.shape[0] else "generated"
                self.notes.append(
                    f"the discriminator's probes are the first discriminator batch's rows, which held no {missing} rows "
                    "(real and generated examples in separate micro-batches): pass discriminator_probes= to choose them"
                )
        probes = self.discriminator_probes.to(device=x.device, dtype=getattr(floating_parameter(self._d), "dtype", x.dtype))
        conditions = () if not self.conditional else (self.discriminator_probe_classes.to(probes.device),)
        if wrap_critic:
            roles = torch.full((probes.shape[0],), GENERATED, dtype=torch.long, device=probes.device)
            # D∘T's probes at the identity augmentation: the ledger follows D itself there (bit for bit D(x))
            augmentation = (model.augment.identity(probes.shape[0], dtype=probes.dtype, device=probes.device),) \
                if isinstance(model, AugmentedDiscriminatorObjective) else ()
            probes = (probes, roles, *augmentation, *conditions)
        elif conditions:
            probes = (probes, *conditions)
        # An observed loop's tracker takes its group rows from the loop's graph: dense from the start (an "auto"
        # tracker of a plain-SGD D would be built factored and switch at the first observed micro-batch, so the
        # state it saves is dense and a resumed, freshly built factored one refused to load it).
        # (``graph``: owned steps in micro-batches that need each micro-batch's graph, _discriminator_step)
        routes = {"group_state": "dense", "gradient_route": "graph"} if graph or isinstance(loss_fn, _ObservedOnly) else {}
        observed = isinstance(loss_fn, _ObservedOnly)
        tracker = PathKernelTracker(
            model, optimizer, loss_fn, probes, num_groups=num, quadrature=self.quadrature, max_grad_norm=max_grad_norm,
            batch_size=batch, micro_batches=None if observed else micro_batches, memory_check=self.memory_check,
            state_dtype=self.state_dtype, mixed_precision=self.mixed_precision, cost_options=GAN_COST_OPTIONS, **routes,
        )
        if observed and batch is not None:  # the first observed micro-batch's rows stand in for the step's batch until
            tracker.mark_stand_ins("first_micro_batch", micro_batches=False)  # the first step, whose kept micro-batches replace them
        if self._pending and self._pending.get("d_tracker") is not None:
            try:
                tracker.load_state_dict(self._pending["d_tracker"])
                _stand_in_after_resume(tracker, loss_fn)
            except BaseException:
                tracker.close(record_ema=False)  # kept only once loaded, as the generator's
                raise
            self._pending["d_tracker"] = None
        tracker.listeners.append(self._record_discriminator)
        self.d_tracker = tracker

    def _discriminator_step(self, step: OptimizerStep, loop_step: int | None = None) -> torch.Tensor:
        ids = self._discriminator_groups(step)
        wrap_critic = isinstance(step.model, DiscriminatorObjective)
        classes = self._discriminator_step_classes(step, wrap_critic)
        # In micro-batches a training-mode spectral norm advances its power iteration at every micro-batch's
        # forward: each trains with its own weight, which only the micro-batches' own graphs give (a per-example
        # route's own pass would run every example at the last micro-batch's weight).
        iterating = step.micro_batches > 1 and any(m.training for m in power_iteration_modules(step.model))
        if self.d_tracker is None:
            roles = ids if self.discriminator_groups == "role" else step.info["roles"]
            if step.info.get("regularization", False):  # (lazy R1's step, first after a resume: its penalty rows
                roles = torch.full_like(roles, REAL)     # are real rows, the probes' real half)
            self._build_discriminator_tracker(step.model, step.optimizer, step.loss_fn, step.max_grad_norm,
                                              step.inputs[0], roles, step.batch, wrap_critic=wrap_critic, classes=classes,
                                              graph=iterating, micro_batches=step.micro_batches)
        elif iterating and not self.d_tracker.route.uses_graph():
            raise ValueError(
                f"a discriminator step in {step.micro_batches} micro-batches with spectral norm in training mode: each "
                "micro-batch's forward advances the power iteration, so each trains with its own weight, which only the "
                f"micro-batches' own graphs give, but this analyzer's discriminator tracker ({self.d_tracker.group_state}) "
                "reads per-example gradients from a pass of its own. Build the analyzer before the first discriminator "
                "step in micro-batches (its tracker is then built on the graph route), or train with micro_batches=1 "
                "(and GANTrainer's discriminator_batches='joint', whose step is one forward)"
            )
        self._d_pending = {"ids": [ids], "loop_step": loop_step}
        try:
            result = self.d_tracker.track(step, ids.to(step.inputs[0].device))
        finally:
            if self.d_tracker._unheard is None:  # (else the step's listener, owed, books them: _settle)
                self._d_pending = None
        return result.losses

    def _discriminator_step_classes(self, step: OptimizerStep, wrap_critic: bool) -> torch.Tensor | None:
        """A performed discriminator step's classes: the last of its inputs (``(x, roles, classes)`` for
        :class:`DiscriminatorObjective`, ``(x, classes)`` for D itself) in a conditional GAN."""
        if not self.conditional:
            return None
        augmented = isinstance(step.model, AugmentedDiscriminatorObjective)
        if len(step.inputs) != (3 + augmented if wrap_critic else 2):
            expected = ("(x, roles, params, classes)" if augmented else "(x, roles, classes)") if wrap_critic \
                else "(x, classes)"
            raise ValueError(
                f"a conditional discriminator step needs inputs {expected}, "
                f"got {len(step.inputs)}: build the trainer with num_classes= and labels= (GANTrainer)"
            )
        return self._step_classes(step.inputs[-1], step.batch, "the discriminator step")

    def _record_discriminator(self, result: StepContributions) -> None:
        """The discriminator tracker's listener (owned and observed steps); see :meth:`_record_generator`."""
        if self.d_steps == self.d_tracker.ledger.steps:  # (counted: the tracker repeats a listener cut off)
            return
        with self._bookkeeping("discriminator"):
            self._book_discriminator(result)

    setattr(_record_discriminator, REPEATABLE_LISTENER, True)  # (as _record_generator)

    def _book_discriminator(self, result: StepContributions) -> None:
        booked = self.d_tracker.step_observations
        if booked:  # as in _book_generator
            observed = (self._d_pending or {}).get("observed", {})
            pending = {"ids": step_payloads(observed, booked), "loop_step": None}
            self._d_pending = {"observed": observed, "loop_step": None} if observed else None
        else:
            pending, self._d_pending = self._d_pending or {"ids": [], "loop_step": None}, None
        self.d_steps += 1
        ids = torch.cat(pending["ids"]) if pending["ids"] else torch.zeros(0, dtype=torch.long)
        self.d_group_counts.append(summed_over_ranks(torch.bincount(ids.cpu(), minlength=self._d_num_groups),
                                                     self.d_tracker.distributed).tolist())
        loop = pending["loop_step"]
        self.d_loop_steps.append(int(loop) if loop is not None
                                 else _start_pair(self._start_step)[1] + self._attempted("d_tracker") - self._steps_at_bind[1])

    # -- results -------------------------------------------------------------------------------
    @property
    def generator_ledgers(self) -> dict[str, PathKernelLedger]:
        """The generator's ledgers: ``"geometry"`` (groups: the discriminator-geometry groups) and
        ``"control_i"`` (permuted labels on the same steps)."""
        tracker = self._view("g_tracker")
        if tracker is None:
            raise RuntimeError("no generator step has been tracked yet")
        return tracker.ledgers

    def generator_ledger(self, partition: str = GEOMETRY) -> PathKernelLedger:
        """The generator ledger of ``partition`` (default the geometry groups), ``[M, G, d]``."""
        ledgers = self.generator_ledgers
        if partition not in ledgers:
            raise ValueError(f"unknown partition {partition!r}; the generator tracker keeps {list(ledgers)}")
        return ledgers[partition]

    @property
    def generator_ema_ledgers(self) -> dict[str, PathKernelLedger]:
        """The ledgers of the generator's EMA weights (``bind(..., ema=...)``), per partition."""
        tracker = self._view("g_tracker")
        if tracker is None or tracker.ema is None:
            raise RuntimeError("no EMA of the generator is tracked: in your own loop, bind(g_optimizer, ..., ema=ema); "
                               "attached to GANTrainer, build the trainer with ema= (and the analyzer with "
                               "ema_ledger='trainer', the default)")
        return tracker.ema_ledgers

    @property
    def discriminator_ledger(self) -> PathKernelLedger:
        """The discriminator's ledger at its probes, grouped by role (or role and mode)."""
        tracker = self._view("d_tracker")
        if tracker is None:
            raise RuntimeError("no discriminator step has been tracked yet (track_discriminator=True and train)")
        return tracker.ledger

    def _view(self, which: str) -> "PathKernelTracker | _SavedTracker | None":
        """The live tracker, or right after :meth:`load_state_dict` (before the next step rebuilds it) a
        read-only view of its saved ledgers, so that a resumed run reports without another step."""
        tracker = getattr(self, which)
        if tracker is None and self._pending and self._pending.get(which) is not None:
            return _SavedTracker(self._pending[which])
        return tracker

    def _attempted(self, which: str) -> int:
        """A player's optimizer steps as its loop counts them: booked, and skipped with their micro-batches
        observed (a GradScaler that found inf; the tracker's ``skipped_steps``, or a loaded state's)."""
        tracker = self._view(which)
        booked = self.g_steps if which == "g_tracker" else self.d_steps
        return booked + (0 if tracker is None else len(tracker.skipped_steps))

    def _residual_note(self, which: str, ledger: PathKernelLedger, tracker) -> str | None:
        residual = ledger.relative_residual()
        if not residual > RESIDUAL_NOTE:
            return None
        return (f"the {which} ledger's relative residual is {residual:.2g} (quadrature {self.quadrature!r}): "
                f"{residual_remedy(self.quadrature, tracker.gradient_scales)}")

    def report(self) -> dict[str, Any]:
        """Everything measured so far as strict JSON (NaN as None), with the loop's step numbers, the
        windows flagged ``"collapsed"`` where the geometry groups no longer spread, and notes on what
        the numbers cannot support (a large residual, with the rule that shrinks it). Refused after
        a step's bookkeeping or a state's loading was cut off half-way (its windows would not match
        its ledgers)."""
        self._check_consistent()
        notes = list(self.notes)
        if not self.stopped:
            try:
                self._settle()  # (the records a step owes: the report reads them)
            except Exception as error:  # (a record that fails each time, one that does not fit: the report reads the rest)
                if self._broken is not None or self._g_owed is None:
                    raise
                notes.append(f"the records of generator step {self._g_owed['index']} (alignment, window, log) are not "
                             f"all made: {type(error).__name__}: {error}")
        out: dict[str, Any] = {"generator_steps": self.g_steps, "discriminator_steps": self.d_steps,
                               "grouping": type(self.grouping).__name__, "group_labels": self.grouping.labels(),
                               "comparison": None if self.comparison is None else type(self.comparison).__name__,
                               "controls": self.controls, "start_step": self._start_step,
                               "track_steps": None if self.track_steps is None else list(self.track_steps),
                               "stopped": self.stopped,
                               "loop_steps": {"generator": _span(self.g_loop_steps), "discriminator": _span(self.d_loop_steps)}}
        g_tracker, d_tracker = self._view("g_tracker"), self._view("d_tracker")
        # What each tracker's step costs (memory by part, work against a bare step), as the diffusion
        # analyzer's report gives it; trackers not rebuilt since a load have no estimate yet.
        # The generator's with the analyzer's own passes added (:attr:`cost`).
        out["cost"] = {name: tracker.cost.as_dict() for name, tracker in (("generator", self.g_tracker),
                                                                          ("discriminator", self.d_tracker))
                       if tracker is not None and tracker.cost is not None}
        if "generator" in out["cost"] and self._pass_record is not None:
            out["cost"]["generator"] = self.cost.as_dict()
        if g_tracker is not None and self.g_steps:
            ledger = self.generator_ledger()
            shares = ledger.shares()
            whole = self._coupling(g_tracker.ledgers, self._run_groups, 1, self.g_steps, self._run_spatial, self._run_zero)
            out["generator"] = {
                **ledger.summary(),
                "loop_steps": _span(self.g_loop_steps),
                "mean_group_shares": shares.groups.nanmean(dim=0).tolist(),
                "mean_traffic_shares": ledger.traffic_shares().nanmean(dim=0).tolist(),
                "rest_share_mean": float(shares.rest.nanmean()),
                "residual_share_mean": float(shares.residual.nanmean()),
                "buffer_drift_norm": float(ledger.buffer_drift.norm()),
                "group_counts_total": torch.tensor(self.g_group_counts).sum(0).tolist(),
                "zero_gradient_total": sum(self.g_zero_counts),
                "coupling_whole_run": whole,
            }
            out["windows"] = self.windows
            out["alignment"] = self.alignment
            out["coverage"] = self.coverage
            if self.partial_window is not None:
                out["partial_window"] = self.partial_window
            notes.append(self._residual_note("generator", ledger, g_tracker))
            if self.track_steps is None and self.g_loop_steps and self.g_loop_steps[0] > 1:
                # (coupling_whole_run, the windows and the shares cover the tracked steps: not the whole run here)
                first, last = self.g_loop_steps[0], self.g_loop_steps[-1]
                notes.append(
                    f"the ledgers begin at generator step {first} of the run, not at its first: the analyzer was "
                    "attached or bound after the run's start (a trainer that had trained, or resumed from a checkpoint "
                    f"without this analyzer's state), or the generator steps before it made no update. The shares, "
                    f"windows, alignment and coupling_whole_run cover generator steps {first}-{last} only, not the "
                    f"whole run: what training did before step {first} is in no ledger. For the whole run, attach the "
                    "analyzer before the first step and resume with its saved state")
            if sum(self.g_zero_counts):
                notes.append(
                    f"{sum(self.g_zero_counts)} training examples had a zero discriminator gradient w (D flat at their "
                    f"samples), which has no direction: the {type(self.grouping).__name__} grouping's group for them is "
                    "a tie-break, so the group counts leave them out (zero_gradient_total, each window's "
                    "training_zero_gradient); their ledger rows stay in the group the tie-break gave"
                )
            collapsed = [w for w in self.windows if w["collapsed"]]
            if collapsed:
                spans = ", ".join(f"{w['loop_steps'][0]}-{w['loop_steps'][1]}" for w in collapsed[:5])
                notes.append(
                    f"{len(collapsed)} of {len(self.windows)} windows are collapsed (steps {spans}): their probes or training "
                    "examples fall in fewer than half the geometry groups. The grouping was fitted on the first batch and "
                    "is not refitted, so a group keeps its meaning; read those windows' own-group shares with care"
                )
            if g_tracker.ema is not None:
                ema = self.generator_ema_ledgers[GEOMETRY]
                out["generator_ema"] = {**ema.summary(), "decays": list(g_tracker.ema.decays)}
                notes.append(self._residual_note("generator EMA", ema, g_tracker))
        if d_tracker is not None and self.d_steps:
            ledger = d_tracker.ledger
            shares = ledger.shares()
            out["discriminator"] = {
                **ledger.summary(),
                "loop_steps": _span(self.d_loop_steps),
                "group_labels": self.discriminator_group_labels(),
                "mean_group_shares": shares.groups.nanmean(dim=0).tolist(),
                "mean_traffic_shares": ledger.traffic_shares().nanmean(dim=0).tolist(),
                "buffer_drift_norm": float(ledger.buffer_drift.norm()),
                "group_counts_total": torch.tensor(self.d_group_counts).sum(0).tolist(),
            }
            if d_tracker.gradient_scales:
                out["discriminator"]["gradient_scales"] = d_tracker.gradient_scales
            notes.append(self._residual_note("discriminator", ledger, d_tracker))
        if g_tracker is not None and g_tracker.gradient_scales and "generator" in out:
            out["generator"]["gradient_scales"] = g_tracker.gradient_scales
        if not self.g_steps and not self.d_steps:
            # (the report then holds the settings alone: a reader should not take the missing sections for a fault)
            notes.append("nothing is recorded yet: no generator or discriminator step has been tracked; bind the "
                         "analyzer (GANTrainer(callbacks=[analyzer]) or analyzer.bind(g_optimizer, d_optimizer)) and "
                         "train at least one step before reading the report")
        out["notes"] = [n for n in notes if n]
        return jsonable(out)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The analyzer's state. Saved once the ``track_steps`` window's last generator step is done
        (a trainer's checkpoint at that iteration's end), the analyzer stops first, as the next step
        would stop it: the EMA's update after that step is in the state, where a run resumed from it
        could no longer record it."""
        self._check_consistent()
        if not self.stopped:
            self._settle()  # (a state holds no owed record: those the last step owes are made before it is written)
        if (self.track_steps is not None and not self.stopped and not self._bound and self.g_loop_steps
                and self.g_loop_steps[-1] >= self.track_steps[1]):
            self.stop()
        return {
            "format": FORMAT,
            "config": self._config(),
            "g_tracker": self._tracker_state("g_tracker"),
            "d_tracker": self._tracker_state("d_tracker"),
            "grouping": self.grouping.state_dict() if self.grouping.fitted else None,
            "comparison": self.comparison.state_dict() if self.comparison is not None and self.comparison.fitted else None,
            "rng": self.rng.get_state(),
            # the ids a next batch under 8 examples draws its control ids from beside its own
            "control_pools": {k: v.tolist() for k, v in self._control_pools.items()},
            "g_steps": self.g_steps, "d_steps": self.d_steps,
            "alignment": list(self.alignment), "coverage": list(self.coverage), "windows": list(self.windows),
            # finish()'s window in progress: report() shows it, so a saved state (and genkernel summarize) keeps it
            "partial_window": self.partial_window,
            "fields": list(self.fields), "probe_state": self._probe_state,
            "window_start": None if self._window_start is None else {k: v.state_dict() for k, v in self._window_start.items()},
            "window_groups": self._window_groups, "run_groups": self._run_groups,
            "window_zero": self._window_zero, "run_zero": self._run_zero,
            "window_spatial": self._window_spatial, "run_spatial": self._run_spatial, "g_spatial_counts": list(self.g_spatial_counts),
            "g_zero_counts": list(self.g_zero_counts),
            "discriminator_probes": self.discriminator_probes,
            "discriminator_probe_classes": self.discriminator_probe_classes,
            "g_loop_steps": list(self.g_loop_steps), "d_loop_steps": list(self.d_loop_steps),
            "g_group_counts": list(self.g_group_counts), "d_group_counts": list(self.d_group_counts),
            "notes": list(self.notes), "start_step": self._start_step, "loss_checked": self._loss_checked,
            "stopped": self.stopped,
            # names of the ledgers' groups, for readers of the state (genkernel.report) that build no analyzer
            "group_labels": {"generator": self.grouping.labels(), "discriminator": self.discriminator_group_labels()},
        }

    def _tracker_state(self, which: str) -> dict[str, Any] | None:
        """A tracker's state; one loaded but not yet rebuilt (no step since load_state_dict) is saved as loaded."""
        tracker = getattr(self, which)
        if tracker is not None:
            return tracker.state_dict()
        return (self._pending or {}).get(which)

    def _config(self) -> dict[str, Any]:
        return {"num_groups": self.num_groups, "controls": self.controls, "grouping": type(self.grouping).__name__,
                "comparison": None if self.comparison is None else type(self.comparison).__name__,
                "num_classes": self.num_classes, "state_dtype": str(self.state_dtype).replace("torch.", ""),
                "track_steps": None if self.track_steps is None else list(self.track_steps),
                # the saved window start is a ledger copy at a step of this window length: another length would
                # close windows that span other steps than their "steps" say
                "window": self.window,
                # the alignment, coverage and field rows are taken every eval_every steps and the probes' groups
                # of a step come from the last evaluation: another cadence would mix two runs' rows in one list
                "eval_every": self.eval_every,
                # the snapshots kept are spaced by a stride set by this number: another would mix two spacings
                "field_snapshots": self.field_snapshots,
                # ModeGroups / NearestModeGroups and D's role_mode groups read the centres, which no grouping state keeps
                "mode_centers": None if self.mode_centers is None else self.mode_centers.tolist(),
                "discriminator_groups": self.discriminator_groups,
                # D's ledger runs with the run or not at all: one resumed without it reports the steps before the save
                # as the run's, one resumed with it books D's steps from the save on as if from the start
                "track_discriminator": bool(self.track_discriminator),
                **self._coverage_settings()}

    def _coverage_settings(self) -> dict[str, Any]:
        """What a mode-coverage row (``coverage``, with ``mode_centers``) is measured with: the number of fixed
        latents, the seed that drew them, and the radius (``coverage_sigmas`` times ``mode_std``). A run resumed
        with another would append rows of another definition to the saved ones (other samples, counts out of
        another total, another radius), read as one run's curve. None each without ``mode_centers`` (no coverage
        is measured: then they are not the records' settings)."""
        measured = self.mode_centers is not None
        return {"coverage_latents": int(self.coverage_latents.shape[0]) if measured else None,
                "coverage_sigmas": float(self.coverage_sigmas) if measured else None,
                "mode_std": float(self.mode_std) if measured else None,
                "seed": self.seed if measured else None}

    def save(self, path: str | os.PathLike) -> None:
        """Write the analyzer state (:meth:`state_dict`) atomically."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a state written by :meth:`save` (:meth:`load_state_dict`; ``weights_only`` load)."""
        self.load_state_dict(load_state(path, FORMAT))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved analyzer. Trackers of owned steps are rebuilt at the next step of each
        phase; a bound analyzer (observe mode) rebuilds its generator tracker now and its
        discriminator tracker at the next observed discriminator micro-batch."""
        if state.get("format") != FORMAT:
            raise ValueError("not a GANKernelAnalyzer state (made by analyzer.state_dict())")
        mine = self._config()
        # (states saved before a key was kept: the settings they were made with, or unknown for the window)
        saved = {"comparison": None, "num_classes": None, "state_dtype": "float64", "track_steps": None,
                 "window": self.window, "eval_every": self.eval_every, "mode_centers": mine["mode_centers"],
                 "field_snapshots": self.field_snapshots,
                 "discriminator_groups": self.discriminator_groups, "track_discriminator": mine["track_discriminator"],
                 **self._coverage_settings(), **state["config"]}
        check_saved_settings(saved, mine, "analyzer")
        self._check_saved_trackers(state)
        if self._bound:
            _check_start_step(self._start_step, list(state["g_loop_steps"]), list(state["d_loop_steps"]))
        try:
            self._load_checked_state(state)
        except BaseException as error:
            # Part of the state is in and the rest is not (a tracker refused its own part, say): the
            # analyzer says so at every later step, save and report rather than going on from a mix.
            self._broken = (f"loading a saved state failed half-way ({type(error).__name__}: {str(error)[:200]}); load a "
                            "state saved with these networks, optimizers and settings")
            raise

    def _check_saved_trackers(self, state: dict[str, Any]) -> None:
        """Refuse a saved state whose tracker states the trackers rebuilt after the load would refuse
        (:meth:`PathKernelTracker.load_state_dict`), before anything is loaded: a trainer's analyzer rebuilds them
        at the next step of each player, after the trainer had loaded the checkpoint's networks and optimizers,
        and refused there the run stopped in its first iteration. Compared: ``quadrature`` (both trackers), the
        generator's probes (``probe_latents``, ``probe_classes``: shapes, dtypes and values, as the tracker
        compares them) and, while a built-in trainer loads the state (:attr:`resuming_trainer`) or in observe mode
        (bind's ``ema``), whether the generator's tracker keeps an EMA ledger (``ema_ledger``). The partitions and
        ``state_dtype`` are the config's (:meth:`_config`); D's probes are the saved ones. A state saved after its
        window ended rebuilds no tracker: nothing is compared."""
        if state.get("stopped", False):
            return
        problems: list[tuple[str, Any, Any, str]] = []  # (setting, saved, here, the argument that fits the state)
        saved_rules = {saved_tracker_settings(state[which])["quadrature"] for which in ("g_tracker", "d_tracker")
                       if state.get(which) is not None}
        for rule in sorted(saved_rules - {self.quadrature}):
            problems.append(("quadrature", rule, self.quadrature, f"quadrature={rule!r}"))
        if state.get("g_tracker") is not None:
            saved = saved_tracker_settings(state["g_tracker"])
            probes = (self.probe_latents,) if not self.conditional else (self.probe_latents, self.probe_classes)
            # as a trainer's steps take them, and as bind moves them to G's device and floating dtype (_follow_networks)
            parameter = floating_parameter(self._g)
            candidates = [probe_identity(probes)]
            if parameter is not None:
                candidates.append(probe_identity(tuple(like_parameter(t, parameter) for t in probes)))
            if saved["probes"] and saved["probes"] not in candidates:
                layout = lambda identity: [(shape, dtype) for shape, dtype, _ in identity]
                # (the tracker's words where only the values differ)
                what = ("generator probes (the probes have the same shapes but other values; shape, dtype, digest)"
                        if layout(saved["probes"]) in [layout(c) for c in candidates]
                        else "generator probes (shape, dtype, digest)")
                problems.append((what, saved["probes"], candidates[-1],
                                 "the saved run's probe_latents (and probe_classes)"))
            trainer = self.resuming_trainer
            ema = None
            if self._bound:
                ema = self._ema is not None
            elif trainer is not None:
                ema = self.ema_ledger == "trainer" and getattr(trainer, "ema", None) is not None
            if ema is not None and saved["ema"] != ema:
                problems.append(("EMA ledger", "kept" if saved["ema"] else "none", "kept" if ema else "none",
                                 f"ema_ledger={'trainer' if saved['ema'] else 'none'!r}" if not self._bound
                                 else f"bind(..., ema={'the EMA' if saved['ema'] else 'None'})"))
        refuse_tracker_settings(problems, "trackers")

    def _load_checked_state(self, state: dict[str, Any]) -> None:
        if state["grouping"] is not None:
            self.grouping.load_state_dict(state["grouping"])
        if self.comparison is not None and state.get("comparison") is not None:
            self.comparison.load_state_dict(state["comparison"])
        self.rng.set_state(state["rng"])
        pools = state.get("control_pools") or {}  # (states of earlier versions kept none)
        self._control_pools = {k: torch.tensor(pools.get(k, []), dtype=torch.long) for k in (GEOMETRY, SPATIAL)}
        self.g_steps, self.d_steps = state["g_steps"], state["d_steps"]
        self.alignment, self.coverage, self.windows = list(state["alignment"]), list(state["coverage"]), list(state["windows"])
        self.partial_window = state.get("partial_window")  # (states saved before it was kept have none)
        self.fields = list(state["fields"])
        evaluations = len(self.alignment)
        if self.field_snapshots != "all" and len(self.fields) == evaluations:
            # (every evaluation's snapshot: saved with "all", or by a version that kept them all) thinned to the
            # snapshots this analyzer would have kept
            self.fields = self.fields[:: field_stride(evaluations - 1, self.field_snapshots)]
        # The probes' state and the window's starting ledgers live beside the generator (loaded on the CPU).
        device = next(self._g.parameters()).device
        self._probe_state = to_device(state["probe_state"], device)
        starts = to_device(state["window_start"], device)
        self._window_start = None if starts is None else {k: PathKernelLedger.from_state_dict(v) for k, v in starts.items()}
        self._window_groups, self._run_groups = to_device((state["window_groups"], state["run_groups"]), device)
        # (states of versions that did not keep them: no probe counted as undefined)
        self._window_zero, self._run_zero = state.get("window_zero"), state.get("run_zero")
        self._window_spatial, self._run_spatial = to_device((state.get("window_spatial"), state.get("run_spatial")), device)
        self.g_spatial_counts = list(state.get("g_spatial_counts", []))
        # (a state saved before they were counted apart counted them in their groups: none apart)
        self.g_zero_counts = list(state.get("g_zero_counts", [0] * len(state["g_group_counts"])))
        self.discriminator_probes = state["discriminator_probes"]
        self.discriminator_probe_classes = state.get("discriminator_probe_classes")
        self.g_loop_steps, self.d_loop_steps = list(state["g_loop_steps"]), list(state["d_loop_steps"])
        self.g_group_counts, self.d_group_counts = list(state["g_group_counts"]), list(state["d_group_counts"])
        self.notes, self._loss_checked = list(state["notes"]), state["loss_checked"]
        self.stopped = bool(state.get("stopped", False))  # a state saved after its window: read, not extended
        if not self._bound:
            self._start_step = state["start_step"]
        self._pending = {"g_tracker": to_device(state["g_tracker"], device),  # None stays None
                         "d_tracker": to_device(state["d_tracker"], next(self._d.parameters()).device)}
        self._g_pending = self._d_pending = None
        self._broken = None  # the loaded state replaces what an interrupted step left
        self._g_owed = None
        self._d_first_theta = None
        for tracker in (self.g_tracker, self.d_tracker):
            if tracker is not None:
                tracker.close()
        self.g_tracker = self.d_tracker = None
        # bind's start_step counts the loop up to here (the saved trackers' skipped steps included)
        self._steps_at_bind = (self._attempted("g_tracker"), self._attempted("d_tracker"))
        if self._bound and self._g_optimizer is not None and not self.stopped:
            self._build_generator_tracker(self._g_optimizer, _ObservedOnly("generator"), math.inf)
        if self._bound and not self.stopped:
            self._build_bound_discriminator()


class _SavedTracker:
    """A saved tracker state read back as ledgers (no model, no optimizer): what ``report()`` needs
    between :meth:`GANKernelAnalyzer.load_state_dict` and the step that rebuilds the real tracker."""

    def __init__(self, state: dict[str, Any]) -> None:
        def ledgers(states):
            return {n: PathKernelLedger.from_state_dict({k: v for k, v in st.items() if k != "format"}) for n, st in states.items()}

        self.ledgers = ledgers(state["ledgers"])
        self.ledger = next(iter(self.ledgers.values()))
        self.gradient_scales = list(state.get("gradient_scales") or [])
        self.skipped_steps = list(state.get("skipped_steps") or [])
        ema = state.get("ema")
        self.ema = None if ema is None else _Decays(list(ema["decays"]))
        self.ema_ledgers = {} if ema is None else ledgers(ema["ledgers"])


class _Decays:
    def __init__(self, decays: list[float]) -> None:
        self.decays = decays


def partition_statistics(measured: PathKernelLedger, controls: list[PathKernelLedger], delta: torch.Tensor,
                         probe_groups: torch.Tensor, num_groups: int, *,
                         undefined: torch.Tensor | None = None) -> dict[str, Any]:
    """What a partition's coupling claims read, from its ledger and its control partitions' ledgers over
    the same steps (a window's ledger differences, or the whole run).

    Per kind ("traffic": traffic shares; "net": net shares ⟨C, Δf⟩/‖Δf‖², read with κ):
    ``matrix`` / ``matrix_control`` (probe group × source group), ``own`` (each probe's share from its
    own group), ``interaction`` (:func:`~genkernel.gan.metrics.own_minus_others`: own share minus the
    other probe groups' mean share from the same source group, which removes source-group strength; over fewer
    than :data:`~genkernel.stats.MIN_PROBE_GROUPS` probe groups with ``held`` False and a ``why``,
    :func:`~genkernel.stats.few_units`),
    and with controls ``own_control`` (the controls' own share, averaged per probe), ``own_minus_control``
    and ``interaction_minus_control``
    (:func:`~genkernel.core.grouping.measured_minus_control`, every control its own permutation, averaged
    per probe) with ``per_probe`` values. Every interval is clustered by probe group: probes in one
    group share their source column, so the independent units are the groups, not the probes.
    ``undefined`` (``BoolTensor[M]``): probes without a group (w = 0 under a grouping by w), whose shares
    are left out (NaN per probe; not in the matrices, the intervals or the occupied count).
    """
    groups = probe_groups.to(torch.long).cpu()
    undefined = torch.zeros(groups.shape[0], dtype=torch.bool) if undefined is None else undefined.cpu().bool()

    def shares(ledger: PathKernelLedger) -> dict[str, torch.Tensor]:
        kinds = {"traffic": grouping_layer.traffic_shares(ledger.traffic.cpu()),
                 "net": grouping_layer.net_shares(ledger.contributions.cpu(), delta)}
        return {kind: value.masked_fill(undefined[:, None], math.nan) for kind, value in kinds.items()}

    mine = shares(measured)
    others = [shares(c) for c in controls]
    out: dict[str, Any] = {"probe_groups": groups.tolist(), "probe_groups_occupied": int(torch.unique(groups[~undefined]).numel()),
                           "controls": len(controls)}
    for kind in KINDS:
        own = grouping_layer.own_share(mine[kind], groups)
        interaction = own_minus_others(mine[kind], groups, num_groups)
        entry: dict[str, Any] = {
            "matrix": grouping_layer.average_by_probe_group(mine[kind], groups, num_groups).tolist(),
            "own": mean_interval(own, clusters=groups).as_dict(),
            # (few_units: with two probe groups the interaction's two cluster means are equal by construction for
            # traffic shares, and with lopsided shares the rounding of 1 - x is far more eps of the values than
            # mean_interval reads as rounding: a t-interval of rounding alone came out defined, without a why, for
            # 189 of 300 random lopsided matrices, tests/test_mend44b.py)
            "interaction": few_units(mean_interval(interaction, clusters=groups).as_dict(), minimum=MIN_PROBE_GROUPS),
        }
        if others:
            entry["matrix_control"] = torch.stack(
                [grouping_layer.average_by_probe_group(o[kind], groups, num_groups) for o in others]).mean(0).tolist()
            own_c = torch.stack([grouping_layer.own_share(o[kind], groups) for o in others])
            entry["own_control"] = mean_interval(own_c.mean(0), clusters=groups).as_dict()
            inter_c = torch.stack([own_minus_others(o[kind], groups, num_groups) for o in others])
            entry["own_minus_control"] = few_units(grouping_layer.measured_minus_control(own, own_c, clusters=groups),
                                                   minimum=MIN_PROBE_GROUPS)
            entry["interaction_minus_control"] = few_units(
                grouping_layer.measured_minus_control(interaction, inter_c, clusters=groups), minimum=MIN_PROBE_GROUPS)
            entry["per_probe"] = {"own_minus_control": (own - own_c.mean(0)).tolist(),
                                  "interaction_minus_control": (interaction - inter_c.mean(0)).tolist()}
        out[kind] = entry
    return out


def _floats(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _count(trainer: Any, attribute: str) -> int | None:
    """The trainer's 1-based number of the step about to run (its counter + 1), if it keeps one."""
    value = getattr(trainer, attribute, None)
    return value + 1 if isinstance(value, int) and not isinstance(value, bool) else None


def _cuda(t: torch.Tensor) -> list[int]:
    return [t.device.index] if t.device.type == "cuda" else []


def _check_losses(losses: Any) -> int:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            "losses must be the per-example losses, a non-empty Tensor[B] with its graph (reduction='none'), got "
            f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}"
        )
    if not losses.requires_grad:
        raise ValueError("losses carry no graph (detached, or computed under torch.no_grad()): pass them before the backward")
    return losses.shape[0]


def _check_roles(roles: Any, batch: int) -> torch.Tensor:
    if not isinstance(roles, torch.Tensor) or roles.shape != (batch,) or roles.is_floating_point() or roles.dtype == torch.bool:
        raise ValueError(
            f"roles must be a LongTensor[{batch}]: 0 for generated, 1 for real, 2 for gradient-penalty rows, got "
            f"{getattr(roles, 'dtype', type(roles).__name__)} {tuple(getattr(roles, 'shape', ()))}"
        )
    roles = roles.long()
    if roles.numel() and (int(roles.min()) < 0 or int(roles.max()) > PENALTY):
        raise ValueError("roles must be 0 (generated), 1 (real) or 2 (gradient penalty)")
    return roles


def _check_real_labels(real_labels: Any, roles: torch.Tensor, num_modes: int) -> torch.Tensor:
    """The real rows' mode ids for ``discriminator_groups="role_mode"``: integer ``[B]``, on the real rows a mode
    in ``[0, num_modes)`` or negative (unknown: the nearest mode). A larger id would be read as a generated row's
    group (id ``num_modes + m``) or the penalty's, and a float id truncated: refused with the fix."""
    batch = roles.shape[0]
    if not isinstance(real_labels, torch.Tensor) or real_labels.shape != (batch,) or real_labels.is_floating_point() \
            or real_labels.is_complex() or real_labels.dtype == torch.bool:
        raise ValueError(
            f"real_labels must be a LongTensor[{batch}] of the rows' mode ids (negative where unknown, e.g. -1 on the "
            f"generated rows), got {getattr(real_labels, 'dtype', type(real_labels).__name__)} "
            f"{tuple(getattr(real_labels, 'shape', ()))}"
        )
    labels = real_labels.detach().cpu().long()
    real = labels[roles == REAL]
    if real.numel() and int(real.max()) >= num_modes:
        raise ValueError(
            f"real_labels name mode {int(real.max())} on a real row, but mode_centers has {num_modes} modes (ids 0.."
            f"{num_modes - 1}): with discriminator_groups='role_mode' the labels must be the real mixture's mode ids, "
            "in the order of mode_centers (pass -1 where a row's mode is unknown: its nearest mode is used)"
        )
    return labels


def _loss_tolerance(losses: torch.Tensor, precision: torch.dtype | None) -> float:
    """Relative tolerance at which the analyzer's generator loss must reproduce the loop's ``losses``:
    1e-8 (float64) or 1e-4; a forward in half ``precision``, two of its eps (the loss itself is one
    more half-precision rounding of the same scores)."""
    if precision is not None:
        return 2 * torch.finfo(precision).eps
    return 1e-8 if losses.dtype == torch.float64 else 1e-4


def _fill_problem(groups: int, batch: int, what: str) -> str | None:
    """Why ``batch`` examples cannot fill ``groups`` groups of ``what`` (None where they can)."""
    if groups <= batch:
        return None
    return (f"{what} has {groups} groups but the batch has only {batch} examples: the groups cannot all be filled "
            "(groups would be empty by construction, not by geometry). Use fewer groups or a larger batch.")


def _coefficients(weights: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
    if weights is not None:
        return weights.detach().to(like)
    # in the pull's own dtype: 1/B made in the default dtype (float32) was rounded there (3e-8 at B = 6)
    return torch.full((batch,), 1.0 / batch, dtype=like.dtype, device=like.device)


def _positional_inputs(fn: Callable) -> int | None:
    """How many positional arguments ``fn`` takes (None: unknown, or ``*args``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in signature.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


class _FromInput(nn.Module):
    """A network whose first input requires grad inside its forward (:func:`~genkernel.core.cost.hooked_forward_counts`
    detaches its example): with the network's parameters held constant, the count's ``input_gradients`` are the
    layers downstream of x, what a geometry pass's ∇_x ℓ_G(D(x)) goes through."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, *rest: Any) -> Any:
        return self.network(x.detach().requires_grad_(True), *rest)


def _copied(t: Any) -> Any:
    """A detached copy of a caller's tensor (anything else as it is, for the checks that refuse it)."""
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def _flat_latents(z: torch.Tensor) -> torch.Tensor:
    """Latents flattened per example, ``[B, k]`` (what groupings see)."""
    return z.reshape(z.shape[0], -1)


def _opens_step(tracker: PathKernelTracker) -> bool:
    """Whether a micro-batch observed now may be its step's first: nothing is observed since the last step
    (or the step failed and was rolled back), or the gradients are clear (a skipped step's micro-batches
    are dropped at this observe(), or this is a second micro-batch before one joint backward). A skipped
    step cleared only after this observe() cannot be told from accumulation here (the tracker drops it at
    the backward): :meth:`GANKernelAnalyzer._probes_read_at_this_discriminator` then decides. Only where
    the probes' geometry is taken depends on it; the step's micro-batches are the tracker's
    ``step_observations``."""
    return tracker.observed_micro_batches == 0 or tracker._gradients_cleared()


def _start_pair(start_step: Any) -> tuple[int, int]:
    """``(generator, discriminator)`` start counts from bind's ``start_step`` (an int for both, or a pair)."""
    pair = tuple(start_step) if isinstance(start_step, (tuple, list)) else (start_step, start_step)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pair):
        raise ValueError(
            "start_step must be a non-negative int (the loop's step count now) or a pair (generator_steps, "
            f"discriminator_steps) of them, got {start_step!r}"
        )
    return pair


def _check_not_swapped(g_optimizer: Any, d_optimizer: Any, generator: nn.Module, discriminator: nn.Module) -> None:
    """ValueError where bind's optimizer for one network holds the other's parameters and none of its own (the two
    swapped, or one passed in the other's place); said at bind, not at a first step (D's tracker is built there)."""
    own = {"generator": {id(p) for p in generator.parameters()},
           "discriminator": {id(p) for p in discriminator.parameters()}}
    wrong = []
    for name, optimizer, mine, theirs in (("g_optimizer", g_optimizer, "generator", "discriminator"),
                                          ("d_optimizer", d_optimizer, "discriminator", "generator")):
        if optimizer is None:
            continue
        held = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
        if held & own[theirs] and not held & own[mine]:
            wrong.append(f"{name}'s parameters belong to the {theirs}")
    if wrong:
        swapped = "the optimizers look swapped" if len(wrong) == 2 else "the optimizer looks misplaced"
        raise ValueError(f"{swapped}: {' and '.join(wrong)}. Call analyzer.bind(g_optimizer, d_optimizer), the "
                         "generator's optimizer first (or by name: bind(g_optimizer=..., d_optimizer=...))")


def _check_start_step(start_step: Any, g_numbers: list[int], d_numbers: list[int]) -> None:
    """bind's ``start_step`` (an int or a pair) against the loop steps each player has numbered so far
    (``g_numbers``, ``d_numbers``; a resumed run): a count below a player's last number would number
    its steps again (WGAN's five discriminator steps per iteration counted as one). A ValueError with
    the pair to pass."""
    starts = _start_pair(start_step)
    for player, start, numbered in (("generator", starts[0], g_numbers), ("discriminator", starts[1], d_numbers)):
        if numbered and start < numbered[-1]:
            raise ValueError(
                f"bind(start_step={start_step!r}) numbers the {player}'s next step {start + 1}, but the saved analyzer "
                f"already numbered {player} steps up to {numbered[-1]}: start_step counts each player's steps. Pass "
                "start_step=(generator_steps, discriminator_steps), the steps each player has taken, e.g. "
                f"start_step=({g_numbers[-1] if g_numbers else 0}, {d_numbers[-1] if d_numbers else 0}) when the loop "
                "went on from the save"
            )


def _span(steps: list[int]) -> list[int] | None:
    return [steps[0], steps[-1]] if steps else None


__all__ = ["GANKernelAnalyzer", "partition_statistics"]
