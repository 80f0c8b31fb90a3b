"""Data preparation for a job: load the logs and catalog, window them, split by the evaluation protocol,
join ad columns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.history import HISTORY
from features.protocol import EvaluationProtocol, ProtocolData, apply_protocol, leaking_context
from features.schema import DEFAULT_SCHEMA, FeatureSchema
from features.split import DataSplit
from features.synthetic import CREATIVE_COLUMN, generate_world
from features.user_stats import USER_STATS, add_negative_history, add_user_stats
from features.vocab import Vocabularies, build_vocabularies
from trainer.config import JobConfig
from trainer.forget import drop_forgotten, forgotten_users
from trainer.labels import add_sampled_negatives, refuse_implicit_without_negatives
from trainer.privacy import pseudonymize_job_data
from trainer.progress import Progress, log
from trainer.resume import data_fingerprint


class DataError(ValueError):
    """Training data does not fit together (e.g. a logged ad missing from the catalog)."""


def load_data(cfg: JobConfig) -> tuple[pd.DataFrame, pd.DataFrame, FeatureSchema]:
    if cfg.data.source != "synthetic":
        raise DataError(f"data.source {cfg.data.source!r} is not known; use 'synthetic' or 'spec'")
    with Progress("generating the synthetic world"):
        world = generate_world(cfg.data.synthetic)
    return world.catalog, world.logs, world.schema


def load_job_data(cfg: JobConfig, schema: FeatureSchema | None = None,
                  frames: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                  forgotten: frozenset[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, FeatureSchema]:
    """Catalog, logs and their schema: the synthetic world, or real logs through a data spec; user ids
    and the spec's `pii` columns pseudonymised here, where the loaded frames enter the job, before
    anything else reads them (`trainer.privacy`).

    With `data.source: spec` the schema is the spec's (its columns, possibly no context); the
    spec's validation report is printed, and a `fail` policy raises DataValidationError. `frames`:
    a (catalog, logs) pair read by the caller (the continuous loop's day partitions) in the
    synthetic world's columns, used instead of `data.source`.

    The rows of users on the job's forget list (`trainer.forget`; `forgotten`: the list as the caller
    read it, None: read it here) are dropped right after pseudonymisation, before anything else sees them.
    """
    if frames is not None:
        catalog, logs = frames
        schema = schema or _frames_schema(cfg, catalog)
    else:
        catalog, logs, schema = _load_raw(cfg, schema)
    if cfg.data.ad_vectors == "ignore" and schema.ad_vector:  # e.g. a text-only baseline on the same data
        catalog = catalog.drop(columns=[schema.ad_vector])
        schema = dataclasses.replace(schema, ad_vector="", ad_vector_dim=0)
    catalog, logs, schema = pseudonymize_job_data(cfg, catalog, logs, schema)
    logs = drop_forgotten(logs, schema.user_id, forgotten_users(cfg) if forgotten is None else forgotten)
    return catalog, logs, schema


def _frames_schema(cfg: JobConfig, catalog: pd.DataFrame) -> FeatureSchema:
    """The synthetic world's schema for frames in its columns, its creative vectors included when the
    config's world has them and the catalog carries them."""
    dim = cfg.data.synthetic.creative_dim
    if dim and CREATIVE_COLUMN in catalog:
        return dataclasses.replace(DEFAULT_SCHEMA, ad_vector=CREATIVE_COLUMN, ad_vector_dim=dim)
    return DEFAULT_SCHEMA


def _load_raw(cfg: JobConfig, schema: FeatureSchema | None) -> tuple[pd.DataFrame, pd.DataFrame, FeatureSchema]:
    if cfg.data.source != "spec":
        catalog, logs, world_schema = load_data(cfg)
        return catalog, logs, schema or world_schema
    if not cfg.data.spec:
        raise DataError("data.source is 'spec' but data.spec names no spec file")
    from features.loader import load_dataset
    from features.spec import load_spec

    spec = load_spec(cfg.data.spec, root=cfg.data.root or None)
    refuse_implicit_without_negatives(cfg, spec.name, spec.columns.labels.implicit)
    with Progress(f"reading data spec {spec.name!r}", unit="rows") as shown:
        loaded = load_dataset(spec, on_chunk=lambda table, rows: shown.advance(rows, note=table))
    log("data validation:\n" + loaded.report.format())
    return loaded.catalog, loaded.logs, loaded.schema


def join_ad_features(logs: pd.DataFrame, catalog: pd.DataFrame, schema: FeatureSchema) -> pd.DataFrame:
    """Attach the catalog's ad columns to each log row; every logged ad must be in the catalog."""
    unknown = ~logs[schema.ad_id].isin(set(catalog[schema.ad_id]))
    if unknown.any():
        first = logs.index[unknown][0]
        raise DataError(f"{int(unknown.sum())} log rows name ads missing from the catalog "
                        f"(first at row {first}: {logs.at[first, schema.ad_id]!r})")
    cols = [c for c in schema.ad_string_features if c != schema.ad_id]
    return logs.drop(columns=[c for c in cols if c in logs.columns]).merge(
        catalog[[schema.ad_id, *cols]], on=schema.ad_id, how="left", validate="many_to_one")


def sampling_counts(rows: pd.DataFrame, schema: FeatureSchema) -> dict[str, float]:
    """Training positives per ad id: the in-batch sampling frequencies logQ correction uses."""
    counts = rows.loc[rows[schema.click] > 0, schema.ad_id].astype(str).value_counts()
    return {k: float(v) for k, v in counts.items()}


