"""The float32 gradient check (PathKernelTracker._check_gradients): long reductions and what the check
must keep refusing.

A float32 conv net's step was refused though correct: the loop's own backward (oneDNN's
convolution_backward on CPU) sums a conv bias's gradient over batch × 64 × 64 positions in an order
whose rounding reached ~600 u of the magnitudes summed (u = 2^-24), while the check allowed 1e-5
(≈ 168 u) of |real| + Σ_r |row| plus a 16-eps floor, whatever the number of terms; the group rows
(summed in other orders) rounded far less. In float64 the rows add up to the real gradient to 1e-16
(``test_diagnosis``). The check now also allows 4 times the rounding the step's own backward shows
(tracking.rounding: the batch's gradient at two seed scales, divided back): the long-reduction tests
below were refused before on this machine (on another CPU the old check may have passed them), and a
gradient 1e-3 off (at 64 examples: the allowance grows with the reduction), or a dropped row, is still refused.
"""

import copy

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.core.engine.gradients import gradients_and_rounding, gradients_from_losses, rounding_of
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")

U32 = 2.0 ** -24  # float32 unit roundoff


def _conv_net(channels):
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.Tanh(), nn.Conv2d(channels, channels, 3, padding=1),
                         nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4))


def _brief_setup(rows=16, batch=32):
    """The reported set-up: one Adam step taken, then the tracker on the second batch."""
    torch.manual_seed(0)
    model = _conv_net(16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3 * batch, 3, 64, 64, generator=g), torch.randn(3 * batch, 4, generator=g)
    ids = torch.randint(0, rows, (3 * batch,), generator=g)
    optimizer.zero_grad()
    mse_loss(model(x[:batch]), y[:batch]).mean().backward()
    optimizer.step()
    probes = torch.randn(4, 3, 64, 64, generator=g)
    return model, optimizer, probes, x[batch:2 * batch], y[batch:2 * batch], ids[batch:2 * batch]


def _rows_and_real(model, x, y, ids, rows, dtype):
    """The group rows (one batched backward, as the graph route takes them), the loop's gradient
    ∇ mean ℓ_n (its own backward) and the conv2 output's cotangent, all in ``dtype``."""
    m = copy.deepcopy(model).to(dtype)
    params = dict(m.named_parameters())
    batch = x.shape[0]
    membership = torch.zeros(rows, batch, dtype=torch.float64)
    membership[ids, torch.arange(batch)] = 1.0 / batch
    z = m[2](m[1](m[0](x.to(dtype))))
    losses = mse_loss(m[6](m[5](m[4](m[3](z)))), y.to(dtype))
    group_rows = gradients_from_losses(losses, params, membership, dtype=torch.float64)
    real = torch.autograd.grad(losses.mean(), [params["2.bias"], z])
    return group_rows["2.bias"], real[0].to(torch.float64), real[1].to(torch.float64)


@pytest.mark.slow  # (5 s: two 16-channel conv passes at 64x64 in float64; the tests below keep the fix)
def test_diagnosis():
    """coverage: passes before. The refused gap is float32 rounding of the loop's own bias
    reduction, not an error: in float64 the rows add up to the loop's gradient to 1e-12 of the
    magnitudes summed T = Σ_{n,h,w} |∂L/∂z_{n,c,h,w}|; in float32 the loop's gradient differs from
    the float64 one within the deterministic bound of a sum of N terms, (N − 1) u T, and by more
    than the check's tolerance allows on some CPUs (not asserted)."""
    model, _, _, x, y, ids = _brief_setup()
    rows64, real64, dz64 = _rows_and_real(model, x, y, ids, 16, torch.float64)
    rows32, real32, _ = _rows_and_real(model, x, y, ids, 16, torch.float32)
    terms = dz64.abs().sum(dim=(0, 2, 3))  # Σ|terms| of the bias reduction, per channel
    n = x.shape[0] * 64 * 64
    assert float(((rows64.sum(0) - real64).abs() / terms).max()) < 1e-12
    assert bool(((real32 - real64).abs() <= (n - 1) * U32 * terms).all())
    assert bool(((rows32.sum(0) - real64).abs() <= (n - 1) * U32 * terms).all())
    # (the gap itself, ‖real32 − Σ rows32‖, depends on the CPU's oneDNN kernels: 6.3e-6 against the check's
    # relative part of 3.6e-6 on the machine this was found on; not asserted, so the test holds on any CPU)


