"""The fast paths of the factored kernel engine against the torch.func reference, in float64.

Each path is exercised where it is taken: compact captures (per-example convolution gradients by
a grouped convolution, linear layers with many positions materialized, T = 1 layers factored),
gradient edges instead of output copies (in-place operations after a module), the covering
check per block (attention keys, whose bias gradient is zero), its per-model memory, the held
side in one or several chunks, the per-pair route, and skipped diagonals. Every kernel equals
``engine="functional"`` to 1e-9 relative (max |Δ| / max |K|).
"""

import pytest
import torch
from torch import nn

from genkernel.core.engine import factors as factors_module
from genkernel.core.engine.factored import chunks, factored_gradient_kernel
from genkernel.core.engine.factors import (
    _conv_weight, _conv_weight_by_groups, _conv_weight_by_unfold, capture, covering_plan, make_plan, output_cotangents,
)
from genkernel.core.engine.kernels import choose_engine, gradient_kernel, kernel_plan

F64 = torch.float64


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


class ConvZoo(nn.Module):
    """Every convolution the compact capture materializes: 2-D with stride, dilation, 1x1 and
    without bias, Conv1d with asymmetric "same" padding, GroupNorm, a Linear over positions
    (T > 1), in-place ReLU and a residual added in place after a module."""

    def __init__(self, d=3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.n1 = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(4, 4, 1, bias=False)
        self.c4 = nn.Conv1d(4, 3, 4, padding="same")
        self.mix = nn.Linear(3, 5)
        self.head = nn.Linear(5, d)

    def forward(self, x):
        h = torch.relu_(self.n1(self.c1(x)))
        h = self.c2(h)
        r = self.c3(h)
        r += h                                            # in place on a module's output
        h = torch.relu_(r).flatten(2)                     # [B, 4, 16]
        h = torch.tanh(self.mix(self.c4(h).transpose(1, 2)))  # [B, 16, 5]: Linear over positions
        return self.head(h.mean(1))


def mlp(d=2):
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, d)).to(F64)


class Readout(nn.Module):
    """A diffusers UNet2DModel's sample reduced to one number per example (a fixed readout)."""

    def __init__(self, unet, size):
        super().__init__()
        self.unet = unet
        self.register_buffer("w", torch.randn(size, generator=torch.Generator().manual_seed(3), dtype=F64))

    def forward(self, x, t):
        return self.unet(x, t).sample.flatten(1) @ self.w[:, None]


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ).to(F64)


