"""The diffusers training example with the analyzer attached (recipes/examples/train_unconditional.py):
run offline on a tiny ImageFolder, with EMA, gradient accumulation, clipping and a warm-up lr
schedule; the ledgers add up, the steps counted are the optimizer's, and training is bit-for-bit
the run without the analyzer."""

from __future__ import annotations

import json

import pytest
import torch

from recipes.examples.train_unconditional import main


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # conftest: one thread, accelerate reset


@pytest.fixture
def image_folder(make_image_folder):
    """An ImageFolder of 16 RGB 16×16 PNGs in two class folders."""
    return make_image_folder(("circles", "squares"), per_class=8)


def run(image_folder, out, *extra):
    # 16 images, batches of 2, accumulation over 2: 8 micro-batches, 4 optimizer steps. 2 probes (the least): a kernel
    # record (at bind and at the end) runs over the probes, and one count in every run of the file lets the runs share
    # the cost estimate's measures (push_memory.remembered: kept per architecture and probe shape)
    return main([
        "--train_data_dir", str(image_folder), "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--use_ema", "--lr_warmup_steps", "1", "--num_bins", "2",
        "--num_probes", "2", "--controls", "1", *extra,
    ])


def assert_identity(ledger, what):
    """contributions + rest + residual = Δf at every probe."""
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    scale = float(ledger.delta.abs().max())
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12 * scale, msg=what)


def test_the_example_keeps_exact_ledgers_and_trains_bit_for_bit_as_without_the_analyzer(image_folder, tmp_path):
    analyzed = run(image_folder, tmp_path / "analyzed")
    analyzer = analyzed["analyzer"]
    # the steps tracked are the optimizer's: 8 micro-batches accumulated over 2
    assert analyzed["global_step"] == 4 and analyzer.ledger.steps == 4
    scales = analyzer.tracker.gradient_scales
    assert [s["micro_batches"] for s in scales] == [2, 2, 2, 2]
    assert any(s["scale_times_micro_batches"] < 1 for s in scales)  # clipping at 1.0 acted, and was followed
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)
    assert analyzer.ledger.relative_residual() < 1e-3
    # the EMA weights' ledger: the first step's lr is 0 (warm-up), so the EMA moves at the 3 others
    ema_ledger = analyzer.ema_ledgers["level"]
    assert_identity(ema_ledger, "ema")
    assert ema_ledger.steps == 3 and ema_ledger.relative_residual() < 1e-3
    assert torch.allclose(torch.tensor(analyzer.tracker.ema.decays, dtype=torch.float64),
                          torch.tensor([1 - (1 + k) ** -0.75 for k in (1, 2, 3)], dtype=torch.float64))

    # the report: strict JSON in the output folder, with the EMA section
    text = (tmp_path / "analyzed" / "genkernel_report.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the report"))
    assert report["tracked_steps"] == 4 and report["global_steps"] == [1, 4]
    assert report["ema"]["residual"]["steps"] == 3 and len(report["ema"]["decays"]) == 3
    assert (tmp_path / "analyzed" / "unet").is_dir()  # the pipeline was saved, as upstream's

    bare = run(image_folder, tmp_path / "bare", "--no-analyze")
    assert bare["analyzer"] is None and bare["global_step"] == 4
    assert all(torch.equal(p, q) for p, q in zip(analyzed["model"].parameters(), bare["model"].parameters()))
    assert all(torch.equal(p, q) for p, q in zip(analyzed["ema_model"].shadow_params, bare["ema_model"].shadow_params))
    assert not (tmp_path / "bare" / "genkernel_report.json").exists()


def test_max_train_steps_stops_after_that_many_optimizer_steps(image_folder, tmp_path):
    result = run(image_folder, tmp_path / "out", "--max_train_steps", "6", "--num_epochs", "3", "--no-analyze")
    assert result["global_step"] == 6 and result["ema_model"].optimization_step == 6


