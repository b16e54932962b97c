"""A recorded step's bookkeeping owed, not lost (the "owed" review, session 41).

The tracker marks a committed step's listeners owed with its ledgers and calls them after the step, or, where an
interrupt or an error cut them off, at the next step, observed micro-batch or save; the analyzers' listeners count a
step once and owe their records (the GAN analyzer's alignment row, coupling window and log, as the diffusion
analyzer's snapshot, kernel record and log), made at the next opportunity. The reference throughout is the same run
without the failure: every count, record, ledger and weight bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from genkernel.core.tracking.tracker import PathKernelTracker as Tracker
from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
from genkernel.diffusion.objectives import noisy_input
from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPGenerator
from genkernel.supervised import mlp, mse_loss
from test_ddpm_trainer import ring
from test_resume import DropoutCritic, DropoutDenoiser, same

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"

pytestmark = pytest.mark.usefixtures("one_thread")


def _steady(state):
    """``state`` without the free memory the cost estimates read (``available_bytes``: the machine's, not the run's)."""
    if isinstance(state, dict):
        return {k: _steady(v) for k, v in state.items() if k != "available_bytes"}
    if isinstance(state, (list, tuple)):
        return [_steady(v) for v in state]
    return state


def _once(monkeypatch, owner, name, at, error):
    """``owner.name`` raising ``error()`` at its ``at``-th call (1-based), else itself."""
    original, calls = getattr(owner, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise error()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return original


# -- the tracker ---------------------------------------------------------------------------------------------------------
def test_a_listener_an_interrupt_kept_from_a_recorded_step_hears_it_at_the_next_step(monkeypatch):
    """A bare tracker with two listeners; Ctrl-C in the first as step 2 is recorded (before it books anything):
    step 3 first calls both listeners for step 2 (the same result, residual bit for bit), then for step 3: each
    listener hears steps 1, 2, 3 once and in order, as in the run without the interrupt. Fails on the old code: the
    second listener never heard step 2 (it heard [1, 3])."""
    x, y = torch.randn(48, 2, generator=torch.Generator().manual_seed(2)), torch.randn(48, 1)

    def run(interrupt):
        torch.manual_seed(0)
        model = mlp(2, [8], 1, act="tanh")
        tracker = Tracker(model, torch.optim.Adam(model.parameters(), lr=1e-2), mse_loss,
                          probes=torch.randn(4, 2, generator=torch.Generator().manual_seed(1)), num_groups={"half": 2})
        first, second, calls = [], [], [0]

        def listener_a(result):
            calls[0] += 1
            if interrupt and calls[0] == 2:
                raise KeyboardInterrupt
            first.append((result.step, result.residual.clone()))

        tracker.listeners += [listener_a, lambda result: second.append((result.step, result.residual.clone()))]
        for s in range(3):
            rows = torch.arange(16) + 16 * s
            try:
                tracker.step(x[rows], y[rows], {"half": (x[rows, 0] > 0).long()})
            except KeyboardInterrupt:
                assert interrupt and s == 1 and tracker.ledger.steps == 2  # (the step stays recorded)
        return first, second, tracker.state_dict()

    straight, interrupted = run(False), run(True)
    assert [s for s, _ in interrupted[0]] == [s for s, _ in interrupted[1]] == [1, 2, 3]
    same(straight, interrupted)


# -- the diffusion analyzer, an observed loop --------------------------------------------------------------------------
def _observed_loop(monkeypatch=None, steps=3, save_after=None):
    """A loop of two observed micro-batches per step, bound with start_step=3; ``monkeypatch``: Ctrl-C as the
    tracker calls its listeners after step 2 (the loop's optimizer.step() raises it; the step is applied and
    recorded, and the loop goes on). Returns the analyzer's state after step ``save_after``, its report and its state
    at the end, and the model's."""
    torch.manual_seed(0)
    model, scheduler = DropoutDenoiser(), make_scheduler(100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(16, seed=4), num_bins=3, num_probes=8, kernel_points=4,
                                  progress=False, snapshot_every=1, kernel_every=2)
    analyzer.bind(model, optimizer, start_step=3)
    if monkeypatch is not None:
        _once(monkeypatch, Tracker, "_recorded", 2, KeyboardInterrupt)
    draws, data, saved = torch.Generator().manual_seed(2), ring(64, seed=1), None
    for step in range(steps):
        optimizer.zero_grad()
        for _ in range(2):
            x = data[torch.randint(0, 64, (8,), generator=draws)]
            noise, t = torch.randn(8, 2, generator=draws, dtype=x.dtype), torch.randint(0, 100, (8,), generator=draws)
            losses = ((model(noisy_input(scheduler, x, noise, t), t) - noise) ** 2).mean(dim=1)
            analyzer.observe(losses, t)
            (losses.mean() / 2).backward()
        try:
            optimizer.step()
        except KeyboardInterrupt:
            assert monkeypatch is not None and step == 1
        if step + 1 == save_after:
            saved = copy.deepcopy(analyzer.state_dict())  # (the live lists and tensors go on)
    analyzer.finish()
    return _steady((saved, analyzer.report(), analyzer.state_dict(), model.state_dict()))


