"""Validation of raw chunks against a data spec: parse, check, skip or fail, count, report.

Each problem names its file, line, column, the value found and the form expected. The
spec's policy decides per problem: `fail` raises `DataValidationError` at the first
occurrence; `skip` drops the row, counts it under its reason and keeps a few examples for
the report. A row with several problems is counted once, under the first one checked
(ids, then timestamp, labels, typed columns, catalog membership; in the catalog: ids, numbers,
duplicates, then the creative vector, `features/vectors.py`). A missing column always
fails. Null categoricals and texts are not problems: they become "" and are counted. Log rows
whose user is missing from the users table are not problems either: they are kept with empty
user features and counted (`ValidationReport.users_missing`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.readers import FILE_COL, LINE_COL
from features.spec import PROBLEMS, DataSpec

EXAMPLES_PER_REASON = 3
UNIX_MIN, UNIX_MAX = 0, 4_102_444_800  # 1970-01-01 .. 2100-01-01, in seconds


@dataclass(frozen=True)
class Problem:
    reason: str
    file: str
    line: int
    column: str
    value: object
    expected: str

    def __str__(self) -> str:
        return (f"{self.file}:{self.line}: column {self.column!r}: got {self.value!r}, "
                f"expected {self.expected} [{self.reason}]")


class DataValidationError(ValueError):
    """Input data breaks the spec under a `fail` policy (or too many rows were skipped)."""

    def __init__(self, message: str, problem: Problem | None = None, report: ValidationReport | None = None):
        super().__init__(message)
        self.problem = problem
        self.report = report


@dataclass
class TableCounts:
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    spec_name: str
    root: str
    catalog: TableCounts = field(default_factory=TableCounts)
    logs: TableCounts = field(default_factory=TableCounts)
    users: TableCounts = field(default_factory=TableCounts)  # read only when the spec has a users table
    examples: dict[str, list[Problem]] = field(default_factory=dict)
    filled_nulls: Counter = field(default_factory=Counter)
    users_missing: int = 0  # kept log rows whose user is not in the users table
    users_missing_ids: set[str] = field(default_factory=set)

    def tables(self) -> tuple[str, ...]:
        return ("catalog", "users", "logs") if self.users.files else ("catalog", "logs")

    def skipped(self) -> Counter:
        return self.catalog.skipped + self.users.skipped + self.logs.skipped

    def format(self) -> str:
        """One screen: rows read / kept / skipped per table, skipped rows by reason with examples."""
        lines = [f"data spec {self.spec_name!r} (root {self.root})",
                 f"  {'':8s}{'read':>12s}{'kept':>12s}{'skipped':>10s}  files"]
        for name in self.tables():
            t: TableCounts = getattr(self, name)
            files = ", ".join(t.files[:3]) + (f" (+{len(t.files) - 3} more)" if len(t.files) > 3 else "")
            lines.append(f"  {name:8s}{t.read:12,d}{t.kept:12,d}{sum(t.skipped.values()):10,d}  {files}")
        skipped = [(table, reason, n) for table in self.tables()
                   for reason, n in sorted(getattr(self, table).skipped.items())]
        lines.append("skipped rows by reason:" if skipped else "skipped rows: none")
        for table, reason, n in skipped:
            lines.append(f"  {table:8s}{reason:22s}{n:10,d}")
            for problem in self.examples.get(f"{table}:{reason}", [])[:EXAMPLES_PER_REASON]:
                lines.append(f"      e.g. {problem}")
        if self.users_missing:
            some = ", ".join(repr(u) for u in sorted(self.users_missing_ids)[:EXAMPLES_PER_REASON])
            lines.append(f"log rows whose user is not in the users table (kept, user features empty): "
                         f"{self.users_missing:,d} rows of {len(self.users_missing_ids):,d} users, e.g. {some}")
        if self.filled_nulls:
            lines.append("nulls read as empty text: " + ", ".join(
                f"{col} {n:,d}" for col, n in sorted(self.filled_nulls.items())))
        return "\n".join(lines)


class ChunkChecker:
    """Tracks which rows of one chunk are bad, applying the spec's policy per problem."""

    def __init__(self, spec: DataSpec, report: ValidationReport, table: str, frame: pd.DataFrame):
        self.spec, self.report, self.table, self.frame = spec, report, table, frame
        self.bad = pd.Series(False, index=frame.index)

    def flag(self, mask: pd.Series, reason: str, column: str, expected: str, values: pd.Series | None = None):
        assert reason in PROBLEMS, reason
        new = mask.fillna(True) & ~self.bad
        if not new.any():
            return
        values = self.frame[column] if values is None else values
        rows = new[new].index
        problems = [Problem(reason, self.frame.at[i, FILE_COL], int(self.frame.at[i, LINE_COL]), column,
                            _plain(values.at[i]), expected) for i in rows[:EXAMPLES_PER_REASON]]
        if self.spec.policy_for(reason) == "fail":
            raise DataValidationError(str(problems[0]), problems[0], self.report)
        self.bad |= new
        getattr(self.report, self.table).skipped[reason] += int(new.sum())
        examples = self.report.examples.setdefault(f"{self.table}:{reason}", [])
        examples.extend(problems[: EXAMPLES_PER_REASON - len(examples)])


def _plain(value):
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return value.item() if isinstance(value, np.generic) else value


def require_columns(frame: pd.DataFrame, needed: dict[str, str], file: str) -> None:
    """`needed` maps column -> the role that needs it; any missing column fails the run."""
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        roles = ", ".join(f"{c!r} ({needed[c]})" for c in missing)
        found = [c for c in frame.columns if not c.startswith("_")]
        raise DataValidationError(f"{file}:1: missing column(s) {roles}; found columns {found} [missing_column]")


