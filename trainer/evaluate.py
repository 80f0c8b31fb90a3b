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
    group_auc,
    log_loss,
)
from trainer.progress import step
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
    names = (*model.feature_names, *((schema.position,) if with_position else ()))
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


def recency_weights(timestamps: np.ndarray, half_life: float) -> np.ndarray:
    """Weight 0.5 ** (age / half_life) per row, where a row's age is the share of the rows that come
    after it in time (0 for the latest, ~1 for the earliest); `half_life` 0 weighs all rows equally."""
    t = np.asarray(timestamps)
    if half_life <= 0 or len(t) == 0:
        return np.ones(len(t))
    later = len(t) - np.searchsorted(np.sort(t), t, side="right")  # rows strictly later
    return 0.5 ** (later / len(t) / half_life)


def _calibrate_head(calibrator, logits: np.ndarray, labels: np.ndarray, timestamps: np.ndarray, method: str,
                    half_life: float, check_fraction: float, name: str, offset: float = 0.0) -> dict:
    """Fit on the earlier rows, check on the later `check_fraction` (by time); if the map lowers the
    check rows' ECE, refit it on all rows and keep it (served logits moved by `offset`), else leave
    the head uncalibrated."""
    order = np.argsort(timestamps, kind="mergesort")
    logits, labels, timestamps = logits[order], labels[order], timestamps[order]
    cut = int(round(len(order) * (1.0 - check_fraction)))
    out = {f"{name}_rows": int(len(order)), f"{name}_check_rows": int(len(order) - cut)}
    if method == "none" or cut == 0 or cut == len(order):
        calibrator.reset()
        return {**out, f"{name}_applied": False}
    calibrator.fit(logits[:cut], labels[:cut], method, recency_weights(timestamps[:cut], half_life))
    before = expected_calibration_error(labels[cut:], sigmoid(logits[cut:]))
    after = expected_calibration_error(labels[cut:], calibrator.numpy_call(logits[cut:]))
    applied = bool(after < before)
    if applied:
        calibrator.fit(logits, labels, method, recency_weights(timestamps, half_life), offset)
    else:
        calibrator.reset()
    return {**out, f"{name}_check_ece_uncalibrated": before, f"{name}_check_ece_calibrated": after,
            f"{name}_applied": applied}


def fit_calibration(model: RankingModel, rows: pd.DataFrame, schema: FeatureSchema, method: str,
                    half_life: float = 0.0, check_fraction: float = 0.5,
                    logits_from: RankingModel | None = None) -> dict:
    """Fit `model`'s CTR and CVR calibrators on held-out `rows` (never the test split), where they are
    judged before they are used.

    The logits come from `logits_from` (default `model`): a model that did not train on `rows`
    (e.g. the early-stopping run of `trainer.ranking_stage`), so the map learns how a model's
    out-of-sample logits relate to outcomes. Each map is fitted on the earlier rows (weights
    halving every `half_life` of them, latest first, so it follows the recent base rate), and
    checked on the latest `check_fraction` of `rows`: only if it lowers their ECE is it refitted on
    all `rows` and applied; otherwise that head stays uncalibrated, and the report says so.
    pCTR is calibrated against clicks over all rows; pCVR = P(conversion | click) against
    conversions over the clicked rows.
    """
    logits = ranking_logits(logits_from or model, rows, schema)
    click = rows[schema.click].to_numpy(np.float64)
    ts = rows[schema.timestamp].to_numpy()
    # With a position tower, how the intercept splits between it and the served logit is arbitrary and
    # differs between two models: the offset moves the served model's logits onto the probe's (both
    # models' training logits, served + position, fit the same clicks).
    offset = 0.0
    if logits_from is not None and logits_from is not model:
        own = ranking_logits(model, rows, schema)
        offset = float(np.mean(own["ctr_train"] - own["ctr"]) - np.mean(logits["ctr_train"] - logits["ctr"]))
    out = {"method": method, "half_life": half_life, "check_fraction": check_fraction, "ctr_offset": offset,
           **_calibrate_head(model.ctr_calibrator, logits["ctr"], click, ts, method, half_life, check_fraction, "ctr",
                             offset)}
    if ranking_labels(schema, rows)["conversion"] and model.use_conversion:
        clicked = click > 0
        conv = rows[schema.conversion].to_numpy(np.float64)[clicked]
        out.update(_calibrate_head(model.cvr_calibrator, logits["cvr"][clicked], conv, ts[clicked], method,
                                   half_life, check_fraction, "cvr"))
    return out


@step("evaluating ranking on the held-out rows")
def evaluate_ranking(model: RankingModel, schema: FeatureSchema, split: DataSplit) -> dict:
    """Held-out ranking metrics.

    CTR: AUC, gAUC (`gauc`: per-user AUC weighted by the user's test impressions, over the
    `gauc_users` users with both a click and a non-click), log loss and ECE of the served pCTR
    (position dropped, calibrated) against clicks over all test impressions; `auc_with_position`
    scores the training-time logit (position tower at the logged position), comparable with
    `oracle_auc` (the true p_click, which knows position), while `auc` compares with
    `oracle_auc_no_position` (the true relevance). `ece_uncalibrated`: the same pCTR before
    calibration.
    CVR: `cvr_*` scores pCVR against conversions on the clicked test impressions (pCVR is
    P(conversion | click)); `ctcvr_*` scores pCTCVR = pCTR x pCVR against click-and-convert over
    all test impressions (how ESMM trains it).
    """
    test = split.test
    labels = test[schema.click].to_numpy()
    pred = predict_ranking(model, test, schema)
    p = pred["pctr"]
    users = group_auc(labels, p, test[schema.user_id].to_numpy())
    out = {"test_impressions": int(len(labels)), "auc": auc(labels, p), "gauc": users["gauc"],
           "gauc_users": users["groups"], "gauc_impressions": users["rows"], "logloss": log_loss(labels, p),
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
