"""Failures injected mid-step and into checkpoints (the "crash" review, session 41).

The promises checked: a failure mid-step leaves the model, optimizer, draws and ledgers as either the whole step or
none of it, so that training continued after the error is the uninterrupted run bit for bit; long runs checkpoint
atomically and resume; a damaged checkpoint is refused, never silently loaded.

- A saved state with one bit flipped in a tensor record loaded silently (torch's zip reader does not check the
  CRC-32 its writer records): other parameters, ledger sums or optimizer moments, with no error.
- DDPMTrainer: a failure in ``next_batch`` after the batch was fetched (the levels' or noise's draw, the noisy
  input: an allocation that runs out of memory, an interrupt), or while ``attempt_step`` copies the buffers, kept
  the rows, levels and noise drawn (a DataLoader's batch was lost): the run continued skipped a batch.
  GANTrainer's discriminator step had the same hole between its real batch and its buffers' copy.
- A RuntimeError saying an allocation failed in a forward (the CPU allocator's "can't allocate memory" is a plain
  RuntimeError, not torch.OutOfMemoryError) became ``ValueError: inputs of shapes ... do not fit``.
- The tracker's commit copied the buffers after writing the ledgers: an out-of-memory there left the tracker
  refusing every further step ("interrupted after its ledgers were written").
- The accelerate examples' checkpoints (``checkpointing.save_checkpoint``) removed the oldest beyond the limit
  first and wrote ``checkpoint-STEP`` in place: a save killed half-way left a partial folder that
  ``--resume_from_checkpoint latest`` picked (FileNotFoundError), and under ``--checkpoints_total_limit 1`` no
  complete checkpoint at all.
"""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import genkernel.diffusion.trainer as ddpm_trainer_module
import genkernel.gan.trainer as gan_trainer_module
from genkernel import PathKernelTracker
from genkernel.core.tracking.tracker import PathKernelTracker as Tracker
from genkernel.diffusion import DDPMTrainer, NoiseLevelAnalyzer, make_scheduler
from genkernel.gan import GANTrainer, MLPGenerator
from genkernel.supervised import mlp, mse_loss
from test_ddpm_trainer import ring
from test_resume import DropoutCritic, DropoutDenoiser, same

T = 100
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"

pytestmark = pytest.mark.usefixtures("one_thread")


