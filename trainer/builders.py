"""Model builders: text assets (tokenizer, packed catalog, encoder) and the compiled retrieval and ranking models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from features.dataset import frame_to_tensors
from features.schema import FeatureSchema
from features.text import TINY, TextPacker, build_word_vocabulary, make_tokenizer
from trainer.config import JobConfig
from trainer.inputs import ranking_labels
from trainer.masked_lm import MaskedLMReport, continue_pretraining, load_saved_report, save_encoder
from trainer.progress import log
from trainer.ranking import RankingModel
from trainer.retrieval import RetrievalModel
from trainer.strategy import is_chief
from trainer.text_encoder import BertEncoderAdapter, enable_lora, encode_packed, load_backbone, train_top_layers
from trainer.towers import CatalogText, CatalogVectors, item_statistics


@dataclass
class TextAssets:
    tokenizer: object
    packer: TextPacker
    packed_catalog: dict[str, np.ndarray]
    adapter: BertEncoderAdapter
    vocabulary: list[str] | None
    masked_lm: MaskedLMReport | None = None


MASKED_LM_DIR = "encoder_masked_lm"  # under training.model_dir: the adapted encoder, a keras-hub preset
ITEM_STATS_FOLDS = 5  # ranking.item_stats: training rows read their ad's statistics over the other 4 folds


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
    elif cfg.encoder.mode == "lora":
        enable_lora(backbone, cfg.encoder.lora_rank)
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


def encoder_optimizer(cfg: JobConfig) -> tf.keras.optimizers.Optimizer | None:
    """The trainable encoder's own Adam at `encoder.fine_tune_learning_rate` (create it in the strategy's
    scope); None when the encoder is frozen or that rate is 0 (it then steps with the towers)."""
    if cfg.encoder.mode == "frozen" or not cfg.encoder.fine_tune_learning_rate:
        return None
    return tf.keras.optimizers.Adam(cfg.encoder.fine_tune_learning_rate)


def build_retrieval(cfg: JobConfig, strategy, schema, vocabularies, catalog, text: TextAssets,
                    cached: np.ndarray | None, counts: dict[str, float] | None = None) -> RetrievalModel:
    """`counts`: training positives per ad (`sampling_counts`) for the logQ correction; without them
    the loss is uncorrected (evaluation-only rebuilds need none)."""
    catalog_ids = catalog[schema.ad_id].tolist()
    history_table = None
    if cfg.retrieval.history_length and cfg.retrieval.history_text:
        # The query tower pools frozen text embeddings of history ads (fine-tuning: the initial encoder's).
        history_table = cached if cached is not None else encode_packed(text.adapter, text.packed_catalog)
        history_table = principal_components(history_table, cfg.retrieval.text_dim)
    with strategy.scope():
        if cfg.encoder.mode != "frozen":  # the encoder trains: it runs on every batch
            catalog_text = CatalogText(catalog_ids, packed_tokens=text.packed_catalog, encoder=text.adapter)
        else:
            catalog_text = CatalogText(catalog_ids,
                                       cached_embeddings=principal_components(cached, cfg.retrieval.text_dim))
        model = RetrievalModel(schema, vocabularies, cfg.retrieval, catalog_text,
                               catalog_features=frame_to_tensors(catalog, schema.ad_string_features, schema),
                               jit_compile=cfg.training.jit_compile, history_text_table=history_table,
                               sampling_counts=counts, catalog_vectors=catalog_vectors(catalog, schema),
                               dp=cfg.privacy.dp if cfg.privacy.dp.enabled else None,
                               encoder_optimizer=encoder_optimizer(cfg))
        _compile(model, cfg.retrieval.learning_rate, cfg)
    return model


def catalog_vectors(catalog: pd.DataFrame, schema: FeatureSchema) -> CatalogVectors | None:
    """The catalog's creative vectors as a lookup layer, when the schema names an ad vector column."""
    vectors = schema.ad_vectors_of(catalog)
    if vectors is None:
        return None
    return CatalogVectors(catalog[schema.ad_id].astype(str).tolist(), vectors, name="catalog_vectors")


def principal_components(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """`embeddings` projected on their first `dim` principal components (unchanged when `dim` is 0 or
    not smaller). The retrieval towers read the frozen text of every catalog ad (full softmax) and of N
    history ads per query at every step, so its width is much of their cost."""
    if not dim or dim >= embeddings.shape[1]:
        return embeddings
    centered = embeddings.astype(np.float64) - embeddings.mean(axis=0)
    _, _, components = np.linalg.svd(centered, full_matrices=False)
    signs = np.sign(components[:dim, :1] + 1e-12)  # a fixed sign per component: the same table every run
    return (centered @ (components[:dim] * signs).T).astype(np.float32)


def vocabulary_counts(rows: pd.DataFrame | None, vocabulary: list, column: str) -> np.ndarray:
    """Rows per vocabulary row of `column`, OOV (row 0) first, as the lookup layers index them."""
    counts = np.zeros(len(vocabulary) + 1)
    if rows is not None and len(rows):
        index = {str(v): i + 1 for i, v in enumerate(vocabulary)}
        seen = rows[column].astype(str).map(index).fillna(0).astype(int).to_numpy()
        counts += np.bincount(seen, minlength=len(counts))
    return counts


def ranking_statistics(cfg: JobConfig, schema, vocabularies, rows: pd.DataFrame | None
                       ) -> tuple[float, tuple[np.ndarray, np.ndarray] | None]:
    """What the ranking model takes from its training rows: the click rate (the prior its counters and
    rates shrink to) and, with `ranking.item_stats`, the ads' click tables."""
    prior = float(rows[schema.click].mean()) if rows is not None and len(rows) else 0.5
    items = None
    if cfg.ranking.item_stats and rows is not None:
        items = item_statistics(vocabularies[schema.ad_id], rows[schema.user_id], rows[schema.ad_id],
                                rows[schema.click], ITEM_STATS_FOLDS)
    return prior, items


def build_ranking(cfg: JobConfig, strategy, schema, vocabularies, catalog, cached: np.ndarray,
                  rows: pd.DataFrame | None = None) -> RankingModel:
    """`rows`: the training rows (which optional labels exist, id counts for the frequency-aware L2,
    `ranking_statistics`)."""
    has = ranking_labels(schema, rows)
    ids = (schema.user_id, schema.ad_id)
    id_counts = {n: vocabulary_counts(rows, vocabularies[n], n) for n in ids} if cfg.ranking.id_frequency_l2 else None
    prior, items = ranking_statistics(cfg, schema, vocabularies, rows)
    with strategy.scope():
        catalog_text = CatalogText(catalog[schema.ad_id].astype(str).tolist(), cached_embeddings=cached)
        model = RankingModel(schema, vocabularies, cfg.ranking, catalog_text, jit_compile=cfg.training.jit_compile,
                             use_position=has["position"], use_conversion=has["conversion"], id_counts=id_counts,
                             click_prior=prior, history_length=cfg.retrieval.history_length, item_statistics=items,
                             catalog_vectors=catalog_vectors(catalog, schema))
        _compile(model, cfg.ranking.learning_rate, cfg)
    return model
