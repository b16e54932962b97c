"""Per-example GAN losses and the discriminator objective module (with a per-example gradient penalty).

Losses (``kind``):

- ``"nonsaturating"``: ℓ_D = softplus(−D(x)) on real, softplus(D(x)) on generated; ℓ_G = softplus(−D(G(z))).
- ``"hinge"``: ℓ_D = relu(1 − D(x)) on real, relu(1 + D(x)) on generated; ℓ_G = −D(G(z)).
- ``"wgan-gp"``: ℓ_D = −D(x) on real, D(x) on generated, λ(‖∇_x D(x̂)‖ − 1)² on interpolates x̂;
  ℓ_G = −D(G(z)).

The R1 penalty (Mescheder et al. 2018, StyleGAN's regularizer), with ``r1_gamma`` = γ > 0 beside
"nonsaturating" or "hinge": penalty rows are real examples again, ℓ_D = γ/2·‖∇_x D(x)‖² on each, so the
step's loss is the data term plus γ/2 · mean over the real rows of ‖∇_x D(x)‖², and the ledger books the
penalty as contributions of its own (role "penalty").

Discriminators that end in a sigmoid output probabilities p = D(x) ∈ [0, 1], not logits
(``output="probability"``, non-saturating loss only, as ``nn.BCELoss``): ℓ_G = −log p, ℓ_D = −log p on
real and −log(1 − p) on generated. Every log is clamped at −100, as ``nn.BCELoss`` does, so p = 0 (or
1 − p = 0) gives the finite loss 100 with zero gradient instead of inf. A mismatch is refused: a
logit loss with a D whose last module is ``nn.Sigmoid`` (at construction when the final element of
D's ``nn.Sequential`` chain is one, else at the first call, from the last leaf module executed),
and a probability loss whose first scores leave [0, 1].

A discriminator step's loss is Σ_n c_n ℓ_n with c_n = 1/|B_real|, 1/|B_fake| and 1/|B_gp| (docs/optimizers.md,
"Group gradients"), so every example, the gradient-penalty ones included, is one contribution of the ledger.

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

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import output_tensor, positive_int, under_torch_func, unwrap

LOSSES = ("nonsaturating", "hinge", "wgan-gp")
DEFAULT_GP_WEIGHT = 10.0  # λ of WGAN-GP (Gulrajani et al.)
OUTPUTS = ("logit", "probability")
GENERATED, REAL, PENALTY = 0, 1, 2
ROLE_NAMES = ("generated", "real", "penalty")
LOG_FLOOR = -100.0  # nn.BCELoss's clamp of every log


def check_loss(kind: str) -> str:
    if kind not in LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {LOSSES}")
    return kind


def check_output(output: str, kind: str = "nonsaturating") -> str:
    """``output`` ("logit" or "probability"); probabilities go with the non-saturating loss only."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS} (what the discriminator returns), got {output!r}")
    if output == "probability" and kind != "nonsaturating":
        raise ValueError(
            f"output='probability' goes with kind='nonsaturating' (binary cross-entropy on D's probabilities); the "
            f"{kind!r} loss needs D's raw scores: remove the final sigmoid and use output='logit'"
        )
    return output


def _clamped_log(p: torch.Tensor) -> torch.Tensor:
    """log p clamped at −100 (``nn.BCELoss``), with a zero gradient where clamped. At p = 0 the log is
    taken of 1 instead: ``log(p).clamp_min`` there back-propagates 0 · (1/0) = NaN, in the selected
    branch (a generator sample D scores 0) and in the one ``torch.where`` discards (a real row at
    p = 1, which float32's sigmoid gives from a logit of 17 on), poisoning D's whole gradient."""
    zero = p == 0
    safe = torch.where(zero, torch.ones_like(p), p)
    return torch.where(zero, torch.full_like(p, LOG_FLOOR), torch.log(safe)).clamp_min(LOG_FLOOR)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + eˣ), exact in float64 too: ``F.softplus``'s default threshold (20) returns x itself above
    it, an error of e⁻²⁰ ≈ 2e-9 in the loss and its gradient, far above float64's rounding (the
    ledgers are float64). Above 40, x is log(1 + eˣ) to float64's precision."""
    return F.softplus(x, beta=1.0, threshold=40.0)


