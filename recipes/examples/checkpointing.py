"""The checkpoint plumbing the accelerate examples share, as diffusers' training scripts write it, made exact
(and genkernel's own options of the examples, :func:`add_analyzer_arguments`).

Upstream's scripts save ``accelerator.save_state(OUT/checkpoint-STEP)`` every ``--checkpointing_steps``
optimizer steps (the oldest removed beyond ``--checkpoints_total_limit``), with save/load hooks that write the
UNet and its ``EMAModel`` in diffusers' format, and resume with ``--resume_from_checkpoint`` (a folder, or
``latest``) by skipping the resumed epoch's first steps. Their resume is not exact mid-epoch: ``load_state``
puts back the random states as of the checkpoint, so the skipped batches are loaded and augmented from those
states and the shuffle and draws that follow are not the uninterrupted run's. :class:`EpochRNG` keeps the
random states as each epoch began in the checkpoints instead; a resumed epoch restores them before
``iter()`` and its skipped steps draw what they drew (the examples' loops do so), so the run goes on as the
uninterrupted one did. The checkpoints also record the options a resume must share (:func:`resume_settings`):
upstream's resume goes on from ``global_step`` times the accumulation batches into the epoch, so a resume with
another ``--train_batch_size`` or ``--gradient_accumulation_steps`` went on from another batch, silently; here it
is refused, naming the option, as is every other option that changes what the resumed run trains or records (the
data's, the loss's, the optimizer's and schedule's, the seed, the processes' count; data folders by content): only
the output, the length (a decaying schedule stretched is warned of), the checkpointing and ``--analyze`` may change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Upstream's checkpoint options: ``--checkpointing_steps``, ``--checkpoints_total_limit``,
    ``--resume_from_checkpoint`` (checked by :func:`check_checkpoint_arguments`)."""
    parser.add_argument("--checkpointing_steps", type=int, default=500,
                        help="save the training state (accelerator.save_state) every this many optimizer steps")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None,
                        help="keep at most this many checkpoints (the oldest are removed)")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='a checkpoint folder to resume from (OUT/checkpoint-STEP), or "latest" in --output_dir')


def add_analyzer_arguments(parser: argparse.ArgumentParser, probes: str = "latent") -> None:  # genkernel
    """genkernel's options of the examples: ``--analyze`` / ``--no-analyze``, ``--num_bins``, ``--num_probes`` (``probes``:
    what a probe holds beside its noise level, "latent" or "image") and ``--controls``."""
    parser.add_argument("--analyze", action=argparse.BooleanOptionalAction, default=True,
                        help="keep genkernel's noise-level ledger (default on)")
    parser.add_argument("--num_bins", type=int, default=10, help="training-timestep bins (groups)")
    parser.add_argument("--num_probes", type=int, default=16, help=f"probe ({probes}, noise level) pairs")
    parser.add_argument("--controls", type=int, default=1, help="label-permutation controls")


def check_analyzer_arguments(args: argparse.Namespace) -> None:  # genkernel
    """A ValueError naming ``--num_probes`` when it is below 2, before anything is built or generated (the analyzer's
    kernel structure needs two probes; 0 failed in torch.stack, 1 after train_dreambooth.py generated its class
    images)."""
    if getattr(args, "analyze", True) and args.num_probes < 2:
        raise ValueError(f"--num_probes must be at least 2 (the kernel structure compares probes), got {args.num_probes}")


def check_clipping_and_snr(args: argparse.Namespace) -> None:
    """A ValueError naming ``--max_grad_norm`` unless it is a positive number (``clip_grad_norm_`` clamps its
    coefficient max_norm / ‖g‖ from above only: a negative one reverses the gradient, 0 zeroes it), or ``--snr_gamma``
    unless it is positive (Min-SNR's weights min(SNR, γ) / SNR would be negative, or zero)."""
    max_grad_norm = getattr(args, "max_grad_norm", None)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"--max_grad_norm must be a positive number (inf: no clipping), got {max_grad_norm}: "
                         "clip_grad_norm_ multiplies the gradient by max_norm / its norm, so a negative one reverses it")
    snr_gamma = getattr(args, "snr_gamma", None)
    if snr_gamma is not None and not (math.isfinite(snr_gamma) and snr_gamma > 0):
        raise ValueError(f"--snr_gamma must be a finite positive number (5.0 is common), got {snr_gamma}: the Min-SNR "
                         "weights min(SNR, gamma) / SNR would be negative (gradient ascent) or zero")


