"""Second read of session 41's fixes (the "read" review): owed listeners, failures and resumes.

The reference throughout is the same run without the failure (or with the old, at-most-once delivery to a user's
listener): every count, record, ledger and weight bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from genkernel.core.tracking.tracker import PathKernelTracker as Tracker
from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
from genkernel.diffusion.objectives import noisy_input
from genkernel.supervised import mlp, mse_loss
from test_ddpm_trainer import ring
from test_owed41 import _steady
from test_resume import DropoutDenoiser, same

pytestmark = pytest.mark.usefixtures("one_thread")


# -- a user's listener that raises an error of its own ------------------------------------------------------------------
@pytest.mark.parametrize("fails", ["once", "always"])
def test_a_users_listener_that_raises_its_own_error_hears_each_step_once_and_the_tracker_still_saves(fails):
    """A bare tracker, a user's listener that records the step and then raises a ValueError (at step 2 only, or at
    every step from 2 on), the loop catching it: the listener hears steps 1, 2, 3 once each (the error leaves the
    recorded step as it is, as it always did), the tracker takes 3 steps and ``state_dict()`` works, and the weights
    and ledgers are the run's without the failing listener. Fails on the old code: the tracker called the listener
    again with step 2 at the next step (it recorded [1, 2, 2, 3]); failing every time, it refused step 3 and every
    save (``state_dict`` raised the listener's error)."""
    x, y = torch.randn(48, 2, generator=torch.Generator().manual_seed(2)), torch.randn(48, 1)

    def run(listen):
        torch.manual_seed(0)
        model = mlp(2, [8], 1, act="tanh")
        tracker = Tracker(model, torch.optim.Adam(model.parameters(), lr=1e-2), mse_loss,
                          probes=torch.randn(4, 2, generator=torch.Generator().manual_seed(1)), num_groups={"half": 2})
        heard = []

        def listener(result):
            heard.append(result.step)
            if result.step == 2 or (fails == "always" and result.step > 2):
                raise ValueError("the user's listener failed")

        if listen:
            tracker.listeners.append(listener)
        for s in range(3):
            rows = torch.arange(16) + 16 * s
            try:
                tracker.step(x[rows], y[rows], {"half": (x[rows, 0] > 0).long()})
            except ValueError as error:
                assert listen and "the user's listener failed" in str(error)
                assert tracker.ledger.steps == s + 1  # (the step stays recorded)
        return heard, tracker.ledger.steps, _steady(tracker.state_dict()), model.state_dict()

    heard, steps, *state = run(True)
    assert heard == [1, 2, 3] and steps == 3
    reference = run(False)
    same(list(reference[2:]), state)


def test_a_users_listener_failing_before_the_analyzers_is_not_repeated_and_the_analyzer_counts_every_step():
    """An observed diffusion loop (two micro-batches a step, a snapshot every step, a kernel record every 2) whose
    tracker has a user's listener put before the analyzer's, failing with its own ValueError at step 2 after it
    recorded the step (the loop catches it at ``optimizer.step()``): the analyzer's listener, which the error kept from
    step 2, counts it before step 3 (its report and state are the run's without the user's listener, bit for bit),
    and the user's listener hears each step once. Fails on the old code: the user's listener was called again with
    step 2 before step 3 (it recorded [1, 2, 2, 3])."""

    def run(listen):
        torch.manual_seed(0)
        model, scheduler = DropoutDenoiser(), make_scheduler(100)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        analyzer = NoiseLevelAnalyzer(scheduler, ring(16, seed=4), num_bins=3, num_probes=8, kernel_points=4,
                                      progress=False, snapshot_every=1, kernel_every=2)
        analyzer.bind(model, optimizer, start_step=3)
        heard = []

        def listener(result):
            heard.append(result.step)
            if result.step == 2:
                raise ValueError("the user's listener failed")

        if listen:
            analyzer.tracker.listeners.insert(0, listener)
        draws, data = torch.Generator().manual_seed(2), ring(64, seed=1)
        for step in range(3):
            optimizer.zero_grad()
            for _ in range(2):
                x = data[torch.randint(0, 64, (8,), generator=draws)]
                noise, t = torch.randn(8, 2, generator=draws, dtype=x.dtype), torch.randint(0, 100, (8,), generator=draws)
                losses = ((model(noisy_input(scheduler, x, noise, t), t) - noise) ** 2).mean(dim=1)
                analyzer.observe(losses, t)
                (losses.mean() / 2).backward()
            try:
                optimizer.step()
            except ValueError:
                assert listen and step == 1
        analyzer.finish()
        return heard, _steady((analyzer.report(), analyzer.state_dict(), model.state_dict()))

    heard, state = run(True)
    assert heard == [1, 2, 3]
    same(run(False)[1], state)


# -- a GANTrainer state taken in memory ---------------------------------------------------------------------------------
def test_a_gan_state_taken_in_memory_after_a_failure_resumes_as_the_straight_run_but_shares_the_optimizers_tensors(
        monkeypatch):
    """Coverage (the owed review's open question: "a GANTrainer state taken in memory right after a failure partway
    through train(), loaded into a fresh trainer and trained on, did not reproduce the straight run's weights").
    GANTrainer on a DataLoader, out of memory copying the players' buffers in a later step (after its real batch was
    drawn and handed back): ``state_dict()`` taken right after, NOT copied, loaded into a fresh trainer (another global
    seed) that trains on, ends as the straight run, bit for bit: the hand-back of 2f3460e is whole. What does not
    reproduce is a second trainer training on the same in-memory state: torch's ``Optimizer.load_state_dict`` keeps
    the very tensors of a state of the same dtype and device (exp_avg, step), so the failed trainer trained on as well
    moves the fresh one's Adam moments (torch's own semantics, as plain torch optimizers show: copy a state kept in
    memory, ``copy.deepcopy``, as the owed tests do)."""
    import genkernel.gan.trainer as gan_trainer_module
    import test_crash41 as crash

    torch.manual_seed(5)
    straight = crash._gan()
    torch.manual_seed(5)
    straight.train(4)
    failed = crash._gan()
    torch.manual_seed(5)
    original, calls = gan_trainer_module.buffer_snapshot, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(*args, **kwargs)

    monkeypatch.setattr(gan_trainer_module, "buffer_snapshot", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        failed.train(4)
    monkeypatch.setattr(gan_trainer_module, "buffer_snapshot", original)
    state = failed.state_dict()  # (in memory: the live tensors)
    fresh = crash._gan()
    torch.manual_seed(123)  # (the state's global RNG replaces it)
    fresh.load_state_dict(state)
    assert fresh.d_optimizer.state_dict()["state"][0]["exp_avg"] is failed.d_optimizer.state_dict()["state"][0]["exp_avg"]
    fresh.train(4)
    same(_steady(straight.state_dict()), _steady(fresh.state_dict()))
    # the same in plain torch: the loaded optimizer holds the source's tensors
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    source, loaded = torch.optim.Adam([p]), torch.optim.Adam([q])
    p.grad = torch.ones(2)
    source.step()
    loaded.load_state_dict(source.state_dict())
    assert loaded.state[q]["exp_avg"] is source.state[p]["exp_avg"]


# -- the accelerate examples' checkpoint limit ----------------------------------------------------------------------------
class _Accelerator:
    """What ``save_checkpoint`` asks of an Accelerator: ``save_state(folder)`` writing the folder's files."""

    def save_state(self, folder):
        import os

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "optimizer.bin"), "w") as handle:
            handle.write(folder)


