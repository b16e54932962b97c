"""NoiseLevelAnalyzer: the path-kernel ledger of a DDPM (or flow-matching) denoiser, split by training noise level.

docs/diffusion.md. A training contribution is a triple (x_n, t, ε); groups are bins of the
training timestep t (default 10 bins of equal width); a probe is (clean x, level s, fixed
noise ε') fed to the denoiser as the state (z_s, s) with z_s = sqrt(ᾱ_s) x + sqrt(1 − ᾱ_s) ε'.
The core's exact ledger (:class:`~genkernel.core.tracking.tracker.PathKernelTracker`) gives, at every
probe,

    f(z_s, s; θ_T) − f(z_s, s; θ_0) = Σ_t-bins C[probe, bin] + C_rest + R,

i.e. the noise-level × noise-level matrix C[s, t] of section 3 once probes at a level are
averaged. From it the analyzer reports traffic and net shares (with κ), their locality within a
band of w bins against a label-permutation control on the same trajectory, the normalized
gradient kernel across levels at checkpoints, and the residual.

The permutation controls. For each of ``controls`` control partitions every example also gets a
*control* label: the bin of another example of the same batch (a random permutation of the
batch's bin labels, from the analyzer's own generator). The tracker splits every step for the
level partition and each control partition at once (:class:`~genkernel.core.grouping.Partitions`),
so all come from one exact trajectory (same steps, same batches, same group sizes per step, except that a batch or
observed micro-batch of fewer than 8 examples draws its control labels from its own and the last 64 examples' bins,
as a permutation of one example's is the identity, and its control group sizes then follow those recent examples':
:func:`~genkernel.core.grouping.permuted_labels`), each
with its own ledger, at a cost that adds over partitions ((1 + controls) · G group rows).
``controls=0`` tracks the G bins only (no control, no claims).

Use with the built-in trainer::

    analyzer = NoiseLevelAnalyzer(scheduler, probe_data)
    trainer = DDPMTrainer(model, scheduler, data, callbacks=[analyzer])
    trainer.train(500)
    analyzer.report()

or observing your own loop, which keeps its forward, loss, backward, clipping, accumulation and
``optimizer.step()`` (accelerate's and Lightning's too)::

    analyzer = NoiseLevelAnalyzer(scheduler, probe_data)
    analyzer.bind(model, optimizer, ema=ema_model)     # ema: optional, a second ledger for the EMA weights
    for x0 in loader:
        noise, t = torch.randn_like(x0), torch.randint(0, T, (x0.shape[0],), device=x0.device)
        pred = model(scheduler.add_noise(x0, noise, t), t).sample
        losses = ((pred - noise) ** 2).mean(dim=(1, 2, 3))   # per-example, any weighting (min-SNR ...)
        analyzer.observe(losses, t)                     # the one added line, before the backward
        losses.mean().backward(); optimizer.step(); optimizer.zero_grad()
    analyzer.finish()                                   # kernel structure at θ_T
    analyzer.report()

or, in place of ``loss.backward(); optimizer.step()``, let the analyzer perform the step:
``losses = analyzer.step(x0, noise, t)``.

Flow matching (rectified flow, diffusers' ``FlowMatchEulerDiscreteScheduler``): pass that scheduler;
a level is the model's float timestep t = σ·T, z = (1 − σ) x + σ ε and the target ε − x
(:mod:`~genkernel.diffusion.objectives`). In your own loop ``observe(losses, timesteps)`` takes the
timesteps the model was given (``scheduler.timesteps[indices]``, or σ·T for continuous σ).

EDM (Karras et al. 2022, diffusers' ``EDMEulerScheduler``): pass that scheduler; a level is the
model's float timestep t = c_noise = ¼ ln σ, the model is given c_in (x + σ ε) and regresses the
effective target (x − c_skip z) / c_out, whose mean squared error is the EDM-weighted loss
λ(σ) ‖D − x‖² (:mod:`~genkernel.diffusion.objectives`). ``observe(losses, timesteps)`` takes
``scheduler.timesteps[indices]``, the timesteps the model was given (not the sigmas).

Conditional denoisers ``model(x_t, t, *conditioning)`` (class labels, ``encoder_hidden_states``):
``probe_conditioning`` gives the probes' extra inputs, steps pass ``conditioning=``, and with
``num_classes`` a "level_class" partition (noise level × class) is split beside the levels.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import operator
import os
import sys
import warnings
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..core import grouping
from ..core.adapter import (
    analysis_mode, as_tuple, buffer_snapshot, check_memory_budget, like_parameter, not_fitting_inputs,
    not_fitting_message, positive_int, restore_buffers, seed_bits, seeded_generator, unwrap, unwrap_optimizer,
)
from ..core.errors import LedgerCheckError
from ..core.cost import CostEstimate, example_counts, with_kernel_records
from ..core.tracking.callbacks import TrainerCallback
from ..core.tracking.distributed import summed_over_ranks
from ..core.tracking.io import atomic_save, check_saved_settings, jsonable, load_state, refuse_tracker_settings
from ..core.tracking.ledger import PathKernelLedger
from ..core.tracking.owed import OwedRecord, make_owed
from ..core.tracking.quadrature import quadrature_rule, residual_remedy
from ..core.tracking.ema import EMA_LEDGERS
from ..core.tracking.sketched import SKETCHED_TRAFFIC_NOTE, sketch_error_note, sketch_noise_note
from ..core.tracking.step import OptimizerStep
from ..core.tracking.tracker import (
    GROUP_STATES, MEMORY_CHECKS, MIXED_PRECISION, OWNED_STEP, REPEATABLE_LISTENER, PathKernelTracker, StepContributions,
    probe_identity, saved_tracker_settings, step_payloads,
)
from ..logging import LoggingCallback
from ..stats import nan_median
from .kernels import eval_mode, make_states, state_kernel, state_kernel_work
from .learned_variance import describe_loss, loss_targets, predicts_variance, training_loss
from .locality import kernel_locality, sketch_jackknife
from .models import KEY_BIAS_SUFFIXES
from .guidance import check_class_labels, class_tables
from .objectives import (
    check_prediction_type,
    check_timesteps,
    noise_process,
    level_dtype,
    noise_schedule_config,
    noisy_input,
    num_train_timesteps,
    NoiseBins,
    same_noise_schedule,
    training_target,
)

__all__ = ["NoiseLevelAnalyzer"]

FORMAT = "genkernel.NoiseLevelAnalyzer/2"
OBSERVED_LOSS = "the loop's own (observed)"  # a step of a user's loop: the analyzer sees losses, not their formula
AUTO_EXACT_OUTPUTS = 64  # kernel_sketch="auto": exact up to this many outputs per state
AUTO_SKETCH_DIRECTIONS = 8
LEVEL = "level"
LEVEL_CLASS = "level_class"
WEIGHTS = ("model", "ema")
# report() before any tracked step: every share and interval is undefined, not zero
NOTHING_RECORDED_NOTE = ("nothing is recorded yet: no training step has been tracked, so every share, locality and "
                         "residual is undefined (None); train at least one step with the analyzer bound before reading "
                         "the report")


class NoiseLevelAnalyzer(TrainerCallback):
    """Keeps the noise-level-split path-kernel ledger of a denoiser while it trains.

    Args:
        scheduler: the ``DDPMScheduler`` used for training (prediction type "epsilon",
            "v_prediction" or "sample"; add_noise builds the probes), or a flow-matching
            ``FlowMatchEulerDiscreteScheduler`` (levels t = σ·T, target ε − x), or an
            ``EDMEulerScheduler`` (levels t = ¼ ln σ, input c_in z, target (x − c_skip z) / c_out).
        probe_data: ``Tensor[N0, *shape]`` clean inputs for probes and kernel checkpoints
            (held-out data is best; the first ``kernel_points`` rows serve the kernel).
        num_bins: G, bins of the training timestep (groups).
        bin_spacing: "log_snr" (default: equal widths of log SNR, :class:`~genkernel.diffusion.objectives.NoiseBins`)
            or "timestep" (equal widths of t).
        num_probes: M probes, assigned round-robin to the probe levels.
        probe_levels: ``LongTensor[L]`` probe timesteps s (flow matching: real t = σ·T in [0, T];
            EDM: real t = ¼ ln σ; kept as float32); default the G bin centres.
        band: w, the half-width in bins of "nearby levels" for the locality measures. A band
            >= G − 1 holds every bin for every probe, so nothing lies outside it and locality is
            undefined: refused (ValueError) for G >= 3 bins; with G <= 2 every band but 0 covers
            both bins, and the analyzer runs for its other measures, its locality reported with a
            ``why``.
        controls: number of label-permutation control partitions tracked beside the level
            partition (0: none); each adds G group rows to every step's cost.
        quadrature: the ledger's rule ("midpoint" default; "left", "trapezoid", "simpson", "gauss2" to
            "gauss8": :mod:`~genkernel.core.tracking.quadrature`).
        snapshot_every: record locality summaries every this many tracked steps (0: only at
            the end); they are the "locality over training" curves.
        kernel_every: compute the kernel structure every this many tracked steps (0: only when
            tracking starts and at ``on_train_end``).
        kernel_points: clean inputs n used for the kernel structure (n × G states). A record's work grows with
            (n·G)² (and with the output directions); :attr:`cost` counts it (``kernel_records``, per tracked step)
            and its memory beside the tracker's, and bind refuses (``memory_check``) a record that does not fit.
        kernel_sketch: "auto" (the exact kernel for at most 64 outputs per state, else 8 output
            directions: an image's exact kernel needs one backward pass per pixel), None for the
            exact kernel, or V output directions.
        seed: seeds probe noise, the control permutations and kernel sketches (private
            generators; the global RNG is untouched).
        memory_budget: bytes of per-example gradients held at once by the tracker.
        probe_conditioning: extra model inputs per row of ``probe_data`` (a Tensor or tuple of
            Tensors with N0 rows: class labels, conditioning embeddings) for a conditional
            denoiser ``model(x_t, t, *conditioning)``.
        num_classes: C: also split every step into noise level × class groups (partition
            ``"level_class"``, G·C groups, group ``bin·C + class``); steps then pass ``class_labels``.
        track_steps: ``(first, last)`` trainer steps (1-based, inclusive) to track under a built-in
            trainer: the analyzer binds at ``first`` and stops paying after ``last`` (in your own loop,
            call ``bind`` when the window starts and :meth:`stop` when it ends).
        progress: print what a step will cost when the analyzer binds (one line on stderr).
        group_state, state_dtype, memory_check, mixed_precision: the tracker's
            (:class:`~genkernel.core.PathKernelTracker`): "auto"/"dense"/"sketched", float64 or (for a
            float32 model) float32 group state, "refuse" or "warn" for a cost estimate above the free
            memory (the estimate can be high on CUDA: "warn" builds the tracker anyway), and "refuse"
            or "observe" for steps whose forward runs under ``torch.autocast``, a loop of your own or
            ``DDPMTrainer(mixed_precision="bf16")`` (their half-precision gradients split, the rounding
            left in the residual; docs/observing.md, "Mixed precision").
        ema_ledger: attached to a trainer that keeps an EMA of the weights (``DDPMTrainer(ema=)``),
            "trainer" (default) keeps a second ledger for the EMA weights, the ones people sample from
            (the dense route; two more float64 copies of the parameters per group row); "none" keeps
            the model's ledgers only. In your own loop, ``bind(..., ema=)`` says it.
        sketch_dim: k of ``group_state="sketched"``: each group's state is a k-dimensional projection
            (memory (Σ groups) × k; the estimates' noise falls as 1/sqrt(k), and the report flags a
            ledger whose estimates miss their exact total by more than a tenth of the change).
        vlb_weight: λ of the hybrid loss that :meth:`step` (and :meth:`bind`'s ``tracker.step``) trains a model
            predicting its variance with (``variance_type="learned_range"``:
            :mod:`~genkernel.diffusion.learned_variance`); a trainer's steps and an observed loop carry their own loss.
        name: the key of this analyzer's state in a trainer's checkpoint (default the class name).
        log: a logger ``log(metrics, step)`` (:mod:`genkernel.logging`: TensorBoard, CSV, or any
            callable): the running residual, rest share, κ, traffic shares and locality
            (:func:`~genkernel.logging.analyzer_metrics`) at the tracked steps whose loop step number is a
            multiple of ``log_every`` (the trainer's ``log_every`` rows) and at the end of training (a
            ``track_steps`` window's last step), and the
            noise×noise matrices as images every ``image_every`` steps (0: when training ends).
        log_every, image_every: see ``log``.
    """

    def __init__(
        self,
        scheduler,
        probe_data: torch.Tensor,
        *,
        num_bins: int = 10,
        bin_spacing: str = "log_snr",
        num_probes: int = 64,
        probe_levels: torch.Tensor | None = None,
        band: int = 1,
        controls: int = 1,
        quadrature: str = "midpoint",
        snapshot_every: int = 5,
        kernel_every: int = 0,
        kernel_points: int = 8,
        kernel_sketch: int | str | None = "auto",
        seed: int = 0,
        memory_budget: int = 256 * 2**20,
        probe_conditioning: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        num_classes: int | None = None,
        track_steps: tuple[int, int] | None = None,
        progress: bool = True,
        group_state: str = "auto",
        state_dtype: torch.dtype = torch.float64,
        memory_check: str = "refuse",
        mixed_precision: str = "refuse",
        ema_ledger: str = "trainer",
        sketch_dim: int = 512,
        vlb_weight: float = 1.0,
        name: str | None = None,
        log: Callable[[Mapping[str, float], int], None] | None = None,
        log_every: int = 1,
        image_every: int = 0,
    ) -> None:
        self.prediction_type = check_prediction_type(scheduler)
        self.scheduler = scheduler
        self.loss_fn = training_loss(scheduler, vlb_weight)
        self.total = num_train_timesteps(scheduler)
        self.bins = NoiseBins(scheduler, num_bins, bin_spacing)
        num_probes = positive_int(num_probes, "num_probes")
        if not isinstance(probe_data, torch.Tensor) or probe_data.dim() < 2 or not probe_data.is_floating_point():
            raise TypeError(
                "probe_data must be a floating Tensor [N0, *shape] of clean inputs shaped like the training data, "
                f"got {getattr(probe_data, 'shape', type(probe_data).__name__)}"
            )
        if isinstance(controls, bool) or not isinstance(controls, int) or controls < 0:
            raise ValueError(f"controls must be a non-negative int (permutation control partitions), got {controls!r}")
        if isinstance(band, bool) or not isinstance(band, int) or band < 0:
            raise ValueError(f"band must be a non-negative int (bins), got {band!r}")
        if num_bins >= 3 and band >= num_bins - 1:
            # Every probe's band would hold all G bins (kernel locality: no state outside it, NaN;
            # ledger locality: measured = control = the whole share, a difference of rounding).
            raise ValueError(
                f"band={band} covers all num_bins={num_bins} bins (band >= num_bins - 1 = {num_bins - 1}): nothing "
                f"lies outside it, so locality is undefined; pass band <= {num_bins - 2} or more bins"
            )
        for key, every in (("snapshot_every", snapshot_every), ("kernel_every", kernel_every)):
            # (a float every passed the old check and recorded at the multiples of it that steps hit:
            # snapshot_every=1.5 every third step, kernel_every=0.5 every step)
            if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 0:
                raise ValueError(f"{key} must be an int >= 0 (tracked steps; 0: only at the start/end), got {every!r}")
        snapshot_every, kernel_every = int(snapshot_every), int(kernel_every)
        if not isinstance(kernel_points, int) or kernel_points < 2:
            raise ValueError(f"kernel_points must be an int >= 2 (pairs of different inputs), got {kernel_points!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        conditioning = () if probe_conditioning is None else as_tuple(probe_conditioning, name="probe_conditioning")
        if any(c.shape[0] != probe_data.shape[0] for c in conditioning):
            raise ValueError(
                f"probe_conditioning needs one row per row of probe_data ({probe_data.shape[0]}), got "
                f"{[tuple(c.shape) for c in conditioning]}"
            )
        self.num_classes = num_classes
        if track_steps is not None and (
            not isinstance(track_steps, (tuple, list)) or len(track_steps) != 2
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in track_steps)
            or not 1 <= track_steps[0] <= track_steps[1]
        ):  # (floats were taken: (1.5, 4) tracked steps 2 to 4)
            raise ValueError(f"track_steps must be (first, last) ints with 1 <= first <= last, got {track_steps!r}")
        if track_steps is not None:
            track_steps = (int(track_steps[0]), int(track_steps[1]))
        self.track_steps = track_steps
        self.progress = progress
        self.group_state = group_state
        self.state_dtype = state_dtype
        self.sketch_dim = positive_int(sketch_dim, "sketch_dim")
        if ema_ledger not in EMA_LEDGERS:
            raise ValueError(f"ema_ledger must be one of {EMA_LEDGERS}, got {ema_ledger!r}")
        self.ema_ledger = ema_ledger
        self.stopped = False
        self.num_bins = num_bins
        self.band = band
        self.controls = controls
        self.name = name
        self.quadrature = quadrature
        self.snapshot_every = snapshot_every
        self.kernel_every = kernel_every
        self.kernel_sketch = kernel_sketch
        self.seed = seed
        # The tracker's settings are checked here, not at binding: a track_steps window (or a loop's
        # bind after a warm-up) should not fail after the untracked steps have trained.
        self.memory_budget = check_memory_budget(memory_budget)
        if memory_check not in MEMORY_CHECKS:
            raise ValueError(f"memory_check must be one of {MEMORY_CHECKS}, got {memory_check!r}")
        if group_state not in GROUP_STATES:
            raise ValueError(f"group_state must be one of {GROUP_STATES}, got {group_state!r}")
        if state_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"state_dtype must be torch.float64 or torch.float32, got {state_dtype!r}")
        quadrature_rule(quadrature)  # (a ValueError naming the rules)
        if kernel_sketch != "auto" and kernel_sketch is not None and (
                isinstance(kernel_sketch, bool) or not isinstance(kernel_sketch, int) or kernel_sketch < 1):
            raise ValueError(f"kernel_sketch must be 'auto', None (exact) or a positive int of output directions, "
                             f"got {kernel_sketch!r}")
        self.memory_check = memory_check
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        self.mixed_precision = mixed_precision
        # one piece logs for the trainers, the callback and this analyzer (genkernel.logging)
        self.logging = None if log is None else LoggingCallback(
            log, analyzer=self, every=log_every, analysis_every=log_every, image_every=image_every
        )

        # Probes: (clean x, level s, fixed noise) -> states (z_s, s); round-robin over levels.
        levels = self.bins.centers if probe_levels is None else check_timesteps(
            torch.as_tensor(probe_levels), scheduler, name="probe_levels"
        )
        self.levels = levels.to(level_dtype(scheduler))
        self.level_bins = self.bins(self.levels)
        generator = seeded_generator(seed)
        self.probe_level = torch.arange(num_probes) % self.levels.numel()  # level index per probe
        self.probe_timesteps = self.levels[self.probe_level]
        self.probe_bins = self.level_bins[self.probe_level]
        pick = torch.randperm(probe_data.shape[0], generator=generator)
        rows = pick[torch.arange(num_probes) % probe_data.shape[0]]
        self.probe_clean = probe_data[rows].detach().to(torch.float64).cpu()
        self.probe_conditioning = tuple(c[rows.to(c.device)].detach().cpu() for c in conditioning)
        # copies (a slice is a view: the caller's later in-place changes to probe_data moved the kernel states)
        self.kernel_conditioning = tuple(c[:kernel_points].detach().to("cpu", copy=True) for c in conditioning)
        self.probe_noise = torch.randn(self.probe_clean.shape, generator=generator, dtype=torch.float64)
        self.kernel_clean = probe_data[: kernel_points].detach().to(device="cpu", dtype=torch.float64, copy=True)
        if self.kernel_clean.shape[0] < 2:
            raise ValueError(f"probe_data needs at least 2 rows for the kernel structure, got {probe_data.shape[0]} "
                             f"(probe_data of shape {tuple(probe_data.shape)}): pass 2 or more held-out examples as "
                             "probe_data, a batch [n, ...] with n >= 2 (one image needs its batch dimension and a second "
                             "image: the kernel compares pairs of different inputs)")
        self.kernel_noise = torch.randn(self.kernel_clean.shape, generator=generator, dtype=torch.float64)
        self._perm_generator = torch.Generator().manual_seed(seed_bits(seed + 1))
        self._sigma_like = 0  # examples in a row at a level t <= 1 (flow matching: sigmas passed as timesteps?)
        self._control_pool = torch.zeros(0, dtype=torch.long)  # bins of the last examples (grouping.recent_labels)

        self.tracker: PathKernelTracker | None = None
        self._kernel_wrappers: dict = {}  # the kernel sketch's wrappers, kept between records (state_kernel)
        self.model: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        # The trainer whose load_state_dict is loading this analyzer's state, set by the built-in trainers for that
        # call alone: a state loaded before bind is compared with the EMA ledger that trainer's train() would bind
        # (_check_saved_tracker); None otherwise.
        self.resuming_trainer: Any = None
        self._overhead_pending = False  # a DataLoader trainer's VAE encode, counted at its first batch
        # Why this analyzer refuses to go on (a step's bookkeeping cut off where it cannot be completed), else None.
        self._broken: str | None = None
        self._reset_records()

    # -- binding -----------------------------------------------------------------------------
    @property
    def partitions(self) -> dict[str, int]:
        """The partitions the tracker splits: ``{"level": G, "control_0": G, ..., "level_class": G·C}``."""
        out = {LEVEL: self.num_bins, **{name: self.num_bins for name in self.control_names}}
        if self.num_classes is not None:
            out[LEVEL_CLASS] = self.num_bins * self.num_classes
        return out

    @property
    def control_names(self) -> list[str]:
        return [f"control_{i}" for i in range(self.controls)]

    def probes(self, like: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The probe states ``(z_s [M, *shape], s [M], *conditioning)`` in ``like``'s dtype/device."""
        clean, noise = self.probe_clean, self.probe_noise
        conditioning = self.probe_conditioning
        if like is not None:
            clean, noise = clean.to(like), noise.to(like)
            conditioning = tuple(like_parameter(c, like) for c in conditioning)
        t = self.probe_timesteps.to(clean.device)
        return (noisy_input(self.scheduler, clean, noise, t), t, *conditioning)

    def bind(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        ema: Any = None,
        max_grad_norm: float = math.inf,
        start_step: int = 0,
        batch_size: int | None = None,
        micro_batches: int | None = None,
        step_overhead: float = 0.0,
    ) -> None:
        """Start tracking ``model`` trained by ``optimizer`` (the window starts at the current θ).

        ``model`` and ``optimizer`` may be wrapped (DistributedDataParallel, accelerate's prepared
        objects, ``torch.compile``, Lightning's optimizer): the analyzer reads through the wrappers.
        ``ema``: an EMA of the weights (diffusers' ``EMAModel``, ema-pytorch's ``EMA``,
        ``AveragedModel``) that the loop updates after each step: a second ledger is kept for it.
        ``start_step``: the loop's step count now (reports number steps from it, counting a step the loop
        skipped with its micro-batches observed, a GradScaler's, as the loop does); with a loaded state,
        at least the saved last step number (a ValueError otherwise: the steps would be numbered again).
        ``batch_size``: the loop's batch, for the cost printed here (default: the number of probes until the
        first tracked step, whose batch then replaces it: the tracker estimates again and checks the fit, the
        kernel records' too, before that step is recorded; :class:`~genkernel.core.tracking.tracker.PathKernelTracker`);
        ``micro_batches``: the micro-batches a step runs that batch in (a built-in trainer's
        ``micro_batches=``), for the cost too (training then holds one micro-batch's activations, and
        the tracker runs a pass of its own for the group gradients; default 1 until the first step, as for
        ``batch_size``); ``step_overhead``: example-forwards of
        the model the loop's step runs per example besides its forward and backward (DREAM's no-grad forward: 1;
        a VAE's encode), for the cost's bare step (:class:`~genkernel.core.tracking.tracker.PathKernelTracker`).
        """
        if self.tracker is not None:
            raise RuntimeError("this analyzer is already bound to a model; build a new one for another run")
        self._check_probe_labels(model)  # (before the probes' first forward: torch's "index out of range" otherwise)
        self._class_tables = class_tables(unwrap(model))  # (read once: the steps' labels are checked against them)
        if self._pending_state is not None:  # before any hook is attached to the optimizer
            self._check_start_step(self._pending_state, start_step if self._start_step is None else self._start_step)
            # (loaded by hand, not by a trainer: whether the saved run kept an EMA ledger is known here, from ema=)
            self._check_saved_tracker(self._pending_state, ema=ema is not None)
        optimizer = unwrap_optimizer(optimizer)
        param = next(unwrap(model).parameters())
        probes = self.probes(param)
        self.model = model
        self.tracker = PathKernelTracker(
            model, optimizer, self.loss_fn, probes, num_groups=self.partitions, quadrature=self.quadrature,
            max_grad_norm=max_grad_norm, memory_budget=self.memory_budget, group_state=self.group_state,
            state_dtype=self.state_dtype, batch_size=batch_size, micro_batches=micro_batches,
            step_overhead=step_overhead,
            memory_check=self.memory_check, sketch_dim=self.sketch_dim, mixed_precision=self.mixed_precision,
        )
        self.tracker.listeners.append(self._record)
        if ema is not None:
            try:
                self.tracker.track_ema(ema)
            except BaseException as error:  # unbound again: the analyzer can be bound once fixed
                self.tracker.close(record_ema=False)
                self.tracker = None
                if isinstance(error, ValueError) and "needs one update row per group" in str(error):
                    # (only the route's refusal: an EMA of other tensors is not fixed by a group state)
                    raise ValueError(f"{error} (here: NoiseLevelAnalyzer(group_state='dense' or 'auto'), or "
                                     "ema_ledger='none' to keep no ledger for a trainer's EMA)") from error
                raise
        try:
            if self.stopped:  # a state saved after its window ended, bound to be read: it records no kernel again
                states, sketch = self._kernel_states(unwrap(model))
                self._kernel_record = {"work": 0.0, "bytes": 0, "states": int(states[0].shape[0]), "sketch": sketch}
            else:
                self._kernel_record = self.kernel_record_cost(model)
                self._check_kernel_fit()
                # (checked again beside the tracker's estimate made with the first step's batch, where it was not given)
                self.tracker.add_cost_follower(self._follow_kernel_fit)  # (a bound method: a deep copy rebinds it)
        except BaseException:  # unbound again: the analyzer can be bound once fixed
            self.tracker.close(record_ema=False)
            self.tracker = None
            raise
        if self.progress:
            print(f"[genkernel] NoiseLevelAnalyzer: {self.cost.describe()}", file=sys.stderr)
        start_before, self._start_step = self._start_step, start_step if self._start_step is None else self._start_step
        try:
            if self._pending_state is not None:
                self._check_auto_route(self._pending_state)
                self._load(self._pending_state)
            elif not self.kernel_history:
                self.record_kernel()
        except BaseException:
            # Unbound again (a loaded state still pending): left bound, a trainer's next train() found the analyzer
            # bound and went on without what failed here: a refused state's ledgers (a fresh ledger from the resume
            # on, its steps numbered on, the saved ones dropped), or the start's kernel record (the history lacked it).
            self.tracker.close(record_ema=False)
            self.tracker, self._start_step = None, start_before
            raise
        if self._pending_state is not None:
            self._pending_state = None
            if self.stopped:  # saved after its window ended: the ledgers are for reading only
                self.tracker.close(record_ema=False)
        self._steps_at_bind = self.tracker.attempted_steps

    def _follow_kernel_fit(self, tracker: PathKernelTracker) -> None:
        """The tracker's cost follower (:meth:`PathKernelTracker.add_cost_follower`): :meth:`_check_kernel_fit`."""
        self._check_kernel_fit()

    def _check_kernel_fit(self) -> None:
        """Refuse (``memory_check="refuse"``: MemoryError, as the tracker refuses) or warn (ResourceWarning) where
        the kernel record's peak, beside what the tracker holds, is more than the device had free when the tracker
        was estimated: the tracker's own check does not see the record."""
        cost = self.cost
        if cost.memory["kernel_record"] == 0 or cost.fits_beside(self.tracker.cost):
            return
        message = (f"this analyzer's kernel structure records would not fit on {cost.settings.get('device')}: "
                   f"{cost.describe()}. Cheaper: " + "; ".join(cost.cheaper))
        if self.memory_check == "refuse":
            raise MemoryError(message + ". If you know the device holds it (the estimate can be high on CUDA), "
                              "build the analyzer with memory_check='warn'")
        warnings.warn(message + " (memory_check='warn': bound anyway)", ResourceWarning, stacklevel=3)

    # -- the trainer callback ----------------------------------------------------------------
    def _check_trainer_scheduler(self, trainer: Any) -> None:
        """Refuse a trainer whose scheduler has another noise schedule, T or prediction type than the
        analyzer's: its bins and probes would be another schedule's, without an error."""
        theirs = getattr(trainer, "scheduler", None)
        if theirs is None or theirs is self.scheduler or not hasattr(theirs, "config"):
            return
        if not same_noise_schedule(self.scheduler, theirs):
            process = noise_process(theirs)
            kind = "flow matching" if process == "flow_matching" else getattr(theirs.config, "prediction_type", None)
            kind = f"EDM {kind}" if process == "edm" else kind
            raise ValueError(
                f"the trainer's scheduler ({type(theirs).__name__}, T = {theirs.config.get('num_train_timesteps')}, "
                f"prediction {kind!r}) is not the analyzer's ({type(self.scheduler).__name__}, T = {self.total}, "
                f"prediction {self.prediction_type!r}, {self.bins.process}) or has another noise schedule "
                "(alphas_cumprod, a flow grid's shift, an EDM grid's σ range or σ_d): the bins and probes would be "
                "another schedule's. Build the analyzer with the "
                "trainer's scheduler: NoiseLevelAnalyzer(trainer.scheduler, ...)"
            )

    def _check_latent_probes(self, trainer: Any, step: OptimizerStep) -> None:
        """Refuse probes not shaped as a latent-diffusion trainer's (``DDPMTrainer(vae=)``) model inputs: image
        probes there are of another space (a VAE with as many latent channels as the images have, LDM's f4
        VAE, and a resolution-free UNet would run them without an error)."""
        if getattr(trainer, "latent_coder", None) is None:
            return
        given, probes = tuple(step.inputs[0].shape[1:]), tuple(self.probe_clean.shape[1:])
        if given != probes:
            raise ValueError(
                f"the trainer denoises latents shaped {given} per example (vae=), this analyzer's probes are shaped "
                f"{probes}: build the analyzer with the probes' latents, NoiseLevelAnalyzer(scheduler, "
                "trainer.encode(probe_images), ...)"
            )

    def _check_latent_probe_images(self, trainer: Any) -> None:
        """Refuse, before :meth:`bind` runs the probes through the model, probes shaped as a latent-diffusion
        trainer's images (``DDPMTrainer(vae=)``) where its VAE makes latents of another shape: bind's first forward
        failed on them with the model's own error (a convolution's channel count), which named neither the probes
        nor the fix (:meth:`_check_latent_probes` checks the steps' latents at the first step). Tensor data: the
        images' shape is known. A DataLoader's images are shaped by its first batch, not drawn yet: probes the
        VAE encodes (its ``in_channels``) to latents of another shape are refused where one of them does not fit
        the model (a trial forward that changes nothing); probes that run stay for the first step's check (latents
        with as many channels as the images, LDM's f4 VAE, are not told apart from images before it). Returns None."""
        coder, images = getattr(trainer, "latent_coder", None), getattr(trainer, "input_shape", None)
        probes = tuple(self.probe_clean.shape[1:])
        if coder is None:
            return
        error = None
        if images is None:
            if len(probes) != 3 or (coder.in_channels is not None and probes[0] != coder.in_channels):
                return  # (not images the VAE encodes: the model's own error, or the first step's check, tells)
            error = self._probes_fail(trainer.model)
            if error is None:
                return
            images = probes
        if probes != tuple(images):
            return
        try:
            latents = tuple(coder.mode_latents(torch.zeros((1, *images), dtype=torch.float64),
                                               device=torch.device("cpu"), dtype=torch.float64).shape[1:])
        except Exception:  # (the VAE does not encode this shape: not its images; the model's error tells)
            if error is None:
                raise
            raise error from None
        if latents != probes and error is not None and self._probes_fail(trainer.model, latents) is not None:
            # (latents of the VAE's shape fail too: the probes' shape is not what the model refused, their
            # conditioning is, embeddings of another width, and "build with the probes' latents" misled)
            model = unwrap(trainer.model)
            first = [t[:1] for t in self.probes(next(model.parameters()))]
            raise ValueError(not_fitting_message("probes", model, first, error)) from error
        if latents != probes:
            raise ValueError(
                f"the trainer denoises latents shaped {latents} per example (vae=), this analyzer's probes are shaped "
                f"{probes}, as its images: build the analyzer with the probes' latents, NoiseLevelAnalyzer(scheduler, "
                "trainer.encode(probe_images), ...)"
            ) from error

    def _check_probe_labels(self, model: nn.Module) -> None:
        """Refuse probe class labels (the integer ``[N0]`` parts of ``probe_conditioning``) outside the model's
        class-label table (:func:`~genkernel.diffusion.guidance.check_class_labels`): the probes' first forward
        failed on them with torch's "index out of range in self", which named neither the labels nor the table.
        Returns None."""
        labels = [torch.cat([p, k]) for p, k in zip(self.probe_conditioning, self.kernel_conditioning)
                  if p.dim() == 1 and not (p.is_floating_point() or p.is_complex() or p.dtype == torch.bool)]
        tables = class_tables(unwrap(model)) if labels else []
        for values in labels:
            check_class_labels(tables, values, "the probes' class labels (probe_conditioning=)")

    def _probes_fail(self, model: nn.Module, shape: tuple[int, ...] | None = None) -> BaseException | None:
        """The error one probe's forward raises where its inputs do not fit ``model`` (None where it runs; with
        ``shape``, zeros of that shape per example in place of its noisy input, the rest of its inputs kept), run
        under :func:`~genkernel.core.adapter.analysis_mode` and ``no_grad`` (eval mode, the global RNG forked) with
        the buffers put back (a forward that updates one in eval mode too, a quantization observer's): nothing of
        the training changes."""
        model = unwrap(model)
        probes = tuple(t[:1] for t in self.probes(next(model.parameters())))
        if shape is not None:
            probes = (probes[0].new_zeros((1, *shape)), *probes[1:])
        buffers = buffer_snapshot(model)
        try:
            with analysis_mode(model), torch.no_grad():
                model(*probes)
        except Exception as error:  # (out-of-memory errors and failed collectives pass through as they are)
            if not not_fitting_inputs(error):
                raise
            return error
        finally:
            restore_buffers(buffers)
        return None

    def on_train_start(self, trainer: Any) -> None:
        self._check_trainer_scheduler(trainer)
        self._check_trainer_conditioning(trainer)
        if self.tracker is not None and not self.stopped:
            self._settle()  # (records owed by a step whose bookkeeping was interrupted: made before any new step)
        # Bound now inside the window, or to restore a saved state (one saved after the window
        # ended included: its ledgers are then read, not extended).
        if self.tracker is None and (self._in_window(getattr(trainer, "global_step", 0) + 1)
                                     or self._pending_state is not None):
            self._check_probe_labels(trainer.model)  # (before _trainer_overhead's and bind's forwards of the probes)
            self._check_latent_probe_images(trainer)
            self._start_step = getattr(trainer, "global_step", None)
            batch_size = getattr(trainer, "batch_size", None)
            micro_batches = getattr(trainer, "micro_batches", 1)  # (as its steps split a batch: at most one example each)
            micro_batches = micro_batches if batch_size is None else min(micro_batches, batch_size)
            self.bind(trainer.model, trainer.optimizer, ema=self._trainer_ema(trainer),
                      max_grad_norm=getattr(trainer, "max_grad_norm", math.inf), batch_size=batch_size,
                      micro_batches=micro_batches, step_overhead=self._trainer_overhead(trainer))
            # (a DataLoader's images are shaped by its first batch, not drawn yet: the VAE's encode is counted then)
            self._overhead_pending = (getattr(trainer, "latent_coder", None) is not None
                                      and getattr(trainer, "input_shape", None) is None)

    def _recount_overhead(self, overhead: float) -> None:
        """The bound cost's bare step with the trainer's work outside its model counted again (``overhead``
        example-forwards per example): no memory part changes, so no fit check runs again."""
        self.tracker.set_step_overhead(overhead)
        if self.progress:
            print(f"[genkernel] NoiseLevelAnalyzer, the VAE's encode counted at the first batch: {self.cost.describe()}",
                  file=sys.stderr)

    def _trainer_overhead(self, trainer: Any) -> float:
        """The trainer's work per example outside its model's forward and backward, in example-forwards of the
        model (``DDPMTrainer.step_overhead_forwards``: DREAM's forward, a VAE's encode), for the cost estimate."""
        overhead_of = getattr(trainer, "step_overhead_forwards", None)
        if not callable(overhead_of):
            return 0.0
        model = unwrap(trainer.model)
        probes = self.probes(next(model.parameters()))
        try:
            with analysis_mode(model):  # (eval mode, the global RNG forked: the count disturbs no training draw)
                macs = example_counts(model, tuple(t[:1] for t in probes))[1]
        except Exception as error:  # (the probes' first forward: torch's words named neither them nor their shapes)
            if not not_fitting_inputs(error):
                raise
            raise ValueError(not_fitting_message("probes", model, probes, error)) from error
        return float(overhead_of(macs))

    def _check_trainer_conditioning(self, trainer: Any) -> None:
        """Refuse probes without conditioning for a trainer that conditions its model (``DDPMTrainer(conditional=)``):
        the probes' forward ``model(z, s)`` would miss the input every training step gives; probes with conditioning
        for a trainer that gives its model none; probe embeddings shaped otherwise than the trainer's data's (known
        for Tensor data); and a level × class split the trainer's labels do not fit (:meth:`_check_trainer_classes`).
        Returns None."""
        conditioning = getattr(trainer, "conditioning", "none")  # (DDPMTrainer's; another trainer's may be anything)
        if getattr(trainer, "conditioning", None) == "none" and self.probe_conditioning:
            # (the probes' forward model(z, s, *conditioning) failed in the model's words, "class_embedding needs to
            # be initialized", or ran a model the steps call otherwise)
            raise ValueError(
                f"the trainer calls its model as model(x_t, t) (conditional=False), but this analyzer's probes carry "
                f"probe_conditioning shaped {[tuple(c.shape) for c in self.probe_conditioning]}: drop "
                "probe_conditioning= (and num_classes= unless the steps pass class labels), or build the trainer with "
                "conditional=True (class labels) or conditional='embeddings'"
            )
        self._check_trainer_classes(trainer)
        shapes = getattr(trainer, "embedding_shape", None)
        if conditioning == "embeddings" and isinstance(shapes, tuple) and shapes and self.probe_conditioning:
            # (the data's embeddings are known: probes of another width failed at their first forward in torch's
            # words, "mat1 and mat2 shapes cannot be multiplied"; another length at the first step)
            given = [shapes] if all(isinstance(d, int) for d in shapes) else [tuple(part) for part in shapes]
            probes = [tuple(c.shape[1:]) for c in self.probe_conditioning]
            if given != probes:
                raise ValueError(
                    f"the trainer gives its model {len(given)} embedding input(s) shaped {given} per example (its data's "
                    f"embeddings), this analyzer's probes {len(probes)} shaped {probes}: build it with probe_conditioning= "
                    "encoded as the data's (the probes' prompts through the same text encoder; a tuple (sequence, "
                    "pooled) for embeddings given as a tuple)"
                )
        if conditioning == "class_labels" and self.probe_conditioning and self.probe_conditioning[0].is_floating_point():
            # (the model's embedding lookup refused them at bind with torch's words: "Expected tensor for argument #1
            # 'indices' to have one of the following scalar types: Long, Int")
            raise TypeError(
                "the trainer gives its model class labels (conditional=True), but this analyzer's probe_conditioning is "
                f"a floating tensor ({self.probe_conditioning[0].dtype}, shaped {tuple(self.probe_conditioning[0].shape)}): "
                "pass the probes' class labels, a LongTensor[N0] (embeddings are for conditional='embeddings')"
            )
        if isinstance(conditioning, str) and conditioning in ("class_labels", "embeddings") and not self.probe_conditioning:
            what = ("embeddings, a floating Tensor [N0, *E] (the probes' prompts encoded)" if conditioning == "embeddings"
                    else "class labels, a LongTensor[N0]")
            raise ValueError(
                f"the trainer gives its model {conditioning.replace('_', ' ')} as a third input (conditional="
                f"{'True' if conditioning == 'class_labels' else repr(conditioning)}), but this analyzer's probes have "
                f"none: build it with probe_conditioning=, the probes' {what}"
            )

    def _check_trainer_classes(self, trainer: Any) -> None:
        """Refuse, before any step, a level × class split (``num_classes=C``) that a DDPMTrainer's Tensor data cannot
        fill: data without class labels (every step refused at the tracked steps), or labels, or a classifier-free
        guidance null class, at C or above (refused at the first step that drew them, after the analyzer had bound
        and the untracked steps before had trained). Returns None."""
        if self.num_classes is None or not isinstance(getattr(trainer, "data", None), torch.Tensor):
            return
        if not hasattr(trainer, "labels"):
            return
        labels = trainer.labels
        if labels is None:
            raise ValueError(
                f"this analyzer splits by level × class (num_classes={self.num_classes}), but the trainer's data has no "
                "class labels: pass the trainer labels= (a LongTensor[N]; they reach the analyzers for an unconditional "
                "model too), or build the analyzer without num_classes="
            )
        dropout = getattr(trainer, "class_dropout", None)
        null = getattr(dropout, "null_class", None) if getattr(dropout, "active", False) else None
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"the trainer's labels go down to {int(labels.min())}, outside this analyzer's level × "
                             f"class split (classes 0 to {self.num_classes - 1}): pass the trainer class indices from 0")
        high = max(int(labels.max()) if labels.numel() else -1, -1 if null is None else int(null))
        if high >= self.num_classes:
            what = (f"the classifier-free guidance null class {null}" if null is not None and null == high
                    else f"labels up to {high}")
            raise ValueError(
                f"the trainer gives {what}, outside this analyzer's level × class split (num_classes={self.num_classes}, "
                f"classes 0 to {self.num_classes - 1}): build the analyzer with num_classes={high + 1} (a null class is "
                "a class of its own in the split)"
            )

    def _trainer_ema(self, trainer: Any) -> Any:
        """The trainer's EMA of the weights, when it keeps one and ``ema_ledger="trainer"``; else None."""
        return getattr(trainer, "ema", None) if self.ema_ledger == "trainer" else None

    def _in_window(self, step: int) -> bool:
        return self.track_steps is None or self.track_steps[0] <= step <= self.track_steps[1]

    def stop(self) -> None:
        """Stop tracking (the end of the tracked window): the kernel structure at the window's last
        θ is recorded unless it already is, the ledgers are kept and reported, and the loop's later
        steps are not analysed and cost nothing more."""
        if self.stopped:
            return
        if self.tracker is not None:
            self._settle()
            self._record_kernel_of_last_step()
            self._end_kernel = None  # the window's last θ: its record stays (no step of the window comes after it)
            self.tracker.close()
        self.stopped = True

    def wrap_step(self, trainer: Any, step: OptimizerStep, perform: Callable[[], torch.Tensor]) -> torch.Tensor:
        index = getattr(trainer, "global_step", 0) + 1
        if self.stopped or not self._in_window(index):
            if self.tracker is not None and not self.stopped:
                self.stop()
            return perform()
        if "timesteps" not in step.info:
            raise ValueError(
                "the step carries no timesteps: a diffusion trainer must put the training timesteps in "
                "step.info['timesteps'] (DDPMTrainer does)"
            )
        self._check_latent_probes(trainer, step)
        if self.tracker is None:
            self._check_trainer_scheduler(trainer)
            self._check_probe_labels(step.model)  # (before _trainer_overhead's forward of the probes)
            self.bind(step.model, step.optimizer, ema=self._trainer_ema(trainer), max_grad_norm=step.max_grad_norm,
                      batch_size=step.batch, micro_batches=step.micro_batches, start_step=index - 1,
                      step_overhead=self._trainer_overhead(trainer))
        elif self._overhead_pending:
            self._overhead_pending = False
            self._recount_overhead(self._trainer_overhead(trainer))
        current = getattr(trainer, "global_step", None)
        self.number_next_step(None if current is None else current + 1)  # 1-based index of this step
        return self.track(step, step.info["timesteps"], class_labels=step.info.get("class_labels")).losses

    def on_train_end(self, trainer: Any) -> None:
        self.finish()

    # -- the user-loop verbs -------------------------------------------------------------------
    def observe(
        self,
        losses: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        class_labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Report one micro-batch of your own loop, before its backward.

        Args:
            losses: ``[B]`` per-example losses with their graph, weighted as your loss weights them
                (min-SNR and the like); your loss is their mean, or Σ_n c_n ℓ_n with ``weights``.
            timesteps: ``LongTensor[B]`` the training timesteps (flow matching: the model's float t = σ·T;
                EDM: its float t = ¼ ln σ, ``scheduler.timesteps[indices]``).
            class_labels: ``LongTensor[B]`` in [0, C), with ``num_classes`` (a ValueError without it).

        The loop's ``optimizer.step()`` records the step (gradient accumulation over several
        observed micro-batches and global-norm clipping are followed exactly).
        """
        if self.tracker is None:
            raise RuntimeError("call analyzer.bind(model, optimizer) before analyzer.observe(...)")
        if self.stopped:
            raise RuntimeError("the analyzer was stopped (its tracked window ended): do not observe later steps")
        if class_labels is not None and self.num_classes is None:
            # (the labels were dropped without a word: the loop got no level × class ledger and no error)
            raise ValueError(
                "class_labels were given, but this analyzer was built without num_classes, so it keeps no level × "
                "class ledger and would ignore them: build it with num_classes=C (and probe_conditioning=, the probes' "
                "labels, for a class-conditional model), or drop class_labels="
            )
        self._settle()  # (before this step's micro-batches: the owed records read the last step's ledger and θ)
        # A refused micro-batch draws nothing: the loop that catches the error and observes again (or the
        # same loop resumed) gets the control permutations an uninterrupted run draws.
        perm_state, sigma_like, pool = self._perm_generator.get_state(), self._sigma_like, self._control_pool
        try:
            self._observe(losses, timesteps, class_labels, weights)
        except BaseException:
            self._perm_generator.set_state(perm_state)
            self._sigma_like = sigma_like
            self._control_pool = pool
            raise

    def _observe(self, losses, timesteps, class_labels, weights) -> None:
        groups, bins = self._groups(timesteps, losses.shape[0] if isinstance(losses, torch.Tensor) else -1, class_labels)
        try:
            number = self.tracker.observe(losses, {k: v.to(losses.device) for k, v in groups.items()}, weights)
        except ValueError as error:
            if "needs one update row per group" not in str(error):
                raise
            raise ValueError(f"{error} (here: NoiseLevelAnalyzer(group_state='dense' or 'auto'); group_state="
                             f"{self.group_state!r} serves the analyzer's own steps, analyzer.step(...) or a "
                             "built-in trainer)") from error
        except RuntimeError as error:
            if "backward through the graph a second time" not in str(error):
                raise
            # torch's own words suggest retain_graph=True; the usual cause is the order of two lines
            raise RuntimeError(
                "analyzer.observe(losses, timesteps) reads the per-example gradients from the losses' graph, which "
                "the backward has already freed: call observe before accelerator.backward(...) / loss.backward()"
            ) from error
        # Keyed by the tracker's observation number: the step takes the micro-batches the tracker kept for it
        # (a micro-batch left out, or dropped with a skipped step, is not counted in its bins).
        self._pending_bins[number] = bins
        self._pending_loss = OBSERVED_LOSS

    def number_next_step(self, step: int | None) -> None:
        """Say which of the loop's optimizer steps the next recorded step is: ``step``, 1-based (the loop's step
        count once that step is taken, ``trainer.global_step + 1`` before it), its entry of ``global_steps`` (the
        report's, the history's, the logs' step number). It holds for that one step; a step recorded without it is
        numbered from bind's ``start_step`` (the steps recorded or skipped since bind). For a loop whose count
        leaves out what the tracker counts, or counts what it does not see (a window of accumulation the loop
        abandons, a step a module skips): GenkernelCallback calls it before every step (automatic or manual
        optimization), the built-in trainers before every step they take. ``None``: number the next step from ``start_step``."""
        if step is not None:
            try:
                number = None if isinstance(step, bool) else operator.index(step)
            except TypeError:
                number = None
            if number is None or number < 1:
                raise ValueError(f"number_next_step takes the step's 1-based number (an int >= 1) or None, got {step!r}")
            step = number
        if self.tracker is not None and not self.stopped:
            self._settle()  # (a step recorded whose bookkeeping is owed takes the number it was given, not this one)
        self._global_step = step

    def finish(self) -> None:
        """Record the kernel structure at the last tracked θ unless the last tracked step has it already
        (what a built-in trainer's end of training, each ``train()`` call's, does; after :meth:`stop` the
        window's last θ has it), and log the final numbers and matrices when the analyzer has a ``log``.

        The end record is the last entry of ``kernel_history`` (and of a state saved now) while training
        stays there; when training goes on (another ``train()``, a run resumed from a checkpoint saved after
        ``train()`` returned, more observed steps), the next tracked step replaces it: the run trained in
        pieces keeps the kernel history of the run trained straight through (the start, every
        ``kernel_every`` tracked steps, the end). :meth:`record_kernel` keeps a record for good."""
        if self.tracker is not None and not self.stopped:
            self._settle()
            self._record_kernel_of_last_step(at_end=True)
        if self.logging is not None:
            self.logging.on_train_end(None)

    def _record_kernel_of_last_step(self, *, at_end: bool = False) -> None:
        """:meth:`record_kernel` unless no step is tracked or the last one has its entry; ``at_end``: the
        end-of-training record, replaced when a later step is tracked (:meth:`finish`)."""
        steps = self.tracker.ledger.steps
        if steps and (not self.kernel_history or self.kernel_history[-1]["tracked_step"] != steps):
            count = len(self.kernel_history)
            self.record_kernel()
            if at_end and len(self.kernel_history) > count:  # (marked only where an entry was appended)
                self._end_kernel = len(self.kernel_history) - 1

    def _drop_end_kernel(self) -> None:
        """Training went on past an end-of-training record (:meth:`finish`): remove it. The run trained in pieces
        (or resumed from a checkpoint saved after ``train()`` returned) then records the kernel where the run
        trained straight through does, bit for bit."""
        index, self._end_kernel = self._end_kernel, None
        if (index is not None and 0 <= index < len(self.kernel_history)
                and self.kernel_history[index]["tracked_step"] < self.tracker.ledger.steps):
            del self.kernel_history[index]

    def step(
        self,
        clean: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        conditioning: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        class_labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        max_grad_norm: float | None = None,
    ) -> torch.Tensor:
        """One real optimizer step of the bound model on a DDPM batch, recorded in the ledger.

        Replaces ``loss.backward(); optimizer.step()`` in a user's loop. Args: ``clean`` and
        ``noise`` ``[B, *shape]``, ``timesteps`` ``LongTensor[B]`` in [0, T) (flow matching: t = σ·T in [0, T];
        EDM: t = ¼ ln σ); ``conditioning``: the
        model's extra inputs; ``weights``: per-example coefficients c_n of the loss Σ_n c_n ℓ_n
        (default the mean; min-SNR weighting goes here). Builds z with
        :func:`~genkernel.diffusion.objectives.noisy_input` and the target for the scheduler's prediction type. Returns the per-example losses ``[B]``.
        """
        if self.tracker is None:
            raise RuntimeError("call analyzer.bind(model, optimizer) before analyzer.step(...)")
        timesteps = check_timesteps(timesteps, self.scheduler)
        noisy = noisy_input(self.scheduler, clean, noise, timesteps)
        target = training_target(self.scheduler, clean, noise, timesteps)
        extra = () if conditioning is None else as_tuple(conditioning, name="conditioning")
        step = OptimizerStep(
            self.tracker.model, self.tracker.optimizer, self.loss_fn, (noisy, timesteps, *extra),
            loss_targets(self.loss_fn, target, clean, noisy, timesteps), weights,
            max_grad_norm=self.tracker.max_grad_norm if max_grad_norm is None else max_grad_norm,
            info={"timesteps": timesteps},
        )
        return self.track(step, timesteps, class_labels=class_labels).losses

    def track(self, step: OptimizerStep, timesteps: torch.Tensor, *, class_labels: torch.Tensor | None = None) -> StepContributions:
        """Group the step's examples by timestep bin (and permuted bins for the controls, and level ×
        class) and let the tracker take the step. A step that fails before its update puts the control
        permutations' generator back: the step run again (a built-in trainer hands its batch back) draws the
        permutations the uninterrupted run draws."""
        self._settle()  # (records owed by the previous step, at its ledger and θ, before this step changes them)
        perm_state, sigma_like, pool = self._perm_generator.get_state(), self._sigma_like, self._control_pool
        try:
            return self._track(step, timesteps, class_labels)
        except BaseException:
            if not step.applied:
                self._perm_generator.set_state(perm_state)
                self._sigma_like = sigma_like
                self._control_pool = pool
            raise

    def _track(self, step: OptimizerStep, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> StepContributions:
        self._check_step_conditioning(step)
        groups, bins = self._groups(timesteps, step.batch, class_labels)
        self._pending_bins = {OWNED_STEP: bins}  # (an owned step: the tracker observes nothing, step_observations is [])
        self._pending_loss = describe_loss(step.loss_fn)
        weighting = step.info.get("loss_weighting")
        if weighting:  # a built-in trainer's per-level weights w(t): the step minimized (1/B) Σ w(t_n) ℓ_n
            settings = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                                 for k, v in weighting.items() if k != "weighting")
            self._pending_loss += f", weighted by {weighting['weighting']}" + (f" ({settings})" if settings else "")
        if step.info.get("dream") is not None:  # (the trainer's dream=: the inputs and targets the step trained on)
            self._pending_loss += f", on DREAM-corrected inputs and targets (p = {step.info['dream']:g})"
        try:
            return self.tracker.track(step, {k: v.to(timesteps.device) for k, v in groups.items()})
        except LedgerCheckError as error:
            if self.tracker._unheard is None:  # (else the recorded step's listener, owed, counts them: _settle)
                self._pending_bins = {}
            if any(suffix in str(error) for suffix in KEY_BIAS_SUFFIXES):
                raise LedgerCheckError(
                    f"{error}. Attention key biases have exactly zero gradient (softmax is shift invariant) and "
                    "only rounding noise moves them: freeze them with "
                    "genkernel.diffusion.freeze_attention_key_biases(model) before building the optimizer"
                ) from error
            raise
        except BaseException:
            if self.tracker._unheard is None:  # (as above)
                self._pending_bins = {}
            raise

    def _check_step_conditioning(self, step: OptimizerStep) -> None:
        """Refuse a step whose model inputs beside (x_t, t) are not the probes' in number and per-row shapes: the
        probes' kernels would be of another input (a pooled embedding the steps give and the probes lack
        reaches a model whose ``forward`` defaults it, silently, as None)."""
        given = [tuple(c.shape[1:]) for c in step.inputs[2:]]
        probes = [tuple(c.shape[1:]) for c in self.probe_conditioning]
        for part in step.inputs[2:]:  # (class labels past the model's table: torch's "index out of range in self")
            if isinstance(part, torch.Tensor) and part.dim() == 1 and not (
                    part.is_floating_point() or part.is_complex() or part.dtype == torch.bool):
                check_class_labels(getattr(self, "_class_tables", []), part, "the step's class labels (conditioning=)")
        if probes and not given:  # (the model's own error otherwise: "class_labels should be provided", or none)
            raise ValueError(
                f"the step gives the model no input beside (x_t, t), this analyzer's probes {len(probes)} "
                f"(probe_conditioning shaped {probes} per example): pass the step's conditioning, the inputs the model "
                "trains with (analyzer.step(..., conditioning=labels)), or build the analyzer without probe_conditioning= "
                "for a model called as model(x_t, t)"
            )
        if given and probes and given != probes:
            raise ValueError(
                f"the step gives the model {len(given)} input(s) beside (x_t, t) shaped {given} per example, this "
                f"analyzer's probes {len(probes)} shaped {probes}: build it with probe_conditioning= as the steps' "
                "(a tuple (sequence, pooled) for embeddings given as a tuple)"
            )

    def _groups(self, timesteps, batch: int, class_labels) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every partition's ids for a batch (a step's or an observed micro-batch's): level bins, permuted bins per
        control (a batch under 8 examples with the last examples' bins beside its own:
        :func:`~genkernel.core.grouping.permuted_labels`), level × class."""
        # One read of the levels from their device (on a GPU, a host synchronization); the checks, the
        # sigma count and the binning below all read this CPU copy.
        timesteps = check_timesteps(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                                    self.scheduler)
        if timesteps.numel() != batch:
            raise ValueError(f"got {timesteps.numel()} timesteps for a batch of {batch}")
        # EDM needs no such count: its levels t = ¼ ln σ are legitimately small or negative, and sigmas
        # passed for them are refused by check_timesteps as soon as one exceeds ¼ ln(10 σ_max) (σ > ¼ ln σ
        # always; with the default σ range, 55% (Karras) or 37% (exponential) of the levels drawn do).
        if self.bins.flow and self.total >= 100:
            # Every example at σ <= 1/T: about (1/T)^n for n examples in a row under any training
            # distribution, but exactly what passing the loop's sigmas (in [0, 1]) in place of its
            # timesteps gives (FLUX's scripts give the model timesteps / 1000), which would book every
            # example to bin 0 without an error. Counted across micro-batches and steps: loops of
            # batch size 1 or 2 (with gradient accumulation) are common for these models.
            small = batch if batch and float(timesteps.max()) <= 1.0 else 0
            self._sigma_like = self._sigma_like + small if small else 0
            if self._sigma_like >= 4:
                count, self._sigma_like = self._sigma_like, 0
                raise ValueError(
                    f"the last {count} examples' timesteps are all <= 1 on a flow-matching "
                    f"schedule of T = {self.total}: these look like sigmas (σ in [0, 1]); pass the timesteps the "
                    "model was given, t = σ·T (scheduler.timesteps[indices]; FLUX's loop gives its transformer "
                    "timesteps / 1000: pass the timesteps, not that)"
                )
        bins = self.bins(timesteps)
        groups = {LEVEL: bins}
        controls, self._control_pool = grouping.control_labels(bins, len(self.control_names), self._perm_generator,
                                                               self._control_pool)
        groups.update(zip(self.control_names, controls))
        if self.num_classes is not None:
            if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (batch,):
                raise ValueError(f"this analyzer splits by level × class (num_classes={self.num_classes}): pass "
                                 f"class_labels, a LongTensor[{batch}]")
            if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
                raise ValueError(f"class_labels must be an integer tensor (a LongTensor), got {class_labels.dtype}")
            labels = class_labels.cpu().long()
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                low, high = int(labels.min()), int(labels.max())
                hint = "" if high < self.num_classes else (
                    "; a classifier-free guidance null class is a class of its own: count it in num_classes "
                    f"(num_classes={high + 1} for labels 0..{high})"
                )
                raise ValueError(f"class_labels must lie in [0, {self.num_classes}), got labels in [{low}, {high}]{hint}")
            groups[LEVEL_CLASS] = bins * self.num_classes + labels
        return groups, bins

    # -- recording -----------------------------------------------------------------------------
    def _reset_records(self) -> None:
        # The bins of the micro-batches of the step in progress, by the tracker's observation number
        # (an owned step's under OWNED_STEP).
        self._pending_bins: dict[int, torch.Tensor] = {}
        self._pending_loss: str | None = None  # what the step in progress trains with (describe_loss)
        self.step_losses: dict[str, int] = {}  # tracked steps by the loss they trained with
        self.bin_counts: list[list[int]] = []
        self.global_steps: list[int | None] = []
        self.history: list[dict[str, Any]] = []
        self.kernel_history: list[dict[str, Any]] = []
        self._global_step = None
        self._start_step: int | None = None
        self._steps_at_bind = 0
        # kernel_history's index of the end-of-training record (finish), replaced when training goes on; else None
        self._end_kernel: int | None = None
        # The records a recorded step still owes (its snapshot, kernel record and log: an interrupt cut them off),
        # made at the next opportunity, at that step's ledger and θ; else None.
        self._owed: dict[str, Any] | None = None
        self._recording = False  # inside _record's counts (cut off there, the analyzer refuses to go on)
        self._settling = False  # inside _settle (the records it makes may read the analyzer: not made twice)

    def _record(self, result: StepContributions) -> None:
        """The tracker's listener: bookkeeping after every recorded step (owned or observed).

        The step's counts first (cut off there, the analyzer refuses to go on: :meth:`_settle`), then its
        records (snapshot, kernel record, log): cut off there (a KeyboardInterrupt, a MemoryError), they are
        owed and made at the next opportunity (the next ``train()``, step, observed micro-batch, save, report or
        :meth:`finish`), at this step's ledger and θ, which nothing changes before the next step. A listener call
        the tracker never made (an interrupt between its commit and its listeners) is made then too
        (:meth:`PathKernelTracker._hear`); one the tracker repeats for a step already counted counts nothing."""
        if self._broken is None and self._recording:
            self._broken = ("the bookkeeping of a recorded step was interrupted while it counted the step (bins, "
                            "step numbers, losses)")
        if self._broken is None and len(self.bin_counts) == self.tracker.ledger.steps:
            # Counted already: the tracker calls a listener again that was cut off before it returned (in the records
            # below, which are owed and made by _settle at the analyzer's next verb).
            return
        if self._broken is None and self._owed is not None:
            # (a step taken past the analyzer's verbs, tracker.track called directly, after an interrupted bookkeeping)
            self._broken = (f"the records of tracked step {self._owed['tracked_step']} (snapshot, kernel record, log) "
                            "were interrupted and a later step was recorded before they could be made")
        if self._broken is not None:
            self._refuse_owed()
        self._recording = True
        self._drop_end_kernel()
        bins = step_payloads(self._pending_bins, self.tracker.step_observations)
        bins = torch.cat(bins) if bins else torch.zeros(0, dtype=torch.long)
        loss, self._pending_loss = self._pending_loss or OBSERVED_LOSS, None
        self.step_losses[loss] = self.step_losses.get(loss, 0) + 1
        # Under DDP each rank saw its shard: the counts are the global batch's.
        self.bin_counts.append(summed_over_ranks(torch.bincount(bins, minlength=self.num_bins),
                                                 self.tracker.distributed).tolist())
        step = self._global_step
        if step is None:  # a user loop: count from bind's start_step (the steps recorded or skipped since bind)
            step = (self._start_step or 0) + self.tracker.attempted_steps - self._steps_at_bind
        self.global_steps.append(step)
        self._global_step = None
        steps = self.tracker.ledger.steps
        self._owed = {"tracked_step": steps, "step": step,
                      "snapshot": bool(self.snapshot_every and steps % self.snapshot_every == 0),
                      "kernel": bool(self.kernel_every and steps % self.kernel_every == 0),
                      "log": self.logging is not None}
        self._recording = False
        self._settle()

    setattr(_record, REPEATABLE_LISTENER, True)  # (it counts a step once: the tracker may call it again)

    def _settle(self) -> None:
        """Make the records the last recorded step owes (:meth:`_record`): its locality snapshot, kernel record
        and log, each unless made already, after the tracker's listener calls its last step still owes (this
        analyzer's counts, :meth:`_record`). Refuses (RuntimeError) where a step's counts were cut off half-way."""
        if self.tracker is not None and not self._recording and self._broken is None:
            self.tracker._hear()  # (a step recorded whose listeners an interrupt kept from running: counted now)
        if self._recording and self._broken is None:
            self._broken = ("the bookkeeping of a recorded step was interrupted while it counted the step (bins, "
                            "step numbers, losses)")
        if self._broken is not None:
            self._refuse_owed()
        owed = self._owed
        if owed is None or self._settling:  # (a log callable reading report() while the records are made)
            return
        steps = owed["tracked_step"]
        if self.tracker is None or self.tracker.ledger.steps != steps:
            self._broken = (f"the records of tracked step {steps} (snapshot, kernel record, log) were interrupted and "
                            "a later step was recorded before they could be made")
            self._refuse_owed()
        self._settling = True
        try:
            make_owed(owed, (
                OwedRecord("snapshot", lambda: bool(self.history) and self.history[-1]["tracked_step"] == steps,
                           lambda: self.history.append(self._summary_row())),
                OwedRecord("kernel",
                           lambda: bool(self.kernel_history) and self.kernel_history[-1]["tracked_step"] == steps,
                           self.record_kernel),
                OwedRecord("log", lambda: self.logging is None, lambda: self.logging.log_step(owed["step"]), once=True),
            ), label=f"tracked step {steps} (locality snapshot, kernel record, log)",
                retry="step, train(), save or report")
        finally:
            self._settling = False
        self._owed = None

    def _refuse_owed(self) -> None:
        raise RuntimeError(
            f"this analyzer refuses further steps, saves and reports: {self._broken}, "
            "so its counts, history and kernel records no longer match its ledgers. Resume from the last "
            "checkpoint (trainer.resume(path), or analyzer.load / load_state_dict) or build a new analyzer"
        )

    def _summary_row(self) -> dict[str, Any]:
        row = {"tracked_step": self.tracker.ledger.steps, "global_step": self.global_steps[-1] if self.global_steps else None,
               "relative_residual": self.tracker.ledger.relative_residual()}
        row.update({k: v for k, v in self.locality().items()})
        matrices = self.matrices()
        row["traffic_matrix"] = matrices["traffic"].tolist()
        row["share_matrix"] = matrices["share"].tolist()
        return row

    def kernel_structure(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Kernel structure of ``model`` (default: the bound one) at its current θ, not recorded.

        k̂ between the states of ``kernel_points`` clean inputs at every bin centre (fixed noise):
        its decay with |Δbin| (different inputs, and the same input at two levels) and kernel
        locality against a level-label permutation (:func:`~genkernel.diffusion.locality.kernel_locality`).
        Use it before training or a warm-up to get the structure at initialization. A sketched k̂
        (``kernel_sketch`` V output directions) carries its own error, which the locality interval (over
        clean inputs) does not hold: ``sketch_standard_error`` is its largest off-diagonal entry's
        jackknife standard error over the V directions, ``sketch_standard_errors`` each summary number's
        (``by_distance``, ``by_distance_same_input``, ``locality``'s difference); 0 for the exact kernel.
        """
        model = self.model if model is None else model
        if model is None:
            raise RuntimeError("pass a model, or bind the analyzer to one first")
        # the module itself, as the records take it (the tracker's): a torch.compile'd module's hooks see nothing,
        # and the engine's chunk sizes divided by its factors' sizes, 0 (a ZeroDivisionError)
        model = unwrap(model)
        states, sketch = self._kernel_states(model)
        errors: dict = {}
        with eval_mode(model):  # the function sampled from, as the probes see it (a trainer's model is in train mode)
            kernel = state_kernel(model, states, output_sketch=sketch, seed=self.seed, memory_budget=self.memory_budget,
                                  progress=self.progress, wrappers=self._wrappers_for(model), errors=errors)
        points, bins = self.kernel_clean.shape[0], torch.arange(self.num_bins)
        summary = kernel_locality(kernel.cpu(), points, bins, self.band, seed=self.seed)
        # A sketched k̂'s own error (the locality interval is over clean inputs and does not hold it): the largest
        # off-diagonal entry's jackknife standard error over the V directions, and each summary number's own
        # (0 for the exact kernel; infinite with one direction, which has no spread to read).
        spread = errors.get("standard_error")
        off = ~torch.eye(kernel.shape[0], dtype=torch.bool, device=kernel.device)
        error = 0.0 if spread is None else float(spread[off].max()) if bool(off.any()) else 0.0
        if "leave_one_out" in errors:
            numbers = sketch_jackknife(errors["leave_one_out"].cpu(), points, bins, self.band, seed=self.seed)
        else:
            fill = 0.0 if spread is None else math.inf
            numbers = {"by_distance": [fill] * len(summary["by_distance"]),
                       "by_distance_same_input": [fill] * len(summary["by_distance_same_input"]), "locality": fill}
        return {"sketch": sketch, "sketch_standard_error": error, "sketch_standard_errors": numbers, **summary}

    def _wrappers_for(self, model: nn.Module) -> dict | None:
        """The kept sketch wrappers (:func:`~genkernel.diffusion.kernels.state_kernel`'s ``wrappers``) for the bound
        module (the tracker's, unwrapped: the records'), None for any other: a wrapper holds its model, and one
        kept per model passed to :meth:`kernel_structure` (a sweep over checkpoints) kept every one of them alive."""
        return self._kernel_wrappers if self.model is not None and model is unwrap(self.model) else None

    def _kernel_states(self, model: nn.Module) -> tuple[tuple[torch.Tensor, ...], int | None]:
        """The kernel structure's states ``(z [n·G, *shape], t [n·G], *conditioning)`` in ``model``'s dtype and
        device, and the output directions its kernel is sketched with (None: exact)."""
        param = next(unwrap(model).parameters())
        all_levels = self.bins.centers
        states = make_states(self.scheduler, self.kernel_clean.to(param), self.kernel_noise.to(param), all_levels)
        levels = all_levels.numel()
        # floating conditioning in the model's dtype, as the probes have it (probes(like=...))
        states = (*states, *(like_parameter(c, param).repeat_interleave(levels, dim=0) for c in self.kernel_conditioning))
        sketch = self.kernel_sketch
        if sketch == "auto":
            # outputs per state: the input's values, twice over for a model that predicts its variance too
            outputs = self.kernel_clean[0].numel() * (2 if predicts_variance(self.scheduler) else 1)
            sketch = None if outputs <= AUTO_EXACT_OUTPUTS else AUTO_SKETCH_DIRECTIONS
        return states, sketch

    def kernel_record_cost(self, model: nn.Module | None = None) -> dict[str, Any]:
        """What one :meth:`record_kernel` costs on ``model`` (default: the bound one), from the engine's counts
        (:func:`~genkernel.diffusion.kernels.state_kernel_work`), nothing of the kernel's size computed:
        ``{"work": example-forwards of the model, "bytes": the engine's peak of Jacobians or factors and the
        kernel, "states": n·G, "sketch": V or None}``."""
        model = self.model if model is None else model
        if model is None:
            raise RuntimeError("pass a model, or bind the analyzer to one first")
        # the module the records run on (the tracker's, unwrapped), and the one whose sketch wrapper they keep: a
        # torch.compile'd model's hooks see nothing (its probe sizes 0, a ZeroDivisionError at bind), and the
        # wrapper would be another module's, checked for no record
        model = unwrap(model)
        states, sketch = self._kernel_states(model)
        with eval_mode(model):
            counts = state_kernel_work(model, states, output_sketch=sketch, memory_budget=self.memory_budget,
                                       wrappers=self._wrappers_for(model), seed=self.seed)
        work = (counts["kernel"] + counts["checks"]) / max(counts["forward_macs"], 1.0)
        return {"work": work, "bytes": int(counts["bytes"]), "states": int(states[0].shape[0]), "sketch": sketch}

    @property
    def cost(self) -> CostEstimate:
        """The tracker's estimate (:attr:`PathKernelTracker.cost`) with the kernel structure's records added:
        work ``kernel_records``, one record's example-forwards over ``kernel_every`` (amortized per tracked step;
        0 with ``kernel_every=0``), the records at the start and end in ``settings["kernel_record_once"]``;
        memory ``kernel_record``, the record's peak beyond the step's temporaries (the record runs between
        steps, with the arrays the tracker keeps from step to step held: :func:`~genkernel.core.cost.with_kernel_records`). ``tracker.cost`` stays the tracker's alone."""
        self._require()
        return with_kernel_records(self.tracker.cost, self._kernel_record, self.kernel_every)

    def record_kernel(self) -> dict[str, Any]:
        """:meth:`kernel_structure` at the θ the ledger has reached (the current θ, unless something
        wrote other weights into the model since the last tracked step: an EMA copied in at the end of
        training is not the trained θ), appended to ``kernel_history``. After :meth:`stop` or a
        ``track_steps`` window that θ is the window's last, which the entry's ``tracked_step`` and
        ``global_step`` name, not the live weights of a model trained on since: for those, call
        :meth:`kernel_structure` (not recorded)."""
        with contextlib.nullcontext() if self.tracker is None else self.tracker.at_last_step() as model:
            entry = {
                "tracked_step": 0 if self.tracker is None else self.tracker.ledger.steps,
                "global_step": self.global_steps[-1] if self.global_steps else self._start_step,
                **self.kernel_structure(model),
            }
        self.kernel_history.append(entry)
        return entry

    # -- summaries -----------------------------------------------------------------------------
    def _require(self) -> None:
        if self.tracker is None and self._pending_state is not None:
            raise RuntimeError("the analyzer holds a loaded state that is restored when it is bound: call "
                               "analyzer.bind(model, optimizer), or start training, before reading it")
        if self.tracker is None:
            raise RuntimeError("the analyzer has not tracked anything yet (bind it and train)")

    @property
    def ledgers(self) -> dict[str, PathKernelLedger]:
        """The tracker's ledgers: ``"level"`` (groups: training-level bins) and ``"control_i"``."""
        self._require()
        return self.tracker.ledgers

    @property
    def ledger(self) -> PathKernelLedger:
        """The level partition's :class:`~genkernel.core.tracking.ledger.PathKernelLedger`."""
        return self.ledgers[LEVEL]

    @property
    def contributions(self) -> torch.Tensor:
        """``[M, G, d]`` contributions per training-level bin (the level ledger's, on the CPU)."""
        return self.ledger.contributions.cpu()

    @property
    def traffic(self) -> torch.Tensor:
        """``[M, G]`` traffic per training-level bin (the level ledger's, on the CPU)."""
        return self.ledger.traffic.cpu()

    @property
    def ema_ledgers(self) -> dict[str, PathKernelLedger]:
        """The EMA weights' ledgers (``bind(..., ema=...)``), per partition."""
        self._require()
        return self.tracker.ema_ledgers

    def _partition(self, partition: str, weights: str = "model") -> PathKernelLedger:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if weights == "ema" and self.tracker is not None and self.tracker.ema is None:
            raise ValueError("weights='ema': this analyzer keeps no ledger for an EMA of the weights (in your loop: "
                             "bind(model, optimizer, ema=...); attached to DDPMTrainer(ema=...): ema_ledger='trainer', "
                             "the default)")
        ledgers = self.ledgers if weights == "model" else self.ema_ledgers
        if partition not in ledgers:
            raise ValueError(f"unknown partition {partition!r}; this analyzer tracks {list(ledgers)}")
        return ledgers[partition]

    def shares(self, partition: str = LEVEL, *, weights: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
        """Net shares ``[M, G]`` per group of ``partition`` and κ ``[M]`` (on the CPU), of the model's
        ledgers or (``weights="ema"``) the EMA weights'."""
        ledger = self._partition(partition, weights)
        delta = ledger.delta.cpu()
        contributions = ledger.contributions.cpu()
        return grouping.net_shares(contributions, delta), grouping.cancellation_ratio(contributions, delta)

    def traffic_shares(self, partition: str = LEVEL, *, weights: str = "model") -> torch.Tensor:
        """Traffic ``[M, G]`` of ``partition`` normalized over groups per probe (rows sum to 1)."""
        return grouping.traffic_shares(self._partition(partition, weights).traffic.cpu())

    def matrices(self, *, weights: str = "model") -> dict[str, torch.Tensor]:
        """Noise × noise matrices ``[L, G]`` (rows: probe level, averaged over its probes; columns:
        training-level bin): traffic and net shares, measured and (averaged over the control
        partitions) control, plus κ ``[L]`` and the relative residual per level ``[L]``."""
        self._require()
        num_levels = self.levels.numel()

        def by_level(values: torch.Tensor) -> torch.Tensor:
            return grouping.average_by_probe_group(values, self.probe_level, num_levels)

        shares, kappa = self.shares(weights=weights)
        ledger = self._partition(LEVEL, weights)
        out = {
            "traffic": by_level(self.traffic_shares(weights=weights)),
            "share": by_level(shares),
            "kappa": by_level(kappa[:, None])[:, 0],
            "residual": by_level(ledger.probe_relative_residual().cpu()[:, None])[:, 0],
        }
        if self.controls:
            out["traffic_control"] = torch.stack([by_level(self.traffic_shares(c, weights=weights))
                                                  for c in self.control_names]).mean(0)
            out["share_control"] = torch.stack([by_level(self.shares(c, weights=weights)[0])
                                                for c in self.control_names]).mean(0)
        return out

    def locality(self, band: int | None = None, *, weights: str = "model") -> dict[str, Any]:
        """Traffic and net-share locality (share within w bins of each probe's level) against the
        control partitions, per probe, as "measured minus control" with a 95 % interval over
        probes (:func:`~genkernel.core.grouping.measured_minus_control`)."""
        self._require()
        w = self.band if band is None else band
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 0:  # (1.5 read as 1, labelled 1.5)
            raise ValueError(f"band must be a non-negative int (bins), got {band!r}")
        w = int(w)
        shares, kappa = self.shares(weights=weights)
        out: dict[str, Any] = {"band": w, "median_kappa": nan_median(kappa)}
        control_shares = [self.shares(c, weights=weights) for c in self.control_names]
        if control_shares:
            out["median_kappa_control"] = nan_median(torch.stack([k for _, k in control_shares]))
        out.update(grouping.band_locality(
            self.traffic_shares(weights=weights), shares,
            [self.traffic_shares(c, weights=weights) for c in self.control_names], [s for s, _ in control_shares],
            self.probe_bins, w, self.num_bins, self.probe_level,
            [(self.levels[level].item(), int(self.level_bins[level])) for level in range(self.levels.numel())],
        ))
        return out

    def residual(self, *, weights: str = "model") -> dict[str, float]:
        """The ledger's residual: relative overall, worst probe, and the core summary."""
        self._require()
        ledger = self._partition(LEVEL, weights)
        summary = ledger.summary()
        rest_share = ledger.shares().rest
        return {
            "median_rest_share": nan_median(rest_share),
            "relative_residual": summary["relative_residual"],
            "max_probe_relative_residual": summary["max_probe_relative_residual"],
            "rest_norm": summary["rest_norm"],
            "mean_change_norm": summary["mean_change_norm"],
            "steps": summary["steps"],
        }

    def report(self) -> dict[str, Any]:
        """Everything as strict-JSON numbers (matrices as nested lists, NaN as None), with the axes of
        the matrices named, the loop's step numbers, the EMA weights' ledger when one is kept, and
        notes on what the numbers cannot support (a large residual, with the rule that shrinks it).
        Before any tracked step: the same fields, undefined values as None, ``"measured": False`` and a
        note saying that nothing is recorded yet."""
        self._require()
        notes = []
        try:
            self._settle()
        except Exception as error:  # (a record that fails each time, one that does not fit: the report reads the rest)
            if self._broken is not None or self._owed is None:
                raise
            notes.append(f"the records of tracked step {self._owed['tracked_step']} (locality snapshot, kernel record, "
                         f"log) are not all made: {type(error).__name__}: {error}")
        numbered = [s for s in self.global_steps if s is not None]
        if self.track_steps is None and numbered and numbered[0] > 1:
            # (an analyzer attached to a trainer that had trained, or resumed without the analyzer's state, or bound
            # with start_step=: its ledgers are the window from there, which no other field of the report names)
            notes.append(_late_start_note(numbered[0], numbered[-1]))
        residual = self.residual()
        empty = residual["steps"] == 0
        if empty:
            notes.append(NOTHING_RECORDED_NOTE)
        if residual["relative_residual"] > 1e-3:
            notes.append(
                f"the residual is {residual['relative_residual']:.2g} of the change (quadrature {self.quadrature!r}): "
                + residual_remedy(self.quadrature, self.tracker.gradient_scales)
            )
        extra: dict[str, Any] = {}
        rest_share = residual["median_rest_share"]
        if empty:
            extra["measured"] = False  # (no share is defined before a tracked step)
        elif math.isfinite(rest_share) and abs(rest_share) > 0.5:
            extra["measured"] = False
            notes.append(
                f"the window's change is mostly the rest (median rest share {rest_share:.2f}): optimizer state from "
                "before tracking began (momentum, Adam's first moment) or weight decay, which no tracked example caused; "
                "the group shares describe the smaller remainder: track a longer window"
            )
        else:
            extra["measured"] = True
        if self.tracker.group_state == "sketched":
            notes.append(SKETCHED_TRAFFIC_NOTE)
            sketch = sketch_error_note(self.tracker.ledgers[LEVEL].relative_sketch_error(), "the noise-level")
            if sketch is not None:  # (the controls' ledgers are sketched alike: one note)
                notes.append(sketch)
            noise = sketch_noise_note(self.tracker.ledgers[LEVEL].relative_sketch_noise(), "the noise-level")
            if noise is not None:
                notes.append(noise)
        if self.tracker.ema is not None:
            extra["ema"] = {
                "residual": self.residual(weights="ema"),
                "matrices": self.matrices(weights="ema"),
                "locality": self.locality(weights="ema"),
                "decays": list(self.tracker.ema.decays),
                "start_share_mean": float(grouping.part_share(self.tracker.ema.start.cpu(),
                                                             self.ema_ledgers[LEVEL].delta.cpu()).nanmean()),
            }
        if self.num_classes is not None:
            by_level = grouping.average_by_probe_group(self.traffic_shares(LEVEL_CLASS), self.probe_level, self.levels.numel())
            extra["level_class_traffic"] = {
                "matrix": by_level, "columns": f"training group bin·{self.num_classes} + class",
            }
        return jsonable({
            "axes": {"rows": "probe level (timestep s, config.probe_levels)", "columns": "training-timestep bin (0: least noise)"},
            "notes": notes,
            **extra,
            "config": {
                "num_bins": self.num_bins, "bins": self.bins.describe(), "band": self.band,
                "num_probes": int(self.probe_level.numel()),
                "probe_levels": self.levels.tolist(), "probe_level_bins": self.level_bins.tolist(),
                "controls": self.controls, "quadrature": self.quadrature, "prediction_type": self.prediction_type,
                "step_losses": dict(self.step_losses), "track_steps": self.track_steps, "group_state": self.tracker.group_state,
                **({"sketch_dim": self.sketch_dim} if self.tracker.group_state == "sketched" else {}),
                # the analyzer's estimate, its kernel records with the tracker's step (bind prints the same)
                "cost": self.cost.as_dict(),
                "beta_schedule": self.scheduler.config.get("beta_schedule"), "num_train_timesteps": self.total,
                "noise_schedule": noise_schedule_config(self.scheduler),
                "kernel_points": int(self.kernel_clean.shape[0]), "kernel_sketch": self.kernel_sketch,
            },
            "tracked_steps": self.tracker.ledger.steps,
            "global_steps": [self.global_steps[0], self.global_steps[-1]] if self.global_steps else None,
            "residual": residual,
            "matrices": self.matrices(),
            "locality": self.locality(),
            "locality_over_training": self.history,
            "kernel": self.kernel_history,
            "bin_counts_total": torch.tensor(self.bin_counts).sum(0).tolist() if self.bin_counts else [],
        })

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.tracker is None:
            if self._pending_state is not None:  # loaded, not bound yet (a resumed trainer saving before it trains)
                return self._pending_state
            return {"format": FORMAT, "bound": False}
        try:
            self._settle()  # (a state saved after an interrupted bookkeeping holds the records the step owes)
        except Exception:
            # a record that fails each time (one that does not fit beside training): the state carries it owed, and
            # the run resumed from it makes it at its first opportunity (at the ledger's last θ: the same record)
            if self._broken is not None or self._owed is None:
                raise
        return {
            "format": FORMAT, "bound": True, "tracker": self.tracker.state_dict(), "stopped": self.stopped,
            "bin_counts": self.bin_counts, "global_steps": self.global_steps, "step_losses": dict(self.step_losses),
            "history": self.history, "kernel_history": self.kernel_history,
            # the index of kernel_history's end-of-training record (finish), replaced when training goes on
            "end_kernel": self._end_kernel,
            # the records the last recorded step still owes (_record), made by the run resumed from this state
            "owed": None if self._owed is None else dict(self._owed),
            "perm_generator": self._perm_generator.get_state(),
            # the flow-matching sigma refusal's count of examples in a row at t <= 1, which may span a save
            "sigma_like": self._sigma_like,
            # the bins a next batch under 8 examples draws its control labels from beside its own
            "control_pool": self._control_pool.tolist(),
            # band: a reading setting (not checked on load), saved so that a summary of the state reads
            # locality at the analyzer's own half-width
            "config": {"num_bins": self.num_bins, "controls": self.controls, "probe_timesteps": self.probe_timesteps.tolist(),
                       "bin_edges": self.bins.edges.tolist(), "band": self.band, "probe_inputs": self._probe_inputs(),
                       **self._noise_process(), **self._record_settings()},
        }

    def _record_settings(self) -> dict[str, Any]:
        """What the saved records were made under, which a resumed run must share: the tracked window's first step
        (a ledger begun at step 1 resumed as a window from step 2 would be reported as that window, and the reverse;
        its last step may move, within what the saved ledger holds: :meth:`_check_window_end`), the kernel
        records' inputs (the records of one run made at one ``kernel_points``) and the cadences of the history and
        the kernel records (``snapshot_every``, ``kernel_every``: resumed at another, one list would hold rows
        every 5 tracked steps up to the save and every step after it, read as one run's curve)."""
        return {"track_start": None if self.track_steps is None else int(self.track_steps[0]),
                "kernel_points": int(self.kernel_clean.shape[0]),
                "snapshot_every": self.snapshot_every, "kernel_every": self.kernel_every}

    def _probe_inputs(self) -> str:
        """A digest (16 hex digits of a SHA-256) of what the probes and the kernel records are made from: the clean
        rows, their fixed noise, the probe levels and conditioning, as the constructor drew them (``probe_data``,
        ``num_probes``, ``probe_levels``, ``probe_conditioning``, ``seed``), on the CPU in float64 (the same on any
        device, for a model of any dtype). A saved state's ledgers and kernel records belong to these inputs."""
        digest = hashlib.sha256()
        for t in (self.probe_clean, self.probe_noise, self.probe_timesteps, *self.probe_conditioning,
                  self.kernel_clean, self.kernel_noise, *self.kernel_conditioning):
            t = t.detach().cpu()
            t = t.to(torch.float64) if t.is_floating_point() else t
            digest.update(f"{tuple(t.shape)} {t.dtype};".encode())
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _check_probe_inputs(self, state: dict[str, Any]) -> None:
        """Refuse a saved state whose probes or kernel inputs were drawn from other inputs than this analyzer's
        (:meth:`_probe_inputs`; states saved before it was kept have none): its tracker would refuse the ledgers at
        bind, after a resuming trainer had loaded its model, and the kernel records would go on at other inputs."""
        saved = state["config"].get("probe_inputs")
        if saved is not None and saved != self._probe_inputs():
            raise ValueError(
                f"the saved analyzer's probes and kernel inputs were drawn from other inputs than this one's (digest "
                f"saved {saved}, here {self._probe_inputs()}): its ledgers describe other probes. Build the analyzer "
                "with the saved run's probe_data, num_probes, probe_levels, probe_conditioning and seed"
            )

    def _check_saved_tracker(self, state: dict[str, Any], *, ema: bool | None = None) -> None:
        """Refuse a saved state whose tracker state the tracker :meth:`bind` builds would refuse
        (:meth:`PathKernelTracker.load_state_dict`), before anything is loaded. A state loaded before bind is
        otherwise compared there only, at a trainer's next ``train()`` start, after the trainer had loaded the
        checkpoint's model and optimizer. Compared: what this analyzer's constructor arguments set (the partitions'
        ``num_classes``, ``quadrature``, ``group_state`` where not "auto", ``state_dtype``, ``sketch_dim``, the
        probes' shapes) and, while a built-in trainer loads it (:attr:`resuming_trainer`), whether that trainer's
        ``train()`` binds an EMA ledger (``ema_ledger``), or (``ema``, from :meth:`bind`: a state loaded by hand)
        whether an EMA is bound. "auto" resolves at bind with the model and optimizer: a saved "factored" state is
        compared there (:meth:`_check_auto_route`)."""
        saved = saved_tracker_settings(state["tracker"])
        problems: list[tuple[str, Any, Any, str]] = []  # (setting, saved, here, the argument that fits the state)
        if saved["partitions"] != self.partitions:
            if {k: v for k, v in saved["partitions"].items() if k != LEVEL_CLASS} == {
                    k: v for k, v in self.partitions.items() if k != LEVEL_CLASS}:
                classes = saved["partitions"].get(LEVEL_CLASS)
                classes = None if classes is None else classes // saved["partitions"][LEVEL]
                problems.append(("num_classes", classes, self.num_classes, f"num_classes={classes}"))
            else:
                problems.append(("partitions", saved["partitions"], self.partitions,
                                 "num_bins, controls and num_classes as saved"))
        rule = quadrature_rule(self.quadrature).name
        if saved["quadrature"] != rule:
            problems.append(("quadrature", saved["quadrature"], rule, f"quadrature={saved['quadrature']!r}"))
        if (self.group_state != "auto" and saved["group_state"] != self.group_state) or (
                self.group_state == "auto" and saved["group_state"] == "sketched"):  # ("auto" never sketches)
            problems.append(("group_state", saved["group_state"], self.group_state,
                             f"group_state={saved['group_state']!r}"))
        dtype = str(self.state_dtype).replace("torch.", "")
        if saved["state_dtype"] is not None and saved["state_dtype"] != dtype:
            problems.append(("state_dtype", saved["state_dtype"], dtype, f"state_dtype=torch.{saved['state_dtype']}"))
        if saved["sketch"] is not None and self.group_state == "sketched" and saved["sketch"][0] != self.sketch_dim:
            problems.append(("sketch_dim", saved["sketch"][0], self.sketch_dim, f"sketch_dim={saved['sketch'][0]}"))
        shapes = [shape for shape, _, _ in saved["probes"]]
        mine = [tuple(t.shape) for t in self.probes()]
        if saved["probes"] and shapes != mine:
            problems.append(("probe shapes", shapes, mine,
                             "probe_data, num_probes and probe_conditioning shaped as saved"))
        trainer = self.resuming_trainer
        if trainer is not None and saved["probes"] and shapes == mine and "probe_inputs" not in state["config"]:
            # (a state saved before the probes' inputs were kept: their values as bind computes them, on the model's
            # device and in its dtype, compared as the tracker compares them)
            values = [digest for _, _, digest in probe_identity(self.probes(next(unwrap(trainer.model).parameters())))]
            if values != [digest for _, _, digest in saved["probes"]]:
                problems.append(("probe values (digests)", [digest for _, _, digest in saved["probes"]], values,
                                 "the saved run's probe_data, num_probes, probe_levels, probe_conditioning and seed"))
        if ema is not None or trainer is not None:
            fix = (f"ema_ledger={'trainer' if saved['ema'] else 'none'!r} (attached to a trainer"
                   + (" with ema=" if saved["ema"] else "") + ")")
            if ema is None:
                ema = self._trainer_ema(trainer) is not None
            else:  # (bind: in a loop of one's own, the EMA given there decides; a trainer's train() passes its own)
                fix += f" or bind(..., ema={'the EMA the saved run updated' if saved['ema'] else 'None'})"
            if saved["ema"] != ema:
                problems.append(("EMA ledger", "kept" if saved["ema"] else "none", "kept" if ema else "none", fix))
        refuse_tracker_settings(problems, "tracker")

    def _check_auto_route(self, state: dict[str, Any]) -> None:
        """Refuse, at bind, a saved "factored" group state that ``group_state="auto"`` did not resolve to again on
        this model and optimizer (another optimizer, an EMA, a model bound in training mode whose dropout draws or
        whose batch statistics couple the examples: "dense"): the tracker would refuse it naming no fix. (A saved
        "dense" state switches a fresh "auto" tracker to dense; the same set-up resolves "auto" as it did.)"""
        saved = saved_tracker_settings(state["tracker"])["group_state"]
        if self.group_state == "auto" and saved == "factored" and self.tracker.group_state != "factored":
            raise ValueError(
                f"the saved analyzer's tracker kept the 'factored' group state and group_state='auto' resolves to "
                f"{self.tracker.group_state!r} on this model and optimizer (another optimizer, an EMA ledger, or the "
                "model bound in another mode: dropout or batch statistics in training mode): its ledgers cannot go on "
                "under another route. Bind as the saved run did (its optimizer, its model's mode), or build the "
                "analyzer with group_state='factored' (plain SGD, no EMA ledger), as the saved run resolved it"
            )

    def _check_window_end(self, state: dict[str, Any]) -> None:
        """Refuse a tracked window that ends before a step the saved ledger holds (a run stopped inside its window
        and resumed with a longer one goes on; one resumed with a window its ledger is past would be reported as
        that window)."""
        if self.track_steps is None or "track_start" not in state["config"]:
            return
        numbered = [int(s) for s in state.get("global_steps") or () if s is not None]
        if numbered and max(numbered) > self.track_steps[1]:
            raise ValueError(
                f"the saved analyzer's ledger holds step {max(numbered)}, past this analyzer's window "
                f"track_steps={tuple(self.track_steps)}: resume with a window that ends at step {max(numbered)} or "
                "later (its first step as saved)"
            )

    def _noise_process(self) -> dict[str, Any]:
        """What the saved state records of the noise process: its kind and the config entries that set its levels."""
        return {"noise_process": self.bins.process,
                "noise_schedule": noise_schedule_config(self.scheduler)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; if not bound yet, the state is applied when :meth:`bind` runs."""
        if state.get("format") != FORMAT:
            raise ValueError("not a NoiseLevelAnalyzer state (written by NoiseLevelAnalyzer.state_dict)")
        if not state["bound"]:
            return
        mine = {"num_bins": self.num_bins, "controls": self.controls, "probe_timesteps": self.probe_timesteps.tolist(),
                "bin_edges": self.bins.edges.tolist()}
        # Equal edges and probe levels do not make the same noise process: timestep bins are [0, T) split
        # alike for DDPM and flow matching, and for flow grids of any shift. Checked where saved (states
        # written before these keys existed are DDPM ones and have neither).
        for key, value in (*self._noise_process().items(), *self._record_settings().items()):
            if key in state["config"]:  # (states saved before the window and the kernel inputs were kept have neither)
                mine[key] = value
        check_saved_settings({key: state["config"][key] for key in mine}, mine, "analyzer")
        self._check_window_end(state)
        self._check_probe_inputs(state)
        if self.tracker is None:
            self._check_saved_tracker(state)  # (bound, the tracker's own load compares them, before anything changes)
            self._pending_state = state
            self.stopped = bool(state.get("stopped", False))
        else:
            self._check_start_step(state, self._start_step or 0)
            self._load(state)
            if state.get("stopped", False) and not self.stopped:
                # saved after its window ended: read, not extended (as when the state is loaded before bind;
                # bound first, the loop's later steps went on into the ledgers)
                self.tracker.close(record_ema=False)
                self.stopped = True

    def _check_start_step(self, state: dict[str, Any], start: int) -> None:
        """Refuse a ``start_step`` below the saved state's last step number (a resumed loop counted
        from 0 again would number its steps like the saved ones: history, logs and reports with two
        step 1s), unless the state was saved after its window ended (read, not extended)."""
        numbered = [s for s in state["global_steps"] if s is not None]
        if numbered and start < numbered[-1] and not state.get("stopped", False):
            raise ValueError(
                f"bind(start_step={start}) numbers the next step {start + 1}, but the saved analyzer already numbered "
                f"steps up to {numbered[-1]}: pass the loop's step count at the checkpoint, e.g. "
                f"analyzer.bind(model, optimizer, start_step={numbered[-1]}) when the loop went on from the save"
            )

    def _load(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.bin_counts, self.global_steps = list(state["bin_counts"]), list(state["global_steps"])
        # (states saved before the losses were counted have none: their steps' loss is not known)
        unknown = {"not recorded": len(self.bin_counts)} if self.bin_counts else {}
        self.step_losses = dict(state.get("step_losses", unknown))
        self.history, self.kernel_history = list(state["history"]), list(state["kernel_history"])
        # (states of earlier versions did not mark their end record: it is kept, as they kept it)
        self._end_kernel = state.get("end_kernel")
        # the loaded state replaces whatever an interrupted bookkeeping left
        self._owed = None if state.get("owed") is None else dict(state["owed"])
        self._recording, self._broken = False, None
        self._perm_generator.set_state(state["perm_generator"])
        self._sigma_like = int(state.get("sigma_like", 0))  # (states of earlier versions did not save it)
        self._control_pool = torch.tensor(state.get("control_pool", []), dtype=torch.long)
        self._steps_at_bind = self.tracker.attempted_steps  # bind's start_step counts the loop's steps up to here

    def save(self, path: str | os.PathLike) -> None:
        """Write the analyzer state atomically."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_state(path, FORMAT))


def _late_start_note(first: int, last: int) -> str:
    """The report's note for ledgers whose first tracked step is step ``first`` > 1 of the run, without a
    ``track_steps`` window: which steps their numbers cover (``first`` to ``last``), not the whole run."""
    return (f"the ledgers begin at step {first} of the run, not at its first: the analyzer was attached or bound after "
            "the run's start (a trainer that had trained, or resumed from a checkpoint without this analyzer's state), "
            f"or the steps before it made no update. Every share, matrix and residual here covers steps {first}-{last} "
            f"only, not the whole run: what training did before step {first} is in no ledger. For the whole run, "
            "attach the analyzer before the first step and resume with its saved state")


def train_with_window(trainer: Any, analyzer: NoiseLevelAnalyzer, *, warmup_steps: int, window_steps: int) -> dict[str, Any]:
    """Warm up untracked, then attach ``analyzer`` and train a tracked window.

    The kernel structure before the warm-up (at initialization for a fresh trainer; it is not in the
    window) is put first in the report's ``kernel`` list, numbered with the trainer's ``global_step`` then.

    Returns:
        ``{"report": analyzer.report(), "warmup_s": float, "window_s": float}``.
    """
    if warmup_steps < 0 or window_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and window_steps >= 1, got {warmup_steps} and {window_steps}")
    # (numbered with the trainer's steps so far: 0 at initialization, not for a trainer that has trained or resumed)
    init = ({"tracked_step": None, "global_step": getattr(trainer, "global_step", 0),
             **analyzer.kernel_structure(trainer.model)} if warmup_steps else None)
    start = time.perf_counter()
    trainer.train(warmup_steps)
    warmup_s = time.perf_counter() - start
    trainer.callbacks.append(analyzer)
    start = time.perf_counter()
    trainer.train(window_steps)
    window_s = time.perf_counter() - start
    report = analyzer.report()
    if init is not None:
        report["kernel"].insert(0, init)
    return {"report": report, "warmup_s": warmup_s, "window_s": window_s}
