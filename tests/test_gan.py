"""GAN trainer and discriminator-geometry analyzer: exactness, the one-step formula, sanity cases,
non-disturbance, the user-loop example and bad input (issue 4)."""

import json
import math

import pytest
import torch
from torch import nn

from genkernel import OptimizerStep, gradient_kernel, perform_step
from genkernel.core.errors import NonFiniteError
from genkernel.data import gaussian_ring, ring_mode_centers
from genkernel.gan import (
    DirectionGroups,
    FunctionGroups,
    GANKernelAnalyzer,
    GANTrainer,
    GeneratorLoss,
    MLPDiscriminator,
    MLPGenerator,
    frozen,
)

F64 = torch.float64


def _ring(n=512, dtype=F64):
    data, modes = gaussian_ring(n, radius=2.0, std=0.05, seed=0)
    return data.to(dtype), modes


def _pair(dtype=F64, sn=False, hidden=16, seed=0, latent=2):
    torch.manual_seed(seed)
    return MLPGenerator(latent, 2, hidden=hidden, depth=2).to(dtype), MLPDiscriminator(2, hidden=hidden, depth=2, spectral_norm=sn).to(dtype)


def _probes(m=12, k=2, dtype=F64, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,sn", [("nonsaturating", True), ("wgan-gp", False)])
def test_relative_residual_small_for_generator_and_discriminator(loss, sn):
    data, modes = _ring()
    G, D = _pair(sn=sn)
    analyzer = GANKernelAnalyzer(
        G, D, _probes(8), grouping="mode", mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
        window=3, eval_every=1, discriminator_groups="role_mode" if loss != "wgan-gp" else "role",
    )
    trainer = GANTrainer(G, D, data, labels=modes, loss=loss, batch_size=16, lr_g=2e-3, lr_d=2e-3, callbacks=[analyzer])
    trainer.train(6)
    report = analyzer.report()
    assert report["generator"]["steps"] == 6 and report["discriminator"]["steps"] == 6
    assert report["generator"]["relative_residual"] < 1e-3
    assert report["discriminator"]["relative_residual"] < 1e-3
    assert report["generator"]["mean_change_norm"] > 0 and report["discriminator"]["mean_change_norm"] > 0
    # the ledger sums exactly: contributions + rest + residual = real change
    ledger = analyzer.generator_ledger()
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    assert torch.allclose(total, ledger.delta, atol=1e-12)
    if sn:  # spectral norm's power iteration moved D between steps: reported as buffer drift in rest
        assert report["discriminator"]["buffer_drift_norm"] > 0
    if loss == "wgan-gp":  # the gradient penalty is its own group with nonzero traffic
        assert analyzer.d_tracker.ledger.traffic[:, 2].sum() > 0
    # formula alignment: the ledger's prediction matches each step's change up to the residual
    assert all(row["cos_formula"] > 0.999 for row in report["alignment"])


def test_three_steps_match_brute_force_autograd():
    """Independent float64 brute force: per-example gradients by a Python loop, SGD momentum by hand,
    midpoint Jacobians by torch.autograd.functional.jacobian; compared with the analyzer's groups."""
    G, D = _pair(hidden=8)
    D.eval()
    probes = _probes(5)
    lr, mu = 0.05, 0.9
    opt = torch.optim.SGD(G.parameters(), lr=lr, momentum=mu)
    region = FunctionGroups(lambda z, x, w, s: (z[:, 0] > 0).long(), 2)
    analyzer = GANKernelAnalyzer(G, D, probes, grouping=region, controls=0, window=1, eval_every=1, track_discriminator=False)
    loss_fn = GeneratorLoss(D)
    names = [n for n, _ in G.named_parameters()]
    shapes = [p.shape for _, p in G.named_parameters()]

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    def g_of(theta, z):
        return torch.func.functional_call(G, unflat(theta), (z,))

    theta = torch.cat([p.detach().reshape(-1) for p in G.parameters()]).clone()
    buffers = None
    expected = torch.zeros(5, 2, 2, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        z = torch.randn(10, 2, generator=gen, dtype=F64)
        groups = (z[:, 0] > 0).long()
        grads = torch.zeros(2, theta.numel(), dtype=F64)
        for i in range(10):
            t = theta.clone().requires_grad_(True)
            li = loss_fn(g_of(t, z[i : i + 1]), None)[0]
            (gi,) = torch.autograd.grad(li, t)
            grads[groups[i]] += gi / 10
        buffers = grads.clone() if buffers is None else mu * buffers + grads
        updates = -lr * buffers
        new_theta = theta + updates.sum(0)
        mid = theta + 0.5 * (new_theta - theta)
        jac = torch.autograd.functional.jacobian(lambda t: g_of(t, probes), mid)  # [5, 2, P]
        expected += torch.einsum("mdp,gp->mgd", jac, updates)
        theta = new_theta
        with frozen(D):
            analyzer.perform(OptimizerStep(G, opt, loss_fn, z, phase="generator"))
    got = analyzer.generator_ledger().contributions
    assert torch.allclose(torch.cat([p.detach().reshape(-1) for p in G.parameters()]), theta, atol=1e-12)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12), float((got - expected).abs().max())


def test_one_step_formula_matches_observed_change():
    """ΔG(z') ≈ −(η/B) Σ_i K_G(z', z_i) w_i after one small plain-SGD step (independent of the ledger)."""
    G, D = _pair(hidden=16)
    D.eval()
    lr, batch = 1e-3, 32
    z = torch.randn(batch, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    probes = _probes(16)
    loss_fn = GeneratorLoss(D)
    x = G(z).detach().requires_grad_(True)
    (w,) = torch.autograd.grad(loss_fn(x, None).sum(), x)
    kernel = gradient_kernel(G, probes, z, reduce="none")  # [M, B, 2, 2]
    predicted = -(lr / batch) * torch.einsum("mbde,be->md", kernel, w)
    before = G(probes).detach()
    opt = torch.optim.SGD(G.parameters(), lr=lr)
    with frozen(D):
        OptimizerStep(G, opt, loss_fn, z, phase="generator").run()
    observed = G(probes).detach() - before
    cos = torch.nn.functional.cosine_similarity(predicted, observed, dim=1)
    assert (cos > 0.99).all(), cos


# ------------------------------------------------------------------------------------------
# sanity: a region-gated generator has no cross-region coupling
# ------------------------------------------------------------------------------------------
class GatedGenerator(nn.Module):
    """Separate sub-networks for z[:, 0] > 0 and z[:, 0] <= 0."""

    latent_dim = 2

    def __init__(self):
        super().__init__()
        self.pos = MLPGenerator(2, 2, hidden=8, depth=2)
        self.neg = MLPGenerator(2, 2, hidden=8, depth=2)

    def forward(self, z):
        return torch.where(z[:, :1] > 0, self.pos(z), self.neg(z))


def test_region_gated_generator_has_zero_cross_region_coupling():
    torch.manual_seed(0)
    G = GatedGenerator().double()
    D = MLPDiscriminator(2, hidden=8, depth=2).double()
    data, _ = _ring()
    probes = torch.cat([_probes(6) .abs(), -_probes(6, seed=2).abs()])  # 6 positive, 6 negative z0
    region = FunctionGroups(lambda z, x, w, s: (z[:, 0] > 0).long(), 2, name="region")
    analyzer = GANKernelAnalyzer(G, D, probes, grouping=region, controls=1, window=3, eval_every=1, track_discriminator=False)
    GANTrainer(G, D, data, latent_dim=2, batch_size=16, callbacks=[analyzer]).train(6)
    report = analyzer.report()
    for record in report["windows"] + [report["generator"]["coupling_whole_run"]]:
        for key in ("traffic_matrix", "net_matrix"):
            m = torch.tensor(record[key])
            assert m[0, 1] == 0.0 and m[1, 0] == 0.0, (key, m)
            assert m[0, 0] != 0 and m[1, 1] != 0
        # the permutation control mixes regions, so it does couple them
        assert torch.tensor(record["traffic_matrix_control"])[0, 1] > 0
    ledger = analyzer.generator_ledger()
    own_region = (probes[:, 0] > 0).long()
    cross = ledger.contributions[torch.arange(12), 1 - own_region]
    assert torch.equal(cross, torch.zeros_like(cross))


# ------------------------------------------------------------------------------------------
# non-disturbance, resume, user loop
# ------------------------------------------------------------------------------------------
def _run(loss, analyze, iterations=5, checkpoint_dir=None, checkpoint_every=0, resume=False):
    data, modes = _ring(dtype=torch.float32)
    G, D = _pair(dtype=torch.float32, sn=True, hidden=16)
    callbacks = []
    if analyze:
        callbacks.append(GANKernelAnalyzer(
            G, D, _probes(8, dtype=torch.float32), grouping="direction", num_groups=3, window=2, eval_every=1,
            mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
        ))
    trainer = GANTrainer(G, D, data, labels=modes, loss=loss, batch_size=16, callbacks=callbacks, seed=3,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    trainer.train(iterations, resume=resume)
    return trainer


@pytest.mark.parametrize("loss", ["nonsaturating", "wgan-gp"])
def test_analyzer_leaves_training_bitwise_unchanged_with_spectral_norm(loss):
    plain, analyzed = _run(loss, False), _run(loss, True)
    for a, b in ((plain.generator, analyzed.generator), (plain.discriminator, analyzed.discriminator)):
        sa, sb = a.state_dict(), b.state_dict()  # parameters and spectral norm's u, v buffers
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert plain.history == analyzed.history
    assert analyzed.callbacks[0].report()["generator"]["relative_residual"] < 1e-2  # float32


def test_checkpoint_resume_continues_training_and_ledgers(tmp_path):
    full = _run("nonsaturating", True, iterations=4)
    _run("nonsaturating", True, iterations=2, checkpoint_dir=tmp_path, checkpoint_every=2)
    resumed = _run("nonsaturating", True, iterations=4, checkpoint_dir=tmp_path, resume=True)
    for key, value in full.generator.state_dict().items():
        assert torch.equal(value, resumed.generator.state_dict()[key])
    a, b = full.callbacks[0], resumed.callbacks[0]
    assert torch.equal(a.g_tracker.ledger.contributions, b.g_tracker.ledger.contributions)
    assert torch.equal(a.d_tracker.ledger.contributions, b.d_tracker.ledger.contributions)
    assert json.dumps(a.report()["windows"]) == json.dumps(b.report()["windows"])  # NaN-safe equality


def test_user_loop_example_runs():
    # --- the README example: an analyzer in your own GAN loop ---
    torch.manual_seed(0)
    G, D = MLPGenerator(2, 2, hidden=16), MLPDiscriminator(2, hidden=16, spectral_norm=True)
    g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    real_data, _ = gaussian_ring(256, std=0.05)
    analyzer = GANKernelAnalyzer(G, D, probe_latents=torch.randn(16, 2), grouping="direction", num_groups=4,
                                 window=4, eval_every=2, track_discriminator=False)
    g_loss = GeneratorLoss(D)
    for it in range(4):
        real = real_data[torch.randint(0, 256, (32,))]
        fake = G(torch.randn(32, 2)).detach()
        d_loss = nn.functional.softplus(-D(real)).mean() + nn.functional.softplus(D(fake)).mean()
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        step = OptimizerStep(G, g_opt, g_loss, torch.randn(32, 2), phase="generator")  # added
        with frozen(D):                                                                 # added
            perform_step([analyzer], None, step)                                        # added
    report = analyzer.report()
    # --- end of example ---
    assert report["generator_steps"] == 4 and report["generator"]["relative_residual"] < 1e-2
    assert len(report["alignment"]) >= 1 and "traffic_own_minus_control" in report["windows"][0]


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_probe_latents_of_wrong_dimension_are_refused():
    G, D = _pair()
    with pytest.raises(ValueError, match="latent dimension 3 but the generator expects 2"):
        GANKernelAnalyzer(G, D, torch.randn(4, 3, dtype=F64))


def test_discriminator_must_give_one_value_per_example():
    G, _ = _pair()
    D2 = nn.Sequential(nn.Linear(2, 2)).double()
    with pytest.raises(ValueError, match="one value per example"):
        GANKernelAnalyzer(G, D2, _probes(4))


def test_more_groups_than_the_batch_can_fill_is_an_error():
    data, _ = _ring()
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, _probes(4), grouping="direction", num_groups=20, track_discriminator=False)
    trainer = GANTrainer(G, D, data, batch_size=8, callbacks=[analyzer])
    with pytest.raises(ValueError, match="20 groups but the batch has only 8 examples"):
        trainer.train(1)
    few = DirectionGroups(5)
    same = torch.ones(10, 2, dtype=F64)
    with pytest.raises(ValueError, match="1 distinct gradient directions, fewer than num_groups=5"):
        few.fit(same, same, same, same[:, 0])


def test_non_finite_losses_stop_with_step_and_phase_and_keep_the_ledger():
    data, modes = _ring()
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, _probes(4), grouping="direction", num_groups=3, window=1, eval_every=1)
    trainer = GANTrainer(G, D, data, batch_size=16, callbacks=[analyzer])
    trainer.train(2)
    kept_g, kept_d = analyzer.g_tracker.ledger.contributions.clone(), analyzer.d_tracker.ledger.contributions.clone()
    trainer.data = torch.full_like(data, math.inf)  # corrupt real data: the discriminator loss is inf
    with pytest.raises(NonFiniteError, match=r"iteration 2, discriminator step: step 3 \(discriminator\)"):
        trainer.train(3)
    assert analyzer.d_tracker.ledger.steps == 2 and torch.equal(analyzer.d_tracker.ledger.contributions, kept_d)
    # generator phase, in a user loop
    bad_loss = lambda x, t: GeneratorLoss(D)(x) * math.inf  # noqa: E731
    step = OptimizerStep(G, trainer.g_optimizer, bad_loss, torch.randn(16, 2, dtype=F64), phase="generator")
    with pytest.raises(NonFiniteError, match=r"generator step 3 \(phase generator\)"), frozen(D):
        analyzer.perform(step)
    assert analyzer.g_tracker.ledger.steps == 2 and torch.equal(analyzer.g_tracker.ledger.contributions, kept_g)


def test_training_mode_spectral_norm_during_generator_step_is_analysed_without_changing_training():
    # Formerly refused (the analysis ran D in eval mode and could not leave a training-mode D alone);
    # now every analysis pass writes D's buffers back, so D ends exactly as after the plain step:
    # its power iteration advanced once, by the training forward.
    def run(analyze):
        G, D = _pair(sn=True)
        opt = torch.optim.Adam(G.parameters())
        step = OptimizerStep(G, opt, GeneratorLoss(D), _probes(8, seed=4), phase="generator")
        before = {k: v.clone() for k, v in D.state_dict().items()}
        with frozen(D):
            if analyze:
                GANKernelAnalyzer(G, D, _probes(4), num_groups=2, track_discriminator=False, window=1, eval_every=1).perform(step)
            else:
                step.run()
        return G, D, before

    (G0, D0, start), (G1, D1, _) = run(False), run(True)
    assert D0.training and any(not torch.equal(start[k], v) for k, v in D0.state_dict().items())  # u, v advanced
    for a, b in ((G0, G1), (D0, D1)):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key


# ------------------------------------------------------------------------------------------
# losses and the per-example gradient penalty
# ------------------------------------------------------------------------------------------
def test_losses_match_their_formulas_and_the_penalty_matches_autograd():
    from genkernel.gan import DiscriminatorLoss, DiscriminatorObjective, discriminator_losses, generator_losses

    s = torch.tensor([-1.5, 0.2, 2.0], dtype=F64)
    roles = torch.tensor([1, 0, 1])
    sp = nn.functional.softplus
    assert torch.allclose(discriminator_losses("nonsaturating", s, roles), torch.stack([sp(-s[0]), sp(s[1]), sp(-s[2])]))
    assert torch.allclose(discriminator_losses("hinge", s, roles), torch.stack([torch.relu(1 - s[0]), torch.relu(1 + s[1]), torch.relu(1 - s[2])]))
    assert torch.allclose(discriminator_losses("wgan-gp", s, roles), torch.stack([-s[0], s[1], -s[2]]))
    assert torch.allclose(generator_losses("nonsaturating", s), sp(-s)) and torch.equal(generator_losses("hinge", s), -s)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_losses("lsgan", s)
    _, D = _pair(sn=True)
    D.eval()
    critic = DiscriminatorObjective(D, penalty=True)
    x = torch.randn(5, 2, dtype=F64)
    roles = torch.tensor([0, 1, 2, 2, 1])
    values = critic(x, roles)[:, 0]
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(D(xr).sum(), xr)
    expected = torch.where(roles == 2, g.norm(dim=1), D(x)[:, 0])
    assert torch.allclose(values, expected, rtol=1e-6)
    loss = DiscriminatorLoss("wgan-gp", gp_weight=10.0)(critic(x, roles), roles)
    assert torch.allclose(loss[2:4], 10.0 * (g.norm(dim=1)[2:4] - 1) ** 2, rtol=1e-6)


def test_geometry_groupings_assign_as_documented():
    from genkernel.gan import ConfidenceGroups, MagnitudeGroups, ModeGroups, NearestModeGroups

    centers = ring_mode_centers(4, 2.0).double()  # modes at +x, +y, -x, -y
    x = torch.zeros(3, 2, dtype=F64)
    w = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.1, -1.0]], dtype=F64)  # pushes −w: +x, −y, ~+y
    z = torch.zeros(3, 2, dtype=F64)
    assert ModeGroups(centers)(z, x, w, z[:, 0]).tolist() == [0, 3, 1]
    near = torch.tensor([[1.9, 0.1], [0.0, -1.5], [-2.2, 0.0]], dtype=F64)
    assert NearestModeGroups(centers)(z, near, w, z[:, 0]).tolist() == [0, 3, 2]
    ref_w = torch.arange(1, 9, dtype=F64).view(8, 1) * torch.tensor([[1.0, 0.0]], dtype=F64)
    mags = MagnitudeGroups(4).fit(ref_w, ref_w, ref_w, ref_w[:, 0])
    assert mags(ref_w, ref_w, ref_w, ref_w[:, 0]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    conf = ConfidenceGroups(2).fit(ref_w, ref_w, ref_w, -ref_w[:, 0])
    assert conf(ref_w, ref_w, ref_w, -ref_w[:, 0]).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="distinct levels"):
        MagnitudeGroups(4).fit(ref_w, torch.ones(8, 2), torch.ones(8, 2), ref_w[:, 0])


