"""A second read of session 43's commits (helper "read43"): what they left unpinned or slightly wrong.

- ``CallbackStates.load`` put ``resuming_trainer`` back to None, not to what it was: a load nested in a callback's
  ``load_state_dict`` cleared the outer load's trainer, and the callbacks claimed after it compared their states
  with no trainer (the EMA ledger unchecked);
- the GAN analyzer's ``seed``, which its saved config now records, was written as given: a NumPy integer, which
  the constructor accepts, made the whole state one the safe loader refuses (no resume at all);
- a level whose own band holds every bin said so without saying which band reads it;
- ``reference.RootSumSquares`` (the scale-safe norms of the engines' repeat, row, covering and vmap checks) had no
  test of its own: its rescaling, the arithmetic that makes it scale-safe, could be wrong unnoticed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# resuming_trainer: told for one load alone, put back as it was
# ------------------------------------------------------------------------------------------
def _told(name: str, inner: list | None = None, refuse: bool = False):
    """A callback that compares its state with the resuming trainer: records what it was told at its load."""
    from genkernel.core.tracking.callbacks import TrainerCallback

    class Told(TrainerCallback):
        def __init__(self) -> None:
            self.name, self.resuming_trainer, self.seen = name, None, []
            self.inner, self.refuse = inner, refuse

        def state_dict(self):
            return {"name": self.name}

        def load_state_dict(self, state) -> None:
            from genkernel.core.tracking.callbacks import CallbackStates

            if self.inner is not None:  # (a composite callback that restores callbacks of its own)
                CallbackStates().load(self.inner, {c.state_key: {} for c in self.inner}, trainer=self.resuming_trainer)
            self.seen.append(self.resuming_trainer)
            if self.refuse:
                raise ValueError("other settings")

    return Told()


def test_a_load_nested_in_a_callbacks_load_leaves_the_outer_trainer_told_and_every_load_puts_the_value_back():
    """Outer load of [composite, later] whose composite's own load restores [later] (a nested load with the same
    trainer): ``later``, loaded again by the outer load after the nested one, is still told the trainer; after the
    loads, a refused one among them, every callback holds what it held before (None, or a value of its own), and a
    callback without the attribute is given none.

    Fails on the old code: the nested load reset ``later.resuming_trainer`` to None, so the outer load's claim of
    ``later`` saw None (its comparisons with the trainer skipped), and a callback's own value was overwritten."""
    from genkernel.core.tracking.callbacks import CallbackStates

    trainer = object()
    later = _told("later")
    composite = _told("composite", inner=[later])
    plain = type("Plain", (), {"load_state_dict": lambda self, state: None})()  # (keyed by its class name)
    CallbackStates().load([composite, later, plain], {"composite": {}, "later": {}, "Plain": {}}, trainer=trainer)
    assert composite.seen == [trainer] and later.seen == [trainer, trainer]
    assert composite.resuming_trainer is None and later.resuming_trainer is None
    assert not hasattr(plain, "resuming_trainer")

    own = object()  # a value of the callback's own (a trainer told by an outer load still running)
    refusing = _told("refusing", refuse=True)
    refusing.resuming_trainer = own
    with pytest.raises(ValueError, match="other settings"):
        CallbackStates().load([refusing], {"refusing": {}}, trainer=trainer)
    assert refusing.seen == [trainer] and refusing.resuming_trainer is own


# ------------------------------------------------------------------------------------------
# settings written into a saved state: plain Python numbers
# ------------------------------------------------------------------------------------------
def test_a_gan_analyzer_seeded_with_a_numpy_integer_saves_a_state_the_safe_loader_reads(tmp_path):
    """A GANKernelAnalyzer with ``mode_centers`` and ``seed=np.int64(3)`` (accepted: any integral seed): its saved
    state loads (``load_state``, weights_only), its config's seed is the int 3, and an analyzer built with
    ``seed=3`` takes it.

    Fails on the old code: the seed was kept as given, the saved config held a NumPy scalar, and ``load_state``
    refused the file ("not a genkernel state file: the safe (weights_only) loader refused it")."""
    from genkernel.core.tracking.io import load_state
    from genkernel.gan import GANKernelAnalyzer, MLPDiscriminator, MLPGenerator

    def analyzer(seed):
        torch.manual_seed(0)
        generator = MLPGenerator(2, 2, hidden=8, depth=2).double()
        discriminator = MLPDiscriminator(2, hidden=8, depth=2).double()
        probes = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
        centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], dtype=F64)
        return GANKernelAnalyzer(generator, discriminator, probes, num_groups=3, window=2, eval_every=1,
                                 mode_centers=centers, mode_std=0.5, seed=seed)

    analyzer(np.int64(3)).save(tmp_path / "gan.pt")
    state = load_state(tmp_path / "gan.pt")
    assert type(state["config"]["seed"]) is int and state["config"]["seed"] == 3
    analyzer(3).load_state_dict(state)


