"""How much a float32 step's own gradient rounds: the gradient check's allowance for long reductions.

The tracker's gradient check (``PathKernelTracker._check_gradients``) compares, parameter by
parameter, the real gradient the optimizer steps on with the sum of the group rows, to ``rtol``
(1e-5 for float32, about 168 unit roundoffs) of their magnitudes. That tolerance does not grow with
the length of the reductions a gradient is made of, and a float32 kernel can round a long one far
past it: oneDNN's convolution backward sums a conv bias's gradient over batch × height × width
positions (131072 at 32 examples of 64×64) in an order whose rounding reached 600 unit roundoffs of
the magnitudes summed, while the rows, each summed in other orders, rounded 20 times less. The
check refused correct steps (a 4-channel conv net at 64 examples of 64×64: 5 seeds in 6, on the
dense graph and example routes alike). No bound from the magnitudes alone would do: the
deterministic one, (N − 1) u Σ|terms|, needs the terms (not at hand for any parameter of any
layer) and would pass a 1e-3 error of such a parameter.

So the check measures the rounding instead: the batch's own backward taken at two seed scales
that are no power of two apart, divided back (:func:`~genkernel.core.engine.gradients.gradients_and_rounding`),

    d = ∇ Σ_n ¾ c_n ℓ_n / ¾ − ∇ Σ_n ⅝ c_n ℓ_n / ⅝,

is zero in exact arithmetic and, in the model's precision, the difference of two roundings of the
same reductions by the same kernels. A parameter passes when its gap is within ``rtol`` of its
magnitudes plus :data:`ROUNDING_ALLOWANCE` ‖d‖ (times the step's gradient scale). What the check
refuses is what it refused: a group row dropped, a loop that weighted its examples otherwise than
observed, a gradient changed after the backward; d comes from the tracker's own seeds, not from the
rows or the optimizer's gradient, so none of these moves it. What it can see is bounded by the
reduction's own rounding, though: a parameter's error within 4 ‖d‖ passes, 2.5-6.4e-4 of the
gradient of the test's conv bias at 64 examples of 64×64 and 1.5e-3 at 256 (a second read's
measures; an error of 1e-3 was refused at 64 and passed at 256). Float32 cannot tell an error from
its own rounding below that, and a fixed tolerance refused the correct steps instead. A sample that
is not finite (a seeded gradient past the dtype's range) allows nothing.

Where d comes from:

- the dense route's graph rows (an observed loop's ``observe()``, an owned step's graph route): two
  rows more in the rows' batched backward, summed over micro-batches (:class:`RoundingSample`);
- an owned step on another route (example, factored, sketched): the training graph is gone when
  the check runs, so d is taken only when a parameter fails the plain tolerance, by a forward of the
  step's micro-batches again in analysis mode (:class:`ReplayedRounding`); those routes already
  require a forward that reproduces the training losses;
- a float64 owned step on the graph route: likewise only on demand, by its training forward again
  (:class:`TrainingReplay`, below), the RMS of 8 samples.

Sampled with every float32 step's rows; a half-precision step has its own allowance (the precision's
eps and its witnesses). A float64 step samples nothing with its rows: float64's ``rtol`` (1e-10) is
900 000 unit roundoffs of a parameter's magnitudes, and two rows more in every graph-route backward
would cost every float64 run for the few steps it matters in. It matters where a parameter's whole
gradient is a cancellation: a generator's last bias in front of a discriminator's BatchNorm over
the generated rows (translation invariant: every row of it is exactly zero, its entries pure rounding
of terms the size of the weights) was refused at step 1 (gap 1.2e-17 against a floor, 16 ε the whole
gradient's norm, of 7e-18), however correct the step. So an owned float64 step on the dense graph
route measures d only when a parameter fails the plain tolerance (:class:`TrainingReplay`): its
micro-batches' training forward again, as training ran it (the generators and buffers it started
from, the modules' training modes), and the two seeded backward passes of :func:`rounding_of`. The
replay must give the training losses to rounding, or it measures nothing (dropout drawing from a
generator it did not restore, a forward that reads what training changed): the check then refuses
as it did. A float64 step that passes the plain tolerance pays for nothing but the generators'
states kept at its start (a few kB, 4-25 µs; no row, no pass). The gap of the correct steps replayed
(35 replays in 480 float64 GAN runs with BatchNorm and dropout in both players, micro-batches of 2
and 3 rows): at most 2.6 times the RMS ‖d‖, none refused. Not replayed, the plain tolerance as
before: an observed float64 loop (its forward is the loop's), a step under DDP, a float64 step on
another route.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapter import forked_generators
from ..engine.gradients import rounding_of
from .step import model_output

# How many times the measured rounding ‖d‖ a parameter's gap may reach. The gap of a correct step measured
# (d is a difference of two roundings, the gap mostly one): at most 1.35 ‖d‖ on the conv nets of
# tests/test_gradient_check_float32.py (12 seeds, batches of 32 and 64, every parameter), up to 2.0 on a
# DCGAN generator's and UNet2DModels' parameters of 16 elements or more (a second read). On a parameter of
# one element the two roundings can agree (33 ‖d‖ on a one-channel conv_out.bias, a step the plain tolerance
# passed): there a false refusal stays possible, as before the allowance.
ROUNDING_ALLOWANCE = 4.0


class RoundingSample:
    """The rounding sample d of a step taken with its group rows, summed over its micro-batches.

    ``add(d)`` adds one micro-batch's ``{name: Tensor[*shape]}`` (float64); :meth:`norms` reads it.
    An empty sample (nothing added: a float64 model, a half-precision step) allows nothing.
    """

    def __init__(self) -> None:
        self.difference: dict[str, torch.Tensor] | None = None

    def add(self, difference: dict[str, torch.Tensor]) -> None:
        if not difference:  # (a micro-batch with no sample: a half-precision one, a float64 model)
            return
        if self.difference is None:
            self.difference = difference
            return
        for name, d in difference.items():
            self.difference[name] += d

    def norms(self, scale: float) -> dict[str, float]:
        """``{name: scale · ‖d‖}``: how much the step's gradient (the optimizer's, after its gradient
        scale: clipping, an observed loop's fitted scale) rounds, per parameter; empty without a sample."""
        if self.difference is None:
            return {}
        norms = {name: abs(scale) * float(d.norm()) for name, d in self.difference.items()}
        # A sample that overflowed (a seeded gradient past the dtype's largest value, |∇| > 6.8e37 in float32) or
        # went NaN measures nothing: it allows nothing (an infinite allowance would pass any gap).
        return {name: v if math.isfinite(v) else 0.0 for name, v in norms.items()}

    def release(self) -> None:
        """Drop the sample (after the gradient check, its only reader): it is not held through the analysis."""
        self.difference = None


