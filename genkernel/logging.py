"""Streaming a run's numbers while it trains: a logger protocol, TensorBoard and CSV writers, and
the flat metrics of an analyzer's running summaries.

A logger is any callable ``log(metrics: dict[str, float], step: int)``; a writer may also take
images (``log_image(name, array, step)``, an ``[H, W]`` or ``[H, W, 3|4]`` array) and matplotlib
figures (``log_figure(name, figure, step)``). :func:`log_image` and :func:`log_figure` send to
whatever the logger supports and skip the rest, so a plain function is a complete logger::

    def log(metrics, step):
        print(step, metrics["loss"])

Ready-made writers: :class:`TensorBoardWriter` (``pip install genkernel[tensorboard]``; imported
only when built), :class:`CSVWriter` (one wide CSV, images as PNG files beside it) and
:class:`MultiLogger` (several at once).

What the analyzers measure, as flat numbers (:func:`analyzer_metrics`): the ledger's relative
residual, the median rest share and κ, locality (diffusion) or coupling (GAN) as measured minus
control, and traffic shares per group. The mathematics behind each name is in
``docs/summaries.md``. :class:`LoggingCallback` streams the loss of every step and these metrics
every k steps from any genkernel trainer (``callbacks=[analyzer, LoggingCallback(writer,
analyzer=analyzer, every=10)]``), or from your own loop through :meth:`LoggingCallback.log_step`.

This module is ``genkernel.logging``; Python resolves ``import logging`` anywhere (genkernel
included) to the standard library, because imports are absolute.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .core.tracking.callbacks import TrainerCallback
from .core.tracking.io import atomic_file
from .stats import nan_median

__all__ = [
    "CSVWriter", "Logger", "LoggingCallback", "MultiLogger", "TensorBoardWriter", "analyzer_images", "analyzer_metrics",
    "figure_to_array", "image_grid", "ledger_metrics", "log_figure", "log_image", "matrix_image",
]


@runtime_checkable
class Logger(Protocol):
    """What genkernel calls: ``log(metrics, step)`` with plain ``float`` values.

    Writers may add ``log_image(name, array, step)`` (``uint8`` or float in [0, 1], ``[H, W]`` or
    ``[H, W, C]``) and ``log_figure(name, figure, step)``; see :func:`log_image`, :func:`log_figure`.
    """

    def __call__(self, metrics: Mapping[str, float], step: int) -> None: ...


# -- images ----------------------------------------------------------------------------------
def _as_uint8(array: Any) -> np.ndarray:
    """``[H, W]`` or ``[H, W, C]`` as uint8 (floats are read as [0, 1])."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        # read as [0, 1] floats, every value from 1 to 255 would be drawn white
        raise ValueError(f"an integer image must be uint8 (0-255), got {array.dtype}: pass array.astype(np.uint8) "
                         "for 0-255 values, or floats in [0, 1]")
    if array.dtype != np.uint8:
        array = (np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return array


def matrix_image(matrix: Any, *, cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                 cell: int = 16) -> np.ndarray:
    """A matrix as an ``[H, W, 3]`` uint8 image, one ``cell``×``cell`` block per entry.

    Colours: ``matplotlib.colormaps[cmap]`` over ``[vmin, vmax]`` (default: the finite entries' min and max),
    widened to every finite entry beyond a passed end, so no value is drawn at an end's colour as if it were the
    end's value (the image has no colour bar that could say so); a constant range (a constant matrix, or vmin =
    vmax) is widened about its value as the figures' colour scales are
    (:func:`~genkernel.plotting.arrays.colour_range`), so a constant matrix is drawn at the map's middle, not at its
    bottom as its smallest value. A non-finite entry (NaN, ±inf) is drawn mid grey (128, 128, 128), no colour of
    the maps used here. No pyplot and no backend.

    Raises ValueError for a matrix that is not 1- or 2-D, a non-finite or inverted ``vmin``/``vmax``, or a
    ``cell`` below 1.
    """
    import matplotlib

    from .plotting.arrays import colour_range

    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 1:
        raise ValueError(f"cell must be a whole number of pixels >= 1 per entry, got {cell!r}")
    values = matrix.detach().cpu().double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise ValueError(f"matrix_image takes a 2-D matrix, got shape {values.shape}")
    finite = np.isfinite(values)
    data = values[finite]
    if vmin is not None and vmax is not None and float(vmin) > float(vmax):
        raise ValueError(f"matrix_image: vmin {vmin!r} > vmax {vmax!r}: pass vmin <= vmax")
    # the passed ends, widened to the finite entries beyond them: with vmin=0 a negative-only matrix had high < low and
    # was drawn all in the map's bottom colour, and an entry beyond a passed end in that end's colour
    low = [float(vmin)] if vmin is not None else []
    high = [float(vmax)] if vmax is not None else []
    if data.size:
        low.append(float(data.min()))
        high.append(float(data.max()))
    low, high = min(low, default=0.0), max(high, default=1.0)
    if low > high:  # one end passed and no finite entry (e.g. vmin=2 over an all-NaN matrix): the passed end's value
        low, high = (low, low) if vmin is not None else (high, high)
    # a constant range about its value (colour_range also refuses a non-finite end): left equal, every cell was
    # drawn at the map's bottom, the colour of the smallest value, whatever the value
    low, high = colour_range(low, high)
    with np.errstate(invalid="ignore", over="ignore"):  # (halves: the range of ±1e308 overflows, halved it does not)
        scaled = (values / 2 - low / 2) / (high / 2 - low / 2)
    rgb = matplotlib.colormaps[cmap](np.clip(np.where(finite, scaled, 0.0), 0, 1))[..., :3]
    rgb[~finite] = 0.5
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return (rgb * 255).round().astype(np.uint8)


def image_grid(images: Any, *, nrow: int = 8, value_range: tuple[float, float] | None = (-1.0, 1.0),
               padding: int = 2) -> np.ndarray:
    """Samples ``[N, C, H, W]`` (C = 1 or 3) or ``[N, H, W]`` as one ``[H', W', 3]`` uint8 grid.

    ``value_range``: the samples' range (a diffusion model's [-1, 1] by default); None scales
    the grid's own finite min and max to [0, 1] (NaN drawn black, ±inf at the ends).
    """
    x = images.detach().cpu().double() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid takes [N, C, H, W] with C = 1 or 3, or [N, H, W]; got {tuple(x.shape)}")
    if value_range is None:  # the finite values' range: one diverged (NaN, inf) sample must not blank the others
        finite = x[torch.isfinite(x)]
        value_range = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    low, high = value_range
    x = ((x - low) / (high - low if high > low else 1.0)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return _as_uint8(grid.permute(1, 2, 0).numpy())


def figure_to_array(figure: Any, *, dpi: int = 100) -> np.ndarray:
    """A matplotlib figure rendered to an ``[H, W, 4]`` uint8 array (Agg; no pyplot, no backend).

    The figure keeps its own dpi and canvas: logging it must not change how the caller later saves
    or shows it (``savefig`` at the figure's dpi, a notebook's or window's canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    old_canvas, old_dpi = figure.canvas, figure.dpi
    try:
        canvas = FigureCanvasAgg(figure)
        figure.set_dpi(dpi)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba()).copy()
    finally:
        figure.set_dpi(old_dpi)
        figure.set_canvas(old_canvas)


def log_image(logger: Any, name: str, array: Any, step: int) -> bool:
    """Send an image to ``logger`` if it takes images; returns whether it did."""
    method = getattr(logger, "log_image", None)
    if method is None:
        return False
    method(name, _as_uint8(array), int(step))
    return True


def log_figure(logger: Any, name: str, figure: Any, step: int) -> bool:
    """Send a matplotlib figure to ``logger`` (as a figure, else as an image); returns whether it did."""
    method = getattr(logger, "log_figure", None)
    if method is not None:
        method(name, figure, int(step))
        return True
    return log_image(logger, name, figure_to_array(figure), step)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are numbers, as floats (booleans as 0/1; tensors and arrays of one element)."""
    out = {}
    for key, value in metrics.items():
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or (isinstance(value, np.ndarray) and value.size == 1):
            value = value.item()  # (a 0-d array, as np.mean(..., keepdims) or a reduction gives, was dropped)
        if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
            out[str(key)] = float(value)
    return out


def _read_number(value: Any) -> Any:
    """A CSV cell as the float it was written from (the text itself when it is not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _same_value(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# -- writers ---------------------------------------------------------------------------------
class TensorBoardWriter:
    """Scalars, images and figures as a TensorBoard event file in ``log_dir``.

    Needs ``tensorboard`` (``pip install genkernel[tensorboard]``); ``torch.utils.tensorboard`` is
    imported when the writer is built, not before. Non-finite values are written as they are
    (TensorBoard shows NaN); ``flush()`` and ``close()`` as ``SummaryWriter``'s. A context manager.
    """

    def __init__(self, log_dir: str | os.PathLike, **kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises ImportError naming tensorboard when it is missing
            raise ImportError(
                "TensorBoardWriter needs the tensorboard package: pip install 'genkernel[tensorboard]' "
                f"(or pip install tensorboard) ({error})"
            ) from error
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), **kwargs)

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, int(step))

    def log_image(self, name: str, array: Any, step: int) -> None:
        image = _as_uint8(array)
        self.writer.add_image(name, image, int(step), dataformats="HW" if image.ndim == 2 else "HWC")

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        self.log_image(name, figure_to_array(figure), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CSVWriter:
    """One row per step in a wide CSV file: a ``step`` column, then one column per metric name (in
    the order names first appear; a name that appears later adds a column and the file is rewritten
    with the wider header, earlier rows left blank there). A call at the step of the latest row joins
    that row (the trainer's loss and the analyzer's numbers at one step, sent to one writer, are one
    row; the same numbers sent twice are written once) unless it gives a name of that row another
    value: then it starts a new row at the same step, so no value is lost. A call at an earlier step
    than the latest row's (an analyzer's final numbers at its tracked window's last step) joins that
    step's row the same way, or becomes a row in step order (the file is rewritten). Images go to PNG files in
    ``image_dir`` (default: a folder ``<name>_images`` beside the CSV) as ``<name>_<step>.png``.

    ``purge_step``: None (default) starts a new file, replacing one at ``path``. A resumed run
    passes the first step it will log again (as ``SummaryWriter(purge_step=)`` in TensorBoard): the
    existing file's rows at earlier steps are kept and continued, its rows at that step and later
    (logged after the checkpoint the run resumes from) dropped.
    """

    def __init__(self, path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None,
                 purge_step: int | None = None) -> None:
        if purge_step is not None and (isinstance(purge_step, bool) or not isinstance(purge_step, int) or purge_step < 0):
            raise ValueError(f"purge_step must be None (a new file) or the first step logged again (an int >= 0), "
                             f"got {purge_step!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.with_name(self.path.stem + "_images")
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []
        self._last_row_at: int | None = None  # the file offset where the latest row starts (None: no row)
        if purge_step is not None and self.path.exists():
            self._continue(purge_step)
        else:
            self.path.write_text("step\n")

    def _continue(self, purge_step: int) -> None:
        """Read the existing file's rows before ``purge_step`` and rewrite it with them alone. Rows are
        appended in place, so a run killed mid-write leaves a last line without its line end: that
        partial row (a number cut short would read as another number) is dropped, with a warning."""
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            cut = text.rfind("\n") + 1
            warnings.warn(f"{self.path} ends in a partial row {text[cut:][:80]!r} (a run stopped while writing it): "
                          "dropped", RuntimeWarning, stacklevel=3)
            text = text[:cut]
        with io.StringIO(text, newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or reader.fieldnames[0] != "step":
                raise ValueError(f"{self.path} is not a CSVWriter file (its first column is not 'step'): pass "
                                 "another path, or purge_step=None to replace it")
            self.columns = list(reader.fieldnames)
            for row in reader:
                try:
                    step = int(row["step"])
                except (TypeError, ValueError):
                    raise ValueError(f"{self.path} has a row whose step is {row['step']!r}, not an integer") from None
                if step < purge_step:
                    # as the floats they were written from (str(float) reads back exactly), so that the same
                    # numbers logged again at a kept step join its row instead of starting a second one
                    self.rows.append({key: _read_number(value) for key, value in row.items()
                                      if value not in ("", None)} | {"step": step})
        self._rewrite()

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {"step": int(step), **_scalars(metrics)}
        new = [key for key in row if key not in self.columns]
        if self.rows and row["step"] < self.rows[-1]["step"]:
            # An earlier step (an analyzer's final numbers at its tracked window's last step, logged when
            # training ends): into that step's row, or a new row in step order, never appended after later
            # steps as a second row for the step.
            self._insert(row, new)
            return
        last = self.rows[-1] if self.rows else {}
        same_step = (self._last_row_at is not None and last.get("step") == row["step"]
                     and all(key not in last or _same_value(last[key], value) for key, value in row.items()))
        if same_step:  # one row per step: join the latest row (a name with another value there starts a new row)
            self.rows[-1] = {**self.rows[-1], **row}
        else:
            self.rows.append(row)
        if new:
            self.columns.extend(new)
            self._rewrite()
            return
        with self.path.open("r+" if same_step else "a", newline="") as handle:
            if same_step:
                handle.seek(self._last_row_at)
                handle.truncate()
            else:
                handle.seek(0, os.SEEK_END)
            self._last_row_at = handle.tell()
            csv.DictWriter(handle, self.columns).writerow(self.rows[-1])

    def _insert(self, row: dict[str, Any], new: list[str]) -> None:
        """Put ``row`` (a step before the latest row's) into the row of its step when no name there has
        another value, else just after that step's rows (before the first later step); rewrite the file."""
        position = len(self.rows)
        while position and self.rows[position - 1]["step"] > row["step"]:
            position -= 1
        before = self.rows[position - 1] if position else {}
        if before.get("step") == row["step"] and all(key not in before or _same_value(before[key], value)
                                                     for key, value in row.items()):
            self.rows[position - 1] = {**before, **row}
        else:
            self.rows.insert(position, row)
        self.columns.extend(new)
        self._rewrite()

    def _rewrite(self) -> None:
        with atomic_file(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            writer.writeheader()
            writer.writerows(self.rows[:-1])
            self._last_row_at = handle.tell() if self.rows else None
            writer.writerows(self.rows[-1:])

    def log_image(self, name: str, array: Any, step: int) -> None:
        from matplotlib.image import imsave

        self.image_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        image = _as_uint8(array)
        if image.ndim == 2:
            # imsave draws a 2-D array through a colormap whose limits are the image's own min and max: a grey image
            # was contrast-stretched (0..128 saved as 0..255; a uniform grey or white image saved black), and even
            # with the limits pinned the gray colormap's table is off by one level for some values. As RGB it is exact.
            image = np.repeat(image[:, :, None], 3, axis=2)
        imsave(self.image_dir / f"{safe}_{int(step)}.png", image)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "CSVWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MultiLogger:
    """Several loggers as one (each gets what it supports)."""

    def __init__(self, *loggers: Any) -> None:
        self.loggers = [logger for logger in loggers if logger is not None]

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger(metrics, step)

    def log_image(self, name: str, array: Any, step: int) -> None:
        for logger in self.loggers:
            log_image(logger, name, array, step)

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        for logger in self.loggers:
            log_figure(logger, name, figure, step)

    def flush(self) -> None:
        for logger in self.loggers:
            getattr(logger, "flush", lambda: None)()

    def close(self) -> None:
        for logger in self.loggers:
            getattr(logger, "close", lambda: None)()


# -- what the analyzers measure, as flat numbers -----------------------------------------------
def _finite(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.nan


def ledger_metrics(ledger: Any, prefix: str = "ledger") -> dict[str, float]:
    """A :class:`~genkernel.core.tracking.ledger.PathKernelLedger`'s running summary: steps, relative
    residual, median rest share, median κ, and the traffic share of every group (mean over probes)."""
    summary = ledger.summary()
    shares = ledger.shares()
    out = {
        f"{prefix}/steps": float(summary["steps"]),
        f"{prefix}/relative_residual": _finite(summary["relative_residual"]),
        f"{prefix}/max_probe_relative_residual": _finite(summary["max_probe_relative_residual"]),
        f"{prefix}/rest_share_median": _finite(nan_median(shares.rest)),
        f"{prefix}/kappa_median": _finite(summary["median_kappa"]),
        f"{prefix}/mean_change_norm": _finite(summary["mean_change_norm"]),
    }
    traffic = ledger.traffic_shares().cpu().nanmean(dim=0)
    for g, value in enumerate(traffic.tolist()):
        out[f"{prefix}/traffic_share/group_{g}"] = _finite(value)
    return out


def _difference(prefix: str, result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a :func:`~genkernel.core.grouping.measured_minus_control` result."""
    out = {f"{prefix}/measured": _finite(result.get("measured", math.nan))}
    if "difference" in result:
        low, high = result.get("interval") or (math.nan, math.nan)
        out.update({
            f"{prefix}/control": _finite(result["control"]),
            f"{prefix}/measured_minus_control": _finite(result["difference"]),
            f"{prefix}/interval_low": _finite(math.nan if low is None else low),
            f"{prefix}/interval_high": _finite(math.nan if high is None else high),
        })
    return out


def _diffusion_metrics(analyzer: Any) -> dict[str, float]:
    residual = analyzer.residual()
    out = {
        "ledger/steps": float(residual["steps"]),
        "ledger/relative_residual": _finite(residual["relative_residual"]),
        "ledger/max_probe_relative_residual": _finite(residual["max_probe_relative_residual"]),
        "ledger/rest_share_median": _finite(residual["median_rest_share"]),
    }
    locality = analyzer.locality()
    out["ledger/kappa_median"] = _finite(locality["median_kappa"])
    out.update(_difference("locality/traffic", locality["traffic"]))
    out.update(_difference("locality/share", locality["share"]))
    traffic = analyzer.traffic_shares().nanmean(dim=0)
    for g, value in enumerate(traffic.tolist()):
        out[f"traffic_share/bin_{g}"] = _finite(value)
    return out


def _tracker_view(analyzer: Any, which: str) -> Any:
    """The GAN analyzer's live tracker ``which`` or, right after ``load_state_dict`` (a trainer's
    resume) and before the next step rebuilds it, its read-only view of the loaded ledgers (the
    analyzer's own ``_view``): the numbers of a resumed run are the loaded ones, not none."""
    view = getattr(analyzer, "_view", None)
    return view(which) if callable(view) else getattr(analyzer, which, None)


def _gan_metrics(analyzer: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if _tracker_view(analyzer, "g_tracker") is not None and analyzer.g_steps:
        ledger = analyzer.generator_ledger()
        out.update(ledger_metrics(ledger, "generator"))
        run_groups = getattr(analyzer, "_run_groups", None)
        if run_groups is not None and analyzer.controls:
            out.update(_coupling_metrics(analyzer.generator_ledgers, run_groups, analyzer.control_names,
                                         analyzer.num_groups, "coupling"))
    windows = getattr(analyzer, "windows", None) or []
    if windows:
        last = windows[-1]
        geometry = (last.get("statistics") or {}).get("geometry") or {}
        for kind in ("traffic", "net"):
            result = (geometry.get(kind) or {}).get("interaction_minus_control")
            if result is not None:
                out.update(_difference(f"coupling_window/{kind}_interaction", result))
        kappa = last.get("kappa_median")
        out["coupling_window/kappa_median"] = _finite(math.nan if kappa is None else kappa)
    alignment = getattr(analyzer, "alignment", None) or []
    if alignment:
        for key, value in alignment[-1].items():
            if key.startswith("cos_"):
                out[f"alignment/{key[4:]}"] = _finite(value if value is not None else math.nan)
    if _tracker_view(analyzer, "d_tracker") is not None and analyzer.d_steps:
        out.update(ledger_metrics(analyzer.discriminator_ledger, "discriminator"))
    return out


def _coupling_metrics(ledgers: Mapping[str, Any], probe_groups: torch.Tensor, controls: Sequence[str],
                      num_groups: int, prefix: str) -> dict[str, float]:
    """What a coupling claim reads, over the whole run: the analyzer's
    :func:`~genkernel.gan.analyzer.partition_statistics` of the geometry partition, per kind (traffic,
    net) the interaction statistic (own share minus the other probe groups' share from the same
    source group) minus control, clustered by probe group. The plain own share minus control is
    confounded by source-group strength, so it is not streamed."""
    from .gan.analyzer import partition_statistics  # the GAN package is only needed for a GAN analyzer

    measured = ledgers["geometry"]
    stats = partition_statistics(measured, [ledgers[c] for c in controls], measured.delta.cpu(),
                                 torch.as_tensor(probe_groups), num_groups)
    out: dict[str, float] = {}
    for kind in ("traffic", "net"):
        out.update(_difference(f"{prefix}/{kind}_interaction", stats[kind]["interaction_minus_control"]))
    return out


def analyzer_metrics(analyzer: Any) -> dict[str, float]:
    """Flat running numbers of a :class:`~genkernel.diffusion.NoiseLevelAnalyzer`, a
    :class:`~genkernel.gan.GANKernelAnalyzer`, a :class:`~genkernel.PathKernelTracker` or a
    :class:`~genkernel.PathKernelLedger` (empty until something was tracked).

    Diffusion: ``ledger/relative_residual``, ``ledger/rest_share_median``, ``ledger/kappa_median``,
    ``locality/{traffic,share}/{measured,control,measured_minus_control,interval_low,interval_high}``
    and ``traffic_share/bin_g``. GAN: ``generator/...`` and ``discriminator/...`` ledger numbers,
    ``coupling/{traffic,net}_interaction/...`` (the interaction statistic minus control, clustered by
    probe group) over the whole run, ``coupling_window/...`` the same for the latest closed
    window and ``alignment/...`` cosines. Tracker: ``ledger/...`` (``<partition>/...`` for each
    further partition). NaN where a number is undefined (no change yet, no control).
    """
    from .core.tracking.ledger import PathKernelLedger
    from .core.tracking.tracker import PathKernelTracker

    if isinstance(analyzer, PathKernelLedger):
        return ledger_metrics(analyzer) if analyzer.steps else {}
    if isinstance(analyzer, PathKernelTracker):
        out: dict[str, float] = {}
        for i, (name, ledger) in enumerate(analyzer.ledgers.items()):
            if ledger.steps:
                out.update(ledger_metrics(ledger, "ledger" if i == 0 else name))
        return out
    kind = type(analyzer).__name__
    if hasattr(analyzer, "locality") and hasattr(analyzer, "matrices"):  # NoiseLevelAnalyzer
        if getattr(analyzer, "tracker", None) is None or not analyzer.tracker.ledger.steps:
            return {}
        return _diffusion_metrics(analyzer)
    # Looked up on the class: the analyzer's generator_ledgers property raises before the first generator step.
    if hasattr(type(analyzer), "generator_ledgers"):  # GANKernelAnalyzer
        return _gan_metrics(analyzer)
    raise TypeError(f"analyzer_metrics takes a genkernel analyzer, tracker or ledger, got {kind}")


def analyzer_images(analyzer: Any) -> dict[str, np.ndarray]:
    """Images of an analyzer's matrices now: the noise×noise traffic and net-share matrices
    (diffusion, rows probe level, columns training bin) or the latest window's coupling matrices
    (GAN, rows probe group, columns training group); ``{}`` until something was tracked."""
    if hasattr(analyzer, "locality") and hasattr(analyzer, "matrices"):
        if getattr(analyzer, "tracker", None) is None or not analyzer.tracker.ledger.steps:
            return {}
        mats = analyzer.matrices()
        return {"matrix/traffic": matrix_image(mats["traffic"], vmin=0.0),
                "matrix/share": _diverging_image(mats["share"])}
    windows = getattr(analyzer, "windows", None) or []
    if windows:
        last = windows[-1]
        return {"coupling/traffic": matrix_image(last["traffic_matrix"], vmin=0.0),
                "coupling/net": _diverging_image(last["net_matrix"])}
    return {}


def _diverging_image(matrix: Any) -> np.ndarray:
    """A signed matrix (net shares) on ``coolwarm`` centred at 0 (limits ±the largest finite |value|):
    with the matrix's own min and max as limits, the neutral middle colour would sit at their mean and
    a small positive share would be drawn blue, as if negative."""
    values = matrix.detach().cpu().double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, dtype=np.float64)
    finite = np.abs(values[np.isfinite(values)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return matrix_image(values, cmap="coolwarm", vmin=-bound, vmax=bound)


def _last_tracked_step(analyzer: Any, step: int) -> int:
    """The loop step ``analyzer``'s numbers belong to when logged at ``step``: ``step``, or for a
    :class:`~genkernel.diffusion.NoiseLevelAnalyzer` whose tracked window (``track_steps``) ended
    before it, the window's last step: its ledgers stopped there, and its numbers logged at later
    steps would read as the state after more training."""
    if not getattr(analyzer, "stopped", False):
        return step
    numbered = [s for s in getattr(analyzer, "global_steps", None) or [] if s is not None]
    return min(step, int(numbered[-1])) if numbered else step


def _analyzer_last_step(analyzer: Any) -> int:
    """The loop step of ``analyzer``'s last tracked step (0 when none or unknown): a
    :class:`~genkernel.diffusion.NoiseLevelAnalyzer`'s ``global_steps``, a
    :class:`~genkernel.gan.GANKernelAnalyzer`'s ``g_loop_steps``; loaded states included."""
    for name in ("global_steps", "g_loop_steps"):
        numbered = [s for s in getattr(analyzer, name, None) or [] if s is not None]
        if numbered:
            return int(numbered[-1])
    return 0


# -- a callback for the built-in trainers ------------------------------------------------------
class LoggingCallback(TrainerCallback):
    """Streams a run to ``log`` from any genkernel trainer (or :func:`~genkernel.perform_step`).

    Args:
        log: a logger (``log(metrics, step)``; images and figures where it takes them).
        analyzer: an analyzer, tracker or ledger whose :func:`analyzer_metrics` are logged.
        every: log the loss every this many steps.
        analysis_every: log the analyzer's metrics every this many steps (default ``every``;
            they cost a few small reductions over the ledgers; 0: at the end only).
        image_every: log the analyzer's matrices as images every this many steps (0: at the end only).
            After a tracked window (``track_steps``) ended, its matrices are logged once, at its last
            step, as its numbers are.
        samples: optional ``fn(trainer) -> Tensor[N, C, H, W]`` (or ``[N, H, W]``), logged as a
            grid ``samples`` at image steps and at the end (e.g. ``lambda t: t.sample(16)[0]``).
        sample_range: the samples' value range for the grid (None: their own min and max).

    The step number is the trainer's (``global_step`` + 1, or the GAN trainer's ``iteration`` + 1),
    else a count of the steps seen. Names: ``loss`` (``loss/generator``, ``loss/discriminator``
    for a GAN), ``lr`` (``lr/<phase>``) for the optimizer's first parameter group and
    ``lr/group<i>`` (``lr/<phase>/group<i>``) for its further groups i >= 1, then
    :func:`analyzer_metrics`'s. Put it *after* the analyzer in ``callbacks`` so it sees the step the
    analyzer recorded. The analysis writes each name at most once per step: when training ends,
    names already logged at that step are not written again.
    """

    def __init__(self, log: Callable[[Mapping[str, float], int], None], *, analyzer: Any = None, every: int = 1,
                 analysis_every: int | None = None, image_every: int = 0,
                 samples: Callable[[Any], Any] | None = None, sample_range: tuple[float, float] | None = (-1.0, 1.0),
                 name: str | None = None) -> None:
        if not callable(log):
            raise TypeError(f"log must be callable as log(metrics, step), got {type(log).__name__}")
        # (analysis_every 0: the analyzer's numbers when training ends only, as image_every 0)
        for key, value in (("every", every), ("analysis_every", analysis_every), ("image_every", image_every)):
            if key == "analysis_every" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "every" else 0):
                also = " (a trainer's or analyzer's log_every)" if key == "every" else ""
                raise ValueError(f"{key}{also} must be an int >= {1 if key == 'every' else 0}, got {value!r}")
        self.log = log
        self.analyzer = analyzer
        self.every = every
        self.analysis_every = every if analysis_every is None else analysis_every
        self.image_every = image_every
        self.samples = samples
        self.sample_range = sample_range
        self.name = name
        self.seen = 0
        self.last_step: int | None = None  # the step number last seen (None: none yet; a loop may count from 0)
        self.last_image_step: int | None = None  # the step samples were last logged at
        self.last_matrix_step: int | None = None  # the step the analyzer's matrices were last logged at
        self.last_analysis_step: int | None = None  # the step the analyzer's metrics were last logged at
        self.analysis_keys: set[str] = set()  # the names logged at that step

    def _step_number(self, trainer: Any) -> int:
        if trainer is not None and isinstance(getattr(trainer, "global_step", None), int):
            return trainer.global_step + 1
        if trainer is not None and isinstance(getattr(trainer, "iteration", None), int):
            return trainer.iteration + 1
        return self.seen

    def on_step_end(self, trainer: Any, step: Any) -> None:
        self.seen += 1
        number = self._step_number(trainer)
        phase = getattr(step, "phase", "train")
        losses = getattr(step, "losses", None)
        loss = None
        if isinstance(losses, torch.Tensor) and losses.numel():
            weights = getattr(step, "weights", None)
            loss = float((losses * weights.to(losses)).sum()) if isinstance(weights, torch.Tensor) else float(losses.mean())
        lr = None
        optimizer = getattr(step, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "param_groups", None):
            lr = [float(group.get("lr", math.nan)) for group in optimizer.param_groups]
        self.log_step(number, loss=loss, lr=lr, phase=phase, trainer=trainer)

    def log_step(self, step: int, *, loss: float | None = None, lr: float | Sequence[float] | None = None,
                 phase: str = "train", trainer: Any = None, extra: Mapping[str, float] | None = None) -> None:
        """Log one step from any loop: the loss every ``every`` steps, the analyzer's metrics every
        ``analysis_every`` steps, images every ``image_every`` steps. ``lr``: one learning rate, or
        one per optimizer parameter group (``lr`` for the first, ``lr/group<i>`` for the others)."""
        suffix = "" if phase == "train" else f"/{phase}"
        metrics: dict[str, float] = dict(extra or {})
        analysis: dict[str, float] = {}
        if step % self.every == 0:
            if loss is not None:
                metrics[f"loss{suffix}"] = loss
            if lr is not None:
                rates = [float(r) for r in lr] if isinstance(lr, (list, tuple)) else [float(lr)]
                for i, rate in enumerate(rates):
                    metrics[f"lr{suffix}" if i == 0 else f"lr{suffix}/group{i}"] = rate
        # the analysis once per step number (a GAN iteration has two or more optimizer steps)
        fresh = step != self.last_step and phase in ("train", "generator")
        if fresh:
            self.last_step = step
            if (self.analyzer is not None and self.analysis_every and step % self.analysis_every == 0
                    and _last_tracked_step(self.analyzer, step) == step):
                analysis = analyzer_metrics(self.analyzer)
                if analysis:
                    metrics.update(analysis)
        if metrics:
            self.log(metrics, step)
        if analysis:  # (once the logger took them: numbers a raising logger lost are logged again at the end)
            self.last_analysis_step, self.analysis_keys = step, set(analysis)
        if fresh and self.image_every and step % self.image_every == 0:
            self.log_images(step, trainer)

    def log_images(self, step: int, trainer: Any = None) -> None:
        """The analyzer's matrices (and samples, with ``samples=``) as images at ``step``. The matrices
        of an analyzer whose tracked window ended before ``step`` are its window's last step's: they are
        logged at that step (once), not again at later steps as if after more training."""
        if self.analyzer is not None:
            at = _last_tracked_step(self.analyzer, step)
            if at != self.last_matrix_step:
                self.last_matrix_step = at
                for name, image in analyzer_images(self.analyzer).items():
                    log_image(self.log, name, image, at)
        if step == self.last_image_step:
            return
        self.last_image_step = step
        if self.samples is not None and trainer is not None and getattr(self.log, "log_image", None) is not None:
            with torch.no_grad():
                images = self.samples(trainer)
            log_image(self.log, "samples", image_grid(images, value_range=self.sample_range), step)

    def on_train_end(self, trainer: Any) -> None:
        # (the analyzer's own last loop step counts: right after a resume, before any new step, the
        # numbers loaded belong to the checkpoint's step, not to step 0)
        step = max(self.last_step or 0, self._step_number(trainer) - 1 if trainer is not None else self.seen,
                   _analyzer_last_step(self.analyzer))
        if self.analyzer is not None:
            at = _last_tracked_step(self.analyzer, step)
            # A name already logged at this step (the last step was an analysis step, or a tracked
            # window's last step, or a second train() made no step) is not written again: one point
            # per name and step (TensorBoard keeps both).
            done = self.analysis_keys if at == self.last_analysis_step else set()
            metrics = {key: value for key, value in analyzer_metrics(self.analyzer).items() if key not in done}
            if metrics:
                self.log(metrics, at)
                self.last_analysis_step, self.analysis_keys = at, done | set(metrics)
        self.log_images(step, trainer)
        flush = getattr(self.log, "flush", None)
        if callable(flush):
            flush()

