"""Review of IterableBatches (batches.py), the dense and factored group-state routes (routes.py) and
the grouping helpers (grouping.py): resume positions, hand_back misuse, exactness against per-example
autograd, aliasing of the caller's group ids, band sums."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import DataLoader, Dataset

from genkernel import PathKernelTracker
from genkernel.core.grouping import band_locality, band_total, coarsen
from genkernel.core.tracking.batches import IterableBatches
from genkernel.supervised import mse_loss


# -- IterableBatches --------------------------------------------------------------------------
class _Augmented(Dataset):
    """Each item draws from the global RNG as it is loaded (a random augmentation)."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        return torch.tensor([float(i), float(torch.rand(()))])


def _loader(kind):
    if kind == "generator":
        return DataLoader(_Augmented(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5))
    if kind == "global":
        return DataLoader(_Augmented(), batch_size=3, shuffle=True)
    return DataLoader(_Augmented(), batch_size=3, drop_last=True)  # 2 batches an epoch


def _train(kind, steps, *, fail_at=None, save_after=None):
    """``steps`` trained batches (a step drawing from the global RNG after its batch, as dropout does); the batch
    of step ``fail_at`` is handed back once. ``save_after``: stop after that many trained batches (or "fail",
    right after the hand_back) and return the stream's state and the global RNG's."""
    torch.manual_seed(0)
    stream = IterableBatches(_loader(kind), lambda b: b)
    out, drawn = [], 0
    while len(out) < steps:
        batch = stream.next()
        torch.rand(())
        if drawn == fail_at:
            fail_at = None
            stream.hand_back(batch)
            if save_after == "fail":
                return out, stream.state_dict(), torch.get_rng_state()
        else:
            out.append(batch.clone())
            if save_after == len(out):
                return out, stream.state_dict(), torch.get_rng_state()
        drawn += 1
    return out, None, None


def _resume(kind, state, rng, steps):
    torch.manual_seed(99)  # another global stream: the state must bring it back
    stream = IterableBatches(_loader(kind), lambda b: b)
    stream.load_state_dict(state)
    torch.set_rng_state(rng)  # (the trainer restores the checkpoint's global RNG)
    out = []
    for _ in range(steps):
        out.append(stream.next().clone())
        torch.rand(())
    return out


@pytest.mark.parametrize("kind", ["generator", "global", "sequential"])
def test_a_resume_at_every_position_continues_the_uninterrupted_batches(kind):
    """Coverage: mid-epoch, at epoch boundaries and right after a hand_back, the saved-and-resumed batches
    equal an uninterrupted run's, random augmentations (global RNG) included."""
    steps = 9
    straight, _, _ = _train(kind, steps)
    for save in range(1, steps):
        before, state, rng = _train(kind, steps, save_after=save)
        after = _resume(kind, state, rng, steps - save)
        assert all(torch.equal(a, b) for a, b in zip(before + after, straight, strict=True)), (kind, save)
    for fail in range(steps - 1):
        straight_f, _, _ = _train(kind, steps, fail_at=fail)
        before, state, rng = _train(kind, steps, fail_at=fail, save_after="fail")
        after = _resume(kind, state, rng, steps - len(before))
        assert all(torch.equal(a, b) for a, b in zip(before + after, straight_f, strict=True)), (kind, fail)


def test_a_held_batch_refused_on_resume_is_passed_over_like_any_refused_batch():
    """Fails on the old code: a resume redraws the batch a failed step had handed back; when the check
    refused it there, the position still counted it as not drawn and still held (batches 1, a held state),
    so a checkpoint written next would give it once more; a refused batch is passed over (counted) as a
    straight stream counts it (batches 2, nothing held)."""
    def refuse_second(batch):
        if float(batch[0, 0]) == 3.0:
            raise ValueError("refused")
        return batch

    stream = IterableBatches(_loader("plain"), lambda b: b)
    stream.next()
    stream.hand_back(stream.next())  # a step that failed before its update
    saved = stream.state_dict()
    straight = IterableBatches(_loader("plain"), refuse_second)
    straight.next()
    with pytest.raises(ValueError, match="refused"):
        straight.next()
    resumed = IterableBatches(_loader("plain"), refuse_second)
    resumed.load_state_dict(saved)
    with pytest.raises(ValueError, match="refused"):
        resumed.next()
    for key in ("epoch", "batches", "held_global_state"):
        assert resumed.state_dict()[key] == straight.state_dict()[key], key
    assert resumed.state_dict()["batches"] == 2 and resumed.state_dict()["held_global_state"] is None
    assert resumed.next()[:, 0].tolist() == straight.next()[:, 0].tolist() == [0.0, 1.0, 2.0]  # the next epoch's first


