"""Observed loops in mixed precision (PathKernelTracker(mixed_precision="observe")): a forward under
torch.autocast is split at the precision it ran in.

The loop's gradients pass through bfloat16/float16 weight-gradient products, each entry rounded once
there; the groups' gradients come from the same graph, rounded the same way, so the two differ by at
most eps/2 of |real| + Σ_g |ĝ_g| per entry: that is the step's check, and the difference is the
rounding row, left in the residual. The tracker's own passes run in the model's float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from genkernel import OptimizerStep, PathKernelTracker
from genkernel.core.errors import LedgerCheckError

pytestmark = pytest.mark.usefixtures("one_thread")

LR, STEPS, B, G, MAX_NORM = 0.05, 3, 8, 4, 0.5


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * 2 * B, 5, generator=g), torch.randn(STEPS * 2 * B, 2, generator=g), torch.randn(6, 5, generator=g)


def _losses(model, x, y, dtype):
    """Per-example MSE of a forward under autocast(dtype) (None: in float32, no autocast)."""
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(x)
    return ((out.float() - y) ** 2).mean(dim=1)


def _loop(dtype, tracker_kwargs=None, *, second_weight=1.0, reference=None):
    """SGD over STEPS steps of two micro-batches of B (summed losses / 2), clip_grad_norm_, forward under
    autocast(dtype) (None: float32). Returns the model and the tracker (None without one). ``reference`` collects, per
    step, the groups' gradients from the step's own graph (masked torch.autograd.grad, written here), the
    clip factor and θ before and after."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y, probes = _data()
    tracker = None if tracker_kwargs is None else PathKernelTracker(
        model, optimizer, lambda out, t: ((out - t) ** 2).mean(dim=1), probes, num_groups=G, **tracker_kwargs)
    params = list(model.parameters())
    for k in range(STEPS):
        groups_sum = [torch.zeros(G, *p.shape, dtype=torch.float64) for p in params]
        theta = [p.detach().clone() for p in params]
        for j, weight in enumerate((1.0, second_weight)):
            rows = slice((2 * k + j) * B, (2 * k + j + 1) * B)
            losses = _losses(model, x[rows], y[rows], dtype)
            ids = torch.arange(B) % G
            if tracker is not None:
                tracker.observe(losses, ids)
            if reference is not None:
                for g in range(G):
                    mask = (ids == g).to(losses.dtype) / B  # observe()'s default coefficients 1/B
                    for total, grad in zip(groups_sum, torch.autograd.grad(losses, params, mask, retain_graph=True)):
                        total[g] += grad.double()
            (weight * losses.mean() / 2).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        optimizer.step()
        optimizer.zero_grad()
        if reference is not None:
            reference.append({"groups": groups_sum, "clip": min(1.0, MAX_NORM / (norm + 1e-6)), "theta": theta,
                              "after": [p.detach().clone() for p in params]})
    return model, tracker