def test_an_observed_step_whose_listener_an_interrupt_kept_is_counted_before_a_save_and_the_next_step(monkeypatch):
    """An observed loop (two micro-batches a step, start_step 3, a snapshot every step, a kernel record every 2):
    Ctrl-C between step 2's commit and the analyzer's listener. A state saved right after holds step 2 counted
    (bins, global step 5, its snapshot and kernel record), as the straight run's after step 2 does; the loop goes on
    and ends with the straight run's report, state and weights, bit for bit. Fails on the old code: the saved state
    and the report count 2 steps' bins for 3 recorded steps (``bin_counts``, ``global_steps`` one short)."""
    straight = _observed_loop(save_after=2)
    interrupted = _observed_loop(monkeypatch, save_after=2)
    assert len(interrupted[0]["bin_counts"]) == 2 and interrupted[0]["global_steps"] == [4, 5]
    same(straight, interrupted)


# -- the GAN analyzer ----------------------------------------------------------------------------------------------------
def _gan(log=None):
    torch.manual_seed(0)
    generator = MLPGenerator(2, 2, hidden=16, depth=2).double()
    critic = DropoutCritic().double()
    analyzer = GANKernelAnalyzer(generator, critic, probe_latents=torch.randn(8, 2, dtype=torch.float64),
                                 num_groups=3, window=2, eval_every=2, coverage_latents=16, mode_centers=ring(4), mode_std=0.1,
                                 log=log)
    trainer = GANTrainer(generator, critic, ring(64), batch_size=16, d_steps=2, seed=3, loss="hinge",
                         callbacks=[analyzer])
    torch.manual_seed(5)
    return trainer, analyzer


def _logged():
    logs = []
    return logs, (lambda metrics, step: logs.append((step, {k: v for k, v in metrics.items()})))


def test_out_of_memory_in_the_gan_analyzers_alignment_is_owed_made_before_a_save_and_the_run_goes_on(monkeypatch):
    """GANTrainer with the GAN analyzer (window 2, an alignment row and coverage every 2 generator steps, a log): out
    of memory in generator step 3's alignment (its coverage samples), after the step was recorded. A report while it
    fails again reads the rest, with a note naming the step; the state saved right after has the row made (the records
    a step owes are made before a state is written: a fresh trainer loading it holds what the failed one holds), and
    the failed trainer trained on ends as the straight run: state, report and logs bit for bit. Fails on the old code:
    the analyzer refused the report, the save ("the bookkeeping of a generator step was interrupted") and every
    further step."""
    logs, log = _logged()
    straight, straight_analyzer = _gan(log)
    straight.train(4)
    failed_logs, failed_log = _logged()
    failed, failed_analyzer = _gan(failed_log)
    original = _once(monkeypatch, GANKernelAnalyzer, "_record_alignment", 2, lambda: RuntimeError(OOM))
    with pytest.raises(RuntimeError, match="out of memory"):
        failed.train(4)
    assert failed_analyzer.g_steps == 3 and len(failed_analyzer.alignment) == 1  # (the row of step 3 owed)

    def out_of_memory(*args):
        raise RuntimeError(OOM)

    monkeypatch.setattr(GANKernelAnalyzer, "_record_alignment", out_of_memory)  # (failing again: the report reads on)
    assert any("generator step 3" in note and "out of memory" in note for note in failed_analyzer.report()["notes"])
    monkeypatch.setattr(GANKernelAnalyzer, "_record_alignment", original)
    saved = copy.deepcopy(failed.state_dict())  # (a state in memory holds the live optimizer's tensors)
    assert [row["step"] for row in failed_analyzer.alignment] == [1, 3]
    resumed, resumed_analyzer = _gan()
    resumed.load_state_dict(saved)  # (the state holds what the failed analyzer holds: the row of step 3 made)
    for part in ("alignment", "coverage", "fields", "windows", "g_group_counts", "g_loop_steps", "d_group_counts"):
        same(getattr(failed_analyzer, part), getattr(resumed_analyzer, part), part)
    failed.train(4)
    same(_steady(straight.state_dict()), _steady(failed.state_dict()))
    same(_steady(straight_analyzer.report()), _steady(failed_analyzer.report()))
    same(logs, failed_logs)


