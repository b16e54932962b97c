"""The float32 gradient check (PathKernelTracker._check_gradients) on the dense graph route of a
conv net: a known false refusal and what the check must keep refusing.

The false refusal (a float32 conv net, 32 examples of 64x64, 16 groups): the loop's own backward
(oneDNN's convolution_backward on CPU) sums the second conv's bias gradient over 32·64·64 = 131072
positions in an order whose rounding reaches ~600 u of the magnitudes summed (u = 2^-24), while the
check allows 1e-5 (≈ 168 u) of |real| + Σ_r |row| (magnitudes after the sum's cancellation) plus a
16-eps floor, with no dependence on the number of terms. The group rows (batched backward) round
far less. Nothing is wrong with the model or the loop: in float64 the rows add up to the real
gradient to 1e-16. ``test_diagnosis`` measures this against a float64 brute force. The refused step
itself is not a test here (whether it is refused depends on the CPU's kernels: 1 in 6 seeds at batch 32,
4 in 6 at batch 64 on the machine it was found on); the issue's note has the reproduction and the fix
it wants (a tolerance from the magnitudes and length of the reductions, or a float32 witness).
"""

import copy

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.core.engine.gradients import gradients_from_losses
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
    if fault == "dropped":  # the analysis loses group 1's row
        graph_gradients = tracker.route.graph_gradients

        def dropped(*args, **kwargs):
            out = graph_gradients(*args, **kwargs)
            for rows in out.values():
                rows[1].zero_()
            return out

        tracker.route.graph_gradients = dropped
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
