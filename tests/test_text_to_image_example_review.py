"""Second read of the text-to-image example (recipes/examples/train_text_to_image.py): --max_train_steps
overrides --num_train_epochs as upstream's does, a run resumed from its last checkpoint trains nothing more,
every caption keeps its class name through the small word-level tokenizer, a folder saved by a bf16 run
fine-tunes in float32, the output folder is a StableDiffusionPipeline with Stable Diffusion's scheduler, bad
input is refused by name, and (coverage) resumes at an epoch boundary and mid-epoch under a partial last
accumulation."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from test_text_to_image_example import run  # noqa: E402

from recipes.examples.train_text_to_image import small_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset


@pytest.fixture
def image_folder(captioned_image_folder):
    return captioned_image_folder


def fresh_run(image_folder, out, *extra):
    """``run`` (12 images, batches of 2, EMA, Min-SNR, offset noise, perturbation, empty prompts) with
    accelerate's process-wide state reset first (it refuses a second mixed precision in one process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run(image_folder, out, *extra)


def same_training(first, second):
    """The two runs' UNet weights, EMA weights and EMA step counts are equal bit for bit."""
    return (all(torch.equal(p, q) for p, q in zip(first["unet"].parameters(), second["unet"].parameters()))
            and all(torch.equal(p, q)
                    for p, q in zip(first["ema_unet"].shadow_params, second["ema_unet"].shadow_params))
            and first["ema_unet"].optimization_step == second["ema_unet"].optimization_step)


def test_max_train_steps_overrides_the_number_of_epochs_as_upstream(image_folder, tmp_path):
    # 6 batches accumulated over 2: 3 optimizer steps an epoch. Upstream sets num_train_epochs =
    # ceil(max_train_steps / 3); the old loop ran --num_train_epochs (1) and stopped after 3 steps of 5,
    # its lr schedule laid out for 5.
    five = fresh_run(image_folder, tmp_path / "five", "--no-analyze", "--max_train_steps", "5")
    assert five["global_step"] == 5 and five["ema_unet"].optimization_step == 5
    two_epochs = fresh_run(image_folder, tmp_path / "two", "--no-analyze", "--max_train_steps", "5",
                           "--num_train_epochs", "2")
    assert same_training(five, two_epochs)


