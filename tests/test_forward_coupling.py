"""Examples coupled in plain operations, and draws from Python's and NumPy's generators, found at construction.

Before: coupling was known by module type alone (adapter.coupled_modules: nn.BatchNorm, dropout). A batch statistic
in plain operations (``h - h.mean(0)``, ``F.batch_norm(h, None, None, training=True)`` as BigGAN's hand-written batch
norm, a ProGAN/StyleGAN minibatch-standard-deviation layer) went unseen: "auto" took a per-example route, whose
per-example gradients carry the other examples' (the group rows 25-29 % off the training graph's split for plain
SGD, 1e6 times under Adam, a GAN discriminator's ledger 3.5e-3 off), with every check passing, the totals exact.
And the construction's forward forked torch's generators alone: a model drawing from ``random`` or ``np.random`` in
its forward (a LayerDrop written with ``random.uniform``) trained to other parameters with the tracker (0.05 apart
after three steps), and its draws were not seen as draws."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.adapter import coupled_forward, random_forward
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class Center(nn.Module):
    """Mean-only batch norm, in training mode."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True) if self.training else h


class HandBatchNorm(nn.Module):
    """A hand-written batch norm without running statistics (BigGAN's ``manual_bn`` kind)."""

    def forward(self, h):
        return F.batch_norm(h, None, None, training=True) if self.training else h


class MinibatchStd(nn.Module):
    """A ProGAN/StyleGAN discriminator's minibatch standard deviation, appended as a feature."""

    def forward(self, h):
        s = h.std(0, unbiased=False).mean() if self.training and h.shape[0] > 1 else h.new_zeros(())
        return torch.cat([h, s.expand(h.shape[0], 1)], dim=1)


COUPLINGS = {"center": (Center, 6), "hand batch norm": (HandBatchNorm, 6), "minibatch std": (MinibatchStd, 7)}


def coupled_net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer, width = COUPLINGS[kind]
    return nn.Sequential(nn.Linear(3, 6), layer(), nn.Tanh(), nn.Linear(width, 2)).to(F64)


def data(n: int = 24):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64),
            torch.randn(5, 3, generator=g, dtype=F64))


def train(kind: str, steps: int = 3, **settings) -> PathKernelTracker:
    model = coupled_net(kind)
    x, y, probes = data()
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=4,
                                **settings)
    for k in range(steps):
        rows = torch.arange(8 * k, 8 * k + 8)
        tracker.step(x[rows], y[rows], rows % 4)
    return tracker


@pytest.mark.parametrize("kind", list(COUPLINGS))
def test_a_model_coupling_its_examples_in_plain_operations_is_split_from_the_training_graph(kind):
    """By default (group_state "auto", plain SGD) the tracker takes its group rows from the training graph: its
    group contributions are the graph route's, bit for bit (before: the factored route's, 0.016-0.29 relative off
    them), the construction names the coupling."""
    default = train(kind)
    graph = train(kind, group_state="dense", gradient_route="graph")
    assert default.coupled_forward and "depends on the other examples" in default.coupled_forward[0]
    assert default.route.uses_graph()
    assert torch.equal(default.ledger.contributions, graph.ledger.contributions)


@pytest.mark.parametrize("settings", [dict(group_state="factored"), dict(group_state="dense", gradient_route="example"),
                                      dict(group_state="dense", gradient_route="factored")])
def test_the_per_example_routes_refuse_it_naming_the_coupling(settings):
    """Asked for by name, a per-example route is refused with the coupling named and the route that works."""
    with pytest.raises(ValueError, match="depends on the other examples.*gradient_route='graph'"):
        train("center", steps=1, **settings)


def test_a_single_probe_is_paired_with_a_changed_copy():
    """One probe: the check runs it beside a changed copy of itself, and finds the coupling all the same; an
    independent model on one probe is not flagged."""
    probe = torch.randn(1, 3, dtype=F64)
    assert coupled_forward(coupled_net("minibatch std"), (probe,))
    assert coupled_forward(nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(F64), (probe,)) == []


def independent_models():
    """Models whose examples are independent, in training mode (no dropout), with their probes."""
    from diffusers import UNet2DModel

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                    layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)

        def forward(self, x, t):
            return self.unet(x, t).sample

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(11, 8), nn.Linear(8, 2)

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1))

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(3, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
    return [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
         (torch.randn(6, 3, 8, 8),)),
        (nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(6, 3),)),
        (nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8).eval(), nn.Linear(8, 2)), (torch.randn(6, 3),)),
        (encoder, (torch.randn(6, 5, 8),)),
        (Recurrent(), (torch.randn(6, 4, 3),)),
        (Denoiser(), (torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,)))),
        (Tokens(), (torch.randint(0, 11, (6, 4)),)),
    ]


