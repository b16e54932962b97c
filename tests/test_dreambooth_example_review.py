"""Second read of recipes/examples/train_dreambooth.py against diffusers' DreamBooth scripts: the prior images are
sampled as upstream samples them (the model's own scheduler and prediction type, not the training override), the
LoRA flow's default learning rate is train_dreambooth_lora.py's, and the "prior_preservation" report section is
the mean over each kind of probe of ⟨C(x, g), Δf(x)⟩ / ‖Δf(x)‖², recomputed here from the ledger."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytest.importorskip("transformers")

from recipes.examples.stable_diffusion import small_components, stable_diffusion_pipeline  # noqa: E402
from recipes.examples.train_dreambooth import main, parse_args  # noqa: E402
from test_dreambooth_example import CLASS_PROMPT, INSTANCE_PROMPT, write_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset



def expected_names(pipeline, count, seed, offset=0):
    """Upstream's file names ``{index}-{sha1}.jpg`` of ``count`` samples of the class prompt drawn in one call by
    ``pipeline`` from a generator seeded with ``seed``."""
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline([CLASS_PROMPT] * count, generator=torch.Generator().manual_seed(seed)).images
    return sorted(f"{offset + i}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg" for i, image in enumerate(images))


def generating_run(tmp_path, *extra):
    """A one-step unanalyzed run that generates its 2 class images into an empty folder; returns the folder."""
    class_dir = tmp_path / "dogs"
    main(["--instance_data_dir", str(write_images(tmp_path / "dog", 2, seed=0)), "--instance_prompt", INSTANCE_PROMPT,
          "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
          "--num_class_images", "2", "--sample_batch_size", "2", "--train_batch_size", "1", "--max_train_steps", "1",
          "--output_dir", str(tmp_path / "out"), "--no-analyze", *extra])
    return class_dir


def test_the_prior_is_sampled_with_the_model_folders_own_scheduler(tmp_path):
    """A local model folder whose scheduler is PNDM (as Stable Diffusion 1.x ships): upstream samples the missing
    class images with DiffusionPipeline.from_pretrained(folder), i.e. PNDM; the script sampled them with a DDPM
    built from the training scheduler's config, other images (a silently different prior)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, scheduler = small_components([INSTANCE_PROMPT, CLASS_PROMPT], "{}", 16)
    folder = tmp_path / "model"
    stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet,
                              PNDMScheduler.from_config(scheduler.config, skip_prk_steps=True)).save_pretrained(folder)
    class_dir = generating_run(tmp_path, "--pretrained_model_name_or_path", str(folder))
    upstream = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    assert isinstance(upstream.scheduler, PNDMScheduler)
    assert sorted(p.name for p in class_dir.iterdir()) == expected_names(upstream, 2, seed=0)


def test_a_prediction_type_override_does_not_change_how_the_prior_is_sampled(tmp_path):
    """A folder whose scheduler states prediction_type "v_prediction" (as Stable Diffusion 2.x's does), trained with
    --prediction_type epsilon: the override retargets training only; upstream samples the prior with the folder's
    pipeline, which reads the model's outputs as velocities. The script registered the override before generating,
    so the class images were the v-model's outputs read as noise predictions (a silently wrong prior). (A folder
    whose config leaves prediction_type out escaped it: diffusers' from_config drops a key the scheduler took by
    default, even after register_to_config.)"""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, scheduler = small_components([INSTANCE_PROMPT, CLASS_PROMPT], "{}", 16)
    folder = tmp_path / "model"
    v_scheduler = DDPMScheduler(**{k: v for k, v in scheduler.config.items() if not k.startswith("_")} |
                                {"prediction_type": "v_prediction"})
    stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, v_scheduler).save_pretrained(folder)
    class_dir = generating_run(tmp_path, "--pretrained_model_name_or_path", str(folder), "--prediction_type", "epsilon")
    upstream = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    assert upstream.scheduler.config.prediction_type == "v_prediction"
    assert sorted(p.name for p in class_dir.iterdir()) == expected_names(upstream, 2, seed=0)


def test_the_lora_flow_defaults_to_train_dreambooth_loras_learning_rate(tmp_path):
    """--rank without --learning_rate: train_dreambooth_lora.py's default 5e-4 (the full fine-tuning default 5e-6 is
    100× smaller, and adapters whose B starts at zero barely move); an explicit rate and the full flow keep theirs."""
    base = ["--instance_data_dir", str(tmp_path), "--instance_prompt", INSTANCE_PROMPT]
    assert parse_args([*base, "--rank", "4"]).learning_rate == 5e-4
    assert parse_args([*base, "--rank", "4", "--learning_rate", "1e-4"]).learning_rate == 1e-4
    assert parse_args(base).learning_rate == 5e-6


