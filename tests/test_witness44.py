"""The witness of the loop's own seed (mixed_precision="observe", a loop seeding its backward no power of two times
the observed c_n: loss / 3): taken where the loop frees the losses before its backward (Lightning's training_step
returning losses.mean()), without the parameters' gradient hooks, its division by λ pinned, a failed pass falling
back to the step's check with its reason recorded (an interrupt propagating, the tracker left consistent), and its
memory and backward passes in the cost estimate; and the seed check comparing the seeds with the coefficients as the
losses' dtype rounds them (bfloat16 losses of micro-batches of 3 and 4 averaged plainly).

The draws are those of tests/test_bf16fix43.py: MLPDenoiser(2, hidden=8, depth=2), bfloat16 autocast, SEED 4 (a
single micro-batch of 6 seeded / 3, 5 or 6 the per-parameter check at bfloat16's eps refuses: 'layers.1.bias' 0.92 %
of its scale) and micro-batches of 6, 4 and 2 (accepted by that check)."""

from __future__ import annotations

import pytest
import torch

import genkernel.core.tracking.tracker as tracker_module
from genkernel import PathKernelTracker
from genkernel.core.errors import LedgerCheckError
from genkernel.core.param_bytes import parameter_bytes
from genkernel.core.push_memory import LiveBytes
from test_bf16fix43 import LR, G, _batch, _net, _probes  # the same draws (module docstring)

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tracked, dtype=torch.bfloat16):
    """The net, its SGD and (``tracked``) a tracker with mixed_precision='observe'."""
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    tracker = PathKernelTracker(net, optimizer, None, _probes(), num_groups=G,
                                mixed_precision="observe") if tracked else None
    return net, optimizer, tracker


def _training_step(net, tracker, k, b, scale, dtype=torch.bfloat16, kept=None):
    """Lightning's pattern: the per-example losses observed inside, only the loss returned (the losses freed
    before the backward, unless appended to ``kept``); the loss = losses.mean() * scale."""
    x, noise, t = _batch(b, k)
    with torch.autocast("cpu", dtype=dtype):
        losses = ((net(x, t) - noise) ** 2).mean(dim=1)
    if tracker is not None:
        tracker.observe(losses, torch.arange(b) % G)
    if kept is not None:
        kept.append(losses)
    return losses.mean() * scale


def _run(sizes, scales, tracked=True, dtype=torch.bfloat16, keep=False):
    """One SGD step over micro-batches of ``sizes``, each backward (losses.mean() * scale) with the losses freed
    before it (``keep``: held by the loop). Returns the net and the tracker (None untracked)."""
    net, optimizer, tracker = _setup(tracked, dtype)
    kept = [] if keep else None
    for k, (b, scale) in enumerate(zip(sizes, scales)):
        _training_step(net, tracker, k, b, scale, dtype, kept).backward()
    optimizer.step()
    return net, tracker


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("divisor", [3, 6])
def test_a_bf16_micro_batch_whose_losses_are_freed_before_the_backward_is_witnessed_with_the_loops_own_seed(divisor):
    """Lightning's training_step returns losses.mean() (the losses freed; Lightning divides by
    accumulate_grad_batches and backpropagates): one micro-batch of 6 seeded / 3 (/ 6) is accepted, training bit for
    bit the loop's without the tracker, no witness lost. The witness pass starts from the losses' graph node, the
    one the engine runs when their hook fires. Old code took no witness for freed losses and refused both:
    'layers.1.bias' gap 1.857e-04 of a scale 2.011e-02 (/ 3), 9.287e-05 of 1.006e-02 (/ 6); kept losses passed."""
    plain, _ = _run([6], [1 / divisor], tracked=False)
    net, tracker = _run([6], [1 / divisor])
    assert _same(net, plain) and tracker.ledger.steps == 1
    (entry,) = tracker.gradient_scales
    assert entry["witness_lost"] == []
    assert abs(entry["scale"] - 1 / divisor) <= torch.finfo(torch.bfloat16).eps / divisor


def test_the_division_by_lambda_makes_a_step_witnessed_both_ways_weigh_its_micro_batches_alike(monkeypatch):
    """Micro-batches of 6 and 4, the first's loss losses.mean() / 2 (a power of two times c_n: its own witness,
    at c_n), the second's losses.mean() / 2 * (1 + 1e-6) (a hair off, within _check_seeds' 1e-5: the witness of
    the loop's seed, at λ c_n). Divided by λ the second stands at c_n as the first does, and the step's witness is
    its real gradient to 1e-5: the witness check passes (spied). Coverage: old code divided too; the test pins the
    division: with it dropped (or done twice) the sum weighs the micro-batches 1 : 1/2 (1 : 2) and the witness check
    failed for this loop (measured, patching _take_seeded_witness), leaving the step to the per-parameter check."""
    seen = []
    original = PathKernelTracker._witnessed
    monkeypatch.setattr(PathKernelTracker, "_witnessed",
                        lambda self, real, witness: seen.append(original(self, real, witness)) or seen[-1])
    taken = []
    take = PathKernelTracker._take_seeded_witness

    def spy(self, entry):
        take(self, entry)
        taken.append(len(entry["witness"]))

    monkeypatch.setattr(PathKernelTracker, "_take_seeded_witness", spy)
    net, tracker = _run([6, 4], [0.5, 0.5 * (1 + 1e-6)], keep=True)
    assert tracker.ledger.steps == 1
    assert taken == [1, 1]  # (the first keeps its own witness, bfloat16's one; the second's is the seeded one)
    assert seen == [True]


