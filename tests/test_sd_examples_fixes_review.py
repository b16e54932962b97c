"""A second read of the Stable Diffusion example scripts' fixes (tests/test_sd_examples_fixes.py): the faults those
fixes left or did not reach, each checked against a clear refusal that fires before any side effect (or a warning).

- ``train_controlnet.py``'s refusal of ``--controlnet_model_name_or_path`` without ``--pretrained_model_name_or_path``
  ran only after the ControlNet was loaded and compared with the small random UNet, so that a ControlNet of any
  other base (a Stable Diffusion one) was refused as "not made for this UNet", naming the wrong fix; both
  refusals came after the output folder was made;
- ``train_dreambooth.py``'s image check read each file's header alone: a truncated image passed it, the missing
  class images were generated, then training failed at the step that loaded it, with PIL's error naming no file;
- a run resumed with another ``--prediction_type`` trained one model on two objectives silently (and its saved
  pipeline stated the second alone), and one resumed on another base folder trained the checkpoint's UNet under
  other frozen encoders, silently;
- ``folder_scheduler`` with ``--prediction_type`` on a folder whose scheduler has no prediction type (a
  flow-matching one) dropped it with a logged warning only, after the whole run;
- LoRA adapters (saved alone) trained to another prediction type than their folder's were sampled by that folder's
  pipeline as its own, silently: warned of, naming the scheduler to set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from recipes.examples.stable_diffusion import small_components, stable_diffusion_pipeline  # noqa: E402
from test_dreambooth_example import CLASS_PROMPT, INSTANCE_PROMPT, write_images  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset

TEMPLATE = "a picture of a {}"


def small_unet(block_out_channels):
    """A UNet of the small components' kind (cross-attention, 2 blocks) with ``block_out_channels``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)


def base_folder(folder, class_names, template, scheduler=None):
    """A local Stable Diffusion folder of the small random components (seed 0), with ``scheduler`` (default: their
    DDPMScheduler); returns ``folder``."""
    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, noise_scheduler = small_components(class_names, template, 16)
    stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler or noise_scheduler).save_pretrained(folder)
    return folder


def controlnet_run(image_folder, out, *extra):
    from recipes.examples.train_controlnet import main

    return main(["--train_data_dir", str(image_folder), "--output_dir", str(out), "--train_batch_size", "1",
                 "--max_train_steps", "1", "--no-analyze", *extra])


def test_a_controlnet_of_another_base_without_its_base_is_refused_for_the_missing_base(captioned_image_folder,
                                                                                      tmp_path):
    """A ControlNet made for another UNet (wider than the small random one, as every Stable Diffusion ControlNet is)
    given without --pretrained_model_name_or_path was refused as "not made for this UNet ...: give a ControlNet made
    for this base model" (the fix is to give its base), after the output folder was made. Now the refusal names
    --pretrained_model_name_or_path, and no output folder is made; a 1-channel ControlNet is refused before it too."""
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(small_unet((16, 32)), conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        tmp_path / "cn")
    with pytest.raises(ValueError, match=r"--controlnet_model_name_or_path .*cn without --pretrained_model_name_or_path"
                                         r".*pass --pretrained_model_name_or_path .*cn/base_model"):
        controlnet_run(captioned_image_folder, tmp_path / "out", "--controlnet_model_name_or_path",
                       str(tmp_path / "cn"))
    assert not (tmp_path / "out").exists()

    ControlNetModel.from_unet(small_unet((8, 16)), conditioning_embedding_out_channels=(16, 32),
                              conditioning_channels=1).save_pretrained(tmp_path / "depth")
    base_folder(tmp_path / "base", ["circles", "squares"], TEMPLATE)
    with pytest.raises(ValueError, match="its conditioning_channels is 1, and this script feeds 3-channel RGB"):
        controlnet_run(captioned_image_folder, tmp_path / "out", "--pretrained_model_name_or_path",
                       str(tmp_path / "base"), "--controlnet_model_name_or_path", str(tmp_path / "depth"))
    assert not (tmp_path / "out").exists()


