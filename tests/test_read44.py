"""Second read of this session's commits (read44): the parameters' gradient hooks held out of the tracker's witness
passes (tracker._parameter_hooks_held) must leave the loop's hook table as the loop left it, a hook the loop removed
during such a pass included.

The draws are those of tests/test_witness44.py: MLPDenoiser(2, hidden=8, depth=2), bfloat16 autocast, SEED 4, one
micro-batch of 6 seeded / 3 (no power of two times the observed c_n: the tracker takes the witness of the loop's own
seed, one more backward through the model inside the loop's backward).

Also the far-scale checks the session moved to reference.norm_of without a test noticing their reversal (fault
injection): the coupled-loss check and the sine between two gradients, at float64 scales past 1e154."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import genkernel.core.engine.per_example as per_example
import genkernel.core.tracking.tracker as tracker_module
from genkernel import PathKernelTracker
from genkernel.core.push_memory import LiveBytes
from test_witness44 import _batch, _run, _setup

pytestmark = pytest.mark.usefixtures("one_thread")


def _hook_calls_in_the_loops_backward(tracked):
    """One micro-batch of 6, its loss losses.mean() / 3. A counting hook on 'layers.1.bias'; a hook on the model's
    output, registered after observe(), removes the counting hook's handle the first time it runs (as a loop that
    turns a probe off from inside its backward would). Returns the counting hook's calls during the loop's backward,
    whether its key is still in the parameter's hook table after it, and the parameters' gradients."""
    net, _, tracker = _setup(tracked)
    calls = []
    bias = net.layers[1].bias
    handle = bias.register_hook(lambda g: calls.append(1))
    x, noise, t = _batch(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
        losses = ((out - noise) ** 2).mean(dim=1)
    if tracker is not None:
        tracker.observe(losses, torch.arange(6) % 3)
    removed = []

    def remove_once(grad):
        if not removed:
            removed.append(1)
            handle.remove()

    out.register_hook(remove_once)
    before = len(calls)
    (losses.mean() / 3).backward()
    return len(calls) - before, handle.id in (bias._backward_hooks or {}), [p.grad.clone() for p in net.parameters()]


def test_a_parameter_hook_removed_during_the_witness_pass_stays_removed_as_without_the_tracker():
    """Without the tracker the output's hook removes the counting hook before the backward reaches the bias: it runs
    0 times and is gone from the table. With the tracker the output's hook first runs in the witness pass of the
    loop's seed (inside the loop's backward, the parameters' hooks held): the removal must hold there too, 0 calls
    and no key left, the gradients bit for bit the untracked loop's. Old code emptied the table for the pass and
    refilled it from its copy, bringing the removed hook back: it ran once in the loop's backward and stayed
    registered for every later backward."""
    plain_calls, plain_kept, plain_grads = _hook_calls_in_the_loops_backward(False)
    calls, kept, grads = _hook_calls_in_the_loops_backward(True)
    assert (plain_calls, plain_kept) == (0, False)
    assert (calls, kept) == (0, False)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


class _Tracker:
    """What PathKernelTracker._check_separate_losses reads of the tracker: its group state (for the message)."""
    group_state = "factored"


def _losses_of(scale, coupled):
    """Per-example losses of 6 float64 outputs [6, 1], times ``scale``: each its own output squared, or (``coupled``)
    its output minus the batch's mean, squared (every loss reads every output). Returns (losses, outputs)."""
    outputs = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64).reshape(6, 1).requires_grad_()
    centred = outputs - outputs.mean() if coupled else outputs
    return (centred.reshape(-1) ** 2) * scale, outputs


@pytest.mark.parametrize("scale", [1.0, 1e80, 1e-80])
def test_the_coupled_loss_check_refuses_a_loss_that_reads_the_batch_mean_at_every_scale(scale):
    """tracker._check_separate_losses compares (a²ᵀJ)⊙(1ᵀJ) with (aᵀJ)², products of two loss gradients: at a loss
    scale of 1e80 they are about 1e160 and their squares overflow. A loss centred on the batch's mean output couples
    the examples and must be refused at every scale, a separable loss (each its own output squared) accepted.
    Coverage: HEAD passes (commit be827db moved these norms to reference.norm_of; no test pinned this check); fails on
    the session's base 52fdb01 at 1e80: the gap's and the threshold's norms were both inf, and inf > 1e3 eps · inf is
    False, so the coupled loss passed the check (the per-example routes would then credit each example other
    examples' gradients)."""
    separable, outputs = _losses_of(scale, coupled=False)
    PathKernelTracker._check_separate_losses(_Tracker(), separable, outputs)
    coupled, outputs = _losses_of(scale, coupled=True)
    with pytest.raises(ValueError, match="couples the examples of a batch"):
        PathKernelTracker._check_separate_losses(_Tracker(), coupled, outputs)