def test_hand_back_takes_back_one_batch_once():
    """Old code: a second hand_back of one step's batch (or one before any batch) uncounted a batch that was
    trained on (batches_in_epoch went 1 -> -1) and a resume skipped one batch too few; now a ValueError."""
    stream = IterableBatches([torch.full((2, 1), float(i)) for i in range(4)], lambda b: b)
    with pytest.raises(ValueError, match="no batch is out"):
        stream.hand_back(torch.zeros(2, 1))
    assert stream.state_dict()["batches"] == 0
    stream.next()
    second = stream.next()
    stream.hand_back(second)
    with pytest.raises(ValueError, match="no batch is out"):
        stream.hand_back(second)
    assert stream.state_dict()["batches"] == 1
    assert torch.equal(stream.next(), second)  # the held batch, then the data goes on
    assert float(stream.next()[0, 0]) == 2.0
    stream.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="no batch is out"):  # a resumed stream has no batch out either
        stream.hand_back(second)


def test_a_resume_that_cannot_draw_the_held_batch_again_is_refused():
    """Old code: a checkpoint written after a hand_back, resumed on data one batch shorter, silently dropped
    the held batch and went on with the next epoch; now the same ValueError as for too few skipped batches."""
    stream = IterableBatches([torch.full((2, 1), float(i)) for i in range(3)], lambda b: b)
    stream.next()
    stream.hand_back(stream.next())
    state = stream.state_dict()
    resumed = IterableBatches([torch.full((2, 1), float(i)) for i in range(1)], lambda b: b)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="yields only 1"):
        resumed.next()


