"""Atomic checkpoint files and safe loading.

Every state genkernel writes (ledgers, trackers, analyzers, trainers) goes through
:func:`atomic_save`: a temporary file in the same folder, flushed and fsynced, then renamed over
the target, and the folder fsynced, so a save interrupted half-way (a kill, a full disk, a power loss)
leaves the previous file intact or the new one whole. Other files written by rename (reports, logs,
JSON results) go through :func:`atomic_file`, the same steps for any writer.
Left-over temporary files of interrupted saves are removed by the next save to the same path on the
same host (a temporary file of a process still running, such as another rank saving the same path, is
kept).
:func:`load_state` reads them back with ``weights_only=True``: plain containers, numbers,
strings and tensors only, never arbitrary pickled objects. :func:`jsonable` turns results into
strict JSON for the reports written beside them.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import math
import os
import pickle
import socket
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import torch
import torch.utils._pytree as pytree


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path`` (:func:`atomic_file`)."""
    with atomic_file(path, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as error:
            # torch.save reports a full disk as a RuntimeError from its zip writer ("enforce fail ..."): a write
            # failure like any other (atomic_file says the previous file is intact); anything else is raised as is
            if "write" not in str(error).lower() and "enforce" not in str(error).lower():
                raise
            raise OSError(getattr(error, "errno", None), str(error)) from error


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO]:
    """An open handle (``mode`` "w" or "wb", ``encoding`` and ``newline`` as :func:`open`'s) on a new temporary file
    beside ``path``, of a name no other writer uses (this host, this process, a unique tail: concurrent writers of the
    same path, ranks or threads, never share one); on a clean exit its data flushed and fsynced, renamed over
    ``path``, and the folder fsynced, so a write interrupted half-way (a kill, a full disk, a power loss) leaves the
    previous file intact or the new one whole; on an error the temporary file removed and ``path`` untouched. The
    new file keeps the old one's permission bits, or what :func:`open` would give (0666 less the umask). Every file
    genkernel and its recipes write by rename goes through here: checkpoints (:func:`atomic_save`), reports, logs,
    JSON results.

    A failure to write, sync or rename raises OSError naming ``path`` and saying the previous file is intact;
    one syncing the folder after the rename (the new file in place by then) is raised as itself."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_left_over_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}~{os.getpid()}~", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            # mkstemp makes the file owner-only (0600), and the rename kept that: every save turned a
            # shared results file unreadable to the group
            try:
                os.fchmod(handle.fileno(), target_mode(path))
            except OSError:  # a file system without modes (some network mounts): the save still matters more
                pass
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(error.errno, f"could not write {path} ({error.strerror or error}); the previous file, if any, is "
                      f"intact{_write_advice(error.errno)}") from error
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The rename is an entry in the folder: until the folder is synced, a power loss may bring back the old entry
    # (or, on some file systems, keep the new name with the data lost). After the error handling above: the file
    # is in place by now, so a failure here must not say "the previous file is intact".
    fsync_directory(path.parent)


# errno values of a write that ran out of room (None: torch.save's zip writer, which reports no errno), and of a
# folder that cannot be written: what the advice of atomic_file's error names
_FULL_DEVICE = frozenset(v for v in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EIO) if v)
_NOT_WRITABLE = frozenset((errno.EACCES, errno.EPERM, errno.EROFS))


def _write_advice(code: int | None) -> str:
    """The fix :func:`atomic_file`'s error names for a write that failed with ``code``: room on the device, a folder
    that can be written, or none (an error of the writer's own, a missing font while drawing a figure: its message
    says what it is)."""
    if code is None or code in _FULL_DEVICE:
        return ": free disk space or choose another folder"
    if code in _NOT_WRITABLE:
        return ": choose a folder you can write to"
    return ""


def fsync_file(path: str | os.PathLike) -> None:
    """fsync the closed file at ``path``: its data on disk before a rename makes it the one a reader finds."""
    # (Windows' fsync, _commit, needs a handle open for writing; POSIX fsyncs a read-only one, which a file already
    # given a read-only mode still opens)
    fd = os.open(path, os.O_RDWR | os.O_BINARY if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A folder's fsync refused where the platform or file system has none: Windows opens no folder (EACCES), some
# network and FUSE file systems answer EINVAL / ENOTSUP. Skipped quietly (nothing more can be done there); a real
# I/O error (EIO) is raised.
_NO_FOLDER_SYNC = frozenset(getattr(errno, name) for name in (
    "EINVAL", "ENOTSUP", "EOPNOTSUPP", "EBADF", "EACCES", "EPERM", "EISDIR", "ENOSYS", "ENOTDIR")
    if hasattr(errno, name))


def fsync_directory(folder: str | os.PathLike) -> None:
    """fsync ``folder``, so that the entries renamed into it last survive a power loss; skipped quietly on a
    platform or file system without a folder's fsync (Windows, some network mounts)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        if error.errno in _NO_FOLDER_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _NO_FOLDER_SYNC:
            raise
    finally:
        os.close(fd)


