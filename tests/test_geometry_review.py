"""Review tests of genkernel.gan.geometry: ids are whole numbers, fits are finite and fill every group,
assignments are per example (independent of the batch around them), and bad input fails clearly."""

import numpy as np
import pytest
import torch

from genkernel.gan.geometry import (
    ClassGroups,
    ConfidenceGroups,
    DirectionGroups,
    FunctionGroups,
    LatentKMeansGroups,
    MagnitudeGroups,
    ModeGroups,
    NearestModeGroups,
    make_grouping,
)

F64 = torch.float64


def _batch(n=16, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=F64, generator=g)


# -- ids -------------------------------------------------------------------------------------------

def test_fractional_float_ids_are_refused_not_truncated():
    z = _batch(4)
    fractional = FunctionGroups(lambda z, x, w, s: torch.tensor([0.7, 1.9, 0.2, 1.5]), 2)
    with pytest.raises(TypeError, match="non-integer values.*LongTensor"):
        fractional(z, z, z, z[:, 0])
    nan = FunctionGroups(lambda z, x, w, s: torch.full((4,), float("nan")), 2)
    with pytest.raises(TypeError, match="non-integer values"):
        nan(z, z, z, z[:, 0])


def test_whole_float_bool_and_numpy_ids_pass_as_long():
    z = _batch(4)
    for raw in (torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([False, True, True, False]),
                np.array([0, 1, 1, 0], dtype=np.int32), [0, 1, 1, 0]):
        ids = FunctionGroups(lambda z, x, w, s, raw=raw: raw, 2)(z, z, z, z[:, 0])
        assert ids.dtype == torch.long and ids.device.type == "cpu" and ids.tolist() == [0, 1, 1, 0]


def test_non_tensor_ids_raise_type_error():
    z = _batch(4)
    with pytest.raises(TypeError, match="LongTensor"):
        FunctionGroups(lambda z, x, w, s: None, 2)(z, z, z, z[:, 0])


def test_out_of_range_and_wrong_length_ids_name_the_fix():
    z = _batch(4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\).*num_groups"):
        FunctionGroups(lambda z, x, w, s: torch.tensor([0, -1, 1, 0]), 2)(z, z, z, z[:, 0])
    with pytest.raises(ValueError, match="3 group ids for 4 latents.*one id per example"):
        FunctionGroups(lambda z, x, w, s: torch.tensor([0, 1, 1]), 2)(z, z, z, z[:, 0])


def test_grouping_class_instead_of_instance_is_refused():
    with pytest.raises(TypeError, match="pass an instance"):
        make_grouping(DirectionGroups)
    with pytest.raises(TypeError, match="pass an instance"):
        FunctionGroups(MagnitudeGroups, 2)


# -- batch independence ----------------------------------------------------------------------------

def test_nearest_assignment_does_not_depend_on_the_batch_around_a_point():
    # Points nearly equidistant from two far-off centres: torch.cdist's matrix-product shortcut (taken
    # above 25 rows) rounds |x|^2 + |c|^2 - 2 x.c and moves such near-ties with the batch's size.
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[1000.0, 0.0], [1000.0, 1e-6]], dtype=F64)
    nm = NearestModeGroups(centers)
    near = torch.stack([1000.0 + torch.randn(200, dtype=F64, generator=g),
                        5e-7 + 1e-12 * torch.randn(200, dtype=F64, generator=g)], dim=1)
    alone = torch.cat([nm(p[None], p[None], p[None], p[None, 0]) for p in near])
    batch = torch.cat([near, torch.randn(40, 2, dtype=F64, generator=g)])
    assert torch.equal(nm(batch, batch, batch, batch[:, 0])[:200], alone)
    # the same for the fitted k-means groupings (their centres moved next to the near-tie points)
    for grouping in (LatentKMeansGroups(2), DirectionGroups(2)):
        grouping.fit(batch, batch, batch, batch[:, 0])
        grouping.centers = centers.clone() if isinstance(grouping, LatentKMeansGroups) else torch.tensor(
            [[1.0, 0.0], [1.0, 1e-9]], dtype=F64)
        probe = near if isinstance(grouping, LatentKMeansGroups) else torch.stack(
            [torch.ones(200, dtype=F64), near[:, 1] * 1e-3], dim=1)
        one = torch.cat([grouping(p[None], p[None], p[None], p[None, 0]) for p in probe])
        many = torch.cat([probe, torch.randn(40, 2, dtype=F64, generator=g)])
        assert torch.equal(grouping(many, many, many, many[:, 0])[:200], one)


