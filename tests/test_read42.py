"""Second read (brief "read42") of the session's commits 6c72ae0..bbd6a34: the GAN null search through D, a second
Lightning fit reusing the optimizer, durable renames, bind's swapped optimizers, kernel_plan's rows_total.

Two faults, each in the pattern of a commit that missed it (the first two tests fail on the old code; the others are
coverage of what the second read checked):

- baa808e ("renames are durable"): the accelerate examples' save_checkpoint writes a checkpoint folder, renames it to
  checkpoint-STEP and then removes the oldest checkpoints under --checkpoints_total_limit, with no fsync at all: a power
  loss after the removal could bring back the new checkpoint with empty files and the older ones gone.
- 101e94c (the null search through D): a D with torch.nn.utils.spectral_norm or weight_norm (their hook forms) could
  not be copied and run in float64 by the search (its hooks dropped), which then found nothing, silently: the fault
  101e94c fixed stayed for such discriminators (4.2e-3 and 3.3e-2 of the largest group off, residual 0.079 and 0.83).
"""

from __future__ import annotations

import copy
import os
import stat
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# -- the examples' checkpoint folder is durable before older checkpoints are removed -----------------------------------
class _Accelerator:
    """What ``save_checkpoint`` asks of an Accelerator: ``save_state(folder)`` writing files, one in a subfolder."""

    def save_state(self, folder):
        os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
        for name in ("optimizer.bin", os.path.join("unet", "model.bin")):
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(name)


def test_the_examples_checkpoint_folder_is_synced_before_the_rename_and_older_checkpoints_go_after(tmp_path,
                                                                                                  monkeypatch):
    """save_checkpoint under --checkpoints_total_limit 1 (checkpoint-100 there, checkpoint-110 saved): every file and
    folder of the new checkpoint is fsynced before the rename that makes it the checkpoint a resume picks, the output
    folder is fsynced after the rename, and only then is checkpoint-100 removed. The new checkpoint's files read back.

    Fails on the old code: no fsync at all (events ["replace", "rmtree"])."""
    import shutil

    from recipes.examples.checkpointing import save_checkpoint, saved_checkpoints

    accelerator = _Accelerator()
    save_checkpoint(accelerator, str(tmp_path), 100, None)
    events = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def recording_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return fsync(fd)

    def recording_replace(src, dst, *args, **kwargs):
        events.append(("replace", os.path.basename(dst)))
        return replace(src, dst, *args, **kwargs)

    def recording_rmtree(path, *args, **kwargs):
        events.append(("rmtree", os.path.basename(path)))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(shutil, "rmtree", recording_rmtree)
    save_checkpoint(accelerator, str(tmp_path), 110, 1)
    monkeypatch.undo()
    assert saved_checkpoints(str(tmp_path)) == ["checkpoint-110"]
    new = tmp_path / "checkpoint-110"
    assert (new / "unet" / "model.bin").read_text() == os.path.join("unet", "model.bin")
    kinds = [e[0] for e in events]
    assert kinds.count("replace") == 1 and ("rmtree", "checkpoint-100") in events, events
    renamed, removed = kinds.index("replace"), events.index(("rmtree", "checkpoint-100"))
    synced_before = {ino for kind, ino in events[:renamed] if kind == "fsync"}
    written = {os.stat(p).st_ino for p in (new, new / "unet", new / "optimizer.bin", new / "unet" / "model.bin")}
    assert written <= synced_before, events
    assert ("fsync", os.stat(tmp_path).st_ino) in events[renamed:removed], events


# -- GAN: the null search through a D with the hook forms of spectral or weight norm ------------------------------------
def _hooked_d(norm):
    torch.manual_seed(1)
    return nn.Sequential(norm(nn.Linear(2, 6)), nn.BatchNorm1d(6), nn.SiLU(), nn.Linear(6, 1))


