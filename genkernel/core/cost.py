"""What a tracked step will cost, known before the run (memory per part, work per step).

:func:`estimate_cost` counts, from the model's parameter count, the probes, the partitions and
the route, the arrays a tracker keeps and the passes a step makes:

Memory (bytes):

- ``group_gradients``: the rows of group gradients, R × P in the state dtype (dense route); the
  batch's exact total and sizes, 2 × P float64 (factored and sketched routes);
- ``group_state``: the optimizer's linear state per row, (R + 1 + Π) × P (the groups of Π
  partitions, the rest, a rounding row per partition), twice while a step's new state is checked
  before it is committed (none for plain SGD); the factored and sketched routes keep the same rows
  for the exact totals (3 × P, float64 whatever the state dtype), the sketched one R × k besides;
- ``group_updates``: the split update, (R + 1 + Π) × P (other routes: 3 × P float64);
- ``checks``: the real gradient and each partition's rounding gap (float64), with a linear state
  the magnitudes its rounding is judged against (:func:`check_bytes`); ``check_scratch``: the
  elementwise checks' buffers, a block of columns of the rows at a time, kept from step to step
  (a few MB on CPU, more with over checks.BUDGET_ROWS rows; no less than what a tracker and its EMA ledgers
  keep after a step, equal with one partition);
- ``push_tangents``: the pushed rows converted to the parameters' dtype where the rows' differs;
- ``parameter_copies``: θ_k, θ_{k+1}, the quadrature nodes in between, the rolled-back step's
  optimizer state;
- ``witnesses``: under ``mixed_precision="observe"``, the observed micro-batches' own backward passes
  summed per seed scale (one in bfloat16, two in float16), in the parameters' dtype, beside those of the
  micro-batch observed last (until the next ``observe()`` or the step adds them in) and, where the loop seeds
  its backward no power of two times the observed c_n (loss / 3), the witness of its own seed taken in its
  backward: counted for the worst case of the half precision in use (the tracker cannot know the loop's seed
  beforehand), :func:`witness_counts`: five copies in float16, three in bfloat16, five where the precision is
  not known yet (float16's);
- ``ema``: the EMA ledger's displacements and offsets, 2 (R + 3) × P, and its θ_0, θ̄_0, last θ̄ and carried drift's bound,
  float64 whatever the state dtype; ``ema_sync``: what recording an EMA update takes between steps
  (its change rows, the rows it pushes, their pass, the weights read in float64) beyond the step's
  own temporaries, freed by then;
- ``probe_pushes``: forward-mode AD through the probes: a parameter copy of tangents, the probes'
  primal and each row's tangents, as shares of the probes' activations the model's own pass was
  measured to hold (:func:`push_pass_bytes`, :mod:`genkernel.core.push_memory`), as many rows per pass as the
  memory budget allows (one row through a chunk of the probes when not even one row through all
  of them fits: :func:`push_pass_shape`; probes coupled in eval mode, BatchNorm without running statistics or a
  centering ``h - h.mean(0)`` in plain operations, as the run decides it: all in one pass), or the probes'
  Jacobians M × d × P (twice), the rows as one matrix and the reverse passes' M × d cotangents of all M probes' activations where they are coupled on the "jacobian" route
  (which "auto" takes where :func:`push_route` says);
- ``training_step``: the parameters, their gradients and the optimizer's own state
  (:func:`optimizer_state_values`); ``training_activations``: what the training pass holds of a
  micro-batch's activations at its peak (a hook pass on one example, times the micro-batch and
  :data:`TRAINING_ACTIVATIONS` for what autograd saves and the backward's gradients);
- ``frozen_weights``: the model's parameters that do not require grad (a LoRA base, a frozen
  encoder inside the model), on the device while the step runs; like the training step's own
  arrays they exist already, so the fit check does not ask the free memory for them
  (:attr:`CostEstimate.existing_bytes`);
- ``row_backward``: on the dense route's ``gradient_route="graph"`` (an observed loop's ``observe()``
  takes it whatever the route), the batched backward of the R group rows through the training graph,
  every row at once (a row: the smaller of :data:`GRAPH_ROW_ACTIVATIONS` of the micro-batch's activations and
  :data:`GRAPH_ROW_LARGEST_OUTPUTS` times its largest leaf output, ``engine.gradients.graph_row_elements``, or a
  row measured on the first probe where larger, :func:`graph_row_bytes`; the memory budget does not bound it), two
  rows more for a float32 model;
- ``rounding_sample``: with those two rows, a float32 model's sample of its own gradient's rounding
  (:mod:`genkernel.core.tracking.rounding`), one float64 copy of the parameters held from the training
  pass until the gradient check (an owned step on another route takes it only when a parameter fails
  the check's plain tolerance, by a forward again: not counted);
- ``training_records``: what step 1 keeps of the training pass when it reads layer factors from it
  (the layers' output gradients, about one copy of the activations) until it has read them; only
  when that fits in the memory budget.
- ``example_pass``: on the dense route's ``gradient_route="example"`` when the training pass's records do
  not fit the budget, the route's own vmapped per-example pass over one chunk of examples (the chunk sized
  by the budget to its activations and per-example gradients, engine.gradients.example_chunk): the chunk's activations
  (:data:`EXAMPLE_PASS_ACTIVATIONS` of them), its per-example gradients twice, and the float64 block
  ``add_rows`` widens a narrower dtype's gradients in; when the route reads the training pass (and on
  ``gradient_route="factored"``), the fallback parameters' own such pass (a raw ``nn.Parameter`` in the forward,
  a layer the plan leaves out), through the whole model, its chunk sized to the fallback's gradients;
- ``null_search``: where a trained parameter is coarser than float64 and a module subtracts a mean in training mode
  (:data:`NULL_SHIFT_NORMS`), the structurally null parameters' search on a float64 copy of the model
  (:func:`null_search_bytes`), once, in its own phase ``"null search"`` beside the group rows;
- ``probe_outputs``: the probes' outputs at the last recorded θ (the tracker's f_prev, [M, d] float64);
- ``step_record``: only with an analyzer whose listener works inside ``track`` (:func:`with_kernel_records`,
  :func:`with_analysis_passes`), the recorded step it is handed (:func:`step_record_bytes`), in the
  ``"listener"`` phase with the step's ``group_updates`` and the listener's own arrays;
- ``ledgers``: the ledgers themselves, float64: every partition's contributions ``[M, G, d]`` and
  traffic ``[M, G]`` (:func:`ledger_bytes`), twice with an EMA ledger; with a group per training
  example this grows with the data set and is often the largest part;
- ``step_contributions``: one step's contributions before they are added to the ledgers: every
  group's ``[M, R, d]`` (dense and sketched routes, which move every group; twice while they are
  laid out), the batch's groups only on the factored route; sketched, also the probes' side
  ``[M, d, k]`` and, under Adam, the probes' per-example gradient blocks of the largest weight,
  scaled, and their projection (:func:`sketch_temporary_bytes`);
- ``projection``: the sketched route's projection R, its matrices' factors and the other
  parameters' columns, k numbers per row or parameter value (:func:`projection_bytes`).

Work per step, in passes, and the expected ratio of an analyzed step to a bare one (forward and
backward of the batch). Every part and the bare step are in one unit, one example's forward through
the whole model, frozen layers included (every matrix product and convolution of it, as the dispatcher
runs them: a weight passed to ``F.linear``, MultiheadAttention's projections and attention's products
between activations too, :func:`hooked_forward_counts`):
a backward forms the input gradients of the layers whose input depends on a trained parameter and
the trained layers' weight gradients, so a frozen layer's backward forms its input's gradient, not
its weight's, and a frozen layer before the first trained one has none (a LoRA fine-tune's bare
step is about two forwards an example, :func:`bare_step_forwards`, :class:`GradientLayerCounts`);
the factored and sketched routes' passes (the probes' forwards, the capture, the backward through
frozen layers to earlier adapters) run through the frozen layers too:

- group gradients: "graph" R backward passes of the batch (a bare step less its forward each; R + 2
  for a float32 model, its rounding sample's);
  "example", sketched and factored routes read the batch's layer factors from the training pass
  when its records fit in the memory budget (:func:`reads_training_pass`), else run a pass of
  their own ("example": vmapped per-example gradients; factored: a capture); the dense route's
  ``gradient_route="factored"`` always captures its own pass. The dense route's per-example
  routes are counted from the layers' shapes (:func:`dense_gradient_work`): the pass, the
  per-example gradients formed from the factors and their sums into the R group rows, R·B·P
  multiply-adds whatever the membership's zeros (on an MLP more than a bare step);
- contributions: per quadrature node, a forward of the probes per vmapped pass (as many rows per
  pass as :func:`push_pass_shape` allows, and the products with the zero tangents torch.func puts
  where only one of a layer's input and weight has one) plus a tangent pass per pushed row (dense:
  R + 1 rows; factored: the rest row, only under weight decay; sketched: 2) through the layers
  downstream of a trained parameter and the trained weights (two forwards of an unfrozen model, a
  frozen layer's input tangent alone), or the probes' Jacobians, a forward and d backward passes of
  every probe (and of the first once more) and their product with the rows (M·d·rows·P multiply-adds);
- factored and sketched routes, per node (:func:`factor_route_work`, from the layers' shapes): the
  probes' factors (a forward and d output-batched backward passes) and, factored, the cross
  kernels between the probes' d outputs and the batch's examples (sketched: the projections,
  :func:`sketch_work`); their group gradients (the batch's totals and sizes) and bare step are
  counted from the same shapes (the first layer's input gradient is not formed);
- under ``mixed_precision="observe"``, the witnesses: backward passes of the batch through its training
  graph, one per seed scale (one in bfloat16, two in float16) and one more with the loop's own seed where that
  is no power of two times c_n, counted for the worst case (:func:`witness_counts`: three in float16 or where the
  precision is not known, two in bfloat16);
- the probe forwards after the step, and before it too when the model has buffers or frozen
  parameters;
- with an EMA ledger, its sync per step: R + 2 rows pushed through every node by push_rows' own
  "auto" route (whatever the step's), JVPs or Jacobians as above, and two probe forwards.

The total (:attr:`CostEstimate.total_bytes`) is the step's peak, not the sum of the parts: a step
runs in phases, and each phase's temporaries are freed before the next (:attr:`CostEstimate.phases`).
The parts in no phase are held throughout (the parameters, their gradients and the optimizer's
state, the group state, the parameter copies, the ledgers, the EMA ledger, the projection, the check
buffers, the frozen weights); the phases are

- ``"training pass"``: the training activations, the records a step keeps of them, and, on the
  dense route, the group rows formed from the training graph as it runs (an observed loop's
  ``observe()``, an owned step's graph route; conservatively on every dense route) and their
  batched backward (``row_backward``);
- ``"group gradients"``: the training records read into the group rows (and held factors), or the
  "example" route's own per-example pass (``example_pass``);
- ``"analysis"`` (:data:`STEP_TEMPORARIES`): after the optimizer's step, the group rows, the split
  update, the checks, the pushes, the step's contributions, held factors and the probes' captures (factored
  and sketched routes), an EMA update's sync;
- with an EMA ledger, ``"EMA sync"``: an observed loop's ``optimizer.step()`` syncs the EMA ledger while the
  rows its ``observe()`` calls summed are held (on the dense route, conservatively, owned steps too);

with ``micro_batches`` > 1 the dense route's training pass holds the rows twice (the earlier micro-batches'
sum and the current one's); and an analyzer's kernel records or own passes, run between steps, are counted
in every phase by their excess over the analysis phase (:func:`with_kernel_records`, :func:`with_analysis_passes`).
Summing every part had the estimate 1.8-2.2x the measured peak RSS on an MNIST-sized UNet2DModel at
B = 32 with 16 probes and 20 group rows (and 2.35x the allocated peak on CUDA): the training pass's
activations, three times over, counted beside the pushes that run after they are freed.

Trackers and analyzers call it at construction and refuse, with the numbers and the cheaper
options, when the device cannot hold what the step still needs: the total less what already exists
(the parameters, their gradients and the optimizer's state, which the device's free memory does
not include). The counts are of the dominant arrays: Python's and the allocator's overheads are
not in them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from .adapter import (analysis_mode, coupled_forward, coupled_modules, eval_mode, functional_model, has_state_outside_training, outside_inference_mode,
                      output_tensor, preserved_state)
from .engine.factored import BlockShape, block_shapes, capture_chunks, probe_capture_bytes
from .engine.gradients import (EXAMPLE_PASS_ACTIVATIONS, GRAPH_ROW_ACTIVATIONS, GRAPH_ROW_LARGEST_OUTPUTS,
                               ROUNDING_SEEDS, ExamplePass, example_chunk, example_pass_bytes, example_pass_measure,
                               factored_chunk_peaks, factored_steady_chunk, gradients_from_losses, graph_row_elements,
                               kernel_context, output_elements)
from .param_bytes import joined_itemsize, parameter_bytes, trains_float32, value_bytes
from .push_memory import DEFAULT_PUSH_MEMORY, LiveBytes, PushMemory, architecture_key, measure_push_memory, remembered
from .engine.factors import covering_plan, dense_pair_is_cheaper, lean_materializes, self_kernel_materializes
from .engine.projections import PROJECTION_CHUNK_BYTES, weight_projection_route

GiB = 2**30
# The parts a bare training step holds too (its arrays and activations, the frozen weights): the total less them is
# what tracking adds (CostEstimate.analysis_bytes)
TRAINING_PARTS = ("training_step", "training_activations", "frozen_weights")


# The settings a cheaper option may ask the user to change. A caller that fixes some of them (the
# GAN analyzer's generator runs the dense graph route) passes the rest, so a refusal never names an
# option its reader cannot take.
COST_OPTIONS = ("groups", "group_state", "state_dtype", "probes", "window", "quadrature")
GROUP_STATE_CHOICES = ("dense", "factored", "sketched")  # the group-state routes a tracker is built with


@dataclass
class CostEstimate:
    """Memory per part (bytes) and work per step of a tracked step; see the module docstring.

    Attributes:
        memory: ``{part: bytes}``.
        available: bytes the device has free now (None where that is unknown).
        held: bytes of ``training_step`` that already exist (parameters, their gradients, the
            optimizer's state): they are counted in the total but are not in ``available``; the
            ``frozen_weights`` part exists already too (:attr:`existing_bytes` adds it).
        work: ``{part: passes}`` in units of one forward pass over one example.
        bare_step: the same units for a bare step (forward and backward of the batch).
        cheaper: options that would make the tracker fit or run faster, in words.
    """

    memory: dict[str, int]
    available: int | None
    work: dict[str, float]
    bare_step: float
    held: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    cheaper: list[str] = field(default_factory=list)
    phases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """The step's peak: the parts held throughout (every part in no phase) and the largest phase's parts
        (:attr:`phases`, of which only one runs at a time); the sum of every part without phases."""
        return int(self._held_throughout() + max(self.phase_bytes().values(), default=0))

    def _held_throughout(self) -> int:
        in_phases = {part for parts in self.phases.values() for part in parts}
        return int(sum(v for k, v in self.memory.items() if k not in in_phases))

    def phase_bytes(self) -> dict[str, int]:
        """``{phase: bytes}`` of each phase's own parts (not counting the parts held throughout)."""
        return {name: int(sum(self.memory.get(part, 0) for part in parts)) for name, parts in self.phases.items()}

    @property
    def peak_phase(self) -> str | None:
        """The phase the peak is reached in (None without phases)."""
        sizes = self.phase_bytes()
        return max(sizes, key=sizes.get) if sizes else None

    @property
    def analysis_bytes(self) -> int:
        """What tracking adds to the peak of the training step's own memory (its held arrays and activations) and
        the frozen weights."""
        return self.total_bytes - sum(self.memory.get(k, 0) for k in TRAINING_PARTS)

    @property
    def existing_bytes(self) -> int:
        """Bytes of the total that exist before the tracker, so are not in :attr:`available`: what
        the training step holds already (:attr:`held`) and the frozen weights."""
        return self.held + self.memory.get("frozen_weights", 0)

    @property
    def fits(self) -> bool:
        """Whether what the step still needs (the total less what already exists) is free."""
        return self.available is None or self.total_bytes - self.existing_bytes <= self.available

    def fits_beside(self, built: "CostEstimate") -> bool:
        """Whether this estimate fits for a tracker built as ``built`` and running since, which holds its
        arrays (no longer in :attr:`available`): the whole within what was free when ``built`` was
        estimated (less what was held then), and what this one adds to ``built`` within what is free now.
        (:attr:`fits` would count the arrays the tracker holds twice: in the total and as not free.)"""
        if self.available is None or built.available is None:
            return True
        return (self.total_bytes - built.existing_bytes <= built.available
                and self.total_bytes - built.total_bytes <= self.available)

    @property
    def ratio(self) -> float:
        """Expected analyzed step time over a bare step's (work counted in passes)."""
        return 1.0 + sum(self.work.values()) / max(self.bare_step, 1e-12)

    def describe(self) -> str:
        """The estimate in words, for errors and logs."""
        parts = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in self.memory.items() if v)
        free = ("free memory unknown" if self.available is None else f"{self.available / GiB:.1f} GiB free")
        if self.held:
            free += f", beside the training step's {self.held / GiB:.2f} GiB already held"
        if self.memory.get("frozen_weights"):
            free += f", beside the frozen weights' {self.memory['frozen_weights'] / GiB:.2f} GiB already held"
        work = ", ".join(f"{k} {v:.0f}" for k, v in self.work.items() if v)
        if self.phases:
            parts += f"; at most one phase at a time, the peak in the {self.peak_phase}"
        return (f"memory {self.total_bytes / GiB:.2f} GiB ({parts}; {free}); work per step in example-forwards: "
                f"{work} against {self.bare_step:.0f} for a bare step: about {self.ratio:.1f}x a bare step")

    def as_dict(self) -> dict[str, Any]:
        return {"memory_bytes": dict(self.memory), "total_bytes": self.total_bytes, "available_bytes": self.available,
                "held_bytes": self.held, "existing_bytes": self.existing_bytes,
                "work": dict(self.work), "bare_step": self.bare_step, "ratio": self.ratio, "fits": self.fits,
                "settings": dict(self.settings), "cheaper": list(self.cheaper),
                "phases": {name: list(parts) for name, parts in self.phases.items()}, "peak_phase": self.peak_phase}


