"""Review of splitters.py against torch.optim itself: the splitter's rows for a tiny float64 model
compared with a brute force from each optimizer's published update rule, computed here from
per-example gradients by a plain autograd loop (no genkernel code in the reference)."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.grouping import Partitions
from genkernel.core.tracking.splitters import make_splitter
from genkernel.supervised import mse_loss

G, N = 3, 6


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _f(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _drive(model, opt, steps, reference, before_capture=None):
    """Real steps of ``opt`` split by the splitter; yields (name, rows, Δ, reference rows) per step.

    ``reference(name, rows, theta, group)`` gets the step's ``[G + 2, *shape]`` gradients (groups,
    a zero rest row, the rounding gap), θ_k and the parameter group, and returns the brute-force updates."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    splitter = make_splitter(opt, params, Partitions(G))
    gen = torch.Generator().manual_seed(1)
    for k in range(steps):
        x = torch.randn(N, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(N, 2, generator=gen, dtype=torch.float64)
        grads = {n: torch.zeros(G, *p.shape, dtype=torch.float64) for n, p in params.items()}
        for i in range(N):
            loss = ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).sum() / N
            for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                grads[n][i % G] += g
        opt.zero_grad(set_to_none=True)
        (((model(x) - y) ** 2).sum() / N).backward()
        if before_capture is not None:
            before_capture(k, splitter)
        rounding = {"groups": {n: p.grad - grads[n].sum(0) for n, p in params.items()}}
        theta = {n: p.detach().clone() for n, p in params.items()}
        owner = {id(p): group for group in opt.param_groups for p in group["params"]}
        splitter.capture()
        opt.step()
        updates = splitter.split(grads, theta, rounding)
        splitter.check_state(1e-10)
        splitter.commit()
        for n, p in params.items():
            rows = torch.cat([grads[n], torch.zeros_like(grads[n][:1]), rounding["groups"][n][None]])
            yield n, updates[n], p.detach() - theta[n], reference(n, rows, theta[n], owner[id(p)])


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class _AdamW:
    """torch.optim.AdamW's rule per row, its second moment from the total gradient."""

    def __init__(self):
        self.state = {}

    def __call__(self, name, rows, theta, group):
        st = self.state.setdefault(name, {"k": 0})
        lr, eps = _f(group["lr"]), group["eps"]
        b1, b2 = (_f(b) for b in group["betas"])
        total = rows.sum(0)
        st["k"] += 1
        st["m"] = (1 - b1) * rows if "m" not in st else b1 * st["m"] + (1 - b1) * rows
        st["v"] = (1 - b2) * total ** 2 if "v" not in st else b2 * st["v"] + (1 - b2) * total ** 2
        k = st["k"]
        out = -lr / (1 - b1 ** k) * st["m"] / ((st["v"] / (1 - b2 ** k)).sqrt() + eps)
        # param.mul_(1 - lr * weight_decay), with the factor as PyTorch forms it (a tensor's dtype)
        factor = _f(1 - group["lr"] * group["weight_decay"])
        out[G] -= (1 - factor) * theta
        return out


