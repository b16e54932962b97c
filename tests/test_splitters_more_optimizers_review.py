"""Second read of the Adagrad, Adamax, RAdam and NAdam splits (splitters.py): cases the first tests left out.

NAdam's single-tensor step with decoupled weight decay writes the parameter three times (param.mul_(1 − η λ), then
two addcdiv_ calls), each write rounded to the parameter's dtype. The step's check allows one rounding of θ_{k+1}
(ε|θ_{k+1}|) beyond rtol of the magnitudes; three half-ulp roundings reach 1.5 ulp, so a float32 run with a small
learning rate (1e-4, decay 0.01) had exact steps refused with a LedgerCheckError in its first steps. The rest now
books the decay as the optimizer applied it, θ_k − fl(θ_k (1 − η λ))."""

import torch

from genkernel import PathKernelTracker
from genkernel.supervised import mlp, mse_loss

F32 = torch.float32


def test_nadam_decoupled_decay_in_float32_is_not_refused_and_the_rest_books_the_decay_applied():
    """float32 MLP (4-32-32-2), NAdam(lr=1e-4, weight_decay=0.01, decoupled_weight_decay=True), 3 tracked steps:
    every step is recorded (before: LedgerCheckError at the first step, 'does not add up to the optimizer's real
    step'), the parameters end bit-identical to the same loop without the tracker, and the rest row (no coupled
    decay, no state from before tracking: its direction is zero) is exactly −(θ_k − fl(θ_k · fl(1 − η λ))), the
    multiplication PyTorch performs, bit for bit."""
    options = dict(lr=1e-4, weight_decay=0.01, decoupled_weight_decay=True)
    torch.manual_seed(1)
    model = mlp(4, [32, 32], 2).to(F32)
    twin = mlp(4, [32, 32], 2).to(F32)
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = torch.optim.NAdam(model.parameters(), **options), torch.optim.NAdam(twin.parameters(), **options)
    gen = torch.Generator().manual_seed(2)
    probes = torch.randn(3, 4, generator=gen, dtype=F32)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=2)
    rests = []
    tracker.listeners.append(lambda result: rests.append({n: u[2].clone() for n, u in result.group_updates.items()}))
    befores = []
    for _ in range(3):
        x, y = torch.randn(8, 4, generator=gen, dtype=F32), torch.randn(8, 2, generator=gen, dtype=F32)
        befores.append({n: p.detach().clone() for n, p in model.named_parameters()})
        tracker.step(x, y, torch.arange(8) % 2)
        twin_opt.zero_grad()
        mse_loss(twin(x), y).mean().backward()
        twin_opt.step()
    assert tracker.ledger.steps == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    factor = 1 - options["lr"] * options["weight_decay"]
    for before, rest in zip(befores, rests):
        for name, theta in before.items():
            applied = theta.to(torch.float64) - (theta * factor).to(torch.float64)
            assert torch.equal(rest[name], -applied), name
