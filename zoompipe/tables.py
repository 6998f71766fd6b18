"""CSV tables given on the command line (labels, splits, slide lists, mpp overrides)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from .errors import UsageError


def read_table(path: str | os.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header naming at least ``columns``, values stripped.

    Raises
    ------
    UsageError
        The file cannot be read, lacks a column or has no rows: no run can use it.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise UsageError(f"{path} needs the columns {','.join(columns)} (missing: {', '.join(missing)})")
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    if not rows:
        raise UsageError(f"{path} has no rows")
    return rows
