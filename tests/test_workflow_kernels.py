"""Gradient kernels, tangent features and sketches used as a neural-tangents user would, against a
float64 brute force (one torch.autograd.grad per example and output): what they must compute
exactly, and what they must refuse."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.core import gradient_kernel, tangent_features
from genkernel.core.engine.projections import sketched_gradient_kernel

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINES = ("auto", "factored", "functional")


def brute_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[M, d, P]`` float64: per example and output, torch.autograd.grad over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        grads = [torch.autograd.grad(out[o], params, retain_graph=True) for o in range(out.numel())]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]).double() for gs in grads]))
    return torch.stack(rows)


class NoisyMLP(nn.Module):
    """Randomness eval mode does not switch off: F.dropout with its default training=True (or a
    generator's noise injection)."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.o(F.dropout(torch.tanh(self.a(x)), 0.5))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_random_eval_forward_is_refused(engine):
    # Old: no error, each example's Jacobian at its own dropout mask (two calls on the same
    # inputs differed by 6.4 with engine="auto").
    torch.manual_seed(0)
    model, x = NoisyMLP().double(), torch.randn(4, 3, dtype=torch.float64)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="not deterministic in eval mode"):
        gradient_kernel(model, x, engine=engine)
    with pytest.raises(ValueError, match="not deterministic in eval mode"):
        tangent_features(model, x, engine=engine)
    with pytest.raises(ValueError, match="not deterministic in eval mode"):
        sketched_gradient_kernel(model, x, k=4, engine=engine)
    assert torch.equal(state, torch.get_rng_state())  # the check draws from a forked stream
    # Not refused: dropout as a module, which eval mode switches off.
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    j = brute_jacobian(model.eval(), x)
    torch.testing.assert_close(gradient_kernel(model, x, engine=engine), torch.einsum("mdp,ndp->mn", j, j),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_kernels_under_autocast_are_full_precision(engine):
    # Old: under torch.autocast("cpu", bfloat16) (a mixed-precision validation step) the float32
    # kernel came out 2.5e-3 (factored) and 1.9e-3 (functional) off, silently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    x1, x2 = torch.randn(5, 8), torch.randn(3, 8)
    reference = copy.deepcopy(model).double()
    j1, j2 = brute_jacobian(reference, x1.double()), brute_jacobian(reference, x2.double())
    exact = torch.einsum("mdp,ndp->mn", j1, j2)
    plain_sketch = sketched_gradient_kernel(model, x1, x2, k=16, seed=1, engine=engine)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel = gradient_kernel(model, x1, x2, engine=engine)
        features = tangent_features(model, x1, engine=engine)
        sketch = sketched_gradient_kernel(model, x1, x2, k=16, seed=1, engine=engine)
        assert torch.is_autocast_enabled("cpu")  # left as it was
    assert kernel.dtype == torch.float32
    assert float((kernel.double() - exact).norm() / exact.norm()) < 1e-5
    assert float((features.double() - j1).norm() / j1.norm()) < 1e-5
    torch.testing.assert_close(sketch, plain_sketch, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("engine", ENGINES)
def test_kernels_of_a_forward_wrapped_in_autocast_by_accelerate_are_full_precision(engine):
    # Accelerator(mixed_precision="bf16").prepare(model) keeps the forward as _original_forward and
    # puts an autocast wrapper (outputs cast back to float32) in its place. Old: the kernel of such a
    # model was 2.3e-3 (auto) and 1.6e-3 (functional) off, silently (measured with accelerate itself).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(5, 8)
    j = brute_jacobian(copy.deepcopy(model).double(), x.double())
    exact = torch.einsum("mdp,ndp->mn", j, j)
    original = model.forward

    def mixed_precision_forward(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(*args).float()

    model._original_forward, model.forward = original, mixed_precision_forward
    kernel = gradient_kernel(model, x, engine=engine)
    assert float((kernel.double() - exact).norm() / exact.norm()) < 1e-5
    features = tangent_features(model, x, engine=engine)
    assert float((features.double() - j).norm() / j.norm()) < 1e-5
    assert model.forward is mixed_precision_forward  # training keeps its mixed precision
    assert model(x).dtype == torch.float32 and torch.is_grad_enabled()


class SwitchRecorder(nn.Module):
    """Records torch's TF32 switches in every forward."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(3, 4), nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
        return self.o(torch.tanh(self.a(x)))


def test_passes_run_without_tf32_and_the_switches_are_restored():
    # Old: a float32 model on a GPU ran its convolutions in TF32 (cuDNN's default) and its matrix
    # products at the caller's float32_matmul_precision, silently (measured on an H200: a small conv
    # net's factored kernel 9.5e-6 off the float64 one, 1.5e-7 with TF32 off).
    model, x = SwitchRecorder(), torch.randn(3, 3)
    previous = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        gradient_kernel(model, x, engine="factored")
        tangent_features(model, x, engine="functional")
        sketched_gradient_kernel(model, x, k=4)
        after = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    finally:
        torch.backends.cudnn.allow_tf32 = previous[0]
        torch.set_float32_matmul_precision(previous[1])
    assert model.seen and set(model.seen) == {(False, "highest")}
    assert after == (True, "high")


class NoiseInjection(nn.Module):
    """StyleGAN's noise injection: x + w · noise, w starting at zero (the output is repeatable at
    initialization, its gradient with respect to w, the noise, is not)."""

    def __init__(self):
        super().__init__()
        self.a, self.weight, self.o = nn.Linear(3, 8), nn.Parameter(torch.zeros(1)), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.o(h + self.weight * torch.randn_like(h))


@pytest.mark.parametrize("engine", ENGINES)
def test_noise_injection_with_a_zero_weight_is_refused(engine):
    # Old: no error; the kernel's noise-weight part was drawn afresh in every pass.
    torch.manual_seed(0)
    model, x = NoiseInjection().double(), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not deterministic in eval mode"):
        gradient_kernel(model, x, engine=engine)
    with pytest.raises(ValueError, match="not deterministic in eval mode"):
        tangent_features(model, x, engine=engine)


def test_per_example_jacobians_through_prelu_when_the_batch_size_equals_the_outputs():
    # torch.func's vmap(jacrev(f)) through F.prelu gives wrong per-example Jacobians, without an
    # error, when the batch size equals the number of outputs (and raises for other sizes). Old:
    # a cross kernel against 2 examples of an SRGAN-style PReLU block with 2 outputs was 1.1e-1
    # (functional) and 1.4e-2 (factored, its torch.func fallback) off; tangent features 0.36.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.PReLU(), nn.Linear(6, 2)).double()
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    j1, j2 = brute_jacobian(model, x1), brute_jacobian(model, x2)
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        features = tangent_features(model, x2, engine="functional")
    torch.testing.assert_close(features, j2, rtol=1e-10, atol=1e-12)
    for engine in ENGINES:
        torch.testing.assert_close(gradient_kernel(model, x1, x2, engine=engine), torch.einsum("mdp,ndp->mn", j1, j2),
                                   rtol=1e-10, atol=1e-12)


def _batch_size(x: torch.Tensor) -> int | None:
    """The size of the vmapped dimension of ``x`` inside ``vmap`` (None outside it)."""
    if not torch._C._functorch.is_batchedtensor(x):
        return None
    return torch._C._functorch.get_unwrapped(x).shape[torch._C._functorch.maybe_get_bdim(x)]


def test_a_per_example_function_that_runs_only_under_vmap_is_checked_against_a_batch_of_one():
    # On CUDA (torch 2.11) jacrev of one UNet example raised "NYI: querying is_contiguous inside
    # of vmap" while the batched call ran; the agreement check called it alone and failed the step.
    from genkernel.core.engine.reference import per_example

    def only_batched(x):
        if _batch_size(x) is None:
            raise RuntimeError("NYI: querying is_contiguous inside of vmap for memory_format other than contiguous")
        return 2 * x

    x = torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(per_example(only_batched, (0,))(x), 2 * x, rtol=0, atol=0)

    def wrong_for_batches_of_several(x):  # right in a batch of one, wrong otherwise
        if _batch_size(x) is None:
            raise RuntimeError("NYI: only under vmap")
        return 2 * x if _batch_size(x) == 1 else 3 * x

    with pytest.warns(RuntimeWarning, match="one example at a time"):
        torch.testing.assert_close(per_example(wrong_for_batches_of_several, (0,))(x), 2 * x, rtol=0, atol=0)
