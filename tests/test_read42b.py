"""Second read (helper "read42b") of four changes of session 42: the EMA ledgers' null moves, the cost estimate's null
search, kernel_plan's row check and the GAN groupings' counts, tried on configurations their own tests
(tests/test_mend42b.py) do not use.

1. An EMA ledger's ``null_moves`` against a float64 brute force where the null parameter is null on some steps only
   (its BatchNorm in eval mode on the others), the EMA is updated every second step, keeps its own buffers, the
   optimizer is AdamW, and the tracker is saved and loaded mid-run.
2. The null search's estimate against the live storages the search allocates, on nets the tests do not use
   (BatchNorm2d and an instance-like GroupNorm in one conv net; LayerNorm and BatchNorm1d in one MLP; a GroupNorm conv
   net of 8 channels per group, which the estimate under-counts).
3. kernel_plan planned first, on fresh models whose forwards mix the rows of other batch sizes than the mend's.
4. A grouping whose count is fixed ("class", a GeometryGrouping object) given another ``num_groups`` (ignored,
   silently, as "mode" was before 9aa7565).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import genkernel.core.engine.kernels as kernels
from genkernel import PathKernelTracker
from genkernel.core.adapter import eval_mode
from genkernel.core.cost import estimate_cost
from genkernel.core.push_memory import LiveBytes
from genkernel.core.tracking.null_params import structurally_null
from test_mend42b import factored_kernels_finished

pytestmark = pytest.mark.usefixtures("one_thread")


def _mse(outputs, targets):
    return ((outputs - targets) ** 2).mean(dim=1)


def _snapshot(module):
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


# -- 1. the EMA ledger's null moves, null on some steps only ------------------------------------------------------

@pytest.mark.parametrize("every, use_buffers, reload", [(2, False, True), (1, True, False)],
                         ids=["every2-saved", "own-buffers"])
def test_ema_null_moves_follow_the_steps_the_parameter_was_null(every, use_buffers, reload):
    """Linear(3, 4) with its bias → BatchNorm1d → tanh → Linear, float32, AdamW (weight decay 0.1), an AveragedModel
    EMA (decay 0.8, of parameters only or with its own buffers) updated every ``every`` steps; the BatchNorm is in
    eval mode on odd steps (the bias is null on the even ones only); with ``reload`` the tracker is saved and loaded
    after step 3. The EMA ledger's ``null_moves`` equal a float64 brute force (E_null follows the bias's moves on the
    steps it was null, pushed through the EMA's own path) to 1e-4 of the EMA's change, and its groups, rest and
    residual add up to the EMA model's real change to 1e-6.

    Fails on the old code: ``null_moves`` stay 0 while the brute force is ~0.1 of the EMA's change."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    probes = torch.randn(10, 3)
    tracker = PathKernelTracker(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), _mse, probes,
                                num_groups=2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=use_buffers)
    ema_ledgers = tracker.track_ema(ema)
    gen = torch.Generator().manual_seed(0)
    bars, modules = [_snapshot(ema.module)], [copy.deepcopy(ema.module).double().eval()]
    prev = _snapshot(model)["0.bias"]
    d_null, d_nulls, null_steps = torch.zeros_like(prev), [], []
    for k in range(6):
        model[1].train(k % 2 == 0)
        x, y = torch.randn(16, 3, generator=gen), torch.randn(16, 1, generator=gen)
        before = tracker.ledger.null_moves.clone()
        tracker.step(x, y, torch.arange(16) % 2)
        model[1].train()
        now = _snapshot(model)["0.bias"]
        null_steps.append(not torch.equal(before, tracker.ledger.null_moves))
        if null_steps[-1]:
            d_null = d_null + (now - prev)
        prev = now
        if (k + 1) % every == 0:
            ema.update_parameters(model)
            bars.append(_snapshot(ema.module))
            modules.append(copy.deepcopy(ema.module).double().eval())
            d_nulls.append(d_null.clone())
        if reload and k == 2:
            buffer = io.BytesIO()
            torch.save(tracker.state_dict(), buffer)
            buffer.seek(0)
            tracker.load_state_dict(torch.load(buffer, weights_only=False))
    assert null_steps == [True, False] * 3
    ledger = next(iter(tracker.ema_ledgers.values()))
    names = list(bars[0])
    nodes, weights = np.polynomial.legendre.leggauss(12)
    nodes, weights = (nodes + 1) / 2, weights / 2
    offset, want = torch.zeros_like(prev), torch.zeros(10, 1, dtype=torch.float64)
    for j in range(len(bars) - 1):
        change = (1.0 - ema_ledgers.decays[j]) * (d_nulls[j] - offset)
        offset = offset + change
        tangent = {n: change if n == "0.bias" else torch.zeros_like(bars[0][n]) for n in names}
        for s, w in zip(nodes, weights):
            point = {n: bars[j][n] + float(s) * (bars[j + 1][n] - bars[j][n]) for n in names}
            _, out = jvp(lambda p, j=j: functional_call(modules[j + 1], p, (probes.double(),)), (point,), (tangent,))
            want += float(w) * out
    with torch.no_grad():
        real = modules[-1](probes.double()) - functional_call(modules[0], bars[0], (probes.double(),))
    scale = float(real.norm())
    assert float(want.norm()) > 0.05 * scale  # (a share worth checking)
    assert ledger.null_parameters == ("0.bias",)
    assert float((ledger.null_moves - want).norm()) <= 1e-4 * scale
    assert float((ledger.contributions.sum(1) + ledger.rest + ledger.residual - real).norm()) <= 1e-6 * scale