@pytest.mark.parametrize("exponent", [0, 160, -160])
def test_the_sine_squared_of_two_gradients_is_that_of_their_directions_at_far_scales(exponent):
    """tracker._sine_squared (the parallel-micro-batch and left-out-micro-batch checks) at float64's far scales
    against a brute force on the unit vectors formed in Python floats: a vector and 3 times it give 0 (parallel), two
    orthogonal ones 1, and a pair 30 degrees apart sin²(30°) = 1/4. Coverage: HEAD passes (be827db; no test pinned
    this helper, and reverting it went unnoticed); fails on the session's base 52fdb01 at 1e160 (‖a‖·‖b‖ = 1e320
    overflowed: every pair read 1.0, 'not parallel', so parallel micro-batches were not told apart) and at 1e-160
    (the norms' squares underflowed to 0: 1.0 again)."""
    scale = 10.0 ** exponent
    base = torch.tensor([3.0, -4.0, 12.0, 0.5], dtype=torch.float64)
    other = torch.tensor([4.0, 3.0, 0.0, 0.0], dtype=torch.float64)  # (orthogonal to base)
    angled = (base / base.norm()) * math.cos(math.pi / 6) + (other / other.norm()) * math.sin(math.pi / 6)

    def brute(a, b):  # sin² from the unit vectors in Python floats (each divided by its largest entry first)
        ua, ub = [[v / max(map(abs, t)) for v in t] for t in (a.tolist(), b.tolist())]
        na, nb = math.sqrt(sum(v * v for v in ua)), math.sqrt(sum(v * v for v in ub))
        cos = sum(x * y for x, y in zip(ua, ub)) / (na * nb)
        return 1.0 - cos * cos

    for a, b, expected in ((base, 3 * base, 0.0), (base, other, 1.0), (base, angled, 0.25)):
        got = tracker_module._sine_squared(a * scale, b * scale)
        assert got == pytest.approx(expected, abs=1e-12)
        assert got == pytest.approx(brute(a * scale, b * scale), abs=1e-12)


def test_a_torch_without_the_private_current_node_read_loses_the_witness_of_freed_losses_and_says_why(monkeypatch):
    """tracker._losses_edge reads torch._C._current_autograd_node (private; torch 2.14 has it). Without it (a torch
    that drops it), a loop that frees its losses before the backward (Lightning's pattern, micro-batches of 6, 4 and
    2 seeded / 3) must still train bit for bit as without the tracker, the step checked without the witness (this
    draw passes the per-parameter check at bfloat16's eps) and its gradient_scales entry naming each micro-batch's
    lost witness with the reason. Coverage: HEAD passes (test_witness44 replaces _losses_edge itself, not the read
    it makes); the getattr fallback turned into a plain attribute read would fail it only if the AttributeError
    escaped the witness pass's handler."""
    plain, _ = _run([6, 4, 2], [1 / 3] * 3, tracked=False)
    monkeypatch.delattr(torch._C, "_current_autograd_node")
    net, tracker = _run([6, 4, 2], [1 / 3] * 3)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), plain.parameters()))
    assert tracker.ledger.steps == 1
    lost = tracker.gradient_scales[0]["witness_lost"]
    assert [line.split(":")[0] for line in lost] == ["micro-batch 1", "micro-batch 2", "micro-batch 3"]
    assert all("graph node the backward runs is not theirs" in line for line in lost)


def _captured_batch():
    """The factored route's BatchFactors of one step of Linear(256, 256) → tanh → Linear(256, 1) on 64 examples (the
    route's own capture, read where it hands the batch to per_example.batch_totals). Returns (batch, the examples'
    inputs, the model)."""
    import genkernel.core.tracking.routes as routes

    seen = []
    real = routes.batch_totals
    try:
        routes.batch_totals = lambda batch: seen.append(batch) or real(batch)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.01),
                                    lambda out, y: (out.reshape(-1) - y) ** 2, torch.randn(4, 256), num_groups=3,
                                    group_state="factored")
        tracker.step(torch.randn(64, 256), torch.randn(64), torch.arange(64) % 3)
    finally:
        routes.batch_totals = real
    return seen[-1]


def test_the_factored_routes_gradient_sizes_take_no_copy_of_the_factors_in_range():
    """per_example.batch_totals' sizes Σ_n ‖c_n ∇_block ℓ_n‖ (the step check's scale) for each Linear block, against
    a brute force from the per-example gradients Σ_t g_t ⊗ a_t formed here, and the bytes their forming holds at
    once (LiveBytes; the factors themselves, 197 kB, made before): at most half the factors. Fails on HEAD: the
    sizes were formed on copies of the activations and output gradients divided by their largest magnitudes
    (c640886, for factors past 1.8e19 in float32), a second set of the factors every step, in range too: 213 kB
    against the direct form's 66 kB. Far-scale factors still take the scaled copies (test_edges44)."""
    batch = _captured_batch()
    held = [t for f in batch.factors for t in (f.a, f.g) if t is not None]
    factor_bytes = sum(t.numel() * t.element_size() for t in held)
    for f in batch.factors:
        assert f.kind == "outer" and f.g.shape[0] == 1
        rows = torch.einsum("bto,bti->boi", f.g[0].double(), f.a.double())  # (a's last column: the bias's ones)
        expected = float(rows.reshape(rows.shape[0], -1).norm(dim=1).sum())
        with LiveBytes(tuple(held)) as live:
            got = per_example._block_size(f)
        assert got == pytest.approx(expected, rel=1e-5)
        assert live.peak <= factor_bytes / 2, (live.peak, factor_bytes)


