"""diffusers' text-to-image fine-tuning flow with the analyzer attached (recipes/examples/train_text_to_image.py):
offline on a tiny captioned ImageFolder, a frozen VAE and text encoder, a cross-attention UNet with EMA,
gradient accumulation, clipping, Min-SNR, offset noise, input perturbation, empty prompts and DREAM. The ledgers add
up (by level and by level × class), training is bit-for-bit the run without the analyzer, and a run resumed
mid-epoch from a checkpoint is bit-for-bit the uninterrupted one, ledgers included."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from recipes.examples.train_text_to_image import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset


@pytest.fixture
def image_folder(captioned_image_folder):
    return captioned_image_folder


def run(image_folder, out, *extra):
    # 12 images, batches of 2, accumulation over 2: 6 micro-batches, 3 optimizer steps
    return main([
        "--train_data_dir", str(image_folder), "--output_dir", str(out), "--train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--use_ema", "--snr_gamma", "5.0", "--noise_offset", "0.1",
        "--input_perturbation", "0.1", "--proportion_empty_prompts", "0.3", "--max_grad_norm", "0.05",
        "--learning_rate", "1e-3", "--num_bins", "2", "--num_probes", "3", "--controls", "1", *extra,
    ])


def assert_identity(ledger, what):
    """contributions + rest + residual = Δf at every probe."""
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12 * float(ledger.delta.abs().max()), msg=what)


def assert_three_clipped_steps_add_up(analyzed):
    """An example's run of 3 optimizer steps in 2 micro-batches each, clipped (the clipping acted and the ledger
    followed it): every ledger of its analyzer adds up."""
    analyzer = analyzed["analyzer"]
    assert analyzed["global_step"] == 3 and analyzer.ledger.steps == 3
    scales = analyzer.tracker.gradient_scales
    assert [s["micro_batches"] for s in scales] == [2, 2, 2]
    assert any(s["scale_times_micro_batches"] < 1 for s in scales)
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)


def assert_encoders_counted(analyzer):
    """The cost's bare step holds the frozen VAE's encode and text encoder's pass of every example (the example's
    step_overhead): within 15 % of torch's operation count of those over one UNet forward (the estimate counts
    linear and convolutional layers, torch the attention products too), on the example's small components."""
    from recipes.benchmarks.harness import counted_flops
    from recipes.examples.stable_diffusion import small_components

    tokenizer, text_encoder, vae, unet, _ = small_components(["circles", "squares"], "a picture of a {}", 16)
    image = torch.randn(1, 3, 16, 16)
    ids = tokenizer(["a picture of a circles"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        latent, text = vae.encode(image).latent_dist.mean, text_encoder(ids)[0]
        encoders = counted_flops(lambda: vae.encode(image))[0] + counted_flops(lambda: text_encoder(ids))[0]
        forward = counted_flops(lambda: unet(latent, torch.tensor([3]), text))[0]
    assert analyzer.tracker.cost.settings["step_overhead"] == pytest.approx(encoders / forward, rel=0.15)


def test_the_text_to_image_flow_keeps_exact_ledgers_trains_bit_for_bit_and_resumes_mid_epoch(image_folder, tmp_path):
    analyzed = run(image_folder, tmp_path / "analyzed", "--checkpointing_steps", "1")
    analyzer = analyzed["analyzer"]
    assert_three_clipped_steps_add_up(analyzed)
    # the level × class split sums to the level split, to float32's rounding (the UNet trains in float32; each
    # partition's rows are made and summed in it)
    level, level_class = analyzer.ledgers["level"], analyzer.ledgers["level_class"]
    torch.testing.assert_close(level_class.contributions.reshape(3, 2, 2, -1).sum(2), level.contributions, rtol=0,
                               atol=64 * torch.finfo(torch.float32).eps * float(level.contributions.abs().max()))
    assert_identity(analyzer.ema_ledgers["level"], "ema")
    assert_encoders_counted(analyzer)
    report = json.loads((tmp_path / "analyzed" / "genkernel_report.json").read_text())
    assert "ema" in report
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "analyzed" / name).is_dir()

    bare = run(image_folder, tmp_path / "bare", "--no-analyze")
    assert bare["analyzer"] is None
    assert all(torch.equal(p, q) for p, q in zip(analyzed["unet"].parameters(), bare["unet"].parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(analyzed["unet"].parameters(),
                                                     run(image_folder, tmp_path / "other", "--no-analyze",
                                                         "--seed", "1")["unet"].parameters()))

    # resumed after the first optimizer step (mid-epoch): the same weights and ledgers as the straight run
    resumed = run(image_folder, tmp_path / "resumed", "--resume_from_checkpoint",
                  str(tmp_path / "analyzed" / "checkpoint-1"))
    assert resumed["global_step"] == 3
    assert all(torch.equal(p, q) for p, q in zip(analyzed["unet"].parameters(), resumed["unet"].parameters()))
    for name, ledger in analyzer.ledgers.items():
        assert torch.equal(resumed["analyzer"].ledgers[name].contributions, ledger.contributions), name


def test_bad_settings_are_refused_before_training(image_folder, tmp_path):
    with pytest.raises(ValueError, match="proportion_empty_prompts must be in"):
        run(image_folder, tmp_path, "--proportion_empty_prompts", "1.5")
    with pytest.raises(ValueError, match=r"caption_template needs a \{\}"):
        run(image_folder, tmp_path, "--caption_template", "a picture")


def test_a_run_fine_tunes_on_from_a_folder_this_script_saved(image_folder, tmp_path):
    """The saved components (unet, vae, text_encoder, its word-level tokenizer, scheduler) are a local Stable
    Diffusion folder: read offline by --pretrained_model_name_or_path, training starts from the saved UNet (with
    lr 0 it ends there: the EMA weights the first run saved)."""
    from diffusers import UNet2DConditionModel

    run(image_folder, tmp_path / "first", "--no-analyze", "--max_train_steps", "1")
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "first" / "unet", local_files_only=True)
    second = run(image_folder, tmp_path / "second", "--pretrained_model_name_or_path", str(tmp_path / "first"),
                 "--learning_rate", "0", "--max_train_steps", "1")
    assert second["global_step"] == 1 and second["analyzer"].ledger.steps == 1
    assert all(torch.equal(p, q) for p, q in zip(second["unet"].parameters(), saved.parameters()))


def test_an_analyzer_attached_to_a_run_checkpointed_without_it_starts_at_the_checkpoints_step(image_folder, tmp_path):
    """A run trained so far without the analyzer, resumed with it: accelerate's load_state refused the checkpoint
    (no file for the analyzer registered before it). The analyzer now starts at the checkpoint's step, its ledger
    holds the steps after it, and training is bit for bit the run never analyzed."""
    straight = run(image_folder, tmp_path / "straight", "--no-analyze", "--checkpointing_steps", "1")
    resumed = run(image_folder, tmp_path / "resumed", "--resume_from_checkpoint",
                  str(tmp_path / "straight" / "checkpoint-1"), "--checkpointing_steps", "1")
    analyzer = resumed["analyzer"]
    assert resumed["global_step"] == 3 and analyzer.ledger.steps == 2
    assert all(torch.equal(p, q) for p, q in zip(straight["unet"].parameters(), resumed["unet"].parameters()))
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)
    # the checkpoints it saved from then on hold its state: resumed from one, it goes on where it was
    again = run(image_folder, tmp_path / "again", "--resume_from_checkpoint", str(tmp_path / "resumed" / "checkpoint-2"))
    assert again["analyzer"].ledger.steps == 2
    torch.testing.assert_close(again["analyzer"].ledger.contributions, analyzer.ledger.contributions, rtol=0, atol=0)


