"""The GPU check script keeps working: its tiny CPU mode runs in CI (``make gpu-check`` runs the
full one where a GPU is present)."""

import json

import pytest

# One torch thread (conftest): the tiny CPU mode's models are tiny, and a second thread only spins on a busy
# machine (2 cores at load ~3: 88-95 s with two threads, 9-12 s with one; on idle cores both about 8 s); the
# check runs what it ran, on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_gpu_check_runs_in_its_tiny_cpu_mode(tmp_path):
    from recipes.benchmarks import gpu_check

    result = gpu_check.main(["--tiny", "--out-dir", str(tmp_path)])
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["tiny"] and written["device"] == "cpu"
    diffusion = written["diffusion"]
    assert diffusion["tracked_steps"] == 3 and diffusion["ratio"] > 1  # one warm-up and two timed steps
    assert diffusion["estimate"]["total_bytes"] > 0
    assert diffusion["training_unchanged"] and diffusion["bare_runs_identical"]
    for rule in ("simpson", "gauss6"):  # the same steps under more nodes
        assert diffusion["rules"][rule]["tracked_steps"] == 3 and diffusion["rules"][rule]["relative_residual"] < 0.1
    phases = {row["phase"]: row for row in diffusion["phases"]}  # one more step, timed phase by phase
    assert {"training forward + backward", "split: group updates and state", "probe forwards"} <= set(phases)
    assert all(row["seconds"] >= 0 and "peak_allocated_bytes" not in row for row in phases.values())  # CUDA only
    half = diffusion["bf16"]  # the same steps in bfloat16, split by the analyzer (old code: no such block)
    assert half["tracked_steps"] == 3 and half["gradient_precision"] == ["bfloat16"] and half["training_unchanged"]
    assert half["ratio"] > 1 and half["relative_residual"] < 0.1
    gan = written["gan"]
    assert gan["training_unchanged"] and gan["bare_runs_identical"] and gan["ratio"] > 1
    assert written["exact_mode"]["matmul_precision"] == "highest"  # torch's default on the CPU, untouched
    assert gan["generator_relative_residual"] < 0.1 and gan["discriminator_relative_residual"] < 0.1
    assert result["cuda_tests"]["ran"] is False


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    """One try on a lent GPU: a section that fails must not lose the others' numbers."""
    from recipes.benchmarks import gpu_check

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check, "diffusion_benchmark", broken)
    gpu_check.main(["--tiny", "--out-dir", str(tmp_path)])
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["diffusion"]["ran"] is False and "planted failure" in written["diffusion"]["error"]
    assert any("planted failure" in line for line in written["diffusion"]["traceback"])
    assert written["gan"]["training_unchanged"]
