"""NoiseLevelAnalyzer review: DDPMTrainer(micro_batches=K) books what K = 1 books (every group_state the
analyzer allows, controls, an EMA, the report, a resume) and its cost counts the micro-batches; the
tracker's settings are refused when the analyzer is built (not at binding, after a warm-up); integer
settings are refused as floats; the kernel inputs are a copy of probe_data; locality's band, the EMA
weights and observe's group_state are checked with errors naming the fix; the noise×noise matrices and
the ledger against brute force."""

import json

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genkernel import PathKernelTracker
from genkernel.core.tracking.io import jsonable
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from genkernel.diffusion.models import MLPDenoiser

F64 = torch.float64
T = 50


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def _data(n=24):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=F64)


def _analyzer(**kw):
    settings = dict(num_bins=4, num_probes=8, controls=2, kernel_points=2, progress=False, snapshot_every=1)
    settings.update(kw)
    return NoiseLevelAnalyzer(make_scheduler(T), _data(), **settings)


def _trainer(micro_batches, callbacks=(), *, optimizer="adam", ema=True, batch_size=9, **kw):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if ema else None
    return DDPMTrainer(model, make_scheduler(T), _data(), batch_size=batch_size, micro_batches=micro_batches,
                       optimizer=optimizer, lr=1e-2, max_grad_norm=1.0, callbacks=list(callbacks), progress=False,
                       ema=average, **kw)


