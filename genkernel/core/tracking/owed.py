"""The records an analyzer owes a recorded step, made at the next opportunity where an interrupt cut them off.

Lifecycle: an analyzer's listener counts a step (cut off there, the analyzer refuses to go on), then marks the
records the step owes as a plain mapping of flags (``{"snapshot": True, "log": True, ...}``: saved with the analyzer's
state) and makes them through :func:`make_owed`, which its next verb (step, observed micro-batch, save, report)
calls again while the mapping is held. The records read the step's ledgers, probes and θ, which nothing changes
before the next step, so a record made late is the record made on time."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OwedRecord:
    """One record a step may owe.

    Attributes:
        flag: its key in the owed mapping (true while owed).
        done: whether nothing is left to make: made already (by a call cut off after it) or nothing to make.
        make: makes it.
        once: cleared before ``make`` runs, so a record that raises is not made again for the step (a logger's
            call: it may have logged before it raised).
    """

    flag: str
    done: Callable[[], bool]
    make: Callable[[], None]
    once: bool = False


def make_owed(owed: MutableMapping[str, object], records: Sequence[OwedRecord], *, label: str, retry: str) -> None:
    """Make, in order, each record of ``records`` that ``owed`` flags and that is not done.

    Args:
        owed: the step's owed flags; a ``once`` record's flag is cleared before it is made.
        records: the records, in the order they are made (a record may read the ones before it).
        label: what owes them, named in the note an error carries ("tracked step 3 (snapshot, kernel record, log)").
        retry: the analyzer's verbs that make them again ("step, save or report").

    Raises whatever a record raises, with a note saying the records left are made at the next of ``retry``."""
    try:
        for record in records:
            if not owed[record.flag] or record.done():
                continue
            if record.once:
                owed[record.flag] = False
            record.make()
    except BaseException as error:
        if hasattr(error, "add_note"):
            error.add_note(f"genkernel: the records of {label} are not all made; the analyzer makes them at its next "
                           f"{retry}, at that step's ledgers and weights (nothing changes them before the next step)")
        raise
