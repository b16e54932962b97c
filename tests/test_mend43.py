"""Fixes of the forty-third session's own (the helpers' are in their own files): atomic writers that concurrent
writers of one path could break."""

from __future__ import annotations

import json
import threading

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_concurrent_json_writers_of_one_path_each_write_a_whole_file(tmp_path):
    """Four threads write the recipes' JSON results to one path 40 times each (two ranks, or a resumed run beside a
    live one, writing the same summary): every write succeeds, the file is always one writer's whole payload, and no
    temporary file is left.

    Fails on the old code: every writer used the fixed PATH.tmp, so one writer renamed another's half-written file
    into place or found its own temporary file gone (FileNotFoundError)."""
    from recipes.common import write_json

    path = tmp_path / "result.json"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(index: int) -> None:
        start.wait()
        try:
            for k in range(40):
                write_json(path, {"writer": index, "k": k, "pad": "x" * 20000})
        except BaseException as error:  # (collected: a thread's exception would otherwise be lost)
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    payload = json.loads(path.read_text())
    assert payload["writer"] in range(4) and payload["k"] == 39 and payload["pad"] == "x" * 20000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_an_atomic_file_that_fails_part_way_leaves_the_previous_file_and_no_temporary(tmp_path):
    """A writer that raises inside io.atomic_file (a figure that fails to draw, a full disk) leaves the previous file
    as it was and no temporary file; an OSError is reported naming the path and that the previous file is intact;
    any other error is raised as itself.

    Coverage of the helper the writers share (the old writers each had their own copy of these steps)."""
    from genkernel.core.tracking.io import atomic_file

    path = tmp_path / "figure.png"
    path.write_bytes(b"previous")
    with pytest.raises(ZeroDivisionError):
        with atomic_file(path, "wb") as handle:
            handle.write(b"half")
            1 / 0
    with pytest.raises(OSError, match=r"could not write .*figure\.png.*the previous file, if any, is intact"):
        with atomic_file(path, "wb") as handle:
            handle.write(b"half")
            raise OSError(28, "No space left on device")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_file(path, "a"):
            pass
