"""Evaluation report of a finished training job: metrics JSON, PNG plots and one HTML page.

`load_job(model_dir)` rebuilds a job's models from what the job wrote to its model_dir
(config.json, vocabularies.json, checkpoints/): the same data and time split, the same text
encoder and vocabularies, then the trained towers from the final checkpoint. `write_report`
re-evaluates them on the held-out split and writes the report (`adrec evaluate`).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from features.protocol import one_list_per_user
from trainer.builders import build_ranking, build_retrieval, build_text_assets
from trainer.checkpoints import load_warm_start, restore_parts
from trainer.comparison import evaluate_retrieval
from trainer.config import config_from_dict
from trainer.evaluate import ad_embeddings, evaluate_ranking, predict_ctr, query_embeddings
from trainer.inputs import ranking_dataset, retrieval_dataset
from trainer.labels import ranking_label_notes
from trainer.metrics import (
    expected_calibration_error,
    popularity_ranks,
    ranks_in_batches,
    reliability_bins,
)
from trainer.prepare import DataError, prepare_data
from trainer.text_encoder import encode_packed
from trainer.trained import TrainedModels


def load_job(model_dir: str | Path) -> TrainedModels:
    """Rebuild a finished job's retrieval and ranking models from its model_dir."""
    from trainer.fit import build_model

    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise DataError(f"{model_dir}: not a finished training job (no config.json; pass training.model_dir)")
    cfg = config_from_dict(json.loads(config_file.read_text()), str(config_file))
    vocabularies, checkpoint = load_warm_start(model_dir)
    strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(cfg.training.seed)

    data = prepare_data(cfg, vocabularies=vocabularies)
    catalog, schema, split = data.catalog, data.schema, data.split
    text = build_text_assets(cfg, catalog, schema, corpus_ad_ids=set(split.train[schema.ad_id]),
                             model_dir=model_dir)
    cached = encode_packed(text.adapter, text.packed_catalog) if cfg.encoder.mode == "frozen" else None
    retrieval = build_retrieval(cfg, strategy, schema, vocabularies, catalog, text, cached)
    build_model(retrieval, next(iter(retrieval_dataset(split.train, cfg, schema, False)[0])), strategy)
    restore_parts(checkpoint, retrieval=retrieval)
    if cached is None:  # fine-tuned encoder: its restored weights give the ranking model's text embeddings
        cached = encode_packed(text.adapter, text.packed_catalog)
    ranking = build_ranking(cfg, strategy, schema, vocabularies, catalog, cached, split.train)
    build_model(ranking, next(iter(ranking_dataset(split.train, cfg, schema, False))), strategy)
    restore_parts(checkpoint, ranking=ranking)
    return TrainedModels(config=cfg, schema=schema, catalog=catalog, split=split, vocabularies=vocabularies,
                         text=text, catalog_text_embeddings=cached, retrieval=retrieval, ranking=ranking,
                         excluded=data.excluded, history=read_history(model_dir))


def read_history(model_dir: Path) -> dict:
    """Per-epoch training scalars from the job's TensorBoard logs: {stage: {tag: [values]}}."""
    out: dict = {}
    for stage in ("retrieval", "ranking"):
        for split_name, prefix in (("train", ""), ("validation", "val_")):
            for event_file in sorted((model_dir / "logs" / stage / split_name).glob("events.out.tfevents.*")):
                for event in tf.compat.v1.train.summary_iterator(str(event_file)):
                    for value in event.summary.value:
                        if not value.tag.startswith("epoch_"):
                            continue
                        number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                            else float(value.simple_value)
                        tag = prefix + value.tag[len("epoch_"):]
                        out.setdefault(stage, {}).setdefault(tag, []).append(number)
    return out


@dataclass
class Evaluation:
    """Everything the report plots: per-example ranks, scores and predictions on the held-out split."""

    metrics: dict
    model_ranks: np.ndarray
    popular_ranks: np.ndarray
    cold: np.ndarray
    catalog_size: int
    target_scores: np.ndarray
    other_scores: np.ndarray
    labels: np.ndarray
    pctr: np.ndarray


