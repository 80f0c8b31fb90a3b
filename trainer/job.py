"""One training job: data -> text encoder -> retrieval -> ranking -> offline evaluation."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from features.dataset import frame_to_tensors, make_dataset
from features.history import HISTORY, add_history
from features.schema import DEFAULT_SCHEMA, FeatureSchema
from features.split import DataSplit, time_split
from features.synthetic import generate_world
from features.text import TINY, TextPacker, build_word_vocabulary, make_tokenizer
from features.vocab import Vocabularies, build_vocabularies
from trainer.baselines import IdOnlyRetrieval, train_id_only
from trainer.calibration import sigmoid
from trainer.config import JobConfig, config_to_dict
from trainer.fit import build_model, clear_stages, fit_stage
from trainer.masked_lm import MaskedLMReport, continue_pretraining, load_saved_report, save_encoder
from trainer.metrics import (
    auc,
    expected_calibration_error,
    log_loss,
    popularity_ranks,
    ranks_in_batches,
    retrieval_metrics,
)
from trainer.progress import log
from trainer.ranking import RankingModel
from trainer.retrieval import RetrievalModel
from trainer.strategy import is_chief
from trainer.text_encoder import BertEncoderAdapter, encode_packed, load_backbone, train_top_layers
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
    masked_lm: MaskedLMReport | None = None


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
    id_only: IdOnlyRetrieval | None = None  # the ID-only two-tower baseline, when trained
    history: dict = field(default_factory=dict)


def load_data(cfg: JobConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    if cfg.data.source != "synthetic":
        raise DataError(f"data.source {cfg.data.source!r} is not known; use 'synthetic' or 'spec'")
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


MASKED_LM_DIR = "encoder_masked_lm"  # under training.model_dir: the adapted encoder, a keras-hub preset


def build_text_assets(cfg: JobConfig, catalog: pd.DataFrame, schema: FeatureSchema,
                      corpus_ad_ids: set | None = None, model_dir: Path | None = None,
                      progress: bool = False) -> TextAssets:
    """Tokenizer, packed catalog texts and the encoder, adapted by masked-LM first when configured.

    Masked-LM reads the texts of `corpus_ad_ids` (the ads of the training rows: ads that launch
    later are not known at training time), or the whole catalog when None. A finished masked-LM
    run saved under `model_dir` is reused instead of run again (restarts, `adrec evaluate`).
    """
    texts = schema.ad_text_of(catalog)
    vocabulary = None
    if cfg.encoder.preset == TINY:
        vocabulary = build_word_vocabulary(texts, cfg.encoder.tiny_vocab_size)
    tokenizer = make_tokenizer(cfg.encoder.preset, vocabulary)
    packer = TextPacker(tokenizer, cfg.encoder.sequence_length)
    packed = packer.pack_numpy(texts)
    backbone = load_backbone(cfg.encoder, tokenizer.vocabulary_size(), seed=cfg.training.seed)
    report = None
    if cfg.encoder.masked_lm.epochs > 0:
        corpus = texts if corpus_ad_ids is None else \
            schema.ad_text_of(catalog[catalog[schema.ad_id].isin(corpus_ad_ids)])
        report = _adapt_encoder(cfg, backbone, tokenizer, corpus, model_dir, progress)
    if cfg.encoder.mode == "top_layers":
        train_top_layers(backbone, cfg.encoder.trainable_layers)
    adapter = BertEncoderAdapter(backbone, fine_tune=cfg.encoder.mode != "frozen", name="text_encoder")
    return TextAssets(tokenizer, packer, packed, adapter, vocabulary, report)


def _adapt_encoder(cfg: JobConfig, backbone, tokenizer, corpus: list[str], model_dir: Path | None,
                   progress: bool) -> MaskedLMReport:
    saved = Path(model_dir) / MASKED_LM_DIR if model_dir is not None else None
    report = load_saved_report(saved) if saved is not None else None
    if report is not None:
        backbone.load_weights(str(saved / "model.weights.h5"))
        log(f"text encoder: reusing the masked-LM adapted weights in {saved}")
        return report
    report = continue_pretraining(backbone, tokenizer, corpus, cfg.encoder.sequence_length,
                                  cfg.encoder.masked_lm, seed=cfg.training.seed, progress=progress)
    if saved is not None and is_chief(tf.distribute.get_strategy()):
        save_encoder(backbone, tokenizer, report, saved)
    return report


def _compile(model, learning_rate: float, cfg: JobConfig) -> None:
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate),
                  steps_per_execution=cfg.training.steps_per_execution)


def sampling_counts(rows: pd.DataFrame, schema: FeatureSchema) -> dict[str, float]:
    """Training positives per ad id: the in-batch sampling frequencies logQ correction uses."""
    counts = rows.loc[rows[schema.click] > 0, schema.ad_id].astype(str).value_counts()
    return {k: float(v) for k, v in counts.items()}


def build_retrieval(cfg: JobConfig, strategy, schema, vocabularies, catalog, text: TextAssets,
                    cached: np.ndarray | None, counts: dict[str, float] | None = None) -> RetrievalModel:
    """`counts`: training positives per ad (`sampling_counts`) for the logQ correction; without them
    the loss is uncorrected (evaluation-only rebuilds need none)."""
    catalog_ids = catalog[schema.ad_id].tolist()
    history_table = None
    if cfg.retrieval.history_length and cfg.retrieval.history_text:
        # The query tower pools frozen text embeddings of history ads (fine-tuning: the initial encoder's).
        history_table = cached if cached is not None else encode_packed(text.adapter, text.packed_catalog)
    with strategy.scope():
        if cfg.encoder.mode != "frozen":  # the encoder trains: it runs on every batch
            catalog_text = CatalogText(catalog_ids, packed_tokens=text.packed_catalog, encoder=text.adapter)
        else:
            catalog_text = CatalogText(catalog_ids, cached_embeddings=cached)
        model = RetrievalModel(schema, vocabularies, cfg.retrieval, catalog_text,
                               catalog_features=frame_to_tensors(catalog, schema.ad_string_features, schema),
                               jit_compile=cfg.training.jit_compile, history_text_table=history_table,
                               sampling_counts=counts)
        _compile(model, cfg.retrieval.learning_rate, cfg)
    return model


def ranking_labels(schema: FeatureSchema, rows: pd.DataFrame | None = None) -> dict[str, bool]:
    """Which optional ranking columns the data has: a position (position tower) and conversions (CVR)."""
    def has(name):
        return bool(name) and (rows is None or name in rows.columns)
    return {"position": has(schema.position), "conversion": has(schema.conversion)}


def build_ranking(cfg: JobConfig, strategy, schema, vocabularies, catalog, cached: np.ndarray,
                  rows: pd.DataFrame | None = None) -> RankingModel:
    has = ranking_labels(schema, rows)
    with strategy.scope():
        catalog_text = CatalogText(catalog[schema.ad_id].tolist(), cached_embeddings=cached)
        model = RankingModel(schema, vocabularies, cfg.ranking, catalog_text, jit_compile=cfg.training.jit_compile,
                             use_position=has["position"], use_conversion=has["conversion"])
        _compile(model, cfg.ranking.learning_rate, cfg)
    return model


def query_inputs(schema: FeatureSchema, history_length: int) -> tuple[str, ...]:
    """The retrieval query tower's inputs (and the retrieval/recommender signatures' inputs)."""
    return (*schema.query_features, HISTORY) if history_length else tuple(schema.query_features)


def retrieval_dataset(rows: pd.DataFrame, cfg: JobConfig, schema, shuffle: bool = True):
    positives = rows[rows[schema.click] > 0]
    ds = make_dataset(positives, (*query_inputs(schema, cfg.retrieval.history_length), *schema.ad_string_features),
                      cfg.retrieval.batch_size, shuffle=shuffle, seed=cfg.training.seed, schema=schema)
    return ds, len(positives)


def ranking_dataset(rows: pd.DataFrame, cfg: JobConfig, schema, shuffle: bool = True):
    has = ranking_labels(schema, rows)
    extra = tuple(getattr(schema, name) for name in ("position", "conversion") if has[name])
    return make_dataset(rows, (*schema.query_features, *schema.ad_string_features, schema.click, *extra),
                        cfg.ranking.batch_size, shuffle=shuffle, seed=cfg.training.seed, schema=schema)


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


def retrieval_ranks(model: RetrievalModel, schema: FeatureSchema, catalog: pd.DataFrame,
                    rows: pd.DataFrame, targets: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """0-based rank of each row's target (a catalog row) among all catalog ads, ties pessimistic."""
    return ranks_in_batches(query_embeddings(model, rows, schema), ad_embeddings(model, catalog, schema),
                            targets, batch_size)


