"""diffusers' ControlNet training flow with the analyzer attached (recipes/examples/train_controlnet.py): offline on a
tiny captioned ImageFolder, a frozen VAE, text encoder and UNet, a ControlNet from the UNet trained alone, each
image's conditioning image its edge map (or a same-named file). The loop's forward is the analyzer's
ControlNetDenoiser exactly; the ledgers add up and cover the ControlNet alone; training is bit for bit the run
without the analyzer; a run resumed mid-epoch is bit for bit the uninterrupted one (ledgers included); the saved
ControlNet loads offline and gives the trained outputs; bf16 mixed precision keeps the UNet float32 and is booked;
bad input is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from recipes.examples.stable_diffusion import small_components  # noqa: E402
from recipes.examples.train_controlnet import ControlNetDataset, controlnet_prediction, main  # noqa: E402
from test_text_to_image_example import assert_identity, assert_three_clipped_steps_add_up  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset

TEMPLATE = "a picture of a {}"


@pytest.fixture
def image_folder(captioned_image_folder):
    return captioned_image_folder


def run(image_folder, out, *extra):
    # 12 images, batches of 2, accumulation over 2: 6 micro-batches, 3 optimizer steps (one epoch)
    return main([
        "--train_data_dir", str(image_folder), "--output_dir", str(out), "--train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--max_grad_norm", "0.05", "--proportion_empty_prompts", "0.3", "--num_bins", "2", "--num_probes", "3",
        "--controls", "1", *extra,
    ])


def same_parameters(first, second):
    return all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


def initial_unet(image_folder):
    """The UNet a run with seed 0 builds (set_seed(0), then the small components: their only draws)."""
    torch.manual_seed(0)
    return small_components(sorted(p.name for p in image_folder.iterdir()), TEMPLATE, 16)[3]


def sobel_edges(image: np.ndarray) -> np.ndarray:
    """The docstring's edge map written out pixel by pixel (float64): ``image`` [3, H, W] in [0, 1] -> [H, W]."""
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    height, width = luma.shape
    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            def at(di, dj):  # the border replicated
                return luma[min(max(i + di, 0), height - 1), min(max(j + dj, 0), width - 1)]
            gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
            gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
            out[i, j] = np.hypot(gx, gy) / (4 * np.sqrt(2))
    return out


@pytest.mark.parametrize("resolution", [16, 8])
def test_each_conditioning_image_is_the_documented_edge_map_of_its_training_image(image_folder, resolution):
    """Without --conditioning_data_dir example i's conditioning image is, in all three channels, the Sobel magnitude
    of the luma of the very image it trains on (at resolution 8: of the resized image it trains on), / 4√2, against
    the brute force above; a vertical step from 0 to 1 gives 4 / 4√2 on both sides of it (0 at the replicated
    borders), a flat image 0."""
    dataset = ControlNetDataset(str(image_folder), resolution)
    for index in (0, 7):
        image, conditioning, _ = dataset[index]
        assert image.shape == conditioning.shape == (3, resolution, resolution)
        expected = sobel_edges(((image.double() + 1) / 2).numpy())
        for channel in conditioning:
            np.testing.assert_allclose(channel.numpy(), expected, rtol=0, atol=1e-6)
        assert float(conditioning.min()) >= 0 and float(conditioning.max()) <= 1 and float(conditioning.max()) > 0.05
    from recipes.examples.train_controlnet import edge_map

    step = torch.zeros(3, 4, 4)
    step[:, :, 2:] = 1  # a vertical edge between columns 1 and 2: gx = 4 on both sides of it, gy = 0
    # (float32 luma: 0.299 + 0.587 + 0.114 rounds to 1 within 1e-7)
    torch.testing.assert_close(edge_map(step), torch.tensor([[0.0, 1, 1, 0]] * 4).expand(3, 4, 4) / 2 ** 0.5, rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(edge_map(torch.full((3, 4, 4), 0.3)), torch.zeros(3, 4, 4), rtol=0, atol=1e-6)


def test_a_conditioning_folder_gives_each_image_its_same_named_file(image_folder, tmp_path):
    """--conditioning_data_dir: example i's conditioning image is the file of the same class folder and name there
    (pixels in [0, 1], upstream's conditioning transforms), not the edge map; a folder lacking one is refused."""
    from PIL import Image

    rng = np.random.default_rng(5)
    controls = tmp_path / "controls"
    written = {}
    for path in sorted(image_folder.rglob("*.png")):
        relative = path.relative_to(image_folder)
        (controls / relative.parent).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(controls / relative)
        written[str(relative)] = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    dataset = ControlNetDataset(str(image_folder), 16, str(controls))
    for index, (path, _) in enumerate(dataset.images.samples):
        _, conditioning, _ = dataset[index]
        torch.testing.assert_close(conditioning, written[str(path.removeprefix(str(image_folder) + "/"))],
                                   rtol=0, atol=0)
    (controls / "squares" / "3.png").unlink()
    with pytest.raises(ValueError, match=r"--conditioning_data_dir .* lacks 1 of the 12 conditioning images, e\.g\. "
                                         r".*squares/3\.png"):
        ControlNetDataset(str(image_folder), 16, str(controls))


def test_the_loops_forward_is_the_analyzers_controlnet_denoiser():
    """controlnet_prediction (the loop's two calls, as train_controlnet.py makes them) equals the ControlNetDenoiser
    the analyzer tracks, bit for bit, with residuals that steer the UNet (the zero convolutions given weights); the
    denoiser put in train mode keeps the frozen UNet in eval mode, as the script leaves it."""
    from diffusers import ControlNetModel

    from genkernel.diffusion import ControlNetDenoiser

    torch.manual_seed(0)
    unet = small_components(["a"], TEMPLATE, 16)[3].requires_grad_(False).eval()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    generator = torch.Generator().manual_seed(1)
    latents, text = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 8, 16, generator=generator)
    controls, timesteps = torch.rand(3, 3, 16, 16, generator=generator), torch.tensor([5, 500, 990])
    denoiser = ControlNetDenoiser(unet, controlnet).train()
    assert controlnet.training and not unet.training
    with torch.no_grad():
        looped = controlnet_prediction(controlnet, unet, latents, timesteps, text, controls)
        assert torch.equal(denoiser(latents, timesteps, text, controls), looped)
        assert not torch.equal(looped, unet(latents, timesteps, text).sample)  # (the control steers the UNet)


