"""One training job: data -> text encoder -> retrieval -> ranking -> offline evaluation."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from features.protocol import one_list_per_user
from features.schema import FeatureSchema
from trainer.builders import MASKED_LM_DIR, build_ranking, build_retrieval, build_text_assets
from trainer.checkpoints import load_warm_start, reset_forgotten_rows, restore_parts, save_checkpoint
from trainer.comparison import (
    evaluate_retrieval,
    fit_baselines,
    interactions_of,
    model_validation_metrics,
    queries_of,
)
from trainer.config import JobConfig, config_to_dict
from trainer.dp import EpsilonLogger, check_delta, privacy_report
from trainer.evaluate import evaluate_ranking
from trainer.fit import build_model, fit_stage
from trainer.forget import forgotten_users, tombstone_vocabularies
from trainer.inputs import ranking_dataset, retrieval_dataset
from trainer.labels import ranking_label_notes
from trainer.prepare import DataError, prepare_data, sampling_counts
from trainer.privacy import check_warm_start
from trainer.progress import log
from trainer.ranking_stage import train_ranking
from trainer.resume import claim_stages, clear_stages
from trainer.strategy import cluster_sizes, is_parameter_server
from trainer.text_encoder import encode_cached, encode_packed
from trainer.trained import TrainedModels
from trainer.unshard import local_copy, sharded_tables


def _set_precision(policy: str) -> None:
    if policy not in ("none", "mixed_bfloat16", "mixed_float16"):
        raise DataError(f"training.mixed_precision {policy!r}: expected none, mixed_bfloat16 or mixed_float16")
    name = "float32" if policy == "none" else policy
    tf.keras.mixed_precision.set_global_policy(name)  # tf_keras: towers, DCN, tasks
    keras.mixed_precision.set_global_policy(name)  # Keras 3: the keras-hub BERT encoder


def best_epoch(history: dict, monitor: str) -> int:
    """The 1-based epoch whose validation `monitor` was highest (what early stopping restored)."""
    values = history.get(monitor) or []
    return int(np.argmax(values)) + 1 if values else 1


def train_baselines(cfg: JobConfig, catalog, schema, train_rows, fit_rows, validation) -> tuple[dict, dict]:
    """The configured retrieval baselines, fitted on the same rows as the model (most-popular is computed
    at evaluation). With a validation split each picks its hyperparameters there."""
    names = tuple(b for b in cfg.evaluation.baselines if b != "most_popular")
    if not names:
        return {}, {}
    train = interactions_of(train_rows, catalog, schema)
    if validation is None:
        return fit_baselines(names, train)
    fit_train = interactions_of(fit_rows, catalog, schema)
    queries = queries_of(validation.split.test, validation.excluded, catalog, fit_train, schema)
    return fit_baselines(names, train, fit_train, queries, refit=cfg.evaluation.refit)


def _ranking_metrics(ranking, schema: FeatureSchema, split, cfg: JobConfig, calibration: dict) -> dict:
    metrics = evaluate_ranking(ranking, schema, split)
    return {**metrics, **ranking_label_notes(metrics, split.test, schema, cfg), "calibration": calibration}


def refuse_unprivate_parts(with_ranking: bool, warm_start, strategy) -> None:
    """What privacy.dp's epsilon would not cover, refused before any work."""
    if with_ranking:
        raise ValueError("privacy.dp trains the retrieval model only: the ranking stage (and the export, which "
                         "serves it) would learn from the same rows without noise; train with --no-export")
    if warm_start:
        raise ValueError("privacy.dp with a warm start: the earlier version's training is outside this job's "
                         "accountant; train from scratch")
    if strategy.num_replicas_in_sync != 1:
        raise ValueError(f"privacy.dp needs one replica (the noise is added once per global batch); the strategy "
                         f"has {strategy.num_replicas_in_sync}")


