"""The GAN analyzer attached to the training code people already have (issue "Attach to the training
code people already have", GAN part): an observed plain-PyTorch DCGAN-style loop keeps the ledgers the
owned path keeps, training is bit-for-bit unchanged, no analyzer verb changes D, probability outputs
are caught, and reports are strict JSON with the loop's step numbers."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genkernel import OptimizerStep
from genkernel.gan import (
    DiscriminatorLoss,
    DiscriminatorObjective,
    FunctionGroups,
    GANKernelAnalyzer,
    GeneratorLoss,
    frozen,
)

F64 = torch.float64
NZ, B, CLIP = 4, 8, 0.5


class TinyG(nn.Module):
    """DCGAN-like: ``[B, nz, 1, 1] -> [B, 1, 8, 8]``, BatchNorm in training mode, no bias before it."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(NZ, 8, 4, 1, 0, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
            nn.ConvTranspose2d(8, 1, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, z):
        return self.main(z)


class TinyD(nn.Module):
    """DCGAN-like: ``[B, 1, 8, 8] -> [B]`` logits (or probabilities with ``sigmoid``), BatchNorm in
    training mode; ``sn``: spectral norm on both convolutions."""

    def __init__(self, *, sigmoid=False, sn=False, batch_norm=True):
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        layers = [wrap(nn.Conv2d(1, 8, 4, 2, 1, bias=not batch_norm))]
        layers += [nn.BatchNorm2d(8)] if batch_norm else []
        layers += [nn.LeakyReLU(0.2), wrap(nn.Conv2d(8, 1, 4, 1, 0, bias=False))]
        layers += [nn.Flatten(0)]
        layers += [nn.Sigmoid()] if sigmoid else []
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def nets(seed=0, **d_options):
    torch.manual_seed(seed)
    return TinyG().to(F64), TinyD(**d_options).to(F64)


def optimizers(G, D):
    return (torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999)),
            torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999)))


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    blob = torch.zeros(1, 1, 8, 8, dtype=F64)
    blob[..., 2:6, 2:6] = 0.8
    out = []
    for _ in range(n):
        real = (blob + 0.2 * torch.randn(B, 1, 8, 8, generator=g, dtype=F64)).clamp(-1, 1)
        out.append((real, torch.randn(B, NZ, 1, 1, generator=g, dtype=F64), torch.randn(B, NZ, 1, 1, generator=g, dtype=F64)))
    return out


PROBES = torch.randn(6, NZ, 1, 1, generator=torch.Generator().manual_seed(7), dtype=F64)
ROLES = torch.cat([torch.ones(B), torch.zeros(B)]).long()  # 1 real, 0 generated


def analyzer_for(G, D, **options):
    settings = dict(grouping="direction", num_groups=3, window=2, eval_every=1, controls=1)
    settings.update(options)
    return GANKernelAnalyzer(G, D, PROBES, **settings)


def bound_players(**options):
    """``(G, D, g_opt, d_opt, analyzer)``: fresh players and an analyzer bound to observe them."""
    G, D = nets()
    g_opt, d_opt = optimizers(G, D)
    analyzer = analyzer_for(G, D, **options)
    analyzer.bind(g_opt, d_opt)
    return G, D, g_opt, d_opt, analyzer


