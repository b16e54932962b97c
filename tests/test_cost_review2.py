"""Second review of genkernel.core.cost: the EMA ledger's sync (its pushes take push_rows' own
"auto" route and cost two forwards per tangent row, plus its two probe forwards), and the cheaper
options naming group_state='sketched' only where the sketched route takes the optimizer."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import genkernel.core.cost as cost
from genkernel import PathKernelTracker
from genkernel.core.cost import estimate_cost
from genkernel.supervised import mse_loss

F64 = torch.float64


def _mlp(outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, outputs)).double()


def test_the_ema_syncs_work_is_its_flop_count_with_six_nodes():
    """An EMA ledger's sync pushes R + 2 rows through every quadrature node, one primal per pass and
    a tangent pass per row as the step's own pushes (every weight's tangent product and the input
    tangents' of the layers after the first, whose input has none; per pass, the first layer's product
    with the zero input tangent torch.func puts there), and runs two probe forwards: the predicted
    ratio is torch's operation count of a tracked step with its sync over a bare step's, to 6 %
    (gauss6). It counted one forward per row and no probe forwards: 19 % low."""
    from recipes.benchmarks.harness import counted_flops

    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch, probes, groups = 8, 4, 3
    bare_model, model = _mlp(3), _mlp(3)
    model.load_state_dict(bare_model.state_dict())
    bare_opt, opt = torch.optim.Adam(bare_model.parameters(), 1e-3), torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(2 * batch + probes, 1, 4, 4, dtype=F64)
    y = torch.randn(2 * batch, 3, dtype=F64)
    tracker = PathKernelTracker(model, opt, mse_loss, x[-probes:], num_groups=groups, batch_size=batch,
                                group_state="dense", gradient_route="graph", contribution_route="jvp",
                                quadrature="gauss6")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    tracker.track_ema(ema)

    def bare(rows):
        bare_opt.zero_grad()
        mse_loss(bare_model(x[rows]), y[rows]).mean().backward()
        bare_opt.step()

    def tracked(rows):
        tracker.step(x[rows], y[rows], torch.arange(batch) % groups)
        ema.update_parameters(model)
        tracker.ema_ledgers  # the sync

    bare(slice(0, batch))
    tracked(slice(0, batch))
    rows = slice(batch, 2 * batch)
    ratio = counted_flops(lambda: tracked(rows))[0] / counted_flops(lambda: bare(rows))[0]
    assert tracker.cost.ratio == pytest.approx(ratio, rel=0.06)
    first, second = 16 * 24, 24 * 3  # the two layers' multiply-adds per example
    forward = first + second
    assert tracker.cost.work["ema_contributions"] == pytest.approx(
        6 * probes * (1 + first / forward + (forward + second) / forward * (groups + 2)) + 2 * probes)


def test_the_ema_sync_is_estimated_on_the_route_push_rows_takes_for_it():
    """EMALedgers.sync calls push_rows with route "auto" whatever the tracker's contribution route:
    with d = 1 and R + 2 = 12 rows it takes the probes' Jacobians, [2 M d + R + 2] × P, which the
    sync's estimate counts (it counted the step's JVP pass) and whose work it counts."""
    torch.manual_seed(0)
    model = _mlp(1)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    probes = (torch.randn(5, 1, 4, 4, dtype=F64),)
    num = sum(p.numel() for p in model.parameters())
    rows, m = 10, 5
    assert cost.push_route(rows + 2, m, 1, num * 8, 2**28) == "jacobian"
    plain = estimate_cost(model, opt, probes, outputs=1, rows=rows, contribution_route="jvp", memory_budget=2**28)
    with_ema = estimate_cost(model, opt, probes, outputs=1, rows=rows, contribution_route="jvp", memory_budget=2**28,
                             ema=True)
    stacked = rows + 2
    sync = (stacked + 1 + rows + 2) * num * 8 + (2 * m * 1 + rows + 2) * num * 8
    transient = sum(with_ema.memory.get(k, 0) for k in ("group_gradients", "group_updates", "probe_pushes",
                                                         "push_tangents"))
    assert with_ema.memory["ema_sync"] == sync - transient
    assert with_ema.memory["probe_pushes"] == plain.memory["probe_pushes"]  # the step's own route is unchanged
    shapes, fallback = cost.block_shapes(model, probes)
    forward = cost.forward_macs(shapes, fallback)
    # a forward and d = 1 backward pass per probe and once more for the first alone (per_example's check), the
    # backward through both weights and the second layer's input (24 multiply-adds); the Jacobians times the rows
    backward = (forward + 24) / forward
    assert with_ema.work["ema_contributions"] == pytest.approx(
        (m + 1) * (1 + 1 * backward) + m * 1 * (rows + 2) * num / forward + 2 * m)


def test_sketched_is_not_suggested_where_the_sketched_route_refuses_the_optimizer(monkeypatch):
    """The sketched route needs one betas (Adam) or one momentum (SGD) over all parameter groups and
    SGD, Adam or AdamW: a refusal named it for an optimizer whose groups differ, which it then refused."""
    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    probes = (torch.randn(4, 3),)

    def split(kind, **second):
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}]
        return kind(groups, lr=1e-3, **({"momentum": 0.9} if kind is torch.optim.SGD else {}))

    for optimizer in (split(torch.optim.Adam, betas=(0.5, 0.999)), split(torch.optim.SGD, momentum=0.5)):
        estimate = estimate_cost(model, optimizer, probes, outputs=2, rows=4, sketch_dim=4)
        assert not estimate.fits and "fewer groups" in " ".join(estimate.cheaper)
        assert "group_state='sketched'" not in " ".join(estimate.cheaper)
        with pytest.raises(ValueError, match="sketched"):  # what it would have named
            PathKernelTracker(model, optimizer, mse_loss, probes[0], num_groups=4, group_state="sketched",
                              memory_check="warn")
    # (sketch_dim=4: with the default 512 the sketched estimate of this tiny model is 9x the dense one's, not named)
    same = estimate_cost(model, split(torch.optim.Adam, betas=(0.9, 0.999)), probes, outputs=2, rows=4, sketch_dim=4)
    assert "group_state='sketched'" in " ".join(same.cheaper)


def test_factored_is_suggested_for_plain_sgd_and_only_the_group_states_the_caller_can_build(monkeypatch):
    """A dense tracker of plain SGD that did not fit never named group_state='factored' (no per-group copies
    at all), the cheapest route for it; and group_states= (a tracker under DDP: dense alone) keeps the
    suggestions to the routes its caller can be built with."""
    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    probes = (torch.randn(4, 3),)
    named = lambda estimate: " ".join(estimate.cheaper)  # noqa: E731
    # (sketch_dim=4: with the default 512 the sketched estimate of this tiny model is 9x the dense one's, not named)
    plain = estimate_cost(model, torch.optim.SGD(model.parameters(), lr=0.1), probes, outputs=2, rows=4, sketch_dim=4)
    assert not plain.fits and "group_state='factored'" in named(plain) and "group_state='sketched'" in named(plain)
    momentum = estimate_cost(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), probes, outputs=2, rows=4,
                             sketch_dim=4)
    assert "group_state='factored'" not in named(momentum) and "group_state='sketched'" in named(momentum)
    alone = estimate_cost(model, torch.optim.SGD(model.parameters(), lr=0.1), probes, outputs=2, rows=4,
                          group_states=("dense",))
    assert "group_state=" not in named(alone) and "fewer groups" in named(alone)
    with_ema = estimate_cost(model, torch.optim.SGD(model.parameters(), lr=0.1), probes, outputs=2, rows=4, ema=True)
    assert "group_state=" not in named(with_ema)  # neither route keeps an EMA ledger
    with pytest.raises(ValueError, match="group_states must be a tuple drawn from"):
        estimate_cost(model, torch.optim.SGD(model.parameters(), lr=0.1), probes, outputs=2, rows=4, group_states="dense")


def test_a_tracker_names_the_per_example_routes_only_for_a_model_that_does_not_couple_its_examples(monkeypatch):
    """Training-mode BatchNorm couples the batch's examples, so the factored and sketched routes refuse it: a
    dense tracker of it that did not fit named them all the same."""
    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    probes = torch.randn(4, 3)
    with pytest.raises(MemoryError) as coupled:
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4)
    assert "fewer groups" in str(coupled.value) and "group_state=" not in str(coupled.value)
    model.eval()  # running statistics: examples independent
    with pytest.raises(MemoryError) as independent:
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4,
                          group_state="dense")
    assert "group_state='factored'" in str(independent.value)


def test_an_ema_ledger_added_after_steps_is_not_refused_for_the_memory_the_tracker_already_holds(monkeypatch):
    """track_ema() after steps estimated the whole tracker against the memory free now, which no longer holds
    the tracker's own arrays: they were counted twice (in the total and as taken), and an EMA that fits was
    refused. Here the device has room for the tracker with its EMA ledger; after the first step the tracker's
    estimated arrays are taken from the free memory. With nothing free after the step, the EMA is refused."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    probes = torch.randn(4, 3, dtype=torch.float64)
    for left in ("room", "nothing"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
        # (the tracker's estimate takes the first step's batch of 6 and the route it runs: the training pass's factors)
        with_ema = estimate_cost(model, optimizer, (probes,), outputs=2, rows=3, ema=True, batch_size=6,
                                 gradient_route="example")
        grads = sum(p.numel() * p.element_size() for p in model.parameters())
        free = {"bytes": with_ema.total_bytes - with_ema.held + 2 * grads}  # room for all of it, gradients included
        monkeypatch.setattr(cost, "available_memory", lambda device: free["bytes"])
        tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=3, group_state="dense")
        tracker.step(x, y, torch.arange(6) % 3)
        ema.update_parameters(model)
        # what the tracker holds (at most) is taken; or every byte
        free["bytes"] = 0 if left == "nothing" else free["bytes"] - (tracker.cost.total_bytes - tracker.cost.held)
        if left == "nothing":
            with pytest.raises(MemoryError, match="would not fit"):
                tracker.track_ema(ema)
            assert tracker.ema is None and not tracker.cost.settings["ema"]
        else:
            tracker.track_ema(ema)
            assert tracker.cost.settings["ema"] and tracker.cost.memory["ema"] > 0
