"""The Stable Diffusion pieces the text-conditioned accelerate examples share (``train_text_to_image.py``,
``train_dreambooth.py``, ``train_controlnet.py``): the components, small and random offline or read from a local
folder, the captioning options' check, the frozen encoders' precision and placement, and the saved pipeline.
"""

from __future__ import annotations

import hashlib
import string
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel


def check_captioning(caption_template: str, proportion_empty_prompts: float) -> None:
    """A ValueError naming ``--caption_template`` unless it has exactly one ``{}`` field (the class folder's name),
    or ``--proportion_empty_prompts`` unless it is in [0, 1]: the ImageFolder examples' captioning options."""
    if not 0 <= proportion_empty_prompts <= 1:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts}")
    try:  # the replacement fields as str.format reads them ("{{}}" is a literal brace pair, not a field)
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(caption_template)
                  if field is not None]
    except ValueError as error:
        raise ValueError(f"--caption_template must have one {{}} (the class name) and no other fields, got "
                         f"{caption_template!r} ({error})") from None
    if not fields:
        raise ValueError(f"--caption_template needs a {{}} for the class name, got {caption_template!r}")
    if fields != [("", "", None)]:
        raise ValueError(f"--caption_template must have one {{}} (the class name) and no other fields, got "
                         f"{caption_template!r}")


def encoders_step_overhead(denoiser, denoiser_inputs: tuple, vae, image: torch.Tensor, text_encoder=None,
                           input_ids: torch.Tensor | None = None) -> float:  # genkernel
    """Example-forwards of ``denoiser`` that a step's frozen encoders run per example: the VAE's encode of ``image``
    ``[1, 3, H, W]`` and, with ``text_encoder``, its encoding of ``input_ids`` ``[1, L]`` (left out when it trains:
    it is then in the denoiser), their linear and convolutional multiply-adds over the denoiser's on
    ``denoiser_inputs`` (one example; :func:`genkernel.core.cost.example_counts`): the analyzer's
    ``bind(step_overhead=)``, so that the ratio its cost estimate prints compares with the step the loop runs.
    Counted in analysis mode (eval, the random state forked): training draws nothing less."""
    from genkernel.core.adapter import analysis_mode
    from genkernel.core.cost import example_counts
    from genkernel.diffusion.latents import LatentCoder

    def macs(module, inputs):
        with analysis_mode(module):
            return example_counts(module, inputs)[1]

    extra = LatentCoder(vae).encode_macs(tuple(image.shape[1:]))  # (in the VAE's eval mode, nothing drawn)
    if text_encoder is not None:
        extra += macs(text_encoder, (input_ids,))
    return extra / max(macs(denoiser, denoiser_inputs), 1)


def small_components(class_names: Sequence[str], template: str, resolution: int):
    """Random, offline ``(tokenizer, text_encoder, vae, unet, noise_scheduler)`` of the kinds Stable Diffusion
    has: a word-level tokenizer over the captions' words (split by its own normalizer and pre-tokenizer, so
    that every word is in its vocabulary; padded to the longest caption's length, at least 8 tokens, so that
    none is truncated), a 1-layer ``CLIPTextModel``
    (width 16), an ``AutoencoderKL`` halving the resolution into 4 latent channels, and a
    ``UNet2DConditionModel`` with cross-attention to the text; the scheduler is Stable Diffusion's.
    The captions are ``template.format(name)`` for each name (``"{}"``: the names are the prompts)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.normalizers import Lowercase
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    normalizer, pre_tokenizer = Lowercase(), Whitespace()
    # the words as the tokenizer splits them (a str.split vocabulary left "hot-dog" [UNK] [UNK] [UNK])
    split = [[w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(template.format(name)))]
             for name in class_names]
    max_length = max([8, *map(len, split)])  # (truncated at 8, a long template cut every class name off)
    words = sorted({w for caption in split for w in caption})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        model_max_length=max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=max_length, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )
    # Stable Diffusion's training schedule (scaled_linear from 0.00085 to 0.012), and no clipping of the predicted
    # sample when the saved pipeline samples: latents are not images in [-1, 1] (DDPMScheduler's defaults, a
    # linear schedule from 0.0001 to 0.02 and clip_sample=True, are the pixel-space DDPM's)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def pretrained_components(path: str):
    """``(tokenizer, text_encoder, vae, unet, noise_scheduler)`` of a local Stable Diffusion folder (or this script's
    output: its word-level tokenizer is read by ``AutoTokenizer`` too), offline."""
    from transformers import AutoTokenizer, CLIPTextModel

    return (AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True),
            AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True),
            UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True),
            DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True))


def folder_scheduler(path: str, prediction_type: str | None = None):
    """The scheduler a local Stable Diffusion folder's pipeline samples with, read offline: the class its
    ``scheduler/`` config names (PNDM for Stable Diffusion 1.x) built from that config, which is what
    ``StableDiffusionPipeline.from_pretrained(path)`` holds; with ``prediction_type``, that prediction type in
    place of the config's."""
    import diffusers

    config = DDPMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)
    scheduler_class = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise ValueError(f"{path}/scheduler: its config names {config.get('_class_name')!r}, not a diffusers "
                         "scheduler class: give a Stable Diffusion folder whose scheduler/ config diffusers reads")
    overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
    scheduler = scheduler_class.from_config(config, **overrides)
    if prediction_type is not None and scheduler.config.get("prediction_type") != prediction_type:
        # (from_config drops an unknown option with a logged warning: a pipeline that samples the UNet otherwise)
        raise ValueError(f"{path}/scheduler: its {scheduler_class.__name__} has no prediction_type, so it cannot "
                         f"sample a UNet trained to --prediction_type {prediction_type}: give a folder whose scheduler "
                         "has one (DDPM, DDIM, PNDM, Euler, DPM-Solver), or leave --prediction_type out")
    return scheduler