def _numbers(value):
    """The numbers of a report section, in order (None for NaN)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [value] if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) else []


# -- micro-batches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("group_state,optimizer,ema", [("dense", "adam", True), ("factored", "sgd", False),
                                                       ("sketched", "adam", False)])
def test_micro_batches_book_the_numbers_of_the_whole_batch(group_state, optimizer, ema):
    """Coverage: every ledger (level, two controls, the EMA's), the bin counts, step numbers and the
    report of K = 3 micro-batches equal K = 1's to rounding (float64), and each adds up exactly."""
    runs = []
    for k in (1, 3):
        analyzer = _analyzer(group_state=group_state, sketch_dim=64)
        _trainer(k, [analyzer], optimizer=optimizer, ema=ema).train(3)
        runs.append(analyzer)
    whole, micro = runs
    assert micro.tracker.group_state == group_state
    assert list(micro.ledgers) == ["level", "control_0", "control_1"]
    pairs = [(micro.ledgers[n], whole.ledgers[n]) for n in micro.ledgers]
    if ema:
        pairs += [(micro.ema_ledgers[n], whole.ema_ledgers[n]) for n in micro.ledgers]
    for ledger, reference in pairs:
        total = ledger.contributions.sum(1) + ledger.rest + ledger.sketch_error + ledger.residual
        torch.testing.assert_close(total, ledger.f_end - ledger.f_start, rtol=0, atol=1e-14)
        scale = float(reference.contributions.abs().max())
        torch.testing.assert_close(ledger.contributions, reference.contributions, rtol=0, atol=1e-11 * scale)
    assert micro.bin_counts == whole.bin_counts and micro.global_steps == whole.global_steps == [1, 2, 3]
    assert micro.step_losses == whole.step_losses == {"mse": 3}
    mine, theirs = micro.report(), whole.report()
    for key in ("matrices", "locality", "residual", "locality_over_training", "kernel", "bin_counts_total"):
        a, b = _numbers(mine[key]), _numbers(theirs[key])
        assert len(a) == len(b), key
        for x, y in zip(a, b):
            if x is None or y is None:
                # (a per-level interval around differences that are all exactly equal is NaN, and a
                # rounding's worth apart, +-1e-15: the core's measured_minus_control, not the booking)
                assert abs(x or y or 0.0) < 1e-12, key
            else:
                assert abs(x - y) < 1e-9, key


def test_a_micro_batched_run_resumes_bit_for_bit(tmp_path):
    """Coverage: K = 3, controls, an EMA and a track_steps window: a checkpoint resumed equals the run
    that went on (ledgers bit for bit, step numbers, history and kernel entries)."""
    straight = _analyzer(kernel_every=2, track_steps=(2, 5))
    run = _trainer(3, [straight], checkpoint_dir=tmp_path / "a")
    run.train(3)
    run.train(3)
    first = _analyzer(kernel_every=2, track_steps=(2, 5))
    run = _trainer(3, [first], checkpoint_dir=tmp_path / "b")
    run.train(3)
    run.save_checkpoint()
    resumed = _analyzer(kernel_every=2, track_steps=(2, 5))
    run = _trainer(3, [resumed], checkpoint_dir=tmp_path / "b")
    assert run.resume()
    run.train(3)
    for name in straight.ledgers:
        for mine, theirs in ((resumed.ledgers[name], straight.ledgers[name]),
                             (resumed.ema_ledgers[name], straight.ema_ledgers[name])):
            for attr in ("contributions", "traffic", "rest", "residual", "f_start", "f_end"):
                assert torch.equal(getattr(mine, attr), getattr(theirs, attr)), (name, attr)
    assert resumed.global_steps == straight.global_steps == [2, 3, 4, 5]
    assert [h["tracked_step"] for h in resumed.kernel_history] == [h["tracked_step"] for h in straight.kernel_history]
    for key in ("locality_over_training", "kernel", "matrices"):
        assert json.dumps(resumed.report()[key]) == json.dumps(straight.report()[key])


@pytest.mark.parametrize("window", [None, (2, 3)])
def test_the_cost_counts_the_trainers_micro_batches(window):
    """Fails on the old code: the analyzer built its tracker without the trainer's micro-batches, so its
    cost (printed at binding, in the report, and what memory_check refuses on) held the whole batch's
    activations and a read of the training pass that a micro-batched step never makes."""
    analyzer = _analyzer(group_state="factored", controls=1, track_steps=window)
    trainer = _trainer(4, [analyzer], optimizer="sgd", ema=False, batch_size=16)
    trainer.train(1 if window is None else 2)
    probes = analyzer.probes(next(trainer.model.parameters()))
    expected = {}
    for k in (1, 4):
        expected[k] = PathKernelTracker(trainer.model, trainer.optimizer, analyzer.loss_fn, probes,
                                        num_groups=analyzer.partitions, group_state="factored", batch_size=16,
                                        micro_batches=k).cost
    cost = analyzer.tracker.cost
    assert expected[4].memory["training_activations"] < expected[1].memory["training_activations"]
    assert cost.memory["training_activations"] == expected[4].memory["training_activations"]
    assert "training_records" not in cost.memory
    assert cost.work["group_gradients"] == expected[4].work["group_gradients"]
    reported = analyzer.report()["config"]["cost"]["memory_bytes"]
    assert reported["training_activations"] == expected[4].memory["training_activations"]


# -- settings refused when built -------------------------------------------------------------------
@pytest.mark.parametrize("setting,match", [
    (dict(group_state="dens"), "group_state must be one of"),
    (dict(quadrature="midpiont"), "unknown quadrature"),
    (dict(memory_budget=-1), "memory_budget must be a positive"),
    (dict(state_dtype=torch.float16), "state_dtype must be"),
    (dict(kernel_sketch="exact"), "kernel_sketch must be"),
    (dict(kernel_sketch=0), "kernel_sketch must be"),
])
def test_tracker_settings_are_refused_when_the_analyzer_is_built(setting, match):
    """Fails on the old code: these were refused when the analyzer bound (or, kernel_sketch, when it
    first recorded the kernel): with track_steps=(3, 4) after two untracked steps had trained."""
    with pytest.raises(ValueError, match=match):
        _analyzer(track_steps=(3, 4), **setting)


@pytest.mark.parametrize("setting", [dict(snapshot_every=1.5), dict(kernel_every=0.5), dict(kernel_every=None),
                                     dict(snapshot_every=True), dict(track_steps=(1.5, 3)), dict(track_steps=(1, 2.5))])
def test_step_counts_must_be_ints(setting):
    """Fails on the old code: snapshot_every=1.5 recorded every third step (none in two), kernel_every=0.5
    every step, track_steps=(1.5, 3) tracked steps 2 and 3; kernel_every=None fell over comparing."""
    with pytest.raises(ValueError, match="must be (an int|\\(first, last\\) ints)"):
        _analyzer(**setting)


def test_numpy_step_counts_are_taken():
    np = pytest.importorskip("numpy")
    analyzer = _analyzer(snapshot_every=np.int64(2), kernel_every=np.int64(0), track_steps=(np.int64(1), np.int64(2)))
    assert analyzer.snapshot_every == 2 and analyzer.track_steps == (1, 2)


# -- inputs copied ------------------------------------------------------------------------------------
def test_the_kernel_inputs_are_a_copy_of_probe_data():
    """Fails on the old code: the kernel's clean inputs were a view of probe_data's first rows (a float64
    CPU slice), so the caller scaling probe_data in place afterwards moved the kernel structure (k̂ at
    |Δbin| = 0 from 0.74 to 0.30 for ×3 here) while the probes, copied, stayed."""
    data = _data()
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), data, num_bins=4, num_probes=8, kernel_points=3, progress=False)
    reference = NoiseLevelAnalyzer(make_scheduler(T), data.clone(), num_bins=4, num_probes=8, kernel_points=3,
                                   progress=False)
    data.mul_(3)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
    mine, theirs = analyzer.kernel_structure(model), reference.kernel_structure(model)
    assert torch.equal(analyzer.kernel_clean, reference.kernel_clean)
    assert json.dumps(mine["by_distance"]) == json.dumps(theirs["by_distance"])


