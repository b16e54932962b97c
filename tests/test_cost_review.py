"""Review of genkernel.core.cost: the sketched route's projection in the estimate, and a memory
cgroup limit below the mount's root (a batch job's or a systemd unit's)."""

import torch
from torch import nn

import genkernel.core.cost as cost
from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss


def test_the_sketched_estimate_counts_the_projection_the_route_keeps():
    """The projection R (matrix factors and the vectors' columns) is held for the tracker's
    lifetime; the estimate counts exactly the bytes it holds after a step."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = PathKernelTracker(model, opt, mse_loss, torch.randn(4, 5, dtype=torch.float64), num_groups=3,
                                group_state="sketched", sketch_dim=64)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    tracker.step(x, y, torch.arange(12) % 3)
    projection = tracker.route.projection
    held = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in projection._factors.values())
    held += sum(t.numel() * t.element_size() for t in projection.vectors._columns.values())
    assert held > 0
    assert tracker.cost.memory["projection"] == held
    # (24 + 5) + (3 + 24) factor rows, 24 + 3 bias values, k = 64, float64.
    assert held == ((24 + 5) + (3 + 24) + 24 + 3) * 64 * 8


def test_the_projections_vector_columns_stop_at_the_cache_budget():
    params = [torch.zeros(10, 4), torch.zeros(100), torch.zeros(50)]
    # factors (10 + 4) k; the 100-vector (800 bytes at k = 2, float32) fits 1000 bytes, the 50-vector then not.
    assert cost.projection_bytes(params, 2, 1000) == 14 * 2 * 4 + 100 * 2 * 4
    assert cost.projection_bytes(params, 2, 10**9) == (14 + 150) * 2 * 4


def _write(directory, **files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text)


def test_a_limit_on_the_processs_own_cgroup_below_the_root_is_read(tmp_path):
    """Slurm and systemd put a job's limit on its own cgroup (v2: /sys/fs/cgroup/<path>/memory.max,
    the root has none): it was not read, and the host's free memory was taken instead."""
    root = tmp_path / "v2"
    _write(root, memory__stat="inactive_file 0\n")  # the root cgroup of v2 has no memory.max
    job = root / "system.slice" / "job_7"
    _write(job, memory__max=str(2**30), memory__current=str(2**28), memory__stat=f"inactive_file {2**20}\n")
    _write(root / "system.slice", memory__max="max", memory__current=str(2**31))
    me = tmp_path / "cgroup"
    me.write_text("0::/system.slice/job_7\n")
    assert cost.cgroup_free_memory(str(root), str(me)) == 2**30 - 2**28 + 2**20
    # An ancestor's tighter limit caps the job's.
    _write(root / "system.slice", memory__max=str(2**29), memory__current=str(2**29 - 2**20))
    assert cost.cgroup_free_memory(str(root), str(me)) == 2**20
    # v1: the memory controller's own line names the path.
    v1 = tmp_path / "v1"
    _write(v1 / "memory", memory__limit_in_bytes=str(2**63 - 4096), memory__usage_in_bytes="5")
    _write(v1 / "memory" / "slurm" / "uid_1" / "job_9", memory__limit_in_bytes=str(2**30),
           memory__usage_in_bytes=str(2**29), memory__stat=f"total_inactive_file {2**27}\n")
    me.write_text("12:pids:/slurm/uid_1/job_9\n4:memory:/slurm/uid_1/job_9\n0::/\n")
    assert cost.cgroup_free_memory(str(v1), str(me)) == 2**29 + 2**27
    # A path not under the mount (a container's namespace shows its own root): the mount's root alone.
    me.write_text("4:memory:/elsewhere/abc\n")
    assert cost.cgroup_free_memory(str(v1), str(me)) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**30))
    assert cost.cgroup_free_memory(str(v1), str(me)) == 2**30 - 5
