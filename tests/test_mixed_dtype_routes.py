"""Mixed-dtype models on the routes the first audit of mixed dtypes left on the first parameter's dtype: the sketched
tangent features (genkernel.core.engine.projections), the factored route's per-example contributions
(genkernel.core.engine.per_example), the EMA ledger's nodes and outputs (genkernel.core.tracking.ema) and the sketched
group state's projections (genkernel.core.tracking.sketched).

The models are a tanh MLP 8 -> 4 -> 64 -> 64 -> 1 whose Linears have given dtypes (each layer's input cast to its
dtype, the output to float64), optionally with an elementwise gain after the second layer (a parameter outside every
layer block: the fallback). A float32 layer is kept still in the tracker's tests (its own lr 0): its forward is then
the same float32 rounding at every step and the ledgers' float64 parts can be checked to float64's precision."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.engine import projections
from genkernel.core.engine.kernels import tangent_features
from genkernel.core.engine.per_example import BatchFactors
from genkernel.core.engine.projections import project_parameter, sketched_tangent_features
from genkernel.supervised import mse_loss

from test_cost_mixed_dtype import Mixed

F32, F64 = torch.float32, torch.float64

X = torch.randn(10, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
# (a float32 layer first, or a float32 head registered first: the first parameter float32 in a float64 model)
FIRST_FLOAT32 = [((F32, F64, F64, F64), False), ((F64, F64, F64, F32), True)]


def _reference_sketch(model, k, engine):
    """Σ_i R_i J_i(x) from the engine's Jacobians (:func:`tangent_features`, in the parameters' joined dtype; a
    float32 layer's gradients differ between the engines by float32's rounding), each parameter's block projected in
    its own dtype (the factored engine: as it projects each layer's gradients) or in the joined one (the functional
    engine: as it projects the joined Jacobian), summed in float64."""
    params = dict(model.named_parameters())
    jac = tangent_features(model, X, engine=engine)  # [M, d, P]
    own_dtype = engine == "factored"
    out = torch.zeros((*jac.shape[:2], k), dtype=F64)
    start = 0
    for index, p in enumerate(params.values()):
        part = jac[..., start:start + p.numel()]
        start += p.numel()
        out += project_parameter(part.to(p.dtype) if own_dtype else part, index, k).to(F64)
    return out


@pytest.mark.parametrize("dtypes,head_first", FIRST_FLOAT32)
@pytest.mark.parametrize("engine", ["factored", "functional"])
def test_sketched_tangent_features_of_a_float32_first_parameter_are_not_rounded_to_float32(dtypes, head_first, engine):
    """R φ(x) of a float64 model whose first parameter is float32 is float64 and equals the brute-force sketch
    (the torch.func Jacobians projected block by block) to 1e-13 of its largest entry. Before, the output took the
    first parameter's dtype: float32, 3.6e-8 to 1.9e-7 of the largest entry from the reference."""
    model = Mixed(dtypes, head_first)
    got = sketched_tangent_features(model, X, k=16, engine=engine)
    ref = _reference_sketch(model, 16, engine)
    assert float((got.to(F64) - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    assert got.dtype == F64


def test_sketched_tangent_features_chunks_count_each_parameter_in_its_dtype(monkeypatch):
    """The factored engine's chunk holds a row's gradients of the largest parameter twice (d = 1), in that
    parameter's dtype: a float64 64 x 64 weight is 2 x 4096 x 8 bytes a row. At a budget of three such rows, 10 probes
    take ceil(10 / 3) = 4 captures. Before, a float32 first layer's item size counted the float64 weight at half its
    bytes: 6 rows a chunk, 2 captures (twice the budget held)."""
    model = Mixed((F32, F64, F64, F64))
    calls = []
    real = projections.capture

    def counted(*args, **kwargs):
        calls.append(args[2][0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(projections, "capture", counted)
    per_row = 2 * 1 * 4096 * 8
    sketched_tangent_features(model, X, k=16, engine="factored", memory_budget=3 * per_row)
    assert calls == [3, 3, 3, 1]


def test_single_dtype_sketched_tangent_features_unchanged():
    """coverage: passes before. A float64 model and a float32 one: the output dtype is the model's and the values
    equal the brute-force sketch (float64: to 1e-13; float32: to float32's rounding of the projections)."""
    for dtype, tol in ((F64, 1e-13), (F32, 1e-6)):
        model = Mixed((dtype,) * 4)
        for engine in ("factored", "functional"):
            got = sketched_tangent_features(model, X, k=16, engine=engine)
            assert got.dtype == dtype
            ref = _reference_sketch(model, 16, engine)
            assert float((got.to(F64) - ref).abs().max()) <= tol * float(ref.abs().max())


# -- the tracker -----------------------------------------------------------------------------------------------------
def _tracker(model, group_state, optimizer="sgd", ema=False, steps=3, **kwargs):
    """A tracker on ``model`` whose float32 parameters (else the first layer's) have lr 0, ``steps`` steps on a fixed
    stream of batches; returns (tracker, EMA ledgers or None, the EMA model or None)."""
    still = [p for n, p in model.named_parameters() if p.dtype == F32] or \
        [p for n, p in model.named_parameters() if n.startswith("l0.")]
    moving = [p for p in model.parameters() if all(p is not q for q in still)]
    groups = [{"params": still, "lr": 0.0}, {"params": moving}]
    opt = torch.optim.Adam(groups, lr=1e-3) if optimizer == "adam" else torch.optim.SGD(groups, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    tracker = PathKernelTracker(model, opt, mse_loss, torch.randn(3, 8, generator=gen, dtype=F64), num_groups=8,
                                group_state=group_state, quadrature="gauss4", **kwargs)
    averaged = ledgers = None
    if ema:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
        ledgers = tracker.track_ema(averaged)
    for _ in range(steps):
        tracker.step(torch.randn(8, 8, generator=gen, dtype=F64), torch.randn(8, 1, generator=gen, dtype=F64),
                     torch.arange(8))
        if ema:
            averaged.update_parameters(model)
    if ema:  # the EMA ledger records its move at the next step
        tracker.step(torch.randn(8, 8, generator=gen, dtype=F64), torch.randn(8, 1, generator=gen, dtype=F64),
                     torch.arange(8))
    return tracker, ledgers, averaged


@pytest.mark.parametrize("dtypes,head_first", FIRST_FLOAT32)
def test_factored_route_contributions_equal_the_dense_routes_on_a_float32_first_parameter(dtypes, head_first):
    """Plain SGD, one group per example: the factored route's per-example contributions (cross kernels from layer
    factors) equal the dense route's (JVPs of every group's update) to 1e-12 of the largest, and its residual is the
    dense route's. Before, the factored contributions were summed in the first parameter's dtype: float32, 2.8e-8 and
    1.1e-7 of the largest contribution off."""
    dense, _, _ = _tracker(Mixed(dtypes, head_first), "dense")
    factored, _, _ = _tracker(Mixed(dtypes, head_first), "factored")
    a, b = dense.ledgers["groups"], factored.ledgers["groups"]
    assert float((a.contributions - b.contributions).abs().max()) <= 1e-12 * float(a.contributions.abs().max())
    assert b.relative_residual() <= 1.5 * a.relative_residual()


@pytest.mark.parametrize("dtypes,head_first", [((F32, F64, F64, F64), False), ((F64, F64, F64, F32), False)])
def test_ema_ledger_of_a_mixed_model_evaluates_the_ema_as_it_is(dtypes, head_first):
    """The EMA ledger's outputs after its last recorded move are the EMA model's own outputs on the probes (brute
    force: AveragedModel's forward, each layer in its dtype) to float64's precision, and its residual is below the
    model's own ledger's (which carries the same float32 layers' rounding). Before, the EMA's weights were cast to the
    first parameter's dtype: a float32 first layer rounded the float64 layers' EMA weights (outputs 1.0e-7 of the
    largest off; over 4 steps the EMA residual was 4.0e-7, six times the model ledger's 6.6e-8), a float64 first
    layer evaluated a float32 head in float64 (outputs 7.5e-8 off: the head's float32 rounding left out)."""
    tracker, ledgers, averaged = _tracker(Mixed(dtypes, head_first), "dense", ema=True)
    ledger = ledgers.ledgers["groups"]
    with torch.no_grad():
        real = averaged.module(tracker.probes[0]).to(F64)
    assert float((ledger.f_end - real).abs().max()) <= 1e-14 * float(real.abs().max())
    model_ledger = tracker.ledgers["groups"]
    assert ledger.relative_residual() <= 3 * model_ledger.relative_residual()


def test_sketched_route_projects_a_float64_fallback_parameter_in_float64():
    """The sketched route's R c_n ∇ℓ_n of a parameter outside every layer block (a float64 gain in a model whose first
    layer is float32) is the float64 projection of the float64 per-example gradients: equal to the brute force
    (:func:`project_parameter`, R's blocks from the same seeds) to 1e-13. Before, they were cast to the first
    parameter's dtype first: float32, 1.4e-7 of the largest entry off."""
    model = Mixed((F32, F64, F64, F64), gain=F64)
    tracker, _, _ = _tracker(model, "sketched", optimizer="adam", steps=1, sketch_dim=32)
    route = tracker.route
    assert next(iter(route.model.params.values())).dtype == F32 and "scale.gain" in route.plan.fallback
    g = torch.randn(5, 64, generator=torch.Generator().manual_seed(4), dtype=F64)
    got = route.project_batch(BatchFactors(factors=[], fallback={"scale.gain": g}, losses=torch.zeros(5, dtype=F64)))
    index = list(dict(model.named_parameters())).index("scale.gain")
    ref = project_parameter(g, index, 32, seed=0, kind="rademacher")
    assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max())


@pytest.mark.parametrize("dtypes,head_first,gain", [((F32, F64, F64, F64), False, F64), ((F64, F64, F64, F32), True, F64),
                                                     ((F64, F64, F64, F64), False, F32)])
def test_sketched_tracker_on_a_mixed_model_runs_and_its_residual_is_the_dense_routes(dtypes, head_first, gain):
    """coverage: passes before. Adam, group_state "sketched" (k = 32) on mixed models with a fallback gain: three
    steps are recorded (the state's check Σ_g R s_g = R s_total holds at every step) and the ledger's residual, which
    the exact pushes set, is within 1.5 times the dense route's on the same model (1e-7 and 4e-9 here: the float32
    layers' rounding; the two routes push differently rounded rows through them, 5e-9 apart)."""
    sketched, _, _ = _tracker(Mixed(dtypes, head_first, gain=gain), "sketched", optimizer="adam", sketch_dim=32)
    dense, _, _ = _tracker(Mixed(dtypes, head_first, gain=gain), "dense", optimizer="adam")
    a, b = dense.ledgers["groups"], sketched.ledgers["groups"]
    assert b.relative_residual() <= 1.5 * a.relative_residual()


def test_sketched_route_holds_each_parameters_projection_once_as_the_estimate_counts():
    """Adam, group_state "sketched" (k = 32), two steps on a float64 model whose first layer is float32, with a
    float64 gain: the projection R the route holds (every matrix's factors r, s and the vectors' i.i.d. columns) is
    each parameter's once, in its own dtype, and its bytes are :func:`~genkernel.core.cost.projection_bytes`' count,
    118272. Before, the state's check and the fallback projected every parameter in the first parameter's dtype
    while the layers' gradients were projected in their own: every float64 parameter's R was drawn and kept twice,
    in float64 and in float32 (176384 bytes, 1.49 times the count)."""
    from genkernel.core.cost import projection_bytes

    model = Mixed((F32, F64, F64, F64), gain=F64)
    tracker, _, _ = _tracker(model, "sketched", optimizer="adam", steps=2, sketch_dim=32)
    projection = tracker.route.projection
    params = list(model.parameters())
    vectors = {(index, dtype) for index, dtype, _ in projection.vectors._columns}
    matrices = {(name, dtype) for name, dtype, _ in projection._factors}
    names = list(dict(model.named_parameters()))
    assert vectors == {(i, p.dtype) for i, p in enumerate(params) if p.dim() < 2}
    assert matrices == {(names[i], p.dtype) for i, p in enumerate(params) if p.dim() >= 2}
    held = sum(t.numel() * t.element_size() for t in projection.vectors._columns.values()) + \
        sum(r.numel() * r.element_size() + s.numel() * s.element_size() for r, s in projection._factors.values())
    assert held == projection_bytes(params, 32, tracker.memory_budget) == 118272


class FrozenFloat32First(nn.Module):
    """A frozen float32 first layer before trained float64 ones (a frozen encoder kept in a narrower dtype)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(3, 16).float().requires_grad_(False)
        self.l2, self.l3 = nn.Linear(16, 16).double(), nn.Linear(16, 2).double()

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x.float())).double())))


def test_a_frozen_float32_layer_sets_the_checks_tolerance():
    """The checks' tolerance is the least precise floating dtype's the forward uses, frozen parameters' too: the
    dense route's factored gradient route passes a frozen float32 layer's rounding, which differs between its
    per-example passes and the batch's (before: refused at step 1, a gap of 6.8e-9 of the scale against float64's
    1e-10), and its ledger is the graph route's to float32 rounding."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    ledgers = {}
    for route in ("factored", "graph"):
        model = FrozenFloat32First()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tracker = PathKernelTracker(model, optimizer, mse_loss, x[:4], num_groups=2, group_state="dense",
                                    gradient_route=route)
        for _ in range(3):
            tracker.step(x, y, torch.arange(16) % 2)
        assert tracker.rtol == 1e-5
        ledgers[route] = tracker.ledger.contributions
    scale = float(ledgers["graph"].abs().max())
    assert float((ledgers["factored"] - ledgers["graph"]).abs().max()) <= 1e-6 * scale
