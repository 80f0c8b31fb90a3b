"""Where the ranking stage's negatives come from, and why an AUC is undefined when it is.

Logs with negatives (impressions not clicked, ratings under the threshold) train and evaluate
ranking as they are. Logs with none (implicit labels: every row an interaction) get sampled
negatives (`features.negatives`): ranking trains on them and its held-out metrics are over the
test positives plus as many sampled negatives each, labelled `"negatives": "sampled"`. With
`ranking.sampled_negatives: 0` such data is refused: the recommender's graph orders by the
ranking model, which cannot learn from one class.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from features.negatives import SAMPLED_NEGATIVE, sample_negatives
from features.schema import FeatureSchema
from features.split import DataSplit
from trainer.config import ConfigError, JobConfig
from trainer.progress import log

IMPLICIT = "implicit labels (every log row is a positive)"


def refuse_implicit_without_negatives(cfg: JobConfig, spec_name: str, implicit: bool) -> None:
    """Before any data is read: implicit labels and `ranking.sampled_negatives: 0` cannot train ranking."""
    if implicit and cfg.ranking.sampled_negatives == 0:
        raise ConfigError(f"ranking.sampled_negatives is 0, but data spec {spec_name!r} has {IMPLICIT}: the "
                          "ranking stage needs negatives; set it >= 1 (e.g. --set ranking.sampled_negatives=4)")


def negatives_needed(schema: FeatureSchema, train: pd.DataFrame) -> str:
    """Why the training rows need sampled negatives ("" when they hold logged ones)."""
    if schema.extra.get("labels") == "implicit":
        return IMPLICIT
    if not (train[schema.click] <= 0).any():
        return "no negative (click = 0) among the training rows"
    return ""


def add_sampled_negatives(cfg: JobConfig, catalog: pd.DataFrame, schema: FeatureSchema,
                          split: DataSplit) -> DataSplit:
    """The split with sampled negatives after each positive when its logs hold none; else unchanged.

    Candidates: the ads with a training positive. A training row's negatives avoid its user's
    training positives; a test row's avoid all of its user's positives (training and test).
    Seeded by `training.seed`, so `adrec evaluate` rebuilds the same rows.
    """
    why = negatives_needed(schema, split.train)
    if not why:
        return split
    n = cfg.ranking.sampled_negatives
    if n == 0:
        raise ConfigError(f"ranking.sampled_negatives is 0, but the data has {why}: the ranking stage needs "
                          "negatives; set it >= 1 (e.g. --set ranking.sampled_negatives=4)")
    pairs = [schema.user_id, schema.ad_id]
    train_pos = split.train.loc[split.train[schema.click] > 0, pairs]
    test_pos = split.test.loc[split.test[schema.click] > 0, pairs]
    pool = train_pos[schema.ad_id].unique()
    seed = cfg.training.seed
    train = sample_negatives(split.train, catalog, schema, n, pool, train_pos, seed)
    test = sample_negatives(split.test, catalog, schema, n, pool, pd.concat([train_pos, test_pos]), seed + 1)
    log(f"ranking negatives: {why}; sampled {n} per positive from the {len(pool)} ads seen in training, "
        f"never one the user has a positive with: {int(train[SAMPLED_NEGATIVE].sum())} training and "
        f"{int(test[SAMPLED_NEGATIVE].sum())} test rows added")
    return split.with_frames(train, test)


def _one_class(labels: np.ndarray, rows: str) -> str:
    """Why AUC is undefined on `labels`, or "" when both classes are present."""
    labels = np.asarray(labels) > 0
    if len(labels) == 0:
        return f"no {rows}"
    if labels.all():
        return f"all {len(labels):,d} {rows} are positives; AUC needs both classes"
    if not labels.any():
        return f"none of the {len(labels):,d} {rows} is a positive; AUC needs both classes"
    return ""


def ranking_label_notes(metrics: dict, test: pd.DataFrame, schema: FeatureSchema, cfg: JobConfig) -> dict:
    """What to add to held-out ranking metrics: where the negatives come from, and for each AUC
    that is NaN, `<name>_undefined` saying why (one label class), so no NaN passes unexplained."""
    sampled = SAMPLED_NEGATIVE in test and bool(test[SAMPLED_NEGATIVE].any())
    notes: dict = {"negatives": "sampled" if sampled else "logged"}
    if sampled:
        notes.update({"sampled_negatives_per_positive": cfg.ranking.sampled_negatives,
                      "test_positives": int((test[schema.click] > 0).sum()),
                      "test_sampled_negatives": int(test[SAMPLED_NEGATIVE].sum())})
    click = test[schema.click].to_numpy()
    conversion = test[schema.conversion].to_numpy() if schema.conversion in test else np.zeros(len(test))
    labels_of = {"cvr_auc": (conversion[click > 0], "clicked test impressions' conversions"),
                 "ctcvr_auc": ((click > 0) & (conversion > 0), "test impressions' click-and-convert labels")}
    for name, value in metrics.items():
        if "auc" in name and isinstance(value, float) and math.isnan(value):
            labels, rows = labels_of.get(name, (click, "test impressions"))
            notes[f"{name}_undefined"] = _one_class(labels, rows) or "not computable"
    return notes
