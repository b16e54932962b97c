"""GANKernelAnalyzer(field_snapshots=...) through GANTrainer's checkpoints, and its estimate of what it keeps between
steps against the live bytes over several thinnings.

coverage (both pass before): a second read of the snapshot thinning found no fault here; these pin what was checked."""

from __future__ import annotations

import torch

from genkernel import OptimizerStep
from genkernel.gan import GANKernelAnalyzer, GANTrainer, GeneratorLoss, frozen
from genkernel.gan.configs import dcgan64_discriminator, dcgan64_generator
from test_cost_listener import tensor_bytes
from test_gan import _pair, _probes, _ring, ring_mode_centers

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(iterations, keep, checkpoint_dir=None, checkpoint_every=0, resume=False):
    data, modes = _ring(dtype=torch.float32)
    G, D = _pair(dtype=torch.float32, sn=True, hidden=16)
    analyzer = GANKernelAnalyzer(G, D, _probes(8, dtype=torch.float32), grouping="direction", num_groups=3, window=2,
                                 eval_every=1, mode_centers=ring_mode_centers(8, 2.0), mode_std=0.05,
                                 field_snapshots=keep)
    trainer = GANTrainer(G, D, data, labels=modes, batch_size=16, callbacks=[analyzer], seed=3,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    trainer.train(iterations, resume=resume)
    return trainer, analyzer


def test_a_trainer_checkpoint_resume_keeps_the_straight_runs_snapshots(tmp_path):
    """coverage: passes before. 8 iterations with field_snapshots=3 straight, and 6 then resumed from GANTrainer's
    checkpoint at 6 (kept then: evaluations 0, 2, 4) to 8: the kept snapshots are the straight run's (evaluations 0
    and 4, steps 1 and 5), bit for bit, and so are the alignment rows and the generator."""
    straight_trainer, straight = _trained(8, 3)
    _trained(6, 3, tmp_path, 6)
    resumed_trainer, resumed = _trained(8, 3, tmp_path, resume=True)
    assert [f["step"] for f in resumed.fields] == [f["step"] for f in straight.fields] == [1, 5]
    for a, b in zip(resumed.fields, straight.fields):
        assert all(torch.equal(a[k], b[k]) for k in ("x", "w", "field", "change"))
    assert repr(resumed.alignment) == repr(straight.alignment)  # (NaN-safe)
    for a, b in zip(straight_trainer.generator.parameters(), resumed_trainer.generator.parameters()):
        assert torch.equal(a, b)


def test_what_the_analyzer_keeps_stays_within_its_estimate_over_thinnings():
    """coverage: passes before. A 64x64 DCGAN G (ngf = 4, 6 probes), an evaluation every step, field_snapshots=4:
    after each of 6 steps (kept: 1, 2, 3, 4 snapshots, then 0, 2, 4 and 0, 2, 4 again) the bytes the analyzer keeps
    (window-start ledgers, probe state, f_end and drift, the snapshots) are at most its ``analysis_state``, and at
    the most (4 kept) short of it by the newest snapshot's field, x and w alone, which the probe state's share.
    Measured: 17.3 of 18.9 MB at the most (0.917)."""
    G, D = dcgan64_generator(nz=8, ngf=4, seed=0), dcgan64_discriminator(ndf=4, seed=1)
    probes = torch.randn(6, 8, 1, 1, generator=torch.Generator().manual_seed(7))
    a = GANKernelAnalyzer(G, D, probes, num_groups=2, window=2, eval_every=1, track_discriminator=False, controls=0,
                          field_snapshots=4)
    opt = torch.optim.Adam(G.parameters(), 1e-3)
    draws = torch.Generator().manual_seed(3)
    kept, steps = [], []
    for _ in range(6):
        z = torch.randn(4, 8, 1, 1, generator=draws)
        with frozen(D):
            a.perform(OptimizerStep(G, opt, GeneratorLoss(D, output="probability"), z, phase="generator"))
        kept.append(tensor_bytes(a._window_start, a._probe_state["field"], a._probe_state["x"], a._probe_state["w"],
                                 a._g_f_prev, a._g_drift_prev, a.fields))
        steps.append([f["step"] for f in a.fields])
    assert steps[3] == [1, 2, 3, 4] and steps[4] == steps[5] == [1, 3, 5]
    estimate = a.cost.memory["analysis_state"]
    m, d = probes.shape[0], 3 * 64 * 64
    shared = m * d * (8 + 4 + 4)  # the newest snapshot's field (float64), x and w (float32): the probe state's
    assert max(kept) <= estimate
    assert kept[3] == estimate - shared, (kept, estimate)
