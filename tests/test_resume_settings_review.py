"""Second read of the examples' resume settings and report (recipes/examples/checkpointing.py, 2609b96 and 1e9a0bd).

- ``resume_settings`` recorded ``--mixed_precision``, ``--train_batch_size`` and ``--gradient_accumulation_steps``
  (and the SD scripts' prediction type and base) alone. Every other option went through a resume silently:
  train_unconditional.py's ``--prediction_type`` / ``--objective`` / ``--ddpm_num_steps`` trained another objective
  from the checkpoint on (the UNet 1.6e-4 away from the uninterrupted run's after one step); ``--random_flip``,
  ``--center_crop``, ``--resolution`` and ``--dataloader_num_workers`` (the flips drawn in a worker) other data
  (6.7e-4 after five steps); ``--lr_scheduler`` / ``--lr_warmup_steps`` another schedule from the checkpoint on
  (3.6e-5, 8.5e-5); ``--learning_rate``, ``--adam_beta1``, ``--seed`` (without the analyzer) were ignored, the
  checkpoint's put back by load_state, so the user did not get what was asked; a data folder of other content
  trained on it. Now every option but the output, the length, the checkpointing and ``--analyze`` is recorded
  (folders by content), the analyzer's only when analyzing; a longer decaying schedule is warned of, not refused.
- ``write_report`` opened the report for writing before serializing it: a report that failed to serialize (a NaN:
  ValueError from ``allow_nan=False``) left an empty file in place of the one there (a resumed run's folder) and
  ended the script before it saved the trained model. Now it is written beside and replaced at once, the
  non-finite values written as null and listed.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest

from recipes.examples.checkpointing import EpochRNG, resume_settings, write_report

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _args(data, **changes):
    values = dict(train_data_dir=str(data), output_dir="out", resolution=16, center_crop=False, random_flip=True,
                  train_batch_size=2, dataloader_num_workers=0, num_epochs=1, max_train_steps=None,
                  gradient_accumulation_steps=2, learning_rate=1e-4, lr_scheduler="cosine", lr_warmup_steps=1,
                  adam_beta1=0.95, mixed_precision="no", prediction_type="epsilon", objective="ddpm", seed=0,
                  checkpointing_steps=500, checkpoints_total_limit=None, resume_from_checkpoint=None, analyze=True,
                  num_bins=2, num_probes=4, controls=1)
    values.update(changes)
    return argparse.Namespace(**values)


def _resume(saved_args, args):
    saved = EpochRNG(settings=resume_settings(saved_args))
    saved.record(0)
    EpochRNG(settings=resume_settings(args)).load_state_dict(saved.state_dict())


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"caption {i}")
    return tmp_path / "data"


@pytest.mark.parametrize("option, value", [
    ("prediction_type", "sample"), ("objective", "flow_matching"), ("random_flip", False), ("center_crop", True),
    ("resolution", 8), ("dataloader_num_workers", 1), ("learning_rate", 1e-2), ("lr_scheduler", "linear"),
    ("lr_warmup_steps", 3), ("adam_beta1", 0.5), ("seed", 5), ("num_bins", 3),
])
def test_a_resume_with_another_option_is_refused_naming_it(data, option, value):
    with pytest.raises(ValueError, match=rf"--{option} \S+ \(here {value}\)"):
        _resume(_args(data), _args(data, **{option: value}))


def test_the_length_the_output_the_checkpointing_and_the_analyzer_switch_may_change(data, tmp_path):
    base = _args(data, lr_scheduler="constant")
    _resume(base, _args(data, lr_scheduler="constant", output_dir="elsewhere", max_train_steps=9, num_epochs=3,
                        checkpointing_steps=1, checkpoints_total_limit=2, resume_from_checkpoint="latest"))
    # the analyzer's options are compared only when both runs analyze
    _resume(_args(data, analyze=False, num_bins=7), _args(data, num_bins=3))
    _resume(_args(data, num_bins=7), _args(data, analyze=False, num_bins=3))
    # a data folder moved keeps its fingerprint; one of other content is refused by name
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    _resume(_args(data), _args(moved))
    (moved / "a" / "1.txt").write_text("caption one")
    with pytest.raises(ValueError, match=r"--train_data_dir sha256:"):
        _resume(_args(data), _args(moved))


def test_a_longer_decaying_schedule_is_warned_of_not_refused(data):
    with pytest.warns(UserWarning, match=r"over --num_epochs 1, this one over --num_epochs 3"):
        _resume(_args(data), _args(data, num_epochs=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _resume(_args(data, lr_scheduler="constant"), _args(data, lr_scheduler="constant", num_epochs=3))


class _Analyzer:
    def __init__(self, report):
        self._report = report

    def finish(self):
        pass

    def report(self):
        return dict(self._report)


class _Accelerator:
    is_main_process = True


def test_a_report_that_does_not_serialize_leaves_the_one_there_whole(tmp_path):
    path = tmp_path / "genkernel_report.json"
    path.write_text(json.dumps({"earlier": 1}))
    with pytest.raises(TypeError):
        write_report(_Accelerator(), str(tmp_path), _Analyzer({"a": object()}))
    assert json.loads(path.read_text()) == {"earlier": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["genkernel_report.json"]  # (no temporary left)


def test_non_finite_values_are_written_as_null_and_listed(tmp_path):
    with pytest.warns(UserWarning, match=r"matrices.kappa\[1\], extra.share were not finite"):
        write_report(_Accelerator(), str(tmp_path), _Analyzer({"matrices": {"kappa": [1.0, math.nan]}}),
                     lambda: {"extra": {"share": math.inf}})
    report = json.loads((tmp_path / "genkernel_report.json").read_text())
    assert report["matrices"]["kappa"] == [1.0, None] and report["extra"]["share"] is None
    assert report["non_finite"] == ["matrices.kappa[1]", "extra.share"]
    assert (tmp_path / "genkernel_report.json").stat().st_mode & 0o044  # (readable as open() made it, not 0600)


def test_the_unconditional_example_refuses_a_resume_to_another_objective(make_image_folder, tmp_path):
    """One run to a checkpoint; resumes to another --prediction_type, --learning_rate and --dataloader_num_workers
    are refused before training, naming the option (each trained silently, or was ignored); one longer with the
    same options goes on."""
    from recipes.examples.train_unconditional import main

    images = make_image_folder(("a", "b"), per_class=2)

    def run(out, *extra):
        return main(["--train_data_dir", str(images), "--output_dir", str(tmp_path / out), "--resolution", "16",
                     "--train_batch_size", "2", "--no-analyze", "--lr_scheduler", "constant", *extra])

    run("first", "--max_train_steps", "1", "--checkpointing_steps", "1")
    resume = ("--max_train_steps", "2", "--resume_from_checkpoint", str(tmp_path / "first" / "checkpoint-1"))
    for option, value in (("--prediction_type", "sample"), ("--learning_rate", "0.01"),
                          ("--dataloader_num_workers", "1")):
        with pytest.raises(ValueError, match=rf"{option} \S+ \(here {value}\)"):
            run("refused", *resume, option, value)
    assert run("longer", *resume)["global_step"] == 2


def test_a_resume_on_another_count_of_processes_is_refused(data):
    """Each optimizer step takes a batch from every process: resume_step, counted in one process's batches, lands
    elsewhere in the epoch with another count (a checkpoint of 2 processes resumed on 1 skipped half the batches
    trained)."""
    from accelerate.state import PartialState

    PartialState()
    saved = EpochRNG(settings={**resume_settings(_args(data)), "num_processes": 2})
    saved.record(0)
    with pytest.raises(ValueError, match=r"--num_processes 2 \(here 1\)"):
        EpochRNG(settings=resume_settings(_args(data))).load_state_dict(saved.state_dict())


def test_a_data_folder_with_a_link_cycle_or_a_dangling_link_is_fingerprinted(tmp_path):
    """A folder linked back up the tree is walked once (os.walk following links walked it until the names were too
    long: OSError), a dangling link counts by its name (os.path.getsize raised FileNotFoundError); a copy elsewhere
    keeps the fingerprint, an edited file does not."""
    import os
    import shutil

    from recipes.examples.checkpointing import path_fingerprint

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("a caption")
    (data / "sub" / "b.txt").write_text("another")
    os.symlink(data, data / "sub" / "loop")
    os.symlink(tmp_path / "missing", data / "dangling")
    first = path_fingerprint(str(data))
    assert first.endswith("(3 files)")
    copy = tmp_path / "moved"
    shutil.copytree(data, copy, symlinks=True)
    os.remove(copy / "sub" / "loop")
    os.symlink(copy, copy / "sub" / "loop")
    assert path_fingerprint(str(copy)) == first
    (copy / "sub" / "b.txt").write_text("edited!")
    assert path_fingerprint(str(copy)) != first
