"""Trustworthy under misuse and faults: no silent wrong number, no wedged tracker, analysis that
never touches the model, and errors that name the problem and the fix (issue 12)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel import PathKernelTracker, gradient_kernel, tangent_features
from genkernel.supervised import mse_loss

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# 1. Kernels that would drop a parameter: every pattern equals the torch.func reference
# ------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight inside the functional attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x [B, T, 3]
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


class TiedHead(nn.Module):
    """A language-model head tied to the embedding through F.linear(h, emb.weight)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, tokens):  # tokens [B, T]
        h = torch.tanh(self.mix(self.emb(tokens))).mean(1)
        return F.linear(h, self.emb.weight)


class SharedWeight(nn.Module):
    """One Linear's weight read by a second module's functional call."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(F.linear(h, self.a.weight * 0.5))
        return self.b(h)


class SameModuleTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.alias = self.shared  # registered under two names

    def forward(self, x):
        return self.out(torch.tanh(self.alias(torch.tanh(self.shared(x)))))


def _case(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "attention":
        return Attention().to(F64), torch.randn(5, 4, 3, generator=g, dtype=F64)
    if name == "encoder":
        return Encoder().to(F64), torch.randn(5, 4, 3, generator=g, dtype=F64)
    if name == "tied_head":
        return TiedHead().to(F64), torch.randint(0, 11, (5, 3), generator=g)
    if name == "shared_weight":
        return SharedWeight().to(F64), torch.randn(5, 4, generator=g, dtype=F64)
    return SameModuleTwice().to(F64), torch.randn(5, 4, generator=g, dtype=F64)


PATTERNS = ["attention", "encoder", "tied_head", "shared_weight", "same_module_twice"]


@pytest.mark.parametrize("name", PATTERNS)
def test_every_parameter_use_is_in_the_kernel(name):
    model, x = _case(name)
    reference = gradient_kernel(model, x, engine="functional")
    for engine in ("factored", "auto"):
        got = gradient_kernel(model, x, engine=engine)
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
    torch.testing.assert_close(tangent_features(model, x, engine="factored"), tangent_features(model, x, engine="functional"),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["attention", "tied_head", "shared_weight"])
def test_the_factored_tracker_covers_every_parameter_use(name):
    model, x = _case(name)
    probes = x[:2]
    y = torch.randn(x.shape[0], 2 if name != "tied_head" else 11, dtype=F64, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = PathKernelTracker(model, opt, mse_loss, probes, num_groups=x.shape[0], group_state="factored",
                                quadrature="simpson")
    tracker.step(x, y, torch.arange(x.shape[0]))
    assert tracker.ledger.relative_residual() < 1e-6
