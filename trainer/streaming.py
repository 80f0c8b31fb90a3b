"""A training job over streamed logs (`data.stream.enabled`): no frame of the whole log is ever built.

1. The catalog (and users table) are read whole; the log files are listed.
2. One streaming pass over every file validates each chunk (the report keeps file:line examples and
   counts) and counts what the vocabularies need (`features.vocab_pass`); hashed features are not
   counted. Every worker runs this pass over all files, so all workers build the same vocabularies.
3. Retrieval (positives only) and ranking (every row) train on tf.data pipelines over the worker's own
   files (`features.stream.shard_files`: worker i of n reads files[i::n]); the pipelines repeat and an
   epoch is ceil(rows / global batch) steps, so workers whose files hold different row counts still
   take the same number of steps (a worker that ran out would stall the others' collectives).
4. The models export through the usual path (`trainer.export.export_all`).

What needs the whole log in memory is refused with the setting to change (`refuse_unstreamable`):
per-user histories and counters, the ranking probe's time split and calibration, held-out evaluation
and validation splits, time windows, sampled negatives, warm starts, DP-SGD.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import pandas as pd
import tensorflow as tf

from features.privacy import pseudonymize_columns
from features.schema import FeatureSchema
from features.spec import load_spec
from features.split import DataSplit
from features.stream import LogStream, log_dataset, open_stream, shard_files
from features.vocab import Vocabularies
from features.vocab_pass import StreamCounts, count_pass, stream_vocabularies
from trainer.builders import build_ranking, build_retrieval, build_text_assets
from trainer.checkpoints import save_checkpoint
from trainer.config import JobConfig
from trainer.explain import REFERENCE_ROWS
from trainer.fit import build_model, fit_stage
from trainer.forget import forgotten_users
from trainer.inputs import query_inputs, ranking_labels
from trainer.prepare import DataError, join_ad_features
from trainer.privacy import job_key, pseudonymize_job_data
from trainer.progress import Progress, log
from trainer.resume import claim_stages, clear_stages
from trainer.text_encoder import encode_cached, encode_packed
from trainer.trained import TrainedModels


def refuse_unstreamable(cfg: JobConfig) -> None:
    """Settings that need the whole log in memory, refused before any data is read."""
    rules = [
        (cfg.retrieval.history_length > 0, "retrieval.history_length",
         "per-user histories are built from the whole log; set it to 0"),
        (cfg.ranking.history or cfg.ranking.negative_history, "ranking.history / ranking.negative_history",
         "histories need the whole log; set them false"),
        (cfg.ranking.user_stats or cfg.ranking.item_stats, "ranking.user_stats / ranking.item_stats",
         "per-user and per-ad counters need the whole log; set them false (or precompute them as log columns "
         "and name them context_numerics)"),
        (cfg.ranking.validation_fraction > 0, "ranking.validation_fraction",
         "the probe's time split needs the whole log; set it to 0 (no early stopping; calibration is 'none')"),
        (cfg.ranking.id_frequency_l2 > 0, "ranking.id_frequency_l2", "set it to 0"),
        (cfg.evaluation.validation_fraction > 0, "evaluation.validation_fraction", "set it to 0"),
        (tuple(cfg.data.time_window) != (0.0, 1.0), "data.time_window",
         "choose the window's files in the data spec instead"),
        (cfg.privacy.dp.enabled, "privacy.dp", "DP-SGD runs in memory only"),
        (cfg.training.strategy in ("parameter_server", "tpu"), f"training.strategy {cfg.training.strategy!r}",
         "the streamed pipeline reads files in Python generators, which run only in the process that made them, "
         "not on remote workers or TPU hosts; use default, mirrored or multi_worker"),
    ]
    for bad, key, fix in rules:
        if bad:
            raise DataError(f"{key} cannot be used with data.stream.enabled: {fix} (docs/data.md#streaming)")


def _check_hash_buckets(hashed: dict[str, int], schema: FeatureSchema, cfg: JobConfig) -> None:
    allowed = (*schema.query_string_features,)
    for name in hashed:
        if name not in allowed:
            raise DataError(f"data.stream.hash_buckets: {name!r} is not one of the query string features "
                            f"{list(allowed)}; only those can be hashed")
    # A hashed id has no unknown row to drop it to, so the dropout would silently not happen.
    dropouts = {"retrieval.user_id_dropout": cfg.retrieval.user_id_dropout,
                "ranking.user_id_dropout": cfg.ranking.user_id_dropout}
    for key, rate in dropouts.items():
        if schema.user_id in hashed and rate > 0:
            raise DataError(f"{key} {rate} cannot be used with a hashed {schema.user_id!r} "
                            "(data.stream.hash_buckets): a hashed id has no unknown-id row to drop to; set it to 0")


def _stream(cfg: JobConfig, progress: bool) -> tuple[LogStream, FeatureSchema]:
    spec = load_spec(cfg.data.spec, root=cfg.data.root or None)
    if spec.columns.labels.implicit:
        raise DataError(f"data spec {spec.name!r} has implicit labels: sampled negatives need the whole log; "
                        "data.stream.enabled needs logged clicks (or a rating threshold)")
    schema = spec.schema()
    with Progress("reading the catalog", unit="rows", enabled=progress) as shown:
        stream = open_stream(spec, on_chunk=lambda table, rows: shown.advance(rows, note=table))
    if cfg.data.ad_vectors == "ignore" and schema.ad_vector:
        import dataclasses

        stream.catalog = stream.catalog.drop(columns=[schema.ad_vector])
        schema = dataclasses.replace(schema, ad_vector="", ad_vector_dim=0)
    # The privacy note on the schema, as the in-memory path records it; the rows are pseudonymised chunk by chunk.
    columns = (schema.user_id, *schema.extra.get("pii", ()))
    _, _, schema = pseudonymize_job_data(cfg, stream.catalog, pd.DataFrame({c: pd.Series(dtype=object)
                                                                             for c in columns}), schema)
    key = job_key(cfg)
    forgotten = forgotten_users(cfg)

    def transform(frame: pd.DataFrame) -> pd.DataFrame:
        if key is not None:
            frame = pseudonymize_columns(frame, columns, key)
        if forgotten:
            frame = frame[~frame[schema.user_id].isin(forgotten)].reset_index(drop=True)
        return frame

    stream.transform = transform
    return stream, schema


def _fingerprint(stream: LogStream, schema: FeatureSchema, vocabularies: Vocabularies) -> str:
    """Of the log files (path, size, modification time), the schema and the vocabularies (trainer.resume)."""
    files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in stream.files]
    text = json.dumps([files, repr(schema), vocabularies.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _worker(strategy) -> tuple[int, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0, 1
    workers = len(resolver.cluster_spec().as_dict().get("worker", []))
    return int(resolver.task_id or 0), max(1, workers)


def _dataset(stream: LogStream, cfg: JobConfig, strategy, files: list, columns: tuple[str, ...],
             schema: FeatureSchema, batch_size: int, positives_only: bool, opened: list[str]):
    """The worker's repeating pipeline, split across its replicas (per-replica batches)."""
    sc = cfg.data.stream

    def make(batch):
        return log_dataset(stream, files, columns, schema, batch, positives_only=positives_only,
                           shuffle_buffer=sc.shuffle_buffer, seed=cfg.training.seed, repeat=True,
                           cycle_length=sc.cycle_length, on_file=opened.append)

    if strategy.num_replicas_in_sync == 1:
        return make(batch_size)
    return strategy.distribute_datasets_from_function(lambda ctx: make(ctx.get_per_replica_batch_size(batch_size)))


