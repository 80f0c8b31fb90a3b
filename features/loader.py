"""A data spec -> validated, typed catalog and log frames in the FeatureSchema the spec defines.

The catalog is read first (ad ids must be unique), then the users table when the spec has one
(user ids must be unique), then the logs chunk by chunk: each chunk is parsed and checked
(`features.validate`), bad rows are skipped or fail per the spec's policy, the users table's
columns are joined on by user id, and only the kept rows, in model dtypes, stay in memory.

A log row whose user is missing from the users table is kept, not dropped: its user
categoricals are "" (the value "not known", as a null categorical is) and its user numerics
the users table's mean, and the report counts such rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from features.readers import read_table
from features.schema import FeatureSchema
from features.spec import DataSpec
from features.validate import (
    ChunkChecker,
    DataValidationError,
    ValidationReport,
    parse_ids,
    parse_numbers,
    parse_text,
    parse_timestamps,
    require_columns,
)
from features.vectors import VectorFile, VectorFileError, parse_vectors, read_vector_file


@dataclass
class LoadedData:
    catalog: pd.DataFrame
    logs: pd.DataFrame
    schema: FeatureSchema
    report: ValidationReport


def _catalog_columns(spec: DataSpec) -> dict[str, str]:
    c = spec.columns
    needed = {c.catalog_ad_id or c.ad_id: "ad_id"}
    for role in ("ad_categoricals", "ad_numerics", "ad_text"):
        needed.update({col: role for col in getattr(c, role)})
    if c.bid:
        needed[c.bid] = "bid"
    if c.ad_vector.column:
        needed[c.ad_vector.column] = "ad_vector"
    return needed


def _users_columns(spec: DataSpec) -> dict[str, str]:
    c = spec.columns
    needed = {c.users_user_id or c.user_id: "users_user_id" if c.users_user_id else "user_id"}
    for role in ("user_categoricals", "user_numerics"):
        needed.update({col: role for col in getattr(c, role)})
    return needed


def _user_roles_in_logs(spec: DataSpec) -> tuple[str, ...]:
    """The user feature roles read from the logs: none when a users table holds them."""
    return () if spec.has_users else ("user_categoricals", "user_numerics")


def log_columns(spec: DataSpec) -> dict[str, str]:
    c, labels = spec.columns, spec.columns.labels
    needed = {c.user_id: "user_id", c.ad_id: "ad_id", c.timestamp.column: "timestamp"}
    for role in ("click", "conversion", "rating"):
        if getattr(labels, role):
            needed[getattr(labels, role)] = f"labels.{role}"
    for role in (*_user_roles_in_logs(spec), "context_categoricals", "context_integers", "context_numerics"):
        needed.update({col: role for col in getattr(c, role)})
    if c.position:
        needed[c.position] = "position"
    return needed


def _check_keyed_chunk(check: ChunkChecker, frame: pd.DataFrame, id_col: str, numeric_cols, seen: set[str],
                       what: str, duplicate: tuple[str, str]) -> tuple[pd.Series, dict, pd.Series]:
    """The checks a table keyed by id (the catalog, the users table) shares: a non-empty id (`what`),
    numeric columns that parse, an id not seen before (`duplicate`: the problem and what was expected).
    Returns the parsed ids, the parsed numeric columns and the rows kept."""
    ids, null = parse_ids(frame[id_col])
    check.flag(null, "null_id", id_col, f"a non-empty {what}")
    numerics = {}
    for col in numeric_cols:
        numerics[col], bad = parse_numbers(frame[col])
        check.flag(bad, "bad_type", col, "a number")
    good = ids[~check.bad]
    dup = pd.Series(False, index=frame.index)
    dup[good.index] = good.duplicated() | good.isin(seen)
    check.flag(dup, duplicate[0], id_col, duplicate[1])
    return ids, numerics, ~check.bad


def _check_vectors(check: ChunkChecker, spec: DataSpec, frame: pd.DataFrame, ids: pd.Series,
                   vector_file: VectorFile | None) -> pd.Series:
    """Each catalog row's creative vector (from its column or the spec's .npz), flagging bad and missing ones."""
    v = spec.columns.ad_vector
    expected = f"{v.dim} finite numbers"
    if vector_file is None:
        vectors, bad, why = parse_vectors(frame[v.column], v.dim)
        check.flag(bad, "bad_vector", v.column, expected, why)
        return vectors
    id_col = spec.columns.catalog_ad_id or spec.columns.ad_id
    vectors, missing, why = vector_file.lookup(ids)
    check.flag(missing, "missing_vector", id_col, f"an ad id with a vector in {vector_file.path}", ids)
    check.flag(why != "", "bad_vector", id_col, expected, why)
    return vectors


def _check_catalog_chunk(spec: DataSpec, report: ValidationReport, frame: pd.DataFrame,
                         seen: set[str], vector_file: VectorFile | None = None) -> pd.DataFrame:
    c = spec.columns
    check = ChunkChecker(spec, report, "catalog", frame)
    ids, numerics, keep = _check_keyed_chunk(
        check, frame, c.catalog_ad_id or c.ad_id,
        (*c.ad_numerics, *([c.bid] if c.bid else [])), seen, "ad id",
        ("duplicate_catalog_id", "an ad id not already in the catalog"))
    vectors = None
    if c.ad_vector.dim:
        vectors = _check_vectors(check, spec, frame, ids, vector_file)
        keep = ~check.bad
    out = pd.DataFrame({"ad_id": ids[keep]})
    for col in (*c.ad_categoricals, *c.ad_text):
        out[col] = parse_text(frame.loc[keep, col], col, report)
    for col in c.ad_numerics:
        out[col] = numerics[col][keep].astype("float64")
    if c.bid:
        out["bid"] = numerics[c.bid][keep].astype("float32")
    if vectors is not None:
        out["ad_vector"] = vectors[keep]
    seen.update(out["ad_id"])
    return out


def _check_users_chunk(spec: DataSpec, report: ValidationReport, frame: pd.DataFrame,
                       seen: set[str]) -> pd.DataFrame:
    c = spec.columns
    ids, numerics, keep = _check_keyed_chunk(
        ChunkChecker(spec, report, "users", frame), frame, c.users_user_id or c.user_id, c.user_numerics, seen,
        "user id", ("duplicate_user_id", "a user id not already in the users table"))
    out = pd.DataFrame({"user_id": ids[keep]})
    for col in c.user_categoricals:
        out[col] = parse_text(frame.loc[keep, col], col, report)
    for col in c.user_numerics:
        out[col] = numerics[col][keep].astype("float64")
    seen.update(out["user_id"])
    return out


def _join_users(spec: DataSpec, report: ValidationReport, out: pd.DataFrame, users: pd.DataFrame) -> None:
    """Attach the users table's columns to kept log rows, in place; count rows of unknown users."""
    c = spec.columns
    missing = ~out["user_id"].isin(users.index)
    if missing.any():
        report.users_missing += int(missing.sum())
        report.users_missing_ids.update(out.loc[missing, "user_id"])
    for col in c.user_categoricals:
        out[col] = out["user_id"].map(users[col]).fillna("").astype(str)
    for col in c.user_numerics:
        out[col] = out["user_id"].map(users[col]).fillna(users[col].mean()).astype("float64")