@pytest.mark.parametrize("call", [2, 3], ids=["discriminator", "generator"])
def test_an_interrupt_before_a_gan_trackers_listener_leaves_the_counts_whole(monkeypatch, call):
    """GANTrainer (2 discriminator steps per generator step) with the GAN analyzer: Ctrl-C as a tracker calls its
    listeners after the 2nd recorded step (a discriminator step) or the 3rd (the first generator step): the step is
    in the ledgers and the weights; ``train`` again ends as the straight run, ``d_group_counts``, ``d_loop_steps``,
    ``g_group_counts``, alignment and windows included. Fails on the old code: the step's counts were never made
    (``d_steps`` / ``g_steps`` one short of the ledgers)."""
    straight, _ = _gan()
    straight.train(3)
    failed, analyzer = _gan()
    original = _once(monkeypatch, Tracker, "_recorded", call, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        failed.train(3)
    monkeypatch.setattr(Tracker, "_recorded", original)
    failed.train(3)
    assert analyzer.d_steps == analyzer.d_tracker.ledger.steps and analyzer.g_steps == analyzer.g_tracker.ledger.steps
    same(_steady(straight.state_dict()), _steady(failed.state_dict()))


def _observed_gan(monkeypatch=None, at=None):
    """The plain loop of test_gan_observe (D on real and generated rows, then G), observed by a bound analyzer (window
    2, an alignment row every step); ``monkeypatch``: Ctrl-C as a tracker calls its listeners for the ``at``-th time
    (the loop's optimizer.step() raises it, the step applied and recorded; the loop goes on)."""
    import torch.nn.functional as F

    import test_gan_observe as base

    G, D, g_opt, d_opt, analyzer = base.bound_players()
    if monkeypatch is not None:
        _once(monkeypatch, Tracker, "_recorded", at, KeyboardInterrupt)
    b = base.B
    for real, z_d, z_g in base.batches(4):
        with torch.no_grad():
            fake = G(z_d)
        x = torch.cat([real, fake])
        d_opt.zero_grad()
        losses = F.binary_cross_entropy_with_logits(D(x), base.ROLES.to(base.F64), reduction="none")
        analyzer.observe_discriminator(losses, base.ROLES, x)
        (losses[:b].mean() + losses[b:].mean()).backward()
        for optimizer in (d_opt, None):
            if optimizer is None:  # G's step
                g_opt.zero_grad()
                fake = G(z_g)
                losses = F.binary_cross_entropy_with_logits(D(fake), torch.ones(b, dtype=base.F64), reduction="none")
                analyzer.observe_generator(losses, z_g, fake)
                losses.mean().backward()
                torch.nn.utils.clip_grad_norm_(G.parameters(), base.CLIP)
                optimizer = g_opt
            try:
                optimizer.step()
            except KeyboardInterrupt:
                assert monkeypatch is not None
    analyzer.finish()
    return _steady((analyzer.report(), analyzer.state_dict(), G.state_dict(), D.state_dict()))


@pytest.mark.parametrize("at", [3, 4], ids=["discriminator", "generator"])
def test_an_observed_gan_loop_whose_listener_an_interrupt_kept_ends_as_the_straight_loop(monkeypatch, at):
    """A bound GAN analyzer observing a plain loop (4 iterations): Ctrl-C as the tracker calls its listeners after the
    2nd discriminator step or the 2nd generator step (the one that closes the first window), from inside the loop's
    optimizer.step(); the loop goes on. The step's counts, alignment row and window are made at the next observed
    micro-batch: the report, the analyzer's state and both players end as the straight loop's, bit for bit. Fails on
    the old code: the step was never counted (``d_steps`` or ``g_steps`` one short of the ledgers, a window fewer)."""
    same(_observed_gan(), _observed_gan(monkeypatch, at))
