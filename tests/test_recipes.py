"""The paper-experiment recipes run end to end in their smoke setting (in-process, to share one
import of torch) and write a PNG and a JSON whose numbers are finite, in range and consistent
with their claims; run_all skips missing recipes and fails naming a failed one."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def load(name: str):
    return importlib.import_module(f"recipes.experiments.{name}")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(name: str, tmp_path: Path, *extra: str) -> dict:
    load(name).main(["--smoke", "--out-dir", str(tmp_path), *extra])
    png = tmp_path / f"{name}.png"
    assert png.stat().st_size > 2_000 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["recipe"] == name and data["mode"] == "smoke" and data["wall_seconds"] > 0
    for key, c in data["claims"].items():
        assert c["statement"] and c["statistic"] and "what" in c["baseline"], key
        if c["measured"] is False:  # these settings cannot answer it: held is None, and it says why
            assert c["held"] is None and c["why"], key
            continue
        assert isinstance(c["held"], bool), key
        assert c["value"] is not None and math.isfinite(c["value"]), key
        lo, hi = c["interval"]
        assert lo <= c["value"] + 1e-9 and c["value"] <= hi + 1e-9, (key, c)
    return data


def finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in np.ravel(np.asarray(values, dtype=object)))


def test_regression_kernels_smoke(tmp_path):
    data = run("regression_kernels", tmp_path)
    res, claims = data["results"], data["claims"]
    for kind in ("sin", "square"):
        r = res[kind]
        assert len(r["test_r2"]) == 2 and finite(r["test_r2"]) and all(v <= 1.0 for v in r["test_r2"])
        assert all(-1.0 <= a <= 1.0 for a in r["alignment_init"] + r["alignment_final"])
        gain = np.mean(np.subtract(r["alignment_final"], r["alignment_init"]))
        assert claims[f"{kind}_kernel_aligns_with_target"]["value"] == pytest.approx(gain)
        c = claims[f"{kind}_kernel_aligns_with_target"]  # judged against the shuffled-target null model's gain
        null_gain = np.mean(np.subtract(r["alignment_final_shuffled_targets"], r["alignment_init_shuffled_targets"]))
        assert c["baseline"]["value"] == pytest.approx(null_gain)
        assert c["held"] == (c["interval"][0] > 0 and c["beyond_null_interval"][0] > 0)
        assert -1.0 <= r["kernel_final_offdiag_mean"] <= 1.0


def test_classification_kernels_smoke_digits(tmp_path):
    data = run("classification_kernels", tmp_path)
    res, c = data["results"], data["claims"]["training_sharpens_class_blocks"]
    assert res["num_kernel_images"] == 20 and res["num_train"] == 40
    assert res["gap_init"] == pytest.approx(res["within_init"] - res["between_init"])
    assert res["gap_final"] == pytest.approx(res["within_final"] - res["between_final"])
    for key in ("within_init", "between_init", "within_final", "between_final"):
        assert -1.0 <= res[key] <= 1.0
    # the claim is scale-free: the block AUC's change from θ₀, one value per seed
    assert c["value"] == pytest.approx(np.mean(np.subtract(res["block_auc_final"], res["block_auc_init"])))
    assert c["theta_0"] == pytest.approx(np.mean(res["block_auc_init"])) and len(res["block_auc_init"]) == 2
    assert c["baseline"]["value"] == pytest.approx(c["null_rise"])  # the random-label null model's rise
    assert all(0.0 <= v <= 1.0 for v in res["block_auc_init"] + res["block_auc_final"])
    assert c["held"] == (c["interval"][0] > 0 and c["beyond_null_interval"][0] > 0)
    assert 0.0 <= res["probe_accuracy"] <= 1.0


def _idx(path: Path, arr: np.ndarray, labels: bool = False) -> None:
    header = struct.pack(">II", 0x801, len(arr)) if labels else struct.pack(">IIII", 0x803, *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_classification_kernels_reads_tiny_mnist(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, labels=True)
    data = run("classification_kernels", tmp_path / "out", "--dataset", "mnist", "--data-root", str(tmp_path / "data"))
    assert data["results"]["dataset"] == "mnist" and data["results"]["num_kernel_images"] == 20


def test_classification_kernels_reads_tiny_cifar10(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 20)]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in np.arange(n) % 10]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol=2))

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    # torchvision checks the official md5 sums; the TEST points it at the tiny files' sums
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5("batches.meta")})
    data = run("classification_kernels", tmp_path / "out", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"))
    assert data["results"]["dataset"] == "cifar10" and data["results"]["num_kernel_images"] == 20
    assert data["results"]["num_train"] == 40


def test_tangent_svm_smoke(tmp_path):
    data = run("tangent_svm", tmp_path)
    for task in ("circle", "ellipse"):
        r = data["results"][task]
        for key in ("tangent_svm_test_accuracy", "rbf_svm_test_accuracy", "network_test_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        assert r["tangent_minus_rbf"] == pytest.approx(r["tangent_svm_test_accuracy"] - r["rbf_svm_test_accuracy"])
        assert r["num_tangent_features"] == 2 * 8 + 8 + 8 * 8 + 8 + 8 + 1
        c = data["claims"][f"{task}_tangent_svm_at_least_rbf"]  # held from the interval: non-inferiority margin
        assert c["held"] == (r["tangent_minus_rbf_interval"][0] > -c["margin"] and r["tangent_rise_from_init_interval"][0] > 0)
        assert r["tuning"]["rbf"]["tuned"] and r["tuning"]["tangent"]["tuned"] and r["tuning"]["tangent_init"]["tuned"]


def test_tangent_embedding_smoke(tmp_path):
    data = run("tangent_embedding", tmp_path)
    res = data["results"]
    assert res["embedding_method"] in ("t-SNE", "umap")
    for key in ("silhouette_seen_init", "silhouette_unseen_init", "silhouette_seen_final", "silhouette_unseen_final"):
        assert -1.0 <= res[key] <= 1.0
    gap = data["claims"]["unseen_digits_cluster_less"]  # difference in differences: the gap's change from θ₀
    did = np.subtract(res["silhouette_seen_final_per_seed"], res["silhouette_unseen_final_per_seed"]) - np.subtract(
        res["silhouette_seen_init_per_seed"], res["silhouette_unseen_init_per_seed"])
    assert gap["value"] == pytest.approx(did.mean())
    assert res["silhouette_seen_final_per_seed"][0] - res["silhouette_unseen_final_per_seed"][0] == pytest.approx(
        res["silhouette_seen_final"] - res["silhouette_unseen_final"])


def test_printed_digits_smoke(tmp_path):
    data = run("printed_digits", tmp_path)
    res = data["results"]
    confusion = np.asarray(res["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 20 and (confusion.sum(1) == 2).all()
    assert res["printed_accuracy"] == pytest.approx(np.trace(confusion) / 20)
    lo, hi = res["printed_accuracy_interval"]
    assert 0.0 <= lo <= res["printed_accuracy"] <= hi <= 1.0
    assert res["cross_domain_gap_final"] == pytest.approx(res["cross_domain_within_final"] - res["cross_domain_between_final"])
    assert data["claims"]["printed_recognised_above_chance"]["held"] == (lo > 0.1)


def test_optimizer_weighting_smoke(tmp_path):
    data = run("optimizer_weighting", tmp_path)
    a, b = data["results"]["part_a"], data["results"]["part_b"]
    for key in ("rank_corr_sgd_momentum", "rank_corr_sgd_adam", "plain_vs_preconditioned_kernel_rank_corr"):
        assert -1.0 <= a[key] <= 1.0
    for name, summary in a["ledger_summaries"].items():
        assert summary["steps"] == 4 and summary["groups"] == 12 and summary["relative_residual"] < 1e-2, name
    shares = b["shares"]
    # the pieces of the decomposition add up: first order + deterministic + Itô + remainder = 1
    total = sum(shares[k]["share"] for k in ("first_order", "deterministic", "ito", "remainder"))
    assert total == pytest.approx(1.0, abs=1e-9)
    for k, v in shares.items():
        assert finite([v["share"], *v["interval"]]) and v["interval"][0] <= v["share"] + 1e-9 <= v["interval"][1] + 2e-9, k
    assert b["mean_change_norm"] > 0 and b["mean_ito_stderr_over_seeds"] >= 0


def test_null_space_smoke(tmp_path):
    data = run("null_space", tmp_path)
    res = data["results"]
    spectrum = np.asarray(res["operator_spectrum"])
    assert spectrum.shape == (10,) and (spectrum >= 0).all() and (np.diff(spectrum) <= 1e-12 * spectrum[0]).all()
    energy = np.asarray(res["target_energy_curve"])
    assert (np.diff(energy) >= -1e-12).all() and energy[-1] == pytest.approx(1.0)
    assert res["top_k_target_energy"] == pytest.approx(energy[res["top_k"] - 1])
    r = np.asarray(res["out_of_span_residual"])
    assert r.shape == (12,) and (r > 0).all() and (r <= 1.0 + 1e-9).all()
    assert res["checkpoints"] == [0, 3, 13, 49] and sum(res["checkpoint_weights"]) == pytest.approx(0.02 * 50)
    assert res["domingos_relative_error"] >= 0
    assert data["claims"]["checkpoint_path_kernel_reproduces_change"]["held"] == (res["domingos_relative_error"] < 0.1)
    assert -1.0 <= res["kernel_target_alignment"] <= 1.0
    c = data["claims"]["error_grows_with_out_of_span_part"]  # held also needs ρ(r) beyond the distance baseline
    if c["measured"]:
        assert c["held"] == (res["spearman_interval"][0] > 0 and res["by_region"]["all"]["beyond_distance"]["interval"][0] > 0)
    assert {"error_grows_with_out_of_span_part_inside_range", "error_grows_with_out_of_span_part_outside_range"} <= set(data["claims"])
    assert res["operator"]["is_this_networks_path_kernel"] is False
    edge = [run["lr_times_sharpness"] for run in res["per_seed"]]
    assert all(0 < e for e in edge)
    assert data["claims"]["trained_below_the_edge_of_stability"]["held"] == (max(edge) < 1.9)


def test_run_all_skips_missing_and_names_failures(tmp_path, capsys):
    run_all = importlib.import_module("recipes.run_all")
    fake = tmp_path / "recipes" / "experiments"  # a package of the same name, run from tmp_path
    fake.mkdir(parents=True)
    for package in (fake.parent, fake):
        (package / "__init__.py").write_text("")
    (fake / "regression_kernels.py").write_text(
        "import json, sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out-dir') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "assert '--quick' in sys.argv\n"
        "(out / 'regression_kernels.json').write_text(json.dumps({'claims': {'a': {'held': True}, 'b': {'held': False}}}))\n"
    )
    (fake / "null_space.py").write_text("raise SystemExit(3)\n")
    rc = run_all.main(["--quick", "--experiments-dir", str(fake), "--out-dir", str(tmp_path / "out"),
                       "--only", "regression_kernels", "null_space", "gan_digits"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "SKIP gan_digits" in out and "FAILED (exit 3)" in out and "1/2 held" in out
    assert "FAILED: null_space" in err
    rc = run_all.main(["--quick", "--experiments-dir", str(fake), "--out-dir", str(tmp_path / "out"), "--only", "regression_kernels"])
    assert rc == 0
    assert run_all.main(["--only", "no_such_recipe"]) == 2
    assert set(run_all.RECIPES) >= {"circle_neighborhoods", "optimizer_weighting", "null_space", "gan_digits", "diffusion_toy2d"}
    assert len(run_all.RECIPES) == 13 and sys.executable


def test_recipes_are_a_package_run_as_modules(tmp_path):
    """No recipe edits sys.path; an experiment runs as ``python -m`` from the repository root."""
    edits = [str(path.relative_to(REPO)) for path in RECIPES.rglob("*.py") if "sys.path" in path.read_text()]
    assert edits == []
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.experiments.null_space", "--smoke", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "null_space.json").read_text())
    assert data["recipe"] == "null_space" and data["mode"] == "smoke"
