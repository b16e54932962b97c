"""GANKernelAnalyzer against brute force, float64 (a black-box hunt).

Every reference here is computed without the analyzer: each step's inputs are recorded by an outer callback, the
group gradients ĝ_g = ∇_θ Σ_{n∈g} c_n ℓ_n come from plain autograd on the recorded batch (D as it was at that step),
the optimizer's per-group updates are written out by hand (SGD; Adam with per-group first moments and the shared
second moment of docs/optimizers.md), and each update is pushed to the probes with a JVP at the step's midpoint.

Coverage (pass before): the generator's ledger per geometry group and the discriminator's per role over losses,
penalties, micro-batches, separate forwards, several D steps and a conditional GAN; the EMA ledger; the window
coupling matrices and intervals recomputed from the brute-force ledger; an owned run and the same run observed in a
hand-written loop give the same ledgers bit for bit; training with the analyzer is bit for bit training without it
(BatchNorm and dropout in both players).

Faults the hunt found (three tests fail on the old code): the kernel-field snapshots used c_n = 1/B rounded to
float32 in a float64 run (2.98e-8 relative at B = 6); an observed loop that accumulates K micro-batches without
weights= got a field K times the owned step's; a conditional GAN's classes were read as mixture modes by
``discriminator_groups="role_mode"`` (real rows at modes [2, 1, 0, 5] booked as [3, 5, 0, 0]).
"""

import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel.core.adapter import seeded_generator
from genkernel.core.tracking.callbacks import TrainerCallback
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
LAT = 3
LR_G, LR_D = 0.05, 0.04
BETAS = (0.0, 0.99)


# -- the recorder and the brute force -------------------------------------------------------------
def _clone(t):
    if isinstance(t, torch.Tensor):
        return t.detach().clone()
    if isinstance(t, (tuple, list)):
        return type(t)(_clone(x) for x in t)
    return t


def _rows(t, sl):
    if isinstance(t, torch.Tensor):
        return t[sl]
    if isinstance(t, (tuple, list)):
        return type(t)(_rows(x, sl) for x in t)
    return t


class _Recorder(TrainerCallback):
    """Outermost callback: each step's model, loss, inputs, targets, weights, micro-batch rows, parameters before and
    after, and (a generator step) D's state as the step used it."""

    name = "ganhunt_recorder"

    def __init__(self):
        self.steps = []

    def wrap_step(self, trainer, step, perform):
        d = getattr(step.loss_fn, "discriminator", None)
        rec = dict(phase=step.phase, model=step.model, loss_fn=step.loss_fn, inputs=_clone(step.inputs),
                   targets=_clone(step.targets), weights=_clone(step.weights), micro=step.micro_batches,
                   micro_rows=getattr(step, "micro_rows", None),
                   before={n: p.detach().clone() for n, p in step.model.named_parameters()},
                   buffers={n: b.detach().clone() for n, b in step.model.named_buffers()},
                   d_state=None if d is None else (d, copy.deepcopy(d.state_dict())))
        out = perform()
        rec["after"] = {n: p.detach().clone() for n, p in step.model.named_parameters()}
        self.steps.append(rec)
        return out