# -- reading errors -------------------------------------------------------------------------------------
def test_reading_settings_are_checked_and_name_the_fix():
    """Fails on the old code: locality(band=1.5) was read as band 1 and labelled 1.5, band=True fell over
    in torch; weights='ema' without an EMA ledger said 'call tracker.track_ema(ema)' (a RuntimeError)."""
    analyzer = _analyzer(controls=1)
    _trainer(1, [analyzer], ema=False).train(2)
    for band in (1.5, True, -1, "1"):
        with pytest.raises(ValueError, match="band must be a non-negative int"):
            analyzer.locality(band=band)
    assert analyzer.locality(band=1) == analyzer.locality()
    with pytest.raises(ValueError, match=r"weights='ema'.*bind\(model, optimizer, ema=.*ema_ledger='trainer'"):
        analyzer.matrices(weights="ema")
    with pytest.raises(ValueError, match="weights='ema'"):
        analyzer.locality(weights="ema")


def test_observing_with_a_per_example_group_state_names_the_analyzers_setting():
    """Fails on the old code: the error named the tracker ('build the tracker with group_state=...'), not the
    analyzer's setting."""
    analyzer = _analyzer(group_state="factored", controls=1)
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    analyzer.bind(model, optimizer)
    x, t = _data(6), torch.arange(6) * 8
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    losses = ((model(make_scheduler(T).add_noise(x, noise, t), t) - noise) ** 2).mean(dim=1)
    with pytest.raises(ValueError, match=r"NoiseLevelAnalyzer\(group_state='dense' or 'auto'\)"):
        analyzer.observe(losses, t)


# -- brute force ------------------------------------------------------------------------------------
def test_matrices_and_ledger_against_brute_force():
    """Coverage: f_start and f_end are the model's outputs at the probes before and after training; the
    matrices are the ledgers' shares averaged over each level's probes by hand (controls averaged over
    both control partitions); the level × bin ledger sums to the total over bins."""
    analyzer = _analyzer(num_probes=12)
    trainer = _trainer(2, [analyzer], ema=False)
    probes = analyzer.probes(next(trainer.model.parameters()))
    with torch.no_grad():
        before = trainer.model(*probes).detach().clone()
    trainer.train(4)
    with torch.no_grad():
        after = trainer.model(*probes)
    ledger = analyzer.ledger
    torch.testing.assert_close(ledger.f_start, before, rtol=0, atol=0)
    torch.testing.assert_close(ledger.f_end, after, rtol=0, atol=0)
    change = after - before
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    torch.testing.assert_close(total, change, rtol=0, atol=1e-15)
    assert float(ledger.residual.norm()) < 1e-3 * float(change.norm())
    levels = analyzer.levels.numel()

    def by_hand(values):  # [M, G] -> [L, G]: the mean over each level's probes
        return torch.stack([values[analyzer.probe_level == a].mean(0) for a in range(levels)])

    def shares(l):
        net = torch.einsum("mgd,md->mg", l.contributions, l.delta) / (l.delta ** 2).sum(1, keepdim=True)
        return l.traffic / l.traffic.sum(1, keepdim=True), net

    matrices = analyzer.matrices()
    traffic, net = shares(ledger)
    torch.testing.assert_close(matrices["traffic"], by_hand(traffic), rtol=0, atol=1e-15)
    torch.testing.assert_close(matrices["share"], by_hand(net), rtol=0, atol=1e-14)
    controls = [shares(analyzer.ledgers[f"control_{i}"]) for i in range(2)]
    torch.testing.assert_close(matrices["traffic_control"], (by_hand(controls[0][0]) + by_hand(controls[1][0])) / 2,
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(matrices["share_control"], (by_hand(controls[0][1]) + by_hand(controls[1][1])) / 2,
                               rtol=0, atol=1e-14)
    kappa = ledger.contributions.norm(dim=2).sum(1) / ledger.delta.norm(dim=1)
    torch.testing.assert_close(matrices["kappa"], by_hand(kappa[:, None])[:, 0], rtol=0, atol=1e-14)
    # every example of every step in one bin of the level partition and of each control
    counts = torch.tensor(analyzer.bin_counts)
    assert counts.shape == (4, 4) and (counts.sum(1) == 9).all()


def test_train_with_window_numbers_its_first_kernel_entry_with_the_trainers_step():
    """Fails on the old code: the entry recorded before the warm-up said global_step 0 whatever the trainer
    had trained (here 2 steps: it was the kernel at step 2, the window's own entry at step 3 followed)."""
    from genkernel.diffusion.analyzer import train_with_window

    trainer = _trainer(1, ema=False)
    trainer.train(2)
    analyzer = _analyzer(controls=1)
    out = train_with_window(trainer, analyzer, warmup_steps=1, window_steps=2)
    kernel = out["report"]["kernel"]
    assert [(k["tracked_step"], k["global_step"]) for k in kernel] == [(None, 2), (0, 3), (2, 5)]
    # the entry is the kernel at the trainer's step-2 weights
    again = _trainer(1, ema=False)
    again.train(2)
    assert kernel[0]["by_distance"] == jsonable(analyzer.kernel_structure(again.model)["by_distance"])


# -- a user loop's resume -----------------------------------------------------------------------------
def _loop(analyzer, model, optimizer, steps):
    scheduler, data = make_scheduler(T), _data()
    for i in steps:
        g = torch.Generator().manual_seed(100 + i)
        x = data[torch.randperm(24, generator=g)[:6]]
        noise, t = torch.randn(x.shape, generator=g, dtype=F64), torch.randint(0, T, (6,), generator=g)
        losses = ((model(scheduler.add_noise(x, noise, t), t) - noise) ** 2).mean(dim=1)
        analyzer.observe(losses, t)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _sgd_model():
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=8, depth=1, time_dim=4).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