def evaluate_retrieval(model: RetrievalModel, schema: FeatureSchema, catalog: pd.DataFrame,
                       split: DataSplit, ks: tuple[int, ...] = (10, 50, 100),
                       id_only: IdOnlyRetrieval | None = None) -> dict:
    """Recall@K and NDCG@K of held-out positives over the whole catalog, on warm and cold-start ads,
    next to most-popular and (when given) the ID-only two-tower baseline.

    Each held-out positive is one query (its user, context and history at that time) with one
    relevant ad, so NDCG@K = 1 / log2(rank + 2) inside the top K. Ties count against the target.
    """
    test_pos = split.test[split.test[schema.click] > 0].reset_index(drop=True)
    row_of = {a: i for i, a in enumerate(catalog[schema.ad_id])}
    targets = test_pos[schema.ad_id].map(row_of).to_numpy()
    ranks = {"model": retrieval_ranks(model, schema, catalog, test_pos, targets)}
    train_clicks = split.train[split.train[schema.click] > 0][schema.ad_id].map(row_of)
    counts = np.bincount(train_clicks.to_numpy(), minlength=len(catalog)).astype(np.float64)
    ranks["most_popular"] = popularity_ranks(counts, targets)
    if id_only is not None:
        ranks["id_only"] = id_only.ranks(test_pos[schema.user_id], catalog[schema.ad_id], targets)
    cold = test_pos[schema.ad_id].isin(split.cold_ad_ids(schema)).to_numpy()
    unseen_user = ~test_pos[schema.user_id].isin(set(split.train[schema.user_id])).to_numpy()
    out = {"test_positives": int(len(test_pos)), "cold_test_positives": int(cold.sum()),
           "unseen_user_test_positives": int(unseen_user.sum()), "catalog_size": int(len(catalog))}
    if HISTORY in test_pos:
        out["test_positives_with_history"] = int(sum(bool(h and h[0]) for h in test_pos[HISTORY]))
    for name, r in ranks.items():
        out[name] = retrieval_metrics(r, ks)
        out[f"{name}_warm"] = retrieval_metrics(r[~cold], ks)
        out[f"{name}_cold"] = retrieval_metrics(r[cold], ks)
        out[f"{name}_unseen_users"] = retrieval_metrics(r[unseen_user], ks)
        out[f"{name}_seen_users"] = retrieval_metrics(r[~unseen_user], ks)
    return out


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