@pytest.mark.parametrize("limit, kept", [(1, ["checkpoint-110"]), (2, ["checkpoint-110", "checkpoint-200"]),
                                         (3, ["checkpoint-100", "checkpoint-110", "checkpoint-200"])])
def test_the_checkpoint_limit_never_removes_the_checkpoint_just_written(tmp_path, limit, kept):
    """The examples' ``save_checkpoint`` in a run resumed from checkpoint-100 while a later checkpoint-200 (of the run
    abandoned) is there: saving step 110 under ``--checkpoints_total_limit`` keeps the new checkpoint-110 whole and
    the limit's count, removing the oldest others, as upstream (which removed them before its save) does: limit 1
    keeps checkpoint-110 alone. Fails on the old code: under limit 1 the oldest-first removal after the save removed
    checkpoint-110 itself and kept checkpoint-200, which ``--resume_from_checkpoint latest`` then resumed (the run
    abandoned)."""
    from recipes.examples.checkpointing import save_checkpoint, saved_checkpoints

    accelerator = _Accelerator()
    for step in (100, 200):
        save_checkpoint(accelerator, str(tmp_path), step, None)
    save_checkpoint(accelerator, str(tmp_path), 110, limit)
    assert saved_checkpoints(str(tmp_path)) == kept
    assert (tmp_path / "checkpoint-110" / "optimizer.bin").read_text().endswith(".checkpoint-110.partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == kept  # (no hidden folder left)


# -- gradients zeroed in place between the tracker's steps ------------------------------------------------------------------
@pytest.mark.parametrize("between", ["zero_grad(set_to_none=False)", "logged backward, zeroed in place"])
def test_gradients_zeroed_in_place_before_an_owned_step_are_not_refused_as_accumulated(between):
    """An untracked warm-up step leaves gradients; then a tracker, and before each of 3 owned steps the loop zeroes the
    gradients in place (``optimizer.zero_grad(set_to_none=False)``, or a backward of a logged loss for its gradient
    norm followed by that zeroing): the step's own backward starts from zero gradients either way, so the run is the
    one whose loop sets them to None (weights and ledgers bit for bit); a backward left unzeroed is still refused.
    Fails on the old code: "gradients ... were accumulated outside tracker.step" at the first step (at the second
    before 740a04a)."""
    x, y = torch.randn(48, 2, generator=torch.Generator().manual_seed(2)), torch.randn(48, 1)

    def run(mode):
        torch.manual_seed(0)
        model = mlp(2, [8], 1, act="tanh")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()  # (untracked: its gradients stay)
        tracker = Tracker(model, optimizer, mse_loss, probes=torch.randn(4, 2, generator=torch.Generator().manual_seed(1)),
                          num_groups={"half": 2})
        for s in range(3):
            rows = torch.arange(16) + 16 * s
            if mode != "none":
                if mode != "zero_grad(set_to_none=False)":
                    ((model(x) - y) ** 2).mean().backward()
                if mode != "unzeroed":
                    optimizer.zero_grad(set_to_none=False)
            else:
                optimizer.zero_grad()
            tracker.step(x[rows], y[rows], {"half": (x[rows, 0] > 0).long()})
        return _steady(tracker.state_dict()), model.state_dict()

    same(run("none"), run(between))
    with pytest.raises(RuntimeError, match="accumulated outside tracker.step"):
        run("unzeroed")
