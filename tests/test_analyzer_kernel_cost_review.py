"""Second read of the diffusion analyzer's kernel records in its cost estimate (``NoiseLevelAnalyzer.cost``,
``kernel_record_cost``, ``state_kernel_work``): what bind's estimate does to the records it estimates, and the
models and states it is built for."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import genkernel.core.cost as cost
from genkernel.core.adapter import seeded_generator
from genkernel.diffusion import NoiseLevelAnalyzer
from genkernel.diffusion.kernels import make_states
from genkernel.diffusion.locality import kernel_locality
from genkernel.diffusion.models import MLPDenoiser
from genkernel.diffusion.objectives import make_scheduler
from test_analyzer_kernel_cost import tiny_unet  # (the seeded UNet2DModel and its 8 inputs)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
BATCH = 8


class BatchReversingDenoiser(nn.Module):
    """A denoiser ``(z [B, 2], t [B]) -> [B, 2]`` whose middle layer sees the batch's rows reversed (and reversed
    back after it): each example's output is that of the example alone, but the layer's hooks pair one example's
    activations with another's place in the batch, so its factors are not its per-example gradients and the
    engine's covering check must move it to the torch.func fallback."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(torch.cat([z, t[:, None].to(z) / 100], dim=1)))
        h = torch.tanh(self.mid(h.flip(0))).flip(0)
        return self.out(h)


def flattened(summary, prefix: str = "") -> dict[str, float]:
    """A kernel locality summary's numbers (nested dicts and lists of floats) as ``{"key/index": value}``."""
    if isinstance(summary, dict):
        return {k: v for key, value in summary.items() for k, v in flattened(value, f"{prefix}/{key}").items()}
    if isinstance(summary, (list, tuple)):
        return {k: v for i, value in enumerate(summary) for k, v in flattened(value, f"{prefix}/{i}").items()}
    return {prefix: float(summary) if isinstance(summary, (int, float)) else summary}


def assert_same_summary(actual, expected, rel: float) -> None:
    """Every number of ``expected`` (a locality summary) in ``actual`` within ``rel`` (NaN where NaN)."""
    actual, expected = flattened(actual), flattened(expected)
    for key, value in expected.items():
        assert key in actual, key
        if not isinstance(value, float):  # (a method's name, None)
            assert actual[key] == value, key
        elif value != value:
            assert actual[key] is None or actual[key] != actual[key], key
        else:
            assert actual[key] == pytest.approx(value, rel=rel, abs=1e-12), key


