"""Several partitions of the same steps: each equals a tracker run on it alone, and equals the
marginal of the joint product grouping the analyzers used before (Core v2)."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.grouping import Partitions, abs_row_sum, coarsen, rows_sum_and_size
from genkernel.supervised import mse_loss

F64 = torch.float64
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, amsgrad=True),
}


def model_for(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2)).to(F64)


def batches(steps=4, batch=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 3, generator=g, dtype=F64)
        y = torch.randn(batch, 2, generator=g, dtype=F64)
        classes = torch.randint(0, 3, (batch,), generator=g)
        permuted = classes[torch.randperm(batch, generator=g)]
        out.append((x, y, {"class": classes, "control": permuted}))
    return out


def run(optimizer, num_groups, pick, group_state="dense", **kwargs):
    model = model_for()
    probes = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    tracker = PathKernelTracker(model, OPTIMIZERS[optimizer](model.parameters()), mse_loss, probes, num_groups=num_groups,
                                group_state=group_state, quadrature="simpson", **kwargs)
    for x, y, groups in batches():
        tracker.step(x, y, pick(groups))
    return tracker, model


def assert_same_ledger(a, b):
    scale = float(max(a.contributions.abs().max(), b.contributions.abs().max()))
    for field in ("contributions", "rest", "residual", "traffic", "sketch_error", "f_end"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-12 * scale, msg=field)
    assert a.steps == b.steps


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("group_state", ["dense", "sketched"])
def test_two_partitions_equal_each_partition_tracked_alone(optimizer, group_state):
    both, model_both = run(optimizer, {"class": 3, "control": 3}, lambda g: g, group_state, sketch_dim=64)
    for name in ("class", "control"):
        alone, model_alone = run(optimizer, 3, lambda g, n=name: g[n], group_state, sketch_dim=64)
        assert_same_ledger(both.ledgers[name], alone.ledger)
        # and the training is the same, bit for bit
        assert all(torch.equal(p, q) for p, q in zip(model_both.parameters(), model_alone.parameters()))
    # every partition carries the same rest and, up to float64 rounding, the same residual
    a, b = both.ledgers["class"], both.ledgers["control"]
    assert torch.equal(a.rest, b.rest)
    torch.testing.assert_close(a.residual, b.residual, rtol=0, atol=1e-12 * float(a.contributions.abs().max()))


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_partitions_equal_the_marginals_of_the_joint_product_grouping(optimizer):
    both, _ = run(optimizer, {"class": 3, "control": 3}, lambda g: g)
    joint, _ = run(optimizer, 9, lambda g: g["class"] * 3 + g["control"])
    grid = joint.ledger.contributions
    by_class = coarsen(grid, torch.arange(9) // 3, 3)
    by_control = coarsen(grid, torch.arange(9) % 3, 3)
    scale = float(grid.abs().max())
    torch.testing.assert_close(by_class, both.ledgers["class"].contributions, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(by_control, both.ledgers["control"].contributions, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(joint.ledger.rest, both.ledger.rest, rtol=0, atol=1e-12 * scale)


def test_factored_route_splits_every_partition_from_the_same_per_example_contributions():
    model = model_for()
    probes = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=0.01)  # noqa: E731
    factored = PathKernelTracker(model, make(model), mse_loss, probes, num_groups={"class": 3, "control": 3},
                                 group_state="factored", quadrature="simpson")
    reference_model = model_for()
    dense = PathKernelTracker(reference_model, make(reference_model), mse_loss, probes, num_groups={"class": 3, "control": 3},
                              group_state="dense", quadrature="simpson")
    for x, y, groups in batches():
        factored.step(x, y, groups)
        dense.step(x, y, groups)
    for name in ("class", "control"):
        scale = float(dense.ledgers[name].contributions.abs().max())
        torch.testing.assert_close(factored.ledgers[name].contributions, dense.ledgers[name].contributions,
                                   rtol=0, atol=1e-10 * scale)


def test_partition_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_groups: partition 'a' needs a positive int"):
        Partitions({"a": 0})
    with pytest.raises(ValueError, match="num_groups: partition 'groups'"):
        Partitions(True)
    assert Partitions(__import__("numpy").int64(3)).total == 3  # numpy integers are integers
    parts = Partitions({"a": 2, "b": 3})
    with pytest.raises(TypeError, match="pass groups as a dict"):
        parts.check(torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        parts.check({"a": torch.zeros(4, dtype=torch.long)}, 4)
    with pytest.raises(ValueError, match=r"partition 'b': group ids must lie in \[0, 3\)"):
        parts.check({"a": torch.zeros(4, dtype=torch.long), "b": torch.full((4,), 3)}, 4)
    with pytest.raises(TypeError, match=r"groups\['a'\] must be an integer Tensor"):
        parts.check({"a": torch.zeros(4), "b": torch.zeros(4, dtype=torch.long)}, 4)
    int8 = parts.check({"a": torch.zeros(4, dtype=torch.int8), "b": torch.zeros(4, dtype=torch.long)}, 4)
    assert int8["a"].dtype == torch.long


def test_a_state_saved_with_other_partitions_is_refused(tmp_path):
    tracker, _ = run("adam", {"class": 3, "control": 3}, lambda g: g)
    tracker.save(tmp_path / "t.pt")
    other, _ = run("adam", 3, lambda g: g["class"])
    with pytest.raises(ValueError, match="partitions="):
        other.load(tmp_path / "t.pt")
    again, _ = run("adam", {"class": 3, "control": 3}, lambda g: g)
    again.load(tmp_path / "t.pt")
    assert_same_ledger(again.ledgers["control"], tracker.ledgers["control"])


def test_factored_steps_that_move_few_of_many_groups_book_only_those():
    """One group per training example (the data-attribution grouping): a plain-SGD step moves only
    its batch's groups. The factored route books those columns alone; the ledgers, the traffic, the
    per-step contributions spelled out in full and the residual's definition all equal the dense
    route's, and the groups no step touched stay exactly zero."""
    g = torch.Generator().manual_seed(3)
    examples, batch = 40, 6
    x_all = torch.randn(examples, 3, generator=g, dtype=F64)
    y_all = torch.randn(examples, 2, generator=g, dtype=F64)
    sizes = {"example": examples, "pair": examples // 2}  # a second partition with repeated ids in a batch
    probes = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=0.01)  # noqa: E731
    trackers = {}
    for route in ("factored", "dense"):
        model = model_for()
        trackers[route] = PathKernelTracker(model, make(model), mse_loss, probes, num_groups=sizes, group_state=route)
    order = torch.randperm(examples, generator=g)[: 4 * batch]  # 16 examples are never seen
    for rows in order.split(batch):
        ids = {"example": rows, "pair": rows // 2}
        steps = {route: t.step(x_all[rows], y_all[rows], ids) for route, t in trackers.items()}
        for name in sizes:
            scale = float(steps["dense"].partitions[name].abs().max())
            torch.testing.assert_close(steps["factored"].partitions[name], steps["dense"].partitions[name],
                                       rtol=0, atol=1e-10 * scale)
        assert steps["factored"].moved.contributions["example"].shape[1] == batch  # only the batch's columns
    unseen = torch.ones(examples, dtype=torch.bool)
    unseen[order] = False
    for name in sizes:
        factored, dense = trackers["factored"].ledgers[name], trackers["dense"].ledgers[name]
        scale = float(dense.contributions.abs().max())
        torch.testing.assert_close(factored.contributions, dense.contributions, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(factored.traffic, dense.traffic, rtol=0, atol=1e-10 * scale)
        definition = factored.delta - factored.contributions.sum(dim=1) - factored.rest - factored.sketch_error
        torch.testing.assert_close(factored.residual, definition, rtol=0, atol=1e-12 * float(factored.delta.abs().max()))
    assert not trackers["factored"].ledgers["example"].contributions[:, unseen].any()
    assert not trackers["factored"].ledgers["example"].traffic[:, unseen].any()


@pytest.mark.parametrize("block_bytes", [4 * 2**20, 24])  # one block; blocks of a few columns and a remainder
def test_abs_row_sum_is_the_sum_of_magnitudes_over_rows(block_bytes, monkeypatch):
    from genkernel.core import grouping

    monkeypatch.setattr(grouping, "ABS_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 5), (4, 3, 2), (7, 11)):
        rows = torch.randn(shape, generator=g, dtype=F64)
        torch.testing.assert_close(abs_row_sum(rows), rows.abs().sum(dim=0), rtol=1e-15, atol=0)
    rows = torch.randn(3, 4, generator=g)
    before = rows.clone()
    abs_row_sum(rows)
    assert torch.equal(rows, before)  # the rows are read, never written


@pytest.mark.parametrize("shared", [[4, 5], [4, 6], [5, 7, 8], []])  # adjacent, one gap, none adjacent, none
def test_rows_sum_and_size_add_a_partition_and_its_shared_rows(shared):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 3, 2, generator=g, dtype=F64)
    before = rows.clone()
    part = slice(1, 4)
    chosen = rows[list(range(1, 4)) + shared]
    total, size = rows_sum_and_size(rows, part, shared)
    torch.testing.assert_close(total, chosen.sum(dim=0), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(size, chosen.abs().sum(dim=0), rtol=1e-15, atol=0)
    assert torch.equal(rows, before)  # read, never written