def test_independent_models_are_not_flagged():
    """coverage: convolutions with GroupNorm, LayerNorm, an eval-mode BatchNorm among training-mode layers, a
    transformer encoder, an LSTM, a diffusers UNet with attention and integer timesteps, and integer token inputs
    (nothing to change: not checked) are not flagged, in float32."""
    for model, inputs in independent_models():
        assert coupled_forward(model, inputs) == [], type(model).__name__


def test_the_check_changes_neither_buffers_nor_any_generator():
    """The check's forwards on a training-mode BatchNorm (its running statistics would move) and a model drawing
    from torch, Python and NumPy: the buffers, their versions and every generator as before."""
    class Draws(nn.Module):
        def forward(self, h):
            return h * (1 + torch.rand(()) + random.random() + float(np.random.rand()))

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Draws(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    buffers = {n: (b.clone(), b._version) for n, b in model.named_buffers()}
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert coupled_forward(model, (x,)) == []  # (it draws: random_forward's finding, not a coupling)
    assert random_forward(model, (x,))
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name][0]) and b._version == buffers[name][1]


class LayerDrop(nn.Module):
    """A LayerDrop written with Python's ``random`` (or NumPy's): in training mode a layer skipped at random."""

    def __init__(self, draw):
        super().__init__()
        self.draw, self.a, self.b = draw, nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.training and self.draw() < 0.5:
            h = 2 * h
        return self.b(h)


def trained_with_and_without_a_tracker(build) -> list[tuple]:
    """``[(parameters, None, Python's state, NumPy's keys), (parameters, tracker, ...)]`` after three SGD steps of
    ``build()``, untracked and tracked, torch's, Python's and NumPy's global generators seeded alike before each."""
    x, y, probes = data()
    finals = []
    for tracked in (False, True):
        torch.manual_seed(0)
        random.seed(3)
        np.random.seed(3)
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=4) if tracked else None
        for k in range(3):
            rows = torch.arange(8 * k, 8 * k + 8)
            if tracker is None:
                optimizer.zero_grad()
                mse_loss(model(x[rows]), y[rows]).mean().backward()
                optimizer.step()
            else:
                tracker.step(x[rows], y[rows], rows % 4)
        finals.append(([p.detach().clone() for p in model.parameters()], tracker, random.getstate(),
                       np.random.get_state()[1].copy()))
    return finals


@pytest.mark.parametrize("draw", [random.random, np.random.rand], ids=["random", "numpy"])
def test_a_forward_drawing_from_python_or_numpy_trains_as_without_the_tracker(draw):
    """A LayerDrop drawing from ``random`` or ``np.random``: the tracker finds the draw (graph route) and trains to
    the same parameters, bit for bit, with the global generators where an untracked run leaves them (before: the
    construction's forward drew one number, and the parameters differed after three steps)."""
    (untracked, _, python_untracked, numpy_untracked), (tracked, tracker, python_tracked, numpy_tracked) = \
        trained_with_and_without_a_tracker(lambda: LayerDrop(draw).to(F64))
    assert tracker.random_forward and tracker.route.uses_graph()
    assert all(torch.equal(a, b) for a, b in zip(untracked, tracked))
    assert python_untracked == python_tracked and np.array_equal(numpy_untracked, numpy_tracked)


class TokenBatchMean(nn.Module):
    """Token ids in, a batch mean of their embeddings added to every example (a coupling of integer inputs)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(11, 8), nn.Linear(8, 2)

    def forward(self, ids):
        h = self.embed(ids).mean(1)
        return self.head(h + h.mean(0, keepdim=True))


class FloatIndex(nn.Module):
    """A float timestep used as an index (``t.long()`` into a table of 1000 rows), independent examples."""

    def __init__(self):
        super().__init__()
        self.table, self.head = nn.Embedding(1000, 4), nn.Linear(7, 2)

    def forward(self, x, t):
        return self.head(torch.cat([x, self.table(t.long())], 1))


def test_integer_inputs_are_checked_and_a_changed_example_stays_in_range():
    """The first example is replaced by another probe, whatever its dtype: token ids coupled through a batch mean
    are found (before: integer inputs were never changed, the coupling missed); a float timestep of 999 used as an
    index stays in range and an independent model is not flagged (before: 1.5 t + 0.5 indexed past the table, the
    IndexError swallowed on CPU, a device-side assert on CUDA)."""
    torch.manual_seed(0)
    assert coupled_forward(TokenBatchMean(), (torch.randint(0, 11, (4, 5)),))
    x, t = torch.randn(4, 3), torch.tensor([999.0, 3.0, 500.0, 0.0])
    model = FloatIndex()
    assert coupled_forward(model, (x, t)) == []
    h = {}
    model.table.register_forward_hook(lambda m, args, out: h.setdefault("max", []).append(int(args[0].max())))
    coupled_forward(model, (x, t))
    assert max(h["max"]) <= 999
