"""Real scale: configurations people train, cost known before the run, state dtype and tracked
windows (issue 15)."""

import pytest
import torch
from torch import nn

from genkernel import PathKernelTracker
from genkernel.core.cost import estimate_cost
from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from genkernel.supervised import mse_loss

F64 = torch.float64


def test_the_configurations_have_the_published_sizes():
    from genkernel.diffusion.configs import ddpm_cifar10_unet, mnist_unet
    from genkernel.gan.configs import dcgan64_discriminator, dcgan64_generator

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(ddpm_cifar10_unet()) - 35.75e6) < 0.05e6  # DDPM CIFAR-10: 35.7M
    assert count(mnist_unet()) < 2e6
    g, d = dcgan64_generator(), dcgan64_discriminator()
    assert abs(count(g) - 3.58e6) < 0.01e6 and abs(count(d) - 2.77e6) < 0.01e6
    x = g(torch.randn(2, 100, 1, 1))
    assert x.shape == (2, 3, 64, 64) and d(x).shape == (2,)
    assert any(isinstance(m, nn.BatchNorm2d) for m in d.modules())


def _tracker(model, rows, **kwargs):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probes = torch.randn(6, 3, dtype=next(model.parameters()).dtype)
    return PathKernelTracker(model, opt, mse_loss, probes, num_groups=rows, **kwargs)


def test_the_estimate_counts_the_arrays_the_dense_route_allocates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2))
    tracker = _tracker(model, 7, group_state="dense", state_dtype=torch.float32)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    result = tracker.step(x, y, torch.arange(16) % 7)
    num = sum(p.numel() for p in model.parameters())
    memory = tracker.cost.memory
    assert memory["group_updates"] == sum(u.numel() * u.element_size() for u in result.group_updates.values()) == 9 * num * 4
    state = sum(s["exp_avg"].numel() * s["exp_avg"].element_size() for s in tracker.splitter.state.values())
    assert memory["group_state"] == 2 * state  # committed and pending while a step is checked
    assert tracker.cost.settings["state_dtype"] == "float32" and tracker.cost.ratio > 1


def test_jvp_pushes_go_in_passes_the_memory_budget_allows_and_give_the_same_contributions():
    """A vmapped JVP pass holds a parameter copy, the probes' primal and, per row, a share of the probes'
    activations (the model's own, measured at construction: core.push_memory; 1.25 a row where not measured);
    it pushes as many rows as the budget holds (at least one), and one row through a chunk of the probes when
    not even one row through all of them fits; the contributions do not depend on how rows and probes are split
    into passes, and the estimate counts one primal of all the probes per pass of rows and the pass it holds."""
    from genkernel.core.cost import PUSH_ROW_ACTIVATIONS, push_pass_bytes, push_pass_shape
    from genkernel.core.push_memory import PushMemory

    assert PUSH_ROW_ACTIVATIONS == 1.25
    assert push_pass_shape(10**6, 10, 100) == (10**6 // 1250, 10)
    assert push_pass_bytes(1000, 8, 3, 1000) == 8000 + 3 * 1250  # the parameter copy besides the budgeted rows
    assert push_pass_shape(3 * 125, 10, 100) == (1, 3)  # a row through 3 of the 10 probes
    assert push_pass_shape(99, 10, 100) == (1, 1)  # never zero rows or probes, even past the budget
    measured = PushMemory(row=0.5, primal=2.0)  # the primal once per pass, before the rows
    assert push_pass_shape(10 * 100 * (2.0 + 3 * 0.5), 10, 100, measured) == (3, 10)
    assert push_pass_bytes(1000, 8, 3, 1000, measured) == 8000 + 2000 + 3 * 500
    assert push_pass_shape(2 * 100 * 2.5, 10, 100, measured) == (1, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).to(F64)
    num = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)
    ledgers, trackers = [], []
    budgets = [256 * 2**20]
    for k in range(3):
        copy = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).to(F64)
        copy.load_state_dict(model.state_dict())
        tracker = PathKernelTracker(copy, torch.optim.Adam(copy.parameters(), lr=1e-2), mse_loss,
                                    torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=F64),
                                    num_groups=7, group_state="dense", contribution_route="jvp", memory_budget=budgets[k])
        if k == 0:  # every row in one pass; then two rows per pass; one row through 2 of the 6 probes per pass
            push, probe_bytes = tracker.route.model.push_memory, tracker.route.model.record_bytes
            assert push.row > 0 and push != PushMemory(1.25, 0.0)  # measured
            budgets += [int(6 * (push.primal + 2 * push.row) * probe_bytes) + 1,
                        int(2.5 * (push.primal + push.row) * probe_bytes)]
        for k in range(2):
            tracker.step(x, y, (torch.arange(16) + k) % 7)
        ledgers.append(tracker.ledger)
        trackers.append(tracker)
    scale = float(ledgers[0].contributions.abs().max())
    for other in ledgers[1:]:
        assert float((ledgers[0].contributions - other.contributions).abs().max()) < 1e-12 * scale
    rows = 7 + 1  # the groups and the rest
    # per pass a primal and the first layer's product with the zero input tangent torch.func puts there (96 of the
    # 160 multiply-adds of a forward); per row every weight's tangent and the second layer's input tangent (64)
    pass_work, row_work = 1 + 96 / 160, (160 + 64) / 160
    contributions = [t.cost.work["contributions"] for t in trackers]
    assert contributions[0] == pytest.approx(6 * (pass_work + row_work * rows))
    assert contributions[1] == pytest.approx(6 * (4 * pass_work + row_work * rows))  # 8 rows, 2 per pass: 4 primals
    assert contributions[2] == pytest.approx(6 * (8 * pass_work + row_work * rows))  # 8 passes, each over 3 chunks of probes
    pushes = [t.cost.memory["probe_pushes"] for t in trackers]
    assert pushes[1] == push_pass_bytes(num, 8, 2, 6 * probe_bytes, push)
    assert pushes[2] == push_pass_bytes(num, 8, 1, 2 * probe_bytes, push)
    assert pushes[2] - 8 * num <= trackers[2].memory_budget < pushes[1] - 8 * num
    assert push_pass_shape(trackers[2].memory_budget, 6, probe_bytes, push) == (1, 2)