def test_the_prior_preservation_section_is_the_ledgers_mean_net_share_per_probe_kind(tmp_path):
    """coverage: the report's "prior_preservation" numbers recomputed from the level × class ledger's contributions
    and Δf alone (net share of group g at probe m = ⟨C_mg, Δf_m⟩ / ‖Δf_m‖², group 2·bin + source), averaged over
    the probes of each kind, which are found independently here by their conditioning (the prompt's embedding)."""
    instance_dir, class_dir = write_images(tmp_path / "dog", 2, seed=0), write_images(tmp_path / "dogs", 2, seed=1)
    out = tmp_path / "out"
    result = main(["--instance_data_dir", str(instance_dir), "--instance_prompt", INSTANCE_PROMPT,
                   "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
                   "--num_class_images", "2", "--train_batch_size", "1", "--max_train_steps", "1",
                   "--learning_rate", "1e-3", "--prior_loss_weight", "0.5", "--output_dir", str(out),
                   "--num_bins", "2", "--num_probes", "4", "--controls", "0"])
    analyzer = result["analyzer"]
    ledger = analyzer.ledgers["level_class"]
    num_probes = ledger.delta.shape[0]
    delta = ledger.delta.double().reshape(num_probes, -1)
    contributions = ledger.contributions.double().reshape(num_probes, ledger.contributions.shape[1], -1)
    shares = torch.einsum("mgd,md->mg", contributions, delta) / delta.pow(2).sum(1, keepdim=True)
    shares = shares.reshape(num_probes, analyzer.num_bins, 2)
    # the instance prompt's embedding by the run's (frozen) text encoder: the instance probes are those that carry it
    tokenizer = small_components([INSTANCE_PROMPT, CLASS_PROMPT], "{}", 16)[0]
    ids = tokenizer(INSTANCE_PROMPT, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        instance_text = result["text_encoder"](ids, return_dict=False)[0].reshape(-1)
    text = analyzer.probe_conditioning[0].reshape(num_probes, -1)
    kinds = torch.tensor([torch.equal(row, instance_text) for row in text])
    assert 0 < int(kinds.sum()) < num_probes and torch.equal(kinds, result["probe_is_instance"])
    section = json.loads((out / "genkernel_report.json").read_text())["prior_preservation"]
    for kind, rows in (("instance_probes", kinds), ("class_probes", ~kinds)):
        for s, source in enumerate(("instance", "prior")):
            assert section[kind][source] == pytest.approx(shares[rows][:, :, s].mean(0).tolist(), rel=1e-6)


def test_the_lora_weights_load_as_upstreams_pipeline_loads_them_into_both_models(tmp_path):
    """coverage: --rank 2 --train_text_encoder, its pytorch_lora_weights.safetensors loaded the way
    train_dreambooth_lora.py's final inference loads it (pipeline.load_lora_weights on the base model) give the
    trained text encoder's states and the trained UNet's predictions exactly (the text encoder's adapters come from
    peft's inject_adapter_in_model, not transformers' add_adapter, and still round-trip)."""
    from accelerate.utils import set_seed

    out = tmp_path / "out"
    trained = main(["--instance_data_dir", str(write_images(tmp_path / "dog", 2, seed=0)), "--instance_prompt",
                    INSTANCE_PROMPT, "--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps", "2",
                    "--rank", "2", "--train_text_encoder", "--learning_rate", "1e-2", "--no-analyze"])
    set_seed(0)  # the base: main's components, built right after set_seed(--seed)
    tokenizer, text_encoder, vae, unet, scheduler = small_components([INSTANCE_PROMPT], "{}", 16)
    pipeline = stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    ids = tokenizer(INSTANCE_PROMPT, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        base_states = pipeline.text_encoder(ids, return_dict=False)[0]
        pipeline.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        states = trained["text_encoder"](ids, return_dict=False)[0]
        assert not torch.equal(states, base_states)  # the adapters trained
        assert torch.equal(pipeline.text_encoder(ids, return_dict=False)[0], states)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        timesteps = torch.tensor([500])
        assert torch.equal(pipeline.unet(latents, timesteps, states).sample,
                           trained["unet"](latents, timesteps, states).sample)
