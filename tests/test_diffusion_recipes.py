"""Smoke runs of the diffusion recipes: they write their PNGs and a JSON whose numbers are
consistent (claims computed from them, shares that add up, residual small). The smoke sizes
check the plumbing, not the paper's claim."""

from __future__ import annotations

import importlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def load_recipe(name):
    """The recipe module ``recipes.<name>`` (e.g. ``experiments.diffusion_toy2d``)."""
    return importlib.import_module(f"recipes.{name}")


def check_payload(out: Path, name: str, payload: dict) -> dict:
    on_disk = json.loads((out / f"{name}.json").read_text())
    assert on_disk["recipe"] == name and on_disk["mode"] == "smoke"
    assert (out / f"{name}.png").stat().st_size > 1000
    for fig in on_disk["results"]["figures"]:
        assert (out / fig).stat().st_size > 1000, fig
    report = on_disk["results"]["report"]
    config = report["config"]
    levels, bins = len(config["probe_levels"]), config["num_bins"]
    traffic = np.array(report["matrices"]["traffic"], dtype=float)
    assert traffic.shape == (levels, bins)
    assert np.allclose(traffic.sum(axis=1), 1.0)
    for key in ("traffic", "share"):
        loc = report["locality"][key]
        assert math.isclose(loc["difference"], loc["measured"] - loc["control"], rel_tol=1e-9, abs_tol=1e-12)
        low, high = loc["interval"]
        # values without spread (the smoke's two bins: every difference 0) have no interval, not [c, c]
        assert (low is None and high is None) or low <= loc["difference"] <= high
        c = on_disk["claims"][f"{key}_locality"]
        # over probe levels (one run): the mean of the per-level differences, held from its interval and,
        # with a time-blind reference, from the interval of the difference to it; or not measured, saying why
        per_level = [row[key]["difference"] for row in report["locality"]["per_level"]]
        assert math.isclose(c["value"], float(np.mean(per_level)), rel_tol=1e-9, abs_tol=1e-12)
        if c["measured"]:
            beyond = c.get("beyond_null_interval", [1.0, 1.0])[0]
            assert c["held"] == (c["interval"][0] is not None and c["interval"][0] > 0 and beyond > 0)
        else:  # a window that measured mostly the rest, or one run judged against the null model
            from recipes.common import ONE_RUN_WHY

            assert c["held"] is None and c["why"] and (report["measured"] is False or c["why"] == ONE_RUN_WHY)
    kernel = report["kernel"][-1]
    assert len(kernel["by_distance"]) == bins
    c = on_disk["claims"]["kernel_locality"]  # the change from θ₀, beyond the time-blind denoiser when it ran
    low, beyond = c["interval"][0], c.get("beyond_time_blind_interval", [1.0])[0]
    # below 3 kernel inputs there is no jackknife: no interval, not held; without the time-blind denoiser not measured
    # the baseline is the null model's value of the same statistic (θ_T − θ₀): value − baseline is what is judged
    if c["measured"]:
        assert "beyond_time_blind_interval" in c
        scaled = c["standardized"]  # the same two tests on standardized rows (no scale-only locality)
        s_low, s_beyond = scaled["change_interval"][0], scaled["beyond_time_blind_interval"][0]
        assert c["held"] == (low is not None and low > 0 and beyond is not None and beyond > 0
                             and s_low is not None and s_low > 0 and s_beyond is not None and s_beyond > 0)
        assert c["baseline"]["what"].startswith("null model: time-blind denoiser")
        if c["value"] is not None and c["baseline"]["value"] is not None:
            assert math.isclose(c["value"] - c["baseline"]["value"], c["beyond_time_blind"], rel_tol=1e-9, abs_tol=1e-12)
    else:  # the time-blind denoiser not run, or one run (models trained apart are not judged on its units)
        from recipes.common import ONE_RUN_WHY

        assert c["held"] is None and "time-blind" in c["why"]
        if c["why"] != ONE_RUN_WHY:
            assert "beyond_time_blind_interval" not in c
            assert c["baseline"]["value"] is None and "not run" in c["baseline"]["what"]
    residual = report["residual"]["relative_residual"]
    assert residual < 1e-2 and on_disk["claims"]["ledger_adds_up"]["held"]
    retrieval = on_disk["results"]["retrieval"]
    assert len(retrieval["mean_entropy"]) == len(retrieval["stages"])
    assert all(0 <= e <= 1 + 1e-12 for e in retrieval["mean_entropy"])
    assert on_disk["wall_seconds"] > 0
    return on_disk


