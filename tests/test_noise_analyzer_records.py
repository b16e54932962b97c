"""NoiseLevelAnalyzer's records (kernel_history, history, counts) across train() calls, interrupts and loads.

A run trained in pieces, resumed from a checkpoint saved after train() returned, or interrupted inside the
bookkeeping of a recorded step and trained on must hold the analyzer state of the run trained straight
through, bit for bit; the end-of-training kernel record stays readable after train() returns."""

import copy
import math

import pytest
import torch

import genkernel.diffusion.analyzer as analyzer_module
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from states import state_differences

F64 = torch.float64
T = 100
SCHEDULER = make_scheduler(T)


def ring(n, seed=0):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


DATA = ring(40)


def model(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(hidden=16, depth=2, time_dim=8).double()


def make(kernel_every=2, **trainer_kw):
    analyzer = NoiseLevelAnalyzer(SCHEDULER, DATA[:16], num_bins=3, num_probes=6, kernel_points=3, progress=False,
                                  snapshot_every=2, kernel_every=kernel_every)
    trainer = DDPMTrainer(model(), SCHEDULER, DATA, batch_size=16, lr=1e-2, max_grad_norm=0.5, progress=False,
                          callbacks=[analyzer], **trainer_kw)
    return trainer, analyzer




def interrupt_once(analyzer, where: str, at_step: int, error: type[BaseException] = KeyboardInterrupt):
    """Make ``analyzer.<where>`` raise ``error`` the first time it runs at tracked step ``at_step`` (as Ctrl-C or an
    out-of-memory error inside that record would); returns the original method."""
    original = getattr(analyzer, where)
    raised = []

    def faulty(*args, **kwargs):
        if analyzer.tracker is not None and analyzer.tracker.ledger.steps == at_step and not raised:
            raised.append(True)
            raise error(f"inside {where}")
        return original(*args, **kwargs)

    setattr(analyzer, where, faulty)
    return original


def steps_of(records):
    return [r["tracked_step"] for r in records]


@pytest.fixture(scope="module")
def straight():
    trainer, analyzer = make()
    trainer.train(4)
    assert steps_of(analyzer.kernel_history) == [0, 2, 4]
    assert steps_of(analyzer.history) == [2, 4]
    return trainer.state_dict()


def test_resumed_from_a_checkpoint_saved_after_train_returns_is_the_straight_run(straight, tmp_path):
    """#1: train(3) returns (on_train_end records the kernel at step 3), save_checkpoint, a fresh trainer resumes
    and trains 1 more: the old code kept the end record in the continued history, kernel records at tracked
    steps [0, 2, 3, 4] against the straight run's [0, 2, 4]."""
    first, analyzer = make()
    first.train(3)
    # the final parameters' kernel is readable after train() returns: the last entry, at the trained θ
    end = analyzer.kernel_history[-1]
    assert (end["tracked_step"], end["global_step"]) == (3, 3)
    assert not state_differences(end["locality"], analyzer.kernel_structure(first.model)["locality"])
    first.save_checkpoint(tmp_path / "c.pt")
    resumed, resumed_analyzer = make()
    assert resumed.resume(tmp_path / "c.pt")
    # the checkpoint holds the end record (the analyzer's state is pending until training binds it)
    assert steps_of(resumed_analyzer.state_dict()["kernel_history"]) == [0, 2, 3]
    resumed.train(1)
    assert steps_of(resumed_analyzer.kernel_history) == [0, 2, 4]
    assert state_differences(straight, resumed.state_dict()) == []


def test_a_run_trained_in_pieces_is_the_straight_run(straight):
    """#1 on one trainer: train(3) then train(1) (each return records the end kernel) equals train(4)."""
    trainer, analyzer = make()
    trainer.train(3)
    trainer.train(1)
    assert steps_of(analyzer.kernel_history) == [0, 2, 4]
    assert state_differences(straight, trainer.state_dict()) == []


def test_kernel_every_zero_keeps_the_start_and_the_end_only():
    """#1: the end record replaced when training goes on, kept when it ends: train(1) twice records [0, 1], then
    [0, 2], as train(2) (the old code: [0, 1, 2])."""
    whole, whole_analyzer = make(kernel_every=0)
    whole.train(2)
    pieces, analyzer = make(kernel_every=0)
    for expected in ([0, 1], [0, 2]):
        pieces.train(1)
        assert steps_of(analyzer.kernel_history) == expected
    assert steps_of(whole_analyzer.kernel_history) == [0, 2]
    assert state_differences(whole.state_dict(), pieces.state_dict()) == []


@pytest.mark.parametrize("where, error", [("kernel_structure", KeyboardInterrupt), ("locality", KeyboardInterrupt),
                                          ("kernel_structure", MemoryError)])
def test_an_interrupted_bookkeeping_is_completed_at_the_next_step(straight, where, error):
    """#4: an interrupt inside the kernel record or the locality snapshot after tracked step 2; the user catches
    it and trains on. The old code went on without the step's records: kernel records at [0, 4] (history
    [4]) against the straight run's [0, 2, 4] ([2, 4])."""
    trainer, analyzer = make()
    interrupt_once(analyzer, where, 2, error)
    with pytest.raises(error):
        trainer.train(4)
    assert trainer.global_step == 2
    trainer.train(2)
    assert steps_of(analyzer.kernel_history) == [0, 2, 4]
    assert steps_of(analyzer.history) == [2, 4]
    assert state_differences(straight, trainer.state_dict()) == []


def test_a_checkpoint_saved_after_an_interrupted_bookkeeping_resumes_the_straight_run(straight, tmp_path):
    """#4: the checkpoint written right after the interrupt holds the step's owed records (made at the save)."""
    trainer, analyzer = make()
    original = interrupt_once(analyzer, "kernel_structure", 2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(4)
    analyzer.kernel_structure = original
    trainer.save_checkpoint(tmp_path / "c.pt")
    resumed, _ = make()
    assert resumed.resume(tmp_path / "c.pt")
    resumed.train(2)
    assert state_differences(straight, resumed.state_dict()) == []


def test_an_interrupt_inside_the_step_count_is_refused(monkeypatch):
    """#4: cut off while it counts the step (bins, step numbers), the analyzer cannot complete the step's
    bookkeeping: it refuses to go on (the old code trained on, its counts one step short of the ledger)."""
    trainer, analyzer = make()
    counted = analyzer_module.summed_over_ranks
    calls = []

    def faulty(counts, distributed):
        calls.append(True)
        if len(calls) == 2:
            raise KeyboardInterrupt("inside the count of step 2")
        return counted(counts, distributed)

    monkeypatch.setattr(analyzer_module, "summed_over_ranks", faulty)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(4)
    assert len(analyzer.bin_counts) == 1 and analyzer.tracker.ledger.steps == 2
    with pytest.raises(RuntimeError, match="refuses further steps, saves and reports"):
        trainer.train(2)
    with pytest.raises(RuntimeError, match="refuses further steps"):
        analyzer.state_dict()
    assert trainer.global_step == 2  # no step was taken past the refusal


def _observed_step(model, optimizer, analyzer, i, data):
    g = torch.Generator().manual_seed(100 + i)
    x0 = data[torch.randperm(data.shape[0], generator=g)[:16]]
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    t = torch.randint(0, T, (16,), generator=g)
    losses = ((model(SCHEDULER.add_noise(x0, noise, t), t) - noise) ** 2).mean(dim=1)
    analyzer.observe(losses, t)
    optimizer.zero_grad()
    losses.mean().backward()
    optimizer.step()


def test_an_observed_loop_resumes_bit_for_bit_and_completes_an_interrupted_bookkeeping(tmp_path):
    """#7 (coverage: its resume part passes before). #7's reproduction resumed twice in one process from the same in-memory optimizer
    state dict: torch's Optimizer.load_state_dict keeps the given tensors (same dtype and device), so the first
    resumed run's Adam steps wrote its exp_avg into that dict and the second run started from the first run's last
    moments beside step 3's ledger (the tracker's check refused it: "relative gap 2.62e-01"), whichever order
    came second. With each run given its own optimizer state, loading after bind is bit for bit, as before bind.
    The last part (an interrupted observed step's bookkeeping) fails on the old code."""
    data = ring(64)

    def analyzer():
        return NoiseLevelAnalyzer(SCHEDULER, data[:16], num_bins=3, num_probes=6, kernel_points=3, progress=False,
                                  snapshot_every=2, kernel_every=3, controls=2)

    def fresh():
        m = model()
        return m, torch.optim.Adam(m.parameters(), lr=1e-2)

    m, o = fresh()
    a = analyzer()
    a.bind(m, o)
    for i in range(5):
        _observed_step(m, o, a, i, data)
    a.finish()
    m1, o1 = fresh()
    a1 = analyzer()
    a1.bind(m1, o1)
    for i in range(2):
        _observed_step(m1, o1, a1, i, data)
    a1.save(tmp_path / "a.pt")
    model_state, optimizer_state = copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict())
    for order in ("load before bind", "load after bind"):
        m2, o2 = fresh()
        m2.load_state_dict(model_state)
        o2.load_state_dict(copy.deepcopy(optimizer_state))  # (its own tensors: the loaded optimizer steps them in place)
        a2 = analyzer()
        if order == "load before bind":
            a2.load(tmp_path / "a.pt")
            a2.bind(m2, o2, start_step=2)
        else:
            a2.bind(m2, o2, start_step=2)
            a2.load(tmp_path / "a.pt")
        for i in range(2, 5):
            _observed_step(m2, o2, a2, i, data)
        a2.finish()
        assert state_differences(a.state_dict(), a2.state_dict()) == [], order

    # #4 in an observed loop: the kernel record of step 3 interrupted inside optimizer.step()'s hook (the step is
    # recorded); the loop catches it and goes on, the record made at the next observe() (old code: [0, 5])
    m3, o3 = fresh()
    a3 = analyzer()
    a3.bind(m3, o3)
    original, interrupted = interrupt_once(a3, "kernel_structure", 3), []
    for i in range(5):
        try:
            _observed_step(m3, o3, a3, i, data)
        except KeyboardInterrupt:
            interrupted.append(i)
            assert a3.tracker.ledger.steps == 3 and steps_of(a3.kernel_history) == [0]
    a3.kernel_structure = original
    a3.finish()
    assert interrupted == [2] and steps_of(a3.kernel_history) == [0, 3, 5]
    assert state_differences(a.state_dict(), a3.state_dict()) == []


def test_an_interrupted_bookkeeping_logs_the_step_at_the_next_step():
    """#4 with a ``log``: the step whose kernel record was interrupted is logged when training goes on, as the
    straight run logs it (the old code never logged tracked step 2's numbers)."""
    def run(interrupt):
        rows = []
        analyzer = NoiseLevelAnalyzer(SCHEDULER, DATA[:16], num_bins=3, num_probes=6, kernel_points=3,
                                      progress=False, snapshot_every=2, kernel_every=2,
                                      log=lambda metrics, step: rows.append((step, dict(metrics))))
        trainer = DDPMTrainer(model(), SCHEDULER, DATA, batch_size=16, lr=1e-2, max_grad_norm=0.5, progress=False,
                              callbacks=[analyzer])
        if interrupt:
            original = interrupt_once(analyzer, "kernel_structure", 2)
            with pytest.raises(KeyboardInterrupt):
                trainer.train(3)
            assert [step for step, _ in rows] == [1]
            analyzer.kernel_structure = original
            trainer.train(1)
        else:
            trainer.train(3)
        return rows

    straight, continued = run(False), run(True)
    assert [step for step, _ in straight][:3] == [1, 2, 3]
    assert state_differences(straight, continued) == []
