"""diffusers' text-to-image fine-tuning example, with genkernel's noise-level analyzer attached.

The flow is that of diffusers' ``examples/text_to_image/train_text_to_image.py`` (Stable Diffusion
fine-tuning): a frozen VAE encodes the images into latents (``latent_dist.sample()`` times its
``scaling_factor``) and a frozen text encoder the captions (tokenized to ``model_max_length``, an empty
caption with probability ``--proportion_empty_prompts`` for classifier-free guidance); a
``UNet2DConditionModel`` trains on ``(noisy latents, timesteps, encoder_hidden_states)`` with a
``DDPMScheduler``, the scripts' ``--noise_offset``, ``--input_perturbation``, Min-SNR ``--snr_gamma`` and
``--dream_training`` (DREAM: the noisy latents and the target corrected by the UNet's own prediction from a
no-grad forward; the analyzer reads the corrected ones from the training forward's graph), ``--scale_lr``,
AdamW with a warm-up schedule, an ``EMAModel`` stepped after each optimizer step, gradient accumulation
(``accelerator.accumulate``), clipping at ``--max_grad_norm``, and checkpoints every
``--checkpointing_steps`` optimizer steps (``accelerator.save_state``, the UNet and the EMA saved by
upstream's hooks), resumed with ``--resume_from_checkpoint``. ``--rank R`` is its LoRA script's flow
(``train_text_to_image_lora.py``): the UNet frozen, peft adapters of rank R on the attention projections
(``add_adapter(LoraConfig(r=R, lora_alpha=R, init_lora_weights="gaussian", ...))``), the optimizer over them, no
EMA, checkpoints of the whole prepared UNet and the adapters saved as ``pytorch_lora_weights.safetensors``
(``StableDiffusionPipeline.save_lora_weights``); the base stays float32 where upstream casts it to the mixed
precision's dtype (the analyzer refuses a half-precision frozen base: its own passes would run in it). What differs from upstream, so that it runs
offline and small, and resumes exactly:

- the images come from a torchvision ``ImageFolder`` and each is captioned from its class folder's name
  (``--caption_template``, "a picture of a {}"; upstream reads a ``datasets`` image-and-text table);
- with no ``--pretrained_model_name_or_path`` (the default) the components are small and random, built
  offline (:mod:`recipes.examples.stable_diffusion`, shared with ``train_dreambooth.py``): a word-level
  tokenizer over the captions' words (``tokenizers``' ``WordLevel`` in a
  ``PreTrainedTokenizerFast``; its words split as it splits them, its length the longest caption's, at
  least 8 tokens, so that no caption loses its class name), a 1-layer ``CLIPTextModel``, a 2-block
  ``AutoencoderKL`` and a UNet with cross-attention; a local Stable Diffusion folder (``tokenizer``,
  ``text_encoder``, ``vae``, ``unet``, ``scheduler`` sub-folders) is read with ``local_files_only=True``;
- a resumed run is bit for bit the uninterrupted one, as in ``train_unconditional.py`` (its ``EpochRNG``):
  the random states as each epoch began are in the checkpoints, and the skipped steps of a resumed epoch
  load their batches and draw what they drew (the VAE's latent sample, the noise, the offset, the
  perturbation and the timesteps), unused;
- a checkpoint records ``--mixed_precision``, the prediction type trained and the base (a sha1 over the frozen text
  encoder's and VAE's weights as loaded, :func:`recipes.examples.stable_diffusion.base_fingerprint`): a resume with
  another is refused naming it (upstream resumes silently: one model trained on two objectives, or the checkpoint's
  UNet trained on under another base's text encoder and VAE); the same folder moved elsewhere resumes;
- the frozen VAE and text encoder are cast to fp16 / bf16 only where accelerate autocasts, and to float32
  otherwise (upstream casts them to ``--mixed_precision``'s dtype always: on CPU, where accelerate runs fp16
  without autocast, the float32 UNet got fp16 inputs); a folder saved by a bf16 run is read back in float32;
- an explicit ``--resume_from_checkpoint`` is read as given when it is a folder (upstream: its base name in
  ``--output_dir``, also tried here); one that is not there, or not named ``checkpoint-STEP``, is a ValueError
  (:mod:`recipes.examples.checkpointing`, shared with ``train_unconditional.py``);
- the loss is computed per example (upstream's ``reduction="none"`` then ``.mean(dim=...)`` with Min-SNR,
  its plain MSE otherwise, which is the mean of the same per-example losses);
- no hub, trackers or validation images; the pipeline is saved as upstream's
  (``StableDiffusionPipeline.save_pretrained``), without a safety checker; with a local
  ``--pretrained_model_name_or_path`` it holds the folder's own scheduler as upstream's
  ``StableDiffusionPipeline.from_pretrained(folder, text_encoder=..., vae=..., unet=...)`` does (its class and
  config: PNDM for Stable Diffusion 1.x, not the ``DDPMScheduler`` trained with), but with the trained
  ``--prediction_type`` where one is given (upstream keeps the folder's, so that its pipeline of a UNet retrained
  to v-prediction samples it as a noise predictor: diffusers issue #7012's "weird images"); with the small
  random components, the training ``DDPMScheduler`` (:func:`recipes.examples.stable_diffusion.saved_scheduler`).

The lines marked ``# genkernel`` attach :class:`~genkernel.diffusion.NoiseLevelAnalyzer` in latent space:
its probes are the latents of dataset images (the VAE's ``latent_dist.mode()``, no augmentation) under
their captions' embeddings (``probe_conditioning=``), and it splits every step by noise level and by
class folder ("level_class"); it observes the per-example losses before the backward and the loop's own
``optimizer.step()`` records the step. Training is bit-for-bit the same with ``--no-analyze``.

Run from the repository root::

    python -m recipes.examples.train_text_to_image --train_data_dir DIR --output_dir OUT --use_ema

Writes ``OUT/genkernel_report.json`` (``analyzer.report()`` as strict JSON) and the components.
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_dream_and_update_latents, compute_snr
from torchvision import transforms
from torchvision.datasets import ImageFolder
from tqdm.auto import tqdm

from genkernel import set_exact_cuda_mode  # genkernel
from genkernel.diffusion import NoiseLevelAnalyzer, freeze_attention_key_biases  # genkernel

from .checkpointing import (
    EpochRNG, add_analyzer_arguments, add_checkpoint_arguments, check_analyzer_arguments, check_checkpoint_arguments,
    check_image_folder,
    check_clipping_and_snr, drop_stale_report, register_unet_hooks,
    resume_position, resume_settings, save_checkpoint, training_length, write_report,
)
from .stable_diffusion import (
    base_fingerprint, check_captioning, encoders_step_overhead, frozen_dtype, place_frozen, pretrained_components,
    saved_scheduler, small_components, stable_diffusion_pipeline, warn_adapters_prediction_type,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (upstream's argument names) as an ``argparse.Namespace``."""
    parser = argparse.ArgumentParser(description="diffusers' text-to-image example with genkernel's analyzer.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="a local Stable Diffusion folder (read offline); default: small random components")
    parser.add_argument("--train_data_dir", type=str, required=True,
                        help="an ImageFolder: a folder with one sub-folder of images per class")
    parser.add_argument("--caption_template", type=str, default="a picture of a {}",
                        help="each image's caption, from its class folder's name")
    parser.add_argument("--output_dir", type=str, default="sd-model-finetuned")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="train this many optimizer steps (as upstream: overrides --num_train_epochs)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true",
                        help="scale the learning rate by accumulation steps, batch size and processes")
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting's gamma (5.0 is common)")
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--rank", type=int, default=None,
                        help="train LoRA adapters of this rank on a frozen UNet (train_text_to_image_lora.py's flow)")
    parser.add_argument("--noise_offset", type=float, default=0.0)
    parser.add_argument("--input_perturbation", type=float, default=0.0)
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                        help="captions replaced by the empty one (classifier-free guidance)")
    parser.add_argument("--dream_training", action="store_true",
                        help="DREAM: the input and target corrected by the model's own no-grad prediction")
    parser.add_argument("--dream_detail_preservation", type=float, default=1.0)
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
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be at least 1 (the LoRA adapters' rank), got {args.rank}")
    if args.rank is not None and args.use_ema:
        raise ValueError("--use_ema is the full fine-tuning flow's: upstream's LoRA script keeps no EMA of the adapters; "
                         "drop --use_ema or --rank")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns ``{"unet": the trained UNet, "ema_unet": EMAModel or None, "analyzer":
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

    train_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
        transforms.RandomHorizontalFlip() if args.random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    dataset = ImageFolder(args.train_data_dir, transform=train_transforms)
    captions = [args.caption_template.format(name) for name in dataset.classes]

    # Load scheduler, tokenizer and models.
    if args.pretrained_model_name_or_path is None:
        tokenizer, text_encoder, vae, unet, noise_scheduler = small_components(dataset.classes, args.caption_template,
                                                                               args.resolution)
    else:
        tokenizer, text_encoder, vae, unet, noise_scheduler = pretrained_components(args.pretrained_model_name_or_path)
    # the frozen encoders a resume must find the same (the UNet is the checkpoint's)
    base = base_fingerprint(text_encoder, vae)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    # the saved pipeline's scheduler, read before training so that a folder whose scheduler cannot take the trained
    # prediction type is refused before any step (full fine-tuning: the LoRA flow saves the adapters alone)
    scheduler_to_save = None
    if args.rank is None:
        scheduler_to_save = saved_scheduler(args.pretrained_model_name_or_path, noise_scheduler, args.prediction_type)
    else:
        warn_adapters_prediction_type(args.pretrained_model_name_or_path, args.prediction_type)
    # Freeze vae and text_encoder and set unet to trainable
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    if args.rank is None:
        freeze_attention_key_biases(unet)  # genkernel: zero gradient but for rounding, which Adam would turn into steps
    else:  # train_text_to_image_lora.py: a frozen UNet with adapters on the attention projections
        # (genkernel: the base stays float32, where upstream casts it to the mixed precision's dtype: the analyzer's
        # passes would run in that precision, and refuse to; autocast still runs the forward in it)
        from peft import LoraConfig  # (peft only for --rank: the full fine-tuning flow runs without it)

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))

    if args.use_ema:
        ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)

    if args.scale_lr:
        args.learning_rate = (args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size
                              * accelerator.num_processes)
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )

    def tokenize_captions(texts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(texts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    def collate_fn(examples: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        # upstream draws the empty prompts as it tokenizes, when a batch is loaded (Python's random)
        texts = ["" if random.random() < args.proportion_empty_prompts else captions[label] for _, label in examples]
        return {"pixel_values": torch.stack([image for image, _ in examples]).contiguous().float(),
                "input_ids": tokenize_captions(texts), "class_labels": torch.tensor([label for _, label in examples])}

    train_dataloader = torch.utils.data.DataLoader(dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size)

    num_update_steps_per_epoch, max_train_steps, num_train_epochs = training_length(
        train_dataloader, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    # (upstream) this process's shard of the batches: an epoch's steps counted again (resume_position reads them)
    num_update_steps_per_epoch, max_train_steps, num_train_epochs = training_length(
        train_dataloader, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)
    if args.use_ema:
        ema_unet.to(accelerator.device)

    weight_dtype = frozen_dtype(accelerator)  # the frozen encoders': reduced only where accelerate autocasts
    place_frozen((text_encoder, vae), accelerator.device, weight_dtype)

    if args.rank is None:  # (the LoRA flow saves the whole prepared UNet, adapters included, as accelerate does)
        register_unet_hooks(accelerator, UNet2DConditionModel, ema_unet if args.use_ema else None)  # upstream's hooks
    epoch_rng = EpochRNG(getattr(train_dataloader, "synchronized_generator", None),
                         # (a resume training to another prediction type would mix two objectives in one model
                         # silently, and the saved pipeline would state the second alone)
                         settings=resume_settings(args, prediction_type=noise_scheduler.config.prediction_type,
                                                  pretrained_model_name_or_path=base))
    accelerator.register_for_checkpointing(epoch_rng)

    analyzer = None  # genkernel: the noise-level ledger in latent space
    if args.analyze:  # genkernel: probes are dataset images without augmentation, encoded, under their captions
        probe_set = ImageFolder(args.train_data_dir, transform=transforms.Compose([transforms.Resize(args.resolution),  # genkernel
            transforms.CenterCrop(args.resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]))  # genkernel
        rows = torch.linspace(0, len(probe_set) - 1, min(len(probe_set), args.num_probes)).long().tolist()  # genkernel
        with torch.no_grad():  # genkernel: the latent's mode (no draw) and the captions' embeddings
            images = torch.stack([probe_set[i][0] for i in rows]).to(accelerator.device, weight_dtype)  # genkernel
            probe_latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor  # genkernel
            probe_text = text_encoder(tokenize_captions([captions[probe_set[i][1]] for i in rows]).to(  # genkernel
                accelerator.device), return_dict=False)[0]  # genkernel
        analyzer = NoiseLevelAnalyzer(noise_scheduler, probe_latents.float(), probe_conditioning=probe_text.float(),  # genkernel
                                      num_classes=len(dataset.classes), num_bins=args.num_bins,  # genkernel
                                      num_probes=args.num_probes, controls=args.controls, kernel_sketch=8,  # genkernel
                                      seed=args.seed, mixed_precision="refuse" if args.mixed_precision == "no" else "observe")  # genkernel

    # (genkernel: the analyzer registered for checkpointing, its ledgers in the checkpoints; a checkpoint saved without
    # it, training so far unanalyzed, is loaded first and the analyzer starts at its step)
    global_step, first_epoch, resume_step = resume_position(args, accelerator, num_update_steps_per_epoch,
                                                            attach=[] if analyzer is None else [analyzer])  # genkernel

    if analyzer is not None:  # genkernel: bound after load_state, its steps numbered on from the checkpoint's
        unet_example = (probe_latents[:1].float(), torch.tensor([0], device=accelerator.device), probe_text[:1].float())  # genkernel
        overhead = encoders_step_overhead(accelerator.unwrap_model(unet), unet_example, vae, images[:1],  # genkernel
                                          text_encoder, tokenize_captions([captions[0]]).to(accelerator.device))  # genkernel
        analyzer.bind(unet, optimizer, ema=ema_unet if args.use_ema else None,  # genkernel
                      batch_size=args.train_batch_size * args.gradient_accumulation_steps,  # genkernel
                      micro_batches=args.gradient_accumulation_steps, start_step=global_step,  # genkernel
                      step_overhead=overhead)  # genkernel

    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:  # resumed from the last step's checkpoint: nothing is left to train
            break
        unet.train()
        progress_bar = tqdm(total=num_update_steps_per_epoch, disable=not accelerator.is_local_main_process)
        if resume_step and epoch == first_epoch:
            epoch_rng.restore(epoch)  # the random states as this epoch began: its shuffle, captions, draws again
        else:
            epoch_rng.record(epoch)
        for step, batch in enumerate(train_dataloader):
            # Convert images to latent space
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            # Sample noise that we'll add to the latents
            noise = torch.randn_like(latents)
            if args.noise_offset:
                # https://www.crosslabs.org//blog/diffusion-with-offset-noise
                noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                         device=latents.device)
            if args.input_perturbation:
                new_noise = noise + args.input_perturbation * torch.randn_like(noise)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
            # (a resumed epoch's first steps: loaded and drawn as the uninterrupted run's, then skipped)
            if resume_step and epoch == first_epoch and step < resume_step:
                if step % args.gradient_accumulation_steps == 0:
                    progress_bar.update(1)
                continue

            with accelerator.accumulate(unet):
                # Add noise to the latents according to the noise magnitude at each timestep
                noisy_latents = noise_scheduler.add_noise(latents, new_noise if args.input_perturbation else noise,
                                                          timesteps)
                with torch.no_grad():
                    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
                if args.dream_training:
                    noisy_latents, target = compute_dream_and_update_latents(
                        unet, noise_scheduler, timesteps, noise, noisy_latents, target, encoder_hidden_states,
                        args.dream_detail_preservation)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                # per-example losses (mean over the latent's values); the loss is their mean, as upstream's
                losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if args.snr_gamma is not None:
                    snr = compute_snr(noise_scheduler, timesteps)
                    mse_loss_weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
                    if noise_scheduler.config.prediction_type == "epsilon":
                        mse_loss_weights = mse_loss_weights / snr
                    else:
                        mse_loss_weights = mse_loss_weights / (snr + 1)
                    losses = losses * mse_loss_weights
                if analyzer is not None:  # genkernel
                    analyzer.observe(losses, timesteps, class_labels=batch["class_labels"])  # genkernel: before the backward
                loss = losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_unet.step(unet.parameters())
                progress_bar.update(1)
                global_step += 1
                if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            progress_bar.set_postfix(step_loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
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

    # Save the components (with the EMA weights, as upstream), in a pipeline's layout
    unet = accelerator.unwrap_model(unet)
    if accelerator.is_main_process and args.rank is not None:  # the adapters' weights, as the LoRA script saves them
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        StableDiffusionPipeline.save_lora_weights(
            save_directory=args.output_dir, safe_serialization=True,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    elif accelerator.is_main_process:
        if args.use_ema:
            ema_unet.store(unet.parameters())
            ema_unet.copy_to(unet.parameters())
        # as upstream's StableDiffusionPipeline.save_pretrained: the sub-folders and model_index.json, which
        # StableDiffusionPipeline.from_pretrained(OUT) reads (no safety checker: there is none to save); a local
        # folder's own scheduler, as upstream's from_pretrained(folder, ...) holds
        stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler_to_save).save_pretrained(
            args.output_dir)
        if args.use_ema:
            ema_unet.restore(unet.parameters())
    accelerator.end_training()
    return {"unet": unet, "ema_unet": ema_unet if args.use_ema else None, "analyzer": analyzer,
            "global_step": global_step}


if __name__ == "__main__":
    main()
