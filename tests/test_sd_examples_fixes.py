"""Four faults of the Stable Diffusion example scripts (recipes/examples/), each checked against what upstream
(diffusers' examples) does or against a clear refusal:

- the pipeline a full fine-tuning run saves from a local Stable Diffusion folder holds the folder's own scheduler
  (PNDM for Stable Diffusion 1.x), as upstream's ``from_pretrained(folder, unet=..., ...)`` does, with the trained
  ``--prediction_type``; it held the DDPMScheduler the run trained with;
- ``train_controlnet.py`` refuses ``--controlnet_model_name_or_path`` without ``--pretrained_model_name_or_path``
  (the random base built anew is the ControlNet's only if four settings match its run's) and a ControlNet whose
  ``conditioning_channels`` is not 3 (the conditioning images are RGB), by name, before training;
- ``train_dreambooth.py`` refuses a file of its image folders that PIL cannot open as an image, by name, before any
  class image is generated or any step trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from recipes.examples.stable_diffusion import small_components, stable_diffusion_pipeline  # noqa: E402
from test_dreambooth_example import CLASS_PROMPT, INSTANCE_PROMPT, write_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset

TEMPLATE = "a picture of a {}"


def pndm_folder(folder, class_names, template):
    """A local Stable Diffusion folder of small random components whose scheduler is PNDM (as Stable Diffusion 1.x
    ships: ``skip_prk_steps``, Stable Diffusion's schedule, prediction type "epsilon" stated); returns its UNet."""
    from diffusers import PNDMScheduler

    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, scheduler = small_components(class_names, template, 16)
    pndm = PNDMScheduler.from_config(scheduler.config, skip_prk_steps=True, prediction_type="epsilon")
    stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, pndm).save_pretrained(folder)
    return unet


def upstream_scheduler(folder):
    """The scheduler of ``StableDiffusionPipeline.from_pretrained(folder)``: what upstream's saved pipeline holds."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False).scheduler


def saved_scheduler_config(out):
    """The scheduler class and config of the pipeline saved in ``out``, as ``from_pretrained`` reads it back."""
    scheduler = upstream_scheduler(out)
    return type(scheduler), {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


def test_text_to_image_saves_the_folders_own_scheduler_with_the_trained_prediction_type(captioned_image_folder,
                                                                                       tmp_path):
    """Upstream saves StableDiffusionPipeline.from_pretrained(folder, text_encoder=, vae=, unet=): the folder's PNDM
    and its config. The script saved the DDPMScheduler it trained with (another sampler). With --prediction_type
    v_prediction the saved PNDM states v_prediction (the UNet now predicts velocities; upstream keeps the folder's
    epsilon) and every other entry is the folder's."""
    from diffusers import PNDMScheduler

    from recipes.examples.train_text_to_image import main

    pndm_folder(tmp_path / "base", ["circles", "squares"], TEMPLATE)
    main(["--train_data_dir", str(captioned_image_folder), "--output_dir", str(tmp_path / "out"),
          "--pretrained_model_name_or_path", str(tmp_path / "base"), "--prediction_type", "v_prediction",
          "--train_batch_size", "1", "--max_train_steps", "1", "--no-analyze"])
    upstream = upstream_scheduler(tmp_path / "base")
    assert type(upstream) is PNDMScheduler and upstream.config.prediction_type == "epsilon"
    scheduler_class, config = saved_scheduler_config(tmp_path / "out")
    expected = {k: v for k, v in upstream.config.items() if k != "_use_default_values"}
    assert scheduler_class is PNDMScheduler
    assert config == {**expected, "prediction_type": "v_prediction"}


def test_dreambooth_saves_the_folders_own_scheduler(tmp_path):
    """Upstream's DreamBooth saves DiffusionPipeline.from_pretrained(folder, unet=, text_encoder=) with the folder's
    scheduler (PNDM here), its config unchanged without --prediction_type; the script saved its training DDPM."""
    from diffusers import PNDMScheduler

    from recipes.examples.train_dreambooth import main

    pndm_folder(tmp_path / "base", [INSTANCE_PROMPT], "{}")
    main(["--instance_data_dir", str(write_images(tmp_path / "dog", 1, seed=0)), "--instance_prompt", INSTANCE_PROMPT,
          "--output_dir", str(tmp_path / "out"), "--pretrained_model_name_or_path", str(tmp_path / "base"),
          "--train_batch_size", "1", "--max_train_steps", "1", "--no-analyze"])
    upstream = upstream_scheduler(tmp_path / "base")
    scheduler_class, config = saved_scheduler_config(tmp_path / "out")
    assert scheduler_class is PNDMScheduler
    assert config == {k: v for k, v in upstream.config.items() if k != "_use_default_values"}


