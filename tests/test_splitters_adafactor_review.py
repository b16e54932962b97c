"""Review of torch.optim.Adafactor under the loops people train with (splitters.AdafactorSplitter through
PathKernelTracker's observed steps): every ledger is compared with an independent reference written here, the
per-group gradients taken by masked autograd, Adafactor's published rule applied to them by hand
(test_splitters_adafactor._Adafactor: no genkernel code) and pushed through jacrev at the midpoint θ_k + Δ/2.

The first fault: the graph route hands a parameter's group rows over as autograd returns them, and for a weight
summed over in the forward (einsum("bj,pqkj->bk"): the gradient of a sum is an expanded view, one element for many
values) that is a view the tracker then adds into (gradient accumulation over observed micro-batches) or divides in
place (a float16 micro-batch's rows): a RuntimeError ("more than one element of the written-to tensor refers to a
single memory location") from inside optimizer.step(), for a float64 model or any model with
state_dtype=torch.float32 (a float32 model with float64 rows gets a copy from the dtype conversion). Fixed in
genkernel/core/engine/gradients.py (gradients_from_losses gives every row dense storage of its own).

A second, in the cost estimate: Adafactor's state was counted as one full copy of every parameter as soon as any
parameter group held a vector (and as nothing otherwise), in what training holds and in the tracker's per-step copy
of the optimizer's state; fixed in genkernel/core/cost.py (optimizer_state_values counts it exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker

from test_splitters_adafactor import _Adafactor, _Net
from test_splitters_more_optimizers import _jacobian

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
G, B = 2, 4


def _per_example_losses(outputs, targets):
    return ((outputs - targets) ** 2).mean(-1)


class _Routed(_Net):
    """_Net whose kernel is a plain product (its gradient a dense tensor) plus an expert only the inputs with
    x[:, 0] > 0.8 reach: a step whose batch has none of them leaves the expert without a gradient (skipped by
    Adafactor with set_to_none=True, stepped on a zero gradient with set_to_none=False) while the probes, which
    reach it, see the same function at every step."""

    def __init__(self, dtype=F64):
        super().__init__(dtype=dtype)
        gen = torch.Generator().manual_seed(7)
        self.expert = nn.Parameter(0.5 * torch.randn(2, 4, generator=gen, dtype=dtype))

    def forward(self, x):
        hidden = torch.tanh((x[:, None, None, None, :] * self.kernel).sum((1, 2, 4)) / 2 + self.bias)
        out = hidden @ self.head.T * self.scale
        routed = x[:, 0] > 0.8
        if bool(routed.any()):
            out = out.clone()
            out[routed] = out[routed] + 0.3 * torch.tanh(hidden[routed] @ self.expert.T)
        return out


def _route(x, reach_expert):
    x = x.clone()
    if reach_expert:
        x[0, 0] = 1.5
    else:
        x[:, 0] = -x[:, 0].abs()
    return x


def _masked_group_gradients(model, x, y, ids, weight):
    """{name: Tensor[G + 1, *shape]} float64: the gradient of weight · (Σ_{n in g} ℓ_n) / B for every group g by
    plain autograd over a masked loss, and a zero rest row (what _Adafactor takes)."""
    params = dict(model.named_parameters())
    rows = {n: torch.zeros(G + 1, *p.shape, dtype=F64) for n, p in params.items()}
    losses = _per_example_losses(model(x), y)
    for g in range(G):
        total = (losses * (ids == g).to(losses.dtype)).sum() / len(ids) * weight
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True, retain_graph=True)
        for n, grad in zip(params, grads):
            if grad is not None:
                rows[n][g] += grad.to(F64)
    return rows


def _observed_run(model, twin, make_optimizer, *, steps, accumulation, max_norm, set_to_none, reach_expert,
                  scheduler=None, dtype=F64, seed=3):
    """An observed loop (observe, the loop's own backward, clip_grad_norm_, optimizer.step(), a scheduler) and the
    same loop on ``twin`` without a tracker. Returns (tracker, reference contributions [M, G, d], reference rest
    [M, d], f(θ_0) at the probes, the reference rule's branches seen)."""
    opt, twin_opt = make_optimizer(model), make_optimizer(twin)
    schedulers = [scheduler(o) for o in (opt, twin_opt)] if scheduler is not None else []
    gen = torch.Generator().manual_seed(seed)
    probes = _route(torch.randn(3, 3, generator=gen, dtype=dtype), True)
    tracker = PathKernelTracker(model, opt, _per_example_losses, probes, num_groups=G)
    owner = {id(p): group for group in opt.param_groups for p in group["params"]}
    rule = _Adafactor(G)
    contributions, rest = torch.zeros(3, G, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    f_start = model(probes).detach().to(F64)
    for k in range(steps):
        rows = {n: torch.zeros(G + 1, *p.shape, dtype=F64) for n, p in model.named_parameters()}
        for o in (opt, twin_opt):
            o.zero_grad(set_to_none=set_to_none)
        for _ in range(accumulation):
            x = torch.randn(B, 3, generator=gen, dtype=dtype)
            if reach_expert is not None:
                x = _route(x, reach_expert(k))
            y = torch.randn(B, 2, generator=gen, dtype=dtype)
            ids = torch.tensor([0, 1, 1, 0])
            for n, r in _masked_group_gradients(model, x, y, ids, 1.0 / accumulation).items():
                rows[n] += r
            losses = _per_example_losses(model(x), y)
            tracker.observe(losses, ids)
            (losses.mean() / accumulation).backward()
            (_per_example_losses(twin(x), y).mean() / accumulation).backward()
        factor = 1.0
        if max_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
            factor = min(1.0, max_norm / (norm + 1e-6))  # clip_grad_norm_'s documented factor
        params = dict(model.named_parameters())
        before = {n: p.detach().clone() for n, p in params.items()}
        stepped = {n for n, p in params.items() if p.grad is not None}
        opt.step()
        twin_opt.step()
        middle = {n: torch.lerp(before[n], p.detach(), 0.5) for n, p in params.items()}
        jacobian = _jacobian(model, probes, middle)
        for n in stepped:  # Adafactor skips a parameter without a gradient: its step count stays, it does not move
            update = rule(n, rows[n] * factor, before[n].to(F64), owner[id(params[n])]).reshape(G + 1, -1)
            pushed = (jacobian[n].to(F64) @ update.T).reshape(3, 2, G + 1)
            contributions += pushed[..., :G].permute(0, 2, 1)
            rest += pushed[..., G]
        for s in schedulers:  # after the reference read this step's lr
            s.step()
    return tracker, contributions, rest, f_start, rule.seen, probes


def _assert_ledger_is_the_reference(tracker, contributions, rest, f_start, probes, model, tolerance):
    ledger = tracker.ledger
    scale = float(contributions.abs().max())
    torch.testing.assert_close(ledger.contributions, contributions, rtol=0, atol=tolerance * scale)
    torch.testing.assert_close(ledger.rest, rest, rtol=0, atol=tolerance * scale)
    delta = model(probes).detach().to(F64) - f_start
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, delta, rtol=0,
                               atol=4 * torch.finfo(probes.dtype).eps * float(delta.abs().max()))


def test_observed_gradient_accumulation_over_a_weight_summed_in_the_forward_books_the_published_rule():
    """_Net's kernel enters the forward through einsum("bj,pqkj->bk"), summed over p and q: autograd returns its group
    rows as an expanded view. Three Adafactor steps of two observed micro-batches each, clipped, two parameter groups:
    every step is recorded, its contributions and rest equal the hand reference (≤ 1e-12 of their scale), the ledger
    closes and the parameters end bit-identical to the untracked loop. Before: the second micro-batch's rows were
    added in place into the first's expanded view, a RuntimeError inside optimizer.step()."""
    def make_optimizer(m):
        return torch.optim.Adafactor([{"params": [m.kernel, m.bias], "lr": 0.05, "weight_decay": 0.1},
                                      {"params": [m.head, m.scale], "lr": 0.02, "d": 2.0}])

    model, twin = _Net(), _Net()
    tracker, contributions, rest, f_start, seen, probes = _observed_run(
        model, twin, make_optimizer, steps=3, accumulation=2, max_norm=0.5, set_to_none=True, reach_expert=None)
    assert tracker.ledger.steps == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    _assert_ledger_is_the_reference(tracker, contributions, rest, f_start, probes, model, 1e-12)


def test_a_float16_observed_micro_batch_with_float32_group_state_over_a_weight_summed_in_the_forward_is_recorded():
    """A float32 _Net (einsum-summed kernel), state_dtype=torch.float32, the forward under torch.autocast float16 and
    mixed_precision="observe": the micro-batch's half-precision rows are taken at a boosted scale and divided back,
    in place. Two steps are recorded, train bit-identically to the untracked loop and the ledger closes. Before: the
    kernel's rows were an expanded view (float32 rows need no dtype copy), and the in-place division raised a
    RuntimeError inside optimizer.step()."""
    model, twin = _Net(dtype=torch.float32), _Net(dtype=torch.float32)
    opt, twin_opt = (torch.optim.Adafactor(m.parameters(), lr=0.02) for m in (model, twin))
    gen = torch.Generator().manual_seed(5)
    probes = torch.randn(3, 3, generator=gen)
    tracker = PathKernelTracker(model, opt, _per_example_losses, probes, num_groups=G, mixed_precision="observe",
                                state_dtype=torch.float32)
    f_start = model(probes).detach()
    for _ in range(2):
        x, y = torch.randn(B, 3, generator=gen), torch.randn(B, 2, generator=gen)
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                losses = _per_example_losses(m(x), y).float()
            if m is model:
                tracker.observe(losses, torch.tensor([0, 1, 1, 0]))
            losses.mean().backward()
            o.step()
    ledger = tracker.ledger
    assert ledger.steps == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    delta = (model(probes).detach() - f_start).to(F64)
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, delta, rtol=0,
                               atol=1e-6 * float(delta.abs().max()))


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeros"])
def test_coverage_an_observed_adafactor_loop_with_accumulation_clipping_a_schedule_and_an_expert_not_reached(set_to_none):
    """Coverage (passes before the fix: its kernel's gradient is dense). Five observed Adafactor steps of two
    micro-batches, clip_grad_norm_, a LambdaLR schedule, three parameter groups with their own lr, weight decay, d,
    eps and beta2_decay, and an expert no input of steps 2 and 5 reaches (skipped with set_to_none=True; stepped on a
    zero gradient, its decay and second moment moving, with zero_grad(set_to_none=False)): the contributions and rest
    equal the hand reference (≤ 1e-12 of their scale, measured 1e-15), the ledger closes, the clipping is taken and
    not, and training is bit-identical to the untracked loop."""
    def make_optimizer(m):
        return torch.optim.Adafactor([
            {"params": [m.kernel, m.bias], "lr": 0.05, "weight_decay": 0.1},
            {"params": [m.head, m.scale], "lr": 0.02, "eps": (1e-20, 1e-3), "beta2_decay": -0.5, "d": 2.0},
            {"params": [m.expert], "lr": 0.03, "weight_decay": 0.05, "d": 1.5}])

    model, twin = _Routed(), _Routed()
    tracker, contributions, rest, f_start, seen, probes = _observed_run(
        model, twin, make_optimizer, steps=5, accumulation=2, max_norm=0.5, set_to_none=set_to_none,
        reach_expert=lambda k: k % 3 != 1, scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1 / (1 + k)))
    assert tracker.ledger.steps == 5
    assert {("clipped", True), ("clipped", False)} <= seen
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    _assert_ledger_is_the_reference(tracker, contributions, rest, f_start, probes, model, 1e-12)