@pytest.mark.parametrize("order", ["load_then_bind", "bind_then_load"])
def test_an_observed_plain_sgd_loop_resumes_with_the_default_group_state(order):
    """Fails on the old code: with group_state="auto" (the default) and plain SGD, observing switched the
    tracker to the dense route, and the resumed analyzer's fresh tracker resolved "auto" to "factored"
    and refused the saved state ("the saved tracker had ... group_state='dense'; this one has ...
    'factored'"): the documented loop could not be resumed. Resumed, it equals the straight run bit for bit."""
    straight = _analyzer(controls=1)
    model, optimizer = _sgd_model()
    straight.bind(model, optimizer)
    _loop(straight, model, optimizer, range(4))

    first = _analyzer(controls=1)
    model, optimizer = _sgd_model()
    first.bind(model, optimizer)
    _loop(first, model, optimizer, range(2))
    state = first.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = _analyzer(controls=1)
    model, optimizer = _sgd_model()
    model.load_state_dict(weights)
    if order == "load_then_bind":
        resumed.load_state_dict(state)
        resumed.bind(model, optimizer, start_step=2)
    else:
        resumed.bind(model, optimizer, start_step=2)
        resumed.load_state_dict(state)
    _loop(resumed, model, optimizer, range(2, 4))
    assert resumed.tracker.group_state == straight.tracker.group_state == "dense"
    for name in straight.ledgers:
        for attr in ("contributions", "traffic", "rest", "residual", "f_end"):
            assert torch.equal(getattr(resumed.ledgers[name], attr), getattr(straight.ledgers[name], attr)), attr
    assert resumed.global_steps == straight.global_steps == [1, 2, 3, 4]
    assert resumed.bin_counts == straight.bin_counts


def test_a_state_saved_after_its_window_is_read_not_extended_when_loaded_into_a_bound_analyzer():
    """Fails on the old code: bound first, then given a state saved after stop(), the analyzer went on
    observing the loop's later steps into the ledgers (3 steps, numbered [1, 2, 3], for a window of 2);
    loaded before bind it was already read only."""
    first = _analyzer(controls=1, group_state="dense")
    model, optimizer = _sgd_model()
    first.bind(model, optimizer)
    _loop(first, model, optimizer, range(2))
    first.stop()
    state = first.state_dict()
    resumed = _analyzer(controls=1, group_state="dense")
    model, optimizer = _sgd_model()
    resumed.bind(model, optimizer, start_step=2)
    resumed.load_state_dict(state)
    assert resumed.stopped
    with pytest.raises(RuntimeError, match="stopped"):
        _loop(resumed, model, optimizer, [2])
    assert resumed.ledger.steps == 2 and resumed.global_steps == [1, 2]
    assert torch.equal(resumed.ledger.contributions, first.ledger.contributions)


