"""A GAN trainer with alternating discriminator and generator steps on the shared callback protocol.

One *iteration* is ``d_steps`` discriminator steps then one generator step. Every update is an
:class:`~genkernel.core.tracking.step.OptimizerStep` performed through :func:`~genkernel.core.tracking.callbacks.perform_step`
with ``phase`` "discriminator" or "generator", so an analyzer can take it over without changing
training:

- discriminator step: ``model`` = :class:`DiscriminatorObjective` (D, plus the per-example gradient
  penalty for WGAN-GP), ``inputs = (x, roles)`` with x the real, generated (and interpolated)
  samples concatenated, ``targets = roles`` (0 generated, 1 real, 2 penalty), per-example
  ``weights`` c_n = 1/|B_real|, 1/|B_fake|, 1/|B_gp|; ``info``: "roles", "real_labels" (mode or
  class ids of the real rows, -1 elsewhere), "discriminator".
  With ``micro_batches=K`` (gradient accumulation) it is a :class:`DiscriminatorStep`: micro-batch j is real
  rows j, their generated rows G(z_j) (G run per micro-batch) and their interpolates, made contiguous in x
  and run in one forward of D.
- generator step: ``model`` = G, ``inputs`` = latents z ``[B, latent_dim]``, ``targets`` None,
  ``loss_fn`` = :class:`GeneratorLoss` (ℓ_G(D(G(z))) per example); ``info``: "latents",
  "discriminator". The step runs inside :func:`frozen`: D's parameters are frozen (the generator's
  backward leaves D's gradients alone) and every module keeps its mode, as in the PyTorch DCGAN
  example. A training-mode D therefore advances spectral norm's power iteration (and BatchNorm's
  running statistics) in generator steps too; a discriminator tracker books that change of D's
  buffers as buffer drift in its ledger's rest. (Before this, D ran in eval mode during generator
  steps; ``frozen(D, modes="eval")`` still does that in your own loop.)

A conditional GAN (``num_classes=``, G(z, y) and D(x, y)) steps the same way with the classes carried
in the inputs, so every tracked objective is the exact conditional one:

- discriminator step: ``inputs = (x, roles, classes)``: real rows carry their own labels, the generated
  rows are G(z, y) at the *real batch's* classes (row b of the generated half has the class of real
  row b), and a WGAN-GP interpolate ε x_b + (1 − ε) G(z_b, y_b) therefore mixes two samples of the
  same class and is scored (and its penalty ‖∇_x D(x̂, y_b)‖ taken) at that class;
  :class:`DiscriminatorObjective` calls D(x, classes).
- generator step: ``inputs = (z, classes)``, ``targets = classes`` (the loss reads D(G(z, y), y)),
  the classes drawn from the trainer's generator after the latents (``class_sampling``);
  ``info["classes"]`` too.

With ``augment=`` (DiffAugment) D is scored through the augmentation T: the discriminator step's model is
:class:`~genkernel.gan.losses.AugmentedDiscriminatorObjective` (D∘T) with ``inputs = (x, roles, params[, classes])``,
the generator step's ``loss_fn`` :class:`~genkernel.gan.losses.AugmentedGeneratorLoss` (ℓ_G(D(T(G(z); params))))
with ``targets = params`` (conditional: ``(classes, params)``), each row's parameters drawn from the trainer's
generator (``GANTrainer``'s ``augment`` argument).

All randomness (batches, latents, a conditional generator step's classes, interpolation factors, augmentation
parameters) comes from the trainer's own seeded ``torch.Generator``; analyzers never touch it.

Data: a Tensor of real samples, from which each discriminator step draws its rows uniformly (with
replacement across steps), or a DataLoader (any re-iterable of batches: an ``ImageFolder`` of a real
data set that does not fit in memory), whose batches the discriminator steps take in order, epoch
after epoch, each at its own size (a last smaller batch gets as many generated rows); a checkpoint
records the loader's position as :mod:`~genkernel.core.tracking.batches` describes, and a resume
continues it bit for bit. A conditional GAN reads a batch's classes from it (an ``ImageFolder``
batch's second element, a dict's "class_labels").
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapter import (
    analysis_mode, buffer_snapshot, first_tensor, not_fitting_inputs, output_tensor, positive_int, restore_buffers,
    seeded_generator, unwrap,
)
from ..core.tracking.batches import (
    IterableBatches, check_reiterable, dataset_class_labels, is_class_labels, split_floating_batch,
)
from ..core.tracking.callbacks import CallbackStates, TrainerCallback, check_between_steps, fire, perform_step
from ..core.errors import NonFiniteError, SkippedStep
from ..core.tracking.io import (
    atomic_save, check_module_state, check_optimizer_state, check_resume_config, data_fingerprint, global_rng_state,
    load_state, set_global_rng_state,
)
from ..core.tracking.ema import (
    check_ema_state, check_trainable_ema, ema_settings, ema_weights, load_ema_state, step_ema,
)
from ..core.tracking.lr_schedules import LRSchedulerArg, build_lr_scheduler, lr_scheduler_settings, step_lr_scheduler
from ..core.tracking.step import (
    OptimizerStep, SkipStreak, autocast_to, check_max_grad_norm, check_not_torn, micro_batch_rows, torn_update,
    trainer_autocast_dtype, trainer_grad_scaler,
)
from ..logging import LoggingCallback
from .augment import DiffAugment
from .losses import (
    DEFAULT_GP_WEIGHT,
    GENERATED,
    PENALTY,
    REAL,
    AugmentedDiscriminatorObjective,
    AugmentedGeneratorLoss,
    DiscriminatorLoss,
    DiscriminatorObjective,
    GeneratorLoss,
    check_classes,
    check_loss,
    check_r1_gamma,
    class_inputs,
)
from .passes import classes_taken, preserved


FROZEN_MODES = ("keep", "eval")
CLASS_SAMPLING = ("data", "uniform")
DISCRIMINATOR_BATCHES = ("joint", "separate")


@contextlib.contextmanager
def frozen(module: nn.Module, *, modes: str = "keep") -> Iterator[nn.Module]:
    """D during a generator step: ``requires_grad=False`` on every parameter (the generator's backward
    does not write D's ``.grad``), restored after.

    Args:
        module: the network to freeze (D).
        modes: ``"keep"`` (default): every module keeps its mode, as in the PyTorch DCGAN example: a
            training-mode D normalizes with the batch's statistics, advances spectral norm's power
            iteration and updates BatchNorm's running statistics in the generator step. ``"eval"``: D
            is put in eval mode for the block (every module's mode restored after): no power
            iteration, BatchNorm with its running statistics (not what a training-mode D computes).
    """
    if modes not in FROZEN_MODES:
        raise ValueError(f"modes must be one of {FROZEN_MODES} (a named option), got {modes!r}")
    saved_modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        if modes == "eval":
            module.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield module
    finally:
        for m, training in saved_modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def discriminator_input_gradients(
    generator: nn.Module, loss_fn, latents: torch.Tensor, *, discriminator: nn.Module | None = None,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights w_i = ∇_x ℓ_G(D(x)) at x = G(z_i) (docs/gan.md), without touching training; for a
    conditional GAN w_i = ∇_x ℓ_G(D(x, y_i)) at x = G(z_i, y_i), each example at its own class.

    Args:
        generator: G; evaluated in :func:`analysis_mode` (eval, forked RNG).
        loss_fn: the generator step's ``loss_fn(samples, classes) -> [B]`` (closes over D, which runs
            in its current mode; ``classes`` None for an unconditional GAN).
        latents: ``[B, ...]``, whatever G takes.
        discriminator: D, whose buffers (running statistics, spectral norm's u, v) are saved and
            written back around the pass; default ``loss_fn.discriminator`` (a :class:`GeneratorLoss`).
        classes: a conditional GAN's ``LongTensor[B]`` (G is called ``G(latents, classes)``).

    Returns:
        ``(samples [B, ...], w [B, ...], losses [B])``, detached. Uses ``torch.autograd.grad`` on a
        detached copy of the samples, so no parameter's ``.grad`` changes.
    """
    discriminator = discriminator if discriminator is not None else getattr(loss_fn, "discriminator", None)
    with torch.no_grad(), preserved(generator), analysis_mode(generator):
        samples = output_tensor(generator(latents, *class_inputs(classes))).detach()
    with torch.enable_grad(), preserved(discriminator):
        x = samples.clone().requires_grad_(True)
        losses = loss_fn(x, classes)
        if not isinstance(losses, torch.Tensor) or losses.shape != (x.shape[0],):
            raise ValueError(f"the generator loss must return per-example losses of shape [{x.shape[0]}]")
        (w,) = torch.autograd.grad(losses.sum(), x)
    return samples, w.detach(), losses.detach()


class DiscriminatorStep(OptimizerStep):
    """A discriminator step whose micro-batches are the rows :attr:`micro_rows` (contiguous slices, in order,
    covering the batch) rather than :class:`OptimizerStep`'s equal split: micro-batch j of a step of b real rows
    in K micro-batches holds real rows j, their generated rows and (WGAN-GP) their interpolates, m |rows j| rows
    for m parts, which an equal split of the m b rows does not give when K does not divide b. Each micro-batch
    runs as :class:`OptimizerStep` runs it (forward, ``before_backward`` with :attr:`rows`, backward of
    Σ_{n ∈ j} c_n ℓ_n, under DDP ``no_sync`` for all but the last); without micro-batches it is an OptimizerStep."""

    micro_rows: list[slice] | None = None

    def micro_batch_slices(self) -> list[slice]:
        if self.micro_batches > 1 and self.micro_rows is not None:
            return list(self.micro_rows)
        return super().micro_batch_slices()


def micro_batch_order(micro: Sequence[slice], parts: int) -> torch.Tensor | None:
    """The order of a discriminator step's rows ``cat(parts)`` (``parts`` blocks of b rows each: real, generated[,
    interpolates]) that makes each micro-batch's rows contiguous: micro-batch j's real rows, then its generated
    rows (then its interpolates), j = 0, 1, ...; None for one micro-batch (the concatenation as it is)."""
    if len(micro) == 1:
        return None
    b = micro[-1].stop
    return torch.cat([torch.arange(r.start, r.stop) + i * b for r in micro for i in range(parts)])


@dataclass
class StepDraws:
    """What a step drew, to undo when it fails before its update: the trainer's generator's state before the
    step's draws, the global RNG's before its passes, both players' buffers (tensor, saved copy) before the step's
    forwards (by module and name: a forward may rebind a buffer, ``self.mean = ...``): the discriminator step's
    fake pass updates G's (BatchNorm's running statistics, spectral norm's power iteration), and a training
    forward that ran before the failure (micro-batch 0's, when micro-batch 1 fails) D's, also in a generator
    step, whose D keeps its mode; and the DataLoader batch it took."""

    rng: torch.Tensor
    global_rng: dict[str, Any]
    buffers: Sequence[tuple[nn.Module, str, torch.Tensor]] = ()  # (module, buffer name, saved copy)
    real_batch: dict[str, torch.Tensor] | None = None


class GANTrainer:
    """Alternating GAN training on an in-memory data set or a DataLoader.

    Args:
        generator, discriminator: G maps ``[B, latent_dim]`` latents to samples shaped like ``data``
            rows; D maps samples to one score per example (BatchNorm in training mode in either is
            followed exactly: its batch statistics couple the examples, which the graph route splits). D keeps
            its mode in generator steps (see :func:`frozen`): a training-mode D with spectral norm
            advances its power iteration in both players' steps.
        data: ``[N, ...]`` real samples (2-D points, or images in [-1, 1]), or a DataLoader / any
            re-iterable of batches of them (module docstring; :func:`~genkernel.core.tracking.batches.split_batch`
            reads a batch's samples and labels).
        labels: optional ``LongTensor[N]`` (mixture mode or class of each real sample), passed to
            analyzers as ``info["real_labels"]``; with ``num_classes`` the classes G and D are
            conditioned on (required then, each in ``[0, num_classes)``).
        num_classes: a conditional GAN: G is called ``G(z, classes)`` and D ``D(x, classes)`` with
            ``classes`` a ``LongTensor[B]`` (see the module docstring for what each step's rows carry).
            None (default): an unconditional GAN, G(z) and D(x).
        class_sampling: the generator step's classes (conditional only; "uniform" is refused
            without ``num_classes``), drawn from the trainer's generator: ``"data"`` (the default: the classes
            of uniformly drawn real samples, i.e. the data's class frequencies, the mix the
            discriminator sees in its generated rows; a DataLoader's from the labels its batches carry, read
            once without loading a sample from torchvision's ``MNIST`` / ``CIFAR10`` ``targets``, an
            ``ImageFolder``'s ``samples`` or a ``TensorDataset``, with torch's default collate and a sampler
            that visits each example once an epoch: ``core.tracking.batches.dataset_class_labels``) or
            ``"uniform"`` (each class equally often, as
            many cDCGAN scripts do).
        latent_dim: defaults to ``generator.latent_dim``.
        loss: "nonsaturating" (default), "hinge" or "wgan-gp".
        output: what D returns, "logit" (default) or "probability" (D ends in a sigmoid;
            non-saturating loss only); see :class:`GeneratorLoss`.
        g_optimizer, d_optimizer: default Adam (lr ``lr_g`` / ``lr_d``, default 1e-3, ``betas``, default
            (0.5, 0.999)); ``lr_g`` (``lr_d``) with ``g_optimizer`` (``d_optimizer``), or ``betas`` with both
            optimizers given, is refused (a ValueError): they would be ignored.
        lr_scheduler_g, lr_scheduler_d: learning-rate schedules, each stepped after every update of its
            optimizer (:mod:`~genkernel.core.tracking.lr_schedules`): a function optimizer →
            ``LRScheduler`` (for the default optimizers), or a scheduler built over the optimizer passed.
        batch_size: real and generated examples per discriminator step; latents per generator step
            (default 64; with a DataLoader, its batches set the discriminator steps' and its batch size,
            unless given, the generator steps').
        d_steps: discriminator steps per generator step.
        micro_batches: run every step of both players in this many micro-batches, forward and backward one at
            a time with the gradients summed, then one clipping and one optimizer step (gradient accumulation:
            the memory of one micro-batch, the update of the whole batch, up to rounding;
            :class:`~genkernel.core.tracking.step.OptimizerStep`). A generator step's micro-batch j is latents
            rows j; a discriminator step's is real rows j with their generated rows G(z_j) (and WGAN-GP's
            interpolates of those pairs), in one forward of D as the whole batch is (:class:`DiscriminatorStep`):
            what a hand-written accumulating loop runs, BatchNorm's batch statistics included. A batch smaller
            than this (a DataLoader's last) runs one example per micro-batch. Default 1. An attached
            :class:`GANKernelAnalyzer` books such steps exactly.
        gp_weight: λ of the gradient penalty (wgan-gp only).
        r1_gamma: γ of the R1 penalty (Mescheder et al. 2018; StyleGAN's regularizer): with loss
            "nonsaturating" or "hinge", γ/2 · the mean over a step's real rows of ‖∇_x D(x)‖² (the gradient of
            what D returns). The real rows are shown to D a second time as penalty rows, so an analyzer books the
            penalty as contributions of its own (role "penalty"). D must treat examples independently (BatchNorm in
            training mode is refused, as for WGAN-GP). 0 (default): none; beside "wgan-gp" refused, and beside
            ``output="probability"`` (R1 is the gradient of D's logit, not of a sigmoid's probability).
        r1_interval: k, lazy regularization (StyleGAN2, Karras et al. 2020): 1 (default) adds the penalty to every
            discriminator step; k > 1 leaves it out of them and, after every k-th discriminator step, makes a
            regularization step of its own: a discriminator update on that step's real rows alone, its loss
            γ·k/2 · the mean of ‖∇_x D(x)‖² (:meth:`regularization_step`; drawing nothing, as StyleGAN2-ADA's
            "Dreg" phase reuses its iteration's real images). It is an update of D like any other: counted in
            ``d_steps_done`` and booked by an analyzer (its rows are all penalty rows), but not in the iteration's
            ``d_steps``; it does not step D's learning-rate schedule, which counts the discriminator steps, and its
            losses go to ``history["r1_penalty"]``. StyleGAN2 also scales Adam's learning rate by c = k/(k+1) and
            its betas to β^c for D: do that on the ``d_optimizer`` you pass. Needs ``r1_gamma`` > 0.
        discriminator_batches: how a discriminator step shows D its rows. ``"joint"`` (default): the real and the
            generated rows (and the penalty rows) in one forward. ``"separate"``: one forward and backward per kind
            of row (the real rows, then the generated, then the penalty rows), the gradients summed before the one
            update, as PyTorch's DCGAN example, ganhacks and StyleGAN2 do: a D that mixes its batch (BatchNorm in
            training mode, a minibatch-std layer) then normalizes the real rows among themselves and the generated
            among themselves, not over a mixed batch. For a D that treats examples independently the update is the
            joint one up to rounding (spectral norm in training mode excepted: its power iteration advances at each
            forward). Only the penalty rows' forward forms their input gradient (the joint forward forms it for
            every row). With ``micro_batches=K``, micro-batch j runs as such forwards of its rows.
        augment: differentiable augmentation (DiffAugment, Zhao et al. 2020): a :class:`~genkernel.gan.DiffAugment`
            or a policy string (``"color,translation,cutout"``, any comma-separated subset). D sees every row
            through T, real and generated alike, and G's loss is ℓ_G(D(T(G(z)))); T's random parameters are drawn
            per row from the trainer's generator (a discriminator step's after its latents: the real rows', then
            the generated rows'; a generator step's after its latents and classes) and carried in the step (the
            critic's inputs ``(x, roles, params[, classes])``, the generator step's targets ``params`` or
            ``(classes, params)``), so each step's loss is a deterministic function that an analyzer re-evaluates
            exactly, and a resumed run draws what the straight one draws. R1 (``r1_gamma``) is taken on the
            augmented reals, ‖∇_x D(T(x))‖² in the sample before T (StyleGAN2-ADA's): at the real row's own
            augmentation in every step, at a fresh draw in lazy R1's regularization step. Refused beside
            ``loss="wgan-gp"`` and for samples that are not images ``[C, H, W]``. None (default): no augmentation.
        max_grad_norm: global-norm clipping of both players (inf: none).
        mixed_precision: "no" (default), "bf16" or "fp16": both players' training forwards and losses
            run under ``torch.autocast`` to bfloat16 (float16) on their device type, and so does G's pass
            that generates the discriminator step's fake rows (as accelerate's ``mixed_precision``
            wraps G's forward; the rows are read back in float32); weights, gradients, optimizers and the
            EMA stay float32. "fp16" scales both players' losses with one ``torch.amp.GradScaler``
            (:attr:`grad_scaler`, updated after each step as accelerate's is, in checkpoints): a step
            whose scaled gradients overflow is skipped (the scale halved, nothing updated) and the step
            drawn again with fresh draws, counted in :attr:`skipped_steps` (64 skips in a row stop
            training with a NonFiniteError). Needs float32 networks. An attached
            :class:`GANKernelAnalyzer` refuses it unless built with ``mixed_precision="observe"``: it then
            splits both players' half-precision gradients, and its residuals report the rounding.
            Sampling runs in the networks' dtype.
        ema: an exponential moving average of the generator's weights (diffusers' ``EMAModel``,
            ema-pytorch's ``EMA``, ``AveragedModel``), updated after every generator step; checkpoints
            save it, ``sample(..., weights="ema")`` samples with it, and an attached
            :class:`GANKernelAnalyzer` keeps a ledger for it.
        callbacks: :class:`TrainerCallback` objects (e.g. :class:`GANKernelAnalyzer`).
        seed: seeds the trainer's own generator (batches, latents, interpolation factors): an int in [0, 2**64),
            as :func:`~genkernel.core.adapter.seeded_generator` seeds (seeds of 2**32 and more no longer draw the
            numbers of their low 32 bits).
        progress: show a tqdm bar.
        checkpoint_dir, checkpoint_every: write ``checkpoint.pt`` atomically every this many
            iterations (0: never); ``train(..., resume=True)`` continues from it.
        log: a logger ``log(metrics, step)`` (:mod:`genkernel.logging`): ``loss/generator``,
            ``loss/discriminator`` and their ``lr/...`` every ``log_every`` iterations (step =
            ``iteration`` after it). An analyzer logs its own numbers with its own ``log=``.
        log_every: see ``log``.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        data: torch.Tensor | Iterable[Any],
        *,
        labels: torch.Tensor | None = None,
        num_classes: int | None = None,
        class_sampling: str = "data",
        latent_dim: int | None = None,
        loss: str = "nonsaturating",
        output: str = "logit",
        g_optimizer: torch.optim.Optimizer | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        lr_g: float | None = None,
        lr_d: float | None = None,
        betas: tuple[float, float] | None = None,
        lr_scheduler_g: LRSchedulerArg = None,
        lr_scheduler_d: LRSchedulerArg = None,
        batch_size: int | None = None,
        d_steps: int = 1,
        micro_batches: int = 1,
        gp_weight: float = DEFAULT_GP_WEIGHT,
        r1_gamma: float = 0.0,
        r1_interval: int = 1,
        discriminator_batches: str = "joint",
        augment: DiffAugment | str | None = None,
        max_grad_norm: float = math.inf,
        mixed_precision: str = "no",
        ema: Any = None,
        callbacks: Sequence[TrainerCallback] = (),
        seed: int = 0,
        progress: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        log: Callable[[Mapping[str, float], int], None] | None = None,
        log_every: int = 1,
    ) -> None:
        tensor_data = isinstance(data, torch.Tensor)
        if tensor_data and data.dim() < 2:
            raise ValueError(f"data must be a Tensor [N, ...] of real samples, got shape {tuple(data.shape)}")
        if tensor_data and not data.is_floating_point():
            # (as a DataLoader's batches: uint8 images were cast to floats in [0, 255] silently)
            raise TypeError(
                f"data must be a floating Tensor [N, ...] of real samples (images in [-1, 1]), got dtype {data.dtype}: "
                "convert it, e.g. uint8 images as data.float() / 127.5 - 1"
            )
        if tensor_data and data.shape[0] == 0:
            raise ValueError(f"data holds no real samples (shape {tuple(data.shape)}): pass a Tensor [N, ...] with N >= 1")
        if not tensor_data:
            check_reiterable(data, "[N, ...] of real samples")
            batch_size = self._check_iterable_data(data, labels, num_classes, class_sampling, batch_size)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (data.shape[0],)):
            raise ValueError(f"labels must be a LongTensor[{data.shape[0]}] (one per real sample)")
        if labels is not None and num_classes is None:
            # mode ids for analyzers' info["real_labels"] (a LongTensor, -1 on the generated rows): float ids were
            # truncated there, a negative id read as a generated row's
            labels = check_classes(labels, data.shape[0], None, "labels")
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError(
                    f"labels must be ids >= 0 (a real sample's mode or class; -1 marks the generated rows in "
                    f"info['real_labels']), got a minimum of {int(labels.min())}: relabel them 0..n-1"
                )
        if class_sampling not in CLASS_SAMPLING:
            raise ValueError(
                f"class_sampling must be one of {CLASS_SAMPLING} (how a conditional generator step draws its classes), "
                f"got {class_sampling!r}"
            )
        if num_classes is not None:
            num_classes = positive_int(num_classes, "num_classes")
        if num_classes is not None and tensor_data:
            if labels is None:
                raise ValueError(
                    f"a conditional GAN (num_classes={num_classes}) needs the real samples' classes: pass "
                    f"labels=<LongTensor[{data.shape[0]}]> with values in [0, {num_classes})"
                )
            labels = check_classes(labels, data.shape[0], num_classes, "labels")
        # Every real example's class (Tensor data: labels=; a DataLoader: its dataset's, read once without loading a
        # sample, where it tells them): class_sampling="data" draws the generator's classes from them.
        data_classes = labels
        if num_classes is not None and not tensor_data:
            try:
                data_classes = dataset_class_labels(data)
            except ValueError as error:
                if class_sampling == "data":
                    raise ValueError(
                        f"class_sampling='data' draws the generator's classes from the data's labels, which this "
                        f"DataLoader does not give: {error}. Pass class_sampling='uniform' (each class equally often)"
                    ) from error
                data_classes = None
            else:
                data_classes = check_classes(data_classes, data_classes.shape[0], num_classes,
                                             "the DataLoader's dataset's class labels (its targets)")
        if num_classes is not None:
            absent = [] if data_classes is None else sorted(set(range(num_classes)) - set(data_classes.unique().tolist()))
            if class_sampling == "uniform" and absent:
                # D's generated rows take the real rows' classes, so D never sees these classes: G would be trained
                # on them against D's untrained class parameters (an embedding row at its initial values).
                warnings.warn(
                    f"class_sampling='uniform' draws every class in [0, {num_classes}) for the generator, but no real "
                    f"sample has class {absent[:10]}{' ...' if len(absent) > 10 else ''}: the discriminator never sees "
                    "those classes, so G trains on them against D's untrained class parameters. Pass num_classes= the "
                    "classes the data has (relabelled 0..n-1), or class_sampling='data'",
                    RuntimeWarning, stacklevel=2,
                )
        elif num_classes is None and class_sampling != "data":
            raise ValueError(
                f"class_sampling={class_sampling!r} draws a conditional GAN's generator classes: pass num_classes= (and "
                "labels=) for a conditional GAN, or drop class_sampling"
            )
        batch_size = positive_int(64 if batch_size is None else batch_size, "batch_size")
        if tensor_data and batch_size > data.shape[0]:
            raise ValueError(f"batch_size must be in [1, {data.shape[0]}] (the data set size), got {batch_size}")
        d_steps = positive_int(d_steps, "d_steps")
        micro_batches = positive_int(micro_batches, "micro_batches")
        if micro_batches > batch_size:
            # Every step would run one example per micro-batch: fewer micro-batches than asked, silently.
            raise ValueError(
                f"micro_batches={micro_batches} exceeds the batch size {batch_size} (batch_size="
                + (", or the DataLoader's" if not tensor_data else "")
                + "): a micro-batch holds at least one example; pass micro_batches <= the batch size"
            )
        check_max_grad_norm(max_grad_norm)  # here, not at the first step after the callbacks' on_train_start
        if (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Integral)
                or checkpoint_every < 0):
            raise ValueError(f"checkpoint_every must be an int >= 0 (0: never), got {checkpoint_every!r}")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        self.generator = generator
        self.discriminator = discriminator
        self.data = data
        self.labels = labels
        self._data_classes = data_classes if class_sampling == "data" else None
        self._stream = None if tensor_data else IterableBatches(data, self._checked_batch)
        self.num_classes = num_classes
        self.conditional = num_classes is not None
        self.class_sampling = class_sampling if self.conditional else None
        if latent_dim is None:
            latent_dim = getattr(generator, "latent_dim", None)
            if latent_dim is None:
                raise ValueError("pass latent_dim= (the generator has no .latent_dim attribute)")
        # an int >= 1 (a float such as 2.5 was truncated to 2 silently)
        self.latent_dim = positive_int(latent_dim, "latent_dim")
        self._check_latents()
        self.loss = check_loss(loss)
        self.output = output
        self.gp_weight = gp_weight
        self.r1_gamma = check_r1_gamma(r1_gamma, loss, output)
        self.r1_interval = positive_int(r1_interval, "r1_interval")
        if self.r1_interval > 1 and self.r1_gamma == 0:
            raise ValueError(
                f"r1_interval={r1_interval!r} makes the R1 penalty lazy (a regularization step every {r1_interval} "
                "discriminator steps), but r1_gamma is 0 (no penalty): pass r1_gamma=γ > 0, or leave r1_interval at 1"
            )
        if discriminator_batches not in DISCRIMINATOR_BATCHES:
            raise ValueError(
                f"discriminator_batches must be one of {DISCRIMINATOR_BATCHES} (one forward of D over a step's real "
                f"and generated rows, or one forward per kind of row), got {discriminator_batches!r}"
            )
        self.discriminator_batches = discriminator_batches
        self.augment = self._check_augment(augment, data if tensor_data else None)
        penalized = loss == "wgan-gp" or self.r1_gamma > 0
        # (one objective serves the main and the regularization steps, which an analyzer's one tracker of D books:
        # a batch without penalty rows is scored by a plain forward)
        self.critic = DiscriminatorObjective(discriminator, penalty=penalized) if self.augment is None else \
            AugmentedDiscriminatorObjective(discriminator, self.augment, penalty=penalized)
        # The trainer's classes come from its checked labels: no per-step range check (a device sync) in its loss.
        # What the generator steps train (a null model replaces it: G's steps ignoring D); with augment=
        # ℓ_G(D(T(x; params))), its .geometry the un-augmented ℓ_G(D(x)) that input_gradients reads.
        self.g_loss = GeneratorLoss(discriminator, loss, output, conditional=self.conditional) if self.augment is None \
            else AugmentedGeneratorLoss(discriminator, self.augment, loss, output, conditional=self.conditional)
        # (lazily, the regularization steps' rows take γ·k: the main steps have no penalty rows)
        self.d_loss = DiscriminatorLoss(loss, gp_weight, output, discriminator=discriminator,
                                        r1_gamma=self.r1_gamma * self.r1_interval)
        # lr_g, lr_d and betas set the default Adams: given with an optimizer of one's own they were ignored silently
        ignored = [(name, player) for name, value, player in (
            ("lr_g", lr_g, "g_optimizer" if g_optimizer is not None else None),
            ("lr_d", lr_d, "d_optimizer" if d_optimizer is not None else None),
            ("betas", betas, "g_optimizer and d_optimizer" if g_optimizer is not None and d_optimizer is not None
             else None),
        ) if value is not None and player is not None]
        if ignored:
            name, player = ignored[0]
            raise ValueError(
                f"{name} sets the default Adam optimizer, but {player}= is given (its own settings train, {name} would "
                f"be ignored): set it on that optimizer, or drop {name}="
            )
        betas = (0.5, 0.999) if betas is None else betas
        self.g_optimizer = g_optimizer or torch.optim.Adam(
            generator.parameters(), lr=1e-3 if lr_g is None else lr_g, betas=betas)
        self.d_optimizer = d_optimizer or torch.optim.Adam(
            discriminator.parameters(), lr=1e-3 if lr_d is None else lr_d, betas=betas)
        self.lr_scheduler_g = build_lr_scheduler(lr_scheduler_g, self.g_optimizer, "lr_scheduler_g")
        self.lr_scheduler_d = build_lr_scheduler(lr_scheduler_d, self.d_optimizer, "lr_scheduler_d")
        # why a player, its optimizer or the EMA hold part of an update (an interrupt inside optimizer.step() or the
        # EMA's update): every step and state refused until a checkpoint is loaded (torn_update)
        self._torn: str | None = None
        self.batch_size = batch_size
        self.d_steps = d_steps
        self.micro_batches = micro_batches
        self.max_grad_norm = max_grad_norm
        self.mixed_precision = mixed_precision
        self.autocast_dtype = trainer_autocast_dtype(mixed_precision, generator)
        trainer_autocast_dtype(mixed_precision, discriminator)
        self.grad_scaler = trainer_grad_scaler(mixed_precision, first_tensor(generator, "the generator").device)
        # steps a GradScaler skipped (fp16), per player: no update, not counted in g_steps / d_steps_done
        self.skipped_steps = {"generator": 0, "discriminator": 0}
        self._skip_streak = SkipStreak(self.grad_scaler)
        if ema is not None:
            check_trainable_ema(ema, generator)
        self.ema = ema
        self.callbacks = list(callbacks)
        # seeded as seeded_generator does: torch reads a seed's low 32 bits (seed 2**32 drew seed 0's numbers); a seed
        # in [0, 2**32) draws what it drew before, a bool, a float or a seed outside [0, 2**64) is refused
        self.rng = seeded_generator(seed, "seed")
        self.progress = progress
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.logging = None if log is None else LoggingCallback(log, every=log_every)
        self.iteration = 0
        self.g_steps = 0
        self.d_steps_done = 0
        self._iteration_d_steps = 0  # discriminator updates made in the iteration under way
        self.r1_steps_done = 0  # regularization steps made (lazy R1; counted in d_steps_done too)
        # the real rows {"real"[, "labels"]} of the k-th discriminator step, whose regularization step is still to make
        self._r1_batch: dict[str, torch.Tensor] | None = None
        self.history: dict[str, list[float]] = {"d_loss": [], "g_loss": []}
        if self.r1_interval > 1:
            self.history["r1_penalty"] = []
        self._callback_states = CallbackStates()

    # -- sampling ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return first_tensor(self.generator, "the generator").device

    @property
    def dtype(self) -> torch.dtype:
        return first_tensor(self.generator, "the generator").dtype

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, latent_dim]`` standard normal latents from the trainer's generator (or ``generator``)."""
        z = torch.randn(n, self.latent_dim, generator=generator or self.rng, dtype=torch.float64)
        return z.to(device=self.device, dtype=self.dtype)

    def sample_classes(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``LongTensor[n]`` classes for a conditional generator step, from the trainer's generator (or
        ``generator``): ``class_sampling="data"`` the labels of ``n`` uniformly drawn real samples,
        ``"uniform"`` uniform over ``[0, num_classes)``."""
        if not self.conditional:
            raise ValueError("sample_classes belongs to a conditional GAN: build the trainer with num_classes= and labels=")
        rng = generator or self.rng
        if self.class_sampling == "uniform":
            classes = torch.randint(0, self.num_classes, (n,), generator=rng)
        else:
            pool = self._data_classes
            classes = pool[torch.randint(0, pool.shape[0], (n,), generator=rng)]
        return classes.to(self.device)

    def _check_latents(self) -> None:
        """G must take the trainer's latents ``[B, latent_dim]`` (and a conditional G its classes
        ``LongTensor[B]``) (one eval-mode pass on two latents, buffers and RNG kept); a G that takes
        something else is refused with the fix."""
        z = torch.zeros(2, self.latent_dim, dtype=self.dtype, device=self.device)
        takes = classes_taken(self.generator)
        if self.conditional and takes is False:
            raise TypeError(
                f"num_classes={self.num_classes} makes a conditional GAN, G(z, classes), but the generator's forward takes "
                "latents only: drop num_classes (labels alone are passed to analyzers as mode ids), or give G a "
                "forward(z, classes)"
            )
        if not self.conditional and takes is True:
            raise TypeError(
                "the generator's forward takes latents and classes (a conditional G(z, y)): pass num_classes= and "
                "labels= (the real samples' classes) to GANTrainer"
            )
        if self.conditional and classes_taken(self.discriminator) is False:
            raise TypeError(
                f"num_classes={self.num_classes} makes a conditional GAN, whose discriminator is called D(x, classes), but "
                "the discriminator's forward takes samples only: give D a forward(x, classes) (e.g. a class embedding, "
                "or a projection <embed(y), φ(x)>), or drop num_classes for an unconditional GAN"
            )
        own = getattr(unwrap(self.generator), "num_classes", None)
        if self.conditional and isinstance(own, int) and not isinstance(own, bool) and own < self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} but the generator has num_classes={own}: class ids from {own} to "
                f"{self.num_classes - 1} would be drawn (class_sampling='uniform') or accepted as labels that G cannot "
                f"embed; pass num_classes={own}, or build G for {self.num_classes} classes"
            )
        # the smallest and the largest class id (an embedding too small fails here, not at a later step; on the CPU
        # only: an out-of-range index on a GPU is a device-side assert that ends the process)
        top = self.num_classes - 1 if self.conditional and self.device.type == "cpu" else 0
        conditions = (torch.tensor([0, top], dtype=torch.long, device=self.device),) if self.conditional else ()
        try:
            with torch.no_grad(), preserved(self.generator), analysis_mode(self.generator):
                # (the samples' shape [C, H, W]: a generator step draws its rows' augmentation for it)
                self._sample_shape = tuple(output_tensor(self.generator(z, *conditions)).shape[1:])
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            if not not_fitting_inputs(error):  # (an out-of-memory, a failed collective: not the latents' shape)
                raise
            if self.conditional:
                raise ValueError(
                    f"the conditional generator does not take the trainer's inputs G(z [B, {self.latent_dim}], classes "
                    f"LongTensor[B] in [0, {self.num_classes})) ({error}); give G a forward(z, classes) that takes "
                    f"every class id up to num_classes - 1 = {self.num_classes - 1} (or pass the right num_classes)"
                ) from error
            raise ValueError(
                f"the generator does not take the trainer's latents [B, latent_dim] = [B, {self.latent_dim}] ({error}). "
                "A generator with other latents (DCGAN's [B, nz, 1, 1]) trains here wrapped: "
                "nn.Sequential(nn.Unflatten(1, (nz, 1, 1)), generator)"
            ) from error

    def _checked_classes(self, classes: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """A conditional GAN's classes ``LongTensor[batch]`` on G's device (checked), None for an
        unconditional one."""
        if not self.conditional:
            if classes is not None:
                raise ValueError("this GAN is unconditional (no num_classes): G takes latents only, drop classes=")
            return None
        if classes is None:
            raise ValueError(f"this GAN is conditional (num_classes={self.num_classes}): pass classes=<LongTensor[{batch}]>")
        return check_classes(classes, batch, self.num_classes).to(self.device)

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, classes: torch.Tensor | None = None, *, weights: str = "model") -> torch.Tensor:
        """G(latents) (a conditional GAN's G(latents, classes), ``classes`` a ``LongTensor[B]``) in
        eval mode, detached; ``weights="ema"``: with the EMA's weights (``GANTrainer(ema=)``)."""
        classes = self._checked_classes(classes, latents.shape[0])
        if weights not in ("model", "ema"):
            raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
        if weights == "ema" and self.ema is None:
            raise ValueError("weights='ema' samples with the EMA of the generator's weights: build the trainer "
                             "with ema= (e.g. diffusers' EMAModel(generator.parameters(), decay=0.999))")
        weighted = ema_weights(self.ema, self.generator) if weights == "ema" else contextlib.nullcontext(self.generator)
        with weighted as generator, analysis_mode(generator):
            # on the weights' device: an EMA may be kept elsewhere (ema-pytorch's allow_different_devices, offloaded)
            device = next(generator.parameters()).device
            classes = None if classes is None else classes.to(device)
            return output_tensor(generator(latents.to(device), *class_inputs(classes))).detach()

    def input_gradients(
        self, latents: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(G(z), w, ℓ_G)`` with w_i = ∇_x ℓ_G(D(x)) at x = G(z_i) (conditional: ∇_x ℓ_G(D(x, y_i)) at
        x = G(z_i, y_i)), D as in a generator step (its mode kept, its buffers written back after); with ``augment=``
        the un-augmented D's (what an analyzer's geometry reads: an augmented loss has no one value at a sample)."""
        classes = self._checked_classes(classes, latents.shape[0])
        with frozen(self.discriminator):
            geometry = self.g_loss.geometry if isinstance(self.g_loss, AugmentedGeneratorLoss) else self.g_loss
            return discriminator_input_gradients(self.generator, geometry, latents, classes=classes)

    # -- steps ---------------------------------------------------------------------------------
    def discriminator_step(self) -> torch.Tensor | None:
        """One discriminator step; returns the per-example losses (None: a GradScaler skipped it). With lazy R1
        (``r1_interval`` k > 1) the k-th such step leaves its real rows for :meth:`regularization_step`, which
        must come before the next discriminator step (``train()`` makes it)."""
        check_not_torn(self, "discriminator_step()")
        self._refuse_owed_regularization("discriminator")
        rng_before = self.rng.get_state()
        try:
            batch = self._real_batch()
        except BaseException:  # (Tensor data: its rows drawn, then a failure, e.g. an interrupt, loading them)
            self.rng.set_state(rng_before)
            raise
        # the state before the step's passes, the real batch loaded: the fake rows' pass draws from the global RNG
        # (dropout in G) and, G in training mode, updates G's buffers (BatchNorm's running statistics); the training
        # forwards before a failure (micro-batches before the one that fails) update D's
        try:  # (reading the states can fail too, out of memory copying the buffers: the batch is handed back)
            draws = StepDraws(rng_before, global_rng_state(), buffer_snapshot(self.generator, self.discriminator), batch)
        except BaseException:
            self.rng.set_state(rng_before)
            if self._stream is not None:
                self._stream.hand_back(batch)
            raise
        try:
            step = self._discriminator_step(batch)
        except BaseException:  # (G's pass, a batch shaped otherwise, an interrupt): nothing was updated
            self._undo(draws)
            raise
        done = self.d_steps_done
        try:
            return self._perform(step, draws)
        finally:  # (also when a callback raises after the update: the update is made, its regularization owed)
            if self.d_steps_done > done and self.r1_interval > 1 and \
                    (self.d_steps_done - self.r1_steps_done) % self.r1_interval == 0:
                self._r1_batch = batch

    def _refuse_owed_regularization(self, phase: str) -> None:
        """Raise if lazy R1's regularization step is owed: StyleGAN2's order is D, its regularization, then G."""
        if self._r1_batch is not None:
            raise RuntimeError(
                f"discriminator step {self.d_steps_done - self.r1_steps_done} was the {self.r1_interval}-th since the "
                f"last regularization step (r1_interval): call regularization_step() before the next {phase} step"
            )

    def regularization_step(self) -> torch.Tensor | None:
        """Lazy R1's regularization step (``r1_interval`` k > 1), on the real rows of the k-th discriminator step
        since the last one: a discriminator update whose rows are those rows as penalty rows, each with loss
        γ·k/2·‖∇_x D(x)‖², weighted 1/b. Returns the per-example losses (None: a GradScaler skipped it, and the step
        is owed still). Draws nothing but, with ``augment=``, its rows' augmentation (a step a GradScaler skipped
        draws it again). A step refused for a non-finite loss or gradient is not made (its NonFiniteError says
        so) and not owed: it would fail again on the same rows."""
        check_not_torn(self, "regularization_step()")
        if self._r1_batch is None:
            raise RuntimeError(
                "no regularization step is owed: lazy R1 (r1_interval > 1) makes one after every "
                f"{self.r1_interval}-th discriminator step" if self.r1_interval > 1 else
                "regularization_step() is lazy R1's (r1_interval > 1); with r1_interval=1 the penalty is in every "
                "discriminator step"
            )
        draws = StepDraws(self.rng.get_state(), global_rng_state(), buffer_snapshot(self.generator, self.discriminator))
        try:
            step = self._discriminator_step(self._r1_batch, regularization=True)
        except BaseException:
            self._undo(draws)
            raise
        try:
            return self._perform(step, draws)
        except NonFiniteError:
            self._r1_batch = None
            raise
        finally:  # (also when a callback or the logger raises after the update: made, so no longer owed)
            if step.applied:
                self._r1_batch = None

    def _discriminator_step(self, batch: dict[str, torch.Tensor], *, regularization: bool = False) -> OptimizerStep:
        """The discriminator step on the real ``batch``: G's fake rows (and WGAN-GP's interpolates) drawn;
        ``regularization``: lazy R1's step, the real rows as penalty rows alone (nothing drawn but, with
        ``augment=``, their augmentation)."""
        self._check_critic()  # (a step called by itself, outside train(): its draws are undone by the caller)
        real = batch["real"]
        b = real.shape[0]
        # A conditional GAN generates its fake rows at the real rows' classes (matching pairs for the penalty).
        conditions = (batch["labels"],) if self.conditional else ()
        # micro-batch j: real rows j and their generated rows, G run on micro-batch j's latents (a smaller batch
        # than micro_batches, a DataLoader's last: one example per micro-batch)
        micro = micro_batch_rows(b, min(self.micro_batches, b))
        if regularization:  # (augmented: the penalty rows' own draw, as StyleGAN2-ADA's regularization pass)
            params = None if self.augment is None else [self._draw_augmentation(b, real)]
            return self._make_discriminator_step(batch, [real], [torch.full((b,), PENALTY)], micro, params,
                                                 regularization=True)
        z = self.sample_latents(b)
        with torch.no_grad(), autocast_to(self.autocast_dtype, self.device):
            fake = torch.cat([output_tensor(self.generator(z[r], *(c[r] for c in conditions))).detach()
                              for r in micro]) if len(micro) > 1 else \
                output_tensor(self.generator(z, *conditions)).detach()
        fake = fake.to(self.dtype)  # (a bfloat16 pass's rows, read back as the real rows are)
        if fake.shape[1:] != real.shape[1:]:  # (a DataLoader's batch shaped otherwise, a G for other data)
            raise ValueError(
                f"the real samples are shaped {tuple(real.shape[1:])} but the generator's samples are shaped "
                f"{tuple(fake.shape[1:])}: D takes both in one batch; give G and the data (each of its batches) one shape"
            )
        parts, roles = [real, fake], [torch.full((b,), REAL), torch.full((b,), GENERATED)]
        # augment=: the real rows' draws, then the generated rows' (after the latents)
        params = None if self.augment is None else [self._draw_augmentation(b, real), self._draw_augmentation(b, fake)]
        if self.r1_gamma > 0 and self.r1_interval == 1:  # R1: the real rows again, each penalized at itself (no draw)
            parts.append(real)
            roles.append(torch.full((b,), PENALTY))
            if params is not None:  # (at its real row's augmentation: StyleGAN2-ADA's R1 reads that row's pass)
                params.append(params[0])
        elif self.loss == "wgan-gp":  # WGAN-GP: interpolates of the real and generated pairs
            eps = torch.rand(b, generator=self.rng, dtype=torch.float64).to(real)
            eps = eps.view(-1, *([1] * (real.dim() - 1)))
            parts.append(eps * real + (1 - eps) * fake)
            roles.append(torch.full((b,), PENALTY))
        return self._make_discriminator_step(batch, parts, roles, micro, params)

    def _make_discriminator_step(self, batch: dict[str, torch.Tensor], parts: list[torch.Tensor],
                                 roles: list[torch.Tensor], micro: list[slice],
                                 params: list[torch.Tensor] | None = None, *,
                                 regularization: bool = False) -> "DiscriminatorStep":
        """The step over ``parts`` (blocks of b rows each, in the order real, generated, penalty, with ``roles``
        theirs and, with ``augment=``, ``params`` their augmentation parameters ``[b, P]`` each), every row
        weighted 1/b, in the micro-batches ``micro`` (slices of b) and, with ``discriminator_batches="separate"``,
        one forward per block within each."""
        b = batch["real"].shape[0]
        x = torch.cat(parts)
        augmentation = None if params is None else torch.cat(params)
        roles = torch.cat(roles).to(self.device)
        weights = torch.full((x.shape[0],), 1.0 / b, dtype=self.dtype, device=self.device)
        real_labels = torch.full((x.shape[0],), -1, dtype=torch.long)
        if "labels" in batch:  # (the real rows come first; a regularization step's rows are all real rows)
            real_labels[:b] = batch["labels"].cpu()
        classes = batch["labels"].repeat(len(parts)) if self.conditional else None
        order = micro_batch_order(micro, len(parts))
        if order is not None:  # micro-batch j's rows (real j, generated j[, interpolates j]) made contiguous
            x, roles, real_labels = x[order.to(x.device)], roles[order.to(roles.device)], real_labels[order]
            classes = None if classes is None else classes[order.to(classes.device)]
            augmentation = None if augmentation is None else augmentation[order.to(augmentation.device)]
        # (x, roles[, params][, classes]): the critic's forward (AugmentedDiscriminatorObjective's takes the params)
        inputs = (x, roles, *(() if augmentation is None else (augmentation,)), *(() if classes is None else (classes,)))
        # micro-batch j's rows start at len(parts) × its first real row; "separate" runs each block of them (real,
        # generated, penalty rows) on its own
        blocks = len(parts) if self.discriminator_batches == "separate" else 1
        rows = []
        for r in micro:
            first, width = len(parts) * r.start, len(parts) * (r.stop - r.start) // blocks
            rows += [slice(first + i * width, first + (i + 1) * width) for i in range(blocks)]
        info = {"roles": roles, "real_labels": real_labels, "discriminator": self.discriminator, "iteration": self.iteration}
        if regularization:
            info["regularization"] = True
        step = DiscriminatorStep(
            self.critic, self.d_optimizer, self.d_loss, inputs, roles, weights,
            max_grad_norm=self.max_grad_norm, micro_batches=len(rows), phase="discriminator",
            autocast_dtype=self.autocast_dtype, grad_scaler=self.grad_scaler, info=info,
        )
        step.micro_rows = rows
        return step

    def _real_batch(self) -> dict[str, torch.Tensor]:
        """A discriminator step's real rows ``{"real"[, "labels"]}`` on the trainer's device: ``batch_size`` rows
        drawn uniformly from Tensor data (the trainer's generator), or a DataLoader's next batch."""
        if self._stream is not None:
            return self._stream.next()
        index = torch.randint(0, self.data.shape[0], (self.batch_size,), generator=self.rng)
        batch = {"real": self.data[index].to(device=self.device, dtype=self.dtype)}
        if self.labels is not None:
            batch["labels"] = self.labels[index].to(self.device)
        return batch

    def _check_augment(self, augment: Any, data: torch.Tensor | None) -> DiffAugment | None:
        """``augment=`` as a :class:`DiffAugment` (a policy string builds one), or None; refused with the fix: another
        type, a WGAN-GP loss (no exact published counterpart of its interpolates under augmentation: see
        docs/gan.md), Tensor data that is not images ``[N, C, H, W]``."""
        if augment is None:
            return None
        if isinstance(augment, str):
            augment = DiffAugment(augment)
        if not isinstance(augment, DiffAugment):
            raise TypeError(
                f"augment must be a DiffAugment (genkernel.gan.DiffAugment('color,translation,cutout')) or a policy "
                f"string such as 'color,translation,cutout', got {type(augment).__name__}"
            )
        if self.loss == "wgan-gp":
            raise ValueError(
                "augment= with loss='wgan-gp' is not implemented: WGAN-GP's interpolates of augmented rows have no "
                "published DiffAugment/ADA recipe to follow exactly. Use loss='nonsaturating' or 'hinge' (with "
                "r1_gamma= for a gradient penalty: R1 on the augmented reals, StyleGAN2-ADA's), or drop augment="
            )
        if data is not None:
            augment.check_images(data.shape[1:], "the real samples (data rows)")
        augment.check_images(self._sample_shape, "the generator's samples (one per row)")
        return augment

    def _check_generator_loss(self) -> None:
        """With ``augment=``, refuse a ``g_loss`` replaced by one that does not apply the trainer's augmentation: it
        would get the parameters as targets and ignore them, G training unaugmented beside an augmented D."""
        self._check_augmented("g_loss", AugmentedGeneratorLoss, "G's steps would train unaugmented while D's are "
                              "augmented", "AugmentedGeneratorLoss(discriminator, trainer.augment, ...) (it reads its "
                              "parameters from the targets)")

    def _check_critic(self) -> None:
        """With ``augment=``, refuse a ``critic`` replaced by one that does not apply the trainer's augmentation:
        a plain DiscriminatorObjective gets the parameters where a conditional D's classes go (a D with an optional
        second argument ignores them: D trained unaugmented beside an augmented G), one of another DiffAugment
        reads the columns of its own policy order."""
        self._check_augmented("critic", AugmentedDiscriminatorObjective, "D's steps would train on other images than "
                              "G's (the parameters are drawn in the trainer's policy's columns)",
                              "AugmentedDiscriminatorObjective(discriminator, trainer.augment, penalty=...) (it reads "
                              "its parameters from its inputs)")

    def _check_augmented(self, attribute: str, kind: type, harm: str, fix: str) -> None:
        """A ValueError naming ``harm`` and ``fix`` when ``augment=`` is set and ``self.<attribute>`` is not a ``kind``
        applying ``self.augment`` itself."""
        value = getattr(self, attribute)
        if self.augment is None or (isinstance(value, kind) and value.augment is self.augment):
            return
        raise ValueError(f"trainer.{attribute} was replaced by a {type(value).__name__}, which does not apply the "
                         f"trainer's augmentation {self.augment!r}: {harm}. Give {fix}, or build the trainer without "
                         "augment=")

    def _draw_augmentation(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """``[batch, P]`` augmentation parameters for rows shaped like ``like [B, ...]``, from the trainer's
        generator, in the networks' dtype (at least float32) on their device."""
        return self.augment.draw(batch, like.shape[1:], self.rng, dtype=self._augmentation_dtype, device=self.device)

    @property
    def _augmentation_dtype(self) -> torch.dtype:
        """The augmentation parameters' dtype: the networks', at least float32 (bfloat16 holds integers exactly only up
        to 256: a 300-pixel image's cutout offsets 281 and 299 became 280 and 300)."""
        return torch.promote_types(self.dtype, torch.float32)

    @staticmethod
    def _check_iterable_data(data: Any, labels: Any, num_classes: Any, class_sampling: str, batch_size: Any) -> int:
        """Refuse what a DataLoader cannot go with; returns the generator steps' batch size (``batch_size``,
        else the loader's)."""
        if labels is not None:
            raise ValueError(
                "labels= is for Tensor data: a DataLoader's batches carry their labels (an ImageFolder batch's second "
                "element, a dict's 'class_labels')"
            )
        batch_size = getattr(data, "batch_size", None) if batch_size is None else batch_size
        if batch_size is None:
            raise ValueError(
                f"pass batch_size=, the generator steps' batch size: this data ({type(data).__name__}) does not say "
                "its batch size"
            )
        return batch_size

    def _checked_batch(self, raw: Any) -> dict[str, torch.Tensor]:
        """A DataLoader's batch as ``{"real"[, "labels"]}`` on the trainer's device, its types checked (labels kept
        for the analyzers when they are class labels; required of a conditional GAN)."""
        real, labels = split_floating_batch(raw, "real samples", "GANTrainer conditions G and D on class labels "
                                            "alone (num_classes=)")
        n = real.shape[0]
        batch = {"real": real.to(device=self.device, dtype=self.dtype)}
        if self.conditional:
            if labels is None:
                raise ValueError(f"a conditional GAN (num_classes={self.num_classes}) needs each batch's class labels: "
                                 "batches (samples, labels), as an ImageFolder gives, or dicts with 'class_labels'")
            batch["labels"] = check_classes(labels, n, self.num_classes, "the batch's class labels").to(self.device)
        elif is_class_labels(labels, n):
            batch["labels"] = labels.long().to(self.device)
        return batch

    def generator_step(self) -> torch.Tensor | None:
        """One generator step (D's parameters frozen, its modes kept); returns the per-example losses (None: a
        GradScaler skipped it). Refused while lazy R1's regularization step is owed (it comes first)."""
        check_not_torn(self, "generator_step()")
        self._refuse_owed_regularization("generator")
        # the players' buffers too: the training forwards before a failure (micro-batch 0's when micro-batch 1 fails,
        # or the forward whose graph an analyzer refuses) update G's and, D keeping its mode, D's (spectral norm's
        # power iteration, BatchNorm's running statistics): the step run again must start from the same ones
        draws = StepDraws(self.rng.get_state(), global_rng_state(), buffer_snapshot(self.generator, self.discriminator))
        try:
            step = self._generator_step()
        except BaseException:  # (its latents or classes drawn, then a failure, e.g. an interrupt): nothing was updated
            self._undo(draws)
            raise
        with frozen(self.discriminator):
            return self._perform(step, draws)

    def _generator_step(self) -> OptimizerStep:
        """The generator step: its latents (and a conditional GAN's classes) drawn."""
        z = self.sample_latents(self.batch_size)
        info = {"latents": z, "discriminator": self.discriminator, "iteration": self.iteration}
        if self.conditional:  # inputs (z, classes); the loss reads D(G(z, y), y) from its targets
            classes = self.sample_classes(self.batch_size)
            info["classes"] = classes
            inputs, targets = (z, classes), classes
        else:
            inputs, targets = z, None
        if self.augment is not None:  # each row's augmentation, drawn after its latents (and classes), in the targets
            self._check_generator_loss()
            params = self.augment.draw(self.batch_size, self._sample_shape, self.rng, dtype=self._augmentation_dtype,
                                       device=self.device)
            info["augmentation"] = params
            targets = params if targets is None else (targets, params)
        return OptimizerStep(
            self.generator, self.g_optimizer, self.g_loss, inputs, targets,
            max_grad_norm=self.max_grad_norm, micro_batches=self.micro_batches, phase="generator", info=info,
            autocast_dtype=self.autocast_dtype, grad_scaler=self.grad_scaler,
        )

    def _perform(self, step: OptimizerStep, draws: StepDraws) -> torch.Tensor | None:
        """Run ``step`` through the callbacks and count it (``g_steps`` / ``d_steps_done``) once its
        update is in the parameters, also when an error comes after the update (a callback's
        ``on_step_end``, the logging): the counts number the updates made, which analyzers and
        the loop steps of a resumed run follow, and the loss history has one entry per update. A
        step rolled back or never applied is not counted. Its ``draws`` are undone (an analyzer's
        refusal, an interrupt; :meth:`_undo`), so the step run again (``train()`` again, or after a
        resume from a checkpoint written now) is the one an uninterrupted run makes. A step skipped for a non-finite loss or
        gradient keeps its draws used up, as a GradScaler skips such a step: drawn again it would
        fail again, and ``train()`` again goes on with the next draws. A GradScaler's skip (fp16) returns
        None and is counted in :attr:`skipped_steps`; ``train()`` draws the step again. An interrupt inside
        ``optimizer.step()`` (without an analyzer to roll it back) or inside the EMA's update may leave part of that
        update written: the step raises a RuntimeError saying so, and the trainer refuses every further step and
        :meth:`state_dict` until a checkpoint is loaded (:meth:`load_checkpoint`, ``train(resume=True)``)."""
        try:
            losses = perform_step(self.callbacks, self, step)
        except SkippedStep as error:
            self.skipped_steps[step.phase] += 1
            self._skip_streak.skipped(error)
            return None
        except NonFiniteError as error:
            self._count_applied(step)
            raise NonFiniteError(
                f"iteration {self.iteration}, {step.phase} step: {error} (training stopped before this update, "
                "which is skipped: parameters, optimizers and any ledger keep their state from before it, and "
                "train() again goes on with the next draws)"
            ) from error
        except BaseException as error:
            if step.torn:  # (not rolled back: no analyzer, or one that could not undo it)
                # (numbered as the counts number them: d_steps_done counts lazy R1's regularization steps too)
                what = (f"generator step {self.g_steps + 1}" if step.phase == "generator" else
                        f"regularization step {self.r1_steps_done + 1}" if _regularization(step) else
                        f"discriminator step {self.d_steps_done - self.r1_steps_done + 1}")
                raise torn_update(self, f"optimizer.step() of {what}",
                                  f"the {step.phase}'s parameters and its optimizer's state", error, _RESUME_FIX) from error
            self._count_applied(step)
            if not step.applied:
                self._undo(draws)
            raise
        try:  # the logger reads the learning rate that trained this step: before the schedule steps it (an error
            # in the logger, or an interrupt in the EMA's update, still steps the schedule of the update, which is
            # counted)
            self._count_applied(step, schedule=False)
            self._skip_streak.applied()
            if self.logging is not None and _regularization(step):
                self.logging.log_step(self.iteration + 1, loss=self.history["r1_penalty"][-1], phase="r1", trainer=self)
            elif self.logging is not None:
                self.logging.on_step_end(self, step)
        finally:
            self._step_schedule(step)
        return losses

    def _undo(self, draws: StepDraws) -> None:
        """Undo a step's draws: the trainer's generator back to its state before the step drew its rows,
        latents and classes, the global RNG to its state before the step's passes (the discriminator step's
        fake pass included), both players' buffers, which those passes and the training forwards before a failure
        update, to theirs, and a DataLoader's real batch handed back."""
        self.rng.set_state(draws.rng)
        set_global_rng_state(draws.global_rng)
        if self._stream is not None and draws.real_batch is not None:
            self._stream.hand_back(draws.real_batch)
        restore_buffers(draws.buffers)

    def _count_applied(self, step: OptimizerStep, *, schedule: bool = True) -> None:
        """Count an applied step; a generator step also updates the EMA (``ema=``): the EMA follows every update
        that is in G's weights, also one after which a callback raised (a run continued after it is the straight one).
        ``schedule``: also step its player's learning-rate schedule (False: the caller does, after logging).
        Counted before the EMA's update, the schedule stepped after it also when it raised: an interrupt there
        leaves the update counted and scheduled, and refuses to go on, the EMA possibly holding part of it
        (:func:`~genkernel.core.tracking.step.torn_update`)."""
        if not step.applied:
            return
        try:
            if step.phase == "generator":
                loss = float(step.losses.mean())
                self.g_steps += 1
                self.history["g_loss"].append(loss)
                if self.ema is not None:
                    try:
                        step_ema(self.ema, self.generator)
                    except BaseException as error:
                        raise torn_update(self, f"the EMA's update after generator step {self.g_steps}",
                                          "the EMA's weights", error, _RESUME_FIX) from error
            else:
                loss = float((step.losses * step.weights).sum())
                self.d_steps_done += 1
                if _regularization(step):
                    self.r1_steps_done += 1
                    self.history["r1_penalty"].append(loss)
                else:
                    self.history["d_loss"].append(loss)
        finally:
            if schedule:
                self._step_schedule(step)

    def _step_schedule(self, step: OptimizerStep) -> None:
        """Step the learning-rate schedule of an applied step's player (last: a schedule that raises leaves the
        update counted); a regularization step's leaves D's alone (it counts the discriminator steps)."""
        if step.applied and not _regularization(step):
            step_lr_scheduler(self.lr_scheduler_g if step.phase == "generator" else self.lr_scheduler_d)

    # -- loop ----------------------------------------------------------------------------------
    def train(self, iterations: int, *, resume: bool = False) -> dict[str, list[float]]:
        """Run until ``self.iteration == iterations`` (resuming from ``checkpoint_dir/checkpoint.pt``
        when asked and it exists)."""
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
            raise ValueError(f"iterations must be an int >= 0 (the iteration to train up to), got {iterations!r}")
        if resume and self.checkpoint_dir is None:
            raise ValueError("resume=True reads checkpoint_dir/checkpoint.pt: build the trainer with checkpoint_dir=")
        if resume and (self.checkpoint_dir / "checkpoint.pt").exists():
            self.load_checkpoint(self.checkpoint_dir / "checkpoint.pt")
        check_not_torn(self, "train()")
        self._check_generator_loss()  # (before any step: not after D's steps of the first iteration were made)
        self._check_critic()
        # (told this trainer: a callback attached after resume() compares its state with it as resume() would have,
        # before any step)
        self._callback_states.claim(self.callbacks, trainer=self)
        fire(self.callbacks, "on_train_start", self)
        bar = tqdm(total=iterations, initial=self.iteration, disable=not self.progress, desc="gan")
        while self.iteration < iterations:
            # An iteration interrupted after some of its updates were made (an error after a step, then
            # train() again) goes on with the steps it still lacks: no update is made twice. A regularization
            # step owed (lazy R1) comes first, and is not one of the iteration's d_steps.
            while True:
                if self._r1_batch is not None:
                    self.regularization_step()  # (a GradScaler's skip: owed still, made again)
                    continue
                if self._iteration_d_steps >= self.d_steps:
                    break
                done = self.d_steps_done
                try:
                    self.discriminator_step()
                finally:
                    self._iteration_d_steps += self.d_steps_done - done
            done = self.g_steps
            try:
                self.generator_step()
            finally:
                if self.g_steps > done:
                    self._iteration_d_steps = 0
                    self.iteration += 1
            if self.g_steps == done:  # (a GradScaler skipped the generator step: the iteration draws it again)
                continue
            bar.update(1)
            if self.progress and self.iteration % 10 == 0:
                bar.set_postfix(d=f"{self.history['d_loss'][-1]:.3f}", g=f"{self.history['g_loss'][-1]:.3f}")
            if self.checkpoint_every and self.iteration % self.checkpoint_every == 0:
                self.save_checkpoint(self.checkpoint_dir / "checkpoint.pt")
        bar.close()
        fire(self.callbacks, "on_train_end", self)
        if self.logging is not None:
            self.logging.on_train_end(self)
        return self.history

    # -- persistence ---------------------------------------------------------------------------
    def _resume_config(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the trainer that resumes it (another batch
        size, dtype, loss, data set or optimizer would mix two runs)."""
        tensor_data = self._stream is None
        return {
            "data": "Tensor" if tensor_data else "iterable",
            "data_shape": list(self.data.shape) if tensor_data else None,
            # (the same shape is not the same data: another subset or normalization would be mixed in)
            "data_fingerprint": data_fingerprint(self.data, self.labels) if tensor_data else None,
            "batches_per_epoch": None if tensor_data else self._stream.batches_per_epoch,
            "labels": self.labels is not None, "latent_dim": self.latent_dim,
            "loss": self.loss, "output": self.output, "gp_weight": float(self.gp_weight), "r1_gamma": self.r1_gamma,
            "r1_interval": self.r1_interval, "discriminator_batches": self.discriminator_batches,
            "augment": None if self.augment is None else self.augment.settings(),
            "batch_size": self.batch_size, "d_steps": self.d_steps,
            "micro_batches": self.micro_batches,  # (BatchNorm's statistics and the rounding depend on them)
            "max_grad_norm": float(self.max_grad_norm),
            "mixed_precision": self.mixed_precision,  # (another precision rounds every step otherwise)
            "dtype": str(self.dtype), "g_optimizer": type(self.g_optimizer).__name__,
            "d_optimizer": type(self.d_optimizer).__name__,
            "num_classes": self.num_classes, "class_sampling": self.class_sampling,
            # a DataLoader's class counts, which class_sampling="data" draws from (Tensor data: in data_shape's data)
            "class_counts": None if tensor_data or self._data_classes is None
            else torch.bincount(self._data_classes, minlength=self.num_classes).tolist(),
            "ema": None if self.ema is None else ema_settings(self.ema),
            "lr_scheduler_g": lr_scheduler_settings(self.lr_scheduler_g),
            "lr_scheduler_d": lr_scheduler_settings(self.lr_scheduler_d),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue exactly, including the global RNG
        (dropout in G or D draws from it) and the settings a resume must share. Refused while the trainer
        holds a torn update (:meth:`_perform`)."""
        check_between_steps(self, "state_dict()")
        check_not_torn(self, "state_dict()")
        return {
            "format": "genkernel.GANTrainer/2",
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "g_optimizer": self.g_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "lr_schedulers": {name: None if s is None else s.state_dict()
                              for name, s in (("g", self.lr_scheduler_g), ("d", self.lr_scheduler_d))},
            "rng": self.rng.get_state(),
            "iterable": None if self._stream is None else self._stream.state_dict(),
            "iteration": self.iteration,
            "g_steps": self.g_steps,
            "d_steps_done": self.d_steps_done,
            "iteration_d_steps": self._iteration_d_steps,
            "r1_steps_done": self.r1_steps_done,
            "r1_batch": None if self._r1_batch is None else dict(self._r1_batch),
            "history": {k: list(v) for k, v in self.history.items()},
            "callbacks": self._callback_states.save(self.callbacks),
            "global_rng": global_rng_state(),
            "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
            "skipped_steps": dict(self.skipped_steps),
            "config": self._resume_config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. A checkpoint of another set-up (data, batch size,
        d_steps, loss, dtype, networks, optimizers) is refused with a ValueError naming the
        differences, before the networks or optimizers are loaded."""
        check_between_steps(self, "load_state_dict()")
        if not isinstance(state, dict) or state.get("format") != "genkernel.GANTrainer/2":
            raise ValueError("not a GANTrainer checkpoint (written by GANTrainer.save_checkpoint)")
        saved_config = state.get("config")
        if saved_config is not None:  # a checkpoint written before trainers kept EMAs or schedules kept none
            saved_config = {"ema": None, "lr_scheduler_g": None, "lr_scheduler_d": None, "data": "Tensor",
                            "batches_per_epoch": None, "class_counts": None, "micro_batches": 1, "mixed_precision": "no",
                            "r1_gamma": 0.0, "r1_interval": 1, "discriminator_batches": "joint", "augment": None,
                            **saved_config}
        check_resume_config(saved_config, self._resume_config(), "GANTrainer")
        if self._stream is not None and not isinstance(state.get("iterable"), Mapping):
            raise ValueError(
                "the checkpoint records no DataLoader position (it was written by a GANTrainer on Tensor data): resume "
                "it with the Tensor data it was trained on, or start a new run on the DataLoader"
            )
        check_module_state(self.generator, state["generator"], "generator")
        check_module_state(self.discriminator, state["discriminator"], "discriminator")
        for name in ("g_optimizer", "d_optimizer"):
            check_optimizer_state(getattr(self, name), state[name], name)
        if self.ema is not None:
            check_ema_state(self.ema, state.get("ema"))
        # The callbacks' states first: one a callback refuses (an analyzer of other settings) leaves the trainer as
        # it was, and stays pending, so that train() is refused until it is claimed or discarded.
        # (an analyzer whose trackers are not built yet compares the saved trackers' settings with those its trackers
        # will have, this trainer's EMA ledger among them)
        self._callback_states.load(self.callbacks, state["callbacks"], trainer=self)
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        if self.ema is not None:
            load_ema_state(self.ema, state["ema"], self.device)
        for name, scheduler in (("g", self.lr_scheduler_g), ("d", self.lr_scheduler_d)):
            if scheduler is not None:
                scheduler.load_state_dict(state["lr_schedulers"][name])
        self.rng.set_state(state["rng"])
        if self._stream is not None:
            self._stream.load_state_dict(state["iterable"])
        self.iteration, self.g_steps, self.d_steps_done = state["iteration"], state["g_steps"], state["d_steps_done"]
        self._iteration_d_steps = state.get("iteration_d_steps", 0)  # checkpoints are written between iterations
        self.r1_steps_done = state.get("r1_steps_done", 0)
        owed = state.get("r1_batch")
        self._r1_batch = None if owed is None else {k: v.to(self.device) for k, v in owed.items()}
        self.history = {k: list(v) for k, v in state["history"].items()}
        if "global_rng" in state:
            set_global_rng_state(state["global_rng"])
        if self.grad_scaler is not None:  # (the config check: a "fp16" checkpoint has one)
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.skipped_steps = dict(state.get("skipped_steps", {"generator": 0, "discriminator": 0}))
        self._torn = None  # (the players, their optimizers and the EMA are the checkpoint's: whole)

    def discard_callback_states(self, keys: Sequence[str]) -> None:
        """Drop loaded callback states no attached callback claims (training then goes on without them)."""
        self._callback_states.discard(keys)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Everything needed to resume (models, optimizers, RNG, analyzer ledgers), written atomically."""
        atomic_save(self.state_dict(), path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_state(path, "genkernel.GANTrainer/2"))

    def save_samples(self, path: str | os.PathLike, latents: torch.Tensor, *, nrow: int = 8,
                     classes: torch.Tensor | None = None, weights: str = "model") -> None:
        """A sample grid of G(latents) (G(latents, classes) for a conditional GAN; ``weights="ema"``: with the
        EMA's weights) (images; values in [-1, 1] mapped to [0, 1]) via torchvision."""
        from torchvision.utils import save_image

        images = self.sample(latents, classes, weights=weights)
        if images.dim() != 4:
            raise ValueError(f"save_samples needs image samples [B, C, H, W], got shape {tuple(images.shape)}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image((images.float().cpu() + 1) / 2, str(path), nrow=nrow)


# What a trainer holding a torn update (torn_update) must do to go on.
_RESUME_FIX = ("Load the last checkpoint (trainer.load_checkpoint(path), train(..., resume=True), or load_state_dict() "
               "of a saved state), which replaces both players, their optimizers, the EMA and the counts (none written: "
               "build the trainer again); further steps and checkpoints are refused until then")


def _regularization(step: OptimizerStep) -> bool:
    """Whether ``step`` is a lazy-R1 regularization step (:meth:`GANTrainer.regularization_step`)."""
    return bool(step.info.get("regularization", False))


__all__ = ["GANTrainer", "DiscriminatorStep", "frozen", "discriminator_input_gradients"]
