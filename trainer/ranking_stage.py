"""The ranking stage of a job: early stopping on the latest training rows, calibration judged on rows
the calibrated model never saw, and the served model trained on every training row.

1. The latest `ranking.validation_fraction` of the training rows (by time) is the validation slice.
   A probe model, its vocabularies built from the earlier rows only (so, as in the test period,
   later users and ads are unknown to it), trains on the earlier rows and is scored on the slice
   after each epoch by gAUC (the user-weighted AUC); its best epoch sets the epoch count.
2. The served model trains on all training rows for that many epochs.
3. The calibrators are fitted on the probe's out-of-sample logits over the slice (recency-weighted,
   checked on its latest part, applied only where they help: `trainer.evaluate.fit_calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from features.schema import FeatureSchema
from features.split import time_split
from features.vocab import Vocabularies, build_vocabularies
from trainer.builders import build_ranking, ranking_statistics
from trainer.checkpoints import restore_parts
from trainer.config import JobConfig
from trainer.evaluate import fit_calibration, ranking_logits
from trainer.fit import build_model, fit_stage
from trainer.inputs import ranking_dataset
from trainer.metrics import group_auc
from trainer.progress import log
from trainer.ranking import RankingModel

MONITOR = "val_gauc"


class GroupAucLogger(tf.keras.callbacks.Callback):
    """Puts `val_gauc`, the user-weighted AUC of the served CTR logit on `rows`, into each epoch's logs."""

    def __init__(self, rows: pd.DataFrame, schema: FeatureSchema):
        super().__init__()
        self.rows, self.schema = rows, schema
        self.labels = rows[schema.click].to_numpy()
        self.users = rows[schema.user_id].to_numpy()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            scores = ranking_logits(self.model, self.rows, self.schema)["ctr"]
            logs[MONITOR] = group_auc(self.labels, scores, self.users)["gauc"]


@dataclass
class RankingRun:
    model: RankingModel
    state: dict  # the served model's fit: steps and per-epoch history
    calibration: dict
    validation: dict = field(default_factory=dict)  # the probe: rows, per-epoch gAUC, chosen epochs
    probe: RankingModel | None = None  # the early-stopping model (trained on the earlier rows only)
    validation_rows: pd.DataFrame | None = None  # the latest training rows the probe was judged on


def train_ranking(cfg: JobConfig, strategy, schema: FeatureSchema, vocabularies: Vocabularies,
                  catalog: pd.DataFrame, cached: np.ndarray, rows: pd.DataFrame, model_dir: Path,
                  progress: bool = False, warm_checkpoint: str | None = None) -> RankingRun:
    """Train the served ranking model on `rows` (the job's training rows) and calibrate it."""
    rc = cfg.ranking
    # The stage draws its own random numbers from the job's seed: a job resumed after a kill (whose earlier
    # stages were restored, not run) trains the same probe and picks the same epochs.
    tf.keras.utils.set_random_seed(cfg.training.seed)
    epochs, validation, probe, report = rc.epochs, None, None, {}
    if rc.validation_fraction > 0:
        inner = time_split(rows, rc.validation_fraction, schema)
        earlier, validation = inner.train, inner.test
        probe_vocab = vocabularies if warm_checkpoint else build_vocabularies(
            earlier, catalog, schema, user_min_count=cfg.privacy.min_count)
        probe = build_ranking(cfg, strategy, schema, probe_vocab, catalog, cached, earlier)
        probe_ds = ranking_dataset(earlier, cfg, schema)
        build_model(probe, next(iter(probe_ds)), strategy)
        _warm_start(probe, warm_checkpoint, cfg, schema, probe_vocab, earlier)
        log(f"ranking probe: {len(earlier)} impressions, up to {rc.epochs} epochs, early stopping on the gAUC "
            f"of the latest {len(validation)}")
        probe_state = fit_stage("ranking_probe", probe, probe_ds, rc.epochs, cfg, strategy, model_dir, progress,
                                probe.checkpoint_parts(), monitor=MONITOR, metrics=GroupAucLogger(validation, schema))
        curve = probe_state["history"].get(MONITOR, [])
        numbers = probe_state.get("epochs") or list(range(1, len(curve) + 1))
        epochs = numbers[int(np.nanargmax(curve))] if curve else rc.epochs
        report = {"rows": int(len(validation)), "probe_rows": int(len(earlier)),
                  "gauc_by_epoch": [round(v, 4) for v in curve], "epochs": epochs}
        log(f"ranking probe: validation gAUC by epoch {report['gauc_by_epoch']}: the served model trains "
            f"{epochs} epoch(s)")
    model = build_ranking(cfg, strategy, schema, vocabularies, catalog, cached, rows)
    ds = ranking_dataset(rows, cfg, schema)
    build_model(model, next(iter(ds)), strategy)
    _warm_start(model, warm_checkpoint, cfg, schema, vocabularies, rows)
    log(f"ranking: {len(rows)} impressions, {epochs} epochs, batch {rc.batch_size}")
    state = fit_stage("ranking", model, ds, epochs, cfg, strategy, model_dir, progress, model.checkpoint_parts())
    if validation is None:
        model.ctr_calibrator.reset()
        model.cvr_calibrator.reset()
        calibration = {"method": "none", "reason": "ranking.validation_fraction is 0: no out-of-sample rows"}
    else:
        calibration = fit_calibration(model, validation, schema, rc.calibration, rc.calibration_half_life,
                                      rc.calibration_check_fraction, logits_from=probe)
        _log_calibration(calibration)
    return RankingRun(model, state, calibration, report, probe, validation)


def _warm_start(model: RankingModel, checkpoint: str | None, cfg: JobConfig, schema: FeatureSchema,
                vocabularies: Vocabularies, rows: pd.DataFrame) -> None:
    """Trained weights from the checkpoint; the data-derived tables from this run's rows."""
    if checkpoint is not None:
        restore_parts(checkpoint, ranking=model)
        model.set_statistics(*ranking_statistics(cfg, schema, vocabularies, rows))


def _log_calibration(c: dict) -> None:
    if c["method"] == "none":
        log("calibration: none (ranking.calibration is 'none')")
        return
    for head in ("ctr", "cvr"):
        if f"{head}_applied" not in c:
            continue
        if f"{head}_check_ece_calibrated" not in c:
            log(f"calibration {head.upper()}: too few rows to check; not applied")
            continue
        verdict = "applied (refitted on all of them)" if c[f"{head}_applied"] else \
            "NOT applied: it would make held-out calibration worse"
        log(f"calibration {head.upper()} ({c['method']}): fitted on the probe's logits over the earlier "
            f"{c[f'{head}_rows'] - c[f'{head}_check_rows']} validation rows, ECE on the latest "
            f"{c[f'{head}_check_rows']} {c[f'{head}_check_ece_uncalibrated']:.4f} uncalibrated -> "
            f"{c[f'{head}_check_ece_calibrated']:.4f}: {verdict}")
