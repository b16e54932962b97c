"""The GAN analyzer on a loop trained under torch.autocast (GANKernelAnalyzer(mixed_precision="observe")).

A DCGAN-like pair (BatchNorm in training mode in G and D) trained in float32 with its forwards under
CPU autocast (bfloat16, or float16 with a GradScaler): both networks train bit for bit as without the
analyzer, every step of both is booked at the precision it ran in, the probes' geometry is that of
the float32 networks wherever observe_* is called, the loop's losses are checked at the half
precision's tolerance (a wrong loss kind still named), the default refuses before any analysis pass,
and an owned step under the caller's autocast is split as the loop's are (tests/test_owned_mixed_precision.py:
GANTrainer(mixed_precision="bf16"))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from genkernel import OptimizerStep
from genkernel.core.tracking.quadrature import residual_remedy
from genkernel.gan import GANKernelAnalyzer, GeneratorLoss, frozen
from test_gan_observe import NZ, B, TinyD, TinyG

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


def _nets():
    torch.manual_seed(0)
    return TinyG(), TinyD()


def _batches(steps=STEPS):
    g = torch.Generator().manual_seed(1)
    blob = torch.zeros(1, 1, 8, 8)
    blob[..., 2:6, 2:6] = 0.8
    return [((blob + 0.2 * torch.randn(B, 1, 8, 8, generator=g)).clamp(-1, 1),
             torch.randn(B, NZ, 1, 1, generator=g), torch.randn(B, NZ, 1, 1, generator=g)) for _ in range(steps)]


def _probes():
    return torch.randn(16, NZ, 1, 1, generator=torch.Generator().manual_seed(5))


def _analyzer(G, D, **options):
    return GANKernelAnalyzer(G, D, _probes(), num_groups=2, window=STEPS, eval_every=1, state_dtype=torch.float32,
                             **options)


def _train(dtype, *, analyze, observe_inside=False, steps=STEPS, hinge=False, device="cpu", clear_first=False,
           init_scale=2.0 ** 16, taken=None):
    """The loop: a D step on real and generated rows, then a non-saturating G step (hinge: −D(G(z))), forwards
    under autocast(dtype) on ``device`` (float16: through a GradScaler starting at ``init_scale``; None: no
    autocast), Adam on both. Each player observes (inside the autocast block with ``observe_inside``), clears
    its gradients, backpropagates and steps; ``clear_first``: it clears them before its forward instead.
    Returns G, D, the analyzer; ``taken`` (a list) receives the optimizers' step counts (G's, D's)."""
    G, D = (net.to(device) for net in _nets())
    g_opt = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
    scaler = torch.amp.GradScaler(device, init_scale=init_scale, enabled=dtype == torch.float16)
    analyzer = None
    if analyze:
        analyzer = _analyzer(G, D, mixed_precision="observe")
        analyzer.bind(g_opt, d_opt)

    def player_step(optimizer, forward, observe):
        """One player's step: ``forward() -> (losses, observe's arguments)`` under autocast, observe (inside the
        block or after it), zero_grad (before the forward with ``clear_first``), the scaled backward, the step."""
        if clear_first:
            optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses, arguments = forward()
            if analyzer is not None and observe_inside:
                observe(losses, *arguments)
        if analyzer is not None and not observe_inside:
            observe(losses, *arguments)
        if not clear_first:
            optimizer.zero_grad()
        scaler.scale(losses.mean()).backward()
        scaler.step(optimizer)

    def discriminator_forward(real, z):
        x = torch.cat([real, G(z).detach()])
        roles = torch.cat([torch.ones(B), torch.zeros(B)]).long().to(device)
        return F.binary_cross_entropy_with_logits(D(x).view(-1).float(), roles.float(), reduction="none"), (roles, x)

    def generator_forward(z):
        fake = G(z)
        scores = D(fake).view(-1).float()
        return (-scores if hinge else F.softplus(-scores)), (z, fake)

    for real, z_d, z_g in ([t.to(device) for t in batch] for batch in _batches(steps)):
        player_step(d_opt, lambda: discriminator_forward(real, z_d), analyzer and analyzer.observe_discriminator)
        player_step(g_opt, lambda: generator_forward(z_g), analyzer and analyzer.observe_generator)
        scaler.update()
    if taken is not None:
        taken.extend(int(next(iter(opt.state.values()))["step"]) if opt.state else 0 for opt in (g_opt, d_opt))
    return G, D, analyzer


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype, inside", [(torch.bfloat16, False), (torch.float16, True)],
                         ids=["bf16_observed_after_the_block", "fp16_gradscaler_observed_inside_the_block"])
