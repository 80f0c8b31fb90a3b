"""A data spec's logs streamed into tf.data, file by file, without the log ever held in pandas whole.

The catalog (and a users table) are small: they are read and validated whole, as `load_dataset`
does. The log files are read one chunk (`spec.chunk_rows` rows) at a time, validated by the same
rules (`check_log_chunk`: a problem keeps its file:line, skipped rows are counted per reason) and
typed; `LogStream.frames` yields the kept rows of one file. `log_dataset` turns a list of files into
a tf.data pipeline: files interleaved, rows mixed in a bounded pool and batched in numpy
(`features.row_pool`), and the ad's catalog columns joined in the graph (a hash table from ad id to
catalog row and a gather) instead of a pandas merge.

Multi-worker jobs shard by file (`shard_files`): worker i of n reads files[i::n], so the workers read
disjoint files whose union is every file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from features.dataset import frame_to_tensors
from features.loader import check_log_chunk, load_keyed_tables, log_columns
from features.readers import read_file, resolve_files
from features.row_pool import batches, interleave
from features.schema import FeatureSchema
from features.spec import DataSpec
from features.validate import ValidationReport, require_columns


class StreamError(ValueError):
    """The log files cannot be streamed as asked (e.g. fewer files than workers)."""


def shard_files(files: list, index: int, count: int) -> list:
    """Worker `index` of `count`'s files: files[index::count]. Every worker needs at least one file:
    a worker without data would wait for the others' gradients forever."""
    if count < 1 or not 0 <= index < count:
        raise StreamError(f"worker {index} of {count}: expected 0 <= index < count")
    if len(files) < count:
        raise StreamError(f"{len(files)} log file(s) for {count} workers: each worker reads whole files, so "
                          f"split the logs into at least {count} files (more, of similar size, balance better)")
    return list(files[index::count])


@dataclass
class LogStream:
    """A spec's validated catalog (and users table) and its log files, read on demand.

    `transform` runs on each chunk's kept rows (the job's pseudonymisation and forget list)."""

    spec: DataSpec
    catalog: pd.DataFrame
    users: pd.DataFrame | None
    files: list[Path]
    report: ValidationReport
    transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    catalog_ids: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.catalog_ids = set(self.catalog["ad_id"])

    def frames(self, path: str | Path, report: ValidationReport | None = None) -> Iterator[pd.DataFrame]:
        """The kept, typed rows of one log file, chunk by chunk; rows read, kept and skipped are counted
        in `report` (default: the stream's own) and a `fail` policy raises at the problem's file:line."""
        spec, report = self.spec, report or self.report
        counts = report.logs
        needed = log_columns(spec)
        for chunk in read_file(spec.logs, Path(path), spec.root_dir, spec.chunk_rows, list(needed)):
            if chunk.file not in counts.files:
                counts.files.append(chunk.file)
            require_columns(chunk.frame, needed, chunk.file)
            counts.read += len(chunk.frame)
            part = check_log_chunk(spec, report, chunk.frame.reset_index(drop=True), self.catalog_ids, self.users)
            counts.kept += len(part)
            if self.transform is not None:
                part = self.transform(part)
            yield part

    def scratch_report(self) -> ValidationReport:
        """A report for a pass whose counts the validation pass already took (each training epoch)."""
        return ValidationReport(spec_name=self.spec.name, root=self.report.root)


def open_stream(spec: DataSpec, transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                on_chunk: Callable[[str, int], None] | None = None) -> LogStream:
    """Read the catalog (and users table) and list the log files; no log row is read yet."""
    report = ValidationReport(spec_name=spec.name, root=str(spec.root_dir))
    catalog, users = load_keyed_tables(spec, report, on_chunk)
    files = resolve_files(spec.logs, spec.root_dir, "logs.files")
    return LogStream(spec, catalog, users, files, report, transform)


def _tf_dtype(schema: FeatureSchema, name: str) -> tf.DType:
    dtype = schema.model_dtype(name)
    return tf.string if dtype == np.dtype("object") else tf.as_dtype(dtype)


