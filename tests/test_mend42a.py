"""Mended faults (brief "mendA"): an out-of-memory error in the GAN trainer's and the GAN analyzer's shape probes
reaches the caller as itself (it read as a shape mistake); bind's optimizers swapped (GAN) or of another model
(diffusion) are named as such; atomic saves and the other writers that rename a temporary file fsync the file
before the rename and the folder after it; a second Lightning fit that reuses the optimizer numbers its steps on
from the first fit's, the ledger exact across both."""

from __future__ import annotations

import errno
import glob
import os
import stat
import warnings

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# -- 1. an out-of-memory error in a shape probe is not a shape mistake ------------------------------------------------
def _out_of_memory_errors():
    return [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        # the CPU allocator's, a plain RuntimeError (genkernel.core.adapter.not_fitting_inputs tells it apart)
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                     "allocate 123456789 bytes"),
    ]


def _raising(error):
    def forward(*args, **kwargs):
        raise error
    return forward


def _gan():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6)), nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1))


@pytest.mark.parametrize("error", _out_of_memory_errors(), ids=["OutOfMemoryError", "cpu-allocator"])
def test_an_out_of_memory_in_the_gan_trainers_shape_probe_reaches_the_caller_as_itself(error, monkeypatch):
    """GANTrainer's construction probes G with two latents; a forward that runs out of memory there raises that
    error (the same object), not "the generator does not take the trainer's latents". A real shape mistake (G
    built for 5 latents, the trainer's 4) still gets the shape message.

    Fails on the old code: both out-of-memory errors became ValueError("the generator does not take ...")."""
    from genkernel.gan.trainer import GANTrainer

    G, D = _gan()
    data = torch.randn(8, 6)
    monkeypatch.setattr(G[0], "forward", _raising(error))
    with pytest.raises(type(error)) as raised:
        GANTrainer(G, D, data, latent_dim=4, output="logits", batch_size=4)
    assert raised.value is error
    monkeypatch.undo()
    wrong = nn.Sequential(nn.Linear(5, 6))
    with pytest.raises(ValueError, match=r"does not take the trainer's latents \[B, latent_dim\] = \[B, 4\]"):
        GANTrainer(wrong, D, data, latent_dim=4, output="logits", batch_size=4)


@pytest.mark.parametrize("error", _out_of_memory_errors(), ids=["OutOfMemoryError", "cpu-allocator"])
def test_an_out_of_memory_in_the_gan_analyzers_probe_latent_check_reaches_the_caller_as_itself(error, monkeypatch):
    """GANKernelAnalyzer checks its probe latents with one forward of G and D; an out-of-memory error there is
    raised as itself, not as "probe_latents of shape ... do not fit". Latents of the wrong shape still get that
    message.

    Fails on the old code: ValueError("probe_latents of shape (4, 4) do not fit the generator/discriminator")."""
    from genkernel.gan import GANKernelAnalyzer

    G, D = _gan()
    monkeypatch.setattr(G[0], "forward", _raising(error))
    with pytest.raises(type(error)) as raised:
        GANKernelAnalyzer(G, D, torch.randn(4, 4), window=1, eval_every=1, controls=0)
    assert raised.value is error
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"probe_latents of shape \(4, 5\) do not fit the generator/discriminator"):
        GANKernelAnalyzer(G, D, torch.randn(4, 5), window=1, eval_every=1, controls=0)


# -- 2. bind's optimizers: swapped, or of another model ---------------------------------------------------------------
def test_gan_bind_with_the_optimizers_swapped_or_misplaced_says_so_and_how_to_call_it():
    """bind(g_optimizer, d_optimizer): passed as bind(d_opt, g_opt) the message says the optimizers look swapped
    (each one's parameters belong to the other network) and how to call it; bind(None, g_opt) (G's optimizer in
    D's place) is refused at bind, where it was accepted until the first observe_discriminator. Refused before
    anything is bound: the right call afterwards binds, and a generator step is recorded.

    Fails on the old code: bind(d_opt, g_opt) said "trainable parameters ['0.weight', '0.bias'] are not owned by
    the optimizer" (the generator's names, which D's look alike); bind(None, g_opt) raised nothing."""
    from genkernel.gan import GANKernelAnalyzer

    G, D = _gan()
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=0.1), torch.optim.SGD(D.parameters(), lr=0.1)
    analyzer = GANKernelAnalyzer(G, D, torch.randn(4, 4), window=1, eval_every=1, controls=0)
    with pytest.raises(ValueError, match=r"optimizers look swapped: g_optimizer's parameters belong to the "
                                         r"discriminator and d_optimizer's parameters belong to the generator\. "
                                         r"Call analyzer\.bind\(g_optimizer, d_optimizer\)"):
        analyzer.bind(d_opt, g_opt)
    with pytest.raises(ValueError, match=r"d_optimizer's parameters belong to the generator"):
        analyzer.bind(None, g_opt)
    with pytest.raises(ValueError, match=r"g_optimizer's parameters belong to the discriminator"):
        analyzer.bind(d_opt)
    assert not analyzer._bound and analyzer.g_tracker is None
    analyzer.bind(g_opt, d_opt)
    z = torch.randn(8, 4)
    samples = G(z)
    losses = nn.functional.softplus(-D(samples).reshape(-1))
    analyzer.observe_generator(losses, z, samples)
    g_opt.zero_grad()
    losses.mean().backward()
    g_opt.step()
    assert analyzer.g_tracker.ledger.steps == 1


