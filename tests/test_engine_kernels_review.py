"""The kernel core's user-facing functions (gradient_kernel, tangent_features, sketched tangent
features, group_gradients) against an independent brute force in float64: one torch.autograd.grad
per example and output, and the refusals of models whose forward randomizes, couples or rewrites."""

import copy

import pytest
import torch
from torch import nn
from test_engine_factored_review import brute_jacobians

from genkernel.core.adapter import trainable_parameters
from genkernel.core.engine.gradients import gradients_from_losses, group_gradients, membership_matrix
from genkernel.core.engine.kernels import gradient_kernel, tangent_features
from genkernel.core.engine.projections import project_parameter, sketched_tangent_features
from genkernel.core.engine.reference import split_columns

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # small problems: two threads only contend


def squared_error(out, y):
    return ((out - y) ** 2).sum(-1)


class LossOf(nn.Module):
    """One example's loss as a model output, for brute_jacobians: ∇ℓ_n = the Jacobian's one row."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y):
        return self.loss_fn(self.model(x), y).reshape(1, 1)


def brute_rows(model, x, y, membership):
    """{name: [R, *shape]}: W @ (one autograd gradient per example), float64."""
    g = brute_jacobians(LossOf(model, squared_error), (x, y))[:, 0]  # [B, P]
    params = trainable_parameters(model)
    return {n: (membership @ part[:, 0]).reshape(-1, *params[n].shape) for n, part in split_columns(g[:, None], params).items()}


class Tied(nn.Module):
    """A weight tied across two modules, a frozen layer, a buffer and a parameter used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.frozen, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.b.weight = self.a.weight
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.register_buffer("shift", torch.randn(3))

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x) * self.scale)) + self.shift)
        return self.head(torch.tanh(self.frozen(h)) * self.scale)


def test_group_gradients_equal_brute_force_on_every_route_and_budget():
    """Coverage: tied, frozen and buffers; every route at 1 byte and 256 MiB; gradients_from_losses."""
    torch.manual_seed(0)
    model = Tied().double()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    params = trainable_parameters(model)
    for rows in (2, 6):
        membership = torch.randn(rows, 6, dtype=F64)
        want = brute_rows(model, x, y, membership)
        scale = max(float(w.abs().max()) for w in want.values())
        for route in ("example", "group", "factored"):
            for budget in (1, 2**28):
                got, _ = group_gradients(model, params, (x,), y, squared_error, membership, route=route, memory_budget=budget)
                assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-13 * scale, (rows, route, budget)
        from_losses = gradients_from_losses(squared_error(model(x), y), params, membership)
        assert max(float((from_losses[n] - want[n]).abs().max()) for n in want) < 1e-13 * scale


class Normed(nn.Module):
    def __init__(self, drop=0.0):
        super().__init__()
        self.lin, self.bn, self.drop, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(drop), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.bn(self.lin(x)))))


def test_group_route_takes_batchnorm_in_training_mode_through_one_batch_forward():
    """Fails on the old code: the group route, documented as the one for BatchNorm in training mode,
    raised torch.func's RuntimeError (an in-place write to a captured buffer). Now ĝ_r equals
    autograd through one batch forward, at every budget, and the running statistics stay put."""
    torch.manual_seed(0)
    model = Normed().double().train()
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    membership = torch.randn(3, 8, dtype=F64)
    twin = copy.deepcopy(model)
    losses = squared_error(twin(x), y)
    weights = list(trainable_parameters(twin).values())
    want = [torch.autograd.grad((losses * w).sum(), weights, retain_graph=True) for w in membership]
    state = copy.deepcopy(model.state_dict())
    params = trainable_parameters(model)
    for budget in (1, 2**28):
        got, got_losses = group_gradients(model, params, (x,), y, squared_error, membership, route="group",
                                          memory_budget=budget)
        for i, name in enumerate(params):
            torch.testing.assert_close(got[name], torch.stack([row[i] for row in want]), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got_losses, losses.detach(), rtol=1e-14, atol=0)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert model.training and model.bn.training


def test_batchnorm_with_batch_statistics_is_refused_where_per_example_gradients_are_needed():
    """Fails on the old code: the per-example routes raised torch.func's RuntimeError about a captured
    tensor, naming neither BatchNorm nor the group route."""
    model = Normed().double().train()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    for route in ("example", "factored", "auto"):
        with pytest.raises(ValueError, match="BatchNorm1d.*route='group'"):
            group_gradients(model, trainable_parameters(model), (x,), y, squared_error, torch.eye(6, dtype=F64), route=route)


def test_dropout_in_training_mode_is_refused_on_every_route_before_drawing():
    """Fails on the old code: "example", "factored" and "auto" returned per-example gradients at fresh
    masks, 51-106% apart (relative, per parameter) between two identical calls, and advanced the
    caller's global random state; "group" raised torch.func's RuntimeError."""
    model = Normed(drop=0.5).double().train()
    model.bn.eval()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    rng = torch.get_rng_state()
    for route in ("example", "factored", "group", "auto"):
        with pytest.raises(ValueError, match="Dropout.*gradients_from_losses"):
            group_gradients(model, trainable_parameters(model), (x,), y, squared_error, torch.eye(6, dtype=F64), route=route)
    assert torch.equal(rng, torch.get_rng_state())


