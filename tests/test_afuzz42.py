"""Option-space fuzz findings (helper "afuzz"): the public kernel and analysis functions under the options
and contexts a caller passes them, against brute force written here (float64 models, dense Hessians).

The kernel functions (``gradient_kernel``, ``tangent_features``, the sketches) and ``loss_sharpness`` run in the
model's own precision whatever autocast a caller has on (:func:`genkernel.core.adapter.full_precision`); the
Hutchinson functions of :mod:`genkernel.analysis.hutchinson` did not: under a caller's ``torch.autocast`` (a
mixed-precision training or validation step) every Hessian-vector product, quadratic form and Itô term was taken
in bfloat16 and returned as float64, 5e-3 to 1.1e-2 relative off the float32 model's own values (1e-7 without),
silently, against the module's promise that derivatives are computed in the parameters' dtype.

torch.func's per-example results are checked on one example against a pass of that example alone; the check's
tolerance was the last result's dtype's, 1e-8 once a float64 leaf came, so a float32 body under a float64 head
(float32 rounding, 1e-7) was taken for a batching-rule error: every Jacobian was then formed one example at a time
(48x slower at 128 examples) with a warning naming a fault that was not there.

``kernel_plan(..., rows_total=...)`` took any value: 0, -5, 2.5 or True planned chunks of that many rows.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from genkernel.analysis import hutchinson as hu
from genkernel.core.engine import gradient_kernel, kernel_plan, tangent_features

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def _flat(values) -> torch.Tensor:
    if isinstance(values, tuple):  # (mean, stderr)
        values = values[0]
    if isinstance(values, dict):
        return torch.cat([t.reshape(-1) for t in values.values()])
    return values.reshape(-1)


def _f64(d: dict) -> dict:
    return {k: t.double() for k, t in d.items()}


CALLS = {
    "hessian_vector_product": lambda m, x, v, g: hu.hessian_vector_product(m, x, v),
    "per_probe_hessian_vector_product": lambda m, x, v, g: hu.per_probe_hessian_vector_product(m, x, v),
    "hessian_quadratic_form": lambda m, x, v, g: hu.hessian_quadratic_form(m, x, v),
    "ito_term_estimate": lambda m, x, v, g: hu.ito_term_estimate(
        m, x, g, 0.1, num_samples=4, generator=torch.Generator().manual_seed(0)),
    "batch_ito_term": lambda m, x, v, g: hu.batch_ito_term(m, x, g, 0.1),
    "deterministic_second_order_term": lambda m, x, v, g: hu.deterministic_second_order_term(m, x, v, 0.1),
    "exact_trace_sigma_hessian": lambda m, x, v, g: hu.exact_trace_sigma_hessian(m, x, g, 0.1),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_hutchinson_under_autocast_is_in_the_models_precision(name):
    """Each Hutchinson function on a float32 model called under ``torch.autocast("cpu", bfloat16)`` gives the
    float64 model's values to float32 accuracy (1e-5 relative; measured 1e-7 outside autocast), as the kernel
    functions do. Fails on the old code: 5e-3 to 1.1e-2 relative off (the passes ran in bfloat16)."""
    model = _model()
    reference_model = copy.deepcopy(model).double()
    x = torch.randn(5, 3)
    v = {"0.weight": torch.randn(8, 3), "2.weight": torch.randn(1, 8)}
    g = {"0.weight": torch.randn(4, 8, 3), "2.weight": torch.randn(4, 1, 8)}
    call = CALLS[name]
    reference = _flat(call(reference_model, x.double(), _f64(v), _f64(g)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _flat(call(model, x, v, g))
    error = float((got - reference).abs().max() / reference.abs().max())
    assert error < 1e-5, f"{name} under autocast: {error:.2e} relative off the float64 model"


def test_hutchinson_leaves_the_callers_autocast_on():
    """Coverage: the caller's autocast is put back after a Hutchinson call inside its block (a later forward of
    the caller's step runs in bfloat16 again), and the kernel functions agree with the Hutchinson ones on what
    precision means (a float32 kernel under autocast equals the one outside)."""
    model = _model()
    x = torch.randn(4, 3)
    v = {"0.weight": torch.randn(8, 3)}
    outside = gradient_kernel(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hu.hessian_quadratic_form(model, x, v)
        assert torch.is_autocast_enabled("cpu")
        assert model(x).dtype == torch.bfloat16
        inside = gradient_kernel(model, x)
    assert torch.allclose(inside, outside, rtol=1e-6, atol=0)


@pytest.mark.parametrize("engine", ["functional", "factored"])
@pytest.mark.parametrize("rows_total", [0, -5, 2.5, True])
def test_kernel_plan_refuses_a_row_count_that_is_no_positive_int(rows_total, engine):
    """``rows_total`` that is not an int >= 1 is refused with a message naming it; a valid one plans at most that
    many rows. Fails on the old code: 0, -5 and True gave plans of 0, -5 and True rows (2.5 a plan of 2.5 rows on
    the functional engine, a TypeError from deep inside on the factored one)."""
    model = _model()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rows_total"):
        kernel_plan(model, x, rows_total=rows_total, engine=engine)
    assert 1 <= kernel_plan(model, x, rows_total=3, engine=engine).rows <= 3


class _Float64Head(nn.Module):
    """A float32 body under a float64 head (a head kept in float64 for its outputs' precision)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2).double()

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))).double())


def _jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[n, d, P]`` float64: each example alone, one ``autograd.grad`` per output, trainable parameters in order."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        rows.append(torch.stack([torch.cat([g.double().reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
                                 for o in out]))
    return torch.stack(rows)


@pytest.mark.parametrize("frozen_body", [False, True])
def test_a_float32_body_under_a_float64_head_keeps_the_batched_jacobians(frozen_body):
    """torch.func's per-example Jacobians of a model with float32 and float64 layers pass the batching check (no
    "one example at a time" warning: the batched result is kept) and equal per-example autograd to float32
    accuracy. Fails on the old code: the check's float64 tolerance (1e-8) took the float32 rounding for a
    batching-rule error and warned (the Jacobians were formed one example at a time, 48x slower at 128 examples)."""
    model = _Float64Head()
    if frozen_body:
        model.a.requires_grad_(False)
        model.b.requires_grad_(False)
    x1, x2 = torch.randn(6, 3), torch.randn(4, 3)
    j1, j2 = _jacobian(model, x1), _jacobian(model, x2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        kernel = gradient_kernel(model, x1, x2, engine="functional")
        features = tangent_features(model, x1, engine="functional")
    reference = torch.einsum("mdp,ndp->mn", j1, j2)
    assert float((kernel - reference).abs().max() / reference.abs().max()) < 1e-5
    assert float((features - j1).abs().max() / j1.abs().max()) < 1e-5


def test_the_batching_check_still_catches_prelu_at_batch_size_equal_to_outputs():
    """Coverage: with the looser float64 tolerance (1e-5) the check still catches the batching rule that confuses
    dimensions (``F.prelu`` at batch size = outputs, 0.1-0.9 off): it warns and the features are exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.PReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        features = tangent_features(model, x, engine="functional")
    torch.testing.assert_close(features, _jacobian(model, x), rtol=1e-10, atol=1e-12)
