"""The approximate routes' honesty (a black-box hunt): group_state "sketched" against the dense route, "factored"
against the dense route on awkward models, "auto"'s choice, the kernel structure's output sketch.

The first two tests fail on the old code; the last is a known limit (strict xfail); the others are coverage."""

import math

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss


def _opposed_run(route, seed=0):
    """SGD with momentum; two groups whose examples have the same inputs and opposite targets far from the
    outputs: each group moves the probes a lot, their sum little (κ ≈ 25)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 3, generator=g, dtype=torch.float64)
    x[:, 1::2] = x[:, 0::2]
    y = torch.full((3, 16, 1), 20.0, dtype=torch.float64)
    y[:, 1::2] = -20.0
    probes = torch.randn(5, 3, generator=g, dtype=torch.float64)
    kw = {"sketch_dim": 256, "sketch_seed": seed} if route == "sketched" else {}
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2, group_state=route, quadrature="simpson",
                                **kw)
    for s in range(3):
        tracker.step(x[s], y[s], torch.arange(16) % 2)
    return tracker


def test_each_sketched_groups_error_is_reported_where_the_groups_cancel():
    """Fails on the old code: relative_sketch_error 0.087 (below the 0.1 limit: no note, its claim held) while the groups'
    contributions are off by 2.4x the change (dense route as reference), so every share is off by ~240 points."""
    from genkernel.report import summarize

    dense = _opposed_run("dense").ledger
    tracker = _opposed_run("sketched")
    ledger = tracker.ledger
    change = float(dense.delta.norm())
    true_error = float((ledger.contributions - dense.contributions).norm()) / change
    assert true_error > 1.0  # the set-up: the groups' estimates are far off
    # what the ledger reports of its sketch (error, noise: whatever it names so) must be of the true error's order
    reported = max(v for k, v in ledger.summary().items() if "sketch" in k)
    assert reported >= true_error / 3, (reported, true_error)
    (summary,) = summarize(tracker)["states"].values()
    sketch_claims = [c for c in summary["claims"] if "sketch" in c["statement"]]
    assert sketch_claims and not all(c["held"] for c in sketch_claims)


def _denoiser():
    class Den(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.t = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1), nn.Linear(1, 4)

        def forward(self, z, t):
            h = torch.tanh(self.c1(z) + self.t(t.to(z.dtype)[:, None] / 100)[:, :, None, None])
            return self.c2(h)

    torch.manual_seed(0)
    return Den().double()


def test_the_sketched_kernel_structure_reports_its_error():
    """Fails on the old code: a 9x9 image's kernel structure is sketched with 8 output directions by default and returns only
    {"sketch": 8}; its k̂ entries are off by up to 0.36 (exact kernel as reference, seeds 0-3), and by_distance
    by 0.02, with nothing saying so (the locality interval is over clean inputs, not the sketch)."""
    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler

    model = _denoiser()
    data = torch.randn(3, 1, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    common = dict(num_bins=3, num_probes=3, controls=0, kernel_points=3, progress=False)
    sketched = NoiseLevelAnalyzer(make_scheduler(50), data, **common).kernel_structure(model)
    exact = NoiseLevelAnalyzer(make_scheduler(50), data, kernel_sketch=None, **common).kernel_structure(model)
    assert sketched["sketch"] == 8 and exact["sketch"] is None
    error = max(abs(a - b) for a, b in zip(sketched["by_distance"], exact["by_distance"]))
    assert error > 1e-3  # the sketch moves the means
    reported = sketched["sketch_standard_error"]
    assert exact.get("sketch_standard_error", 0.0) == 0.0
    assert error <= 3 * reported, (error, reported)


# -- coverage: what held -----------------------------------------------------------------------------------------
def _mlp_run(route, make_opt, clip=math.inf, steps=3, seed=0, groups=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(steps, 8, 2, generator=g, dtype=torch.float64)
    probes = torch.randn(4, 3, generator=g, dtype=torch.float64)
    kw = {"sketch_dim": 16, "sketch_seed": seed} if route == "sketched" else {}
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=groups, group_state=route,
                                quadrature="simpson", max_grad_norm=clip, **kw)
    for s in range(steps):
        tracker.step(x[s], y[s], torch.arange(8) % groups)
    return tracker.ledger


@pytest.mark.parametrize("make_opt, clip", [
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), math.inf),
    (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01), 0.5),
])
def test_coverage_sketch_error_is_exactly_the_gap_and_rest_residual_are_the_dense_routes(make_opt, clip):
    """coverage: passes before. Σ_g estimates + sketch_error is the dense route's exact total to rounding, and the
    rest and residual are the dense route's, under Nesterov momentum with decay, Adam with L2 decay and clipping
    (AdamW, amsgrad, maximize, dampening, a tensor lr, two partitions, 200 groups held too in the hunt's scripts)."""
    dense = _mlp_run("dense", make_opt, clip)
    sketched = _mlp_run("sketched", make_opt, clip)
    scale = float(dense.delta.abs().max())
    total = sketched.contributions.sum(1) + sketched.sketch_error
    assert float((total - dense.contributions.sum(1)).abs().max()) < 1e-12 * scale
    assert float((sketched.rest - dense.rest).abs().max()) < 1e-12 * scale
    assert float((sketched.residual - dense.residual).abs().max()) < 1e-12 * scale
    assert sketched.relative_sketch_error() == pytest.approx(
        float((dense.contributions.sum(1) - sketched.contributions.sum(1)).norm() / dense.delta.norm()), rel=1e-9)


class _TwiceConv(nn.Module):
    """A conv called twice, a raw parameter (fallback), [B, C, H, W] outputs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.scale = nn.Parameter(torch.randn(3, 1, 1))

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c2(torch.tanh(self.c1(x))))))
        return self.head(h * self.scale)


class _TiedAttention(nn.Module):
    """Embedding tied to the output layer, self-attention, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb, self.att = nn.Embedding(7, 6), nn.MultiheadAttention(6, 2, batch_first=True)
        self.ln, self.out = nn.LayerNorm(6), nn.Linear(6, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x)
        h = self.ln(h + self.att(h, h, h)[0])
        return self.out(h).mean(1)


def _factored_run(name, route):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if name == "conv":
        model = _TwiceConv().double()
        x = torch.randn(16, 2, 3, 3, generator=g, dtype=torch.float64)
        y = torch.randn(16, 2, 3, 3, generator=g, dtype=torch.float64)
        loss = lambda out, target: ((out - target) ** 2).flatten(1).sum(1)  # noqa: E731
    else:
        model = _TiedAttention().double()
        x = torch.randint(0, 7, (16, 4), generator=g)
        y = torch.randn(16, 7, generator=g, dtype=torch.float64)
        loss = mse_loss
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.01)
    tracker = PathKernelTracker(model, opt, loss, x[:2].clone(), num_groups=3, group_state=route, quadrature="simpson")
    for s in range(2):
        tracker.step(x[8 * s: 8 * s + 8], y[8 * s: 8 * s + 8], torch.arange(8) % 3)
    return tracker.ledger


