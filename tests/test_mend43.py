"""Fixes of the forty-third session's own (the helpers' are in their own files): atomic writers that concurrent
writers of one path could break."""

from __future__ import annotations

import json
import threading

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_concurrent_json_writers_of_one_path_each_write_a_whole_file(tmp_path):
    """Four threads write the recipes' JSON results to one path 40 times each (two ranks, or a resumed run beside a
    live one, writing the same summary): every write succeeds, the file is always one writer's whole payload, and no
    temporary file is left.

    Fails on the old code: every writer used the fixed PATH.tmp, so one writer renamed another's half-written file
    into place or found its own temporary file gone (FileNotFoundError)."""
    from recipes.common import write_json

    path = tmp_path / "result.json"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(index: int) -> None:
        start.wait()
        try:
            for k in range(40):
                write_json(path, {"writer": index, "k": k, "pad": "x" * 20000})
        except BaseException as error:  # (collected: a thread's exception would otherwise be lost)
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    payload = json.loads(path.read_text())
    assert payload["writer"] in range(4) and payload["k"] == 39 and payload["pad"] == "x" * 20000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_an_atomic_file_that_fails_part_way_leaves_the_previous_file_and_no_temporary(tmp_path):
    """A writer that raises inside io.atomic_file (a figure that fails to draw, a full disk) leaves the previous file
    as it was and no temporary file; an OSError is reported naming the path and that the previous file is intact;
    any other error is raised as itself.

    Coverage of the helper the writers share (the old writers each had their own copy of these steps)."""
    from genkernel.core.tracking.io import atomic_file

    path = tmp_path / "figure.png"
    path.write_bytes(b"previous")
    with pytest.raises(ZeroDivisionError):
        with atomic_file(path, "wb") as handle:
            handle.write(b"half")
            1 / 0
    with pytest.raises(OSError, match=r"could not write .*figure\.png.*the previous file, if any, is intact"):
        with atomic_file(path, "wb") as handle:
            handle.write(b"half")
            raise OSError(28, "No space left on device")
    # a writer's own error (a font file missing while drawing): named, without a disk-space advice that misleads
    with pytest.raises(OSError) as raised:
        with atomic_file(path, "wb") as handle:
            raise FileNotFoundError(2, "No such file or directory", "DejaVuSans.ttf")
    assert "could not write" in str(raised.value) and "No such file or directory" in str(raised.value)
    assert "free disk space" not in str(raised.value) and raised.value.errno == 2
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_file(path, "a"):
            pass


def test_the_cost_estimate_of_a_model_left_in_training_mode_is_the_trackers_and_leaves_it_as_it_was():
    """estimate_cost on a model in training mode with a BatchNorm1d (as a training loop leaves it): the estimate is
    made (its one-example passes in eval mode, as the tracker makes its own), its parts equal the tracker's estimate
    of the same set-up, and the model is left in training mode with its running statistics and the RNG untouched.

    Fails on the old code: BatchNorm1d refused the one-example pass ("Expected more than 1 value per channel when
    training")."""
    import torch
    from torch import nn

    from genkernel.core import PathKernelTracker
    from genkernel.core.cost import estimate_cost

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = torch.randn(5, 3, dtype=torch.float64)
    model.train()
    tracker = PathKernelTracker(model, optimizer, lambda out, y: ((out - y) ** 2).sum(1), probes, num_groups=4,
                                batch_size=6, memory_budget=2**20)
    running = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    # (the tracker's own call, tracker._check_cost, made by hand outside analysis_mode)
    estimate = estimate_cost(model, optimizer, (probes,), outputs=2, rows=tracker.partitions.total,
                             partitions=len(tracker.partitions), group_state=tracker.group_state,
                             gradient_route=tracker._gradient_route_of_estimate(),
                             contribution_route=tracker.route.contribution_route, **tracker._cost_settings)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(b, running[name]) for name, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    assert tracker.cost.memory == estimate.memory and tracker.cost.work == estimate.work
    tracker.close()


def counted_repeat_checks(monkeypatch) -> list:
    """A list that gets one entry per repeatability check the engine runs (engine.kernels._checked_output)."""
    from genkernel.core.engine import kernels

    checks, original = [], kernels._checked_output

    def counted(*args, **kwargs):
        checks.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "_checked_output", counted)
    return checks


def test_a_repeat_check_kept_once_per_example_is_taken_again_after_an_in_place_change_and_never_keeps_a_refusal(
        monkeypatch):
    """Inside engine.kernels.repeat_checked_once, gradient_kernel's repeatability check (three passes of the first
    example) runs once per example and state of the parameters: a second call on the same inputs, of either engine,
    runs no check, one after an in-place change of a parameter (an optimizer step) or of the input runs it again,
    and the kernels are bit for bit those computed without the block. A model that draws random numbers in eval mode
    is refused at every call inside the block (a refusal is not kept).

    Coverage of the mechanism (new in this session: state_kernel ran the check once per output direction)."""
    import torch
    from torch import nn

    from genkernel.core.engine.kernels import gradient_kernel, repeat_checked_once

    checks = counted_repeat_checks(monkeypatch)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 2).double()

        def forward(self, x):
            out = self.net(x)
            return out + torch.randn_like(out)

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double(), torch.randn(5, 3, dtype=torch.float64)
    plain = [gradient_kernel(model, x, engine=engine) for engine in ("functional", "factored")]
    assert len(checks) == 2  # (outside the block: every call checks)
    checks.clear()
    with repeat_checked_once(model):
        kept = [gradient_kernel(model, x, engine=engine) for engine in ("functional", "factored", "functional")]
        assert len(checks) == 1  # checked at the first call only
        with torch.no_grad():
            model[0].weight.mul_(1.5)  # (version bumped: another state of the parameters)
        gradient_kernel(model, x, engine="functional")
        assert len(checks) == 2
        with torch.no_grad():
            model[0].weight.div_(1.5)
        x.mul_(1.0)  # (the input written in place: another example for the check)
        gradient_kernel(model, x, engine="functional")
        assert len(checks) == 3
    assert torch.equal(kept[0], plain[0]) and torch.equal(kept[1], plain[1]) and torch.equal(kept[2], plain[0])
    gradient_kernel(model, x, engine="functional")  # (after the block: checked again)
    assert len(checks) == 4

    noisy = Noisy()
    with repeat_checked_once(noisy):
        for _ in range(2):
            with pytest.raises(ValueError, match="random"):
                gradient_kernel(noisy, x)