def check_image_folder(folder: str, option: str) -> None:
    """A ValueError naming ``option`` and the layout to use when ``folder`` is not a torchvision ``ImageFolder``
    (one sub-folder of images per class): missing or a file, no sub-folder (the images put in it directly), or a
    sub-folder without an image file (another data set's files, MNIST's idx files, an empty or stray folder), each of
    which torchvision's ``ImageFolder`` refuses. Returns None.

    Called first thing in each script's ``main``: torchvision's own FileNotFoundError came from deep inside
    ``ImageFolder`` after the accelerator, the model and the output folder were made, and for the images put in
    the folder directly it said "Couldn't find any class folder", naming no fix."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    layout = f"{option} DIR needs one sub-folder of images per class (DIR/<class>/<name>.png; one class is fine)"
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"{option} {folder} {what}: {layout}")
    entries = list(os.scandir(folder))
    classes = sorted(e.name for e in entries if e.is_dir())  # every sub-folder, hidden ones too, as torchvision's
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if not classes:
        found = (f"its {len(loose)} images lie in it directly; {layout}: move them to e.g. "
                 f"{os.path.join(folder, 'images')}") if loose else f"it holds no sub-folder (no image); {layout}"
        raise ValueError(f"{option} {folder}: {found}")

    def has_image(path: str) -> bool:
        return any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(path, followlinks=True) for f in files)

    # (ImageFolder refuses a class folder without an image, a stray .ipynb_checkpoints among them too)
    empty = [name for name in classes if not has_image(os.path.join(folder, name))]
    if empty:
        raise ValueError(f"{option} {folder}: no image file ({', '.join(IMG_EXTENSIONS)}) in its sub-folder(s) "
                         f"{empty[:5]} (another data set's files? an empty or stray folder?): remove them or put "
                         f"images in them; {layout}")


SINGLE_PROCESS = argparse.Namespace(is_main_process=True)
"""The ``accelerator`` argument of :func:`write_report` and :func:`drop_stale_report` in a script that runs in one
process without accelerate (recipes/examples/dcgan.py): it is the main process."""


def drop_stale_report(accelerator, output_dir: str) -> None:  # genkernel
    """An unanalyzed run's end: the ``genkernel_report.json`` an earlier run left in ``output_dir`` is removed (with a
    warning), so that it is not read as the report of the model this run saves there."""
    path = os.path.join(output_dir, "genkernel_report.json")
    if accelerator.is_main_process and os.path.isfile(path):
        warnings.warn(f"{path} was written by an earlier run, not this one (--no-analyze): removed, as the model it "
                      "describes is replaced", stacklevel=2)
        os.remove(path)


def training_length(dataloader, gradient_accumulation_steps: int, max_train_steps: int | None,
                    num_train_epochs: int) -> tuple[int, int, int]:
    """``(optimizer steps an epoch, steps to train, epochs)`` of ``dataloader``: ``max_train_steps`` when given (as
    upstream, it overrides the epochs, more as well as fewer), else ``num_train_epochs`` epochs. Counted before
    ``accelerator.prepare`` for the learning-rate schedule (upstream's) and again after it, from this process's shard
    of the batches: :func:`resume_position` places a checkpoint's step in its epoch by that count (counted on the
    whole loader, a run on N processes resumed mid-epoch landed in another epoch and trained batches again)."""
    per_epoch = math.ceil(len(dataloader) / gradient_accumulation_steps)
    steps = max_train_steps or num_train_epochs * per_epoch
    return per_epoch, steps, math.ceil(steps / per_epoch)


def check_checkpoint_arguments(args: argparse.Namespace) -> None:
    """A ValueError naming ``--checkpointing_steps`` or ``--checkpoints_total_limit`` when one is below 1."""
    for name in ("checkpointing_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")


class EpochRNG:
    """The random states (torch's, CUDA's, numpy's, Python's, and ``generator``'s: the shuffle's
    generator that accelerate shares between processes, when it keeps one) as the current epoch began, for
    the checkpoints (``accelerator.register_for_checkpointing``): a run resumed mid-epoch puts them back
    before ``iter()`` and replays the epoch's first steps' draws, so that it goes on as the uninterrupted
    run did (``load_state``'s own random states, as of the checkpoint, would draw another shuffle and
    augment the skipped batches again)."""

    def __init__(self, generator: torch.Generator | None = None, settings: dict[str, Any] | None = None) -> None:
        self.generator = generator
        self.state: dict[str, Any] = {}
        # the run's options a resume must share (``--mixed_precision``: the probes are encoded in its dtype, and the
        # analyzer's saved state of the other one is refused as "other probe values", not naming the option)
        self.settings = dict(settings or {})

    def record(self, epoch: int) -> None:
        self.state = {"epoch": epoch, "torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                      "numpy": np.random.get_state(), "python": random.getstate(),
                      "generator": None if self.generator is None else self.generator.get_state()}

    def restore(self, epoch: int) -> None:
        if self.state.get("epoch") != epoch:
            raise ValueError(f"the checkpoint's random states are those of epoch {self.state.get('epoch')}, not of "
                             f"epoch {epoch} that it resumes: resume from a checkpoint that this script wrote")
        torch.set_rng_state(self.state["torch"])
        if self.state["cuda"]:
            torch.cuda.set_rng_state_all(self.state["cuda"])
        np.random.set_state(self.state["numpy"])
        random.setstate(self.state["python"])
        if self.generator is not None and self.state["generator"] is not None:
            self.generator.set_state(self.state["generator"])

    def state_dict(self) -> dict[str, Any]:
        return {**self.state, "settings": dict(self.settings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load the epoch's random states; a ValueError naming the options in which the checkpoint's run and this
        one differ (a checkpoint written before it recorded them is not compared)."""
        state = dict(state)
        saved = state.pop("settings", None) or {}
        differ = [f"--{key} {saved[key]} (here {value})" for key, value in self.settings.items()
                  if key in saved and saved[key] != value and key not in WARNED_SETTINGS]
        if differ:
            raise ValueError(f"the checkpoint was saved by a run with {', '.join(differ)}: resume with the same options")
        for key in WARNED_SETTINGS:
            if key in saved and key in self.settings and saved[key] != self.settings[key]:
                here = self.settings[key]
                warnings.warn(f"the checkpoint's run scheduled its learning rate (--lr_scheduler {here['lr_scheduler']}) "
                              f"over {saved[key]['length']}, this one over {here['length']}: from the checkpoint on, "
                              "the rates follow the new schedule, not the one its first steps followed", stacklevel=2)
        self.state = state