def _losses(rec, params):
    buffers = {n: b.clone() for n, b in rec["buffers"].items()}
    rows = rec["micro_rows"]
    if rows is None and rec["micro"] > 1:
        parts = torch.tensor_split(torch.arange(rec["inputs"][0].shape[0]), rec["micro"])
        rows = [slice(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
    rows = rows or [slice(None)]
    out = []
    for sl in rows:  # one forward per micro-batch, in training's order
        y = functional_call(rec["model"], {**params, **buffers}, _rows(rec["inputs"], sl))
        out.append(rec["loss_fn"](y, _rows(rec["targets"], sl)).reshape(-1))
    return torch.cat(out)


def _group_gradients(rec, ids, groups):
    """ĝ_g = ∇_θ Σ_{n∈g} c_n ℓ_n at the step's θ, D as that step used it."""
    d, state = rec["d_state"] or (None, None)
    now = None if d is None else copy.deepcopy(d.state_dict())
    if d is not None:
        with torch.no_grad():
            d.load_state_dict(state)
    try:
        params = {n: p.clone().requires_grad_(True) for n, p in rec["before"].items()}
        losses = _losses(rec, params)
        b = losses.shape[0]
        c = rec["weights"] if rec["weights"] is not None else torch.full((b,), 1.0 / b, dtype=F64)
        out = []
        for g in range(groups):
            total = (c * (ids == g).to(F64) * losses).sum()
            grads = torch.autograd.grad(total, list(params.values()), retain_graph=True, allow_unused=True)
            out.append({n: torch.zeros_like(p) if x is None else x for (n, p), x in zip(params.items(), grads)})
        return out
    finally:
        if d is not None:
            with torch.no_grad():
                d.load_state_dict(now)


class _Updates:
    """Per-group updates of SGD or Adam (per-group first moments, the optimizer's shared second moment)."""

    def __init__(self, kind, lr):
        self.kind, self.lr, self.m, self.v, self.k = kind, lr, None, None, 0

    def __call__(self, grads):
        names = list(grads[0])
        if self.kind == "sgd":
            return [{n: -self.lr * g[n] for n in names} for g in grads]
        b1, b2 = BETAS
        total = {n: sum(g[n] for g in grads) for n in names}
        if self.m is None:
            self.m = [{n: torch.zeros_like(g[n]) for n in names} for g in grads]
            self.v = {n: torch.zeros_like(total[n]) for n in names}
        self.k += 1
        self.m = [{n: b1 * m[n] + (1 - b1) * g[n] for n in names} for m, g in zip(self.m, grads)]
        self.v = {n: b2 * self.v[n] + (1 - b2) * total[n] ** 2 for n in names}
        denom = {n: (self.v[n] / (1 - b2 ** self.k)).sqrt() + 1e-8 for n in names}
        return [{n: -self.lr * (m[n] / (1 - b1 ** self.k)) / denom[n] for n in names} for m in self.m]


def _push(model, theta, u, probe_inputs):
    """J(probes; θ) u, ``[M, d]``."""
    names = list(theta)

    def f(*ps):
        y = functional_call(model, dict(zip(names, ps)), probe_inputs)
        return y.reshape(y.shape[0], -1)

    return jvp(f, tuple(theta[n] for n in names), tuple(u[n] for n in names))[1].detach()


def _midpoint(rec):
    return {n: (rec["before"][n] + rec["after"][n]) / 2 for n in rec["before"]}


def _rel(a, b):
    return float((a - b).abs().max()) / float(b.abs().max())


# -- the runs -------------------------------------------------------------------------------------
DATA = torch.randn(40, 2, generator=torch.Generator().manual_seed(7), dtype=F64) * 2
PROBES = torch.randn(8, LAT, generator=torch.Generator().manual_seed(1), dtype=F64)
D_PROBES = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64)


def _by_sign(z, x, w, scores):
    return (z[:, 0] > 0).long()


def _by_quadrant(z, x, w, scores):
    return 2 * (z[:, 0] > 0).long() + (z[:, 1] > 0).long()


def _pair():
    torch.manual_seed(0)
    return MLPGenerator(LAT, 2, hidden=6, depth=2).to(F64), MLPDiscriminator(2, hidden=6, depth=2).to(F64)


def _optimizer(kind, params, lr):
    return torch.optim.SGD(params, lr=lr) if kind == "sgd" else torch.optim.Adam(params, lr=lr, betas=BETAS)


def _brute(rec, groups, grouping, opt, probes=PROBES):
    g_updates, d_updates = _Updates(opt, LR_G), _Updates(opt, LR_D)
    g_total = d_total = 0
    per_step = []
    for r in rec.steps:
        mid = _midpoint(r)
        if r["phase"] == "generator":
            ids = grouping(r["inputs"][0], None, None, None)
            us = g_updates(_group_gradients(r, ids, groups))
            step = torch.stack([_push(r["model"], mid, u, (probes,)) for u in us], 1)
            per_step.append(step)
            g_total = g_total + step
        else:  # the critic's parameters are D's as net.*; D's probes read D itself
            roles = r["inputs"][1].reshape(-1).long()
            us = d_updates(_group_gradients(r, roles, 3))
            net = r["model"].net
            strip = lambda d: {k[len("net."):]: v for k, v in d.items()}  # noqa: E731
            d_total = d_total + torch.stack([_push(net, strip(mid), strip(u), (D_PROBES,)) for u in us], 1)
    return g_total, d_total, per_step


@pytest.mark.parametrize("loss, opt, settings", [
    ("nonsaturating", "adam", dict(d_steps=2)),
    ("hinge", "adam", dict(micro_batches=2, r1_gamma=1.0)),
    ("wgan-gp", "sgd", dict(d_steps=2)),
    ("nonsaturating", "adam", dict(r1_gamma=2.0, r1_interval=2, discriminator_batches="separate")),
])
def test_both_ledgers_equal_the_brute_force_group_by_group(loss, opt, settings):
    """coverage: passes before. Generator ledger per geometry group, discriminator ledger per role."""
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, PROBES, grouping=_by_sign, num_groups=2, window=2, eval_every=1,
                                 discriminator_probes=D_PROBES)
    rec = _Recorder()
    GANTrainer(G, D, DATA, loss=loss, batch_size=6, seed=0, callbacks=[rec, analyzer],
               g_optimizer=_optimizer(opt, G.parameters(), LR_G), d_optimizer=_optimizer(opt, D.parameters(), LR_D),
               **settings).train(4)
    g_ref, d_ref, _ = _brute(rec, 2, _by_sign, opt)
    # (Adam with β1 = 0 splits m = g into groups over a shared √v: group columns are large and cancel, 1e-13)
    assert _rel(analyzer.generator_ledger().contributions, g_ref) < 1e-11
    assert _rel(analyzer.discriminator_ledger.contributions, d_ref) < 1e-11
    for name, ledger in analyzer.generator_ledgers.items():  # every partition splits the same total
        assert _rel(ledger.contributions.sum(1), g_ref.sum(1)) < 1e-11, name