def test_diffusion_bind_with_another_models_optimizer_says_it_owns_none_of_the_models_parameters():
    """NoiseLevelAnalyzer.bind(model, optimizer) with an optimizer of another model: the message says the optimizer
    owns none of the model's trainable parameters (not "add them to it, or freeze them", which reads as if a few
    were left out); an optimizer that leaves some out keeps the message naming them.

    Fails on the old code: "trainable parameters ['time_proj.weight', ...] are not owned by the optimizer: add them
    to it, or freeze them with requires_grad_(False)"."""
    import math

    from genkernel.diffusion import MLPDenoiser, NoiseLevelAnalyzer, make_scheduler

    torch.manual_seed(0)
    model, other = (MLPDenoiser(hidden=8, depth=1, time_dim=4).double() for _ in range(2))
    angle = torch.linspace(0, 2 * math.pi, 12, dtype=F64)
    probes = torch.stack([angle.cos(), angle.sin()], 1)
    count = sum(1 for p in model.parameters() if p.requires_grad)

    def analyzer():
        return NoiseLevelAnalyzer(make_scheduler(50), probes, num_bins=2, num_probes=4, controls=0, kernel_points=2,
                                  snapshot_every=0, progress=False)

    with pytest.raises(ValueError, match=rf"the optimizer owns none of the tracked model's {count} trainable "
                                         r"parameters \(another model's optimizer\?\)"):
        analyzer().bind(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"are not owned by the optimizer: add them to it"):
        analyzer().bind(model, torch.optim.SGD(list(model.parameters())[:2], lr=0.1))


# -- 3. atomic writes: the file fsynced before the rename, the folder after ------------------------------------------
def _record_syncs(monkeypatch):
    """Record every os.fsync (of a file or of a folder) and os.replace, in order."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return fsync(fd)

    def recording_replace(src, dst, *args, **kwargs):
        events.append("replace")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_atomic_save_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A power loss after the rename must find the new file whole: its data synced before the rename, the folder
    entry synced after it. The saved state reads back.

    Fails on the old code: ["fsync file", "replace"], the folder never synced."""
    from genkernel.core.tracking.io import atomic_save, load_state

    events = _record_syncs(monkeypatch)
    state = {"format": "test", "x": torch.arange(5, dtype=F64)}
    atomic_save(state, tmp_path / "state.pt")
    assert events == ["fsync file", "replace", "fsync folder"]
    assert torch.equal(load_state(tmp_path / "state.pt", "test")["x"], state["x"])


def test_the_other_atomic_writers_fsync_through_the_same_helper(tmp_path, monkeypatch):
    """The CSV log's rewrite, the recipes' JSON results and the benchmark harness's files each go through
    genkernel.core.tracking.io.atomic_file (file fsync, rename, folder fsync); the file written holds what was
    written.

    Fails on the old code: each wrote ["replace"] alone (no fsync at all)."""
    import json

    from genkernel.logging import CSVWriter
    from recipes.benchmarks.harness import write_outputs
    from recipes.common import write_json

    writer = CSVWriter(tmp_path / "log.csv")
    events = _record_syncs(monkeypatch)
    writer({"loss": 0.5}, 1)  # a new column: the file is rewritten
    assert events == ["fsync file", "replace", "fsync folder"]
    assert (tmp_path / "log.csv").read_text().splitlines() == ["step,loss", "1,0.5"]
    events.clear()
    write_json(tmp_path / "result.json", {"a": 1})
    assert events == ["fsync file", "replace", "fsync folder"]
    assert json.loads((tmp_path / "result.json").read_text()) == {"a": 1}
    events.clear()
    write_outputs({"b": 2}, tmp_path / "bench.json", tmp_path / "bench.png", lambda report, file: file.write(b"png"))
    assert events == ["fsync file", "replace", "fsync folder"] * 2
    assert json.loads((tmp_path / "bench.json").read_text()) == {"b": 2}
    assert (tmp_path / "bench.png").read_bytes() == b"png"


