"""Review of the noise-level locality measures (genkernel.diffusion.locality) and the state kernels
(genkernel.diffusion.kernels): brute-force agreement on a tiny model, the sketch's scale, the
permutation control on a kernel with no |Δbin| structure, non-finite kernels and eval_mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from genkernel.diffusion import kernel_locality, locality_per_input, make_scheduler, make_states, state_kernel
from genkernel.diffusion.kernels import eval_mode
from genkernel.diffusion.locality import _Differences, locality_pseudo_values

F64 = torch.float64


class Tiny(torch.nn.Module):
    def __init__(self, outputs: int = 2, hidden: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(3, hidden)
        self.l2 = torch.nn.Linear(hidden, outputs)

    def forward(self, x, t):
        return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None].to(x) / 100], 1))))


def jacobian_kernel(model, z, t):
    """The trace kernel Σ_o ⟨∇θ f_o(z_i, t_i), ∇θ f_o(z_j, t_j)⟩ from per-example Jacobians [M, d, P]."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, x, s: functional_call(model, p, (x[None], s[None]))[0]), in_dims=(None, 0, 0))(params, z, t)
    jac = torch.cat([j.reshape(z.shape[0], j.shape[1], -1) for j in jac.values()], -1).to(F64)
    return torch.einsum("mdp,ndp->mn", jac, jac)


def states_of(n=4, levels=(5, 25, 45, 65, 85), seed=0):
    g = torch.Generator().manual_seed(seed)
    clean, noise = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)
    return clean, noise, torch.tensor(levels)


def brute_locality(kernel, n, bins, band, row_bins=None):
    """Per input i: mean over its levels a of [mean k̂ to other inputs' states within the band of a's
    (possibly relabelled) bin − mean outside], by loops."""
    levels = bins.numel()
    out = []
    for i in range(n):
        per_level = []
        for a in range(levels):
            centre = int(bins[a] if row_bins is None else row_bins[i][a])
            inside, outside = [], []
            for j in range(n):
                if j == i:
                    continue
                for b in range(levels):
                    value = float(kernel[i * levels + a, j * levels + b])
                    (inside if abs(centre - int(bins[b])) <= band else outside).append(value)
            if inside and outside:
                per_level.append(sum(inside) / len(inside) - sum(outside) / len(outside))
        out.append(sum(per_level) / len(per_level) if per_level else math.nan)
    return torch.tensor(out, dtype=F64)


def test_states_are_point_major_and_the_exact_kernel_matches_per_example_jacobians():
    """coverage: make_states rows i·L + a, state_kernel (exact, both normalizations) against a
    per-example-Jacobian kernel built by hand; a float32 model agrees with float64 to rounding."""
    scheduler = make_scheduler(100)
    clean, noise, levels = states_of()
    z, t = make_states(scheduler, clean, noise, levels)
    n, L = clean.shape[0], levels.numel()
    for i in range(n):
        for a in range(L):
            ab = scheduler.alphas_cumprod[levels[a]].to(F64)
            torch.testing.assert_close(z[i * L + a], ab.sqrt() * clean[i] + (1 - ab).sqrt() * noise[i])
            assert int(t[i * L + a]) == int(levels[a])
    model = Tiny().double()
    k = jacobian_kernel(model, z, t)
    torch.testing.assert_close(state_kernel(model, (z, t), normalize=False), k, rtol=1e-12, atol=1e-12)
    d = k.diagonal().sqrt()
    torch.testing.assert_close(state_kernel(model, (z, t)), k / d[:, None] / d[None], rtol=1e-12, atol=1e-12)
    k32 = state_kernel(Tiny().float(), (z.float(), t))
    assert k32.dtype == F64 and (k32 - k / d[:, None] / d[None]).abs().max() < 1e-5


def test_unnormalized_sketch_estimates_the_kernel_not_v_times_it():
    """Fails on the old code: state_kernel(output_sketch=V, normalize=False) returned the SUM of the
    V directional kernels, V times the trace kernel it estimates (ratio 4.00 at V=4)."""
    scheduler = make_scheduler(100)
    clean, noise, levels = states_of(n=3, levels=(10, 60))
    z, t = make_states(scheduler, clean, noise, levels)
    # one output: r_v = ±1 and r_v² = 1, so every sketch is the exact kernel, whatever the draw
    one = Tiny(outputs=1).double()
    exact = jacobian_kernel(one, z, t)
    for v in (1, 4):
        torch.testing.assert_close(state_kernel(one, (z, t), output_sketch=v, seed=3, normalize=False), exact,
                                   rtol=1e-12, atol=1e-12)
    # two outputs: the mean over seeds tends to the exact kernel (unbiased); off-diagonal sketch
    # noise r1 r2 (J1·J2') has mean 0
    two = Tiny(outputs=2).double()
    exact = jacobian_kernel(two, z, t)
    draws = torch.stack([state_kernel(two, (z, t), output_sketch=4, seed=s, normalize=False) for s in range(150)])
    error = draws.std(dim=0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(dim=0) - exact).abs() <= 5 * error + 1e-12).all()
    # normalized: the sketch over its own diagonal (exactly 1 there), the 1/V cancelling
    sketched = state_kernel(two, (z, t), output_sketch=4, seed=0)
    raw = state_kernel(two, (z, t), output_sketch=4, seed=0, normalize=False)
    d = raw.diagonal().sqrt()
    torch.testing.assert_close(sketched, raw / d[:, None] / d[None])
    # against others: the cross kernel's normalization uses each side's own sketched diagonal
    half = (z[:3], t[:3]), (z[3:], t[3:])
    cross = state_kernel(two, half[0], half[1], output_sketch=4, seed=0)
    torch.testing.assert_close(cross, sketched[:3, 3:])