def parse_ids(series: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Ids as stripped strings (integral floats lose their '.0'); returns (ids, is_null)."""
    if pd.api.types.is_float_dtype(series):
        ints = series.dropna()
        if (ints == ints.round()).all() and (ints.abs() < 2**53).all():  # exact in float64
            series = series.astype("Int64")
    ids = series.astype("string").str.strip()
    null = ids.isna() | (ids == "")
    return ids.fillna("").astype(object), null


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INTEGER_TEXT = r"[+-]?\d+"


def parse_numbers(series: pd.Series, integer: bool = False) -> tuple[pd.Series, pd.Series]:
    """-> (values, is_bad). Numbers must be finite; with `integer`, integral and within int64,
    returned as exact int64 (a bad row holds 0): nothing beyond int64 wraps to a negative value,
    and an integer written in digits is never rounded through float64."""
    if integer:
        return _parse_integers(series)
    if pd.api.types.is_bool_dtype(series):
        series = series.astype("int64")
    values = pd.to_numeric(series, errors="coerce")
    bad = values.isna() | ~np.isfinite(values.astype("float64"))
    return values, bad


def _parse_integers(series: pd.Series) -> tuple[pd.Series, pd.Series]:
    if pd.api.types.is_bool_dtype(series):
        series = series.astype("int64")
    if pd.api.types.is_integer_dtype(series) and not pd.api.types.is_extension_array_dtype(series):
        if series.dtype == np.uint64:  # Parquet uint64: above int64's maximum is out of range
            bad = pd.Series(series.to_numpy() > np.uint64(INT64_MAX), index=series.index)
            return series.where(~bad, 0).astype("int64"), bad
        return series.astype("int64"), pd.Series(False, index=series.index)
    text = series.astype("string").str.strip()
    digits = text.str.fullmatch(_INTEGER_TEXT).fillna(False).astype(bool)
    exact = pd.Series([int(t) for t in text[digits]], index=text.index[digits], dtype=object)
    bad_exact = pd.Series([not INT64_MIN <= v <= INT64_MAX for v in exact], index=exact.index, dtype=bool)
    # Anything else ("3.0", "1e3", a Parquet float): integral and within int64 as a float.
    rest = pd.to_numeric(series.where(~digits), errors="coerce").astype("float64")
    bad = ~digits & (rest.isna() | ~np.isfinite(rest) | (rest != rest.round())
                     | (rest < -(2.0**63)) | (rest >= 2.0**63))
    bad[bad_exact.index] = bad_exact
    values = pd.Series(0, index=series.index, dtype="int64")
    good_exact = exact[~bad_exact]
    values[good_exact.index] = good_exact.astype("int64")
    good_rest = ~digits & ~bad
    values[good_rest] = rest[good_rest].astype("int64")
    return values, bad


def _outside_unix_range(dt: pd.Series) -> pd.Series:
    """Parsed date-times before 1970-01-01 or from 2100-01-01 on (UTC)."""
    lo, hi = pd.Timestamp(UNIX_MIN, unit="s", tz="UTC"), pd.Timestamp(UNIX_MAX, unit="s", tz="UTC")
    return dt.notna() & ((dt < lo) | (dt >= hi))


def parse_timestamps(series: pd.Series, fmt: str) -> tuple[pd.Series, pd.Series, str]:
    """-> (unix seconds as int64, is_bad, the expected form in words).

    Every form must fall in 1970-01-01 .. 2100-01-01 (UTC); outside it the row is `bad_timestamp`."""
    if pd.api.types.is_datetime64_any_dtype(series):
        dt = pd.to_datetime(series, utc=True)
        expected = "a timestamp (1970..2100)"
    elif fmt in ("unix", "unix_ms"):
        values, bad = parse_numbers(series)
        seconds = values / 1000.0 if fmt == "unix_ms" else values
        bad |= (seconds < UNIX_MIN) | (seconds >= UNIX_MAX)
        unit = "milliseconds" if fmt == "unix_ms" else "seconds"
        out = seconds.where(~bad, 0).astype("float64").floordiv(1).astype("int64")
        return out, bad, f"unix {unit} (a number, 1970..2100)"
    elif fmt == "iso":
        dt = _to_datetime(series, format="ISO8601")
        expected = "an ISO 8601 date-time (1970..2100)"
    else:
        dt = _to_datetime(series, format=fmt)
        expected = f"a date-time in the form {fmt!r} (1970..2100)"
    bad = dt.isna() | _outside_unix_range(dt)
    dt = dt.where(~bad, pd.Timestamp(0, tz="UTC"))
    seconds = (dt.dt.tz_convert(None) - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    return seconds.astype("int64"), bad, expected


def _to_datetime(series: pd.Series, format: str) -> pd.Series:
    """Text -> UTC date-times (NaT where unparseable); a whole-column failure pandas raises for
    (e.g. mixed offsets it cannot unify) becomes per-value parsing."""
    try:
        return pd.to_datetime(series, errors="coerce", utc=True, format=format)
    except (ValueError, OverflowError):
        return pd.Series([_one_datetime(v, format) for v in series], index=series.index,
                         dtype="datetime64[ns, UTC]")


def _one_datetime(value, format: str):
    try:
        return pd.to_datetime(value, utc=True, format=format)
    except (ValueError, OverflowError, TypeError):
        return pd.NaT


def parse_text(series: pd.Series, column: str, report: ValidationReport) -> pd.Series:
    null = series.isna()
    if null.any():
        report.filled_nulls[column] += int(null.sum())
    return series.astype(object).where(~null, "").astype(str)