def test_window_coupling_is_read_from_ledger_differences():
    from genkernel.core import grouping

    G, D = _pair()
    data, _ = _ring()
    analyzer = GANKernelAnalyzer(G, D, _probes(8), grouping="direction", num_groups=3, controls=2, window=2, eval_every=1,
                                 track_discriminator=False)
    trainer = GANTrainer(G, D, data, batch_size=16, callbacks=[analyzer])
    trainer.train(2)
    start = {name: ledger.copy() for name, ledger in analyzer.generator_ledgers.items()}
    trainer.train(4)
    record = analyzer.windows[1]
    groups = torch.tensor(record["probe_groups"])
    window = analyzer.generator_ledger().since(start["geometry"])
    expected = grouping.average_by_probe_group(grouping.traffic_shares(window.traffic), groups, 3)
    torch.testing.assert_close(torch.tensor(record["traffic_matrix"], dtype=F64), expected, equal_nan=True)
    controls = [analyzer.generator_ledger(f"control_{i}").since(start[f"control_{i}"]) for i in range(2)]
    own = [grouping.own_share(grouping.traffic_shares(c.traffic), groups) for c in controls]
    diff = record["traffic_own_minus_control"]
    assert diff["controls"] == 2
    # clustered by probe group (probes of one group share a column): the mean of the groups' means,
    # one unit per occupied group, and never held on fewer than 3 units
    own_control = torch.stack(own).mean(0)
    occupied = groups.unique().tolist()
    by_group = [float(own_control[groups == a].nanmean()) for a in occupied]
    assert diff["control"] == pytest.approx(sum(by_group) / len(by_group))
    assert diff["n"] == len(occupied)
    if len(occupied) < 3:
        assert diff["held"] is False and "independent unit" in diff["why"]
    with pytest.raises(ValueError, match="unknown partition 'level'"):
        analyzer.generator_ledger("level")