@pytest.mark.parametrize("error", [ValueError("a loop's hook"), RuntimeError("graph"), MemoryError()])
def test_a_witness_pass_that_fails_leaves_the_step_to_its_check_with_the_reason_recorded(monkeypatch, error):
    """The witness pass of the loop's seed fails (injected where it starts, for each micro-batch of 6, 4 and 2 seeded
    / 3): the loop's backward goes on as without the tracker, the step is checked without a witness (this draw passes
    the per-parameter check at bfloat16's eps) and recorded, its gradient_scales entry naming every micro-batch's
    lost witness and why; training bit for bit the loop's without the tracker. Old code: no reason recorded
    anywhere (and a ValueError or MemoryError raised out of the loop's backward)."""

    def failing(*args):
        raise error

    monkeypatch.setattr(tracker_module, "_losses_edge", failing)
    plain, _ = _run([6, 4, 2], [1 / 3] * 3, tracked=False)
    net, tracker = _run([6, 4, 2], [1 / 3] * 3)
    assert _same(net, plain) and tracker.ledger.steps == 1
    lost = tracker.gradient_scales[0]["witness_lost"]
    assert [line.split(":")[0] for line in lost] == ["micro-batch 1", "micro-batch 2", "micro-batch 3"]
    assert all(type(error).__name__ in line for line in lost)


def test_an_interrupt_in_the_witness_pass_propagates_and_the_step_run_again_trains_as_without_the_tracker(
        monkeypatch):
    """A KeyboardInterrupt in the witness pass of the second micro-batch propagates out of the loop's backward, with
    nothing of that micro-batch in the gradients and the tracker out of its own pass. The loop then clears the
    gradients and runs the step's micro-batches again: recorded, and the parameters bit for bit those of the same
    step without the tracker. Old code: no such pass to interrupt (it took no witness of freed losses)."""
    calls = []
    edge = tracker_module._losses_edge

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return edge(*args)

    monkeypatch.setattr(tracker_module, "_losses_edge", interrupted)
    net, optimizer, tracker = _setup(True)
    _training_step(net, tracker, 0, 6, 1 / 3).backward()
    after_first = [p.grad.clone() for p in net.parameters()]
    loss = _training_step(net, tracker, 1, 4, 1 / 3)
    with pytest.raises(KeyboardInterrupt):
        loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), after_first))
    assert not tracker._own_pass
    optimizer.zero_grad()
    for k, b in enumerate([6, 4, 2]):
        _training_step(net, tracker, k, b, 1 / 3).backward()
    optimizer.step()
    plain, _ = _run([6, 4, 2], [1 / 3] * 3, tracked=False)
    assert _same(net, plain) and tracker.ledger.steps == 1


