"""diffusers' DreamBooth fine-tuning example, with genkernel's noise-level analyzer splitting every correction
into the subject's (instance) images and the prior-preservation (class) images.

The flow is that of diffusers' ``examples/dreambooth/train_dreambooth.py``: a few images of one subject in
``--instance_data_dir``, all captioned ``--instance_prompt`` ("a photo of sks dog"); with
``--with_prior_preservation``, images of its class in ``--class_data_dir`` captioned ``--class_prompt`` ("a
photo of dog"), of which ``--num_class_images`` are used. Each example of the dataset pairs instance image
``i % N_instance`` with class image ``i % N_class`` (its length the larger count), and a batch of B examples is
B instance rows then B class rows (upstream's ``collate_fn``), run through the UNet in one forward; the loss is
``mse(instance half) + --prior_loss_weight · mse(class half)``. A frozen VAE encodes the images into latents
(``latent_dist.sample()`` times its ``scaling_factor``) and a frozen text encoder the prompts (tokenized to
``model_max_length``); a ``UNet2DConditionModel`` trains on ``(noisy latents, timesteps, encoder_hidden_states)``
with a ``DDPMScheduler``, upstream's ``--offset_noise`` (0.1 · a per-channel draw added to the noise) and
Min-SNR ``--snr_gamma``, AdamW, the lr schedule, gradient accumulation (``accelerator.accumulate``), clipping at
``--max_grad_norm`` and checkpoints every ``--checkpointing_steps`` optimizer steps (``accelerator.save_state``,
the UNet saved by upstream's hook), resumed with ``--resume_from_checkpoint``. ``--train_text_encoder`` trains the
text encoder with the UNet, as upstream: one AdamW over both, clipped together, both prepared, saved under
``unet/`` and ``text_encoder/`` in the checkpoints by upstream's hooks, the prompts encoded with gradients.
``--rank R`` is its LoRA script's flow (``train_dreambooth_lora.py``): the UNet (and with ``--train_text_encoder``
the text encoder) frozen, peft adapters of rank R on the attention projections (``LoraConfig(r=R, lora_alpha=R,
init_lora_weights="gaussian")``), the optimizer over them (its default ``--learning_rate`` 5e-4, upstream's), the
adapters saved as ``pytorch_lora_weights.safetensors`` (``StableDiffusionPipeline.save_lora_weights``); its
checkpoints hold the whole prepared models, as ``train_text_to_image.py``'s LoRA flow's do (upstream's hooks write
the adapters alone; the resume is the same).

Missing class images are generated as upstream generates them: when ``--class_data_dir`` holds fewer than
``--num_class_images`` images, the pipeline of the components before fine-tuning (``StableDiffusionPipeline``,
50 steps, guidance 7.5, ``--sample_batch_size`` prompts a call; the model folder's own scheduler, PNDM for Stable
Diffusion 1.x, and its prediction type, whatever ``--prediction_type`` trains) samples the rest from
``--class_prompt`` and saves them there as upstream names them (``{index}-{sha1 of the pixels}.jpg``). With a
local Stable Diffusion folder (``--pretrained_model_name_or_path``) that is upstream's prior; with the small random
components (the default) the "prior" is what an untrained model draws, noise-like images, which is honest about
the flow but not a prior worth preserving: put real class images in ``--class_data_dir`` for that. Generation
draws from a generator seeded with ``--seed`` inside a forked random state, so a run that generated its class
images trains bit for bit as a run that found them already there.

What differs from upstream, so that it runs offline and small, and resumes exactly:

- with no ``--pretrained_model_name_or_path`` (the default) the components are small and random, built
  offline (:mod:`recipes.examples.stable_diffusion`, shared with ``train_text_to_image.py``): a word-level
  tokenizer over the two prompts' words, a 1-layer ``CLIPTextModel``, a 2-block ``AutoencoderKL`` and a UNet
  with cross-attention; a local Stable Diffusion folder is read with ``local_files_only=True``;
- the image folders are read in sorted order, files only (upstream's ``iterdir()`` order is the file
  system's, and counts sub-folders and hidden files as class images), and a file in them that does not load as
  an image (a README.txt, a truncated PNG or JPEG: each is decoded, the class folder's first
  ``--num_class_images``, those used) is a ValueError naming it, before any class image is generated (upstream
  counts it as an image: one class image fewer generated, then a PIL error mid-training); refused rather than skipped
  by its extension, which would leave out silently what the user put there (and keep an image named without an
  image extension out, which upstream reads);
- the saved pipeline (full fine-tuning) holds, with a local ``--pretrained_model_name_or_path``, the folder's own
  scheduler as upstream's ``DiffusionPipeline.from_pretrained(folder, unet=..., text_encoder=...)`` does (PNDM
  for Stable Diffusion 1.x, its config), but with the trained ``--prediction_type`` where one is given (upstream
  has no such option here; its text-to-image script keeps the folder's prediction type, which samples a model
  retrained to v-prediction as if it predicted noise); with the small random components, the training
  ``DDPMScheduler`` (:func:`recipes.examples.stable_diffusion.saved_scheduler`); upstream's reset of a learned
  ``variance_type`` to ``fixed_small`` is not here (Stable Diffusion's schedulers have none);
- with ``--snr_gamma`` and ``--with_prior_preservation`` the Min-SNR weights are those of the instance rows'
  timesteps and weight the instance loss alone, the prior loss staying plain MSE (the fix upstream made in its
  DreamBooth LoRA SDXL scripts, diffusers PR #6356; ``train_dreambooth.py`` itself still weights with all 2B
  timesteps: a shape error for a batch above 1, and at ``--train_batch_size 1`` the instance loss silently
  averaged under both rows' weights);
- a resumed run is bit for bit the uninterrupted one (:mod:`recipes.examples.checkpointing`'s ``EpochRNG``):
  the skipped steps of a resumed epoch load their batches and draw what they drew, unused;
- a checkpoint records ``--mixed_precision``, the prediction type trained and the base (a sha1 over the frozen text
  encoder's and VAE's weights as loaded, :func:`recipes.examples.stable_diffusion.base_fingerprint`): a resume with
  another is refused naming it (upstream resumes silently: one model trained on two objectives, or the checkpoint's
  UNet trained on under another base's text encoder and VAE); the same folder moved elsewhere resumes;
- the frozen VAE and text encoder are cast to fp16 / bf16 only where accelerate autocasts;
- the loss is computed per example (the mean over each latent's values) and then averaged per half:
  upstream's ``F.mse_loss(reduction="mean")`` over the half, to rounding;
- the attention layers' key biases are frozen, the UNet's and (``--train_text_encoder``) the text encoder's
  (``k_proj.bias``): softmax makes their gradient zero but for rounding, which Adam would turn into steps;
- not here: ``--pre_compute_text_embeddings``, ``--class_labels_conditioning``,
  ``--text_encoder_use_attention_mask``, ``--prior_generation_precision``, ``--lora_dropout`` (0 upstream by
  default), the LoRA base cast to the mixed precision's dtype (it stays float32: the analyzer refuses a
  half-precision frozen base, its own passes would run in it), 8-bit Adam, validation images, the hub.

The lines marked ``# genkernel`` attach :class:`~genkernel.diffusion.NoiseLevelAnalyzer` in latent space. It
observes the per-example losses ℓ_n (the instance rows' Min-SNR-weighted) before the backward with
``weights`` c_n = 1/B for the instance rows and ``prior_loss_weight``/B for the class rows, so that
Σ_n c_n ℓ_n is the loss backpropagated, and ``class_labels`` 0 for the instance rows and 1 for the class
rows, so that its "level_class" partition splits every step by noise level × source (group ``2·bin +
source``). Its probes are the latents of instance images under the instance prompt's embedding and (with prior
preservation) of class images under the class prompt's (the VAE's ``latent_dist.mode()``, center-cropped);
with ``--train_text_encoder`` the analyzer tracks :class:`TextConditionedUNet` (the UNet and the text encoder
as one model of the latents, timesteps and token ids; the loop still calls the two) and its probes are
conditioned on the prompts' token ids, so that the ledger covers both and the probes' text moves as the text
encoder trains. The loop's own ``optimizer.step()`` records the step. The report, ``OUT/genkernel_report.json``,
carries a ``"prior_preservation"`` section (:func:`source_shares`): for the instance probes and for the class probes,
the share of their change that each training-noise bin's instance rows and prior rows made. Training is bit
for bit the same with ``--no-analyze``.

Run from the repository root::

    python -m recipes.examples.train_dreambooth --instance_data_dir DOG --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_data_dir DOGS --class_prompt "a photo of dog" --output_dir OUT
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from PIL import Image
from PIL.ImageOps import exif_transpose
from torchvision import transforms
from tqdm.auto import tqdm

from genkernel import set_exact_cuda_mode  # genkernel
from genkernel.diffusion import NoiseLevelAnalyzer, freeze_attention_key_biases  # genkernel

from .checkpointing import (
    EpochRNG, add_analyzer_arguments, add_checkpoint_arguments, check_analyzer_arguments, check_checkpoint_arguments,
    check_clipping_and_snr, drop_stale_report, register_unet_hooks,
    resume_position, resume_settings, save_checkpoint, training_length, write_report,
)
from .stable_diffusion import (
    base_fingerprint, encoders_step_overhead, folder_scheduler, frozen_dtype, place_frozen, pretrained_components,
    saved_scheduler, small_components, stable_diffusion_pipeline, warn_adapters_prediction_type,
)

INSTANCE, PRIOR = 0, 1  # the class labels the analyzer splits the rows by (genkernel)
SOURCES = ("instance", "prior")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (upstream's argument names) as an ``argparse.Namespace``."""
    parser = argparse.ArgumentParser(description="diffusers' DreamBooth example with genkernel's analyzer.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="a local Stable Diffusion folder (read offline); default: small random components")
    parser.add_argument("--instance_data_dir", type=str, required=True, help="a folder of the subject's images")
    parser.add_argument("--instance_prompt", type=str, required=True,
                        help='the prompt with the identifier of the subject, e.g. "a photo of sks dog"')
    parser.add_argument("--class_data_dir", type=str, default=None,
                        help="a folder of class images (missing ones are generated into it)")
    parser.add_argument("--class_prompt", type=str, default=None, help='the class images\' prompt, "a photo of dog"')
    parser.add_argument("--with_prior_preservation", action="store_true", help="add the prior preservation loss")
    parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="the weight of the prior loss")
    parser.add_argument("--num_class_images", type=int, default=100,
                        help="class images used; missing ones are sampled from --class_prompt")
    parser.add_argument("--sample_batch_size", type=int, default=4, help="prompts per call when generating")
    parser.add_argument("--output_dir", type=str, default="dreambooth-model")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too")
    parser.add_argument("--rank", type=int, default=None,
                        help="train LoRA adapters of this rank on the frozen models (train_dreambooth_lora.py's flow)")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="train this many optimizer steps (as upstream: overrides --num_train_epochs)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="default: 5e-6, and 5e-4 with --rank (train_dreambooth_lora.py's)")
    parser.add_argument("--scale_lr", action="store_true",
                        help="scale the learning rate by accumulation steps, batch size and processes")
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--lr_num_cycles", type=int, default=1)
    parser.add_argument("--lr_power", type=float, default=1.0)
    parser.add_argument("--offset_noise", action="store_true", help="add 0.1 · a per-channel draw to the noise")
    parser.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting's gamma (5.0 is common)")
    parser.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                        help="default: the scheduler's")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    add_checkpoint_arguments(parser)
    add_analyzer_arguments(parser)  # genkernel
    args = parser.parse_args(None if argv is None else list(argv))

    if args.with_prior_preservation:
        if args.class_data_dir is None:
            raise ValueError("--with_prior_preservation needs --class_data_dir: the folder of class images (missing "
                             "ones are generated into it from --class_prompt)")
        if args.class_prompt is None:
            raise ValueError('--with_prior_preservation needs --class_prompt, the class images\' prompt (e.g. "a photo '
                             'of dog"): the prior rows are trained under it and missing class images sampled from it')
        if args.num_class_images < 1:
            raise ValueError(f"--num_class_images must be at least 1 with --with_prior_preservation, got "
                             f"{args.num_class_images}")
        if not math.isfinite(args.prior_loss_weight) or args.prior_loss_weight < 0:
            raise ValueError(f"--prior_loss_weight must be a finite number >= 0, got {args.prior_loss_weight}")
    else:  # (upstream warns likewise)
        if args.class_data_dir is not None:
            warnings.warn("--class_data_dir is not used without --with_prior_preservation")
        if args.class_prompt is not None:
            warnings.warn("--class_prompt is not used without --with_prior_preservation")
    check_checkpoint_arguments(args)
    check_analyzer_arguments(args)  # genkernel
    check_clipping_and_snr(args)
    if args.learning_rate is None:  # upstream's two scripts' defaults (adapters whose B starts at zero need the larger)
        args.learning_rate = 5e-6 if args.rank is None else 5e-4
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be at least 1 (the LoRA adapters' rank), got {args.rank}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "sample_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    return args


def image_files(folder: str | os.PathLike, option: str, limit: int | None = None) -> list[Path]:
    """The files of ``folder`` (not sub-folders, not hidden files), sorted by name, the first ``limit`` of them
    (None: all; the class folder's first ``--num_class_images``, the ones a run uses), each of them an image: a
    file that does not load as training loads it (:func:`load_image`, pixels decoded: a README.txt, a truncated
    PNG or JPEG, whose header alone PIL opens, a link to nothing) is a ValueError naming it and ``option``, the
    folder's command-line option (upstream counts every file as an image: a stray text file meant one class image
    fewer generated, then a PIL error mid-training, naming no file)."""
    # (a dangling link is kept, to be refused by name: is_file() is False for it, which skipped it silently)
    files = sorted(p for p in Path(folder).iterdir()
                   if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith("."))[:limit]
    for path in files:
        try:
            load_image(path)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
            # (UnidentifiedImageError and "image file is truncated" are OSErrors; PIL's decoders raise the others)
            raise ValueError(f"{option} {folder}: {path.name} is not an image PIL can read ({error}); every file "
                             "there is used as an image: move it out of the folder") from None
    return files


def load_image(path: Path) -> Image.Image:
    """An image file as RGB, turned upright by its EXIF orientation (as upstream reads them)."""
    image = exif_transpose(Image.open(path))
    return image if image.mode == "RGB" else image.convert("RGB")


class DreamBoothDataset(torch.utils.data.Dataset):
    """Upstream's ``DreamBoothDataset``: example ``i`` is instance image ``i % N_instance`` with the instance
    prompt's token ids and (``class_paths``) class image ``i % N_class`` with the class prompt's; its length is
    the larger count. Each example is a dict of ``instance_images [3, R, R]``, ``instance_prompt_ids [1, L]``
    and, with class images, ``class_images`` and ``class_prompt_ids``."""

    def __init__(self, instance_paths: Sequence[Path], instance_prompt_ids: torch.Tensor, image_transforms,
                 class_paths: Sequence[Path] | None = None, class_prompt_ids: torch.Tensor | None = None) -> None:
        self.instance_paths, self.instance_prompt_ids = list(instance_paths), instance_prompt_ids
        self.class_paths, self.class_prompt_ids = (None if class_paths is None else list(class_paths)), class_prompt_ids
        self.image_transforms = image_transforms
        self.length = max(len(self.instance_paths), len(self.class_paths or ()))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        instance_path = self.instance_paths[index % len(self.instance_paths)]
        example = {"instance_images": self.image_transforms(load_image(instance_path)),
                   "instance_prompt_ids": self.instance_prompt_ids}
        if self.class_paths is not None:
            example["class_images"] = self.image_transforms(load_image(self.class_paths[index % len(self.class_paths)]))
            example["class_prompt_ids"] = self.class_prompt_ids
        return example


def collate_fn(examples: Sequence[dict[str, torch.Tensor]], with_prior_preservation: bool) -> dict[str, torch.Tensor]:
    """Upstream's batch: ``pixel_values [B', 3, R, R]`` and ``input_ids [B', L]`` with the B instance rows first
    and, with prior preservation, the B class rows after them (B' = 2B), one forward for both; and (genkernel)
    ``class_labels [B']``: 0 for an instance row, 1 for a class row."""
    pixel_values = [example["instance_images"] for example in examples]
    input_ids = [example["instance_prompt_ids"] for example in examples]
    if with_prior_preservation:
        pixel_values += [example["class_images"] for example in examples]
        input_ids += [example["class_prompt_ids"] for example in examples]
    labels = [INSTANCE] * len(examples) + [PRIOR] * (len(pixel_values) - len(examples))
    return {"pixel_values": torch.stack(pixel_values).contiguous().float(), "input_ids": torch.cat(input_ids, dim=0),
            "class_labels": torch.tensor(labels)}


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """``[B]`` Min-SNR-γ loss weights min(SNR(t), γ) / SNR(t) (v-prediction: / (SNR(t) + 1)), as upstream."""
    snr = compute_snr(noise_scheduler, timesteps)
    divisor = snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr
    return torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / divisor


def dreambooth_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler, *,
                    num_instance: int, prior_loss_weight: float, snr_gamma: float | None = None):
    """The DreamBooth loss of a batch whose first ``num_instance`` rows are instance rows and the others (as many,
    or none) class rows. Returns ``(loss, losses [B'], coefficients [B'] float64)``: ``losses`` the per-example MSE
    (mean over each row's values; the instance rows times their Min-SNR weights with ``snr_gamma``),
    ``coefficients`` c_n = 1/B_instance for an instance row and ``prior_loss_weight``/B_class for a class row, and
    ``loss`` = mean(instance rows) + prior_loss_weight · mean(class rows), which is Σ_n c_n ℓ_n (to rounding)
    and computed from ``losses`` (so that a backward of it passes through them)."""
    if not 0 < num_instance <= model_pred.shape[0]:
        raise ValueError(f"num_instance must be in [1, {model_pred.shape[0]}], got {num_instance}")
    losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    losses = losses.mean(dim=tuple(range(1, model_pred.dim())))
    num_class = losses.shape[0] - num_instance
    if snr_gamma is not None:  # the instance rows' own timesteps (diffusers PR #6356); the prior loss stays plain
        weights = torch.ones_like(losses)
        weights[:num_instance] = min_snr_weights(noise_scheduler, timesteps[:num_instance], snr_gamma).float()
        losses = losses * weights
    loss = losses[:num_instance].mean()
    if num_class:
        loss = loss + prior_loss_weight * losses[num_instance:].mean()
    coefficients = torch.cat([torch.full((num_instance,), 1.0 / num_instance, dtype=torch.float64),
                              torch.full((num_class,), prior_loss_weight / max(num_class, 1), dtype=torch.float64)])
    return loss, losses, coefficients