def test_locality_measures_match_a_brute_force_loop_on_a_jacobian_kernel():
    """coverage: kernel_locality's profiles and per-input locality on a hand-built kernel of a tiny
    model, by loops (x ≠ x' for the locality and by_distance; x = x' at two different levels for
    by_distance_same_input; two levels share bin 1)."""
    scheduler = make_scheduler(100)
    clean, noise, levels = states_of()
    z, t = make_states(scheduler, clean, noise, levels)
    k = jacobian_kernel(Tiny().double(), z, t)
    d = k.diagonal().sqrt()
    kernel = k / d[:, None] / d[None]
    n, L = clean.shape[0], levels.numel()
    bins, band = torch.tensor([0, 1, 1, 2, 3]), 1
    measured, _ = locality_per_input(kernel, n, bins, band)
    torch.testing.assert_close(measured, brute_locality(kernel, n, bins, band))
    result = kernel_locality(kernel, n, bins, band)
    for delta in range(4):
        pairs = [float(kernel[i * L + a, j * L + b]) for i in range(n) for j in range(n) if i != j
                 for a in range(L) for b in range(L) if abs(int(bins[a] - bins[b])) == delta]
        same = [float(kernel[i * L + a, i * L + b]) for i in range(n)
                for a in range(L) for b in range(L) if a != b and abs(int(bins[a] - bins[b])) == delta]
        assert result["by_distance"][delta] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
        assert result["by_distance_same_input"][delta] == pytest.approx(sum(same) / len(same), abs=1e-12)


def test_control_relabels_each_inputs_own_states():
    """Fails on the old code (whose control permuted the other states' labels): the control is the
    same statistic with each input's own levels relabelled by the drawn permutations."""
    n, L, band = 5, 4, 1
    bins = torch.tensor([0, 1, 1, 3])
    g = torch.Generator().manual_seed(4)
    a = torch.randn(n * L, n * L, generator=g, dtype=F64)
    kernel = (a + a.T) / 2
    _, control = locality_per_input(kernel, n, bins, band, num_permutations=3, seed=2)
    perms = _Differences(kernel.reshape(n, L, n, L), bins, band, 3, 2).perms
    torch.testing.assert_close(control, sum(brute_locality(kernel, n, bins, band, row_bins=p) for p in perms) / 3)


def test_a_kernel_without_distance_structure_has_no_locality():
    """Fails on the old code: k̂ = c + h(s) + h(t), level-dependent but with no |Δbin| term (middle
    levels more similar to every state), held with the old control (difference 0.0099, interval
    [0.0073, 0.0125]); relabelling each input's own levels keeps its in-band columns' mix, so measured
    and control agree exactly up to the noise term."""
    n, L = 8, 6
    g = torch.Generator().manual_seed(0)
    h = -(torch.arange(L, dtype=F64) - 2.5) ** 2 / 6.25
    hk = h.repeat(n)
    additive = 0.5 + 0.1 * (hk[:, None] + hk[None, :])
    # without noise: every per-input measured value equals its control
    measured, control = locality_per_input(additive, n, torch.arange(L), 1)
    torch.testing.assert_close(measured, control, rtol=0, atol=1e-14)
    noise = torch.randn(n * L, n * L, generator=g, dtype=F64) * 0.01
    kernel = additive + (noise + noise.T) / 2
    kernel.fill_diagonal_(1.0)
    locality = kernel_locality(kernel, n, torch.arange(L), 1)["locality"]
    assert locality["held"] is False and abs(locality["difference"]) < 0.002
    # a kernel with a real |Δbin| decay still holds
    local = 0.5 + 0.2 * torch.exp(-(torch.arange(L, dtype=F64)[:, None] - torch.arange(L, dtype=F64)[None]).abs()).repeat(n, n)
    local = local + (noise + noise.T) / 2
    assert kernel_locality(local, n, torch.arange(L), 1)["locality"]["held"] is True


def test_a_non_finite_kernel_is_refused():
    """Fails on the old code: one NaN pair gave a finite difference (−0.073 instead of −0.108, n=4)
    from the levels it did not enter, as if from the whole kernel."""
    n, L = 4, 4
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n * L, 6, generator=g, dtype=F64)
    kernel = a @ a.T
    kernel[1, 6] = kernel[6, 1] = math.nan
    for call in (kernel_locality, locality_per_input, locality_pseudo_values):
        with pytest.raises(ValueError, match="non-finite"):
            call(kernel, n, torch.arange(L), 1)
    kernel[1, 6] = kernel[6, 1] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        kernel_locality(kernel, n, torch.arange(L), 1)


def test_band_edges_and_too_few_inputs_say_why():
    """coverage: band >= the span of the bins (no state outside) and 2 inputs (no jackknife) give
    [NaN, NaN], held False and a why; band 0 with G = 2 is defined."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3 * 2, 3 * 2, generator=g, dtype=F64)
    kernel = (a + a.T) / 2
    wide = kernel_locality(kernel, 3, torch.arange(2), 1)["locality"]
    assert math.isnan(wide["difference"]) and wide["held"] is False and "outside the band" in wide["why"]
    narrow = kernel_locality(kernel, 3, torch.arange(2), 0)["locality"]
    assert math.isfinite(narrow["difference"]) and math.isfinite(narrow["interval"][0])
    two = kernel_locality(kernel[:4, :4], 2, torch.arange(2), 0)["locality"]
    assert math.isnan(two["interval"][0]) and two["held"] is False and "at least 3" in two["why"]


def test_eval_mode_restores_every_modules_own_mode_even_on_error():
    """coverage: a mixed-mode model (dropout kept in eval) comes back module by module after an error."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(0.1), torch.nn.BatchNorm1d(3))
    model.train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before
