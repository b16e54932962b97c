"""Analyzers attached to loops people already run: accelerate, Lightning, torch.compile'd and
wrapped models (issue 14). Each run is compared with the same loop without the analyzer."""

import copy
import warnings

import pytest
import torch
from torch import nn

from genkernel.diffusion import MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from test_trainer_ema import assert_ledger_adds_up

F64 = torch.float64
T = 100


def ring(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g, dtype=F64) * 6.283
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g, dtype=F64)


def denoiser(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(2, hidden=16, depth=2).to(F64)


def per_example_loss(model, scheduler, x0, generator):
    noise = torch.randn(x0.shape, generator=generator, dtype=F64)
    t = torch.randint(0, T, (x0.shape[0],), generator=generator)
    pred = model(scheduler.add_noise(x0, noise, t), t)
    return ((pred - noise) ** 2).mean(dim=1), t


def test_an_accelerate_loop_with_accumulation_clipping_and_a_scheduler_is_observed_exactly():
    from accelerate import Accelerator

    scheduler = make_scheduler(T)
    data = ring(64)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)

    def run(analyze):
        accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
        model = denoiser()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / 3))
        model, optimizer, batches, lr_schedule = accelerator.prepare(model, optimizer, loader, lr_schedule)
        analyzer = None
        if analyze:
            analyzer = NoiseLevelAnalyzer(scheduler, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2,
                                          quadrature="simpson")
            analyzer.bind(model, optimizer)  # the prepared objects, as the script has them
        g = torch.Generator().manual_seed(5)
        steps = 0
        for x0 in batches:
            with accelerator.accumulate(model):
                losses, t = per_example_loss(model, scheduler, x0, g)
                if analyzer is not None:
                    analyzer.observe(losses, t)  # the added line
                accelerator.backward(losses.mean())
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 0.1)
                    steps += 1
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad()
        return accelerator.unwrap_model(model), analyzer, steps

    bare, _, _ = run(False)
    model, analyzer, steps = run(True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), bare.parameters()))
    ledger = analyzer.ledger
    assert steps == 4 and ledger.steps == 4  # 8 micro-batches, accumulation over 2
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta, rtol=0, atol=1e-13)
    assert ledger.relative_residual() < 1e-5
    scales = analyzer.tracker.gradient_scales
    assert all(s["micro_batches"] == 2 for s in scales)
    assert any(s["scale_times_micro_batches"] < 1 for s in scales)  # clipping acted and was followed


def test_a_lightning_module_with_accumulation_and_clipping_is_observed_exactly():
    from genkernel.integrations.lightning import GenkernelCallback

    scheduler = make_scheduler(T)
    data = ring(48)

    def fit(analyzer):
        module = lightning_denoiser(analyzer)
        callbacks = [] if analyzer is None else [GenkernelCallback(analyzer, model_attribute="net")]
        trainer = _trainer(callbacks, max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5)
        _fit_quietly(trainer, module, torch.utils.data.DataLoader(data, batch_size=8, shuffle=False))
        return module

    bare = fit(None)
    analyzer = NoiseLevelAnalyzer(scheduler, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2,
                                  quadrature="simpson")
    tracked = fit(analyzer)
    assert all(torch.equal(p, q) for p, q in zip(tracked.net.parameters(), bare.net.parameters()))
    ledger = analyzer.ledger
    assert ledger.steps == 3  # 6 batches, accumulation over 2
    torch.testing.assert_close(ledger.contributions.sum(1) + ledger.rest + ledger.residual, ledger.delta, rtol=0, atol=1e-13)
    assert ledger.relative_residual() < 1e-5
    assert analyzer.report()["global_steps"] == [1, 3]
    assert [row["tracked_step"] for row in analyzer.kernel_history] == [0, 3]  # finished at the end
    assert analyzer.tracker.cost.settings["batch"] == 16  # the cost at binding: 8 per batch, 2 accumulated