# Options a resume may change: where things go, how long the run is and how often it is saved, whether it is analyzed;
# class images generated in batches of --sample_batch_size are compared as the class folder's content; the initial
# weights of a model a checkpoint holds (--controlnet_model_name_or_path) are replaced by the checkpoint's
RESUME_MAY_DIFFER = frozenset({
    "output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "max_train_steps", "num_train_epochs", "num_epochs", "analyze", "sample_batch_size",
    "controlnet_model_name_or_path",
})
# The analyzer's options, compared when both runs analyze (a run resumed with --no-analyze, or analyzed from a
# checkpoint saved without the analyzer, keeps no ledger of the checkpoint's)
ANALYZER_SETTINGS = ("num_bins", "num_probes", "controls")
# Settings whose change is warned of, not refused: a resume that trains longer is allowed, and stretches a decaying
# learning-rate schedule (its length is the run's) from the checkpoint on
WARNED_SETTINGS = frozenset({"lr_schedule_length"})
# A data set's files are read whole until this many bytes in all (a CIFAR-10 or a DreamBooth folder entirely, in about
# a second, once per run); past it, each further file by its first and last SAMPLED_BYTES
FULL_CONTENT_BYTES = 512 << 20
SAMPLED_BYTES = 1 << 16
_READ_BYTES = 1 << 20


