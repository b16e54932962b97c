"""A small DDPM (or flow-matching) trainer on diffusers parts, with the shared callback protocol.

Every update is built as an :class:`~genkernel.core.tracking.step.OptimizerStep` and run through
:func:`~genkernel.core.tracking.callbacks.perform_step`, so an analyzer (a
:class:`~genkernel.core.tracking.callbacks.TrainerCallback`) can take the step over and keep a ledger while
training stays bit-for-bit what it is without it. The trainer draws timesteps and noise (and the
order of Tensor data) from its own seeded ``torch.Generator`` (never the global one), so analysis
passes cannot change what it trains on.

One step (docs/diffusion.md):

1. a batch of clean inputs x_n (and class labels y_n or conditioning embeddings e_n, if any): from Tensor data an epoch-wise
   permutation, from a DataLoader (or any re-iterable of batches) its next batch;
2. timesteps t from the run's density (:mod:`~genkernel.diffusion.timestep_sampling`), by default
   uniform over the T training levels (DDPM: t ~ U{0, …, T−1}; flow matching: the scheduler's grid
   t = σ·T; EDM: ``scheduler.timesteps[randint(0, T)]``, t = ¼ ln σ), and noise ε ~ N(0, I);
3. z = sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) ε (``DDPMScheduler.add_noise``'s numbers: ``noisy_input``) and the target y (ε, v or x),
   ε with the scripts' offset noise and input perturbation if asked (``noise_offset``, ``input_perturbation``); under
   flow matching z = (1 − σ) x + σ ε and y = ε − x; under EDM the model is given c_in (x + σ ε) and
   regresses (x − c_skip z) / c_out, so the plain MSE is the EDM-weighted loss
   (:mod:`~genkernel.diffusion.objectives`);
4. ``OptimizerStep(model(z, t[, y or e]), diffusion_loss, weights=w(t) / B, info={"timesteps": t,
   "class_labels": y, ...})`` through the callbacks, with w the run's loss weighting (none by default:
   the plain mean; Min-SNR-γ, SD3's "sigma_sqrt" or "cosmap"); a model that predicts its variance
   (``variance_type="learned_range"``, DiT's ``learn_sigma``) trains with IDDPM's hybrid loss instead
   (:mod:`~genkernel.diffusion.learned_variance`); with ``micro_batches=K`` the step runs its batch in K
   micro-batches, forward and backward one at a time (gradient accumulation);
5. with an EMA of the weights (``ema=``), its update after the optimizer step, as diffusers' scripts
   update theirs (an attached analyzer keeps a second ledger for the EMA weights).

What a checkpoint reproduces. :meth:`DDPMTrainer.resume` restores the model, the optimizer, the
trainer's generator (so the timesteps and noise continue exactly) and the callbacks' states. With
Tensor data it restores the epoch's permutation and position too; with a DataLoader, its position
as :mod:`~genkernel.core.tracking.batches` records it (the epoch's trained batches are skipped on
resume, the loader's order generators and the global RNG replayed from the epoch's start).

A checkpoint records the trainer's settings (data size, batch size, shuffling, dtype, optimizer
class, clipping, noise schedule) and its model's entries: a trainer built otherwise refuses it
with a ValueError naming the differences, before its model or optimizer is loaded. The device may
differ (the tensors are moved), but a run resumed on another device is not bit-identical.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.adapter import (
    as_tuple, buffer_snapshot, eval_mode, first_tensor, like_parameter, positive_int, restore_buffers, seeded_generator,
)
from ..core.errors import NonFiniteError
from ..core.tracking.callbacks import CallbackStates, TrainerCallback, check_between_steps, fire, perform_step
from ..core.tracking.io import (
    atomic_save, check_module_state, check_optimizer_state, check_resume_config, data_fingerprint, global_rng_state,
    load_state, set_global_rng_state,
)
from ..core.tracking.ema import (
    check_ema_state, check_trainable_ema, ema_settings, ema_weights, load_ema_state, step_ema,
)
from ..core.tracking.batches import (
    IterableBatches, check_reiterable, class_labels, embedding_form, embedding_parts, embedding_shapes,
    is_class_labels, loader_batch_size, map_embeddings, split_batch, split_embedding_batch, split_floating_batch,
)
from ..core.tracking.lr_schedules import LRSchedulerArg, build_lr_scheduler, lr_scheduler_settings, step_lr_scheduler
from ..core.tracking.step import (
    OptimizerStep, autocast_to, check_not_torn, micro_batch_rows, model_output, torn_update, trainer_autocast_dtype,
    trainer_grad_scaler, until_applied,
)
from ..logging import LoggingCallback
from .latents import LatentCoder
from .models import wrapper_settings
from .guidance import (
    ClassDropout, EmbeddingDropout, check_class_labels, check_guidance_scale, class_tables, guided_output,
    null_conditioning_rows,
)
from .learned_variance import LEARNED_RANGE, loss_targets, mean_channels, predicts_variance, training_loss
from .timestep_sampling import Density, Weighting, make_loss_weighting, make_timestep_density
from .objectives import (
    DDPM_PROCESS, check_prediction_type, check_timesteps, dream_correction, noise_process, noise_schedule_config,
    noisy_input, num_train_timesteps, same_noise_schedule, training_levels, training_target,
)

OPTIMIZERS = ("adam", "adamw", "sgd")
CONDITIONINGS = ("none", "class_labels", "embeddings")  # what the model is given beside (x_t, t)
CONDITIONING_NAMES = {"labels": "class labels", "embeddings": "conditioning embeddings"}  # by a batch's key
FORMAT = "genkernel.DDPMTrainer/3"
TENSOR_FORMAT_2 = "genkernel.DDPMTrainer/2"  # checkpoints of Tensor data before iterable data; still load

# What a trainer holding a torn update (torn_update) must do to go on.
_RESUME_FIX = ("Resume from the last checkpoint (trainer.resume(), or load_state_dict() of a saved state), which replaces "
               "the model, the optimizer, the EMA and the counts (none written: build the trainer again); further steps "
               "and checkpoints are refused until then")

__all__ = ["DDPMTrainer", "make_optimizer", "make_sampler", "reverse_sample", "split_batch", "OPTIMIZERS"]


def conditioning_kind(conditional: Any) -> str:
    """One of :data:`CONDITIONINGS` for a trainer's ``conditional=`` (False, True, "class_labels", "embeddings")."""
    if isinstance(conditional, numbers.Integral) and conditional in (0, 1):  # False, True (and 0, 1, as bool() took)
        return "class_labels" if conditional else "none"
    if isinstance(conditional, str) and conditional in CONDITIONINGS[1:]:
        return conditional
    raise ValueError(f"conditional must be False, True (class labels), 'class_labels' or 'embeddings', got {conditional!r}")


def conditioning_dropout(conditioning: str, probability: Any, null_class: Any,
                         null_embedding: Any) -> ClassDropout | EmbeddingDropout:
    """The checked classifier-free-guidance dropout of a trainer's conditioning (:mod:`~genkernel.diffusion.guidance`):
    of class labels towards ``null_class``, of embeddings towards ``null_embedding``."""
    if conditioning == "embeddings":
        if null_class is not None:
            raise ValueError("null_class is the label dropped class labels take; a model conditioned on embeddings drops "
                             "them to null_embedding= (the empty prompt's embedding)")
        return EmbeddingDropout.build(probability, null_embedding)
    if null_embedding is not None:
        raise ValueError("null_embedding is what dropped embeddings become: build the trainer with "
                         "conditional='embeddings' (class labels drop to null_class=)")
    return ClassDropout.build(probability, null_class, conditioning == "class_labels")


def check_takes_labels(model: nn.Module, conditioning: str) -> None:
    """Refuse class labels (``conditioning == "class_labels"``) for a diffusers ``UNet2DModel`` without a class
    embedding (``num_class_embeds`` and ``class_embed_type`` None): its first step failed in diffusers' words,
    "class_embedding needs to be initialized in order to use class conditioning", which named no fix. Other
    models are left to their first step. Returns None."""
    config = getattr(model, "config", None)
    if (conditioning != "class_labels" or type(model).__name__ != "UNet2DModel"
            or getattr(config, "num_class_embeds", 0) is not None or getattr(config, "class_embed_type", 0) is not None):
        return
    raise ValueError(
        "conditional=True gives the model class labels, but this UNet2DModel has no class embedding "
        "(num_class_embeds=None): build it with UNet2DModel(..., num_class_embeds=K) for K classes (K + 1 with "
        "class_dropout=, the null class K), or train it unconditionally (conditional=False, labels left out)"
    )


def check_embedding_width(model: nn.Module, sequence: torch.Tensor, what: str) -> None:
    """Refuse a sequence embedding ``[N, L, D]`` (``what`` names it) whose width D is not the cross-attention width
    of a diffusers ``UNet2DConditionModel`` given it as ``encoder_hidden_states`` (``config.cross_attention_dim``,
    one int, no ``encoder_hid_dim`` projection): its first step failed in torch's words, "mat1 and mat2 shapes
    cannot be multiplied". Other models (a wrapper, a transformer) are left to their first step. Returns None."""
    config = getattr(model, "config", None)
    width = getattr(config, "cross_attention_dim", None)
    if (type(model).__name__ != "UNet2DConditionModel" or isinstance(width, bool) or not isinstance(width, int)
            or getattr(config, "encoder_hid_dim", None) is not None or sequence.dim() != 3
            or sequence.shape[-1] == width):
        return
    raise ValueError(
        f"{what} are {sequence.shape[-1]} wide per token (shaped {tuple(sequence.shape[1:])} per example), but the "
        f"UNet2DConditionModel attends to encoder_hidden_states of width cross_attention_dim={width}: encode the "
        f"prompts with the text encoder the UNet was built for (hidden size {width}), or build the UNet with "
        f"cross_attention_dim={sequence.shape[-1]}"
    )


