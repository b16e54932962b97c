"""diffusers' ControlNet training example, with genkernel's noise-level analyzer attached.

The flow is that of diffusers' ``examples/controlnet/train_controlnet.py``: a frozen VAE encodes the images into
latents (``latent_dist.sample()`` times its ``scaling_factor``), a frozen text encoder the captions (tokenized to
``model_max_length``, an empty caption with probability ``--proportion_empty_prompts``), and the UNet is frozen
too; a ``ControlNetModel`` (``ControlNetModel.from_unet(unet)``, or a local ``--controlnet_model_name_or_path``)
is the only model trained, AdamW over its parameters. Its training forward is the script's two calls
(:func:`controlnet_prediction`): the ControlNet's residuals for the conditioning image,
``controlnet(noisy_latents, t, encoder_hidden_states=e, controlnet_cond=conditioning_pixel_values,
return_dict=False)``, then ``unet(noisy_latents, t, encoder_hidden_states=e, down_block_additional_residuals=...,
mid_block_additional_residual=...)``; the loss is the MSE to the noise (or to v, ``--prediction_type
v_prediction``), with the lr schedule, ``--scale_lr``, gradient accumulation (``accelerator.accumulate``),
clipping at ``--max_grad_norm`` and checkpoints every ``--checkpointing_steps`` optimizer steps
(``accelerator.save_state``, the ControlNet saved under ``controlnet/`` by upstream's hooks), resumed with
``--resume_from_checkpoint``. The trained ControlNet is saved as upstream saves it,
``controlnet.save_pretrained(OUT)`` (``ControlNetModel.from_pretrained(OUT)`` reads it).

The data, offline: images from a torchvision ``ImageFolder`` (``--train_data_dir``), each captioned from its
class folder's name (``--caption_template``, "a picture of a {}", as ``train_text_to_image.py``), resized
(bilinear) and center-cropped to ``--resolution`` as upstream's ``image_transforms``. Each image's conditioning
image is:

- with ``--conditioning_data_dir``: the file of the same relative path there (``DIR/<class>/<name>``, the same
  class folder and file name as the image's), read as RGB, resized and center-cropped likewise, pixels in [0, 1]
  (upstream's ``conditioning_image_transforms``); a missing one is a ValueError before training;
- otherwise, made from the image itself by :func:`edge_map` (deterministic: nothing is drawn): the Sobel
  gradient magnitude of the resized, cropped image's luma, ``Y = 0.299 R + 0.587 G + 0.114 B`` of its pixels in
  [0, 1], the image's border replicated, divided by its largest possible value 4·√2 (so it lies in [0, 1]), the
  same in all three channels: a soft edge map of the image, aligned with it pixel for pixel.

What differs from upstream, so that it runs offline and small, and resumes exactly:

- with no ``--pretrained_model_name_or_path`` (the default) the base components are small and random, built
  offline (:mod:`recipes.examples.stable_diffusion`, shared with ``train_text_to_image.py``: a word-level
  tokenizer over the captions' words, a 1-layer ``CLIPTextModel``, a 2-block ``AutoencoderKL`` halving the
  resolution, a UNet with cross-attention) and saved beside the ControlNet in ``OUT/base_model`` (a local Stable
  Diffusion folder: ``--pretrained_model_name_or_path OUT/base_model --controlnet_model_name_or_path OUT`` trains
  on from them); a local folder is read with ``local_files_only=True``. ``--controlnet_model_name_or_path``
  without ``--pretrained_model_name_or_path`` is a ValueError: the random base built anew is the one the
  ControlNet trained with only when ``--seed``, the class folders' names, ``--caption_template`` and
  ``--resolution`` all match that run's (they are its only inputs; nothing records them), and otherwise the
  ControlNet, a copy of its own base UNet's encoder, would steer another UNet silently. ``from_unet`` gets as
  many of upstream's conditioning channels (16, 32, 96, 256) as the VAE has downsamplings plus one, so that the
  conditioning embedding brings the image to the latents' size (upstream's four: Stable Diffusion's VAE divides by 8); a
  ControlNet whose embedding does not is refused, and so is one whose ``conditioning_channels`` is not 3 (a
  1-channel depth ControlNet): the conditioning images are RGB, as upstream's always are (both refusals
  from the command line and the ControlNet's config, before the output folder is made or a model loaded: a
  Stable Diffusion ControlNet given without its base was refused as "not made for this UNet", the small one);
- a resumed run is bit for bit the uninterrupted one (:mod:`recipes.examples.checkpointing`'s ``EpochRNG``):
  the skipped steps of a resumed epoch load their batches and draw what they drew (the captions' empty
  prompts, the VAE's latent sample, the noise and the timesteps), unused (upstream's current script skips no
  batch when it resumes: the resumed epoch trains its first batches again);
- a checkpoint records ``--mixed_precision``, the prediction type trained and the base (a sha1 over the frozen text
  encoder's, VAE's and UNet's weights as loaded, :func:`recipes.examples.stable_diffusion.base_fingerprint`): a
  resume with another is refused naming it (upstream resumes silently: one model trained on two objectives, or the
  checkpoint's ControlNet trained on under another base's UNet); the same folder moved elsewhere resumes;
- ``--mixed_precision``: the frozen UNet stays float32 and the forward runs under ``accelerator.autocast()``
  (upstream casts the UNet to the mixed precision's dtype: the analyzer refuses a half-precision frozen base,
  its own passes would run in it); the VAE and text encoder are cast to fp16 / bf16 only where accelerate
  autocasts; the noisy latents and conditioning images stay float32 (autocast rounds them where it runs a
  layer in half precision, as upstream's casts did), and the residuals are cast to the UNet's dtype;
- the frozen VAE, text encoder and UNet are put in eval mode (``from_pretrained`` leaves them so upstream; the
  small components are built in train mode), and only the ControlNet in train mode;
- the loss is computed per example (the mean over each latent's values) and averaged: upstream's
  ``F.mse_loss(reduction="mean")``, to rounding; ``optimizer.zero_grad()`` sets the gradients to None (upstream:
  to zero by default; every ControlNet parameter gets a gradient each step, so the updates are the same);
- not here: ``datasets`` tables, ``--max_train_samples``, validation images, xformers, 8-bit Adam, gradient
  checkpointing, trackers, the hub.

The lines marked ``# genkernel`` attach :class:`~genkernel.diffusion.NoiseLevelAnalyzer` in latent space. It
tracks the ControlNet's parameters through :class:`~genkernel.diffusion.ControlNetDenoiser` ``(unet,
controlnet)``: the same two calls as :func:`controlnet_prediction` (tests/test_controlnet_example.py checks they
agree bit for bit), bound with the loop's optimizer. The loop itself keeps calling the prepared ControlNet and
the UNet as upstream does, because the prepared ControlNet is what accelerate wraps (DistributedDataParallel,
whose forward syncs the gradients; mixed precision's autocast): the analyzer's copy holds the unwrapped one,
the same parameters. Its probes are the latents of dataset images (the VAE's ``latent_dist.mode()``) under their
captions' embeddings and their conditioning images (``probe_conditioning=(prompt_embeds, control_images)``);
it splits every step by noise level and by class folder ("level_class"), observes the per-example losses
before the backward, and the loop's own ``optimizer.step()`` records the step. Training is bit for bit the same
with ``--no-analyze``.

Run from the repository root::

    python -m recipes.examples.train_controlnet --train_data_dir DIR --output_dir OUT

Writes ``OUT/genkernel_report.json`` (``analyzer.report()`` as strict JSON) and the ControlNet.
"""