def saved_scheduler(pretrained_model_name_or_path: str | None, noise_scheduler, prediction_type: str | None):
    """The scheduler of the pipeline a full fine-tuning run saves. With a local folder
    (``pretrained_model_name_or_path``): upstream's, the folder's own (:func:`folder_scheduler`: its class and
    config, PNDM for Stable Diffusion 1.x, not the DDPM the run trained with), but with ``prediction_type``
    (``--prediction_type``; None: the folder's) in place of the folder's: the saved UNet predicts what it was
    trained to (upstream keeps the folder's, so that a pipeline retrained to v-prediction read its velocities as
    noise: diffusers issue #7012's "weird images"). With the small random components (None): the training
    ``noise_scheduler`` itself, Stable Diffusion's schedule (it has no folder to take another from)."""
    if pretrained_model_name_or_path is None:
        return noise_scheduler
    return folder_scheduler(pretrained_model_name_or_path, prediction_type)


def warn_adapters_prediction_type(pretrained_model_name_or_path: str | None, prediction_type: str | None) -> None:
    """A UserWarning when LoRA adapters (``--rank``: saved alone, as upstream's LoRA scripts save them) train on a
    local folder's UNet to a ``--prediction_type`` other than the folder's scheduler's: the folder's pipeline with
    the adapters loaded samples them as its own prediction type (diffusers issue #7012's "weird images"), and no
    saved file says otherwise; the warning names the scheduler to set. Nothing when the two agree, or without a
    folder or ``--prediction_type``."""
    if pretrained_model_name_or_path is None or prediction_type is None:
        return
    folder_type = folder_scheduler(pretrained_model_name_or_path).config.get("prediction_type")
    if folder_type != prediction_type:
        import warnings

        warnings.warn(f"--rank with --prediction_type {prediction_type} on {pretrained_model_name_or_path}, whose "
                      f"scheduler's prediction type is {folder_type}: the adapters are saved alone, and that folder's "
                      f"pipeline with them loaded samples them as {folder_type}: after load_lora_weights, set "
                      "pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, "
                      f"prediction_type={prediction_type!r})", stacklevel=2)


def base_fingerprint(*modules: torch.nn.Module) -> str:
    """The base a run started from, as a checkpoint records it (``EpochRNG``'s settings): ``"components of sha1
    <12 hex digits>"`` over the ``modules``' states as loaded (every entry's name, dtype, shape and bytes), so
    that a resume on another ``--pretrained_model_name_or_path`` (or on the small random components in place of
    a folder's) is refused, while the same folder moved elsewhere is not (its path is not in it). Take it before
    training or casting: the modules a checkpoint does not restore (the frozen ones) are the ones that matter."""
    digest = hashlib.sha1(usedforsecurity=False)
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"components of sha1 {digest.hexdigest()[:12]}"


def frozen_dtype(accelerator) -> torch.dtype:
    """The frozen encoders' dtype: fp16 / bf16 only where accelerate autocasts (``native_amp``), float32 otherwise
    (upstream casts them to ``--mixed_precision``'s dtype always: on CPU, where accelerate runs fp16 without
    autocast, the float32 UNet got fp16 inputs)."""
    if accelerator.native_amp and accelerator.mixed_precision == "fp16":
        return torch.float16
    if accelerator.native_amp and accelerator.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


def place_frozen(modules: Sequence[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """Move the frozen ``modules`` to ``device``, cast to ``dtype`` only where a parameter is of another dtype
    (diffusers warns at every cast of the VAE; a folder saved by a bf16 run holds a bf16 text encoder, which
    fed bf16 states to a float32 UNet)."""
    for frozen in modules:
        if all(p.dtype == dtype for p in frozen.parameters()):
            frozen.to(device)
        else:
            frozen.to(device, dtype=dtype)


def stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of the components, without a safety checker (there is none to load or save):
    upstream's ``save_pretrained`` layout (``tokenizer``, ``text_encoder``, ``vae``, ``unet``, ``scheduler``
    sub-folders and ``model_index.json``, read back by ``StableDiffusionPipeline.from_pretrained``)."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
