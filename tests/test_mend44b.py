"""Leftovers of the normalized-kernel and statistics work (tests/test_edges44.py), each against a reference written here.

1. The GAN coupling statistics' raw "interaction" interval was not passed through few_units: with two probe groups
   its two cluster means are equal by construction (traffic shares), and with lopsided shares the rounding of
   1 - x reaches far more than mean_interval's rounding allowance relative to the values, so a t-interval of rounding
   alone came out defined, without a why.
2. gradient_kernel formed a kernel that came out not finite from factors again with torch.func, silently, while
   kernel_plan said "factored": now it warns, and the plan says it is decided before any kernel is formed.
3. The determinism refusal on a later example (the first one a parameter reaches) said "the first example".
4. The normalized kernel was formed at one scale (the first reached example's): a float32 batch whose Jacobians span
   more than about 1e19 overflowed (NaN) or underflowed (a cosine of 0 for an example with itself, and off-diagonal
   values of 1e13) on both engines. Now torch.func forms each example (each example's output, for blocks) at its own
   power of two, the factored engine's kernel is formed again there when a k(x, x) is out of range, and a Jacobian
   not finite in the dtype itself is refused.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernel.core.engine import gradient_kernel, kernel_plan
from genkernel.core.tracking.ledger import PathKernelLedger
from genkernel.gan.analyzer import partition_statistics

from brute import Saturated


# -- 1. the raw interaction interval over too few probe groups --------------------------------------------------------

def _ledger(traffic: torch.Tensor) -> PathKernelLedger:
    m, g = traffic.shape
    empty = PathKernelLedger.empty(torch.zeros(m, 1, dtype=torch.float64), g)
    return dataclasses.replace(empty, traffic=traffic, contributions=traffic[:, :, None].clone())


def _lopsided(seed: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(traffic [M, G], probe groups [M]): every probe draws almost all of its traffic from source group 0 (the other
    groups' shares 1e-1 .. 1e-8 of it), every probe group occupied."""
    g = torch.Generator().manual_seed(seed)
    m = 3 * groups + seed % 20
    traffic = torch.rand(m, groups, generator=g, dtype=torch.float64)
    traffic[:, 1:] *= 10.0 ** -(1 + seed % 8)
    probe_groups = torch.randint(0, groups, (m,), generator=g)
    probe_groups[:groups] = torch.arange(groups)
    return traffic, probe_groups


def test_the_raw_interaction_over_two_probe_groups_of_lopsided_shares_always_says_why():
    """300 random lopsided traffic matrices over two probe groups: the two cluster means of the interaction are equal
    by construction (checked here from the shares: M00 - M10 and M11 - M01 with rows summing to 1), and the raw
    "interaction" entry is never held and always says why (two units, fewer than four), the estimate being that
    common mean. Over three groups the same entry keeps its defined interval and says it needs four; over four it is
    returned as it was (no why, no held).

    Fails on the old code: 189 of the 300 two-group entries had a defined interval of rounding alone and no why (the
    other 111 an undefined one with mean_interval's why, and none a held)."""
    silent = []
    for seed in range(300):
        traffic, groups = _lopsided(seed, 2)
        shares = traffic / traffic.sum(dim=1, keepdim=True)
        matrix = torch.stack([shares[groups == a].mean(0) for a in range(2)])
        assert abs(float((matrix[0, 0] - matrix[1, 0]) - (matrix[1, 1] - matrix[0, 1]))) <= 1e-15
        entry = partition_statistics(_ledger(traffic), [], torch.ones(len(groups), 1, dtype=torch.float64), groups,
                                     2)["traffic"]["interaction"]
        if "why" not in entry:
            silent.append(seed)
            continue
        assert entry.get("held") is False and entry["n"] == 2 and "needs at least 4" in entry["why"], seed
        assert abs(entry["estimate"] - float(matrix[0, 0] - matrix[1, 0])) <= 1e-12, seed
    assert not silent, f"{len(silent)} of 300 without a why"
    for groups_count, refused in ((3, True), (4, False)):
        traffic, groups = _lopsided(1, groups_count)
        traffic[:, :] = 1.0 + torch.rand(traffic.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        entry = partition_statistics(_ledger(traffic), [], torch.ones(len(groups), 1, dtype=torch.float64), groups,
                                     groups_count)["traffic"]["interaction"]
        assert entry["low"] is not None and entry["high"] is not None and entry["low"] < entry["high"]
        assert ("why" in entry) is refused and (entry.get("held") is False) is refused, groups_count


# -- 2.-4. the engine --------------------------------------------------------------------------------------------------

def _brute_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, d, P] per-example Jacobians, one example and one output at a time (float64 model and inputs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        out = model(x[n : n + 1]).reshape(-1)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, retain_graph=True)])
                                 for i in range(out.shape[0])]))
    return torch.stack(rows)