def test_the_windows_coupling_numbers_follow_from_the_brute_force_ledger():
    """coverage: passes before. Traffic and net coupling matrices, own shares and the interaction statistic, with
    their intervals clustered by probe group, recomputed from brute-force step contributions."""
    G, D = _pair()
    probes = torch.randn(16, LAT, generator=torch.Generator().manual_seed(1), dtype=F64)
    analyzer = GANKernelAnalyzer(G, D, probes, grouping=_by_quadrant, num_groups=4, window=2, eval_every=1, controls=0)
    rec = _Recorder()
    GANTrainer(G, D, DATA, batch_size=16, seed=0, callbacks=[rec, analyzer],
               g_optimizer=_optimizer("adam", G.parameters(), LR_G),
               d_optimizer=_optimizer("adam", D.parameters(), LR_D)).train(4)
    _, _, steps = _brute(rec, 4, _by_quadrant, "adam", probes)
    gen = [r for r in rec.steps if r["phase"] == "generator"]
    outputs = [functional_call(gen[0]["model"], gen[0]["before"], (probes,)).detach()]
    outputs += [functional_call(r["model"], r["after"], (probes,)).detach() for r in gen]
    groups = _by_quadrant(probes, None, None, None)
    assert len(torch.unique(groups)) == 4

    def interval(values):
        units = np.array([values[groups.numpy() == u].mean() for u in np.unique(groups.numpy())])
        half = scipy.stats.t.ppf(0.975, len(units) - 1) * units.std(ddof=1) / math.sqrt(len(units))
        return units.mean(), units.mean() - half, units.mean() + half

    for window in analyzer.windows:
        first, last = window["steps"]
        C = sum(steps[first - 1:last])
        traffic = sum(s.norm(dim=2) for s in steps[first - 1:last])
        delta = outputs[last] - outputs[first - 1]
        shares = {"traffic": traffic / traffic.sum(1, keepdim=True),
                  "net": torch.einsum("mgd,md->mg", C, delta) / (delta * delta).sum(1)[:, None]}
        for kind, share in shares.items():
            matrix = torch.stack([share[groups == a].mean(0) for a in range(4)])
            own = share[torch.arange(16), groups]
            others = torch.stack([torch.stack([matrix[b, groups[m]] for b in range(4) if b != groups[m]]).mean()
                                  for m in range(16)])
            got = window["statistics"]["geometry"][kind]
            assert torch.allclose(torch.tensor(got["matrix"], dtype=F64), matrix, rtol=1e-9, atol=1e-12)
            for key, values in (("own", own), ("interaction", own - others)):
                want = interval(values.numpy())
                ends = [got[key]["estimate"], got[key]["low"], got[key]["high"]]
                assert np.allclose(ends, want, rtol=1e-9, atol=1e-12)


