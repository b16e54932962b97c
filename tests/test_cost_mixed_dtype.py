"""Models whose parameters are of mixed dtype (a float64 head on a float32 trunk, float32 norm layers in a half
model, a LoRA adapter in another dtype than its base): the cost estimate and the engines count every
parameter-sized array in its own parameter's dtype (genkernel.core.param_bytes), where they took the first
parameter's item size and dtype for all before. On a float64 8-4-512-512-1 MLP whose first Linear was float32 the
estimate's training step was 2.1 MB for 4.25 MB (the parameters 99.99 % float64), with a rounding sample only a
float32 model needs, and tangent_features / gradient_kernel returned float32 values of float64 Jacobians."""

import pytest
import torch
from torch import nn

from genkernel.core.cost import estimate_cost
from genkernel.core.engine.kernels import _functional_rows, gradient_kernel, tangent_features
from genkernel.core.engine.reference import per_example_jacobian

F32, F64 = torch.float32, torch.float64


class Gain(nn.Module):
    """h ⊙ gain, in the gain's dtype, returned as float64 (no layer block of the plan: its parameter is a fallback)."""

    def __init__(self, gain: torch.Tensor):
        super().__init__()
        self.gain = nn.Parameter(gain)

    def forward(self, h):
        return (h.to(self.gain.dtype) * self.gain).to(F64)


class Mixed(nn.Module):
    """A tanh MLP 8 -> 4 -> 64 -> 64 -> 1 whose Linears have the given dtypes, each layer's input cast to its own
    dtype and the output to float64. ``head_first`` registers the layers in reverse order (which parameter is first
    changes, the function does not); ``gain``: the dtype of an elementwise gain on the second layer's output (None:
    no gain)."""

    def __init__(self, dtypes, head_first: bool = False, gain=None, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        sizes = [(8, 4), (4, 64), (64, 64), (64, 1)]
        layers = []
        for (i, o), dtype in zip(sizes, dtypes):
            layer = nn.Linear(i, o, dtype=F64)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(o, i, generator=gen, dtype=F64) / i ** 0.5)
                layer.bias.copy_(torch.randn(o, generator=gen, dtype=F64) * 0.1)
            layers.append(layer.to(dtype))
        self.names = [f"l{k}" for k in range(len(layers))]
        for k in (reversed(range(len(layers))) if head_first else range(len(layers))):
            self.add_module(self.names[k], layers[k])
        # (in a module of its own, registered after the layers: a parameter of the root would come first)
        self.scale = None if gain is None else Gain((1 + 0.1 * torch.randn(64, generator=gen, dtype=F64)).to(gain))

    def forward(self, x):
        h = x
        for k, name in enumerate(self.names):
            layer = getattr(self, name)
            h = layer(h.to(layer.weight.dtype)).to(F64)
            if k == 1 and self.scale is not None:
                h = self.scale(h)
            if k < len(self.names) - 1:
                h = torch.tanh(h)
        return h



PROBES = (torch.randn(6, 8, generator=torch.Generator().manual_seed(1), dtype=F64),)


def _estimate(model, optimizer, **kwargs):
    torch.manual_seed(0)
    return estimate_cost(model, optimizer, PROBES, outputs=1, rows=5, **kwargs)


def _bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtypes", [(F32, F64, F64, F64), (F64, F64, F64, F32), (F64, F32, F64, F32)])
def test_a_mixed_models_parameter_sized_parts_are_its_arrays_bytes(dtypes):
    """Adam, dense route, graph rows: training_step = θ + their gradients + Adam's two moments, each array in its
    parameter's dtype (brute force: Σ numel × element_size); parameter_copies = (2 + nodes) θ-sized copies + the
    state; push_tangents = the pushed rows (rows + 1) of the parameters that are not float64 (the splitter's rows'
    dtype), in theirs; the rounding sample (two backward rows more, P float64 values) because a float32 parameter is
    there. Before, the first parameter's item size counted every value (a float32 first layer: half the training
    step), and the rounding sample existed only where the first parameter was float32."""
    model = Mixed(dtypes)
    total = _bytes(model)
    num = sum(p.numel() for p in model.parameters())
    narrow = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype != F64)
    cost = _estimate(model, torch.optim.Adam(model.parameters(), lr=1e-3), quadrature_nodes=2)
    assert cost.memory["training_step"] == 2 * total + 2 * total
    assert cost.memory["parameter_copies"] == (2 + 2) * total + 2 * total
    assert cost.memory["push_tangents"] == (5 + 1) * narrow
    assert cost.memory["rounding_sample"] == num * 8


