"""Kernels of a model whose eval-mode forward writes its buffers (a call counter, a QAT FakeQuantize observer):
every analysis pass wrote the model's own buffers (one gradient_kernel call advanced a counter 10 times; a QAT
model's scale and observer range moved, and then the call was refused as "not deterministic ... noise injection,
dropout"), so the analysis changed the model. Now refused before any write, naming the buffers.

normalize_kernel(kernel [M, N], diag1) with diag2 left out took diag1 for the columns: a [4, 1] cross kernel came
back [4, 4] with |k̂| > 1, silently; diagonals that do not fit the kernel raised torch's broadcasting RuntimeError."""
import pytest
import torch
from torch import nn

from genkernel import gradient_kernel, normalize_kernel, tangent_features


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("engine", ["auto", "factored", "functional"])
def test_a_forward_writing_its_buffers_is_refused_and_the_model_is_left_as_it_was(engine):
    torch.manual_seed(0)
    model = Counter()
    with pytest.raises(ValueError, match=r"writes its buffers \['calls'\]"):
        gradient_kernel(model, torch.randn(4, 3), engine=engine)
    with pytest.raises(ValueError, match=r"writes its buffers \['calls'\]"):
        tangent_features(model, torch.randn(4, 3), engine=engine)
    assert float(model.calls) == 0.0


def test_a_qat_observer_is_refused_and_its_range_kept():
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, disable_observer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), FakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255),
                          nn.Linear(4, 1))
    model(torch.randn(16, 3))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="writes its buffers"):
        gradient_kernel(model, 3 * torch.randn(6, 3))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.apply(disable_observer)  # the fix the message names
    assert gradient_kernel(model, torch.randn(6, 3)).shape == (6, 6)


def test_normalize_kernel_refuses_diagonals_that_do_not_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    kernel = gradient_kernel(model, x1, x2)
    d1, d2 = gradient_kernel(model, x1).diagonal(), gradient_kernel(model, x2).diagonal()
    torch.testing.assert_close(normalize_kernel(kernel, d1, d2), gradient_kernel(model, x1, x2, normalize=True))
    with pytest.raises(ValueError, match="needs both diagonals"):
        normalize_kernel(kernel, d1)  # before: a [4, 4] result with |k̂| > 1
    with pytest.raises(ValueError, match="do not fit a 4×1 kernel"):
        normalize_kernel(kernel, d1[:3], d2)
