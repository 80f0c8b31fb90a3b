"""Offline evaluation of trained models on held-out rows, and the calibration fit on held-out training rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from features.dataset import frame_to_tensors
from features.schema import FeatureSchema
from features.split import DataSplit
from trainer.calibration import sigmoid
from trainer.inputs import query_inputs, ranking_labels
from trainer.metrics import (
    auc,
    expected_calibration_error,
    log_loss,
)
from trainer.ranking import RankingModel
from trainer.retrieval import RetrievalModel


def _batched(fn, tensors: dict[str, np.ndarray], batch_size: int = 2048) -> np.ndarray:
    n = len(next(iter(tensors.values())))
    outs = [fn({k: tf.constant(v[i:i + batch_size]) for k, v in tensors.items()}).numpy()
            for i in range(0, n, batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def ad_embeddings(model: RetrievalModel, catalog: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    return _batched(model.ad_embedding, frame_to_tensors(catalog, schema.ad_string_features, schema))


def query_embeddings(model: RetrievalModel, rows: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    names = query_inputs(schema, model.query_tower.history_length)
    return _batched(model.query_tower, frame_to_tensors(rows, names, schema))


def ranking_logits(model: RankingModel, rows: pd.DataFrame, schema: FeatureSchema) -> dict[str, np.ndarray]:
    """Raw logits per row: 'ctr' (served, no position), 'cvr', and 'ctr_train' (with the position
    tower at the row's logged position when the model has one and the rows carry positions)."""
    with_position = model.position_tower is not None and schema.position in rows.columns
    names = (*schema.query_features, *schema.ad_string_features, *((schema.position,) if with_position else ()))
    tensors = frame_to_tensors(rows, names, schema)
    keys = ("ctr", "cvr", "ctr_train")
    stacked = _batched(lambda f: tf.stack([model.logits(f, with_position)[k] for k in keys], axis=-1), tensors)
    stacked = stacked.reshape(-1, len(keys))
    return {k: stacked[:, i].astype(np.float64) for i, k in enumerate(keys)}


def predict_ranking(model: RankingModel, rows: pd.DataFrame, schema: FeatureSchema) -> dict[str, np.ndarray]:
    """What the servables return (calibrated, position dropped) plus the raw probabilities."""
    logits = ranking_logits(model, rows, schema)
    pcvr = (model.cvr_calibrator.numpy_call(logits["cvr"]) if model.use_conversion
            else np.ones(len(logits["cvr"]), np.float32))  # no conversion labels: pCVR is 1 (as served)
    return {"pctr": model.ctr_calibrator.numpy_call(logits["ctr"]), "pcvr": pcvr,
            "pctr_raw": sigmoid(logits["ctr"]), "pcvr_raw": sigmoid(logits["cvr"]),
            "pctr_with_position": sigmoid(logits["ctr_train"])}


def predict_ctr(model: RankingModel, rows: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    """The served pCTR: position tower dropped, calibrated (what the ranking SavedModel returns)."""
    return predict_ranking(model, rows, schema)["pctr"]


def fit_calibration(model: RankingModel, rows: pd.DataFrame, schema: FeatureSchema, method: str) -> dict:
    """Fit the CTR and CVR calibrators on held-out rows (never the test split).

    pCTR is calibrated against clicks over all rows; pCVR = P(conversion | click) against
    conversions over the clicked rows. Returns the held-out ECE before and after.
    """
    logits = ranking_logits(model, rows, schema)
    click = rows[schema.click].to_numpy(np.float64)
    model.ctr_calibrator.fit(logits["ctr"], click, method)
    out = {"method": method, "rows": int(len(rows)),
           "ctr_ece_before": expected_calibration_error(click, sigmoid(logits["ctr"])),
           "ctr_ece_after": expected_calibration_error(click, model.ctr_calibrator.numpy_call(logits["ctr"]))}
    if ranking_labels(schema, rows)["conversion"] and model.use_conversion:
        clicked = click > 0
        conv = rows[schema.conversion].to_numpy(np.float64)[clicked]
        model.cvr_calibrator.fit(logits["cvr"][clicked], conv, method)
        out.update({"clicked_rows": int(clicked.sum()),
                    "cvr_ece_before": expected_calibration_error(conv, sigmoid(logits["cvr"][clicked])),
                    "cvr_ece_after": expected_calibration_error(
                        conv, model.cvr_calibrator.numpy_call(logits["cvr"][clicked]))})
    return out


def evaluate_ranking(model: RankingModel, schema: FeatureSchema, split: DataSplit) -> dict:
    """Held-out ranking metrics.

    CTR: AUC, log loss and ECE of the served pCTR (position dropped, calibrated) against clicks
    over all test impressions; `auc_with_position` scores the training-time logit (position tower
    at the logged position), comparable with `oracle_auc` (the true p_click, which knows position),
    while `auc` compares with `oracle_auc_no_position` (the true relevance). `ece_uncalibrated`:
    the same pCTR before calibration.
    CVR: `cvr_*` scores pCVR against conversions on the clicked test impressions (pCVR is
    P(conversion | click)); `ctcvr_*` scores pCTCVR = pCTR x pCVR against click-and-convert over
    all test impressions (how ESMM trains it).
    """
    test = split.test
    labels = test[schema.click].to_numpy()
    pred = predict_ranking(model, test, schema)
    p = pred["pctr"]
    out = {"test_impressions": int(len(labels)), "auc": auc(labels, p), "logloss": log_loss(labels, p),
           "ece": expected_calibration_error(labels, p),
           "ece_uncalibrated": expected_calibration_error(labels, pred["pctr_raw"]),
           "mean_pctr": float(p.mean()), "ctr": float(labels.mean())}
    if model.position_tower is not None and schema.position in test.columns:
        out["auc_with_position"] = auc(labels, pred["pctr_with_position"])
    if model.use_conversion and schema.conversion in test.columns:
        conv = test[schema.conversion].to_numpy()
        clicked = labels > 0
        ctcvr_labels = clicked & (conv > 0)
        pctcvr = p * pred["pcvr"]
        out.update({"clicked_impressions": int(clicked.sum()),
                    "cvr_auc": auc(conv[clicked], pred["pcvr"][clicked]),
                    "cvr_logloss": log_loss(conv[clicked], pred["pcvr"][clicked]),
                    "cvr_ece": expected_calibration_error(conv[clicked], pred["pcvr"][clicked]),
                    "cvr_ece_uncalibrated": expected_calibration_error(conv[clicked], pred["pcvr_raw"][clicked]),
                    "mean_pcvr": float(pred["pcvr"][clicked].mean()) if clicked.any() else float("nan"),
                    "cvr": float(conv[clicked].mean()) if clicked.any() else float("nan"),
                    "ctcvr_auc": auc(ctcvr_labels, pctcvr), "ctcvr_logloss": log_loss(ctcvr_labels, pctcvr),
                    "ctcvr_ece": expected_calibration_error(ctcvr_labels, pctcvr)})
    if "true_p_click" in test:
        out["oracle_auc"] = auc(labels, test["true_p_click"].to_numpy())
        out["oracle_auc_no_position"] = auc(labels, test["true_relevance"].to_numpy())
    return out
