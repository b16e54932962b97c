"""GenkernelCallback against brute force (a black-box hunt): tiny float64 LightningModules on the CPU, each fit checked against
references written here (the same fit without the callback, per-example gradients by torch.func, the
optimizer's update by hand, the probe Jacobian at the step midpoint by forward-mode differentiation, the
real change of the probes' outputs) and Lightning's own step count."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from genkernel.diffusion import MLPDenoiser, NoiseLevelAnalyzer, make_scheduler

pl = pytest.importorskip("lightning.pytorch")
from genkernel.integrations.lightning import GenkernelCallback  # noqa: E402
from test_lightning_review import fit, trainer  # noqa: E402

F64 = torch.float64
T = 100
SCHEDULER = make_scheduler(T)
LR, MOMENTUM, CLIP, ACC = 0.05, 0.9, 0.3, 2


def ring(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g, dtype=F64) * 6.283
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g, dtype=F64)


def denoiser():
    torch.manual_seed(0)
    return MLPDenoiser(2, hidden=16, depth=2).to(F64)


def analyzer():
    return NoiseLevelAnalyzer(SCHEDULER, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2, progress=False)


def loader():
    return torch.utils.data.DataLoader(ring(40), batch_size=8)  # 5 batches an epoch


def draws(x0, epoch, index):
    """Noise and timesteps drawn from the batch's position, so that a resumed fit draws the same."""
    g = torch.Generator().manual_seed(1000 * epoch + index)
    return torch.randn(x0.shape, generator=g, dtype=x0.dtype), torch.randint(0, T, (x0.shape[0],), generator=g)


def losses_of(net, x0, epoch, index):
    torch.manual_seed(777 + 1000 * epoch + index)  # dropout's masks, from the position too
    noise, t = draws(x0, epoch, index)
    return ((net(SCHEDULER.add_noise(x0, noise, t), t) - noise) ** 2).mean(dim=1), t


class Denoiser(pl.LightningModule):
    def __init__(self, analyzer=None, net=None, schedule="step"):
        super().__init__()
        self.net = denoiser() if net is None else net
        self.analyzer, self.schedule = analyzer, schedule

    def training_step(self, x0, index):
        losses, t = losses_of(self.net, x0, self.current_epoch, index)
        if self.analyzer is not None:
            self.analyzer.observe(losses, t)
        return losses.mean()

    def validation_step(self, x0, index):  # draws from the global generator and calls the network
        noise, t = torch.randn(x0.shape, dtype=x0.dtype), torch.randint(0, T, (x0.shape[0],))
        self.log("val", ((self.net(SCHEDULER.add_noise(x0, noise, t), t) - noise) ** 2).mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": self.schedule}}


def midpoint_ledger(net, an, steps, lr_of, group_gradients):
    """The ledger written out: per step, the groups' gradients (``group_gradients(net, micro_batches)``, each
    micro-batch's loss divided by ACC as Lightning's accumulation does, the epoch's partial window included),
    clipped by norm as torch does, momentum carried per group, u_g = -lr m_g; contributions J(θ_mid; s_{k+1}) u_g,
    buffer drift f(θ_k; s_{k+1}) - f(θ_k; s_k), residual what is left of f(θ_{k+1}) - f(θ_k)."""
    names = [n for n, _ in net.named_parameters()]
    probes = an.probes(next(net.parameters()))
    contributions = rest = residual = 0
    moments = None
    for k, micro in enumerate(steps):
        theta = {n: p.detach().clone() for n, p in net.named_parameters()}
        before = {n: b.clone() for n, b in net.named_buffers()}
        gradients = group_gradients(net, micro)  # (advances BatchNorm's statistics as training does)
        after = {n: b.clone() for n, b in net.named_buffers()}
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(sum(g[n] for g in gradients))
                                                      for n in names]))
        clip = min(1.0, CLIP / (float(total) + 1e-6))
        moments = [{n: (0 if moments is None else MOMENTUM * moments[g][n]) + clip * gradients[g][n] for n in names}
                   for g in range(len(gradients))]
        updates = [{n: -lr_of(k) * m[n] for n in names} for m in moments]
        new = {n: theta[n] + sum(u[n] for u in updates) for n in names}
        mid = {n: (theta[n] + new[n]) / 2 for n in names}

        def f(params, buffers):
            return functional_call(net.eval(), {**params, **buffers}, probes)

        step = torch.stack([jvp(lambda p: f(p, after), (mid,), (u,))[1] for u in updates], 1)
        contributions = contributions + step
        rest = rest + f(theta, after) - f(theta, before)
        residual = residual + f(new, after) - f(theta, after) - step.sum(1)
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(new[n])
    return contributions, rest, residual


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_coverage_a_fit_with_partial_accumulation_clipping_and_momentum_has_the_per_example_brute_force_ledger():
    """coverage: passes before. An epoch of 5 batches, accumulation over 2 (the epoch's last step has one
    micro-batch, its loss still divided by 2), clipping by norm, SGD with momentum, a StepLR per step: bit for bit
    the fit without the callback, and each noise-level group's column is, to 1e-12, Σ_k J(θ_mid) u_{k,g} from
    torch.func per-example gradients and a momentum buffer per group written out here."""
    def run(an):
        module = Denoiser(an)
        fit(trainer([] if an is None else [GenkernelCallback(an, model_attribute="net")], max_epochs=1,
                    accumulate_grad_batches=ACC, gradient_clip_val=CLIP), module, loader())
        return module

    an = analyzer()
    tracked, bare = run(an), run(None)
    assert all(torch.equal(p, q) for p, q in zip(tracked.net.parameters(), bare.net.parameters()))
    batches = list(loader())
    steps = [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4)]]

    def per_example(net, micro):
        params = {n: p.detach() for n, p in net.named_parameters()}

        def loss(params, x, noise, t):
            return ((functional_call(net, params, (SCHEDULER.add_noise(x[None], noise[None], t[None]), t[None]))
                     - noise[None]) ** 2).mean()

        out = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in range(an.num_bins)]
        for epoch, index in micro:
            x0 = batches[index]
            noise, t = draws(x0, epoch, index)
            rows = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x0, noise, t)
            for g in range(an.num_bins):
                mask = (an.bins(t) == g).to(F64) / (x0.shape[0] * ACC)
                for n in params:
                    out[g][n] += torch.einsum("b,b...->...", mask, rows[n])
        return out

    contributions, rest, residual = midpoint_ledger(denoiser(), an, steps, lambda k: LR * 0.5 ** k, per_example)
    ledger = an.ledger
    assert ledger.steps == 3
    assert [s["micro_batches"] for s in an.tracker.gradient_scales] == [2, 2, 1]
    assert min(s["scale_times_micro_batches"] for s in an.tracker.gradient_scales) < 0.99  # clipping acted
    assert relative(ledger.contributions, contributions) < 1e-12
    assert float(ledger.rest.abs().max()) == 0.0 == float(rest.abs().max())
    assert float((ledger.residual - residual).abs().max()) < 1e-12 * float(ledger.delta.abs().max())
    probes = an.probes(next(tracked.net.parameters()))
    change = (tracked.net(*probes) - denoiser()(*probes)).detach()
    assert relative(ledger.delta, change) < 1e-14


