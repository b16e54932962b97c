"""The optimizer splits under the optimizer set-ups researchers use (docs/optimizers.md): what the
tracker cannot split exactly is refused with an error that says what happened and what to do."""

import pytest
import torch
from torch import nn

from genkernel import LedgerCheckError, PathKernelTracker
from genkernel.supervised import mse_loss

F64 = torch.float64


class BranchFirst(nn.Module):
    """A branch the batch may switch off (``use_branch``), registered before the trunk."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.branch = nn.Linear(3, 2).to(F64)
        self.trunk = nn.Linear(3, 2).to(F64)
        self.use_branch = True

    def forward(self, x):
        out = self.trunk(x)
        return out + self.branch(x) if self.use_branch else out


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9),
], ids=["adam", "sgd_momentum", "rmsprop_momentum"])
def test_a_cleared_optimizer_state_with_a_skipped_parameter_is_refused_clearly(make_optimizer):
    # optimizer.state.clear() between tracked steps (a reset at a warm restart), then a batch that does
    # not use the branch: PyTorch skips the branch's parameters, whose state stays empty, while the
    # tracker's groups still hold theirs. A clear refusal, not a KeyError from inside the check.
    model = BranchFirst()
    optimizer = make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(1)
    probes = torch.randn(4, 3, generator=g, dtype=F64)
    tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=2)
    tracker.step(torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64), torch.arange(6) % 2)
    optimizer.state.clear()
    model.use_branch = False
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(LedgerCheckError, match=r"'branch\.weight'.*optimizer has none.*build a new tracker"):
        tracker.step(torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64),
                     torch.arange(6) % 2)
    # The refused step is rolled back: the ledger keeps one step and the model its parameters.
    assert tracker.ledger.steps == 1
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])


def test_complex_parameters_are_refused_with_the_real_view_that_works():
    # Fourier-style layers hold complex weights; old: "the model cannot be differentiated ... replace
    # the layer the message names", naming none.
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, dtype=torch.complex128))

        def forward(self, x):
            return (torch.fft.fft(x.to(torch.complex128)) * self.weight).real

    model = Spectral()
    probes = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\['weight'\] are complex.*view_as_complex"):
        PathKernelTracker(model, torch.optim.Adam(model.parameters(), lr=1e-2), mse_loss, probes, num_groups=2)


def ledgers_under(make_optimizer, device="cpu", steps=4):
    """The contributions ``[P, G, K]`` and deltas of a 3-16-2 tanh MLP tracked (Adam-type step, groups
    {0, 1}) under ``make_optimizer``, asserting the ledger identity on the way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(device=device, dtype=F64)
    g = torch.Generator().manual_seed(1)
    tracker = PathKernelTracker(model, make_optimizer(model.parameters()), mse_loss,
                                torch.randn(4, 3, generator=g, dtype=F64).to(device), num_groups=2)
    for _ in range(steps):
        x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
        tracker.step(x.to(device), y.to(device), (torch.arange(6) % 2).to(device))
    ledger = tracker.ledger
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta,
                               rtol=0, atol=1e-12)
    return ledger.contributions.cpu(), ledger.delta.cpu()


IMPLEMENTATIONS = {  # PyTorch's three code paths for one update rule: one Python loop, foreach, one fused kernel
    "adam": lambda p, **kw: torch.optim.Adam(p, lr=0.01, **kw),
    "adamw_amsgrad": lambda p, **kw: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True, **kw),
    "sgd_nesterov": lambda p, **kw: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, **kw),
}


@pytest.mark.parametrize("rule", sorted(IMPLEMENTATIONS))
def test_fused_and_foreach_optimizers_are_split_as_the_single_tensor_loop_is(rule):
    # Coverage: fused=True (one kernel per step, which the tracker cannot see inside) and foreach=True
    # must be read as the plain loop: the same contributions, up to the kernels' rounding
    make = IMPLEMENTATIONS[rule]
    reference, delta = ledgers_under(lambda p: make(p, foreach=False))
    for implementation in ({"foreach": True}, {"fused": True}):
        contributions, other_delta = ledgers_under(lambda p: make(p, **implementation))
        torch.testing.assert_close(other_delta, delta, rtol=1e-10, atol=0)
        torch.testing.assert_close(contributions, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