def test_toy2d_recipe_smoke(tmp_path):
    module = load_recipe("experiments.diffusion_toy2d")
    payload = module.main(["--smoke", "--out-dir", str(tmp_path), "--seed", "1", "--prediction-type", "v_prediction",
                           "--beta-schedule", "squaredcos_cap_v2", "--num-bins", "3"])
    on_disk = check_payload(tmp_path, "diffusion_toy2d", payload)
    assert on_disk["settings"]["dataset"] == "ring" and on_disk["settings"]["num_bins"] == 3
    assert on_disk["results"]["report"]["config"]["prediction_type"] == "v_prediction"
    assert on_disk["results"]["report"]["config"]["beta_schedule"] == "squaredcos_cap_v2"


def test_flow_toy2d_recipe_smoke(tmp_path):
    module = load_recipe("experiments.flow_toy2d")
    payload = module.main(["--smoke", "--out-dir", str(tmp_path), "--seed", "1", "--shift", "3.0", "--num-bins", "3"])
    on_disk = check_payload(tmp_path, "flow_toy2d", payload)
    config = on_disk["results"]["report"]["config"]
    assert config["prediction_type"] == "flow" and config["noise_schedule"] == {
        "process": "flow_matching", "shift": 3.0, "use_dynamic_shifting": False}
    assert on_disk["settings"]["objective"] == "flow_matching" and on_disk["settings"]["num_bins"] == 3
    # the stages are the flow sampler's real levels, the noisiest first
    stages = on_disk["results"]["retrieval"]["stages"]
    assert stages == sorted(stages, reverse=True) and any(not float(s).is_integer() for s in stages)


def write_tiny_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def test_digits_recipe_smoke_on_tiny_mnist_files(tmp_path):
    write_tiny_mnist(tmp_path / "data")
    module = load_recipe("experiments.diffusion_digits")
    out = tmp_path / "figs"
    payload = module.main(["--smoke", "--out-dir", str(out), "--dataset", "mnist", "--data-root", str(tmp_path / "data")])
    on_disk = check_payload(out, "diffusion_digits", payload)
    assert on_disk["settings"]["image_shape"] == [1, 16, 16] and on_disk["settings"]["num_train"] == 12


