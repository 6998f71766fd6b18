"""Per-slide locks, so that runs sharing an output folder never process the same slide twice.

Two ``preprocess`` runs on one folder (two terminals, two SLURM jobs, or the workers of a Dask
cluster) take ``locks/<slide_id>.lock`` before they touch a slide. The lock is the operating
system's (``flock`` through :mod:`filelock`), so it is released by the kernel when its owner
dies, however it dies (SIGKILL, out of memory, a segfault): a stale lock recovers by itself. On
a network file system the NFS lock manager does the same when the owner's lease lapses; where
the file system has no ``flock``, filelock falls back to a marker file that a process on the
same host reclaims once the recorded owner is gone.

Beside each held lock, ``locks/<slide_id>.owner.json`` names the holder (host, pid, since when),
so a waiting run and a person can tell who works on a slide.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .atomic import write_text

LOCK_DIR = "locks"


def lock_paths(out_dir: str | Path, slide_id: str) -> tuple[Path, Path]:
    """The lock file of a slide and the record of its owner."""
    folder = Path(out_dir) / LOCK_DIR
    return folder / f"{slide_id}.lock", folder / f"{slide_id}.owner.json"


def lock_owner(out_dir: str | Path, slide_id: str) -> dict | None:
    """Who holds, or last held, the lock of a slide: ``{"host", "pid", "since"}``, or None."""
    try:
        return json.loads(lock_paths(out_dir, slide_id)[1].read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def slide_lock(out_dir: str | Path, slide_id: str, wait: bool) -> Iterator[bool]:
    """Hold the lock of one slide for the block; yields whether it was obtained.

    Parameters
    ----------
    out_dir : str or Path
        The run's output folder, shared by every process that may work on the slide.
    slide_id : str
    wait : bool
        Block until the current holder lets go; otherwise yield False at once when it is held.
    """
    path, owner = lock_paths(out_dir, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        write_text(owner, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        yield True
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
