"""One training job: data -> text encoder -> retrieval -> ranking -> offline evaluation."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from features.dataset import frame_to_tensors, make_dataset
from features.schema import DEFAULT_SCHEMA, FeatureSchema
from features.split import DataSplit, time_split
from features.synthetic import generate_world
from features.text import TINY, TextPacker, build_word_vocabulary, make_tokenizer
from features.vocab import Vocabularies, build_vocabularies
from trainer.config import JobConfig, config_to_dict
from trainer.metrics import auc, log_loss, popularity_ranks, ranks_of_targets, recall_at_k
from trainer.ranking import RankingModel
from trainer.retrieval import RetrievalModel
from trainer.strategy import is_chief
from trainer.text_encoder import BertEncoderAdapter, encode_packed, load_backbone
from trainer.towers import CatalogText


class DataError(ValueError):
    """Training data does not fit together (e.g. a logged ad missing from the catalog)."""


@dataclass
class TextAssets:
    tokenizer: object
    packer: TextPacker
    packed_catalog: dict[str, np.ndarray]
    adapter: BertEncoderAdapter
    vocabulary: list[str] | None


@dataclass
class TrainedModels:
    """Everything export and serving-side evaluation need from a finished job."""

    config: JobConfig
    schema: FeatureSchema
    catalog: pd.DataFrame
    split: DataSplit
    vocabularies: Vocabularies
    text: TextAssets
    catalog_text_embeddings: np.ndarray
    retrieval: RetrievalModel
    ranking: RankingModel
    metrics: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[adrec {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_data(cfg: JobConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    if cfg.data.source != "synthetic":
        raise DataError(f"data.source {cfg.data.source!r} is not known; use 'synthetic'")
    world = generate_world(cfg.data.synthetic)
    return world.catalog, world.logs


def load_job_data(cfg: JobConfig, schema: FeatureSchema | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, FeatureSchema]:
    """Catalog, logs and their schema: the synthetic world, or real logs through a data spec.

    With `data.source: spec` the schema is the spec's (its columns, possibly no context); the
    spec's validation report is printed, and a `fail` policy raises DataValidationError.
    """
    if cfg.data.source != "spec":
        catalog, logs = load_data(cfg)
        return catalog, logs, schema or DEFAULT_SCHEMA
    if not cfg.data.spec:
        raise DataError("data.source is 'spec' but data.spec names no spec file")
    from features.loader import load_dataset
    from features.spec import load_spec

    loaded = load_dataset(load_spec(cfg.data.spec, root=cfg.data.root or None))
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


def build_text_assets(cfg: JobConfig, catalog: pd.DataFrame, schema: FeatureSchema) -> TextAssets:
    texts = schema.ad_text_of(catalog)
    vocabulary = None
    if cfg.encoder.preset == TINY:
        vocabulary = build_word_vocabulary(texts, cfg.encoder.tiny_vocab_size)
    tokenizer = make_tokenizer(cfg.encoder.preset, vocabulary)
    packer = TextPacker(tokenizer, cfg.encoder.sequence_length)
    packed = packer.pack_numpy(texts)
    backbone = load_backbone(cfg.encoder, tokenizer.vocabulary_size(), seed=cfg.training.seed)
    adapter = BertEncoderAdapter(backbone, fine_tune=cfg.encoder.mode == "full", name="text_encoder")
    return TextAssets(tokenizer, packer, packed, adapter, vocabulary)


def _fit_verbosity(progress: bool) -> int:
    if not progress:
        return 0
    return 1 if sys.stdout.isatty() else 2


def _callbacks(model_dir: Path, name: str) -> list:
    return [tf.keras.callbacks.TensorBoard(log_dir=str(model_dir / "logs" / name), update_freq="epoch")]


def train_retrieval(cfg: JobConfig, strategy, schema, vocabularies, catalog, train_rows, text: TextAssets,
                    cached: np.ndarray | None, progress: bool, model_dir: Path):
    rcfg = cfg.retrieval
    positives = train_rows[train_rows[schema.click] > 0]
    catalog_ids = catalog[schema.ad_id].tolist()
    with strategy.scope():
        if cfg.encoder.mode == "full":
            catalog_text = CatalogText(catalog_ids, packed_tokens=text.packed_catalog, encoder=text.adapter)
        else:
            catalog_text = CatalogText(catalog_ids, cached_embeddings=cached)
        model = RetrievalModel(schema, vocabularies, rcfg, catalog_text,
                               catalog_features=frame_to_tensors(catalog, schema.ad_string_features, schema))
        model.compile(optimizer=tf.keras.optimizers.Adam(rcfg.learning_rate))
    columns = (*schema.query_features, *schema.ad_string_features)
    ds = make_dataset(positives, columns, rcfg.batch_size, shuffle=True, seed=cfg.training.seed,
                      schema=schema)
    log(f"retrieval: {len(positives)} positive pairs, {rcfg.epochs} epochs, batch {rcfg.batch_size}, "
        f"{strategy.num_replicas_in_sync} replica(s)")
    hist = model.fit(ds, epochs=rcfg.epochs, verbose=_fit_verbosity(progress),
                     callbacks=_callbacks(model_dir, "retrieval"))
    return model, hist.history


def train_ranking(cfg: JobConfig, strategy, schema, vocabularies, catalog, train_rows, cached: np.ndarray,
                  progress: bool, model_dir: Path):
    kcfg = cfg.ranking
    with strategy.scope():
        catalog_text = CatalogText(catalog[schema.ad_id].tolist(), cached_embeddings=cached)
        model = RankingModel(schema, vocabularies, kcfg, catalog_text)
        model.compile(optimizer=tf.keras.optimizers.Adam(kcfg.learning_rate))
    columns = (*schema.query_features, *schema.ad_string_features, schema.click)
    ds = make_dataset(train_rows, columns, kcfg.batch_size, shuffle=True, seed=cfg.training.seed,
                      schema=schema)
    log(f"ranking: {len(train_rows)} impressions, {kcfg.epochs} epochs, batch {kcfg.batch_size}")
    hist = model.fit(ds, epochs=kcfg.epochs, verbose=_fit_verbosity(progress),
                     callbacks=_callbacks(model_dir, "ranking"))
    return model, hist.history


def _batched(fn, tensors: dict[str, np.ndarray], batch_size: int = 2048) -> np.ndarray:
    n = len(next(iter(tensors.values())))
    outs = [fn({k: tf.constant(v[i:i + batch_size]) for k, v in tensors.items()}).numpy()
            for i in range(0, n, batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def ad_embeddings(model: RetrievalModel, catalog: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    return _batched(model.ad_embedding, frame_to_tensors(catalog, schema.ad_string_features, schema))


def query_embeddings(model: RetrievalModel, rows: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    return _batched(model.query_tower, frame_to_tensors(rows, schema.query_features, schema))


def evaluate_retrieval(model: RetrievalModel, schema: FeatureSchema, catalog: pd.DataFrame,
                       split: DataSplit, ks: tuple[int, ...] = (10, 100)) -> dict:
    """Recall@K of held-out clicks over the whole catalog, next to most-popular, warm and cold."""
    test_pos = split.test[split.test[schema.click] > 0].reset_index(drop=True)
    row_of = {a: i for i, a in enumerate(catalog[schema.ad_id])}
    targets = test_pos[schema.ad_id].map(row_of).to_numpy()
    scores = query_embeddings(model, test_pos, schema) @ ad_embeddings(model, catalog, schema).T
    model_ranks = ranks_of_targets(scores, targets)
    train_clicks = split.train[split.train[schema.click] > 0][schema.ad_id].map(row_of)
    counts = np.bincount(train_clicks.to_numpy(), minlength=len(catalog)).astype(np.float64)
    pop_ranks = popularity_ranks(counts, targets)
    cold = test_pos[schema.ad_id].isin(split.cold_ad_ids(schema)).to_numpy()
    out = {"test_positives": int(len(test_pos)), "cold_test_positives": int(cold.sum()),
           "catalog_size": int(len(catalog)),
           "model": recall_at_k(model_ranks, ks), "most_popular": recall_at_k(pop_ranks, ks),
           "model_warm": recall_at_k(model_ranks[~cold], ks),
           "model_cold": recall_at_k(model_ranks[cold], ks)}
    return out


def predict_ctr(model: RankingModel, rows: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    tensors = frame_to_tensors(rows, (*schema.query_features, *schema.ad_string_features), schema)
    return 1.0 / (1.0 + np.exp(-_batched(model, tensors)))


def evaluate_ranking(model: RankingModel, schema: FeatureSchema, split: DataSplit) -> dict:
    labels = split.test[schema.click].to_numpy()
    p = predict_ctr(model, split.test, schema)
    out = {"test_impressions": int(len(labels)), "auc": auc(labels, p), "logloss": log_loss(labels, p),
           "mean_pctr": float(p.mean()), "ctr": float(labels.mean())}
    if "true_p_click" in split.test:
        out["oracle_auc"] = auc(labels, split.test["true_p_click"].to_numpy())
        out["oracle_auc_no_position"] = auc(labels, split.test["true_relevance"].to_numpy())
    return out


def save_checkpoint(trained: TrainedModels, strategy, model_dir: Path) -> Path | None:
    """Checkpoint both models; only the chief writes where others can see it."""
    ckpt = tf.train.Checkpoint(retrieval=trained.retrieval, ranking=trained.ranking)
    target = model_dir / "checkpoints" if is_chief(strategy) else model_dir / f".worker-tmp-{id(ckpt)}"
    manager = tf.train.CheckpointManager(ckpt, str(target), max_to_keep=3)
    path = manager.save()
    if is_chief(strategy):
        (model_dir / "metrics.json").write_text(json.dumps(trained.metrics, indent=2))
        (model_dir / "config.json").write_text(json.dumps(config_to_dict(trained.config), indent=2))
        (model_dir / "vocabularies.json").write_text(json.dumps(trained.vocabularies.to_dict()))
        return Path(path)
    return None


def run_training(cfg: JobConfig, strategy=None, progress: bool = True,
                 schema: FeatureSchema | None = None) -> TrainedModels:
    strategy = strategy or tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(cfg.training.seed)
    model_dir = Path(cfg.training.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)

    catalog, logs, schema = load_job_data(cfg, schema)
    split = time_split(logs, cfg.training.test_fraction, schema)
    vocabularies = build_vocabularies(split.train, catalog, schema)
    train_rows = join_ad_features(split.train, catalog, schema)
    split = DataSplit(train=train_rows, test=join_ad_features(split.test, catalog, schema),
                      cutoff=split.cutoff)
    log(f"data: {len(catalog)} ads, {len(split.train)} train / {len(split.test)} test impressions, "
        f"{len(split.cold_ad_ids(schema))} cold-start ads in test")

    t0 = time.time()
    with strategy.scope():
        text = build_text_assets(cfg, catalog, schema)
    cached = None
    if cfg.encoder.mode == "frozen":
        cached = encode_packed(text.adapter, text.packed_catalog, progress=progress)
        log(f"text encoder {cfg.encoder.preset!r} frozen: cached {len(cached)} ad embeddings "
            f"in {time.time() - t0:.1f}s")
    retrieval, r_hist = train_retrieval(cfg, strategy, schema, vocabularies, catalog, split.train, text,
                                        cached, progress, model_dir)
    if cached is None:  # the encoder was fine-tuned: the ranking model reads its new embeddings
        cached = encode_packed(text.adapter, text.packed_catalog)
    ranking, k_hist = train_ranking(cfg, strategy, schema, vocabularies, catalog, split.train, cached,
                                    progress, model_dir)
    trained = TrainedModels(config=cfg, schema=schema, catalog=catalog, split=split,
                            vocabularies=vocabularies, text=text, catalog_text_embeddings=cached,
                            retrieval=retrieval, ranking=ranking,
                            history={"retrieval": r_hist, "ranking": k_hist})
    trained.metrics = {"retrieval": evaluate_retrieval(retrieval, schema, catalog, split,
                                                       cfg.retrieval.top_k_metrics),
                       "ranking": evaluate_ranking(ranking, schema, split),
                       "train_seconds": round(time.time() - t0, 1)}
    save_checkpoint(trained, strategy, model_dir)
    return trained
