"""Logs that arrive one day at a time: a directory of day partitions beside one ad catalog.

The layout `adrec continuous` watches:

    DIR/catalog.parquet             the ad catalog (every ad any partition logs)
    DIR/2026-01-01.parquet          one day's impressions (or .csv)
    DIR/2026-01-02/                 or a folder of .parquet files for the day
    ...

A partition's name is its day, `YYYY-MM-DD`, and partitions are processed in that order (which
is also the order of the names as text). Any other name is ignored, hidden and temporary names
(`.2026-01-03.parquet.tmp`) included: a writer copies a day under such a name and renames it into
place, so a partition is never read half-written. A folder partition counts once it holds a
`_SUCCESS` file (the Hadoop/Spark convention for a finished output folder).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

CATALOG_FILE = "catalog.parquet"
SUCCESS = "_SUCCESS"
PARTITION_COLUMN = "_partition"  # each row's day, added when partitions are read
_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})(\.parquet|\.csv)?")


class PartitionError(ValueError):
    """A logs directory or one of its partitions cannot be read as documented."""


@dataclass(frozen=True)
class Partition:
    day: str  # YYYY-MM-DD
    path: Path


def _is_day(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def list_partitions(logs_dir: str | Path) -> list[Partition]:
    """The complete day partitions in `logs_dir`, oldest first."""
    logs_dir = Path(logs_dir)
    if not logs_dir.is_dir():
        raise PartitionError(f"--logs-dir {logs_dir}: not a directory")
    found: dict[str, Partition] = {}
    for entry in os.scandir(logs_dir):
        match = _DAY.fullmatch(entry.name)
        if match is None or not _is_day(match.group(1)):
            continue
        is_folder = match.group(2) is None
        if is_folder != entry.is_dir() or (is_folder and not (Path(entry.path) / SUCCESS).exists()):
            continue
        day = match.group(1)
        if day in found:
            raise PartitionError(f"{logs_dir}: day {day} is given twice ({found[day].path.name} and {entry.name})")
        found[day] = Partition(day, Path(entry.path))
    return [found[d] for d in sorted(found)]


def read_partition(partition: Partition) -> pd.DataFrame:
    path = partition.path
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not files:
            raise PartitionError(f"{path}: a finished partition folder with no .parquet file")
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        frame = pd.read_parquet(path)
    return frame.assign(**{PARTITION_COLUMN: partition.day})


def read_window(logs_dir: str | Path, partitions: list[Partition]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The catalog and the given partitions' rows (oldest first, each row tagged with its day)."""
    catalog_path = Path(logs_dir) / CATALOG_FILE
    if not catalog_path.exists():
        raise PartitionError(f"{logs_dir}: no {CATALOG_FILE} (the ad catalog the partitions' ads come from)")
    logs = pd.concat([read_partition(p) for p in partitions], ignore_index=True)
    return pd.read_parquet(catalog_path), logs


def write_partitions(catalog: pd.DataFrame, logs: pd.DataFrame, out_dir: str | Path,
                     timestamp: str = "timestamp") -> list[Path]:
    """Split `logs` by the UTC day of `timestamp` (Unix seconds) into `out_dir` in the layout above,
    each file written under a temporary name and renamed into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(catalog, out_dir / CATALOG_FILE)
    days = pd.to_datetime(logs[timestamp], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    written = []
    for day, rows in logs.groupby(days, sort=True):
        written.append(_write_atomic(rows.reset_index(drop=True), out_dir / f"{day}.parquet"))
    return written


def _write_atomic(frame: pd.DataFrame, path: Path) -> Path:
    tmp = path.parent / f".{path.name}.tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