def select_time_window(logs: pd.DataFrame, window: tuple[float, ...], schema: FeatureSchema
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose timestamp falls in [start, end) of the log's time span (as fractions), and the rows
    before `start` (their positives still belong in the window's histories)."""
    if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
        raise DataError(f"data.time_window must be [start, end] with 0 <= start < end <= 1, got {list(window)}")
    if tuple(window) == (0.0, 1.0):
        return logs, logs.iloc[:0]
    ts = logs[schema.timestamp]
    lo, hi = ts.min(), ts.max()
    start, end = lo + window[0] * (hi - lo), lo + window[1] * (hi - lo)
    keep = (ts >= start) & ((ts < end) if window[1] < 1.0 else (ts <= end))
    return logs[keep].reset_index(drop=True), logs[ts < start].reset_index(drop=True)


@dataclass
class PreparedData:
    """A job's data after its evaluation protocol: the split (with histories and catalog ad columns),
    the ads each held-out row may not be shown, and the training-only vocabularies."""

    catalog: pd.DataFrame
    schema: FeatureSchema
    split: DataSplit
    vocabularies: Vocabularies
    excluded: list[np.ndarray] = field(default_factory=list)
    prior: pd.DataFrame | None = None  # rows before the time window: history sources only
    fingerprint: str = ""  # of the loaded catalog and logs, the schema and the vocabularies (trainer.resume)

    def validation(self, protocol: EvaluationProtocol, history_length: int) -> ProtocolData:
        """The validation split carved from the training rows by the same protocol, with histories of its own."""
        raw = self.split.train.drop(columns=[HISTORY], errors="ignore")
        return apply_protocol(raw, protocol.validation(), history_length, self.schema, self.prior)


def add_event_features(split: DataSplit, cfg: JobConfig, schema: FeatureSchema) -> DataSplit:
    """The ranking model's per-event user features (counters, the history of non-clicks), from events
    strictly before each row: a training row counts training events; a held-out row counts training
    events and, with `history_at_test: streaming`, its user's earlier held-out events too."""
    if not (cfg.ranking.user_stats or cfg.ranking.negative_history):
        return split
    train, test = split.train, split.test
    both = pd.concat([train, test], ignore_index=True)
    streaming = cfg.evaluation.history_at_test == "streaming"
    known = np.r_[np.ones(len(train), bool), np.full(len(test), streaming)]
    if cfg.ranking.negative_history:
        train = add_negative_history(train, cfg.retrieval.history_length, schema)
        test = add_negative_history(test, cfg.retrieval.history_length, schema, both[known])
    if cfg.ranking.user_stats:
        train = add_user_stats(train, cfg.ranking.recent_window, schema)
        counted = add_user_stats(both, cfg.ranking.recent_window, schema, source=known)
        test = test.assign(**{c: counted[c].to_numpy()[len(train):] for c in USER_STATS})
    return split.with_frames(train, test)


EXCLUDED = "_excluded_ad_ids"  # a held-out row's exclusions, carried through the negative sampler


def prepare_data(cfg: JobConfig, schema: FeatureSchema | None = None,
                 vocabularies: Vocabularies | None = None, with_negatives: bool = True,
                 frames: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                 forgotten: frozenset[str] | None = None) -> PreparedData:
    """Load and window the job's data, split it by `cfg.evaluation`'s protocol and give every row its
    history; vocabularies from training rows unless given.

    Under a random split, time-of-day context that would identify held-out sessions is dropped from
    the schema (with a warning) unless `evaluation.session_context: keep`. Logs with no negatives
    (implicit labels) get sampled ones on both sides of the split (`trainer.labels`) unless
    `with_negatives` is False (a retrieval-only run reads positives alone).
    """
    catalog, logs, schema = load_job_data(cfg, schema, frames, forgotten)
    loaded = (catalog, logs)
    logs, prior = select_time_window(logs, cfg.data.time_window, schema)
    data = apply_protocol(logs, cfg.evaluation, cfg.retrieval.history_length, schema, prior)
    dropped, overlap = leaking_context(data.split, cfg.evaluation, schema)
    if dropped:
        log(f"warning: evaluation.protocol random: {overlap:.0%} of held-out positives share a session (a positive "
            f"of the same user within an hour) with training rows, so context {list(dropped)} would identify "
            "them; the models do not read it (evaluation.session_context: keep to override)")
        schema = dataclasses.replace(schema, context_integers=tuple(
            n for n in schema.context_integers if n not in dropped))
    split = add_event_features(data.split, cfg, schema)
    if vocabularies is None:
        vocabularies = build_vocabularies(split.train, catalog, schema, user_min_count=cfg.privacy.min_count)
    split = split.with_frames(join_ad_features(split.train, catalog, schema),
                              join_ad_features(split.test, catalog, schema))
    excluded = data.excluded
    if with_negatives:  # negatives follow their positive and share its exclusions (held-out queries are positives)
        split = add_sampled_negatives(cfg, catalog, schema, split.with_frames(
            split.train, split.test.assign(**{EXCLUDED: pd.Series(excluded, dtype=object)})))
        excluded = list(split.test.pop(EXCLUDED))
    log(f"evaluation protocol {cfg.evaluation.protocol}: {len(split.train):,d} training / {len(split.test):,d} "
        f"held-out rows; held-out histories: {cfg.evaluation.history_at_test}"
        + ("; seen ads excluded" if cfg.evaluation.exclude_seen else ""))
    return PreparedData(catalog, schema, split, vocabularies, excluded, prior,
                        data_fingerprint(loaded, dataclasses.asdict(schema), vocabularies.to_dict()))