_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def _remove_left_over_temporaries(path: Path) -> None:
    """Remove the temporary files that saves to ``path`` killed half-way left: those this host's
    processes made that are no longer running, and those of the unnamed form earlier versions wrote.
    A temporary file of a live process (another rank or thread saving the same path at this moment:
    removing it made that save fail) and one another host made (its process cannot be seen from
    here) are kept."""
    prefix = f".{path.name}."
    for stale in glob.glob(str(path.parent / f"{glob.escape(prefix)}*.tmp")):
        owner = os.path.basename(stale)[len(prefix):-len(".tmp")].split("~")
        if len(owner) == 3:
            host, pid = owner[0], owner[1]
            if host != _HOST or not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
                continue
        try:
            os.unlink(stale)
        except OSError:
            pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's process, or one we cannot ask about
        return True
    return True


def target_mode(path: Path) -> int:
    """The permission bits a save to ``path`` should leave: the existing file's, else 0666 less the
    process umask (read from /proc where it is there, since os.umask can only be read by setting it)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    umask = None
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def load_state(path: str | os.PathLike, expected_format: str | None = None) -> dict[str, Any]:
    """A state written by :func:`atomic_save`, loaded with ``weights_only=True`` onto the CPU.

    ``expected_format``: the ``"format"`` entry the state must carry (a clear error otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no genkernel state at {path}")
    _check_records(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message advises weights_only=False, which would run whatever the file holds.
        raise ValueError(
            f"{path} is not a genkernel state file: the safe (weights_only) loader refused it, so it holds objects "
            "other than tensors, numbers, strings and containers (or is not a torch.save file at all); genkernel "
            "never writes such objects and never unpickles them (that could run arbitrary code): pass a file "
            f"written by save_checkpoint / save ({str(error).splitlines()[0][:120]})"
        ) from error
    except OSError as error:
        # torch's zip reader reports a file cut off past its first records as EINVAL ("[Errno 22] Invalid
        # argument"), without the path: a truncated checkpoint, not an I/O problem of the caller's
        if error.errno != errno.EINVAL:
            raise
        raise ValueError(
            f"{path} is not a readable genkernel state file (truncated, empty, or another format: "
            f"{type(error).__name__}: {error}); pass a file written by save_checkpoint / save"
        ) from error
    except Exception as error:  # a truncated, empty or foreign file: RuntimeError, EOFError, KeyError, ...
        raise ValueError(
            f"{path} is not a readable genkernel state file (truncated, empty, or another format: "
            f"{type(error).__name__}: {error}); pass a file written by save_checkpoint / save"
        ) from error
    if expected_format is not None and (not isinstance(state, dict) or state.get("format") != expected_format):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} holds {found!r}, not a {expected_format!r} state")
    return state


def _check_records(path: Path) -> None:
    """Raise a ValueError naming the record of ``path`` (a ``torch.save`` zip archive) whose bytes do not match the
    CRC-32 its writer recorded: torch's reader does not check them, so a bit flipped on disk or in a copy loaded
    silently, as other parameters, ledger sums or optimizer moments. Records written without a checksum (CRC 0:
    ``torch.utils.serialization.config.save.compute_crc32 = False``) and files that are not zip archives (torch's
    loader then says what they are) are not checked. Reads the file once more, in blocks of 1 MiB."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 or info.is_dir():
                    continue
                with archive.open(info) as record:
                    while record.read(1 << 20):
                        pass
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"{path} is corrupted: {error} (its bytes differ from those written; a damaged disk or copy): "
            "load an intact copy, or an earlier checkpoint"
        ) from error
    except (OSError, EOFError, NotImplementedError, RuntimeError):  # (a cut-off or foreign archive: torch's loader says what)
        return


def global_rng_state() -> dict[str, Any]:
    """The global RNG states a training step may draw from (dropout, stochastic layers, a
    DataLoader without a ``generator``): ``{"cpu": ByteTensor, "cuda": [ByteTensor per device]}``
    (``cuda`` empty when CUDA was never initialized). A checkpoint stores them so that a resumed
    run draws what the uninterrupted run draws."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": list(cuda)}