def test_the_ema_ledger_equals_the_brute_force_offsets():
    """coverage: passes before. E_{k+1,g} = β E_{k,g} + (1 − β) D_{k+1,g}, each update pushed at the EMA's midpoint."""
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, PROBES, grouping=_by_sign, num_groups=2, window=2, eval_every=1)
    ema = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    rec = _Recorder()
    trainer = GANTrainer(G, D, DATA, batch_size=6, seed=0, callbacks=[rec, analyzer], ema=ema,
                         g_optimizer=_optimizer("adam", G.parameters(), LR_G),
                         d_optimizer=_optimizer("adam", D.parameters(), LR_D))
    averages = []
    for i in range(4):
        trainer.train(i + 1)
        averages.append({n: p.detach().clone() for n, p in ema.module.named_parameters()})
    updates = _Updates("adam", LR_G)
    gen = [r for r in rec.steps if r["phase"] == "generator"]
    names = list(gen[0]["before"])
    displacement = [{n: torch.zeros_like(gen[0]["before"][n]) for n in names} for _ in range(2)]
    offsets = copy.deepcopy(displacement)
    previous = dict(gen[0]["before"])  # AveragedModel starts as a copy of G
    total = 0
    for r, average in zip(gen, averages):
        us = updates(_group_gradients(r, _by_sign(r["inputs"][0], None, None, None), 2))
        beta = 0.0 if r is gen[0] else 0.8  # (AveragedModel's first update copies the weights)
        for g in range(2):
            displacement[g] = {n: displacement[g][n] + us[g][n] for n in names}
        new = [{n: beta * offsets[g][n] + (1 - beta) * displacement[g][n] for n in names} for g in range(2)]
        mid = {n: (previous[n] + average[n]) / 2 for n in names}
        total = total + torch.stack([_push(r["model"], mid, {n: new[g][n] - offsets[g][n] for n in names}, (PROBES,))
                                     for g in range(2)], 1)
        offsets, previous = new, average
    assert _rel(analyzer.generator_ema_ledgers["geometry"].contributions, total) < 1e-11


def test_an_observed_loop_books_what_the_trainer_books():
    """coverage: passes before. The trainer and the same draws in a hand-written loop (bind / observe): the same
    parameters bit for bit, and the same ledgers (geometry, control, EMA, discriminator) and alignment rows up to the
    rounding of the two graphs' different operation orders (measured 1e-16 relative)."""
    def analyzer(G, D):
        return GANKernelAnalyzer(G, D, PROBES, num_groups=3, window=2, eval_every=1, controls=1,
                                 discriminator_probes=D_PROBES)

    G, D = _pair()
    owned = analyzer(G, D)
    GANTrainer(G, D, DATA, batch_size=6, seed=0, d_steps=2, callbacks=[owned],
               ema=AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(0.8)),
               g_optimizer=_optimizer("adam", G.parameters(), LR_G),
               d_optimizer=_optimizer("adam", D.parameters(), LR_D)).train(3)

    H, E = _pair()
    observed = analyzer(H, E)
    g_opt, d_opt = _optimizer("adam", H.parameters(), LR_G), _optimizer("adam", E.parameters(), LR_D)
    ema = AveragedModel(H, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    observed.bind(g_opt, d_opt, ema=ema)
    gen = seeded_generator(0)
    for _ in range(3):
        for _ in range(2):
            real = DATA[torch.randint(0, DATA.shape[0], (6,), generator=gen)]
            z = torch.randn(6, LAT, generator=gen, dtype=F64)
            with torch.no_grad():
                fake = H(z)
            x = torch.cat([real, fake])
            roles = torch.cat([torch.ones(6), torch.zeros(6)]).long()
            s = E(x).reshape(-1)
            losses = torch.where(roles == 1, F.softplus(-s), F.softplus(s))
            c = torch.full((12,), 1 / 6, dtype=F64)
            observed.observe_discriminator(losses, roles, x, weights=c)
            d_opt.zero_grad()
            (c * losses).sum().backward()
            d_opt.step()
        z = torch.randn(6, LAT, generator=gen, dtype=F64)
        E.requires_grad_(False)
        fake = H(z)
        losses = F.softplus(-E(fake).reshape(-1))
        observed.observe_generator(losses, z, fake)
        g_opt.zero_grad()
        losses.mean().backward()
        g_opt.step()
        E.requires_grad_(True)
        ema.update_parameters(H)
    observed.finish()

    for p, q in zip(list(G.parameters()) + list(D.parameters()), list(H.parameters()) + list(E.parameters())):
        assert torch.equal(p, q)
    for name in owned.generator_ledgers:
        assert _rel(observed.generator_ledgers[name].contributions, owned.generator_ledgers[name].contributions) < 1e-13
        assert _rel(observed.generator_ema_ledgers[name].contributions,
                    owned.generator_ema_ledgers[name].contributions) < 1e-13
    assert _rel(observed.discriminator_ledger.contributions, owned.discriminator_ledger.contributions) < 1e-13
    assert len(owned.alignment) == len(observed.alignment) == 3
    for row, other in zip(owned.alignment, observed.alignment):
        assert row.keys() == other.keys()
        for key in row:
            assert row[key] == pytest.approx(other[key], rel=1e-12, abs=1e-14), key


class _BNG(nn.Module):
    latent_dim = LAT

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LAT, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Dropout(0.2), nn.Linear(8, 2))

    def forward(self, z):
        return self.net(z)