def _pushed(model, reference, scales) -> torch.Tensor:
    """``[M, G, d]``: SGD's group updates −η·α_k·ĝ_g of each recorded step pushed through the Jacobian at
    the step's midpoint θ (float32 Jacobians, float64 sums): the midpoint rule's contributions by hand."""
    _, _, probes = _data()
    names = [n for n, _ in model.named_parameters()]

    def f(params, x):
        return functional_call(model, dict(zip(names, params)), (x,))

    expected = torch.zeros(probes.shape[0], G, 2, dtype=torch.float64)
    for step, alpha in zip(reference, scales):
        jac = jacrev(f)([(a + b) / 2 for a, b in zip(step["theta"], step["after"])], probes)
        for g in range(G):
            for J, total in zip(jac, step["groups"]):
                update = -LR * alpha * total[g]
                expected[:, g] += torch.einsum("mdp,p->md", J.double().flatten(2), update.flatten())
    return expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_autocast_loop_books_its_half_precision_group_gradients_and_trains_as_without_the_tracker(dtype):
    """The ledger books the groups' gradients of the half-precision graph (by hand to 1e-5 of the largest
    contribution; the float32 graph's are 1e-4 and more away), training is bit for bit the loop's without the
    tracker, each step reports its precision, the identity closes. Old code refused every autocast step
    ("mixed precision is not supported")."""
    plain, _ = _loop(dtype)
    reference = []
    model, tracker = _loop(dtype, dict(mixed_precision="observe"), reference=reference)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    assert tracker.ledger.steps == STEPS
    assert [e["gradient_precision"] for e in tracker.gradient_scales] == [str(dtype).removeprefix("torch.")] * STEPS
    # The one scale the check fits is the loop's: the clip factor over its 2 micro-batches, to the precision.
    alphas = [e["scale"] for e in tracker.gradient_scales]
    for alpha, step in zip(alphas, reference):
        assert abs(alpha - step["clip"] / 2) <= torch.finfo(dtype).eps * step["clip"] / 2
    expected = _pushed(model, reference, alphas)
    scale = float(expected.abs().max())
    assert float((tracker.ledger.contributions - expected).abs().max()) < 1e-6 * scale  # measured 6e-8
    float32_reference = []
    float32_model, _ = _loop(None, reference=float32_reference)
    float32_scales = [step["clip"] / 2 for step in float32_reference]
    # measured 2.6e-3 (bfloat16) and 2.9e-4 (float16) of the largest contribution
    assert float((_pushed(float32_model, float32_reference, float32_scales) - expected).abs().max()) > 1e-4 * scale
    ledger = tracker.ledger
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 5e-3  # measured 5.3e-4 and 1.5e-4


def test_a_misweighted_micro_batch_is_still_refused_in_half_precision():
    """The check allows the precision's rounding, not a loop that weighs its micro-batches otherwise than
    observed: the second micro-batch's loss × 1.5 in the backward is refused, the model left as before."""
    with pytest.raises(LedgerCheckError, match="do not add up to the real gradient"):
        _loop(torch.bfloat16, dict(mixed_precision="observe"), second_weight=1.5)


def test_autocast_is_refused_by_default_naming_the_option_and_an_owned_step_under_it_is_split():
    """Old code's message did not name mixed_precision='observe'; an owned step under the caller's autocast is
    refused by default, before anything moves, and under the option booked at its precision (old code refused
    it there too), its update the one an untracked step under autocast makes."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y, probes = _data()
    loss_fn = lambda out, t: ((out - t) ** 2).mean(dim=1)  # noqa: E731
    tracker = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=G)
    with pytest.raises(RuntimeError, match="mixed_precision='observe'"):
        tracker.observe(_losses(model, x[:B], y[:B], torch.bfloat16), torch.arange(B) % G)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="mixed_precision='no'"):
        tracker.step(x[:B], y[:B], torch.arange(B) % G)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and tracker.ledger.steps == 0
    tracker.close()
    plain = _model()
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=LR)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        OptimizerStep(plain, plain_optimizer, loss_fn, x[:B], y[:B]).run()
    tracker = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=G, mixed_precision="observe")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracker.step(x[:B], y[:B], torch.arange(B) % G)
    assert all(torch.equal(a, p) for a, p in zip(plain.parameters(), model.parameters())) and tracker.ledger.steps == 1
    assert tracker.gradient_scales[0]["gradient_precision"] == "bfloat16"
    ledger = tracker.ledger
    assert torch.equal(ledger.f_end, model(probes).detach().double())  # the probes in float32, not under autocast
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=G, mixed_precision="bf16")


def test_the_trackers_own_passes_run_in_float32_under_accelerates_bf16_forward(fresh_accelerate):
    """accelerate's mixed_precision='bf16' wraps the model's forward in autocast: the loop trains through it,
    the ledger's probe outputs are the float32 model's (the original forward, bit for bit), not bf16's."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y, probes = _data()
    tracker = PathKernelTracker(model, optimizer, lambda out, t: ((out - t) ** 2).mean(dim=1), probes, num_groups=G,
                                mixed_precision="observe")
    for k in range(2):
        rows = slice(k * B, (k + 1) * B)
        losses = ((model(x[rows]).float() - y[rows]) ** 2).mean(dim=1)
        tracker.observe(losses, torch.arange(B) % G)
        accelerator.backward(losses.mean())
        optimizer.step()
        optimizer.zero_grad()
    assert [e["gradient_precision"] for e in tracker.gradient_scales] == ["bfloat16"] * 2
    with torch.no_grad():
        full = model._original_forward(probes).double()
        half = model(probes).double()
    assert torch.equal(tracker.ledger.f_end, full)
    assert float((half - full).abs().max()) > 1e-4  # what the passes would have read through the wrapper
    torch.testing.assert_close(tracker.ledger.delta, tracker.ledger.contributions.sum(1) + tracker.ledger.rest
                               + tracker.ledger.residual, rtol=0, atol=1e-12)