def path_fingerprint(path: str) -> str:
    """A fingerprint of a file's or folder's content as a resume compares it: the relative names and sizes of the
    files under it (in name order) and their content, every byte of the files until :data:`FULL_CONTENT_BYTES` are
    read, past it each file's first and last :data:`SAMPLED_BYTES` (an edit inside only the middle of such a file
    goes unseen). A folder moved or copied elsewhere keeps it; another data set (other images, another subset,
    edited captions, an array file of the same size with other values) does not."""
    digest = hashlib.sha256()
    files = [("", path)] if os.path.isfile(path) else sorted(_walked_files(path))
    read = 0
    for relative, full in files:
        size = os.path.getsize(full) if os.path.exists(full) else -1  # (a dangling link: by its name)
        whole = 0 <= size and read + size <= FULL_CONTENT_BYTES
        digest.update(f"{relative}\0{size}\0{'whole' if whole else 'ends'}\0".encode())
        if size < 0:
            continue
        with open(full, "rb") as file:
            if whole:
                read += size
                while chunk := file.read(_READ_BYTES):
                    digest.update(chunk)
            else:
                digest.update(file.read(SAMPLED_BYTES))
                file.seek(max(0, size - SAMPLED_BYTES))
                digest.update(file.read(SAMPLED_BYTES))
    return f"sha256:{digest.hexdigest()[:16]} ({len(files)} files)"


def _walked_files(path: str) -> list[tuple[str, str]]:
    """``(relative name, path)`` of every file under ``path``, linked folders followed once each (a link back up the
    tree would otherwise be walked until the names grow too long)."""
    seen, out = set(), []
    for root, folders, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        out += [(os.path.relpath(os.path.join(root, name), path), os.path.join(root, name)) for name in names]
    return out