def test_the_lightning_callback_binds_the_wrapper_lightning_trains_under_ddp(tmp_path):
    """Under DDP the tracker must see the process group (DDP averages the ranks' gradients): the
    callback binds ``trainer.strategy.model``; a submodule under several processes is refused."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from genkernel.integrations.lightning import GenkernelCallback

    class Recorder:  # what GenkernelCallback calls of an analyzer
        tracker = None

        def bind(self, model, optimizer, **kwargs):
            self.model = model

    module = nn.Sequential(nn.Linear(3, 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)

    def trainer(model, world_size):
        return SimpleNamespace(optimizers=[optimizer], strategy=SimpleNamespace(model=model), global_step=0,
                               world_size=world_size, train_dataloader=None, accumulate_grad_batches=1)

    single = Recorder()
    GenkernelCallback(single).on_train_start(trainer(module, 1), module)
    assert single.model is module
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(module)
        ddp = Recorder()
        GenkernelCallback(ddp).on_train_start(trainer(wrapped, 2), module)
        assert ddp.model is wrapped
        with pytest.raises(ValueError, match="model_attribute='0' under 2 processes.*model_attribute=None"):
            GenkernelCallback(Recorder(), model_attribute="0").on_train_start(trainer(wrapped, 2), module)
    finally:
        dist.destroy_process_group()


def test_a_compiled_or_data_parallel_model_is_read_through():
    from genkernel.core.adapter import unwrap

    model = denoiser()
    assert unwrap(nn.DataParallel(model)) is model
    compiled = torch.compile(model, backend="eager")
    assert unwrap(compiled) is model
    analyzer = NoiseLevelAnalyzer(make_scheduler(T), ring(16, seed=3), num_bins=2, num_probes=4, kernel_points=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    analyzer.bind(compiled, optimizer)
    g = torch.Generator().manual_seed(1)
    losses, t = per_example_loss(compiled, make_scheduler(T), ring(8), g)
    analyzer.observe(losses, t)
    losses.mean().backward()
    optimizer.step()
    assert analyzer.ledger.steps == 1 and analyzer.ledger.relative_residual() < 1e-3


def test_an_observed_denoiser_keeps_an_ema_ledger_and_a_class_partition():
    from diffusers.training_utils import EMAModel

    class Conditional(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLPDenoiser(2, hidden=16, depth=2)
            self.embed = nn.Embedding(3, 2)

        def forward(self, x, t, y):
            return self.net(x + self.embed(y), t)

    torch.manual_seed(0)
    model = Conditional().to(F64)
    ema = EMAModel(model.parameters(), decay=0.9)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = make_scheduler(T)
    probe_labels = torch.arange(16) % 3
    analyzer = NoiseLevelAnalyzer(scheduler, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2,
                                  probe_conditioning=probe_labels, num_classes=3, quadrature="simpson")
    analyzer.bind(model, optimizer, ema=ema)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x0, y = ring(12, seed=int(torch.randint(0, 99, (1,), generator=g))), torch.randint(0, 3, (12,), generator=g)
        noise = torch.randn(x0.shape, generator=g, dtype=F64)
        t = torch.randint(0, T, (12,), generator=g)
        losses = ((model(scheduler.add_noise(x0, noise, t), t, y) - noise) ** 2).mean(1)
        analyzer.observe(losses, t, class_labels=y)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
    ledgers = analyzer.ledgers
    level, level_class = ledgers["level"], ledgers["level_class"]
    scale = float(level.contributions.abs().max())
    # level × class groups sum to the level groups (group bin·C + class)
    torch.testing.assert_close(level_class.contributions.reshape(6, 3, 3, -1).sum(2), level.contributions, rtol=0,
                               atol=1e-12 * scale)
    ema_ledger = analyzer.ema_ledgers["level"]
    assert ema_ledger.steps == 3 and ema_ledger.relative_residual() < 1e-5
    report = analyzer.report()
    assert "ema" in report and len(report["level_class_traffic"]["matrix"]) == 3
    kernel = analyzer.kernel_structure()  # the kernel takes the conditioning inputs too
    assert len(kernel["by_distance"]) == 3


def _fit_quietly(trainer, module, loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)


def lightning_denoiser(analyzer=None, net=None):
    """A LightningModule training ``denoiser()`` with SGD and momentum; its one added line observes
    the step's losses when ``analyzer`` is given (the class is built here: Lightning is imported only
    by the tests that use it)."""
    import lightning.pytorch as pl

    scheduler = make_scheduler(T)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = denoiser() if net is None else net()
            self.analyzer = analyzer
            self.g = torch.Generator().manual_seed(5)

        def forward(self, x, t):  # (GenkernelCallback without model_attribute binds the module itself)
            return self.net(x, t)

        def training_step(self, x0, index):
            losses, t = per_example_loss(self.net, scheduler, x0, self.g)
            if self.analyzer is not None:
                self.analyzer.observe(losses, t)  # the added line
            return losses.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Module()


def _trainer(callbacks, **kwargs):
    import lightning.pytorch as pl

    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu", **kwargs}
    return pl.Trainer(callbacks=callbacks, **settings)


def test_a_second_lightning_fit_with_a_new_optimizer_is_refused_not_left_out_of_the_ledger():
    """Every fit calls configure_optimizers again: the second fit's optimizer has none of the
    tracker's step hooks, so its steps never reached the ledger, which silently stayed at the
    first fit's steps while the model trained on (its f_end 0.15 away from the real outputs)."""
    from genkernel.integrations.lightning import GenkernelCallback

    analyzer = NoiseLevelAnalyzer(make_scheduler(T), ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2,
                                  progress=False)
    module = lightning_denoiser(analyzer)
    callback = GenkernelCallback(analyzer, model_attribute="net")
    loader = torch.utils.data.DataLoader(ring(16), batch_size=8, shuffle=False)
    _fit_quietly(_trainer([callback], max_steps=2), module, loader)
    assert analyzer.ledger.steps == 2
    before = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(ValueError, match="bound to the optimizer of an earlier fit.*new analyzer"):
        _fit_quietly(_trainer([callback], max_steps=1), module, loader)
    assert all(torch.equal(p, q) for p, q in zip(module.net.parameters(), before))  # refused before a step
    assert analyzer.ledger.steps == 2