def test_the_report_names_the_loss_weighting_its_steps_minimized():
    """Under DDPMTrainer(loss_weighting="min_snr") the report said the steps trained with "mse", while
    the ledgers book (1/B) Σ w(t_n) ℓ_n; it names the weighting (and none is named without one)."""
    analyzer = _analyzer()
    _trainer(1, [analyzer], ema=False, loss_weighting="min_snr").train(2)
    assert analyzer.report()["config"]["step_losses"] == {"mse, weighted by min_snr (gamma = 5)": 2}
    plain = _analyzer()
    _trainer(1, [plain], ema=False).train(2)
    assert plain.report()["config"]["step_losses"] == {"mse": 2}


def test_a_refused_observation_draws_no_control_permutation():
    """Fails on the old code: observe() drew the control permutations before the tracker refused the
    micro-batch (here: weights of the wrong length), so a loop that caught the error and observed again
    booked other control labels than the uninterrupted run (control ledgers differ)."""
    def run(refuse_once):
        analyzer = _analyzer(controls=2)
        model, optimizer = _sgd_model()
        analyzer.bind(model, optimizer)
        scheduler, data = make_scheduler(T), _data()
        for i in range(3):
            g = torch.Generator().manual_seed(100 + i)
            x = data[torch.randperm(24, generator=g)[:6]]
            noise, t = torch.randn(x.shape, generator=g, dtype=F64), torch.randint(0, T, (6,), generator=g)
            losses = ((model(scheduler.add_noise(x, noise, t), t) - noise) ** 2).mean(dim=1)
            if refuse_once and i == 1:
                with pytest.raises(ValueError):
                    analyzer.observe(losses, t, weights=torch.full((5,), 1 / 5, dtype=F64))
            analyzer.observe(losses, t)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return analyzer

    straight, retried = run(False), run(True)
    assert len(straight.ledgers) == 3
    for name in straight.ledgers:
        for attr in ("contributions", "traffic", "rest", "residual"):
            assert torch.equal(getattr(retried.ledgers[name], attr), getattr(straight.ledgers[name], attr)), (name, attr)


def test_the_sigma_count_is_saved_with_the_analyzer():
    """Fails on the old code: the flow-matching refusal of sigmas passed as timesteps counts examples in a
    row across micro-batches, but the count was not saved: 3 before a resume and 1 after were accepted."""
    from genkernel.diffusion import make_flow_scheduler
    from test_flow_matching import flow_mlp, ring

    def analyzer_and_loop(weights=None, start_step=0):
        model = flow_mlp()
        if weights is not None:
            model.load_state_dict(weights)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        analyzer = NoiseLevelAnalyzer(make_flow_scheduler(1000), ring(8), num_bins=4, num_probes=4, controls=0,
                                      kernel_points=2, progress=False)
        analyzer.bind(model, optimizer, start_step=start_step)
        return analyzer, model, optimizer

    analyzer, model, optimizer = analyzer_and_loop()
    sigmas = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=F64)
    losses = (model(ring(3), sigmas[:3]) ** 2).mean(dim=1)
    analyzer.observe(losses, sigmas[:3])
    losses.mean().backward()
    optimizer.step()
    state = analyzer.state_dict()
    assert state["sigma_like"] == 3
    resumed, model, optimizer = analyzer_and_loop(model.state_dict(), start_step=1)
    resumed.load_state_dict(state)
    losses = (model(ring(1), sigmas[3:]) ** 2).mean(dim=1)
    with pytest.raises(ValueError, match="look like sigmas"):
        resumed.observe(losses, sigmas[3:])


def test_an_observed_loops_step_numbers_count_the_steps_a_gradscaler_skipped():
    """A float32 loop observed by the analyzer whose second step a GradScaler skips (its scaled gradient
    overflows): the ledger books the three steps taken and numbers them 1, 3, 4, as the loop (accelerate's
    global_step, Lightning's) counts its steps; before, 1, 2, 3, one behind the loop from the skip on."""
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = make_scheduler(T)
    analyzer = NoiseLevelAnalyzer(scheduler, _data().float(), num_bins=4, num_probes=8, controls=0, kernel_points=2,
                                  progress=False)
    analyzer.bind(model, optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    g = torch.Generator().manual_seed(1)
    for k in range(4):
        x0 = _data().float()[:8]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (8,), generator=g)
        losses = ((model(scheduler.add_noise(x0, noise, t), t) - noise) ** 2).mean(dim=1)
        analyzer.observe(losses, t)
        optimizer.zero_grad()
        scaler.scale(losses.mean() * (1e38 if k == 1 else 1.0)).backward()  # step 2's scaled gradient overflows
        scaler.step(optimizer)
        scaler.update()
    assert analyzer.tracker.skipped_steps == [{"after_step": 1, "micro_batches": 1}]
    assert analyzer.ledger.steps == 3 and analyzer.global_steps == [1, 3, 4]