def resume_settings(args, **more: Any) -> dict[str, Any]:
    """What a checkpoint's run and the run resuming it must share (:class:`EpochRNG`'s ``settings``): every option
    of ``args`` but those a resume may change (:data:`RESUME_MAY_DIFFER`: the output, the length, the checkpointing,
    ``--analyze``), the analyzer's (``--num_bins``, ``--num_probes``, ``--controls``) only when analyzing; ``more``:
    a script's own (the scheduler's resolved ``prediction_type``, the base's fingerprint), in place of the options.

    Each changes what a resumed run trains or records, silently: ``--train_batch_size`` and
    ``--gradient_accumulation_steps`` place the resumed epoch's first batch (upstream's ``resume_step`` is
    ``global_step`` times the accumulation, in batches of the size); the data options (``--resolution``,
    ``--center_crop``, ``--random_flip``, ``--dataloader_num_workers``: the augmentations' draws move to the workers,
    ``--max_train_samples``) other examples; the loss's (``--prediction_type``, ``--objective``, ``--snr_gamma``,
    ``--noise_offset``...) another objective; the learning rate's and the optimizer's (``--learning_rate``,
    ``--adam_beta1``..., ``--use_ema``'s) were ignored, ``load_state`` putting back the checkpoint's, or (the
    schedule's ``--lr_scheduler``, ``--lr_warmup_steps``) took effect from the checkpoint on; ``--seed``: the
    analyzer's probes and controls (refused by its state, naming no option), ignored otherwise. Options naming a
    file or folder (``--train_data_dir``, ``--model_config_name_or_path``) are compared by
    :func:`path_fingerprint`, so that the data may move but not change. The length of a decaying schedule
    (``lr_schedule_length``) is warned of when it changes (:data:`WARNED_SETTINGS`): training longer stays allowed."""
    settings: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        if key in RESUME_MAY_DIFFER or (key in ANALYZER_SETTINGS and not getattr(args, "analyze", True)):
            continue
        if isinstance(value, str) and (key.endswith("_dir") or key.endswith("_path")) and os.path.exists(value):
            value = path_fingerprint(value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        settings[key] = value
    scheduler = getattr(args, "lr_scheduler", None)
    if scheduler is not None and scheduler not in ("constant", "constant_with_warmup"):
        if hasattr(args, "num_epochs"):  # (train_unconditional.py: the schedule's length is --num_epochs')
            length = f"--num_epochs {args.num_epochs}"
        elif getattr(args, "max_train_steps", None):
            length = f"--max_train_steps {args.max_train_steps}"
        else:
            length = f"--num_train_epochs {getattr(args, 'num_train_epochs', None)}"
        settings["lr_schedule_length"] = {"lr_scheduler": scheduler, "length": length}
    # the processes' count (accelerate launch --num_processes): each optimizer step takes a batch from each, so that
    # resume_step, counted in one process's batches, lands elsewhere in the epoch with another count
    from accelerate.state import PartialState

    if PartialState._shared_state:  # (an Accelerator is made: the scripts make theirs first)
        settings["num_processes"] = PartialState().num_processes
    settings.update(more)
    return settings


def _non_finite(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``value`` with every float that is NaN or infinite replaced by None, and the places of those (``a.b[2]``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "(the report)"]
    if isinstance(value, dict):
        out, places = {}, []
        for key, item in value.items():
            out[key], found = _non_finite(item, f"{path}.{key}" if path else str(key))
            places += found
        return out, places
    if isinstance(value, (list, tuple)):
        out, places = [], []
        for index, item in enumerate(value):
            clean, found = _non_finite(item, f"{path}[{index}]")
            out.append(clean)
            places += found
        return out, places
    return value, []


def write_report(accelerator, output_dir: str, analyzer, sections: Callable[[], dict[str, Any]] = dict) -> None:  # genkernel
    """The end of an analyzed run: ``analyzer.finish()`` on every rank (the kernel structure at the final weights),
    then the main process writes ``analyzer.report()`` with ``sections()`` added to ``OUT/genkernel_report.json``
    as strict JSON (every rank holds the same ledger, one writes it).

    The file is replaced at once (written beside it, then ``os.replace``): a run that fails while writing it, or
    whose report does not serialize, leaves the report that was there (a resumed run's folder) whole, not a
    truncated or empty file. A value that is NaN or infinite is written as null, its places listed under
    ``"non_finite"`` and warned of: strict JSON holds neither, and refusing it here, at the end of training,
    lost the trained model that the scripts save after the report."""
    analyzer.finish()
    if not accelerator.is_main_process:
        return
    report = analyzer.report()
    report.update(sections())
    report, places = _non_finite(report)
    if places:
        report["non_finite"] = places
        warnings.warn(f"the report's {', '.join(places)} were not finite: written as null (listed under "
                      "\"non_finite\")", stacklevel=2)
    text = json.dumps(report, allow_nan=False, indent=1)
    from genkernel.core.tracking.io import atomic_file

    with atomic_file(os.path.join(output_dir, "genkernel_report.json"), "w") as file:
        file.write(text)


def saved_checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-STEP`` folders in ``output_dir`` (none when it does not exist), oldest first: the
    listing upstream writes twice, for ``--resume_from_checkpoint latest`` and ``--checkpoints_total_limit``
    (other names beginning "checkpoint", such as a "checkpoint-old" of one's own, are left alone: upstream's
    ``int()`` of their step failed)."""
    dirs = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    dirs = [d for d in dirs if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    return sorted(dirs, key=lambda x: int(x.split("-")[1]))


def save_checkpoint(accelerator, output_dir: str, global_step: int, total_limit: int | None) -> None:
    """``accelerator.save_state(output_dir/checkpoint-STEP)``, then removing the oldest checkpoints so that at
    most ``total_limit`` remain with the new one (upstream's ``--checkpoints_total_limit``).

    Atomic, as genkernel's own checkpoints: the state is written into a hidden ``.checkpoint-STEP.partial`` folder
    and renamed to ``checkpoint-STEP`` once complete, and older checkpoints are removed only after that. Upstream
    removed them first and wrote in place: a save killed half-way (SIGKILL, a full disk) left a
    ``checkpoint-STEP`` without its optimizer, random states or analyzer state, which ``--resume_from_checkpoint
    latest`` then picked (a FileNotFoundError, or, cut off after the random states, a resume that silently
    started the analyzer afresh), and under ``--checkpoints_total_limit 1`` no complete checkpoint was left."""
    final = os.path.join(output_dir, f"checkpoint-{global_step}")
    partial = os.path.join(output_dir, f".checkpoint-{global_step}.partial")
    if os.path.isdir(partial):  # (left by a save killed half-way)
        shutil.rmtree(partial)
    accelerator.save_state(partial)
    _sync_tree(partial)  # (its files whole on disk before the rename makes it the checkpoint a resume picks)
    if os.path.isdir(final):  # (a run resumed from this step saving it again): replaced, never half there
        replaced = os.path.join(output_dir, f".checkpoint-{global_step}.replaced")
        if os.path.isdir(replaced):
            shutil.rmtree(replaced)
        os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced)
    else:
        os.replace(partial, final)
    from genkernel.core.tracking.io import fsync_directory

    fsync_directory(output_dir)  # (the rename kept through a power loss before older checkpoints are removed)
    if total_limit is not None:
        # The oldest of the others, so that total_limit remain with the new one (as upstream, which removed them before
        # the save): never the new one, which a run resumed from an earlier checkpoint writes below later ones.
        others = [name for name in saved_checkpoints(output_dir) if name != os.path.basename(final)]
        for removing in others[: max(0, len(others) - total_limit + 1)]:
            shutil.rmtree(os.path.join(output_dir, removing))


def _sync_tree(folder: str) -> None:
    """fsync every file under ``folder``, then every folder in it and ``folder`` itself (deepest first): the
    state ``save_state`` wrote there survives a power loss once renamed (unsynced, the renamed checkpoint could come
    back with empty files after the older ones were removed under ``--checkpoints_total_limit``)."""
    from genkernel.core.tracking.io import fsync_directory, fsync_file

    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_directory(root)


def register_unet_hooks(accelerator, model_cls: type, ema_model: Any = None, subfolder: str = "unet") -> None:
    """Upstream's save/load hooks: ``accelerator.save_state`` writes the UNet (a ``model_cls``) in diffusers'
    format under ``unet/`` (and the ``EMAModel`` under ``unet_ema/``); ``load_state`` reads them back offline
    (``local_files_only``). The EMA's save builds a UNet, whose initialization draws from torch's random
    state: forked, so that saving a checkpoint leaves training's draws as they are. ``subfolder``: the trained
    model's folder in the checkpoint (``train_controlnet.py``'s hooks: a ``ControlNetModel`` under
    ``controlnet/``)."""

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema_model is not None:
                with torch.random.fork_rng(devices=[]):
                    ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for model in models:
                model.save_pretrained(os.path.join(output_dir, subfolder))
                weights.pop()  # make sure to pop weight so that corresponding model is not saved again

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            # EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls), read offline
            from diffusers.training_utils import EMAModel

            ema_dir = os.path.join(input_dir, "unet_ema")
            _, ema_kwargs = model_cls.from_config(model_cls.load_config(ema_dir, local_files_only=True),
                                                  return_unused_kwargs=True)
            ema_unet = model_cls.from_pretrained(ema_dir, local_files_only=True)
            load_model = EMAModel(ema_unet.parameters(), model_cls=model_cls, model_config=ema_unet.config)
            load_model.load_state_dict(ema_kwargs)
            ema_model.load_state_dict(load_model.state_dict())
            ema_model.to(accelerator.device)
            del load_model, ema_unet
        for _ in range(len(models)):
            model = models.pop()  # pop models so that they are not loaded again
            load_model = model_cls.from_pretrained(input_dir, subfolder=subfolder, local_files_only=True)
            model.register_to_config(**load_model.config)
            model.load_state_dict(load_model.state_dict())
            del load_model

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


class _DroppedState:
    """Takes a checkpointed object's state that this run does not use (:func:`resume_position`) and keeps none."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Any) -> None:
        pass


def resume_position(args: argparse.Namespace, accelerator, num_update_steps_per_epoch: int,
                    attach: Sequence[Any] = ()) -> tuple[int, int, int]:
    """Load ``args.resume_from_checkpoint`` (a ``checkpoint-STEP`` folder as given, or its base name in
    ``args.output_dir``, or "latest" there) with ``accelerator.load_state``; returns ``(global_step, first_epoch,
    resume_step)``: the optimizer steps made, the epoch to go on in and the micro-batches of it to skip
    (``(0, 0, 0)`` without a checkpoint; "latest" with none starts afresh, as upstream). A folder that is not
    there, or not named ``checkpoint-STEP``, is a ValueError naming it.

    ``attach``: objects to register for checkpointing (an analyzer). From a checkpoint that holds their states
    they are registered before it is loaded, so they go on where it left them; from one saved without them (a
    run trained so far without the analyzer) after, so they start at the checkpoint's step (accelerate's
    ``load_state`` refuses a registered object whose file is missing). States the checkpoint holds of objects this
    run does not register (the analyzer's, resumed with ``--no-analyze``) are left out."""
    if not args.resume_from_checkpoint:
        for item in attach:
            accelerator.register_for_checkpointing(item)
        return 0, 0, 0
    if args.resume_from_checkpoint != "latest":
        path = args.resume_from_checkpoint  # a folder as given, or (upstream) its base name in --output_dir
        if not os.path.isdir(path):
            path = os.path.join(args.output_dir, os.path.basename(os.path.normpath(path)))
        if not os.path.isdir(path):
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder "
                             f"(nor {path}): give a checkpoint-STEP folder that a run saved, or 'latest'")
    else:
        dirs = saved_checkpoints(args.output_dir)
        path = os.path.join(args.output_dir, dirs[-1]) if dirs else None
    if path is None:
        accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
        args.resume_from_checkpoint = None
        return resume_position(args, accelerator, num_update_steps_per_epoch, attach)
    name = os.path.basename(os.path.normpath(path))
    if not (name.startswith("checkpoint-") and name.split("-")[1].isdigit()):
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: {name!r} is not named "
                         "checkpoint-STEP (the optimizer steps at its save): give a folder this script saved")
    # accelerate saves the i-th registered object as custom_checkpoint_i.pkl
    saved_with = os.path.isfile(os.path.join(path, f"custom_checkpoint_{len(accelerator._custom_objects)}.pkl"))
    for item in attach if saved_with else ():
        accelerator.register_for_checkpointing(item)
    # States the checkpoint holds of objects this run does not register (an analyzer's, resumed with --no-analyze):
    # accelerate's load_state refuses a folder with more of them than registered objects, so they are read into
    # placeholders and dropped; the checkpoints this run saves hold none
    held = sum(re.fullmatch(r"custom_checkpoint_\d+\.pkl", f) is not None for f in os.listdir(path))
    dropped = [_DroppedState() for _ in range(held - len(accelerator._custom_objects))]
    for placeholder in dropped:
        accelerator.register_for_checkpointing(placeholder)
    accelerator.print(f"Resuming from checkpoint {path}")
    accelerator.load_state(path)
    for placeholder in dropped:
        accelerator._custom_objects.remove(placeholder)
    if dropped:
        accelerator.print(f"{len(dropped)} state(s) in the checkpoint of objects this run does not attach (an analyzer's, "
                          "resumed without it) are left out")
    for item in () if saved_with else attach:
        accelerator.print(f"{type(item).__name__} starts at step {name.split('-')[1]}: the checkpoint holds no state of it")
        accelerator.register_for_checkpointing(item)
    global_step = int(name.split("-")[1])
    resume_global_step = global_step * args.gradient_accumulation_steps
    first_epoch = global_step // num_update_steps_per_epoch
    resume_step = resume_global_step % (num_update_steps_per_epoch * args.gradient_accumulation_steps)
    return global_step, first_epoch, resume_step