def test_a_run_resumed_from_its_last_checkpoint_trains_nothing_more(image_folder, tmp_path):
    # no accumulation, stopped by --max_train_steps mid-epoch: resumed from checkpoint-2 (its last), the old
    # loop skipped 2 batches and trained a third step (global_step 3, other weights) before its check
    straight = fresh_run(image_folder, tmp_path / "straight", "--no-analyze", "--gradient_accumulation_steps", "1",
                         "--max_train_steps", "2", "--checkpointing_steps", "2")
    resumed = fresh_run(image_folder, tmp_path / "resumed", "--no-analyze", "--gradient_accumulation_steps", "1",
                        "--max_train_steps", "2",
                        "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed["global_step"] == 2
    assert same_training(straight, resumed)


@pytest.mark.parametrize("classes, template", [
    (("hot-dog", "ice-cream"), "a picture of a {}"),  # split by the tokenizer into "hot", "-", "dog"
    (("cat", "dog"), "a sharp detailed high quality close up photo of a {}"),  # 11 tokens
])
def test_every_caption_keeps_its_class_name_through_the_word_level_tokenizer(classes, template):
    # The vocabulary was the captions' str.split() words, but the tokenizer splits "hot-dog" into "hot", "-",
    # "dog": both classes became "a picture of a [UNK] [UNK] [UNK]". And captions were cut at 8 tokens: the
    # long template left both classes "a sharp detailed high quality close up photo". Either way, training
    # saw the same caption for every class.
    tokenizer, text_encoder = small_components(classes, template, 16)[:2]
    vocab = tokenizer.get_vocab()
    captions = [template.format(name) for name in classes]
    words = [re.findall(r"\w+|[^\w\s]+", caption.lower()) for caption in captions]  # tokenizers' Whitespace
    assert not {w for caption in words for w in caption} - vocab.keys(), "words left out of the vocabulary"
    assert tokenizer.model_max_length >= max(map(len, words)), "captions truncated"
    ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    assert ids.tolist() == [[vocab[w] for w in caption] + [vocab["[PAD]"]] * (tokenizer.model_max_length - len(caption))
                            for caption in words]
    with torch.no_grad():  # the text encoder takes the longer captions (its positions) and tells them apart
        states = text_encoder(ids, return_dict=False)[0]
    assert states.shape == (2, tokenizer.model_max_length, 16) and not torch.equal(states[0], states[1])


def test_a_folder_saved_by_a_bf16_run_fine_tunes_in_float32(image_folder, tmp_path):
    """A bf16 run saves its frozen text encoder in bfloat16 (as upstream's pipeline does); read back by
    --pretrained_model_name_or_path without mixed precision, the old script left it in bfloat16 (it cast only
    to a reduced dtype), and the float32 UNet's first forward failed (RuntimeError: expected m1 and m2 to have
    the same dtype, BFloat16 != float). It now trains bit for bit as from the same folder converted to float32
    beforehand."""
    from transformers import CLIPTextModel

    fresh_run(image_folder, tmp_path / "bf16", "--no-analyze", "--mixed_precision", "bf16", "--max_train_steps", "1")
    shutil.copytree(tmp_path / "bf16", tmp_path / "float32", ignore=shutil.ignore_patterns("checkpoint-*"))
    CLIPTextModel.from_pretrained(tmp_path / "bf16" / "text_encoder", local_files_only=True).float().save_pretrained(
        tmp_path / "float32" / "text_encoder")
    runs = [fresh_run(image_folder, tmp_path / f"from_{name}", "--no-analyze", "--max_train_steps", "1",
                      "--pretrained_model_name_or_path", str(tmp_path / name)) for name in ("bf16", "float32")]
    assert runs[0]["global_step"] == 1
    assert same_training(*runs)


def test_the_output_folder_is_a_stable_diffusion_pipeline(image_folder, tmp_path):
    """The docstring promised upstream's layout (StableDiffusionPipeline.save_pretrained); the old script wrote
    the sub-folders without model_index.json, and StableDiffusionPipeline.from_pretrained(OUT) failed (OSError:
    no file named model_index.json). The pipeline read back holds the EMA weights and tokenizes as training did,
    and its scheduler is Stable Diffusion's: the old one was DDPMScheduler's pixel-space default (a linear
    schedule from 1e-4 to 0.02, trained on; clip_sample=True, which clipped the predicted latents to [-1, 1] at
    sampling, and the pipeline warned about it)."""
    from diffusers import StableDiffusionPipeline

    result = fresh_run(image_folder, tmp_path / "out", "--no-analyze", "--max_train_steps", "1")
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    assert all(torch.equal(p, q) for p, q in zip(pipeline.unet.parameters(), result["ema_unet"].shadow_params))
    config = pipeline.scheduler.config
    assert type(pipeline.scheduler).__name__ == "DDPMScheduler" and not config.clip_sample
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2  # SD's schedule, by hand
    assert torch.equal(pipeline.scheduler.alphas_cumprod, torch.cumprod(1 - betas, 0))
    ids = pipeline.tokenizer(["a picture of a squares"], padding="max_length", max_length=8).input_ids
    vocab = pipeline.tokenizer.get_vocab()
    assert ids == [[vocab[w] for w in "a picture of a squares".split()] + [vocab["[PAD]"]] * 3]


def test_bad_input_is_refused_by_name(image_folder, tmp_path):
    # a folder not named checkpoint-STEP: "OSError: We couldn't connect to 'https://huggingface.co' ..." after
    # the models were built (or an IndexError after load_state, for a renamed checkpoint)
    backup = tmp_path / "backup"
    backup.mkdir()
    with pytest.raises(ValueError, match="'backup' is not named checkpoint-STEP"):
        fresh_run(image_folder, tmp_path / "out", "--no-analyze", "--resume_from_checkpoint", str(backup))
    with pytest.raises(ValueError, match="--gradient_accumulation_steps must be at least 1"):  # ZeroDivisionError
        fresh_run(image_folder, tmp_path / "out", "--no-analyze", "--gradient_accumulation_steps", "0")
    with pytest.raises(ValueError, match="--caption_template must have one"):  # IndexError: Replacement index 1
        fresh_run(image_folder, tmp_path / "out", "--no-analyze", "--caption_template", "a {} and a {}")


def test_resumes_at_an_epoch_boundary_and_mid_epoch_under_a_partial_accumulation(image_folder, tmp_path):
    """Coverage: two epochs of 6 batches accumulated over 4 (steps of 4 and 2 micro-batches, the second by
    the dataloader's end), random flips, checkpoints every step with --checkpoints_total_limit 3; resumed from
    checkpoint-2 (the epoch boundary) and, by "latest" in a folder holding only it, from checkpoint-3 (mid
    epoch): the UNet, the EMA and its step count are the uninterrupted run's bit for bit."""
    options = ("--no-analyze", "--gradient_accumulation_steps", "4", "--num_train_epochs", "2", "--random_flip",
               "--checkpointing_steps", "1", "--checkpoints_total_limit", "3")
    straight = fresh_run(image_folder, tmp_path / "straight", *options)
    assert straight["global_step"] == 4
    kept = sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    boundary = fresh_run(image_folder, tmp_path / "boundary", *options, "--resume_from_checkpoint",
                         str(tmp_path / "straight" / "checkpoint-2"))
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "latest" / "checkpoint-3")
    latest = fresh_run(image_folder, tmp_path / "latest", *options, "--resume_from_checkpoint", "latest")
    assert boundary["global_step"] == latest["global_step"] == 4
    assert same_training(straight, boundary) and same_training(straight, latest)