# -- 2. the null search's estimate on other nets --------------------------------------------------------------------

_GROUP_NORM_UNDER = ("cost.null_search_bytes under-counts the search on conv nets with GroupNorm: 0.90 (1.10 of 1.22 MB) "
                     "and 0.88 (25.4 of 29.0 MiB on a 64-channel net) of the live storages; with BatchNorm alone it "
                     "covers them")


def _bn_gn_conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.GroupNorm(16, 16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 3)), (3, 16, 16), 3


def _ln_bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 128), nn.BatchNorm1d(128),
                         nn.GELU(), nn.Linear(128, 4)), (16,), 4


def _gn_conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.GroupNorm(4, 32), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3)), \
        (3, 16, 16), 3


@pytest.mark.parametrize("build, found", [
    (_ln_bn_mlp, ("3.bias",)),
    pytest.param(_bn_gn_conv, ("0.bias", "3.bias"), marks=pytest.mark.xfail(strict=True, reason=_GROUP_NORM_UNDER)),
    pytest.param(_gn_conv, (), marks=pytest.mark.xfail(strict=True, reason=_GROUP_NORM_UNDER)),
], ids=["ln-bn1d", "bn2d-instance-gn", "gn-8-per-group"])
def test_the_null_search_estimate_covers_what_the_search_holds(build, found):
    """A float32 net, 8 probes: the live storages ``structurally_null`` allocates (LiveBytes) are at most the
    estimate's ``null_search`` and at least 2/3 of it, and it finds the biases before a BatchNorm or a one-channel
    GroupNorm (not those before a LayerNorm or a GroupNorm of several channels).

    Fails on the old code: no ``null_search`` part. (The GroupNorm nets: the estimate is 0.88-0.90 of the live
    storages, marked xfail.)"""
    model, shape, d = build()
    params = dict(model.named_parameters())
    probes = (torch.randn(8, *shape, generator=torch.Generator().manual_seed(2)),)
    with LiveBytes((*params.values(), *model.buffers(), *probes)) as live:
        assert structurally_null(model, params, probes) == found
    with eval_mode(model):
        estimate = estimate_cost(model, torch.optim.Adam(model.parameters()), probes, outputs=d, rows=2, device="cpu")
    assert live.peak <= estimate.memory.get("null_search", 0) <= 1.5 * live.peak


# -- 3. kernel_plan planned first, other batch-size dependences -------------------------------------------------------

class _SizeDependent(nn.Module):
    """Linear layers around a roll of the batch's rows applied to batches whose size is a multiple of ``period``, or a
    centring of batches larger than ``above``; inputs ``[B, 3]`` or sequences ``[B, L, 3]`` (averaged over
    positions)."""

    def __init__(self, period: int = 0, above: int = 0):
        super().__init__()
        self.period, self.above = period, above
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h.mean(1) if h.dim() == 3 else h
        if self.period and h.shape[0] % self.period == 0:
            h = h.roll(1, 0)
        if self.above and h.shape[0] > self.above:
            h = h - h.mean(0, keepdim=True)
        return self.head(torch.tanh(self.b(h)))


