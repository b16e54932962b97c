"""Mends of session 42 (helper "mendB"): five faults an earlier session left open.

1. An EMA ledger and structurally null parameters (tracking.null_params): the EMA ledger got the collapsed rows
   (the null parameters' whole update in its rest) but its ``null_moves`` stayed 0. Checked against a float64
   brute force written here: the EMA's share of the null parameter's moves, E_null(k+1) = E_null(k) + (1 − β_k)
   (D_null(k+1) − E_null(k)), pushed through the EMA weights' own path (12-node Gauss-Legendre, torch.func.jvp).
2. The cost estimate did not count the null parameters' search (a float64 copy of the model and two float64
   passes) nor the coupled eval-mode probes' pushes (one pass of them all, whatever the budget; the Jacobian
   route's backward through the whole probe batch). Checked against the repo's own live-storage measure
   (push_memory.LiveBytes) around the very calls the tracker makes.
3. ``group_state='sketched'`` was named a cheaper option where its whole estimate is above the dense one's.
4. ``kernel_plan`` said "factored" for a model whose row check (factors.check_rows_alone) sends the kernel to
   torch.func.
5. The GAN analyzer's ``grouping='mode'`` ignored ``num_groups``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import genkernel.core.engine.kernels as kernels
from genkernel import PathKernelTracker
from genkernel.core.adapter import analysis_mode, eval_mode
from genkernel.core.cost import estimate_cost
from genkernel.core.push_memory import LiveBytes
from genkernel.core.tracking.null_params import structurally_null
from genkernel.core.tracking.routes import push_rows
from test_engine_fuzz41 import _BatchSizeDependent

pytestmark = pytest.mark.usefixtures("one_thread")


def _mse(outputs, targets):
    return ((outputs - targets) ** 2).mean(dim=1)


def _snapshot(module):
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


# -- 1. the EMA ledger's null moves ------------------------------------------------------------------------------------

def test_ema_ledger_books_its_share_of_the_null_parameters_moves():
    """Linear(3, 4) with its bias → training-mode BatchNorm1d → tanh → Linear, float32, Adam, an AveragedModel EMA
    (decay 0.8), four tracked steps: the EMA ledger names ``0.bias`` and its ``null_moves`` equal the brute force (the
    EMA's offset of the bias's moves pushed through the EMA's own path with the EMA's buffers of each update) to 1e-4
    of the EMA's change; its groups, rest and residual add up to the EMA model's real change, and the null moves are
    the rest's (the rest less them is the buffers' drift alone: no weight decay, no start offset here).

    Fails on the old code: the EMA ledger's ``null_moves`` are zero and ``null_parameters`` empty, while the brute
    force is 0.15 of the EMA's change (its summary's ``relative_null_moves`` said 0)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    probes = torch.randn(10, 3)
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=1e-2), _mse, probes, num_groups=2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    ema_ledgers = tracker.track_ema(ema)
    gen = torch.Generator().manual_seed(0)
    bars, thetas, modules = [_snapshot(ema.module)], [_snapshot(model)], [copy.deepcopy(ema.module).double().eval()]
    for _ in range(4):
        x, y, ids = torch.randn(16, 3, generator=gen), torch.randn(16, 1, generator=gen), torch.arange(16) % 2
        tracker.step(x, y, ids)
        ema.update_parameters(model)
        bars.append(_snapshot(ema.module))
        thetas.append(_snapshot(model))
        modules.append(copy.deepcopy(ema.module).double().eval())
    ledger = next(iter(tracker.ema_ledgers.values()))
    assert tracker.ledger.null_parameters == ("0.bias",)
    # brute force: E_null follows D_null (the bias's whole move) with the decays the ledger read
    names = list(thetas[0])
    nodes, weights = np.polynomial.legendre.leggauss(12)
    nodes, weights = (nodes + 1) / 2, weights / 2
    offset, want = torch.zeros_like(thetas[0]["0.bias"]), torch.zeros(10, 1, dtype=torch.float64)
    for k in range(4):
        gain = 1.0 - ema_ledgers.decays[k]
        change = gain * (thetas[k + 1]["0.bias"] - thetas[0]["0.bias"] - offset)
        offset = offset + change
        tangent = {n: change if n == "0.bias" else torch.zeros_like(thetas[0][n]) for n in names}
        for s, w in zip(nodes, weights):
            point = {n: bars[k][n] + float(s) * (bars[k + 1][n] - bars[k][n]) for n in names}
            _, out = jvp(lambda p: functional_call(modules[k + 1], p, (probes.double(),)), (point,), (tangent,))
            want += float(w) * out
    with torch.no_grad():
        real = modules[-1](probes.double()) - functional_call(modules[0], bars[0], (probes.double(),))
    scale = float(real.norm())
    assert ledger.null_parameters == ("0.bias",)
    assert float(want.norm()) > 0.1 * scale  # (a share worth checking)
    assert float((ledger.null_moves - want).norm()) <= 1e-4 * scale
    assert float((ledger.contributions.sum(1) + ledger.rest + ledger.residual - real).norm()) <= 1e-6 * scale
    assert float((ledger.rest - ledger.null_moves - ledger.buffer_drift).norm()) <= 1e-12 * scale
    assert ledger.summary()["relative_null_moves"] == pytest.approx(float(ledger.null_moves.norm()) / scale, rel=1e-6)


