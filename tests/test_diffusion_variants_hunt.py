"""The noise-level analyzer's variants against brute force (a black-box hunt).

Brute force written independently of the tracker: per-example gradients with torch.func (vmap of grad of each
example's weighted loss), the probes' Jacobian at the midpoint of the straight segment θ_k → θ_{k+1} (jacrev),
SGD by hand, compared bin by bin with the ledger in float64. The first two are coverage (they pass before); the
last pins a fault the hunt found.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from genkernel.diffusion import (
    DDPMTrainer, NoiseLevelAnalyzer, make_edm_scheduler, make_flow_scheduler, make_scheduler,
)
from genkernel.diffusion.objectives import noisy_input, training_target

F64 = torch.float64
T = 50
K = 3  # classes (the null class K is a class of its own: K + 1 embeddings)

pytestmark = pytest.mark.usefixtures("one_thread")


class CondMLP(nn.Module):
    """A float64 denoiser ``(x, t[, labels])`` with a smooth time embedding (real or integer t)."""

    def __init__(self, classes=0, tscale=0.05, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.tscale = tscale
        self.l1 = nn.Linear(2 + 4 + (3 if classes else 0), 12)
        self.l2 = nn.Linear(12, 2)
        self.emb = nn.Embedding(classes, 3) if classes else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
        self.double()

    def forward(self, x, t, labels=None):
        t = t.to(x.dtype).reshape(-1) * self.tscale
        h = [x, torch.stack([t.sin(), t.cos(), (t / 7).sin(), (t / 7).cos()], 1)]
        if self.emb is not None:
            h.append(self.emb(labels))
        return self.l2(nn.functional.silu(self.l1(torch.cat(h, 1))))


def brute_force_step(model, inputs, target, coefficients, bins, num_groups, lr, probes):
    """One SGD step by hand: ``[M, G, d]`` midpoint contributions per group, and the model moved to θ_{k+1}."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p, *row):
        *ins, y, c = (r.unsqueeze(0) for r in row)
        return (c * ((functional_call(model, p, tuple(ins)) - y) ** 2).mean()).sum()

    per_example = vmap(grad(loss), in_dims=(None, *[0] * (len(inputs) + 2)))(params, *inputs, target, coefficients)
    updates = [{k: -lr * (g * (bins == b).to(F64).view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per_example.items()}
               for b in range(num_groups)]
    middle = {k: params[k] + 0.5 * sum(u[k] for u in updates) for k in params}
    jacobian = jacrev(lambda p: functional_call(model, p, tuple(probes)))(middle)  # name -> [M, d, *shape]
    contributions = torch.stack([sum((jacobian[k] * u[k][None, None]).flatten(2).sum(-1) for k in params)
                                 for u in updates], 1)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p += sum(u[k] for u in updates)
    return contributions


SCHEDULERS = {
    "epsilon": lambda: make_scheduler(T, prediction_type="epsilon"),
    "v_prediction": lambda: make_scheduler(T, prediction_type="v_prediction"),
    "sample": lambda: make_scheduler(T, prediction_type="sample"),
    "flow": lambda: make_flow_scheduler(T, shift=3.0),
    "edm": lambda: make_edm_scheduler(T),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_an_observed_min_snr_like_weighted_loop_matches_brute_force_bin_by_bin(kind):
    """coverage: passes before. Every noise process and prediction type, per-example weights given to observe."""
    scheduler, num_bins, lr, batch = SCHEDULERS[kind](), 4, 5e-2, 8
    model, reference = CondMLP(tscale=1.0 if kind == "edm" else 0.05), CondMLP(tscale=1.0 if kind == "edm" else 0.05)
    generator = torch.Generator().manual_seed(1)
    analyzer = NoiseLevelAnalyzer(scheduler, torch.randn(6, 2, generator=generator, dtype=F64), num_bins=num_bins,
                                  num_probes=6, controls=1, kernel_points=2, progress=False,
                                  probe_levels=None if kind != "epsilon" else torch.tensor([40, 3, 17, 3]))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    analyzer.bind(model, optimizer)
    probes = analyzer.probes(torch.zeros((), dtype=F64))
    start = model(*probes).detach()
    expected = torch.zeros(6, num_bins, 2, dtype=F64)
    for _ in range(3):
        x0, noise = torch.randn(batch, 2, generator=generator, dtype=F64), torch.randn(batch, 2, generator=generator, dtype=F64)
        indices = torch.randint(0, T, (batch,), generator=generator)
        t = indices if scheduler.__class__.__name__ == "DDPMScheduler" else scheduler.timesteps[indices]
        z, y = noisy_input(scheduler, x0, noise, t), training_target(scheduler, x0, noise, t)
        c = (0.5 + torch.rand(batch, generator=generator, dtype=F64)) / batch  # a per-level weighting's c_n
        expected += brute_force_step(reference, (z, t), y, c, analyzer.bins(t), num_bins, lr, probes)
        losses = ((model(z, t) - y) ** 2).mean(1)
        analyzer.observe(losses, t, weights=c)
        (losses * c).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    ours = analyzer.contributions
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    ledger = analyzer.ledger
    change = model(*probes).detach() - start
    total = ledger.contributions.sum(1).cpu() + ledger.rest.cpu() + ledger.residual.cpu()
    assert torch.allclose(total, change, rtol=0, atol=1e-13 * float(change.abs().max()))


def conditional_trainer(callbacks=(), **kwargs):
    data = torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    labels = torch.randint(0, K, (32,), generator=torch.Generator().manual_seed(6))
    return DDPMTrainer(CondMLP(classes=K + 1), make_scheduler(T, prediction_type="v_prediction"), data, labels=labels,
                       conditional=True, class_dropout=0.3, null_class=K, batch_size=8, optimizer="sgd", lr=5e-2,
                       loss_weighting="min_snr", timestep_density="logit_normal", progress=False,
                       callbacks=list(callbacks), seed=3, **kwargs)


def conditional_analyzer():
    data = torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    return NoiseLevelAnalyzer(make_scheduler(T, prediction_type="v_prediction"), data[:6], num_bins=4, num_probes=6,
                              controls=2, kernel_points=2, progress=False, num_classes=K + 1,
                              probe_conditioning=torch.randint(0, K + 1, (6,), generator=torch.Generator().manual_seed(9)))


def test_trainer_observed_loop_and_step_give_one_ledger_with_cfg_dropout_min_snr_and_level_class():
    """coverage: passes before. The three ways of feeding the analyzer, classifier-free-guidance label dropout,
    Min-SNR weights and an SD3 density: equal ledgers in every partition, level and level × class equal to brute
    force, training bit for bit as without the analyzer."""
    steps = 3
    bare = conditional_trainer()
    bare.train(steps)
    built_in = conditional_analyzer()
    tracked = conditional_trainer([built_in])
    tracked.train(steps)
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert bare.losses == tracked.losses
    feeder = conditional_trainer()
    batches = [feeder.next_batch() for _ in range(steps)]
    observed, stepped = conditional_analyzer(), conditional_analyzer()
    loop, own = conditional_trainer(), conditional_trainer()
    observed.bind(loop.model, loop.optimizer)
    stepped.bind(own.model, own.optimizer)
    reference = CondMLP(classes=K + 1)
    probes = built_in.probes(torch.zeros((), dtype=F64))
    expected = {"level": 0, "level_class": 0}
    for b in batches:
        z, t, y, labels, c = b["noisy"], b["timesteps"], b["target"], b["labels"], b["weights"]
        losses = ((loop.model(z, t, labels) - y) ** 2).mean(1)
        observed.observe(losses, t, class_labels=labels, weights=c)
        (losses * c).sum().backward()
        loop.optimizer.step()
        loop.optimizer.zero_grad()
        stepped.step(b["clean"], b["noise"], t, conditioning=labels, class_labels=labels, weights=c)
        bins = built_in.bins(t)
        start = {k: v.detach().clone() for k, v in reference.named_parameters()}
        expected["level"] = expected["level"] + brute_force_step(reference, (z, t, labels), y, c, bins, 4, 5e-2, probes)
        with torch.no_grad():
            for k, p in reference.named_parameters():
                p.copy_(start[k])
        expected["level_class"] = expected["level_class"] + brute_force_step(
            reference, (z, t, labels), y, c, bins * (K + 1) + labels, 4 * (K + 1), 5e-2, probes)
    for name, ledger in built_in.ledgers.items():
        reference_ledger = ledger.contributions.cpu()
        scale = float(reference_ledger.abs().max())
        for other in (observed, stepped):
            assert torch.allclose(other.ledgers[name].contributions.cpu(), reference_ledger, rtol=0, atol=1e-13 * scale)
        if name in expected:
            assert torch.allclose(reference_ledger, expected[name], rtol=0, atol=1e-12 * scale)
    assert built_in.bin_counts == observed.bin_counts == stepped.bin_counts


def _accumulation_loop(analyzer, model, optimizer, batches, scheduler):
    """Gradient accumulation with one example per micro-batch, as large models are trained."""
    for x0, noise, t in batches:
        z, y = noisy_input(scheduler, x0, noise, t), training_target(scheduler, x0, noise, t)
        for n in range(x0.shape[0]):
            losses = ((model(z[n:n + 1], t[n:n + 1]) - y[n:n + 1]) ** 2).mean(1)
            analyzer.observe(losses, t[n:n + 1])
            (losses.sum() / x0.shape[0]).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_controls_of_an_accumulation_loop_with_one_example_per_micro_batch_are_not_the_measured_partition(tmp_path):
    """Fails on the old code: observe() permuted the control labels within each observed micro-batch, so a loop of
    one example per micro-batch got the identity permutation: every control ledger equalled the level ledger (to
    2e-16) and locality's measured minus control was -8e-18, without a word. Now a micro-batch under 8 examples
    draws its control labels from its own and the last 64 observed examples' bins; the pool is in the saved state,
    so a run saved after its second step and resumed equals the uninterrupted one."""
    scheduler, batch = make_scheduler(T), 8
    generator = torch.Generator().manual_seed(1)
    probes = torch.randn(6, 2, generator=generator, dtype=F64)
    batches = [(torch.randn(batch, 2, generator=generator, dtype=F64), torch.randn(batch, 2, generator=generator,
                dtype=F64), torch.randint(0, T, (batch,), generator=generator)) for _ in range(4)]

    def make_analyzer():
        return NoiseLevelAnalyzer(scheduler, probes, num_bins=5, num_probes=10, controls=2, kernel_points=3,
                                  progress=False)

    model = CondMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-2)
    straight = make_analyzer()
    straight.bind(model, optimizer)
    _accumulation_loop(straight, model, optimizer, batches, scheduler)
    level = straight.ledgers["level"].contributions
    for name in straight.control_names:
        gap = (straight.ledgers[name].contributions - level).abs().max()
        assert float(gap) > 1e-3 * float(level.abs().max())
    assert abs(straight.locality()["traffic"]["difference"]) > 1e-6

    model = CondMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-2)
    first = make_analyzer()
    first.bind(model, optimizer)
    _accumulation_loop(first, model, optimizer, batches[:2], scheduler)
    first.save(tmp_path / "analyzer.pt")
    weights, state = model.state_dict(), optimizer.state_dict()
    model = CondMLP()
    model.load_state_dict(weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-2)
    optimizer.load_state_dict(state)
    resumed = make_analyzer()
    resumed.load(tmp_path / "analyzer.pt")
    resumed.bind(model, optimizer, start_step=2)
    _accumulation_loop(resumed, model, optimizer, batches[2:], scheduler)
    for name, ledger in straight.ledgers.items():
        assert torch.equal(ledger.contributions, resumed.ledgers[name].contributions), name