def _cosines(j1: torch.Tensor, j2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(trace cosines [M, N], blocks' cosines [M, N, d, d]: output i of one example against output j of the other)."""
    f1, f2 = j1.flatten(1), j2.flatten(1)
    trace = (f1 / f1.norm(dim=1, keepdim=True)) @ (f2 / f2.norm(dim=1, keepdim=True)).T
    u1, u2 = j1 / j1.norm(dim=2, keepdim=True), j2 / j2.norm(dim=2, keepdim=True)
    return trace, torch.einsum("mip,njp->mnij", u1, u2)


class _Spread(nn.Module):
    """For inputs (s, z): outputs s·g₀(z) and g₁(z)/s ("spread": an example's two outputs' Jacobians of magnitudes s and
    1/s), s·g(z) ("scaled": the example's Jacobian of magnitude s) or s²·g(z) ("square")."""

    def __init__(self, mode: str = "spread"):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)
        self.mode = mode

    def forward(self, x):
        s = x[:, :1]
        g = self.b(torch.tanh(self.a(x[:, 1:])))
        if self.mode == "spread":
            return torch.cat([s * g[:, :1], g[:, 1:] / s], dim=1)
        return (s * s if self.mode == "square" else s) * g


def _spread_inputs(scales: list[float], seed: int) -> torch.Tensor:
    x = torch.randn(len(scales), 4, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = torch.tensor(scales)
    return x


def test_normalized_kernels_of_a_batch_whose_jacobians_span_1e50_are_the_float64_brute_force():
    """float32, examples' Jacobians from 7e-24 to 3e25 (and within an example, its two outputs' 1e50 apart): the
    normalized kernels (trace and blocks, against itself and against another batch) on both engines are finite and
    equal the float64 brute force's cosines to 1e-5, k̂(x, x) = 1 included.

    Fails on the old code: NaN on both engines (the kernel formed at the first example's scale overflowed float32)."""
    torch.manual_seed(0)
    model = _Spread()
    reference = _Spread().double()
    reference.load_state_dict(model.state_dict())
    x = _spread_inputs([1.0, 3e25, 7e-24, 2.0, 5e20], 1)
    y = _spread_inputs([2e-20, 1.5, 4e22], 2)
    jx, jy = _brute_jacobian(reference, x.double()), _brute_jacobian(reference, y.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the factored engine's fallback: test 2)
        for engine in ("functional", "factored"):
            for other, j2 in ((None, jx), (y, jy)):
                trace, blocks = _cosines(jx, j2)
                got = gradient_kernel(model, x, other, engine=engine, normalize=True)
                assert got.dtype == torch.float32 and bool(got.isfinite().all()), (engine, other is None)
                assert float((got.double() - trace).abs().max()) <= 1e-5, (engine, other is None)
                got = gradient_kernel(model, x, other, engine=engine, normalize=True, reduce="none")
                assert bool(got.isfinite().all()), (engine, other is None)
                assert float((got.double() - blocks).abs().max()) <= 1e-5, (engine, other is None)


def test_normalized_kernel_of_an_example_far_below_the_first_is_not_silently_zero():
    """float32, an example's Jacobian 1e-25 and one 1e-30 of the first's (nothing overflows): its k̂(x, x) is 1 and its
    cosines are the float64 brute force's (to 1e-5), on both engines.

    Fails on the old code: k̂(x, x) = 0 for both, and off-diagonal values up to 2e14 (a kernel entry divided by a
    diagonal that underflowed to 0), finite and silently wrong."""
    torch.manual_seed(0)
    model = _Spread("scaled")
    reference = _Spread("scaled").double()
    reference.load_state_dict(model.state_dict())
    x = _spread_inputs([1.0, 2e-25, 3.0, 1e-30], 3)
    trace, _ = _cosines(*[_brute_jacobian(reference, x.double())] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for engine in ("functional", "factored"):
            got = gradient_kernel(model, x, engine=engine, normalize=True).double()
            assert float((got - trace).abs().max()) <= 1e-5, engine


def test_a_jacobian_not_finite_in_float32_is_refused_by_name_on_both_engines():
    """float32 outputs s²·g with s = 1e25: that example's Jacobian is 1e50, inf in float32 with finite parameters; no
    scale gives its cosines back, so the normalized kernel is refused, naming the example and float64, on both engines
    (against itself and against another batch).

    Fails on the old code: a kernel of NaN rows and columns was returned."""
    torch.manual_seed(0)
    model = _Spread("square")
    x = _spread_inputs([1.0, 1e25, 3.0, 1.0], 4)
    y = _spread_inputs([1.0, 2.0], 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for engine in ("functional", "factored"):
            for other in (None, y):
                with pytest.raises(ValueError, match=r"not finite though the parameters are: the Jacobian of x1's "
                                                     r"example\(s\) \[1\] is not finite in torch.float32.*float64"):
                    gradient_kernel(model, x, other, engine=engine, normalize=True)


def test_a_factored_kernel_formed_again_with_torch_func_is_warned_of_beside_the_plan_that_said_factored():
    """Inputs of about 1e25 in float32 saturate the tanh: the factors' products overflow, and the kernel is formed
    again with torch.func. kernel_plan says "factored" (decided before any kernel is formed, as its docstring now says);
    gradient_kernel then warns (RuntimeWarning) that the factored engine's kernel was formed again with torch.func,
    and its kernel is the brute force's. A batch in range gives no warning (its plan holds).

    Fails on the old code: no warning (the plan's "factored" was all a user could read)."""
    torch.manual_seed(0)
    model = Saturated()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(6)) * 1e25
    assert kernel_plan(model, x, engine="factored").engine == "factored"
    with pytest.warns(RuntimeWarning, match=r"factored engine's kernel is not finite.*formed again with torch\.func"):
        got = gradient_kernel(model, x, engine="factored").double()
    assert "before any kernel" in kernel_plan.__doc__ + type(kernel_plan(model, x)).__doc__
    reference = Saturated().double()
    reference.load_state_dict(model.state_dict())
    j = _brute_jacobian(reference, x.double())
    want = torch.einsum("mip,nip->mn", j, j)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gradient_kernel(model, x / 1e25, engine="factored", normalize=True)


class _DetachedThenRandom(nn.Module):
    """A batch of rows with a positive first feature is detached (no parameter reaches it); any other goes through
    F.dropout with training=True, random in eval mode."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        if bool((x[:, 0] > 0).all()):
            return h.detach()
        return F.dropout(h, 0.5, training=True)


def test_the_determinism_refusal_names_the_example_it_ran_on():
    """x1's examples 0 and 1 reach no parameter; example 2 is the first checked for repeatability, and the refusal of
    its random forward names example 2, not the first.

    Fails on the old code: "two passes on the first example of x1", an example that was not random at all."""
    x = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [-1.0, 0.5, 0.5], [-2.0, 0.0, 1.0]])
    for engine in ("functional", "factored"):
        with pytest.raises(ValueError, match=r"not deterministic in eval mode: two passes on example 2 of x1 "
                                             r"\(0-based; the first whose output a trainable parameter reaches\)"):
            gradient_kernel(_DetachedThenRandom(), x, engine=engine)


def test_only_the_models_own_failure_on_one_probe_is_blamed_on_the_model(monkeypatch):
    """The tracker measures one probe's activations at construction; any error there was re-raised as "the model's
    forward fails on a batch of one probe", also the measure's own failure and the device's memory error. Fails on
    the old code: both come back as that ValueError."""
    import genkernel.core.tracking.tracker as tracker_module

    class OneFails(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def forward(self, x):
            if x.shape[0] == 1:
                raise RuntimeError("needs a batch of two")
            return self.layer(x)

    probes = (torch.randn(4, 3),)
    with pytest.raises(ValueError, match="fails on a batch of one probe"):
        tracker_module._one_example_elements(OneFails(), probes)

    def measure_fails(module, one):
        raise RuntimeError("a fault of the measure's hooks")

    monkeypatch.setattr(tracker_module, "activation_elements", measure_fails)
    with pytest.raises(RuntimeError, match="a fault of the measure's hooks"):
        tracker_module._one_example_elements(nn.Linear(3, 2), probes)

    def out_of_memory(module, one):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(tracker_module, "activation_elements", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        tracker_module._one_example_elements(nn.Linear(3, 2), probes)