# -- 2. the cost of the null search and of coupled probes -----------------------------------------------------------

def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.BatchNorm1d(256),
                         nn.ReLU(), nn.Linear(256, 4))


def _bn_conv(stats=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=stats), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=stats), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 16 * 16, 4))


@pytest.mark.parametrize("build, shape", [(_bn_mlp, (32,)), (_bn_conv, (3, 16, 16))], ids=["mlp", "conv"])
def test_the_null_search_is_counted_where_it_runs(build, shape):
    """A float32 model with a bias before a training-mode BatchNorm (an MLP whose parameters dominate, a conv net
    whose activations do), 12 probes: the estimate's ``null_search`` is at least the live storages the search itself
    allocates (LiveBytes around ``structurally_null``, which finds the biases) and at most 1.5 times them, in a phase
    of its own beside the group rows; a model without a normalization, and the float64 model, have no such part.

    Fails on the old code: no ``null_search`` part (the search's 1.5-2 MiB, 8-27 times the float32 parameters'
    bytes, in no phase)."""
    model = build()
    params = dict(model.named_parameters())
    probes = (torch.randn(12, *shape, generator=torch.Generator().manual_seed(2)),)
    with LiveBytes((*params.values(), *probes)) as live:
        found = structurally_null(model, params, probes)
    assert found == ("0.bias", "3.bias")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with eval_mode(model):  # (as the tracker estimates: BatchNorm1d cannot run one example in training mode)
        estimate = estimate_cost(model, optimizer, probes, outputs=4, rows=2, device="cpu")
    assert live.peak <= estimate.memory["null_search"] <= 1.5 * live.peak
    assert estimate.phases["null search"] == ("group_gradients", "held_factors", "witnesses", "null_search")
    plain = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    assert "null_search" not in estimate_cost(plain, torch.optim.Adam(plain.parameters()), (torch.randn(12, 32),),
                                              outputs=4, rows=2, device="cpu").memory
    double = build().double()
    with eval_mode(double):
        assert "null_search" not in estimate_cost(double, torch.optim.Adam(double.parameters()),
                                                  (probes[0].double(),), outputs=4, rows=2, device="cpu").memory


@pytest.mark.parametrize("route, budget", [("jvp", 2**16), ("jacobian", 2**26)])
def test_coupled_probes_pushes_are_counted_as_one_pass_of_them_all(route, budget):
    """A conv net with BatchNorm2d without running statistics (its probes coupled in eval mode: routes.push_rows
    pushes them all in one pass, and the Jacobian route through the whole batch), 8 probes: the live storages of the
    tracker's own push of the step's rows (LiveBytes around push_rows) are within the estimate's ``probe_pushes`` and
    at least half of it; the same net with running statistics keeps its estimate (nothing added where nothing is
    coupled).

    Fails on the old code: the pushes were counted as the uncoupled ones, 4.7x (JVP, a 64 KiB budget: 1.07 MiB held
    for 0.23) and 4.6x (Jacobians: 22.8 MiB for 4.9) under what they hold."""
    probes = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    estimates, trackers = {}, {}
    for stats in (True, False):
        model = _bn_conv(stats)
        trackers[stats] = PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=1e-3), _mse, probes,
                                            num_groups=2, memory_budget=budget, contribution_route=route)
        estimates[stats] = trackers[stats].cost.memory["probe_pushes"]
    tracked = trackers[False]._tracked  # (the coupled one, ``model``, measured)
    gen = torch.Generator().manual_seed(4)
    rows = {n: torch.randn((3, *p.shape), generator=gen) for n, p in tracked.params.items()}  # R + 1 rows
    theta = {n: p.detach() for n, p in tracked.params.items()}
    with torch.no_grad(), analysis_mode(model):
        with LiveBytes((*rows.values(), *theta.values(), probes)) as live:
            push_rows(tracked, rows, [(1.0, theta)], route=route)
    assert 0.5 * estimates[False] <= live.peak <= estimates[False]
    # (with running statistics nothing is coupled: the estimate is the uncoupled pass's)
    assert estimates[True] < estimates[False]


# -- 3. an option named only where it lowers the estimate -----------------------------------------------------------

def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(8 * 12 * 12, 3))