@pytest.mark.parametrize("name", ["conv", "attention"])
def test_coverage_factored_route_equals_the_dense_route(name):
    """coverage: passes before. The factored route's groups, rest and residual are the dense route's to 1e-12 of
    the change on a conv net with a module called twice, a fallback parameter and [B, C, H, W] outputs, and on
    tied embedding/output weights around self-attention."""
    dense, factored = _factored_run(name, "dense"), _factored_run(name, "factored")
    scale = float(dense.delta.abs().max())
    for key in ("contributions", "rest", "residual"):
        assert float((getattr(factored, key) - getattr(dense, key)).abs().max()) < 1e-12 * scale, key


def test_coverage_auto_takes_no_sketch_and_a_factored_choice_refuses_momentum_switched_on():
    """coverage: passes before. "auto" never takes the sketched route (Adam: dense), and a factored choice refuses
    a step after momentum is switched on instead of booking it wrongly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    adam = PathKernelTracker(model, torch.optim.Adam(model.parameters()), mse_loss, x[:2], num_groups=4)
    assert adam.group_state == "dense"
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = PathKernelTracker(model, opt, mse_loss, x[:2], num_groups=4)
    assert tracker.group_state == "factored"
    tracker.step(x, y, torch.arange(8) % 4)
    opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="group_state='dense'"):
        tracker.step(x, y, torch.arange(8) % 4)


class _CentersLargeBatches(nn.Module):
    """Subtracts the batch mean, only for batches above 3 rows: the construction-time coupling check (the first
    probes run twice) sees no coupling with 2 probes, training batches of 8 are coupled."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True) if x.shape[0] > 3 else x


def _coupled_run(group_state, gradient_route="auto"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), _CentersLargeBatches(), nn.Tanh(), nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.randn(8, 2, dtype=torch.float64, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, opt, mse_loss, x[:2], num_groups=4, group_state=group_state,
                                gradient_route=gradient_route, quadrature="simpson")
    tracker.step(x, y, torch.arange(8) % 4)
    return tracker


@pytest.mark.xfail(strict=True, reason="a known limit: the coupling check runs the first 4 probes (core.adapter."
                                       "coupled_forward); a model whose coupling shows only at larger batches is not "
                                       "seen, and 'auto' takes a per-example route")
def test_auto_does_not_book_a_batch_coupled_model_with_per_example_gradients():
    """Old: auto picks "factored"; its groups differ from the step's own graph's (dense, gradient_route="graph")
    by 50 % (group 0 at probe 0: 0.0388 against 0.0258) while the totals check and the residual (3.7e-10) pass:
    silently another split. Either the groups are the graph's or the step is refused."""
    reference = _coupled_run("dense", "graph").ledger
    try:
        tracker = _coupled_run("auto")
    except ValueError:
        return  # refused: fine
    scale = float(reference.contributions.abs().max())
    assert float((tracker.ledger.contributions - reference.contributions).abs().max()) < 1e-10 * scale


@pytest.mark.parametrize("group_state", ["dense", "auto", "factored"])
@pytest.mark.parametrize("bad, error", [({"sketch_seed": 1.5}, TypeError), ({"sketch_seed": True}, TypeError),
                                        ({"sketch_kind": "sparse"}, ValueError), ({"sketch_dim": 0}, ValueError)])
def test_sketch_settings_are_checked_on_every_route(group_state, bad, error):
    """Fails on the old code for the seed and the kind: the dense, auto and factored routes took them unread
    (sketch_dim was checked by the cost estimate only)."""
    model = nn.Linear(3, 2).double()
    with pytest.raises(error):
        PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss,
                          torch.randn(4, 3, dtype=torch.float64), num_groups=2, group_state=group_state, **bad)