def test_the_estimate_compares_with_the_training_batch_and_counts_tangents_through_the_layers_they_reach():
    """The bare step is the training batch's forward and backward, not the probes': B (2 + β) forwards, β the
    input gradients' share of a forward (the first layer forms none: 64 of this MLP's 160 multiply-adds a
    forward); a JVP push of R rows costs, per probe and quadrature node, one primal and the first layer's
    product with the zero input tangent torch.func materializes (96 / 160) per pass, and per row every
    weight's tangent product and the input tangents' after the first layer, 1 + β forwards (two on a deep
    model: the flop counter's count on a UNet, 1 + 2.05 R)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))
    default = _tracker(model, 5, group_state="dense", contribution_route="jvp")
    given = _tracker(model, 5, group_state="dense", contribution_route="jvp", batch_size=48, quadrature="simpson")
    per_example = 2 + 64 / 160
    assert default.cost.bare_step == pytest.approx(per_example * 6)  # 6 probes by default
    assert given.cost.bare_step == pytest.approx(per_example * 48)
    rows = 5 + 1  # the groups and the rest
    pass_work, row_work = 1 + 96 / 160, 1 + 64 / 160
    assert default.cost.work["contributions"] == pytest.approx(1 * 6 * (pass_work + row_work * rows))
    assert given.cost.work["contributions"] == pytest.approx(3 * 6 * (pass_work + row_work * rows))  # Simpson: three nodes
    assert given.cost.ratio == pytest.approx((given.cost.bare_step + sum(given.cost.work.values())) / given.cost.bare_step)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            _tracker(model, 5, batch_size=bad)


def test_float32_state_keeps_the_float64_ledger_to_float32_precision():
    ledgers = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
        tracker = _tracker(model, 3, group_state="dense", state_dtype=dtype, quadrature="simpson")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            tracker.step(torch.randn(12, 3, generator=g), torch.randn(12, 2, generator=g), torch.randint(0, 3, (12,), generator=g))
        ledgers[dtype] = tracker.ledger
        assert tracker.splitter.state["0.weight"]["exp_avg"].dtype == dtype
    a, b = ledgers[torch.float64], ledgers[torch.float32]
    torch.testing.assert_close(b.contributions, a.contributions, rtol=1e-4, atol=1e-6 * float(a.contributions.abs().max()))
    with pytest.raises(ValueError, match="float32 models"):
        _tracker(nn.Linear(3, 2).to(F64), 2, state_dtype=torch.float32)


def test_a_tracker_the_device_cannot_hold_is_refused_with_the_numbers_and_the_cheaper_options(monkeypatch):
    import genkernel.core.cost as cost

    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    # (sketch_dim=4 and 64 hidden units: on a smaller model, or with a sketch of the default 512 dimensions, the
    # sketched estimate is above the dense one's, and an option that raises the estimate is not named)
    with pytest.raises(MemoryError, match="would not fit.*GiB.*Cheaper: fewer groups.*group_state='sketched'"):
        _tracker(nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2)), 4, group_state="dense", sketch_dim=4)


def _refused_then_warned(monkeypatch, run):
    """``(fitting, warned)``: ``run()`` with the device's real free memory, then with 1000 bytes free,
    where the default memory_check refuses naming the option and memory_check="warn" builds anyway."""
    import genkernel.core.cost as cost

    fitting = run()
    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    with pytest.raises(MemoryError, match="would not fit.*memory_check='warn'"):
        run()
    with pytest.warns(ResourceWarning, match="would not fit.*Cheaper: fewer groups.*built anyway"):
        warned = run(memory_check="warn")
    return fitting, warned


def test_memory_check_warn_builds_a_tracker_the_estimate_says_will_not_fit_and_tracks_it_exactly(monkeypatch):
    """The estimate can be high (2.35x the measured peak on an H200): memory_check="warn" builds the
    tracker with the refusal's numbers as a ResourceWarning, and its ledger is the one a tracker
    that fits keeps, bit for bit. The default still refuses, now naming the option."""
    def run(**kwargs):
        torch.manual_seed(0)
        tracker = _tracker(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64), 3, group_state="dense",
                           **kwargs)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(12, 3, generator=g, dtype=F64)
            tracker.step(x, torch.randn(12, 2, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g))
        return tracker

    fitting, warned = _refused_then_warned(monkeypatch, run)
    assert not warned.cost.fits
    assert torch.equal(warned.ledger.contributions, fitting.ledger.contributions)
    assert warned.ledger.relative_residual() < 1e-6
    with pytest.raises(ValueError, match="memory_check must be one of"):
        run(memory_check="ignore")


def test_the_noise_level_analyzer_passes_memory_check_to_its_tracker(monkeypatch):
    """Refused at binding by default; memory_check="warn" trains, exactly as a fitting run."""
    scheduler = make_scheduler(100)
    data = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def run(**kwargs):
        torch.manual_seed(0)
        analyzer = NoiseLevelAnalyzer(scheduler, data, num_bins=2, num_probes=4, kernel_points=2, snapshot_every=0,
                                      progress=False, **kwargs)
        DDPMTrainer(MLPDenoiser(hidden=8, depth=2, time_dim=4).double(), scheduler, data, batch_size=8, progress=False,
                    callbacks=[analyzer]).train(2)
        return analyzer

    fitting, warned = _refused_then_warned(monkeypatch, run)
    assert torch.equal(warned.tracker.ledger.contributions, fitting.tracker.ledger.contributions)
    with pytest.raises(ValueError, match="memory_check must be one of"):
        NoiseLevelAnalyzer(scheduler, data, num_bins=2, num_probes=4, memory_check="off")


def test_the_gan_analyzer_passes_memory_check_to_both_trackers(monkeypatch):
    """Refused at the first step by default; memory_check="warn" trains both players' ledgers exactly
    as a fitting run."""
    from genkernel.gan import GANKernelAnalyzer, GANTrainer, MLPDiscriminator, MLPGenerator

    data = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def run(**kwargs):
        torch.manual_seed(0)
        g, d = MLPGenerator(2, 2, hidden=8, depth=2).to(F64), MLPDiscriminator(2, hidden=8, depth=2).to(F64)
        probes = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
        analyzer = GANKernelAnalyzer(g, d, probes, num_groups=2, window=2, eval_every=1, **kwargs)
        GANTrainer(g, d, data, batch_size=8, callbacks=[analyzer]).train(2)
        return analyzer

    fitting, warned = _refused_then_warned(monkeypatch, run)
    for player in ("g_tracker", "d_tracker"):
        assert torch.equal(getattr(warned, player).ledger.contributions, getattr(fitting, player).ledger.contributions)
    with pytest.raises(ValueError, match="memory_check must be one of"):
        run(memory_check=True)


def test_switching_to_the_dense_route_for_an_ema_is_estimated_again_and_refused(monkeypatch):
    """An "auto" tracker built on the factored route fits; an EMA ledger needs the dense route and
    its own arrays: refused with those numbers, and the tracker keeps its factored route."""
    from torch.optim.swa_utils import AveragedModel
    import genkernel.core.cost as cost

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    probes = torch.randn(4, 64)
    kwargs = dict(num_groups=16, batch_size=16)
    sizes = {}
    for group_state in ("factored", "dense"):
        t = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes,
                              group_state=group_state, **kwargs)
        sizes[group_state] = t.cost.total_bytes - t.cost.held
    free = (sizes["factored"] + sizes["dense"]) // 2
    assert sizes["factored"] < free < sizes["dense"]
    monkeypatch.setattr(cost, "available_memory", lambda device: free)
    tracker = PathKernelTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_loss, probes, **kwargs)
    assert tracker.group_state == "factored"
    with pytest.raises(MemoryError, match="ema.*Cheaper: fewer groups"):
        tracker.track_ema(AveragedModel(model))
    assert tracker.group_state == "factored" and tracker.cost.settings["group_state"] == "factored"
    assert tracker.ema is None


def test_what_the_training_step_already_holds_is_not_asked_of_the_free_memory(monkeypatch):
    """The parameters, gradients and optimizer state exist before the tracker (the device's free
    memory excludes them): the estimate counts them in the total but refuses only what is still needed."""
    import genkernel.core.cost as cost

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cost.held_bytes(model, opt, "cpu") == param_bytes  # before any step: the parameters alone
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()  # gradients and Adam's two moments now exist (its step counts are 0-dim tensors)
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert cost.held_bytes(model, opt, "cpu") == 4 * param_bytes + steps
    assert cost.held_bytes(model, opt, "meta") == 0  # another device holds none of it
    probes = (torch.randn(6, 3),)
    estimate = estimate_cost(model, opt, probes, outputs=2, rows=4, batch_size=16)
    needed = estimate.total_bytes - estimate.held
    assert estimate.held == 4 * param_bytes + steps and needed > 0
    monkeypatch.setattr(cost, "available_memory", lambda device: needed)
    assert estimate_cost(model, opt, probes, outputs=2, rows=4, batch_size=16).fits
    monkeypatch.setattr(cost, "available_memory", lambda device: needed - 1)
    refused = estimate_cost(model, opt, probes, outputs=2, rows=4, batch_size=16)
    assert not refused.fits and "already held" in refused.describe()


def test_tf32_on_a_gpu_that_rounds_with_it_is_named_for_what_it_touches():
    from genkernel.core.adapter import tf32_hazard, tf32_reason

    assert tf32_reason(False, True, True, "high") is None  # CPU, float64 or a pre-Ampere GPU
    assert tf32_reason(True, False, True, "highest") is None  # cuDNN's flag touches convolutions only
    assert "convolutions" in tf32_reason(True, True, True, "highest")
    both = tf32_reason(True, True, True, "high")
    assert "convolutions" in both and "matrix products" in both and "'high'" in both
    assert tf32_reason(True, True, False, "highest") is None
    assert tf32_hazard(nn.Conv2d(1, 2, 3)) is None  # parameters on the CPU


def test_exact_cuda_mode_sets_the_switches_trackers_check(monkeypatch):
    from genkernel import set_exact_cuda_mode
    from genkernel.core.adapter import tf32_reason

    previous = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
                torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = True, True
        torch.set_float32_matmul_precision("high")
        settings = set_exact_cuda_mode("warn")
        assert settings["cudnn_allow_tf32"] is False and settings["matmul_precision"] == "highest"
        assert settings["cudnn_benchmark"] is False and settings["deterministic"] and settings["deterministic_warn_only"]
        assert settings["cublas_workspace_config"] == ":4096:8"
        assert tf32_reason(True, True, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) is None
        with pytest.raises(ValueError, match="determinism must be one of"):
            set_exact_cuda_mode("on")
        # The default is strict: under "warn" a CUDA attention backward runs non-deterministically.
        assert set_exact_cuda_mode()["deterministic_warn_only"] is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = previous[0], previous[1]
        torch.set_float32_matmul_precision(previous[2])
        torch.use_deterministic_algorithms(previous[3], warn_only=previous[4])


def test_a_loaded_state_goes_back_beside_the_parameters():
    from genkernel.core.tracking.io import to_device

    state = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), 3)], "c": None, "d": "text"}
    moved = to_device(state, "meta")
    assert moved["a"].device.type == "meta" and moved["b"][0].device.type == "meta"
    assert isinstance(moved["b"][1], tuple) and moved["b"][1][0].device.type == "meta" and moved["b"][1][1] == 3
    assert moved["c"] is None and moved["d"] == "text" and state["a"].device.type == "cpu"


@pytest.mark.slow  # (a full-size model: the 35.7M-parameter CIFAR-10 UNet's push measure and two estimates, 46 s alone)
def test_the_cifar_unet_estimate_points_at_what_does_not_fit():
    from genkernel.core.cost import activation_elements, push_pass_bytes, push_pass_shape
    from genkernel.core.push_memory import measure_push_memory
    from genkernel.diffusion.configs import ddpm_cifar10_unet

    model = ddpm_cifar10_unet(dropout=0.0)
    probes = (torch.randn(64, 3, 32, 32), torch.randint(0, 1000, (64,)))
    one_probe = activation_elements(model, tuple(t[:1] for t in probes)) * 4
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    push = measure_push_memory(model, trained, probes, one_probe)  # (what estimate_cost measures unless given)
    assert 0.1 < push.row < 0.5  # the UNet's row holds a fraction of its activations (0.26 measured)
    estimate = estimate_cost(model, torch.optim.Adam(model.parameters()), probes, outputs=3 * 32 * 32, rows=20,
                             batch_size=128, device="cpu", push_memory=push)
    # 20 rows of float64 state, updates and gradients for 35.7M parameters: tens of GB
    assert estimate.memory["group_state"] > 10 * 2**30 and "state_dtype=torch.float32" in " ".join(estimate.cheaper)
    sketched = estimate_cost(model, torch.optim.Adam(model.parameters()), probes, outputs=3 * 32 * 32, rows=20,
                             batch_size=128, group_state="sketched", device="cpu", push_memory=push)
    # sketches shrink the group arrays; the probes' pushes are the same on both routes: one row
    # through as many probes as the default budget holds (9 of the 64, about 270 MB, and a
    # parameter copy; one row through all 64 would hold about 1.9 GB)
    num = sum(p.numel() for p in trained.values())
    rows, chunk = push_pass_shape(256 * 2**20, 64, one_probe, push)
    assert rows == 1 and 4 <= chunk < 64
    assert sketched.memory["probe_pushes"] == estimate.memory["probe_pushes"] == push_pass_bytes(num, 4, 1, chunk * one_probe,
                                                                                                 push)
    assert estimate.memory["probe_pushes"] < 2**29
    # The group arrays: the rows' state, the split update and the group gradients (not the rows' backward through the
    # training graph, nor the sketched route's held factors: neither is a group array; the first, over-counted 3-5x
    # on a UNet before, made this comparison hold while the second grew). Not 10x: the sketched route still keeps
    # the exact totals' rows in float64 (Adam's state, its pending copy and the updates: 9 parameter copies,
    # 2.6 GB here) against which it checks every step. (Measured: 2.9 GB against 22.9.)
    groups = lambda e: sum(e.memory[part] for part in ("group_state", "group_updates", "group_gradients"))  # noqa: E731
    assert groups(sketched) < groups(estimate) / 4
    # ... and, per step, the probes' side of the sketched products, [M, d, k] float64 (805 MB here,
    # held with one chunk's copy), beside every group's [M, R, d] contributions that both routes form.
    probe_side = 64 * 3 * 32 * 32 * 512 * 8
    assert sketched.memory["step_contributions"] - estimate.memory["step_contributions"] >= 2 * probe_side
    assert estimate.memory["step_contributions"] == 2 * 64 * 20 * 3 * 32 * 32 * 8
    splitter_rows = 3 * 3 * num * 8  # 3 rows (the total, the rest, the rounding) x (state, pending, updates)
    assert sketched.memory["group_state"] + sketched.memory["group_updates"] >= splitter_rows


def test_a_tracked_window_tracks_only_its_steps_and_leaves_training_unchanged():
    scheduler = make_scheduler(100)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64, 2, generator=g, dtype=F64)

    def trainer(callbacks):
        torch.manual_seed(0)
        return DDPMTrainer(MLPDenoiser(2, hidden=16, depth=2).to(F64), scheduler, data, batch_size=16, progress=False,
                           callbacks=callbacks)

    bare = trainer([])
    bare.train(8)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:16], num_bins=3, num_probes=6, kernel_points=2, track_steps=(3, 5),
                                  progress=False)
    tracked = trainer([analyzer])
    tracked.train(8)
    assert analyzer.ledger.steps == 3 and analyzer.global_steps == [3, 4, 5]
    assert all(torch.equal(p, q) for p, q in zip(bare.model.parameters(), tracked.model.parameters()))
    assert analyzer.report()["config"]["track_steps"] == [3, 5]
    assert analyzer.tracker.cost.settings["batch"] == 16  # the trainer's batch, not the 6 probes


class _RawLinear(nn.Module):
    """A weight used through F.linear: outside the covering plan's blocks (torch.func's fallback)."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs) / inputs**0.5)

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