def sketched_reference_kernel(model: nn.Module, states: tuple[torch.Tensor, ...], directions: int, seed: int):
    """The normalized sketched kernel ``[M, M]`` by brute force: Σ_v ⟨∇_θ⟨r_v, f(x_i)⟩, ∇_θ⟨r_v, f(x_j)⟩⟩ over
    ``directions`` ±1 directions r_v (the sketch's draw from ``seed``), each gradient from a pass of the example
    alone, divided by the square roots of its diagonal."""
    draws = torch.randint(0, 2, (directions, 2), generator=seeded_generator(seed)) * 2 - 1
    params = list(model.parameters())
    kernel = torch.zeros(states[0].shape[0], states[0].shape[0], dtype=F64)
    for r in draws.to(F64):
        rows = []
        for i in range(states[0].shape[0]):
            out = model(*(s[i : i + 1] for s in states))
            grads = torch.autograd.grad((out * r).sum(), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        gradients = torch.stack(rows)
        kernel += gradients @ gradients.T
    scale = kernel.diagonal().sqrt()
    return kernel / scale[:, None] / scale[None, :]


def bound_mlp(optimizer=torch.optim.SGD, wrap=lambda model: model, **options):
    """``(model, analyzer)``: the seeded MLPDenoiser and an analyzer (3 bins, 4 probes, ``kernel_points=4`` unless
    ``options`` say otherwise) bound to ``wrap(model)`` with ``optimizer`` at lr 1e-3 and the batch BATCH."""
    torch.manual_seed(0)
    model = MLPDenoiser(2, hidden=32, depth=2).double()
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    analyzer = NoiseLevelAnalyzer(make_scheduler(100), data, num_bins=3, num_probes=4,
                                  **{"kernel_points": 4, **options}, progress=False)
    analyzer.bind(wrap(model), optimizer(model.parameters(), 1e-3), batch_size=BATCH)
    return model, analyzer


def test_a_sketched_record_after_binds_estimate_checks_the_models_layers_along_a_nonzero_direction():
    """The kernel record at bind (sketched, 2 directions) on a model with a layer that sees its batch reversed
    is the brute-force sketched kernel's locality summary. Regression of 6f24276: bind's ``kernel_record_cost``
    built the sketch's kept wrapper with a zero direction and ran the engine's covering check on it first; every
    gradient along a zero direction is zero, so every block passed, and the records found that outcome
    remembered: the reversed layer's factors were used as its per-example gradients (the record's kernel 0.31
    off in its largest entry). Passes at 6f24276^ (a new wrapper per record, checked along a Gaussian
    direction)."""
    torch.manual_seed(0)
    model = BatchReversingDenoiser().double()
    data = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    analyzer = NoiseLevelAnalyzer(make_scheduler(100), data, num_bins=3, num_probes=4, kernel_points=4,
                                  kernel_sketch=2, progress=False)
    analyzer.bind(model, torch.optim.SGD(model.parameters(), 1e-3), batch_size=BATCH)
    states = make_states(analyzer.scheduler, analyzer.kernel_clean, analyzer.kernel_noise, analyzer.bins.centers)
    reference = kernel_locality(sketched_reference_kernel(model, states, 2, analyzer.seed), 4, torch.arange(3),
                                analyzer.band, seed=analyzer.seed)
    recorded = analyzer.kernel_history[0]
    assert_same_summary({key: recorded[key] for key in reference}, reference, rel=1e-9)


def test_a_torch_compiled_model_binds_and_its_records_are_the_plain_models():
    """An analyzer bound to ``torch.compile(model)`` (the docstring's "the analyzer reads through the wrappers")
    binds, and its record at bind and its ``kernel_record_cost`` are those of an analyzer bound to the plain
    model. Regression of 6f24276: bind's estimate ran on the compiled module itself, whose submodules' hooks see
    nothing, and raised ZeroDivisionError in the engine's chunk sizes (its factors' sizes 0). Passes at
    6f24276^ (without the ``kernel_record_cost`` comparison: no such method there)."""
    _, plain = bound_mlp(kernel_sketch=3)
    _, compiled = bound_mlp(kernel_sketch=3, wrap=lambda model: torch.compile(model, backend="eager"))
    assert_same_summary(compiled.kernel_history[0], plain.kernel_history[0], rel=1e-12)
    if hasattr(NoiseLevelAnalyzer, "kernel_record_cost"):  # (6f24276^ has no record estimate)
        assert compiled.kernel_record_cost() == plain.kernel_record_cost()


def test_a_stopped_analyzer_loaded_to_be_read_is_not_refused_for_records_it_never_makes(monkeypatch):
    """A state saved after the analyzer stopped (its window ended), loaded and bound to be read, on a device with
    room for the tracker but not for a kernel record beside it: bind binds (no record runs again: the tracker is
    closed and ``stop`` records nothing more), the saved kernel history is read back, and ``analyzer.cost``
    counts no records. Regression of 6f24276: bind refused it with MemoryError naming ``kernel_points``.
    Passes at 6f24276^ (without the ``analyzer.cost`` check: no such property there)."""
    _, data = tiny_unet()

    def analyzer():
        return NoiseLevelAnalyzer(make_scheduler(100), data, num_bins=2, num_probes=4, kernel_points=4,
                                  progress=False)

    monkeypatch.setattr(cost, "available_memory", lambda device: None)
    model, _ = tiny_unet()
    first = analyzer()
    first.bind(model, torch.optim.SGD(model.parameters(), 1e-3), batch_size=BATCH)
    tracker_needs = first.tracker.cost.total_bytes - first.tracker.cost.existing_bytes
    first.stop()
    saved = first.state_dict()
    # room for the tracker alone: a record of 4 × 2 states needs several times more (kernel_record > 0)
    monkeypatch.setattr(cost, "available_memory", lambda device: tracker_needs)
    reader = analyzer()
    reader.load_state_dict(saved)
    model, _ = tiny_unet()
    reader.bind(model, torch.optim.SGD(model.parameters(), 1e-3), batch_size=BATCH)
    assert reader.stopped and reader.kernel_history == first.kernel_history
    if hasattr(NoiseLevelAnalyzer, "cost"):  # (6f24276^ has no analyzer estimate)
        assert reader.cost.work["kernel_records"] == 0 and reader.cost.memory["kernel_record"] == 0


def test_the_reports_cost_is_the_analyzers_estimate_with_its_kernel_records():
    """``report()["config"]["cost"]`` is ``analyzer.cost`` (the estimate bind prints, with the kernel records'
    ``kernel_records`` work and ``kernel_record`` memory), its ratio that of the tracked step and the amortized
    record: 1 + Σ work / bare step. Fails at HEAD (6f24276), whose report kept ``tracker.cost`` alone: its ratio
    without the records (here 2.19× a bare step against 3.32× with them, kernel_every=2)."""
    _, analyzer = bound_mlp(kernel_every=2)
    g = torch.Generator().manual_seed(2)
    analyzer.step(torch.randn(BATCH, 2, generator=g, dtype=F64), torch.randn(BATCH, 2, generator=g, dtype=F64),
                  torch.randint(0, 100, (BATCH,), generator=g))
    reported = analyzer.report()["config"]["cost"]
    estimate = analyzer.cost
    assert reported["work"]["kernel_records"] == pytest.approx(analyzer.kernel_record_cost()["work"] / 2, rel=1e-12)
    assert reported["memory_bytes"] == estimate.memory and reported["total_bytes"] == estimate.total_bytes
    assert reported["ratio"] == pytest.approx(1 + sum(estimate.work.values()) / estimate.bare_step, rel=1e-12)
    assert reported["ratio"] > analyzer.tracker.cost.ratio


def test_a_model_passed_to_kernel_structure_is_not_kept_alive_by_the_analyzer():
    """``kernel_structure(other)`` (sketched) on models other than the bound one, a sweep over checkpoints, keeps
    none of them: each is freed once the caller drops it; the bound model's wrapper, which its records reuse,
    stays the one kept. Regression of 6f24276:
    the sketch's wrapper, which holds its model, was kept per model in ``_kernel_wrappers`` for the analyzer's
    life (a sweep of N checkpoints held N models). Passes at 6f24276^ (no kept wrappers)."""
    model, analyzer = bound_mlp(kernel_points=2, kernel_sketch=2)
    checkpoint = MLPDenoiser(2, hidden=32, depth=2).double()
    alive = weakref.ref(checkpoint)
    of_checkpoint = analyzer.kernel_structure(checkpoint)
    del checkpoint
    gc.collect()
    assert alive() is None
    assert of_checkpoint["sketch"] == 2
    if hasattr(analyzer, "_kernel_wrappers"):  # (6f24276^ keeps none)
        assert [wrapper.model for wrapper in analyzer._kernel_wrappers.values()] == [model]


def test_kernel_structure_of_an_analyzer_bound_to_a_compiled_model_is_its_record():
    """``kernel_structure()`` (the bound model, here ``torch.compile``'d) and ``kernel_structure(compiled)`` (as
    ``train_with_window`` passes its trainer's model) at the θ of bind are the record bind made (on the tracker's
    unwrapped module). Fails at 6f24276^ in ``kernel_structure``: the compiled module went to the engine as it was,
    its submodules' hooks saw nothing, and its chunk sizes divided by factor sizes of 0 (ZeroDivisionError); at
    HEAD (6f24276) already in bind, the same way (the regression test above)."""
    _, analyzer = bound_mlp(kernel_sketch=3, wrap=lambda model: torch.compile(model, backend="eager"))
    compiled = analyzer.model  # (the module bind was given)
    recorded = {key: value for key, value in analyzer.kernel_history[0].items() if key not in ("tracked_step", "global_step")}
    for structure in (analyzer.kernel_structure(), analyzer.kernel_structure(compiled)):
        assert_same_summary(structure, recorded, rel=1e-12)


def test_the_estimate_holds_a_record_beside_what_the_tracker_keeps_between_steps():
    """A kernel record runs between tracked steps, beside what the tracker keeps from one step to the next (the
    cost module's docstring: the training step's arrays, the group state, ledgers, parameter copies, check
    scratch); only the step's temporaries are free by then. For a record larger than those temporaries but within
    the tracker's analysis memory (a real tracker's parts, Adam, dense group state), ``with_kernel_records``'
    total is at least the kept parts plus the record, and never below the tracker's own. Fails at HEAD (6f24276),
    which subtracted the whole analysis memory, kept arrays included: ``kernel_record`` 0 and the total, 1.52 MB,
    short of that peak, 1.89 MB (the kept 0.87 MB and the record's 1.01 MB), by 0.37 MB here."""
    _, analyzer = bound_mlp(torch.optim.Adam, group_state="dense")
    tracker_cost = analyzer.tracker.cost
    kept_between_steps = sum(tracker_cost.memory.get(part, 0) for part in (
        "training_step", "frozen_weights", "group_state", "ledgers", "parameter_copies", "check_scratch", "ema",
        "projection", "probe_outputs"))
    temporaries = tracker_cost.total_bytes - kept_between_steps
    assert kept_between_steps > 0 and temporaries > 0
    record_bytes = (temporaries + tracker_cost.analysis_bytes) // 2  # above the temporaries, within the analysis
    record = {"work": 1.0, "bytes": record_bytes, "states": 12, "sketch": None}
    estimate = cost.with_kernel_records(tracker_cost, record, every=1)
    assert estimate.total_bytes >= kept_between_steps + record_bytes
    assert estimate.total_bytes >= tracker_cost.total_bytes
    small = cost.with_kernel_records(tracker_cost, {**record, "bytes": temporaries}, every=1)
    # (no excess over the temporaries, but a record every step runs in the listener, beside the recorded step)
    assert small.memory["kernel_record"] == 0 and small.total_bytes >= (
        kept_between_steps + small.memory["step_record"] + tracker_cost.memory["group_updates"] + temporaries)
