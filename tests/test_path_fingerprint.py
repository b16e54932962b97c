"""A resume compares its data folder by content (``recipes.examples.checkpointing.path_fingerprint``).

Before, files over 64 KiB counted by name and size only: a data set replaced by another of the same sizes (array
files of one shape, fixed-size images, a re-encoded shard) resumed silently on other data. Now every byte is read until
``FULL_CONTENT_BYTES`` in all, then each further file's first and last ``SAMPLED_BYTES``."""

from __future__ import annotations

import shutil

import numpy as np

import recipes.examples.checkpointing as checkpointing
from recipes.examples.checkpointing import path_fingerprint


def write_arrays(folder, seed, count=3, size=40_000):
    """``count`` float32 .npy files of ``size`` values (160 KiB each, every file the same size whatever the seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(folder / f"shard_{i}.npy", rng.standard_normal(size).astype(np.float32))
    return folder


def test_same_size_files_with_other_values_change_the_fingerprint(tmp_path):
    """Two folders of the same names and sizes, other values: different fingerprints (before: equal, the files being
    over 64 KiB); a copy elsewhere keeps it; one value changed in the middle of one file changes it."""
    first = write_arrays(tmp_path / "a", seed=0)
    other = write_arrays(tmp_path / "b", seed=1)
    assert sorted(p.stat().st_size for p in first.iterdir()) == sorted(p.stat().st_size for p in other.iterdir())
    assert path_fingerprint(str(first)) != path_fingerprint(str(other))
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    assert path_fingerprint(str(moved)) == path_fingerprint(str(first))
    values = np.load(moved / "shard_1.npy")
    values[20_000] += 1.0
    np.save(moved / "shard_1.npy", values)
    assert path_fingerprint(str(moved)) != path_fingerprint(str(first))


def test_past_the_full_content_budget_each_file_is_read_by_its_ends(tmp_path, monkeypatch):
    """With the budget below one file, every file is read by its first and last SAMPLED_BYTES: an edit at either end
    changes the fingerprint, one inside only the middle does not (the documented limit), and a file read whole or
    by its ends gives different fingerprints (the mode is part of it)."""
    monkeypatch.setattr(checkpointing, "FULL_CONTENT_BYTES", 1000)
    monkeypatch.setattr(checkpointing, "SAMPLED_BYTES", 4096)
    data = tmp_path / "data"
    data.mkdir()
    payload = bytearray(np.random.default_rng(0).bytes(100_000))
    (data / "big.bin").write_bytes(bytes(payload))
    sampled = path_fingerprint(str(data))
    for position, seen in ((10, True), (100_000 - 10, True), (50_000, False)):
        edited = bytearray(payload)
        edited[position] ^= 0xFF
        (data / "big.bin").write_bytes(bytes(edited))
        assert (path_fingerprint(str(data)) != sampled) is seen, position
    (data / "big.bin").write_bytes(bytes(payload))
    monkeypatch.setattr(checkpointing, "FULL_CONTENT_BYTES", 1 << 20)
    assert path_fingerprint(str(data)) != sampled