from __future__ import annotations

import argparse
import math
import os
import random
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import ControlNetModel
from diffusers.optimization import get_scheduler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from tqdm.auto import tqdm

from genkernel import set_exact_cuda_mode  # genkernel
from genkernel.diffusion import ControlNetDenoiser, NoiseLevelAnalyzer, freeze_attention_key_biases  # genkernel

from .checkpointing import (
    EpochRNG, add_analyzer_arguments, add_checkpoint_arguments, check_analyzer_arguments, check_checkpoint_arguments,
    check_image_folder,
    check_clipping_and_snr, drop_stale_report, register_unet_hooks,
    resume_position, resume_settings, save_checkpoint, training_length, write_report,
)
from .stable_diffusion import (
    base_fingerprint, check_captioning, encoders_step_overhead, frozen_dtype, place_frozen, pretrained_components,
    small_components, stable_diffusion_pipeline,
)

# upstream's ControlNetConditioningEmbedding channels (from_unet's default: three stride-2 convolutions, for a VAE
# that divides the resolution by 8)
CONDITIONING_CHANNELS = (16, 32, 96, 256)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's convert("L") weights
SOBEL_MAX = 4 * math.sqrt(2)  # the largest Sobel gradient magnitude of values in [0, 1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (upstream's argument names) as an ``argparse.Namespace``."""
    parser = argparse.ArgumentParser(description="diffusers' ControlNet example with genkernel's analyzer.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="a local Stable Diffusion folder (read offline); default: small random components")
    parser.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                        help="a local ControlNet folder to train on (read offline); default: ControlNetModel.from_unet")
    parser.add_argument("--train_data_dir", type=str, required=True,
                        help="an ImageFolder: a folder with one sub-folder of images per class")
    parser.add_argument("--conditioning_data_dir", type=str, default=None,
                        help="the conditioning images, each at the same relative path (class folder and file name) as "
                             "its image; default: each image's edge map")
    parser.add_argument("--caption_template", type=str, default="a picture of a {}",
                        help="each image's caption, from its class folder's name")
    parser.add_argument("--output_dir", type=str, default="controlnet-model")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="train this many optimizer steps (as upstream: overrides --num_train_epochs)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=5e-6)
    parser.add_argument("--scale_lr", action="store_true",
                        help="scale the learning rate by accumulation steps, batch size and processes")
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--lr_num_cycles", type=int, default=1)
    parser.add_argument("--lr_power", type=float, default=1.0)
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                        help="captions replaced by the empty one (classifier-free guidance)")
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
    check_captioning(args.caption_template, args.proportion_empty_prompts)
    check_checkpoint_arguments(args)
    check_analyzer_arguments(args)  # genkernel
    check_clipping_and_snr(args)
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    for name in ("train_data_dir", "conditioning_data_dir"):
        folder = getattr(args, name)
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"--{name} {folder}: no such folder (give a folder with one sub-folder of images per "
                             "class)")
    if args.controlnet_model_name_or_path:
        check_controlnet_folder(args.controlnet_model_name_or_path, args.pretrained_model_name_or_path)
    return args