def _small_classifier(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))
    if kind == "fallback":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.Tanh(), _RawLinear(48, 32), nn.Tanh(), nn.Linear(32, 5))
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
    "sgd, weight decay": lambda params: torch.optim.SGD(params, lr=0.05, weight_decay=1e-3),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "fallback"])
@pytest.mark.parametrize("group_state, optimizer", [("factored", "sgd"), ("factored", "sgd, weight decay"),
                                                    ("sketched", "momentum"), ("sketched", "adam")])
def test_the_factor_routes_estimates_are_the_steps_operation_counts(kind, group_state, optimizer):
    """The factored and sketched routes' predicted ratio, counted from the layers' shapes, is the
    ratio of torch's operation counts of a tracked step and a bare one, to 5 %: the probes'
    factors; factored, the cross kernels with the batch and the rest row's push under weight decay
    only; sketched, each projection by its cheaper route (Adam's preconditioner on the probes'
    side: every probe gradient formed and projected), the check's and the groups' products; a
    weight outside the blocks by torch.func (the probes' Jacobians). The first layer forms no input
    gradient in either step."""
    from recipes.benchmarks.harness import counted_flops
    from genkernel.supervised import cross_entropy_loss

    batch, probes = 32, 8
    x = torch.randn(batch * 3 + probes, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (batch * 3,), generator=torch.Generator().manual_seed(2))
    bare_model, tracked_model = _small_classifier(kind), _small_classifier(kind)
    bare_opt = OPTIMIZERS[optimizer](bare_model.parameters())
    tracker = PathKernelTracker(tracked_model, OPTIMIZERS[optimizer](tracked_model.parameters()), cross_entropy_loss,
                                x[-probes:], num_groups=batch * 3, group_state=group_state, batch_size=batch,
                                sketch_dim=64)

    def bare_step(rows):
        bare_opt.zero_grad()
        cross_entropy_loss(bare_model(x[rows]), y[rows]).mean().backward()
        bare_opt.step()

    bare_step(slice(0, batch))
    tracker.step(x[:batch], y[:batch], torch.arange(batch))  # the first steps build what later ones reuse
    rows = slice(batch, 2 * batch)
    tracked = counted_flops(lambda: tracker.step(x[rows], y[rows], torch.arange(batch, 2 * batch)))[0]
    bare = counted_flops(lambda: bare_step(rows))[0]
    work = tracker.cost.work
    assert (kind == "fallback") == bool(tracker.route.plan.fallback)
    assert work["probe_factors"] > 0
    if group_state == "factored":
        assert work["cross_kernels"] > 0 and (work["contributions"] > 0) == (optimizer == "sgd, weight decay")
    else:
        assert work["sketches"] > 0 and work["sketch_products"] > 0 and work["contributions"] > 0
    assert tracker.cost.ratio == pytest.approx(tracked / bare, rel=0.05)