def test_the_controlnet_flow_keeps_exact_ledgers_of_the_controlnet_trains_bit_for_bit_resumes_and_saves(image_folder,
                                                                                                      tmp_path):
    """Three optimizer steps (accumulation over 2, clipping, empty prompts): the ledgers add up and the level × class
    split sums to the level split; the analyzer tracks exactly the ControlNet's trainable parameters and each probe
    is a dataset example's latent under its caption's embedding and its edge map (probes of one class folder share
    the embedding, of two differ); the UNet ends where it began; training is bit for
    bit the unanalyzed run's (and not another seed's); the run resumed from checkpoint-1 (mid-epoch) equals the
    straight one, weights and ledgers; the saved ControlNet (and checkpoint-1's) loads offline with
    ControlNetModel.from_pretrained, and gives the trained outputs."""
    from diffusers import ControlNetModel

    from genkernel.diffusion import ControlNetDenoiser

    analyzed = run(image_folder, tmp_path / "analyzed", "--checkpointing_steps", "1")
    analyzer, controlnet, unet = analyzed["analyzer"], analyzed["controlnet"], analyzed["unet"]
    assert_three_clipped_steps_add_up(analyzed)
    level, level_class = analyzer.ledgers["level"], analyzer.ledgers["level_class"]
    torch.testing.assert_close(level_class.contributions.reshape(3, 2, 2, -1).sum(2), level.contributions, rtol=0,
                               atol=64 * torch.finfo(torch.float32).eps * float(level.contributions.abs().max()))
    assert float(level.delta.abs().max()) > 0
    trainable = {f"controlnet.{name}" for name, p in controlnet.named_parameters() if p.requires_grad}
    assert set(analyzer.tracker.params) == trainable and len(trainable) == len(list(controlnet.parameters()))
    dataset = ControlNetDataset(str(image_folder), 16)
    probe_text, probe_controls = analyzer.probe_conditioning
    labels = [next(label for _, control, label in map(dataset.__getitem__, range(len(dataset)))
                   if torch.equal(control, row)) for row in probe_controls]  # (StopIteration: not a dataset example's)
    assert sorted(set(labels)) == [0, 1]
    for m in range(len(labels)):
        for n in range(len(labels)):
            assert torch.equal(probe_text[m], probe_text[n]) == (labels[m] == labels[n])
    assert not unet.training and unet.dtype == torch.float32
    assert same_parameters(unet, initial_unet(image_folder))
    # from_unet's zero convolutions (zero residuals at the start) have moved: the ControlNet now steers the UNet
    assert all(float(conv.weight.detach().abs().max()) > 0 for conv in [*controlnet.controlnet_down_blocks,
                                                                        controlnet.controlnet_mid_block])
    report = json.loads((tmp_path / "analyzed" / "genkernel_report.json").read_text())  # (strict JSON)
    assert report["tracked_steps"] == 3

    bare = run(image_folder, tmp_path / "bare", "--no-analyze")
    assert bare["analyzer"] is None and same_parameters(controlnet, bare["controlnet"])
    assert not same_parameters(controlnet, run(image_folder, tmp_path / "other", "--no-analyze", "--seed", "1")[
        "controlnet"])

    resumed = run(image_folder, tmp_path / "resumed", "--resume_from_checkpoint",
                  str(tmp_path / "analyzed" / "checkpoint-1"))
    assert resumed["global_step"] == 3 and same_parameters(controlnet, resumed["controlnet"])
    for name, ledger in analyzer.ledgers.items():
        assert torch.equal(resumed["analyzer"].ledgers[name].contributions, ledger.contributions), name
        assert torch.equal(resumed["analyzer"].ledgers[name].delta, ledger.delta), name

    saved = ControlNetModel.from_pretrained(tmp_path / "analyzed", local_files_only=True)
    assert same_parameters(saved, controlnet)
    at_step_1 = ControlNetModel.from_pretrained(tmp_path / "analyzed" / "checkpoint-1" / "controlnet",
                                                local_files_only=True)
    assert not same_parameters(at_step_1, controlnet)
    generator = torch.Generator().manual_seed(2)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 8, 16, generator=generator)
    controls, timesteps = torch.rand(2, 3, 16, 16, generator=generator), torch.tensor([40, 700])
    with torch.no_grad():
        trained = ControlNetDenoiser(unet, controlnet)(latents, timesteps, text, controls)
        assert torch.equal(ControlNetDenoiser(unet, saved)(latents, timesteps, text, controls), trained)
        assert not torch.equal(ControlNetDenoiser(unet, at_step_1)(latents, timesteps, text, controls), trained)