def noise_scale(value: Any, name: str) -> float:
    """``value`` as a finite number >= 0 (a trainer's noise_offset or input_perturbation); a ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0: none), got {value!r}")
    return float(value)


def check_dream(detail_preservation: Any, scheduler) -> float | None:
    """A trainer's ``dream=`` as a float p >= 0 (None: off); a ValueError where DREAM has no meaning (a scheduler
    other than DDPM ε-prediction, a model that predicts its variance) or p is not a finite number >= 0."""
    if detail_preservation is None:
        return None
    if (isinstance(detail_preservation, bool) or not isinstance(detail_preservation, numbers.Real)
            or not (math.isfinite(detail_preservation) and detail_preservation >= 0)):
        raise ValueError(f"dream must be None (off) or DREAM's detail preservation p, a finite number >= 0 (the "
                         f"paper's 1.0), got {detail_preservation!r}")
    if noise_process(scheduler) != DDPM_PROCESS or check_prediction_type(scheduler) != "epsilon":
        raise ValueError(
            f"dream= corrects ε-prediction on a DDPM scheduler (diffusers' compute_dream_and_update_latents raises "
            f"for v-prediction); this scheduler is {noise_process(scheduler)} with prediction_type "
            f"{check_prediction_type(scheduler)!r}: train it with dream=None"
        )
    if predicts_variance(scheduler):
        raise ValueError("dream= corrects a predicted ε, but a model that predicts its variance too trains on the hybrid "
                         "loss, whose variational term reads the uncorrected z_t: train it with dream=None")
    return float(detail_preservation)


def make_optimizer(model: nn.Module, name: str = "adam", lr: float = 1e-3, *, weight_decay: float = 0.0, momentum: float = 0.0):
    """Adam (default), AdamW or SGD over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    key = name.lower() if isinstance(name, str) else name
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not supported here; choose one of {OPTIMIZERS} or pass an optimizer object")