def test_a_memory_cgroup_limit_caps_the_free_memory_of_the_cpu(tmp_path, monkeypatch):
    """In a container or a batch job the cgroup's limit, not the host's MemAvailable, is what the
    process may still take: its limit less its usage (cgroup v2 or v1); no limit leaves the host's."""
    import genkernel.core.cost as cost

    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert cost.cgroup_free_memory(str(tmp_path)) == 3 * 2**28
    # Page cache of files read counts as usage; its inactive part is reclaimed before a kill.
    (tmp_path / "memory.stat").write_text("anon 1000\nfile 200000000\ninactive_file 134217728\nactive_file 5\n")
    assert cost.cgroup_free_memory(str(tmp_path)) == 3 * 2**28 + 2**27
    (tmp_path / "memory.max").write_text("max\n")
    assert cost.cgroup_free_memory(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(2**31))  # over its limit: nothing left
    assert cost.cgroup_free_memory(str(v1)) == 0
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(2**29))
    (v1 / "memory" / "memory.stat").write_text(f"cache 9\ninactive_file 7\ntotal_inactive_file {2**28}\n")
    assert cost.cgroup_free_memory(str(v1)) == 2**29 + 2**28
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert cost.cgroup_free_memory(str(v1)) is None
    assert cost.cgroup_free_memory(str(tmp_path / "missing")) is None
    host = cost.available_memory("cpu")
    monkeypatch.setattr(cost, "cgroup_free_memory", lambda: 12345)
    assert cost.available_memory("cpu") == (None if host is None else 12345)