def generate_class_images(components: tuple, class_data_dir: str, class_prompt: str, num_class_images: int,
                          sample_batch_size: int, seed: int, device: torch.device) -> int:
    """Upstream's prior generation: sample the class images ``class_data_dir`` lacks (below ``num_class_images``)
    from ``class_prompt`` with the pipeline of ``components`` ``(tokenizer, text_encoder, vae, unet,
    noise_scheduler)`` (default settings: 50 steps, guidance 7.5; a fresh copy of that scheduler, of its class),
    ``sample_batch_size`` a call, saved as
    ``{index}-{sha1 of the pixels}.jpg``. Draws from a generator seeded with ``seed`` in a forked random state (the
    training draws are those of a run that found the images there). Returns the number generated."""
    folder = Path(class_data_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--class_data_dir {class_data_dir} is a file, not a folder of class images")
    folder.mkdir(parents=True, exist_ok=True)
    present = len(image_files(folder, "--class_data_dir", limit=num_class_images))
    missing = num_class_images - present
    if missing <= 0:
        return 0
    tokenizer, text_encoder, vae, unet, noise_scheduler = components
    pipeline = stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet,
                                         type(noise_scheduler).from_config(noise_scheduler.config))
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        generator = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, missing, sample_batch_size):
            count = min(sample_batch_size, missing - start)
            images = pipeline([class_prompt] * count, generator=generator).images
            for offset, image in enumerate(images):
                digest = hashlib.sha1(image.tobytes(), usedforsecurity=False).hexdigest()
                image.save(folder / f"{present + start + offset}-{digest}.jpg")
    return missing


