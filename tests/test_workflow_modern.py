"""A researcher's ordinary modern PyTorch loop with tracker.observe (or tracker.step): what is not
exact is refused with the fix named, before the optimizer moves anything (review "modern")."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker

F32 = torch.float32


def classifier(dtype=F32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def per_example_ce(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def batch(dtype=F32, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 4, generator=g).to(dtype), torch.randint(0, 3, (size,), generator=g)


PROBES = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("groups", [1, 3])
def test_autocast_closed_before_observe_is_refused_as_mixed_precision(groups):
    """The common bf16 loop: forward and loss inside torch.autocast, observe() after the block.
    The loss is float32 (cross-entropy runs in float32 under autocast) and autocast is off by then;
    the old code let the step run into the gradient check, which blamed the loss's weighting
    (3 groups), or recorded the bf16 steps without a word (1 group: one backward, no gap)."""
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = PathKernelTracker(model, optimizer, per_example_ce, PROBES, num_groups=groups)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = per_example_ce(model(x), y)
    assert losses.dtype == F32 and not torch.is_autocast_enabled("cpu")
    with pytest.raises(RuntimeError, match="mixed precision.*bfloat16.*autocast"):
        tracker.observe(losses, y % groups)
    assert tracker.observed_micro_batches == 0 and tracker.ledger.steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class AutocastInside(nn.Module):
    """A model that runs its own body under autocast (a common 'fast' forward)."""

    def __init__(self):
        super().__init__()
        self.body = classifier()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.body(x)
        return out.float()


def test_autocast_inside_the_forward_is_refused_on_an_owned_step_and_rolled_back():
    model = AutocastInside()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = PathKernelTracker(model, optimizer, per_example_ce, PROBES, num_groups=3)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="mixed precision.*bfloat16"):
        tracker.step(x, y, y)
    assert tracker.ledger.steps == 0 and not optimizer.state
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("frozen_at_build", [False, True])
def test_a_layer_frozen_or_unfrozen_mid_run_is_refused_at_observe(frozen_at_build):
    """requires_grad toggled between steps (fine-tuning schedules). Old code, layer frozen after the
    tracker was built: observe() crashed inside autograd ('One of the differentiated Tensors does
    not require grad'); now both directions name the change and the fix at observe()."""
    model = classifier(torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if frozen_at_build:
        model[0].requires_grad_(False)
    tracker = PathKernelTracker(model, optimizer, per_example_ce, PROBES.double(), num_groups=3)
    x, y = batch(torch.float64)
    losses = per_example_ce(model(x), y)
    tracker.observe(losses, y)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    model[0].requires_grad_(frozen_at_build)
    losses = per_example_ce(model(x), y)
    with pytest.raises(RuntimeError, match="trainable parameters changed since the tracker was built"):
        tracker.observe(losses, y)
    assert tracker.ledger.steps == 1


def test_a_model_moved_to_float64_mid_run_is_refused_with_the_fix():
    """model.double() between steps (SGD keeps no state, so the untracked loop runs on). Old code:
    the probes' float32 forward crashed ('mat1 and mat2 must have the same dtype') after the step."""
    model = classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = PathKernelTracker(model, optimizer, per_example_ce, PROBES, num_groups=3)
    x, y = batch()
    losses = per_example_ce(model(x), y)
    tracker.observe(losses, y)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    model.double()
    before = [p.detach().clone() for p in model.parameters()]
    losses = per_example_ce(model(x.double()), y)
    with pytest.raises(RuntimeError, match="changed dtype or device.*Build a new tracker"):
        tracker.observe(losses, y)
    assert tracker.ledger.steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_clip_grad_value_is_refused_with_the_fix_named():
    """clip_grad_value_ clips elementwise: the gradient is no longer one scalar times the observed
    sum. The old refusal spoke of the loss's weighting only, which is not what the loop changed."""
    model = classifier(torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = PathKernelTracker(model, optimizer, per_example_ce, PROBES.double(), num_groups=3)
    x, y = batch(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    losses = per_example_ce(model(x), y)
    tracker.observe(losses, y)
    losses.mean().backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
    with pytest.raises(RuntimeError, match="clip_grad_value_.*clip_grad_norm_"):
        optimizer.step()
    assert tracker.ledger.steps == 0 and not optimizer.state
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
