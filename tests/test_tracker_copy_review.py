"""Review of copy.deepcopy of a tracker (076caf1): what the tracker reaches through closures (an EMA
ledger's readers, an analyzer's cost follower) must be copied with it, or the copy follows the
original's EMA (a silently different EMA ledger) and keeps the original run alive; and the copy
records on exactly as an uncopied run across the tracker's settings."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel import PathKernelTracker

F64 = torch.float64


def _loss(out, target):
    return ((out - target) ** 2).sum(dim=1)


def _setup(dtype=F64, optimizer="adam", **settings):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    elif optimizer == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    settings.setdefault("num_groups", 3)
    tracker = PathKernelTracker(model, opt, _loss, torch.randn(5, 3, dtype=dtype), **settings)
    return model, opt, tracker


def _batches(count, dtype=F64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=g).to(dtype), torch.randn(6, 2, generator=g).to(dtype), torch.arange(6) % 3)
            for _ in range(count)]


def _groups(ids, num_groups):
    return {name: ids % size for name, size in num_groups.items()} if isinstance(num_groups, dict) else ids


def _owned_step(model, opt, tracker, batch, num_groups, micro):
    x, y, ids = batch
    tracker.step(x, y, _groups(ids, num_groups))


def _observed_step(model, opt, tracker, batch, num_groups, micro):
    x, y, ids = batch
    opt.zero_grad()
    size = x.shape[0] // micro
    for i in range(micro):  # gradient accumulation: several observed micro-batches, one step
        part = slice(i * size, (i + 1) * size)
        losses = _loss(model(x[part]), y[part])
        tracker.observe(losses, _groups(ids[part], num_groups))
        (losses.mean() / micro).backward()
    opt.step()


def _same_ledgers(a, b):
    if a.ledgers.keys() != b.ledgers.keys():
        return False
    for name in a.ledgers:
        la, lb = a.ledgers[name], b.ledgers[name]
        if not (la.steps == lb.steps and torch.equal(la.contributions, lb.contributions)
                and torch.equal(la.residual, lb.residual) and len(la.history) == len(lb.history)):
            return False
        for sa, sb in zip(la.history, lb.history):
            if sa.keys() != sb.keys() or not all(
                    torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa):
                return False
    return True


CASES = {
    "sketched_float32": ("owned", dict(group_state="sketched", sketch_dim=16, sketch_seed=3), torch.float32, "adam", 1),
    "factored": ("owned", dict(group_state="factored"), F64, "plain", 1),
    "snapshots": ("owned", dict(snapshot_every=2), F64, "adam", 1),
    "gauss3": ("owned", dict(quadrature="gauss3"), F64, "adam", 1),
    "observed_controls": ("observed", dict(num_groups={"a": 3, "b": 2}), F64, "adam", 1),
    "observed_float32": ("observed", dict(snapshot_every=2), torch.float32, "adam", 1),
    "observed_accumulation": ("observed", dict(), F64, "momentum", 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_coverage_a_copy_made_between_steps_records_on_as_an_uncopied_run(case):
    """Coverage (passes before this review's patches): for each setting, a copy of (model, optimizer, tracker)
    made after three steps and stepped before the original on three more batches keeps ledgers (every partition,
    every snapshot) and parameters bit for bit equal to a run never copied, and so does the original."""
    mode, settings, dtype, optimizer, micro = CASES[case]
    step = _observed_step if mode == "observed" else _owned_step
    num_groups = settings.get("num_groups", 3)
    batches = _batches(6, dtype)
    model, opt, tracker = _setup(dtype, optimizer, **settings)
    ref_model, ref_opt, reference = _setup(dtype, optimizer, **settings)
    for batch in batches[:3]:
        step(model, opt, tracker, batch, num_groups, micro)
        step(ref_model, ref_opt, reference, batch, num_groups, micro)
    model2, opt2, tracker2 = copy.deepcopy((model, opt, tracker))
    for batch in batches[3:]:
        step(model2, opt2, tracker2, batch, num_groups, micro)
        step(model, opt, tracker, batch, num_groups, micro)
        step(ref_model, ref_opt, reference, batch, num_groups, micro)
    assert reference.ledger.steps == 6
    assert _same_ledgers(tracker2, reference) and _same_ledgers(tracker, reference)
    assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), ref_model.parameters()))


def test_coverage_a_closed_tracker_copies_closed():
    """Coverage: a copy of a closed tracker installs no hooks on the copied optimizer, refuses a step as the
    original does, and keeps the original's ledger."""
    model, opt, tracker = _setup()
    batch = _batches(1)[0]
    tracker.step(*batch)
    tracker.close()
    model2, opt2, tracker2 = copy.deepcopy((model, opt, tracker))
    assert not opt2._optimizer_step_pre_hooks and not opt2._optimizer_step_post_hooks
    assert _same_ledgers(tracker, tracker2)
    errors = []
    for t in (tracker, tracker2):
        with pytest.raises(Exception) as info:
            t.step(*batch)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def _ema_step(model, tracker, ema, batch):
    tracker.step(*batch)
    ema.update_parameters(model)


def test_a_copied_tracker_s_ema_ledger_follows_the_copied_ema():
    """Fails on the old code: the EMA ledger read the EMA through a closure, which deepcopy shares, so the
    copy's EMA ledger followed the ORIGINAL's EMA: with the original stopped after the copy, the copy's EMA
    ledger stayed at 2 steps (and its contributions at the original's) while a run never copied has 4,
    without an error."""
    batches = _batches(4)
    runs = []
    for _ in range(2):
        model, opt, tracker = _setup()
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        tracker.track_ema(ema)
        runs.append((model, tracker, ema))
    (model, tracker, ema), (ref_model, reference, ref_ema) = runs
    for batch in batches[:2]:
        _ema_step(model, tracker, ema, batch)
        _ema_step(ref_model, reference, ref_ema, batch)
    model2, tracker2, ema2 = copy.deepcopy((model, tracker, ema))
    for batch in batches[2:]:  # the copy trains on; the original stops
        _ema_step(model2, tracker2, ema2, batch)
        _ema_step(ref_model, reference, ref_ema, batch)
    copied, expected = tracker2.ema_ledgers, reference.ema_ledgers
    assert expected["groups"].steps == 4
    assert copied["groups"].steps == 4
    assert torch.equal(copied["groups"].contributions, expected["groups"].contributions)
    assert torch.equal(copied["groups"].residual, expected["groups"].residual)
    assert tracker.ema_ledgers["groups"].steps == 2  # the original's: its own EMA, which stopped


def test_a_tracker_whose_ema_is_a_function_refuses_a_copy_by_name():
    """Fails on the old code, which copied it: a function (track_ema's "callable returning {name: tensor}") is
    shared by deepcopy, so the copy's EMA ledger read the original run's EMA. Here the copy, stepped alone with
    its own EMA updated, kept its EMA ledger at 1 step where a run never copied has 2, without an error."""
    model, opt, tracker = _setup()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    tracker.track_ema(lambda: dict(ema.module.named_parameters()))
    _ema_step(model, tracker, ema, _batches(1)[0])
    with pytest.raises(TypeError, match="given as a function"):
        copy.deepcopy((model, opt, ema, tracker))
    assert tracker.ema_ledgers["groups"].steps == 1  # the original records on
    _ema_step(model, tracker, ema, _batches(2)[1])
    assert tracker.ema_ledgers["groups"].steps == 2


def _ddpm(ema):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer
    from test_ddpm_trainer import ring

    scheduler = DDPMScheduler(num_train_timesteps=100)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(8, seed=2), num_bins=4, num_probes=8, controls=1, kernel_points=2,
                                  progress=False)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    trainer = DDPMTrainer(model, scheduler, ring(64), batch_size=16, lr=1e-2, progress=False, callbacks=[analyzer],
                          ema=EMAModel(model.parameters(), decay=0.9) if ema else None)
    return trainer, analyzer