def test_autocast_gan_loop_trains_unchanged_and_books_every_step(dtype, inside):
    """Both networks train bit for bit as without the analyzer; every step of both players is booked at the
    precision its forward ran in, each generator partition adds up to the change, and the report carries it.
    Before, the analyzer refused the loop (its trackers kept the default) or crashed on bf16 samples in D."""
    G0, D0, _ = _train(dtype, analyze=False)
    G1, D1, analyzer = _train(dtype, analyze=True, observe_inside=inside)
    assert _equal(_state(G0), _state(G1)) and _equal(_state(D0), _state(D1))
    name = str(dtype).replace("torch.", "")
    for tracker in (analyzer.g_tracker, analyzer.d_tracker):
        assert tracker.ledger.steps == STEPS
        assert [entry["gradient_precision"] for entry in tracker.gradient_scales] == [name] * STEPS
    analyzer.finish()
    # Each partition adds up to the change; each holds its own rounding row in its residual (the geometry
    # partition and its permutation control round differently: their totals differ, under Adam, by about
    # their residuals, 1.1e-2 of the total in bfloat16 and 6e-4 in float16, against 8e-7 in float32).
    for ledger in analyzer.generator_ledgers.values():
        total = ledger.contributions.sum(dim=1) + ledger.rest + ledger.residual
        assert torch.allclose(total, ledger.delta, rtol=0, atol=1e-12 * float(ledger.delta.abs().max()))
    assert all(0 < entry["relative_residual"] < float("inf") for entry in analyzer.g_tracker.gradient_scales)
    report = analyzer.report()
    assert report["generator"]["gradient_scales"][0]["gradient_precision"] == name
    assert report["discriminator"]["gradient_scales"][0]["gradient_precision"] == name


def test_probe_geometry_is_the_float32_networks_inside_autocast():
    """Observed inside the autocast block, the probes' geometry w(z') = ∇_x ℓ_G(D(x)) at x = G(z') is read
    from the float32 networks (G in eval mode, D in its training mode on copies of its buffers), not the
    bfloat16 forward the block would run: equal to a hand computation in float32 to 1e-6, while the same
    computation under autocast is further off."""
    G, D = _nets()
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    analyzer = _analyzer(G, D, mixed_precision="observe", track_discriminator=False)
    analyzer.bind(g_opt, d_opt)
    _, _, z = _batches(1)[0]

    def by_hand(autocast):
        g, d = copy.deepcopy(G).eval(), copy.deepcopy(D)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x = g(_probes()).detach().requires_grad_(True)
            losses = F.softplus(-d(x).view(-1).float())
        return x.detach().float(), torch.autograd.grad(losses.sum(), x)[0].float()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = G(z)
        losses = F.softplus(-D(fake).view(-1).float())
        x32, w32 = by_hand(False)  # (after the loop's forward: G's running statistics as the probes see them)
        _, w16 = by_hand(True)
        analyzer.observe_generator(losses, z, fake)
    probe = analyzer._probe_state
    assert probe["x"].dtype == torch.float32 and probe["w"].dtype == torch.float32
    assert torch.allclose(probe["x"], x32, rtol=0, atol=1e-6)
    scale = float(w32.abs().max())
    assert torch.allclose(probe["w"], w32, rtol=0, atol=1e-6 * scale)
    assert float((w16 - w32).abs().max()) > 1e-4 * scale  # (the bfloat16 pass is distinguishable)


def test_wrong_loss_kind_is_named_at_half_precision():
    """The first observed generator micro-batch's losses are checked at two bfloat16 eps against the analyzer's
    loss repeated under autocast: a hinge loop with the default non-saturating analyzer is refused, naming
    the hinge loss (its candidates compared at the same tolerance)."""
    with pytest.raises(ValueError, match="kind='hinge'"):
        _train(torch.bfloat16, analyze=True, hinge=True, steps=1)


def test_default_refuses_before_any_analysis_pass():
    """Without mixed_precision="observe" an autocast loop is refused at its first observe_*, with the option
    named, and nothing changed or booked (before, G's step met the bfloat16 samples in a float32 pass of D:
    a dtype error)."""
    for phase in ("discriminator", "generator"):
        G, D = _nets()
        analyzer = _analyzer(G, D)
        analyzer.bind(torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01))
        real, _, z = _batches(1)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fake = G(z)
            x = torch.cat([real, fake.detach()])
            roles = torch.cat([torch.ones(B), torch.zeros(B)]).long()
            d_losses = F.binary_cross_entropy_with_logits(D(x).view(-1).float(), roles.float(), reduction="none")
            g_losses = F.softplus(-D(fake).view(-1).float())
        before_g, before_d = _state(G), _state(D)  # (after the loop's forwards, which move BatchNorm's statistics)
        with pytest.raises(RuntimeError, match="mixed_precision='observe'"):
            if phase == "discriminator":
                analyzer.observe_discriminator(d_losses, roles, x)
            else:
                analyzer.observe_generator(g_losses, z, fake)
        assert analyzer.g_steps == 0 and analyzer.d_steps == 0
        assert _equal(before_g, _state(G)) and _equal(before_d, _state(D))