def test_a_lightning_step_refused_under_clip_by_value_names_the_clipping():
    from genkernel.core.errors import LedgerCheckError
    from genkernel.integrations.lightning import GenkernelCallback

    analyzer = NoiseLevelAnalyzer(make_scheduler(T), ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2,
                                  progress=False)
    module = lightning_denoiser(analyzer)
    trainer = _trainer([GenkernelCallback(analyzer, model_attribute="net")], max_steps=1, gradient_clip_val=0.01,
                       gradient_clip_algorithm="value")
    with pytest.raises(LedgerCheckError) as error:
        _fit_quietly(trainer, module, torch.utils.data.DataLoader(ring(16), batch_size=8))
    assert any("gradient_clip_algorithm='norm'" in note for note in getattr(error.value, "__notes__", []))


def test_an_ema_ledger_of_parameters_only_does_not_depend_on_when_it_is_read():
    """diffusers' EMAModel keeps parameters only: its probes read the live model's BatchNorm
    statistics. Reading ``ema_ledgers`` between the EMA update and the next training forward (which
    moves those statistics) used to push that update with other statistics than a read after it:
    the EMA ledger's contributions changed by 4 % of their size with the logging schedule."""
    from diffusers.training_utils import EMAModel

    def mse(out, y):
        return ((out - y) ** 2).mean(1)

    def run(read_every_step):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
        ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        from genkernel import PathKernelTracker

        tracker = PathKernelTracker(model, optimizer, mse, torch.randn(5, 3, generator=g, dtype=F64), num_groups=2,
                                    quadrature="simpson")
        tracker.track_ema(ema)
        for _ in range(4):
            x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
            losses = mse(model(x), y)
            tracker.observe(losses, torch.arange(8) % 2)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            if read_every_step:
                tracker.ema_ledgers  # a logger reading the EMA ledger every step
        ledger = tracker.ema_ledgers[tracker.partitions.primary]
        sampled = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
        sampled.load_state_dict(model.state_dict())
        ema.copy_to(sampled.parameters())
        with torch.no_grad():
            real = sampled.eval()(tracker.probes[0])
        return ledger, real

    quiet, real = run(False)
    read, _ = run(True)
    scale = float(read.contributions.abs().max())
    assert quiet.steps == read.steps == 4
    torch.testing.assert_close(quiet.contributions, read.contributions, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(quiet.buffer_drift, read.buffer_drift, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(quiet.f_end, real, rtol=0, atol=1e-12)  # the weights people sample from


def test_an_ema_that_leaves_a_parameter_out_is_refused_naming_that_parameter():
    """ema-pytorch's ``ignore_names`` keeps a parameter out of the average: the refusal used to name
    the first parameter ('0.weight', which the EMA averaged correctly) and not the one left out; it is
    now refused when the EMA is bound, naming the option and the parameter."""
    from ema_pytorch import EMA

    from genkernel import PathKernelTracker
    from genkernel.core.errors import LedgerCheckError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    ema = EMA(model, beta=0.9, update_after_step=0, update_every=1, ignore_names={"2.bias"})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mse = lambda out, y: ((out - y) ** 2).mean(1)  # noqa: E731
    tracker = PathKernelTracker(model, optimizer, mse, torch.randn(4, 3, dtype=F64), num_groups=2)
    with pytest.raises(ValueError, match=r"ignore_names covering the trained parameters \['2\.bias'\]"):
        tracker.track_ema(ema)
    # a hand-written EMA that leaves it out is refused at its first odd update, naming it (not '0.weight')
    ema = copy.deepcopy(model)
    tracker.track_ema(ema)
    with pytest.raises(LedgerCheckError, match=r"another 1 − β than the others' .*: '2\.bias': 0[^.]"):
        for _ in range(3):
            x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
            losses = mse(model(x), y)
            tracker.observe(losses, torch.arange(8) % 2)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                for (name, averaged), p in zip(ema.named_parameters(), model.parameters()):
                    if name != "2.bias":
                        averaged.lerp_(p, 0.1)


def assert_ema_ledger_adds_up(analyzer, decays):
    """The analyzer's EMA ledger adds up to the EMA weights' change at the probes (1e-12), its residual is
    small, and the decays it read are ``decays``."""
    assert_ledger_adds_up(analyzer.ema_ledgers["level"])
    assert analyzer.residual(weights="ema")["relative_residual"] < 1e-3
    assert analyzer.report()["ema"]["decays"] == pytest.approx(decays, rel=1e-12)


def _weight_averaging_fit(analyzer, averaging=True, order="averaging first"):
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from genkernel.integrations.lightning import GenkernelCallback

    module = lightning_denoiser(analyzer)
    callbacks = [] if analyzer is None else [GenkernelCallback(analyzer, model_attribute="net")]
    if averaging:
        average = WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9))
        callbacks = [average, *callbacks] if order == "averaging first" else [*callbacks, average]
    _fit_quietly(_trainer(callbacks, max_epochs=1), module,
                 torch.utils.data.DataLoader(ring(48), batch_size=8, shuffle=False))
    return module