class TextConditionedUNet(torch.nn.Module):  # genkernel
    """The UNet and the text encoder as one denoiser ``model(latents, timesteps, input_ids)`` = ``unet(latents,
    timesteps, text_encoder(input_ids))``: what the analyzer tracks when both train (``--train_text_encoder``), its
    probes conditioned on token ids. Returns the UNet's prediction ``[B, C, H, W]``."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, self.text_encoder(input_ids, return_dict=False)[0], return_dict=False)[0]


def register_text_encoder_hooks(accelerator, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Upstream's save/load hooks with ``--train_text_encoder``: ``accelerator.save_state`` writes the UNet under
    ``unet/`` and the text encoder under ``text_encoder/`` in their libraries' formats; ``load_state`` reads them
    back offline."""
    unet_cls, text_encoder_cls = type(unet), type(text_encoder)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                sub_dir = "unet" if isinstance(model, unet_cls) else "text_encoder"
                model.save_pretrained(os.path.join(output_dir, sub_dir))
                weights.pop()  # make sure to pop weight so that corresponding model is not saved again

    def load_model_hook(models, input_dir):
        while len(models) > 0:
            model = models.pop()  # pop models so that they are not loaded again
            if isinstance(model, text_encoder_cls):
                load_model = text_encoder_cls.from_pretrained(input_dir, subfolder="text_encoder",
                                                              local_files_only=True)
                model.config = load_model.config
            else:
                load_model = unet_cls.from_pretrained(input_dir, subfolder="unet", local_files_only=True)
                model.register_to_config(**load_model.config)
            model.load_state_dict(load_model.state_dict())
            del load_model

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def source_shares(analyzer: NoiseLevelAnalyzer, probe_is_instance: torch.Tensor) -> dict[str, Any]:  # genkernel
    """The "prior_preservation" section of the report: for the instance probes and for the class probes, the
    mean net share of their change (⟨C(x, g), Δf(x)⟩ / ‖Δf(x)‖², per probe) that each training-noise bin's
    instance rows and prior rows made, from the "level_class" ledger; ``{"instance_probes": {"instance": [G],
    "prior": [G]}, "class_probes": {...}, ...}`` (a probe kind without probes is left out)."""
    shares, _ = analyzer.shares("level_class")
    shares = shares.reshape(shares.shape[0], analyzer.num_bins, len(SOURCES))  # group 2·bin + source
    out: dict[str, Any] = {"columns": "training-timestep bin (0: least noise)", "sources": list(SOURCES),
                           "probes": {"instance": int(probe_is_instance.sum()),
                                      "class": int((~probe_is_instance).sum())}}
    for kind, rows in (("instance_probes", probe_is_instance), ("class_probes", ~probe_is_instance)):
        if rows.any():
            mean = shares[rows].nanmean(dim=0)
            out[kind] = {source: [None if math.isnan(v) else v for v in mean[:, s].tolist()]
                         for s, source in enumerate(SOURCES)}
    return out