def check_log_chunk(spec: DataSpec, report: ValidationReport, frame: pd.DataFrame,
                     catalog_ids: set[str], users: pd.DataFrame | None = None) -> pd.DataFrame:
    c, labels = spec.columns, spec.columns.labels
    user_cats = () if users is not None else c.user_categoricals
    user_nums = () if users is not None else c.user_numerics
    check = ChunkChecker(spec, report, "logs", frame)
    user_ids, null_user = parse_ids(frame[c.user_id])
    check.flag(null_user, "null_id", c.user_id, "a non-empty user id")
    ads, null_ad = parse_ids(frame[c.ad_id])
    check.flag(null_ad, "null_id", c.ad_id, "a non-empty ad id")
    ts, bad_ts, expected = parse_timestamps(frame[c.timestamp.column], c.timestamp.format)
    check.flag(bad_ts, "bad_timestamp", c.timestamp.column, expected)
    label_values = {}
    for role in ("click", "conversion"):
        col = getattr(labels, role)
        if col:
            values, bad = parse_numbers(frame[col])
            check.flag(bad, "bad_type", col, "a number (0 or 1)")
            check.flag(~values.isin([0, 1]), "label_domain", col, "0 or 1")
            label_values[role] = values
    if labels.rating:
        values, bad = parse_numbers(frame[labels.rating])
        check.flag(bad, "bad_type", labels.rating, "a number")
        check.flag((values < labels.rating_min) | (values > labels.rating_max), "label_domain", labels.rating,
                   f"a rating in [{labels.rating_min:g}, {labels.rating_max:g}]")
        label_values["rating"] = values
    typed = {}
    for col in (*c.context_integers, *([c.position] if c.position else [])):
        typed[col], bad = parse_numbers(frame[col], integer=True)
        check.flag(bad, "bad_type", col, "an integer")
    for col in (*user_nums, *c.context_numerics):
        typed[col], bad = parse_numbers(frame[col])
        check.flag(bad, "bad_type", col, "a number")
    check.flag(~ads.isin(catalog_ids), "unknown_ad", c.ad_id, "an ad id present in the catalog", ads)

    keep = ~check.bad
    out = pd.DataFrame({"user_id": user_ids[keep], "ad_id": ads[keep], "timestamp": ts[keep]})
    if users is not None:
        _join_users(spec, report, out, users)
    for col in (*user_cats, *c.context_categoricals):
        out[col] = parse_text(frame.loc[keep, col], col, report)
    for col in c.context_integers:
        out[col] = typed[col][keep].astype("int64")
    for col in (*user_nums, *c.context_numerics):
        out[col] = typed[col][keep].astype("float64")
    if c.position:
        out["position"] = typed[c.position][keep].astype("int64")
    if labels.implicit:
        out["click"] = pd.Series(1.0, index=out.index, dtype="float32")
    elif labels.rating:
        out["rating"] = label_values["rating"][keep].astype("float32")
        out["click"] = (label_values["rating"][keep] >= labels.threshold).astype("float32")
    else:
        out["click"] = label_values["click"][keep].astype("float32")
    if labels.conversion:
        out["conversion"] = label_values["conversion"][keep].astype("float32")
    if spec.derive_time_context:
        when = pd.to_datetime(out["timestamp"], unit="s", utc=True)
        out["hour"] = when.dt.hour.astype("int64")
        out["weekday"] = when.dt.weekday.astype("int64")
    return out


