"""Per-slide state of a batch run: one small record per slide, and ``status.csv`` built from them.

Each slide's outcome is written atomically to ``status/<slide_id>.json`` as soon as it is
known, so an update never rewrites a shared table and a crash keeps every finished record.
``status.csv`` is a view rebuilt from the records; a damaged record is left out with a warning
instead of stopping the run.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

from filelock import FileLock

from .atomic import atomic_path, write_text
from .errors import UsageError
from .locks import LOCK_DIR
from .slide import SlideSource

STATUS_DIR = "status"
STATUS_TABLE = "status.csv"


@dataclass(frozen=True)
class SlideStatus:
    """The outcome of one slide: ``ok``, ``failed`` or ``skipped``, with a detail and the reason of a failure."""

    slide_id: str
    path: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    error: str = ""


def check_unique_ids(sources: Iterable[SlideSource]) -> None:
    """Refuse inputs whose file stems, the slide ids, collide.

    Raises
    ------
    UsageError
        Naming both slides of the first collision.
    """
    seen: dict[str, SlideSource] = {}
    for source in sources:
        if source.slide_id in seen:
            raise UsageError(f"slides {seen[source.slide_id]} and {source} have the same id {source.slide_id}; "
                             "rename one or run them separately")
        seen[source.slide_id] = source


def write_record(out_dir: Path, status: SlideStatus) -> None:
    """Write one slide's record atomically."""
    folder = out_dir / STATUS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{status.slide_id}.json", json.dumps(asdict(status)) + "\n")


def read_records(out_dir: Path, slide_ids: Iterable[str] | None = None) -> dict[str, SlideStatus]:
    """Every readable record of a run folder (or those of ``slide_ids``), by slide id."""
    records = {}
    names = {f.name for f in fields(SlideStatus)}
    folder = out_dir / STATUS_DIR
    paths = sorted(folder.glob("*.json")) if slide_ids is None else [folder / f"{i}.json" for i in slide_ids]
    for path in (p for p in paths if p.exists()):
        try:
            data = json.loads(path.read_text())
            records[data["slide_id"]] = SlideStatus(**{k: v for k, v in data.items() if k in names})
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"{path}: damaged status record left out ({type(err).__name__})", stacklevel=2)
    return records


def write_table(out_dir: Path) -> Path:
    """Rebuild ``status.csv`` from the records, atomically.

    Runs sharing a folder rebuild it one at a time: a rebuild that read the records before
    another run's last record landed could otherwise replace the table that has it.
    """
    path = out_dir / STATUS_TABLE
    (out_dir / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir / LOCK_DIR / f"{STATUS_TABLE}.lock"), atomic_path(path) as tmp, \
            tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(SlideStatus)])
        writer.writeheader()
        for record in read_records(out_dir).values():
            writer.writerow({**asdict(record), "seconds": f"{record.seconds:.2f}"})
    return path