def probe_kinds(analyzer: NoiseLevelAnalyzer, latents: torch.Tensor, conditioning_rows: torch.Tensor,  # genkernel
                is_instance: torch.Tensor) -> torch.Tensor:
    """``[M]`` bool: whether each of the analyzer's probes (drawn from the rows given as probe data: ``latents``,
    ``conditioning_rows``) is an instance row, found by its clean latents and conditioning."""
    clean, conditioning = analyzer.probe_clean, analyzer.probe_conditioning[0]
    out = []
    for m in range(clean.shape[0]):
        match = [j for j in range(latents.shape[0]) if torch.equal(clean[m], latents[j].to(clean))
                 and torch.equal(conditioning[m], conditioning_rows[j].to(conditioning))]
        out.append(bool(is_instance[match[0]]))
    return torch.tensor(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns ``{"unet": the trained UNet, "text_encoder": the text encoder, "analyzer": NoiseLevelAnalyzer
    or None, "global_step": optimizer steps made, "class_images_generated": int, "probe_is_instance": [M] bool or
    None}``."""
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    # (upstream: accelerate's accumulate() takes one model, so two cannot accumulate under several processes)
    if args.train_text_encoder and args.gradient_accumulation_steps > 1 and accelerator.num_processes > 1:
        raise ValueError("--train_text_encoder with --gradient_accumulation_steps above 1 is not supported in "
                         "distributed training (upstream's limit): set --gradient_accumulation_steps 1")
    set_seed(args.seed)
    if accelerator.device.type == "cuda":  # genkernel: TF32 off and deterministic kernels, analyzed or not (like for like)
        set_exact_cuda_mode()

    instance_dir = Path(args.instance_data_dir)
    instance_paths = image_files(instance_dir, "--instance_data_dir") if instance_dir.is_dir() else []
    if not instance_paths:
        raise ValueError(f"--instance_data_dir {args.instance_data_dir}: no such folder, or no image files in it: give "
                         "a folder of the subject's images")

    # Load scheduler, tokenizer and models (built before any class image is generated: random components are then
    # the same whether or not this run generates)
    prompts = [args.instance_prompt] + ([args.class_prompt] if args.with_prior_preservation else [])
    if args.pretrained_model_name_or_path is None:
        components = small_components(prompts, "{}", args.resolution)
    else:
        components = pretrained_components(args.pretrained_model_name_or_path)
    tokenizer, text_encoder, vae, unet, noise_scheduler = components
    base = base_fingerprint(text_encoder, vae)  # what a resume must find the same (the UNet is the checkpoint's)
    # upstream samples the prior with the model's own pipeline: the folder's scheduler (PNDM for Stable Diffusion 1.x)
    # and prediction type, taken before --prediction_type retargets the training scheduler
    sampling_scheduler = (folder_scheduler(args.pretrained_model_name_or_path) if args.pretrained_model_name_or_path
                          else DDPMScheduler.from_config(noise_scheduler.config))
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    # the saved pipeline's scheduler, read before any class image is generated or step trained (a folder whose
    # scheduler cannot take the trained prediction type is refused then; the LoRA flow saves the adapters alone)
    scheduler_to_save = None
    if args.rank is None:
        scheduler_to_save = saved_scheduler(args.pretrained_model_name_or_path, noise_scheduler, args.prediction_type)
    else:
        warn_adapters_prediction_type(args.pretrained_model_name_or_path, args.prediction_type)

    # Generate class images if prior preservation is enabled.
    generated = 0
    if args.with_prior_preservation:
        if accelerator.is_main_process:
            generated = generate_class_images((tokenizer, text_encoder, vae, unet, sampling_scheduler),
                                              args.class_data_dir, args.class_prompt,
                                              args.num_class_images, args.sample_batch_size, args.seed,
                                              accelerator.device)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    vae.requires_grad_(False)
    if args.train_text_encoder and args.rank is None:
        freeze_attention_key_biases(text_encoder)  # genkernel: as the UNet's
    else:
        text_encoder.requires_grad_(False)
    unet.train()
    if args.rank is None:
        freeze_attention_key_biases(unet)  # genkernel: zero gradient but for rounding, which Adam would turn into steps
    else:  # train_dreambooth_lora.py: frozen models with adapters on the attention projections
        from peft import LoraConfig, inject_adapter_in_model  # (peft only for --rank)

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
        if args.train_text_encoder:  # (what transformers' text_encoder.add_adapter does, which needs a newer peft)
            inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), text_encoder)

    if args.scale_lr:
        args.learning_rate = (args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size
                              * accelerator.num_processes)
    trained = [*unet.parameters(), *(text_encoder.parameters() if args.train_text_encoder else ())]
    optimizer = torch.optim.AdamW(
        [p for p in trained if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )

    def tokenize_prompt(prompt: str) -> torch.Tensor:
        return tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids

    image_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    class_paths = (image_files(args.class_data_dir, "--class_data_dir", limit=args.num_class_images)
                   if args.with_prior_preservation else None)
    train_dataset = DreamBoothDataset(instance_paths, tokenize_prompt(args.instance_prompt), image_transforms,
                                      class_paths, tokenize_prompt(args.class_prompt) if class_paths else None)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True,
        collate_fn=lambda examples: collate_fn(examples, args.with_prior_preservation))

    num_update_steps_per_epoch, max_train_steps, num_train_epochs = training_length(
        train_dataloader, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    if args.train_text_encoder:
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler)
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                              lr_scheduler)
    # (upstream) this process's shard of the batches: an epoch's steps counted again (resume_position reads them)
    num_update_steps_per_epoch, max_train_steps, num_train_epochs = training_length(
        train_dataloader, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)

    weight_dtype = frozen_dtype(accelerator)
    place_frozen((vae,) if args.train_text_encoder else (text_encoder, vae), accelerator.device, weight_dtype)
    if args.rank is not None:  # (the LoRA flow's checkpoints: the whole prepared models, as accelerate saves them)
        pass
    elif args.train_text_encoder:  # upstream's hooks: the models saved in diffusers' and transformers' formats
        register_text_encoder_hooks(accelerator, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder))
    else:
        register_unet_hooks(accelerator, UNet2DConditionModel)
    epoch_rng = EpochRNG(getattr(train_dataloader, "synchronized_generator", None),
                         # (a resume training to another prediction type would mix two objectives in one model
                         # silently, and the saved pipeline would state the second alone)
                         settings=resume_settings(args, prediction_type=noise_scheduler.config.prediction_type,
                                                  pretrained_model_name_or_path=base))
    accelerator.register_for_checkpointing(epoch_rng)

    analyzer, probe_is_instance = None, None  # genkernel: the noise-level × source ledger in latent space
    if args.analyze:  # genkernel: probes are instance images under the instance prompt, class images under the class one
        probe_transforms = transforms.Compose([transforms.Resize(args.resolution), transforms.CenterCrop(args.resolution),  # genkernel
                                               transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])  # genkernel
        per_kind = [args.num_probes - args.num_probes // 2, args.num_probes // 2] if class_paths else [args.num_probes]  # genkernel
        sources = [(instance_paths, args.instance_prompt), (class_paths, args.class_prompt)][: len(per_kind)]  # genkernel
        rows = [(paths[i % len(paths)], prompt, kind) for kind, ((paths, prompt), count) in  # genkernel
                enumerate(zip(sources, per_kind)) for i in range(count)]  # genkernel
        with torch.no_grad():  # genkernel: the latent's mode (no draw) and the prompts' embeddings
            images = torch.stack([probe_transforms(load_image(path)) for path, _, _ in rows])  # genkernel
            probe_latents = vae.encode(images.to(accelerator.device, weight_dtype)).latent_dist.mode()  # genkernel
            probe_latents = (probe_latents * vae.config.scaling_factor).float()  # genkernel
            probe_ids = torch.cat([tokenize_prompt(prompt) for _, prompt, _ in rows])  # genkernel
            # (a trained text encoder: the probes' text is their token ids, encoded as the model runs; else its embeddings)
            probe_text = probe_ids if args.train_text_encoder else text_encoder(  # genkernel
                probe_ids.to(accelerator.device), return_dict=False)[0].float()  # genkernel
        analyzer = NoiseLevelAnalyzer(noise_scheduler, probe_latents, probe_conditioning=probe_text,  # genkernel
                                      num_classes=len(SOURCES) if class_paths else None, num_bins=args.num_bins,  # genkernel
                                      num_probes=args.num_probes, controls=args.controls, kernel_sketch=8,  # genkernel
                                      seed=args.seed, mixed_precision="refuse" if args.mixed_precision == "no" else "observe")  # genkernel
        probe_is_instance = probe_kinds(analyzer, probe_latents.cpu(), probe_text.cpu(),  # genkernel
                                        torch.tensor([kind == INSTANCE for _, _, kind in rows]))  # genkernel

    # (genkernel: the analyzer registered for checkpointing, its ledgers in the checkpoints)
    global_step, first_epoch, resume_step = resume_position(args, accelerator, num_update_steps_per_epoch,
                                                            attach=[] if analyzer is None else [analyzer])  # genkernel
    if analyzer is not None:  # genkernel: bound after load_state, its steps numbered on from the checkpoint's
        rows_per_batch = args.train_batch_size * (2 if args.with_prior_preservation else 1)  # genkernel
        tracked = unet if not args.train_text_encoder else TextConditionedUNet(  # genkernel: the two as one model
            accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder))  # genkernel
        example = (probe_latents[:1], torch.tensor([0], device=accelerator.device), probe_text[:1].to(  # genkernel
            accelerator.device))  # genkernel: the frozen encoders' work per example (a trained text encoder's is the model's)
        overhead = encoders_step_overhead(  # genkernel
            tracked if args.train_text_encoder else accelerator.unwrap_model(unet), example, vae,  # genkernel
            images[:1].to(accelerator.device, weight_dtype), None if args.train_text_encoder else text_encoder,  # genkernel
            probe_ids[:1].to(accelerator.device))  # genkernel
        analyzer.bind(tracked, optimizer, batch_size=rows_per_batch * args.gradient_accumulation_steps,  # genkernel
                      micro_batches=args.gradient_accumulation_steps, start_step=global_step,  # genkernel
                      step_overhead=overhead)  # genkernel

    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:  # resumed from the last step's checkpoint: nothing is left to train
            break
        unet.train()
        if args.train_text_encoder:
            text_encoder.train()
        progress_bar = tqdm(total=num_update_steps_per_epoch, disable=not accelerator.is_local_main_process)
        if resume_step and epoch == first_epoch:
            epoch_rng.restore(epoch)  # the random states as this epoch began: its shuffle, crops, draws again
        else:
            epoch_rng.record(epoch)
        for step, batch in enumerate(train_dataloader):
            # Convert images to latent space
            with torch.no_grad():
                model_input = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            # Sample noise that we'll add to the model input
            if args.offset_noise:
                noise = torch.randn_like(model_input) + 0.1 * torch.randn(
                    model_input.shape[0], model_input.shape[1], 1, 1, device=model_input.device)
            else:
                noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=model_input.device).long()
            # (a resumed epoch's first steps: loaded and drawn as the uninterrupted run's, then skipped)
            if resume_step and epoch == first_epoch and step < resume_step:
                if step % args.gradient_accumulation_steps == 0:
                    progress_bar.update(1)
                continue

            with accelerator.accumulate(unet):
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                with torch.set_grad_enabled(args.train_text_encoder):
                    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
                class_labels = batch["class_labels"]
                loss, losses, coefficients = dreambooth_loss(
                    model_pred, target, timesteps, noise_scheduler, num_instance=int((class_labels == INSTANCE).sum()),
                    prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma)
                if analyzer is not None:  # genkernel: before the backward; Σ c_n ℓ_n is the loss
                    analyzer.observe(losses, timesteps, class_labels=class_labels if class_paths else None,  # genkernel
                                     weights=coefficients)  # genkernel
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(
                        itertools.chain(unet.parameters(), text_encoder.parameters()) if args.train_text_encoder
                        else unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            progress_bar.set_postfix(loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
            if global_step >= max_train_steps:
                break
        progress_bar.close()
        accelerator.wait_for_everyone()
        if global_step >= max_train_steps:
            break

    if analyzer is not None:  # genkernel: the kernel structure at the final weights, then the report
        # genkernel: with class images, per noise level, the instance rows' and the prior rows' shares
        write_report(accelerator, args.output_dir, analyzer, lambda: (  # genkernel
            {"prior_preservation": source_shares(analyzer, probe_is_instance)} if class_paths else {}))  # genkernel
    else:  # (an earlier run's report would stand beside the model saved below)
        drop_stale_report(accelerator, args.output_dir)

    # Create the pipeline using the trained modules and save it.
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    if accelerator.is_main_process and args.rank is not None:  # the adapters' weights, as the LoRA script saves them
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        StableDiffusionPipeline.save_lora_weights(
            save_directory=args.output_dir, safe_serialization=True,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
            if args.train_text_encoder else None)
    elif accelerator.is_main_process:  # (upstream: the folder's pipeline with the trained models, its own scheduler)
        stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler_to_save).save_pretrained(
            args.output_dir)
    accelerator.end_training()
    return {"unet": unet, "text_encoder": text_encoder, "analyzer": analyzer, "global_step": global_step,
            "class_images_generated": generated, "probe_is_instance": probe_is_instance}


if __name__ == "__main__":
    main()