def test_bf16_mixed_precision_is_analysed_and_trains_as_without_the_analyzer(image_folder, tmp_path):
    """--mixed_precision bf16 (accelerate autocasts on the CPU too): the analyzer splits the half-precision
    gradients (mixed_precision="observe"): four steps booked in bfloat16, the ledger identity, the UNet
    and EMA weights bit for bit those of --no-analyze. Old code refused the run before its first step."""
    analyzed = run(image_folder, tmp_path / "analyzed", "--mixed_precision", "bf16")
    analyzer = analyzed["analyzer"]
    assert analyzed["global_step"] == 4 and analyzer.ledger.steps == 4
    assert [e["gradient_precision"] for e in analyzer.tracker.gradient_scales] == ["bfloat16"] * 4
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)
    bare = run(image_folder, tmp_path / "bare", "--mixed_precision", "bf16", "--no-analyze")
    assert all(torch.equal(p, q) for p, q in zip(analyzed["model"].parameters(), bare["model"].parameters()))
    assert all(torch.equal(p, q) for p, q in zip(analyzed["ema_model"].shadow_params, bare["ema_model"].shadow_params))


def objective_report(image_folder, tmp_path, *objective):
    """Runs the example with the analyzer and without it under ``objective`` (its command-line
    options): the ledgers (and the EMA's) add up, four optimizer steps are tracked, the UNet and the
    scheduler are saved, and the weights and EMA weights equal the bare run's bit for bit. Returns
    the written report."""
    analyzed = run(image_folder, tmp_path / "analyzed", *objective)
    analyzer = analyzed["analyzer"]
    assert analyzed["global_step"] == 4 and analyzer.ledger.steps == 4
    for name, ledger in analyzer.ledgers.items():
        assert_identity(ledger, name)
    assert analyzer.ledger.relative_residual() < 1e-3
    assert_identity(analyzer.ema_ledgers["level"], "ema")
    assert (tmp_path / "analyzed" / "scheduler").is_dir() and (tmp_path / "analyzed" / "unet").is_dir()

    bare = run(image_folder, tmp_path / "bare", "--no-analyze", *objective)
    assert all(torch.equal(p, q) for p, q in zip(analyzed["model"].parameters(), bare["model"].parameters()))
    assert all(torch.equal(p, q) for p, q in zip(analyzed["ema_model"].shadow_params, bare["ema_model"].shadow_params))
    return json.loads((tmp_path / "analyzed" / "genkernel_report.json").read_text(),
                      parse_constant=lambda name: pytest.fail(f"{name} in the report"))


def test_the_flow_matching_objective_keeps_exact_ledgers_and_trains_as_without_the_analyzer(image_folder, tmp_path):
    # SD3's recipe: FlowMatchEulerDiscreteScheduler(shift=3), its timestep density and cosmap loss weights
    report = objective_report(image_folder, tmp_path, "--objective", "flow_matching", "--flow_shift", "3.0",
                              "--weighting_scheme", "cosmap")
    assert report["config"]["prediction_type"] == "flow" and report["config"]["noise_schedule"]["shift"] == 3.0
    assert any(not float(level).is_integer() for level in report["config"]["probe_levels"])  # real levels t = σ·T


def test_the_edm_objective_keeps_exact_ledgers_and_trains_as_without_the_analyzer(image_folder, tmp_path):
    # SDXL's --do_edm_style_training: EDMEulerScheduler, uniform grid indices, precondition_inputs/outputs,
    # v-prediction, with the EDM paper's loss weight (SDXL's unweighted loss: tests/test_edm.py's ledgers)
    report = objective_report(image_folder, tmp_path, "--objective", "edm", "--prediction_type", "v_prediction")
    assert report["config"]["prediction_type"] == "v_prediction"
    assert report["config"]["noise_schedule"]["process"] == "edm"
    assert min(report["config"]["probe_levels"]) < 0  # real levels t = ¼ ln σ, negative below σ = 1


def test_a_prediction_type_the_objective_does_not_take_is_refused(image_folder, tmp_path):
    with pytest.raises(ValueError, match="--prediction_type sample does not go with --objective edm"):
        run(image_folder, tmp_path / "out", "--objective", "edm", "--prediction_type", "sample")
    with pytest.raises(ValueError, match="--prediction_type v_prediction does not go with --objective ddpm"):
        run(image_folder, tmp_path / "out", "--prediction_type", "v_prediction")


def same(first, second):
    """The two runs' UNet weights and EMA weights (and EMA step counts) equal bit for bit."""
    assert all(torch.equal(p, q) for p, q in zip(first["model"].parameters(), second["model"].parameters()))
    assert all(torch.equal(p, q) for p, q in zip(first["ema_model"].shadow_params, second["ema_model"].shadow_params))
    assert first["ema_model"].optimization_step == second["ema_model"].optimization_step