@pytest.mark.parametrize("scale", [1.0, 1e300, 1e-300])
def test_the_fallback_rows_sizes_take_no_copy_in_range_and_stay_exact_at_far_scales(scale):
    """batch_totals on a batch whose one parameter is outside the blocks (its float64 rows c_n ∇ℓ_n [64, 32, 32]):
    its size is the sum of the rows' norms (brute force in Python floats, each row divided by its largest entry
    first) at every scale, and in range it is formed without a copy of the rows (LiveBytes: at most a quarter of
    their 524 kB). Fails on HEAD at scale 1: scaled_alike copied the rows (and |rows| for their largest magnitude)
    every step, 1.12 MB at once; at 1e±300 the scaled copies are still taken (coverage of that path)."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(64, 32, 32, generator=generator, dtype=torch.float64) * scale
    batch = per_example.BatchFactors(factors=[], fallback={"w": rows}, losses=torch.zeros(64, dtype=torch.float64))
    with LiveBytes((rows,)) as live:
        totals, sizes = per_example.batch_totals(batch)
    expected = 0.0
    for row in rows.reshape(64, -1).tolist():
        peak = max(map(abs, row))
        expected += peak * math.sqrt(sum((v / peak) ** 2 for v in row))
    assert sizes["w"] == pytest.approx(expected, rel=1e-12)
    assert torch.equal(totals["w"], rows.sum(dim=0))
    if scale == 1.0:
        assert live.peak <= rows.numel() * rows.element_size() / 4, live.peak


def _relu_net():
    """A 3-layer ReLU MLP without biases (8 → 32 → 32 → 1): an input of zeros leaves every unit off, its gradient
    0 in every parameter."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(),
                         nn.Linear(32, 1, bias=False))


def test_a_normalized_factored_kernel_with_a_zero_gradient_example_is_not_formed_again_and_equals_torch_func():
    """gradient_kernel(normalize=True, engine="factored") on 12 examples, the 4th all zeros (its gradient is 0: its
    k(x, x) is 0 by right), against x2 of 5 examples whose 2nd is zeros too, and on x against itself: equal to the
    functional engine's kernel (NaN where it is NaN), with no RuntimeWarning and no torch.func Jacobian formed
    (per_example_jacobian counted). Fails on HEAD: the zero k(x, x) read as an underflow, the whole kernel was formed
    again through torch.func with a warning (on a 256-example MLP: 2.2 s against 0.4 s)."""
    import warnings

    import genkernel.core.engine.kernels as kernels
    from genkernel import gradient_kernel

    model = _relu_net()
    generator = torch.Generator().manual_seed(6)
    x, x2 = torch.randn(12, 8, generator=generator), torch.randn(5, 8, generator=generator)
    x[3], x2[1] = 0.0, 0.0
    for second in (None, x2):
        expected = gradient_kernel(model, x, second, normalize=True, engine="functional")
        formed = []
        real = kernels.per_example_jacobian
        kernels.per_example_jacobian = lambda *args, **kwargs: formed.append(1) or real(*args, **kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                got = gradient_kernel(model, x, second, normalize=True, engine="factored")
        finally:
            kernels.per_example_jacobian = real
        assert formed == []
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert bool(got[3].isnan().all() | (got[3] == 0).all())  # (the zero example's row: no cosine)


def test_a_normalized_factored_kernel_whose_small_example_underflowed_is_still_formed_again():
    """The check of zero examples reads each one alone: an example of magnitude 1e-30 (its k(x, x) about 1e-120,
    0 exactly in the factors' float32, though its gradient, about 1e-30, is not 0 there) is still formed again
    through torch.func with the warning, its k̂(x, x) 1 as every other example's. Coverage: HEAD formed every such
    kernel again; the test pins that the shortcut above takes only examples whose gradient is 0 (with the gradient
    read skipped it returned the factored kernel, its row NaN)."""
    from genkernel import gradient_kernel

    model = _relu_net()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(7)).abs()
    x[2] *= 1e-30
    with pytest.warns(RuntimeWarning, match="formed again with torch.func"):
        got = gradient_kernel(model, x, normalize=True, engine="factored")
    torch.testing.assert_close(got.diagonal(), torch.ones(6), rtol=1e-5, atol=0)