def training_checkpoint(retrieval: RetrievalModel | None, ranking: RankingModel | None) -> tf.train.Checkpoint:
    """The job's final checkpoint layout: the trained parts of the given models (what a warm start reads)."""
    parts = {}
    if retrieval is not None:
        parts["retrieval"] = tf.train.Checkpoint(**retrieval.checkpoint_parts())
    if ranking is not None:
        parts["ranking"] = tf.train.Checkpoint(**ranking.checkpoint_parts())
    return tf.train.Checkpoint(**parts)


def save_checkpoint(trained: TrainedModels, strategy, model_dir: Path) -> Path | None:
    """Checkpoint both models; only the chief writes where others can see it."""
    ckpt = training_checkpoint(trained.retrieval, trained.ranking)
    chief = is_chief(strategy)
    target = model_dir / "checkpoints" if chief else Path(tempfile.mkdtemp(prefix="adrec-worker-ckpt-"))
    path = tf.train.CheckpointManager(ckpt, str(target), max_to_keep=3).save()
    if not chief:
        shutil.rmtree(target, ignore_errors=True)
        return None
    (model_dir / "metrics.json").write_text(json.dumps(trained.metrics, indent=2))
    (model_dir / "config.json").write_text(json.dumps(config_to_dict(trained.config), indent=2))
    (model_dir / "vocabularies.json").write_text(json.dumps(trained.vocabularies.to_dict()))
    return Path(path)


def select_time_window(logs: pd.DataFrame, window: tuple[float, ...], schema: FeatureSchema) -> pd.DataFrame:
    """Rows whose timestamp falls in [start, end) of the log's time span, as fractions."""
    if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
        raise DataError(f"data.time_window must be [start, end] with 0 <= start < end <= 1, got {list(window)}")
    if tuple(window) == (0.0, 1.0):
        return logs
    ts = logs[schema.timestamp]
    lo, hi = ts.min(), ts.max()
    start, end = lo + window[0] * (hi - lo), lo + window[1] * (hi - lo)
    keep = (ts >= start) & ((ts < end) if window[1] < 1.0 else (ts <= end))
    return logs[keep].reset_index(drop=True)


def load_warm_start(warm_dir: Path) -> tuple[Vocabularies, str]:
    vocab_file = warm_dir / "vocabularies.json"
    latest = tf.train.latest_checkpoint(str(warm_dir / "checkpoints"))
    if not vocab_file.exists() or latest is None:
        raise DataError(f"--warm-start {warm_dir}: no finished job there (need vocabularies.json and "
                        "checkpoints/)")
    return Vocabularies.from_dict(json.loads(vocab_file.read_text())), latest


