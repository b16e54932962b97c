"""Models with ``nn.MultiheadAttention`` on every push route, and RReLU in training mode on the
per-example routes. Before, analysis passes (eval mode, parameters not requiring grad inside
torch.func) took MultiheadAttention's fast path, which has no forward-mode AD: the JVP route was
refused and every Hessian function failed; RReLU's fresh slopes were read by a second pass as if
they were the training step's."""
import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.adapter import coupled_modules, forward_ad_attention
from genkernel.supervised import mse_loss

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class Attending(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.att(h, h, h, need_weights=False)
        return self.out(h.mean(1))


def _run(route):
    torch.manual_seed(0)
    model = Attending().double()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 8, 5, 4, generator=g, dtype=F64), torch.randn(2, 8, 1, generator=g, dtype=F64)
    tracker = PathKernelTracker(model, optimizer, mse_loss, x[0, :3], num_groups=2, group_state="dense",
                                contribution_route=route, quadrature="gauss4")
    for k in range(2):
        tracker.step(x[k], y[k], torch.arange(8) % 2)
    return model, tracker.ledger


def test_a_multihead_attention_model_is_pushed_by_jvp_as_by_its_jacobian():
    (model, jvp), (other, jacobian) = _run("jvp"), _run("jacobian")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    scale = float(jacobian.contributions.abs().max())
    torch.testing.assert_close(jvp.contributions, jacobian.contributions, rtol=0, atol=1e-12 * scale)
    assert jvp.relative_residual() < 1e-6
    assert torch.backends.mha.get_fastpath_enabled()  # the analysis put the fast path back


def test_forward_ad_attention_restores_the_fast_path_after_an_error():
    torch.backends.mha.set_fastpath_enabled(True)
    with pytest.raises(RuntimeError, match="inside"):
        with forward_ad_attention():
            assert not torch.backends.mha.get_fastpath_enabled()
            raise RuntimeError("inside")
    assert torch.backends.mha.get_fastpath_enabled()


def test_rrelu_in_training_mode_takes_the_graph_route_and_is_refused_by_per_example_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.RReLU(), nn.Linear(8, 1)).double()
    assert coupled_modules(model) == ["1 (RReLU, random slopes in [0.125, 0.3333333333333333] in training mode)"]
    assert coupled_modules(nn.Sequential(nn.RReLU(0.2, 0.2))) == []  # a fixed slope draws nothing
    assert coupled_modules(model.eval()) == []
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(ValueError, match="RReLU slopes"):
        PathKernelTracker(model, optimizer, mse_loss, torch.randn(4, 3, dtype=F64), num_groups=2,
                          group_state="factored").step(torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64),
                                                       torch.arange(8) % 2)
    tracker = PathKernelTracker(model, optimizer, mse_loss, torch.randn(4, 3, dtype=F64), num_groups=2,
                                group_state="dense", quadrature="gauss4")
    tracker.step(torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64), torch.arange(8) % 2)
    assert tracker.route.uses_graph()  # "auto" took the training graph's own slopes
    assert tracker.ledger.relative_residual() < 1e-8
