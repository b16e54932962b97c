"""GANKernelAnalyzer.fields keeps at most ``field_snapshots`` evaluations' probe snapshots, evenly spaced.

Every evaluation appended a snapshot (the probes' samples, geometry, kernel field and change, [M, ...] each) to
``fields`` for good, and every saved state carried them all: on a 64×64 DCGAN with 128 probes about 24 MiB an
evaluation, unbounded over a run and in no cost estimate. Now the kept snapshots are evaluations 0, s, 2s, ... for the
smallest power of two s that keeps them within ``field_snapshots`` (default 32); ``"all"`` keeps every one."""

from __future__ import annotations

import copy

import pytest
import torch

from genkernel.gan import GANKernelAnalyzer
from genkernel.gan.analyzer import field_stride
from test_gan_analyzer_review import _loop, _pair, _probes

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10  # generator steps, one evaluation each (eval_every=1): evaluations 0..9


def run(field_snapshots, steps=STEPS):
    G, D = _pair()
    g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-2), torch.optim.Adam(D.parameters(), 1e-2)
    analyzer = GANKernelAnalyzer(G, D, _probes(), grouping="direction", num_groups=2, controls=0, window=2,
                                 eval_every=1, field_snapshots=field_snapshots)
    analyzer.bind(g_opt, d_opt)
    _loop(G, D, g_opt, d_opt, analyzer, steps)
    return G, analyzer


def same_snapshot(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


@pytest.fixture(scope="module")
def every():
    return run("all")


def test_the_stride_is_the_smallest_power_of_two_keeping_them_within_the_number():
    """Brute force: for every count of evaluations run, the kept evaluations (multiples of the stride) number at
    most ``keep``, and half the stride would keep more."""
    for keep in (1, 2, 3, 5, 32):
        for last in range(-1, 300):
            stride = field_stride(last, keep)
            kept = len(range(0, last + 1, stride))
            assert kept <= keep and stride & (stride - 1) == 0
            assert stride == 1 or len(range(0, last + 1, stride // 2)) > keep


@pytest.mark.parametrize("keep", [1, 3, 4])
def test_the_kept_snapshots_are_the_evenly_spaced_evaluations_of_a_run_that_keeps_all(every, keep):
    """Fails on the old code (no field_snapshots: the keyword is refused). The snapshots kept are exactly, bit for
    bit, the "all" run's evaluations 0, s, 2s, ... (10 evaluations: s = 8, 4, 4 for 1, 3 and 4 kept); the alignment
    rows and the generator's parameters are those of the run that keeps every snapshot."""
    G_all, all_kept = every
    G, analyzer = run(keep)
    stride = field_stride(STEPS - 1, keep)
    expected = all_kept.fields[::stride]
    assert len(all_kept.fields) == STEPS and len(analyzer.fields) == len(expected) <= keep
    assert all(same_snapshot(a, b) for a, b in zip(analyzer.fields, expected))
    assert [f["step"] for f in analyzer.fields] == [f["step"] for f in expected]
    assert analyzer.alignment == all_kept.alignment
    assert all(torch.equal(p, q) for p, q in zip(G.parameters(), G_all.parameters()))


def test_a_resumed_run_keeps_the_snapshots_of_the_straight_one(every):
    """Saved after 5 evaluations (kept: 0, 2, 4 of 3) and resumed to 10: the kept snapshots are the straight
    run's (0, 4, 8)."""
    _, straight = run(3)
    G, D = _pair()
    g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-2), torch.optim.Adam(D.parameters(), 1e-2)
    first = GANKernelAnalyzer(G, D, _probes(), grouping="direction", num_groups=2, controls=0, window=2, eval_every=1,
                              field_snapshots=3)
    first.bind(g_opt, d_opt)
    _loop(G, D, g_opt, d_opt, first, 5)
    assert [f["step"] for f in first.fields] == [1, 3, 5]
    saved = copy.deepcopy((first.state_dict(), G.state_dict(), D.state_dict(), g_opt.state_dict(), d_opt.state_dict()))
    G, D = _pair()
    g_opt, d_opt = torch.optim.Adam(G.parameters(), 1e-2), torch.optim.Adam(D.parameters(), 1e-2)
    for module, state in zip((G, D, g_opt, d_opt), saved[1:]):
        module.load_state_dict(state)
    resumed = GANKernelAnalyzer(G, D, _probes(), grouping="direction", num_groups=2, controls=0, window=2,
                                eval_every=1, field_snapshots=3)
    resumed.load_state_dict(saved[0])
    resumed.bind(g_opt, d_opt, start_step=5)
    _loop(G, D, g_opt, d_opt, resumed, STEPS, first=5)
    assert [f["step"] for f in resumed.fields] == [f["step"] for f in straight.fields] == [1, 5, 9]
    assert all(same_snapshot(a, b) for a, b in zip(resumed.fields, straight.fields))


def test_a_state_that_kept_every_snapshot_loads_thinned(every):
    """A state saved with "all" (or before snapshots were thinned: such states carry no field_snapshots) loads into
    an analyzer that keeps 3 as the snapshots that analyzer would have kept; a state saved with another number is
    refused, naming the setting."""
    _, all_kept = every
    state = all_kept.state_dict()
    G, D = _pair()
    three = GANKernelAnalyzer(G, D, _probes(), grouping="direction", num_groups=2, controls=0, window=2, eval_every=1,
                              field_snapshots=3)
    old = dict(state, config={k: v for k, v in state["config"].items() if k != "field_snapshots"})
    three.load_state_dict(old)
    assert [f["step"] for f in three.fields] == [1, 5, 9]
    assert all(same_snapshot(a, b) for a, b in zip(three.fields, all_kept.fields[::4]))
    _, four = run(4, steps=2)
    with pytest.raises(ValueError, match="field_snapshots"):
        four.load_state_dict(three.state_dict())


def test_the_estimate_counts_the_most_snapshots_kept():
    """The analyzer's state held from step to step (``analysis_state``) counts ``field_snapshots`` whole snapshots
    (``analysis_history_per_evaluation`` bytes each: the newest kept is not always the last evaluation's, whose
    field, x and w are the probe state's); "all" counts the last one's change alone (6 probes of 2 values)."""
    held = {}
    for keep in (1, 5, "all"):
        G, D = _pair()
        analyzer = GANKernelAnalyzer(G, D, _probes(), grouping="direction", num_groups=2, controls=0, window=2,
                                     eval_every=1, field_snapshots=keep)
        record = analyzer.analysis_pass_cost(batch=8)
        held[keep] = record["held"]
        per_evaluation = record["settings"]["analysis_history_per_evaluation"]
    assert per_evaluation > 0
    assert held[5] - held[1] == 4 * per_evaluation
    assert held[1] - held["all"] == per_evaluation - 8 * 6 * 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "some", None])
def test_a_bad_field_snapshots_is_refused(bad):
    G, D = _pair()
    with pytest.raises(ValueError, match="field_snapshots must be a positive int .* or 'all'"):
        GANKernelAnalyzer(G, D, _probes(), field_snapshots=bad)