@pytest.mark.parametrize("settings", [dict(discriminator_batches="separate"), dict(micro_batches=2, ema=True)])
def test_training_is_bit_for_bit_the_same_with_the_analyzer(settings):
    """coverage: passes before. BatchNorm and dropout in G and D: parameters, buffers (running statistics), the
    EMA, the trainer's and torch's generators, and a sample afterwards, equal with and without the analyzer."""
    def run(analyze):
        torch.manual_seed(0)
        G = _BNG().to(F64)
        D = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.SiLU(), nn.Dropout(0.3), nn.Linear(8, 1)).to(F64)
        kw = dict(settings)
        ema = (AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True) if kw.pop("ema", False)
               else None)
        callbacks = [GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=2, eval_every=1)] if analyze else []
        torch.manual_seed(123)
        trainer = GANTrainer(G, D, DATA, batch_size=6, seed=0, d_steps=2, callbacks=callbacks, ema=ema,
                             g_optimizer=_optimizer("adam", G.parameters(), LR_G),
                             d_optimizer=_optimizer("adam", D.parameters(), LR_D), **kw)
        trainer.train(3)
        state = {f"G.{k}": v.clone() for k, v in G.state_dict().items()}
        state.update({f"D.{k}": v.clone() for k, v in D.state_dict().items()})
        if ema is not None:
            state.update({f"E.{k}": v.clone() for k, v in ema.state_dict().items()})
        state["trainer_rng"] = trainer.rng.get_state()
        state["torch_rng"] = torch.get_rng_state()
        state["sample"] = trainer.sample(torch.randn(4, LAT, dtype=F64))
        return state

    plain, analyzed = run(False), run(True)
    assert plain.keys() == analyzed.keys()
    for key in plain:
        assert torch.equal(plain[key], analyzed[key]), key


# -- faults -------------------------------------------------------------------------------------
def _field_reference(B):
    """One iteration of SGD (batch B), the trainer's documented draws: the probes' kernel field at θ_0,
    −J_G(z'; θ_0) Σ_i (1/B) J_G(z_i; θ_0)ᵀ w_i, w_i = ∇_x softplus(−D_1(x)) at x = G_0(z_i), by autograd and a JVP."""
    G, D = _pair()
    analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=1, eval_every=1, controls=0,
                                 track_discriminator=False)
    GANTrainer(G, D, DATA, batch_size=B, seed=0, callbacks=[analyzer],
               g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
               d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D)).train(1)
    G0, _ = _pair()
    gen = seeded_generator(0)
    torch.randint(0, DATA.shape[0], (B,), generator=gen)
    torch.randn(B, LAT, generator=gen, dtype=F64)
    z = torch.randn(B, LAT, generator=gen, dtype=F64)
    x = G0(z)
    xd = x.detach().requires_grad_(True)
    (w,) = torch.autograd.grad(F.softplus(-D(xd).reshape(-1)).sum(), xd)  # D after its step (the G step keeps it)
    theta = dict(G0.named_parameters())
    pulled = torch.autograd.grad(x, list(theta.values()), grad_outputs=w / B)
    field = _push(G0, {n: p.detach() for n, p in theta.items()}, {n: -g for n, g in zip(theta, pulled)}, (PROBES,))
    return analyzer.fields[0]["field"], field


def test_a_power_of_two_batch_field_is_exact():
    """coverage: passes before (1/8 is exact in float32, so the fault below does not show)."""
    got, want = _field_reference(8)
    assert _rel(got, want) < 1e-12


def test_the_kernel_field_of_a_float64_run_is_exact_at_any_batch_size():
    """Fails on the old code: _coefficients built c_n = 1/B with torch.full in the default dtype (float32), so a
    float64 run's field was off by 1/B's float32 rounding (2.98e-8 at B = 6)."""
    got, want = _field_reference(6)
    assert _rel(got, want) < 1e-12