def test_the_cost_estimate_counts_the_adafactor_state_the_step_really_holds():
    """What training holds and what the tracker copies of the optimizer's state at every step (to roll a failed step
    back): the estimate's "training_step" and "parameter_copies" for Adafactor exceed plain SGD's (no state) on the
    same model by exactly the bytes of Adafactor's state tensors after a real step (a vector's or 0-dim parameter's
    variance, a matrix's or 4-D kernel's row and column factors: 39 values for _Net's 61 parameters). Before: by
    one full copy of every parameter (61 values) once any parameter group held a vector, and by none without one
    (the factors left out)."""
    for matrices_only in (False, True):
        model = _Net()
        params = [model.kernel, model.head] if matrices_only else list(model.parameters())
        if matrices_only:
            model.bias.requires_grad_(False)
            model.scale.requires_grad_(False)
        probes = torch.randn(2, 3, dtype=F64)
        adafactor = torch.optim.Adafactor(params)
        # (both estimated for the step's batch: without batch_size= the tracked one's first step would replace the
        # probes' count in its estimate, and plain's, which takes no step, keep it)
        tracked = PathKernelTracker(model, adafactor, _per_example_losses, probes, num_groups=G, batch_size=B)
        plain = PathKernelTracker(model, torch.optim.SGD(params, lr=0.1), _per_example_losses, probes, num_groups=G,
                                  batch_size=B)
        tracked.step(torch.randn(B, 3, dtype=F64), torch.randn(B, 2, dtype=F64), torch.tensor([0, 1, 1, 0]))
        held = sum(v.numel() * v.element_size() for p in params for key, v in adafactor.state[p].items() if key != "step")
        assert held == (28 + 6) * 8 if matrices_only else (28 + 6 + 4 + 1) * 8
        for part in ("training_step", "parameter_copies"):
            assert tracked.cost.memory[part] - plain.cost.memory[part] == held, part
