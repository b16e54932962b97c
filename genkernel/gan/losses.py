"""Per-example GAN losses and the discriminator objective module (with a per-example gradient penalty).

Losses (``kind``):

- ``"nonsaturating"``: ℓ_D = softplus(−D(x)) on real, softplus(D(x)) on generated; ℓ_G = softplus(−D(G(z))).
- ``"hinge"``: ℓ_D = relu(1 − D(x)) on real, relu(1 + D(x)) on generated; ℓ_G = −D(G(z)).
- ``"wgan-gp"``: ℓ_D = −D(x) on real, D(x) on generated, λ(‖∇_x D(x̂)‖ − 1)² on interpolates x̂;
  ℓ_G = −D(G(z)).

A discriminator step's loss is Σ_n c_n ℓ_n with c_n = 1/|B_real|, 1/|B_fake| and 1/|B_gp| (DESIGN.md
section 2), so every example, the gradient-penalty ones included, is one contribution of the ledger.

**The per-example gradient penalty.** The penalty of an interpolate needs the discriminator's input
gradient inside the per-example function that the tracker differentiates (``vmap`` over ``grad``
over parameters, and ``jvp`` over parameters at the probes). :class:`DiscriminatorObjective` wraps
D and returns one value per example: D(x) for real and generated examples and ‖∇_x D(x)‖ for
penalty examples, the input gradient computed with ``torch.func.grad`` (not
``torch.autograd.grad``, which cannot run inside ``torch.func`` transforms). ``torch.func.grad``
composes with ordinary autograd (the training backward differentiates through it, a double
backward) and with the tracker's transforms (grad-of-grad, jvp-of-grad), so the same module is
trained and analysed. Which value an example gets is a second input, ``roles`` (0 generated,
1 real, 2 penalty), chosen with ``torch.where`` so it also works under ``vmap``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import output_tensor

LOSSES = ("nonsaturating", "hinge", "wgan-gp")
GENERATED, REAL, PENALTY = 0, 1, 2
ROLE_NAMES = ("generated", "real", "penalty")


def check_loss(kind: str) -> str:
    if kind not in LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {LOSSES}")
    return kind


def scores_of(output) -> torch.Tensor:
    """Discriminator output as ``[B]`` scores; a clear error unless it is one value per example."""
    out = output_tensor(output)
    if out.dim() == 1:
        return out
    if out.dim() >= 2 and out[0].numel() == 1:
        return out.reshape(out.shape[0])
    raise ValueError(
        f"the discriminator must return one value per example (shape [B] or [B, 1]), got shape {tuple(out.shape)}; "
        "reduce patch outputs to one score per example (e.g. .mean over spatial dimensions) inside the model"
    )


def generator_losses(kind: str, scores: torch.Tensor) -> torch.Tensor:
    """ℓ_G per example ``[B]`` from discriminator scores ``[B]`` of generated samples."""
    check_loss(kind)
    return F.softplus(-scores) if kind == "nonsaturating" else -scores


def discriminator_losses(kind: str, values: torch.Tensor, roles: torch.Tensor, gp_weight: float = 10.0) -> torch.Tensor:
    """ℓ_D per example ``[B]`` from ``values [B]`` (scores, or gradient norms for penalty rows) and ``roles [B]``."""
    check_loss(kind)
    if kind == "nonsaturating":
        real, fake = F.softplus(-values), F.softplus(values)
    elif kind == "hinge":
        real, fake = F.relu(1 - values), F.relu(1 + values)
    else:
        real, fake = -values, values
    penalty = gp_weight * (values - 1.0) ** 2
    return torch.where(roles == REAL, real, torch.where(roles == PENALTY, penalty, fake))


class GeneratorLoss:
    """``loss_fn(samples, None) -> [B]``: ℓ_G(D(samples)) per example, closing over the discriminator.

    This is the generator step's ``loss_fn``. Its gradient with respect to a sample is the weight
    w_i = ∇_x ℓ_G(D(x)) of DESIGN.md section 3 (see :func:`genkernel.gan.discriminator_input_gradients`).
    """

    def __init__(self, discriminator: nn.Module, kind: str = "nonsaturating") -> None:
        self.discriminator = discriminator
        self.kind = check_loss(kind)

    def __call__(self, samples: torch.Tensor, targets=None) -> torch.Tensor:
        return generator_losses(self.kind, scores_of(self.discriminator(samples)))


class DiscriminatorLoss:
    """``loss_fn(values, roles) -> [B]`` for :class:`DiscriminatorObjective` outputs."""

    def __init__(self, kind: str = "nonsaturating", gp_weight: float = 10.0) -> None:
        self.kind = check_loss(kind)
        self.gp_weight = float(gp_weight)

    def __call__(self, values: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        return discriminator_losses(self.kind, values.reshape(values.shape[0]), roles, self.gp_weight)


class DiscriminatorObjective(nn.Module):
    """Wraps D for discriminator steps: ``forward(x [B, ...], roles [B]) -> [B, 1]``.

    Returns D(x) where ``roles`` is 0 (generated) or 1 (real), and ‖∇_x D(x)‖ where it is 2
    (gradient-penalty interpolate). With ``penalty=False`` no input gradient is computed and every
    row is D(x). Its parameters are D's (named ``net.*``), so an optimizer over D trains it.

    The input gradient of a batch is ``torch.func.grad(x ↦ Σ_b D(x)_b)(x)``: D treats examples
    independently, so row b is ∇_x D(x_b). ``eps`` keeps the norm differentiable at zero.
    """

    def __init__(self, discriminator: nn.Module, *, penalty: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        self.net = discriminator
        self.penalty = bool(penalty)
        self.eps = float(eps)

    def input_gradient_norm(self, x: torch.Tensor, *, with_scores: bool = False):
        """``[B]`` ‖∇_x D(x)‖ per example, differentiable in D's parameters (and under torch.func);
        with ``with_scores`` also the scores D(x) ``[B]`` of the same evaluation."""

        def total(inputs):
            scores = scores_of(self.net(inputs))
            return scores.sum(), scores

        g, scores = torch.func.grad(total, has_aux=True)(x)
        norms = (g.reshape(g.shape[0], -1).pow(2).sum(dim=1) + self.eps).sqrt()
        return (norms, scores) if with_scores else norms

    def forward(self, x: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        if not self.penalty:
            return scores_of(self.net(x)).unsqueeze(1)
        # One evaluation of D gives both the scores (aux) and the input gradient, so a training-mode
        # forward advances spectral norm's power iteration once, as a plain D(x) would.
        norms, scores = self.input_gradient_norm(x, with_scores=True)
        return torch.where(roles == PENALTY, norms, scores).unsqueeze(1)


__all__ = [
    "LOSSES", "GENERATED", "REAL", "PENALTY", "ROLE_NAMES", "generator_losses", "discriminator_losses",
    "GeneratorLoss", "DiscriminatorLoss", "DiscriminatorObjective", "scores_of", "check_loss",
]