def _analyzer(**kwargs):
    return NoiseLevelAnalyzer(make_scheduler(T), ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2,
                              progress=False, **kwargs)


def test_lightning_weight_averaging_gets_an_ema_ledger_and_the_trained_weights_keep_theirs():
    """Lightning's WeightAveraging keeps an AveragedModel of the module and copies it into the module when
    training ends. Old: no EMA ledger for it, and with the callback listed first the final kernel was
    computed at the averaged weights copied in, recorded as the trained θ (by_distance off in the 4th
    digit), and reading an EMA ledger after the copy was refused as an EMA that moved wrongly."""
    plain = _analyzer()
    trained = _weight_averaging_fit(plain, averaging=False)
    for order in ("averaging first", "averaging last"):
        analyzer = _analyzer()
        averaged = _weight_averaging_fit(analyzer, order=order)
        with analyzer.tracker.at_last_step() as held:
            theta = [p.detach().clone() for p in held.parameters()]
        assert all(torch.equal(p, q) for p, q in zip(theta, trained.net.parameters()))
        assert not torch.equal(next(averaged.net.parameters()), next(trained.net.parameters()))  # the average, copied in
        assert analyzer.kernel_history[-1]["by_distance"] == plain.kernel_history[-1]["by_distance"]
        assert torch.equal(analyzer.ledger.contributions, plain.ledger.contributions)
        assert_ema_ledger_adds_up(analyzer, [0.0] + [0.9] * 5)  # a copy, then the EMA
    none = _analyzer(ema_ledger="none")
    _weight_averaging_fit(none)
    assert none.tracker.ema is None