def _local_models(cfg: JobConfig, schema, vocabularies, catalog, text, cached, retrieval, ranking,
                  retrieval_rows: pd.DataFrame, ranking_rows: pd.DataFrame):
    """Parameter-server training's models as ordinary local ones (`trainer.unshard`), and what the job
    reports about them: the sharded variables, and how far the copies' answers are from the originals'."""
    report = {"sharded_variables": sharded_tables(retrieval, ranking), "copy_max_abs_difference": {}}
    log(f"parameter servers: {len(report['sharded_variables'])} variable(s) trained in shards; evaluating and "
        "exporting local copies")
    default = tf.distribute.get_strategy()
    retrieval, report["copy_max_abs_difference"]["retrieval"] = local_copy(
        retrieval, lambda: build_retrieval(cfg, default, schema, vocabularies, catalog, text, cached,
                                           sampling_counts(retrieval_rows, schema)),
        next(iter(retrieval_dataset(retrieval_rows, cfg, schema)[0])),
        lambda model, batch: (model.query_tower(batch), model.ad_embedding(batch)))
    if ranking is not None:
        ranking, report["copy_max_abs_difference"]["ranking"] = local_copy(
            ranking, lambda: build_ranking(cfg, default, schema, vocabularies, catalog, cached, ranking_rows),
            next(iter(ranking_dataset(ranking_rows, cfg, schema))), lambda model, batch: model.logits(batch))
    return retrieval, ranking, report


