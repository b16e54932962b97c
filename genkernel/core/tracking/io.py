"""Atomic checkpoint files and safe loading.

Every state genkernel writes (ledgers, trackers, analyzers, trainers) goes through
:func:`atomic_save`: a temporary file in the same folder, flushed and fsynced, then renamed over
the target, so a save interrupted half-way (a kill, a full disk) leaves the previous file intact.
Left-over temporary files of interrupted saves are removed by the next save to the same path.
:func:`load_state` reads them back with ``weights_only=True``: plain containers, numbers,
strings and tensors only, never arbitrary pickled objects. :func:`jsonable` turns results into
strict JSON for the reports written beside them.
"""

from __future__ import annotations

import glob
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(str(path.parent / f".{glob.escape(path.name)}.*.tmp")):
        try:
            os.unlink(stale)
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # torch.save reports a full disk as a RuntimeError from its zip writer ("enforce fail ...").
        if isinstance(error, RuntimeError) and "write" not in str(error).lower() and "enforce" not in str(error).lower():
            raise
        raise OSError(getattr(error, "errno", None), f"could not write {path} ({getattr(error, 'strerror', None) or error}); "
                      "the previous file, if any, is intact: free disk space or choose another folder") from error
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state(path: str | os.PathLike, expected_format: str | None = None) -> dict[str, Any]:
    """A state written by :func:`atomic_save`, loaded with ``weights_only=True`` onto the CPU.

    ``expected_format``: the ``"format"`` entry the state must carry (a clear error otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no genkernel state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as error:
        raise ValueError(f"{path} is not a readable genkernel state file ({error})") from error
    if expected_format is not None and (not isinstance(state, dict) or state.get("format") != expected_format):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} holds {found!r}, not a {expected_format!r} state")
    return state


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
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
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


__all__ = ["atomic_save", "jsonable", "load_state", "to_device"]