# ------------------------------------------------------------------------------------------
# band_locality: a covering level's why names the band that reads it
# ------------------------------------------------------------------------------------------
def test_a_levels_covering_band_is_refused_naming_the_widest_band_that_reads_it():
    """Five bins, band 2, a level in each bin: the middle level's band (bins 0..4) holds all five, the others' do
    not. Its per-level entries are not held, and the why names the widest band that leaves a bin outside it
    (band <= 1: bins 1..3); the overall claim and the other levels carry no such why. One bin: no band reads a
    level, and the why says num_bins >= 2.

    Fails on the old code: the why named no fix (the project's rule: a message names the problem and the fix)."""
    from genkernel.core import grouping

    def run(num_groups, band):
        g = torch.Generator().manual_seed(0)
        measured = torch.rand(num_groups, num_groups, dtype=F64, generator=g)
        controls = [torch.rand(num_groups, num_groups, dtype=F64, generator=g) for _ in range(4)]
        return grouping.band_locality(measured, measured, controls, controls, torch.arange(num_groups), band,
                                      num_groups, torch.arange(num_groups),
                                      [(float(i), i) for i in range(num_groups)])

    out = run(5, 2)
    assert "why" not in out["traffic"] and "why" not in out["share"]
    for i, entry in enumerate(out["per_level"]):
        for key in ("traffic", "share"):
            if i == 2:
                assert entry[key]["held"] is False
                assert "holds all 5 bins" in entry[key]["why"] and "pass band <= 1 to read this level" in entry[key]["why"]
            else:
                assert "holds all" not in entry[key].get("why", "")
    one = run(1, 0)["per_level"][0]["traffic"]
    assert one["held"] is False and "pass num_bins >= 2" in one["why"]
    # the predicate itself, against a brute-force count of the bins outside each band
    for groups, band in ((7, 0), (7, 3), (7, 6), (2, 1), (1, 0)):
        covers = grouping.band_covers(torch.arange(groups), band, groups)
        outside = [sum(abs(b - g) > band for b in range(groups)) for g in range(groups)]
        assert covers.tolist() == [n == 0 for n in outside]


# ------------------------------------------------------------------------------------------
# RootSumSquares against a norm formed apart from it
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["rising", "falling", "mixed"])
def test_root_sum_squares_is_the_norm_of_entries_of_any_magnitude_added_in_any_order(order):
    """Tensors of entries at 1e-300, 4e-300, 1e-160, 1, 3, 1e160, 1e300 and 2e300 (past where float64 squares
    overflow or underflow), each added as ``scaled_alike`` gives it (divided by its largest magnitude, ``times`` that
    magnitude) or as it is, in rising, falling and mixed order: ``in_common_scale`` times the scale is their joint
    norm, math.hypot of every entry (Python's, exact to rounding at any magnitude), to 1e-12; two such norms
    compare as their exact values do, and all-zero tensors add nothing.

    Coverage: pins the scale-safe norm the session's engine checks rest on; faults injected into its rescaling
    (the old sum scaled by the ratio of scales unsquared, in either branch, or ``times`` ignored) all passed the
    session's own tests and fail here."""
    from genkernel.core.engine.reference import RootSumSquares, in_common_scale, scaled_alike

    g = torch.Generator().manual_seed(0)
    # (pairs of near magnitudes: the rescaling of a sum by a ratio of scales near 1 is what a wrong power shows)
    magnitudes = [1e-300, 4e-300, 1e-160, 1.0, 3.0, 1e160, 1e300, 2e300]
    if order == "falling":
        magnitudes = magnitudes[::-1]
    elif order == "mixed":
        magnitudes = [1.0, 2e300, 3.0, 1e-300, 1e300, 1e160, 4e-300, 1e-160]
    tensors = [torch.randn(7, generator=g, dtype=F64) * m for m in magnitudes]
    for drop in (None, 2e300):  # all, and without the largest
        norm, half = RootSumSquares(), RootSumSquares()
        kept = [t for t, m in zip(tensors, magnitudes) if m != drop]
        for k, t in enumerate(kept):
            (scaled,), scale = scaled_alike(t)
            norm.add(scaled, scale) if k % 2 == 0 else norm.add(t)
            half.add(t / 2)
        norm.add(torch.zeros(3, dtype=F64))
        (value, halved), scale = in_common_scale(norm, half)
        exact = math.hypot(*[float(v) for t in kept for v in t])
        assert math.isfinite(value * scale) and value * scale == pytest.approx(exact, rel=1e-12)
        assert halved == pytest.approx(value / 2, rel=1e-12)
    empty = RootSumSquares()
    empty.add(torch.zeros(4, dtype=F64))
    assert in_common_scale(empty) == ([0.0], 1.0)


