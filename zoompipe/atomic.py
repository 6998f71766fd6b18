"""Atomic file writes: write beside the target under a temporary name, rename when complete.

An interrupted run (a crash, Ctrl-C, a full disk) never leaves a half-written file under the
final name, readers see either the old file or the new one, and a resumable batch can trust
that a file which exists is complete.
"""

from __future__ import annotations

import glob
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` when the block completes.

    The temporary name keeps the suffix (libraries that pick a format from it still work) and is
    unique, so concurrent writers never clash. If the block raises, the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(path: str | Path) -> list[Path]:
    """Remove the temporary files that writers of ``path`` killed mid-write left behind.

    Only call it while no one else writes ``path`` (under the slide's lock): a live writer's
    temporary file has the same form.
    """
    path = Path(path)
    found = list(path.parent.glob(f".{glob.escape(path.stem)}.{'[0-9a-f]' * 12}.tmp{glob.escape(path.suffix)}"))
    for leftover in found:
        leftover.unlink(missing_ok=True)
    return found


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))