def catalog_join(catalog: pd.DataFrame, names: tuple[str, ...], schema: FeatureSchema):
    """A function that adds the catalog columns `names` to a batch, looked up by its ad id in the graph."""
    ids = catalog[schema.ad_id].astype(str).to_numpy(dtype=object)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.range(len(ids), dtype=tf.int64)), -1)
    columns = {n: tf.constant(v) for n, v in frame_to_tensors(catalog, names, schema).items()}

    def join(batch):
        rows = table.lookup(batch[schema.ad_id])  # every logged ad is in the catalog (`unknown_ad`)
        return {**batch, **{n: tf.gather(column, rows) for n, column in columns.items()}}

    return join


def split_columns(columns: tuple[str, ...], schema: FeatureSchema):
    """`columns` as (the catalog's ad columns, joined in the graph by ad id; the columns read from the
    log files; the log columns' TensorSpecs, one batch each)."""
    ad_columns = tuple(n for n in columns if n in schema.ad_string_features and n != schema.ad_id)
    log_names = tuple(n for n in columns if n not in ad_columns)
    return ad_columns, log_names, {n: tf.TensorSpec([None], _tf_dtype(schema, n)) for n in log_names}


def log_dataset(stream: LogStream, files: list, columns: tuple[str, ...], schema: FeatureSchema,
                batch_size: int, *, positives_only: bool = False, shuffle_buffer: int = 0, seed: int = 0,
                repeat: bool = False, cycle_length: int = 2,
                on_file: Callable[[str], None] | None = None) -> tf.data.Dataset:
    """Batches of `columns` from the rows of `files` (log columns read, catalog ad columns joined).

    Files are read `cycle_length` at a time, interleaved in slices of at most `batch_size` rows;
    `shuffle_buffer` rows are mixed in a pool (`features.row_pool`; 0: file order, files in the
    given order); `repeat` cycles the files for good, each pass in a new random order when shuffling
    (a multi-worker job sets its steps per epoch, since workers' files hold different row counts).
    The mixing and batching run in numpy, so tf.data sees one element per batch. `on_file(path)` is
    called as each file is opened (e.g. a worker's record of what it read). The auto-shard policy is
    OFF: a worker's files are chosen by `shard_files`, not by tf.distribute."""
    if not files:
        raise StreamError("no log files to read")
    if batch_size < 1:
        raise StreamError(f"batch_size must be >= 1, not {batch_size}")
    ad_columns, log_names, signature = split_columns(columns, schema)
    paths = [str(f) for f in files]

    def chunks_of(path: str) -> Iterator[dict[str, np.ndarray]]:
        if on_file is not None:
            on_file(path)
        for frame in stream.frames(path, stream.scratch_report()):
            if positives_only:
                frame = frame[frame[schema.click] > 0]
            if len(frame):
                yield frame_to_tensors(frame, log_names, schema)

    iterations = itertools.count()

    def generate():
        rng = np.random.default_rng([seed, next(iterations)])  # each new iterator mixes anew, reproducibly
        finished: set[str] = set()
        with_rows: set[str] = set()

        def read(path: str) -> Iterator[dict[str, np.ndarray]]:
            for chunk in chunks_of(path):
                with_rows.add(path)
                yield chunk
            finished.add(path)

        def passes():
            while True:
                yield from (paths if not shuffle_buffer else [paths[i] for i in rng.permutation(len(paths))])
                if not repeat:
                    return
                if len(finished) == len(set(paths)) and not with_rows:  # else repeating would spin for good
                    raise StreamError(f"{len(paths)} log file(s) hold no {'clicked ' if positives_only else ''}"
                                      f"rows to train on: {', '.join(Path(p).name for p in paths)}")

        slices = interleave(read, passes(), max(1, min(cycle_length, len(paths))), batch_size)
        yield from batches(slices, batch_size, shuffle_buffer, rng)

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    if ad_columns:
        ds = ds.map(catalog_join(stream.catalog, ad_columns, schema))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    options.autotune.enabled = False  # as in features.dataset: its model thread deadlocked on 2 cores
    return ds.with_options(options).prefetch(2)