# ------------------------------------------------------------------------------------------
# kernel_plan(x1, x2): the joined pairs of chunks made one size at a time
# ------------------------------------------------------------------------------------------
def test_the_plan_of_a_pair_kernel_joins_one_pair_of_chunks_per_size_not_every_pair(float64, monkeypatch):
    """kernel_plan(model, x1, x2) of 60 × 60 examples at budgets whose chunks are 1 to 3 rows: the row check runs
    on one joined pair of chunks per batch size (the factored kernel's captures of two chunks joined), so at most
    as many pairs are joined (torch.cat of a chunk of x1 and one of x2) as there are sizes, and the plan is the
    same "factored" one.

    Fails on the old code: every pair of chunks was joined and held at once before the check skipped all but the
    first of each size: 3600 joined copies at 1 row a chunk (M·N/rows² of them: for 10⁴ × 10⁴ images
    in chunks of 64, some 24 000 batches of 128 images held at once by a plan)."""
    from torch import nn

    from genkernel.core.engine.kernels import kernel_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x1, x2 = torch.randn(60, 3), torch.randn(60, 3)
    joined, cat = [0], torch.cat

    def counted(tensors, *args, **kwargs):
        if len(tensors) == 2 and getattr(tensors[0], "_base", None) is x1 and getattr(tensors[1], "_base", None) is x2:
            joined[0] += 1
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", counted)
    for budget in (2**10, 2**12):
        joined[0] = 0
        plan = kernel_plan(model, x1, x2, memory_budget=budget)
        assert plan.engine == "factored" and plan.rows <= 3  # (20 chunks a side or more: 400 pairs or more)
        assert 1 <= joined[0] <= 3


# ------------------------------------------------------------------------------------------
# figures: the colour ranges the session's figure fix set, pinned
# ------------------------------------------------------------------------------------------
def test_edge_matrices_get_an_honest_colour_scale_and_bar_and_an_inverted_range_names_both_ends_in_full():
    """The diffusion figures' sequential heat map given no ``vmax`` (the overview's traffic panel) draws an
    all-zero traffic matrix on the scale 0..1 (colour_limit's), zeros at the map's bottom, not on a scale reaching
    below 0; a normalized kernel whose entries are a rounding above 1 (1 + 4e-16, vmax 1, its range from the data)
    is drawn, at the map's middle, not refused as an inverted range; the GAN coupling map's colour bar says "grey:
    no value" beside its label where an entry is missing, and only there; an inverted range whose ends are a
    rounding apart is refused naming both in full.

    Fails on the old code in its last part (the message read "[1, 1] is inverted": the ends at 6 digits). The rest
    is coverage: it pins three lines of the session's figure fix that its tests left unpinned (with ``vmax`` left to
    matplotlib's autoscale, the data's low end not capped at ``vmax``, or the coupling map's bar without the note,
    tests/test_figs43.py still passed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genkernel.plotting.diffusion import _heat
    from genkernel.plotting.figures import _kernel_image

    fig, (left, right) = plt.subplots(1, 2)
    try:
        _heat(left, np.zeros((2, 3)), [1.0, 9.0], "traffic")
        assert left.images[0].get_clim() == (0.0, 1.0)
        assert float(left.images[0].norm(0.0)) == 0.0
        image = _kernel_image(right, np.full((3, 3), 1.0 + 4e-16), "rounding", vmin=None, vmax=1.0)
        low, high = image.get_clim()
        assert low < 1.0 < high and float(image.norm(1.0)) == pytest.approx(0.5)
    finally:
        plt.close(fig)
    # the GAN coupling map's colour bar names the grey where an entry is missing, beside its own label
    from genkernel.plotting.gan import plot_coupling

    fig, (full, missing) = plt.subplots(1, 2)
    try:
        plot_coupling(full, np.eye(2), title="full", colorbar="share")
        plot_coupling(missing, [[1.0, None], [0.0, 1.0]], title="missing", colorbar="share")
        labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert labels == ["share", "share; grey: no value"]
    finally:
        plt.close(fig)
    # an inverted range a rounding apart is named with both ends in full
    from genkernel.plotting.arrays import colour_range

    with pytest.raises(ValueError, match=r"\[1\.0000000000000004, 1\.0\] is inverted"):
        colour_range(1.0 + 4e-16, 1.0)