def test_resume_with_callbacks_in_another_order_or_missing(tmp_path):
    from test_diffusion import StepCounter

    def build(with_analyzer=True, checkpoint=True):
        G, D = _pair()
        data, _ = _ring()
        callbacks = [StepCounter()]
        if with_analyzer:
            callbacks.append(GANKernelAnalyzer(G, D, _probes(6), grouping="direction", num_groups=2, window=2, eval_every=1))
        kwargs = dict(checkpoint_dir=tmp_path, checkpoint_every=2) if checkpoint else {}
        return GANTrainer(G, D, data, batch_size=16, callbacks=callbacks, **kwargs)

    straight = build(checkpoint=False)
    straight.train(4)
    build().train(2)
    reordered = build()
    reordered.callbacks.reverse()
    reordered.train(4, resume=True)
    analyzer, counter = reordered.callbacks
    ref = straight.callbacks[1]
    assert counter.count == 8  # one discriminator and one generator step per iteration
    assert torch.equal(analyzer.generator_ledger().contributions, ref.generator_ledger().contributions)
    assert torch.equal(analyzer.discriminator_ledger.contributions, ref.discriminator_ledger.contributions)
    missing = build(with_analyzer=False)
    with pytest.raises(ValueError, match=r"\['GANKernelAnalyzer'\]"):
        missing.train(6, resume=True)