def controlnet_run(image_folder, out, *extra):
    from recipes.examples.train_controlnet import main

    return main(["--train_data_dir", str(image_folder), "--output_dir", str(out), "--train_batch_size", "1",
                 "--max_train_steps", "1", "--no-analyze", *extra])


def test_a_controlnet_without_its_base_model_is_refused(captioned_image_folder, tmp_path):
    """--controlnet_model_name_or_path alone paired the ControlNet with random components built anew: its own base
    only when --seed, the class names, --caption_template and --resolution all match its run's (a run with --seed 1
    trained silently on a UNet 0.70 away at its largest weight). Refused, naming both options and OUT/base_model."""
    from diffusers import ControlNetModel

    unet = pndm_folder(tmp_path / "cn" / "base_model", ["circles", "squares"], TEMPLATE)
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "cn")
    with pytest.raises(ValueError, match=r"--controlnet_model_name_or_path .*cn without --pretrained_model_name_or_path"
                                         r".*pass --pretrained_model_name_or_path .*cn/base_model, "):
        controlnet_run(captioned_image_folder, tmp_path / "out", "--controlnet_model_name_or_path", str(tmp_path / "cn"))
    assert not (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()


def test_a_controlnet_of_other_than_three_conditioning_channels_is_refused(captioned_image_folder, tmp_path):
    """A 1-channel (depth) ControlNet failed with a convolution shape error in the first forward; the script feeds
    RGB conditioning images (upstream's always are): refused before training, naming conditioning_channels."""
    from diffusers import ControlNetModel

    unet = pndm_folder(tmp_path / "base", ["circles", "squares"], TEMPLATE)
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32),
                              conditioning_channels=1).save_pretrained(tmp_path / "depth")
    with pytest.raises(ValueError, match="its conditioning_channels is 1, and this script feeds 3-channel RGB"):
        controlnet_run(captioned_image_folder, tmp_path / "out", "--pretrained_model_name_or_path",
                       str(tmp_path / "base"), "--controlnet_model_name_or_path", str(tmp_path / "depth"))


def test_a_file_of_a_dreambooth_folder_that_is_not_an_image_is_refused_by_name(tmp_path):
    """A README.txt among the instance images was loaded as one (PIL error); among the class images it was counted
    as one, so one fewer was generated, then PIL failed mid-training. Both are refused by name, the class folder
    before anything is generated. An image PIL reads is counted whatever its name (upstream reads it too)."""
    from PIL import Image

    from recipes.examples.train_dreambooth import generate_class_images, image_files, main

    instance_dir = write_images(tmp_path / "dog", 2, seed=0)
    (instance_dir / "README.txt").write_text("photos of my dog")
    with pytest.raises(ValueError, match=r"--instance_data_dir .*dog: README.txt is not an image"):
        main(["--instance_data_dir", str(instance_dir), "--instance_prompt", INSTANCE_PROMPT,
              "--output_dir", str(tmp_path / "out"), "--no-analyze"])

    class_dir = write_images(tmp_path / "dogs", 2, seed=1)
    (class_dir / "notes.txt").write_text("sampled elsewhere")
    torch.manual_seed(0)
    components = small_components([INSTANCE_PROMPT, CLASS_PROMPT], "{}", 16)
    with pytest.raises(ValueError, match=r"--class_data_dir .*dogs: notes.txt is not an image"):
        generate_class_images(components, str(class_dir), CLASS_PROMPT, 3, 1, 0, torch.device("cpu"))
    assert sorted(p.name for p in class_dir.iterdir()) == ["0.png", "1.png", "notes.txt"]  # nothing generated

    (class_dir / "notes.txt").unlink()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(class_dir / "2", format="PNG")
    assert [p.name for p in image_files(class_dir, "--class_data_dir")] == ["0.png", "1.png", "2"]
