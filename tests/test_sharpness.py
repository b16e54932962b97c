"""loss_sharpness against closed forms and a brute-force Hessian."""

import numpy as np
import pytest
import torch
from torch import nn

from genkernel.analysis.sharpness import loss_sharpness
from genkernel.supervised import mse_loss


def test_linear_regression_sharpness_is_twice_the_top_eigenvalue_of_the_input_second_moment():
    # L(w) = mean_n (w·x_n − y_n)²  has Hessian (2/B) XᵀX, whatever w and y.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, 6, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    expected = np.linalg.eigvalsh(2 / 20 * (x.T @ x).numpy()).max()
    assert loss_sharpness(model, mse_loss, x, y) == pytest.approx(expected, rel=1e-9)


def test_mlp_sharpness_matches_the_largest_eigenvalue_of_the_full_hessian():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.linspace(-3, 3, 10, dtype=torch.float64)[:, None]
    y = torch.sin(x).reshape(-1)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(vector):
        pieces = torch.split(vector, [int(np.prod(s)) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)}
        return mse_loss(torch.func.functional_call(model, params, (x,)), y).mean()

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    expected = float(torch.linalg.eigvalsh(hessian).max())
    assert loss_sharpness(model, mse_loss, x, y) == pytest.approx(expected, rel=1e-8)
    # Frozen parameters are held fixed: the Hessian over the rest only.
    model[0].weight.requires_grad_(False)
    rest = torch.ones_like(flat, dtype=torch.bool)
    rest[: model[0].weight.numel()] = False
    expected_rest = float(torch.linalg.eigvalsh(hessian[rest][:, rest]).max())
    assert loss_sharpness(model, mse_loss, x, y) == pytest.approx(expected_rest, rel=1e-8)


def test_a_model_without_trainable_parameters_is_refused():
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        loss_sharpness(model, mse_loss, torch.randn(4, 2), torch.randn(4))
    with pytest.raises(TypeError, match="nn.Module"):
        loss_sharpness(lambda x: x, mse_loss, torch.randn(4, 2), torch.randn(4))