def test_an_ema_copied_into_the_model_before_finish_leaves_the_ledgers_at_the_trained_weights():
    """diffusers' scripts copy the EMA into the model to sample and save (EMAModel.copy_to); a finish()
    or a read of the EMA ledger after it reads the trained θ the ledger ends at, not the copy."""
    from diffusers.training_utils import EMAModel

    def run(copy_before_finish):
        scheduler = make_scheduler(T)
        model = denoiser()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        ema = EMAModel(model.parameters(), decay=0.8)
        analyzer = _analyzer()
        analyzer.bind(model, optimizer, ema=ema)
        g = torch.Generator().manual_seed(4)
        for x0 in ring(24).split(8):
            losses, t = per_example_loss(model, scheduler, x0, g)
            analyzer.observe(losses, t)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
        if copy_before_finish:
            ema.copy_to(model.parameters())
        analyzer.finish()
        return analyzer

    straight, copied = run(False), run(True)
    assert copied.kernel_history[-1]["by_distance"] == straight.kernel_history[-1]["by_distance"]
    for name in ("level",):
        assert torch.equal(copied.ema_ledgers[name].contributions, straight.ema_ledgers[name].contributions)
    assert copied.residual(weights="ema")["relative_residual"] < 1e-3


def test_a_lightning_fit_with_weight_averaging_resumed_from_a_checkpoint_continues_every_ledger_bit_for_bit(tmp_path):
    """WeightAveraging puts the average in the checkpoint's state_dict and the trained weights beside it
    (current_model_state); a fit resumed with ckpt_path= from the first epoch's checkpoint reaches the
    uninterrupted run's model ledger, EMA ledger and weights exactly (the noise comes from each batch's
    position, so the two runs train on the same draws)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from genkernel.integrations.lightning import GenkernelCallback

    scheduler = make_scheduler(T)

    class Module(pl.LightningModule):
        def __init__(self, analyzer):
            super().__init__()
            self.net = denoiser()
            self.analyzer = analyzer

        def training_step(self, x0, index):
            g = torch.Generator().manual_seed(1000 * self.current_epoch + index)
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            t = torch.randint(0, T, (x0.shape[0],), generator=g)
            losses = ((self.net(scheduler.add_noise(x0, noise, t), t) - noise) ** 2).mean(dim=1)
            self.analyzer.observe(losses, t)
            return losses.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def fit(epochs, dirpath=None, ckpt_path=None):
        analyzer = _analyzer()
        module = Module(analyzer)
        callbacks = [WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9)), GenkernelCallback(analyzer, model_attribute="net")]
        if dirpath is not None:
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1))
        trainer = _trainer(callbacks, max_epochs=epochs, enable_checkpointing=dirpath is not None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(ring(48), batch_size=8, shuffle=False), ckpt_path=ckpt_path)
        return analyzer, module

    straight, straight_module = fit(2)
    fit(1, dirpath=tmp_path)
    (checkpoint,) = tmp_path.glob("*.ckpt")
    resumed, resumed_module = fit(2, ckpt_path=checkpoint)
    assert resumed.ledger.steps == straight.ledger.steps == 12
    assert torch.equal(resumed.ledger.contributions, straight.ledger.contributions)
    assert torch.equal(resumed.ema_ledgers["level"].contributions, straight.ema_ledgers["level"].contributions)
    assert all(torch.equal(p, q) for p, q in zip(resumed_module.net.parameters(), straight_module.net.parameters()))