@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
def test_the_null_search_runs_through_a_discriminator_with_hook_based_spectral_or_weight_norm(norm):
    """torch.nn.utils.spectral_norm / weight_norm (the hook forms, the usual spelling in GAN code) compute D's weight
    in a forward pre-hook. The null search's float64 copy dropped every hook, so it ran with the last float32 weight
    beside float64 inputs (or refused to copy weight_norm's, a tensor with a graph), failed and found nothing,
    silently. Float32 G, D = normed Linear → training-mode BatchNorm → SiLU → Linear, Adam (test_gfuzz42's first
    test with the norm): G's output bias is named null, the first generator step's groups equal the float64 brute
    force to 1e-4 of the largest (measured 1.5e-6 spectral, 2.9e-6 weight norm; the old code 4.2e-3 and 3.3e-2), the
    two steps' relative residual is rounding-sized (measured 4.8e-5, 4.4e-5; the old code 0.079 and 0.83), and G and
    D train bit for bit as without the analyzer (the kept hooks run on the copy's buffers).

    Fails on the old code: the search through D found nothing (null_parameters (), the groups off as above)."""
    from test_gfuzz42 import _by_sign, _first_step_reference

    from genkernel.core.tracking.callbacks import TrainerCallback
    from genkernel.core.tracking.null_params import structurally_null
    from genkernel.gan import GANKernelAnalyzer, GANTrainer

    wrap = getattr(nn.utils, norm)
    probes = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    data = torch.randn(40, 2, generator=torch.Generator().manual_seed(7)) * 2

    class Recorder(TrainerCallback):  # outermost: G and D before the first generator step (D rebuilt: no deepcopy)
        name = "read42_hooked_recorder"

        def __init__(self, G, D):
            self.G, self.D, self.steps = G, D, []

        def wrap_step(self, trainer, step, perform):
            if step.phase != "generator" or self.steps:
                return perform()
            with torch.no_grad():  # (weight_norm's weight computed here without a graph: a leaf deepcopy takes)
                d = _hooked_d(wrap)
                d.load_state_dict(self.D.state_dict())
            rec = dict(inputs=tuple(t.clone() for t in step.inputs), G=copy.deepcopy(self.G), D=d,
                       lr=step.optimizer.param_groups[0]["lr"], buffers={})
            out = perform()
            rec["after"] = {n: p.detach().clone() for n, p in self.G.named_parameters()}
            rec["v"] = {n: step.optimizer.state[p]["exp_avg_sq"].clone() for n, p in self.G.named_parameters()}
            self.steps.append(rec)
            return out

    def run(analyze):
        torch.manual_seed(0)
        G = nn.Sequential(nn.Linear(3, 6), nn.SiLU(), nn.Linear(6, 2))
        G.latent_dim = 3
        D = _hooked_d(wrap)
        analyzer = GANKernelAnalyzer(G, D, probes, grouping=_by_sign, num_groups=2, window=1, eval_every=1,
                                     controls=0, track_discriminator=False) if analyze else None
        recorder = Recorder(G, D)
        trainer = GANTrainer(G, D, data, batch_size=8, seed=0, loss="hinge",
                             callbacks=[recorder, analyzer] if analyze else [recorder],
                             g_optimizer=torch.optim.Adam(G.parameters(), lr=5e-3, betas=(0.5, 0.999)),
                             d_optimizer=torch.optim.SGD(D.parameters(), lr=0.03))
        trainer.train(1)
        first = None if analyzer is None else analyzer.generator_ledger().contributions.clone()
        trainer.train(1)
        return G, D, analyzer, recorder, first

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (weight_norm's deprecation)
        plain_g, plain_d = run(False)[:2]
        G, D, analyzer, recorder, first = run(True)
    for a, b in ((plain_g, G), (plain_d, D)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "2.bias" in structurally_null(G, dict(G.named_parameters()), (probes,), through=D)
    assert analyzer.generator_ledger().null_parameters == ("2.bias",)
    assert analyzer.generator_ledger().relative_residual() < 1e-3
    reference = _first_step_reference(recorder.steps[0], "hinge", "adam", (probes.double(),))
    error = float((first - reference).abs().max() / reference.abs().max())
    assert error < 1e-4, error


# -- GAN: the null search through D sees no augmentation; the step's own gradient keeps a real move the groups' --------
class _ImageG(nn.Module):
    latent_dim = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8 * 6 * 6)
        self.conv = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv(torch.tanh(self.fc(z)).view(-1, 8, 6, 6))


def _image_d():
    # a valid convolution (no padding): a shift of every pixel of a channel shifts every output alike, which the
    # training-mode BatchNorm after it subtracts again (G's output bias is null through D un-augmented)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(80, 1))


def test_an_augmented_generator_step_keeps_the_output_bias_the_groups_though_d_alone_cancels_it():
    """Coverage (passes before): float32 G, D = valid conv → training-mode BatchNorm → ..., Adam, GANTrainer(augment=
    "translation"). Through D alone G's output bias is structurally null (the search through D names it), but the
    trainer's loss reads G's samples through the translation's zero fill, which D's BatchNorm does not cancel: its real
    gradient is 0.5 of the largest (measured), not rounding, so it is not booked to the rest. The first generator
    step's groups equal a float64 brute force of the augmented loss to 1e-4 of the largest (measured 3.1e-7)."""
    from genkernel.core.tracking.callbacks import TrainerCallback
    from genkernel.core.tracking.null_params import structurally_null
    from genkernel.gan import GANKernelAnalyzer, GANTrainer

    torch.manual_seed(0)
    G, D = _ImageG(), _image_d()
    probes = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    assert "conv.bias" in structurally_null(G, dict(G.named_parameters()), (probes,), through=D)
    data = torch.randn(40, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    analyzer = GANKernelAnalyzer(G, D, probes, grouping=lambda z, x, w, s: (z[:, 0] > 0).long(), num_groups=2,
                                 window=1, eval_every=1, controls=0, track_discriminator=False)
    record = {}

    class Recorder(TrainerCallback):  # outermost: G and D before the first generator step, its draws, G after
        name = "read42_recorder"

        def wrap_step(self, trainer, step, perform):
            if step.phase != "generator" or record:
                return perform()
            inputs = step.inputs if isinstance(step.inputs, torch.Tensor) else step.inputs[0]
            record.update(z=inputs.clone(), params=step.targets.clone(), G=copy.deepcopy(G), D=copy.deepcopy(D),
                          lr=step.optimizer.param_groups[0]["lr"])
            out = perform()
            record["after"] = {n: p.detach().clone() for n, p in G.named_parameters()}
            record["v"] = {n: step.optimizer.state[p]["exp_avg_sq"].clone() for n, p in G.named_parameters()}
            return out

    trainer = GANTrainer(G, D, data, batch_size=8, seed=0, callbacks=[Recorder(), analyzer], loss="hinge",
                         augment="translation",
                         g_optimizer=torch.optim.Adam(G.parameters(), lr=5e-3, betas=(0.5, 0.999)),
                         d_optimizer=torch.optim.SGD(D.parameters(), lr=0.03))
    trainer.train(1)
    g64, d64 = record["G"].double(), record["D"].double()
    for p in d64.parameters():
        p.requires_grad_(False)
    z = record["z"].double()
    losses = -d64(trainer.augment.apply(g64(z), record["params"].double())).reshape(-1)
    ids = (z[:, 0] > 0).long()
    names = [n for n, _ in g64.named_parameters()]
    grads = {n: g.abs().max() for n, g in zip(names, torch.autograd.grad(losses.mean(), list(g64.parameters()),
                                                                          retain_graph=True))}
    assert float(grads["conv.bias"]) > 1e-2 * max(float(g) for g in grads.values())  # not rounding: real
    updates = []
    for group in range(2):
        gs = torch.autograd.grad((losses * (ids == group)).sum() / len(z), list(g64.parameters()), retain_graph=True)
        updates.append({n: -record["lr"] * g / ((record["v"][n].double() / (1 - 0.999)).sqrt() + 1e-8)
                        for n, g in zip(names, gs)})
    before = {n: p.detach() for n, p in g64.named_parameters()}
    after = {n: record["after"][n].double() for n in names}
    middle = tuple(before[n] + 0.5 * (after[n] - before[n]) for n in names)
    g64.eval()

    def f(*ps):
        return functional_call(g64, dict(zip(names, ps)), (probes.double(),)).reshape(len(probes), -1)

    reference = torch.stack([jvp(f, middle, tuple(u[n] for n in names))[1] for u in updates], 1)
    ledger = analyzer.generator_ledger()
    assert "conv.bias" not in ledger.null_parameters
    error = float((ledger.contributions - reference).abs().max() / reference.abs().max())
    assert error < 1e-4, error


# -- Lightning: fits reusing the optimizer, a validation between, a resume of the third --------------------------------
def test_three_lightning_fits_with_a_validation_between_number_on_and_a_resume_of_the_third_goes_on(tmp_path):
    """Coverage (passes before): three fits of 2 steps with new Trainers and one callback, a trainer.validate with the
    callback between the first two: steps numbered 1-6, the ledger bit for bit that of one fit of 6 steps; a new
    analyzer resumed from the third fit's checkpoint at its step 1 (the run's step 5) numbers its step 6."""
    pl = pytest.importorskip("lightning.pytorch")
    from test_mend42a import _fit, _lightning_parts

    from genkernel.integrations.lightning import GenkernelCallback

    Module, make_analyzer, loader = _lightning_parts()
    straight = make_analyzer()
    _fit(GenkernelCallback(straight, model_attribute="net"), Module(straight), loader(), 6)
    analyzer = make_analyzer()
    module = Module(analyzer)
    callback = GenkernelCallback(analyzer, model_attribute="net")
    _fit(callback, module, loader(), 2)
    module.validation_step = lambda batch, batch_idx: None
    check = pl.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                       accelerator="cpu", devices=1, limit_val_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check.validate(module, loader())
    _fit(callback, module, loader(), 2)
    _fit(callback, module, loader(), 2, checkpoints=tmp_path)
    assert analyzer.global_steps == [1, 2, 3, 4, 5, 6]
    for name in ("contributions", "rest", "residual", "delta"):
        assert torch.equal(getattr(analyzer.ledger, name), getattr(straight.ledger, name)), name
    resumed = make_analyzer()
    checkpoint = next(p for p in tmp_path.iterdir() if "step=1" in p.name)
    _fit(GenkernelCallback(resumed, model_attribute="net"), Module(resumed), loader(), 2, ckpt_path=str(checkpoint))
    assert resumed.global_steps == [1, 2, 3, 4, 5, 6]


# -- kernel_plan's rows_total: any integral type, the plan of the same int ---------------------------------------------
def test_kernel_plan_takes_a_numpy_row_count_as_the_same_int_and_refuses_a_count_below_one():
    """Coverage: rows_total=numpy.int64(40) plans as 40 (a recipe's count from an array's size), 0 and True are
    refused naming rows_total."""
    import numpy as np

    from genkernel.core.engine.kernels import kernel_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=F64)
    assert kernel_plan(model, x, rows_total=np.int64(40)) == kernel_plan(model, x, rows_total=40)
    for bad in (0, True):
        with pytest.raises(ValueError, match="rows_total must be a positive int"):
            kernel_plan(model, x, rows_total=bad)


# -- atomic_file keeps the writer's file as written ---------------------------------------------------------------------
def test_an_atomic_write_over_a_read_only_page_keeps_the_new_content_and_the_mode(tmp_path):
    """Coverage: a page made read-only (0444) by its owner written again through io.atomic_file (the temporary file
    given the page's mode while it is still open for writing, fsynced through that handle): the new page has the new
    content and mode 0444, and no temporary file is left."""
    from genkernel.core.tracking.io import atomic_file

    target = tmp_path / "report.html"
    target.write_text("old")
    os.chmod(target, 0o444)
    with atomic_file(target, "w", encoding="utf-8") as handle:
        handle.write("new page")
    assert target.read_text() == "new page" and stat.S_IMODE(os.stat(target).st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