def _small(fault):
    torch.manual_seed(0)
    model = _conv_net(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 4, generator=g)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(2, 3, 16, 16, generator=g), num_groups=4,
                                group_state="dense", gradient_route="graph", batch_size=8, memory_check="warn")
    if fault == "scaled":  # the optimizer's gradient of one parameter 1e-3 off Σ_n c_n ∇ℓ_n
        model[2].bias.register_post_accumulate_grad_hook(lambda p: (p.grad.mul_(1 + 1e-3), None)[1])
    if fault == "dropped":  # the analysis loses group 1's row (a float32 model's rows come with its rounding sample)
        with_rounding = tracker.route.graph_gradients_and_rounding

        def dropped(*args, **kwargs):
            out, difference = with_rounding(*args, **kwargs)
            for rows in out.values():
                rows[1].zero_()
            return out, difference

        tracker.route.graph_gradients_and_rounding = dropped
    return tracker, x, y, torch.arange(8) % 4


def test_correct_small_step_passes():
    """coverage: passes before. The control for the two refusals below: the same small float32
    conv net without a fault passes the check."""
    tracker, x, y, ids = _small(None)
    tracker.step(x, y, ids)
    assert tracker.ledger.steps == 1


@pytest.mark.parametrize("fault, name", [("scaled", "2.bias"), ("dropped", "")])
def test_wrong_gradient_refused(fault, name):
    """coverage: passes before. A genuinely wrong float32 gradient is refused: one parameter's
    gradient scaled by 1 + 1e-3 after the backward, or a group row dropped from the analysis."""
    tracker, x, y, ids = _small(fault)
    with pytest.raises(LedgerCheckError, match=f"group gradients of '{name}"):
        tracker.step(x, y, ids)
    assert tracker.ledger.steps == 0


# -- the rounding allowance (tracking.rounding) ------------------------------------------------------------------


def _long_reduction(seed=1):
    """A 4-channel conv net on 64 examples of 64x64 (SGD): its second conv's bias gradient is a sum over
    64·64·64 = 262144 positions, which oneDNN's float32 convolution backward rounded past the plain tolerance
    for 5 seeds in 6 (seeds 1-5: the step refused with gaps of 0.5-1.3e-5 at scales 0.3-0.5). Returns the model,
    its optimizer, probes and the batch (x, y, group ids)."""
    torch.manual_seed(seed)
    model = _conv_net(4)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(64, 3, 64, 64, generator=g), torch.randn(64, 4, generator=g)
    ids = torch.randint(0, 8, (64,), generator=g)
    return model, torch.optim.SGD(model.parameters(), lr=1e-2), torch.randn(2, 3, 64, 64, generator=g), x, y, ids


def _tracker(model, optimizer, probes, route):
    return PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=8, batch_size=64, memory_check="warn",
                             group_state="dense", gradient_route=route)


@pytest.mark.parametrize("route", ["graph", "example"])
def test_correct_long_reduction_passes(route):
    """A correct float32 step whose conv bias reduction rounds past the plain tolerance passes (refused before on
    this machine's CPU: the check allowed no more rounding for 262144 terms than for 10), and its ledger adds up
    (the gap is the step's rounding row)."""
    model, optimizer, probes, x, y, ids = _long_reduction()
    tracker = _tracker(model, optimizer, probes, route)
    tracker.step(x, y, ids)
    assert tracker.ledger.steps == 1
    assert tracker.ledger.relative_residual() < 1e-4