# ------------------------------------------------------------------------------------------
# the comparison grouping and the geometry of another loss (issue 11)
# ------------------------------------------------------------------------------------------
def _comparison_analyzer(G, D, **options):
    settings = dict(grouping="mode", comparison="nearest_mode", mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
                    controls=2, window=3, eval_every=1, track_discriminator=False)
    settings.update(options)
    return GANKernelAnalyzer(G, D, _probes(12), **settings)


def test_a_comparison_grouping_is_split_on_the_same_steps_with_its_own_controls():
    from genkernel.core import grouping
    from genkernel.gan.metrics import own_minus_others

    G, D = _pair()
    data, modes = _ring()
    analyzer = _comparison_analyzer(G, D)
    assert analyzer.partitions == {"geometry": 8, "spatial": 8, "control_0": 8, "control_1": 8,
                                   "spatial_control_0": 8, "spatial_control_1": 8}
    trainer = GANTrainer(G, D, data, labels=modes, batch_size=32, callbacks=[analyzer])
    trainer.train(3)
    start = {name: ledger.copy() for name, ledger in analyzer.generator_ledgers.items()}
    trainer.train(6)
    ledgers = analyzer.generator_ledgers
    total = ledgers["geometry"].contributions.sum(1)
    for name, ledger in ledgers.items():  # every partition splits the same steps: same total, rest and residual
        torch.testing.assert_close(ledger.contributions.sum(1), total, rtol=0, atol=1e-12 * float(total.abs().max()), msg=name)
        assert torch.equal(ledger.rest, ledgers["geometry"].rest)  # the residual differs by each partition's rounding
        torch.testing.assert_close(ledger.residual, ledgers["geometry"].residual, rtol=0, atol=1e-12 * float(total.abs().max()))
    assert len(analyzer.g_spatial_counts) == 6 and all(sum(c) == 32 for c in analyzer.g_spatial_counts)
    # the window's statistics are the ledger differences' (the spatial partition with its own probe groups)
    stats = analyzer.windows[1]["statistics"]
    assert {"geometry", "spatial", "geometry_minus_spatial"} <= set(stats)
    groups = torch.tensor(stats["spatial"]["probe_groups"])
    window = {name: ledgers[name].since(start[name]) for name in ("spatial", "spatial_control_0", "spatial_control_1")}
    mine = own_minus_others(grouping.traffic_shares(window["spatial"].traffic), groups, 8)
    controls = torch.stack([own_minus_others(grouping.traffic_shares(window[f"spatial_control_{i}"].traffic), groups, 8)
                            for i in range(2)])
    expected = (mine - controls.mean(0)).tolist()
    got = stats["spatial"]["traffic"]["per_probe"]["interaction_minus_control"]
    assert got == pytest.approx(expected, nan_ok=True)
    geometry = stats["geometry"]["traffic"]["per_probe"]["interaction_minus_control"]
    difference = stats["geometry_minus_spatial"]["traffic"]
    assert difference["per_probe"] == pytest.approx([a - b for a, b in zip(geometry, got)], nan_ok=True)
    assert difference["n"] == len({g for g, v in zip(stats["geometry"]["probe_groups"], difference["per_probe"])
                                   if v == v})  # clustered by geometry probe group
    assert "spatial" not in analyzer.windows[1]["traffic_own_minus_control"]  # the older keys are unchanged
    # save / load: the comparison's fit and the windows come back, and a report works before any further step
    fresh = _comparison_analyzer(G, D)
    fresh.load_state_dict(analyzer.state_dict())
    assert json.dumps(fresh.report()["windows"]) == json.dumps(analyzer.report()["windows"])
    assert fresh.report()["generator"]["steps"] == 6 and fresh.state_dict()["g_tracker"] is not None
    with pytest.raises(ValueError, match="same size"):
        GANKernelAnalyzer(G, D, _probes(12), grouping="direction", num_groups=3, comparison="nearest_mode",
                          mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05)