@pytest.mark.parametrize("divisor", [1, 3])
def test_a_parameter_hook_that_clips_elementwise_is_refused_in_bf16_as_in_float32(divisor):
    """p.register_hook(lambda g: g.clamp(-1e-3, 1e-3)) on every parameter: the loop's gradient is no scalar times the
    observed sum (the clip of a sum is not the sum of the clips). Float32 refuses it; in bfloat16 the witnesses (the
    loop's own seed for / 3, observe()'s for / 1) went through the hook too, matched the clipped gradient and the
    step was accepted (old code, both; the loop holding its losses). The witness passes now run without the
    parameters' hooks: refused, the model as before the step."""
    net, optimizer, tracker = _setup(True)
    for p in net.parameters():
        p.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    before = [p.detach().clone() for p in net.parameters()]
    kept = []
    for k, b in enumerate([6, 4, 2]):
        _training_step(net, tracker, k, b, 1 / divisor, kept=kept).backward()
    with pytest.raises(LedgerCheckError, match="do not add up to the real gradient"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_a_parameter_hook_runs_once_per_loop_backward_as_without_the_tracker():
    """A parameter hook that counts its calls: in the loop's backward of each micro-batch seeded / 3 (the loop
    holding its losses) it runs once, as without the tracker (old code: twice, the witness pass of the loop's seed
    calling it inside the loop's backward; a hook that accumulates would have trained otherwise). observe()'s own
    passes (its group rows') are not counted here."""
    counts = {}
    for tracked in (False, True):
        net, optimizer, tracker = _setup(tracked)
        calls = []
        net.layers[1].bias.register_hook(lambda g: calls.append(1))
        during, kept = [], []
        for k, b in enumerate([6, 4, 2]):
            loss = _training_step(net, tracker, k, b, 1 / 3, kept=kept)
            before = len(calls)
            loss.backward()
            during.append(len(calls) - before)
        optimizer.step()
        counts[tracked] = during
    assert counts[True] == counts[False] == [1, 1, 1]


def _witness_bytes(tracker):
    """The distinct storages of the witnesses a tracker holds now: the step's sums, every observed micro-batch's own
    and those of the loop's seed."""
    storages = {}

    def add(witness):
        for w in witness.values():
            storages[w.untyped_storage()._cdata] = w.untyped_storage().nbytes()

    observed = tracker._observed
    if observed is not None:
        for w in observed["witness"] or []:
            add(w)
        for entry in observed["entries"]:
            for w in entry.get("witness") or []:
                add(w)
            for w in ((entry.get("seed_box") or {}).get("witness") or {}).values():
                add(w)
    return sum(storages.values())


def test_the_estimate_counts_the_witnesses_and_backward_passes_of_the_worst_case_float16_step():
    """float16 (three micro-batches of 6, 4, 2: the first seeded / 2, its own two witnesses; the others / 2 * (1 +
    1e-6), a seed no power of two times c_n): the witnesses held at once, counted from the tracker's own arrays after
    each observe() and inside each loop backward (after its witness pass), peak at 5 parameter copies, the estimate's
    ``witnesses`` (old code: 2); the storages the loop's backward of the second micro-batch leaves alive (LiveBytes)
    are one parameter copy, the witness of its seed, and its seed's float64 copy; the backward passes through the
    losses besides the group rows and the loop's own are 3 for the seeded micro-batches, the estimate's
    ``work['witnesses']`` 3 bare backward passes of the batch (old code: not counted)."""
    net, optimizer, tracker = _setup(True, torch.float16)
    p_bytes = parameter_bytes(list(net.parameters()))
    assert tracker.cost.memory["witnesses"] == 5 * p_bytes
    cost = tracker.cost
    assert cost.work["witnesses"] == 3 * (cost.bare_step - cost.settings["batch"])
    peak = [0]
    first = next(net.parameters())
    first.register_post_accumulate_grad_hook(lambda p: peak.__setitem__(0, max(peak[0], _witness_bytes(tracker))))
    passes, retained = [], []
    for k, (b, scale) in enumerate(zip([6, 4, 2], [0.5, 0.5 * (1 + 1e-6), 0.5 * (1 + 1e-6)])):
        x, noise, t = _batch(b, k)
        with torch.autocast("cpu", dtype=torch.float16):
            losses = ((net(x, t) - noise) ** 2).mean(dim=1)
        fired = []
        losses.register_hook(lambda g: fired.append(1))
        tracker.observe(losses, torch.arange(b) % G)
        peak[0] = max(peak[0], _witness_bytes(tracker))
        loss = losses.mean() * scale
        with LiveBytes((*net.parameters(), *(p.grad for p in net.parameters() if p.grad is not None), losses,
                        loss)) as live:
            loss.backward()
            torch.zeros(1)  # (an operation: LiveBytes drops the storages freed since the last one)
        retained.append(live.current)
        passes.append(len(fired) - 2)  # (less the group rows' pass, batched, and the loop's own)
    optimizer.step()
    assert tracker.ledger.steps == 1
    assert peak[0] == 5 * p_bytes
    assert passes == [2, 3, 3]
    seed_copy = 4 * 8  # (the second micro-batch's seed, float64, kept for the seed check)
    assert p_bytes + seed_copy <= retained[1] <= p_bytes + seed_copy + 64


def _bf16_losses_step(sizes, divisors, tracked=True):
    """One SGD step over micro-batches of ``sizes`` whose per-example losses are bfloat16 themselves (the target cast
    too), each backward losses.mean() / divisor."""
    net, optimizer, tracker = _setup(tracked)
    for k, (b, divisor) in enumerate(zip(sizes, divisors)):
        x, noise, t = _batch(b, k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = ((net(x, t) - noise.bfloat16()) ** 2).mean(dim=1)
        assert losses.dtype == torch.bfloat16
        if tracker is not None:
            tracker.observe(losses, torch.arange(b) % G)
        (losses.mean() / divisor).backward()
    optimizer.step()
    return net, tracker


def test_bf16_losses_of_micro_batches_of_3_and_4_averaged_plainly_are_accepted_and_one_weighted_1_percent_off_not():
    """bfloat16 per-example losses, micro-batches of 3 and 4, each losses.mean(): the mean's seeds are 1/3 and 1/4
    as bfloat16 rounds them (0.333984375), which is how observe() seeds the group rows and the witnesses too; the
    seed check now compares the seeds with the coefficients so rounded: accepted, training bit for bit the loop's
    without the tracker. Old code compared them with the exact 1/3 and refused: 'weighed observed micro-batch 2
    0.998051 times micro-batch 1' (3 and 5: 0.999025). The second micro-batch divided by 1.01 is still refused
    (0.988281 times, the divisor as bfloat16 rounds it)."""
    plain, _ = _bf16_losses_step([3, 4], [1, 1], tracked=False)
    net, tracker = _bf16_losses_step([3, 4], [1, 1])
    assert _same(net, plain) and tracker.ledger.steps == 1
    with pytest.raises(LedgerCheckError, match="weighed observed micro-batch 2 0.988"):
        _bf16_losses_step([3, 4], [1, 1.01])