def truncate(path):
    """Cut the last tenth of the image file at ``path`` (its pixel data's end), checking that PIL still opens it
    (its header is whole) and fails only on decoding its pixels: what a header check passes."""
    from PIL import Image

    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 9 // 10])
    with Image.open(path) as image:
        assert image.size == (16, 16)
        with pytest.raises(OSError, match="image file is truncated"):
            image.load()


def test_a_truncated_image_of_a_dreambooth_folder_is_refused_by_name_before_class_images_are_generated(tmp_path):
    """A truncated PNG among the instance images passed the header check: the 2 missing class images were generated,
    then training failed at its second step with PIL's "image file is truncated", naming no file. Refused now by
    name, the class folder untouched; a truncated JPEG among the class images likewise. A non-image file beyond the
    first --num_class_images (never read: upstream uses the first ones too) is not refused."""
    from PIL import Image

    from recipes.examples.train_dreambooth import generate_class_images, main

    instance_dir = write_images(tmp_path / "dog", 2, seed=0)
    truncate(instance_dir / "1.png")
    class_dir = write_images(tmp_path / "dogs", 1, seed=1)
    with pytest.raises(ValueError, match=r"--instance_data_dir .*dog: 1.png is not an image PIL can read "
                                         r"\(image file is truncated\)"):
        main(["--instance_data_dir", str(instance_dir), "--instance_prompt", INSTANCE_PROMPT,
              "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
              "--num_class_images", "3", "--output_dir", str(tmp_path / "out"), "--train_batch_size", "1",
              "--max_train_steps", "4", "--no-analyze"])
    assert sorted(p.name for p in class_dir.iterdir()) == ["0.png"]  # nothing generated

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(class_dir / "1.jpg")
    truncate(class_dir / "1.jpg")
    torch.manual_seed(0)
    components = small_components([INSTANCE_PROMPT, CLASS_PROMPT], "{}", 16)
    with pytest.raises(ValueError, match=r"--class_data_dir .*dogs: 1.jpg is not an image PIL can read"):
        generate_class_images(components, str(class_dir), CLASS_PROMPT, 3, 1, 0, torch.device("cpu"))
    assert sorted(p.name for p in class_dir.iterdir()) == ["0.png", "1.jpg"]

    (class_dir / "1.jpg").unlink()
    (class_dir / "notes.txt").write_text("sampled elsewhere")  # sorted after 0.png: unused with 1 class image
    assert generate_class_images(components, str(class_dir), CLASS_PROMPT, 1, 1, 0, torch.device("cpu")) == 0


def test_a_resume_with_another_prediction_type_or_base_is_refused(captioned_image_folder, tmp_path):
    """A text-to-image run's checkpoint of a UNet trained to v-prediction on folder A, resumed without
    --prediction_type (the scheduler's epsilon), trained on to predict noise: one model on two objectives, silently,
    its saved pipeline stating epsilon alone; resumed on folder B (other frozen encoders), the checkpoint's UNet
    trained on under B's text encoder and VAE and was saved with them, silently. Both refused by name; A copied
    elsewhere (the same components) resumes."""
    import shutil

    from recipes.examples.train_text_to_image import main

    def run(out, base, *extra):
        return main(["--train_data_dir", str(captioned_image_folder), "--output_dir", str(out),
                     "--pretrained_model_name_or_path", str(base), "--train_batch_size", "1",
                     "--checkpointing_steps", "1", "--no-analyze", *extra])

    folder_a = base_folder(tmp_path / "A", ["circles", "squares"], TEMPLATE)
    run(tmp_path / "first", folder_a, "--max_train_steps", "1", "--prediction_type", "v_prediction")
    resume = ("--max_train_steps", "2", "--resume_from_checkpoint", str(tmp_path / "first" / "checkpoint-1"))
    with pytest.raises(ValueError, match=r"--prediction_type v_prediction \(here epsilon\): resume with the same"):
        run(tmp_path / "second", folder_a, *resume)
    assert not (tmp_path / "second" / "unet").exists()

    torch.manual_seed(1)
    tokenizer, text_encoder, vae, unet, scheduler = small_components(["circles", "squares"], TEMPLATE, 16)
    stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(tmp_path / "B")
    with pytest.raises(ValueError, match=r"--pretrained_model_name_or_path components of sha1 [0-9a-f]{12} \(here "
                                         r"components of sha1 [0-9a-f]{12}\): resume with the same"):
        run(tmp_path / "third", tmp_path / "B", "--prediction_type", "v_prediction", *resume)
    assert not (tmp_path / "third" / "unet").exists()

    shutil.copytree(folder_a, tmp_path / "A_moved")
    assert run(tmp_path / "fourth", tmp_path / "A_moved", "--prediction_type", "v_prediction", *resume)[
        "global_step"] == 2