def test_an_observed_accumulating_loop_gets_the_field_of_its_step():
    """K = 2 micro-batches of 4 (1/4 exact in float32): the loop ``(losses.mean() / K).backward()`` (accepted: the
    tracker reports gradient scale 1/K) and the same loop with its coefficients given (``weights = 1/B``) train the
    same parameters; their kernel fields, −J_G(z') Σ_i c_i J_G(z_i)ᵀ w_i of the step, must agree too. Fails on the
    old code: each micro-batch's pull was at c = 1/b of its own rows, the unweighted loop's field 2.0x."""
    B, K = 8, 2

    def run(given):
        G, D = _pair()
        analyzer = GANKernelAnalyzer(G, D, PROBES, num_groups=2, window=1, eval_every=1, controls=0,
                                     track_discriminator=False)
        g_opt = torch.optim.SGD(G.parameters(), lr=LR_G)
        analyzer.bind(g_opt, None)
        D.requires_grad_(False)
        for step in range(2):
            z = torch.randn(B, LAT, generator=torch.Generator().manual_seed(10 + step), dtype=F64)
            g_opt.zero_grad()
            for j in range(K):
                rows = slice(j * B // K, (j + 1) * B // K)
                x = G(z[rows])
                losses = F.softplus(-D(x).reshape(-1))
                if given:
                    analyzer.observe_generator(losses, z[rows], x, weights=torch.full((B // K,), 1 / B, dtype=F64))
                    (losses.sum() / B).backward()
                else:
                    analyzer.observe_generator(losses, z[rows], x)
                    (losses.mean() / K).backward()
            g_opt.step()
        analyzer.finish()
        return analyzer, G

    (a, G), (b, H) = run(False), run(True)
    for p, q in zip(G.parameters(), H.parameters()):
        assert torch.allclose(p, q, rtol=1e-14, atol=1e-15)
    assert _rel(a.generator_ledger().contributions, b.generator_ledger().contributions) < 1e-10
    for fa, fb in zip(a.fields, b.fields):
        assert _rel(fa["field"], fb["field"]) < 1e-10


class _ConditionalG(nn.Module):
    latent_dim = LAT

    def __init__(self, classes):
        super().__init__()
        self.num_classes = classes
        self.embed = nn.Embedding(classes, 2)
        self.net = MLPGenerator(LAT + 2, 2, hidden=6, depth=2)

    def forward(self, z, y):
        return self.net(torch.cat([z, self.embed(y)], 1))


class _ConditionalD(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.embed = nn.Embedding(classes, 2)
        self.net = MLPDiscriminator(4, hidden=6, depth=2)

    def forward(self, x, y):
        return self.net(torch.cat([x, self.embed(y)], 1))


def test_role_mode_books_a_conditional_gans_real_rows_by_their_mode_not_their_class():
    """Two classes over four modes (class 0: modes 0, 1; class 1: modes 2, 3). The "real m" columns of D's ledger must
    hold the real rows of each mode (nearest centre: the modes are 15 std apart), as the "generated m" ones do;
    booked by class id, the rows at mode 3 went to "real m1" and those at modes 0 and 1 to "real m0". Fails on the
    old code: GANTrainer hands a conditional GAN's classes to analyzers as info['real_labels'], and role_mode read
    them as mode ids."""
    centers = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [0.0, -3.0]], dtype=F64)
    modes = torch.arange(24) % 4
    data = centers[modes] + 0.2 * torch.randn(24, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    torch.manual_seed(0)
    G, D = _ConditionalG(2).to(F64), _ConditionalD(2).to(F64)
    analyzer = GANKernelAnalyzer(G, D, PROBES[:4], probe_classes=torch.arange(4) % 2, num_classes=2, grouping="class",
                                 mode_centers=centers, mode_std=0.2, discriminator_groups="role_mode", window=1,
                                 eval_every=1, coverage_latents=8, discriminator_probes=D_PROBES[:4],
                                 discriminator_probe_classes=torch.arange(4) % 2)
    rec = _Recorder()
    GANTrainer(G, D, data, labels=(modes >= 2).long(), num_classes=2, batch_size=8, seed=0, callbacks=[rec, analyzer],
               g_optimizer=torch.optim.SGD(G.parameters(), lr=LR_G),
               d_optimizer=torch.optim.SGD(D.parameters(), lr=LR_D)).train(1)
    step = next(r for r in rec.steps if r["phase"] == "discriminator")
    x, roles = step["inputs"][0], step["inputs"][1].reshape(-1)
    nearest = torch.cdist(x, centers).argmin(1)
    assert analyzer.d_group_counts[0][:4] == torch.bincount(nearest[roles == 1], minlength=4).tolist()