def test_the_training_step_is_what_an_adam_step_allocates():
    """Measured: after one real Adam step of the mixed model (its first Linear float32, the rest float64), the
    parameters, their .grad and Adam's state tensors (the 0-dim step counts left out) hold exactly the estimate's
    training_step, 146016 bytes (before: 73296, half of it)."""
    model = Mixed((F32, F64, F64, F64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cost = _estimate(model, optimizer)
    model(PROBES[0]).pow(2).sum().backward()
    optimizer.step()
    held = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in model.parameters())
    held += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert cost.memory["training_step"] == held


@pytest.mark.parametrize("group_state", ["dense", "factored"])
def test_the_estimate_does_not_depend_on_which_parameter_comes_first(group_state):
    """The same function and dtypes per layer (a float32 input layer, the rest float64), the layers registered in
    the other order: every memory part and the work agree (before: training_step 36648 vs 73296 bytes, the
    activations, copies, pushes and held factors differing too)."""
    estimates = []
    for head_first in (False, True):
        model = Mixed((F32, F64, F64, F64), head_first=head_first)
        first = next(model.parameters()).dtype
        assert first == (F64 if head_first else F32)
        estimates.append(_estimate(model, torch.optim.SGD(model.parameters(), lr=0.1), group_state=group_state))
    a, b = estimates
    assert a.memory == b.memory
    assert a.work == pytest.approx(b.work, rel=1e-12)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_single_dtype_numbers_are_the_item_size_rule(dtype):
    """coverage: passes before. One dtype: the parameter-sized parts are numel × that item size, as they were, and
    the rounding sample only for float32."""
    model = Mixed((dtype,) * 4)
    num = sum(p.numel() for p in model.parameters())
    s = torch.empty((), dtype=dtype).element_size()
    cost = _estimate(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    assert cost.memory["training_step"] == (2 * num + 2 * num) * s
    assert cost.memory["parameter_copies"] == (2 + 1) * num * s + 2 * num * s
    assert cost.memory.get("push_tangents", 0) == (0 if dtype == F64 else 6 * num * s)
    assert cost.memory.get("rounding_sample", 0) == (num * 8 if dtype == F32 else 0)


def test_float32_state_is_not_suggested_for_a_model_with_float64_parameters():
    """A float32 first layer on a float64 model: the estimate's cheaper options do not offer state_dtype=float32
    ("halves the group arrays of a float32 model"), which would round the float64 parameters' group state (before:
    offered, from the first parameter's item size); a float32 model still gets it."""
    mixed = Mixed((F32, F64, F64, F64))
    cost = _estimate(mixed, torch.optim.Adam(mixed.parameters(), lr=1e-3))
    assert not any("state_dtype=torch.float32" in option for option in cost.cheaper)
    single = Mixed((F32,) * 4)
    cost = _estimate(single, torch.optim.Adam(single.parameters(), lr=1e-3))
    assert any("state_dtype=torch.float32" in option for option in cost.cheaper)


def test_the_functional_engines_chunks_count_each_parameters_bytes():
    """Rows of the functional engine's Jacobian chunks: the budget over 2 chunks of 2 d Σ numel × element_size
    (brute force): 8 rows at 100 × the parameters' bytes (before: the float32 first layer's 4 bytes for every value,
    16 rows, twice what fits)."""
    model = Mixed((F32, F64, F64, F64))
    params = dict(model.named_parameters())
    budget = 100 * _bytes(model)
    assert _functional_rows(params, 3, budget) == budget // (2 * 2 * 3 * _bytes(model)) == 8


@pytest.mark.parametrize("engine", ["functional", "factored"])
def test_features_and_kernels_of_a_mixed_model_keep_the_float64_jacobians(engine):
    """tangent_features and gradient_kernel of a model whose first Linear is float32 and the rest float64: float64
    (the dtypes joined), the float64 parameters' columns equal to the per-example Jacobians' brute force to 1e-13,
    the kernel to J Jᵀ (before: float32, the float64 head's Jacobians rounded, 2e-8 off). The float32 layer's own
    columns are float32 values either way, and the factored engine's differ from autograd's float32 backward by its
    rounding (as before this change, when both engines returned float32: at most 1.4 eps32 of an example's largest
    value in the block, 8e-7 of one small element), so they are held per example to 4 eps32 of the block's norm,
    and the kernel's share of them to twice that of the blocks' norms' product."""
    model = Mixed((F32, F64, F64, F64))
    x = PROBES[0]
    params = dict(model.named_parameters())
    narrow = sum(p.numel() for p in params.values() if p.dtype == F32)  # the first layer's columns come first
    assert all(p.dtype == F32 for p in list(params.values())[:2])
    jac = per_example_jacobian(model, params)(x).to(F64)  # [M, 1, P]
    eps32 = torch.finfo(F32).eps
    features = tangent_features(model, x, engine=engine)
    assert features.dtype == F64
    torch.testing.assert_close(features[..., narrow:], jac[..., narrow:], rtol=1e-13, atol=1e-15)
    block = jac[:, 0, :narrow].norm(dim=1)  # [M]: each example's norm over the float32 layer's columns
    assert bool(((features - jac)[:, 0, :narrow].norm(dim=1) <= 4 * eps32 * block).all())
    kernel = gradient_kernel(model, x, engine=engine)
    assert kernel.dtype == F64
    flat = jac[:, 0]
    bound = 8 * eps32 * block[:, None] * block[None, :] + 1e-12 * (flat.abs() @ flat.abs().T)
    assert bool(((kernel - flat @ flat.T).abs() <= bound).all())


def test_param_bytes_helpers_against_brute_force():
    """coverage: a new module. parameter_bytes, value_bytes (an int for one dtype, else bytes over values),
    joined_itemsize (torch.cat's promotion) and trains_float32 on hand-made lists."""
    from genkernel.core import param_bytes

    a, b, c = torch.zeros(3, 5, dtype=F32), torch.zeros(7, dtype=F64), torch.zeros(4, dtype=torch.bfloat16)
    assert param_bytes.parameter_bytes([a, b, c]) == 15 * 4 + 7 * 8 + 4 * 2
    assert param_bytes.value_bytes([a, b, c]) == pytest.approx((15 * 4 + 7 * 8 + 4 * 2) / 26)
    assert param_bytes.value_bytes({"a": a}) == 4 and isinstance(param_bytes.value_bytes([a]), int)
    assert param_bytes.value_bytes([]) == 4
    assert param_bytes.joined_itemsize([a, b]) == torch.cat([a.reshape(-1), b]).element_size() == 8
    assert param_bytes.joined_itemsize([c, torch.zeros(2, dtype=torch.float16)]) == 4
    assert param_bytes.trains_float32([b, a]) and not param_bytes.trains_float32([b, c])