class BatchNormDropout(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.a = nn.Embedding(T, 16), nn.Linear(2, 16)
        self.norm, self.drop, self.b = nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 2)
        self.to(F64)

    def forward(self, x, t):
        return self.b(self.drop(torch.tanh(self.norm(self.a(x) + self.embed(t)))))


def test_coverage_batchnorm_and_dropout_with_validation_mid_accumulation_have_the_graphs_ledger():
    """coverage: passes before. BatchNorm and dropout, accumulation over 2 with clipping, a StepLR per epoch, a
    sanity check and a validation loop every 3 batches (mid-window) drawing from the global generator: parameters,
    running statistics and the global RNG are bit for bit those of the fit without the callback, and the ledger
    is, to 1e-12, the one written out with the groups' gradients taken through each batch's own graph (its masks
    and batch statistics), the Jacobian at θ_mid read with the step's new running statistics and the statistics'
    change booked in ``rest`` at θ_k. (docs/observing.md describes the drift row at θ_{k+1} and the Jacobian at
    s_k instead: that split moves 2.9 % of the contributions into ``rest`` in this fit.)"""
    validation = torch.utils.data.DataLoader(ring(16, seed=9), batch_size=8)

    def run(an):
        torch.manual_seed(123)
        module = Denoiser(an, net=BatchNormDropout(), schedule="epoch")
        fit(trainer([] if an is None else [GenkernelCallback(an, model_attribute="net")], max_epochs=2,
                    accumulate_grad_batches=ACC, gradient_clip_val=CLIP, num_sanity_val_steps=2, val_check_interval=3),
            module, loader(), validation)
        return module, torch.get_rng_state()

    an = analyzer()
    (tracked, rng), (bare, bare_rng) = run(an), run(None)
    assert torch.equal(rng, bare_rng)
    for (name, a), b in zip(tracked.state_dict().items(), bare.state_dict().values()):
        assert torch.equal(a, b), name
    batches = list(loader())
    steps = [s for e in range(2) for s in ([(e, 0), (e, 1)], [(e, 2), (e, 3)], [(e, 4)])]

    def through_graph(net, micro):
        out = [{n: torch.zeros_like(p) for n, p in net.named_parameters()} for _ in range(an.num_bins)]
        net.train()
        for epoch, index in micro:
            losses, t = losses_of(net, batches[index], epoch, index)
            for g in range(an.num_bins):
                rows = torch.autograd.grad((losses * (an.bins(t) == g)).sum() / (losses.shape[0] * ACC),
                                           list(net.parameters()), retain_graph=True)
                for (n, _), r in zip(net.named_parameters(), rows):
                    out[g][n] += r
        return out

    net = BatchNormDropout()
    contributions, rest, residual = midpoint_ledger(net, an, steps, lambda k: LR * 0.5 ** (k // 3), through_graph)
    for a, b in zip(net.state_dict().values(), bare.net.state_dict().values()):  # (the reference's own rounding)
        assert float((a.double() - b.double()).abs().max()) <= 1e-14 * max(1.0, float(b.double().abs().max()))
    ledger = an.ledger
    assert relative(ledger.contributions, contributions) < 1e-12
    assert relative(ledger.rest, rest) < 1e-12 and float(rest.abs().max()) > 0
    assert float((ledger.residual - residual).abs().max()) < 1e-12 * float(ledger.delta.abs().max())


class Abandoning(Denoiser):
    """Epoch 0 ends at batch 3 (``on_train_batch_start`` returns -1): batch 2's accumulated gradient is never
    stepped, and Lightning clears it at the next window's zero_grad without counting a step."""

    def on_train_batch_start(self, batch, index):
        if self.current_epoch == 0 and index == 3:
            return -1


def test_an_accumulation_lightning_abandons_is_numbered_as_lightning_numbers_its_steps(tmp_path):
    """Fails on the old code. Lightning takes 4 steps (global_step 4); the analyzer numbered them [1, 3, 4, 5], its report said
    global_steps [1, 5], and a fit resumed from the checkpoint written after them was refused: "bind(start_step=4)
    numbers the next step 5, but the saved analyzer already numbered steps up to 5". The ledger itself is the real
    change (checked here too)."""
    an = analyzer()
    module = Abandoning(an)
    first = trainer([GenkernelCallback(an, model_attribute="net")], max_epochs=2, accumulate_grad_batches=ACC)
    fit(first, module, loader())
    probes = an.probes(next(module.net.parameters()))
    assert relative(an.ledger.delta, (module.net(*probes) - denoiser()(*probes)).detach()) < 1e-14
    first.save_checkpoint(tmp_path / "last.ckpt")
    assert first.global_step == 4 and an.ledger.steps == 4
    resumed = analyzer()
    fit(trainer([GenkernelCallback(resumed, model_attribute="net")], max_epochs=3, accumulate_grad_batches=ACC),
        Abandoning(resumed), loader(), ckpt_path=tmp_path / "last.ckpt")
    assert an.global_steps == [1, 2, 3, 4]
    assert resumed.global_steps == [1, 2, 3, 4, 5, 6, 7]


class SkippingNonFinite(Denoiser):
    """Batch 1's loss is NaN: training_step returns None before observing (observe refuses a non-finite loss) and
    optimizer_step takes no step for it; Lightning still counts the step in global_step."""

    def training_step(self, x0, index):
        losses, t = losses_of(self.net, x0, self.current_epoch, index)
        if index == 1:
            losses = losses * float("nan")
        self.skipped = not bool(torch.isfinite(losses).all())
        if self.skipped:
            return None
        if self.analyzer is not None:
            self.analyzer.observe(losses, t)
        return losses.mean()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()
        if not self.skipped:
            optimizer.step(closure=lambda: None)


def test_a_step_skipped_in_optimizer_step_keeps_lightnings_step_numbers():
    """Fails on the old code. Lightning's global_step counts 5 steps over 5 batches (the skipped one included), as the docs say the
    analyzers' numbers do ("a skipped step still counts ... as the loop's own count, Lightning's, counts it"); the
    analyzer numbered the 4 updates [1, 2, 3, 4], so every step after the skip carried the wrong number."""
    an = analyzer()
    module = SkippingNonFinite(an)
    fit(trainer([GenkernelCallback(an, model_attribute="net")], max_epochs=1), module, loader())
    bare = SkippingNonFinite(None)
    fit(trainer([], max_epochs=1), bare, loader())
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), bare.net.parameters()))
    probes = an.probes(next(module.net.parameters()))
    assert relative(an.ledger.delta, (module.net(*probes) - denoiser()(*probes)).detach()) < 1e-14
    assert module.trainer.global_step == 5
    assert an.global_steps == [1, 3, 4, 5]


class ReturningNoneOnNaN(SkippingNonFinite):
    optimizer_step = pl.LightningModule.optimizer_step


def test_a_nan_loss_returned_as_none_is_refused_with_a_fix_that_works():
    """Fails on the old code. Returning None for a non-finite loss: Lightning still calls optimizer.step() (no gradient), which the tracker
    refuses as a step without an observed micro-batch. The note added to that error said to call observe() before
    `return None`, but observe() refuses the NaN losses (NonFiniteError): the note must name a remedy that works
    (skip the step in optimizer_step: tests above)."""
    an = analyzer()
    with pytest.raises(RuntimeError, match="without an observed micro-batch") as caught:
        fit(trainer([GenkernelCallback(an, model_attribute="net")], max_epochs=1), ReturningNoneOnNaN(an), loader())
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "non-finite" in notes and "optimizer_step" in notes