def test_geometry_loss_groups_by_D_while_G_trains_on_a_loss_that_ignores_D():
    from genkernel.gan import push_field

    G, D = _pair()
    torch.manual_seed(5)
    fixed = MLPDiscriminator(2, hidden=16, depth=2).double().requires_grad_(False)
    data, modes = _ring()
    analyzer = _comparison_analyzer(G, D, comparison="latent_kmeans", controls=1, geometry_loss=GeneratorLoss(D))
    trainer = GANTrainer(G, D, data, labels=modes, batch_size=32, callbacks=[analyzer])
    trainer.g_loss = GeneratorLoss(fixed)  # G's steps ignore D
    trainer.train(3)
    snap = analyzer.fields[-1]  # the probes at the last generator step, before it, D as it was then
    with frozen(D):
        torch.testing.assert_close(snap["w"], -push_field(GeneratorLoss(D), snap["x"]))
        assert not torch.allclose(snap["w"], -push_field(GeneratorLoss(fixed), snap["x"]))
    for ledger in analyzer.generator_ledgers.values():  # the ledger is the training loss's, exact
        total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
        torch.testing.assert_close(total, ledger.delta, rtol=0, atol=1e-12)
    assert all(row["cos_formula"] > 0.999 for row in analyzer.alignment)


def test_owned_step_groups_by_the_discriminator_gradient_training_sees_with_dropout_in_both_players():
    """G and D with dropout (pix2pix-style noise in G): the geometry groups of an owned generator step
    are those of the w_i = ∇_x ℓ_G(D(G(z_i))) of the training forward itself, where D's dropout masks
    are drawn after G's (the analysis pass once redrew D's masks from the step's starting RNG state)."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Dropout(0.3), nn.Linear(16, 2)).to(F64)
    D = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Dropout(0.3), nn.Linear(16, 1)).to(F64)
    seen = []

    def by_direction(z, x, w, s):
        seen.append(w.clone())
        return (w[:, 0] > w[:, 1]).long()

    analyzer = GANKernelAnalyzer(G, D, _probes(4), grouping=FunctionGroups(by_direction, 2), controls=0, window=1,
                                 eval_every=1, track_discriminator=False)
    z = _probes(8, seed=9)
    loss_fn = GeneratorLoss(D)
    state = torch.get_rng_state()
    x = G(z)  # the training forward's masks: G's first, then D's
    (w_train,) = torch.autograd.grad(loss_fn(x, None).sum(), x)
    torch.set_rng_state(state)
    with frozen(D):
        analyzer.perform(OptimizerStep(G, torch.optim.SGD(G.parameters(), lr=0.1), loss_fn, z, phase="generator"))
    batch = [w for w in seen if w.shape[0] == 8]
    assert len(batch) == 1
    torch.testing.assert_close(batch[0], w_train, rtol=0, atol=1e-14)
    assert analyzer.g_group_counts == [torch.bincount((w_train[:, 0] > w_train[:, 1]).long(), minlength=2).tolist()]


def test_a_generator_that_takes_other_latents_is_refused_with_the_wrapper_that_fits():
    """DCGAN's generator (configs.dcgan64_generator) takes [B, nz, 1, 1]; the trainer samples
    [B, latent_dim]. Refused at construction with the fix (was a conv_transpose2d error at the first
    step); wrapped as the message says, it trains."""
    from genkernel.gan.configs import dcgan64_discriminator, dcgan64_generator

    G, D = dcgan64_generator(nz=4, ngf=2, nc=1, seed=0), dcgan64_discriminator(ndf=2, nc=1, seed=0)
    data = torch.rand(8, 1, 64, 64) * 2 - 1
    with pytest.raises(ValueError, match=r"does not take the trainer's latents \[B, latent_dim\] = \[B, 4\].*Unflatten"):
        GANTrainer(G, D, data, latent_dim=4, output="probability", batch_size=4)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    wrapped = nn.Sequential(nn.Unflatten(1, (4, 1, 1)), G)
    trainer = GANTrainer(wrapped, D, data, latent_dim=4, output="probability", batch_size=4)
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())  # the check leaves G's buffers
    trainer.train(1)
    assert len(trainer.history["g_loss"]) == 1


def test_a_conditional_generator_is_refused_with_how_to_wrap_it():
    class ConditionalG(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.net = nn.Embedding(3, 2), nn.Linear(4, 2)

        def forward(self, z, y):
            return self.net(torch.cat([z, self.embed(y)], 1))

    _, D = _pair()
    with pytest.raises(ValueError, match=r"missing 1 required positional argument.*conditional GAN.*one-hot"):
        GANKernelAnalyzer(ConditionalG().to(F64), D, _probes(4))