def _children(module: nn.Module) -> list[nn.Module]:
    """A module's children, leaving out the parametrizations (spectral norm) of its weights."""
    return [c for name, c in module.named_children() if name != "parametrizations"]


SHAPE_ONLY = (nn.Flatten, nn.Unflatten, nn.Identity)  # modules after the last computing one (DCGAN's Flatten)


def final_module(discriminator: nn.Module) -> nn.Module:
    """The last computing element of D's ``nn.Sequential`` chain (descending through wrappers with a
    single child and the last element of each Sequential that is not a reshape such as
    ``nn.Flatten``); D itself when there is no such chain."""
    module = unwrap(discriminator)
    for _ in range(64):
        children = _children(module)
        computing = [m for m in module if not isinstance(m, SHAPE_ONLY)] if isinstance(module, nn.Sequential) else []
        if computing:
            module = computing[-1]
        elif len(children) == 1:
            module = children[0]
        else:
            break
    return module


def _sigmoid_message(what: str) -> str:
    return (
        f"the discriminator's {what} is nn.Sigmoid: it outputs probabilities, but this loss expects logits "
        "(output='logit'). Pass output='probability' (GeneratorLoss(D, output='probability'), "
        "DiscriminatorLoss(output='probability')), or drop the Sigmoid and keep logits (as BCEWithLogitsLoss expects)"
    )


def check_not_sigmoid(discriminator: nn.Module) -> None:
    """Refuse a D whose ``nn.Sequential`` chain ends in ``nn.Sigmoid`` (for logit losses)."""
    if isinstance(final_module(discriminator), nn.Sigmoid):
        raise ValueError(_sigmoid_message("final module"))


def last_leaf_executed(discriminator: nn.Module, samples: torch.Tensor, *conditions: torch.Tensor):
    """``(output, last leaf module run)`` of one forward of D on ``samples`` (and ``conditions``, a
    conditional D's classes) (forward hooks on its leaves; reshapes such as ``nn.Flatten`` are not counted)."""
    order: list[nn.Module] = []
    leaves = [m for m in unwrap(discriminator).modules() if not _children(m) and not isinstance(m, SHAPE_ONLY)]
    handles = [m.register_forward_hook(lambda module, args, out: order.append(module)) for m in leaves]
    try:
        out = discriminator(samples, *conditions)
    finally:
        for h in handles:
            h.remove()
    return out, (order[-1] if order else None)


def check_probabilities(values: torch.Tensor, what: str = "discriminator scores") -> None:
    """Refuse values outside [0, 1] for a probability loss (the first call's check)."""
    v = values.detach()
    if v.numel() and not bool(((v >= 0) & (v <= 1)).all()):
        raise ValueError(
            f"output='probability' but the {what} range over [{float(v.min()):.3g}, {float(v.max()):.3g}], outside "
            "[0, 1]: this discriminator outputs logits (raw scores). Use output='logit' (the default)"
        )


def scores_of(output, batch: int) -> torch.Tensor:
    """Discriminator output for ``batch`` examples as ``[B]`` scores; a clear error unless it is one
    value per example (a patch D flattened to ``[k·B]`` is refused too)."""
    out = output_tensor(output)
    if out.dim() >= 1 and out.shape[0] == batch and out[0].numel() == 1:
        return out.reshape(batch)
    raise ValueError(
        f"the discriminator must return one value per example (shape [B] or [B, 1]), got shape {tuple(out.shape)} "
        f"for {batch} examples; reduce patch outputs to one score per example (e.g. .mean over spatial dimensions) "
        "inside the model"
    )


