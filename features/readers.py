"""Readers: CSV / TSV / Parquet files (globs allowed) streamed in chunks of raw values.

Every chunk carries `_file` and `_line` so validation can point at the exact place of a
problem: `_line` is the physical line of the row in a text file (the header is line 1) when
no field spans lines, and the 1-based row number in a Parquet file. Values are read as
strings (Parquet keeps its types); validation parses them. Two format-specific readers:
MIND `behaviors.tsv` (one row per impression, expanded here to one row per shown news item
with its click label and position) and MovieLens 100k `u.item` (19 genre flags to a text).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from features.spec import DataSpecError, TableSpec

FILE_COL = "_file"
LINE_COL = "_line"

MIND_BEHAVIOR_COLUMNS = ("impression_id", "user_id", "time", "history", "impressions")
MIND_NEWS_COLUMNS = ("news_id", "category", "subcategory", "title", "abstract", "url",
                     "title_entities", "abstract_entities")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
ML100K_ITEM_COLUMNS = ("movie_id", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES)


class DataReadError(ValueError):
    """A data file is missing or cannot be parsed at all."""


@dataclass
class Chunk:
    frame: pd.DataFrame  # raw columns plus _file and _line
    file: str


class DataFileError(DataReadError, DataSpecError):
    """A `files` entry of a data spec matches no file, or a directory: named by its key (`logs.files[0]`)."""


def resolve_files(table: TableSpec, root: Path, key: str = "files") -> list[Path]:
    """Expand each entry (a path or a glob, relative to root) in order; every entry must match, and
    only regular files (a directory is refused). `key` names the table's `files` in errors."""
    out: list[Path] = []
    for i, pattern in enumerate(table.files):
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else root / full
        matches = sorted(Path(p) for p in glob.glob(str(full)))
        if not matches:
            raise DataFileError(f"{key}[{i}]: no file matches {pattern!r} (looked for {full})")
        not_files = [m for m in matches if not m.is_file()]
        if not_files:
            raise DataFileError(f"{key}[{i}]: {pattern!r} matches {str(not_files[0])!r}, which is not a file "
                                "(a directory? name the files in it, e.g. 'dir/*.csv')")
        out.extend(m for m in matches if m not in out)
    return out


def _format_of(table: TableSpec, path: Path) -> str:
    if table.format != "auto":
        return table.format
    return "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"


def _read_text(table: TableSpec, path: Path, chunk_rows: int, names=None) -> Iterator[pd.DataFrame]:
    names = list(names or table.names) or None
    header = 0 if table.header else None
    kwargs = dict(sep=table.sep, header=header, names=names, dtype=str, keep_default_na=False,
                  na_values=[""], encoding=table.encoding, chunksize=chunk_rows)
    if not table.quoting:
        kwargs["quoting"] = csv.QUOTE_NONE
    if len(table.sep) > 1:  # e.g. MovieLens 1M's "::": the python engine splits on a literal regex
        kwargs["engine"] = "python"
        kwargs["sep"] = "".join("\\" + ch for ch in table.sep)
    first_line = 2 if table.header else 1
    if table.header and names is None and len(table.sep) == 1:
        _check_first_row_width(table, path)
    try:
        with pd.read_csv(path, **kwargs) as reader:
            for frame in reader:
                frame[LINE_COL] = range(first_line, first_line + len(frame))
                first_line += len(frame)
                yield frame
    except pd.errors.EmptyDataError as err:
        raise DataReadError(f"{path}: the file is empty") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataReadError(f"{path}: cannot parse as {table.sep!r}-separated text "
                            f"({table.encoding}): {' '.join(str(err).split())}") from err


def _check_first_row_width(table: TableSpec, path: Path) -> None:
    """pandas takes surplus fields of the *first* data row as an index, silently shifting every
    column of the file (later rows with surplus fields are a ParserError); refuse it by name."""
    try:
        with open(path, newline="", encoding=table.encoding) as f:
            reader = csv.reader(f, delimiter=table.sep,
                                quoting=csv.QUOTE_MINIMAL if table.quoting else csv.QUOTE_NONE)
            header = next(reader, None)
            first = next((row for row in reader if row), None)
    except (csv.Error, UnicodeDecodeError, OSError):
        return  # compressed or unreadable as text here: pandas reports what it finds
    if header and first and len(first) > len(header):
        raise DataReadError(f"{path}: the first data row has {len(first)} fields, the header {len(header)} "
                            f"({table.sep!r}-separated)")


def _read_parquet(path: Path, chunk_rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataReadError(f"{path}: not a readable Parquet file: {err}") from err
    if columns is not None:  # the file's columns among them; a missing one is reported by validation
        present = set(parquet.schema_arrow.names)
        columns = [c for c in columns if c in present]
    start = 1
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=columns):
        frame = batch.to_pandas()
        frame[LINE_COL] = range(start, start + len(frame))
        start += len(frame)
        yield frame


def expand_mind_behaviors(frame: pd.DataFrame) -> pd.DataFrame:
    """One MIND impression row ("N1-1 N2-0 ...") -> one row per shown news item.

    `news_id` and `click` are the two halves of each token (a malformed token keeps its raw
    click text, so validation reports it on the impression's line); `position` is 1-based.
    """
    tokens = frame["impressions"].str.split()
    out = frame.drop(columns=["impressions", "history"]).assign(token=tokens).explode("token")
    out["position"] = out.groupby(level=0).cumcount() + 1
    parts = out["token"].str.rsplit("-", n=1, expand=True)
    if parts.shape[1] < 2:
        parts[1] = None
    out["news_id"] = parts[0]
    out["click"] = parts[1].where(parts[1].notna(), out["token"])
    return out.drop(columns=["token"]).reset_index(drop=True)


def movielens_100k_items(frame: pd.DataFrame) -> pd.DataFrame:
    """u.item's 19 genre flag columns -> one `genres` text ("Action|Comedy")."""
    flags = frame[list(ML100K_GENRES)].eq("1")
    genres = flags.apply(lambda row: "|".join(g for g, on in zip(ML100K_GENRES, row, strict=True) if on), axis=1)
    out = frame[["movie_id", "title", "release_date", LINE_COL]].copy()
    out["genres"] = genres if len(frame) else pd.Series(dtype=str)
    return out


def read_table(table: TableSpec, root: Path, chunk_rows: int, name: str = "table") -> Iterator[Chunk]:
    """Stream every file of a table, in order, as chunks of at most `chunk_rows` source rows.

    `name` (logs, catalog, users) names the table's keys in errors."""
    for path in resolve_files(table, root, f"{name}.files"):
        yield from read_file(table, path, root, chunk_rows)


def read_file(table: TableSpec, path: Path, root: Path, chunk_rows: int,
              columns: list[str] | None = None) -> Iterator[Chunk]:
    """One file of a table as chunks of at most `chunk_rows` source rows (`_file` relative to `root`).
    `columns`: read only these from a Parquet file (a streaming pass needs a few of many)."""
    fmt = _format_of(table, path)
    if fmt == "parquet":
        frames = _read_parquet(path, chunk_rows, columns)
    elif fmt == "mind_behaviors":
        frames = map(expand_mind_behaviors, _read_text(table, path, chunk_rows, MIND_BEHAVIOR_COLUMNS))
    elif fmt == "movielens_100k_items":
        frames = map(movielens_100k_items, _read_text(table, path, chunk_rows, ML100K_ITEM_COLUMNS))
    else:
        frames = _read_text(table, path, chunk_rows)
    rel = os.path.relpath(path, root)
    for frame in frames:
        frame[FILE_COL] = rel
        yield Chunk(frame=frame, file=rel)
