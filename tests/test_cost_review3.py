"""Third read of the cost estimate's dense route and the trainers' step overhead.

- The dense route counts its group gradients' products (the R·B·P row sums over every trained parameter, the
  fallback parameters' per-example gradients) in absolute multiply-adds and divides them by one example's
  forward; that unit must hold the fallback parameters' own products (a raw weight in ``F.linear``), which
  :func:`~genkernel.core.cost.example_counts` (Linear and convolution modules) leaves out.
- A ``DDPMTrainer(vae=)`` fed by a DataLoader knows its images' shape only at the first batch, after the
  analyzer binds at ``on_train_start``: the VAE's encode must still reach the bare step.
- An analyzer whose window starts after the first step binds inside the step (``wrap_step``): DREAM's forward
  must be in its bare step there too.
- Coverage: ``per_example_gradients`` against autograd one example at a time, and against the B × B diagonal
  product it replaced; frozen weights beside trainable ones that share their storage or live on another device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import genkernel.core.cost as cost
from genkernel import PathKernelTracker
from genkernel.core.cost import estimate_cost
from genkernel.core.engine.gradients import group_gradients
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from test_cost_dense_route import counted, loss_fn
from test_trainer_dream import data as dream_data, trainer as dream_trainer
from test_trainer_vae import images, make_unet, make_vae, trainer as vae_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
BATCH, PROBES, GROUPS = 8, 4, 4


class RawWeight(nn.Module):
    """An MLP whose middle weight is a bare parameter passed to ``F.linear`` (outside any Linear module: a
    fallback parameter of the covering plan, and the largest product of the forward)."""

    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Linear(16, 64), nn.Linear(64, 4)
        self.middle = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        return self.last(torch.tanh(nn.functional.linear(torch.tanh(self.first(x)), self.middle)))


def test_a_fallback_parameters_products_are_in_the_dense_estimates_unit():
    """Group gradients and the whole ratio within 10 % of torch's operation count of the tracked and the bare
    step, each over one example's counted forward (the residue: the fallback's per-example gradients counted
    as B·P multiply-adds). Fails on the code since ab5025d: the row sums over the raw weight's 4096 values were
    divided by the Linear layers' 1280 multiply-adds alone, 176 example-forwards against 48.7 counted (3.6x),
    the ratio 11.0 against 5.2."""
    torch.manual_seed(0)
    model = RawWeight().double()
    bare_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    probes = (torch.randn(PROBES, 16, generator=g, dtype=F64),)
    batches = [((torch.randn(BATCH, 16, generator=g, dtype=F64),), torch.randn(BATCH, 4, generator=g, dtype=F64))
               for _ in range(2)]
    tracker = PathKernelTracker(model, torch.optim.Adam(model.parameters(), 1e-4), loss_fn, probes, num_groups=GROUPS,
                                batch_size=BATCH, group_state="dense", gradient_route="example",
                                contribution_route="jvp")
    group_flops = [0]
    original = tracker.route.gradients

    def counted_gradients(*args, **kwargs):
        result = [None]
        group_flops[0] += counted(lambda: result.__setitem__(0, original(*args, **kwargs)))
        return result[0]

    tracker.route.gradients = counted_gradients
    ids = torch.arange(BATCH) % GROUPS
    tracker.step(*batches[0], ids)
    group_flops[0] = 0
    step = counted(lambda: tracker.step(*batches[1], ids))
    optimizer = torch.optim.Adam(bare_model.parameters(), 1e-4)

    def bare():
        optimizer.zero_grad()
        loss_fn(bare_model(*batches[1][0]), batches[1][1]).mean().backward()
        optimizer.step()

    forward = counted(lambda: bare_model(batches[1][0][0][:1]))
    assert tracker.cost.work["group_gradients"] == pytest.approx(group_flops[0] / forward, rel=0.10)
    assert tracker.cost.ratio == pytest.approx(step / counted(bare), rel=0.10)


def _latent_analyzer(run, latents):
    return NoiseLevelAnalyzer(run.scheduler, latents, num_bins=2, num_probes=4, controls=1, kernel_points=2,
                              progress=False)


def test_a_dataloader_trainers_vae_encode_is_in_the_bare_step():
    """The same images from a DataLoader and as a Tensor: the same bare step and step overhead once a step ran.
    Fails on the code since 19a9978: the analyzer binds at on_train_start, before the DataLoader's first batch
    shapes the images, and the encode was left out for the whole run (step_overhead 0.0 against 0.357; the
    ratio 5.57 against 5.08)."""
    from_tensor = vae_trainer()
    latents = from_tensor.encode(images(4))
    from_loader = DDPMTrainer(make_unet(), make_scheduler(50), DataLoader(TensorDataset(images()), batch_size=4),
                              vae=make_vae(), lr=1e-3, seed=3, progress=False)
    costs = []
    for run in (from_tensor, from_loader):
        analyzer = _latent_analyzer(run, latents)
        run.callbacks.append(analyzer)
        run.train(1)
        costs.append(analyzer.tracker.cost)
    assert costs[0].settings["step_overhead"] > 0
    assert costs[1].settings["step_overhead"] == pytest.approx(costs[0].settings["step_overhead"], rel=1e-12)
    assert costs[1].bare_step == pytest.approx(costs[0].bare_step, rel=1e-12)


def test_a_window_that_starts_later_counts_dreams_forward():
    """track_steps=(2, 3): the analyzer binds inside step 2's wrap_step; its bare step holds DREAM's forward
    (one example-forward each of the batch of 4) as one bound at on_train_start does. Fails on the code since
    19a9978: that bind passed no step_overhead (bare step 11.96 against 15.96)."""
    costs = []
    for window in (None, (2, 3)):
        run = dream_trainer(dream=1.0)
        analyzer = NoiseLevelAnalyzer(run.scheduler, dream_data(4), num_bins=2, num_probes=4, controls=1,
                                      kernel_points=2, progress=False, track_steps=window)
        run.callbacks.append(analyzer)
        run.train(2)
        costs.append(analyzer.tracker.cost)
    assert costs[0].settings["step_overhead"] == 1.0
    assert costs[1].settings["step_overhead"] == 1.0
    assert costs[1].bare_step == pytest.approx(costs[0].bare_step, rel=1e-12)


class Buffered(nn.Module):
    """A Linear, a BatchNorm in eval mode (running statistics: buffers read by the forward) and a Linear."""

    def __init__(self, dtype):
        super().__init__()
        self.first, self.norm, self.last = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.norm.running_mean.uniform_(-1, 1)
        self.norm.running_var.uniform_(0.5, 2)
        self.to(dtype).eval()

    def forward(self, x):
        return self.last(torch.tanh(self.norm(self.first(x))))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("budget_examples", [1, 3, 64])
def test_per_example_gradients_are_autograds_one_example_at_a_time(dtype, budget_examples):
    """Coverage: c_n ∇ℓ_n of every example, in chunks of 1, 3 or all 7 examples (the memory budget: 3 × P ×
    itemsize bytes an example), equal autograd's gradient of each example's loss alone times c_n (float64 to
    1e-12, float32 to float32's rounding), and equal bit for bit the B × B diagonal product they replaced."""
    from genkernel.core.engine.gradients import per_example_gradients  # (529c453: here, so the file runs before it)

    torch.manual_seed(0)
    model = Buffered(dtype)
    params = dict(model.named_parameters())
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = 3 * sum(p.numel() for p in params.values()) * itemsize * budget_examples
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=g).to(dtype)
    y = torch.randn(7, 3, generator=g).to(dtype)
    c = torch.randn(7, generator=g, dtype=F64)
    got = per_example_gradients(model, params, (x,), y, loss_fn, c, memory_budget=budget)
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for n in range(7):
        loss = loss_fn(model(x[n:n + 1]), y[n:n + 1]).sum()
        expected = torch.autograd.grad(loss, list(params.values()))
        for (name, _), grad in zip(params.items(), expected):
            torch.testing.assert_close(got[name][n], c[n] * grad.to(F64), **tolerance)
    diagonal, _ = group_gradients(model, params, (x,), y, loss_fn, torch.diag(c), memory_budget=budget,
                                  route="example")
    for name in params:
        assert got[name].dtype == F64 and torch.equal(got[name], diagonal[name])


