"""The accelerate examples' EpochRNG (recipes/examples/checkpointing.py) records the run's options a resume must
share: a checkpoint saved under ``--mixed_precision bf16`` resumed without it was refused only by the analyzer's
state check, as "other probe values" (the probes are encoded in the precision's dtype), naming no option."""

from __future__ import annotations

import pytest
import torch

from recipes.examples.checkpointing import EpochRNG

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_a_checkpoint_of_another_precision_is_refused_naming_the_option():
    saved = EpochRNG(settings={"mixed_precision": "bf16"})
    saved.record(0)
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"--mixed_precision bf16 \(here no\)"):
        EpochRNG(settings={"mixed_precision": "no"}).load_state_dict(state)
    same = EpochRNG(settings={"mixed_precision": "bf16"})
    same.load_state_dict(state)
    torch.rand(3)
    same.restore(0)
    first = torch.rand(3)
    saved.restore(0)
    assert torch.equal(torch.rand(3), first)  # (the random states round-trip)
    older = {key: value for key, value in state.items() if key != "settings"}  # (a checkpoint before settings)
    EpochRNG(settings={"mixed_precision": "no"}).load_state_dict(older)


def test_the_controlnet_example_refuses_to_resume_a_bf16_checkpoint_in_float32(captioned_image_folder, tmp_path):
    pytest.importorskip("transformers")
    from test_controlnet_example import run

    from accelerate.state import AcceleratorState, GradientState

    run(captioned_image_folder, tmp_path / "bf16", "--mixed_precision", "bf16", "--max_train_steps", "1",
        "--checkpointing_steps", "1", "--no-analyze")
    AcceleratorState._reset_state(reset_partial_state=True)  # (accelerate refuses a second precision in a process)
    GradientState._reset_state()
    with pytest.raises(ValueError, match=r"--mixed_precision bf16 \(here no\)"):
        run(captioned_image_folder, tmp_path / "float32", "--max_train_steps", "2", "--no-analyze",
            "--resume_from_checkpoint", str(tmp_path / "bf16" / "checkpoint-1"))


def test_a_resume_with_another_batch_size_or_accumulation_is_refused_naming_the_option(captioned_image_folder,
                                                                                       tmp_path):
    """The resumed epoch's first batch is global_step × accumulation batches in (upstream's resume_step): another
    --gradient_accumulation_steps or --train_batch_size went on from another place in the epoch, silently (one
    optimizer step with accumulation 1, resumed with 2, skipped 2 batches where 1 was trained)."""
    pytest.importorskip("transformers")
    from test_controlnet_example import run  # (batches of 2, accumulation 2 unless given)

    run(captioned_image_folder, tmp_path / "first", "--max_train_steps", "1", "--checkpointing_steps", "1",
        "--gradient_accumulation_steps", "1", "--no-analyze")
    checkpoint = str(tmp_path / "first" / "checkpoint-1")
    with pytest.raises(ValueError, match=r"--gradient_accumulation_steps 1 \(here 2\)"):
        run(captioned_image_folder, tmp_path / "accumulated", "--max_train_steps", "2", "--no-analyze",
            "--resume_from_checkpoint", checkpoint)
    with pytest.raises(ValueError, match=r"--train_batch_size 2 \(here 1\)"):
        run(captioned_image_folder, tmp_path / "smaller", "--max_train_steps", "2", "--train_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--no-analyze", "--resume_from_checkpoint", checkpoint)
    run(captioned_image_folder, tmp_path / "same", "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
        "--no-analyze", "--resume_from_checkpoint", checkpoint)