def test_the_estimate_refuses_arguments_it_cannot_estimate():
    """A direct call with a nonsense setting says which, rather than returning numbers (batch 0
    gave a ratio of 3e13; an unknown route was counted as the sketched one)."""
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = (torch.randn(4, 3),)
    ok = dict(outputs=2, rows=2)
    assert estimate_cost(model, opt, probes, **ok).fits in (True, False)
    bad = [
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(batch_size=2.5), ValueError, "batch_size must be a positive int"),
        (dict(rows=0), ValueError, "rows must be a positive int"),
        (dict(partitions=0), ValueError, "partitions must be a positive int"),
        (dict(outputs=-1), ValueError, "outputs must be a positive int"),
        (dict(quadrature_nodes=0), ValueError, "quadrature_nodes must be a positive int"),
        (dict(sketch_dim=0), ValueError, "sketch_dim must be a positive int"),
        (dict(state_dtype=torch.int8), ValueError, "state_dtype must be torch.float32 or torch.float64"),
        (dict(group_state="auto"), ValueError, "group_state must be one of"),
        (dict(gradient_route="auto"), ValueError, "gradient_route must be one of"),
        (dict(contribution_route="vjp"), ValueError, "contribution_route must be one of"),
        (dict(memory_budget=0), ValueError, "memory_budget must be a positive, finite number"),
        (dict(memory_budget=float("inf")), ValueError, "memory_budget must be a positive, finite number"),
    ]
    for change, error, message in bad:
        with pytest.raises(error, match=message):
            estimate_cost(model, opt, probes, **{**ok, **change})
    with pytest.raises(TypeError, match="non-empty tuple of tensors"):
        estimate_cost(model, opt, probes[0], **ok)
    with pytest.raises(TypeError, match="non-empty tuple of tensors"):
        estimate_cost(model, opt, (), **ok)
    with pytest.raises(ValueError, match="probes are empty"):
        estimate_cost(model, opt, (torch.randn(0, 3),), **ok)


