"""The Hessian functions of genkernel.analysis.hutchinson on a model whose forward draws random numbers outside the
modules refused by type (F.dropout called with training=True): each call took its derivatives at other draws (two
hessian_quadratic_form calls on one direction gave 4.75 and -0.79 for the same probe; batch_ito_term -0.0065 and
-0.0018), silently, where the kernels and loss_sharpness refuse such a model; ito_term_estimate failed in vmap
with advice (chunk_size=1) that then ran the random model. Now refused, naming the cause."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.analysis import hutchinson as H


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, training=True))


@pytest.mark.parametrize("call", ["hvp", "per_probe", "quad", "batch_ito", "ito", "deterministic", "exact"])
def test_a_forward_that_draws_is_refused(call):
    torch.manual_seed(0)
    model = Noisy().double()
    probes = torch.randn(3, 3, dtype=torch.float64)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    g = {n: torch.randn(4, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    calls = {
        "hvp": lambda: H.hessian_vector_product(model, probes, v),
        "per_probe": lambda: H.per_probe_hessian_vector_product(model, probes, v),
        "quad": lambda: H.hessian_quadratic_form(model, probes, v),
        "batch_ito": lambda: H.batch_ito_term(model, probes, g, 0.1),
        "ito": lambda: H.ito_term_estimate(model, probes, g, 0.1, num_samples=4, generator=torch.Generator().manual_seed(0),
                                           chunk_size=1),
        "deterministic": lambda: H.deterministic_second_order_term(model, probes, v, 0.1),
        "exact": lambda: H.exact_trace_sigma_hessian(model, probes, g, 0.1),
    }
    with pytest.raises(ValueError, match="draws random numbers in its forward"):
        calls[call]()


def test_the_same_model_without_draws_is_taken():
    """Coverage (passes before): the check leaves a deterministic model's Hessians as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    probes = torch.randn(3, 3, dtype=torch.float64)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    torch.testing.assert_close(H.hessian_quadratic_form(model, probes, v), H.hessian_quadratic_form(model, probes, v),
                               rtol=0, atol=0)