def _penalty_weight(weight: object, name: str, meaning: str) -> float:
    """``weight`` as a float; a ValueError unless it is finite and >= 0 (a negative weight rewards steep D)."""
    try:
        value = float(weight)
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if isinstance(weight, (bool, str)) or not 0 <= value < float("inf"):  # ("4" read as 4.0: a config slip)
        raise ValueError(f"{name} must be a finite number >= 0 ({meaning}), got {weight!r}")
    return value


def check_gp_weight(gp_weight: float) -> float:
    """``gp_weight`` as a float; a ValueError unless it is finite and >= 0 (a negative λ rewards steep critics)."""
    return _penalty_weight(gp_weight, "gp_weight", "λ of λ(‖∇D‖ − 1)², 10 in WGAN-GP")


def check_r1_gamma(r1_gamma: float, kind: str, output: str = "logit") -> float:
    """``r1_gamma`` as a float (γ of the R1 penalty γ/2·‖∇_x D(x)‖² on real rows; 0: none); a ValueError unless
    it is finite and >= 0, and unless 0 beside ``kind="wgan-gp"`` (WGAN-GP has a penalty of its own) or
    ``output="probability"`` (R1 is the gradient of D's logit, not of a sigmoid's probability)."""
    value = _penalty_weight(r1_gamma, "r1_gamma", "γ of the R1 penalty γ/2·‖∇_x D(x)‖² on real data; 0: none")
    if value > 0 and kind == "wgan-gp":
        raise ValueError(
            f"r1_gamma={r1_gamma!r} adds the R1 penalty, but loss='wgan-gp' has a gradient penalty of its own "
            "(λ(‖∇D(x̂)‖ − 1)² on interpolates, gp_weight): choose one, R1 with loss='nonsaturating' or 'hinge', or "
            "WGAN-GP with r1_gamma=0"
        )
    if value > 0 and output == "probability":
        # ∇_x σ(l) = σ'(l)·∇_x l, σ' <= 1/4 and -> 0 where D is confident: a far weaker penalty than R1, silently
        raise ValueError(
            f"r1_gamma={r1_gamma!r} penalizes ‖∇_x D(x)‖² of D's logit (Mescheder et al. 2018), but with "
            "output='probability' D returns a sigmoid's probability p = σ(l), whose gradient σ'(l)·∇_x l is at most "
            "a quarter of the logit's and vanishes where D is confident: remove the final sigmoid and use "
            "output='logit' (the same non-saturating loss, on logits)"
        )
    return value


def check_classes(classes: object, batch: int, num_classes: int | None, what: str = "classes") -> torch.Tensor:
    """A conditional GAN's classes: an integer ``LongTensor[batch]`` with values in ``[0, num_classes)``
    (range unchecked when ``num_classes`` is None). A ValueError/TypeError naming the fix otherwise."""
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"{what} must be a LongTensor[{batch}] of class ids (one per example), got {type(classes).__name__}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(
            f"{what} must be integer class ids (a LongTensor[{batch}]), got dtype {classes.dtype}: pass class ids, not "
            "one-hot vectors or scores (e.g. labels.argmax(dim=1).long())"
        )
    if classes.shape != (batch,):
        raise ValueError(f"{what} must have shape [{batch}] (one class id per example), got {tuple(classes.shape)}")
    if num_classes is not None and classes.numel() and not under_torch_func(classes):
        low, high = int(classes.min()), int(classes.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{what} range over [{low}, {high}] but a conditional GAN with num_classes={num_classes} takes ids in "
                f"[0, {num_classes}): relabel the classes to 0..{num_classes - 1} (or pass the right num_classes)"
            )
    return classes.long()