def test_the_sketched_and_factored_routes_count_the_exact_totals_rows():
    """The other routes' splitter keeps the exact totals (the total, the rest, the rounding row) in
    float64 whatever the state dtype: with a momentum buffer, its committed and pending state
    (2 x 3 x P) besides the updates (3 x P); the pushed rows are converted to a float32 model's
    dtype; the optimizer's state copies as the optimizer keeps them (none for plain SGD, three
    for Adam with amsgrad)."""
    from genkernel.core.cost import optimizer_state_copies

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2))
    num = sum(p.numel() for p in model.parameters())
    momentum = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = PathKernelTracker(model, momentum, mse_loss, torch.randn(6, 3), num_groups=4, group_state="sketched",
                                state_dtype=torch.float32, sketch_dim=16)
    g = torch.Generator().manual_seed(1)
    for k in range(2):
        tracker.step(torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g), torch.arange(8) % 4)
    state = sum(s["momentum_buffer"].numel() * s["momentum_buffer"].element_size()
                for s in tracker.splitter.state.values())
    assert state == 3 * num * 8  # float64, three rows
    memory = tracker.cost.memory
    assert memory["group_state"] == 2 * state + 4 * 16 * 8  # committed and pending, and the sketches
    assert memory["group_updates"] == 3 * num * 8
    assert memory["push_tangents"] == 2 * num * 4  # the exact total and the rest, as float32
    assert optimizer_state_copies(torch.optim.SGD(model.parameters(), lr=0.1)) == 0
    assert optimizer_state_copies(torch.optim.Adam(model.parameters(), amsgrad=True)) == 3
    assert optimizer_state_copies(torch.optim.RMSprop(model.parameters(), momentum=0.9, centered=True)) == 3