def test_digits_recipe_missing_folder_says_what_to_put_where(tmp_path):
    module = load_recipe("experiments.diffusion_digits")
    with pytest.raises(FileNotFoundError, match=r"MNIST"):
        module.main(["--smoke", "--out-dir", str(tmp_path), "--dataset", "mnist", "--data-root", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte"):
        module.main(["--smoke", "--out-dir", str(tmp_path), "--dataset", "mnist", "--data-root", str(empty)])


@pytest.mark.slow
def test_digits_recipe_smoke_default_dataset(tmp_path):
    module = load_recipe("experiments.diffusion_digits")
    payload = module.main(["--smoke", "--out-dir", str(tmp_path)])
    check_payload(tmp_path, "diffusion_digits", payload)


def test_benchmark_smoke(tmp_path):
    module = load_recipe("benchmarks.diffusion")
    payload = module.main(["--smoke", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "benchmark_diffusion.json").read_text())["results"]
    for model in ("mlp", "unet"):
        r = results[model]
        assert r["bare"] > 0 and math.isclose(r["ratio_no_control"], r["no_control"] / r["bare"])
        assert math.isclose(r["control_cost_five"], r["five_controls"] / r["no_control"])
        assert payload["claims"][f"{model}_one_control_cost"]["held"] == (r["control_cost_one"] <= 2.2)
    assert payload["claims"]["mlp_overhead_target"]["held"] == (results["mlp"]["ratio_no_control"] <= 3.0)


def test_diffusion_run_resumes_mid_window_to_the_same_ledger(tmp_path):
    """A run stopped inside its tracked window and continued from --checkpoint-dir (trainer, the
    analyzer's ledgers, θ₀) ends with the ledger of an uninterrupted run."""
    import argparse

    from genkernel.data import gaussian_ring
    from genkernel.diffusion import MLPDenoiser, make_scheduler
    from recipes.common import diffusion_seed_run

    spec = {
        "load": lambda seed: (gaussian_ring(96, num_modes=4, radius=2.0, std=0.05, seed=seed)[0],
                              gaussian_ring(24, num_modes=4, radius=2.0, std=0.05, seed=seed + 1000)[0]),
        "model": lambda: MLPDenoiser(2, hidden=16, depth=2), "time_blind": None,
        "scheduler": lambda: make_scheduler(100, "linear", "epsilon"), "retrieval": {}, "images": False,
    }
    s = dict(num_bins=3, num_probes=9, band=0, controls=2, reference=None, snapshot_every=1, kernel_every=0,
             kernel_points=3, kernel_sketch=None, warmup_steps=3, window_steps=4, batch_size=16, lr=2e-3,
             retrieval_samples=2, retrieval_train=16, retrieval_stages=2, inference_steps=5, checkpoint_every=1)

    def args(folder):
        return argparse.Namespace(torch_device=torch.device("cpu"), mode="smoke", checkpoint_dir=folder)

    whole, _ = diffusion_seed_run(spec, args(None), s, 0)
    folder = str(tmp_path / "ckpt")
    first, _ = diffusion_seed_run(spec, args(folder), {**s, "window_steps": 2}, 0)  # stops after 2 of the 4 tracked steps
    assert first["report"]["tracked_steps"] == 2 and not first["resumed"]
    resumed, _ = diffusion_seed_run(spec, args(folder), s, 0)
    assert resumed["resumed"] and resumed["report"]["tracked_steps"] == 4
    for key in ("traffic", "share"):
        assert resumed["report"]["locality"][key]["difference"] == pytest.approx(whole["report"]["locality"][key]["difference"], rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(np.array(resumed["report"]["matrices"]["traffic"], dtype=float),
                               np.array(whole["report"]["matrices"]["traffic"], dtype=float), rtol=1e-9, atol=1e-12)
    assert resumed["report"]["residual"]["relative_residual"] == pytest.approx(whole["report"]["residual"]["relative_residual"], rel=1e-6)
    np.testing.assert_allclose(resumed["kernel_locality_per_input"]["theta_0"], whole["kernel_locality_per_input"]["theta_0"])



@pytest.mark.parametrize("name", ["diffusion_toy2d", "diffusion_digits", "gan_ring2d", "gan_digits"])
def test_quick_and_full_runs_rest_on_several_seeds_by_default(name):
    """A claim about training rests on independent runs: without --seeds, the quick and full modes
    run three seeds from --seed on (one run's own units, its clean inputs, gave the toy recipe's
    kernel locality an interval that three seeds do not support); --seeds names them; per-seed
    files are written only where --seeds names several, for --aggregate, or into --runs-dir."""
    import argparse

    from recipes.common import pick, recipe_seeds, runs_folder

    module = load_recipe(f"experiments.{name}")
    settings = {mode: module.settings_for(mode) if hasattr(module, "settings_for") else pick(mode, **module.SETTINGS)
                for mode in ("full", "quick", "smoke")}

    def args(seed=5, seeds=None, runs_dir=None, aggregate=False):
        return argparse.Namespace(seed=seed, seeds=seeds, runs_dir=runs_dir, aggregate=aggregate, out_dir="o")

    for mode in ("quick", "full"):
        assert recipe_seeds(args(), settings[mode]) == [5, 6, 7], mode
    assert recipe_seeds(args(), settings["smoke"]) == [5]
    assert recipe_seeds(args(seeds=[2]), settings["quick"]) == [2]
    assert runs_folder(name, args()) is None and runs_folder(name, args(seeds=[2])) is None
    assert runs_folder(name, args(seeds=[0, 1])) == str(Path("o") / f"{name}_runs")
    assert runs_folder(name, args(aggregate=True)) == str(Path("o") / f"{name}_runs")
    assert runs_folder(name, args(runs_dir="R")) == "R"