def set_global_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`global_rng_state` returned (CUDA states only where this process has the
    same number of CUDA devices: a run resumed on another machine cannot repeat its draws anyway)."""
    torch.set_rng_state(state["cpu"])
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def check_resume_config(saved: Mapping[str, Any] | None, here: Mapping[str, Any], what: str) -> None:
    """Raise a ValueError naming every setting in which a checkpoint's run (``saved``) and this
    trainer (``here``) differ: resuming would mix two runs into one that is neither. Settings one
    side does not record (an older checkpoint) are not compared."""
    if saved is None:
        return
    differ = [key for key in here if key in saved and saved[key] != here[key]]
    if differ:
        pairs = ", ".join(f"{key}: saved {saved[key]!r}, here {here[key]!r}" for key in differ)
        raise ValueError(
            f"the checkpoint was written by a {what} with other settings ({pairs}); resuming would mix two runs: "
            f"build the {what} as the saved run was (model, dtype, data, batch size, optimizer), or start a new run"
        )


def data_fingerprint(data: torch.Tensor, *columns: torch.Tensor | None, rows: int = 256) -> str:
    """A short hash (SHA-256, 16 hex digits) of up to ``rows`` evenly spaced rows of ``data`` (and of
    each of ``columns`` not None, with as many rows: class labels, conditioning embeddings), as stored:
    what a checkpoint records so that a resume on other data of the same shape (another subset, another
    normalization, shuffled rows) is refused rather than mixed into the run. Reads ``rows`` rows, not
    the whole set (a CIFAR-10 tensor: 3 MB)."""
    picks = torch.linspace(0, data.shape[0] - 1, min(rows, data.shape[0])).round().long()
    digest = hashlib.sha256()
    for tensor in (data, *columns):
        if tensor is not None:
            part = tensor[picks.to(tensor.device)].detach().cpu().contiguous()
            digest.update(str((part.dtype, tuple(tensor.shape))).encode())
            digest.update(part.view(torch.uint8).numpy().tobytes())  # (rows of a tensor: at least one dimension)
    return digest.hexdigest()[:16]


def check_saved_settings(saved: Mapping[str, Any], here: Mapping[str, Any], what: str) -> None:
    """Raise a ValueError naming every setting in which a saved analyzer's state (``saved``) and this
    one (``here``) differ, keys of either side (one the other lacks reads as None), with both values:
    the saved numbers were made under the saved settings and would be extended under others."""
    differ = [key for key in here if saved.get(key) != here[key]] + [key for key in saved if key not in here]
    if differ:
        raise ValueError(
            f"the saved {what} had other {', '.join(differ)} than this one: saved "
            f"{ {k: saved.get(k) for k in differ} }, here { {k: here.get(k) for k in differ} }; build it with the "
            "same settings"
        )


def refuse_tracker_settings(problems: list[tuple[str, Any, Any, str]], trackers: str = "tracker") -> None:
    """Raise a ValueError naming every ``(setting, saved, here, fix)`` in ``problems`` (none: return): a saved
    analyzer state whose ``trackers`` ("tracker", "trackers") were built with other settings than the analyzer
    loading it builds, each fix a constructor argument that fits the state."""
    if not problems:
        return
    were = "were" if trackers.endswith("s") else "was"
    their = "their ledgers" if trackers.endswith("s") else "its ledgers"
    raise ValueError(
        f"the saved analyzer's {trackers} {were} built with other settings than this analyzer builds ("
        + "; ".join(f"{name}: saved {old!r}, here {new!r}" for name, old, new, _ in problems)
        + f"): {their} cannot go on under these. Build the analyzer with "
        + ", ".join(fix for _, _, _, fix in problems) + ", as the saved run's was"
    )


def check_module_state(module: torch.nn.Module, saved: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a ValueError unless ``saved`` (a ``state_dict``) has exactly ``module``'s entries with
    their shapes and dtypes, before anything is loaded (``load_state_dict`` would cast another
    dtype silently and fail half-way on another shape)."""
    mine = module.state_dict()
    problems = [f"{key} missing" for key in mine if key not in saved]
    problems += [f"{key} unexpected" for key in saved if key not in mine]
    for key in mine:
        a, b = mine[key], saved.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            problems.append(f"{key}: saved {b.dtype} {tuple(b.shape)}, here {a.dtype} {tuple(a.shape)}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
        raise ValueError(
            f"the checkpoint's {what} does not fit this {what} ({shown}): build it with the saved run's "
            "architecture and dtype"
        )


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], what: str) -> None:
    """Raise a ValueError unless ``saved`` (an optimizer ``state_dict``) has ``optimizer``'s parameter
    groups with as many parameters each, before anything is loaded (``load_state_dict`` would fail
    half-way, after the model was overwritten)."""
    mine = [len(group["params"]) for group in optimizer.param_groups]
    theirs = [len(group["params"]) for group in saved["param_groups"]]
    if mine != theirs:
        raise ValueError(
            f"the checkpoint's {what} has parameter groups of {theirs} parameters, this one of {mine}: build the "
            f"{what} as the saved run did"
        )


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) moved to ``device``.

    :func:`load_state` reads states onto the CPU so that any machine can open them; a tracker's
    ledgers, group states and saved outputs live beside the model's parameters, so its
    ``load_state_dict`` moves them back there (a CUDA step would otherwise mix devices).
    """
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), value)


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON (what ``json.dumps(..., allow_nan=False)`` accepts): tensors and
    tuples to lists, non-finite floats to None, mapping keys to strings, numpy and torch scalars to
    numbers, anything else to its ``str``. The analyzers' reports and the saved-state
    summaries go through it."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0):
        return jsonable(value.tolist())  # a numpy array too (its .item() refuses more than one element)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


__all__ = [
    "atomic_save", "check_module_state", "check_optimizer_state", "check_resume_config", "atomic_file",
    "fsync_directory", "fsync_file", "global_rng_state", "jsonable", "load_state", "set_global_rng_state",
    "target_mode", "to_device",
]