def test_dream_training_is_booked_from_the_corrected_inputs_and_trains_bit_for_bit(image_folder, tmp_path):
    """--dream_training runs a no-grad forward of the UNet before the training forward and trains on the
    corrected latents and target: the analyzer's group gradients (checked each step against the real gradient)
    come from the training forward, the ledgers add up, training is bit for bit the unanalyzed run's and not
    the run without DREAM's. --scale_lr scales the rate by accumulation × batch × processes (2 × 2 × 1)."""
    dream = ("--dream_training", "--scale_lr", "--learning_rate", "2.5e-4")
    analyzed = run(image_folder, tmp_path / "analyzed", *dream)
    analyzer = analyzed["analyzer"]
    assert analyzer.ledger.steps == 3
    assert analyzer.tracker.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3, rel=1e-12)
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)
    bare = run(image_folder, tmp_path / "bare", "--no-analyze", *dream)
    assert all(torch.equal(p, q) for p, q in zip(analyzed["unet"].parameters(), bare["unet"].parameters()))
    plain = run(image_folder, tmp_path / "plain", "--no-analyze", "--scale_lr", "--learning_rate", "2.5e-4")
    assert not all(torch.equal(p, q) for p, q in zip(analyzed["unet"].parameters(), plain["unet"].parameters()))