def test_owned_step_under_autocast_is_refused_by_default_and_split_under_the_option():
    """An owned generator step under the caller's autocast: refused by default before its analysis (G as it
    was), booked in bfloat16 under the option (old code refused it there too) with G's update the untracked
    step's, bit for bit."""
    def step(G, D):
        return OptimizerStep(G, torch.optim.SGD(G.parameters(), lr=0.1), GeneratorLoss(D), _batches(1)[0][2],
                             phase="generator")

    G, D = _nets()
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen(D):
        step(G, D).run()
    plain = _state(G)
    G, D = _nets()
    before = _state(G)
    analyzer = _analyzer(G, D, track_discriminator=False)
    with pytest.raises(RuntimeError, match="mixed_precision='observe'"), torch.autocast("cpu", dtype=torch.bfloat16), \
            frozen(D):
        analyzer.perform(step(G, D))
    assert analyzer.g_steps == 0 and _equal(before, _state(G))
    analyzer = _analyzer(G, D, mixed_precision="observe", track_discriminator=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen(D):
        analyzer.perform(step(G, D))
    assert analyzer.g_steps == 1 and _equal(plain, _state(G))
    assert analyzer.g_tracker.gradient_scales[0]["gradient_precision"] == "bfloat16"


def test_accelerate_bf16_gan_loop(fresh_accelerate):
    """G and D prepared by Accelerator(mixed_precision="bf16") (their forwards wrapped in autocast), stepped
    with accelerator.backward: bit for bit the loop without the analyzer, every step booked in bfloat16."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def run(analyze):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        G, D = _nets()
        g_opt, d_opt = torch.optim.Adam(G.parameters(), lr=2e-3), torch.optim.Adam(D.parameters(), lr=2e-3)
        G, D, g_opt, d_opt = accelerator.prepare(G, D, g_opt, d_opt)
        analyzer = None
        if analyze:
            analyzer = _analyzer(G, D, mixed_precision="observe")
            analyzer.bind(g_opt, d_opt)
        for real, z_d, z_g in _batches():
            x = torch.cat([real, G(z_d).detach().float()])
            roles = torch.cat([torch.ones(B), torch.zeros(B)]).long()
            d_losses = F.binary_cross_entropy_with_logits(D(x).view(-1).float(), roles.float(), reduction="none")
            if analyzer is not None:
                analyzer.observe_discriminator(d_losses, roles, x)
            d_opt.zero_grad()
            accelerator.backward(d_losses.mean())
            d_opt.step()
            fake = G(z_g)
            g_losses = F.softplus(-D(fake).view(-1).float())
            if analyzer is not None:
                analyzer.observe_generator(g_losses, z_g, fake)
            g_opt.zero_grad()
            accelerator.backward(g_losses.mean())
            g_opt.step()
        return accelerator.unwrap_model(G), accelerator.unwrap_model(D), analyzer

    G0, D0, _ = run(False)
    G1, D1, analyzer = run(True)
    assert _equal(_state(G0), _state(G1)) and _equal(_state(D0), _state(D1))
    for tracker in (analyzer.g_tracker, analyzer.d_tracker):
        assert [entry["gradient_precision"] for entry in tracker.gradient_scales] == ["bfloat16"] * STEPS


def test_residual_remedy_names_half_precision_steps_first():
    scales = [{"gradient_precision": "bfloat16", "relative_residual": 0.04}, {"gradient_precision": None},
              {"gradient_precision": "float16", "relative_residual": 0.2}]
    text = residual_remedy("midpoint", scales)
    assert text.startswith("2 step(s) were split from bfloat16 and float16 gradients")
    assert "worst step 0.2 of its change" in text and text.endswith(residual_remedy("midpoint").split("; so do")[-1])
    assert residual_remedy("midpoint", [{"gradient_precision": None}]) == residual_remedy("midpoint")
    # a saved state's infinite share (None in JSON) is the worst, not 0; a state without shares names none
    saved = [{"gradient_precision": "bfloat16", "relative_residual": 0.04},
             {"gradient_precision": "bfloat16", "relative_residual": None}]
    assert "worst step inf of its change" in residual_remedy("midpoint", saved)
    assert "worst step" not in residual_remedy("midpoint", [{"gradient_precision": "bfloat16"}])


def test_saved_state_summary_flags_the_half_precision_rounding():
    """`genkernel summarize` of a GAN analyzer saved from a bfloat16 loop: both ledgers' "adds up" claims
    carry the caveat that their residual holds the half-precision rounding (none for a float32 loop)."""
    from genkernel.report import summarize

    for dtype, caveat in ((torch.bfloat16, True), (None, False)):
        _, _, analyzer = _train(dtype, analyze=True, steps=2)
        (summary,) = summarize(analyzer.state_dict())["states"].values()
        claims = {c["statement"].split(" adds up")[0]: c for c in summary["claims"] if " adds up" in c["statement"]}
        assert set(claims) == {"The generator ledger", "The discriminator ledger"}
        for claim in claims.values():
            if caveat:
                assert claim["caveat"].startswith("2 step(s) were split from bfloat16 gradients")
            else:
                assert "caveat" not in claim