def test_a_frozen_parameter_with_a_leftover_gradient_is_refused_before_it_moves_and_the_split_stays_exact():
    """A layer frozen after training, its .grad left as zeros (a zero_grad(set_to_none=False) loop): PyTorch's
    AdamW still steps it (decay, Adam's moments). Before: the tracker recorded the steps, the frozen weight
    moved 0.04 per step and its effect went unflagged into the residual (0.10 of a 0.34 change). Now the step
    is refused before anything moves, and once the gradient is cleared the split matches the brute force."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        (((model(x) - y) ** 2).sum() / N).backward()
        opt.step()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    loss_fn = lambda out, target: ((out - target) ** 2).mean(dim=1)  # noqa: E731
    tracker = PathKernelTracker(model, opt, loss_fn, torch.randn(2, 3, dtype=torch.float64), num_groups=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=False)
    losses = loss_fn(model(x), y)
    tracker.observe(losses, torch.arange(N) % 2)
    losses.mean().backward()
    with pytest.raises(ValueError, match=r"frozen parameter.*still have a \.grad.*p\.grad = None"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "nothing may move"
    assert tracker.ledger.steps == 0

    # The splitter after a refused capture: clear the gradient, and the next steps split exactly.
    model, reference = _model(), _AdamW()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model[0].bias.requires_grad_(False)

    def stale_gradient_once(k, splitter):
        if k == 0:
            model[0].bias.grad = torch.zeros_like(model[0].bias)
            with pytest.raises(ValueError, match="frozen parameter"):
                splitter.capture()
            model[0].bias.grad = None

    worst_row = worst_sum = 0.0
    for name, rows, delta, ref in _drive(model, opt, 3, reference, stale_gradient_once):
        worst_row = max(worst_row, max(_relative(rows[g], ref[g]) for g in range(G + 1)))
        worst_sum = max(worst_sum, _relative(rows.sum(0), delta))
    assert worst_row < 1e-12 and worst_sum < 1e-13, (worst_row, worst_sum)


def test_sgd_dampening_held_as_a_float32_tensor_is_split_with_torchs_rounding_of_one_minus_dampening():
    """SGD(momentum=0.9, dampening=tensor(0.1)): PyTorch's buf.mul_(μ).add_(g, alpha=1 − τ) forms 1 − τ as a
    float32 tensor. Before: the splitter used 1 − τ in float64 and every step after the first failed its own
    state check (momentum buffers' relative gap 5.3e-9 > 1e-10, blamed on a loaded state)."""
    model = _model()
    tau = torch.tensor(0.1)  # 1 - fl32(0.1) is not a float32: rounded
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=tau, weight_decay=0.05)
    buffers = {}

    def reference(name, rows, theta, group):
        rows = rows.clone()
        rows[G] = _f(group["weight_decay"]) * theta
        undamped = _f(1 - group["dampening"])  # PyTorch's alpha=1 - dampening, in the tensor's dtype
        b = buffers.get(name)
        buffers[name] = rows.clone() if b is None else 0.9 * b + undamped * rows
        return -0.1 * buffers[name]

    worst_row = worst_sum = 0.0
    for name, rows, delta, ref in _drive(model, opt, 3, reference):
        worst_row = max(worst_row, max(_relative(rows[g], ref[g]) for g in range(G + 1)))
        worst_sum = max(worst_sum, _relative(rows.sum(0), delta))
    assert worst_row < 1e-12 and worst_sum < 1e-13, (worst_row, worst_sum)


def test_adamw_weight_decay_held_as_a_float32_tensor_books_the_decay_torch_applies():
    """AdamW(weight_decay=tensor(0.1)): PyTorch's param.mul_(1 − lr·λ) forms the factor as a float32 tensor.
    Before: the rest row booked 1 − lr·λ in float64 and the rows missed Δ by 1.6e-6 relative."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=torch.tensor(0.1))
    worst_row = worst_sum = 0.0
    for name, rows, delta, ref in _drive(model, opt, 3, _AdamW()):
        worst_row = max(worst_row, max(_relative(rows[g], ref[g]) for g in range(G + 1)))
        worst_sum = max(worst_sum, _relative(rows.sum(0), delta))
    assert worst_row < 1e-12 and worst_sum < 1e-13, (worst_row, worst_sum)


def test_the_sketched_route_follows_torchs_rounding_of_a_tensor_dampening():
    """The sketched route formed 1 − τ in float64 for SGD's momentum with dampening=tensor(0.1) (float32:
    PyTorch's 1 − τ is rounded there), so its step after the first was refused by its own state check
    (blamed on a loaded state); now it books the steps, and their contributions add up."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=torch.tensor(0.1))
    probes = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=3, group_state="sketched", sketch_dim=64)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
        tracker.step(x, y, torch.arange(6) % 3)
    ledger = tracker.ledger
    assert ledger.steps == 3
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual + ledger.sketch_error
    torch.testing.assert_close(total, ledger.f_end - ledger.f_start, rtol=0, atol=1e-12)