# -- routes -----------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _brute_force(model, lrs, x, y, ids, num_groups, probes, factor):
    """``[M, G, d]`` J(x; θ_k) u_g with u_g = −η_p·factor·(1/B) Σ_{n∈g} ∇ℓ_n, from per-example autograd."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_example = vmap(grad(lambda p, xi, yi: mse_loss(functional_call(model, p, (xi[None],)), yi[None])[0]),
                       in_dims=(None, 0, 0))(params, x, y)
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))(params, probes)
    out = torch.zeros(probes.shape[0], num_groups, 2, dtype=torch.float64)
    for g in range(num_groups):
        weights = (ids == g).double() / x.shape[0]
        for n in params:
            u = -lrs[n] * factor * torch.einsum("b,b...->...", weights, per_example[n])
            out[:, g] += torch.einsum("md...,...->md", jac[n], u)
    return out


@pytest.mark.parametrize("group_state", ["dense", "factored"])
@pytest.mark.parametrize("maximize,clip", [(False, None), (True, 0.05)])
def test_route_contributions_equal_per_example_autograd(group_state, maximize, clip):
    """Coverage: two partitions (groups shared by several examples, groups not moved), two parameter groups with
    their own learning rates, maximize and clipping: every group's contribution equals J(θ_k) u_g (left rule)
    from per-example autograd to 1e-12 in float64 (measured: <= 5e-16 relative), on both routes."""
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    probes = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                                 {"params": model[2].parameters(), "lr": 0.05}], maximize=maximize)
    lrs = {"0.weight": 0.1, "0.bias": 0.1, "2.weight": 0.05, "2.bias": 0.05}
    sizes = {"a": 5, "b": 3}
    tracker = PathKernelTracker(model, optimizer, mse_loss, probes, num_groups=sizes, group_state=group_state,
                                quadrature="left", **({} if clip is None else {"max_grad_norm": clip}))
    for _ in range(2):
        x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
        ids = {"a": torch.tensor([0, 0, 3, 3, 3, 1]), "b": torch.randint(0, 3, (6,), generator=gen)}
        gradient = torch.autograd.grad(mse_loss(model(x), y).mean(), list(model.parameters()))
        norm = float(torch.sqrt(sum((g * g).sum() for g in gradient)))
        factor = (1.0 if clip is None else min(1.0, clip / (norm + 1e-6))) * (-1.0 if maximize else 1.0)
        expected = {n: _brute_force(model, lrs, x, y, ids[n], g, probes, factor) for n, g in sizes.items()}
        result = tracker.step(x, y, ids)
        for name in sizes:
            torch.testing.assert_close(result.partitions[name], expected[name], rtol=1e-12, atol=1e-15)
        assert not result.partitions["a"][:, [2, 4]].any()  # groups without examples did not move


def test_factored_step_result_does_not_alias_the_callers_group_ids():
    """Old code: on the factored route, with one example per group, the step's ``moved.columns`` was the
    caller's own ids tensor; a loop refilling that buffer before reading ``result.contributions`` (built on
    first use) got every contribution in another group: off by the whole step (0.075 on entries of 0.076)."""
    model = _mlp()
    probes = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, num_groups=6,
                                group_state="factored", quadrature="left")
    ids = torch.tensor([4, 0, 2, 1, 3, 5])
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    expected = _brute_force(model, {n: 0.1 for n, _ in model.named_parameters()}, x, y, ids, 6, probes, 1.0)
    result = tracker.step(x, y, ids)
    ids.copy_(torch.arange(6))  # the loop's buffer, refilled for the next step
    torch.testing.assert_close(result.contributions, expected, rtol=1e-12, atol=1e-15)


def test_factored_partitions_with_one_example_per_group_get_their_own_contributions():
    """Fails on the old code: two partitions that both put one example in each group were handed the same
    [M, B, d] tensor, so a caller editing one partition's contributions in place edited the other's."""
    model = _mlp()
    probes = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes,
                                num_groups={"a": 6, "b": 6}, group_state="factored", quadrature="left")
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    result = tracker.step(x, y, {"a": torch.arange(6), "b": torch.arange(6)})
    a, b = result.partitions["a"], result.partitions["b"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    kept = b.clone()
    a.zero_()  # the caller's own use of one partition's numbers
    assert torch.equal(b, kept) and bool(kept.abs().max() > 0)


# -- grouping ---------------------------------------------------------------------------------
@pytest.mark.parametrize("probe_groups", [torch.tensor([1]), torch.tensor([0, 1, 2, 5]), torch.tensor([0, -1, 2, 1]),
                                          torch.tensor([0.0, 1.5, 2.0, 1.0])])
def test_band_total_refuses_probe_groups_that_are_not_one_id_in_range_per_probe(probe_groups):
    """Old code: one id broadcast to every probe ([1, 4, 7, 10] instead of each probe's own band), an id outside
    [0, G) summed a band cut short (0 for id 5), float ids were compared as distances; now a ValueError."""
    matrix = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    with pytest.raises(ValueError, match="probe_groups"):
        band_total(matrix, probe_groups, 0)
    with pytest.raises(ValueError, match="probe_groups"):
        band_locality(matrix, matrix, [], [], probe_groups, 0, 3, torch.zeros(4, dtype=torch.long), [(0, 0)])


def test_band_total_is_the_sum_over_each_probes_band():
    """Coverage: against a loop over probes and groups."""
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    probe_groups = torch.tensor([0, 4, 2, 1, 3, 2])
    for band in range(5):
        expected = torch.tensor([sum(float(matrix[m, g]) for g in range(5) if abs(g - int(probe_groups[m])) <= band)
                                 for m in range(6)], dtype=torch.float64)
        torch.testing.assert_close(band_total(matrix, probe_groups, band), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("mapping", [torch.tensor([0.7, 1.2, 1.9]), torch.tensor([True, False, True])])
def test_coarsen_refuses_a_mapping_that_is_not_integer_ids(mapping):
    """Old code: a float mapping was cast to long, [0.7, 1.2, 1.9] -> [0, 1, 1], summing the groups into other
    coarse groups than the caller meant without a word; a bool mask was read as ids 0/1. Now a ValueError;
    integer mappings (tensors of any integer dtype, lists) still sum as before."""
    contributions = torch.ones(2, 3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="integer group ids"):
        coarsen(contributions, mapping, 2)
    for ok in (torch.tensor([0, 1, 1]), [0, 1, 1], torch.tensor([0, 1, 1], dtype=torch.int32)):
        assert coarsen(contributions, ok, 2)[0, :, 0].tolist() == [1.0, 2.0]


def test_hand_back_after_a_refused_batch_or_a_failed_next_is_refused():
    """A batch the check refused, or a next() that raised, leaves no batch out: the one given before was
    trained on and is not handed back (old code: handed back, it was given and counted again)."""
    def check(batch):
        if float(batch[0, 0]) == 1.0:
            raise TypeError("refused")
        return batch

    stream = IterableBatches([torch.full((2, 1), float(i)) for i in range(3)], check)
    first = stream.next()
    with pytest.raises(TypeError, match="refused"):
        stream.next()
    with pytest.raises(ValueError, match="no batch is out"):
        stream.hand_back(first)
    assert stream.state_dict()["batches"] == 2  # the refused batch is passed over, as documented
    assert float(stream.next()[0, 0]) == 2.0
