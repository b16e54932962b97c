"""The GAN analyzer's own passes in its cost estimate (``GANKernelAnalyzer.cost``).

Besides its trackers' steps the analyzer runs passes through G and D that the generator tracker's estimate
(``g_tracker.cost``) does not see: every generator step the batch's geometry w_i = ∇_x ℓ_G(D(x_i)), at evaluation
steps the probes' geometry, the pulled vector and the kernel-smoothed field's JVP (and G's coverage samples with
``mode_centers``), and at the first step the grouping's fit. ``analyzer.cost`` adds them, in the tracker's unit
(one example's forward through G, D's passes converted by its multiply-adds over G's). Here the prediction is
checked against torch's operation count of real generator steps (the dispatch-mode count of
tests/test_cost_dense_route.py): everything a step counts less what the generator tracker counts inside its own
``__init__`` and ``track`` (its steps; an observed loop's ``observe`` and ``optimizer.step()``), with the
analyzer's listener (its bookkeeping, called from inside ``track``) counted back in. The counts are integer
formulas of the layers' shapes on both sides, so they agree to rounding: the tolerance is 1e-9."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import genkernel.core.cost as cost
from genkernel import OptimizerStep, PathKernelTracker
from genkernel.core.adapter import analysis_mode
from genkernel.data.toy2d import ring_mode_centers
from genkernel.gan import GANKernelAnalyzer, GANTrainer, GeneratorLoss, frozen
from genkernel.gan.models import MLPDiscriminator, MLPGenerator
from genkernel.gan.passes import preserved
from test_cost_dense_route import ProductCounter, counted
from test_gan_observe import NZ, TinyD, TinyG

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
EVERY = 2  # eval_every: steps 1 and 3 evaluate, step 2 does not


def conv():
    """DCGAN-like: transposed convolutions and BatchNorm in G, strided convolutions and BatchNorm in D."""
    torch.manual_seed(0)
    return TinyG().to(F64), TinyD().to(F64), (NZ, 1, 1)


def mlp():
    torch.manual_seed(0)
    return MLPGenerator(2, 2, hidden=32, depth=2).to(F64), MLPDiscriminator(2, hidden=32, depth=2).to(F64), (2,)


def probes(shape, m):
    return torch.randn(m, *shape, generator=torch.Generator().manual_seed(7), dtype=F64)


@pytest.fixture
def tracker_counts(monkeypatch):
    """``{"tracker": FLOPs inside the generator tracker's __init__, track and observe, "listener": the analyzer's
    bookkeeping inside them}``, reset by the test before each step."""
    box = {"tracker": 0, "listener": 0}

    def counting(cls, name, key):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            with ProductCounter() as counter:
                result = original(self, *args, **kwargs)
            box[key] += counter.flops
            return result

        monkeypatch.setattr(cls, name, wrapper)

    for verb in ("__init__", "track", "observe"):
        counting(PathKernelTracker, verb, "tracker")
    counting(GANKernelAnalyzer, "_record_generator", "listener")  # (its counts and the records it makes)
    return box


def g_forward(G, shape):
    """One example's forward through G (the tracker's unit), counted."""
    z = torch.randn(1, *shape, dtype=F64)
    with preserved(G), analysis_mode(G):
        return counted(lambda: G(z))


def predicted(estimate, step, *, once_in_step=True):
    """The analyzer's predicted example-forwards of generator step ``step`` (1-based) from ``analyzer.cost``: the
    batch's geometry every step, the evaluation parts (amortized over eval_every) in whole at evaluation steps, the
    one-off parts at the first step (but the estimate's own counting passes where they ran before it: at bind)."""
    work = estimate.work
    evaluation = sum(work.get(k, 0.0) for k in ("probe_geometry", "kernel_field", "coverage")) * EVERY
    out = work["batch_geometry"] + (evaluation if (step - 1) % EVERY == 0 else 0.0)
    if step == 1:
        once = dict(estimate.settings["analysis_once"])
        if not once_in_step:
            once.pop("cost_counts")
        out += sum(once.values())
    return out


def owned_analyzer(build, m=6, **options):
    G, D, shape = build()
    analyzer = GANKernelAnalyzer(G, D, probes(shape, m), num_groups=2, window=2 * EVERY, eval_every=EVERY,
                                 track_discriminator=False, **options)
    return G, D, shape, analyzer


@pytest.mark.parametrize("build, variant", [
    (mlp, "plain"), (conv, "plain"),
    (mlp, "micro-batches"), (conv, "micro-batches"),  # one batch pass per micro-batch, D's loss forward between them
    (mlp, "reference-latents"), (conv, "reference-latents"),  # the fit on 10 reference latents (and their check)
    (mlp, "coverage"),  # mode coverage (2-D samples): G's forward of the coverage latents at evaluation steps
], ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_a_performed_generator_steps_added_work_is_the_predicted(build, variant, tracker_counts):
    """Three generator steps performed through the analyzer (eval_every=2: an evaluation step with the one-off
    passes, a plain step, an evaluation step): each step's counted work less the tracker's is what ``analyzer.cost``
    predicts for it (before, no such estimate: ``cost`` is not an attribute of the old analyzer)."""
    micro_batches = 2 if variant == "micro-batches" else 1
    settings = {}
    if variant == "reference-latents":
        settings["reference_latents"] = probes(build()[2], 10) + 0.5
    if variant == "coverage":
        settings.update(mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05, coverage_latents=64)
    G, D, shape, analyzer = owned_analyzer(build, **settings)
    optimizer = torch.optim.Adam(G.parameters(), 1e-3)
    draws = torch.Generator().manual_seed(3)
    unit = g_forward(G, shape)
    for index in (1, 2, 3):
        z = torch.randn(8, *shape, generator=draws, dtype=F64)
        step = OptimizerStep(G, optimizer, GeneratorLoss(D), z, phase="generator", micro_batches=micro_batches)
        tracker_counts.update(tracker=0, listener=0)
        with frozen(D):
            total = counted(lambda: analyzer.perform(step))
        extra = (total - tracker_counts["tracker"] + tracker_counts["listener"]) / unit
        assert predicted(analyzer.cost, index) == pytest.approx(extra, rel=1e-9), index
    assert analyzer.cost.settings["analysis_micro_batches"] == micro_batches
    assert ("coverage" in analyzer.cost.work) is (variant == "coverage")
    assert analyzer.cost.settings["analysis_once"]["grouping_fit"] > 0


@pytest.mark.parametrize("build", [mlp, conv])
@pytest.mark.parametrize("geometry_loss", [False, True], ids=["training-loss", "geometry-loss"])
def test_an_observed_loops_added_work_is_the_predicted(build, geometry_loss, tracker_counts):
    """A loop of your own: w_i read from the loop's graph (a backward through D to the samples) and D's scores,
    or, with ``geometry_loss``, a push of its own in place of the scores; the probes' geometry and the field at
    evaluation steps, the losses' check at the first (none with a geometry_loss). The batch is the probes' count, the
    batch the tracker's estimate takes for a loop bound before its first step (the estimate's own counting ran at
    bind). Each step's counted work in observe_generator and the listener less the tracker's is the predicted."""
    G, D, shape = build()
    m = 6
    analyzer = GANKernelAnalyzer(G, D, probes(shape, m), num_groups=2, window=2 * EVERY, eval_every=EVERY,
                                 track_discriminator=False, geometry_loss=GeneratorLoss(D) if geometry_loss else None)
    g_opt = torch.optim.Adam(G.parameters(), 1e-3)
    analyzer.bind(g_opt, None)
    assert analyzer.cost.settings["batch"] == m and analyzer.cost.settings["analysis_observed"]
    assert ("loss_check" in analyzer.cost.settings["analysis_once"]) is not geometry_loss
    draws = torch.Generator().manual_seed(3)
    unit = g_forward(G, shape)
    for index in (1, 2, 3):
        z = torch.randn(m, *shape, generator=draws, dtype=F64)
        g_opt.zero_grad()
        fake = G(z)
        losses = F.binary_cross_entropy_with_logits(D(fake).view(-1), torch.ones(m, dtype=F64), reduction="none")
        tracker_counts.update(tracker=0, listener=0)
        observed = counted(lambda: analyzer.observe_generator(losses, z, fake))
        losses.mean().backward()
        g_opt.step()
        extra = (observed - tracker_counts["tracker"] + tracker_counts["listener"]) / unit
        assert predicted(analyzer.cost, index, once_in_step=False) == pytest.approx(extra, rel=1e-9), index


@pytest.mark.parametrize("build, micro_batches", [(mlp, 1), (conv, 1), (conv, 2)], ids=["mlp", "conv", "conv-micro-batches"])
def test_a_whole_analyzed_step_and_a_bare_step_are_the_estimates(build, micro_batches):
    """Everything two generator steps count (steps 2 and 3: one period of eval_every=2, one evaluation) is twice the
    estimate's analyzed step, ``analyzer.cost.bare_step + sum(work)``, and a bare generator step (G's forward, D's
    forward and its backward to the samples, G's backward; D frozen) is its ``bare_step``. The tracker's own estimate
    counts G alone: its bare step leaves D's share out (22.4 example-forwards for 36.0 counted on the conv pair),
    and its group gradients' R backward passes stop at G's output (its tracked step 153.2 for 194.0 counted: 13.6
    of D in training's pass, 27.2 in the R = 4 backward passes): the analyzer's estimate adds both. Before, no such
    estimate (no ``cost`` attribute)."""
    G, D, shape, analyzer = owned_analyzer(build)
    bare_g = copy.deepcopy(G)
    optimizer, bare_optimizer = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(bare_g.parameters(), 1e-3)
    draws = torch.Generator().manual_seed(3)
    unit = g_forward(G, shape)
    total = 0
    for index in (1, 2, 3):
        z = torch.randn(8, *shape, generator=draws, dtype=F64)
        step = OptimizerStep(G, optimizer, GeneratorLoss(D), z, phase="generator", micro_batches=micro_batches)
        with frozen(D):
            flops = counted(lambda: analyzer.perform(step))
        total += flops if index > 1 else 0

    def bare():
        bare_optimizer.zero_grad()
        with frozen(D):
            GeneratorLoss(D)(bare_g(z)).mean().backward()
        bare_optimizer.step()

    estimate, tracker_cost = analyzer.cost, analyzer.g_tracker.cost
    assert estimate.bare_step == pytest.approx(counted(bare) / unit, rel=1e-9)
    assert 2 * (estimate.bare_step + sum(estimate.work.values())) == pytest.approx(total / unit, rel=1e-9)
    assert tracker_cost.bare_step < 0.7 * estimate.bare_step


def observed_steps(build, batch: int = 6, micro_batches: int = 1):
    """A GAN analyzer (M = 6 probes, D untracked) bound before its first step to a loop of your own that trains G on
    ``batch`` latents in ``micro_batches`` micro-batches, D frozen: ``(analyzer, G, shape, torch's operation count of
    steps 2 and 3 (the loop's forward, observe_generator, its backward, g_optimizer.step() and the tracker's passes
    in it), the estimate's batch at bind)``."""
    G, D, shape = build()
    analyzer = GANKernelAnalyzer(G, D, probes(shape, 6), num_groups=2, window=2 * EVERY, eval_every=EVERY,
                                 track_discriminator=False)
    g_opt = torch.optim.Adam(G.parameters(), 1e-3)
    analyzer.bind(g_opt, None)
    bound_batch = analyzer.cost.settings["batch"]
    draws = torch.Generator().manual_seed(3)
    size = batch // micro_batches
    total = 0
    for index in (1, 2, 3):
        z = torch.randn(batch, *shape, generator=draws, dtype=F64)

        def step():
            g_opt.zero_grad()
            with frozen(D):
                for start in range(0, batch, size):
                    rows = slice(start, start + size)
                    fake = G(z[rows])
                    losses = F.binary_cross_entropy_with_logits(D(fake).view(-1), torch.ones(size, dtype=F64),
                                                                reduction="none")
                    analyzer.observe_generator(losses, z[rows], fake)
                    (losses.mean() / micro_batches).backward()
            g_opt.step()

        flops = counted(step)
        total += flops if index > 1 else 0
    return analyzer, G, shape, total, bound_batch


@pytest.mark.parametrize("build", [mlp, conv])
def test_a_whole_observed_step_is_the_estimates(build):
    """A loop of your own that freezes D for its generator step: everything steps 2 and 3 count is twice the
    estimate's analyzed step. (A loop whose generator backward also forms D's weight gradients does B·share_D more a
    step, which the estimate leaves out: 2.5 % of the conv pair's step.)"""
    analyzer, G, shape, total, _ = observed_steps(build)
    estimate = analyzer.cost
    assert 2 * (estimate.bare_step + sum(estimate.work.values())) == pytest.approx(total / g_forward(G, shape), rel=1e-9)


def test_the_discriminators_share_is_its_multiply_adds_over_the_generators():
    """D's passes in G's unit: a D forward is D's multiply-adds over G's, as torch counts them (G's transposed
    convolutions by their input positions: a count by their output, 6.4x too many on TinyG, put D at 0.13 of its
    forward, not 0.85), and D's backward to x forms every layer's input gradient (the first's too), none of its
    weights'."""
    G, D, shape, analyzer = owned_analyzer(conv)
    z = probes(shape, 1)
    with preserved(G), analysis_mode(G):
        x = G(z).detach()
        g = counted(lambda: G(z))
    with preserved(D), analysis_mode(D):
        d = counted(lambda: D(x))
        xr = x.clone().requires_grad_(True)
        d_input = counted(lambda: torch.autograd.grad(D(xr).sum(), xr)) - d
    record = analyzer.analysis_pass_cost(batch=8)
    assert record["settings"]["analysis_discriminator_forward"] == pytest.approx(d / g, rel=1e-9)
    assert record["settings"]["analysis_discriminator_input_gradient"] == pytest.approx(d_input / g, rel=1e-9)


def test_the_analyzers_estimate_adds_its_passes_to_the_trackers_and_the_report_gives_it():
    """``analyzer.cost``: the tracker's parts unchanged plus the analyzer's, the ratio over the same bare step,
    memory ``analysis_passes`` beside the tracker's; ``g_tracker.cost`` is the tracker's alone (not changed by
    reading the analyzer's); ``report()["cost"]["generator"]`` is ``analyzer.cost.as_dict()`` and the
    discriminator's the D tracker's."""
    G, D, shape = mlp()
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    analyzer = GANKernelAnalyzer(G, D, probes(shape, 6), num_groups=2, window=2 * EVERY, eval_every=EVERY)
    GANTrainer(G, D, data, latent_dim=2, batch_size=8, callbacks=[analyzer]).train(2)
    tracker_cost = analyzer.g_tracker.cost
    before = tracker_cost.as_dict()
    estimate = analyzer.cost
    assert analyzer.g_tracker.cost is tracker_cost and tracker_cost.as_dict() == before
    assert "batch_geometry" not in tracker_cost.work
    added = {k: v for k, v in estimate.work.items() if k not in tracker_cost.work}
    assert set(added) == {"batch_geometry", "probe_geometry", "kernel_field", "discriminator_backward"}
    assert {k: estimate.work[k] for k in tracker_cost.work} == tracker_cost.work
    assert estimate.bare_step == tracker_cost.bare_step + estimate.settings["analysis_bare_step"]
    assert estimate.settings["analysis_bare_step"] > 0
    assert estimate.ratio == pytest.approx(
        1 + (sum(tracker_cost.work.values()) + sum(added.values())) / estimate.bare_step, rel=1e-12)
    assert {k: estimate.memory[k] for k in tracker_cost.memory} == tracker_cost.memory
    # the analyzer's state held throughout; its listener beside the recorded step and its split update
    largest = max(tracker_cost.phase_bytes().values())
    listener = (estimate.memory["step_record"] + tracker_cost.memory["group_updates"]
                + estimate.memory["analysis_listener"])
    assert estimate.total_bytes == (tracker_cost.total_bytes - largest + estimate.memory["analysis_state"]
                                    + max(largest, listener) + estimate.memory["analysis_passes"])
    assert set(estimate.settings["analysis_once"]) == {"grouping_fit", "cost_counts"}
    report = analyzer.report()
    assert report["cost"]["generator"] == estimate.as_dict()
    assert report["cost"]["discriminator"] == analyzer.d_tracker.cost.as_dict()


def test_passes_that_do_not_fit_beside_the_tracker_are_refused_naming_the_analyzers_settings(monkeypatch):
    """With the device's free memory between the tracker's need and the tracker's plus the analyzer's largest pass
    (here the grouping's fit on 4096 reference latents), the first generator step is refused with a MemoryError
    naming reference_latents and memory_check='warn', no tracker left behind; with memory_check='warn' it is a
    ResourceWarning and the step runs. Before, the analyzer's passes were in no estimate: no refusal."""
    reference = probes((NZ, 1, 1), 4096)

    def attempt(memory_check):
        G, D, shape, analyzer = owned_analyzer(conv, reference_latents=reference, memory_check=memory_check)
        z = torch.randn(8, *shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        step = OptimizerStep(G, torch.optim.SGD(G.parameters(), 1e-3), GeneratorLoss(D), z, phase="generator")
        with frozen(D):
            analyzer.perform(step)
        return analyzer

    built = attempt("warn")  # the numbers, with all the memory free
    tracker_cost, estimate = built.g_tracker.cost, built.cost
    assert estimate.settings["analysis_largest_pass"] == "grouping_fit"
    assert estimate.memory["analysis_passes"] > 0
    room = tracker_cost.total_bytes - tracker_cost.existing_bytes + estimate.memory["analysis_passes"] // 2
    monkeypatch.setattr(cost, "available_memory", lambda device: room)
    with pytest.raises(MemoryError, match="reference_latents") as error:
        G, D, shape, analyzer = owned_analyzer(conv, reference_latents=reference)
        z = torch.randn(8, *shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        step = OptimizerStep(G, torch.optim.SGD(G.parameters(), 1e-3), GeneratorLoss(D), z, phase="generator")
        with frozen(D):
            analyzer.perform(step)
    assert "memory_check='warn'" in str(error.value) and "grouping_fit" in str(error.value)
    assert analyzer.g_tracker is None
    with pytest.warns(ResourceWarning, match="reference_latents"):
        warned = attempt("warn")
    assert warned.g_steps == 1