def run_training(cfg: JobConfig, strategy=None, progress: bool = True,
                 schema: FeatureSchema | None = None, warm_start: str | Path | None = None,
                 with_ranking: bool = True, keep_stages: bool = False,
                 frames: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> TrainedModels:
    """Train and evaluate the job's models; `with_ranking=False` stops after retrieval (e.g. retrieval
    quality benchmarks), leaving `ranking` None: such a job cannot be exported.

    Stages an earlier run with the same config and data finished in `training.model_dir` are restored,
    not retrained (`trainer.resume`). The finished stages are cleared at the end unless `keep_stages`
    (a caller that exports clears them once the export is published). `frames`: (catalog, logs) read by
    the caller, instead of `data.source` (`trainer.prepare.load_job_data`)."""
    strategy = strategy or tf.distribute.get_strategy()
    if cfg.data.stream.enabled:
        if warm_start or frames is not None or schema is not None:
            raise DataError("data.stream.enabled reads the data spec's files itself: no warm start, frames or schema")
        from trainer.streaming import train_streaming

        return train_streaming(cfg, strategy, progress, with_ranking, keep_stages)
    dp = cfg.privacy.dp if cfg.privacy.dp.enabled else None
    if dp is not None:
        refuse_unprivate_parts(with_ranking, warm_start, strategy)
    tf.keras.utils.set_random_seed(cfg.training.seed)
    model_dir = Path(cfg.training.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)

    vocabularies = warm_checkpoint = None
    forgotten = forgotten_users(cfg)  # read once: the rows dropped and the entries tombstoned agree
    if warm_start:
        vocabularies, warm_checkpoint = load_warm_start(Path(warm_start))
        log(f"warm start from {warm_checkpoint}: vocabularies kept, new ids fall into OOV buckets")
        vocabularies, tombstoned = tombstone_vocabularies(vocabularies, forgotten)
        if tombstoned:
            log(f"privacy: {tombstoned} forgotten user(s) in the kept vocabularies: entries replaced by tombstones, "
                "their embedding rows reset to the OOV row")
        adapted = Path(warm_start) / MASKED_LM_DIR
        if cfg.encoder.masked_lm.epochs > 0 and adapted.is_dir() and not (model_dir / MASKED_LM_DIR).exists():
            # The warm-started towers learned on this encoder's embeddings: keep it, do not re-adapt.
            shutil.copytree(adapted, model_dir / MASKED_LM_DIR)
    data = prepare_data(cfg, schema, vocabularies, with_negatives=with_ranking, frames=frames, forgotten=forgotten)
    catalog, schema, split, vocabularies = data.catalog, data.schema, data.split, data.vocabularies
    if warm_start:
        check_warm_start(Path(warm_start), schema)
    claim_stages(model_dir, cfg, data.fingerprint, strategy)
    fit_rows, validation_rows, validation = split.train, None, None
    if cfg.evaluation.validation_fraction > 0:  # carved by the evaluation protocol, histories rebuilt for it
        validation = data.validation(cfg.evaluation, cfg.retrieval.history_length)
        fit_rows, validation_rows = validation.split.train, validation.split.test
    log(f"data: {len(catalog)} ads, {len(split.train)} train / {len(split.test)} test impressions, "
        f"{len(split.cold_ad_ids(schema))} cold-start ads in test"
        + (f"; {len(validation_rows)} training rows held for validation" if validation_rows is not None else ""))

    t0 = time.time()
    ps = is_parameter_server(strategy)
    _set_precision(cfg.training.mixed_precision)
    try:
        # Under parameter servers the (frozen) encoder only fills the text cache, on the chief: its
        # variables stay local instead of going to the ps tasks.
        with contextlib.nullcontext() if ps else strategy.scope():
            text = build_text_assets(cfg, catalog, schema, corpus_ad_ids=set(fit_rows[schema.ad_id]),
                                     model_dir=model_dir, progress=progress)
        cached = None
        if cfg.encoder.mode == "frozen":
            encode_t0 = time.time()  # after build_text_assets: a masked-LM adaptation there logs its own time
            cached = encode_cached(text.adapter, text.packed_catalog, cfg.encoder.cache_dir, progress=progress)
            log(f"text encoder {cfg.encoder.preset!r} frozen: cached {len(cached)} ad embeddings "
                f"in {time.time() - encode_t0:.1f}s")
        retrieval = build_retrieval(cfg, strategy, schema, vocabularies, catalog, text, cached,
                                    sampling_counts(fit_rows, schema))
        ds, n_pos = retrieval_dataset(fit_rows, cfg, schema)
        build_model(retrieval, next(iter(ds)), strategy)
        restore_parts(warm_checkpoint, retrieval=retrieval)
        log(f"retrieval: {n_pos} positive pairs, {cfg.retrieval.epochs} epochs, batch {cfg.retrieval.batch_size}, "
            + (f"{strategy.num_replicas_in_sync} replica(s)" if not ps else
               "{worker} worker(s) and {ps} ps task(s)".format(**cluster_sizes())))
        loggers: tuple = ()
        if dp is not None:
            check_delta(dp, n_pos)
            loggers = (EpsilonLogger(dp, cfg.retrieval.batch_size / n_pos),)
            log(f"retrieval: DP-SGD, noise multiplier {dp.noise_multiplier:g}, clip {dp.l2_clip:g}, "
                f"delta {dp.delta:g}; epsilon per epoch in the logs (dp_epsilon)")
        val = retrieval_dataset(validation_rows, cfg, schema, False)[0] if validation_rows is not None else None
        r_state = fit_stage("retrieval", retrieval, ds, cfg.retrieval.epochs, cfg, strategy, model_dir, progress,
                            retrieval.checkpoint_parts(), val, retrieval.monitor, loggers=loggers)
        if cfg.evaluation.refit and validation_rows is not None:
            epochs = best_epoch(r_state["history"], retrieval.monitor)
            log(f"retrieval: refit on all {len(split.train):,d} training rows for the {epochs} epoch(s) "
                "validation chose")
            retrieval = build_retrieval(cfg, strategy, schema, vocabularies, catalog, text, cached,
                                        sampling_counts(split.train, schema))
            ds, _ = retrieval_dataset(split.train, cfg, schema)
            build_model(retrieval, next(iter(ds)), strategy)
            restore_parts(warm_checkpoint, retrieval=retrieval)
            r_state = {**fit_stage("retrieval_refit", retrieval, ds, epochs, cfg, strategy, model_dir, progress,
                                   retrieval.checkpoint_parts()), "validation_history": r_state["history"]}
        if cached is None:  # the encoder was fine-tuned: the ranking model reads its new embeddings
            cached = encode_packed(text.adapter, text.packed_catalog)
        ranking, k_state, calibration, ranked = None, {"history": {}, "steps": 0}, None, None
        if with_ranking:
            ranked = train_ranking(cfg, strategy, schema, vocabularies, catalog, cached, fit_rows, model_dir,
                                   progress, warm_checkpoint)
            ranking, k_state, calibration = ranked.model, ranked.state, ranked.calibration
    finally:
        _set_precision("none")
    ps_report = None
    if ps:
        rows = split.train if validation is None or cfg.evaluation.refit else fit_rows  # what retrieval trained on
        retrieval, ranking, ps_report = _local_models(cfg, schema, vocabularies, catalog, text, cached, retrieval,
                                                      ranking, rows, fit_rows)
    for model in (retrieval, ranking):  # tombstones: the OOV row as trained, what the export serves them
        if model is not None:
            reset_forgotten_rows(model)
    baselines, selection = train_baselines(cfg, catalog, schema, split.train, fit_rows, validation)
    trained = TrainedModels(config=cfg, schema=schema, catalog=catalog, split=split,
                            vocabularies=vocabularies, text=text, catalog_text_embeddings=cached,
                            retrieval=retrieval, ranking=ranking, baselines=baselines, excluded=data.excluded,
                            history={"retrieval": r_state["history"], "ranking": k_state["history"]})
    retrieval_rows = split.train if validation is None or cfg.evaluation.refit else fit_rows
    trained.metrics = {"retrieval": {**evaluate_retrieval(retrieval, catalog, schema, retrieval_rows, split.test,
                                                          data.excluded, cfg.retrieval.eval_ks, baselines,
                                                          one_list_per_user(cfg.evaluation, schema)),
                                     "protocol": config_to_dict(cfg.evaluation), "baseline_selection": selection,
                                     **({"model_validation": model_validation_metrics(
                                         retrieval, catalog, schema, fit_rows, validation, cfg.retrieval.eval_ks)}
                                        if validation is not None and not cfg.evaluation.refit else {})},
                       "ranking": ({**_ranking_metrics(ranking, schema, split, cfg, calibration),
                                    "validation": ranked.validation}
                                   if ranking is not None else {"skipped": "not trained (retrieval only)"}),
                       "train_steps": {"retrieval": r_state["steps"], "ranking": k_state["steps"]},
                       # training steps only (no validation), per epoch run: a restored stage has none
                       "train_epoch_seconds": {"retrieval": r_state.get("epoch_seconds", []),
                                               "ranking": k_state.get("epoch_seconds", [])},
                       "train_seconds": round(time.time() - t0, 1),
                       "warm_start": str(warm_checkpoint) if warm_checkpoint else None}
    if ps_report is not None:
        # Keras logs the loss of the step that finished last in each epoch (steps run asynchronously)
        trained.metrics["parameter_servers"] = {**ps_report, "last_step_loss_by_epoch": {
            "retrieval": r_state["history"].get("loss", []), "ranking": k_state["history"].get("loss", [])}}
    if text.masked_lm is not None:
        trained.metrics["encoder_masked_lm"] = asdict(text.masked_lm)
    if dp is not None:
        trained.metrics["privacy"] = {"dp": privacy_report(dp, r_state["steps"], n_pos, cfg.retrieval.batch_size)}
        log(f"privacy: DP-SGD spent epsilon {trained.metrics['privacy']['dp']['epsilon']:.3g} at delta {dp.delta:g} "
            "(one training row; retrieval only)")
    save_checkpoint(trained, strategy, model_dir)
    if not keep_stages:
        clear_stages(model_dir, strategy)
    return trained