def evaluate(trained: TrainedModels, n_bins: int = 10) -> Evaluation:
    schema, catalog, split = trained.schema, trained.catalog, trained.split
    test_pos = split.test[split.test[schema.click] > 0].reset_index(drop=True)
    row_of = {a: i for i, a in enumerate(catalog[schema.ad_id])}
    targets = test_pos[schema.ad_id].map(row_of).to_numpy()
    queries = query_embeddings(trained.retrieval, test_pos, schema)
    items = ad_embeddings(trained.retrieval, catalog, schema)  # scored a batch of queries at a time, never all at once
    train_clicks = split.train[split.train[schema.click] > 0][schema.ad_id].map(row_of).to_numpy()
    counts = np.bincount(train_clicks, minlength=len(catalog)).astype(np.float64)
    labels = split.test[schema.click].to_numpy()
    pctr = predict_ctr(trained.ranking, split.test, schema)

    ks = tuple(trained.config.retrieval.eval_ks)
    ranking = evaluate_ranking(trained.ranking, schema, split)
    ranking["ece"] = expected_calibration_error(labels, pctr, n_bins)
    ranking.update(ranking_label_notes(ranking, split.test, schema, trained.config))
    metrics = {"retrieval": evaluate_retrieval(trained.retrieval, catalog, schema, split.train, split.test,
                                               trained.excluded, ks, trained.baselines,
                                               one_list_per_user(trained.config.evaluation, schema)),
               "ranking": ranking}
    rng = np.random.default_rng(0)
    sample = rng.integers(0, len(catalog), size=(len(queries), min(20, len(catalog))))
    return Evaluation(metrics=metrics, model_ranks=ranks_in_batches(queries, items, targets),
                      popular_ranks=popularity_ranks(counts, targets),
                      cold=test_pos[schema.ad_id].isin(split.cold_ad_ids(schema)).to_numpy(),
                      catalog_size=len(catalog), target_scores=np.einsum("qd,qd->q", queries, items[targets]),
                      other_scores=np.einsum("qd,qsd->qs", queries, items[sample]).ravel(), labels=labels, pctr=pctr)


def recall_curve(ranks: np.ndarray, ks: np.ndarray) -> np.ndarray:
    if len(ranks) == 0:
        return np.full(len(ks), np.nan)
    return np.array([np.mean(ranks < k) for k in ks])


