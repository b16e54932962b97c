"""The factored kernel engine against the torch.func reference (genkernel.core.engine.factored)."""

import pytest
import torch
from torch import nn

from genkernel.core.engine.factored import factored_jacobian
from genkernel.core.engine.factors import make_plan
from genkernel.core.engine.kernels import gradient_kernel, tangent_features


class Scale(nn.Module):
    """A custom module with its own parameter: not factorable, handled by torch.func."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3, padding="same")
        self.ln = nn.LayerNorm(5)
        self.scale = Scale(5)
        self.tied = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.bias_only = nn.Linear(5, 5)
        self.bias_only.weight.requires_grad_(False)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2)           # [B, 6, T]
        h = torch.tanh(self.conv(h)).transpose(1, 2)  # [B, T, 5]
        h = self.scale(self.ln(h))
        h = torch.tanh(self.tied(h))
        h = torch.tanh(self.tied(h))                 # a module used twice: positions add up
        h = self.bias_only(h)
        return self.head(h).mean(dim=1)              # [B, 3]


def convnet(dtype):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 4),
    ).to(dtype)


def mlp(dtype):
    return nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)).to(dtype)


def tiny_unet(dtype):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ).to(dtype)
    return model


def _rel_max(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _rel_fro(a, b):
    return float((a - b).norm() / a.norm())


def _cases(dtype):
    g = torch.Generator().manual_seed(0)
    yield "mlp", mlp(dtype), torch.randn(9, 3, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype)
    yield "convnet", convnet(dtype), torch.randn(6, 1, 8, 8, generator=g, dtype=dtype), torch.randn(4, 1, 8, 8, generator=g, dtype=dtype)
    idx1 = torch.randint(0, 11, (6, 7), generator=g)
    idx1[0, :3] = 0
    yield "mixed", Mixed().to(dtype), idx1, torch.randint(0, 11, (4, 7), generator=g)


@pytest.mark.parametrize("reduce", ["trace", "none"])
def test_factored_equals_functional_float64(reduce):
    torch.manual_seed(0)
    for name, model, x1, x2 in _cases(torch.float64):
        for other in (None, x2):
            ref = gradient_kernel(model, x1, other, reduce=reduce, engine="functional")
            fac = gradient_kernel(model, x1, other, reduce=reduce, engine="factored")
            assert _rel_max(ref, fac) < 1e-10, (name, other is None)
    norm_ref = gradient_kernel(model, x1, x2, normalize=True, reduce=reduce, engine="functional")
    norm_fac = gradient_kernel(model, x1, x2, normalize=True, reduce=reduce, engine="factored")
    assert _rel_max(norm_ref, norm_fac) < 1e-10


def test_factored_equals_functional_float32():
    torch.manual_seed(0)
    for name, model, x1, x2 in _cases(torch.float32):
        ref = gradient_kernel(model, x1, x2, engine="functional")
        fac = gradient_kernel(model, x1, x2, engine="factored")
        assert _rel_fro(ref, fac) < 1e-5, name


@pytest.mark.slow
def test_unet_float64_and_float32():
    """A diffusers UNet2DModel (conv, group norm, attention, time embedding): all factored.

    float32 is compared with the float64 reference: torch.func's own float32 kernel of this
    UNet is ~5e-4 off its float64 value on the diagonal, while the factored one is ~1e-7 off.
    """
    model = tiny_unet(torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 700])
    plan = make_plan(model)
    assert plan.factored_fraction == 1.0  # conv, linear, group norm: all factored
    ref = gradient_kernel(model, (x, t), engine="functional")
    fac = gradient_kernel(model, (x, t), engine="factored")
    assert _rel_max(ref, fac) < 1e-10
    model32 = model.float()
    fac32 = gradient_kernel(model32, (x.float(), t), engine="factored")
    assert _rel_fro(ref, fac32.double()) < 1e-5


def test_mixed_plan_and_chunking():
    model = Mixed().double()
    plan = make_plan(model)
    assert set(plan.fallback) == {"scale.scale", "tied.weight", "tied.bias"} or set(plan.fallback) == {"scale.scale"}
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 11, (6, 7), generator=g)
    ref = gradient_kernel(model, x, engine="functional")
    small = gradient_kernel(model, x, engine="factored", memory_budget=60_000)  # several row chunks
    assert _rel_max(ref, small) < 1e-10


def test_tangent_features_from_factors():
    for name, model, x1, _ in _cases(torch.float64):
        ref = tangent_features(model, x1, engine="functional")
        j = factored_jacobian(model, (x1,), list(range(ref.shape[1])))
        assert j.shape == ref.shape
        assert _rel_max(ref, j) < 1e-10, name
        fac = tangent_features(model, x1, engine="factored")
        assert _rel_max(ref, fac) < 1e-10, name


def test_engine_keyword_is_checked():
    with pytest.raises(ValueError, match="engine"):
        gradient_kernel(mlp(torch.float64), torch.zeros(2, 3, dtype=torch.float64), engine="fast")


@pytest.mark.parametrize("groups", [3, 40])  # every row reached (in place); 3 of 40 (by index)
@pytest.mark.parametrize("block_bytes", [8 * 2**20, 8 * 5 * 4])  # one block; blocks of 4 columns and a remainder
def test_add_rows_sums_weighted_gradients_in_float64(groups, block_bytes, monkeypatch):
    from genkernel.core.engine import gradients

    monkeypatch.setattr(gradients, "WIDEN_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(5, 7, 13, generator=g), "b": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    weights = torch.zeros(groups, 5, dtype=torch.float64)
    weights[torch.arange(5) % 3, torch.arange(5)] = torch.randn(5, generator=g, dtype=torch.float64)
    sums = {name: torch.ones((groups, *t.shape[1:]), dtype=torch.float64) for name, t in grads.items()}
    gradients.add_rows(sums, weights, grads)
    for name, t in grads.items():
        flat = t.reshape(5, -1).to(torch.float64)  # float32 values are exact in float64
        exact = 1 + weights @ flat
        bound = 8 * torch.finfo(torch.float64).eps * (1 + weights.abs() @ flat.abs())
        assert sums[name].dtype == torch.float64
        assert bool(((sums[name].reshape(groups, -1) - exact).abs() <= bound).all())
    assert torch.equal(sums["w"][3:], torch.ones_like(sums["w"][3:]))  # rows no example reaches are left alone


@pytest.mark.parametrize("groups", [3, 40])  # every row reached (one batched product); 3 of 40 (by index)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_position_weights_are_summed_into_rows_from_their_factors(groups, dtype):
    """A Linear layer's per-example gradients g_n a_nᵀ go into the rows as (W[r] ⊙ g)ᵀ a from the
    factors widened to float64, never formed: the exact float64 sums to float64 rounding, and the
    sums of the formed gradients (each rounded in the model's dtype first) to that dtype's
    rounding. The bias and a convolution (many positions) take the formed route; rows no example
    reaches are left alone."""
    from genkernel.core.engine import gradients
    from genkernel.core.engine.factors import capture, loss_cotangents, make_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                          nn.Linear(20, 3)).to(dtype)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(5, 6, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype)
    plan = make_plan(model)
    make, _ = loss_cotangents(lambda out, t: ((out - t) ** 2).sum(dim=1), y)
    factors, _ = capture(model, plan, (x,), make)
    assert [f.kind for f in factors] == ["outer"] * 3 and factors[0].a.shape[1] == 1 < factors[1].a.shape[1]
    weights = torch.zeros(groups, 5, dtype=torch.float64)
    weights[torch.arange(5) % 3, torch.arange(5)] = torch.randn(5, generator=g, dtype=torch.float64)
    params = dict(model.named_parameters())
    from_factors = {n: torch.ones((groups, *p.shape), dtype=torch.float64) for n, p in params.items()}
    gradients.add_factor_rows(from_factors, weights, factors)
    formed = {n: torch.ones_like(t) for n, t in from_factors.items()}
    for f in factors:
        gradients.add_rows(formed, weights, {n: v[0] for n, v in f.gradients().items()})
    eps64 = torch.finfo(torch.float64).eps
    for f in (factors[0], factors[2]):  # the two Linear layers, exact in float64 from their factors
        a, grad = (t[:, 0].to(torch.float64) for t in f.weight_outer())
        exact = 1 + torch.einsum("rn,no,ni->roi", weights, grad, a)
        size = 1 + torch.einsum("rn,no,ni->roi", weights.abs(), grad.abs(), a.abs())
        assert bool(((from_factors[f.block.weight] - exact).abs() <= 16 * eps64 * size).all())
    for name in params:
        per_example = torch.cat([v[0] for f in factors for n, v in f.gradients().items() if n == name])
        size = 1 + weights.abs() @ per_example.reshape(5, -1).abs().to(torch.float64)
        bound = 16 * torch.finfo(dtype).eps * size
        assert bool(((from_factors[name] - formed[name]).reshape(groups, -1).abs() <= bound).all()), name
    assert torch.equal(from_factors["0.weight"][3:], torch.ones_like(from_factors["0.weight"][3:]))


def test_group_gradients_from_factors_equal_torch_func():
    from genkernel.core.engine.gradients import group_gradients, membership_matrix

    g = torch.Generator().manual_seed(4)
    for name, model, x1, _ in _cases(torch.float64):
        with torch.no_grad():
            out = model(x1)
        y = torch.randn(out.shape, generator=g, dtype=torch.float64)
        params = dict(model.named_parameters())
        params = {n: p for n, p in params.items() if p.requires_grad}
        groups = torch.arange(x1.shape[0]) % 3
        coef = torch.rand(x1.shape[0], generator=g, dtype=torch.float64)

        def loss_fn(o, t):
            return ((o - t) ** 2).sum(dim=1)

        membership = membership_matrix([groups], coef, [3])
        ref, ref_losses = group_gradients(model, params, (x1,), y, loss_fn, membership, route="example")
        fac, fac_losses = group_gradients(model, params, (x1,), y, loss_fn, membership, route="factored", memory_budget=4_000)
        assert torch.allclose(ref_losses, fac_losses, rtol=1e-12)
        for n in ref:
            assert torch.allclose(ref[n], fac[n], rtol=1e-10, atol=1e-12 * float(ref[n].abs().max())), (name, n)


def test_factored_group_gradients_are_taken_at_the_parameters_passed():
    """group_gradients(params=θ) gives Σ_n W[r, n] ∇ℓ_n(θ) on every route; the factored route ran
    the module at its own parameters instead (and the torch.func part of a mixed plan with the
    blocks' parameters at theirs): off by 6.0 on an MLP, silently."""
    from genkernel.core.engine.gradients import group_gradients, membership_matrix

    g = torch.Generator().manual_seed(5)
    for name, model, x1, _ in _cases(torch.float64):
        with torch.no_grad():
            y = torch.randn(model(x1).shape, generator=g, dtype=torch.float64)
        theta = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
                 for n, p in model.named_parameters() if p.requires_grad}
        membership = membership_matrix([torch.arange(x1.shape[0]) % 2], torch.ones(x1.shape[0], dtype=torch.float64), [2])

        def loss_fn(o, t):
            return ((o - t) ** 2).sum(dim=1)

        before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        ref, ref_losses = group_gradients(model, theta, (x1,), y, loss_fn, membership, route="example")
        fac, fac_losses = group_gradients(model, theta, (x1,), y, loss_fn, membership, route="factored")
        torch.testing.assert_close(fac_losses, ref_losses, rtol=1e-12, atol=0)
        for n in ref:
            torch.testing.assert_close(fac[n], ref[n], rtol=1e-10, atol=1e-12 * float(ref[n].abs().max()), msg=(name, n))
        for n, p in model.named_parameters():  # the module is left as it was: its own tensors, values and no .grad
            assert p is before[n][0] and torch.equal(p, before[n][1]) and p.grad is None, (name, n)