def test_sketched_is_named_only_where_its_estimate_is_lower():
    """A small conv net, Adam, 16 probes, 4 group rows: the sketched route's whole estimate (its projection, sketches,
    batch factors) is above the dense one's, and the dense estimate's options no longer name it; a wide MLP with 200
    rows, whose dense group arrays dominate: named, with the sketched estimate's own total.

    Fails on the old code: group_state='sketched' was named for the conv net (10.9 MiB against 6.8 MiB dense), its
    "the peak falls by at most" figure true of the parts it spares, not of the route."""
    model = _conv_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    probes = (torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1)),)
    options = dict(outputs=3, rows=4, batch_size=32, device="cpu")
    dense = estimate_cost(model, optimizer, probes, **options)
    sketched = estimate_cost(model, optimizer, probes, group_state="sketched", **options)
    assert sketched.total_bytes > dense.total_bytes
    assert not any("group_state='sketched'" in o for o in dense.cheaper)
    assert any(o.startswith("fewer groups") for o in dense.cheaper)  # (the other options stay)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 4))
    optimizer = torch.optim.Adam(wide.parameters(), lr=1e-3)
    probes = (torch.randn(8, 64),)
    options = dict(outputs=4, rows=200, batch_size=16, device="cpu")
    dense = estimate_cost(wide, optimizer, probes, **options)
    sketched = estimate_cost(wide, optimizer, probes, group_state="sketched", **options)
    assert sketched.total_bytes < dense.total_bytes
    [named] = [o for o in dense.cheaper if o.startswith("group_state='sketched'")]
    assert f"the whole estimate {sketched.total_bytes / 2**30:.2f} GiB against {dense.total_bytes / 2**30:.2f} GiB" in named


# -- 4. the kernel plan says what runs ------------------------------------------------------------------------------

def factored_kernels_finished(monkeypatch) -> list:
    """A list that gets one entry per factored kernel that completes (the engine's factored_gradient_kernel returns;
    one that falls back to torch.func raises inside it): cleared by the caller between kernels."""
    finished = []
    original = kernels.factored_gradient_kernel

    def recorded(*args, **kwargs):
        out = original(*args, **kwargs)
        finished.append(True)
        return out

    monkeypatch.setattr(kernels, "factored_gradient_kernel", recorded)
    return finished


@pytest.mark.parametrize("kind", ["large", "even"])
def test_kernel_plan_reports_the_engine_the_kernel_runs(float64, kind, monkeypatch):
    """For forwards that mix or reorder the rows only of some batch sizes (and the same layers without it), at
    budgets that give one chunk, chunks held and chunks joined in pairs: the plan says "factored" exactly where the
    factored kernel completes (it falls back to torch.func where its row check fails), "functional" otherwise.

    Fails on the old code: "factored" for the "large" and "even" forwards, whose kernels ran torch.func."""
    finished = factored_kernels_finished(monkeypatch)
    torch.manual_seed(0)
    for model in (_BatchSizeDependent(kind), _BatchSizeDependent("none")):
        for budget in (2**10, 2**12, 2**20):
            for n in (5, 6):
                x = torch.randn(n, 3)
                finished.clear()
                kernels.gradient_kernel(model, x, memory_budget=budget)
                plan = kernels.kernel_plan(model, x, memory_budget=budget)
                assert (plan.engine == "factored") == bool(finished), (model.kind, budget, n, plan)
        assert kernels.kernel_plan(model, torch.randn(6, 3)).engine == ("factored" if model.kind == "none"
                                                                        else "functional")


# -- 5. the GAN analyzer's mode grouping and num_groups --------------------------------------------------------------

def test_mode_grouping_refuses_another_number_of_groups():
    """``grouping='mode'`` has one group per mode centre: num_groups=4 with 8 centres is refused with a message that
    names both counts (make_grouping and the analyzer); left out, or equal to the centres' count, it is the centres';
    the groupings that take a count keep their default of 8.

    Fails on the old code: 4 asked, 8 groups given, silently."""
    from genkernel.gan import GANKernelAnalyzer
    from genkernel.gan.geometry import make_grouping
    from genkernel.data import ring_mode_centers

    centers = ring_mode_centers(8, 2.0)
    for spec in ("mode", "nearest_mode"):
        with pytest.raises(ValueError, match=r"one group per mode centre \(8 in mode_centers\).*num_groups=4"):
            make_grouping(spec, num_groups=4, centers=centers)
        assert make_grouping(spec, centers=centers).num_groups == 8
        assert make_grouping(spec, num_groups=8, centers=centers).num_groups == 8
    assert make_grouping("direction").num_groups == 8
    G = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    D = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    probes = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="num_groups=4"):
        GANKernelAnalyzer(G, D, probes, grouping="mode", mode_centers=centers, mode_std=0.05, num_groups=4)
    assert GANKernelAnalyzer(G, D, probes, grouping="mode", mode_centers=centers, mode_std=0.05).num_groups == 8
    assert GANKernelAnalyzer(G, D, probes, grouping="direction").num_groups == 8