def curve_ks(catalog_size: int) -> np.ndarray:
    return np.unique(np.geomspace(1, catalog_size, num=min(40, catalog_size)).round().astype(int))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recall(ev: Evaluation, ax) -> None:
    ks = curve_ks(ev.catalog_size)
    for label, ranks, style in (("model, all", ev.model_ranks, "-"),
                                ("model, warm ads", ev.model_ranks[~ev.cold], "--"),
                                ("model, cold ads", ev.model_ranks[ev.cold], ":"),
                                ("most popular, all", ev.popular_ranks, "-"),
                                ("most popular, cold ads", ev.popular_ranks[ev.cold], ":")):
        if len(ranks):
            ax.plot(ks, recall_curve(ranks, ks), style, label=f"{label} (n={len(ranks)})")
    ax.set_xscale("log")
    ax.set(xlabel="K (ads retrieved from the whole catalog)", ylabel="Recall@K", ylim=(0, 1.02),
           title=f"Retrieval Recall@K over {ev.catalog_size} ads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_reliability(labels: np.ndarray, pctr: np.ndarray, ax, n_bins: int = 10) -> None:
    bins = reliability_bins(labels, pctr, n_bins)
    used = bins["count"] > 0
    ax.plot([0, 1], [0, 1], color="grey", lw=1, label="perfect calibration")
    ax.plot(bins["mean_predicted"][used], bins["observed_rate"][used], "o-", label="model")
    for x, y, n in zip(bins["mean_predicted"][used], bins["observed_rate"][used], bins["count"][used], strict=True):
        ax.annotate(f"{int(n)}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    top = float(max(np.nanmax(bins["mean_predicted"][used]), np.nanmax(bins["observed_rate"][used]), 0.05))
    ax.set(xlim=(0, min(1, top * 1.1)), ylim=(0, min(1, top * 1.1)), xlabel="mean predicted CTR in bin",
           ylabel="observed click rate",
           title=f"Reliability (ECE {expected_calibration_error(labels, pctr, n_bins):.4f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_scores(ev: Evaluation, axes) -> None:
    ax = axes[0]
    bins = np.linspace(0, float(max(ev.pctr.max(), 1e-3)), 40)
    ax.hist(ev.pctr[ev.labels == 0], bins=bins, density=True, alpha=0.6, label="not clicked")
    ax.hist(ev.pctr[ev.labels > 0], bins=bins, density=True, alpha=0.6, label="clicked")
    ax.set(xlabel="predicted CTR", ylabel="density", title="Ranking: pCTR by label")
    ax.legend(fontsize=8)
    ax = axes[1]
    bins = np.linspace(-1, 1, 50)
    ax.hist(ev.other_scores, bins=bins, density=True, alpha=0.6, label="random catalog ads")
    ax.hist(ev.target_scores, bins=bins, density=True, alpha=0.6, label="held-out clicked ad")
    ax.set(xlabel="query . ad (cosine)", ylabel="density", title="Retrieval scores")
    ax.legend(fontsize=8)


def plot_history(history: dict, axes) -> None:
    for ax, stage in zip(axes, ("retrieval", "ranking"), strict=True):
        tags = history.get(stage, {})
        for tag in ("loss", "val_loss"):
            if tag in tags:
                ax.plot(np.arange(1, len(tags[tag]) + 1), tags[tag], "o-", label=tag)
        ax.set(xlabel="epoch", ylabel="loss", title=f"{stage} training")
        ax.grid(alpha=0.3)
        if tags:
            ax.legend(fontsize=8)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path.name


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(trained: TrainedModels, out_dir: str | Path, source: str = "") -> dict:
    """Evaluate on the held-out split and write metrics.json, *.png and index.html to `out_dir`."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = evaluate(trained)
    (out / "metrics.json").write_text(json.dumps(ev.metrics, indent=2))
    images = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_recall(ev, ax)
    images["Recall@K, warm and cold ads, vs most popular"] = _save(fig, out / "recall_at_k.png")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    plot_reliability(ev.labels, ev.pctr, ax)
    images["Reliability diagram (CTR)"] = _save(fig, out / "reliability.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_scores(ev, axes)
    images["Score distributions"] = _save(fig, out / "score_distributions.png")
    if trained.history:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        plot_history(trained.history, axes)
        images["Training curves"] = _save(fig, out / "training_curves.png")

    r, k = ev.metrics["retrieval"], ev.metrics["ranking"]
    names = [f"{m}{s}" for m in ("model", "id_only", "most_popular") for s in ("", "_warm", "_cold")]
    recall_rows = {f"{name} {key}": value for name in names if name in r for key, value in r[name].items()}
    sections = [
        f"<h1>adrec evaluation</h1><p>{html.escape(source)}: {r['catalog_size']} ads, "
        f"{k['test_impressions']} held-out impressions, {r['test_positives']} held-out clicks "
        f"({r['cold_test_positives']} on cold-start ads).</p>",
        "<h2>Retrieval (Recall@K, NDCG@K)</h2>" + _table(recall_rows),
        "<h2>Ranking (CTR: served pCTR, position dropped, calibrated)</h2>" + _table(
            {key: k[key] for key in ("negatives", "sampled_negatives_per_positive", "test_positives",
                                     "test_sampled_negatives", "auc", "auc_undefined", "auc_with_position",
                                     "oracle_auc", "oracle_auc_no_position", "logloss", "ece", "ece_uncalibrated",
                                     "mean_pctr", "ctr") if key in k}),
        "<h2>Ranking (CVR on clicked impressions; pCTCVR over all)</h2>" + _table(
            {key: k[key] for key in ("cvr_auc", "cvr_logloss", "cvr_ece", "cvr_ece_uncalibrated", "mean_pcvr", "cvr",
                                     "ctcvr_auc", "ctcvr_logloss", "ctcvr_ece") if key in k}),
        *(f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"
          for title, name in images.items()),
    ]
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:2px 12px;text-align:left}"
    (out / "index.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>adrec evaluation"
                                    f"</title><style>{style}</style></head><body>{''.join(sections)}</body></html>")
    return ev.metrics