class SharedFrozen(nn.Module):
    """A trainable Linear, a frozen Parameter on the same storage (a tied copy), a frozen Linear."""

    def __init__(self):
        super().__init__()
        self.trained, self.frozen = nn.Linear(8, 8), nn.Linear(8, 8).requires_grad_(False)
        self.tied = nn.Parameter(self.trained.weight.data, requires_grad=False)

    def forward(self, x):
        return self.frozen(self.trained(x)) + x @ self.tied


def test_frozen_weights_tied_or_elsewhere_are_counted_once_and_fit_to_the_byte(monkeypatch):
    """Coverage: a frozen parameter on a trainable one's storage is not counted again; one on another device
    (meta) than the estimate's is not counted; the fit check asks the free memory for the total less the held
    arrays and the frozen weights, to the byte, for ``fits`` and ``fits_beside``."""
    torch.manual_seed(0)
    model = SharedFrozen()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    probes = (torch.randn(PROBES, 8),)
    settings = dict(outputs=8, rows=GROUPS, batch_size=BATCH, device="cpu")
    estimate = estimate_cost(model, optimizer, probes, **settings)
    frozen_linear = sum(p.numel() * p.element_size() for p in model.frozen.parameters())
    assert estimate.memory["frozen_weights"] == frozen_linear  # the tied copy shares the trainable storage
    needed = estimate.total_bytes - estimate.held - frozen_linear
    for free, fits in ((needed, True), (needed - 1, False)):
        monkeypatch.setattr(cost, "available_memory", lambda device, free=free: free)
        again = estimate_cost(model, optimizer, probes, **settings)
        assert again.fits is fits and again.fits_beside(again) is fits
    monkeypatch.undo()
    elsewhere = SharedFrozen()
    elsewhere.frozen.to("meta")
    assert cost.frozen_bytes(elsewhere, "cpu") == 0 and cost.frozen_bytes(elsewhere, "meta") == frozen_linear
