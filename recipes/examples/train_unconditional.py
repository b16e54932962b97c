"""diffusers' unconditional image training example, with genkernel's noise-level analyzer attached.

The flow is that of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``:
an ``Accelerator`` with gradient accumulation, a ``UNet2DModel`` trained as a DDPM denoiser
(``DDPMScheduler``), AdamW with a warm-up learning-rate schedule (``get_scheduler``), an
``EMAModel`` of the weights stepped after each optimizer step, ``accelerator.accumulate``,
``accelerator.backward``, global-norm clipping at 1.0, checkpoints every ``--checkpointing_steps``
optimizer steps (``accelerator.save_state`` into ``OUT/checkpoint-STEP``, the UNet and the EMA saved by
upstream's save/load hooks, the oldest removed beyond ``--checkpoints_total_limit``), resumed with
``--resume_from_checkpoint`` (a checkpoint folder, or ``latest``), and the pipeline saved at the end.
What differs from upstream, so that it runs offline and small, and resumes exactly:

- the images come from a torchvision ``ImageFolder`` (upstream: ``datasets.load_dataset("imagefolder")``);
- no hub, trackers or sample images; the checkpoints' UNets are read with ``local_files_only=True`` (the
  EMA's as ``EMAModel.from_pretrained`` reads it, which takes no such argument);
- a resumed run is bit for bit the uninterrupted one (UNet, EMA, optimizer, lr schedule, the analyzer's
  ledgers). Upstream's resume is not: ``load_state`` puts back the random states as of the checkpoint,
  mid-epoch, and the loop then draws a new shuffle at ``iter()`` and loads and augments the skipped
  batches (and the DataLoader's look-ahead batch a second time) from those states, so that the data and
  noise after the checkpoint are not the uninterrupted run's. Here the random states as each epoch
  begins are saved in the checkpoint too (``EpochRNG``, ``register_for_checkpointing``); a run resumed
  mid-epoch puts them back before ``iter()`` and skips the epoch's first steps as upstream does (loading
  and augmenting their batches) while also drawing their noise and timesteps, unused: the shuffle, the
  augmentations and the draws after the checkpoint are then the uninterrupted run's. (This holds while the
  training step draws nothing else: a UNet with ``dropout`` > 0 draws in its forward, which the skipped steps
  do not run, and resumes as inexactly as upstream's.) The EMA is saved
  (``EMAModel.save_pretrained``, which builds a ``UNet2DModel`` and so draws from torch's random state) under
  ``torch.random.fork_rng``: a run that saves checkpoints trains bit for bit as one that saves none;
- an explicit ``--resume_from_checkpoint`` is read as given when it is a folder (upstream: its base name
  in ``--output_dir``, also tried here), and one that is not there is a ValueError naming it (upstream:
  ``load_state``'s error on the missing folder); ``latest`` with no checkpoint starts afresh, as upstream;
- ``--unet tiny`` (the default) builds a small UNet for tests and CPUs, ``--unet upstream`` upstream's
  (for ``--resolution`` 64), and ``--max_train_steps`` stops early;
- the loss is computed per example (``reduction="none"``, averaged over the pixels only); the loss
  trained is their mean, upstream's loss;
- ``--objective flow_matching`` trains by rectified flow as diffusers' SD3 script does
  (``FlowMatchEulerDiscreteScheduler`` with ``--flow_shift``, timesteps drawn by
  ``compute_density_for_timestep_sampling``, z = (1 − σ) x + σ ε, target ε − x, weighted by
  ``compute_loss_weighting_for_sd3``; ``--weighting_scheme`` as there), and saves the UNet and the
  scheduler (upstream's DDPMPipeline samples DDPM only);
- ``--objective edm`` trains EDM-style (Karras et al. 2022) as diffusers' SDXL DreamBooth script does
  with ``--do_edm_style_training`` (``EDMEulerScheduler``: indices uniform over its grid, the model
  given ``precondition_inputs`` of ``add_noise`` and ``timesteps[indices]`` = ¼ ln σ, its output
  turned into the denoised image by ``precondition_outputs``), with the EDM paper's loss weight
  (σ² + σ_d²) / (σ σ_d)² (``--edm_weighting none``: the SDXL script's unweighted loss); σ_d = 0.5,
  the images' scale in [−1, 1]; ``--prediction_type`` epsilon or v_prediction;
- the images and noise are cast to fp16 / bf16 only where accelerate autocasts (upstream casts them
  whenever ``--mixed_precision`` asks: on CPU, where accelerate runs fp16 without autocast, fp16 inputs
  reached the float32 UNet and the first forward failed);
- the attention layers' key biases are frozen, with or without the analyzer: softmax ignores a bias
  added to every key, so their gradient is zero but for rounding, which Adam turns into steps that
  the ledger's check refuses; freezing them changes no function the UNet computes;
- the lines marked ``# genkernel`` attach :class:`~genkernel.diffusion.NoiseLevelAnalyzer`
  (docs/observing.md, "Observing a loop the user owns"): it observes the per-example losses
  before the backward, and the loop's own ``optimizer.step()`` records every step, following the
  accumulation and the clipping exactly; it is bound with the step's batch, ``--train_batch_size`` ×
  ``--gradient_accumulation_steps`` examples in that many micro-batches (``DDPMTrainer(batch_size=B·K,
  micro_batches=K)``'s step), for its cost estimate. Training is bit-for-bit the same with ``--no-analyze``.

Run from the repository root::

    python -m recipes.examples.train_unconditional --train_data_dir DIR --output_dir OUT --resolution 16 --use_ema

``DIR`` is an ``ImageFolder`` (one sub-folder of images per class). Writes
``OUT/genkernel_report.json`` (``analyzer.report()`` as strict JSON; with ``--use_ema`` its
``"ema"`` section is the ledger of the EMA weights) and the pipeline (``save_pretrained``). The analyzer
is registered for checkpointing (``accelerator.register_for_checkpointing``): the checkpoints carry its
ledgers, and a resumed run binds it after ``load_state`` with ``start_step`` = the checkpoint's step
(README, "With accelerate ... resume"), so that its report is the uninterrupted run's; a checkpoint saved
without it (a run analyzed from then on) is loaded first and the analyzer starts at its step
(:func:`recipes.examples.checkpointing.resume_position`).
With ``--mixed_precision fp16`` or ``bf16`` (accelerate's autocast) the analyzer is built with
``mixed_precision="observe"`` (docs/observing.md, "Mixed precision"): it splits the half-precision
gradients of the loop's own backward, checks the loop's weighting at float32's tolerance, and leaves
what the groups do not add up to in the residual (each step's ``relative_residual`` in
``analyzer.tracker.gradient_scales``; a warning when one exceeds its change). (On CPU, accelerate runs
fp16 without autocast, so that run is float32 and analysed exactly; bf16 on CPU is autocast.)
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMPipeline, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torchvision import transforms
from torchvision.datasets import ImageFolder
from tqdm.auto import tqdm

from genkernel import set_exact_cuda_mode  # genkernel
from genkernel.diffusion import NoiseLevelAnalyzer, freeze_attention_key_biases  # genkernel

from .checkpointing import (
    EpochRNG, add_analyzer_arguments, add_checkpoint_arguments, check_analyzer_arguments, check_checkpoint_arguments,
    check_image_folder,
    drop_stale_report, register_unet_hooks,
    resume_position, resume_settings, save_checkpoint, write_report,
)

UNETS = {
    # upstream's architecture (for 64×64 images)
    "upstream": {
        "layers_per_block": 2,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    },
    # the same kinds of blocks (attention included), small enough for tests on a CPU
    "tiny": {
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    },
}


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Values of ``arr`` at ``timesteps``, broadcast to ``broadcast_shape`` (as upstream)."""
    if not isinstance(arr, torch.Tensor):
        arr = torch.from_numpy(arr)
    res = arr[timesteps].float().to(timesteps.device)
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (upstream's argument names) as an ``argparse.Namespace``."""
    parser = argparse.ArgumentParser(description="diffusers' unconditional training example with genkernel's analyzer.")
    parser.add_argument("--train_data_dir", type=str, required=True,
                        help="an ImageFolder: a folder with one sub-folder of images per class")
    parser.add_argument("--model_config_name_or_path", type=str, default=None,
                        help="a local UNet2DModel config (file or folder); overrides --unet")
    parser.add_argument("--unet", choices=sorted(UNETS), default="tiny", help="the UNet's size (default tiny)")
    parser.add_argument("--output_dir", type=str, default="ddpm-model")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--num_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", type=str, default="cosine")
    parser.add_argument("--lr_warmup_steps", type=int, default=5)
    parser.add_argument("--adam_beta1", type=float, default=0.95)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-6)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0)
    parser.add_argument("--ema_power", type=float, default=3 / 4)
    parser.add_argument("--ema_max_decay", type=float, default=0.9999)
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "sample", "v_prediction"],
                        help="ddpm: epsilon or sample (upstream's); edm: epsilon or v_prediction")
    parser.add_argument("--ddpm_num_steps", type=int, default=1000)
    parser.add_argument("--ddpm_beta_schedule", type=str, default="linear")
    parser.add_argument("--objective", choices=["ddpm", "flow_matching", "edm"], default="ddpm",
                        help="DDPM (upstream), rectified flow as diffusers' SD3 script trains it, or EDM as its SDXL "
                             "script's --do_edm_style_training does")
    parser.add_argument("--flow_shift", type=float, default=1.0, help="flow matching: the scheduler's shift")
    parser.add_argument("--weighting_scheme", type=str, default="logit_normal",
                        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                        help="flow matching: timestep density and loss weighting (SD3's)")
    parser.add_argument("--edm_weighting", choices=["edm", "none"], default="edm",
                        help="edm: the EDM paper's loss weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, or none (SDXL's)")
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument("--mode_scale", type=float, default=1.29)
    parser.add_argument("--seed", type=int, default=0)
    add_checkpoint_arguments(parser)
    add_analyzer_arguments(parser, probes="image")  # genkernel
    args = parser.parse_args(None if argv is None else list(argv))
    allowed = {"ddpm": ("epsilon", "sample"), "edm": ("epsilon", "v_prediction")}.get(args.objective)
    if allowed is not None and args.prediction_type not in allowed:
        raise ValueError(f"--prediction_type {args.prediction_type} does not go with --objective {args.objective}: "
                         f"choose one of {allowed}")
    if args.objective == "flow_matching" and args.prediction_type != "epsilon":
        raise ValueError(f"--prediction_type {args.prediction_type} does not go with --objective flow_matching: it "
                         "trains the velocity noise - x whatever the prediction type; leave --prediction_type out")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    check_checkpoint_arguments(args)
    check_analyzer_arguments(args)  # genkernel
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns ``{"model": the trained UNet, "ema_model": EMAModel or None, "analyzer":
    NoiseLevelAnalyzer or None, "global_step": optimizer steps made}``."""
    args = parse_args(argv)
    check_image_folder(args.train_data_dir, "--train_data_dir")  # before the accelerator, the model, the output folder
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
    )
    set_seed(args.seed)
    if accelerator.device.type == "cuda":  # genkernel: TF32 off and deterministic kernels, analyzed or not (like for like)
        set_exact_cuda_mode()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Initialize the model
    if args.model_config_name_or_path is None:
        model = UNet2DModel(sample_size=args.resolution, in_channels=3, out_channels=3, **UNETS[args.unet])
    else:
        # a local config only (a hub name was fetched from the hub: the example runs offline)
        model = UNet2DModel.from_config(UNet2DModel.load_config(args.model_config_name_or_path, local_files_only=True))
    freeze_attention_key_biases(model)  # genkernel: zero gradient but for rounding, which Adam would turn into steps

    # Create EMA for the model.
    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=model.config,
        )

    weight_dtype = torch.float32  # the inputs' dtype: reduced only where accelerate autocasts (native_amp); on CPU
    if accelerator.native_amp and accelerator.mixed_precision == "fp16":  # it runs fp16 without autocast, in float32
        weight_dtype = torch.float16  # (fp16 inputs to the float32 UNet failed there: Half input, float bias)
    elif accelerator.native_amp and accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16

    # Initialize the scheduler
    if args.objective == "flow_matching":
        noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=args.ddpm_num_steps, shift=args.flow_shift)
    elif args.objective == "edm":
        noise_scheduler = EDMEulerScheduler(num_train_timesteps=args.ddpm_num_steps, sigma_data=0.5,
                                            prediction_type=args.prediction_type)
    else:
        noise_scheduler = DDPMScheduler(
            num_train_timesteps=args.ddpm_num_steps,
            beta_schedule=args.ddpm_beta_schedule,
            prediction_type=args.prediction_type,
        )

    # Initialize the optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Preprocessing the datasets and DataLoaders creation.
    augmentations = transforms.Compose(
        [
            transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
            transforms.RandomHorizontalFlip() if args.random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    dataset = ImageFolder(args.train_data_dir, transform=augmentations)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers
    )

    # Initialize the learning rate scheduler
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * args.gradient_accumulation_steps,
        num_training_steps=(len(train_dataloader) * args.num_epochs),
    )

    # Prepare everything with our `accelerator`.
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if args.use_ema:
        ema_model.to(accelerator.device)

    # upstream's hooks: `accelerator.save_state(...)` writes the UNet and the EMA in diffusers' format
    register_unet_hooks(accelerator, UNet2DModel, ema_model if args.use_ema else None)
    # the random states as each epoch began, in the checkpoints: a resume mid-epoch replays the epoch's draws
    epoch_rng = EpochRNG(getattr(train_dataloader, "synchronized_generator", None),
                         settings=resume_settings(args))
    accelerator.register_for_checkpointing(epoch_rng)

    analyzer = None  # genkernel: the noise-level ledger; probes are dataset images without random augmentations
    if args.analyze:  # genkernel
        probe_set = ImageFolder(args.train_data_dir, transform=transforms.Compose([transforms.Resize(args.resolution),
            transforms.CenterCrop(args.resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]))
        rows = torch.linspace(0, len(probe_set) - 1, min(len(probe_set), args.num_probes)).long().tolist()
        analyzer = NoiseLevelAnalyzer(noise_scheduler, torch.stack([probe_set[i][0] for i in rows]), num_bins=args.num_bins,
                                      num_probes=args.num_probes, controls=args.controls, kernel_sketch=8, seed=args.seed,
                                      # genkernel: accelerate's fp16/bf16 autocast: split the half-precision gradients
                                      mixed_precision="refuse" if args.mixed_precision == "no" else "observe")

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * num_update_steps_per_epoch
    if max_train_steps > args.num_epochs * num_update_steps_per_epoch:  # (it stops early only: the loop is --num_epochs')
        raise ValueError(f"--max_train_steps {args.max_train_steps} is more than the {args.num_epochs * num_update_steps_per_epoch} "
                         f"optimizer steps of --num_epochs {args.num_epochs} ({num_update_steps_per_epoch} an epoch): here "
                         "it only stops training early; raise --num_epochs")
    # Potentially load in the weights and states from a previous save
    # (genkernel: the analyzer registered for checkpointing, its ledgers in the checkpoints; a checkpoint saved without
    # it, training so far unanalyzed, is loaded first and the analyzer starts at its step)
    global_step, first_epoch, resume_step = resume_position(args, accelerator, num_update_steps_per_epoch,
                                                            attach=[] if analyzer is None else [analyzer])  # genkernel

    if analyzer is not None:  # genkernel: bound after load_state, its steps numbered on from the checkpoint's
        analyzer.bind(model, optimizer, ema=ema_model if args.use_ema else None,  # genkernel: for its cost, the step's
                      batch_size=args.train_batch_size * args.gradient_accumulation_steps,  # batch in K micro-batches,
                      micro_batches=args.gradient_accumulation_steps,  # genkernel: DDPMTrainer(batch_size=B·K, micro_batches=K)
                      start_step=global_step)  # genkernel: README, "With accelerate ... resume"

    # Train!
    for epoch in range(first_epoch, args.num_epochs):
        if global_step >= max_train_steps:  # resumed from the last step's checkpoint: nothing is left to train
            break
        model.train()
        progress_bar = tqdm(total=num_update_steps_per_epoch, disable=not accelerator.is_local_main_process)
        progress_bar.set_description(f"Epoch {epoch}")
        if resume_step and epoch == first_epoch:
            epoch_rng.restore(epoch)  # the random states as this epoch began: its shuffle, augmentations, draws again
        else:
            epoch_rng.record(epoch)
        for step, batch in enumerate(train_dataloader):
            clean_images = batch[0].to(weight_dtype)
            # Sample noise that we'll add to the images
            noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=clean_images.device)
            bsz = clean_images.shape[0]
            if args.objective == "flow_matching":
                # SD3's density over the grid's timesteps, then z = (1 - σ) x + σ ε
                u = compute_density_for_timestep_sampling(
                    weighting_scheme=args.weighting_scheme, batch_size=bsz, logit_mean=args.logit_mean,
                    logit_std=args.logit_std, mode_scale=args.mode_scale,
                )
                indices = (u * noise_scheduler.config.num_train_timesteps).long()
                timesteps = noise_scheduler.timesteps[indices].to(device=clean_images.device)
                sigmas = noise_scheduler.sigmas[indices].to(device=clean_images.device, dtype=weight_dtype)
                sigmas = sigmas.view(-1, 1, 1, 1)
                noisy_images = (1.0 - sigmas) * clean_images + sigmas * noise
            elif args.objective == "edm":
                # SDXL's EDM-style training: a uniform index into the grid, z = x + σ ε, the model given c_in z
                indices = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,))
                timesteps = noise_scheduler.timesteps[indices].to(device=clean_images.device)
                sigmas = noise_scheduler.sigmas[indices].to(device=clean_images.device, dtype=weight_dtype)
                sigmas = sigmas.view(-1, 1, 1, 1)
                noisy_latents = noise_scheduler.add_noise(clean_images, noise, timesteps)
                noisy_images = noise_scheduler.precondition_inputs(noisy_latents, sigmas)
            else:
                # Sample a random timestep for each image
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=clean_images.device
                ).long()

                # Add noise to the clean images according to the noise magnitude at each timestep
                # (this is the forward diffusion process)
                noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            # Skip steps until we reach the resumed step (as upstream, once their batch is loaded and augmented,
            # and here once their noise and timesteps are drawn: the random states go on as the uninterrupted run's)
            if resume_step and epoch == first_epoch and step < resume_step:
                if step % args.gradient_accumulation_steps == 0:
                    progress_bar.update(1)
                continue

            with accelerator.accumulate(model):
                # Predict the noise residual
                model_output = model(noisy_images, timesteps).sample

                # per-example losses (mean over the pixels only); the loss is their mean, as upstream's
                if args.objective == "flow_matching":
                    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
                    target = noise - clean_images
                    losses = (weighting.float() * (model_output.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
                elif args.objective == "edm":
                    denoised = noise_scheduler.precondition_outputs(noisy_latents, model_output, sigmas)
                    data = noise_scheduler.config.sigma_data
                    weighting = (sigmas**2 + data**2) / (sigmas * data) ** 2 if args.edm_weighting == "edm" else 1.0
                    losses = (weighting * (denoised.float() - clean_images.float()) ** 2).mean(dim=(1, 2, 3))
                elif args.prediction_type == "epsilon":
                    losses = F.mse_loss(model_output.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                else:
                    alpha_t = _extract_into_tensor(
                        noise_scheduler.alphas_cumprod, timesteps, (clean_images.shape[0], 1, 1, 1)
                    )
                    snr_weights = alpha_t / (1 - alpha_t)
                    # use SNR weighting from distillation paper
                    losses = (snr_weights * F.mse_loss(model_output.float(), clean_images.float(), reduction="none"))
                    losses = losses.mean(dim=(1, 2, 3))
                if analyzer is not None:  # genkernel
                    analyzer.observe(losses, timesteps)  # genkernel: before the backward
                loss = losses.mean()

                accelerator.backward(loss)

                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_model.step(model.parameters())
                progress_bar.update(1)
                global_step += 1

                if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)

            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            if args.use_ema:
                logs["ema_decay"] = ema_model.cur_decay_value
            progress_bar.set_postfix(**logs)
            if global_step >= max_train_steps:
                break
        progress_bar.close()
        accelerator.wait_for_everyone()
        if global_step >= max_train_steps:
            break

    if analyzer is not None:  # genkernel: the kernel structure at the final weights, then the report
        write_report(accelerator, args.output_dir, analyzer)
    else:  # (an earlier run's report would stand beside the model saved below)
        drop_stale_report(accelerator, args.output_dir)

    # Save the pipeline (with the EMA weights, as upstream)
    unet = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if args.use_ema:
            ema_model.store(unet.parameters())
            ema_model.copy_to(unet.parameters())
        if args.objective != "ddpm":  # DDPMPipeline samples DDPM only
            unet.save_pretrained(os.path.join(args.output_dir, "unet"))
            noise_scheduler.save_pretrained(os.path.join(args.output_dir, "scheduler"))
        else:
            DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(args.output_dir)
        if args.use_ema:
            ema_model.restore(unet.parameters())

    accelerator.end_training()
    return {"model": unet, "ema_model": ema_model if args.use_ema else None, "analyzer": analyzer,
            "global_step": global_step}


if __name__ == "__main__":
    main()
