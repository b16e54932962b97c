"""The GAN recipes run end to end (smoke settings) and write figures and JSON with computed claims;
the image recipe reads MNIST from tiny idx files the test writes (nothing is downloaded)."""

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
    for claim in payload["claims"].values():
        assert isinstance(claim["held"], bool) and "statement" in claim
    assert payload["results"]["generator"]["relative_residual"] < 1e-2
    return payload


def test_ring_recipe_smoke(tmp_path):
    payload = _recipe("gan_ring2d").main(["--smoke", "--out-dir", str(tmp_path)])
    _check_payload(tmp_path, "gan_ring2d", ["gan_ring2d_coupling.png"])
    assert payload["results"]["coverage_end"]["num_modes"] == 8
    assert payload["claims"]["exact_ledger"]["held"]


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
    _check_payload(out, "gan_digits", ["gan_digits_samples.png"])
    assert payload["settings"]["dataset"] == "mnist" and payload["settings"]["images"] == 64
