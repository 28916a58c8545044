"""The CSV every load tool writes beside its Markdown report."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_csv(path: Path, rows: Iterable[dict], fields: Sequence[str]) -> None:
    """``rows`` under a header of ``fields`` (a report with no rows still gets its header)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