def _fit_streamed(name: str, model, epochs: int, batch_size: int, stream: LogStream, files: list,
                  columns: tuple[str, ...], schema: FeatureSchema, positives_only: bool, rows: int, what: str,
                  cfg: JobConfig, strategy, model_dir: Path, progress: bool, opened: list[str]) -> dict:
    """One stage over the worker's files: built on a few rows of the first file, then `epochs` of
    ceil(rows / batch_size) steps (`rows`: the stage's rows in every file, `what` they are; clicked rows
    only when `positives_only`)."""
    if rows == 0:
        raise DataError(f"streamed logs: no {what} to train on")
    build_model(model, next(iter(log_dataset(stream, stream.files[:1], columns, schema, 8))), strategy)
    steps = math.ceil(rows / batch_size)
    log(f"{name}: {rows:,d} {what}, {epochs} epochs of {steps} steps, batch {batch_size}, "
        f"{strategy.num_replicas_in_sync} replica(s)")
    ds = _dataset(stream, cfg, strategy, files, columns, schema, batch_size, positives_only, opened)
    return fit_stage(name, model, ds, epochs, cfg, strategy, model_dir, progress, model.checkpoint_parts(),
                     steps_per_epoch=steps)


def _sample(stream: LogStream, schema: FeatureSchema) -> pd.DataFrame:
    """The first training rows (at most REFERENCE_ROWS), with their catalog columns: what export's
    explanation baseline averages (the in-memory path averages the first rows of its training split)."""
    parts, rows = [], 0
    for path in stream.files:
        for frame in stream.frames(path, stream.scratch_report()):
            parts.append(frame.head(REFERENCE_ROWS - rows))
            rows += len(parts[-1])
            if rows >= REFERENCE_ROWS:
                break
        if rows >= REFERENCE_ROWS:
            break
    return join_ad_features(pd.concat(parts, ignore_index=True), stream.catalog, schema)