@pytest.mark.parametrize("period, above", [(5, 0), (4, 0), (0, 6)], ids=["every5th", "every4th", "above6"])
def test_kernel_plan_made_first_says_what_the_kernel_runs(float64, period, above, monkeypatch):
    """Fresh models (nothing remembered of an earlier kernel), the plan made before the kernel, 2-12 examples at four
    budgets: the plan says "factored" exactly where the factored kernel completes.

    Fails on the old code: "factored" where the kernel fell back to torch.func (every fifth batch size rolled, 5
    examples in one chunk; every fourth, 5 examples in chunks of 2 joined in pairs; batches above 6 centred, 7 in one
    chunk)."""
    finished = factored_kernels_finished(monkeypatch)
    torch.manual_seed(0)
    for budget in (2**10, 2**11, 2**12, 2**20):
        for n in (2, 5, 7, 9, 12):
            model = _SizeDependent(period, above)
            x = torch.randn(n, 3)
            plan = kernels.kernel_plan(model, x, memory_budget=budget)
            finished.clear()
            kernels.gradient_kernel(model, x, memory_budget=budget)
            assert (plan.engine == "factored") == bool(finished), (budget, n, plan)


# -- 4. groupings whose count is fixed -----------------------------------------------------------------------------

def _pair():
    G = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    D = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    return G, D, torch.randn(6, 2, generator=torch.Generator().manual_seed(0))


def test_a_grouping_object_refuses_another_num_groups():
    """A GeometryGrouping object has its own count: a ``num_groups`` other than it is refused with both counts named
    (make_grouping and the analyzer); left out, or equal, it is taken; a grouping object as the comparison keeps the
    "same size" refusal. (Patch /tmp/review_read42b/01_grouping_object_count.patch.)

    Fails on the old code: num_groups=6 beside DirectionGroups(4) gave 4 groups, silently."""
    from genkernel.gan import GANKernelAnalyzer
    from genkernel.gan.geometry import DirectionGroups, LatentKMeansGroups, make_grouping

    with pytest.raises(ValueError, match=r"DirectionGroups has 4 groups, but num_groups=6"):
        make_grouping(DirectionGroups(4), num_groups=6)
    assert make_grouping(DirectionGroups(4), num_groups=4).num_groups == 4
    assert make_grouping(DirectionGroups(4)).num_groups == 4
    G, D, probes = _pair()
    with pytest.raises(ValueError, match="num_groups=6"):
        GANKernelAnalyzer(G, D, probes, grouping=DirectionGroups(4), num_groups=6)
    assert GANKernelAnalyzer(G, D, probes, grouping=DirectionGroups(4)).num_groups == 4
    with pytest.raises(ValueError, match="same size"):
        GANKernelAnalyzer(G, D, probes, grouping="direction", num_groups=3, comparison=LatentKMeansGroups(4))


def test_class_grouping_refuses_another_num_groups():
    """``grouping='class'`` has one group per class: a ``num_groups`` other than ``num_classes`` is refused with both
    counts named; left out, or equal, it is taken. (Patch /tmp/review_read42b/02_class_grouping_count.patch.)

    Fails on the old code: num_groups=5 with 3 classes gave 3 groups, silently."""
    from genkernel.gan import GANKernelAnalyzer

    class CondG(nn.Module):
        latent_dim, num_classes = 2, 3

        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(3, 2), nn.Linear(4, 2)

        def forward(self, z, y):
            return self.out(torch.cat([z, self.embed(y)], dim=1))

    class CondD(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(3, 2), nn.Linear(4, 1)

        def forward(self, x, y):
            return self.out(torch.cat([x, self.embed(y)], dim=1)).squeeze(1)

    _, _, probes = _pair()
    classes = torch.arange(6) % 3
    with pytest.raises(ValueError, match=r"one group per class \(3, num_classes\), but num_groups=5"):
        GANKernelAnalyzer(CondG(), CondD(), probes, probe_classes=classes, num_classes=3, grouping="class", num_groups=5)
    for given in (None, 3):
        analyzer = GANKernelAnalyzer(CondG(), CondD(), probes, probe_classes=classes, num_classes=3, grouping="class",
                                     num_groups=given)
        assert analyzer.num_groups == 3
