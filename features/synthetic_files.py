"""The synthetic world as a data spec's files: the log as sharded Parquet, the catalog, and the spec.

What a streaming run reads (`features.stream`, `benchmarks/streaming.py`): the same columns and
roles as the in-memory synthetic world, so the two paths train on the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from features.schema import DEFAULT_SCHEMA as S

LOG_COLUMNS = (S.user_id, *S.user_categoricals, *S.context_categoricals, *S.context_integers, S.ad_id,
               S.position, S.timestamp, S.click, S.conversion)
CATALOG_COLUMNS = (S.ad_id, *S.ad_categoricals, *S.ad_text, S.bid)
LOG_GLOB = "logs/part-*.parquet"


def spec_dict(name: str = "synthetic-files") -> dict:
    return {"name": name, "root": ".", "logs": {"files": [LOG_GLOB]}, "catalog": {"files": ["catalog.parquet"]},
            "columns": {"user_id": S.user_id, "ad_id": S.ad_id,
                        "timestamp": {"column": S.timestamp, "format": "unix"},
                        "labels": {"click": S.click, "conversion": S.conversion},
                        "user_categoricals": list(S.user_categoricals),
                        "context_categoricals": list(S.context_categoricals),
                        "context_integers": list(S.context_integers),
                        "ad_categoricals": list(S.ad_categoricals), "ad_text": list(S.ad_text),
                        "position": S.position, "bid": S.bid}}


def write_catalog(catalog: pd.DataFrame, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    catalog[list(CATALOG_COLUMNS)].to_parquet(root / "catalog.parquet", index=False)
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(), sort_keys=False))
    return spec


def write_log_files(pieces: Iterable[pd.DataFrame], root: Path, n_files: int) -> list[Path]:
    """Each piece of rows is spread over `n_files` Parquet files (row groups appended as they come), so
    a log larger than memory is written one bounded piece at a time."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    paths = [root / "logs" / f"part-{i:03d}.parquet" for i in range(n_files)]
    writers: list[pq.ParquetWriter | None] = [None] * n_files
    try:
        for piece in pieces:
            for i, part in enumerate(np.array_split(np.arange(len(piece)), n_files)):
                table = pa.Table.from_pandas(piece.iloc[part][list(LOG_COLUMNS)], preserve_index=False)
                if writers[i] is None:
                    writers[i] = pq.ParquetWriter(paths[i], table.schema)
                writers[i].write_table(table)  # type: ignore[union-attr]
    finally:
        for w in writers:
            if w is not None:
                w.close()
    return [p for p, w in zip(paths, writers, strict=True) if w is not None]


def write_world(catalog: pd.DataFrame, logs: pd.DataFrame, root: Path, n_files: int) -> Path:
    """A whole (small) world's files; returns the spec's path."""
    spec = write_catalog(catalog, root)
    write_log_files([logs], root, n_files)
    return spec


def random_log_piece(rng: np.random.Generator, rows: int, catalog: pd.DataFrame, n_users: int,
                     start_time: int) -> pd.DataFrame:
    """`rows` impressions of a large made-up population: users by a Zipf-like draw, ads uniformly from
    the catalog, clicks more likely at the top positions. For scale runs, not for model quality."""
    users = np.minimum(rng.zipf(1.3, rows), n_users) - 1
    ads = catalog[S.ad_id].to_numpy()[rng.integers(0, len(catalog), rows)]
    position = rng.integers(1, 6, rows)
    click = (rng.random(rows) < 0.2 / position).astype("float32")
    ts = start_time + np.sort(rng.integers(0, 86_400, rows))
    return pd.DataFrame({
        S.user_id: np.char.add("u", users.astype(str)), "age_bucket": rng.choice(["18-24", "25-34", "35-44"], rows),
        "gender": rng.choice(["f", "m", "x"], rows), "region": np.char.add("r", rng.integers(0, 8, rows).astype(str)),
        "device": rng.choice(["mobile", "desktop"], rows), "placement": rng.choice(["feed", "video"], rows),
        "hour": (ts // 3600) % 24, "weekday": (ts // 86_400 + 3) % 7, S.ad_id: ads, S.position: position,
        S.timestamp: ts, S.click: click, S.conversion: click * (rng.random(rows) < 0.1)})
