"""What the recipes' claims, the claims table and the benchmarks' verdicts rest on: a claim says
which units it left out, ``python -m recipes`` never passes a failed recipe's stale JSON off as
this run's and refuses command lines it cannot serve with a message, benchmark JSON is strict,
and a benchmark target or claim counts only when the fast path computed what its baseline did; and
each recipe's claim code, run on a null model's runs (random labels, shuffled targets, plain SGD
with a scalar step in Adam's place, a time-blind denoiser of its own initialization), does not hold."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes import common
from recipes.benchmarks import kernels, scale
from recipes.benchmarks.harness import write_outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------ claims
def test_a_claim_says_how_many_units_its_interval_left_out():
    interval = common.over_seeds([0.2, math.nan, 0.3, 0.25])  # one seed's statistic undefined
    assert interval.n == 3 and interval.dropped == 1
    entry = common.claim("x", interval.above(0), interval.estimate, interval)
    assert entry["n"] == 3 and entry["dropped"] == 1
    assert "dropped" not in common.claim("x", True, 0.2, common.over_seeds([0.2, 0.3]))


# ------------------------------------------------------------------------------ run_all
def _fake_package(tmp_path: Path) -> Path:
    fake = tmp_path / "recipes" / "experiments"
    fake.mkdir(parents=True)
    for package in (fake.parent, fake):
        (package / "__init__.py").write_text("")
    (fake / "regression_kernels.py").write_text(
        "import json, sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out-dir') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'regression_kernels.json').write_text(json.dumps({'mode': 'smoke', 'seed': 0, 'claims': "
        "{'fresh_claim': {'held': True, 'measured': True, 'value': 1.0, 'interval': [0.5, 1.5], 'statistic': 's'}}}))\n"
    )
    (fake / "null_space.py").write_text("raise SystemExit(3)\n")
    (fake / "circle_neighborhoods.py").write_text("import time\ntime.sleep(60)\n")
    return fake


def test_run_all_leaves_a_failed_recipes_stale_claims_out_of_the_table(tmp_path, capsys):
    run_all = importlib.import_module("recipes.run_all")
    fake = _fake_package(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stale = {"mode": "quick", "seed": 0, "claims": {"stale_claim": {"held": True, "measured": True, "value": 0.1,
                                                                     "interval": [0.05, 0.2], "statistic": "old"}}}
    (out / "null_space.json").write_text(json.dumps(stale))
    (out / "circle_neighborhoods.json").write_text(json.dumps(
        {**stale, "claims": {"stale_timed_out": stale["claims"]["stale_claim"]}}))
    rc = run_all.main(["--smoke", "--timeout", "3", "--experiments-dir", str(fake), "--out-dir", str(out),
                       "--only", "regression_kernels", "null_space", "circle_neighborhoods"])
    captured = capsys.readouterr()
    assert rc == 1 and "FAILED: null_space, circle_neighborhoods" in captured.err
    assert "FAILED (timeout 3 s)" in captured.out
    table = (out / "claims_table.md").read_text()
    assert "fresh_claim" in table  # the recipe that ran is in the table, its output kept
    assert "stale_claim" not in table and "stale_timed_out" not in table  # an earlier run's claims are not this run's
    assert "`null_space` (FAILED (exit 3) in the latest run" in table
    assert (out / "null_space.json").exists()  # the earlier output is kept on disk, only not reported as new
    # --table-only has no run to go by: it reads every JSON there (the failure is in the log above)
    assert run_all.main(["--table-only", "--out-dir", str(out)]) == 0
    assert "stale_claim" in (out / "claims_table.md").read_text()


def test_run_all_refuses_an_empty_only_and_a_missing_table_folder(tmp_path, capsys):
    run_all = importlib.import_module("recipes.run_all")
    assert run_all.main(["--only"]) == 2
    assert "--only needs at least one recipe name" in capsys.readouterr().err
    missing = tmp_path / "no_such_folder"
    assert run_all.main(["--table-only", "--out-dir", str(missing)]) == 2
    assert "is not a folder" in capsys.readouterr().err and not missing.exists()


def test_the_claims_table_says_when_units_were_dropped(tmp_path):
    run_all = importlib.import_module("recipes.run_all")
    claim = common.claim("x", True, 0.25, common.over_seeds([0.2, math.nan, 0.3]))
    (tmp_path / "null_space.json").write_text(json.dumps({"claims": {"c": claim}}))
    assert "n=2 (1 dropped: non-finite)" in run_all.claims_table(tmp_path)


# ------------------------------------------------------------------------------ benchmarks
def test_benchmark_json_is_strict(tmp_path):
    report = {"ratio": math.nan, "speedup": math.inf, "rows": [1.0, -math.inf], "ok": 2.5}
    write_outputs(report, tmp_path / "b.json", tmp_path / "b.png", lambda r, file: file.write(b"png"))
    data = strict_json((tmp_path / "b.json").read_text())
    assert data == {"ratio": None, "speedup": None, "rows": [1.0, None], "ok": 2.5}


def _speed(auto_diff: float) -> dict:
    timing = {"steady_median_s": 1.0, "first_call_s": 1.0}
    return {"methods": {"vmap": {**timing, "speedup_vs_vmap": 1.0, "first_call_speedup_vs_vmap": 1.0},
                        "auto": {**timing, "steady_median_s": 0.1, "speedup_vs_vmap": 10.0,
                                 "first_call_speedup_vs_vmap": 10.0}},
            "max_rel_diff_vs_vmap": {"vmap": 0.0, "auto": auto_diff},
            "load": {"mean": 1.0, "min": 1.0, "max": 1.0}, "plan": {"engine": "factored"}}


def test_a_kernel_target_is_not_met_by_a_fast_path_that_computes_another_kernel(monkeypatch):
    profiled = []
    monkeypatch.setattr(kernels, "run_method", lambda *a, **k: (profiled.append(a), (None, {"profile": "p"}))[1])
    rows = {"auto": {"memory_ratio_vs_vmap": 0.5}}
    good = kernels.check_target("convnet", _speed(2e-7), rows, 256, 1.0, True)
    assert good["met"] is True and not profiled
    wrong = kernels.check_target("convnet", _speed(0.3), rows, 256, 1.0, True)  # 10x faster, but another kernel
    assert wrong["met"] is False
    assert good["kernels_agree"] is True and wrong["kernels_agree"] is False
    assert wrong["max_rel_diff_vs_vmap"]["auto"] == 0.3
    speed = _speed(2e-7)
    del speed["max_rel_diff_vs_vmap"]["auto"]  # no comparison: not checked, not met
    assert kernels.check_target("convnet", speed, rows, 256, 1.0, True)["met"] is None


def _scale_report(training_unchanged: bool) -> dict:
    run = {"model": "mlp", "batch": 8, "probes": 4, "group_state": "factored", "ratio": 2.0, "bare_median_s": 1.0,
           "tracked_median_s": 2.0, "load_mean": 1.0, "flop_ratio": 2.0, "predicted_ratio": 2.0,
           "training_unchanged": training_unchanged}
    unet = {"bins": 2, "controls": 1, "probes": 4, "group_state": "dense", "ratio": 2.0, "bare_median_s": 1.0,
            "analyzed_median_s": 2.0, "load_mean": 1.0, "flop_ratio": 2.0, "predicted_ratio": 2.0}
    return {"memory": {}, "sgd_factored": [run], "sketched": [], "tiny_unet": unet}


def test_the_sgd_time_claim_needs_the_tracked_step_to_train_as_the_bare_one():
    def sgd_claim(report):
        return next(c for c in scale.claims_of(report) if "costs at most" in c["claim"] and "mlp" in c["claim"])

    assert sgd_claim(_scale_report(True))["held"] is True
    changed = sgd_claim(_scale_report(False))  # fast enough, but not the same training step
    assert changed["held"] is False and changed["numbers"]["training_unchanged"] is False


# ------------------------------------------------------------------------------ claims against null models
# Each test runs a recipe's own claim code on a null model's runs (a network trained on randomly
# permuted labels, plain SGD with a scalar step in Adam's place, ...) and asserts "not held".


def test_class_blocks_claim_is_not_held_by_a_network_trained_on_random_labels():
    """Training on random labels raises the true-class block AUC of k̂ too: at the quick settings
    (3 seeds) by 0.020 [0.014, 0.026] against 0.025 with the true labels, so the rise-only rule
    called the random-label network "held". Judged against the random-label null model (paired by
    seed), the null model itself is not held."""
    from genkernel.data import load_image_dataset
    from recipes.common import over_seeds
    from recipes.experiments import classification_kernels as recipe

    s = dict(size=16, width=8, steps=300, batch=64, lr=2e-3)
    x_train, y_train = load_image_dataset("digits", train=True, size=16, seed=0)
    x_probe, y_probe = load_image_dataset("digits", train=False, per_class=6, size=16, seed=0)
    nulls = [recipe.train_once(seed, s, x_train, y_train, x_probe, y_probe, y_probe, "cpu", random_labels=True)
             for seed in (0, 1, 2)]
    rises = [n["auc_final"].auc - n["auc_init"].auc for n in nulls]
    assert min(rises) > 0 and over_seeds(rises).estimate > 0  # the confound: random labels sharpen the blocks too
    c = recipe.claims_from_runs(nulls, nulls)["training_sharpens_class_blocks"]
    assert c["held"] is False and c["beyond_null"] == 0.0 and c["null_rise"] == pytest.approx(np.mean(rises))
    # without the null model's runs the claim is not measured (a rise alone proves nothing)
    alone = recipe.claims_from_runs(nulls)["training_sharpens_class_blocks"]
    assert alone["measured"] is False and alone["held"] is None and "random-label" in alone["why"]
    with pytest.raises(ValueError, match="same seeds"):
        recipe.claims_from_runs(nulls, nulls[::-1])


def test_cross_domain_block_claim_is_judged_against_the_random_label_null_model():
    """The same null model for the printed-digit recipe (quick settings: random labels raise the
    cross-domain block AUC by 0.027 against 0.044 with the true labels): the null model judged
    against itself is not held, and the random-label network recognises printed digits at chance."""
    from recipes.experiments import printed_digits as recipe

    s = dict(width=8, steps=150, batch=64, lr=2e-3)
    x_train, y_train, images = recipe.load_data(4, 0)
    nulls = [recipe.train_once(seed, s, x_train, y_train, *images, "cpu", random_labels=True) for seed in (0, 1)]
    claims = recipe.claims_from_runs(nulls, len(images.y_print), nulls)
    c = claims["cross_domain_digit_blocks_sharpen"]
    assert c["held"] is False and c["beyond_null"] == 0.0 and "random labels" in c["baseline"]["what"]
    assert claims["printed_recognised_above_chance"]["held"] is False
    alone = recipe.claims_from_runs(nulls, len(images.y_print))["cross_domain_digit_blocks_sharpen"]
    assert alone["measured"] is False and alone["held"] is None


def test_adam_reweighting_claim_is_not_held_by_plain_sgd_at_a_smaller_step(monkeypatch):
    """Plain SGD at a scalar step size reweights no example, yet a smaller step alone lowers its rank
    agreement with SGD below momentum's (0.69–0.77 against 0.92–0.97 here): the momentum comparison
    alone called it "Adam reweights examples". The claim's null models are SGD at scalar rates; an
    off-grid rate in Adam's place (0.03 × Adam's) must not hold it."""
    from genkernel.data import regression_1d
    from genkernel.supervised import mlp
    from recipes.experiments import optimizer_weighting as recipe

    real = recipe.optimizers

    def sgd_in_adams_place(model, s):
        table = real(model, s)
        table["Adam"] = torch.optim.SGD(model.parameters(), lr=s["adam_lr"] * 0.03)
        return table

    monkeypatch.setattr(recipe, "optimizers", sgd_in_adams_place)
    s = dict(n_train=12, width=8, probes=8, lr=0.05, adam_lr=5e-3, batch=4, steps_a=40)
    x, y = regression_1d("sin", s["n_train"], seed=0, dtype=torch.float64)
    probes = torch.linspace(-3.0, 3.0, s["probes"], dtype=torch.float64)[:, None]
    per_seed = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        c = recipe.part_a(mlp(1, [s["width"]] * 2, 1, act="tanh").double(), x, y, probes, s, seed)[0]
        per_seed.append({"rho_mom": float(np.nanmean(recipe.rank_agreement(c["SGD"], c["momentum"]))),
                         "rho_adam": float(np.nanmean(recipe.rank_agreement(c["SGD"], c["Adam"]))),
                         **recipe.null_rho(c, s)})
    from recipes.common import over_seeds

    assert over_seeds([r["rho_mom"] - r["rho_adam"] for r in per_seed]).above(0)  # the momentum-only rule: "held"
    shares = {k: {"share": 1.0, "interval": (0.95, 1.05), "method": "jackknife-t", "n": 3}
              for k in ("first_order", "second_order_gap_ratio", "ito")}
    claim = recipe.claims_from(per_seed, shares)["adam_reweights_examples"]
    assert claim["held"] is False and claim["beyond_null"] <= 0  # small steps give the same ranks: 0 or below
    assert "scalar learning rates" in claim["baseline"]["what"]
    # per-seed results without the null models' agreement: not measured
    bare = [{"rho_mom": r["rho_mom"], "rho_adam": r["rho_adam"]} for r in per_seed]
    assert recipe.claims_from(bare, shares)["adam_reweights_examples"]["measured"] is False


def test_circle_claims_are_not_held_by_a_network_trained_on_random_labels():
    """The circle recipe's null model: the same runs on randomly permuted labels. Purity against the
    true labels falls (quick settings: −0.009 [−0.014, −0.004]), so neither claim is held, judged
    against itself; the true labels, same settings, judged against it hold both (positive control)."""
    from recipes.experiments import circle_neighborhoods as recipe

    s = dict(n_train=600, hidden=64, steps=800, batch=32, lr=0.05, k=100, random_anchors=150)  # the quick settings
    null = [recipe.replicate(seed, s, "cpu", torch.float64, random_labels=True) for seed in (0, 1, 2)]
    claims, _ = recipe.claims_from_runs(null, 0.0, null)
    assert claims["kernel_neighborhoods_sharpen"]["held"] is False
    assert claims["kernel_purer_than_euclidean"]["held"] is False
    true = [recipe.replicate(seed, s, "cpu", torch.float64) for seed in (0, 1, 2)]
    positive, _ = recipe.claims_from_runs(true, 0.0, null)
    assert positive["kernel_neighborhoods_sharpen"]["held"] is True


def test_regression_claims_are_not_held_by_a_network_trained_on_shuffled_targets():
    from recipes.experiments import regression_kernels as recipe

    s = dict(n_train=40, n_test=100, width=16, lr=1e-2, steps=300)
    for kind in ("sin", "square"):
        null = [recipe.run_one(kind, seed, s, "cpu", random_targets=True) for seed in (0, 1, 2)]
        claims = recipe.claims_for(kind, null, null)
        assert claims[f"{kind}_fitted"]["held"] is False, kind
        assert claims[f"{kind}_kernel_aligns_with_target"]["held"] is False, (kind, claims[f"{kind}_kernel_aligns_with_target"])


def test_embedding_claims_are_not_held_by_a_network_trained_on_random_labels():
    from genkernel.data import load_digits_images
    from recipes.experiments import tangent_embedding as recipe

    s = dict(width=8, steps=150, batch=64, lr=2e-3)
    x_train, y_train = load_digits_images(size=16, classes=recipe.SEEN, split="train", seed=0)
    x_emb, y_emb = load_digits_images(size=16, per_class=8, split="test", seed=0)
    null = [recipe.train_once(seed, s, x_train, y_train, x_emb, y_emb, y_emb.numpy(), "cpu", random_labels=True)
            for seed in (0, 1, 2)]
    claims = recipe.claims_from_runs(null, null)
    for key in ("seen_digits_cluster_after_training", "unseen_digits_cluster_less"):
        assert claims[key]["held"] is False, (key, claims[key])


def test_diffusion_claims_are_not_held_by_a_time_blind_denoiser_with_its_own_initialization():
    """tests/test_claims.py's time-blind null is identical to its reference (same initialization,
    batches and noise: every difference is exactly 0). Here the model is a time-blind denoiser with
    another initialization than the time-blind reference, so the claims meet the run-to-run
    variation a real null model has (at the quick settings, 6 of 6 seeds: nothing held)."""
    import argparse

    from genkernel.data import gaussian_ring
    from genkernel.diffusion import MLPDenoiser, make_scheduler
    from recipes.common import TimeBlind, diffusion_claims, diffusion_seed_run

    s = dict(num_bins=4, num_probes=16, band=0, controls=2, reference="ledger", snapshot_every=0, kernel_every=0,
             kernel_points=4, kernel_sketch=None, warmup_steps=20, window_steps=8, batch_size=32, lr=2e-3,
             retrieval_samples=4, retrieval_train=32, retrieval_stages=3, inference_steps=10, checkpoint_every=0)

    def other_initialization():
        torch.randn(17)  # draws before the weights: another initialization than the reference's
        return TimeBlind(MLPDenoiser(2, hidden=16, depth=2))

    spec = {
        "load": lambda sd: (gaussian_ring(128, num_modes=4, radius=2.0, std=0.05, seed=sd)[0],
                            gaussian_ring(32, num_modes=4, radius=2.0, std=0.05, seed=sd + 1000)[0]),
        "model": other_initialization, "time_blind": lambda: TimeBlind(MLPDenoiser(2, hidden=16, depth=2)),
        "scheduler": lambda: make_scheduler(100, "linear", "epsilon"), "retrieval": {}, "images": False,
    }
    args = argparse.Namespace(torch_device=torch.device("cpu"), mode="smoke", checkpoint_dir=None)
    runs = [diffusion_seed_run(spec, args, s, seed)[0] for seed in (0, 1)]
    for run in runs:
        blind = run["kernel_locality_per_input"]
        assert not np.allclose(blind["theta_T"], blind["time_blind"])  # not the reference itself
    for claims in [diffusion_claims([run]) for run in runs] + [diffusion_claims(runs)]:
        for key in ("traffic_locality", "share_locality", "traffic_locality_every_level", "kernel_locality"):
            assert claims[key]["held"] is not True, (key, claims[key])
