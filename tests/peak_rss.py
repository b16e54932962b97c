"""The cost tests' measure of peak resident memory: a script run in a fresh process on Linux, glibc told to return
every freed block of 64 KiB or more at once (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), one thread.
The script gets :data:`PRELUDE`'s ``rss()`` (VmRSS and VmHWM in bytes), ``reset_peak()`` (VmHWM back to VmRSS) and
``rss_after_bare_step(build, loss_fn, inputs, targets)`` (a tracked step's baseline),
and prints its result as JSON on its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent("""
    def rss():
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to VmRSS

    def rss_after_bare_step(build, loss_fn, inputs, targets):
        # VmRSS after one bare Adam step of the model ``build()`` makes (its parameters, their gradients and
        # Adam's state), all of it freed again: a tracked step's baseline
        import gc
        import torch
        model = build()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn(model(inputs), targets).mean().backward()
        optimizer.step()
        gc.collect()
        return rss()["VmRSS"]
""")


def measure_script(script: str, *args: str, timeout: float = 300) -> dict:
    """The JSON ``script`` (after :data:`PRELUDE`) prints last, run with ``args`` (at most ``timeout`` seconds);
    skipped where /proc cannot reset the peak."""
    if not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("peak RSS from /proc (Linux, /proc/self/clear_refs writable)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", PRELUDE + script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
