"""A YAML data spec: where a user's logs, ad catalog and users table live, and which column plays which role.

Loaded with `yaml.safe_load`; unknown keys are refused with their dotted path. Ids, the
timestamp, labels, position and bid are renamed to the canonical names of `FeatureSchema`
(`user_id`, `ad_id`, `timestamp`, `click`, `conversion`, `position`, `bid`) so exported
models always take `user_id` / `ad_id`; categoricals, numerics and text keep their names.

```yaml
name: my-logs
root: /data/ads                # file paths are relative to it; itself relative to this file
logs:    {files: ["impressions/*.parquet"]}
catalog: {files: [ads.csv], format: csv}
users:   {files: [users.csv]}     # optional: one row per user, joined onto log rows by user id
columns:
  user_id: uid
  users_user_id: id              # the users table's user id column when it differs from the logs'
  ad_id: creative_id
  timestamp: {column: ts, format: unix}      # unix | unix_ms | iso | a strftime format
  labels: {click: clicked, conversion: converted}   # or {rating: stars, threshold: 4}, or {implicit: true}
  user_categoricals: [country]   # from the users table when there is one, else from the logs
  context_categoricals: [device]
  context_integers: []
  ad_categoricals: [advertiser]
  ad_text: [headline, body]
  ad_vector: {column: image_embedding, dim: 512}   # optional creative vectors; or {file: creatives.npz, dim: 512}
  position: slot
  bid: cpc
  pii: [country]                 # user/context categoricals that identify people: pseudonymised like user ids
derive_time_context: true      # hour and weekday (UTC) from the timestamp
policy: {bad_timestamp: fail}  # per problem: fail | skip (skip counts and reports)
```
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from features.schema import FeatureSchema
from features.typed_yaml import coerce, read_yaml

# Row-level problems a policy can fail on or skip; a missing column always fails.
PROBLEMS = ("null_id", "bad_type", "bad_timestamp", "label_domain", "duplicate_catalog_id", "duplicate_user_id",
            "unknown_ad", "bad_vector", "missing_vector")
POLICIES = ("fail", "skip")
TABLE_FORMATS = ("auto", "csv", "parquet", "mind_behaviors", "movielens_100k_items")
PLAIN_FORMATS = ("auto", "csv", "parquet")  # the users table has no format-specific reader
TIME_CONTEXT = ("hour", "weekday")


class DataSpecError(ValueError):
    """A data spec file is malformed: unknown key, wrong type, impossible combination."""


@dataclass(frozen=True)
class TableSpec:
    files: tuple[str, ...] = ()
    format: str = "auto"  # auto (by extension) | csv | parquet | mind_behaviors | movielens_100k_items
    sep: str = ","
    header: bool = True
    names: tuple[str, ...] = ()  # column names when the file has no header
    encoding: str = "utf-8"
    quoting: bool = True  # False: quote characters are plain text (MIND's TSVs)


@dataclass(frozen=True)
class TimestampSpec:
    column: str = "timestamp"
    format: str = "unix"  # unix | unix_ms | iso | a strftime format such as "%m/%d/%Y %I:%M:%S %p"


@dataclass(frozen=True)
class LabelSpec:
    click: str = ""  # a 0/1 column
    conversion: str = ""  # a 0/1 column
    rating: str = ""  # or: a rating column, positive when rating >= threshold
    threshold: float = 0.0
    rating_min: float = float("-inf")
    rating_max: float = float("inf")
    implicit: bool = False  # or: every log row is an interaction, a positive (click = 1)


MAX_VECTOR_DIM = 8192
VECTOR_FILE_KEYS = ("ad_id", "vectors")  # the arrays of an `ad_vector.file` (.npz)


@dataclass(frozen=True)
class AdVectorSpec:
    """A precomputed creative embedding per ad (an image or video vector from any model): a catalog
    column holding a list of `dim` numbers per row (a Parquet list column; in CSV the numbers as text,
    "0.1 0.2" or "[0.1, 0.2]"), or an .npz file holding `ad_id` [n] and `vectors` [n, dim]."""

    column: str = ""
    file: str = ""  # relative to the spec's root
    dim: int = 0
    max_bytes: int = 4 << 30  # an .npz whose vectors would take more memory than this is refused unread


@dataclass(frozen=True)
class ColumnsSpec:
    user_id: str = "user_id"
    ad_id: str = "ad_id"
    catalog_ad_id: str = ""  # the catalog's ad id column when it differs from the logs'
    users_user_id: str = ""  # the users table's user id column when it differs from the logs'
    timestamp: TimestampSpec = field(default_factory=TimestampSpec)
    labels: LabelSpec = field(default_factory=LabelSpec)
    user_categoricals: tuple[str, ...] = ()
    context_categoricals: tuple[str, ...] = ()
    context_integers: tuple[str, ...] = ()
    ad_categoricals: tuple[str, ...] = ()
    user_numerics: tuple[str, ...] = ()
    context_numerics: tuple[str, ...] = ()
    ad_numerics: tuple[str, ...] = ()
    ad_text: tuple[str, ...] = ()
    ad_vector: AdVectorSpec = field(default_factory=AdVectorSpec)
    position: str = ""
    bid: str = ""
    # Columns that identify people (e.g. an email, a postcode): replaced by keyed pseudonyms at ingest
    # like the user id, which always is (`privacy.pseudonymize`). User or context categoricals only: a
    # number or a text would lose its meaning as a hash.
    pii: tuple[str, ...] = ()


PII_ROLES = ("user_categoricals", "context_categoricals")


@dataclass(frozen=True)
class DataSpec:
    name: str = "data"
    root: str = "."
    logs: TableSpec = field(default_factory=TableSpec)
    catalog: TableSpec = field(default_factory=TableSpec)
    users: TableSpec = field(default_factory=TableSpec)  # optional (no files: no users table)
    columns: ColumnsSpec = field(default_factory=ColumnsSpec)
    derive_time_context: bool = False
    policy: dict = field(default_factory=dict)
    max_skipped_fraction: float = 0.5  # more skipped log rows than this fails the run
    chunk_rows: int = 200_000
    text_separator: str = " . "
    base_dir: str = "."  # the spec file's directory (set by load_spec, not by the file)

    @property
    def root_dir(self) -> Path:
        root = Path(self.root).expanduser()
        return (root if root.is_absolute() else Path(self.base_dir) / root).resolve()

    @property
    def has_users(self) -> bool:
        return bool(self.users.files)

    def policy_for(self, problem: str) -> str:
        return self.policy.get(problem, "skip")

    def schema(self) -> FeatureSchema:
        """The FeatureSchema of the frames `load_dataset` returns for this spec."""
        c = self.columns
        ints = tuple(c.context_integers)
        if self.derive_time_context:
            ints = ints + tuple(n for n in TIME_CONTEXT if n not in ints)
        labels = c.labels
        return FeatureSchema(
            user_categoricals=tuple(c.user_categoricals),
            context_categoricals=tuple(c.context_categoricals),
            context_integers=ints,
            ad_categoricals=tuple(c.ad_categoricals),
            ad_text=tuple(c.ad_text),
            bid="bid" if c.bid else "",
            position="position" if c.position else "",
            conversion="conversion" if labels.conversion else "",
            text_separator=self.text_separator,
            ad_vector="ad_vector" if c.ad_vector.dim else "",
            ad_vector_dim=c.ad_vector.dim,
            extra={"numerics": (*c.user_numerics, *c.context_numerics, *c.ad_numerics),
                   "spec": self.name, "labels": "implicit" if labels.implicit else "logged",
                   "pii": tuple(n for n in c.pii if n != c.user_id)},
        )


def _check(spec: DataSpec, where: str) -> None:
    c = spec.columns
    for problem, policy in spec.policy.items():
        if problem not in PROBLEMS:
            raise DataSpecError(f"{where}.policy: unknown problem {problem!r}; known: {list(PROBLEMS)}")
        if policy not in POLICIES:
            raise DataSpecError(f"{where}.policy.{problem}: expected one of {list(POLICIES)}, got {policy!r}")
    for table in ("logs", "catalog"):
        t = getattr(spec, table)
        if not t.files:
            raise DataSpecError(f"{where}.{table}.files: at least one file or glob is required")
        if t.format not in TABLE_FORMATS:
            raise DataSpecError(f"{where}.{table}.format: expected one of {list(TABLE_FORMATS)}, got {t.format!r}")
    for table in ("logs", "catalog", "users"):
        _check_text_options(getattr(spec, table), f"{where}.{table}")
    _check_users(spec, where)
    labels = c.labels
    if bool(labels.click) + bool(labels.rating) + labels.implicit != 1:
        raise DataSpecError(f"{where}.columns.labels: give exactly one of `click` or `rating` (+ `threshold`), "
                            "or `implicit: true`")
    if not c.ad_text:
        raise DataSpecError(f"{where}.columns.ad_text: the ad tower reads text; name at least one text column")
    reserved = {"user_id", "ad_id", "timestamp", "click", "conversion", "position", "bid", "ad_vector"}
    if spec.derive_time_context:
        reserved |= set(TIME_CONTEXT)
    for role in ("user_categoricals", "context_categoricals", "context_integers", "ad_categoricals",
                 "user_numerics", "context_numerics", "ad_numerics", "ad_text"):
        clash = sorted(set(getattr(c, role)) & reserved - ({*TIME_CONTEXT} if role == "context_integers" else set()))
        if clash:
            raise DataSpecError(f"{where}.columns.{role}: {clash} are reserved for canonical columns; "
                                "map them through their role (user_id, ad_id, labels, ...) instead")
    _check_pii(c, where)
    _check_ad_vector(c.ad_vector, f"{where}.columns.ad_vector")
    if spec.chunk_rows < 1:
        raise DataSpecError(f"{where}.chunk_rows: expected a positive integer, got {spec.chunk_rows}")
    # A NaN guard compares False with everything and would turn the guard off.
    if not 0 <= spec.max_skipped_fraction <= 1:
        raise DataSpecError(f"{where}.max_skipped_fraction: expected a fraction in [0, 1], "
                            f"got {spec.max_skipped_fraction!r}")
    if labels.rating:
        if not math.isfinite(labels.threshold):
            raise DataSpecError(f"{where}.columns.labels.threshold: expected a finite number, got {labels.threshold!r}")
        if not labels.rating_min <= labels.rating_max:  # NaN fails too
            raise DataSpecError(f"{where}.columns.labels.rating_min: expected a number <= rating_max "
                                f"({labels.rating_max!r}), got {labels.rating_min!r}")


def _check_ad_vector(v: AdVectorSpec, where: str) -> None:
    if not (v.column or v.file or v.dim):
        return
    if bool(v.column) == bool(v.file):
        raise DataSpecError(f"{where}: give exactly one of `column` (a catalog column) or `file` (an .npz with "
                            f"arrays {list(VECTOR_FILE_KEYS)})")
    if not 1 <= v.dim <= MAX_VECTOR_DIM:
        raise DataSpecError(f"{where}.dim: expected the vectors' length, 1..{MAX_VECTOR_DIM}, got {v.dim}")
    if v.file and not v.file.lower().endswith(".npz"):
        raise DataSpecError(f"{where}.file: expected an .npz file with arrays {list(VECTOR_FILE_KEYS)}, "
                            f"got {v.file!r}")
    if v.max_bytes < 1:
        raise DataSpecError(f"{where}.max_bytes: expected a positive number of bytes, got {v.max_bytes}")


def _check_pii(c: ColumnsSpec, where: str) -> None:
    allowed = {col for role in PII_ROLES for col in getattr(c, role)}
    for col in c.pii:
        if col not in allowed and col != c.user_id:  # the user id is pseudonymised anyway
            raise DataSpecError(f"{where}.columns.pii: {col!r} is not one of the user or context categoricals "
                                f"{sorted(allowed)}; only categoricals can be pseudonymised and keep their use "
                                "(leave a number or text that identifies people out of the spec)")
    if len(set(c.pii)) != len(c.pii):
        raise DataSpecError(f"{where}.columns.pii: a column is listed twice: {list(c.pii)}")


def _check_text_options(table: TableSpec, where: str) -> None:
    """`encoding` and `sep` of a table, refused here rather than as a traceback from pandas."""
    try:
        text_encoding = getattr(codecs.lookup(table.encoding), "_is_text_encoding", True)
    except LookupError:
        raise DataSpecError(f"{where}.encoding: unknown text encoding {table.encoding!r} "
                            "(e.g. utf-8, latin-1, cp1252)") from None
    if not text_encoding:
        raise DataSpecError(f"{where}.encoding: {table.encoding!r} is not a text encoding (e.g. utf-8, latin-1)")
    if not table.sep:
        raise DataSpecError(f"{where}.sep: expected a separator of one or more characters, got ''")
    if any(ch in table.sep for ch in "\r\n"):
        raise DataSpecError(f"{where}.sep: a line break cannot separate fields, got {table.sep!r}")
    if table.quoting and '"' in table.sep:
        raise DataSpecError(f"{where}.sep: {table.sep!r} holds the quote character '\"'; set `quoting: false` "
                            "to split on it")


def _check_users(spec: DataSpec, where: str) -> None:
    c = spec.columns
    if not spec.has_users:
        if c.users_user_id:
            raise DataSpecError(f"{where}.columns.users_user_id: names a users table column, but `users.files` "
                                "names no users table")
        return
    if spec.users.format not in PLAIN_FORMATS:
        raise DataSpecError(f"{where}.users.format: expected one of {list(PLAIN_FORMATS)}, got {spec.users.format!r}")
    if not (c.user_categoricals or c.user_numerics):
        raise DataSpecError(f"{where}.users: a users table is given but columns.user_categoricals and "
                            "columns.user_numerics name none of its columns")


def spec_from_dict(raw: dict | None, where: str = "spec", base_dir: str | Path = ".") -> DataSpec:
    spec = coerce(DataSpec, raw or {}, where, DataSpecError,
                  shorthands={TimestampSpec: lambda column: TimestampSpec(column=column)},
                  hidden=frozenset({"base_dir"}))
    spec = dataclasses.replace(spec, base_dir=str(base_dir))
    _check(spec, where)
    return spec


def load_spec(path: str | Path, root: str | Path | None = None) -> DataSpec:
    """Read a spec file; `root` overrides the spec's data directory (e.g. a test fixture)."""
    path = Path(path)
    raw = read_yaml(path, DataSpecError, "data spec")
    spec = spec_from_dict(raw, str(path), base_dir=path.resolve().parent)
    if root is not None:
        spec = dataclasses.replace(spec, root=str(Path(root).resolve()))
    return spec
