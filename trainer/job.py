"""One training job: data -> text encoder -> retrieval -> ranking -> offline evaluation."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import keras
import tensorflow as tf

from features.schema import FeatureSchema
from features.split import time_split
from trainer.baselines import train_id_only
from trainer.builders import MASKED_LM_DIR, build_retrieval, build_text_assets
from trainer.checkpoints import load_warm_start, restore_parts, save_checkpoint
from trainer.config import JobConfig
from trainer.evaluate import evaluate_ranking, evaluate_retrieval
from trainer.fit import build_model, clear_stages, fit_stage
from trainer.inputs import retrieval_dataset
from trainer.prepare import DataError, prepare_data, sampling_counts
from trainer.progress import log
from trainer.ranking_stage import train_ranking
from trainer.text_encoder import encode_packed
from trainer.trained import TrainedModels


def _set_precision(policy: str) -> None:
    if policy not in ("none", "mixed_bfloat16", "mixed_float16"):
        raise DataError(f"training.mixed_precision {policy!r}: expected none, mixed_bfloat16 or mixed_float16")
    name = "float32" if policy == "none" else policy
    tf.keras.mixed_precision.set_global_policy(name)  # tf_keras: towers, DCN, tasks
    keras.mixed_precision.set_global_policy(name)  # Keras 3: the keras-hub BERT encoder


def run_training(cfg: JobConfig, strategy=None, progress: bool = True,
                 schema: FeatureSchema | None = None, warm_start: str | Path | None = None) -> TrainedModels:
    strategy = strategy or tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(cfg.training.seed)
    model_dir = Path(cfg.training.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)

    vocabularies = warm_checkpoint = None
    if warm_start:
        vocabularies, warm_checkpoint = load_warm_start(Path(warm_start))
        log(f"warm start from {warm_checkpoint}: vocabularies kept, new ids fall into OOV buckets")
        adapted = Path(warm_start) / MASKED_LM_DIR
        if cfg.encoder.masked_lm.epochs > 0 and adapted.is_dir() and not (model_dir / MASKED_LM_DIR).exists():
            # The warm-started towers learned on this encoder's embeddings: keep it, do not re-adapt.
            shutil.copytree(adapted, model_dir / MASKED_LM_DIR)
    catalog, schema, split, vocabularies = prepare_data(cfg, schema, vocabularies)
    fit_rows, validation_rows = split.train, None
    if cfg.training.validation_fraction > 0:
        inner = time_split(split.train, cfg.training.validation_fraction, schema)
        fit_rows, validation_rows = inner.train, inner.test
    log(f"data: {len(catalog)} ads, {len(split.train)} train / {len(split.test)} test impressions, "
        f"{len(split.cold_ad_ids(schema))} cold-start ads in test"
        + (f"; {len(validation_rows)} training rows held for validation" if validation_rows is not None else ""))

    t0 = time.time()
    _set_precision(cfg.training.mixed_precision)
    try:
        with strategy.scope():
            text = build_text_assets(cfg, catalog, schema, corpus_ad_ids=set(fit_rows[schema.ad_id]),
                                     model_dir=model_dir, progress=progress)
        cached = None
        if cfg.encoder.mode == "frozen":
            encode_t0 = time.time()  # after build_text_assets: a masked-LM adaptation there logs its own time
            cached = encode_packed(text.adapter, text.packed_catalog, progress=progress)
            log(f"text encoder {cfg.encoder.preset!r} frozen: cached {len(cached)} ad embeddings "
                f"in {time.time() - encode_t0:.1f}s")
        retrieval = build_retrieval(cfg, strategy, schema, vocabularies, catalog, text, cached,
                                    sampling_counts(fit_rows, schema))
        ds, n_pos = retrieval_dataset(fit_rows, cfg, schema)
        build_model(retrieval, next(iter(ds)), strategy)
        restore_parts(warm_checkpoint, retrieval=retrieval)
        log(f"retrieval: {n_pos} positive pairs, {cfg.retrieval.epochs} epochs, batch {cfg.retrieval.batch_size}, "
            f"{strategy.num_replicas_in_sync} replica(s)")
        val = retrieval_dataset(validation_rows, cfg, schema, False)[0] if validation_rows is not None else None
        r_state = fit_stage("retrieval", retrieval, ds, cfg.retrieval.epochs, cfg, strategy, model_dir, progress,
                            retrieval.checkpoint_parts(), val,
                            f"val_factorized_top_k/top_{max(cfg.retrieval.top_k_metrics)}_categorical_accuracy")
        if cached is None:  # the encoder was fine-tuned: the ranking model reads its new embeddings
            cached = encode_packed(text.adapter, text.packed_catalog)
        ranked = train_ranking(cfg, strategy, schema, vocabularies, catalog, cached, fit_rows, model_dir, progress,
                               warm_checkpoint)
        ranking, k_state, calibration = ranked.model, ranked.state, ranked.calibration
    finally:
        _set_precision("none")
    id_only = None
    if cfg.retrieval.id_only_baseline:  # the tutorial's model as it is: float32, on the same positives
        id_only = train_id_only(fit_rows, schema, vocabularies, cfg.retrieval, strategy, cfg.training.seed)
        log(f"ID-only baseline: {cfg.retrieval.baseline_epochs} epochs, batch {cfg.retrieval.baseline_batch_size}")
    trained = TrainedModels(config=cfg, schema=schema, catalog=catalog, split=split,
                            vocabularies=vocabularies, text=text, catalog_text_embeddings=cached,
                            retrieval=retrieval, ranking=ranking, id_only=id_only,
                            history={"retrieval": r_state["history"], "ranking": k_state["history"]})
    trained.metrics = {"retrieval": evaluate_retrieval(retrieval, schema, catalog, split,
                                                       cfg.retrieval.eval_ks, id_only),
                       "ranking": {**evaluate_ranking(ranking, schema, split), "calibration": calibration,
                                   "validation": ranked.validation},
                       "train_steps": {"retrieval": r_state["steps"], "ranking": k_state["steps"]},
                       "train_seconds": round(time.time() - t0, 1),
                       "warm_start": str(warm_checkpoint) if warm_checkpoint else None}
    if text.masked_lm is not None:
        trained.metrics["encoder_masked_lm"] = asdict(text.masked_lm)
    save_checkpoint(trained, strategy, model_dir)
    clear_stages(model_dir, strategy)
    return trained