def _ddpm_loop(analyzer_kwargs):
    """diffusers' DDPM loop on a tiny UNet2DModel at 8×8, forward under bf16 autocast, Adam; with a
    NoiseLevelAnalyzer observing when ``analyzer_kwargs`` is given. Returns (model, analyzer)."""
    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler, tiny_unet

    scheduler = make_scheduler(num_train_timesteps=100)
    torch.manual_seed(0)
    model = tiny_unet(sample_size=8, in_channels=1, channels=(8, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    data = torch.rand(3, 6, 1, 8, 8, generator=g) * 2 - 1
    analyzer = None
    if analyzer_kwargs is not None:
        analyzer = NoiseLevelAnalyzer(scheduler, data[0], num_bins=4, num_probes=2, kernel_points=2, progress=False,
                                      quadrature="simpson", **analyzer_kwargs)
        analyzer.bind(model, optimizer)
    for x0 in data:
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 100, (x0.shape[0],), generator=g)
        x_t = scheduler.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(x_t, t).sample
        losses = ((prediction.float() - noise) ** 2).mean(dim=(1, 2, 3))
        if analyzer is not None:
            analyzer.observe(losses, t)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, analyzer


def test_the_noise_level_analyzer_observes_a_bf16_diffusers_loop_and_leaves_it_as_it_was():
    """NoiseLevelAnalyzer(mixed_precision='observe') books a diffusers UNet's bf16 steps (old code: no such
    option; the analyzer refused autocast), its report strict JSON, training bit for bit unchanged."""
    import json

    plain, _ = _ddpm_loop(None)
    model, analyzer = _ddpm_loop(dict(mixed_precision="observe"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    ledger = analyzer.ledger
    assert ledger.steps == 3
    assert [e["gradient_precision"] for e in analyzer.tracker.gradient_scales] == ["bfloat16"] * 3
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual, rtol=0,
                               atol=1e-12)
    # Adam's first steps on this UNet: 0.052 (the same loop in float32: 0.011, Simpson's rule's own); the
    # rest is the rounding row, which Adam magnifies where the real gradient is small against its groups'.
    assert float(ledger.residual.norm() / ledger.delta.norm()) < 0.1
    json.dumps(analyzer.report(), allow_nan=False)


def test_the_cost_estimate_counts_the_witnesses_a_half_precision_step_keeps():
    """mixed_precision='observe' keeps parameter-sized sums of the micro-batches' own backward passes (float16:
    unscaled and at 2^16) and of a seeded witness: the estimate counts the worst case, five (peaks measured by
    tests/test_witness44.py); the default keeps none (old code: no such item)."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    _, _, probes = _data()
    loss_fn = lambda out, t: ((out - t) ** 2).mean(dim=1)  # noqa: E731
    parameters = sum(p.numel() for p in model.parameters())
    observing = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=G, mixed_precision="observe")
    assert observing.cost.memory["witnesses"] == 5 * parameters * 4
    observing.close()
    plain = PathKernelTracker(model, optimizer, loss_fn, probes, num_groups=G)
    assert "witnesses" not in plain.cost.memory
    assert observing.cost.total_bytes - plain.cost.total_bytes == 5 * parameters * 4


def test_each_half_precision_step_reports_its_relative_residual_and_a_large_one_is_warned_of(monkeypatch):
    """gradient_scales[*]['relative_residual'] is the step's ‖R_k‖ / ‖Δf_k‖ at the probes (R_k the step's
    residual, Δf_k the change of the ledger's delta over the step), and a step above PRECISION_WARNING warns,
    once per tracker. Lightning bf16-mixed with AdamW over 3 micro-batches booked a residual 13 times its
    change in silence: old code had no such entry nor warning."""
    import genkernel.core.tracking.tracker as tracker_module

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y, probes = _data()
    tracker = PathKernelTracker(model, optimizer, lambda out, t: ((out - t) ** 2).mean(dim=1), probes, num_groups=G,
                                mixed_precision="observe")
    seen = []
    tracker.listeners.append(lambda result: seen.append((result.residual.clone(), tracker.ledger.delta.clone())))
    monkeypatch.setattr(tracker_module, "PRECISION_WARNING", 0.0)  # every step "too large": the warning's path
    with pytest.warns(RuntimeWarning, match=r"step 1: its residual at the probes is .* times its change") as caught:
        for k in range(3):
            losses = _losses(model, x[k * B:(k + 1) * B], y[k * B:(k + 1) * B], torch.bfloat16)
            tracker.observe(losses, torch.arange(B) % G)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert sum("residual at the probes" in str(w.message) for w in caught) == 1  # once per tracker
    previous = torch.zeros_like(seen[0][1])
    for entry, (residual, delta) in zip(tracker.gradient_scales, seen):
        expected = float(residual.norm()) / float((delta - previous).norm())
        assert entry["relative_residual"] == pytest.approx(expected, rel=1e-9)
        assert 0 < entry["relative_residual"] < 1e-2
        previous = delta


def test_full_precision_reaches_an_accelerate_prepared_model_inside_a_wrapper(fresh_accelerate):
    """The analyzers' kernels run a read-out wrapper around the model (diffusion.kernels): accelerate's
    autocast-wrapped forward on the inner model was left in place, so a bf16 run's kernel structure failed
    at binding ("expected scalar type Float but found BFloat16"; the example train_unconditional.py with
    --mixed_precision bf16). Every module's original forward runs inside, the wrapped one is put back after."""
    accelerate = pytest.importorskip("accelerate")
    from genkernel.core.adapter import full_precision

    inner = accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(_model())
    outer = nn.Sequential(inner)
    wrapped = inner.__dict__["forward"]
    _, _, probes = _data()
    with torch.no_grad():
        assert outer(probes).dtype == torch.float32 and not torch.equal(outer(probes), inner._original_forward(probes))
        with full_precision(outer):
            inside = outer(probes)
        assert torch.equal(inside, inner._original_forward(probes))
    assert inner.__dict__["forward"] is wrapped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_refused_at_construction(dtype):
    """A model cast to bfloat16/float16 (no float32 master weights: Lightning's "bf16-true") rounds each update
    into its weights, which no split can follow: refused when the tracker is built, with autocast and
    mixed_precision='observe' named. Before, mixed_precision='observe' let it in and the first step failed on
    something else: bfloat16's Adam state check ("was the optimizer's state loaded, reset or edited") and
    float16's non-finite loss."""
    model = _model().to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _, _, probes = _data()
    with pytest.raises(RuntimeError, match=r"parameters are (bfloat16|float16).*torch.autocast.*mixed_precision='observe'"):
        PathKernelTracker(model, optimizer, lambda out, t: ((out - t) ** 2).mean(dim=1), probes.to(dtype),
                          num_groups=G, mixed_precision="observe")


def test_a_float64_model_inside_an_autocast_block_is_checked_at_its_own_precision():
    """Autocast leaves float64 operations alone: a float64 model's losses observed inside an autocast block have
    no half precision in their graph, so the step is checked (and labelled) at float64. Before, the tracker took
    autocast's dtype: the step was labelled bfloat16 and checked at bfloat16's eps."""
    model = _model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y, probes = (t.double() for t in _data())
    tracker = PathKernelTracker(model, optimizer, lambda out, t: ((out - t) ** 2).mean(dim=1), probes, num_groups=G,
                                mixed_precision="observe")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = ((model(x[:B]) - y[:B]) ** 2).mean(dim=1)
        tracker.observe(losses, torch.arange(B) % G)
    optimizer.zero_grad()
    losses.mean().backward()
    optimizer.step()
    assert tracker.ledger.steps == 1
    assert tracker.gradient_scales[0]["gradient_precision"] is None