def check_roles(roles: object, values: torch.Tensor) -> None:
    """Refuse ``roles`` unless they are integer ids 0, 1, 2, one per row of ``values [B]``.

    ``torch.where`` broadcasts: roles ``[B, 1]`` against values ``[B]`` gave a ``[B, B]`` loss, and an
    id other than 1 or 2 (3, −1) fell through to the generated rows' loss, both without a word."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError(f"values must be [B] (one score or gradient norm per example), got shape "
                         f"{tuple(getattr(values, 'shape', ()))}: reshape them with values.reshape(-1)")
    if not isinstance(roles, torch.Tensor):
        raise TypeError(f"roles must be a LongTensor[{values.shape[0]}] (0 generated, 1 real, 2 penalty), got "
                        f"{type(roles).__name__}")
    if roles.is_floating_point() or roles.is_complex() or roles.dtype == torch.bool:
        raise TypeError(f"roles must be integer ids (0 generated, 1 real, 2 penalty), got dtype {roles.dtype}: "
                        "pass roles.long()")
    if roles.shape != values.shape:
        raise ValueError(f"roles must have shape [{values.shape[0]}] (one role per example, as values), got "
                         f"{tuple(roles.shape)}: pass roles.reshape(-1)")
    if roles.numel() and not under_torch_func(roles):
        low, high = int(roles.min()), int(roles.max())
        if low < GENERATED or high > PENALTY:
            raise ValueError(f"roles must be 0 (generated), 1 (real) or 2 (gradient penalty), got ids from {low} to {high}")


def class_inputs(classes: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """G's and D's inputs after the first: ``(classes,)`` for a conditional GAN, ``()`` for an
    unconditional one (``classes`` None), so that ``G(z, *class_inputs(y))`` serves both."""
    return () if classes is None else (classes,)


def generator_losses(kind: str, scores: torch.Tensor, output: str = "logit") -> torch.Tensor:
    """ℓ_G per example ``[B]`` from discriminator scores ``[B]`` of generated samples (logits, or with
    ``output="probability"`` probabilities p: −log p, the log clamped at −100 as ``nn.BCELoss``)."""
    check_loss(kind)
    if check_output(output, kind) == "probability":
        return -_clamped_log(scores)
    return _softplus(-scores) if kind == "nonsaturating" else -scores


def discriminator_losses(
    kind: str, values: torch.Tensor, roles: torch.Tensor, gp_weight: float = DEFAULT_GP_WEIGHT, output: str = "logit",
    r1_gamma: float = 0.0,
) -> torch.Tensor:
    """ℓ_D per example ``[B]`` from ``values [B]`` (scores, or gradient norms for penalty rows) and ``roles [B]``;
    with ``output="probability"``: −log p on real, −log(1 − p) on generated (logs clamped at −100). Penalty rows:
    γ/2·‖∇_x D(x)‖² (R1, real rows again) with ``r1_gamma`` = γ > 0, else λ(‖∇_x D(x̂)‖ − 1)² (λ = ``gp_weight``)."""
    check_loss(kind)
    gp_weight = check_gp_weight(gp_weight)
    r1_gamma = check_r1_gamma(r1_gamma, kind, output)
    check_roles(roles, values)
    if check_output(output, kind) == "probability":
        real, fake = -_clamped_log(values), -_clamped_log(1 - values)
    elif kind == "nonsaturating":
        real, fake = _softplus(-values), _softplus(values)
    elif kind == "hinge":
        real, fake = F.relu(1 - values), F.relu(1 + values)
    else:
        real, fake = -values, values
    penalty = r1_gamma / 2 * values ** 2 if r1_gamma > 0 else gp_weight * (values - 1.0) ** 2
    return torch.where(roles == REAL, real, torch.where(roles == PENALTY, penalty, fake))


class GeneratorLoss:
    """``loss_fn(samples, None) -> [B]``: ℓ_G(D(samples)) per example, closing over the discriminator.

    This is the generator step's ``loss_fn``. Its gradient with respect to a sample is the weight
    w_i = ∇_x ℓ_G(D(x)) of docs/gan.md (see :func:`genkernel.gan.discriminator_input_gradients`).

    A conditional GAN's D(x, y) (``conditional=True``): ``loss_fn(samples, classes) -> [B]`` with
    ``classes`` a ``LongTensor[B]``, ℓ_G(D(samples, classes)); the generator step of a conditional
    :class:`~genkernel.gan.GANTrainer` passes its classes as the step's targets.

    Args:
        discriminator: D (samples -> one score per example; ``(samples, classes)`` when conditional).
        kind: "nonsaturating", "hinge" or "wgan-gp".
        output: what D returns: "logit" (raw scores, the default) or "probability" (D ends in a
            sigmoid; non-saturating only: ℓ_G = −log p, the log clamped at −100 as ``nn.BCELoss``).
            "logit" with a D whose last module is ``nn.Sigmoid`` is refused (here when D's
            ``nn.Sequential`` chain ends in one, else at the first call from the last leaf module
            executed); "probability" with scores outside [0, 1] is refused at the first call.
        conditional: D takes ``(samples, classes)``; the loss is then called with the classes as its
            second argument (a ValueError naming the fix when they are missing).
        num_classes: with ``conditional``, the number of classes (ids outside ``[0, num_classes)`` are
            refused); None: not checked.
    """

    def __init__(self, discriminator: nn.Module, kind: str = "nonsaturating", output: str = "logit", *,
                 conditional: bool = False, num_classes: int | None = None) -> None:
        self.discriminator = discriminator
        self.kind = check_loss(kind)
        self.output = check_output(output, kind)
        if not isinstance(conditional, bool):
            raise TypeError(f"conditional must be True (D(x, y)) or False (D(x)), got {conditional!r}")
        self.conditional = conditional
        if num_classes is not None and not conditional:
            raise ValueError(f"num_classes={num_classes!r} is for a conditional D(x, y): pass conditional=True too (or drop "
                             "num_classes)")
        self.num_classes = None if num_classes is None else positive_int(num_classes, "num_classes")
        if self.output == "logit":
            check_not_sigmoid(discriminator)
        self._checked = False

    def __call__(self, samples: torch.Tensor, targets=None) -> torch.Tensor:
        conditions: tuple[torch.Tensor, ...] = ()
        if self.conditional:
            if targets is None:
                raise ValueError(
                    "this generator loss is conditional (D(x, y)): call it as loss(samples, classes) with the classes "
                    "G was given, a LongTensor[B]"
                )
            conditions = (check_classes(targets, samples.shape[0], self.num_classes),)
        elif (isinstance(targets, torch.Tensor) and not (targets.is_floating_point() or targets.is_complex())
              and targets.dtype != torch.bool and targets.shape == (samples.shape[0],)):
            from .passes import classes_taken

            if classes_taken(self.discriminator) is not False:  # D(x, y=None): the classes would be dropped unseen
                raise ValueError(
                    "this generator loss is unconditional (it calls D(samples) and drops the classes it was given), but "
                    "it was called with class ids and D's forward takes a second input: build it as "
                    "GeneratorLoss(D, ..., conditional=True) so that it reads D(samples, classes)"
                )
        if self._checked or under_torch_func(samples):
            scores = scores_of(self.discriminator(samples, *conditions), samples.shape[0])
        else:
            out, last = last_leaf_executed(self.discriminator, samples, *conditions)
            scores = scores_of(out, samples.shape[0])
            if self.output == "logit" and isinstance(last, nn.Sigmoid):
                raise ValueError(_sigmoid_message("last module executed"))
            if self.output == "probability":
                check_probabilities(scores)
            self._checked = True
        return generator_losses(self.kind, scores, self.output)


class AugmentedGeneratorLoss:
    """``loss_fn(samples, targets) -> [B]``: ℓ_G(D(T(samples; params))) per example, T a differentiable augmentation
    (:class:`~genkernel.gan.augment.DiffAugment`) with its parameters carried per row in the targets: ``targets =
    params [B, P]`` (unconditional), ``(classes [B], params [B, P])`` for a conditional D(x, y).

    The generator step's loss of :class:`~genkernel.gan.GANTrainer` with ``augment=``. A deterministic function of
    (samples, targets): every re-evaluation sees training's augmentation. :attr:`geometry` is the loss without
    the augmentation, ℓ_G(D(samples)) (a :class:`GeneratorLoss`): an analyzer reads the discriminator's geometry
    from it (the augmented loss has no one value at a probe, whose augmentation is not drawn).

    Args:
        discriminator, kind, output, conditional, num_classes: as :class:`GeneratorLoss`.
        augment: the augmentation, ``augment.apply(x, params)``.
    """

    def __init__(self, discriminator: nn.Module, augment, kind: str = "nonsaturating", output: str = "logit", *,
                 conditional: bool = False, num_classes: int | None = None) -> None:
        self.geometry = GeneratorLoss(discriminator, kind, output, conditional=conditional, num_classes=num_classes)
        self.augment = augment

    @property
    def discriminator(self) -> nn.Module:
        return self.geometry.discriminator

    @property
    def conditional(self) -> bool:
        return self.geometry.conditional

    def split_targets(self, targets) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(classes or None, params)`` from a step's targets (``params``, or ``(classes, params)`` when
        conditional); a ValueError naming the layout otherwise."""
        if self.conditional:
            if not isinstance(targets, (tuple, list)) or len(targets) != 2:
                raise ValueError("an augmented conditional generator loss takes targets (classes [B], params [B, P]): "
                                 "the classes G was given and the augmentation's parameters of each row")
            return targets[0], targets[1]
        if not isinstance(targets, torch.Tensor):
            raise ValueError("an augmented generator loss takes targets = params [B, P] (the augmentation's parameters "
                             "of each row, DiffAugment.draw's)")
        return None, targets

    def __call__(self, samples: torch.Tensor, targets=None) -> torch.Tensor:
        classes, params = self.split_targets(targets)
        return self.geometry(self.augment.apply(samples, params), classes)