def test_quantile_and_mode_groups_are_per_example():
    ref = _batch(32, seed=1)
    step = _batch(40, seed=2)
    centers = _batch(3, seed=3)
    for grouping in (MagnitudeGroups(4).fit(ref, ref, ref, ref[:, 0]), ConfidenceGroups(4).fit(ref, ref, ref, ref[:, 0]),
                     ModeGroups(centers)):
        whole = grouping(step, step, step, step[:, 0])
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
        assert torch.equal(grouping(step[perm], step[perm], step[perm], step[perm, 0]), whole[perm])
        assert torch.equal(grouping(step[:5], step[:5], step[:5], step[:5, 0]), whole[:5])


# -- fit -------------------------------------------------------------------------------------------

def test_tied_top_values_that_empty_a_quantile_bin_are_refused():
    # edges [1/3, 2]: bins (−inf, 1/3], (1/3, 2], (2, inf) -> the tied 2s all go to bin 1, bin 2 is empty
    v = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2], dtype=F64)
    z = _batch(8)
    with pytest.raises(ValueError, match=r"bin\(s\) \[2\] empty.*fewer groups"):
        ConfidenceGroups(3).fit(z, z, z, v)
    w = v[:, None] * torch.tensor([[1.0, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"bin\(s\) \[2\] empty"):
        MagnitudeGroups(3).fit(z, z, w, v)


def test_a_fitted_quantile_grouping_fills_every_bin_of_its_reference_batch():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        v = torch.randint(0, 6, (24,), generator=g).to(F64)  # many ties
        z = torch.zeros(24, 2, dtype=F64)
        for groups in (2, 3, 4):
            try:
                conf = ConfidenceGroups(groups).fit(z, z, z, v)
            except ValueError as error:
                assert "distinct levels" in str(error) or "empty" in str(error)
                continue
            counts = torch.bincount(conf(z, z, z, v), minlength=groups)
            assert bool((counts > 0).all()), (seed, groups, counts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reference_values_are_refused(bad):
    z = _batch(8)
    scores = z[:, 0].clone()
    scores[3] = bad
    with pytest.raises(ValueError, match="non-finite scores"):
        ConfidenceGroups(2).fit(z, z, z, scores)
    w = z.clone()
    w[5, 1] = bad
    with pytest.raises(ValueError, match="non-finite gradient norms"):
        MagnitudeGroups(2).fit(z, z, w, z[:, 0])
    with pytest.raises(ValueError, match="DirectionGroups.*non-finite gradients w"):
        DirectionGroups(2).fit(z, z, w, z[:, 0])
    with pytest.raises(ValueError, match="LatentKMeansGroups.*non-finite latents z"):
        LatentKMeansGroups(2).fit(w, z, z, z[:, 0])


def test_scores_of_the_wrong_length_are_refused_at_fit():
    z = _batch(8)
    with pytest.raises(ValueError, match="16 values for 8 examples"):
        ConfidenceGroups(2).fit(z, z, z, torch.randn(8, 2, dtype=F64))


def test_too_few_distinct_latents_name_the_fix():
    same = torch.ones(6, 3, dtype=F64)
    with pytest.raises(ValueError, match="1 distinct latents, fewer than num_groups=3.*fewer groups"):
        LatentKMeansGroups(3).fit(same, same, same, same[:, 0])


@pytest.mark.parametrize("seed", [None, 1.5, -1, True, 2 ** 32])
def test_seed_must_be_an_int(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        DirectionGroups(2, seed=seed)
    with pytest.raises(ValueError, match="seed must be an int"):
        LatentKMeansGroups(2, seed=seed)


def test_k_means_fit_is_seeded_and_leaves_global_rngs_alone():
    w = _batch(40, 3, seed=4)
    np.random.seed(123)
    torch.manual_seed(123)
    fits = [DirectionGroups(4, seed=7).fit(w, w, w, w[:, 0]).centers for _ in range(2)]
    fits += [LatentKMeansGroups(4, seed=7).fit(w, w, w, w[:, 0]).centers for _ in range(2)]
    assert torch.equal(fits[0], fits[1]) and torch.equal(fits[2], fits[3])
    after_np, after_torch = np.random.rand(), torch.rand(1)
    np.random.seed(123)
    torch.manual_seed(123)
    assert np.random.rand() == after_np and torch.equal(torch.rand(1), after_torch)


def test_float32_and_float64_inputs_give_the_same_groups():
    w = _batch(32, 3, seed=5).float()
    a = DirectionGroups(3).fit(w, w, w, w[:, 0])
    b = DirectionGroups(3).fit(w.double(), w.double(), w.double(), w[:, 0].double())
    assert torch.equal(a.centers, b.centers)
    assert torch.equal(a(w, w, w, w[:, 0]), b(w.double(), w.double(), w.double(), w[:, 0].double()))


def test_image_shaped_w_is_grouped_by_its_flattened_direction():
    w = _batch(24, 12, seed=6)
    flat = DirectionGroups(3).fit(w, w, w, w[:, 0])
    image = DirectionGroups(3).fit(w, w, w.view(24, 3, 2, 2), w[:, 0])
    assert torch.equal(flat.centers, image.centers)
    assert torch.equal(flat(w, w, w, w[:, 0]), image(w, w, w.view(24, 3, 2, 2), w[:, 0]))


# -- shapes ----------------------------------------------------------------------------------------

def test_assign_with_other_dimensions_than_the_fit_names_the_problem():
    ref = _batch(16, 2)
    other = _batch(16, 3)
    with pytest.raises(ValueError, match="fitted on 2-D gradients w but got 3-D"):
        DirectionGroups(2).fit(ref, ref, ref, ref[:, 0])(ref, ref, other, ref[:, 0])
    with pytest.raises(ValueError, match="fitted on 2-D latents z but got 3-D"):
        LatentKMeansGroups(2).fit(ref, ref, ref, ref[:, 0])(other, ref, ref, ref[:, 0])
    with pytest.raises(ValueError, match="2-D .*but got 3-D"):
        NearestModeGroups(ref[:3])(ref, other, ref, ref[:, 0])
    with pytest.raises(ValueError, match="gradients w 3-D"):
        ModeGroups(ref[:3])(ref, ref, other, ref[:, 0])


def test_mode_centres_are_checked_and_copied():
    with pytest.raises(ValueError, match="non-finite"):
        ModeGroups(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\[num_modes, dim\]"):
        NearestModeGroups(torch.zeros(3))
    centers = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    nm = NearestModeGroups(centers)
    x = torch.tensor([[0.9, 0.0], [-0.9, 0.0]], dtype=F64)
    before = nm(x, x, x, x[:, 0])
    centers.neg_()  # the caller reuses its tensor: the groups fixed at construction must not move
    assert torch.equal(nm(x, x, x, x[:, 0]), before) and before.tolist() == [0, 1]


# -- state -----------------------------------------------------------------------------------------

def test_load_state_dict_refuses_another_group_count_and_returns_to_cpu_float64():
    ref = _batch(32, 2, seed=8)
    four = DirectionGroups(4).fit(ref, ref, ref, ref[:, 0])
    with pytest.raises(ValueError, match=r"needs \[8, \*\].*same num_groups"):
        DirectionGroups(8).load_state_dict(four.state_dict())
    with pytest.raises(ValueError, match=r"needs \[8, \*\]"):
        LatentKMeansGroups(8).load_state_dict(LatentKMeansGroups(4).fit(ref, ref, ref, ref[:, 0]).state_dict())
    mags = MagnitudeGroups(4).fit(ref, ref, ref, ref[:, 0])
    with pytest.raises(ValueError, match=r"needs \[2\]"):
        MagnitudeGroups(3).load_state_dict(mags.state_dict())
    loaded = MagnitudeGroups(4)
    loaded.load_state_dict({"edges": mags.edges.float()})
    assert loaded.edges.dtype == F64
    again = DirectionGroups(4)
    again.load_state_dict({"centers": four.centers.clone()})
    assert torch.equal(again(ref, ref, ref, ref[:, 0]), four(ref, ref, ref, ref[:, 0]))


def test_unfitted_assign_says_fit_first():
    z = _batch(4)
    for grouping in (DirectionGroups(2), LatentKMeansGroups(2), MagnitudeGroups(2), ConfidenceGroups(2)):
        with pytest.raises(RuntimeError, match="fitted on a reference batch first"):
            grouping(z, z, z, z[:, 0])
        with pytest.raises(RuntimeError, match="fitted on a reference batch first"):
            grouping.assign(z, z, z, z[:, 0])


def test_class_groups_refuse_fractional_classes():
    z = _batch(4)
    groups = ClassGroups(3)
    assert groups(z, z, z, z[:, 0], classes=torch.tensor([2, 0, 1, 1])).tolist() == [2, 0, 1, 1]
    with pytest.raises(TypeError, match="non-integer"):
        groups(z, z, z, z[:, 0], classes=torch.tensor([0.5, 0.0, 1.0, 1.0]))


# -- degenerate batches ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [DirectionGroups, LatentKMeansGroups, MagnitudeGroups, ConfidenceGroups])
def test_an_empty_reference_batch_is_refused_clearly(cls):
    empty = torch.zeros(0, 2, dtype=F64)
    with pytest.raises(ValueError, match="0 distinct"):
        cls(2).fit(empty, empty, empty, empty[:, 0])


def test_an_empty_batch_is_assigned_no_ids():
    ref = _batch(16, 2, seed=9)
    empty = torch.zeros(0, 2, dtype=F64)
    for grouping in (DirectionGroups(2).fit(ref, ref, ref, ref[:, 0]), LatentKMeansGroups(2).fit(ref, ref, ref, ref[:, 0]),
                     MagnitudeGroups(2).fit(ref, ref, ref, ref[:, 0]), NearestModeGroups(ref[:2]), ModeGroups(ref[:2])):
        ids = grouping(empty, empty, empty, empty[:, 0])
        assert ids.dtype == torch.long and ids.shape == (0,)


def test_tied_middle_values_give_equal_edges_and_an_empty_bin():
    # 4 levels for 4 bins, but the 1s fill the middle quantiles: edges [1, 1, 1.25] -> bins (1, 1] and (1, 1.25]
    # are empty (counts [6, 0, 0, 2])
    v = torch.tensor([0, 1, 1, 1, 1, 1, 2, 3], dtype=F64)
    z = _batch(8)
    with pytest.raises(ValueError, match=r"bin\(s\) \[1, 2\] empty.*counts \[6, 0, 0, 2\]"):
        ConfidenceGroups(4).fit(z, z, z, v)


def test_nan_at_assignment_is_refused_not_put_in_a_group():
    ref = _batch(16, 2, seed=10)
    step = _batch(6, 2, seed=11)
    bad = step.clone()
    bad[2, 0] = float("nan")
    cases = [
        (DirectionGroups(2).fit(ref, ref, ref, ref[:, 0]), (step, step, bad, step[:, 0]), "gradients w"),
        (LatentKMeansGroups(2).fit(ref, ref, ref, ref[:, 0]), (bad, step, step, step[:, 0]), "latents z"),
        (MagnitudeGroups(2).fit(ref, ref, ref, ref[:, 0]), (step, step, bad, step[:, 0]), "gradient norms"),
        (ConfidenceGroups(2).fit(ref, ref, ref, ref[:, 0]), (step, step, step, bad[:, 0]), "scores"),
        (ModeGroups(ref[:3]), (step, step, bad, step[:, 0]), "gradients w"),
        (ModeGroups(ref[:3]), (step, bad, step, step[:, 0]), "samples x"),
        (NearestModeGroups(ref[:3]), (step, bad, step, step[:, 0]), "samples x"),
    ]
    for grouping, args, what in cases:
        with pytest.raises(ValueError, match=f"non-finite {what}.*1 of 6 examples \\(first \\[2\\]\\)"):
            grouping(*args)


def test_infinite_values_keep_their_order_in_quantile_bins():
    ref = _batch(16, 2, seed=12)
    conf = ConfidenceGroups(4).fit(ref, ref, ref, ref[:, 0])
    step = _batch(3, 2, seed=13)
    scores = torch.tensor([float("-inf"), 0.0, float("inf")], dtype=F64)
    ids = conf(step, step, step, scores)
    assert ids.tolist() == [0, int(torch.bucketize(torch.tensor(0.0, dtype=F64), conf.edges)), 3]


# -- the analyzer's own checks (mode centres copied; an observed geometry loss that is not finite) ---------------

from genkernel.data import ring_mode_centers  # noqa: E402
from genkernel.gan import GANKernelAnalyzer, MLPDiscriminator, MLPGenerator  # noqa: E402


def _make_analyzer(centers):
    G, D = MLPGenerator(2, 2, hidden=8), MLPDiscriminator(2, hidden=8)
    return GANKernelAnalyzer(G, D, torch.randn(4, 2), grouping="mode", mode_centers=centers, mode_std=0.05)


def test_mode_centers_are_copied_and_checked():
    centers = ring_mode_centers(4, 2.0).double()
    analyzer = _make_analyzer(centers)
    before = analyzer.mode_centers.clone()
    centers.zero_()
    assert torch.equal(analyzer.mode_centers, before)
    bad = ring_mode_centers(4, 2.0).double()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="mode_centers must be a finite"):
        _make_analyzer(bad)


def test_observed_non_finite_geometry_loss_is_a_non_finite_error():
    import torch.nn.functional as F

    from genkernel.core.errors import NonFiniteError
    from genkernel.gan import GeneratorLoss
    from test_gan_observe import B, analyzer_for, batches, nets, optimizers

    G, D = nets()
    g_opt, d_opt = optimizers(G, D)
    broken = {"on": False}
    plain = GeneratorLoss(D)

    def geometry(x):
        out = plain(x)
        return out * float("nan") if broken["on"] else out

    analyzer = analyzer_for(G, D, geometry_loss=geometry)
    analyzer.bind(g_opt, d_opt)
    for step, (real, z_d, z_g) in enumerate(batches(2)):
        broken["on"] = step == 1
        g_opt.zero_grad()
        fake = G(z_g)
        losses = F.binary_cross_entropy_with_logits(D(fake).view(-1), torch.ones(B, dtype=F64), reduction="none")
        if step == 1:
            with pytest.raises(NonFiniteError, match="non-finite geometry_loss"):
                analyzer.observe_generator(losses, z_g, fake)
            return
        analyzer.observe_generator(losses, z_g, fake)
        losses.mean().backward()
        g_opt.step()
