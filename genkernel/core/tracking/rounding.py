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
  require a forward that reproduces the training losses.

Float32 models only: float64's ``rtol`` (1e-10) is 900 000 unit roundoffs, and a half-precision
step has its own allowance (the precision's eps and its witnesses).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

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