def test_a_ddpm_trainer_with_an_ema_copied_mid_run_books_as_an_uncopied_run_and_holds_nothing_of_the_original():
    """Fails on the old code, twice. (1) The copy's tracker held the original analyzer through its cost follower
    (a lambda, which deepcopy shares: a copy made before its first step would check its kernel records against
    the original's estimate) and the original trainer's EMAModel through its EMA ledger's readers (closures), so
    the whole original run (model, optimizer state, ledgers, group state) stayed alive as long as the copy. (2) The copied analyzer's EMA ledger
    read the original's EMAModel: with the original dropped after the copy, 2 EMA steps against a run never
    copied's 4, no error."""
    from genkernel.diffusion import NoiseLevelAnalyzer

    trainer, analyzer = _ddpm(ema=True)
    reference, ref_analyzer = _ddpm(ema=True)
    trainer.train(2)
    reference.train(2)
    twin = copy.deepcopy(trainer)
    alive = {name: weakref.ref(obj) for name, obj in (("trainer", trainer), ("analyzer", analyzer),
             ("tracker", analyzer.tracker), ("model", trainer.model), ("ema", trainer.ema))}
    del trainer, analyzer
    gc.collect()
    assert [name for name, ref in alive.items() if ref() is not None] == []
    (twin_analyzer,) = [c for c in twin.callbacks if isinstance(c, NoiseLevelAnalyzer)]
    twin.train(2)
    reference.train(2)
    assert all(torch.equal(p, q) for p, q in zip(twin.model.parameters(), reference.model.parameters()))
    _assert_same_ema_ledgers(twin_analyzer.tracker.ema_ledgers, ref_analyzer.tracker.ema_ledgers, steps=4)