def test_observed_long_reduction_passes():
    """The same step in a loop the tracker observes: rows and rounding sample from the loop's own graph."""
    model, optimizer, probes, x, y, ids = _long_reduction()
    tracker = _tracker(model, optimizer, probes, "graph")
    optimizer.zero_grad()
    losses = mse_loss(model(x), y)
    tracker.observe(losses, ids)
    losses.mean().backward()
    optimizer.step()
    assert tracker.ledger.steps == 1
    assert tracker.ledger.relative_residual() < 1e-4


@pytest.mark.parametrize("route", ["graph", "example"])
def test_wrong_long_reduction_refused(route):
    """Refused before too (only the message is new): the allowance is the rounding the step's own backward shows,
    not a looser tolerance. The long reduction's parameter 1e-3 off is still refused, the message giving the
    rounding it was allowed (on the example route the sample is taken by a forward again, only then), and nothing
    changes."""
    model, optimizer, probes, x, y, ids = _long_reduction()
    tracker = _tracker(model, optimizer, probes, route)
    model[2].bias.register_post_accumulate_grad_hook(lambda p: (p.grad.mul_(1 + 1e-3), None)[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LedgerCheckError, match="group gradients of '2.bias'.*its own backward's rounding"):
        tracker.step(x, y, ids)
    assert tracker.ledger.steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rounding_sample_is_zero_where_the_sums_are_exact():
    """d = ∇Σ ¾c_n ℓ_n / ¾ − ∇Σ ⅝c_n ℓ_n / ⅝ is a difference of roundings: exactly zero for a linear model on small
    integers (every product and sum exact in float32), not zero on the long conv reduction; the rows beside it are
    gradients_from_losses' rows."""
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
        model.bias.fill_(1.0)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0], [0.0, 1.0, 1.0], [2.0, 2.0, -1.0]])
    losses = 0.5 * (model(x).squeeze(1) - torch.tensor([1.0, 0.0, 2.0, -1.0])) ** 2
    params = dict(model.named_parameters())
    membership = torch.tensor([[0.25, 0.0, 0.25, 0.0], [0.0, 0.25, 0.0, 0.25]], dtype=torch.float64)
    rows, d = gradients_and_rounding(losses, params, membership, torch.full((4,), 0.25, dtype=torch.float64))
    assert all(float(v.abs().max()) == 0.0 for v in d.values())
    plain = gradients_from_losses(losses, params, membership)
    assert all(torch.equal(rows[n], plain[n]) and rows[n].is_contiguous() for n in params)
    model, _, _, x, y, _ = _long_reduction()
    d = rounding_of(mse_loss(model(x), y), dict(model.named_parameters()), torch.full((64,), 1 / 64, dtype=torch.float64))
    assert float(d["2.bias"].norm()) > 0.0


def test_replay_only_for_a_step_past_the_plain_tolerance(monkeypatch):
    """An owned step whose rows come from another pass (the example route) replays its forward for the rounding
    sample only when a parameter fails the plain tolerance: a step within it never runs the replay."""
    calls = []
    monkeypatch.setattr(PathKernelTracker, "_replayed_rounding", lambda self, *a: calls.append(1) or {})
    torch.manual_seed(0)
    model = _conv_net(8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 4, generator=g)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-2), mse_loss,
                                torch.randn(2, 3, 16, 16, generator=g), num_groups=4, group_state="dense",
                                gradient_route="example", batch_size=8, memory_check="warn")
    tracker.step(x, y, torch.arange(8) % 4)
    assert tracker.ledger.steps == 1 and calls == []


def test_no_rounding_sample_for_float64(monkeypatch):
    """float64's tolerance (1e-10, 900 000 unit roundoffs) needs no sample: its graph rows are taken without the
    two seeded rows."""
    monkeypatch.setattr("genkernel.core.tracking.routes.gradients_and_rounding",
                        lambda *a, **k: pytest.fail("a float64 step took a rounding sample"))
    torch.manual_seed(0)
    model = _conv_net(4).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=1e-2), mse_loss,
                                torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), num_groups=4,
                                group_state="dense", gradient_route="graph", batch_size=8)
    tracker.step(x, y, torch.arange(8) % 4)
    assert tracker.ledger.steps == 1
