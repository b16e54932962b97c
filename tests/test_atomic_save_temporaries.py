"""atomic_save removes only the temporary files of saves that can no longer finish: a save of the
same path by another process still running (another rank, another job) keeps its temporary file,
which an earlier version deleted, so that save failed when it renamed it."""

import os
import subprocess
import sys

import torch

from genkernel.core.tracking.io import _HOST, atomic_save, load_state


def _temporary(folder, pid, host=_HOST):
    path = folder / f".checkpoint.pt.{host}~{pid}~abc123.tmp"
    path.write_bytes(b"a save in progress")
    return path


def test_a_running_processs_temporary_file_is_kept_and_a_finished_ones_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    try:
        running = _temporary(tmp_path, sleeper.pid)
        dead = _temporary(tmp_path, finished.pid)
        elsewhere = _temporary(tmp_path, finished.pid, host=_HOST + "x")
        mine = _temporary(tmp_path, os.getpid())  # another thread of this process saving the same path
        atomic_save({"format": "x", "v": torch.ones(2)}, tmp_path / "checkpoint.pt")
        assert running.exists() and elsewhere.exists() and mine.exists()  # before: all removed
        assert not dead.exists()
        assert torch.equal(load_state(tmp_path / "checkpoint.pt", "x")["v"], torch.ones(2))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_temporary_file_names_its_host_and_process(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomic_save({"format": "x"}, tmp_path / "state.pt")
    assert len(seen) == 1 and seen[0].startswith(f".state.pt.{_HOST}~{os.getpid()}~") and seen[0].endswith(".tmp")
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]