def test_a_tracker_of_a_ddp_model_refuses_a_copy_by_name(tmp_path):
    """Fails on the old code, which refused with "cannot pickle 'ProcessGroup' object" from deep inside the copy
    (not silent, but not saying why or what to do): a tracker under DistributedDataParallel meets the other ranks
    in their process group, which a copy in one process cannot join."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = PathKernelTracker(model, opt, _loss, torch.randn(4, 3, dtype=F64), num_groups=2)
        with pytest.raises(TypeError, match="DistributedDataParallel model cannot be copied"):
            copy.deepcopy((model, opt, tracker))
        with pytest.raises(TypeError, match="DistributedDataParallel model cannot be copied"):
            copy.deepcopy(tracker)
    finally:
        dist.destroy_process_group()


def test_a_gan_trainer_with_an_ema_copied_mid_run_books_the_generator_s_ema_ledger_as_an_uncopied_run():
    """Fails on the old code: the copied analyzer's generator tracker read the original trainer's EMA
    (AveragedModel) through its readers' closures: with the original dropped after the copy, its EMA ledgers
    stayed at 2 steps where a run never copied has 3, without an error."""
    from genkernel.data import ring_mode_centers
    from genkernel.gan import GANKernelAnalyzer, GANTrainer
    from test_gan import _pair, _probes, _ring

    def run():
        data, modes = _ring()
        G, D = _pair(sn=True)
        analyzer = GANKernelAnalyzer(G, D, _probes(8), grouping="mode", mode_centers=ring_mode_centers(8, 2.0),
                                     mode_std=0.05, window=3, eval_every=1, discriminator_groups="role_mode")
        trainer = GANTrainer(G, D, data, labels=modes, loss="nonsaturating", batch_size=16, lr_g=2e-3, lr_d=2e-3,
                             callbacks=[analyzer], ema=AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(0.9)))
        return trainer, analyzer

    (trainer, analyzer), (reference, ref_analyzer) = run(), run()
    trainer.train(2)
    reference.train(2)
    twin = copy.deepcopy(trainer)
    (twin_analyzer,) = [c for c in twin.callbacks if isinstance(c, GANKernelAnalyzer)]
    del trainer, analyzer
    twin.train(3)
    reference.train(3)
    assert all(torch.equal(p, q) for p, q in zip(twin.generator.parameters(), reference.generator.parameters()))
    _assert_same_ema_ledgers(twin_analyzer.g_tracker.ema_ledgers, ref_analyzer.g_tracker.ema_ledgers, steps=3)


def _assert_same_ema_ledgers(copied, expected, steps):
    """Every EMA ledger of the copy equals the uncopied run's, which booked ``steps`` steps."""
    assert expected.keys() == copied.keys() and all(expected[k].steps == steps for k in expected)
    assert all(copied[k].steps == steps and torch.equal(copied[k].contributions, expected[k].contributions)
               and torch.equal(copied[k].residual, expected[k].residual) for k in expected)
