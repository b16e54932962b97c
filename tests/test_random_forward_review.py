"""Review of the tracker's draw detection (adapter.random_forward): a forward that draws from a torch.Generator a
module keeps of its own (an augmentation seeded for reproducibility) must neither be shifted by the probe forward
at construction (training with a tracker would take other draws than without) nor go unseen; and a model put in
training mode only after construction, whose draw the one-time check cannot see, keeps an exact ledger."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.supervised import mse_loss

from test_random_forward import Jitter

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


class OwnGeneratorJitter(nn.Module):
    """A per-row random shift in training mode, drawn from the module's own seeded generator."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(5)

    def forward(self, x):
        if not self.training:
            return x
        shift = torch.randn(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype, generator=self.generator)
        return x + 0.3 * shift


class OwnGeneratorBatchFlip(nn.Module):
    """A flip of the whole batch in any mode, one coin per call from the module's own generator."""

    def __init__(self, seed):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x):
        return -x if bool(torch.rand((), generator=self.generator) < 0.5) else x


def _regressor(jitter):
    """``Linear(2, 8) → jitter → Tanh → Linear(8, 1)`` in float64, training mode, seeded weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), jitter, nn.Tanh(), nn.Linear(8, 1)).to(F64).train()


def _data():
    """Inputs ``[8, 2]``, targets ``[8, 1]`` and probes ``[3, 2]`` from fixed generators."""
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    probes = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    return x, y, probes


def test_building_a_tracker_leaves_a_module_generator_where_it_was():
    """The probe forward at construction ran in training mode and advanced the jitter's own generator (fork_rng
    forks the global ones only): the next training forward drew other shifts than the same model without a
    tracker (its outputs differed by up to 0.154). Now the generator's state and the next forward are bit for
    bit the untracked model's."""
    x, _, probes = _data()
    untracked = _regressor(OwnGeneratorJitter())
    tracked = _regressor(OwnGeneratorJitter())
    PathKernelTracker(tracked, torch.optim.SGD(tracked.parameters(), lr=0.1), mse_loss, probes, num_groups=4,
                      group_state="dense", gradient_route="graph")
    assert torch.equal(tracked[1].generator.get_state(), untracked[1].generator.get_state())
    with torch.no_grad():
        assert torch.equal(tracked(x), untracked(x))


def test_a_draw_from_a_module_generator_sends_auto_to_the_graph_route_and_the_ledger_closes():
    """A draw from a module's own generator is a draw: it is named like a global one, "auto" takes the group
    gradients from the training graph, and the ledger's identity closes. Before, it went unseen (``[]``) and
    "auto" chose the factored route."""
    from genkernel.core.adapter import random_forward

    x, y, probes = _data()
    model = _regressor(OwnGeneratorJitter())
    assert random_forward(model, (probes,)) == ["Sequential (draws random numbers in its forward)"]
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4)
    assert tracker.group_state == "dense" and tracker.route.uses_graph()
    for _ in range(2):
        tracker.step(x, y, torch.arange(8) % 4)
    ledger = tracker.ledger
    torch.testing.assert_close(ledger.delta, ledger.contributions.sum(1) + ledger.rest + ledger.residual,
                               rtol=0, atol=1e-12)


def test_a_model_put_in_training_mode_after_construction_keeps_exact_contributions_on_the_factored_route():
    """coverage: the draw check is a snapshot at construction; a model built in eval mode (nothing drawn, "auto"
    factored) and trained in training mode draws afterwards. The factored route takes its rows from the
    training pass's own activations, so its contributions equal the graph route's (which replays nothing) to
    1e-15 at every step, with the same draws."""
    x, y, probes = _data()

    def contributions(eval_first, **routes):
        model = _regressor(Jitter())
        if eval_first:
            model.eval()
        tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes,
                                    num_groups=4, **routes)
        model.train()
        torch.manual_seed(11)
        for _ in range(3):
            tracker.step(x, y, torch.arange(8) % 4)
        return tracker, tracker.ledger.contributions

    factored, late = contributions(True)
    _, graph = contributions(False, group_state="dense", gradient_route="graph")
    assert factored.group_state == "factored" and not factored.route.uses_graph()
    assert float(graph.abs().max()) > 1e-2
    torch.testing.assert_close(late, graph, rtol=0, atol=1e-15)


def test_an_eval_mode_flip_drawn_from_a_module_generator_is_refused_whatever_the_coin_gives_and_left_unmoved():
    """check_deterministic compared the global generators only: a whole-batch flip drawn from the module's own
    generator passed at the seeds whose two coins agreed (the probes then had no one output), and its two passes
    advanced that generator (training's flips shifted). Now refused for the draw at every seed, the generator
    where it was."""
    probes = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    for seed in range(6):
        flip = OwnGeneratorBatchFlip(seed)
        state = flip.generator.get_state()
        model = nn.Sequential(flip, nn.Linear(2, 1)).to(F64)
        with pytest.raises(ValueError, match="not deterministic in eval mode: it draws random numbers"):
            PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=2)
        assert torch.equal(flip.generator.get_state(), state)


def test_kernels_of_a_model_flipping_by_its_own_generator_in_eval_mode_are_refused_at_every_seed():
    """repeatable_output watched the global generators only: a flip drawn from the module's own generator passed
    its two-pass check when the two coins agreed, and the kernel was taken at a random flip per chunk. Refused
    now at every seed, the generator left where it was."""
    from genkernel import gradient_kernel

    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    for seed in range(6):
        flip = OwnGeneratorBatchFlip(seed)
        state = flip.generator.get_state()
        model = nn.Sequential(flip, nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
        with pytest.raises(ValueError, match="two passes on the first example of x1 draw random numbers"):
            gradient_kernel(model, x)
        assert torch.equal(flip.generator.get_state(), state)


class ReseededNoise(nn.Module):
    """Fixed noise: every call reseeds the global generator and adds the same 0.1 · n, n ~ N(0, I) of ``[2]``."""

    def forward(self, x):
        torch.manual_seed(1234)
        return x + 0.1 * torch.randn(x.shape[1:], dtype=x.dtype)


def test_a_forward_that_reseeds_before_drawing_is_deterministic_and_analyzed():
    """The draw checks compared the generators before and after the first pass, so a forward that reseeds and
    draws the same fixed noise every call (two equal outputs, accepted at 6e59059) was refused as drawing. The
    second pass is the one checked now: the tracker is built and the gradient kernel equals J Jᵀ by hand, J
    the per-example Jacobian of the net on x + 0.1 · n (1e-12)."""
    from torch.func import functional_call, jacrev

    from genkernel import gradient_kernel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    model = nn.Sequential(ReseededNoise(), net)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, x, num_groups=2)
    kernel = gradient_kernel(model, x)
    noise = torch.randn(2, generator=torch.Generator().manual_seed(1234), dtype=F64)
    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = jacrev(lambda p: functional_call(net, p, (x + 0.1 * noise,)).reshape(-1))(params)
    flat = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)
    torch.testing.assert_close(kernel, flat @ flat.T, rtol=1e-12, atol=1e-12)