def test_a_run_resumed_mid_epoch_from_a_checkpoint_is_bit_for_bit_the_uninterrupted_run(image_folder, tmp_path):
    """Four optimizer steps (accumulation over 2, EMA, random flips) saved at step 2, and a fresh run resumed
    from a folder holding only that checkpoint (``--resume_from_checkpoint latest``): the UNet, the EMA, and
    the analyzer's ledgers (level, control, EMA; the report, but for the cost estimate at binding) equal the
    uninterrupted run's bit for bit. Upstream's resume (the random states as of the checkpoint, the
    skipped batches loaded again, a new shuffle at ``iter()``) drew other noise after step 2."""
    import shutil

    straight = run(image_folder, tmp_path / "straight", "--checkpointing_steps", "2", "--random_flip")
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(image_folder, tmp_path / "resumed", "--checkpointing_steps", "2", "--random_flip",
                  "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == 4
    same(straight, resumed)
    first, second = straight["analyzer"], resumed["analyzer"]
    assert second.ledger.steps == 4 and second.ema_ledgers["level"].steps == 3
    for ledgers, again in ((first.ledgers, second.ledgers), (first.ema_ledgers, second.ema_ledgers)):
        assert ledgers.keys() == again.keys()
        for name, ledger in ledgers.items():
            for field in ("contributions", "rest", "residual", "traffic", "f_end", "delta"):
                assert torch.equal(getattr(ledger, field), getattr(again[name], field)), (name, field)
    reports = [json.loads((tmp_path / out / "genkernel_report.json").read_text()) for out in ("straight", "resumed")]
    for report in reports:  # (the memory free and held at binding: the resumed run holds Adam's state already)
        report["config"].pop("cost")
    assert reports[0] == reports[1] and reports[1]["global_steps"] == [1, 4]


def test_checkpoints_beyond_the_total_limit_are_removed_and_saving_them_leaves_training_alone(image_folder, tmp_path):
    """--checkpointing_steps 1 --checkpoints_total_limit 2: the two newest are kept, the last holds the
    final UNet and EMA weights, and the run is bit for bit one that saved none (saving the EMA builds a
    UNet, whose initialisation drew from torch's random state). ``--resume_from_checkpoint latest`` with
    no checkpoint starts afresh, as upstream's."""
    from diffusers import UNet2DModel

    saved = run(image_folder, tmp_path / "saved", "--no-analyze", "--checkpointing_steps", "1",
                "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in (tmp_path / "saved").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    last = tmp_path / "saved" / "checkpoint-4"
    for folder, weights in (("unet", list(saved["model"].parameters())),
                            ("unet_ema", saved["ema_model"].shadow_params)):
        loaded = UNet2DModel.from_pretrained(last / folder, local_files_only=True)
        assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), weights)), folder
    fresh = run(image_folder, tmp_path / "fresh", "--no-analyze", "--resume_from_checkpoint", "latest")
    assert fresh["global_step"] == 4 and not list((tmp_path / "fresh").glob("checkpoint-*"))
    same(saved, fresh)


def test_resuming_from_a_checkpoint_that_is_not_there_is_refused(image_folder, tmp_path):
    missing = tmp_path / "out" / "checkpoint-7"
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint {missing}: no such checkpoint folder"):
        run(image_folder, tmp_path / "out", "--no-analyze", "--resume_from_checkpoint", str(missing))


def test_a_run_resumed_from_its_last_checkpoint_trains_nothing_more(image_folder, tmp_path):
    """--max_train_steps 2 ends mid-epoch with checkpoint-2; resumed from it, the loop trained a third step
    (the stop was checked only after a step): global_step 3 and other weights than the straight run's (with
    accumulation, one more forward and backward that no step applied)."""
    from accelerate.state import AcceleratorState, GradientState

    one_step = ("--no-analyze", "--max_train_steps", "2", "--gradient_accumulation_steps", "1")
    straight = run(image_folder, tmp_path / "straight", *one_step, "--checkpointing_steps", "2")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = run(image_folder, tmp_path / "resumed", *one_step,
                  "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-2"))
    assert straight["global_step"] == resumed["global_step"] == 2
    assert all(torch.equal(p, q) for p, q in zip(straight["model"].parameters(), resumed["model"].parameters()))