class ReplayedRounding(RoundingSample):
    """A rounding sample taken on demand: ``replay()`` returns d summed over the step's micro-batches,
    by a forward again (an owned step whose rows did not come from its graph). Taken once, at the first
    :meth:`norms`: only a step that fails the plain tolerance pays for it."""

    def __init__(self, replay: Callable[[], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self._replay: Callable[[], dict[str, torch.Tensor]] | None = replay

    def release(self) -> None:
        self._replay = None
        super().release()

    def norms(self, scale: float) -> dict[str, float]:
        if self._replay is not None:
            replay, self._replay = self._replay, None
            self.add(replay())
        return super().norms(scale)


# The scales of a replay's coefficients: a sample each (the seeds 3/4 and 5/8 of :func:`rounding_of` times s,
# divided back). One sample's ‖d‖ over a parameter of n elements scatters as a χ of n degrees of freedom: on a
# bias of 2 elements the gap of a correct step reached 4.28 ‖d‖ (its gap 1.04e-16; 144 float64 GAN runs with
# BatchNorm over micro-batches of 2 or 3 rows, 14 replays), and a χ₂ falls under a quarter of its RMS 1 time in
# 17. The RMS of 8 (2 n · 8 degrees of freedom) rarely does, and a replay runs only where the plain tolerance
# failed, so its 8 backward passes cost no step that passes.
REPLAY_SCALES = (1.0, 0.9, 0.7, 0.55, 0.95, 0.85, 0.65, 0.6)


class TrainingReplay:
    """An owned float64 step's rounding sample d, taken only if its gradient check asks (tracking.rounding):
    built just before the step's training forward, it keeps torch's generator states that forward starts
    from (the CPU one, and every CUDA device's once CUDA is initialized), and :meth:`rounding` runs each
    micro-batch's forward again from them, as training's ran it, with the two seeded backward passes of
    :func:`~genkernel.core.engine.gradients.rounding_of`.

    ``buffers``: the module's buffers as the step found them, ``[(buffer, copy)]`` (the tracker's
    rolled-back state); ``modes``: its modules' training modes in the forward, ``module.modules()``'s
    order (the tracker's own record; the check runs in eval mode). The replay runs on copies of these
    buffers, and every other module it runs (a GAN's discriminator) on copies of its own as the training
    forward found them (:meth:`watching`: a spectral norm's power iteration, a BatchNorm's statistics moved by
    that forward are not the values it ran from): neither training's buffers nor its generators move. Nothing
    is run here: what a step pays for is one copy of each generator state (4-7 µs on CPU) and, during its
    training forward, a copy of the buffers of each module outside ``module`` that it runs.
    """

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor], step: Any,
                 buffers: list[tuple[torch.Tensor, torch.Tensor]], modes: tuple[bool, ...]) -> None:
        # (measured on a 601-module net: reading every parameter's device took 0.8 ms a step, the modules' modes 1.4 ms)
        self.devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.module, self.params, self.step, self.buffers, self.modes = module, params, step, buffers, modes
        # id(module outside self.module) -> (that module, {buffer name: its value at the module's first call})
        self.foreign: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Around the step's training forward: every module outside ``module`` that runs in it (a GAN's
        discriminator) has its buffers' values kept as its first call found them, with those of its submodules
        (one global forward pre-hook, registered once per process and idle outside: :func:`_watch`), so that the
        replay runs it from them, not from what training's forward left."""
        inside = {id(m) for m in self.module.modules()}
        foreign = self.foreign

        def keep(m: nn.Module) -> None:
            if id(m) in inside or id(m) in foreign:
                return
            with torch.no_grad():
                for sub in m.modules():  # (a compiled module's wrapper holds its buffers in its submodules)
                    if id(sub) not in inside and id(sub) not in foreign:
                        foreign[id(sub)] = (sub, {name: b.clone() for name, b in sub._buffers.items() if b is not None})

        _watch_hook_registered()
        _WATCHES.append(keep)
        try:
            yield
        finally:
            _WATCHES.remove(keep)

    def rounding(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """d summed over the step's micro-batches, ``{name: Tensor[*shape]}`` float64; ``{}`` (no allowance)
        when the replayed losses are not the training losses (``step.losses``) to rounding. Runs inside the
        gradient check (θ_k; ``.grad`` untouched: the passes are ``autograd.grad``'s)."""
        step, module = self.step, self.module
        total = RoundingSample()
        with contextlib.ExitStack() as stack:
            stack.enter_context(forked_generators(devices=self.devices))
            stack.enter_context(_buffers_as(module, self.buffers))
            stack.enter_context(_other_buffers_kept(module, self.foreign))
            stack.enter_context(_modes(module, self.modes))
            torch.set_rng_state(self.cpu_state)
            for device, state in zip(self.devices, self.cuda_states):
                torch.cuda.set_rng_state(state, device)
            with torch.enable_grad():
                for rows in step.micro_batch_slices():
                    inputs, targets = step.micro_batch(rows)
                    with step.precision():
                        losses = step.loss_fn(model_output(module, inputs), targets)
                    if not _reproduces(losses.detach(), step.losses[rows]):
                        return {}
                    c = coefficients[rows].to(losses.device)
                    # (one stacked sample [k, *shape] per parameter: its norm / √k is the samples' RMS norm)
                    samples = [rounding_of(losses, self.params, c * s) for s in REPLAY_SCALES]
                    total.add({name: torch.stack([d[name] / s for d, s in zip(samples, REPLAY_SCALES)])
                               / math.sqrt(len(REPLAY_SCALES)) for name in self.params})
        return total.difference or {}


# The watches of TrainingReplay.watching() in progress, and the one global forward pre-hook that serves them, registered
# once per process: a hook registered and removed around every step changed the global hooks' dict, on which a
# compiled module's guards depend (a compiled discriminator in the loss recompiled at every step, then ran eagerly
# past dynamo's cache limit), and a hook traced inside a compiled frame failed in dynamo (the step was refused).
_WATCHES: list[Callable[[nn.Module], None]] = []
_WATCH_HANDLE: list[Any] = []
_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # (torch >= 2.3; before, dynamo traced it)


def _watch(module: nn.Module, args: Any) -> None:
    if _WATCHES and not _compiling():
        for keep in tuple(_WATCHES):  # (each watch in progress, as each registered hook of its own did)
            keep(module)


def _watch_hook_registered() -> None:
    if not _WATCH_HANDLE:
        _WATCH_HANDLE.append(nn.modules.module.register_module_forward_pre_hook(_watch))


def _reproduces(replayed: torch.Tensor, training: torch.Tensor) -> bool:
    """Whether a replayed forward's losses are training's up to its rounding (a few units of the loss's
    size; the same operations on the same values agree bit for bit on CPU): another dropout mask or
    another batch statistic moves them by far more."""
    if replayed.shape != training.shape or not bool(torch.isfinite(replayed).all()):
        return False
    if training.numel() == 0:
        return True
    training = training.to(replayed)
    scale = float(training.abs().max())
    return float((replayed - training).abs().max()) <= 64 * torch.finfo(replayed.dtype).eps * scale


@contextlib.contextmanager
def _buffers_as(module: nn.Module, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Every buffer slot of ``module`` holding a copy of the buffer's value in ``saved`` (its own value where
    ``saved`` has none), the original tensors put back after, untouched (their version counters too)."""
    values = {id(b): v for b, v in saved}
    slots = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    try:
        with torch.no_grad():
            for m, name, b in slots:
                m._buffers[name] = values.get(id(b), b).clone()
        yield
    finally:
        for m, name, b in slots:
            m._buffers[name] = b


@contextlib.contextmanager
def _modes(module: nn.Module, modes: tuple[bool, ...]) -> Iterator[None]:
    """``module``'s modules in the training modes ``modes`` (the step's forward's, ``module.modules()``'s order),
    their modes now put back after."""
    now = [(m, m.training) for m in module.modules()]
    try:
        for (m, _), training in zip(now, modes, strict=True):
            m.training = training
        yield
    finally:
        for m, training in now:
            m.training = training


@contextlib.contextmanager
def _other_buffers_kept(module: nn.Module,
                        found: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] | None = None) -> Iterator[None]:
    """Every module outside ``module`` that runs a forward inside (a GAN's discriminator, however deep in the
    loss: an augmented loss holds it in a loss it holds) runs on copies of its own buffers, from its first
    call on, of the values ``found`` keeps for it (:meth:`TrainingReplay.watching`: as the training forward
    found them), else of its buffers now; the original tensors are put back after, untouched (a global
    forward pre-hook while inside)."""
    found = {} if found is None else found
    seen = {id(m) for m in module.modules()}
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []

    def keep(m: nn.Module, args: Any) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        kept = found.get(id(m))
        values = kept[1] if kept is not None and kept[0] is m else {}
        with torch.no_grad():
            for name, b in m._buffers.items():
                if b is not None:
                    swapped.append((m, name, b))
                    m._buffers[name] = values.get(name, b).clone()

    handle = nn.modules.module.register_module_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()
        for m, name, b in reversed(swapped):
            m._buffers[name] = b