def test_a_run_trains_on_from_the_saved_controlnet_and_base_model(image_folder, tmp_path):
    """The saved ControlNet (OUT) and the base components built here (OUT/base_model, a local Stable Diffusion folder)
    are read offline by --controlnet_model_name_or_path and --pretrained_model_name_or_path: with lr 0 (no weight
    decay moves) the second run ends at the first run's ControlNet, and its UNet is the first run's."""
    first = run(image_folder, tmp_path / "first", "--no-analyze", "--max_train_steps", "1")
    second = run(image_folder, tmp_path / "second", "--no-analyze", "--max_train_steps", "1", "--learning_rate", "0",
                 "--controlnet_model_name_or_path", str(tmp_path / "first"),
                 "--pretrained_model_name_or_path", str(tmp_path / "first" / "base_model"))
    assert second["global_step"] == 1
    assert same_parameters(second["controlnet"], first["controlnet"])
    assert same_parameters(second["unet"], first["unet"])


def test_bf16_mixed_precision_keeps_the_unet_float32_is_booked_and_trains_bit_for_bit(image_folder, tmp_path):
    """--mixed_precision bf16 (CPU autocast): the frozen UNet stays float32 and unchanged, the ControlNet float32; the
    analyzer books the bfloat16 gradients (mixed_precision="observe"), its ledgers add up with the rounding in the
    residual, and training is bit for bit the unanalyzed bf16 run's (which differs from the float32 run)."""
    analyzed = run(image_folder, tmp_path / "analyzed", "--mixed_precision", "bf16", "--max_train_steps", "2")
    analyzer = analyzed["analyzer"]
    assert [s["gradient_precision"] for s in analyzer.tracker.gradient_scales] == ["bfloat16", "bfloat16"]
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)
    assert analyzed["unet"].dtype == analyzed["controlnet"].dtype == torch.float32
    assert same_parameters(analyzed["unet"], initial_unet(image_folder))
    bare = run(image_folder, tmp_path / "bare", "--mixed_precision", "bf16", "--max_train_steps", "2", "--no-analyze")
    assert same_parameters(analyzed["controlnet"], bare["controlnet"])
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # (accelerate refuses another precision in one process)
    GradientState._reset_state()
    full = run(image_folder, tmp_path / "full", "--max_train_steps", "2", "--no-analyze")
    assert not same_parameters(analyzed["controlnet"], full["controlnet"])


def test_bad_input_is_refused_by_name(image_folder, tmp_path):
    from diffusers import ControlNetModel

    with pytest.raises(ValueError, match=r"proportion_empty_prompts must be in \[0, 1\]"):
        run(image_folder, tmp_path, "--proportion_empty_prompts", "1.5")
    with pytest.raises(ValueError, match="--train_data_dir .*: no such folder"):
        run(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ValueError, match="--conditioning_data_dir .*: no such folder"):
        run(image_folder, tmp_path, "--conditioning_data_dir", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--resolution must be a multiple of 4"):
        run(image_folder, tmp_path, "--resolution", "10")
    # a ControlNet whose conditioning embedding divides by 8 (upstream's default), for a VAE that divides by 2 (given
    # with its base: without one, a ControlNet is refused for that first)
    from recipes.examples.stable_diffusion import stable_diffusion_pipeline

    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, noise_scheduler = small_components(["a", "b"], TEMPLATE, 16)
    stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler).save_pretrained(tmp_path / "base")
    base = ("--pretrained_model_name_or_path", str(tmp_path / "base"))
    ControlNetModel.from_unet(unet).save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="conditioning embedding divides the resolution by 8, the VAE by 2"):
        run(image_folder, tmp_path / "out", "--controlnet_model_name_or_path", str(tmp_path / "wrong"), *base)
    # a ControlNet of another UNet (cross-attention to 32-wide text, not the text encoder's 16)
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**unet.config, "cross_attention_dim": 32})
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"is not made for this UNet \(cross_attention_dim 32, the UNet's 16\)"):
        run(image_folder, tmp_path / "out", "--controlnet_model_name_or_path", str(tmp_path / "other"), *base)
