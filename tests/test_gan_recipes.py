"""The GAN recipes run end to end (smoke settings) and write figures and JSON with computed claims;
several seeds are independent runs written one file each, resumable from checkpoints and aggregated
without training; the image recipe reads MNIST from tiny idx files the test writes (nothing is
downloaded)."""

import importlib
import json
import struct
from pathlib import Path

import numpy as np


def _recipe(name):
    return importlib.import_module(f"recipes.experiments.{name}")


def _check_payload(out: Path, name: str, extra: list[str]):
    payload = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 0
    for png in extra:
        assert (out / png).stat().st_size > 0
    for key, claim in payload["claims"].items():
        for field in ("statement", "statistic", "baseline", "value", "interval", "held", "measured", "kind"):
            assert field in claim, (key, field)
        if claim["measured"]:
            assert isinstance(claim["held"], bool), key
        else:  # smoke settings cannot measure a converged GAN's coupling, nor run the null model: with the reason
            assert claim["held"] is None and ("not converged" in claim["why"] or "null model was not run" in claim["why"]), key
    assert payload["claims"]["formula_matches_each_step"]["kind"] == "tool_check"
    assert payload["results"]["generator"]["relative_residual"] < 1e-2
    return payload


def test_ring_recipe_smoke_with_two_seeds_resumes_and_aggregates(tmp_path):
    out, runs, checkpoints = tmp_path / "out", tmp_path / "runs", tmp_path / "ckpt"
    ring = _recipe("gan_ring2d")
    payload = ring.main(["--smoke", "--out-dir", str(out), "--runs-dir", str(runs), "--checkpoint-dir", str(checkpoints),
                         "--seeds", "0", "1"])
    _check_payload(out, "gan_ring2d", ["gan_ring2d_coupling.png"])
    assert payload["results"]["coverage_end"]["num_modes"] == 8
    assert payload["claims"]["exact_ledger"]["held"]
    assert payload["results"]["seeds"] == [0, 1] and sorted(p.name for p in runs.iterdir()) == ["seed_0.json", "seed_1.json"]
    coupling = payload["claims"]["own_mode_coupling_traffic"]
    assert coupling["units"] == "2 seeds" and len(coupling["per_window"]) == 2  # every window of every seed
    assert payload["claims"]["distribution_guided"]["units"] == "2 seeds"
    # a seed run again resumes from its checkpoint (nothing left to train) and reports the same numbers
    args = ring.common.parse(ring.common.make_parser("x"), ["--smoke"])
    args.mixture, args.loss, args.spectral_norm = "ring", "nonsaturating", False
    again = ring.run_seed(args, ring.settings_for("smoke"), 1, False, checkpoints / "seed_1")
    first = json.loads((runs / "seed_1.json").read_text())
    assert again["resumed"] and again["report"]["windows"] == first["report"]["windows"]
    # aggregating the per-seed files trains nothing and writes the same claims
    aggregated = ring.main(["--smoke", "--out-dir", str(tmp_path / "agg"), "--runs-dir", str(runs), "--aggregate"])
    assert aggregated["claims"]["own_mode_coupling_traffic"]["value"] == coupling["value"]
    assert aggregated["claims"]["distribution_guided"] == payload["claims"]["distribution_guided"]


def _write_tiny_mnist(root: Path):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 8)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def test_image_recipe_smoke_on_tiny_mnist_files(tmp_path):
    _write_tiny_mnist(tmp_path / "data")
    out = tmp_path / "figs"
    payload = _recipe("gan_digits").main(["--smoke", "--dataset", "mnist", "--data-root", str(tmp_path / "data"), "--out-dir", str(out)])
    _check_payload(out, "gan_digits", ["gan_digits_samples.png", "gan_digits_coupling.png"])
    assert payload["settings"]["dataset"] == "mnist" and payload["settings"]["images"] == 64
    assert payload["results"]["coverage_end"]["num_modes"] == 10