def available_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device`` now: on CUDA the driver's free memory (``torch.cuda.mem_get_info``)
    plus what PyTorch's caching allocator has reserved but not allocated (free to it, not to the
    driver), ``MemAvailable`` of /proc/meminfo on a Linux CPU, or less where the process's memory
    cgroup allows less (:func:`cgroup_free_memory`); None elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(int(cached), 0)
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    limited = cgroup_free_memory()
                    return free if limited is None else min(free, limited)
    return None


def cgroup_free_memory(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process's memory cgroup (a container's or a batch job's limit) still allows:
    its limit less its usage, cgroup v2 (``memory.max``, ``memory.current``) or v1
    (``memory/memory.limit_in_bytes``, ``memory/memory.usage_in_bytes``); None where there is no
    limit or it cannot be read. /proc/meminfo reports the host's memory, not the limit, so a
    container's set-up could "fit" by it and then be killed. The usage counts the page cache of
    files read (a data set), which the kernel reclaims before it kills: its inactive part
    (``inactive_file`` of ``memory.stat``, v1 ``total_inactive_file``) is counted as free, as
    container tools count a working set.

    The process's own cgroup is read from ``self_cgroup`` (/proc/self/cgroup): a batch job's or a
    systemd unit's limit sits on a cgroup below the mount's root (Slurm's
    ``.../job_N/memory.max``), which alone was read before (no limit there: the host's memory).
    Every cgroup from the process's up to the root is read and the least room is taken (an
    ancestor's limit caps its children's)."""
    relative = _own_cgroups(self_cgroup)
    for version, base, limit_file, usage_file, stat_file, cache_key in (
            ("v2", root, "memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("v1", os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
             "total_inactive_file")):
        if not os.path.exists(os.path.join(base, limit_file)) and not os.path.isdir(
                os.path.join(base, relative.get(version, ""))):
            continue
        room, read = None, False
        for directory in _cgroup_chain(base, relative.get(version, "")):
            try:
                with open(os.path.join(directory, limit_file)) as handle:
                    limit = handle.read().strip()
                with open(os.path.join(directory, usage_file)) as handle:
                    usage = int(handle.read().strip())
            except (OSError, ValueError):
                continue
            read = True
            if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # no limit (v1 writes a huge number)
                continue
            here = max(int(limit) - usage + _stat_entry(os.path.join(directory, stat_file), cache_key), 0)
            room = here if room is None else min(room, here)
        if read:
            return room
    return None


def _own_cgroups(self_cgroup: str) -> dict[str, str]:
    """The process's cgroup paths, relative (no leading slash), from /proc/self/cgroup:
    ``{"v2": the unified path, "v1": the memory controller's}``; empty where unreadable."""
    paths: dict[str, str] = {}
    try:
        with open(self_cgroup) as handle:
            for line in handle:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) != 3:
                    continue
                ident, controllers, path = parts
                if ident == "0" and controllers == "":
                    paths["v2"] = path.lstrip("/")
                elif "memory" in controllers.split(","):
                    paths["v1"] = path.lstrip("/")
    except OSError:
        pass
    return paths


def _cgroup_chain(base: str, relative: str) -> list[str]:
    """The cgroup directories from ``base/relative`` up to ``base``; ``base`` alone where the
    process's path is not under this mount (a container's namespace shows its own root)."""
    parts = [p for p in relative.split("/") if p and p not in (".", "..")]
    chain = [base]
    for i in range(len(parts)):
        directory = os.path.join(base, *parts[:i + 1])
        if not os.path.isdir(directory):
            return [base]
        chain.append(directory)
    return chain[::-1]


def _stat_entry(path: str, key: str) -> int:
    """The value of ``key`` in a cgroup ``memory.stat`` file (0 when absent or unreadable)."""
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return 0


def example_counts(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[int, int, int]:
    """``(activations, macs, trainable_macs)`` of one example's forward (one hooked pass, no grad): the
    elements of every leaf module's output, and the multiply-adds of every matrix product and convolution
    of the pass (:func:`hooked_forward_counts`: a Linear's output elements × its inputs, a convolution's
    ``in_channels / groups × kernel size``, and the products outside modules, a weight passed to
    ``F.linear``, MultiheadAttention's projections, attention's QKᵀ and AV), all of them and those with a
    weight that requires grad. A frozen base (LoRA: adapters beside frozen layers) makes the last a small
    share of the second: its backward forms the inputs' gradients but not the frozen weights'."""
    return hooked_forward_counts(model, example, grad=False)[:3]


@dataclass(frozen=True)
class GradientLayerCounts:
    """Multiply-adds of one example's forward (every product, :func:`hooked_forward_counts`: the Linear and
    convolution layers', and those outside modules), split by what a backward (or a JVP of the trained
    parameters' tangents) does through them, per product operand: a product whose two operands depend on
    trained parameters (attention's QKᵀ and AV between activations) forms two gradients in a backward and
    takes two tangent products in a JVP, so counts twice in ``input_gradients``, and
    ``frozen_input_gradients`` may exceed ``frozen`` (``frozen_skipped`` below 0):

    - ``input_gradients``: the layers whose input depends on a trained parameter (a backward forms
      their input's gradient; a JVP pushes their input's tangent through the weight), trained or not;
    - ``frozen``: the products with no trained weight (a LoRA base, a frozen encoder, a layer whose
      bias alone trains: peft's ``LoraConfig(bias="all")`` base layers, BitFit; attention's products
      between activations): forward
      work of every pass, outside the trained blocks' shapes (a block of a bias alone has no
      multiply-adds there, :meth:`~genkernel.core.engine.factored.BlockShape.macs`);
    - ``frozen_input_gradients``: those of ``frozen`` whose input depends on a trained parameter (a
      frozen layer after or between trained ones: a backward goes through it, and a JVP's tangent);
      a frozen layer before the first trained one has neither;
    - ``one_sided``: the products with a zero tangent in a JVP of the trained parameters. Where any
      of a layer's input, weight and bias has a tangent, torch.func's ``jvp`` materializes the
      missing ones of the input's and the weight's as zeros and multiplies by them (``Ẇx`` with
      ``Ẇ = 0``), one product per vmapped pass, not per row (torch 2.14's dispatcher sees and runs
      it; measured on Linear and Conv2d): one for a frozen layer after a trained one or a trained
      layer whose input depends on no trained parameter (the first one), two for a layer whose bias
      alone trains and whose input depends on no trained parameter, none where both have tangents
      or nothing has one (a frozen layer before every trained one)."""

    input_gradients: int
    frozen: int
    frozen_input_gradients: int
    one_sided: int
    # The elements of the largest output one leaf module returned in the pass (not a multiply-add count: what a
    # backward holds a few of at once, engine.gradients.graph_row_elements; the estimate's row_backward).
    largest_output: int = 0

    @property
    def frozen_skipped(self) -> int:
        """The frozen layers' multiply-adds whose input depends on no trained parameter: a backward
        and a JVP's tangent skip them."""
        return self.frozen - self.frozen_input_gradients


def gradient_layer_counts(model: nn.Module, example: tuple[torch.Tensor, ...]) -> GradientLayerCounts:
    """:class:`GradientLayerCounts` of one example's forward (one hooked pass with autograd on, the
    example not requiring grad, so that a layer's input requires grad exactly where it depends on a
    trained parameter); the layers' multiply-adds as :func:`example_counts` counts them."""
    return hooked_forward_counts(model, example, grad=True)[3]


def _remembered_counts(model: nn.Module, example: tuple[torch.Tensor, ...], grad: bool,
                       constants: dict[str, torch.Tensor] | None = None) -> tuple[int, int, int, GradientLayerCounts]:
    """:func:`hooked_forward_counts` as the estimate takes it: once per architecture, ``grad`` and parameters held
    ``constants`` (:func:`per_architecture`; the counts are the shapes' and the operations', not the values')."""
    return per_architecture("hooked forward counts", model, example, (bool(grad), tuple(sorted(constants or {}))),
                            lambda: hooked_forward_counts(model, example, grad, constants))


def per_architecture(kind: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], extra: tuple,
                     measure: Callable[[], Any]) -> Any:
    """``measure()`` of ``model`` on ``inputs``, taken once per ``kind``, architecture (push_memory's ``remembered``
    under :func:`~genkernel.core.push_memory.architecture_key`: the module's structure, the plain attributes, flags,
    small boolean buffers and hooks ``repr`` leaves out, its parameters' and buffers' names, shapes, dtypes and
    devices, which are trained, the inputs' shapes), modules' modes, attention and autocast settings
    (:func:`~genkernel.core.engine.gradients.kernel_context`) and ``extra`` (the call's own arguments): for what a
    pass's shapes and operations decide, not its values (counts, chunk sizes, the covering plan's shapes). A forward
    that branches on a parameter's or an input's value (a weight read outside its layer's call only while a bias is
    positive) is estimated as the first model of its key was: the estimate moves, never a ledger or a kernel (they
    take each module's own covering plan). A tracker estimates its cost at construction, at its first step and once per other group state
    it could name; every tracker of one architecture (a resumed run, a second analyzer, a second fit) took the same
    hooked passes and covering checks again, on the examples' small UNets a sixth of a tracker's construction."""
    shapes = tuple((tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else id(t) for t in inputs)
    keys = getattr(_ESTIMATE, "keys", None)
    known = None if keys is None else keys.get((id(model), shapes))
    if known is None:
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        known = (architecture_key(model, trained, inputs, 0), tuple(m.training for m in model.modules()),
                 kernel_context(inputs))
        if keys is not None:
            keys[(id(model), shapes)] = known
    return remembered(kind, (*known, extra), measure)


def hooked_forward_counts(model: nn.Module, example: tuple[torch.Tensor, ...],
                          grad: bool, constants: dict[str, torch.Tensor] | None = None,
                          ) -> tuple[int, int, int, GradientLayerCounts]:
    """``(activations, macs, trainable_macs, layers)``: :func:`example_counts` and, with ``grad``
    (autograd on for the pass, the example detached), :func:`gradient_layer_counts`, from one hooked
    forward of ``example`` (one pass: a training-mode BatchNorm's running statistics move once, as
    they did for :func:`example_counts` alone). Without ``grad`` no input requires grad, and ``layers``
    says so (every layer frozen or before the first trained one). ``constants``: ``{name: parameter}``
    held constant for the pass (``requires_grad`` off for it, put back after), so that
    ``layers.input_gradients`` counts the layers whose input depends on the other trained parameters
    (not through ``torch.func.functional_call``: on a module registered under two names it left the
    model holding other parameter objects).

    The products are read from the dispatcher, every matrix product and convolution of the pass as
    torch.utils.flop_counter counts them (its FLOPs halved), not from the Linear and convolution modules'
    hooks alone: a weight passed to ``F.linear`` or ``einsum`` (``nn.MultiheadAttention`` calls
    ``F.multi_head_attention_forward`` with its ``in_proj_weight`` and ``out_proj.weight``, the ``out_proj``
    module's forward never runs) and the products between activations (attention's QKᵀ and AV) are one
    example's forward too. The pass runs attention through the math SDPA backend, MultiheadAttention's
    fast path off (:func:`~genkernel.core.adapter.forward_ad_attention`, the same values), as analysis
    passes do: its products are the dispatcher's matrix products. Each product's two operands (a bias added
    by ``addmm`` or a convolution is not one) are sorted as :class:`GradientLayerCounts` describes: a trained
    parameter, a view of one or a tensor computed from model tensors alone with one of them trained (a cast,
    a reshaped or scaled weight) is a trained weight; any other operand that requires grad is an input a
    backward forms the gradient of. On a model of Linear and convolution layers the counts are the hooks'
    (a transposed convolution by its input positions, as torch counts it, not its output's)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    from .adapter import forward_ad_attention

    counts = [0, 0, 0]
    layers = [0, 0, 0, 0]  # GradientLayerCounts' fields in order
    largest = [0]

    def hook(module, args, output):
        # every element of every tensor it returns: the example is a batch of one, so this is the example's whatever
        # the layout (output[:1] was one row of dimension 0: d of T·d for a [T, 1, d] output inside a sequence-first
        # model; a tuple's or dict's tensors, an LSTM's (out, (h, c)), none), as engine.gradients._LeafOutputs counts
        elements = output_elements(output)  # (the engine's rule, engine.gradients._LeafOutputs)
        counts[0] += elements
        largest[0] = max(largest[0], elements)

    held = [p for p in (constants or {}).values() if p.requires_grad]
    model_tensors = {id(t) for t in (*model.parameters(), *model.buffers())}
    derived: dict[int, weakref.ref] = {}  # tensors computed from model tensors alone, one of them trained
    # and those computed from model tensors alone, none trained, or from no tensor at all (a clone of a buffer,
    # spectral_norm's u and v in eval mode; a torch.tensor(0.5) or arange made in the forward): constants, so that
    # a weight scaled or normalized by them is a derived weight, not an input (spectral_norm's W / σ in eval mode
    # counted as an input: factored 21 % under its operation count, sketched 33 %)
    constant: dict[int, weakref.ref] = {}

    def is_derived(value: torch.Tensor, table: dict[int, weakref.ref] = derived) -> bool:
        ref = table.get(id(value))  # (by identity: an id a freed tensor had may be reused)
        return ref is not None and ref() is value

    def trained(value: Any) -> bool:
        """A trained parameter (one that requires grad, but ``constants``) or a tensor computed from one and
        model tensors alone (views, casts, a scaled or normalized weight; without grad too)."""
        return isinstance(value, torch.Tensor) and (id(value) in trained_ids or is_derived(value))

    def from_model(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and (id(value) in model_tensors or is_derived(value)
                                                    or is_derived(value, constant))

    def wants_grad(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.requires_grad

    def count(packet, args, kwargs, macs: int) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if packet in (torch.ops.aten.addmm, torch.ops.aten.baddbmm):  # (bias, a, b)
            tensors = tensors[1:] + tensors[:1]
        operands, others = tensors[:2], tensors[2:] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        weights = sum(trained(o) for o in operands)
        inputs = sum(wants_grad(o) and not trained(o) for o in operands)
        counts[1] += macs
        counts[2] += macs * weights
        layers[0] += macs * inputs
        if not weights:
            layers[1] += macs
            layers[2] += macs * inputs
        if any(wants_grad(v) for v in operands + others):  # torch.func zero-fills an operand's missing tangent
            layers[3] += macs * sum(not wants_grad(o) for o in operands)

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            counter = flop_registry.get(func._overloadpacket)
            if counter is not None:
                count(func._overloadpacket, args, kwargs, counter(*args, **kwargs, out_val=out) // 2)
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            # (torch.tensor(...) in the forward: a constant made before the dispatcher, lifted)
            own = func._overloadpacket is torch.ops.aten.lift_fresh or all(from_model(a) for a in inputs)
            table = (derived if any(trained(a) for a in inputs) else constant) if own else None
            for value in tree_flatten(out)[0]:
                if not isinstance(value, torch.Tensor) or id(value) in model_tensors:
                    continue
                if table is not None:
                    table[id(value)] = weakref.ref(value)
                    continue
                for known in (value, value._base):  # (an in-place write of an input into one, or a view of it: no more)
                    if known is not None:
                        derived.pop(id(known), None)
                        constant.pop(id(known), None)
            return out

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        for p in held:
            p.requires_grad_(False)
        trained_ids = {id(p) for p in model.parameters() if p.requires_grad}
        # autocast's cached casts of the weights, made by an earlier forward in the caller's autocast region outside
        # this pass, are no derived weights here: every product counted frozen (trainable_macs 0), so drop them
        torch.clear_autocast_cache()
        with torch.set_grad_enabled(grad), forward_ad_attention(), Products():
            model(*(tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in example) if grad else example))
    finally:
        for p in held:
            p.requires_grad_(True)
        for handle in handles:
            handle.remove()
    return counts[0], counts[1], counts[2], GradientLayerCounts(*layers, largest_output=largest[0])


def activation_elements(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Elements of every module output for one example (a forward with hooks, no grad)."""
    return example_counts(model, example)[0]


def bare_step_forwards(macs: int, trainable_macs: int, batch: int, input_gradient_macs: int | None = None) -> float:
    """A bare step's work in example-forwards: the forward, the backward's input gradients and its
    weight gradients, one forward's worth of the layers whose weights are trained:
    ``batch × (1 + β + share)``, share = ``trainable_macs / macs`` (:func:`example_counts`; 1 without
    frozen layers), β = ``input_gradient_macs / macs``: the layers whose input depends on a trained
    parameter (:attr:`GradientLayerCounts.input_gradients`; default all of them, β = 1: 3 per
    example without frozen layers; a LoRA fine-tune's frozen base: about 2, less where frozen layers
    come before the first adapter)."""
    share = trainable_macs / macs if macs else 1.0
    back = (input_gradient_macs if input_gradient_macs is not None else macs) / macs if macs else 1.0
    return batch * (1.0 + back + share)


def reads_training_pass(record_bytes_per_example: int, batch: int, memory_budget: int) -> bool:
    """Whether step 1 reads the batch's layer factors from the training pass (the records it keeps,
    about one copy of the activations, fit in ``memory_budget``) rather than running a pass of its
    own in chunks that do."""
    return record_bytes_per_example * batch <= memory_budget


def graph_row_bytes(model: nn.Module, probes: tuple[torch.Tensor, ...]) -> float:
    """Bytes one row of a batched backward through a batch's graph holds per example
    (``engine.gradients.gradients_from_losses``), measured under ``push_memory.LiveBytes``: the growth from 1 to 2
    rows, at 1 and 2 copies of the first probe, the difference: the rows' gradients with respect to the floating
    inputs (with respect to the parameters where there is none: a row's parameter-sized gradients, held beside the
    activations' or not, can hide them at one or two examples). The model's mode as it is, its buffers and the
    random state restored. Leaf outputs miss what the forward computes with plain operations: a self-attention's
    probabilities written with matmul and softmax held 18 times graph_row_elements a row at T = 256, diffusers'
    AttnProcessor in a UNet2DModel at 32x32 3.1 times, an LSTM 1.45, F.interpolate 3.4. 0.0 where the pass raises
    or nothing is trained (the count alone then); one measure per architecture and probe shape (push_memory's key)."""
    return _measured_per_architecture("graph row", model, probes, _measured_graph_row)


def _measured_per_architecture(kind: str, model: nn.Module, probes: tuple[torch.Tensor, ...],
                               measure: Callable[[nn.Module, dict, tuple], float]) -> float:
    """``measure(model, trained parameters, probes)`` on the model as it is, its buffers and the random state
    restored (``adapter.preserved_state``), once per ``kind``, architecture and probe shape (push_memory's
    ``remembered``); 0.0 where nothing is trained or the measure raises (any failure leaves the count: the step's
    own passes report their errors), the device's out-of-memory error raised (as push_memory's measure). A measure
    that raised is not kept: a passing failure (a user's hook, an interrupted pass) gave 0.0 to every later
    estimate of the architecture in the process, and with it other chunk sizes than a fresh process plans."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        return 0.0

    def guarded() -> float | None:
        try:
            # (the training graph's own attention kernels: an estimate made inside analysis_mode, as the tracker's,
            # would otherwise measure the math SDPA backend's probabilities, which the training pass never holds)
            with preserved_state(model), torch.enable_grad(), training_attention():
                return measure(model, params, probes)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            return None  # (remembered keeps no None)

    measured = per_architecture(kind, model, probes, (), guarded)
    return 0.0 if measured is None else measured


@contextlib.contextmanager
def training_attention():
    """The attention kernels a training pass runs (every SDPA backend allowed, ``nn.MultiheadAttention``'s fast
    path as torch's default), inside :func:`~genkernel.core.adapter.forward_ad_attention` too; restored after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(True)
        backends = [getattr(SDPBackend, name) for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION",
                                                          "MATH") if hasattr(SDPBackend, name)]
        with sdpa_kernel(backends):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def _first_probe_copies(probes: tuple[torch.Tensor, ...], copies: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[:1].repeat(copies, *([1] * (t.dim() - 1))) for t in probes)


def _measured_graph_row(model: nn.Module, params: dict[str, torch.Tensor], probes: tuple[torch.Tensor, ...]) -> float:
    """:func:`graph_row_bytes`' passes, run."""
    growth = []
    for batch in (1, 2):
        inputs = _first_probe_copies(probes, batch)
        floating = [t.requires_grad_(True) for t in inputs if t.is_floating_point()]
        losses = output_tensor(model(*inputs)).reshape(batch, -1).pow(2).sum(1)
        peaks = []
        for rows in (1, 2):
            weights = torch.ones(rows, batch, dtype=losses.dtype, device=losses.device)
            with LiveBytes((*params.values(), *inputs)) as live:
                if floating:  # to the inputs: every activation's gradient, no parameter-sized row to hide it
                    torch.autograd.grad(losses, floating, grad_outputs=weights, retain_graph=True,
                                        is_grads_batched=True)
                else:
                    gradients_from_losses(losses, params, weights)
            peaks.append(live.peak)
        growth.append(peaks[1] - peaks[0])
        del losses
    return float(max(growth[1] - growth[0], 0))


def training_pass_bytes(model: nn.Module, probes: tuple[torch.Tensor, ...]) -> float:
    """Bytes a training pass (a forward with its graph and the backward to the trained parameters) holds per
    example at its peak, measured under ``push_memory.LiveBytes``: the growth from 1 to 2 copies of the first probe
    (the parameters' gradients, held once whatever the batch, left out), a sum of squares of the output standing
    in for the loss, in the model's mode as it is, its buffers and the random state restored. Leaf outputs miss
    what a forward computes with plain operations: a self-attention block written with matmul and softmax (d = 32,
    T = 256) held 3.5 times :data:`TRAINING_ACTIVATIONS` x its leaf outputs an example (its T x T scores and their
    softmax's saved output), measured exactly as a training pass's slope from B = 8 to 16; a conv net and an MLP
    hold less than the count (0.55, 0.25). 0.0 where the pass raises or nothing is trained (the
    count alone then); one measure per architecture and probe shape (push_memory's key)."""
    return _measured_per_architecture("training pass", model, probes, _measured_training_pass)


def _measured_training_pass(model: nn.Module, params: dict[str, torch.Tensor],
                            probes: tuple[torch.Tensor, ...]) -> float:
    """:func:`training_pass_bytes`' passes, run."""
    peaks = []
    for batch in (1, 2):
        inputs = _first_probe_copies(probes, batch)
        with LiveBytes((*params.values(), *inputs)) as live:
            loss = output_tensor(model(*inputs)).pow(2).sum()
            torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            del loss
        peaks.append(live.peak)
    return float(max(peaks[1] - peaks[0], 0))


# GRAPH_ROW_ACTIVATIONS and GRAPH_ROW_LARGEST_OUTPUTS (engine.gradients, where the "group" route sizes its chunks of
# rows with them, graph_row_elements): what one group row of the batched backward through the training graph holds,
# per example, as a share of its activations and as a multiple of its largest leaf output, the smaller counted (the
# graph route's total was 0.29-0.52 of its measured peak without the part).


# Tangents of the probes' activations one pushed row holds, as a share of the probes' activations
# (M × the activation elements of one example × bytes), where the model's own pass was not measured
# (push_memory.measure_push_memory; its docstring has the measured shares).
PUSH_ROW_ACTIVATIONS = DEFAULT_PUSH_MEMORY.row
# What a training step holds at its peak per activation element of its micro-batch (every module output of one
# example's hooked forward, :func:`hooked_forward_counts`, times the micro-batch): what autograd saves and the
# backward's gradients. Measured as the peak RSS's growth from B to 2B examples (2 CPU threads, glibc's allocator,
# Adam): 1.47-1.48 on two UNet2DModels (MNIST-sized, tiny), 0.68 on the DDPM CIFAR-10 UNet, 0.75 and 0.83 on the
# DCGAN 64x64 G and D, 0.61 on an MLP, 1.88 on a transformer encoder (attention's probabilities are no module's
# output); on CUDA the CIFAR-10 UNet's allocated peak at B = 64 gave 1.43 (figures/gpu_check.json). It was 3.
TRAINING_ACTIVATIONS = 2.0
# EXAMPLE_PASS_ACTIVATIONS (engine.gradients, where example_chunk sizes the pass's chunk with it): what the dense
# "example" route's own vmapped per-example pass holds per activation element of its chunk, 1.50 measured on a conv
# net whose training pass held 1.47 of its activations (TRAINING_ACTIVATIONS, 2.0, covers other models' larger
# shares). Uncounted before: that route's phase held the group rows alone (1.3 MiB against the pass's 56.1 MiB).


def push_pass_bytes(num_params: int, param_bytes: int, rows: int, probe_activation_bytes: int,
                    push_memory: PushMemory = DEFAULT_PUSH_MEMORY) -> int:
    """Working memory of one vmapped JVP pass of ``rows`` tangent rows: a copy of the parameters'
    tangents (measured: at most one, whatever the rows), the probes' primal activations and, per row,
    their tangents (``push_memory``'s shares of ``probe_activation_bytes`` = M' × activation elements
    per example × bytes, M' the pass's probes)."""
    return int(num_params * param_bytes + (push_memory.primal + rows * push_memory.row) * probe_activation_bytes)


def push_pass_shape(memory_budget: int, probes: int, activation_bytes: int,
                    push_memory: PushMemory = DEFAULT_PUSH_MEMORY) -> tuple[int, int]:
    """``(rows, probes)`` one vmapped JVP pass pushes at once, from the probes' count and one
    probe's activation bytes (``activation_bytes``: elements per example × bytes): every probe and
    as many tangent rows as keep the pass (``push_memory``: the model's measured shares, a primal
    and a row per probe) within ``memory_budget``; when not even one row through every probe fits,
    one row through as many probes as fit; at least one of each. The pass's parameter copy of
    tangents is held besides, like the tracker's other parameter-sized copies
    (:func:`push_pass_bytes` counts both).

    Every pass runs the primal forward of its probes, so wider passes cost fewer forwards (on the
    DDPM CIFAR-10 UNet, 11 rows took 20.1 s one per pass, 15.4 s two per pass and 13.8 s in one
    pass, 2 CPU cores); on small models the rows' activations dominate (the tiny UNet's 64 probes:
    about 40 MB a row against 0.7 MB of parameters), and 3 rows per pass took as long as 20.
    """
    per_probe_row = max(1.0, push_memory.row * activation_bytes)
    per_probe_primal = push_memory.primal * activation_bytes
    if memory_budget >= probes * (per_probe_primal + per_probe_row):
        return int((memory_budget - probes * per_probe_primal) // (probes * per_probe_row)), probes
    return 1, max(1, int(memory_budget // (per_probe_primal + per_probe_row)))


def _in_analysis_mode(function: Callable) -> Callable:
    """``function(model, ...)`` run under :func:`~genkernel.core.adapter.analysis_mode` of ``model``: the estimate's
    one-example passes in eval mode (a training-mode BatchNorm1d cannot run a batch of one), as a tracker makes its
    estimate, whatever mode the caller left the model in (restored after)."""

    @functools.wraps(function)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # (an estimate of another group state inside an estimate: the same model, the same keys)
        outer = getattr(_ESTIMATE, "keys", None) is not None
        if not outer:
            _ESTIMATE.keys = {}
        try:
            with analysis_mode(model):
                return function(model, *args, **kwargs)
        finally:
            if not outer:
                _ESTIMATE.keys = None

    return run


# The architecture keys made during one estimate, per thread (estimate_cost sets them, per_architecture reads them):
# the model does not change inside an estimate, and its key (a repr and every module's settings) was made again for
# each measure, on the examples' UNets a tenth of the estimate.
_ESTIMATE = threading.local()


@outside_inference_mode
@_in_analysis_mode
def estimate_cost(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    probes: tuple[torch.Tensor, ...],
    *,
    outputs: int,
    rows: int,
    partitions: int = 1,
    group_state: str = "dense",
    gradient_route: str = "graph",
    contribution_route: str = "jvp",
    quadrature_nodes: int = 1,
    state_dtype: torch.dtype = torch.float64,
    memory_budget: int = 256 * 2**20,
    batch_size: int | None = None,
    micro_batches: int = 1,
    ema: bool = False,
    sketch_dim: int = 512,
    device: torch.device | str | None = None,
    options: tuple[str, ...] = COST_OPTIONS,
    group_states: tuple[str, ...] = GROUP_STATE_CHOICES,
    witness_copies: int = 0,
    witness_passes: int = 0,
    step_overhead: float = 0.0,
    push_memory: PushMemory | None = None,
    probes_coupled: bool | None = None,
) -> CostEstimate:
    """Memory and work of a tracked step before the run (see the module docstring).

    Args:
        model, optimizer, probes: what the tracker is built with (the probes ``[M, ...]``).
        outputs: d, outputs per probe.
        rows: R, the groups of all partitions together; ``partitions``: how many partitions.
        group_state, gradient_route, contribution_route, quadrature_nodes, state_dtype,
        memory_budget, sketch_dim: the tracker's settings.
        batch_size: B of a training step (activations and the bare step's work; default M).
        micro_batches: K, the micro-batches a step runs its batch in (``OptimizerStep(micro_batches=)``):
            training holds one micro-batch's activations, and no route reads the training pass (a
            capture records one forward), so step 1 runs its own.
        ema: whether an EMA ledger is kept.
        device: where the state lives (default the parameters').
        options: the settings :attr:`CostEstimate.cheaper` may name (a subset of ``COST_OPTIONS``:
            "groups", "group_state", "state_dtype", "probes", "window", "quadrature"); a caller
            whose user cannot change a setting leaves it out.
        group_states: the group-state routes the caller could be built with (a tracker under DDP:
            "dense" alone; one whose model couples its examples, training-mode BatchNorm or dropout:
            not "factored"); :attr:`CostEstimate.cheaper` names only those, and only where the
            optimizer suits them (factored: plain SGD; sketched: :func:`sketchable`).
        witness_copies: parameter-sized witnesses an observed half-precision step holds at once
            (``PathKernelTracker(mixed_precision="observe")``: :func:`witness_counts`, the worst case: 5 in
            float16, its two seed scales summed for the step and two taken for the micro-batch observed last, and
            the witness of the loop's own seed its backward takes where that seed is no power of two times c_n,
            loss / 3; 3 in bfloat16, its one seed scale; a loop seeding a power of two times c_n at most 4 and 2;
            else 0). A loop that backpropagates one micro-batch's losses several times (retain_graph=True) holds
            one more per further pass: not counted.
        witness_passes: backward passes of every example an observed half-precision step runs besides its group
            rows (``mixed_precision="observe"``: :func:`witness_counts`, the worst case: 3 in float16, the
            witnesses at its two seed scales and the one with the loop's own seed; 2 in bfloat16; else 0), each
            counted as a bare step's backward (in ``work["witnesses"]``).
        step_overhead: example-forwards of the model that a bare step runs per training example besides its
            forward and backward (a ``DDPMTrainer(dream=)``'s no-grad forward: 1; a ``vae=`` trainer's encode:
            the encoder's multiply-adds over the model's), added to the bare step the ratio compares with.
        push_memory: what the model's JVP pass holds (:class:`~genkernel.core.push_memory.PushMemory`, the
            tracker's measure); default measured here (:func:`~genkernel.core.push_memory.measure_push_memory`).
        probes_coupled: whether the probes' outputs depend on each other in the analysis passes, so that every push
            runs them all in one pass (a tracker's decision, ``tracking.routes.probes_coupled``, the one its pushes
            take); None: decided here the same way without a tracker's findings (:func:`probes_couple`).
    """
    options = cost_options(options)
    if isinstance(witness_copies, bool) or not isinstance(witness_copies, int) or witness_copies < 0:
        raise ValueError(f"witness_copies must be an int >= 0, got {witness_copies!r}")
    if isinstance(witness_passes, bool) or not isinstance(witness_passes, int) or witness_passes < 0:
        raise ValueError(f"witness_passes must be an int >= 0 (backward passes of the batch), got {witness_passes!r}")
    if isinstance(step_overhead, bool) or not isinstance(step_overhead, numbers.Real) or not (
            math.isfinite(step_overhead) and step_overhead >= 0):
        raise ValueError(f"step_overhead must be a finite number >= 0 (example-forwards), got {step_overhead!r}")
    unknown = [g for g in group_states if g not in GROUP_STATE_CHOICES] if isinstance(group_states, tuple) else [group_states]
    if unknown:
        raise ValueError(f"group_states must be a tuple drawn from {GROUP_STATE_CHOICES}, got {group_states!r}")
    _check_arguments(probes, outputs=outputs, rows=rows, partitions=partitions, group_state=group_state,
                     gradient_route=gradient_route, contribution_route=contribution_route,
                     quadrature_nodes=quadrature_nodes, state_dtype=state_dtype, memory_budget=memory_budget,
                     batch_size=batch_size, sketch_dim=sketch_dim, micro_batches=micro_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    num = sum(p.numel() for p in params)
    # Each parameter-sized array in its own parameter's dtype (param_bytes.py): ``p_bytes`` the bytes of one
    # such copy of all parameters, ``param_bytes`` the bytes per value (the parameters' values weighted) for the
    # counts that are per value (activations, factors, chunks), the single dtype's item size where they share one.
    p_bytes = parameter_bytes(params)
    param_bytes = value_bytes(params)
    # a float32 parameter's rounding sample, taken (for every parameter) where any trained one is float32
    float32 = trains_float32(params)
    state_bytes = torch.empty((), dtype=state_dtype).element_size()
    m = probes[0].shape[0]
    b = m if batch_size is None else batch_size
    device = params[0].device if device is None and params else torch.device(device or "cpu")
    linear_state = linear_state_rows(optimizer)
    state_bytes_held = optimizer_state_bytes(optimizer, params)  # the optimizer's state, in each parameter's dtype
    largest = max((p.numel() for p in params), default=0)

    memory: dict[str, int] = {}
    work: dict[str, float] = {}
    # What training itself holds: parameters, gradients, optimizer state, activations.
    # One example's activations and products (example_counts), and which layers a backward (and a JVP's
    # tangent) goes through and which are frozen, outside the trained blocks' shapes: every route's passes do
    # their forward work too, so they are in every route's unit (gradient_layer_counts). One pass for both.
    acts, macs, trainable_macs, layers = _remembered_counts(model, tuple(t[:1] for t in probes), grad=True)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if push_memory is None:
        push_memory = measure_push_memory(model, trained, probes, int(acts * param_bytes))
    micro = -(-b // micro_batches)  # the largest micro-batch: what training's activations hold at once
    memory["training_step"] = 2 * p_bytes + state_bytes_held
    # (the count, or what a training pass is measured to hold per example where larger: what no leaf module
    # returns, an attention's probabilities in plain operations, is in the measure alone)
    memory["training_activations"] = int(max(TRAINING_ACTIVATIONS * acts * param_bytes,
                                             training_pass_bytes(model, probes)) * micro)
    # Weights that do not train (a LoRA base, a frozen encoder inside the model) are on the device all the
    # same: in the total, and, like the training step's own arrays, already out of the free memory.
    memory["frozen_weights"] = frozen_bytes(model, device)
    reads_training = micro_batches == 1 and reads_training_pass(acts * param_bytes, b, memory_budget)
    # a forward and a backward of every example, the frozen layers' weight gradients not formed, nor the input
    # gradients of layers whose input depends on no trained parameter (the routes below count it from the shapes)
    bare = bare_step_forwards(macs, trainable_macs, b, layers.input_gradients)
    # A pushed row's tangent pass, in example-forwards: the input tangent through every layer downstream of a
    # trained parameter (β) and the weight tangent through the trained ones (their share): a frozen layer's weight
    # has no tangent, one before the first trained layer no input tangent either.
    tangent = (layers.input_gradients + trainable_macs) / macs if macs else 2.0
    # and per vmapped pass, the products with the zeros torch.func puts where one side has no tangent
    one_sided = layers.one_sided / macs if macs else 0.0
    memory["parameter_copies"] = p_bytes * (2 + quadrature_nodes) + state_bytes_held
    if witness_copies:
        memory["witnesses"] = witness_copies * p_bytes
    if witness_passes:  # (each a backward of the batch through the training graph: a bare step less its forward)
        work["witnesses"] = witness_passes * (bare - b)
    # Adadelta's accumulated update from before the step, copied by the splitter until the step is recorded.
    memory["parameter_copies"] += splitter_state_copies(optimizer) * p_bytes
    # The splitter's rows: the dense route's groups, the rest and a rounding row per partition in
    # the state dtype; the other routes' exact totals (one partition of one group), float64.
    stacked, row_bytes = (rows + 1 + partitions, state_bytes) if group_state == "dense" else (3, 8)
    memory["group_state"] = 2 * stacked * num * row_bytes if linear_state else 0
    memory["group_updates"] = stacked * num * row_bytes
    memory["checks"] = check_bytes(num, partitions if group_state == "dense" else 1, row_bytes, linear_state)
    if group_state == "dense":
        memory["group_gradients"] = rows * num * state_bytes
        if ema:  # D and E (with the start row), θ_0, θ̄_0, the last θ̄ and the carried drift's bound: float64 (tracking.ema)
            memory["ema"] = (2 * stacked + 1 + 4) * num * 8
        pushed = rows + 1
        if gradient_route == "graph":  # R backward passes of the batch: a bare step's, less its forward
            # (a float32 model's two more, its rounding sample's seeded rows, held summed until the check: tracking.rounding)
            backward_rows = rows + (len(ROUNDING_SEEDS) if float32 else 0)
            work["group_gradients"] = backward_rows * (bare - b)
            # batched, every row at once, beside the training graph (not bounded by the memory budget: rows taken in
            # chunks were rounded otherwise than the step's check allows, a conv bias's gap 1.7e-5 of its scale)
            # a row per example: the larger of the count (leaf outputs) and a row measured on the first probe
            # (graph_row_bytes: what no leaf returns, an attention's probabilities in plain operations, is in it)
            row = max(graph_row_elements(acts, layers.largest_output) * param_bytes, graph_row_bytes(model, probes))
            memory["row_backward"] = int(backward_rows * row * micro)
            if float32:
                memory["rounding_sample"] = num * 8
        else:
            own_pass = gradient_route == "example" and not reads_training
            if gradient_route == "example" and reads_training:
                memory["training_records"] = int(acts * b * param_bytes)
            shapes, fallback = _block_shapes(model, probes)
            # the fallback's torch.func pass (not on "example": its own pass forms every gradient): to the fallback
            # parameters alone, their own gradients, a check per chunk of the batch (as factor_route_work's)
            # (the factored route's capture pass holds the fallback constant: what its backward skips; the fallback's
            # rows are summed over that pass's own chunks of the batch)
            fallback_back, batch_checks, capture_skipped, fallback_chunk = None, 0, 0, None
            if fallback and (gradient_route == "factored" or reads_training):
                capture_skipped, fallback_skipped, fallback_gradients, _, batch_checks = _fallback_passes(
                    model, probes, layers, fallback, outputs=outputs, batch=b, param_bytes=param_bytes,
                    memory_budget=memory_budget, probe_side=False)
                fallback_back = (max(layers.input_gradients - fallback_skipped, 0) + fallback_gradients) / max(macs, 1)
                fallback_largest, fallback_chunk, fallback_pass = per_architecture(
                    "fallback pass", model, probes, (param_bytes, memory_budget),
                    lambda: _fallback_pass(model, probes, param_bytes, memory_budget))
            # the rows are added one chunk of examples at a time: the route's own chunks (engine.gradients; the
            # pass's activations as the engine sizes its chunks by them: the leaf outputs, or what the pass is
            # measured to hold where larger)
            own = per_architecture("example pass", model, probes, tuple(sorted(trained)),
                                   lambda: _pass_measure(model, probes, trained)) if own_pass else ExamplePass(acts, 0)
            if gradient_route == "example" and reads_training:
                chunks = [b]
            elif own_pass:
                chunks = equal_chunks(b, example_chunk(memory_budget, num, largest, param_bytes, own.activations,
                                                       own.fixed_bytes))
            else:  # the factored gradient route's captures, in the chunks its first two measured give (a step after
                # the first, which measures them: engine.gradients.factored_steady_chunk)
                one, two = factored_chunk_bytes(model, probes, rows, partitions)
                chunks = equal_chunks(b, factored_steady_chunk(b, memory_budget, one, two))
            if own_pass:  # the vmapped pass over one chunk: its activations, gradients, and add_rows' widened block
                memory["example_pass"] = example_pass_bytes(max(chunks), num, largest, param_bytes, own.activations,
                                                            own.fixed_bytes)
            elif gradient_route == "factored":  # the largest chunk's capture: what the first two held, extended
                one, two = factored_chunk_bytes(model, probes, rows, partitions)
                memory["example_pass"] = one + (max(chunks) - 1) * max(two - one, 0)
            if fallback_chunk is not None:
                # The fallback parameters' own vmapped per-example pass (routes.DenseRoute._from_training_pass, the
                # factored gradient route's _factored_route: engine.gradients' "example" route over the fallback
                # alone), beside the rows (and the training records it reads the other blocks from): the whole
                # model's forward over a chunk of examples, the chunk sized by the budget to its activations and the
                # fallback's gradients (engine.gradients.example_chunk). Uncounted before: on a 64x64 conv net with a
                # raw input scale (3 values, B = 32, 64 MB budget) the pass added 29.5 MiB to the gradients call, 1.3x
                # the training records and half the step's measured peak (the training pass's over-count hid it).
                # (after the factored route's captures, not beside them: the larger of the two)
                memory["example_pass"] = max(memory.get("example_pass", 0), example_pass_bytes(
                    min(fallback_chunk, b), fallback, fallback_largest, param_bytes, fallback_pass.activations,
                    fallback_pass.fixed_bytes))
            # The unit, one example's forward: every product of it (hooked_forward_counts), those of the fallback
            # parameters (a raw weight in F.linear, einsum, MultiheadAttention's in_proj_weight) too, which the rows'
            # R·B·P and the per-example gradients below count in whole (they are trained: in the weight share too).
            forward = float(macs) if macs else forward_macs(shapes, fallback)
            share = trainable_macs / macs if macs else 1.0
            work["group_gradients"] = dense_gradient_work(
                shapes, fallback, batch=b, rows=rows, partitions=partitions, chunks=chunks,
                route="example" if own_pass else "training" if gradient_route == "example" else "factored",
                forward=forward, weight_share=share, frozen_skipped=layers.frozen_skipped,
                input_gradients=layers.input_gradients, fallback_back=fallback_back, batch_checks=batch_checks,
                capture_skipped=capture_skipped, fallback_chunk=fallback_chunk)
            # the shapes at hand, the bare step's input gradients too: none where a block's input depends on
            # no trained parameter (the first layer's) nor in a frozen layer before every trained one, as the
            # factored and sketched routes count them
            back = input_gradient_share(shapes, fallback, forward, layers.frozen_skipped, layers.input_gradients)
            bare = b * (1.0 + back + share)
            tangent, one_sided = back + share, layers.one_sided / forward
        unit = max(float(macs), 1.0)  # the Jacobian route's products below, in the same forwards
    else:
        memory["group_gradients"] = 2 * num * 8  # the batch's exact total and sizes, float64
        if group_state == "sketched":
            memory["group_state"] += rows * sketch_dim * 8
            memory["projection"] = projection_bytes(params, sketch_dim, memory_budget)
        # Counted from the layers' shapes, in forwards of their blocks (what they leave out,
        # attention's products and elementwise work, is not in a bare step's count either).
        shapes, fallback = _block_shapes(model, probes)
        # The batch's factors, held from step 1 to step 5 whether read from the training pass or from a capture
        # pass of the route's own (its chunks are joined into the whole batch's): not bounded by the budget.
        memory["held_factors"] = int(held_factor_bytes(shapes, fallback, batch=b, itemsize=param_bytes,
                                                   form="lean" if group_state == "factored" else "outer"))
        # At each node, a chunk of the probes' rows captured with a chunk of their output cotangents, beside the held
        # factors (engine.factored.capture_chunks: half the budget at most). Uncounted before, when one capture took
        # all d outputs: an MNIST-sized UNet at 16x16 (d = 256) held 1.4 GiB for 4 probes, estimated at 124 MiB.
        memory["probe_captures"], probe_output_chunks = per_architecture(
            "probe captures", model, probes, (outputs, memory_budget),
            lambda: _probe_captures(model, probes, outputs, memory_budget))
        # with fallback parameters: what the captures' and torch.func's backward passes skip, the fallback's own
        # gradients, and the examples torch.func checks alone (:func:`_fallback_passes`)
        capture_skipped, fallback_skipped, fallback_gradients, probe_checks, batch_checks = _fallback_passes(
            model, probes, layers, fallback, outputs=outputs, batch=b, param_bytes=param_bytes,
            memory_budget=memory_budget, probe_side=True)
        # The trained products outside the blocks (a fallback weight in F.linear or einsum, MultiheadAttention's
        # in_proj_weight and out_proj.weight): every pass's forward work, once per product (every product but the
        # frozen ones: macs - frozen), and their weight gradients a bare step's, one per trained operand (a product
        # of two trained operands, learned queries through a Linear, forms two: trainable_macs counts it twice)
        blocks_macs = sum(s.macs() for s in shapes)
        outside = max(macs - layers.frozen - blocks_macs, 0)
        outside_gradients = max(trainable_macs - blocks_macs, 0)
        parts = factor_route_work(shapes, fallback, probes=m, batch=b, outputs=outputs, itemsize=param_bytes,
                                  memory_budget=memory_budget, form="lean" if group_state == "factored" else "outer",
                                  frozen=layers.frozen, frozen_skipped=layers.frozen_skipped,
                                  capture_skipped=capture_skipped, fallback_skipped=fallback_skipped,
                                  outside=outside, outside_gradients=outside_gradients,
                                  input_gradients=layers.input_gradients, fallback_gradients=fallback_gradients,
                                  probe_checks=probe_checks, batch_checks=batch_checks,
                                  probe_output_chunks=probe_output_chunks)
        bare = parts["bare_step"]
        # the unit of every part: the trained blocks' forward, the trained products outside them and the others
        # (frozen layers', products between activations)
        forward = max(route_forward(shapes, fallback, outside) + layers.frozen, 1.0)
        unit = forward
        tangent, one_sided = parts["tangent"], layers.one_sided / forward
        work["group_gradients"] = parts["batch_factors"]
        if reads_training:
            memory["training_records"] = int(acts * b * param_bytes)
        else:  # a capture pass of its own
            work["group_gradients"] += parts["capture"]
        work["probe_factors"] = quadrature_nodes * parts["probe_factors"]
        if group_state == "factored":
            work["cross_kernels"] = quadrature_nodes * parts["cross_kernels"]
            # Plain SGD: only weight decay leaves a rest row to push.
            pushed = int(any(float(g.get("weight_decay", 0.0)) != 0.0 for g in optimizer.param_groups))
        else:
            # The exact total and the rest row pushed; the batch's per-example gradients sketched
            # once (D is applied on the probes' side), the probes' d outputs per node; the check's
            # one parameter-sized vector (k·P); the groups' estimates, M·d·R·k.
            pushed = 2
            adam = type(optimizer) is not torch.optim.SGD
            work["sketches"] = (sketch_work(shapes, fallback, b, sketch_dim, preconditioned=False, forward=forward)
                                + sketch_work(shapes, fallback, quadrature_nodes * m * outputs, sketch_dim, adam,
                                              forward=forward)
                                + sketch_dim * num / forward)
            work["sketch_products"] = m * outputs * rows * sketch_dim / forward
    memory["ledgers"] = ledger_bytes(m, outputs, rows, partitions) * (2 if ema else 1)
    # the probes' outputs at the last recorded θ (the tracker's f_prev, float64 [M, d]), kept from step to step
    memory["probe_outputs"] = 8 * m * outputs
    moved = min(rows, b) if group_state == "factored" else rows  # plain SGD moves only the batch's groups
    memory["step_contributions"] = 2 * m * moved * outputs * 8
    if group_state == "sketched":
        memory["step_contributions"] += sketch_temporary_bytes(
            model, m, outputs, sketch_dim, preconditioned=type(optimizer) is not torch.optim.SGD)

    # Probes whose outputs depend on each other in the analysis passes' eval mode (BatchNorm without running
    # statistics, a centering h - h.mean(0) in plain operations): pushed in one pass of them all, whatever the budget,
    # as the run decides it (routes.probes_coupled, the tracker's; the modules by type alone counted a centering
    # model's pushes in chunks of the probes, under the peak its pass of them all holds).
    if probes_coupled is None:
        with eval_mode(model):
            probes_coupled = probes_couple(model, probes)
    coupled = bool(probes_coupled)

    def push_cost(rows_pushed: int, route: str) -> tuple[int, float]:
        """``(bytes, work)`` of pushing ``rows_pushed`` rows to the probes at every node on ``route``."""
        if route == "jacobian":
            # The Jacobians' blocks and their concatenation, M × d × P each, and the rows as one [rows, P]
            # matrix. Work: a forward of every probe and d backward passes (through the layers downstream of a
            # trained parameter, the trained weights' gradients: a tangent pass's work each), once more for the
            # first probe alone where there are two or more (engine.reference.per_example checks the batched
            # result on it: fallback_checks; one probe is not checked), and the
            # Jacobians times the rows, M·d·rows·P multiply-adds (in forwards of F multiply-adds, the frozen
            # layers' with the blocks': on an MLP P ≈ F, and this product dominates).
            # (the blocks in each parameter's dtype, their concatenation and the rows' in the dtypes joined)
            # Coupled probes (batch_jacobian: jacrev vmapped over the M·d outputs, each a backward of the whole probe
            # batch) hold besides those reverse passes' cotangents, M·d times all M probes' activations (measured,
            # LiveBytes, conv nets with BatchNorm2d without running statistics, 4-16 probes: 0.67-0.72 of the count;
            # without the part 2.5-16.7x over it). (An uncoupled pass's, per_example_jacobian's, M·d times one probe's
            # activations, is not counted: 1.1-1.9x over the count there.)
            cotangents = int(m * outputs * m * acts * param_bytes) if coupled else 0
            return (m * outputs * p_bytes + (m * outputs + rows_pushed) * num * joined_itemsize(params) + cotangents,
                    quadrature_nodes * ((m + fallback_checks([m])) * (1.0 + outputs * tangent)
                                        + m * outputs * rows_pushed * num / unit))
        # One primal pass per vmapped pass and a tangent pass per row (J u through every product: Ẇx + Wẋ
        # where both are there, two forwards of an unfrozen model; a frozen layer's Wẋ alone, and nothing in
        # one before the first trained layer: ``tangent``), as torch.utils.flop_counter counts vmapped JVPs:
        # 1 + 2.05 R forwards on a UNet at R = 21 in one pass; per pass besides, the products with the zero
        # tangents torch.func materializes where one side has none (``one_sided``: a LoRA base after an
        # adapter, the first layer). Passes over chunks of the probes add up to one primal of them all.
        per_pass, probes_per_pass = push_pass_shape(memory_budget, m, int(acts * param_bytes), push_memory)
        if coupled:  # (routes._jvp_rows: probes whose outputs depend on each other go through in one pass)
            probes_per_pass = m
        # (the tangents' parameter copy: p_bytes, given as that many values of one byte)
        return (push_pass_bytes(p_bytes, 1, min(rows_pushed, per_pass), int(probes_per_pass * acts * param_bytes),
                                push_memory),
                quadrature_nodes * m * (math.ceil(rows_pushed / per_pass) * (1.0 + one_sided) + tangent * rows_pushed))

    requested_route = contribution_route  # (another group state's estimate takes the same)
    if contribution_route == "auto":  # as routes.push_rows decides at every step
        contribution_route = push_route(pushed, m, outputs, p_bytes, memory_budget)
    if pushed == 0:
        memory["probe_pushes"] = 0
        work["contributions"] = 0.0
    else:
        memory["probe_pushes"], work["contributions"] = push_cost(pushed, contribution_route)
        # the rows converted to the parameters' dtype first where theirs differs
        memory["push_tangents"] = tangent_bytes(pushed, params, row_bytes)
    # The elementwise checks' buffers, kept from step to step (tracking.checks): the update check's over a
    # partition's rows and the ones it shares (at most all of them), and an EMA sync's over its change rows.
    from .tracking.checks import check_scratch_bytes  # (here: tracking imports this module)

    memory["check_scratch"] = check_scratch_bytes(stacked, largest, row_bytes, device)
    if ema:
        memory["check_scratch"] += check_scratch_bytes(stacked + 1, largest, 8, device)
    if ema and group_state == "dense":
        # EMALedgers.sync pushes its R + 2 rows by push_rows' own "auto" choice (whatever the step's route):
        # the probes' Jacobians when 8 d <= R + 2 and they fit the budget, else JVPs in passes.
        ema_rows = rows + 2
        ema_push, ema_work = push_cost(ema_rows, push_route(ema_rows, m, outputs, p_bytes, memory_budget))
        # EMALedgers.sync, between steps: the change rows (R + 2 + partitions), the R + 2 rows it pushes
        # (a float64 copy, and one in the parameters' dtype where that differs), its push, and the EMA's
        # and the model's weights read in float64; beyond the step's temporaries, freed by then.
        # (the parameters narrower than float64 alone: their rows' copies and their weights read in float64)
        narrow = [p for p in params if p.element_size() != 8]
        sync = ((stacked + 1) + (rows + 2)) * num * 8 + ema_push
        sync += (rows + 2) * parameter_bytes(narrow) + 2 * sum(p.numel() for p in narrow) * 8
        transient = sum(memory.get(k, 0) for k in EMA_SYNC_REPLACES)
        memory["ema_sync"] = max(0, sync - transient)
    # The structurally null parameters' search (tracking.null_params), once per set of modes, just before the first
    # optimizer step that has a gradient at rounding level, beside what step 1 holds (null_search_bytes).
    memory["null_search"] = null_search_bytes(model, params, m, acts)
    # After the step; before it too when buffers or frozen parameters may have moved the outputs.
    work["probe_forwards"] = m * (2.0 if has_state_outside_training(model) else 1.0)
    if ema:
        # The sync's pushes and its two forwards of the probes (the EMA weights before and after).
        work["ema_contributions"] = ema_work + 2.0 * m if group_state == "dense" else quadrature_nodes * m * (
            1.0 + one_sided + tangent * (rows + 2)) + 2.0 * m
    # (after the routes' counts, which read the model's own bare step: a trainer's work outside the model is in the
    # bare step and the tracked one alike)
    bare += step_overhead * b
    # Which parts exist at once (the module docstring's phases): the training pass's activations and what a step
    # keeps of them, then the group gradients read from them, then the analysis after the optimizer's step.
    training_pass = ("training_activations", "training_records", "witnesses")
    if group_state == "dense":  # (rows from the training graph, observed or owned, only on the dense route)
        training_pass += ("group_gradients", "row_backward", "rounding_sample")
        if micro_batches > 1:
            # Rows from the graph of each micro-batch (an owned step's graph route, an observed loop's observe()):
            # from the second on, the earlier micro-batches' sum is held while this one's are formed (twice).
            training_pass += ("group_gradients",)
    phases = {
        "training pass": training_pass,
        "group gradients": ("training_records", "example_pass", "group_gradients", "held_factors", "witnesses",
                            "rounding_sample"),
        "analysis": STEP_TEMPORARIES,
    }
    if memory["null_search"]:
        # (routes.GroupStateRoute.before_step: after the gradient check, the group rows and the batch's factors held)
        phases["null search"] = ("group_gradients", "held_factors", "witnesses", "null_search")
    else:
        del memory["null_search"]
    if "ema_sync" in memory:
        # An observed loop's optimizer.step() syncs the EMA ledger (the EMA's update after the previous step) before
        # the step, while the rows its observe() calls summed are held: the sync (``ema_sync``, its excess over the
        # step's temporaries, counted with those it replaces) beside them. (An owned step syncs before its forward.)
        phases["EMA sync"] = ("group_gradients", "witnesses", "rounding_sample", *EMA_SYNC_REPLACES, "ema_sync")
    estimate = CostEstimate(memory, available_memory(device), work, bare, held_bytes(model, optimizer, device), phases=phases, settings={
        "parameters": num, "rows": rows, "partitions": partitions, "probes": m, "outputs": outputs, "batch": b,
        "group_state": group_state,
        "state_dtype": str(state_dtype).replace("torch.", ""), "device": str(device),
        "quadrature_nodes": quadrature_nodes, "ema": ema, "optimizer": type(optimizer).__name__,
        "step_overhead": float(step_overhead), "gradient_route": gradient_route if group_state == "dense" else None,
    })
    switchable = tuple(g for g in group_states if g == "dense" or (g == "factored" and plain_sgd(optimizer))
                       or (g == "sketched" and sketchable(optimizer)))
    alternatives = None
    if group_state == "dense" and "group_state" in options and not ema:
        # Each other group state a refusal could name, estimated whole (its own parts may outweigh what it spares).
        alternatives = {}
        for other in switchable:
            if other == "dense":
                continue
            try:
                alternatives[other] = estimate_cost(
                    model, optimizer, probes, outputs=outputs, rows=rows, partitions=partitions, group_state=other,
                    contribution_route=requested_route, quadrature_nodes=quadrature_nodes, state_dtype=state_dtype,
                    memory_budget=memory_budget, batch_size=batch_size, micro_batches=micro_batches,
                    sketch_dim=sketch_dim, device=device, options=(), group_states=(other,),
                    witness_copies=witness_copies, witness_passes=witness_passes, step_overhead=step_overhead,
                    push_memory=push_memory, probes_coupled=coupled).total_bytes
            except Exception:  # (a route that cannot estimate this model: not named)
                alternatives[other] = None
    estimate.cheaper = _cheaper_options(estimate, group_state, state_dtype,
                                        bool(params) and all(p.dtype == torch.float32 for p in params),
                                        options, switchable, alternatives)
    return estimate


# (parameter copies, backward passes of the batch) an observed half-precision step's witnesses hold and run at worst
# (a loop seeding a micro-batch exactly a power of two times c_n, then another one no such multiple, loss / 2 then
# loss / 2·(1 + 1e-6)), measured from the tracker's own arrays after each observe() and inside each loop backward:
# float16's two seed scales (unscaled and HALF_ROW_SCALE) summed for the step and two for the micro-batch observed
# last, and the witness of the loop's own seed: 5 copies, 3 passes; bfloat16's one seed scale: 3 copies, 2 passes.
WITNESS_COUNTS = {torch.float16: (5, 3), torch.bfloat16: (3, 2)}


def witness_counts(precision: torch.dtype | None) -> tuple[int, int]:
    """``(witness_copies, witness_passes)`` for :func:`estimate_cost` of a tracker observing half-precision steps in
    ``precision`` (torch.float16 or torch.bfloat16; :data:`WITNESS_COUNTS`); None, where the half precision is not
    known yet, float16's, the larger: the estimate is never below the peak whichever the loop runs. ValueError for
    any other dtype."""
    if precision is None:
        return WITNESS_COUNTS[torch.float16]
    if precision not in WITNESS_COUNTS:
        raise ValueError(f"precision must be torch.float16, torch.bfloat16 or None (not known), got {precision!r}")
    return WITNESS_COUNTS[precision]


def probes_couple(model: nn.Module, probes: tuple[torch.Tensor, ...]) -> bool:
    """Whether the probes' outputs depend on each other in ``model``'s current mode, for an estimate made without a
    tracker: a module known by type to couple its examples (:func:`~genkernel.core.adapter.coupled_modules`:
    BatchNorm without running statistics), or a forward of the probes that couples them in plain operations
    (:func:`~genkernel.core.adapter.coupled_forward`: a centering ``h - h.mean(0)``). It is what a tracker's pushes
    decide (``tracking.routes.probes_coupled``) where its forward check found a coupling, which this one cannot know
    of: checked here by the forward itself (two forwards of the first probes, no graph)."""
    return bool(coupled_modules(model)) or bool(coupled_forward(model, probes))


def cost_options(options: Any) -> tuple[str, ...]:
    """``options`` as a tuple of names from ``COST_OPTIONS``; TypeError or ValueError naming the
    stray entry otherwise."""
    if isinstance(options, str) or not isinstance(options, (tuple, list, set, frozenset)):
        raise TypeError(f"options must be a tuple of names from {COST_OPTIONS}, got {options!r}")
    unknown = [o for o in options if o not in COST_OPTIONS]
    if unknown:
        raise ValueError(f"options {unknown} are not cost options: choose from {COST_OPTIONS}")
    return tuple(o for o in COST_OPTIONS if o in options)


def push_route(rows: int, probes: int, outputs: int, parameter_bytes: int, memory_budget: float) -> str:
    """The route :func:`~genkernel.core.tracking.routes.push_rows` takes for ``contribution_route="auto"``:
    the probes' Jacobians when 8 d <= rows and they (2 M d P values, ``parameter_bytes`` = P × the
    parameters' item size) fit in the memory budget, else one JVP per row."""
    fits = 2 * probes * outputs * parameter_bytes <= memory_budget
    return "jacobian" if (8 * outputs <= rows and fits) else "jvp"


def ledger_bytes(probes: int, outputs: int, rows: int, partitions: int) -> int:
    """Bytes of one tracker's ledgers (float64): contributions ``[M, G, d]``, traffic and sketch noise
    ``[M, G]`` of every partition (``rows`` = Σ G over the partitions), and each partition's seven ``[M, d]`` fields
    (rest, residual, f_start, f_end, buffer drift, sketch error, null parameters' moves)."""
    return 8 * probes * (rows * (outputs + 2) + 7 * partitions * outputs)


def sketch_temporary_bytes(model: nn.Module, probes: int, outputs: int, k: int, *, preconditioned: bool) -> int:
    """Bytes the sketched route holds while it projects the probes' side (routes.sketched): the
    ``[M, d, k]`` float64 sum and one chunk's ``[d, M, k]``; with a per-parameter preconditioner
    (Adam) also, one block and cotangent at a time, the probes' per-example gradients of the
    largest weight and their scaled copy ``2 × M × P_w``, and the projection's ``[M, O, k]``
    product (at most its 64 MiB chunks), each weight's in its own dtype. Counted for all M probes at once, an upper
    bound where the probes are chunked."""
    total = 2 * probes * outputs * k * 8
    if preconditioned:
        matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        if matrices:
            total += 2 * probes * max(p.numel() * p.element_size() for p in matrices)
            total += min(PROJECTION_CHUNK_BYTES, probes * max(p.shape[0] * p.element_size() for p in matrices) * k)
    return total


def projection_bytes(params: list[torch.Tensor], k: int, cache_bytes: int) -> int:
    """What the sketched route's projection R keeps for the tracker's lifetime
    (:class:`~genkernel.core.engine.projections.ParameterProjection`, each parameter's in its dtype):
    every matrix parameter's factors ``r [k, O]`` and ``s [k, I]``, (O + I) × k values, and the
    other parameters' i.i.d. columns, numel × k values each, while they fit in ``cache_bytes``
    (the tracker's memory budget; in the parameters' order, as they are first drawn). Measured:
    102 MB at k = 4096 on a 32-512-512-4 float64 MLP, which the estimate left out before."""
    factors = vectors = 0
    for p in params:
        itemsize = p.element_size()
        if p.dim() >= 2:
            factors += (p.shape[0] + math.prod(p.shape[1:])) * k * itemsize
        else:
            size = p.numel() * k * itemsize
            if vectors + size <= cache_bytes:
                vectors += size
    return factors + vectors


# Optimizers whose splitter keeps a first moment per row (splitters.py), whatever their settings.
_FIRST_MOMENT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.RAdam, torch.optim.NAdam)


def linear_state_rows(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the splitter keeps a linear state per row (:mod:`~genkernel.core.tracking.splitters`):
    the first moment of Adam, AdamW, Adamax, RAdam and NAdam, a momentum buffer of SGD or RMSprop in
    any parameter group (Adagrad, Adafactor, Adadelta and ASGD keep none: their steps are linear in the
    gradient given what is read from the optimizer around it)."""
    if isinstance(optimizer, _FIRST_MOMENT_OPTIMIZERS):
        return True
    if isinstance(optimizer, (torch.optim.Adagrad, torch.optim.Adafactor, torch.optim.Adadelta, torch.optim.ASGD)):
        return False
    return any(float(g.get("momentum", 0.0)) != 0.0 for g in optimizer.param_groups)


def plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """torch.optim.SGD with no momentum in any parameter group (its update is −η ĝ, stateless): what
    ``group_state="factored"`` takes (:class:`~genkernel.core.tracking.routes.FactoredRoute`)."""
    return type(optimizer) is torch.optim.SGD and all(float(g.get("momentum", 0.0)) == 0.0 for g in optimizer.param_groups)


def sketchable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``group_state="sketched"`` takes this optimizer
    (:class:`~genkernel.core.tracking.sketched.SketchedRoute`): SGD, Adam or AdamW (exactly those
    types), with the same betas (Adam) or momentum, dampening and nesterov (SGD) in every parameter
    group, which one sketch of all parameters' state needs."""
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        return False
    keys = ("betas",) if type(optimizer) is not torch.optim.SGD else ("momentum", "dampening", "nesterov")
    return len({tuple(plain_hyperparameter(g.get(key)) for key in keys) for g in optimizer.param_groups}) == 1


def plain_hyperparameter(value: Any) -> Any:
    """A hyperparameter as a comparable plain value: a tensor's float, betas set as a list (by a loop or
    a scheduler) as a tuple, anything else as it is (what "the same in every parameter group" compares)."""
    if isinstance(value, torch.Tensor):
        return float(value.item())
    if isinstance(value, (tuple, list)):
        return tuple(plain_hyperparameter(v) for v in value)
    return value


def optimizer_state_copies(optimizer: torch.optim.Optimizer) -> int:
    """Parameter-sized tensors the optimizer keeps per parameter (the most of its parameter groups):
    Adam's and AdamW's two moments (three with amsgrad); Adamax's first moment and infinity norm;
    RAdam's and NAdam's two moments; Adadelta's square average and accumulated update; Adagrad's sum of
    squares; ASGD's average of the parameters (their step counts, NAdam's μ product and ASGD's η and μ
    are 0-dim); SGD's momentum buffer (none without momentum); RMSprop's square average, its
    momentum buffer and, centered, its gradient average; Adafactor's full variance of a vector or 0-dim
    parameter (1 where a group holds one, else 0: an upper bound per parameter, as a matrix's or conv
    weight's second moment is a row and a column factor; :func:`optimizer_state_values` counts them)."""
    copies = 0
    for g in optimizer.param_groups:
        momentum = float(g.get("momentum", 0.0)) != 0.0
        if isinstance(optimizer, torch.optim.Adafactor):
            count = int(any(p.dim() <= 1 for p in g["params"]))
        elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            count = 3 if g.get("amsgrad", False) else 2
        elif isinstance(optimizer, (torch.optim.Adamax, torch.optim.RAdam, torch.optim.NAdam, torch.optim.Adadelta)):
            count = 2
        elif isinstance(optimizer, (torch.optim.Adagrad, torch.optim.ASGD)):
            count = 1
        elif isinstance(optimizer, torch.optim.RMSprop):
            count = 1 + momentum + bool(g.get("centered", False))
        else:
            count = int(momentum)
        copies = max(copies, count)
    return copies


def splitter_state_copies(optimizer: torch.optim.Optimizer) -> int:
    """Parameter-sized copies of the optimizer's state the splitter takes before each step and holds until the
    step is recorded, in the parameters' dtype: Adadelta's accumulated update before its step (its update's
    numerator, which the step overwrites), 1; none for the other optimizers (0)."""
    return int(isinstance(optimizer, torch.optim.Adadelta))


def optimizer_state_values(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Values of per-parameter state the optimizer keeps for ``params`` (what training holds, and what a
    rolled-back step's copy of the optimizer's state restores): :func:`optimizer_state_copies` times
    their count, except Adafactor's, counted exactly: a vector's or 0-dim parameter's full variance (its
    numel), a matrix's or conv weight's row and column factors over its last two dims (n + m values per
    n × m slice; a full copy per parameter would count a model with one bias as if every weight had a
    variance of its own)."""
    if not isinstance(optimizer, torch.optim.Adafactor):
        return optimizer_state_copies(optimizer) * sum(p.numel() for p in params)
    total = 0
    for p in params:
        if p.dim() <= 1 or p.numel() == 0:
            total += p.numel()
        else:
            rows, cols = p.shape[-2], p.shape[-1]
            total += p.numel() // (rows * cols) * (rows + cols)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Bytes of the per-parameter state :func:`optimizer_state_values` counts, each parameter's in its own dtype
    (torch's optimizers keep their moments, buffers and sums like the parameter)."""
    if not isinstance(optimizer, torch.optim.Adafactor):
        return optimizer_state_copies(optimizer) * parameter_bytes(params)
    return sum(optimizer_state_values(optimizer, [p]) * p.element_size() for p in params)


def tangent_bytes(rows: int, params: list[torch.Tensor], row_bytes: int) -> int:
    """The pushed rows converted to the parameters' dtype (:func:`~genkernel.core.tracking.routes.push_rows`):
    ``rows`` copies of each parameter whose item size is not the splitter's rows' (``row_bytes`` per value), in its
    own dtype (``params``: the trained parameters)."""
    return rows * parameter_bytes(p for p in params if p.element_size() != row_bytes)


def check_bytes(num_params: int, partitions: int, row_bytes: int, linear_state: bool) -> int:
    """What the step's checks and the split hold besides the rows, in bytes: the real gradient in
    float64 and each partition's rounding gap (1 + Π parameter copies); with a linear state, the
    magnitudes it is checked against (committed, pending) and the rounding scale (three copies in
    the rows' dtype). The elementwise checks themselves run in kept block-sized buffers
    (``check_scratch``: :func:`~genkernel.core.tracking.checks.check_scratch_bytes`)."""
    return (1 + partitions) * num_params * 8 + (3 * num_params * row_bytes if linear_state else 0)


def _check_arguments(probes, *, state_dtype, group_state, gradient_route, contribution_route, memory_budget,
                     batch_size, **counts) -> None:
    """ValueError or TypeError naming the first argument of :func:`estimate_cost` that cannot be
    estimated (the tracker checks its own; a direct call would otherwise return nonsense numbers)."""
    if not isinstance(probes, tuple) or not probes or not isinstance(probes[0], torch.Tensor) or probes[0].dim() == 0:
        raise TypeError("probes must be a non-empty tuple of tensors [M, ...] (wrap a single tensor: (probes,))")
    if probes[0].shape[0] < 1:
        raise ValueError("probes are empty (M = 0): pass at least one probe")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int (or None: the probes' count), got {batch_size!r}")
    if state_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype!r}")
    choices = {"group_state": (group_state, GROUP_STATE_CHOICES),
               "gradient_route": (gradient_route, ("graph", "example", "factored")),
               "contribution_route": (contribution_route, ("auto", "jvp", "jacobian"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed} (the route the tracker resolved), got {value!r}")
    budget_ok = isinstance(memory_budget, numbers.Real) and not isinstance(memory_budget, bool)
    if not budget_ok or not 0 < memory_budget < math.inf:
        raise ValueError(f"memory_budget must be a positive, finite number of bytes, got {memory_budget!r}")


def forward_macs(shapes: list[BlockShape], fallback: int) -> float:
    """F: the multiply-adds of one example's forward through the linear and convolutional blocks'
    weights (:meth:`~genkernel.core.engine.factored.BlockShape.macs`: T·I·O each, no bias column)
    plus one per fallback parameter: the unit of :func:`factor_route_work`."""
    return float(sum(s.macs() for s in shapes) + fallback)


def route_forward(shapes: list[BlockShape], fallback: int, outside: float = 0.0) -> float:
    """The trained products of one example's forward (the estimate's unit less the frozen ones): the blocks'
    (:func:`forward_macs`) and the fallback parameters', the larger of ``outside`` (their products as the
    dispatcher counts them, :func:`hooked_forward_counts`: a raw weight in ``F.linear``, MultiheadAttention's
    ``in_proj_weight``, T multiply-adds per value at T positions) and one multiply-add per fallback value
    (:func:`forward_macs`' count for a parameter in no product: a prompt added to the input)."""
    return forward_macs(shapes, fallback) + max(float(outside) - fallback, 0.0)


def held_factor_bytes(shapes: list[BlockShape], fallback: int, *, batch: int, itemsize: int, form: str) -> int:
    """Bytes of the batch's layer factors that the factored (``form="lean"``) and sketched (``"outer"``) routes
    hold from step 1 to step 5 (:class:`~genkernel.core.engine.per_example.BatchFactors`, one cotangent), from
    the covering plan's blocks (:func:`~genkernel.core.engine.factored.block_shapes`), per example:

    - a linear or convolutional block of T positions, I inputs (weight columns, a convolution's unfolded patch
      C·k values, and a bias column) and O outputs: the outer form's ``a [T, I]`` and ``g [T, O]``, T·(I + O)
      values; "lean" keeps the per-example gradient, I·O values, where it materializes the block
      (:func:`~genkernel.core.engine.factors.lean_materializes`);
    - a norm block: its per-example gradients, P_block values;
    - an embedding: T int64 indices and ``g [T, D]``;

    times ``itemsize``, and the ``fallback`` parameters' per-example gradients, float64. A convolution's outer
    form holds k times its input (about 9x for 3x3 kernels): not a multiple of the activations."""
    per_example = 0
    for s in shapes:
        if s.kind in ("linear", "conv"):
            t, i, o = s.positions, s.inputs, s.outputs
            dense = form != "outer" and lean_materializes(t, i, o, 1)
            per_example += (i * o if dense else t * (i + o)) * itemsize
        elif s.kind == "embedding":
            per_example += s.positions * (8 + s.outputs * itemsize)
        else:
            per_example += s.parameters * itemsize
    return batch * (per_example + fallback * 8)


def factor_route_work(shapes: list[BlockShape], fallback: int, *, probes: int, batch: int, outputs: int, form: str,
                      itemsize: int, memory_budget: int, frozen: int = 0, frozen_skipped: int = 0,
                      capture_skipped: float = 0.0, fallback_skipped: float = 0.0,
                      outside: float = 0.0, outside_gradients: float | None = None,
                      input_gradients: float | None = None, fallback_gradients: float | None = None,
                      probe_checks: int = 1, batch_checks: int = 1, probe_output_chunks: int = 1) -> dict[str, float]:
    """The factored and sketched routes' work per step, in example-forwards (F multiply-adds: the
    blocks' :func:`forward_macs` and the ``frozen`` layers' outside them), from the covering plan's blocks
    (:func:`~genkernel.core.engine.factored.block_shapes`) and the ``fallback`` parameters outside
    them; ``form``: the batch factors' (:data:`~genkernel.core.engine.factors.FACTOR_FORMS`).
    ``frozen``: the multiply-adds of the Linear and convolution layers none of whose parameters is
    trained (:class:`GradientLayerCounts`), which every pass of the route runs forward, and a
    backward through where their input depends on a trained parameter (all but ``frozen_skipped``
    of them); counted in F, as a bare step's forward is (without them the parts were in forwards
    of the trained blocks alone: a rank-2 LoRA MLP's ratio 52 % high, 4.09 against 2.70 counted).
    ``capture_skipped`` and ``fallback_skipped``: the multiply-adds of the Linear and convolution
    layers whose input depends on a trained parameter, but on none of the blocks' (a capture's
    backward goes to the blocks' outputs alone: β_b = β less them), and on none of the fallback
    parameters (torch.func's passes for the fallback go to them alone: β_f = β less those);
    :func:`hooked_forward_counts` with the others held constant. ``outside``: the trained products outside
    the blocks (a fallback weight passed to ``F.linear`` or ``einsum``, ``nn.MultiheadAttention``'s
    ``in_proj_weight`` and ``out_proj.weight``; ``trainable_macs`` of :func:`hooked_forward_counts` less the
    blocks'), in F and in the weight share w (:func:`route_forward`), and their weight gradients in the
    fallback's backward passes; ``frozen`` holds every product
    none of whose operands is a trained weight, the ones between activations too (attention's QKᵀ and AV,
    whose two operands' gradients a backward forms: ``frozen_skipped`` less by them).
    ``outside`` is forward work, once per product (``macs - frozen`` less the blocks'); ``outside_gradients``
    (default ``outside``) the weight gradients of the trained operands outside the blocks, once per trained
    operand (``trainable_macs`` less the blocks': a product of two trained operands, learned query tokens through
    a Linear, ``B @ A`` of a LoRA-like pair, forms two gradients but is one product of a forward).
    ``input_gradients``: a backward's input gradients in multiply-adds
    (:attr:`GradientLayerCounts.input_gradients`, exact: outside the blocks too, a fallback first layer's input
    gradient is not formed); default the blocks' shapes' (:func:`input_gradient_share`).
    ``fallback_gradients``: the fallback parameters' own gradients in torch.func's passes to them
    (``trainable_macs`` of :func:`hooked_forward_counts` with the blocks' parameters held constant; default
    ``outside_gradients``). ``probe_checks``, ``batch_checks``: the extra example of each torch.func call that
    ``engine.reference.per_example`` runs alone to check the batched result, once per chunk of two or more
    (:func:`fallback_checks`; one probe per chunk, as a large d × P_fb Jacobian makes them: none), ``probe_checks``
    over the probes' row chunks and ``probe_output_chunks`` chunks of their outputs (a call per pair).

    Returns ``{part: example-forwards}``:

    - ``bare_step``: a backward forms the gradients of the inputs that depend on parameters (a
      share β of F: not the first trained layer's, nor a frozen layer's before it) and the weight
      gradients (the trained blocks' share w of F: 1 without frozen layers), so B (1 + β + w);
    - ``batch_factors``: the batch's totals and sizes from its factors, per example and block:
      T·I·O to form the block (lean form) and 2 P_block for its total and sizes; or T·I·O for the
      total from the factors and, for the sizes, T·I·O + P_block materialized
      (:func:`~genkernel.core.engine.factors.self_kernel_materializes`) or T²·(I + O) factored;
      with fallback parameters, their per-example gradients too, read from no factors whether or
      not the training pass is: a vmapped forward and backward of every example and of the first
      of each chunk once more (``engine.reference.per_example`` checks the batched result on it),
      (B + ``batch_checks``)(1 + β_f);
    - ``capture``: a capture pass of the batch's own when the training pass cannot be read, B (1 + β_b);
    - ``probe_factors``, per quadrature node: a forward and d output-batched backward passes to the
      blocks' outputs, M (1 + d β_b); with fallback parameters, their torch.func Jacobians besides (the
      sketched route's too), per chunk of the K outputs a forward and its backward passes of every probe and of
      the first of each chunk of probes once more, M K + ``probe_checks`` + (M + ``probe_checks`` / K) d β_f;
    - ``cross_kernels``, per node, the factored route's kernels between the probes' d outputs and
      the B examples, as :meth:`~genkernel.core.engine.factors.Factors.pair_kernel` forms them:
      materialized where either side is (:func:`~genkernel.core.engine.factors.lean_materializes`)
      or :func:`~genkernel.core.engine.factors.dense_pair_is_cheaper` says so, M·d·T·I·O to form
      the probes' gradients and M·B·d·P_block for the products, else M·B·T²·(I + d·O); fallback
      parameters: M·B·d·P_fallback (their Jacobians are in ``probe_factors``);
    - ``tangent``: one pushed row's tangent pass (a JVP of the trained parameters), β + w (not a
      part of the step by itself: the pushes count it per row).
    """
    m, n, d = probes, batch, outputs
    outside_gradients = outside if outside_gradients is None else outside_gradients
    trained = route_forward(shapes, fallback, outside)
    forward = trained + frozen
    if forward <= 0:  # (no blocks' products but frozen layers' remain a unit: BitFit's biases, w = 0 below)
        return {"bare_step": 3.0 * n, "batch_factors": 0.0, "capture": 1.0 * n, "probe_factors": m * (1.0 + 2.0 * d),
                "cross_kernels": 0.0, "tangent": 2.0}
    if input_gradients is not None:  # (the fallback values in no product count one multiply-add each in the unit,
        # route_forward: so does their input gradient, as the shapes' count had it; the exact count has none, and a
        # learned positional table's bare step was 23.54 for 24.0)
        input_gradients = float(input_gradients) + max(float(fallback) - float(outside), 0.0)
    back = input_gradient_share(shapes, fallback, forward, frozen_skipped, input_gradients)
    # the weight gradients: one per trained operand (the forward's ``trained`` counts a product once)
    weights = route_forward(shapes, fallback, outside_gradients) / forward
    sizes = cross = 0.0
    for s in shapes:
        t, i, o, p = s.positions, s.inputs, s.outputs, s.parameters
        if s.kind in ("linear", "conv"):
            materialized = lean_materializes(t, i, o, 1) if form == "lean" else False
            if materialized:  # formed once; its total and sizes read the P_block values
                sizes += t * i * o + 2 * p
            elif self_kernel_materializes(t, i, o, 1):  # the total from the factors, the sizes formed
                sizes += 2 * t * i * o + p
            else:
                sizes += t * i * o + t * t * (i + o)
            if materialized or dense_pair_is_cheaper(m, n, t, t, i, o, d, itemsize, memory_budget):
                cross += m * d * t * i * o + m * n * d * p
            else:
                cross += m * n * t * t * (i + d * o)
        elif s.kind == "embedding":
            sizes += t * t * o
            cross += m * n * t * t * d * o
        else:  # norm: materialized per-example gradients
            sizes += p
            cross += m * n * d * p
    # Fallback parameters (a prompt or a positional embedding added to the input, a scale vector): torch.func's
    # per-example gradients of the batch and Jacobians of the probes, backward passes to them alone, while the
    # captures' go to the blocks' outputs alone (a VPT model's prompt and head: the capture's backward is empty).
    block_back = max(back - capture_skipped / forward, 0.0)
    batch_fallback = probe_fallback = 0.0
    if fallback:
        fallback_back = max(back - fallback_skipped / forward, 0.0)
        # and, where they are a product's weight (``outside``: MultiheadAttention's in_proj_weight), its gradient
        # in every backward pass to them, as a trained block's weight share is in a bare step's
        fallback_back += (outside_gradients if fallback_gradients is None else fallback_gradients) / forward
        cross += m * n * d * fallback
        batch_fallback = (n + batch_checks) * (1.0 + fallback_back)
        chunks = max(probe_output_chunks, 1)
        probe_fallback = m * chunks + probe_checks + (m + probe_checks / chunks) * d * fallback_back
    return {"bare_step": n * (1.0 + back + weights), "batch_factors": n * sizes / forward + batch_fallback,
            "capture": n * (1.0 + block_back), "probe_factors": m * (1.0 + d * block_back) + probe_fallback,
            "cross_kernels": cross / forward, "tangent": back + weights}


def _fallback_passes(model: nn.Module, probes: tuple[torch.Tensor, ...], layers: GradientLayerCounts, fallback: int, *,
                     outputs: int, batch: int, param_bytes: int, memory_budget: int, probe_side: bool,
                     ) -> tuple[int, int, int | None, int, int]:
    """``(capture_skipped, fallback_skipped, fallback_gradients, probe_checks, batch_checks)`` of a model with
    ``fallback`` parameters outside its covering plan's blocks (``(0, 0, None, 1, 1)`` without: the defaults of
    :func:`factor_route_work`): which products' input gradients the captures' backward skips and which torch.func's
    passes to the fallback skip (two more hooked passes, each with one side held constant:
    :func:`hooked_forward_counts`; these routes refuse models whose passes move buffers or draw random numbers; a
    tracker estimates under analysis_mode, its RNG forked besides), the fallback parameters' own gradients in those
    passes (the products they are an operand of, once per such operand, the blocks' weights held constant), and the
    examples torch.func's calls check alone (:func:`fallback_checks`): over the probes' chunks, the captures'
    (``routes.probe_chunks``: :func:`~genkernel.core.engine.factored.capture_chunks`, one call per chunk of rows
    and chunk of outputs, only with ``probe_side``), and
    over the batch's, those of ``engine.gradients``' per-example gradients of the fallback (its chunks,
    :func:`~genkernel.core.engine.gradients.example_chunk`: the pass's activations and 2 × P_fb values an example)."""
    if not fallback:
        return 0, 0, None, 1, 1
    return per_architecture("fallback passes", model, probes,
                            (layers.input_gradients, outputs, batch, param_bytes, memory_budget, probe_side),
                            lambda: _measured_fallback_passes(model, probes, layers, outputs=outputs, batch=batch,
                                                              param_bytes=param_bytes, memory_budget=memory_budget,
                                                              probe_side=probe_side))


def _measured_fallback_passes(model: nn.Module, probes: tuple[torch.Tensor, ...], layers: GradientLayerCounts, *,
                              outputs: int, batch: int, param_bytes: int, memory_budget: int, probe_side: bool,
                              ) -> tuple[int, int, int | None, int, int]:
    """:func:`_fallback_passes`' passes, run."""
    plan = covering_plan(model, probes)
    block_params = {name: p for name, p in model.named_parameters() if p.requires_grad and name not in plan.fallback}
    one = tuple(t[:1] for t in probes)
    capture_skipped = layers.input_gradients - _remembered_counts(
        model, one, True, constants=plan.fallback)[3].input_gradients
    _, _, fallback_gradients, fallback_layers = _remembered_counts(model, one, True, constants=block_params)
    fallback_skipped = layers.input_gradients - fallback_layers.input_gradients
    # (a torch.func call per chunk of rows and chunk of outputs: each of two or more rows checks its first alone)
    row_sizes, output_chunks = capture_chunks(model, plan, probes, outputs, memory_budget)
    probe_checks = fallback_checks([s.stop - s.start for s in row_sizes]) * len(output_chunks) if probe_side else 0
    per_chunk = _fallback_chunk(model, probes, plan, param_bytes, memory_budget)
    batch_checks = chunked_checks(batch, per_chunk)
    return capture_skipped, fallback_skipped, fallback_gradients, probe_checks, batch_checks


def _fallback_chunk(model: nn.Module, probes: tuple[torch.Tensor, ...], plan, param_bytes: int,
                    memory_budget: int) -> int:
    """Examples per chunk of torch.func's per-example gradients of ``plan``'s fallback parameters alone
    (``engine.gradients._example_chunks``: :func:`~genkernel.core.engine.gradients.example_chunk` over them, the
    pass's activations an example and what it holds once as the engine takes them, :func:`_pass_measure`)."""
    sizes = [p.numel() for p in plan.fallback.values()]
    measured = _pass_measure(model, probes, plan.fallback)
    return example_chunk(memory_budget, sum(sizes), max(sizes, default=0), param_bytes, measured.activations,
                         measured.fixed_bytes)


def _block_shapes(model: nn.Module, probes: tuple[torch.Tensor, ...]) -> tuple[tuple[BlockShape, ...], int]:
    """:func:`~genkernel.core.engine.factored.block_shapes` once per architecture (:func:`per_architecture`; a
    tuple, so that no caller changes the shapes another is given)."""
    def measure() -> tuple[tuple[BlockShape, ...], int]:
        shapes, fallback = block_shapes(model, probes)
        return tuple(shapes), fallback

    return per_architecture("block shapes", model, probes, (), measure)


def _fallback_pass(model: nn.Module, probes: tuple[torch.Tensor, ...], param_bytes: int, memory_budget: int
                   ) -> tuple[int, int, ExamplePass]:
    """``(largest, chunk, measured)``: the covering plan's largest fallback parameter (elements), the examples per
    chunk of torch.func's per-example gradients of the fallback alone (:func:`_fallback_chunk`) and what that pass
    holds (:func:`_pass_measure`)."""
    plan = covering_plan(model, probes)
    largest = max((t.numel() for t in plan.fallback.values()), default=0)
    return (largest, _fallback_chunk(model, probes, plan, param_bytes, memory_budget),
            _pass_measure(model, probes, plan.fallback))


def _probe_captures(model: nn.Module, probes: tuple[torch.Tensor, ...], outputs: int, memory_budget: int
                    ) -> tuple[int, int]:
    """``(bytes, output chunks)``: the probes' largest capture at a node
    (:func:`~genkernel.core.engine.factored.probe_capture_bytes`) and how many chunks of the outputs the captures
    take, in the chunks of :func:`~genkernel.core.engine.factored.capture_chunks`."""
    plan = covering_plan(model, probes)
    chunked = capture_chunks(model, plan, probes, outputs, memory_budget)
    return probe_capture_bytes(model, plan, probes, outputs, chunked), len(chunked[1])


def _pass_measure(model: nn.Module, probes: tuple[torch.Tensor, ...], params: dict[str, torch.Tensor]) -> ExamplePass:
    """What the "example" route's pass over ``params`` sizes its chunks by, on the first probe: the engine's own
    :func:`~genkernel.core.engine.gradients.example_pass_measure` (the activations an example, the leaf outputs or
    what the pass is measured to hold where larger, and what it holds once whatever the chunk; one measure per
    model, input shapes and parameters, shared with the engine's). The training loss is not known here: a sum of
    squares of the output stands in for it, where the engine measures with its own (a loss heavier than that is
    counted in the engine's chunks, within the budget, and under-counted here by at most the budget)."""
    return example_pass_measure(model, functional_model(model, None, flatten=False),
                                {name: p.detach() for name, p in params.items()}, tuple(t[:1] for t in probes))


def factored_chunk_bytes(model: nn.Module, probes: tuple[torch.Tensor, ...], rows: int, partitions: int
                         ) -> tuple[int, int]:
    """``(one, two)``: what the factored gradient route's first two chunks (of one and two examples) hold at their
    peaks, on copies of the first probe with ``rows`` group rows in ``partitions`` partitions
    (:func:`~genkernel.core.engine.gradients.factored_chunk_peaks`, a sum of squares of the output standing in for
    the loss): what its chunks are sized by (:func:`~genkernel.core.engine.gradients.factored_chunk_sizes`). One
    measure per architecture, probe shape and rows (push_memory's key); (0, 0) where the pass raises, not kept (the
    next estimate measures again, as a fresh process would)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        return 0, 0
    per_partition = max(1, min(3, rows // max(partitions, 1)))  # (the rows the measure lays its examples in)
    example = tuple(t[:1] for t in probes)
    peaks = per_architecture("factored chunks", model, probes, (per_partition, partitions),
                             lambda: factored_chunk_peaks(model, params, example, rows, partitions))
    return (0, 0) if peaks is None else peaks


def equal_chunks(batch: int, chunk: int) -> list[int]:
    """``batch`` examples in chunks of ``chunk`` (at least one), the last one short: the "example" route's."""
    chunk = max(1, min(chunk, batch))
    full, remainder = divmod(batch, chunk)
    return [chunk] * full + ([remainder] if remainder else [])


def chunked_checks(batch: int, chunk: int) -> int:
    """:func:`fallback_checks` of ``batch`` examples in chunks of ``chunk`` (the last one short)."""
    return fallback_checks(equal_chunks(batch, chunk))


def fallback_checks(chunk_sizes: list[int]) -> int:
    """Examples torch.func's per-example calls run a second time, alone, over chunks of ``chunk_sizes`` examples:
    ``engine.reference.per_example`` checks each batched call's first example against a pass of it alone where the
    chunk has two or more (one per such chunk; a chunk of one is not checked). The probes' fallback Jacobians on the
    factored and sketched routes run in the captures' chunks (one probe per chunk where the d × P_fb Jacobian is
    large: a DCGAN generator's, d = 64 × 64, P_fb its every weight, and no check at all, which the estimate counted
    as one whole Jacobian more: M + 1 for M, +22.6 % on the factored route's ratio)."""
    return sum(1 for size in chunk_sizes if size >= 2)


def row_sum_products(rows: int, partitions: int, chunks: list[int]) -> float:
    """Multiply-adds per parameter value of summing per-example gradients into ``rows`` group rows in
    ``chunks`` of examples (their sizes, in order), as :func:`~genkernel.core.engine.gradients.add_rows` does:
    every row (an in-place product over all of them, whatever the membership's zeros) where a chunk reaches at
    least a sixth of them, else the rows it reaches; a chunk of b examples reaches at most ``partitions`` × b
    rows."""

    def products(b: int) -> float:
        reached = min(rows, partitions * b)
        return float((rows if 6 * reached >= rows else reached) * b)

    return sum(products(b) for b in chunks if b)


def outer_row_products(rows: int, partitions: int, chunks: list[int]) -> float:
    """:func:`row_sum_products` for a weight whose rows are summed from its factors, a Linear layer's on one
    position (``engine.gradients._add_outer_rows``: Σ_n W[r, n] g_n a_nᵀ over the rows a chunk reaches alone, all
    of them in place only where it reaches every one): a chunk of b examples, ``partitions`` × b rows at most, b
    multiply-adds a value for each row reached."""
    return float(sum(min(rows, partitions * b) * b for b in chunks if b))


def dense_gradient_work(shapes: list[BlockShape], fallback: int, *, batch: int, rows: int, partitions: int,
                        route: str, chunks: list[int], forward: float, weight_share: float,
                        frozen_skipped: int = 0, input_gradients: float | None = None,
                        fallback_back: float | None = None, batch_checks: int = 0, capture_skipped: float = 0.0,
                        fallback_chunk: int | None = None) -> float:
    """Example-forwards of the dense route's group gradients on a per-example ``route``, from the
    covering plan's blocks (:func:`~genkernel.core.engine.factored.block_shapes`) and the
    ``fallback`` parameters outside them; ``forward``: one example's forward in multiply-adds
    (the unit; :func:`example_counts`), ``weight_share``: the trained weights' share of it.

    Routes (:class:`~genkernel.core.tracking.routes.DenseRoute`):

    - "training": the training pass's layer factors (``TrainingCapture``, compact form): no pass;
    - "factored": a capture pass of its own, a forward and its input gradients, B (1 + β);
    - "example": vmapped per-example gradients of a second forward and backward, B (1 + β + share), and the first
      example of each chunk of two or more (``chunks``: the route's chunks of examples, their sizes) once more (``engine.reference.per_example`` checks
      the batched result on it alone: :func:`fallback_checks`; 4 chunks of 2 left out were 5-6 % of a grouped
      convolution net's tracked step at a 60 kB budget, and the one chunk of a micro-batched step, which reads no
      training pass, 1-2 %);

    β: the input gradients' share of a forward, every layer's but those the blocks' positions whose
    input depends on no trained parameter skip and the frozen layers' before every trained one
    (``frozen_skipped`` multiply-adds; :func:`input_gradient_share`, as :func:`factor_route_work`
    counts them: the first layer forms none), or ``input_gradients`` multiply-adds where given (exact: a
    fallback first layer's too).

    Besides (the routes' own products, which a pass count leaves out):

    - per-example gradients formed from the factors (not on "example": its backward forms them),
      T·I·O (:meth:`~genkernel.core.engine.factored.BlockShape.macs`) per example and linear or
      convolutional block at T > 1 positions, materialized or not
      (:func:`~genkernel.core.engine.factors.self_kernel_materializes` decides only the layout);
      at one position the rows are summed from the outer product itself;
    - the rows: every block's and fallback parameter's per-example gradients summed into the
      group rows, :func:`row_sum_products` × P;
    - the fallback parameters ("training", "factored"): a vmapped forward and backward of every
      example (torch.func), B (1 + β), and their weight gradients, B × P_fallback; or, with
      ``fallback_back`` (β_f + w_f: the backward to the fallback parameters alone, their input gradients and
      their own gradients, the products they are an operand of, in forwards), (B + ``batch_checks``)(1 + β_f + w_f),
      the extra examples ``engine.reference.per_example`` checks alone (:func:`fallback_checks`): a grouped first
      convolution's weight gradients are its products', not one multiply-add per value (dense ratio 4 % low);
      ``capture_skipped``: the input gradients (multiply-adds) the "factored" capture pass does not form, the fallback
      held constant there (a fallback first layer: the next block's input gradient too; its ratio was 4.1 % high);
      ``fallback_chunk``: the examples a chunk of that torch.func pass holds, over which the fallback's rows are
      summed (:func:`row_sum_products` with its chunks, not the blocks' nor, read from the training pass, the whole
      batch: an MLP whose middle weight is a raw ``F.linear`` parameter was 23 % low at a 200 kB budget, 32 % high
      at 150 kB, ``tests/test_cost_second_read.py``).

    Measured against torch's operation count of a tracked step (in-place products counted) on an
    MLP, a small CNN, the tiny UNet2DModel and a cross-attention UNet2DConditionModel: the row
    sums are most of it on an MLP (R·B·P against the step's 3·B·F); an estimate of one forward per
    example for the training pass's factors was up to 4x low (``tests/test_cost_dense_route.py``)."""
    if route not in ("training", "factored", "example"):
        raise ValueError(f"route must be 'training', 'factored' or 'example', got {route!r}")
    unit = max(forward, 1.0)
    back = input_gradient_share(shapes, fallback, unit, frozen_skipped, input_gradients)
    parameters = sum(s.parameters for s in shapes) + fallback
    products = row_sum_products(rows, partitions, chunks) * parameters
    if route != "example":  # (a Linear weight on one position: summed from its factors over the rows reached)
        outer = sum(s.parameters - (s.outputs if s.bias else 0) for s in shapes if s.kind == "linear" and s.positions == 1)
        products += (outer_row_products(rows, partitions, chunks) - row_sum_products(rows, partitions, chunks)) * outer
    if route == "example":  # (and the first example of each chunk of two or more once more: per_example's check)
        return (batch + fallback_checks(chunks)) * (1.0 + back + weight_share) + products / unit
    if fallback and fallback_back is not None and fallback_chunk is not None:  # (the fallback's rows: its own chunks)
        products += (row_sum_products(rows, partitions, equal_chunks(batch, fallback_chunk))
                     - row_sum_products(rows, partitions, chunks)) * fallback
    formed = sum(s.macs() for s in shapes if s.kind in ("linear", "conv") and s.positions > 1)
    passes = batch * (1.0 + max(back - capture_skipped / unit, 0.0)) if route == "factored" else 0.0
    if fallback and fallback_back is not None:
        passes += (batch + batch_checks) * (1.0 + fallback_back)
    elif fallback:
        passes += batch * (1.0 + back)
        formed += fallback
    return passes + (batch * formed + products) / unit


def input_gradient_share(shapes: list[BlockShape], fallback: int, forward: float | None = None,
                         frozen_skipped: int = 0, input_gradients: float | None = None) -> float:
    """β: a backward's input gradients as a share of one forward (``forward`` multiply-adds; default
    the blocks' own, :func:`forward_macs`): the blocks' at the positions whose input depends on a
    trained parameter and one per fallback parameter, and, where ``forward`` counts layers outside
    the blocks (frozen ones), theirs too, but for ``frozen_skipped`` multiply-adds of them (the frozen
    layers whose input depends on no trained parameter: before the first trained one,
    :attr:`GradientLayerCounts.frozen_skipped`), which a backward does not go through.
    The same share is a JVP's input tangents through the weights.

    ``input_gradients``: the exact multiply-adds (:attr:`GradientLayerCounts.input_gradients`, the dispatcher's
    products operand by operand), taken instead of the blocks' shapes where given: outside the blocks, a fallback
    product (a grouped or transposed convolution, a raw weight in ``F.linear``) whose input depends on no trained
    parameter forms no input gradient either, which the shapes' count formed (a grouped first convolution: a bare
    step of 24.0 example-forwards predicted against 21.4 counted)."""
    unit = forward_macs(shapes, fallback) if forward is None else max(forward, forward_macs(shapes, fallback))
    if unit <= 0:
        return 1.0
    if input_gradients is not None:  # (exact multiply-adds: over the forward given, which the fallback's one multiply-add
        # a value, forward_macs' count for a parameter in no product, would otherwise outgrow on the dense route: a
        # learned positional table added to the input, a bare step 1.9 % low)
        return max(float(input_gradients), 0.0) / (float(forward) if forward is not None and forward > 0 else unit)
    skipped = sum(s.macs() - s.macs(s.input_gradient_positions) for s in shapes) + frozen_skipped
    return max(unit - skipped, 0.0) / unit


def sketch_work(shapes: list[BlockShape], fallback: int, rows: float, sketch_dim: int, preconditioned: bool,
                forward: float | None = None) -> float:
    """Example-forwards (``forward`` multiply-adds, default the blocks' :func:`forward_macs`; the
    estimate's unit adds the frozen layers', :func:`factor_route_work`) of sketching ``rows`` per-example gradients to
    ``sketch_dim`` numbers (:class:`~genkernel.core.engine.projections.ParameterProjection`).

    Per row: a weight matrix by the route
    :func:`~genkernel.core.engine.projections.weight_projection_route` takes, or, ``preconditioned``
    (the probes' side under Adam, whose preconditioner D is a tensor), every block's matrix formed
    (T·I·O) and projected (O·I·k); every other parameter (biases, norms, embeddings, the fallback)
    is projected as a vector, P·k. Products only, as the unit and torch's operation count have them:
    the routes' elementwise products (the factors route's (r·g)(s·a), T·k; the matrix route's r ⊙ (G sᵀ),
    O·k) are not counted: beside a LoRA adapter's rank-r side (I = r) they are as large as its products
    (a rank-2 LoRA MLP's sketches were counted 24.1 example-forwards for 20.4)."""
    forward = forward_macs(shapes, fallback) if forward is None else forward
    if forward <= 0:
        return 0.0
    k, macs = sketch_dim, float(fallback * sketch_dim)
    for s in shapes:
        if s.kind not in ("linear", "conv"):
            macs += s.parameters * k
            continue
        t, i, o = s.positions, s.inputs - s.bias, s.outputs
        route = "matrix" if preconditioned else weight_projection_route(t, i, o, k)
        macs += t * k * (i + o) if route == "factors" else t * i * o + o * i * k
        macs += s.outputs * k * s.bias
    return rows * macs / forward


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str) -> int:
    """Bytes on ``device`` of the trainable parameters, their gradients and the optimizer's state
    tensors as they exist now (before the first step: the parameters alone)."""
    device = torch.device(device)
    tensors = {}
    for p in model.parameters():
        if p.requires_grad:
            tensors[id(p)] = p
            if p.grad is not None:
                tensors[id(p.grad)] = p.grad
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tensors[id(value)] = value
    return sum(t.numel() * t.element_size() for t in tensors.values() if _same_device(t.device, device))


def frozen_bytes(model: nn.Module, device: torch.device | str) -> int:
    """Bytes on ``device`` of ``model``'s parameters that do not require grad (a LoRA fine-tune's
    base, a frozen encoder): no part of the tracked step, but on the device while it runs. Each
    tensor once (tied weights), and none that a trainable parameter shares storage with."""
    device = torch.device(device)
    here = [p for p in model.parameters() if _same_device(p.device, device)]
    if device.type == "meta":  # no storage to tell shared weights by
        return sum(p.numel() * p.element_size() for p in here if not p.requires_grad)
    trainable = {p.untyped_storage().data_ptr() for p in here if p.requires_grad and p.numel()}
    return sum(p.numel() * p.element_size() for p in here
               if not p.requires_grad and not (p.numel() and p.untyped_storage().data_ptr() in trainable))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current device) name the same device here."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return (a.index if a.index is not None else torch.cuda.current_device()) == (
        b.index if b.index is not None else torch.cuda.current_device())


def _peak_saving(estimate: CostEstimate, factors: dict[str, float]) -> int:
    """How far the peak (:attr:`CostEstimate.total_bytes`) falls with each part in ``factors`` scaled by its factor:
    nothing where those parts are not in the peak phase nor held throughout."""
    memory = {part: int(value * factors.get(part, 1.0)) for part, value in estimate.memory.items()}
    return estimate.total_bytes - replace(estimate, memory=memory).total_bytes


def _cheaper_options(estimate: CostEstimate, group_state: str, state_dtype: torch.dtype, all_float32: bool,
                     allowed: tuple[str, ...], switchable: tuple[str, ...],
                     alternatives: dict[str, int | None] | None = None) -> list[str]:
    """What would make the step fit or run faster, each memory option with what it would save
    of the peak (the parts it changes, scaled in the phases they are in: the group arrays scale with
    the rows, the probes' pushes with the probes; a part outside the peak phase saves nothing), only
    where it applies and its setting is in ``allowed``; other group states only those in
    ``switchable`` (built for this optimizer and model). ``alternatives``: ``{group state: its whole estimate's
    total}`` (None where it could not be made) where known (:func:`estimate_cost` makes them): another group state
    is named only where its estimate is below this one, with its total (its own parts, the sketches, the
    projection, the batch's factors, can outweigh the group arrays it spares: "at most" stayed true where the
    sketched route's peak was 1.6x the dense one's)."""
    options = []
    settings, memory = estimate.settings, estimate.memory
    gib = lambda value: f"{value / GiB:.2f} GiB"  # noqa: E731

    def at_most(parts: tuple[str, ...]) -> str:
        """The parts' bytes and the most their removal lowers the peak by."""
        size = sum(memory.get(k, 0) for k in parts)
        return f"{gib(size)}; the peak falls by at most {gib(_peak_saving(estimate, dict.fromkeys(parts, 0.0)))}"

    group_keys = ("group_gradients", "group_state", "group_updates", "ema")
    state_dtype_keys = tuple(k for k in group_keys if k != "ema")  # the EMA ledger's arrays are float64 whatever it is
    # What the other group states also spare: the P-sized rows pushed through the probes (their pushes, and their
    # copies in the parameters' dtype). Left out, "at most" was below the fall they give (plain SGD, 20 groups:
    # "at most 22.8 MiB" for factored, which took 29.7 MiB off the peak).
    routed_keys = group_keys + ("push_tangents", "probe_pushes")
    ledger_keys = ("ledgers", "step_contributions")
    rows = max(int(settings["rows"]), 1)
    if rows > 1 and "groups" in allowed:
        # (the rows pushed through the probes scale with them too: left out, 30.5 MiB came off a peak said to fall by
        # at most 22.9 MiB, one group for 20)
        scaled = routed_keys + ledger_keys if group_state == "dense" else ledger_keys
        options.append(f"fewer groups (now {rows} rows over all partitions: fewer bins or control partitions, "
                       f"examples grouped by class or cluster; the group arrays and ledgers scale with them: "
                       f"{at_most(scaled)})")
    def lowers(state: str) -> bool:
        """Whether group_state=``state`` lowers the estimate (unknown without ``alternatives``: as before)."""
        if alternatives is None:
            return True
        total = alternatives.get(state)
        return total is not None and total < estimate.total_bytes

    def whole(state: str) -> str:
        """The whole estimate with group_state=``state``, where known."""
        total = None if alternatives is None else alternatives.get(state)
        return "" if total is None else f"; the whole estimate {gib(total)} against {gib(estimate.total_bytes)} now"

    if group_state == "dense":
        # Neither route keeps the per-group rows an EMA ledger is built from (tracking.ema).
        if "group_state" in allowed and not settings.get("ema") and "factored" in switchable and lowers("factored"):
            options.append("group_state='factored' (plain SGD: no per-group copies at all, each example's "
                           "contribution a cross kernel of its layer factors with the probes': most of the group "
                           f"arrays and their pushes' {at_most(routed_keys)}{whole('factored')}; it needs a "
                           "per-example loss)")
        if "group_state" in allowed and not settings.get("ema") and "sketched" in switchable and lowers("sketched"):
            options.append("group_state='sketched' (k-dimensional sketches of each group's state instead of P-sized "
                           f"copies: most of the group arrays and their pushes' {at_most(routed_keys)}"
                           f"{whole('sketched')})")
        if "state_dtype" in allowed and state_dtype == torch.float64 and all_float32:
            # (the pushed rows then need no copy in the parameters' dtype: push_tangents go; left out, the fall was
            # understated by them, 11.4 MiB said where 16.0 MiB came off)
            halved = _peak_saving(estimate, {**dict.fromkeys(state_dtype_keys, 0.5), "push_tangents": 0.0})
            options.append(f"state_dtype=torch.float32 (halves the group arrays of a float32 model: the peak falls "
                           f"by {gib(halved)}; on GPU float32 is also much faster)")
    if "probes" in allowed:
        options.append(f"fewer probes (now {settings['probes']}; their pushes and the ledgers: "
                       f"{at_most(('probe_pushes', 'probe_captures') + ledger_keys)})")
    if "window" in allowed:
        options.append("a shorter tracked window (track steps a..b, then stop paying: time, not memory per step)")
    if ("quadrature" in allowed and not math.isinf(estimate.ratio) and estimate.ratio > 10 and group_state == "dense"
            and settings.get("quadrature_nodes", 1) > 1):
        options.append("quadrature='midpoint' (one node) if a larger residual is acceptable")
    return options


# The memory parts a tracker's step frees before the next, its analysis phase (its group gradients and updates,
# checks, pushes, step contributions, held factors, an EMA update's sync; the training records are read into the
# group gradients before it): what runs between steps (an analyzer's kernel records and own passes) has them as
# room, beside what the tracker keeps from step to step.
# The step's temporaries an EMA ledger's sync takes as room (its part ``ema_sync`` is its excess over them).
EMA_SYNC_REPLACES = ("group_gradients", "group_updates", "probe_pushes", "push_tangents")
STEP_TEMPORARIES = ("group_gradients", "group_updates", "checks", "push_tangents", "witnesses", "probe_pushes",
                    "step_contributions", "held_factors", "probe_captures", "ema_sync")


def _beside_every_phase(phases: dict[str, tuple[str, ...]], part: str) -> dict[str, tuple[str, ...]]:
    """``phases`` with ``part`` in each (a between-steps peak counted as its excess over the analysis phase's parts,
    :data:`STEP_TEMPORARIES`: the total grows by it whichever phase is largest, as a part held throughout would)."""
    return {name: (*parts, part) for name, parts in phases.items()}


# Modules whose training-mode forward subtracts a mean over a set of values (BatchNorm and InstanceNorm, GroupNorm,
# LayerNorm): a parameter that shifts that whole set alike (a bias before them) has a gradient that is rounding noise
# in float32, and the tracker searches for such parameters (tracking.null_params) on a float64 copy of the model.
NULL_SHIFT_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def null_search_bytes(model: nn.Module, params: list[torch.Tensor], probes: int, activation_elements: float) -> int:
    """Bytes of the structurally null parameters' search (:func:`~genkernel.core.tracking.null_params.structurally_null`),
    a transient peak at the first step with a rounding-level gradient, where it can run: a trained parameter coarser
    than float64 and a module of :data:`NULL_SHIFT_NORMS`; else 0. The module's deep copy (every parameter and
    buffer, in its own dtype, then in float64), the two float64 passes' gradients held together and the backward's
    own (3 × 8 bytes per trained value) and the float64 activations of the first ``NULL_PROBES`` probes. Measured
    (LiveBytes): 0.72-0.93 of this on MLPs and conv nets with BatchNorm of 7e3-2e6 parameters, but 1.11-1.14 of it on
    conv nets with GroupNorm (under-counted: a strict xfail in tests/test_read42b.py); uncounted before (7.9-27
    times the float32 parameters' bytes)."""
    from .tracking.null_params import NULL_PROBES  # (here: tracking imports this module)

    coarse = any(p.is_floating_point() and torch.finfo(p.dtype).eps > torch.finfo(torch.float64).eps for p in params)
    if not coarse or not any(isinstance(module, NULL_SHIFT_NORMS) for module in model.modules()):
        return 0
    values = [*model.parameters(), *model.buffers()]
    copy = sum(t.numel() * (8 + (t.element_size() if t.is_floating_point() else 0)) for t in values)
    trained = sum(p.numel() for p in params)
    return int(copy + 3 * 8 * trained + 8 * activation_elements * min(probes, NULL_PROBES))


def step_record_bytes(probes: int, outputs: int, rows: int, partitions: int) -> int:
    """Bytes of the recorded step a tracker hands its listeners (:class:`~genkernel.core.tracking.StepContributions`,
    held by ``track`` until they return), float64: every partition's contributions with the rest row in one
    ``[M, R + 1, d]`` block, a sketch error per partition, the rest and the step's residual, ``[M, d]`` each:
    ``8 M d (R + 3 + partitions)``; and the step's split update (the estimate's ``group_updates``, counted by that
    part). Counted (a walk of the result's tensors) on the 64×64 DCGAN generator's tracker, M = 128, R = 2, one
    partition: 72 MiB, 6 × 12 MiB, beside the updates. A listener's own work (an analyzer's kernel record, its
    bookkeeping) runs beside it: the "listener" phase (:func:`with_kernel_records`, :func:`with_analysis_passes`)."""
    return 8 * probes * outputs * (rows + 3 + partitions)


def _step_record(tracker_cost: CostEstimate) -> int:
    s = tracker_cost.settings
    return step_record_bytes(int(s.get("probes", 0)), int(s.get("outputs", 0)), int(s.get("rows", 0)),
                             int(s.get("partitions", 1)))


def with_kernel_records(tracker_cost: CostEstimate, record: dict[str, Any], every: int) -> CostEstimate:
    """``tracker_cost`` with an analyzer's kernel records added (a new estimate; ``tracker_cost`` is not changed).

    ``record``: one record's ``{"work": example-forwards, "bytes": its peak, "states": n·G, "sketch": V or None}``
    (:meth:`genkernel.diffusion.NoiseLevelAnalyzer.kernel_record_cost`); ``every``: tracked steps per record (0:
    only the records at the start and the end). Work part ``kernel_records``: ``record["work"] / every`` per
    tracked step; the records at the start and end, ``2 × record["work"]`` in all, are one-off
    (``settings["kernel_record_once"]``), outside the per-step ratio. Memory part ``kernel_record``: the record's
    peak less the step's temporaries (the parts a step frees before the next: its group gradients and updates,
    checks, pushes, step contributions, held factors, training records, an EMA update's sync): a record runs
    between steps, beside what the tracker keeps from step to step (its group state, ledgers, parameter copies,
    EMA ledger, projection, check scratch, and the training step's arrays, counted whole), so the total bounds
    both peaks, the step's and the record's. (Less the whole analysis memory, the kept arrays were counted as room
    for the record: a record within the analysis memory but larger than the temporaries was short by the kept
    arrays, up to their size.) A record every ``every`` steps runs in the tracker's listener, while ``track`` still
    holds the recorded step (:func:`step_record_bytes`): phase ``"listener"``, that record (``step_record``, and its
    split update, ``group_updates``) and the
    part of the record the excess leaves out (``kernel_record_in_step``, the record up to the temporaries), so that
    the total bounds held + step record + record (counted before by its excess alone, as if the step's arrays were
    freed). The cheaper options name the analyzer's kernel settings when the record costs more
    than a tenth of a tracked step or adds memory."""
    work = dict(tracker_cost.work)
    work["kernel_records"] = record["work"] / every if every else 0.0
    memory = dict(tracker_cost.memory)
    freed = sum(int(tracker_cost.memory.get(part, 0)) for part in STEP_TEMPORARIES)
    memory["kernel_record"] = max(0, int(record["bytes"]) - freed)
    phases = dict(tracker_cost.phases)
    if every and phases:
        memory["step_record"] = _step_record(tracker_cost)
        memory["kernel_record_in_step"] = min(int(record["bytes"]), freed)
        phases["listener"] = ("step_record", "group_updates", "kernel_record_in_step")
    settings = dict(tracker_cost.settings)
    settings.update(kernel_record_work=float(record["work"]), kernel_record_bytes=int(record["bytes"]),
                    kernel_every=int(every), kernel_record_once=2.0 * float(record["work"]),
                    kernel_states=int(record["states"]), kernel_sketch=record["sketch"])
    estimate = CostEstimate(memory, tracker_cost.available, work, tracker_cost.bare_step, tracker_cost.held, settings,
                            list(tracker_cost.cheaper), _beside_every_phase(phases, "kernel_record"))
    tracked_step = tracker_cost.bare_step + sum(tracker_cost.work.values())
    if (memory["kernel_record"] or estimate.peak_phase == "listener"
            or record["work"] > 0.1 * tracked_step * max(every, 1)):
        directions = record["sketch"]
        estimate.cheaper.append(
            f"kernel records ({record['states']} states, {'exact' if directions is None else f'{directions} output directions'}: "
            f"{record['work']:.0f} example-forwards and {record['bytes'] / GiB:.2f} GiB each): fewer kernel_points (its work "
            "grows with the square of the states), kernel_sketch=V with fewer output directions, a larger kernel_every "
            "(or kernel_every=0: records at the start and end only), or a smaller memory_budget (the engine's chunks)")
    return estimate


def with_analysis_passes(tracker_cost: CostEstimate, passes: dict[str, Any]) -> CostEstimate:
    """``tracker_cost`` with an analyzer's own passes added (a new estimate; ``tracker_cost`` is not changed), as
    :func:`with_kernel_records` adds kernel records: the passes an analyzer runs besides its tracker's step (the GAN
    analyzer's geometry w = ∇_x ℓ_G(D(x)) of the batch and the probes, its kernel-smoothed field:
    :meth:`genkernel.gan.GANKernelAnalyzer.analysis_pass_cost`).

    ``passes``: ``{"work": {part: example-forwards per tracked step, amortized}, "once": {part: example-forwards run
    once, at the first step}, "bytes": the largest pass's peak, "cheaper": [options in words], "cheaper_memory": [...],
    "bare_step": example-forwards, "settings": {...}}``, in the tracker's unit (one example's forward through its
    model); ``bare_step``: work of a bare training step outside the tracker's model, added to the estimate's bare
    step (a GAN generator step's loss through D). Work: the parts added to
    the estimate's (a name the tracker's estimate has already is refused: ValueError); the one-off parts go to
    ``settings["analysis_once"]``, outside the per-step ratio. Memory part ``analysis_passes``: the peak less the
    step's temporaries (the parts a step frees before the next, :func:`with_kernel_records`' list: the passes run
    before or between the tracker's steps, beside what it keeps from step to step, as a kernel record does), 0 where
    they hold it. ``passes["cheaper"]`` is added to the cheaper options when the passes add memory or more than a
    tenth of a tracked step's work, ``passes["cheaper_memory"]`` (options that save memory alone) when they add
    memory.

    ``passes["held"]``: bytes the analyzer keeps from step to step (part ``analysis_state``, in no phase: held
    throughout); ``passes["listener"]``: the peak its listener (bookkeeping after each recorded step) allocates
    while ``track`` holds the recorded step: phase ``"listener"``, ``step_record`` (:func:`step_record_bytes`), its
    ``group_updates`` and ``analysis_listener``. Both were uncounted: the GAN analyzer's, 0.44 of its measured peak
    on the 64×64 DCGAN at M = 128."""
    if not isinstance(passes, dict) or not isinstance(passes.get("work"), dict):
        raise TypeError("passes must be a dict with 'work' ({part: example-forwards per step}), 'once', 'bytes'")
    clash = sorted(set(passes["work"]) & set(tracker_cost.work))
    if clash:
        raise ValueError(f"the analyzer's work parts {clash} have the tracker's names: name them apart")
    work = dict(tracker_cost.work)
    work.update({part: float(value) for part, value in passes["work"].items()})
    memory = dict(tracker_cost.memory)
    peak = int(passes.get("bytes", 0))
    freed = sum(int(tracker_cost.memory.get(part, 0)) for part in STEP_TEMPORARIES)
    memory["analysis_passes"] = max(0, peak - freed)
    phases = dict(tracker_cost.phases)
    if int(passes.get("held", 0)):
        memory["analysis_state"] = int(passes["held"])
    if int(passes.get("listener", 0)) and phases:
        memory["step_record"] = _step_record(tracker_cost)
        memory["analysis_listener"] = int(passes["listener"])
        phases["listener"] = ("step_record", "group_updates", "analysis_listener")
    settings = dict(tracker_cost.settings)
    settings.update(passes.get("settings") or {})
    settings.update(analysis_once={part: float(v) for part, v in (passes.get("once") or {}).items()},
                    analysis_pass_bytes=peak)
    bare = tracker_cost.bare_step + float(passes.get("bare_step", 0.0))
    settings["analysis_bare_step"] = float(passes.get("bare_step", 0.0))
    estimate = CostEstimate(memory, tracker_cost.available, work, bare, tracker_cost.held, settings,
                            list(tracker_cost.cheaper), _beside_every_phase(phases, "analysis_passes"))
    tracked_step = tracker_cost.bare_step + sum(tracker_cost.work.values())
    adds = bool(memory["analysis_passes"] or estimate.peak_phase == "listener")
    if adds or sum(passes["work"].values()) > 0.1 * tracked_step:
        estimate.cheaper.extend(passes.get("cheaper") or [])
    if adds:
        estimate.cheaper.extend(passes.get("cheaper_memory") or [])
    return estimate


__all__ = [
    "COST_OPTIONS", "CostEstimate", "EXAMPLE_PASS_ACTIVATIONS", "PUSH_ROW_ACTIVATIONS", "TRAINING_PARTS", "available_memory", "cgroup_free_memory",
    "GROUP_STATE_CHOICES", "GRAPH_ROW_ACTIVATIONS", "GRAPH_ROW_LARGEST_OUTPUTS", "check_bytes", "cost_options", "graph_row_bytes", "probes_couple", "witness_counts", "WITNESS_COUNTS", "estimate_cost", "factor_route_work", "forward_macs", "held_bytes", "ledger_bytes", "linear_state_rows",
    "frozen_bytes", "GradientLayerCounts", "gradient_layer_counts", "hooked_forward_counts", "optimizer_state_copies", "optimizer_state_values", "plain_hyperparameter", "plain_sgd", "projection_bytes", "push_pass_bytes", "push_pass_shape", "push_route", "reads_training_pass",
    "sketch_temporary_bytes", "sketch_work", "dense_gradient_work", "chunked_checks", "fallback_checks", "input_gradient_share", "row_sum_products", "sketchable", "splitter_state_copies",
    "tangent_bytes", "optimizer_state_bytes", "equal_chunks", "factored_chunk_bytes", "training_pass_bytes", "bare_step_forwards", "example_counts", "with_kernel_records",
    "with_analysis_passes",
]