def lora_run(image_folder, out, *extra):
    # train_text_to_image_lora.py's flow: adapters of rank 2 on a frozen UNet, no EMA (2 probes, the least: the LoRA
    # test reads no probe count, and the kernel records at bind and at the end run over min(8, their count) inputs)
    return main([
        "--train_data_dir", str(image_folder), "--output_dir", str(out), "--train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--rank", "2", "--snr_gamma", "5.0", "--max_grad_norm", "0.05",
        "--learning_rate", "1e-2", "--num_bins", "2", "--num_probes", "2", "--controls", "1", *extra,
    ])


def test_the_lora_flow_books_the_adapters_trains_bit_for_bit_resumes_and_saves_loadable_weights(image_folder, tmp_path):
    """--rank: the analyzer's ledger covers the adapters alone and adds up; training is bit for bit the unanalyzed
    run's; a run resumed mid-epoch is the straight one (ledgers included); the saved pytorch_lora_weights load into
    the UNet (diffusers' load_lora_adapter) and give the trained adapters' outputs."""
    import copy

    analyzed = lora_run(image_folder, tmp_path / "analyzed", "--checkpointing_steps", "1")
    analyzer, unet = analyzed["analyzer"], analyzed["unet"]
    assert analyzed["global_step"] == 3 and analyzer.ledger.steps == 3
    assert analyzer.tracker.params and all("lora_" in name for name in analyzer.tracker.params)
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)
    bare = lora_run(image_folder, tmp_path / "bare", "--no-analyze")
    assert all(torch.equal(p, q) for p, q in zip(unet.parameters(), bare["unet"].parameters()))
    resumed = lora_run(image_folder, tmp_path / "resumed", "--resume_from_checkpoint",
                       str(tmp_path / "analyzed" / "checkpoint-1"))
    assert all(torch.equal(p, q) for p, q in zip(unet.parameters(), resumed["unet"].parameters()))
    for name, ledger in analyzer.ledgers.items():
        assert torch.equal(resumed["analyzer"].ledgers[name].contributions, ledger.contributions), name

    loaded = copy.deepcopy(unet)
    loaded.delete_adapters(list(unet.peft_config))
    loaded.load_lora_adapter(str(tmp_path / "analyzed"), prefix="unet", adapter_name="loaded",
                             weight_name="pytorch_lora_weights.safetensors")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 4, 4, generator=generator)
    e = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        trained = unet(x, torch.tensor([3, 400]), e).sample
        torch.testing.assert_close(loaded(x, torch.tensor([3, 400]), e).sample, trained, rtol=0, atol=0)
        loaded.disable_adapters()
        assert not torch.allclose(loaded(x, torch.tensor([3, 400]), e).sample, trained)


def test_lora_settings_upstream_does_not_have_are_refused(image_folder, tmp_path):
    with pytest.raises(ValueError, match="--use_ema is the full fine-tuning flow's"):
        lora_run(image_folder, tmp_path, "--use_ema")
    with pytest.raises(ValueError, match="--rank must be at least 1"):
        lora_run(image_folder, tmp_path, "--rank", "0")