# -- damaged files ---------------------------------------------------------------------------------------------------
def _flip_a_bit_in(path, record_suffix):
    """Flip one bit in the data of the first zip record of ``path`` whose name ends with ``record_suffix``."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _tracker(seed=0):
    torch.manual_seed(seed)
    model = mlp(2, [8], 1, act="tanh")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    probes = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    return PathKernelTracker(model, optimizer, mse_loss, probes=probes, num_groups={"half": 2})


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_a_saved_tracker_with_one_bit_flipped_is_refused_naming_the_damaged_record(tmp_path, record):
    """A tracker saved after 3 steps, one bit flipped in a tensor record (the first ledger tensor) or in the pickle:
    ``load`` raises a ValueError saying the file is corrupted and naming the record; the intact file loads. Fails on
    the old code: the tensor flip loaded silently (the ledger then held other numbers); the pickle flip was refused
    as "not a readable genkernel state file (truncated, empty, or another format ...)", which names no damage."""
    x, y = torch.randn(64, 2, generator=torch.Generator().manual_seed(2)), torch.randn(64, 1)
    tracker = _tracker()
    for step in range(3):
        rows = torch.arange(16) + 16 * step
        tracker.step(x[rows], y[rows], {"half": (x[rows, 0] > 0).long()})
    path = tmp_path / "tracker.pt"
    tracker.save(path)
    intact = _tracker()
    intact.load(path)
    same(tracker.ledgers["half"].state_dict(), intact.ledgers["half"].state_dict())
    _flip_a_bit_in(path, record)
    with pytest.raises(ValueError, match=f"corrupted.*{record}"):
        _tracker().load(path)


def test_a_trainer_checkpoint_with_one_bit_flipped_is_refused_and_the_trainer_left_as_it_was(tmp_path):
    """A DDPMTrainer checkpoint with a bit flipped in its model's weights: ``resume`` refuses it (ValueError,
    "corrupted") before anything is loaded. Fails on the old code: it resumed with the flipped weight."""
    trainer = DDPMTrainer(DropoutDenoiser(), make_scheduler(T), ring(32), batch_size=8, progress=False,
                          checkpoint_dir=tmp_path)
    trainer.train(2)
    path = trainer.save_checkpoint()
    _flip_a_bit_in(path, "data/0")
    fresh = DDPMTrainer(DropoutDenoiser(), make_scheduler(T), ring(32), batch_size=8, progress=False,
                        checkpoint_dir=tmp_path)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match="corrupted"):
        fresh.resume()
    same(before, fresh.model.state_dict())
    assert fresh.global_step == 0


# -- failures mid-step -----------------------------------------------------------------------------------------------
def _ddpm(data, analyzer=True, **kwargs):
    callbacks = [NoiseLevelAnalyzer(make_scheduler(T), ring(16, seed=4), num_bins=3, num_probes=8, kernel_points=4,
                                    progress=False)] if analyzer else []
    settings = dict(batch_size=16) if isinstance(data, torch.Tensor) else {}
    return DDPMTrainer(DropoutDenoiser(), make_scheduler(T), data, lr=1e-2, progress=False, callbacks=callbacks,
                       **settings, **kwargs)


def _loader():
    points = ring(40, seed=1)
    return DataLoader(TensorDataset(points), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(9))


def _fails_once(monkeypatch, module, name, at, error=lambda: RuntimeError(OOM)):
    """``module.name`` raising ``error()`` at its ``at``-th call from now (1-based), else itself."""
    original, calls = getattr(module, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise error()
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls


def _after_a_failure(build, steps, fail_after, arm):
    """A trainer trained ``fail_after`` steps, ``arm()`` called, one step that must fail, then on to ``steps``."""
    trainer = build()
    trainer.train(fail_after)
    arm()
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        trainer.train(1)
    assert trainer.global_step == fail_after  # (nothing counted: the step failed before its update)
    trainer.train(steps - trainer.global_step)
    return trainer


@pytest.mark.parametrize("data", ["tensor", "loader"])
@pytest.mark.parametrize("where", ["noisy_input", "buffer_snapshot"])
def test_a_ddpm_step_failing_after_its_batch_was_drawn_hands_it_back(monkeypatch, data, where):
    """Out of memory in ``noisy_input`` (next_batch, after the rows, levels and noise were drawn) or in
    ``buffer_snapshot`` (attempt_step, before the step's passes), on Tensor data (the noise-level analyzer attached)
    and on a shuffled DataLoader (without one): the run continued after the error equals the straight run bit for
    bit (the trainer's whole state_dict: model, optimizer, generator, data position, losses, global RNG, the
    analyzer's ledgers and bins). Fails on the old code: the failed step's draws were kept (the generator and cursor
    moved on, a DataLoader's batch was lost) and every later step differed."""
    source = (lambda: ring(64)) if data == "tensor" else _loader
    analyzer = data == "tensor"  # (the DataLoader's batch hand-back does not need one: faster)
    straight = _ddpm(source(), analyzer=analyzer)
    straight.train(3)
    failed = _after_a_failure(lambda: _ddpm(source(), analyzer=analyzer), 3, 1,
                              lambda: _fails_once(monkeypatch, ddpm_trainer_module, where, 1))
    same(straight.state_dict(), failed.state_dict())


@pytest.mark.parametrize("analyzer", [False, True])
def test_an_interrupt_while_the_noise_is_drawn_hands_the_batch_back(monkeypatch, analyzer):
    """Ctrl-C (KeyboardInterrupt) inside the noise draw of step 2 (``torch.randn`` with the trainer's generator,
    after the rows and levels were drawn): continued, the run is the straight one, with and without an analyzer.
    Fails on the old code: the rows and levels drawn before the interrupt stayed drawn."""
    straight = _ddpm(ring(64), analyzer=analyzer)
    straight.train(3)
    trainer = _ddpm(ring(64), analyzer=analyzer)
    trainer.train(1)
    original, calls = torch.randn, [0]

    def interrupted(*args, **kwargs):
        if kwargs.get("generator") is trainer.generator:
            calls[0] += 1
            if calls[0] == 1:
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(1)
    monkeypatch.setattr(torch, "randn", original)
    assert calls[0] >= 1 and trainer.global_step == 1
    trainer.train(2)
    same(straight.state_dict(), trainer.state_dict())


def _gan():
    torch.manual_seed(0)
    generator = MLPGenerator(2, 2, hidden=16, depth=2).double()
    return GANTrainer(generator, DropoutCritic().double(), _gan_loader(), batch_size=16, d_steps=2, seed=3,
                      loss="hinge")


def _gan_loader():
    return DataLoader(TensorDataset(ring(64)), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(9))


def test_a_gan_discriminator_step_failing_while_its_buffers_are_copied_hands_its_real_batch_back(monkeypatch):
    """GANTrainer on a DataLoader: out of memory copying the players' buffers in the third discriminator step (after
    its real batch was drawn): ``train`` again ends where the straight run ends (both players' weights, the trainer's
    generator, history, counts). Fails on the old code: the real batch was lost, the next step drew the next one."""
    straight = _gan()
    torch.manual_seed(5)
    straight.train(3)
    failed = _gan()
    torch.manual_seed(5)
    _fails_once(monkeypatch, gan_trainer_module, "buffer_snapshot", 5)  # (D, D, G, D, [D]: discriminator step 4)
    with pytest.raises(RuntimeError, match="out of memory"):
        failed.train(3)
    failed.train(3)
    for mine, theirs in ((failed.generator, straight.generator), (failed.discriminator, straight.discriminator)):
        same(theirs.state_dict(), mine.state_dict())
    assert torch.equal(failed.rng.get_state(), straight.rng.get_state())
    assert failed.history == straight.history
    assert (failed.iteration, failed.g_steps, failed.d_steps_done) == (straight.iteration, straight.g_steps,
                                                                       straight.d_steps_done)


def test_a_cpu_allocation_failure_in_the_forward_is_not_blamed_on_the_inputs():
    """The CPU allocator's failure in the model's forward (torch raises it as a plain RuntimeError, not
    torch.OutOfMemoryError) reaches the caller as that RuntimeError, and the step is handed back (the run continued
    is the straight one). Fails on the old code: ``ValueError: inputs of shapes [(16, 2), (16,)] do not fit``, which
    a loop catching RuntimeError for an out-of-memory retry does not catch."""
    message = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
               "allocate 35184372088832 bytes. Error code 12 (Cannot allocate memory)")

    class Fails(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls, self.fail_at = DropoutDenoiser(), 0, None

        def forward(self, x_t, t):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError(message)
            return self.inner(x_t, t)

    straight = DDPMTrainer(Fails(), make_scheduler(T), ring(64), batch_size=16, progress=False)
    straight.train(3)
    model = Fails()
    trainer = DDPMTrainer(model, make_scheduler(T), ring(64), batch_size=16, progress=False)
    trainer.train(1)
    model.fail_at = model.calls + 1
    with pytest.raises(RuntimeError, match="can't allocate memory") as caught:
        trainer.train(1)
    assert not isinstance(caught.value, ValueError)
    trainer.train(2)
    same(straight.model.inner.state_dict(), model.inner.state_dict())
    assert trainer.losses == straight.losses


def test_out_of_memory_copying_the_buffers_as_a_step_is_recorded_rolls_it_back_and_the_run_goes_on(monkeypatch):
    """The tracker copies the model's buffers when it records a step; that copy running out of memory in step 2
    (the noise-level analyzer on a DDPMTrainer) rolls the step back, and the run continued is the straight one, its
    ledgers too. Fails on the old code: the copy came after the ledgers were written, so the step stayed in the
    weights and ledgers (global_step 2) and the tracker refused every further step ("interrupted after its ledgers were
    written, while its group state was being kept")."""
    straight = _ddpm(ring(64))
    straight.train(3)
    trainer = _ddpm(ring(64))
    trainer.train(1)
    original, calls = Tracker._copy_buffers, [0]

    def failing(self):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError(OOM)
        return original(self)

    monkeypatch.setattr(Tracker, "_copy_buffers", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train(1)
    assert trainer.global_step == 1
    trainer.train(2)
    same(straight.state_dict(), trainer.state_dict())


# -- the accelerate examples' checkpoints ----------------------------------------------------------------------------
class _Killed(BaseException):
    """What a SIGKILL does to the save, as far as the files are concerned: it stops, nothing after it runs."""


@pytest.mark.usefixtures("fresh_accelerate")
def test_an_example_checkpoint_cut_off_half_way_leaves_the_previous_one_and_latest_resumes_to_the_straight_run(
        make_image_folder, tmp_path, monkeypatch):
    """train_unconditional.py (4 optimizer steps, checkpoints every 2, ``--checkpoints_total_limit 1``) stopped
    inside the save of checkpoint-4 (after the UNet and the EMA were written, before the optimizer's state):
    checkpoint-2 is still there and the only ``checkpoint-*`` folder, and a run resumed with
    ``--resume_from_checkpoint latest`` ends with the straight run's UNet and EMA bit for bit. Fails on the old code:
    checkpoint-2 was removed before the save, and latest picked the partial checkpoint-4 (FileNotFoundError:
    optimizer.bin). (The same SIGKILLed in a subprocess: /tmp/review_crash/killrun.py.)"""
    import accelerate.accelerator as accelerator_module
    from accelerate.state import AcceleratorState, GradientState

    from recipes.examples.train_unconditional import main

    images = make_image_folder(("circles", "squares"), per_class=8)

    def run(out, *extra):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return main(["--train_data_dir", str(images), "--output_dir", str(out), "--resolution", "16",
                     "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--use_ema",
                     "--lr_warmup_steps", "1", "--no-analyze", "--checkpointing_steps", "2",
                     "--checkpoints_total_limit", "1", *extra])

    straight = run(tmp_path / "straight")
    original = accelerator_module.save_accelerator_state

    def killed_in_checkpoint_4(output_dir, *args, **kwargs):
        if "checkpoint-4" in str(output_dir):
            raise _Killed
        return original(output_dir, *args, **kwargs)

    monkeypatch.setattr(accelerator_module, "save_accelerator_state", killed_in_checkpoint_4)
    with pytest.raises(_Killed):
        run(tmp_path / "killed")
    monkeypatch.setattr(accelerator_module, "save_accelerator_state", original)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = run(tmp_path / "killed", "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == 4
    assert all(torch.equal(p, q) for p, q in zip(straight["model"].parameters(), resumed["model"].parameters()))
    assert all(torch.equal(p, q)
               for p, q in zip(straight["ema_model"].shadow_params, resumed["ema_model"].shadow_params))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-4"]


# -- faults found and left open ----------------------------------------------------------------------------------------
def test_an_interrupt_between_a_recorded_step_and_the_analyzers_listener_is_not_lost(monkeypatch):
    """Ctrl-C arriving as the tracker calls its listeners (``_recorded``) after step 2 was committed: the update is in
    the weights and the ledgers, and the trainer counts it; the run goes on. The analyzer's bookkeeping of that step
    (its bins, global step numbers, owed records) never ran and nothing notices: its ``bin_counts`` and
    ``global_steps`` hold one step fewer than its ledgers, and the continued run's state differs from the straight
    run's. (The GAN analyzer the same: ``d_group_counts``, ``d_loop_steps``; found by an injection sweep.) A fix: mark
    the listeners owed in ``_commit`` and run them at the next step, save or report, as the diffusion analyzer makes
    its owed records."""
    straight = _ddpm(ring(64))
    straight.train(3)
    trainer = _ddpm(ring(64))
    trainer.train(1)
    original, calls = Tracker._recorded, [0]

    def interrupted(self, result):
        calls[0] += 1
        if calls[0] == 1:
            raise KeyboardInterrupt
        return original(self, result)

    monkeypatch.setattr(Tracker, "_recorded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(1)
    trainer.train(3 - trainer.global_step)
    same(straight.state_dict(), trainer.state_dict())


def test_out_of_memory_in_the_gan_analyzers_window_statistics_lets_the_run_go_on(monkeypatch):
    """GANTrainer with the GAN analyzer (window 2): out of memory while the first coupling window is closed (clustering
    and statistics after generator step 2 was recorded): ``train`` again should end where the straight run ends, the
    window closed at the next opportunity, as the diffusion analyzer owes its records (snapshot, kernel record, log)
    and makes them later. Here the analyzer refuses every further step, save and report ("the bookkeeping of a
    generator step was interrupted"), so the trainer cannot even checkpoint; the only way on is the last checkpoint.
    The sweep put 14 % of a generator step's Python calls (1663-1928 of 1928) in that refusing stretch."""
    from genkernel.gan import GANKernelAnalyzer

    def make():
        torch.manual_seed(0)
        generator = MLPGenerator(2, 2, hidden=16, depth=2).double()
        critic = DropoutCritic().double()
        analyzer = GANKernelAnalyzer(generator, critic, probe_latents=torch.randn(8, 2, dtype=torch.float64),
                                     num_groups=3, window=2, eval_every=2, coverage_latents=16)
        return GANTrainer(generator, critic, ring(64), batch_size=16, d_steps=1, seed=3, loss="hinge",
                          callbacks=[analyzer])

    straight = make()
    torch.manual_seed(5)
    straight.train(3)
    failed = make()
    torch.manual_seed(5)
    original, calls = GANKernelAnalyzer._close_window, [0]

    def failing(self, index):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError(OOM)
        return original(self, index)

    monkeypatch.setattr(GANKernelAnalyzer, "_close_window", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        failed.train(3)
    failed.train(3)
    same(straight.state_dict(), failed.state_dict())