def _read(spec: DataSpec, report: ValidationReport, table: str, needed: dict[str, str], check_chunk,
          on_chunk: Callable[[str, int], None] | None = None) -> pd.DataFrame:
    counts = getattr(report, table)
    kept = []
    for chunk in read_table(getattr(spec, table), spec.root_dir, spec.chunk_rows, table):
        if chunk.file not in counts.files:
            counts.files.append(chunk.file)
        require_columns(chunk.frame, needed, chunk.file)
        counts.read += len(chunk.frame)
        part = check_chunk(chunk.frame.reset_index(drop=True))
        counts.kept += len(part)
        kept.append(part)
        if on_chunk is not None:
            on_chunk(table, len(chunk.frame))
    if counts.read == 0:
        raise DataValidationError(f"{table}: the file(s) {counts.files} hold no data rows", report=report)
    if counts.kept == 0:
        raise DataValidationError(f"{table}: all {counts.read:,d} rows were skipped", report=report)
    return pd.concat(kept, ignore_index=True)


def load_dataset(spec: DataSpec, on_chunk: Callable[[str, int], None] | None = None) -> LoadedData:
    """Read, validate and type the catalog and logs a spec names; see `LoadedData.report`.

    `on_chunk(table, rows)` is called after each chunk is read and checked ("catalog", "users",
    "logs"; the chunk's source rows): a caller's progress display."""
    report = ValidationReport(spec_name=spec.name, root=str(spec.root_dir))
    catalog, users = load_keyed_tables(spec, report, on_chunk)
    catalog_ids = set(catalog["ad_id"])
    logs = _read(spec, report, "logs", log_columns(spec),
                 lambda f: check_log_chunk(spec, report, f, catalog_ids, users), on_chunk)
    check_skipped(spec, report)
    return LoadedData(catalog=catalog, logs=logs, schema=spec.schema(), report=report)


def check_skipped(spec: DataSpec, report: ValidationReport) -> None:
    """More skipped log rows than `max_skipped_fraction` fails the run."""
    skipped = sum(report.logs.skipped.values())
    if skipped > spec.max_skipped_fraction * report.logs.read:
        raise DataValidationError(
            f"{skipped:,d} of {report.logs.read:,d} log rows were skipped, more than max_skipped_fraction "
            f"{spec.max_skipped_fraction:g}; is the spec's column mapping right?", report=report)


def load_keyed_tables(spec: DataSpec, report: ValidationReport,
                      on_chunk: Callable[[str, int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The validated catalog and, when the spec has one, the users table indexed by user id: the small
    tables every log row is checked against."""
    vector_file = None
    if spec.columns.ad_vector.file:  # read (bounded) before the catalog: each catalog chunk looks its ads up
        try:
            vector_file = read_vector_file(spec.columns.ad_vector, spec.root_dir)
        except VectorFileError as err:
            raise DataValidationError(f"{err} [bad_vector_file]", report=report) from None
    seen: set[str] = set()
    catalog = _read(spec, report, "catalog", _catalog_columns(spec),
                    lambda f: _check_catalog_chunk(spec, report, f, seen, vector_file), on_chunk)
    users = None
    if spec.has_users:
        seen_users: set[str] = set()
        users = _read(spec, report, "users", _users_columns(spec),
                      lambda f: _check_users_chunk(spec, report, f, seen_users), on_chunk).set_index("user_id")
    return catalog, users