def check_controlnet_folder(controlnet_path: str, pretrained_model_name_or_path: str | None) -> None:
    """A ValueError, from the command line and the ControlNet's config alone (before any folder is written or
    model loaded), when ``--controlnet_model_name_or_path`` comes without ``--pretrained_model_name_or_path`` or
    its ``conditioning_channels`` is not 3.

    Without a base the components would be small random ones built anew: the ControlNet's own base only when
    ``--seed``, the class folders' names, ``--caption_template`` and ``--resolution`` all match its run (nothing
    checks it), and a ControlNet steers its own base UNet's features; a ControlNet of any other base (a Stable
    Diffusion one) would otherwise be refused as "not made for this UNet", naming the wrong fix. The script feeds
    3-channel RGB conditioning images, as upstream's always are."""
    if pretrained_model_name_or_path is None:
        base_model = os.path.join(controlnet_path, "base_model")
        raise ValueError(f"--controlnet_model_name_or_path {controlnet_path} without "
                         "--pretrained_model_name_or_path: the base components would be small random ones built "
                         "anew, the same as the ControlNet was trained with only if --seed, the class folders' "
                         "names, --caption_template and --resolution all match its run (nothing checks it), and a "
                         "ControlNet steers its own base UNet's features: pass --pretrained_model_name_or_path "
                         f"{base_model}, the base a run of this script saved beside its ControlNet"
                         + ("" if os.path.isdir(base_model) else " (not there: give the base it was trained with)"))
    channels = ControlNetModel.load_config(controlnet_path, local_files_only=True).get("conditioning_channels", 3)
    if channels != 3:  # (else a shape error deep in the first forward)
        raise ValueError(f"--controlnet_model_name_or_path {controlnet_path}: its conditioning_channels is "
                         f"{channels}, and this script feeds 3-channel RGB conditioning images (upstream's: edge "
                         "maps, or --conditioning_data_dir's files read as RGB): give a ControlNet with "
                         "conditioning_channels 3")