class DDPMTrainer:
    """Trains a denoiser ``model(x_t, t)`` (or ``model(x_t, t, y)``, ``model(x_t, t, e)``) with a ``diffusers.DDPMScheduler``.

    Args:
        model: the denoiser (:class:`~genkernel.diffusion.models.MLPDenoiser`,
            :func:`~genkernel.diffusion.models.tiny_unet`, or any module called as ``model(x_t, t)``).
        scheduler: a ``DDPMScheduler`` (``make_scheduler``), whose ``prediction_type`` chooses the
            target, or a ``FlowMatchEulerDiscreteScheduler`` (``make_flow_scheduler``: flow matching,
            target ε − x; the model then gets float timesteps t = σ·T), or an ``EDMEulerScheduler``
            (``make_edm_scheduler``: EDM, the model gets c_in z and float timesteps t = ¼ ln σ).
        data: ``Tensor[N, *shape]`` clean training inputs (points ``[N, 2]`` or images ``[N, C, H, W]``),
            or a ``torch.utils.data.DataLoader`` / any re-iterable of batches (:func:`split_batch`);
            every epoch restarts it. See the module docstring for what a checkpoint reproduces.
        labels: ``LongTensor[N]`` class labels of Tensor data (iterable data carries them in its batches).
            Labels reach the analyzers as ``step.info["class_labels"]``.
        conditional: what the model is given as its third positional input: False (default: nothing,
            ``model(x_t, t)``); True or "class_labels": the class labels, ``model(x_t, t, y)`` (a
            class-conditional ``UNet2DModel`` takes them so), and every batch then needs labels;
            "embeddings": conditioning embeddings ``[B, *E]``, ``model(x_t, t, e)`` (a text encoder's
            hidden states encoded beforehand, ``UNet2DConditionModel``'s ``encoder_hidden_states``, as the
            text-to-image scripts' ``--cache`` of prompt embeddings): Tensor data gives them as
            ``embeddings=``, a DataLoader's batches as ``(images, embeddings[, labels])`` or a dict with them
            under "encoder_hidden_states", "prompt_embeds" or "embeddings". Embeddings given as a tuple
            (SD3's and FLUX's sequence and pooled text embeddings; a dict's "pooled_prompt_embeds" or
            "pooled_projections" beside the sequence) are given to the model in order, ``model(x_t, t, e, p)``.
            Class labels beside embeddings are not given to the model; they reach the analyzers (a
            "level_class" partition).
        embeddings: ``Tensor[N, *E]`` floating conditioning embeddings of Tensor data (conditional="embeddings"),
            kept where they are given (on the CPU for a large cache), each batch's rows moved to the model.
        class_dropout, null_class, null_embedding: classifier-free guidance's conditioning dropout
            (conditional only, :mod:`~genkernel.diffusion.guidance`): each example's label is replaced by
            ``null_class`` (an extra row of the class embedding: ``UNet2DModel(num_class_embeds=K + 1)``,
            null_class=K), or its embedding by ``null_embedding`` ``[*E]`` (the empty prompt's encoding; a
            tuple for embeddings given as a tuple, every part of an example dropped together, None for a part
            each example keeps: SDXL's ``time_ids``),
            with probability ``class_dropout``, drawn from the trainer's generator after the noise.
            The analyzers get the labels the model was given as ``info["class_labels"]``, the data's as
            ``info["data_labels"]`` (embeddings: the step's inputs hold those given to the model).
            ``sample(guidance_scale=)`` then samples with guidance.
        shuffle: Tensor data: a fresh permutation every epoch (default; an epoch is its first
            ⌊N / B⌋ batches, the rest of the permutation is left out, a different rest every epoch), or the
            data's own order, batch after batch round the data (rows c, c + 1, ... mod N: every row is
            trained on, none left out when B does not divide N).
        optimizer: "adam" (default), "adamw", "sgd", or a ``torch.optim.Optimizer`` over ``model``.
        lr, weight_decay, momentum: for a named optimizer (refused beside an optimizer object, which
            keeps its own).
        lr_scheduler: a learning-rate schedule stepped after every update
            (:mod:`~genkernel.core.tracking.lr_schedules`): a function optimizer → ``LRScheduler``, e.g.
            ``lambda opt: diffusers.optimization.get_scheduler("cosine", opt, num_warmup_steps=500,
            num_training_steps=10_000)`` as diffusers' scripts schedule, or a scheduler built over the
            optimizer passed as ``optimizer=``. Checkpoints save it; the ledgers follow it.
        batch_size: examples per step of Tensor data (default 128, capped at N); a DataLoader batches itself.
        micro_batches: run each step's batch in this many micro-batches, forward and backward one at a
            time with the gradients summed, then one clipping and one optimizer step (gradient
            accumulation: the memory of one micro-batch, the update of the whole batch, up to rounding;
            :class:`~genkernel.core.tracking.step.OptimizerStep`). ``batch_size=256, micro_batches=4`` is
            diffusers' ``train_batch_size=64, gradient_accumulation_steps=4``. A batch smaller than this
            (a DataLoader's last) runs one example per micro-batch. Default 1. An attached analyzer books
            the step exactly; one whose route reads per-example gradients from the training pass (the
            factored and sketched group states, dense with gradient_route "example") runs its own
            pass instead, in chunks its memory budget sets: one more forward and backward per step.
        max_grad_norm: global-norm gradient clipping (inf: none).
        mixed_precision: "no" (default: every pass in the model's dtype), "bf16" or "fp16": each step's
            forward and loss run under ``torch.autocast`` to bfloat16 (float16) on the model's device
            type, the weights, their gradients, the optimizer and the EMA in float32 (accelerate's
            ``mixed_precision``; on a GPU, faster and lighter). "fp16" scales the loss with a
            ``torch.amp.GradScaler`` (:attr:`grad_scaler`, in checkpoints): a step whose scaled gradients
            overflow is skipped (the scale halved, nothing updated, the EMA and the schedule not
            stepped, counted in :attr:`skipped_steps`) and the next batch drawn, so :meth:`train` still
            makes its ``num_steps`` updates (64 skips in a row stop it with a NonFiniteError). Needs
            float32 parameters (autocast leaves float64 alone). An attached analyzer refuses it unless
            built with ``mixed_precision="observe"``: it then splits the half-precision gradients, and its
            residual reports the rounding (docs/observing.md, "Mixed precision"). Sampling runs in the
            model's dtype.
        timestep_density: how training levels are drawn (:mod:`~genkernel.diffusion.timestep_sampling`):
            "uniform" over the T levels (default), "logit_normal" or "mode" (Stable Diffusion 3's, over
            the grid, as diffusers' SD3 script draws them), "log_normal" (EDM: ln σ ~ N(−1.2, 1.2²),
            continuous), or a density object with other parameters (``LogitNormal(mean=, std=)``, ...).
        loss_weighting: per-level loss weights w(t): "none" (default), "min_snr" (DDPM: Min-SNR-γ, γ = 5;
            ``MinSNR(gamma=)``), "sigma_sqrt" or "cosmap" (flow matching: SD3's). The step minimizes
            (1/B) Σ w(t_n) ℓ_n, and the ledgers book exactly that.
        noise_offset: offset noise (diffusers' text-to-image scripts' ``--noise_offset``, 0.05 to 0.1 common):
            ε = ε₀ + noise_offset · o, o ~ N(0, 1) one value per example and channel ``[B, C, 1, 1]``, drawn
            after the noise; the model learns to change an image's mean brightness. Default 0 (nothing drawn).
        input_perturbation: the scripts' ``--input_perturbation`` (Ning et al., 2023; DDPM only): the noisy
            input is made with ε + input_perturbation · ξ, ξ ~ N(0, I) drawn after the offset, while the
            target stays ε. Default 0 (nothing drawn).
        dream: DREAM's detail preservation p (Zhou et al. 2024; diffusers' text-to-image scripts'
            ``--dream_training`` with ``--dream_detail_preservation``; DDPM ε-prediction only): before each
            step the model's own no-grad prediction ε̂ at (z, t), run in the model's mode and precision in
            chunks of a micro-batch, corrects the noisy input and the target, z' = z + sqrt(1 − ᾱ_t) δ and
            y' = ε + δ with δ = sqrt(1 − ᾱ_t)^p (ε − ε̂) (:func:`~genkernel.diffusion.objectives.dream_correction`);
            the step trains on (z', y') as data, so an analyzer books the corrected inputs. None (default): off;
            the paper and the scripts use 1.0. Its forward runs after the batch's draws and before the step, so
            a step handed back draws its dropout again.
        vae: a frozen VAE (diffusers' ``AutoencoderKL``, ``AutoencoderTiny``) for latent diffusion
            (:mod:`~genkernel.diffusion.latents`): the data are images, and each step encodes its batch and
            draws one latent per image from the posterior, ``(mean + std · ξ − shift_factor) · scaling_factor``
            (ξ from the trainer's generator, before the levels; diffusers' text-to-image scripts'
            ``latent_dist.sample() * scaling_factor``; per channel ``(z − μ_c) · scaling_factor / σ_c`` for a VAE
            with ``latents_mean``/``latents_std``, as SDXL's pipelines), in chunks of a micro-batch; the images
            are kept in the VAE's dtype and on its device. The model, the noise, the
            analyzers and :meth:`sample` live in latent space; :meth:`encode` gives probe latents (the
            posterior's mean), :meth:`decode` images, and :meth:`save_samples` saves decoded images.
            Checkpoints record the VAE's fingerprint. Default None (the model denoises the data itself).
        vlb_weight: λ of the hybrid loss ℓ = MSE + λ L_vlb of a model that predicts its variance too
            (a ``DDPMScheduler(variance_type="learned_range")`` and a model with twice the data's channels,
            as DiT with ``learn_sigma``: :mod:`~genkernel.diffusion.learned_variance`); default 1, as DiT.
        ema: an exponential moving average of the model's weights, updated after every optimizer step:
            diffusers' ``EMAModel(model.parameters(), decay=0.9999)`` (``use_ema_warmup=True`` as
            diffusers' ``train_unconditional.py``), ema-pytorch's ``EMA(model)`` or
            ``torch.optim.swa_utils.AveragedModel``. Checkpoints save it; ``sample(weights="ema")``
            samples with it; an attached ``NoiseLevelAnalyzer`` keeps a ledger for it.
        seed: seeds the trainer's own generator (timesteps, noise, the order of Tensor data) and
            nothing global: an int in [0, 2**64) (one of 2**32 or more is hashed, :func:`~genkernel.core.adapter.seeded_generator`).
        callbacks: :class:`TrainerCallback` objects (analyzers); more can be appended between
            calls of :meth:`train` (an analyzer may attach after a warm-up).
        checkpoint_dir, checkpoint_every: write ``checkpoint.pt`` atomically every that many steps
            (0: only when :meth:`save_checkpoint` is called); :meth:`resume` continues from it.
        progress: show a tqdm bar.
        log: a logger ``log(metrics, step)`` (:mod:`genkernel.logging`): ``loss`` and ``lr``
            (``lr/group<i>`` for further parameter groups) every ``log_every`` steps (step =
            ``global_step`` after the update). An analyzer logs its own
            numbers with its own ``log=`` (pass the same logger for one stream).
        log_every: see ``log``.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        data: torch.Tensor | Iterable[Any],
        *,
        labels: torch.Tensor | None = None,
        conditional: bool | str = False,
        embeddings: torch.Tensor | None = None,
        class_dropout: float = 0.0,
        null_class: int | None = None,
        null_embedding: torch.Tensor | None = None,
        shuffle: bool = True,
        optimizer: str | torch.optim.Optimizer = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        lr_scheduler: LRSchedulerArg = None,
        batch_size: int | None = None,
        micro_batches: int = 1,
        max_grad_norm: float = math.inf,
        mixed_precision: str = "no",
        timestep_density: str | Density = "uniform",
        loss_weighting: str | Weighting = "none",
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        dream: float | None = None,
        vae: nn.Module | None = None,
        vlb_weight: float = 1.0,
        ema: Any = None,
        seed: int = 0,
        callbacks: Sequence[TrainerCallback] = (),
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        progress: bool = True,
        log: Callable[[Mapping[str, float], int], None] | None = None,
        log_every: int = 1,
    ) -> None:
        if batch_size is not None:
            batch_size = positive_int(batch_size, "batch_size")
        self.micro_batches = positive_int(micro_batches, "micro_batches")
        # (a float passed the old check and wrote at the multiples of it that step counts hit: 1.5 every third step)
        if (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Integral)
                or checkpoint_every < 0):
            raise ValueError(f"checkpoint_every must be an int >= 0 (0: never), got {checkpoint_every!r}")
        checkpoint_every = int(checkpoint_every)
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir to write into")
        self.prediction_type = check_prediction_type(scheduler)
        self.model = model
        self.scheduler = scheduler
        self.levels = training_levels(scheduler)[0]  # what a training timestep can be: DDPM 0..T-1, flow σ·T, EDM ¼ ln σ
        self.timestep_density = make_timestep_density(timestep_density)
        self.timestep_density.check(scheduler)
        self.loss_weighting = make_loss_weighting(loss_weighting)
        self.loss_weighting.check(scheduler)
        self.loss_fn = training_loss(scheduler, vlb_weight)
        self.noise_offset = noise_scale(noise_offset, "noise_offset")
        self.input_perturbation = noise_scale(input_perturbation, "input_perturbation")
        if self.input_perturbation and noise_process(scheduler) != DDPM_PROCESS:
            raise ValueError(
                f"input_perturbation is the DDPM scripts' (noisy input from ε + γ ξ, target ε); under "
                f"{noise_process(scheduler)} the target is made from the noisy input's noise, so it has no one meaning "
                "there: leave input_perturbation at 0"
            )
        self.dream = check_dream(dream, scheduler)
        self.latent_coder = None if vae is None else LatentCoder(vae)
        self.conditioning = conditioning_kind(conditional)
        self.class_dropout = conditioning_dropout(self.conditioning, class_dropout, null_class, null_embedding)
        self.class_dropout.check_model(model)
        # the model's class-label tables, read once: the labels it is given are checked against them (a label past
        # the table failed at the first step with torch's "index out of range in self")
        self._class_tables = class_tables(model) if self.conditioning == "class_labels" else []
        check_takes_labels(model, self.conditioning)
        self.shuffle = bool(shuffle)
        param = first_tensor(model, "the model")
        self.device, self.dtype = param.device, param.dtype
        self.mixed_precision = mixed_precision
        self.autocast_dtype = trainer_autocast_dtype(mixed_precision, model)
        self.grad_scaler = trainer_grad_scaler(mixed_precision, self.device)
        self.skipped_steps = 0  # steps a GradScaler skipped (fp16): no update, not in global_step
        self._stream: IterableBatches | None = None  # iterable data: its batches and their position
        self.embedding_shape: tuple[int, ...] | None = None  # E, known from the data (conditional="embeddings")
        if isinstance(data, torch.Tensor):
            self._init_tensor_data(data, labels, embeddings, batch_size)
        else:
            self._init_iterable_data(data, labels, embeddings, batch_size)
        if self.batch_size is not None and self.micro_batches > self.batch_size:
            # Every batch would run one example per micro-batch: fewer micro-batches than asked, silently.
            raise ValueError(
                f"micro_batches={self.micro_batches} exceeds the batch size {self.batch_size} ("
                + ("the DataLoader's" if self._stream is not None else "batch_size=, capped at the N examples")
                + "): a micro-batch holds at least one example; pass micro_batches <= the batch size"
            )
        if isinstance(optimizer, torch.optim.Optimizer):
            # The optimizer keeps its own settings: values given beside it would be ignored silently.
            settings = {"lr": (lr, 1e-3), "weight_decay": (weight_decay, 0.0), "momentum": (momentum, 0.0)}
            given = [name for name, (value, default) in settings.items() if value != default]
            if given:
                raise ValueError(
                    f"{given} are for a named optimizer ('adam', 'adamw', 'sgd'); the "
                    f"{type(optimizer).__name__} passed keeps its own settings. Build it with them "
                    f"(e.g. torch.optim.AdamW(model.parameters(), lr=...)) and drop {given} here"
                )
            self.optimizer = optimizer
        else:
            self.optimizer = make_optimizer(model, optimizer, lr, weight_decay=weight_decay, momentum=momentum)
        self.lr_scheduler = build_lr_scheduler(lr_scheduler, self.optimizer, "lr_scheduler")
        # why the model, optimizer or EMA hold part of an update (an interrupt inside optimizer.step() or the EMA's
        # update): every step and state refused until a checkpoint is loaded (torn_update)
        self._torn: str | None = None
        self.max_grad_norm = max_grad_norm
        if ema is not None:
            check_trainable_ema(ema, model)
        self.ema = ema
        self.seed = seed
        self.callbacks: list[TrainerCallback] = list(callbacks)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.logging = None if log is None else LoggingCallback(log, every=log_every)
        self.generator = seeded_generator(seed, "seed")
        self.global_step = 0
        self.losses: list[float] = []
        # Tensor data: the epoch's permutation and the position in it
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._callback_states = CallbackStates()

    @property
    def conditional(self) -> bool:
        """Whether the model is given conditioning (class labels or embeddings) beside (x_t, t)."""
        return self.conditioning != "none"

    def _init_tensor_data(self, data: torch.Tensor, labels: torch.Tensor | None, embeddings: torch.Tensor | None,
                          batch_size: int | None) -> None:
        if data.dim() < 2 or data.shape[0] < 1:
            raise TypeError(f"data must be a Tensor [N, *shape] of clean training inputs, got shape {tuple(data.shape)}")
        if not data.is_floating_point():
            raise TypeError(f"data must be floating point, got {data.dtype}")
        if self.conditioning == "class_labels" and labels is None:
            raise ValueError("conditional=True passes class labels to the model: give labels=, a LongTensor[N]")
        if (self.conditioning == "embeddings") != (embeddings is not None):
            raise ValueError(
                "conditional='embeddings' passes conditioning embeddings to the model: give embeddings=, a floating "
                "Tensor [N, *E]" if embeddings is None else
                "embeddings= are given to a model conditioned on them: build the trainer with conditional='embeddings'"
            )
        self.data = data.to(**self._input_placement())
        self.labels = None if labels is None else class_labels(labels, data.shape[0], "labels").to(self.device)
        if self.conditioning == "class_labels":
            check_class_labels(self._class_tables, self.labels, "labels=")
        self.embeddings = None
        if embeddings is not None:
            self.embeddings = self._checked_embeddings(embeddings, data.shape[0], "embeddings")
        if self.conditional:  # (a null embedding shaped otherwise: refused now, not at the first step's draws)
            self.class_dropout.check_conditioning(self.labels if self.embeddings is None else self.embeddings,
                                                  "labels" if self.embeddings is None else "embeddings")
        self.batch_size = min(128 if batch_size is None else batch_size, data.shape[0])
        self.input_shape: tuple[int, ...] | None = tuple(data.shape[1:])
        self.sample_shape: tuple[int, ...] | None = self.input_shape  # what the model denoises: the data, or latents
        if self.latent_coder is not None:  # (one image's latent: its shape, and the VAE's check of the data)
            self.sample_shape = tuple(self.latent_coder.mode_latents(self.data[:1], device=self.device,
                                                                     dtype=self.dtype).shape[1:])

    def _init_iterable_data(self, data: Any, labels: Any, embeddings: Any, batch_size: int | None) -> None:
        check_reiterable(data, "[N, *shape] of clean inputs")
        given = [name for name, value in (("labels", labels), ("embeddings", embeddings), ("batch_size", batch_size))
                 if value is not None]
        given += [] if self.shuffle else ["shuffle"]
        if given:
            raise ValueError(
                f"{given[0]}= is for Tensor data: with a DataLoader the batches carry their labels (a "
                "tuple's second element, a dict's 'class_labels') or embeddings (conditional='embeddings': "
                "(images, embeddings[, labels]) tuples, a dict's 'encoder_hidden_states') and the loader sets the "
                "batch size and the order"
            )
        self.data = data
        self.labels = None
        self.embeddings = None
        self.batch_size = loader_batch_size(data)  # (a batch of 16 over 10 examples trains 10)
        self.input_shape = self.sample_shape = None  # known from the first batch
        self._stream = IterableBatches(data, self._checked_batch)

    def _input_placement(self) -> dict[str, Any]:
        """Where the data's inputs are kept: the model's device and dtype, or with ``vae=`` the VAE's (images
        cast once, to the dtype the VAE encodes in, as the scripts' ``pixel_values.to(vae.dtype)``: through a
        bfloat16 denoiser's dtype first, a float32 VAE would encode images rounded to 8 bits of mantissa)."""
        if self.latent_coder is None:
            return {"device": self.device, "dtype": self.dtype}
        return {"device": self.latent_coder.device, "dtype": self.latent_coder.dtype}

    @property
    def num_train_timesteps(self) -> int:
        return num_train_timesteps(self.scheduler)

    # -- one step -----------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch, with timesteps and noise drawn from the trainer's generator.

        Returns:
            ``{"clean", "timesteps", "noise", "noisy", "target"}``, plus ``"labels"`` when the batch
            has class labels (conditional=True: those the model is given), ``"embeddings"``
            ``[B, *E]`` (conditional="embeddings": those the model is given), ``"indices"`` (rows of
            Tensor data), ``"weights"`` (the coefficients c_n = w(t_n) / B ``[B]`` under a loss
            weighting) and, under ``class_dropout``, ``"data_labels"`` or ``"data_embeddings"`` (the
            data's) and ``"dropped"`` (BoolTensor[B]).
        """
        # Where the draws stood: a failure anywhere in here (an encoder, or the noise's allocation, out of memory; an
        # interrupt) hands the batch back, so that the next step (or a checkpoint written now) draws it again, as after
        # a refused step. (Only the VAE's encode did: a failure after it, in the levels' or the noise's draw, kept the
        # rows, levels and noise drawn, and a DataLoader's batch was lost, so the run continued was not the
        # uninterrupted one.)
        position = self._data_position()
        if self._stream is None:
            try:
                batch = self._tensor_batch()
            except BaseException:  # (its permutation drawn, the cursor moved, then the rows' copy failed)
                state, self._order, self._cursor = position
                self.generator.set_state(state)
                raise
        else:
            batch = self._stream.next()
        global_rng = global_rng_state()
        try:
            self._draw_into(batch)
        except BaseException:
            self._hand_back(batch, position, global_rng)
            raise
        return batch

    def _draw_into(self, batch: dict[str, torch.Tensor]) -> None:
        """:meth:`next_batch`'s draws for the data's ``batch``, written into it: a VAE's latents, the levels, the noise,
        the noisy inputs and targets, the loss weights and the conditioning dropout."""
        if self.latent_coder is not None:  # the latents drawn first, as the scripts draw them
            batch["images"] = batch["clean"]
            chunk = -(-batch["clean"].shape[0] // self.micro_batches)  # (a micro-batch's memory, not the batch's)
            batch["clean"] = self.latent_coder.sample_latents(batch["images"], self.generator, device=self.device,
                                                              dtype=self.dtype, chunk=chunk)
        clean = batch["clean"]
        self.sample_shape = tuple(clean.shape[1:])
        timesteps = self.timestep_density.draw(self.scheduler, self.levels, clean.shape[0], self.generator)
        noise = torch.randn(clean.shape, generator=self.generator, dtype=torch.float64)
        if self.noise_offset:  # (drawn only when set: a run without it draws as before; summed in float64, then cast)
            per_channel = (*clean.shape[:2], *([1] * (clean.dim() - 2)))
            noise = noise + self.noise_offset * torch.randn(per_channel, generator=self.generator, dtype=torch.float64)
        input_noise = noise
        if self.input_perturbation:
            input_noise = noise + self.input_perturbation * torch.randn(clean.shape, generator=self.generator,
                                                                        dtype=torch.float64)
        noise, input_noise = noise.to(clean), input_noise.to(clean)
        timesteps = timesteps.to(clean.device)
        batch.update(
            timesteps=timesteps, noise=noise, noisy=noisy_input(self.scheduler, clean, input_noise, timesteps),
            target=training_target(self.scheduler, clean, noise, timesteps),
        )
        loss_weights = self.loss_weighting.weights(self.scheduler, timesteps)
        if loss_weights is not None:  # c_n = w(t_n) / B: the step minimizes the weighted mean
            # divided before the cast to a float16 model's dtype: SD3's σ⁻² reaches 10⁶ at σ = 1/1000 (inf in
            # float16), its c_n = w / B need not; in the wider dtype, so float32 / float64 models are unchanged
            wide = torch.promote_types(loss_weights.dtype, clean.dtype)
            batch["weights"] = (loss_weights.to(device=clean.device, dtype=wide) / clean.shape[0]).to(clean.dtype)
        if self.class_dropout.active:  # drawn last: a run without dropout draws as before
            key = self._model_key
            self.class_dropout.check_conditioning(batch[key], f"the batch's {CONDITIONING_NAMES[key]}")
            batch[f"data_{key}"] = batch[key]
            batch[key], batch["dropped"] = self.class_dropout.draw(batch[key], self.generator)

    @property
    def _model_key(self) -> str:
        """Where a batch holds what the model is given beside (z, t) (conditional only)."""
        return "embeddings" if self.conditioning == "embeddings" else "labels"

    def _checked_embeddings(self, embeddings: Any, n: int, what: str) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``embeddings`` checked as a floating Tensor [n, *E] or a tuple of them (a sequence and a pooled
        embedding, given to the model in that order), shaped per example as the data's (the first seen sets
        it), detached, where and as they were given (:meth:`_on_model` moves them); a TypeError or ValueError
        naming ``what`` otherwise."""
        embeddings = embedding_form(embeddings, what)
        parts = embedding_parts(embeddings)
        for index, part in enumerate(parts):
            if not (isinstance(part, torch.Tensor) and part.is_floating_point() and part.dim() >= 2 and part.shape[0] == n):
                found = f"{part.dtype} {tuple(part.shape)}" if isinstance(part, torch.Tensor) else type(part).__name__
                which = f" as part {index} of the {len(parts)} given" if isinstance(embeddings, tuple) else ""
                raise TypeError(f"{what} must be a floating Tensor [{n}, *E] of conditioning embeddings (or a tuple of "
                                f"them, each with the {n} rows), got {found}{which}")
        if self.embedding_shape is None:
            self._check_model_takes(len(parts))
            check_embedding_width(self.model, parts[0], what)
        shape = embedding_shapes(embeddings)
        if self.embedding_shape is not None and shape != self.embedding_shape:
            raise ValueError(f"{what} are shaped {shape} per example, the data's embeddings {self.embedding_shape}")
        self.embedding_shape = shape
        # detached: embeddings encoded outside torch.no_grad() carry the text encoder's graph, which every step's
        # backward would run into (gradients piling up in the encoder; Tensor data's second step: "backward
        # through the graph a second time")
        return map_embeddings(embeddings, torch.Tensor.detach)

    def _check_model_takes(self, parts: int) -> None:
        """Refuse embeddings of ``parts`` parts for a model whose forward does not take them as its inputs after
        (x_t, t): a pooled embedding given to ``UNet2DConditionModel`` would land on its ``class_labels``
        (ignored without a class embedding, a class embedding's input with one), silently."""
        try:
            parameters = list(inspect.signature(self.model.forward).parameters.values())
        except (TypeError, ValueError):  # (a forward without a signature: the model's own call will tell)
            return
        if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters):
            return
        positional = [p.name for p in parameters
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        names = positional[2 : 2 + parts]
        if len(names) < parts or any(name in ("class_labels", "timestep_cond") for name in names):
            raise ValueError(
                f"the embeddings have {parts} part(s), given to the model after (x_t, t) as its inputs {names}, but "
                f"{type(self.model).__name__}.forward takes {positional}: a UNet2DConditionModel conditions on one "
                "sequence embedding (its next input is class_labels; SDXL's pooled embedding goes through "
                "added_cond_kwargs, a loop of your own): give the sequence alone, or wrap the model in "
                "PositionalInputs to name each input"
            )

    def _on_model(self, embeddings: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``embeddings`` on the model's device and in its dtype, as the model is given them."""
        return map_embeddings(embeddings, lambda part: part.to(device=self.device, dtype=self.dtype))

    def _tensor_batch(self) -> dict[str, torch.Tensor]:
        """The next rows of Tensor data (a new permutation when the epoch's is used up)."""
        n = self.data.shape[0]
        if not self.shuffle:
            # The data's own order, batch after batch through it and round again: rows cursor, cursor + 1, ...
            # (mod N). Restarting at row 0 whenever a whole batch no longer fitted never trained on the last
            # N mod B rows at all.
            if self._order.numel() != n:
                self._order, self._cursor = torch.arange(n), 0
            index = (self._cursor + torch.arange(self.batch_size)) % n
            self._cursor = (self._cursor + self.batch_size) % n
        else:
            if self._cursor + self.batch_size > self._order.numel():
                self._order = torch.randperm(n, generator=self.generator)
                self._cursor = 0
            index = self._order[self._cursor : self._cursor + self.batch_size]
            self._cursor += self.batch_size
        batch = {"indices": index, "clean": self.data[index.to(self.data.device)]}
        if self.labels is not None:
            batch["labels"] = self.labels[index.to(self.labels.device)]
        if self.embeddings is not None:
            # (Tensor data's embeddings stay where they were given, a batch's rows moved: cached text encodings
            # are large, CLIP's 77 × 768 per example 4x a 4 × 64 × 64 latent)
            batch["embeddings"] = self._on_model(map_embeddings(self.embeddings, lambda part: part[index.to(part.device)]))
        return batch

    def _checked_batch(self, raw: Any) -> dict[str, torch.Tensor]:
        """A DataLoader's batch as ``{"clean"[, "labels"][, "embeddings"]}`` on the model's device, its types and
        shapes checked."""
        if self.conditioning == "embeddings":
            clean, embeddings, labels = split_embedding_batch(raw, "clean inputs")
        else:
            # (Tensor data's embeddings= is refused so: the captions' encodings would be ignored)
            clean, labels = split_floating_batch(
                raw, "clean inputs", f"conditional={self.conditional!r} calls the model as model(x_t, t"
                + (", labels)" if self.conditional else ")") + ": pass conditional='embeddings' to give it embeddings "
                "(a UNet2DConditionModel's encoder_hidden_states)")
            embeddings = None
        if self.input_shape is not None and tuple(clean.shape[1:]) != self.input_shape:
            raise ValueError(f"a batch of inputs shaped {tuple(clean.shape[1:])} follows batches shaped {self.input_shape}")
        self.input_shape = tuple(clean.shape[1:])
        batch = {"clean": clean.to(**self._input_placement())}
        if embeddings is not None:
            batch["embeddings"] = self._on_model(
                self._checked_embeddings(embeddings, clean.shape[0], "a batch's conditioning embeddings"))
        if self.conditioning == "class_labels":
            batch["labels"] = class_labels(labels, clean.shape[0], "the batch's class labels (conditional=True)")
            check_class_labels(self._class_tables, batch["labels"], "the batch's class labels (conditional=True)")
        elif is_class_labels(labels, clean.shape[0]):
            batch["labels"] = labels.long()
        if "labels" in batch:
            batch["labels"] = batch["labels"].to(self.device)
        return batch

    def build_step(self, batch: dict[str, torch.Tensor]) -> OptimizerStep:
        """The :class:`OptimizerStep` for ``batch``: inputs (z, t), (z, t, y) or (z, t, e), target y, per-example MSE
        (a model that predicts its variance: the hybrid loss, targets (y, x_0, z_t, t))."""
        inputs = self._model_inputs(batch)
        info = {k: batch[k] for k in ("timesteps", "clean", "noise", "indices", "data_labels", "dropped", "dream")
                if k in batch}
        if "labels" in batch:
            info["class_labels"] = batch["labels"]
        if "weights" in batch:  # what the per-example coefficients are (an analyzer's report names it)
            info["loss_weighting"] = self.loss_weighting.config()
        return OptimizerStep(
            self.model, self.optimizer, self.loss_fn, inputs,
            loss_targets(self.loss_fn, batch["target"], batch["clean"], batch["noisy"], batch["timesteps"]),
            weights=batch.get("weights"),
            max_grad_norm=self.max_grad_norm, micro_batches=min(self.micro_batches, batch["clean"].shape[0]), info=info,
            autocast_dtype=self.autocast_dtype, grad_scaler=self.grad_scaler,
        )

    def step_overhead_forwards(self, model_macs: int) -> float:
        """Example-forwards of the model that a step runs per training example besides the model's forward and
        backward, for the cost estimate's bare step (:func:`~genkernel.core.cost.estimate_cost`'s
        ``step_overhead``): DREAM's no-grad forward (1) and a VAE's encode (its multiply-adds over ``model_macs``,
        the model's per example; counted once the images' shape is known: Tensor data's, a DataLoader's after its
        first batch)."""
        extra = 1.0 if self.dream is not None else 0.0
        if self.latent_coder is not None and self.input_shape is not None and model_macs > 0:
            extra += self.latent_coder.encode_macs(self.input_shape) / model_macs
        return extra

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What the model is called with for ``batch``: (z, t), (z, t, y) or (z, t, *e)."""
        inputs = (batch["noisy"], batch["timesteps"])
        if self.conditioning == "embeddings":
            return (*inputs, *embedding_parts(batch["embeddings"]))
        return (*inputs, batch["labels"]) if self.conditional else inputs

    def dream_correct(self, batch: dict[str, torch.Tensor]) -> None:
        """DREAM (``dream=``): replace ``batch["noisy"]`` and ``batch["target"]`` by their corrections from the model's
        own prediction at the current weights (:func:`~genkernel.diffusion.objectives.dream_correction`), as
        ``compute_dream_and_update_latents`` does before the training forward: one no-grad forward in the model's
        mode (dropout draws from the global RNG, as the scripts') and the step's precision, in the step's
        micro-batches (a micro-batch's activations at a time). Sets ``batch["dream"]`` to p (the step's
        ``info["dream"]``)."""
        inputs = self._model_inputs(batch)
        rows = micro_batch_rows(batch["noisy"].shape[0], min(self.micro_batches, batch["noisy"].shape[0]))
        with torch.no_grad(), autocast_to(self.autocast_dtype, self.device):
            prediction = torch.cat([model_output(self.model, tuple(t[r] for t in inputs)) for r in rows])
        batch["dream"] = self.dream  # (the step's info says so: an analyzer's report names what it trained on)
        batch["noisy"], batch["target"] = dream_correction(self.scheduler, batch["timesteps"], batch["noise"],
                                                           prediction, batch["noisy"], batch["target"], self.dream)

    def train_step(self) -> float:
        """One update through the callbacks (:meth:`attempt_step` until one is made: a GradScaler's skipped steps
        draw the next batch); returns the loss it minimized."""
        return until_applied(self.attempt_step, self.grad_scaler, self._count_skip)

    def _count_skip(self) -> None:
        self.skipped_steps += 1

    def attempt_step(self) -> float:
        """One step through the callbacks; returns the loss it minimized (the mean, or the weighted
        mean Σ c_n ℓ_n under a loss weighting). An update made before a callback raised (in its
        ``on_step_end``, an interrupt) is counted and averaged into the EMA as any other: the model
        holds it, and a run continued after the error is the straight one. A step that failed before its
        update (an analyzer's refusal, an interrupt) hands its batch back: the next step draws the same
        batch, timesteps and noise (call :meth:`next_batch` once to skip it), so a run continued after
        that error is the straight one too (the global RNG goes back as well: a callback that draws from it
        once, in a step that then fails, draws on from the rewound stream, so give such draws a generator
        of their own). A step skipped for a non-finite loss or gradient
        (:class:`~genkernel.core.errors.NonFiniteError`; under "fp16" the GradScaler's
        :class:`~genkernel.core.errors.SkippedStep`) keeps its draws used up, as a GradScaler skips
        such a step: drawn again, it would fail again. An interrupt inside ``optimizer.step()`` (without an
        analyzer to roll it back) or inside the EMA's update may leave part of that update written: the step
        raises a RuntimeError saying so, and the trainer refuses every further step, :meth:`state_dict` and
        :meth:`save_checkpoint` until :meth:`resume` (or :meth:`load_state_dict`) replaces its state."""
        check_not_torn(self, "attempt_step()")
        position = self._data_position()
        batch = self.next_batch()  # (hands its batch back itself when it fails)
        global_rng = buffers = step = None
        try:  # (from here on a failure hands the batch back: reading the states below can run out of memory too)
            global_rng = global_rng_state()
            # the model's buffers (BatchNorm's running statistics): a forward that ran before a failure (DREAM's,
            # micro-batch 0's when micro-batch 1 fails, or the one whose graph an analyzer refuses) advanced them
            buffers = buffer_snapshot(self.model)
            if self.dream is not None:
                self.dream_correct(batch)
            step = self.build_step(batch)
            perform_step(self.callbacks, self, step)
        except BaseException as error:
            if step is not None and step.applied:
                self._count_update(step)
            elif step is not None and step.torn:  # (not rolled back: no analyzer, or one that could not undo it)
                raise torn_update(self, f"optimizer.step() of step {self.global_step + 1}",
                                  "the parameters and the optimizer's state", error, _RESUME_FIX) from error
            elif not isinstance(error, NonFiniteError):  # (a non-finite step is skipped: drawn again, it fails again)
                self._hand_back(batch, position, global_rng)
                if buffers is not None:
                    restore_buffers(buffers)
            hint = self._conditioning_hint(batch) if isinstance(error, ValueError) else None
            if hint is None or "do not fit" not in str(error):
                raise
            raise ValueError(f"{error} ({hint})") from error
        try:  # (the logger numbers the step global_step + 1, so it runs before the count; an error in it still
            # counts the update, which is in the weights)
            if self.logging is not None:
                self.logging.on_step_end(self, step)
        finally:
            loss = self._count_update(step)
        if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
            self.save_checkpoint()
        return loss

    def _data_position(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Where the draws stand before a batch: the trainer's generator's state, Tensor data's epoch order and
        cursor."""
        return self.generator.get_state(), self._order, self._cursor

    def _hand_back(self, batch: dict[str, torch.Tensor], position: tuple[torch.Tensor, torch.Tensor, int],
                   global_rng: dict[str, Any] | None) -> None:
        """Undo the draws of a step that failed before its update (an analyzer's refusal, an interrupt; not a
        non-finite loss, whose draws stay used up), so that the next step (or a checkpoint written now) trains on the same batch, timesteps and
        noise as an uninterrupted run: the generator, the epoch order and cursor go back to ``position``;
        iterable data keeps the batch for the next step (the iterator cannot go back) and no longer counts it
        as trained on; the global RNG goes back to its state after the batch was drawn (``global_rng``), so
        dropout draws again what it drew."""
        state, self._order, self._cursor = position
        self.generator.set_state(state)
        if self._stream is not None:
            held = {"clean": batch.get("images", batch["clean"])}  # (the data's: latents are drawn again)
            for key in ("labels", "embeddings"):
                if key in batch:  # the data's (the conditioning dropout draws again)
                    held[key] = batch.get(f"data_{key}", batch[key])
            self._stream.hand_back(held)
        if global_rng is not None:  # (None: the step failed before reading it, nothing drawn from it since the batch)
            set_global_rng_state(global_rng)

    def _count_update(self, step: OptimizerStep) -> float:
        """Book an update that is in the weights: ``global_step``, the loss it minimized (returned), the EMA's
        update, the learning-rate schedule's step. Counted first: an interrupt in the EMA's update leaves the
        update in the weights counted and the schedule stepped (``train()`` again would otherwise make one update
        more than ``global_step`` says, the schedule one step behind), and refuses to go on, the EMA possibly
        holding part of the update (:func:`~genkernel.core.tracking.step.torn_update`)."""
        losses = step.losses
        loss = float(losses.mean() if step.weights is None else (losses * step.weights.to(losses)).sum())
        self.global_step += 1
        self.losses.append(loss)
        try:
            if self.ema is not None:
                try:
                    step_ema(self.ema, self.model)
                except BaseException as error:
                    raise torn_update(self, f"the EMA's update after step {self.global_step}", "the EMA's weights",
                                      error, _RESUME_FIX) from error
        finally:
            # (last: a schedule that raises, such as OneCycleLR stepped past total_steps, leaves the update counted)
            step_lr_scheduler(self.lr_scheduler)
        return loss

    def _conditioning_hint(self, batch: dict[str, torch.Tensor]) -> str | None:
        """What to change when the model refused the trainer's inputs: labels given but not passed to
        the model (``conditional=False``), or labels passed to a model that wants other conditioning
        (``UNet2DConditionModel``'s ``encoder_hidden_states``); None when neither applies."""
        if not self.conditional and "labels" in batch:
            return ("the model was called as model(x_t, t) although the data has class labels: pass "
                    "conditional=True to call it as model(x_t, t, labels) (a class-conditional UNet2DModel)")
        if self.conditioning == "class_labels":
            return ("conditional=True calls model(x_t, t, labels) with integer class labels LongTensor[B]; a model "
                    "conditioned on embeddings (UNet2DConditionModel's encoder_hidden_states) takes "
                    "conditional='embeddings' with the data's embeddings")
        return None

    def train(self, num_steps: int) -> list[float]:
        """Run ``num_steps`` more updates (firing ``on_train_start``/``on_train_end``); the losses they minimized
        (the means, or the weighted means Σ c_n ℓ_n under a loss weighting)."""
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
        check_not_torn(self, "train()")
        self.model.train()
        # (told this trainer: a callback attached after resume() compares its state with it as resume() would have,
        # before any step)
        self._callback_states.claim(self.callbacks, trainer=self)
        fire(self.callbacks, "on_train_start", self)
        out = []
        bar = tqdm(range(num_steps), desc="ddpm", disable=not self.progress, leave=False)
        for _ in bar:
            out.append(self.train_step())
            bar.set_postfix(loss=f"{out[-1]:.4f}", refresh=False)
        fire(self.callbacks, "on_train_end", self)
        if self.logging is not None:
            self.logging.on_train_end(self)
        return out

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        *,
        labels: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        seed: int = 0,
        keep: Sequence[int] | None = None,
        sampler: Any = None,
        step_kwargs: Mapping[str, Any] | None = None,
        weights: str = "model",
        guidance_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Reverse sampling from pure noise (:func:`reverse_sample`: DDPM unless ``sampler`` is given).

        Args:
            num_samples: S.
            labels: ``LongTensor[S]`` classes to sample (a trainer with conditional=True needs them).
            embeddings: ``Tensor[S, *E]`` conditioning embeddings to sample with (conditional="embeddings":
            the prompts' encodings, shaped as the data's).
            num_inference_steps: reverse steps (default: all T).
            seed: seeds the sampling generator (the global RNG is untouched).
            keep: timesteps t at which to keep the current sample x_t (the input of the step at t).
            sampler, step_kwargs: another diffusers scheduler (class or instance) and its ``step``
                arguments, e.g. ``sampler=DDIMScheduler, num_inference_steps=50``.
            weights: "model" (the trained weights) or "ema" (the EMA's, ``DDPMTrainer(ema=)``).
            guidance_scale: classifier-free guidance's w (:mod:`~genkernel.diffusion.guidance`): 1 samples
                the conditional model, other values need a model trained with ``class_dropout`` (the
                unconditional output: the null class's, or the null embedding's).

        Returns:
            ``(samples [S, *shape], {t: x_t [S, *shape]})``.
        """
        num_samples = positive_int(num_samples, "num_samples")
        if self.sample_shape is None:
            raise RuntimeError("the shape of the samples is known once a batch was drawn: train a step first")
        conditioning = self._sampling_conditioning(num_samples, labels, embeddings)
        guidance_scale = check_guidance_scale(guidance_scale)
        null_conditioning = None
        if guidance_scale != 1.0:
            if not self.class_dropout.active:
                null = "null_embedding=" if self.conditioning == "embeddings" else "null_class="
                raise ValueError(
                    f"guidance_scale={guidance_scale:g} mixes the conditional and the unconditional outputs, but this "
                    f"model never learned an unconditional one: train with class_dropout= and {null} (or "
                    "sample with guidance_scale=1)"
                )
            null_conditioning = self.class_dropout.null_rows(conditioning)
        with self._weights_model(weights) as model:
            return reverse_sample(model, self.scheduler, (num_samples, *self.sample_shape),
                                  num_inference_steps=num_inference_steps, seed=seed, keep=keep, sampler=sampler,
                                  step_kwargs=step_kwargs, conditioning=conditioning, guidance_scale=guidance_scale,
                                  null_conditioning=null_conditioning)

    def _sampling_conditioning(self, num_samples: int, labels: Any, embeddings: Any) -> torch.Tensor | None:
        """What the model is given beside (x_t, t) while sampling: the checked ``labels`` ``[S]`` or
        ``embeddings`` ``[S, *E]`` on the model's device, as the trainer's conditioning asks; None for an
        unconditional model."""
        wanted = self._model_key if self.conditional else None
        given = [name for name, value in (("labels", labels), ("embeddings", embeddings)) if value is not None]
        if given != ([] if wanted is None else [wanted]):
            if wanted is None:
                raise ValueError(f"{given[0]} are for a conditional model (DDPMTrainer(..., conditional="
                                 f"{'True' if given[0] == 'labels' else repr('embeddings')}))")
            form = ("labels, a LongTensor[num_samples] of classes" if wanted == "labels"
                    else "embeddings, a floating Tensor [num_samples, *E] (the prompts' encodings)")
            unwanted = [name for name in given if name != wanted]
            raise ValueError(f"this trainer's model is conditioned on {wanted.replace('labels', 'class labels')}: pass {form} to "
                             "sample" + (f", not {unwanted}" if unwanted else ""))
        if wanted == "labels":
            labels = class_labels(labels, num_samples, "labels").to(self.device)
            check_class_labels(self._class_tables, labels, "the labels to sample")
            return labels
        if wanted == "embeddings":
            return self._on_model(self._checked_embeddings(embeddings, num_samples, "embeddings"))
        return None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of ``images`` ``[S, C, H, W]`` for a trainer with ``vae=``: the posterior's mean, scaled
        as the training latents are (nothing drawn): ``[S, *sample_shape]`` in the model's dtype, on its
        device. An analyzer's probes in latent space (``NoiseLevelAnalyzer(scheduler, trainer.encode(x))``)."""
        return self._coder("encode").mode_latents(images, device=self.device, dtype=self.dtype, chunk=self.batch_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[S, C, H, W]`` (in the VAE's [-1, 1]) of ``latents`` ``[S, *sample_shape]`` (:meth:`sample`'s,
        a trainer with ``vae=``), in the latents' dtype and device."""
        return self._coder("decode").decode(latents, chunk=self.batch_size)

    def _coder(self, verb: str) -> LatentCoder:
        if self.latent_coder is None:
            raise ValueError(f"{verb}() maps between images and latents: this trainer has no vae= (its model "
                             "denoises the data itself)")
        return self.latent_coder

    @contextlib.contextmanager
    def _weights_model(self, weights: str) -> Iterator[nn.Module]:
        """Inside: the model to sample with, the trained one ("model") or one with the EMA's weights
        ("ema": :func:`ema_weights`, no copy of the parameters; the model as it was after the block)."""
        if weights not in ("model", "ema"):
            raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
        if weights == "model":
            yield self.model
            return
        if self.ema is None:
            raise ValueError("weights='ema' samples with the EMA of the weights: build the trainer with ema= "
                             "(e.g. diffusers' EMAModel(model.parameters(), decay=0.9999))")
        with ema_weights(self.ema, self.model) as model:
            yield model

    def save_samples(self, path: str | os.PathLike, num_samples: int = 16, *, labels: torch.Tensor | None = None,
                     embeddings: torch.Tensor | None = None, num_inference_steps: int | None = None, seed: int = 0,
                     sampler: Any = None, weights: str = "model", guidance_scale: float = 1.0) -> torch.Tensor:
        """Generate samples (:meth:`sample`'s arguments) and write them as ``path`` (a PNG: an image grid, or
        a scatter over the data for points) plus ``path`` with suffix ``.pt`` (the tensor). Returns the samples
        (a trainer with ``vae=``: the decoded images, which are what is written)."""
        import matplotlib.pyplot as plt

        samples, _ = self.sample(num_samples, labels=labels, embeddings=embeddings,
                                 num_inference_steps=num_inference_steps, seed=seed,
                                 sampler=sampler, weights=weights, guidance_scale=guidance_scale)
        if self.latent_coder is not None:
            samples = self.decode(samples)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(samples.cpu(), path.with_suffix(".pt"))
        if samples.dim() == 2:
            fig, ax = plt.subplots(figsize=(4, 4))
            if isinstance(self.data, torch.Tensor):
                data = self.data.detach().cpu()
                ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgrey", label="training data")
            ax.scatter(samples[:, 0].cpu(), samples[:, 1].cpu(), s=6, c="C3", label="samples")
            ax.set_aspect("equal", adjustable="datalim")
            ax.legend(fontsize=7)
        else:
            cols = int(math.ceil(math.sqrt(num_samples)))
            rows = int(math.ceil(num_samples / cols))
            fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
            for ax in axes.flat:
                ax.set_axis_off()
            for ax, image in zip(axes.flat, samples.detach().cpu().float()):
                image = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        fig.suptitle(f"samples at step {self.global_step}", fontsize=8)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return samples

    # -- checkpoints ----------------------------------------------------------------------------
    def _resume_config(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the trainer that resumes it (a resume with
        another batch size, dtype, data set size, optimizer or objective would mix two runs)."""
        tensor_data = isinstance(self.data, torch.Tensor)
        return {
            "data": "Tensor" if tensor_data else "iterable",
            "data_shape": list(self.data.shape) if tensor_data else None,
            # (the same shape is not the same data: another subset or normalization would be mixed in)
            "data_fingerprint": (data_fingerprint(self.data, self.labels,
                                                  *(() if self.embeddings is None else embedding_parts(self.embeddings)))
                                 if tensor_data else None),
            "batch_size": self.batch_size,
            "micro_batches": self.micro_batches,  # (BatchNorm's statistics and the rounding depend on them)
            "batches_per_epoch": None if tensor_data else self._stream.batches_per_epoch,
            "shuffle": self.shuffle,
            "labels": self.labels is not None if tensor_data else None,
            # (True / False for class labels / none, as checkpoints written before embeddings record it)
            "conditional": "embeddings" if self.conditioning == "embeddings" else self.conditional,
            "class_dropout": self.class_dropout.config(),
            "dtype": str(self.dtype),
            "optimizer": type(self.optimizer).__name__,
            "lr_scheduler": lr_scheduler_settings(self.lr_scheduler),
            "max_grad_norm": float(self.max_grad_norm),
            "mixed_precision": self.mixed_precision,  # (another precision rounds every step otherwise)
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "learned_variance": getattr(self.loss_fn, "vlb_weight", None),  # λ, or None for a fixed variance
            "noise_schedule": noise_schedule_config(self.scheduler),
            "ema": None if self.ema is None else ema_settings(self.ema),
            "timestep_density": self.timestep_density.config(),
            "loss_weighting": self.loss_weighting.config(),
            "noise_offset": self.noise_offset,
            "input_perturbation": self.input_perturbation,
            "dream": self.dream,
            "vae": None if self.latent_coder is None else self.latent_coder.config(),
            # a wrapper's own settings (PositionalInputs' names, ControlNetDenoiser's scale): not in its state dict, and
            # another order of names routes every input elsewhere
            "model_settings": wrapper_settings(self.model),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue exactly (see the module docstring). Refused
        while the trainer holds a torn update (:meth:`attempt_step`)."""
        check_between_steps(self, "state_dict()")
        check_not_torn(self, "state_dict()")
        iterable = None
        if self._stream is not None:
            iterable = {**self._stream.state_dict(), "sample_shape": self.sample_shape,
                        "input_shape": self.input_shape, "embedding_shape": self.embedding_shape}
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "global_step": self.global_step,
            "losses": list(self.losses),
            "order": self._order.clone(),
            "cursor": self._cursor,
            "iterable": iterable,
            "callbacks": self._callback_states.save(self.callbacks),
            # dropout and other stochastic layers draw from the global RNG, not the trainer's generator
            "global_rng": global_rng_state(),
            "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "config": self._resume_config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. Everything is checked before anything is loaded: a
        checkpoint of another set-up (data, batch size, dtype, model, optimizer) is refused with a
        ValueError naming the differences, and the trainer is left as it was."""
        check_between_steps(self, "load_state_dict()")
        tensor_data = isinstance(self.data, torch.Tensor)
        if not isinstance(state, dict) or state.get("format") not in (FORMAT, TENSOR_FORMAT_2):
            raise ValueError("not a DDPMTrainer checkpoint (written by DDPMTrainer.save_checkpoint)")
        iterable = state.get("iterable")
        if tensor_data != (iterable is None):
            saved, here = ("Tensor", "iterable") if iterable is None else ("iterable", "Tensor")
            raise ValueError(f"the checkpoint was written by a trainer on {saved} data, this one trains on {here} data")
        saved_config = state.get("config")
        if saved_config is not None:
            # a checkpoint written before densities, weightings, EMAs, class dropout and schedules: uniform, unweighted, none
            saved_config = {"timestep_density": {"density": "uniform"}, "loss_weighting": {"weighting": "none"},
                            "ema": None, "class_dropout": ClassDropout().config(), "lr_scheduler": None,
                            "learned_variance": None, "micro_batches": 1, "mixed_precision": "no", "noise_offset": 0.0,
                            "input_perturbation": 0.0, "vae": None, "dream": None, **saved_config}
        check_resume_config(saved_config, self._resume_config(), "DDPMTrainer")
        if tensor_data and int(state["order"].numel()) not in (0, self.data.shape[0]):
            raise ValueError(
                f"the checkpoint's epoch order covers {state['order'].numel()} examples, this data has "
                f"{self.data.shape[0]}: resume with the data the run was saved with"
            )
        check_module_state(self.model, state["model"], "model")
        check_optimizer_state(self.optimizer, state["optimizer"], "optimizer")
        if self.ema is not None:
            check_ema_state(self.ema, state["ema"])
        # The callbacks' states first: one a callback refuses (an analyzer of other settings) leaves the trainer as
        # it was, and stays pending, so that train() is refused until it is claimed or discarded.
        # (an analyzer whose trackers are not built yet compares the saved trackers' settings with those its trackers
        # will have, this trainer's EMA ledger among them)
        self._callback_states.load(self.callbacks, state["callbacks"], trainer=self)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            load_ema_state(self.ema, state["ema"], self.device)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        self.global_step = state["global_step"]
        self.losses = list(state["losses"])
        self._order, self._cursor = state["order"].clone(), state["cursor"]
        if iterable is not None:
            self._stream.load_state_dict(iterable)
            self.sample_shape = None if iterable["sample_shape"] is None else tuple(iterable["sample_shape"])
            shape = iterable.get("input_shape", iterable["sample_shape"])  # (before latents: the same shape)
            self.input_shape = None if shape is None else tuple(shape)
            shape = iterable.get("embedding_shape")
            self.embedding_shape = None if shape is None else tuple(shape)
        if "global_rng" in state:
            set_global_rng_state(state["global_rng"])
        if self.grad_scaler is not None:  # (the config check above: a "fp16" checkpoint has one)
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._torn = None  # (the model, the optimizer and the EMA are the checkpoint's: whole)

    def discard_callback_states(self, keys: Sequence[str]) -> None:
        """Drop loaded callback states no attached callback claims (training then goes on without them)."""
        self._callback_states.discard(keys)

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write the trainer (model, optimizer, generator, data position, callbacks' state) atomically;
        returns the path written. Refused while the trainer holds a torn update (:meth:`attempt_step`)."""
        check_not_torn(self, "save_checkpoint()")
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("pass a path, or build the trainer with checkpoint_dir=")
            path = self.checkpoint_dir / "checkpoint.pt"
        atomic_save(self.state_dict(), path)
        return Path(path)

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load ``path`` (default ``checkpoint_dir/checkpoint.pt``) if it exists; True when loaded."""
        if path is None:
            if self.checkpoint_dir is None:
                return False
            path = self.checkpoint_dir / "checkpoint.pt"
        if not Path(path).is_file():
            return False
        self.load_state_dict(load_state(path))
        return True


def make_sampler(scheduler, sampler: Any = None):
    """A private sampling scheduler on ``scheduler``'s noise schedule.

    Args:
        scheduler: the training ``DDPMScheduler`` (or ``FlowMatchEulerDiscreteScheduler``, ``EDMEulerScheduler``).
        sampler: None (``DDPMScheduler``: ancestral sampling; under flow matching and EDM the training
            scheduler's own class: Euler steps of the flow or of the EDM probability-flow ODE); a
            diffusers scheduler class
            (``DDIMScheduler``, ...), built by ``from_config`` from the entries of the training
            scheduler's config that the class takes; or a scheduler instance, copied with its own
            settings (DDIM's ``timestep_spacing``, ...), which must share the training noise schedule.

    Returns:
        A new scheduler whose ``alphas_cumprod`` (flow matching, EDM: training grid) and prediction type
        are the training scheduler's (``set_timesteps`` on it touches neither ``scheduler`` nor
        ``sampler``).
    """
    from diffusers import DDPMScheduler

    if sampler is None:
        sampler = DDPMScheduler if noise_process(scheduler) == DDPM_PROCESS else type(scheduler)
    cls = sampler if isinstance(sampler, type) else type(sampler)
    if not (hasattr(cls, "from_config") and hasattr(cls, "step") and hasattr(cls, "set_timesteps")):
        raise TypeError(f"sampler must be a diffusers scheduler class or instance (DDIMScheduler, ...), got {cls.__name__}")
    if isinstance(sampler, type):
        accepted = inspect.signature(cls.__init__).parameters
        out = cls.from_config({key: value for key, value in scheduler.config.items() if key in accepted})
    else:
        out = cls.from_config(sampler.config)
    if not same_noise_schedule(scheduler, out):
        raise ValueError(
            f"the sampler {cls.__name__} does not use the training scheduler's noise schedule (alphas_cumprod, or a "
            f"flow-matching or EDM grid, EDM's sigma_data) and prediction type {check_prediction_type(scheduler)!r}: "
            "pass the class, or build "
            f"the instance with {cls.__name__}.from_config(scheduler.config)"
        )
    return out


@torch.no_grad()
def reverse_sample(
    model: nn.Module,
    scheduler,
    shape: Sequence[int],
    *,
    num_inference_steps: int | None = None,
    seed: int = 0,
    keep: Sequence[int] | None = None,
    sampler: Any = None,
    step_kwargs: Mapping[str, Any] | None = None,
    conditioning: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    guidance_scale: float = 1.0,
    null_conditioning: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Reverse sampling from pure noise with a private sampler on ``scheduler``'s noise schedule.

    Args:
        shape: ``(S, *sample shape)``.
        num_inference_steps: reverse steps, a positive int (default: all T).
        seed: seeds the initial noise and the sampler's noise (a private generator, :func:`~genkernel.core.adapter.seeded_generator`:
            an int in [0, 2**64)); the global RNG is untouched.
        keep: timesteps (a sequence, Tensor or array) at which to keep the state the model is given at that step
            (``sampler.scale_model_input(x_t, t)``: x_t itself for DDPM and DDIM); a requested t that
            is not a reverse step of this schedule (it must be a training timestep 0..T−1: ValueError
            otherwise) is snapped to the nearest one, which must be an
            integer timestep (a sampler's fractional one, EulerDiscreteScheduler with
            ``timestep_spacing="linspace"``, is refused: ValueError). Under flow matching a level is
            any real t = σ·T, under EDM t = ¼ ln σ: states are kept at the sampler's own float
            timesteps, keyed by them (EDM: the state the model is given, c_in x_t).
        sampler: None (DDPM ancestral sampling; flow matching and EDM: Euler steps) or a
            diffusers scheduler class or instance such as ``DDIMScheduler`` (:func:`make_sampler`).
        step_kwargs: extra arguments of the sampler's ``step``: ``{"eta": 1.0}`` for DDIM, whose
            default ``eta=0`` makes sampling a deterministic function of the initial noise.
        conditioning: extra model inputs with S rows (class labels) for ``model(x_t, t, *conditioning)``.
        guidance_scale, null_conditioning: classifier-free guidance (:func:`~genkernel.diffusion.guidance.guided_output`):
            the sampler steps with F(∅) + w (F(y) − F(∅)), ∅ = ``null_conditioning`` (as ``conditioning``,
            e.g. the null class in every row; a part given as None is the samples' own, SDXL's ``time_ids``); w = 1
            (default) is the conditional model alone.

    Returns:
        ``(x_0 samples [S, *shape[1:]], {t: state [S, *shape[1:]]})``, keyed by the steps used (int
        timesteps; under flow matching and EDM float ones).

    The model runs in eval mode; afterwards every module is in the mode it was in. Given the same initial
    noise, this is diffusers' ``DDPMPipeline`` / ``DDIMPipeline`` loop before its ``(x / 2 + 0.5).clamp(0, 1)``
    (tests/test_sampling_review.py); the initial noise is drawn in float64 (the same for every model dtype),
    so with the same seed it is not the pipeline's float32 draw.
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, SequenceABC) or len(shape) < 2:
        raise ValueError(f"shape must be (S, *sample shape) with at least one sample dimension, e.g. (16, 2) or "
                         f"(16, 3, 32, 32), got {shape!r}")
    shape = tuple(positive_int(n, "every entry of shape") for n in shape)
    if num_inference_steps is not None:
        # 0 sampled all T steps (it read as "not given") and a negative count none: the noise came back as samples
        num_inference_steps = positive_int(num_inference_steps, "num_inference_steps (None: all T steps)")
    if keep is not None and (isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable)):
        raise TypeError(f"keep must be a sequence of timesteps, e.g. keep=[{keep!r}], got {type(keep).__name__}")
    keep = [] if keep is None else list(keep)  # (a Tensor or array of timesteps too: `keep or ()` raised for one)
    generator = seeded_generator(seed, "seed")
    sampler = make_sampler(scheduler, sampler)
    # A model that predicts its variance (learned_range) gives 2C channels: a DDPM sampler with learned_range steps
    # with them; any other sampler gets the mean channels alone, as diffusers' DiT pipeline gives it.
    learned_variance = predicts_variance(scheduler)
    from diffusers import DDPMParallelScheduler, DDPMScheduler

    sampler_variance = getattr(sampler.config, "variance_type", None)
    ddpm_family = isinstance(sampler, (DDPMScheduler, DDPMParallelScheduler))  # their step splits off the variance
    sampler_reads_variance = ddpm_family and sampler_variance == LEARNED_RANGE
    if ddpm_family and sampler_variance == "learned":
        raise ValueError(
            f"the sampler's variance_type='learned' takes the model's raw output as the variance; sample with "
            f"variance_type={LEARNED_RANGE!r} (a model trained with it) or a fixed variance_type"
        )
    if not ddpm_family and sampler_variance in ("learned", LEARNED_RANGE):
        # DPM-Solver, SA-Solver with a learned variance_type (copied from the training config) keep the first 3
        # channels of what they are given (RGB's mean): they get the mean channels here, and no variance_type
        sampler = type(sampler).from_config(sampler.config, variance_type=None)
    sampler.set_timesteps(num_inference_steps or num_train_timesteps(scheduler))
    real = noise_process(scheduler) != DDPM_PROCESS  # flow matching, EDM: real levels
    times = [float(t) for t in sampler.timesteps]
    steps = times if real else [int(t) for t in times]
    # Indices of the reverse steps whose states are kept: each requested t snapped to the nearest
    # of the sampler's own timesteps (the first, noisiest, on a tie).
    wanted = set()
    for t in keep:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) and not (
                isinstance(t, torch.Tensor) and t.numel() == 1 and not t.dtype == torch.bool):
            raise TypeError(f"keep must hold timesteps (numbers), got {t!r}")
        # snapping one outside the training levels would keep the state at the first or last step, under a key
        # the schedule lacks
        if not real and not 0 <= float(t) <= num_train_timesteps(scheduler) - 1:
            raise ValueError(f"keep asks for t={float(t):g}, outside the training timesteps 0..{num_train_timesteps(scheduler) - 1}")
        if real:  # flow matching: t = σ·T in [0, T]; EDM: finite ¼ ln σ up to the largest level
            check_timesteps(torch.tensor([float(t)], dtype=torch.float64), scheduler, name="keep")
        index = min(range(len(times)), key=lambda i: abs(times[i] - float(t)))
        if not real and times[index] != steps[index]:
            # A fractional timestep (EulerDiscreteScheduler with timestep_spacing="linspace", ...): the
            # state is at noise level times[index], the model was evaluated there, but the key and every
            # kernel read at it (retrieval stages, noisy training inputs) are integer timesteps.
            integer = [int(u) for u in times if u == int(u)]
            raise ValueError(
                f"keep (retrieval_attribution's stages) asks for t={t}, whose nearest reverse step of {type(sampler).__name__} is the fractional "
                f"timestep {times[index]:g}: a state kept there is at that noise level, not at an integer t, so "
                "kernels read at its integer key would not be the model the sampler ran; use DDPMScheduler or "
                "DDIMScheduler (integer timesteps), or this sampler with timestep_spacing='leading' or 'trailing', "
                f"or keep only its integer-valued steps {integer}"
            )
        wanted.add(index)
    extra = () if conditioning is None else as_tuple(conditioning, name="conditioning")
    if any(c.shape[0] != shape[0] for c in extra):
        raise ValueError(f"conditioning needs one row per sample ({shape[0]}), got {[tuple(c.shape) for c in extra]}")
    guidance_scale = check_guidance_scale(guidance_scale)
    if guidance_scale != 1.0 and not extra:
        raise ValueError(
            f"guidance_scale={guidance_scale:g} guides a conditional model between its conditional and unconditional "
            "outputs: pass conditioning= (the labels) and null_conditioning= (the null class in every row), or "
            "guidance_scale=1 for a model without conditioning"
        )
    null_extra = () if null_conditioning is None else null_conditioning_rows(null_conditioning, extra)
    if guidance_scale != 1.0 and [(c.shape, c.dtype) for c in null_extra] != [(c.shape, c.dtype) for c in extra]:
        raise ValueError(
            f"guidance_scale={guidance_scale:g} needs null_conditioning shaped as conditioning "
            f"({[tuple(c.shape) for c in extra]}), got {[tuple(c.shape) for c in null_extra]}"
        )
    if sampler_reads_variance and not learned_variance:
        raise ValueError(
            "the sampler's variance_type='learned_range' reads a variance from the model's output, but the training "
            "scheduler's variance is fixed (the model predicts none): sample with the training scheduler's "
            "variance_type, or train with variance_type='learned_range' and twice the data's channels"
        )
    channels = int(shape[1])
    param = first_tensor(model, "the model")
    if step_kwargs is not None and not isinstance(step_kwargs, Mapping):
        raise TypeError(f"step_kwargs must be a dict of the sampler's step arguments, e.g. {{'eta': 1.0}}, got "
                        f"{type(step_kwargs).__name__}")
    kwargs = dict(step_kwargs or {})
    # what the loop passes itself: a generator given here was replaced by the seed's without a word
    reserved = sorted(set(kwargs) & {"generator", "return_dict", "model_output", "timestep", "sample"})
    if reserved:
        raise ValueError(f"step_kwargs {reserved} are set by reverse_sample (the sampler's noise comes from seed=, "
                         "the loop reads .prev_sample): drop them and pass seed= for another draw")
    if "generator" in inspect.signature(sampler.step).parameters:
        kwargs["generator"] = generator
    # A flow-matching sampler starts at σ = 1 (pure noise, scale 1) and gives the model x_t itself; an EDM
    # one starts at scale init_noise_sigma and gives the model c_in x_t (scale_model_input).
    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(param) * getattr(sampler, "init_noise_sigma", 1.0)
    scale_input = getattr(sampler, "scale_model_input", lambda sample, timestep: sample)
    # floating conditioning (embeddings) in the model's dtype, as the trainer gives it in training
    extra, null_extra = tuple(like_parameter(c, param) for c in extra), tuple(like_parameter(c, param) for c in null_extra)
    kept: dict[float, torch.Tensor] = {}
    with eval_mode(model):  # every module's own mode back afterwards
        for index, (t, step) in enumerate(zip(sampler.timesteps, steps)):
            state = scale_input(x, t)
            if index in wanted:
                kept[step] = state.clone()
            timestep = t.to(x.device).repeat(x.shape[0])
            out = guided_output(model, state, timestep, extra, null_extra, guidance_scale,
                                unguided_channels=channels if learned_variance else 0)
            if learned_variance:  # 2C channels, or the fix named (diffusers' learned-range step fails on C with a TypeError)
                mean = mean_channels(out, channels)
                if not sampler_reads_variance:
                    out = mean
                elif index == len(steps) - 1 and steps[index] > 0:
                    # a last step from t > 0 straight to x_0 (timestep_spacing="trailing"): diffusers adds noise
                    # whenever t > 0, and the learned u would interpolate it towards β'_t; x_0 is the posterior's
                    # mean, with no noise in IDDPM: u = −1, the posterior's variance (0, which diffusers floors at 1e-20)
                    out = torch.cat([mean, torch.full_like(mean, -1.0)], dim=1)
            x = sampler.step(out, t, x, **kwargs).prev_sample
    return x, kept