class DiscriminatorLoss:
    """``loss_fn(values, roles) -> [B]`` for :class:`DiscriminatorObjective` outputs.

    ``output``: "logit" (default) or "probability" (a D ending in a sigmoid; non-saturating only:
    −log p on real, −log(1 − p) on generated, logs clamped at −100 as ``nn.BCELoss``); probabilities
    outside [0, 1] are refused at the first call. ``discriminator``: optional, D itself, so that
    "logit" with a D whose ``nn.Sequential`` chain ends in ``nn.Sigmoid`` is refused here. ``r1_gamma``:
    γ of the R1 penalty γ/2·‖∇_x D(x)‖² its penalty rows (real rows again) take (0, default: none).
    """

    def __init__(
        self, kind: str = "nonsaturating", gp_weight: float = DEFAULT_GP_WEIGHT, output: str = "logit", *,
        discriminator: nn.Module | None = None, r1_gamma: float = 0.0,
    ) -> None:
        self.kind = check_loss(kind)
        self.gp_weight = check_gp_weight(gp_weight)
        self.r1_gamma = check_r1_gamma(r1_gamma, self.kind, output)
        if self.kind != "wgan-gp" and self.gp_weight != DEFAULT_GP_WEIGHT:
            # only wgan-gp has a gradient penalty: another λ here is a setting that changes nothing (beside R1, a
            # λ meant for R1's weight: loss='wgan-gp' would then be refused)
            fix = (f"the R1 penalty's weight is r1_gamma, here {self.r1_gamma!r}: leave gp_weight at its default"
                   if self.r1_gamma > 0 else "pass loss='wgan-gp', or leave gp_weight at its default; the R1 penalty's "
                   "weight is r1_gamma")
            warnings.warn(f"gp_weight={gp_weight!r} has no effect with loss={kind!r}: only 'wgan-gp' has a gradient "
                          f"penalty ({fix})", UserWarning, stacklevel=3)
        self.output = check_output(output, kind)
        if self.output == "logit" and discriminator is not None:
            check_not_sigmoid(discriminator)
        self._checked = self.output == "logit"

    def __call__(self, values: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        values = values.reshape(values.shape[0])
        check_roles(roles, values)
        if not self._checked and not under_torch_func(values):
            check_probabilities(values[roles != PENALTY])
            self._checked = True
        return discriminator_losses(self.kind, values, roles, self.gp_weight, self.output, self.r1_gamma)


class DiscriminatorObjective(nn.Module):
    """Wraps D for discriminator steps: ``forward(x [B, ...], roles [B]) -> [B, 1]``, or for a
    conditional D(x, y) ``forward(x [B, ...], roles [B], classes [B]) -> [B, 1]``.

    Returns D(x) (D(x, y)) where ``roles`` is 0 (generated) or 1 (real), and ‖∇_x D(x)‖ (‖∇_x D(x, y)‖,
    the gradient in x alone) where it is 2 (a penalty row: a WGAN-GP interpolate, or a real row again for
    R1). With ``penalty=False``, or on a batch without penalty rows, no input gradient is computed and every
    row is D(x) (one plain forward). Its parameters are
    D's (named ``net.*``), so an optimizer over D trains it.

    The input gradient of a batch is ``torch.func.grad(x ↦ Σ_b D(x)_b)(x)``: D treats examples
    independently, so row b is ∇_x D(x_b) (a D with BatchNorm in training mode is refused: it mixes the batch).
    ``eps`` keeps the norm differentiable at zero.
    """

    def __init__(self, discriminator: nn.Module, *, penalty: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        self.net = discriminator
        self.penalty = bool(penalty)
        self.eps = float(eps)

    @property
    def data_dependent_forward(self) -> bool:
        """With penalty rows possible, the forward's path depends on the roles' values (the input gradient is
        formed only for a batch that holds penalty rows): the factored engine leaves D's layers to torch.func
        (:func:`~genkernel.core.engine.factors.make_plan`), whose per-example passes always form it."""
        return self.penalty

    @staticmethod
    def _has_penalty_rows(x: torch.Tensor, roles: torch.Tensor) -> bool:
        """Whether a batch holds penalty rows: a batch without them (lazy R1's main steps, the separate forwards of
        real and generated rows) is scored by one plain forward, without the input gradient's backward. Under a
        torch.func transform (a per-example pass) the roles cannot be read: the gradient is formed, and
        ``torch.where`` keeps the scores of the rows that are not penalty rows."""
        if under_torch_func(x) or under_torch_func(roles):
            return True
        return bool((roles == PENALTY).any())

    def _refuse_batch_coupling(self) -> None:
        """BatchNorm in training mode mixes the batch: row b's input gradient would take terms from the other
        examples (and functorch refuses its running-statistics update inside grad with an opaque error). Refused at
        every forward of a penalized objective, also a batch without penalty rows (lazy R1's main steps, the separate
        forwards of real and generated rows): a refusal at the first penalty rows came after updates already made."""
        training_bn = [n for n, m in self.net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.training]
        if training_bn:
            raise ValueError(
                f"the gradient penalty needs a discriminator that treats examples independently, but "
                f"{training_bn[0] or 'D'} is BatchNorm in training mode (it normalizes over the batch, so "
                "‖∇_x D(x_b)‖ would depend on the other examples). Use a per-example normalization (LayerNorm, "
                "GroupNorm, or none, as WGAN-GP's critic), or put the BatchNorm modules in eval mode"
            )

    def input_gradient_norm(self, x: torch.Tensor, *, with_scores: bool = False, classes: torch.Tensor | None = None,
                            transform=None):
        """``[B]`` ‖∇_x D(x)‖ per example (‖∇_x D(x, classes)‖ with ``classes [B]``), differentiable in
        D's parameters (and under torch.func); with ``with_scores`` also the scores D(x) ``[B]`` of the
        same evaluation. ``transform``: a per-row function T of the samples in front of D (an augmentation
        with its parameters fixed): ‖∇_x D(T(x))‖, the gradient in the samples before T."""
        conditions = class_inputs(classes)
        self._refuse_batch_coupling()

        def total(inputs):
            shown = inputs if transform is None else transform(inputs)
            scores = scores_of(self.net(shown, *conditions), inputs.shape[0])
            return scores.sum(), scores

        g, scores = torch.func.grad(total, has_aux=True)(x)
        norms = (g.reshape(g.shape[0], -1).pow(2).sum(dim=1) + self.eps).sqrt()
        return (norms, scores) if with_scores else norms

    def forward(self, x: torch.Tensor, roles: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self._values(x, roles, classes)

    def _values(self, x: torch.Tensor, roles: torch.Tensor, classes: torch.Tensor | None, transform=None) -> torch.Tensor:
        """``[B, 1]``: D(T(x)) on the rows that are not penalty rows, ‖∇_x D(T(x))‖ on the penalty rows (T the
        identity when ``transform`` is None)."""
        conditions = class_inputs(classes)
        if self.penalty:
            self._refuse_batch_coupling()
        if not self.penalty or not self._has_penalty_rows(x, roles):
            shown = x if transform is None else transform(x)
            return scores_of(self.net(shown, *conditions), x.shape[0]).unsqueeze(1)
        # One evaluation of D gives both the scores (aux) and the input gradient, so a training-mode
        # forward advances spectral norm's power iteration once, as a plain D(x) would.
        norms, scores = self.input_gradient_norm(x, with_scores=True, classes=classes, transform=transform)
        check_roles(roles, scores)  # roles [B, 1] would broadcast to a [B, B] output
        return torch.where(roles == PENALTY, norms, scores).unsqueeze(1)


class AugmentedDiscriminatorObjective(DiscriminatorObjective):
    """:class:`DiscriminatorObjective` of D∘T, T a differentiable augmentation (:class:`~genkernel.gan.augment.DiffAugment`)
    whose random parameters are an input: ``forward(x [B, ...], roles [B], params [B, P]) -> [B, 1]``, for a
    conditional D ``forward(x, roles, params, classes [B])``.

    Row b's value is D(T(x_b; params_b)) (a real or generated row), or, on a penalty row, ‖∇_x D(T(x; params_b))‖
    at x_b: the gradient in the sample before the augmentation, through T, as StyleGAN2-ADA and DiffAugment's
    StyleGAN2 take R1 on augmented reals. T is deterministic given the params, so every evaluation of the
    objective (a tracker's checks, per-example passes, quadrature nodes) sees training's augmentation; at
    :meth:`~genkernel.gan.augment.DiffAugment.identity` params it is D itself, bit for bit.
    """

    def __init__(self, discriminator: nn.Module, augment, *, penalty: bool = False, eps: float = 1e-12) -> None:
        super().__init__(discriminator, penalty=penalty, eps=eps)
        self.augment = augment

    def forward(self, x: torch.Tensor, roles: torch.Tensor, params: torch.Tensor,  # type: ignore[override]
                classes: torch.Tensor | None = None) -> torch.Tensor:
        self.augment.check_params(x, params)
        return self._values(x, roles, classes, transform=lambda inputs: self.augment.apply(inputs, params))


__all__ = [
    "OUTPUTS", "check_output", "check_not_sigmoid", "final_module", "LOSSES", "GENERATED", "REAL", "PENALTY", "ROLE_NAMES", "generator_losses", "discriminator_losses",
    "GeneratorLoss", "DiscriminatorLoss", "DiscriminatorObjective", "AugmentedGeneratorLoss",
    "AugmentedDiscriminatorObjective", "scores_of", "check_loss", "check_gp_weight", "check_r1_gamma",
    "check_classes", "check_roles", "class_inputs",
]