def train_streaming(cfg: JobConfig, strategy, progress: bool = True, with_ranking: bool = True,
                    keep_stages: bool = False) -> TrainedModels:
    """`trainer.job.run_training` for `data.stream.enabled` (see the module docstring)."""
    refuse_unstreamable(cfg)
    tf.keras.utils.set_random_seed(cfg.training.seed)
    model_dir = Path(cfg.training.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    stream, schema = _stream(cfg, progress)
    hashed = dict(cfg.data.stream.hash_buckets)
    _check_hash_buckets(hashed, schema, cfg)
    t0 = time.time()
    with Progress("streaming pass: validation and vocabularies", unit="rows", enabled=progress) as shown:
        counts = count_pass(stream, schema, frozenset(hashed), cfg.privacy.min_count,
                            on_chunk=lambda path, rows: shown.advance(rows, note=Path(path).name))
    log("data validation:\n" + stream.report.format())
    vocabularies = stream_vocabularies(counts, stream.catalog, schema, hashed, user_min_count=cfg.privacy.min_count)
    pass_seconds = time.time() - t0
    catalog = stream.catalog
    index, workers = _worker(strategy)
    files = shard_files(stream.files, index, workers)
    log(f"stream: {len(stream.files)} log files, {counts.rows:,d} rows ({counts.positive_rows:,d} positives) in "
        f"{pass_seconds:.1f}s; worker {index} of {workers} trains on {len(files)} file(s): "
        + ", ".join(Path(f).name for f in files)
        + (f"; hashed: {hashed}" if hashed else ""))
    claim_stages(model_dir, cfg, _fingerprint(stream, schema, vocabularies), strategy)
    opened: list[str] = []

    with strategy.scope():
        text = build_text_assets(cfg, catalog, schema, corpus_ad_ids=set(vocabularies[schema.ad_id]),
                                 model_dir=model_dir, progress=progress)
    cached = None
    if cfg.encoder.mode == "frozen":
        cached = encode_cached(text.adapter, text.packed_catalog, cfg.encoder.cache_dir, progress=progress)
    counts_per_ad = {k: float(v) for k, v in counts.positives.items()}
    retrieval = build_retrieval(cfg, strategy, schema, vocabularies, catalog, text, cached, counts_per_ad)
    r_columns = (*query_inputs(schema, 0), *schema.ad_string_features)
    r_state = _fit_streamed("retrieval", retrieval, cfg.retrieval.epochs, cfg.retrieval.batch_size, stream, files,
                            r_columns, schema, True, counts.positive_rows, "positive pairs", cfg, strategy, model_dir,
                            progress, opened)
    if cached is None:
        cached = encode_packed(text.adapter, text.packed_catalog)
    ranking, k_state = None, {"history": {}, "steps": 0}
    if with_ranking:
        ranking, k_state = _train_ranking(cfg, strategy, stream, files, schema, vocabularies, cached, counts,
                                          model_dir, progress, opened)
    read = sorted({Path(f).name for f in opened})
    log(f"stream: worker {index} of {workers} read in training: {', '.join(read)}")
    sample = _sample(stream, schema)
    skipped = "streamed logs (data.stream): the job holds out no rows, so it has no offline metrics"
    trained = TrainedModels(config=cfg, schema=schema, catalog=catalog,
                            split=DataSplit(train=sample, test=sample.iloc[:0], protocol="stream"),
                            vocabularies=vocabularies, text=text, catalog_text_embeddings=cached,
                            retrieval=retrieval, ranking=ranking,
                            history={"retrieval": r_state["history"], "ranking": k_state["history"]})
    trained.metrics = {
        "retrieval": {"skipped": skipped}, "ranking": {"skipped": skipped},
        "stream": {"files": len(stream.files), "rows": counts.rows, "positives": counts.positive_rows,
                   "workers": workers, "worker_files": [Path(f).name for f in files], "hash_buckets": hashed,
                   "validation_pass_seconds": round(pass_seconds, 1), "report": {
                       "read": stream.report.logs.read, "kept": stream.report.logs.kept,
                       "skipped": dict(stream.report.logs.skipped)}},
        "train_steps": {"retrieval": r_state["steps"], "ranking": k_state["steps"]},
        "train_epoch_seconds": {"retrieval": r_state.get("epoch_seconds", []),
                                "ranking": k_state.get("epoch_seconds", [])},
        "train_seconds": round(time.time() - t0, 1), "warm_start": None}
    save_checkpoint(trained, strategy, model_dir)
    if not keep_stages:
        clear_stages(model_dir, strategy)
    return trained


def _train_ranking(cfg: JobConfig, strategy, stream: LogStream, files: list, schema: FeatureSchema,
                   vocabularies: Vocabularies, cached, counts: StreamCounts, model_dir: Path, progress: bool,
                   opened: list[str]):
    has = ranking_labels(schema)
    extra = tuple(getattr(schema, name) for name in ("position", "conversion") if has[name])
    columns = (*schema.query_features, *schema.ad_string_features, schema.click, *extra)
    model = build_ranking(cfg, strategy, schema, vocabularies, stream.catalog, cached)
    model.set_statistics(counts.click_rate, None)
    state = _fit_streamed("ranking", model, cfg.ranking.epochs, cfg.ranking.batch_size, stream, files, columns,
                          schema, False, counts.rows, "impressions", cfg, strategy, model_dir, progress, opened)
    model.ctr_calibrator.reset()  # no out-of-sample rows to fit calibrators on
    model.cvr_calibrator.reset()
    return model, state
