"""What `tensorflow/serving` reads beside the SavedModels, written at export time.

- per version: `assets.extra/tf_serving_warmup_requests`, Predict requests (one of batch 1, one
  of a small batch) built from made-up rows of known values, never a real user's, written into
  the staged version directory before it is renamed into place;
- per export directory: `models.config` (all three models, latest version),
  `batching_parameters.txt` and `monitoring.config` (Prometheus), written atomically.

docs/serving.md shows the `docker run tensorflow/serving` line that uses them as they are.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from features.history import history_matrix
from features.schema import FeatureSchema
from features.vocab import Vocabularies
from serving.config import (
    BATCHING_FILE,
    MODEL_CONFIG_FILE,
    MONITORING_FILE,
    BatchingConfig,
    batching_parameters_text,
    model_config_text,
    monitoring_config_text,
)
from serving.contract import (
    EXCLUDED_AD_IDS,
    HISTORY,
    NEGATIVE_HISTORY,
    PAD_AD_ID,
    RECOMMENDER,
    USER_STATS,
    signature_inputs,
)
from serving.warmup import predict_request, write_warmup_file

WARMUP_BATCH_SIZES = (1, 8)
WARMUP_USER = "warmup-user"  # no pseudonym's form and in no vocabulary: warmup exercises the unknown-user path


def warmup_rows(catalog: pd.DataFrame, schema: FeatureSchema, vocabularies: Vocabularies, history_length: int,
                user_inputs: tuple[str, ...] = (), n: int = max(WARMUP_BATCH_SIZES)) -> pd.DataFrame:
    """`n` made-up requests that are no real user's row, so warmup records carry nothing personal.

    The user id is WARMUP_USER, in no vocabulary (the unknown-user path); every other query
    feature steps through its vocabulary's values from its own offset, so rows mix values no
    logged row needs to have had together. Each row asks about an ad spread over the catalog,
    with its catalog columns and text; `history_length` > 0 adds a `history` of other catalog ads
    (padded with ""), and `user_inputs` (the ranking model's) get such lists or small counters.
    """
    ads = catalog[[*schema.ad_string_features, *schema.ad_text]]
    rows = ads.iloc[np.linspace(0, len(ads) - 1, n).astype(int)].reset_index(drop=True)
    rows[schema.ad_id] = rows[schema.ad_id].astype(str)
    for offset, name in enumerate(schema.query_features):
        known = vocabularies.values.get(name) or [0 if schema.is_int_feature(name) else ""]
        rows[name] = WARMUP_USER if name == schema.user_id else [known[(i + offset) % len(known)] for i in range(n)]
    ad_ids = catalog[schema.ad_id].astype(str).tolist()
    lists = [HISTORY] if history_length else []
    lists += [name for name in user_inputs if name in (HISTORY, NEGATIVE_HISTORY) and name not in lists]
    for shift, name in enumerate(lists, start=1):
        filled = min(3, history_length)
        rows[name] = [[ad_ids[(i * 7 + shift + j) % len(ad_ids)] for j in range(filled)]
                      + [PAD_AD_ID] * (history_length - filled) for i in range(n)]
    # events >= clicks >= recent clicks, as counters from logs are
    counters = dict(zip(USER_STATS, ([3 * i for i in range(n)], list(range(n)), [i // 2 for i in range(n)]),
                        strict=True))
    for name in user_inputs:
        if name in counters:
            rows[name] = counters[name]
    return rows


def as_numpy_features(rows: pd.DataFrame, names, schema: FeatureSchema) -> dict[str, np.ndarray]:
    """Raw request values in the dtypes the signatures take (warmup requests, tests, benchmarks)."""
    out = {}
    for n in names:
        if n in (HISTORY, NEGATIVE_HISTORY):  # [batch, N] ad ids, padded with ""
            out[n] = history_matrix(rows[n], len(rows[n].iloc[0]) if len(rows) else 0)
        elif schema.is_int_feature(n):
            out[n] = rows[n].to_numpy(dtype=np.int64)
        else:
            out[n] = rows[n].fillna("").astype(str).to_numpy(dtype=object)
    return out


def write_warmup_requests(version_dir: Path, model_name: str, rows: pd.DataFrame, schema: FeatureSchema,
                          ranking_user_inputs: tuple[str, ...] = ()) -> Path:
    """Warmup requests from `rows`; a `history` column (the job's per-event histories, as the
    training rows carry them when the retrieval model reads history) is sent to retrieval and
    recommender; `ranking_user_inputs` (columns of `rows`) to ranking and recommender."""
    names = signature_inputs(model_name, tuple(schema.query_features), (*schema.ad_string_features, *schema.ad_text),
                             history=HISTORY in rows, user_inputs=ranking_user_inputs)
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"warmup rows for {model_name!r} lack column(s) {missing}")
    requests = []
    for b in WARMUP_BATCH_SIZES:
        if b > len(rows):
            continue
        arrays = as_numpy_features(rows.head(b), names, schema)
        if model_name == RECOMMENDER:  # exclude the ad each logged row already showed
            arrays[EXCLUDED_AD_IDS] = rows[schema.ad_id].head(b).astype(str).to_numpy(dtype=object)[:, None]
        requests.append(predict_request(model_name, arrays))
    return write_warmup_file(version_dir, requests)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def write_server_configs(export_dir: Path, model_names: tuple[str, ...],
                         batching: BatchingConfig | None = None) -> dict[str, Path]:
    """models.config, batching_parameters.txt and monitoring.config in the export directory."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    files = {MODEL_CONFIG_FILE: model_config_text(model_names),
             BATCHING_FILE: batching_parameters_text(batching or BatchingConfig()),
             MONITORING_FILE: monitoring_config_text()}
    for name, text in files.items():
        _write_atomic(export_dir / name, text)
    return {name: export_dir / name for name in files}