def test_an_embedding_with_max_norm_is_refused_and_left_as_it_was():
    """Fails on the old code: group_gradients' forward renormalized the caller's embedding weight in
    place (entries changed by up to 12.6) and returned gradients at the rewritten weight."""
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=0.5), nn.Flatten(), nn.Linear(6, 1)).double()
    with torch.no_grad():
        model[0].weight.mul_(10)
    before = model[0].weight.detach().clone()
    ids = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]])
    with pytest.raises(ValueError, match="max_norm"):
        group_gradients(model, trainable_parameters(model), (ids,), None, lambda out, _: out.sum(-1),
                        torch.eye(4, dtype=F64), route="example")
    assert torch.equal(model[0].weight.detach(), before)


def test_membership_ids_outside_their_partition_are_refused():
    """Fails on the old code: an id past partition 0's size landed in partition 1's rows and a
    negative id in the last row, silently."""
    c = torch.ones(4, dtype=F64)
    second = torch.tensor([0, 1, 0, 1])
    for ids in ([0, 1, 3, 0], [0, -1, 2, 0]):
        with pytest.raises(ValueError, match=r"groups\[0\].*outside \[0, 3\)"):
            membership_matrix([torch.tensor(ids), second], c, [3, 2])
    with pytest.raises(ValueError, match="one entry per partition"):
        membership_matrix([second], c, [3, 2])
    w = membership_matrix([torch.tensor([0, 1, 2, 0]), second], c, [3, 2])
    assert torch.equal(w, torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=F64))


def test_group_route_refuses_a_batch_mean_loss_by_name():
    """Fails on the old code: a loss_fn returning one number for the batch raised torch's reshape error."""
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    with pytest.raises(ValueError, match="one loss per example"):
        group_gradients(model, trainable_parameters(model), (x,), y, lambda o, t: ((o - t) ** 2).mean(),
                        torch.ones(1, 6, dtype=F64), route="group")


def test_example_route_refuses_an_unreduced_loss_by_name():
    """Fails on the old code: a loss_fn returning [B, d] (reduction='none' without the mean over outputs)
    raised torch's "shape '[]' is invalid" from inside vmap."""
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"one loss per example.*got shape \(1, 2\)"):
        group_gradients(model, trainable_parameters(model), (x,), y, lambda o, t: (o - t) ** 2,
                        torch.ones(1, 6, dtype=F64), route="example")


class DictOut(nn.Module):
    """An unused layer, a scalar parameter, a parameter read outside any module, a dict output [B, 3, 1]."""

    def __init__(self):
        super().__init__()
        self.unused, self.a, self.h, self.emb = nn.Linear(2, 2), nn.Linear(3, 4), nn.Linear(4, 3), nn.Embedding(4, 4)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return {"sample": self.h(torch.tanh(self.a(x)) * self.scale + self.emb.weight[1]).reshape(-1, 3, 1)}


class Sample(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["sample"]


def test_features_kernels_and_sketches_equal_brute_force_whatever_the_engine_and_budget():
    """Coverage: tangent features (one output too), both reductions, normalized, and sketched features
    equal to R applied to the brute-force Jacobian (same seed, same R), on both engines."""
    torch.manual_seed(0)
    model = DictOut().double()
    x = torch.randn(4, 3, dtype=F64)
    j = brute_jacobians(Sample(model), (x,))
    blocks = torch.einsum("mdp,nep->mnde", j, j)
    roots = torch.einsum("mdp,mdp->md", j, j).sqrt()
    params = trainable_parameters(model)
    order = list(params)
    sketch = sum(project_parameter(part, order.index(n), 8, seed=3) for n, part in split_columns(j, params).items())
    for engine in ("functional", "factored"):
        for budget in (1, 2**28):
            kw = dict(engine=engine, memory_budget=budget)
            assert float((tangent_features(model, x, **kw) - j).abs().max()) < 1e-14
            assert float((tangent_features(model, x, output_index=-1, **kw) - j[:, -1]).abs().max()) < 1e-14
            assert float((gradient_kernel(model, x, reduce="none", **kw) - blocks).abs().max()) < 1e-13
            normalized = gradient_kernel(model, x, reduce="none", normalize=True, **kw)
            assert float((normalized - blocks / (roots[:, None, :, None] * roots[None, :, None, :])).abs().max()) < 1e-14
            got = sketched_tangent_features(model, x, k=8, seed=3, **kw)
            assert float((got - sketch).abs().max()) < 1e-13


def test_normalize_must_be_a_bool():
    """Fails on the old code: normalize="no" (any truthy non-bool) returned the normalized kernel."""
    import numpy as np

    model = nn.Linear(3, 2).double()
    x = torch.randn(3, 3, dtype=F64)
    with pytest.raises(TypeError, match="normalize must be True or False"):
        gradient_kernel(model, x, normalize="no")
    torch.testing.assert_close(gradient_kernel(model, x, normalize=np.bool_(True)), gradient_kernel(model, x, normalize=True))