def test_a_prediction_type_the_folders_scheduler_cannot_take_is_refused_before_training(captioned_image_folder,
                                                                                       tmp_path):
    """A folder whose scheduler has no prediction type (flow matching): --prediction_type v_prediction was dropped by
    from_config with a logged warning, after the whole run, and the saved pipeline's scheduler could not sample
    what its UNet predicts. Refused before training, naming the scheduler; without --prediction_type the folder's
    own is what folder_scheduler gives (its class, no prediction type)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from recipes.examples.stable_diffusion import folder_scheduler
    from recipes.examples.train_text_to_image import main

    base = base_folder(tmp_path / "base", ["circles", "squares"], TEMPLATE, FlowMatchEulerDiscreteScheduler())
    assert type(folder_scheduler(str(base))) is FlowMatchEulerDiscreteScheduler
    with pytest.raises(ValueError, match=r"base/scheduler: its FlowMatchEulerDiscreteScheduler has no prediction_type"):
        main(["--train_data_dir", str(captioned_image_folder), "--output_dir", str(tmp_path / "out"),
              "--pretrained_model_name_or_path", str(base), "--prediction_type", "v_prediction",
              "--train_batch_size", "1", "--max_train_steps", "1", "--checkpointing_steps", "1", "--no-analyze"])
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_lora_adapters_trained_to_another_prediction_type_than_the_folders_are_warned_of(captioned_image_folder,
                                                                                        tmp_path):
    """--rank saves the adapters alone (upstream's LoRA flow), so that the folder's pipeline with them loaded samples
    them with its own prediction type: adapters trained to v-prediction on an epsilon folder were read as noise
    predictions, silently. A warning names the scheduler to set; none where the two agree."""
    import warnings

    pytest.importorskip("peft")
    from recipes.examples.train_text_to_image import main

    base = base_folder(tmp_path / "base", ["circles", "squares"], TEMPLATE)  # its scheduler: epsilon
    with pytest.warns(UserWarning, match=r"--rank with --prediction_type v_prediction on .*base, whose scheduler's "
                                         r"prediction type is epsilon: .*prediction_type='v_prediction'\)"):
        main(["--train_data_dir", str(captioned_image_folder), "--output_dir", str(tmp_path / "out"),
              "--pretrained_model_name_or_path", str(base), "--prediction_type", "v_prediction", "--rank", "2",
              "--train_batch_size", "1", "--max_train_steps", "1", "--no-analyze"])
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    from recipes.examples.stable_diffusion import warn_adapters_prediction_type

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_adapters_prediction_type(str(base), "epsilon")
        warn_adapters_prediction_type(str(base), None)


def test_a_dangling_link_in_a_dreambooth_folder_is_refused_by_name(tmp_path):
    """A link to a moved image was left out silently (Path.is_file is False for it): the subject trained on one image
    fewer, against the scripts' own rule that what the user put in the folder is refused by name, not skipped."""
    from recipes.examples.train_dreambooth import image_files

    instance_dir = write_images(tmp_path / "dog", 2, seed=0)
    (instance_dir / "2.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(ValueError, match=r"--instance_data_dir .*dog: 2.png is not an image PIL can read"):
        image_files(instance_dir, "--instance_data_dir")