def edge_map(image: torch.Tensor) -> torch.Tensor:
    """The conditioning image made from ``image`` ``[3, H, W]`` (pixels in [0, 1]): ``[3, H, W]``, the Sobel
    gradient magnitude ``sqrt(gx² + gy²) / (4·√2)`` of its luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (border
    pixels replicated; ``gx`` the horizontal kernel ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]``, ``gy`` its transpose)
    in every channel, in [0, 1]. Deterministic, float32."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"edge_map takes an RGB image [3, H, W], got shape {tuple(image.shape)}")
    luma = torch.tensordot(torch.tensor(LUMA, dtype=torch.float32), image.float(), dims=1)
    padded = F.pad(luma[None, None], (1, 1, 1, 1), mode="replicate")
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # [2, 1, 3, 3]: gx, gy
    gradients = F.conv2d(padded, kernels)[0]
    magnitude = gradients.pow(2).sum(0).sqrt() / SOBEL_MAX
    return magnitude.clamp(0, 1).expand(3, -1, -1).contiguous()


class ControlNetDataset(torch.utils.data.Dataset):
    """The images of an ImageFolder ``root`` with their conditioning images: example ``i`` is ``(pixel_values [3, R,
    R] in [-1, 1], conditioning_pixel_values [3, R, R] in [0, 1], class label)``, the image resized (bilinear) and
    center-cropped to R = ``resolution`` as upstream's ``image_transforms``; its conditioning image the file of the
    same relative path in ``conditioning_root`` (resized and cropped likewise, upstream's
    ``conditioning_image_transforms``) or, without one, :func:`edge_map` of the cropped image."""

    def __init__(self, root: str, resolution: int, conditioning_root: str | None = None) -> None:
        self.images = ImageFolder(root)
        self.classes, self.root, self.conditioning_root = self.images.classes, root, conditioning_root
        self.crop = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
        ])
        self.to_tensor, self.normalize = transforms.ToTensor(), transforms.Normalize([0.5], [0.5])
        if conditioning_root is not None:
            missing = [path for path in map(self.conditioning_path, (p for p, _ in self.images.samples))
                       if not os.path.isfile(path)]
            if missing:
                raise ValueError(f"--conditioning_data_dir {conditioning_root} lacks {len(missing)} of the "
                                 f"{len(self.images)} conditioning images, e.g. {missing[0]}: give each image in "
                                 f"--train_data_dir a file of the same class folder and name there")

    def conditioning_path(self, image_path: str) -> str:
        return os.path.join(self.conditioning_root, os.path.relpath(image_path, self.root))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, label = self.images.samples[index]
        image = self.to_tensor(self.crop(self.images.loader(path)))
        if self.conditioning_root is None:
            conditioning = edge_map(image)
        else:  # (ImageFolder's loader: PIL, RGB)
            conditioning = self.to_tensor(self.crop(self.images.loader(self.conditioning_path(path))))
        return self.normalize(image), conditioning, label


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Upstream's conditioning-embedding channels, as many as a VAE dividing the resolution by ``vae_scale_factor``
    needs (one stride-2 convolution per halving): ``(16, 32, 96, 256)`` for 8, ``(16, 32)`` for 2."""
    halvings = int(math.log2(vae_scale_factor))
    if 2 ** halvings != vae_scale_factor or halvings + 1 > len(CONDITIONING_CHANNELS):
        raise ValueError(f"the VAE divides the resolution by {vae_scale_factor}: ControlNetModel.from_unet's "
                         "conditioning embedding halves it up to 3 times; give a --controlnet_model_name_or_path "
                         "whose conditioning embedding fits the VAE")
    return CONDITIONING_CHANNELS[: halvings + 1]