# ------------------------------------------------------------------------------------------
# the loops
# ------------------------------------------------------------------------------------------
def plain_loop(G, D, g_opt, d_opt, data, analyzer=None):
    """A plain PyTorch loop the owned path can express step for step: D on real and generated rows in
    one forward (BCE), then G on fresh latents (BCE against 'real'), Adam, clipping on G. The
    analyzer's two observe calls are its only added lines."""
    for real, z_d, z_g in data:
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(D(x), ROLES.to(F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_discriminator(losses, ROLES, x)  # added
        (losses[:B].mean() + losses[B:].mean()).backward()
        d_opt.step()
        g_opt.zero_grad()
        fake = G(z_g)
        losses = F.binary_cross_entropy_with_logits(D(fake), torch.ones(B, dtype=F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_generator(losses, z_g, fake)  # added
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(G.parameters(), CLIP)
        g_opt.step()


def dcgan_loop(G, D, g_opt, d_opt, data, analyzer=None, ema=None):
    """The PyTorch DCGAN example's structure: one G forward per iteration reused by both steps; D sees
    real and generated rows in two forwards and two backwards (accumulation), G keeps D in training
    mode (D's parameters not frozen, its BatchNorm statistics move), clipping on G."""
    for real, z, _ in data:
        D.zero_grad()
        out = D(real)
        loss_real = F.binary_cross_entropy_with_logits(out, torch.ones(B, dtype=F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_discriminator(loss_real, torch.ones(B, dtype=torch.long), real)  # added
        loss_real.mean().backward()
        fake = G(z)
        out = D(fake.detach())
        loss_fake = F.binary_cross_entropy_with_logits(out, torch.zeros(B, dtype=F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_discriminator(loss_fake, torch.zeros(B, dtype=torch.long), fake.detach())  # added
        loss_fake.mean().backward()
        d_opt.step()
        G.zero_grad()
        out = D(fake)
        loss_g = F.binary_cross_entropy_with_logits(out, torch.ones(B, dtype=F64), reduction="none")
        if analyzer is not None:
            analyzer.observe_generator(loss_g, z, fake)  # added
        loss_g.mean().backward()
        torch.nn.utils.clip_grad_norm_(G.parameters(), CLIP)
        g_opt.step()
        if ema is not None:
            ema.step()


def owned_loop(G, D, g_opt, d_opt, data, analyzer):
    """The same steps as :func:`plain_loop`, performed by the analyzer (the owned path)."""
    critic, g_loss, d_loss = DiscriminatorObjective(D), GeneratorLoss(D), DiscriminatorLoss()
    weights = torch.full((2 * B,), 1.0 / B, dtype=F64)
    for real, z_d, z_g in data:
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        analyzer.perform(OptimizerStep(critic, d_opt, d_loss, (x, ROLES), ROLES, weights, phase="discriminator",
                                       info={"roles": ROLES}))
        with frozen(D):
            analyzer.perform(OptimizerStep(G, g_opt, g_loss, z_g, max_grad_norm=CLIP, phase="generator"))


def states(*modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def assert_identity(ledger, atol=1e-12):
    """Σ contributions + rest (buffer drift included) + residual = Δ output at every probe."""
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, ledger.delta, rtol=0, atol=atol * max(1.0, float(ledger.delta.abs().max())))


# ------------------------------------------------------------------------------------------
# observed = owned, identities, bit-for-bit training
# ------------------------------------------------------------------------------------------
def test_an_observed_loop_keeps_the_ledgers_of_the_owned_path():
    data = batches(3)
    G, D, g_opt, d_opt, observed = bound_players()
    plain_loop(G, D, g_opt, d_opt, data, observed)
    G2, D2 = nets()
    g_opt2, d_opt2 = optimizers(G2, D2)
    owned = analyzer_for(G2, D2)
    owned_loop(G2, D2, g_opt2, d_opt2, data, owned)

    pairs = [(observed.generator_ledger(p), owned.generator_ledger(p)) for p in ("geometry", "control_0")]
    pairs.append((observed.discriminator_ledger, owned.discriminator_ledger))
    for a, b in pairs:
        assert a.steps == b.steps == 3
        scale = float(b.contributions.abs().max())
        assert scale > 0
        for field in ("contributions", "residual", "traffic", "f_end"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-12 * scale, msg=field)
        # The observed G tracker starts at bind, before the first D step's G forward moved G's running
        # statistics; the observed D tracker after the first D forward moved D's; the owned ones start at
        # their first step. So the ledgers start from other outputs, and the drift before the first step
        # is in one rest and not the other: measured from the same start, rest and drift agree.
        for field in ("rest", "buffer_drift"):
            torch.testing.assert_close(getattr(a, field) + a.f_start, getattr(b, field) + b.f_start, rtol=0,
                                       atol=1e-12 * scale, msg=field)
        torch.testing.assert_close(a.rest - a.buffer_drift, b.rest - b.buffer_drift, rtol=0, atol=1e-12 * scale)
        assert_identity(a)
        assert float(a.buffer_drift.abs().max()) > 0  # BatchNorm's running statistics: booked in rest
    # the windows, alignment and step numbers are the same bookkeeping on both paths
    assert [w["probe_groups"] for w in observed.windows] == [w["probe_groups"] for w in owned.windows]
    assert observed.g_group_counts == owned.g_group_counts and observed.d_group_counts == owned.d_group_counts
    # the probes' geometry and the kernel field at θ_k agree at every evaluation step; the steps' changes
    # too, but for the first, whose change includes each tracker's drift since it started
    for a, b in zip(observed.fields, owned.fields):
        for key in ("x", "w", "field"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12 * float(b[key].abs().max()), msg=key)
    assert len(observed.alignment) == len(owned.alignment) == 3
    for x, y in zip(observed.alignment[1:], owned.alignment[1:]):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-9), key
    # the D loss was mean(real) + mean(generated): twice the observed mean, reported as the step's scale
    assert all(s["scale"] == pytest.approx(2.0) for s in observed.d_tracker.gradient_scales)


def test_observing_a_dcgan_loop_leaves_training_bit_identical_and_the_ledgers_add_up():
    data = batches(4)
    G, D = nets()
    g_opt, d_opt = optimizers(G, D)
    dcgan_loop(G, D, g_opt, d_opt, data)
    G2, D2 = nets()
    g_opt2, d_opt2 = optimizers(G2, D2)
    analyzer = analyzer_for(G2, D2)
    analyzer.bind(g_opt2, d_opt2, start_step=10)
    dcgan_loop(G2, D2, g_opt2, d_opt2, data, analyzer)
    for a, b in zip(states(G, D), states(G2, D2)):  # parameters, running statistics
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for o1, o2 in ((g_opt, g_opt2), (d_opt, d_opt2)):
        for s1, s2 in zip(o1.state.values(), o2.state.values()):
            assert all(torch.equal(s1[k], s2[k]) for k in s1)
    for ledger in (analyzer.generator_ledger(), analyzer.generator_ledger("control_0"), analyzer.discriminator_ledger):
        assert ledger.steps == 4
        assert_identity(ledger)
    assert analyzer.generator_ledger().relative_residual() < 1e-3
    # two micro-batches per D step (accumulation), each a mean: the real gradient is their sum
    assert all(s["micro_batches"] == 2 and s["scale"] == pytest.approx(1.0) for s in analyzer.d_tracker.gradient_scales)
    report = analyzer.report()
    assert report["loop_steps"] == {"generator": [11, 14], "discriminator": [11, 14]}
    assert [w["loop_steps"] for w in report["windows"]] == [[11, 12], [13, 14]]
    assert any("no generated rows" in note for note in report["notes"])  # D's probes: the first micro-batch's rows
    # the observing trackers have no loss function of their own; a bound analyzer takes no owned steps
    with pytest.raises(RuntimeError, match="observes your own loop"):
        analyzer.d_tracker.loss_fn(torch.zeros(1, dtype=F64), None)
    with pytest.raises(RuntimeError, match="observes your own loop"):
        analyzer.perform(OptimizerStep(G2, g_opt2, GeneratorLoss(D2), data[0][1], phase="generator"))


class ShadowEMA:
    """A hand-written EMA of G's weights (the tracker reads ``ema()`` -> {name: tensor})."""

    def __init__(self, model, decay=0.8):
        self.model, self.decay = model, decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step(self):
        for n, p in self.model.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    def __call__(self):
        return self.shadow


def test_the_generator_ema_keeps_its_own_ledger_in_an_observed_loop():
    G, D = nets()
    g_opt, d_opt = optimizers(G, D)
    ema = ShadowEMA(G)
    analyzer = analyzer_for(G, D, controls=0)
    analyzer.bind(g_opt, d_opt, ema=ema)
    dcgan_loop(G, D, g_opt, d_opt, batches(3), analyzer, ema=ema)
    ledger = analyzer.generator_ema_ledgers["geometry"]
    assert ledger.steps == 3
    assert_identity(ledger)
    report = analyzer.report()
    assert report["generator_ema"]["steps"] == 3 and report["generator_ema"]["decays"] == pytest.approx([0.8] * 3)


# ------------------------------------------------------------------------------------------
# analysis never changes D
# ------------------------------------------------------------------------------------------
DISCRIMINATORS = {"batch_norm": {}, "spectral_norm": {"sn": True, "batch_norm": False},
                  "both": {"sn": True}}


def _same(before, module, what):
    after = {name: t for name, t in [*module.named_parameters(), *module.named_buffers()]}
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{what} changed {name}"


@pytest.mark.parametrize("kind", list(DISCRIMINATORS))
def test_no_analyzer_verb_changes_the_discriminator(kind):
    from genkernel.gan.passes import state_snapshot

    G, D = nets(**DISCRIMINATORS[kind])
    g_opt, d_opt = optimizers(G, D)

    def verb(what, fn, *args, **kwargs):
        before = state_snapshot(D)
        out = fn(*args, **kwargs)
        _same(before, D, what)
        return out

    analyzer = verb("the constructor", analyzer_for, G, D)
    verb("bind", analyzer.bind, g_opt, d_opt)
    for real, z_d, z_g in batches(3):
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(D(x), ROLES.to(F64), reduction="none")
        verb("observe_discriminator", analyzer.observe_discriminator, losses, ROLES, x)
        losses.mean().backward()
        d_opt.step()
        g_opt.zero_grad()
        fake = G(z_g)
        losses = F.binary_cross_entropy_with_logits(D(fake), torch.ones(B, dtype=F64), reduction="none")
        verb("observe_generator", analyzer.observe_generator, losses, z_g, fake)  # the loss check, probes, field
        losses.mean().backward()
        verb("the generator step's recording", g_opt.step)
    verb("finish", analyzer.finish)
    verb("report", analyzer.report)
    verb("state_dict", analyzer.state_dict)
    assert analyzer.generator_ledger().steps == 3 and analyzer.discriminator_ledger.steps == 3

    # owned generator steps: D ends exactly as after the same step without the analyzer (its training
    # forward moves D's buffers once, the analysis not at all)
    def owned(analyze):
        G, D = nets(**DISCRIMINATORS[kind])
        g_opt, _ = optimizers(G, D)
        step = OptimizerStep(G, g_opt, GeneratorLoss(D), batches(1)[0][2], phase="generator")
        with frozen(D):
            analyzer_for(G, D, track_discriminator=False).perform(step) if analyze else step.run()
        return state_snapshot(D), state_snapshot(G)

    for a, b in zip(owned(False), owned(True)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_freezes_parameters_keeps_modes_by_default_and_switches_to_eval_by_name():
    _, D = nets()
    D.main[1].eval()  # a mixed-mode network: one module already in eval mode
    modes = [m.training for m in D.modules()]
    with frozen(D) as inside:
        assert inside is D
        assert not any(p.requires_grad for p in D.parameters())
        assert [m.training for m in D.modules()] == modes
    assert all(p.requires_grad for p in D.parameters()) and [m.training for m in D.modules()] == modes
    with frozen(D, modes="eval"):
        assert not any(m.training for m in D.modules()) and not any(p.requires_grad for p in D.parameters())
    assert [m.training for m in D.modules()] == modes and all(p.requires_grad for p in D.parameters())
    for bad in (True, "train"):
        with pytest.raises(ValueError, match="modes must be one of"):
            with frozen(D, modes=bad):
                pass


# ------------------------------------------------------------------------------------------
# discriminators that output probabilities
# ------------------------------------------------------------------------------------------
class FunctionalSigmoidD(nn.Module):
    """Probabilities from a functional sigmoid: no nn.Sigmoid module to find."""

    def __init__(self):
        super().__init__()
        self.inner = TinyD()

    def forward(self, x):
        return torch.sigmoid(self.inner(x))


def test_a_logit_loss_with_a_sigmoid_discriminator_is_caught_and_probability_output_works():
    from genkernel.gan import discriminator_losses, generator_losses

    G, D = nets(sigmoid=True)
    with pytest.raises(ValueError, match="output='probability'"):
        GeneratorLoss(D)
    torch.manual_seed(0)
    dcgan_style = nn.Sequential(nn.Conv2d(1, 2, 8), nn.Sigmoid(), nn.Flatten(0)).to(F64)  # as PyTorch's DCGAN ends
    with pytest.raises(ValueError, match="final module is nn.Sigmoid"):
        GeneratorLoss(dcgan_style)
    hidden = GeneratorLoss(FunctionalSigmoidD().to(F64))  # no module to find before the first call
    hidden.discriminator.inner.main.append(nn.Sigmoid())  # now the last module run is a Sigmoid
    with pytest.raises(ValueError, match="last module executed is nn.Sigmoid"):
        hidden(torch.randn(B, 1, 8, 8, dtype=F64))
    with pytest.raises(ValueError, match="output='probability'"):
        DiscriminatorLoss(discriminator=D)
    with pytest.raises(ValueError, match="output='probability'"):
        analyzer_for(G, D).bind(*optimizers(G, D))  # the default generator_loss is GeneratorLoss(D)
    with pytest.raises(ValueError, match="kind='nonsaturating'"):
        GeneratorLoss(D, kind="hinge", output="probability")
    _, logits = nets()
    with pytest.raises(ValueError, match=r"outside \[0, 1\]: this discriminator outputs logits"):
        GeneratorLoss(logits, output="probability")(torch.randn(B, 1, 8, 8, dtype=F64) * 10)
    # the probability losses are BCELoss's, its clamp included
    p = torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=F64)
    roles = torch.tensor([1, 0, 1, 0])
    torch.testing.assert_close(generator_losses("nonsaturating", p, "probability"), F.binary_cross_entropy(p, torch.ones(4, dtype=F64), reduction="none"))
    torch.testing.assert_close(discriminator_losses("nonsaturating", p, roles, output="probability"),
                               F.binary_cross_entropy(p, roles.to(F64), reduction="none"))
    # a sigmoid D observed with generator_loss=GeneratorLoss(D, output="probability") and BCELoss
    g_opt, d_opt = optimizers(G, D)
    analyzer = analyzer_for(G, D, generator_loss=GeneratorLoss(D, output="probability"))
    analyzer.bind(g_opt, d_opt)
    for real, z_d, z_g in batches(2):
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy(D(x), ROLES.to(F64), reduction="none")
        analyzer.observe_discriminator(losses, ROLES, x)
        losses.mean().backward()
        d_opt.step()
        g_opt.zero_grad()
        fake = G(z_g)
        losses = F.binary_cross_entropy(D(fake), torch.ones(B, dtype=F64), reduction="none")
        analyzer.observe_generator(losses, z_g, fake)
        losses.mean().backward()
        g_opt.step()
    for ledger in (analyzer.generator_ledger(), analyzer.discriminator_ledger):
        assert ledger.steps == 2
        assert_identity(ledger)


@pytest.mark.parametrize("case", ["functional_sigmoid", "hinge"])
def test_a_generator_loss_that_does_not_reproduce_the_loops_losses_is_refused_with_the_cause(case):
    torch.manual_seed(0)
    G = TinyG().to(F64)
    D = (FunctionalSigmoidD() if case == "functional_sigmoid" else TinyD()).to(F64)
    g_opt, d_opt = optimizers(G, D)
    analyzer = analyzer_for(G, D)
    analyzer.bind(g_opt, d_opt)
    z = batches(1)[0][2]
    fake = G(z)
    if case == "functional_sigmoid":
        losses = F.binary_cross_entropy(D(fake), torch.ones(B, dtype=F64), reduction="none")
        expected = "GeneratorLoss\\(D, output='probability'\\)"
    else:
        losses = -D(fake)
        expected = "kind='hinge'"
    before = [p.detach().clone() for p in G.parameters()]
    with pytest.raises(ValueError, match=f"does not reproduce your generator losses.*{expected}"):
        analyzer.observe_generator(losses, z, fake)
    losses.mean().backward()  # the loop's backward still runs: the graph was left intact
    assert analyzer.g_tracker._observed is None  # nothing was observed
    assert all(torch.equal(p, q) for p, q in zip(G.parameters(), before))


# ------------------------------------------------------------------------------------------
# reports, latents of any shape
# ------------------------------------------------------------------------------------------
def test_the_report_is_strict_json_with_loop_steps_collapse_flags_and_notes():
    G, D = nets()
    g_opt, d_opt = optimizers(G, D)
    one_group = FunctionGroups(lambda z, x, w, s: torch.zeros(z.shape[0], dtype=torch.long), 4, name="everything")
    analyzer = analyzer_for(G, D, grouping=one_group, num_groups=None)  # (the object's own count)
    analyzer.bind(g_opt, d_opt, start_step=100)
    plain_loop(G, D, g_opt, d_opt, batches(3), analyzer)
    analyzer.finish()
    report = analyzer.report()
    text = json.dumps(report, allow_nan=False)  # strict JSON: NaN written as null
    assert "NaN" not in text and "null" in text  # the empty groups' coupling rows are undefined
    assert report["loop_steps"] == {"generator": [101, 103], "discriminator": [101, 103]}
    assert report["windows"][0]["loop_steps"] == [101, 102] and report["windows"][0]["collapsed"] is True
    assert report["partial_window"]["steps"] == [3, 3] and report["partial_window"]["partial"] is True
    assert report["generator"]["coupling_whole_run"]["collapsed"] is True
    assert any("fitted on the first batch" in note for note in report["notes"])
    assert [row["loop_step"] for row in report["alignment"]] == [101, 102, 103]
    for which in ("generator", "discriminator"):
        large = report[which]["relative_residual"] > 1e-3
        assert large == any(f"the {which} ledger's relative residual" in n and "simpson" in n for n in report["notes"])


def test_a_large_residual_gets_the_simpson_note():
    G, D = nets()
    g_opt = torch.optim.SGD(G.parameters(), lr=20.0)  # huge steps: the midpoint rule's error shows
    analyzer = analyzer_for(G, D, track_discriminator=False)
    analyzer.bind(g_opt)
    for _, _, z in batches(2):
        fake = G(z)
        losses = F.binary_cross_entropy_with_logits(D(fake), torch.ones(B, dtype=F64), reduction="none")
        analyzer.observe_generator(losses, z, fake)
        g_opt.zero_grad()
        losses.mean().backward()
        g_opt.step()
    report = analyzer.report()
    assert report["generator"]["relative_residual"] > 1e-3
    assert any("quadrature='simpson'" in note for note in report["notes"])


def test_latents_of_any_shape_and_the_latent_dim_check():
    G, D = nets()
    G.latent_dim = NZ
    with pytest.raises(ValueError, match=f"latent dimension 3 but the generator expects {NZ}"):
        GANKernelAnalyzer(G, D, torch.randn(4, 3, 1, 1, dtype=F64))
    analyzer = analyzer_for(G, D)  # [M, nz, 1, 1]: nz values per example
    analyzer.bind(*optimizers(G, D))
    z = torch.randn(B, NZ, dtype=F64)  # flat latents: not what the probes are
    with pytest.raises(ValueError, match="same shape per example"):
        analyzer.observe_generator(torch.zeros(B, dtype=F64, requires_grad=True), z, torch.zeros(B, 1, 8, 8, requires_grad=True))


def test_an_observed_null_model_takes_its_geometry_from_D_while_G_trains_on_another_discriminator():
    """geometry_loss in an observed loop: the loop's G losses come from a fixed random D0 (a generator
    independent of D); the analyzer groups and pushes by D's gradients, skips the check that its
    generator loss reproduces the loop's, and the ledgers stay exact."""
    from genkernel.gan import push_field

    G, D = nets()
    torch.manual_seed(9)
    fixed = TinyD(batch_norm=False).to(F64).requires_grad_(False)
    g_opt, d_opt = optimizers(G, D)
    analyzer = analyzer_for(G, D, comparison="latent_kmeans", geometry_loss=GeneratorLoss(D))
    analyzer.bind(g_opt, d_opt)
    for real, z_d, z_g in batches(3):
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(D(x), ROLES.to(F64), reduction="none")
        analyzer.observe_discriminator(losses, ROLES, x)
        losses.mean().backward()
        d_opt.step()
        g_opt.zero_grad()
        fake = G(z_g)
        losses = F.binary_cross_entropy_with_logits(fixed(fake), torch.ones(B, dtype=F64), reduction="none")
        analyzer.observe_generator(losses, z_g, fake)  # not D's loss: accepted, geometry from D
        losses.mean().backward()
        g_opt.step()
    snap = analyzer.fields[-1]
    expected = -push_field(GeneratorLoss(D), snap["x"])  # D in training mode, its buffers kept, as in the analysis
    torch.testing.assert_close(snap["w"], expected)
    for name, ledger in analyzer.generator_ledgers.items():
        assert ledger.steps == 3, name
        assert_identity(ledger)
    assert set(analyzer.generator_ledgers) == {"geometry", "spatial", "control_0", "spatial_control_0"}


def test_alignment_compares_what_the_gradient_step_moved_without_the_buffer_drift():
    """TinyG has BatchNorm: its running statistics move G's outputs at every step. The alignment
    row's change is the ledger's step change less that drift: the step's contributions, rest and
    residual without the drift, exactly."""
    G, D, g_opt, d_opt, analyzer = bound_players()
    steps = []
    analyzer.g_tracker.listeners.append(
        lambda result: steps.append((result.contributions.sum(1) + result.rest + result.residual).cpu()))
    drifts = []
    analyzer.g_tracker.listeners.append(lambda result: drifts.append(analyzer.g_tracker.ledger.buffer_drift.clone()))
    plain_loop(G, D, g_opt, d_opt, batches(3), analyzer)
    previous = torch.zeros_like(drifts[0])
    assert len(steps) == len(analyzer.fields) == len(analyzer.alignment) == 3
    for total, drift, snapshot, row in zip(steps, drifts, analyzer.fields, analyzer.alignment):
        step_drift = drift - previous
        previous = drift
        assert float(step_drift.abs().max()) > 1e-4  # BatchNorm moved the outputs
        torch.testing.assert_close(snapshot["change"], total - step_drift, rtol=1e-10, atol=1e-13)
        assert row["buffer_drift_norm"] == pytest.approx(float(step_drift.norm(dim=1).mean()), rel=1e-12)


def resumed_players(first, players, path):
    """Save ``first`` and the players, then rebuild both players, their optimizers and an analyzer from
    the saved state as a new process would; returns ``(G, D, g_opt, d_opt, analyzer)``, not yet bound."""
    first.save(path)
    saved = [m.state_dict() for m in players]
    G, D = nets()
    g_opt, d_opt = optimizers(G, D)
    for module, state in zip((G, D, g_opt, d_opt), saved):
        module.load_state_dict(state)
    resumed = analyzer_for(G, D)
    resumed.load(path)
    return G, D, g_opt, d_opt, resumed


def test_a_resumed_observed_loop_numbers_its_steps_from_binds_start_step(tmp_path):
    data = batches(4)
    G, D, g_opt, d_opt, straight = bound_players()
    plain_loop(G, D, g_opt, d_opt, data, straight)

    G, D, g_opt, d_opt, first = bound_players()
    plain_loop(G, D, g_opt, d_opt, data[:2], first)
    G, D, g_opt, d_opt, resumed = resumed_players(first, (G, D, g_opt, d_opt), tmp_path / "gan.pt")
    resumed.bind(g_opt, d_opt, start_step=2)
    plain_loop(G, D, g_opt, d_opt, data[2:], resumed)
    assert resumed.g_loop_steps == straight.g_loop_steps == [1, 2, 3, 4]
    assert resumed.d_loop_steps == straight.d_loop_steps == [1, 2, 3, 4]


def two_generator_steps_loop(G, D, g_opt, d_opt, data, analyzer):
    """One discriminator step, then two generator steps (on z_d and z_g) per iteration."""
    for real, z_d, z_g in data:
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(D(x), ROLES.to(F64), reduction="none")
        analyzer.observe_discriminator(losses, ROLES, x)
        losses.mean().backward()
        d_opt.step()
        for z in (z_d, z_g):
            g_opt.zero_grad()
            fake = G(z)
            losses = F.binary_cross_entropy_with_logits(D(fake), torch.ones(B, dtype=F64), reduction="none")
            analyzer.observe_generator(losses, z, fake)
            losses.mean().backward()
            g_opt.step()


def test_a_resumed_loop_with_more_steps_of_one_player_is_numbered_per_player_or_refused(tmp_path):
    """Two generator steps per iteration: bind(start_step=iterations) after a load used to number the
    generator's steps 3, 4 again (the windows' loop steps went backwards, silently); now refused with the
    pair to pass, and start_step=(generator_steps, discriminator_steps) numbers each player on."""
    data = batches(3)
    G, D, g_opt, d_opt, straight = bound_players()
    two_generator_steps_loop(G, D, g_opt, d_opt, data, straight)

    G, D, g_opt, d_opt, first = bound_players()
    two_generator_steps_loop(G, D, g_opt, d_opt, data[:2], first)
    G, D, g_opt, d_opt, resumed = resumed_players(first, (G, D, g_opt, d_opt), tmp_path / "gan.pt")
    with pytest.raises(ValueError, match=r"numbered generator steps up to 4.*start_step=\(4, 2\)"):
        resumed.bind(g_opt, d_opt, start_step=2)
    resumed.bind(g_opt, d_opt, start_step=(4, 2))
    two_generator_steps_loop(G, D, g_opt, d_opt, data[2:], resumed)
    assert resumed.g_loop_steps == straight.g_loop_steps == [1, 2, 3, 4, 5, 6]
    assert resumed.d_loop_steps == straight.d_loop_steps == [1, 2, 3]
    assert [w["loop_steps"] for w in resumed.windows] == [w["loop_steps"] for w in straight.windows] == [[1, 2], [3, 4], [5, 6]]
    torch.testing.assert_close(resumed.generator_ledger().contributions, straight.generator_ledger().contributions,
                               rtol=0, atol=0)
    # bound first, loaded after: the same check, before anything is loaded
    other = analyzer_for(G, D)
    other.bind(g_opt, d_opt, start_step=2)
    with pytest.raises(ValueError, match="numbered generator steps up to 4"):
        other.load(tmp_path / "gan.pt")
    assert other.g_steps == 0 and other.g_loop_steps == []


def test_a_step_the_loop_skips_leaves_no_rows_in_the_next_steps_group_counts():
    """A loop that clears the gradients without stepping (a GradScaler that found inf, a skipped update):
    the tracker drops those micro-batches; the analyzer's group counts of the next step used to keep
    their rows too (16 rows counted for an 8-row step), and its kernel field their pull."""
    by_sign = FunctionGroups(lambda z, x, w, s: (z.sum(1) > 0).long(), 2)
    G, D, g_opt, d_opt, analyzer = bound_players(grouping=by_sign, num_groups=2, window=1)
    for real, z_d, z_g in batches(2):
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        for attempt in range(2):  # D: the first attempt is skipped
            d_opt.zero_grad()
            losses = F.binary_cross_entropy_with_logits(D(x), ROLES.to(F64), reduction="none")
            analyzer.observe_discriminator(losses, ROLES, x)
            losses.mean().backward()
        d_opt.step()
        for z in (z_d, z_g):  # G: the attempt on z_d is skipped, the step trains on z_g
            g_opt.zero_grad()
            fake = G(z)
            losses = F.binary_cross_entropy_with_logits(D(fake), torch.ones(B, dtype=F64), reduction="none")
            analyzer.observe_generator(losses, z, fake)
            losses.mean().backward()
        g_opt.step()
    expected = [torch.bincount((z_g.flatten(1).sum(1) > 0).long(), minlength=2).tolist() for _, _, z_g in batches(2)]
    assert analyzer.g_group_counts == expected
    assert analyzer.d_group_counts == [[B, B, 0], [B, B, 0]]
    assert len(analyzer.g_tracker.skipped_steps) == 2 and len(analyzer.d_tracker.skipped_steps) == 2
    assert [w["training_group_counts"] for w in analyzer.windows] == expected


def test_a_saved_state_whose_tracker_part_is_refused_leaves_a_clear_refusal():
    # Observe mode rebuilds the generator tracker inside load_state_dict; when that tracker refuses
    # its part (another optimizer), the rest of the state was already in. Old: the next observe
    # blamed "parameters changed outside the tracked optimizer step".
    G, D, g_opt, d_opt, analyzer = bound_players()
    plain_loop(G, D, g_opt, d_opt, batches(2), analyzer)
    state = analyzer.state_dict()
    G2, D2 = nets()
    g_sgd = torch.optim.SGD(G2.parameters(), lr=1e-3)
    d_adam = torch.optim.Adam(D2.parameters(), lr=2e-3, betas=(0.5, 0.999))
    other = analyzer_for(G2, D2)
    other.bind(g_sgd, d_adam, start_step=(2, 2))
    with pytest.raises(ValueError, match="the optimizer was Adam, here SGD"):
        other.load_state_dict(state)
    for verb in (lambda: plain_loop(G2, D2, g_sgd, d_adam, batches(1, seed=5), other), other.report, other.state_dict):
        with pytest.raises(RuntimeError, match="loading a saved state failed half-way .*the optimizer was Adam"):
            verb()
