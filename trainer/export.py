"""Versioned SavedModels in TensorFlow Serving's layout: `<export_dir>/<model>/<version>/`.

Three servables, each taking raw values (strings, ints), never vocabulary indices:
- `retrieval`: user + context -> top-K ad ids and scores (the `export.index` in the graph: brute
  force, or IVF partitions built here once for retrieval and recommender, trainer/ivf_index.py);
- `ranking`: user + context + ad (ids, categoricals, title, description) -> calibrated pCTR
  and pCVR (position tower dropped), with the ad text tokenized and encoded by BERT inside the
  graph (TF Text ops);
- `recommender`: one graph that retrieves candidates, drops the request's excluded ads, ranks
  the rest and returns the top k by the configured objective (pCTR, eCPM or CPA).

Each version is written to a hidden temporary directory and renamed into place only when
complete, so TF Serving never sees half a model. Every graph's ops are checked against
what TF Serving (2.20+) links: core TensorFlow plus a few TF Text ops.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the TF Text ops the ranking graph uses)
from tensorflow.core.protobuf import saved_model_pb2

from serving.contract import (
    EXCLUDED_AD_IDS,
    EXPLAINED_HISTORY,
    EXPLANATION_GROUPS,
    EXPLANATIONS,
    HISTORY,
    MODEL_NAMES,
    NEGATIVE_HISTORY,
    OUTPUTS,
    PAD_AD_ID,
    RANKING,
    RECOMMENDER,
    RETRIEVAL,
    SIGNATURE_KEY,
    signature_inputs,
)
from serving.versions import INT64_MAX, scan_versions
from trainer import serving_artifacts
from trainer.explain import groups_read, reference_input
from trainer.progress import Progress
from trainer.servables import ExportError, RankingServable, RecommenderServable, RetrievalServable, ivf_layout
from trainer.text_encoder import merge_lora
from trainer.trained import TrainedModels

METADATA_FILE = "adrec.json"

# TF Text ops linked into tensorflow/serving 2.20+ that keras-hub tokenizers/packers emit.
TF_TEXT_OPS = frozenset({
    "CaseFoldUTF8", "NormalizeUTF8", "RegexSplitWithOffsets", "FastWordpieceTokenizeWithOffsets",
    "RoundRobinTrim", "RoundRobinGenerateMasks",
})


@dataclass
class ExportResult:
    version: int
    paths: dict[str, Path]


def graph_ops(saved_model_dir: Path) -> set[str]:
    """Every op type in the SavedModel's graphs, functions included."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    ops = set()
    for meta in proto.meta_graphs:
        ops.update(node.op for node in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            ops.update(node.op for node in fn.node_def)
    return ops


def check_servable_ops(saved_model_dir: Path) -> None:
    """Fail with a clear message if the graph uses an op TF Serving does not link."""
    unknown = sorted(op for op in graph_ops(saved_model_dir)
                     if not hasattr(tf.raw_ops, op) and op not in TF_TEXT_OPS)
    if unknown:
        raise ExportError(
            f"{saved_model_dir}: ops {unknown} are neither core TensorFlow nor the TF Text ops "
            f"that tensorflow/serving>=2.20 links ({sorted(TF_TEXT_OPS)}); the model server "
            "would refuse this model")


def next_version(export_dir: Path) -> int:
    """One above the highest version of any model (names the server ignores, like `007`, count for nothing)."""
    versions = [v for name in MODEL_NAMES for v in scan_versions(Path(export_dir) / name)[0]]
    if max(versions, default=0) >= INT64_MAX:
        raise ExportError(f"{export_dir}: version {INT64_MAX} exists; no int64 version number is left above it")
    return max(versions, default=0) + 1


def _metadata(trained: TrainedModels, name: str, version: int, outputs: list[str], index: dict) -> dict:
    schema, ranking = trained.schema, trained.ranking
    history_length = trained.retrieval.query_tower.history_length
    widths = {HISTORY: history_length if name != RANKING else ranking.history_length,
              NEGATIVE_HISTORY: ranking.history_length}
    names = signature_inputs(name, tuple(schema.query_features), (*schema.ad_string_features, *schema.ad_text),
                             history=bool(history_length), user_inputs=ranking.user_inputs)
    inputs = {n: f"string [batch, {widths[n]}]" if n in widths else
              "int64" if schema.is_int_feature(n) else "string" for n in names}
    if name == RECOMMENDER:
        inputs[EXCLUDED_AD_IDS] = "string [batch, M], padded with ''"
    user_stats = {}
    if name != RETRIEVAL and ranking.user_stats is not None:
        user_stats = {"user_stats": {"recent_window": trained.config.ranking.recent_window,
                                     "meaning": "the user's events before the request, the clicks among them, and "
                                                "the clicks among the last recent_window of them (0s: a new user)"}}
    return {"model": name, "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "signature": SIGNATURE_KEY, "inputs": inputs, "outputs": outputs,
            "encoder": trained.config.encoder.preset, "catalog_size": int(len(trained.catalog)),
            **({"objective": trained.config.export.objective, "pad_ad_id": PAD_AD_ID} if name == RECOMMENDER
               else {}),
            **user_stats,
            **({"explanations": _explanations_metadata(trained)}
               if name != RETRIEVAL and trained.config.export.explanations else {}),
            **({"index": index} if name != RANKING else {}),
            # which inputs the model takes as pseudonyms and under which key (its id, never the key):
            # the embedded server returns this block, and the client hashes or refuses by it
            **({"privacy": schema.extra["privacy"]} if "privacy" in schema.extra else {}),
            # ids looked up by hash (`data.stream.hash_buckets`) in the graph: a raw id is hashed the same way
            **({"hash_buckets": dict(trained.vocabularies.hashed)} if trained.vocabularies.hashed else {}),
            "offline_metrics": trained.metrics.get(name if name != RECOMMENDER else RANKING)}


def _explanations_metadata(trained: TrainedModels) -> dict:
    ranking = trained.ranking
    return {"because": f"because_ad_ids / because_weights: the {EXPLAINED_HISTORY} history ads whose removal "
                       "lowers the ad's CTR logit most, and that drop ('' and 0: fewer history entries)",
            "history_explained": HISTORY in ranking.histories, "history_pool": trained.config.ranking.history_pool,
            "groups": list(EXPLANATION_GROUPS),
            "groups_read": [g for g in EXPLANATION_GROUPS if g in groups_read(ranking)],
            "group_contributions": "the CTR logit minus the logit with the group's inputs at their training "
                                   "average (0: a group the model does not read)"}


def _stage(module: tf.Module, target: Path, metadata: dict, extra=None) -> Path:
    """Write one servable to a hidden sibling of `target` and check it; returns the temp dir."""
    if target.exists():
        raise ExportError(f"{target} already exists; versions are never overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE_KEY: module.serve})
        check_servable_ops(tmp)
        (tmp / "assets.extra").mkdir(exist_ok=True)
        (tmp / "assets.extra" / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if extra is not None:
            extra(tmp)  # e.g. the warmup requests: staged with the version, published with it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def export_all(trained: TrainedModels, export_dir: str | Path, version: int | None = None) -> ExportResult:
    """Stage all three servables, then rename them into place: one job publishes all or none."""
    cfg = trained.config.export
    export_dir = Path(export_dir)
    # Served graphs run without XLA JIT: TF Serving builds without it by default.
    trained.retrieval.set_jit(False)
    trained.ranking.interact.jit = False
    merge_lora(trained.text.adapter.backbone)  # encoder.mode lora: the graphs carry merged weights
    version = version or next_version(export_dir)
    layout = ivf_layout(trained) if cfg.index == "ivf" else None  # one k-means for both servables
    index = {"kind": cfg.index}
    if layout is not None:
        index.update(layout.describe(), nprobe=min(cfg.nprobe, layout.n_partitions), storage=cfg.ivf_storage)
    # The baseline group contributions are measured against: the average training input.
    reference = reference_input(trained.ranking, trained.split.train, trained.schema) if cfg.explanations else None
    builders = {
        RETRIEVAL: lambda: RetrievalServable(trained, cfg.top_k, layout),
        RANKING: lambda: RankingServable(trained.ranking, trained.schema, trained.text, reference=reference,
                                         explanations=cfg.explanations),
        RECOMMENDER: lambda: RecommenderServable(trained, cfg.retrieve_n, cfg.recommend_k, cfg.objective, layout,
                                                 reference=reference, explanations=cfg.explanations),
    }
    rows = serving_artifacts.warmup_rows(trained.catalog, trained.schema, trained.vocabularies,
                                         trained.config.retrieval.history_length, trained.ranking.user_inputs)
    staged: dict[str, tuple[Path, Path]] = {}
    shown = Progress(f"exporting version {version}", total=len(builders), unit="SavedModels").start()
    try:
        for name, build in builders.items():
            shown.advance(0, note=name)
            target = export_dir / name / str(version)
            warmup = lambda tmp, name=name: serving_artifacts.write_warmup_requests(  # noqa: E731
                tmp, name, rows, trained.schema, trained.ranking.user_inputs)
            outputs = [o for o in OUTPUTS[name] if cfg.explanations or o not in EXPLANATIONS]
            metadata = _metadata(trained, name, version, outputs, index)
            staged[name] = (_stage(build(), target, metadata, warmup), target)
            shown.advance()
        serving_artifacts.write_server_configs(export_dir, MODEL_NAMES)
        for tmp, target in staged.values():
            os.replace(tmp, target)
    finally:
        shown.close()
        for tmp, _ in staged.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(version=version, paths={n: target for n, (_, target) in staged.items()})