def controlnet_prediction(controlnet: torch.nn.Module, unet: torch.nn.Module, noisy_latents: torch.Tensor,
                          timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          controlnet_image: torch.Tensor) -> torch.Tensor:
    """The training forward of ``train_controlnet.py``: the ControlNet's residuals for ``controlnet_image`` ``[B, 3,
    R, R]``, then the UNet's prediction ``[B, C, h, w]`` under them (cast to the UNet's dtype)."""
    down_block_res_samples, mid_block_res_sample = controlnet(
        noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_image,
        return_dict=False,
    )
    return unet(
        noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
        down_block_additional_residuals=[sample.to(dtype=unet.dtype) for sample in down_block_res_samples],
        mid_block_additional_residual=mid_block_res_sample.to(dtype=unet.dtype), return_dict=False,
    )[0]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns ``{"controlnet": the trained ControlNet, "unet": the frozen UNet, "analyzer":
    NoiseLevelAnalyzer or None, "global_step": optimizer steps made}``."""
    args = parse_args(argv)
    check_image_folder(args.train_data_dir, "--train_data_dir")  # before the accelerator, the model, the output folder
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    if accelerator.device.type == "cuda":  # genkernel: TF32 off and deterministic kernels, analyzed or not (like for like)
        set_exact_cuda_mode()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    dataset = ControlNetDataset(args.train_data_dir, args.resolution, args.conditioning_data_dir)
    captions = [args.caption_template.format(name) for name in dataset.classes]

    # Load scheduler, tokenizer and models.
    built_here = args.pretrained_model_name_or_path is None
    if built_here:
        tokenizer, text_encoder, vae, unet, noise_scheduler = small_components(dataset.classes, args.caption_template,
                                                                               args.resolution)
    else:
        tokenizer, text_encoder, vae, unet, noise_scheduler = pretrained_components(args.pretrained_model_name_or_path)
    # the frozen base a resume must find the same: the checkpoint holds the ControlNet alone
    base = base_fingerprint(text_encoder, vae, unet)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.resolution % multiple:
        raise ValueError(f"--resolution must be a multiple of {multiple} (the VAE divides it by {vae_scale_factor} and "
                         f"the UNet halves the latents {len(unet.config.block_out_channels) - 1} times), got "
                         f"{args.resolution}")
    if args.controlnet_model_name_or_path:
        controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, local_files_only=True)
        differing = [key for key in ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")
                     if tuple(np.atleast_1d(controlnet.config[key])) != tuple(np.atleast_1d(unet.config[key]))]
        if differing:
            mismatches = "; ".join(f"{key} {controlnet.config[key]}, the UNet's {unet.config[key]}"
                                   for key in differing)
            raise ValueError(f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path} is not made for "
                             f"this UNet ({mismatches}): give a ControlNet made for this base model")
        halvings = len(controlnet.config.conditioning_embedding_out_channels) - 1
        if 2 ** halvings != vae_scale_factor:
            raise ValueError(f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path}: its conditioning "
                             f"embedding divides the resolution by {2 ** halvings}, the VAE by {vae_scale_factor}: "
                             "give a ControlNet made for this base model")
    else:
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(
            vae_scale_factor))

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    for frozen in (vae, unet, text_encoder):  # as from_pretrained leaves them upstream
        frozen.eval()
    controlnet.train()
    freeze_attention_key_biases(controlnet)  # genkernel: zero gradient but for rounding, which Adam would turn into steps

    # Check that all trainable models are in full precision (upstream)
    if controlnet.dtype != torch.float32:
        raise ValueError(f"Controlnet loaded as datatype {controlnet.dtype}. Please make sure to always have all model "
                         "weights in full float32 precision when starting training - even if doing mixed precision "
                         "training, copy of the weights should still be float32.")

    if args.scale_lr:
        args.learning_rate = (args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size
                              * accelerator.num_processes)
    optimizer = torch.optim.AdamW(
        [p for p in controlnet.parameters() if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )

    def tokenize_captions(texts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(texts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    def collate_fn(examples: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        # upstream draws the empty prompts as it tokenizes, when a batch is loaded (Python's random)
        texts = ["" if random.random() < args.proportion_empty_prompts else captions[label] for _, _, label in examples]
        return {"pixel_values": torch.stack([image for image, _, _ in examples]).contiguous().float(),
                "conditioning_pixel_values": torch.stack([control for _, control, _ in examples]).contiguous().float(),
                "input_ids": tokenize_captions(texts),
                "class_labels": torch.tensor([label for _, _, label in examples])}

    train_dataloader = torch.utils.data.DataLoader(dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size)

    num_update_steps_per_epoch, max_train_steps, num_train_epochs = training_length(
        train_dataloader, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    controlnet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(controlnet, optimizer, train_dataloader,
                                                                                lr_scheduler)
    # (upstream) this process's shard of the batches: an epoch's steps counted again (resume_position reads them)
    num_update_steps_per_epoch, max_train_steps, num_train_epochs = training_length(
        train_dataloader, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)

    weight_dtype = frozen_dtype(accelerator)  # the frozen encoders': reduced only where accelerate autocasts
    place_frozen((text_encoder, vae), accelerator.device, weight_dtype)
    place_frozen((unet,), accelerator.device, torch.float32)  # (float32 beside autocast: see the module's docstring)

    register_unet_hooks(accelerator, ControlNetModel, subfolder="controlnet")  # upstream's hooks: checkpoint/controlnet
    epoch_rng = EpochRNG(getattr(train_dataloader, "synchronized_generator", None),
                         # (a resume training to another prediction type would mix two objectives in one model
                         # silently, and the saved pipeline would state the second alone)
                         settings=resume_settings(args, prediction_type=noise_scheduler.config.prediction_type,
                                                  pretrained_model_name_or_path=base))
    accelerator.register_for_checkpointing(epoch_rng)

    analyzer = None  # genkernel: the noise-level ledger in latent space
    if args.analyze:  # genkernel: probes are dataset images, encoded, under their captions and their conditioning images
        rows = torch.linspace(0, len(dataset) - 1, min(len(dataset), args.num_probes)).long().tolist()  # genkernel
        examples = [dataset[i] for i in rows]  # genkernel: (the crop is deterministic: nothing is drawn)
        with torch.no_grad():  # genkernel: the latent's mode (no draw) and the captions' embeddings
            images = torch.stack([image for image, _, _ in examples]).to(accelerator.device, weight_dtype)  # genkernel
            probe_latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor  # genkernel
            probe_text = text_encoder(tokenize_captions([captions[label] for _, _, label in examples]).to(  # genkernel
                accelerator.device), return_dict=False)[0]  # genkernel
        probe_controls = torch.stack([control for _, control, _ in examples]).to(accelerator.device)  # genkernel
        analyzer = NoiseLevelAnalyzer(noise_scheduler, probe_latents.float(),  # genkernel
                                      probe_conditioning=(probe_text.float(), probe_controls.float()),  # genkernel
                                      num_classes=len(dataset.classes), num_bins=args.num_bins,  # genkernel
                                      num_probes=args.num_probes, controls=args.controls, kernel_sketch=8,  # genkernel
                                      seed=args.seed, mixed_precision="refuse" if args.mixed_precision == "no" else "observe")  # genkernel

    # (genkernel: the analyzer registered for checkpointing, its ledgers in the checkpoints; a checkpoint saved without
    # it, training so far unanalyzed, is loaded first and the analyzer starts at its step)
    global_step, first_epoch, resume_step = resume_position(args, accelerator, num_update_steps_per_epoch,
                                                            attach=[] if analyzer is None else [analyzer])  # genkernel

    if analyzer is not None:  # genkernel: the script's forward as one module over the ControlNet's parameters
        tracked = ControlNetDenoiser(unet, accelerator.unwrap_model(controlnet))  # genkernel: the UNet stays in eval mode
        example = (probe_latents[:1].float(), torch.tensor([0], device=accelerator.device), probe_text[:1].float(),  # genkernel
                   probe_controls[:1].float())  # genkernel: the frozen encoders' work per example, in forwards
        overhead = encoders_step_overhead(tracked, example, vae, images[:1], text_encoder,  # genkernel
                                          tokenize_captions([captions[0]]).to(accelerator.device))  # genkernel
        analyzer.bind(tracked, optimizer, batch_size=args.train_batch_size * args.gradient_accumulation_steps,  # genkernel
                      micro_batches=args.gradient_accumulation_steps, start_step=global_step,  # genkernel
                      step_overhead=overhead)  # genkernel

    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:  # resumed from the last step's checkpoint: nothing is left to train
            break
        controlnet.train()
        progress_bar = tqdm(total=num_update_steps_per_epoch, disable=not accelerator.is_local_main_process)
        if resume_step and epoch == first_epoch:
            epoch_rng.restore(epoch)  # the random states as this epoch began: its shuffle, captions, draws again
        else:
            epoch_rng.record(epoch)
        for step, batch in enumerate(train_dataloader):
            # Convert images to latent space
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            # Sample noise that we'll add to the latents
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            # Sample a random timestep for each image
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            timesteps = timesteps.long()
            # (a resumed epoch's first steps: loaded and drawn as the uninterrupted run's, then skipped)
            if resume_step and epoch == first_epoch and step < resume_step:
                if step % args.gradient_accumulation_steps == 0:
                    progress_bar.update(1)
                continue

            with accelerator.accumulate(controlnet):
                # Add noise to the latents according to the noise magnitude at each timestep (kept float32, the
                # UNet's dtype: autocast rounds them where it runs a layer in half precision)
                noisy_latents = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps)
                with torch.no_grad():
                    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                controlnet_image = batch["conditioning_pixel_values"]
                with accelerator.autocast():  # (the frozen float32 UNet beside the prepared ControlNet's autocast)
                    model_pred = controlnet_prediction(controlnet, unet, noisy_latents, timesteps,
                                                       encoder_hidden_states, controlnet_image)
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
                # per-example losses (mean over the latent's values); the loss is their mean, upstream's MSE
                losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if analyzer is not None:  # genkernel
                    analyzer.observe(losses, timesteps, class_labels=batch["class_labels"])  # genkernel: before the backward
                loss = losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), args.max_grad_norm)
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
        write_report(accelerator, args.output_dir, analyzer)  # genkernel
    else:  # (an earlier run's report would stand beside the model saved below)
        drop_stale_report(accelerator, args.output_dir)

    # Save the trained ControlNet (upstream), and the base components built here beside it
    controlnet = accelerator.unwrap_model(controlnet)
    if accelerator.is_main_process:
        controlnet.save_pretrained(args.output_dir)
        if built_here:  # (a local Stable Diffusion folder: --pretrained_model_name_or_path reads it)
            stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler).save_pretrained(
                os.path.join(args.output_dir, "base_model"))
    accelerator.end_training()
    return {"controlnet": controlnet, "unet": unet, "analyzer": analyzer, "global_step": global_step}


if __name__ == "__main__":
    main()
