"""An evaluation protocol applied to a log: the split, every row's history, and what each query may not be shown.

One `EvaluationProtocol` decides, for the model and every baseline alike:
- which rows train and which are held out (`features.split`);
- the history each training row carries (`training_history_rule`): under `random` the user's other
  training positives (what a held-out query knows), otherwise the positives strictly before it;
- the history each held-out query carries (`history_at_test`): `train_only` (the user's training
  positives) or `streaming` (every positive strictly before the query, held-out ones included: what
  a serving system knows when the request comes);
- with `exclude_seen`, the ads a query may not be recommended: every positive its history rule lets
  it know, uncapped (for `train_only` the user's training positives: the field's standard).
Histories only ever hold training positives, or positives strictly before the query: a held-out
label never becomes an input to its own query or to training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from features.history import build_histories, known_positives, with_history
from features.schema import FeatureSchema
from features.split import DataSplit, column_split, leave_last_out_split, random_split, time_split
from features.typed_model import SEED_MAX, Names, TypedModel, cross_field

Protocol = Literal["time", "random", "leave_last_out", "column"]
HistoryAtTest = Literal["train_only", "streaming"]
SessionContext = Literal["auto", "keep", "drop"]
TIME_CONTEXT = ("hour", "weekday")
SESSION_SECONDS = 3600  # positives of one user this close in time are taken as one session


class EvaluationProtocol(TypedModel):
    protocol: Protocol = "time"  # time | random | leave_last_out | column
    # time, random: share of rows held out (exactly round(n * fraction))
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(42, ge=0, le=SEED_MAX)  # random: the split's seed
    n_last: int = Field(1, ge=1)  # leave_last_out: positives held out per user
    split_column: str = ""  # column: the log column naming each row's side
    test_values: Names = ("test",)  # column: values that mark held-out rows
    history_at_test: HistoryAtTest = "streaming"  # train_only | streaming
    exclude_seen: bool = False  # drop each query's known positives from every method's candidates
    # share carved from training rows, by the same protocol, for model selection
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    session_context: SessionContext = "auto"  # random: drop time-of-day context that identifies held-out sessions

    @model_validator(mode="after")
    def _column_named(self) -> EvaluationProtocol:
        if self.protocol == "column" and not self.split_column:
            raise cross_field("split_column", "protocol 'column' needs the column that names each row's side")
        return self

    @property
    def training_history_rule(self) -> str:
        return "all" if self.protocol == "random" else "before"

    @property
    def test_history_rule(self) -> str:
        return "all" if self.history_at_test == "train_only" else "before"

    def validation(self) -> EvaluationProtocol:
        """The same protocol carving a validation split out of training rows (`column` splits by time)."""
        protocol = "time" if self.protocol == "column" else self.protocol
        fraction = self.validation_fraction if self.validation_fraction > 0 else self.test_fraction
        return self.model_copy(update={"protocol": protocol, "test_fraction": fraction})


def split_logs(logs: pd.DataFrame, protocol: EvaluationProtocol, schema: FeatureSchema) -> DataSplit:
    if protocol.protocol == "time":
        return time_split(logs, protocol.test_fraction, schema)
    if protocol.protocol == "random":
        return random_split(logs, protocol.test_fraction, protocol.seed)
    if protocol.protocol == "leave_last_out":
        return leave_last_out_split(logs, protocol.n_last, schema)
    return column_split(logs, protocol.split_column, protocol.test_values)


@dataclass
class ProtocolData:
    """A split whose rows carry their histories, and per held-out row the ads it may not be shown."""

    split: DataSplit
    excluded: list[np.ndarray]  # per test row: ad ids (empty unless exclude_seen)
    protocol: EvaluationProtocol


def apply_protocol(logs: pd.DataFrame, protocol: EvaluationProtocol, history_length: int,
                   schema: FeatureSchema, prior: pd.DataFrame | None = None) -> ProtocolData:
    """Split `logs`, then give training rows and held-out rows their histories (and exclusions).

    `prior`: rows from before the logs' time window, whose positives histories may hold as well.
    """
    logs = logs.reset_index(drop=True)  # row labels identify a row's own entry among history sources
    split = split_logs(logs, protocol, schema)
    train, test = split.train, split.test
    train_sources = train[train[schema.click] > 0]
    if prior is not None and len(prior):
        earlier = prior[prior[schema.click] > 0]
        train_sources = pd.concat([train_sources, earlier.set_axis(-1 - np.arange(len(earlier)))])
    if history_length:
        train = with_history(train, build_histories(train, train_sources, history_length,
                                                    protocol.training_history_rule, schema))
    test_sources = train_sources if protocol.history_at_test == "train_only" else \
        pd.concat([train_sources, test[test[schema.click] > 0]])
    # Held-out rows are relabelled after the training rows so `all` never mistakes one for a source.
    test = test.set_axis(np.arange(len(train), len(train) + len(test)))
    if history_length:
        test = with_history(test, build_histories(test, test_sources, history_length,
                                                  protocol.test_history_rule, schema))
    excluded = (known_positives(test, test_sources, protocol.test_history_rule, schema) if protocol.exclude_seen
                else [np.zeros(0, dtype=object)] * len(test))
    return ProtocolData(split.with_frames(train.reset_index(drop=True), test.reset_index(drop=True)),
                        excluded, protocol)


def session_overlap(split: DataSplit, schema: FeatureSchema, seconds: int = SESSION_SECONDS) -> float:
    """Share of held-out positives with a training positive of the same user within `seconds`:
    how often a held-out event sits in a session that training saw."""
    test = split.test[split.test[schema.click] > 0]
    train = split.train[split.train[schema.click] > 0]
    if test.empty or train.empty:
        return 0.0
    by_user = {u: np.sort(g.to_numpy()) for u, g in train.groupby(train[schema.user_id].astype(str))[schema.timestamp]}
    near = 0
    for user, ts in zip(test[schema.user_id].astype(str), test[schema.timestamp].to_numpy(), strict=True):
        times = by_user.get(user)
        if times is None:
            continue
        i = np.searchsorted(times, ts)
        gaps = [abs(times[j] - ts) for j in (i - 1, i) if 0 <= j < len(times)]
        near += bool(gaps) and min(gaps) <= seconds
    return near / len(test)


def leaking_context(split: DataSplit, protocol: EvaluationProtocol, schema: FeatureSchema
                    ) -> tuple[tuple[str, ...], float]:
    """Under a random split, the time-of-day context features that would identify held-out sessions,
    and the session overlap that makes them do so (empty when none would)."""
    if protocol.protocol != "random" or protocol.session_context == "keep":
        return (), 0.0
    time_context = tuple(n for n in schema.context_integers if n in TIME_CONTEXT)
    if not time_context:
        return (), 0.0
    overlap = session_overlap(split, schema)
    if protocol.session_context == "drop" or overlap > 0.05:
        return time_context, overlap
    return (), overlap



def one_list_per_user(protocol: EvaluationProtocol, schema: FeatureSchema) -> bool:
    """Whether every held-out query of a user is ranked from one list: the same history (`train_only`)
    and no per-query context the model reads. Then the per-user metrics of published random-split
    results are exact (`trainer.metrics.per_user_metrics`)."""
    return protocol.history_at_test == "train_only" and not schema.context_integers \
        and not schema.context_categoricals
