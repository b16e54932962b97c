"""Adversarial review of factors.py's covering check: models on which a factored block's hooks do
not describe how its weight is read, against an independent brute force in float64 (one
torch.autograd.grad per example and output, each example alone)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.core.engine.factored import factored_gradient_kernel
from genkernel.core.engine.factors import analysis, covering_plan, make_plan
from genkernel.core.engine.kernels import gradient_kernel
from test_engine_factored_review import Pooled, jacobians_of

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def brute_jacobians(model, x):
    """[M, d, P] in float64 over the trainable parameters, one example at a time (no deepcopy:
    the old weight_norm's computed weight is not a leaf)."""
    return jacobians_of(model, (x,)).to(F64)


def brute_kernel(model, x):
    j = brute_jacobians(model, x)
    return torch.einsum("mdp,ndp->mn", j, j)


def relative_error(got, want):
    return float((got.to(F64) - want).abs().max() / want.abs().max())


def _data(*shape, seed=1, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- 1. Subclasses whose own forward reads the weight another way ------------------------------
class GainLinear(nn.Linear):
    """A Linear with a trainable per-output gain on its weight (initialized to exactly 1)."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.gain = nn.Parameter(torch.ones(o))

    def forward(self, x):
        return F.linear(x, self.weight * self.gain[:, None], self.bias)


class GainConv(nn.Conv2d):
    """The same on a convolution, through ``_conv_forward`` (what ``Conv2d.forward`` calls)."""

    def __init__(self, i, o):
        super().__init__(i, o, 3)
        self.gain = nn.Parameter(torch.ones(o))

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * self.gain[:, None, None, None], bias)


class SmallGate(nn.Linear):
    """A second read of the weight behind a gate far below float32's check tolerance (1e-4)."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.gate = nn.Parameter(torch.full((), 1e-5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.gate * F.linear(torch.tanh(x), self.weight)


@pytest.mark.parametrize("case", ["gain linear", "gain conv", "float32 gate"])
def test_a_subclass_read_the_check_cannot_see_at_its_values_goes_to_torch_func(case):
    """Fails on the old code: the covering check compared values, and at a gain of exactly 1 (or a
    gate of 1e-5 in float32) the subclass's own forward gives the gradient the hooks describe; the
    outcome is remembered per model, and once the gain or gate moved the factored kernel was wrong:
    42 % off (gain linear at 1.5), 30 % (gain conv at 1.5), 23 % (float32 gate at 0.5; 5.9e-6 at
    the checked 1e-5). A subclass overriding forward (or _conv_forward) now goes to torch.func."""
    torch.manual_seed(0)
    dtype = torch.float32 if case == "float32 gate" else F64
    model, x, name, moved = {
        "gain linear": (Pooled(GainLinear(4, 3), 3), _data(5, 4), "gain", 1.5),
        "gain conv": (Pooled(GainConv(2, 3), 3), _data(4, 2, 5, 5), "gain", 1.5),
        "float32 gate": (Pooled(SmallGate(4, 3), 3), _data(5, 4, dtype=torch.float32), "gate", 0.5),
    }[case]
    model = model.to(dtype)
    with analysis(model):
        plan = covering_plan(model, (x,))
    assert "body.weight" in plan.fallback and [b.name for b in plan.blocks] == ["head"]
    for value in (None, moved):  # at the checked values, then moved (the remembered plan)
        if value is not None:
            with torch.no_grad():
                getattr(model.body, name).fill_(value)
        got = gradient_kernel(model, x, engine="factored")
        want = brute_kernel(model.double(), x.double())
        model.to(dtype)
        assert relative_error(got, want) < (1e-5 if dtype == torch.float32 else 1e-12), value


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: normalizes the channels of an NCHW input (the hooks see NCHW)."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsFirstLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x.transpose(1, -1), self.weight, self.bias).transpose(1, -1)


@pytest.mark.parametrize("body,x", [(LayerNorm2d(4), (3, 4, 5, 6)), (ChannelsFirstLinear(4, 3), (3, 4, 5))],
                         ids=["LayerNorm2d", "channels-first Linear"])
def test_a_subclass_with_another_layout_is_routed_not_a_crash(body, x):
    """Fails on the old code: the covering check raised (LayerNorm2d: "Given normalized_shape=[4],
    expected input with shape [*, 4]"; the channels-first Linear: an einsum size mismatch) instead
    of routing the module to torch.func."""
    model, x = Pooled(body, body.weight.shape[0]).double(), _data(*x)
    kernel, _, _ = factored_gradient_kernel(model, x)
    assert relative_error(kernel, brute_kernel(model, x)) < 1e-12


# -- 2. Users' hooks ----------------------------------------------------------------------------
class PreHookRead(nn.Module):
    """A user's forward pre-hook that reads the module's weight, scaled by a plain attribute (not a
    parameter: no zero to fill in, nothing in the remembered plan's key)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.lin.scale = 0.0
        self.lin.register_forward_pre_hook(lambda m, a: (a[0] + m.scale * F.linear(a[0], m.weight),))

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)))


def test_a_users_pre_hook_reading_the_weight_goes_to_torch_func():
    """Fails on the old code: the graph-based check put the parameter back before the user's
    pre-hooks ran, so their read looked like the module's own; at scale 0 the numerical check
    passed, and with the scale at 0.5 the kernel was 6.5 % off. The pre-hook that puts the
    parameter back now runs last."""
    torch.manual_seed(0)
    model, x = PreHookRead().double(), _data(5, 4)
    with analysis(model):
        assert "lin.weight" in covering_plan(model, (x,)).fallback
    for scale in (0.0, 0.5):
        model.lin.scale = scale
        assert relative_error(gradient_kernel(model, x, engine="factored"), brute_kernel(model, x)) < 1e-12, scale


@pytest.mark.parametrize("module,hook,shape", [
    (nn.Linear(4, 3), lambda m, a, o: o.transpose(1, 2), (5, 6, 4)),
    (nn.LayerNorm(4), lambda m, a, o: o.mean(1), (5, 6, 4)),
], ids=["Linear, transposed output", "LayerNorm, pooled output"])
def test_a_users_forward_hook_reshaping_the_output_is_routed_not_a_crash(module, hook, shape):
    """Fails on the old code: the hooks see the user's hook's output, whose layout is not the
    module's; assembling its factors in the covering check raised (an einsum size mismatch; "The
    size of tensor a (3) must match the size of tensor b (6)") instead of routing the module to
    torch.func."""
    torch.manual_seed(0)
    module.double().register_forward_hook(hook)
    model = nn.Sequential(module, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2, dtype=F64))
    x = _data(*shape)
    model(x)  # the lazy head's size
    with analysis(model):
        plan = covering_plan(model, (x,))
    assert "0.weight" in plan.fallback and [b.name for b in plan.blocks] == ["3"]
    assert relative_error(gradient_kernel(model, x, engine="factored"), brute_kernel(model, x)) < 1e-12


# -- 3. Coverage: configurations the factors do describe, and parametrized weights ------------
class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 3, padding_idx=2), nn.Linear(3, 2)

    def forward(self, i):
        return self.head(torch.tanh(self.emb(i)))


def _sym(lin):
    class Sym(nn.Module):
        def forward(self, w):
            return w + w.T

    torch.nn.utils.parametrize.register_parametrization(lin, "weight", Sym())
    return lin


def _coverage():
    seq = nn.Sequential
    with warnings.catch_warnings():  # the old weight_norm is deprecated (FutureWarning)
        warnings.simplefilter("ignore")
        old_wn = nn.utils.weight_norm(nn.Linear(4, 3))
    wn, sn = nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm
    return {
        "conv1d same, even kernel, dilation": (Pooled(nn.Conv1d(3, 4, 4, padding="same", dilation=2), 4), (4, 3, 9),
                                               ["body", "head"]),
        "conv1d stride, padding": (Pooled(nn.Conv1d(3, 4, 3, stride=2, padding=1), 4), (4, 3, 9), ["body", "head"]),
        "linear on 4-D input": (seq(nn.Linear(5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)), (4, 2, 3, 5), ["0", "3"]),
        "layernorm without bias": (seq(nn.LayerNorm(4, bias=False), nn.Flatten(), nn.Linear(8, 2)), (4, 2, 4), ["0", "2"]),
        "groupnorm on [N, C]": (Pooled(nn.GroupNorm(2, 4), 4), (4, 4), ["body", "head"]),
        "groupnorm on 5-D, layernorm over 3 dims": (seq(nn.GroupNorm(2, 4), nn.LayerNorm([3, 2, 2]), nn.Flatten(),
                                                        nn.Linear(48, 2)), (4, 4, 3, 2, 2), ["0", "1", "3"]),
        "parametrized weight (bias factored)": (Pooled(_sym(nn.Linear(4, 4)), 4), (5, 4), ["body", "head"]),
        "weight_norm parametrization": (Pooled(wn(nn.Linear(4, 3)), 3), (5, 4), ["body", "head"]),
        "old weight_norm (pre-hook)": (Pooled(old_wn, 3), (5, 4), ["body", "head"]),
        "spectral_norm parametrization": (Pooled(sn(nn.Conv2d(2, 3, 3)), 3), (3, 2, 4, 4), ["body", "head"]),
        "embedding on [B] indices": (Tokens(), None, ["emb", "head"]),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # padding="same" with an even kernel
@pytest.mark.parametrize("case", list(_coverage()))
def test_factored_kernel_on_configurations_the_factors_describe(case):
    """Coverage: each configuration keeps its blocks (no needless fallback; a parametrized weight
    goes to torch.func with the module's bias factored) and the kernel equals the brute force."""
    torch.manual_seed(0)
    model, shape, blocks = _coverage()[case]
    model = model.double().eval()
    x = torch.tensor([0, 2, 5, 2, 6]) if shape is None else _data(*shape)
    with analysis(model):
        plan = covering_plan(model, (x,))
    assert [b.name for b in plan.blocks] == blocks
    kernel, _, _ = factored_gradient_kernel(model, x)
    assert relative_error(kernel, brute_kernel(model, x)) < 1e-12


def test_stock_modules_and_their_parametrized_forms_stay_supported():
    """The stock-forward rule leaves the supported classes alone (parametrize swaps the class for a
    subclass that keeps the stock forward), and turns away an instance-level forward. Fails on the
    old code at make_plan only (it kept '3'; the covering check then caught this patch's 2x)."""
    lin = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", nn.Identity())
    patched = nn.Linear(3, 3)
    patched.forward = lambda x: F.linear(x, 2 * patched.weight, patched.bias)
    model = nn.Sequential(nn.Conv1d(3, 3, 1), nn.Flatten(), lin, patched, nn.LayerNorm(3), nn.GroupNorm(1, 3))
    plan = make_plan(model)
    assert [b.name for b in plan.blocks] == ["0", "2", "4", "5"]
    assert {"3.weight", "3.bias"} <= set(plan.fallback)


# -- 4. Loss cotangents -------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_factored_gradient_route_refuses_a_loss_that_is_not_one_per_example(reduction):
    """Fails on the old code: loss_cotangents took whatever loss_fn returned. A batch-reduced loss
    gave every example's gradient divided by B (the factored route's per-example gradients 83 %
    off, B = 6, with one loss), an unreduced [B, d] one B·d losses; the group route refuses both.
    The factored route now refuses them with the same message, and a per-example loss gives what
    the example route gives."""
    from genkernel.core.engine.gradients import group_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = _data(6, 3), _data(6, 2, seed=2)
    params, rows = dict(model.named_parameters()), torch.eye(6, dtype=F64)

    def loss(o, t):
        return ((o - t) ** 2).sum(1)

    bad = (lambda o, t: loss(o, t).mean()) if reduction == "mean" else (lambda o, t: (o - t) ** 2)
    with pytest.raises(ValueError, match="one loss per example"):
        group_gradients(model, params, (x,), y, bad, rows, route="factored")
    got, losses = group_gradients(model, params, (x,), y, loss, rows, route="factored")
    want, _ = group_gradients(model, params, (x,), y, loss, rows, route="example")
    assert losses.shape == (6,)
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14)