@pytest.mark.parametrize("route", ["jacobian", "auto"])
def test_the_jacobian_routes_work_counts_the_jacobians_times_the_rows(route):
    """On the "jacobian" contribution route (asked for, or taken by "auto" when 8 d <= rows and
    the Jacobians fit the budget) the product of the probes' Jacobians with the rows, M·d·rows·P
    multiply-adds, dominates an MLP's tracked step: the predicted ratio is the operation counts'
    to 20 % (it was 2.25 against 16.4; what is left is the dense route's bare step, counted as
    3 B forwards where the first layer forms no input gradient)."""
    from recipes.benchmarks.harness import counted_flops
    from genkernel.supervised import cross_entropy_loss

    batch, probes, groups = 48, 8, 40  # fewer groups than examples (more cost the example route more: not counted)
    x = torch.randn(batch * 2 + probes, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (batch * 2,), generator=torch.Generator().manual_seed(2))
    bare_model, tracked_model = _small_classifier("mlp"), _small_classifier("mlp")
    bare_opt = torch.optim.Adam(bare_model.parameters(), lr=1e-3)
    tracker = PathKernelTracker(tracked_model, torch.optim.Adam(tracked_model.parameters(), lr=1e-3),
                                cross_entropy_loss, x[-probes:], num_groups=groups, group_state="dense",
                                gradient_route="example", contribution_route=route, batch_size=batch)

    def bare_step(rows):
        bare_opt.zero_grad()
        cross_entropy_loss(bare_model(x[rows]), y[rows]).mean().backward()
        bare_opt.step()

    bare_step(slice(0, batch))
    tracker.step(x[:batch], y[:batch], torch.arange(batch) % groups)
    rows = slice(batch, 2 * batch)
    tracked = counted_flops(lambda: tracker.step(x[rows], y[rows], torch.arange(batch) % groups))[0]
    bare = counted_flops(lambda: bare_step(rows))[0]
    num = sum(p.numel() for p in tracked_model.parameters())
    assert tracker.cost.memory["probe_pushes"] == (2 * probes * 5 + groups + 1) * num * 4  # Jacobians and rows
    assert tracker.cost.ratio == pytest.approx(tracked / bare, rel=0.2)


def test_the_cheaper_options_name_only_routes_the_optimizer_can_take(monkeypatch):
    """group_state='sketched' runs SGD, Adam and AdamW, not RMSprop: a refused RMSprop tracker is
    not sent to a route that would refuse it in turn."""
    import genkernel.core.cost as cost

    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    probes = (torch.randn(4, 3),)
    rms = estimate_cost(model, torch.optim.RMSprop(model.parameters(), momentum=0.9), probes, outputs=2, rows=4)
    # (sketch_dim=4: with the default 512 the sketched estimate of this tiny model is above the dense one's, not named)
    adam = estimate_cost(model, torch.optim.Adam(model.parameters()), probes, outputs=2, rows=4, sketch_dim=4)
    assert not rms.fits and not adam.fits
    assert "group_state='sketched'" in " ".join(adam.cheaper)
    assert "group_state='sketched'" not in " ".join(rms.cheaper) and "fewer groups" in " ".join(rms.cheaper)
    with pytest.raises(ValueError, match="sketched"):  # the route it would have named
        PathKernelTracker(model, torch.optim.RMSprop(model.parameters(), momentum=0.9), mse_loss, probes[0],
                          num_groups=4, group_state="sketched")
