"""The diffusers-style example scripts (recipes/examples/) refuse options that would train something else than
asked, and leave no report beside a model it does not describe (a black-box hunt that otherwise found the
analyzer exact and training undisturbed in about 60 configurations of the five scripts).

Each test here but the coverage one fails on the old code:

- ``--max_grad_norm`` <= 0 (train_text_to_image, train_dreambooth, train_controlnet): torch's ``clip_grad_norm_``
  clamps the coefficient max_norm / ‖g‖ from above only, so a negative value multiplies the gradient by a negative
  number: the first Adam step is the exact reverse of the clipped one (cosine −0.999997 measured), gradient ascent with
  no error; 0 zeroes every gradient (the ledger's residual becomes NaN).
- ``--snr_gamma`` <= 0 (train_text_to_image, train_dreambooth): the Min-SNR weights min(SNR, γ) / SNR are then
  negative (ascent on every example) or zero (nothing trained but weight decay).
- ``--num_probes`` < 2 (all four diffusers scripts): 0 is a RuntimeError of torch.stack naming no option, 1 the
  analyzer's "probe_data needs at least 2 rows", both after the components are built (train_dreambooth.py with
  ``--with_prior_preservation``: after it generated and wrote its missing class images, 94 of them measured).
- ``--gradient_accumulation_steps`` / ``--train_batch_size`` < 1 (train_unconditional): a ZeroDivisionError / the
  DataLoader's error, where the other scripts name the option.
- ``--objective flow_matching`` with ``--prediction_type v_prediction`` or ``sample``: ignored silently (the flow
  target ε − x is trained), where ddpm and edm refuse a prediction type they do not train.
- ``--max_train_steps`` above what ``--num_epochs`` hold (train_unconditional): the run stops at the epochs' end, fewer
  steps than asked (6 of 10 measured), silently; the other scripts train ``--max_train_steps`` as upstream does.
- ``--no-analyze`` into a folder holding a ``genkernel_report.json`` (a resumed or repeated run): the old report stays
  beside the new model, which it does not describe.
"""

from __future__ import annotations

import json

import pytest

from recipes.examples import train_controlnet, train_dreambooth, train_text_to_image, train_unconditional

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset


def _image_argv(folder, out):
    return ["--train_data_dir", str(folder), "--output_dir", str(out)]


def _dreambooth_argv(folder, out):
    return ["--instance_data_dir", str(folder), "--instance_prompt", "a photo of sks dog", "--output_dir", str(out)]


SCRIPTS_WITH_CLIPPING = [
    (train_text_to_image.parse_args, _image_argv),
    (train_dreambooth.parse_args, _dreambooth_argv),
    (train_controlnet.parse_args, _image_argv),
]


@pytest.mark.parametrize("value", ["-1", "0"])
@pytest.mark.parametrize("parse, argv", SCRIPTS_WITH_CLIPPING, ids=["text_to_image", "dreambooth", "controlnet"])
def test_a_max_grad_norm_that_is_not_positive_is_refused_naming_it(parse, argv, value, tmp_path):
    with pytest.raises(ValueError, match="--max_grad_norm"):
        parse([*argv(tmp_path, tmp_path / "out"), "--max_grad_norm", value])


@pytest.mark.parametrize("value", ["-1", "0"])
@pytest.mark.parametrize("parse, argv", SCRIPTS_WITH_CLIPPING[:2], ids=["text_to_image", "dreambooth"])
def test_a_snr_gamma_that_is_not_positive_is_refused_naming_it(parse, argv, value, tmp_path):
    with pytest.raises(ValueError, match="--snr_gamma"):
        parse([*argv(tmp_path, tmp_path / "out"), "--snr_gamma", value])


def test_the_max_grad_norm_refusal_is_needed_a_negative_norm_reverses_the_gradient():
    """coverage: passes before. Why a negative --max_grad_norm must be refused: the scripts clip with
    ``clip_grad_norm_``, whose coefficient max_norm / ‖g‖ is clamped from above only, so the gradient is multiplied
    by a negative number (exactly −1/‖g‖ of it here) instead of being clipped."""
    import torch

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 0.0, 4.0])
    torch.nn.utils.clip_grad_norm_([p], -1.0)
    torch.testing.assert_close(p.grad, torch.tensor([-0.6, 0.0, -0.8]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", ["0", "1"])
@pytest.mark.parametrize("parse, argv", [(train_unconditional.parse_args, _image_argv),
                                         (train_text_to_image.parse_args, _image_argv),
                                         (train_controlnet.parse_args, _image_argv),
                                         (train_dreambooth.parse_args, _dreambooth_argv)],
                         ids=["unconditional", "text_to_image", "controlnet", "dreambooth"])
def test_num_probes_below_two_is_refused_naming_it_before_anything_runs(parse, argv, value, tmp_path):
    with pytest.raises(ValueError, match="--num_probes"):
        parse([*argv(tmp_path, tmp_path / "out"), "--num_probes", value])


@pytest.mark.parametrize("name", ["gradient_accumulation_steps", "train_batch_size"])
def test_unconditional_refuses_counts_below_one_naming_them(name, tmp_path):
    with pytest.raises(ValueError, match=f"--{name}"):
        train_unconditional.parse_args([*_image_argv(tmp_path, tmp_path / "out"), f"--{name}", "0"])


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_flow_matching_refuses_a_prediction_type_it_does_not_train(prediction_type, tmp_path):
    with pytest.raises(ValueError, match="--prediction_type"):
        train_unconditional.parse_args([*_image_argv(tmp_path, tmp_path / "out"), "--objective", "flow_matching",
                                        "--prediction_type", prediction_type])


def test_a_run_without_the_analyzer_leaves_no_older_report_beside_its_model(make_image_folder, tmp_path):
    folder = make_image_folder(("a", "b"), per_class=2)
    out = tmp_path / "out"
    out.mkdir()
    stale = {"tracked_steps": 3, "global_steps": [1, 3]}  # (what an earlier analyzed run in this folder wrote)
    (out / "genkernel_report.json").write_text(json.dumps(stale))
    result = train_unconditional.main([*_image_argv(folder, out), "--resolution", "16", "--train_batch_size", "2",
                                       "--max_train_steps", "1", "--no-analyze"])
    assert result["global_step"] == 1 and (out / "unet").is_dir()  # the new model is saved in the folder
    report = out / "genkernel_report.json"
    assert not report.exists() or json.loads(report.read_text()) != stale


def test_unconditional_refuses_more_max_train_steps_than_its_epochs_hold(make_image_folder, tmp_path):
    """4 images in batches of 2: 2 optimizer steps an epoch; --max_train_steps 3 with --num_epochs 1 trained 2."""
    folder = make_image_folder(("a", "b"), per_class=2)
    with pytest.raises(ValueError, match="--max_train_steps 3"):
        train_unconditional.main([*_image_argv(folder, tmp_path / "out"), "--resolution", "16", "--train_batch_size", "2",
                                  "--num_epochs", "1", "--max_train_steps", "3", "--no-analyze"])