def restore_parts(checkpoint_path: str | None, retrieval: RetrievalModel | None = None,
                  ranking: RankingModel | None = None) -> None:
    """Warm start: fill the given (built) models' trained parts from a job's final checkpoint."""
    if checkpoint_path is None:
        return
    training_checkpoint(retrieval, ranking).read(checkpoint_path).expect_partial().assert_existing_objects_matched()


def prepare_data(cfg: JobConfig, schema: FeatureSchema | None = None,
                 vocabularies: Vocabularies | None = None):
    """Load, window and time-split the job's data; vocabularies from training rows unless given.

    Returns (catalog, schema, split with catalog ad columns joined, vocabularies).
    """
    catalog, logs, schema = load_job_data(cfg, schema)
    if cfg.retrieval.history_length:  # per event, from earlier events only: before the window and the split,
        logs = add_history(logs, cfg.retrieval.history_length, schema)  # as a serving system would know them
    logs = select_time_window(logs, cfg.data.time_window, schema)
    split = time_split(logs, cfg.training.test_fraction, schema)
    if vocabularies is None:
        vocabularies = build_vocabularies(split.train, catalog, schema)
    split = DataSplit(train=join_ad_features(split.train, catalog, schema),
                      test=join_ad_features(split.test, catalog, schema), cutoff=split.cutoff)
    return catalog, schema, split, vocabularies


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
        ranking_rows, calibration_rows = fit_rows, None
        if cfg.ranking.calibration != "none" and cfg.ranking.calibration_fraction > 0:
            inner = time_split(fit_rows, cfg.ranking.calibration_fraction, schema)
            ranking_rows, calibration_rows = inner.train, inner.test
        ranking_ds = ranking_dataset(ranking_rows, cfg, schema)
        ranking = None
        if cached is not None:
            ranking = build_ranking(cfg, strategy, schema, vocabularies, catalog, cached, fit_rows)
            build_model(ranking, next(iter(ranking_ds)), strategy)
        restore_parts(warm_checkpoint, retrieval=retrieval, ranking=ranking)
        log(f"retrieval: {n_pos} positive pairs, {cfg.retrieval.epochs} epochs, batch {cfg.retrieval.batch_size}, "
            f"{strategy.num_replicas_in_sync} replica(s)")
        val = retrieval_dataset(validation_rows, cfg, schema, False)[0] if validation_rows is not None else None
        r_state = fit_stage("retrieval", retrieval, ds, cfg.retrieval.epochs, cfg, strategy, model_dir, progress,
                            retrieval.checkpoint_parts(), val,
                            f"val_factorized_top_k/top_{max(cfg.retrieval.top_k_metrics)}_categorical_accuracy")
        if ranking is None:  # the encoder was fine-tuned: the ranking model reads its new embeddings
            cached = encode_packed(text.adapter, text.packed_catalog)
            ranking = build_ranking(cfg, strategy, schema, vocabularies, catalog, cached, fit_rows)
            build_model(ranking, next(iter(ranking_ds)), strategy)
            restore_parts(warm_checkpoint, ranking=ranking)
        log(f"ranking: {len(ranking_rows)} impressions, {cfg.ranking.epochs} epochs, batch {cfg.ranking.batch_size}"
            + (f"; {len(calibration_rows)} later ones held out to calibrate ({cfg.ranking.calibration})"
               if calibration_rows is not None else ""))
        val = ranking_dataset(validation_rows, cfg, schema, False) if validation_rows is not None else None
        k_state = fit_stage("ranking", ranking, ranking_ds, cfg.ranking.epochs, cfg, strategy, model_dir,
                            progress, ranking.checkpoint_parts(), val, "val_auc")
        calibration = fit_calibration(ranking, calibration_rows if calibration_rows is not None else ranking_rows,
                                      schema, cfg.ranking.calibration if calibration_rows is not None else "none")
        log(f"calibration ({calibration['method']}) on {calibration['rows']} held-out rows: CTR ECE "
            f"{calibration['ctr_ece_before']:.4f} -> {calibration['ctr_ece_after']:.4f}")
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
                       "ranking": {**evaluate_ranking(ranking, schema, split), "calibration": calibration},
                       "train_steps": {"retrieval": r_state["steps"], "ranking": k_state["steps"]},
                       "train_seconds": round(time.time() - t0, 1),
                       "warm_start": str(warm_checkpoint) if warm_checkpoint else None}
    if text.masked_lm is not None:
        trained.metrics["encoder_masked_lm"] = asdict(text.masked_lm)
    save_checkpoint(trained, strategy, model_dir)
    clear_stages(model_dir, strategy)
    return trained