def _batches(name):
    g = torch.Generator().manual_seed(1)
    if name == "convnet":
        return torch.randn(5, 2, 8, 8, generator=g, dtype=F64), torch.randn(3, 2, 8, 8, generator=g, dtype=F64)
    if name == "mlp":
        return torch.randn(6, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    x1 = (torch.randn(3, 1, 8, 8, generator=g, dtype=F64), torch.tensor([1, 400, 900]))
    return x1, (torch.randn(2, 1, 8, 8, generator=g, dtype=F64), torch.tensor([5, 50]))


def _model(name):
    torch.manual_seed(0)
    if name == "convnet":
        return ConvZoo().to(F64)
    if name == "mlp":
        return mlp()
    return Readout(tiny_unet(), 64)


@pytest.mark.parametrize("name", ["convnet", "mlp", "unet"])
def test_fast_paths_equal_the_functional_reference(name):
    """x1 against x2 (trace, auto), x1 against itself (blocks, factored), normalized (auto)."""
    model = _model(name)
    x1, x2 = _batches(name)
    assert choose_engine(make_plan(model), 1) == "factored"
    for other, reduce, engine, normalize in ((x2, "trace", "auto", False), (None, "none", "factored", False),
                                             (x2, "trace", "auto", True)):
        ref = gradient_kernel(model, x1, other, reduce=reduce, normalize=normalize, engine="functional")
        got = gradient_kernel(model, x1, other, reduce=reduce, normalize=normalize, engine=engine)
        assert got.shape == ref.shape and _rel(ref, got) < 1e-9, (reduce, engine, normalize)


def test_unet_attention_keys_stay_factored():
    """The key projection's bias has a zero gradient (softmax ignores a shift shared by all
    keys): checked per block, to_k is covered, and nothing of the UNet goes to torch.func."""
    model = _model("unet")
    x1, _ = _batches("unet")
    plan = covering_plan(model, x1)
    assert plan.factored_fraction == 1.0 and not plan.fallback
    assert any(b.name.endswith("to_k") for b in plan.blocks)


def test_conv_per_example_weights_grouped_unfolded_and_autograd_agree():
    g = torch.Generator().manual_seed(2)
    convs = [
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 4, padding="same"), nn.Conv1d(3, 4, 4, padding="same"),
        nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding="valid"), nn.Conv1d(3, 4, 1, padding="same", bias=False),
        nn.Conv2d(3, 4, 1, stride=2),
    ]
    for conv in convs:
        conv = conv.to(F64)
        shape = (4, 3, 9, 7) if isinstance(conv, nn.Conv2d) else (4, 3, 11)
        x = torch.randn(shape, generator=g, dtype=F64)
        out = conv(x)
        e = torch.randn(out.shape, generator=g, dtype=F64)
        loop = torch.stack([torch.autograd.grad((conv(x[i : i + 1]) * e[i : i + 1]).sum(), conv.weight)[0].reshape(-1)
                            for i in range(x.shape[0])])
        grouped, unfolded = _conv_weight_by_groups(conv, x, e), _conv_weight_by_unfold(conv, x, e)
        torch.testing.assert_close(grouped, loop, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(unfolded, loop, rtol=1e-10, atol=1e-12)
        # the one capture uses: every cotangent in one pass (c = 3, the first e)
        cotangents = torch.stack([e, torch.randn(out.shape, generator=g, dtype=F64), -2 * e.flip(0)])
        together = _conv_weight(conv, x, cotangents)
        assert together.shape == (3, *loop.shape)
        for k, ek in enumerate(cotangents):
            by_example = torch.stack([torch.autograd.grad((conv(x[i : i + 1]) * ek[i : i + 1]).sum(), conv.weight)[0]
                                      .reshape(-1) for i in range(x.shape[0])])
            torch.testing.assert_close(together[k], by_example, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["compact", "lean"])
@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_materialized_captures_give_the_same_pair_kernels(name, form):
    """capture(form=...) against the outer form, per block, d = 3 cotangents, both reductions, and
    the mixed pairs (a materialized block against an outer one: the factored tracker route's
    batch against its probes)."""
    model = _model(name) if name == "mlp" else ConvZoo(d=3).to(F64)
    x1, x2 = _batches(name)
    plan = covering_plan(model, (x1,))
    outer, _ = capture(model, plan, (x1,), output_cotangents([0, 1]))
    materialized, _ = capture(model, plan, (x1,), output_cotangents([0, 1]), form=form)
    other, _ = capture(model, plan, (x2,), output_cotangents([1, 0]))
    kinds = set()
    for f, c, o in zip(outer, materialized, other):
        kinds.add((f.kind, c.kind))
        if form == "lean":
            assert c.nbytes <= f.nbytes, f.block.name
        for reduce in ("trace", "none"):
            torch.testing.assert_close(c.pair_kernel(c, reduce), f.pair_kernel(f, reduce), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(c.self_kernel(reduce), f.self_kernel(reduce), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(f.compact().pair_kernel(f.compact(), reduce), f.pair_kernel(f, reduce),
                                       rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(o.pair_kernel(c, reduce), o.pair_kernel(f, reduce), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(c.pair_kernel(o, reduce), f.pair_kernel(o, reduce), rtol=1e-12, atol=1e-14)
        for name_, total in f.totals().items():
            torch.testing.assert_close(c.totals()[name_], total, rtol=1e-12, atol=1e-14)
    if name == "convnet":
        assert ("outer", "dense") in kinds  # positions materialized
    assert ("outer", "outer") in kinds  # T = 1 layers stay factored


def test_lean_captures_materialize_only_what_is_no_larger():
    """A convolution whose per-example gradients cost fewer operations than the T² form but take
    more memory than its factors (16 positions, 16 -> 64 channels: 9280 values against 3344) stays
    outer under "lean" and is materialized under "compact"; a cheap one (1 -> 16 channels at the
    same 16 positions: 160 against 416) is materialized under both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 64, 3, padding=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(64 * 16, 1)).to(F64)
    x = torch.randn(5, 1, 4, 4, dtype=F64)
    plan = covering_plan(model, (x,))
    kinds = {form: [f.kind for f in capture(model, plan, (x,), output_cotangents([0]), form=form)[0]]
             for form in ("outer", "compact", "lean")}
    assert kinds == {"outer": ["outer"] * 3, "compact": ["dense", "dense", "outer"], "lean": ["dense", "outer", "outer"]}
    with pytest.raises(ValueError, match="form must be one of"):
        capture(model, plan, (x,), output_cotangents([0]), form="dense")


def test_small_budgets_take_the_chunked_routes():
    """The held side in several chunks, and the per-pair route when it does not fit."""
    x1, x2 = _batches("convnet")
    # d = 3 blocks under 400 kB: fewer cotangents than outputs fit, so factors are recomputed
    # per pair of row chunks (all d cotangents at once, as blocks need).
    model = ConvZoo().to(F64)
    ref = gradient_kernel(model, x1, x2, reduce="none", engine="functional")
    assert _rel(ref, gradient_kernel(model, x1, x2, reduce="none", engine="factored", memory_budget=400_000)) < 1e-9
    # d = 1 under 40 kB: one example per capture, x2 held in three chunks.
    model = ConvZoo(d=1).to(F64)
    ref = gradient_kernel(model, x1, x2, engine="functional")
    assert kernel_plan(model, x1, memory_budget=40_000).rows == 1
    assert _rel(ref, gradient_kernel(model, x1, x2, engine="factored", memory_budget=40_000)) < 1e-9


def test_diagonals_only_when_asked():
    model = mlp()
    x1, x2 = _batches("mlp")
    kernel, d1, d2 = factored_gradient_kernel(model, x1, x2, diagonals=False)
    assert d1 is None and d2 is None
    full, d1, d2 = factored_gradient_kernel(model, x1, x2)
    torch.testing.assert_close(kernel, full)
    torch.testing.assert_close(d1, gradient_kernel(model, x1, engine="functional").diagonal())


def test_covering_check_runs_once_per_model_structure_and_inputs(monkeypatch):
    model = mlp()
    x1, x2 = _batches("mlp")
    calls = []
    real = factors_module._uncovered_blocks
    monkeypatch.setattr(factors_module, "_uncovered_blocks", lambda *a: calls.append(1) or real(*a))
    covering_plan(model, (x1,))
    covering_plan(model, (x2,))  # same per-example shapes: remembered
    assert len(calls) == 1
    handle = model[2].register_forward_hook(lambda m, a, o: None)  # a new hook: checked again
    covering_plan(model, (x1,))
    assert len(calls) == 2
    handle.remove()
    model[2] = nn.Linear(16, 16).to(F64)  # a replaced module: checked again
    covering_plan(model, (x1,))
    assert len(calls) == 3
    covering_plan(model, (x1[:, None].expand(-1, 2, -1).contiguous(),))  # another per-example shape: checked again
    assert len(calls) == 4


def test_kernel_plan_reports_what_the_kernel_runs():
    model = ConvZoo().to(F64)
    x1, _ = _batches("convnet")
    plan = kernel_plan(model, x1)
    assert plan.engine == "factored" and plan.cotangents == plan.outputs == 3 and plan.rows == 5
    assert kernel_plan(model, x1, engine="functional").engine == "functional"


def test_chunks_are_balanced():
    assert [s.stop - s.start for s in chunks(256, 236)] == [128, 128]
    assert [s.stop - s.start for s in chunks(10, 3)] == [3, 3, 2, 2]
    assert [s.stop - s.start for s in chunks(5, 8)] == [5]
    assert list(chunks(0, 4)) == []


class Scaled(nn.Module):
    """A model times a parameter of its own: a parameter the factored engine leaves to torch.func."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.scale = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x):
        return self.body(x) * self.scale


def test_auto_counts_the_torch_func_pass_of_a_fallback():
    """With a fallback, factored costs one more pass: auto takes it where the layers kept
    factored save more (a wide MLP, enough pairs), not for a convnet (its layers materialize)."""
    from genkernel.core.engine.factored import _probe_sizes

    g = torch.Generator().manual_seed(5)
    wide = Scaled(nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))).to(F64)
    conv = Scaled(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))).to(F64)
    for model, x, rows, want in ((wide, torch.randn(8, 8, generator=g, dtype=F64), (8, 8), "factored"),
                                 (wide, torch.randn(2, 8, generator=g, dtype=F64), (2, 2), "functional"),
                                 (conv, torch.randn(8, 1, 6, 6, generator=g, dtype=F64), (8, 8), "functional")):
        plan = covering_plan(model, (x,))
        assert list(plan.fallback) == ["scale"]
        assert choose_engine(plan, 1, rows=rows, sizes=_probe_sizes(model, plan, (x,))) == want
        assert kernel_plan(model, x).engine == want
        ref = gradient_kernel(model, x, engine="functional")
        assert _rel(ref, gradient_kernel(model, x, engine="auto")) < 1e-9