def test_a_folder_fsync_the_file_system_refuses_is_skipped_and_an_io_error_is_raised(tmp_path, monkeypatch):
    """A file system without a folder's fsync (EINVAL: some network and FUSE mounts) saves as before, quietly; a real
    I/O error syncing the folder (EIO) is raised as itself, not as "could not write ... the previous file is intact"
    (the new file is in place by then).

    Fails on the old code: the EIO was never seen (the folder was not synced)."""
    from genkernel.core.tracking.io import atomic_save, load_state

    fsync = os.fsync
    code = {"errno": errno.EINVAL}

    def folder_fails(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code["errno"], os.strerror(code["errno"]))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", folder_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atomic_save({"format": "test", "v": 1}, tmp_path / "a.pt")
    assert load_state(tmp_path / "a.pt", "test")["v"] == 1
    code["errno"] = errno.EIO
    with pytest.raises(OSError) as raised:
        atomic_save({"format": "test", "v": 2}, tmp_path / "a.pt")
    assert raised.value.errno == errno.EIO and "previous file" not in str(raised.value)
    assert load_state(tmp_path / "a.pt", "test")["v"] == 2
    assert not glob.glob(str(tmp_path / ".a.pt.*"))  # no temporary file left


# -- 4. a second Lightning fit with the same optimizer ---------------------------------------------------------------
pl = pytest.importorskip("lightning.pytorch")


def _lightning_parts():
    from genkernel.diffusion import NoiseLevelAnalyzer, make_scheduler
    from test_integrations import T, denoiser, per_example_loss, ring

    scheduler = make_scheduler(T)

    class Module(pl.LightningModule):
        """configure_optimizers returns the same SGD (with momentum) at every fit."""

        def __init__(self, analyzer):
            super().__init__()
            self.net, self.analyzer = denoiser(), analyzer
            self.g = torch.Generator().manual_seed(5)
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)

        def forward(self, x, t):
            return self.net(x, t)

        def training_step(self, x0, index):
            losses, t = per_example_loss(self.net, scheduler, x0, self.g)
            self.analyzer.observe(losses, t)
            return losses.mean()

        def configure_optimizers(self):
            return self.opt

    def analyzer():
        return NoiseLevelAnalyzer(scheduler, ring(16, seed=3), num_bins=3, num_probes=6, kernel_points=2,
                                  progress=False)

    def loader():
        return torch.utils.data.DataLoader(ring(16), batch_size=8, shuffle=False)  # two steps an epoch

    return Module, analyzer, loader


def _fit(callback, module, loader, max_steps, checkpoints=None, **kwargs):
    callbacks = [callback]
    if checkpoints is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_train_steps=1))
    run = pl.Trainer(callbacks=callbacks, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_checkpointing=checkpoints is not None, enable_model_summary=False, accelerator="cpu",
                     devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, loader, **kwargs)
    return run


def test_a_second_lightning_fit_reusing_the_optimizer_numbers_on_and_keeps_the_ledger_exact(tmp_path):
    """Two fits of 2 steps, each with a new Trainer (global_step from 0 again), of one module whose
    configure_optimizers returns the same optimizer, one callback: the steps are numbered 1, 2, 3, 4, and the ledger
    is the ledger of one uninterrupted fit of 4 steps, bit for bit, its total + rest + residual the probes' real
    change (the network at the end minus at the start) to 1e-12. A fit resumed from a checkpoint the second fit
    wrote (at its own step 1, the run's step 3) numbers on as well: 4, 5.

    Fails on the old code: the second fit's steps were numbered 1, 2 again ([1, 2, 1, 2]); the resume was refused
    ("the saved analyzer already numbered steps up to ...")."""
    import copy

    Module, make_analyzer, loader = _lightning_parts()
    from genkernel.integrations.lightning import GenkernelCallback

    straight = make_analyzer()
    _fit(GenkernelCallback(straight, model_attribute="net"), Module(straight), loader(), 4)
    assert straight.global_steps == [1, 2, 3, 4]

    analyzer = make_analyzer()
    module = Module(analyzer)
    start = copy.deepcopy(module.net)
    callback = GenkernelCallback(analyzer, model_attribute="net")
    _fit(callback, module, loader(), 2)
    assert analyzer.global_steps == [1, 2]
    _fit(callback, module, loader(), 2, checkpoints=tmp_path)
    assert analyzer.global_steps == [1, 2, 3, 4]
    for name in ("contributions", "rest", "residual", "delta"):
        assert torch.equal(getattr(analyzer.ledger, name), getattr(straight.ledger, name)), name
    probes = analyzer.probes(torch.zeros((), dtype=F64))
    with torch.no_grad():
        real = module.net(*probes) - start(*probes)
    ledger = analyzer.ledger
    total = ledger.contributions.sum(1) + ledger.rest + ledger.residual
    assert float((total - real.reshape(total.shape)).abs().max()) < 1e-12 * float(real.abs().max())

    # a fit resumed from the second fit's checkpoint at its step 1 (the run's step 3): numbered 4, 5
    resumed = make_analyzer()
    checkpoint = next(c for c in glob.glob(str(tmp_path / "*.ckpt")) if "step=1" in c)
    _fit(GenkernelCallback(resumed, model_attribute="net"), Module(resumed), loader(), 3, ckpt_path=checkpoint)
    assert resumed.global_steps == [1, 2, 3, 4, 5]
