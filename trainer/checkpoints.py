"""The job's final checkpoint: what it holds, how the chief writes it, how a warm start reads it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from features.vocab import Vocabularies
from trainer.config import config_to_dict
from trainer.forget import is_tombstone
from trainer.prepare import DataError
from trainer.privacy import write_privacy_file
from trainer.ranking import RankingModel
from trainer.retrieval import RetrievalModel
from trainer.strategy import is_chief
from trainer.towers import CategoricalEmbedding
from trainer.trained import TrainedModels


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
    write_privacy_file(model_dir, trained.schema)
    return Path(path)


def load_warm_start(warm_dir: Path) -> tuple[Vocabularies, str]:
    vocab_file = warm_dir / "vocabularies.json"
    latest = tf.train.latest_checkpoint(str(warm_dir / "checkpoints"))
    if not vocab_file.exists() or latest is None:
        raise DataError(f"--warm-start {warm_dir}: no finished job there (need vocabularies.json and "
                        "checkpoints/)")
    return Vocabularies.from_dict(json.loads(vocab_file.read_text())), latest


def restore_parts(checkpoint_path: str | None, retrieval: RetrievalModel | None = None,
                  ranking: RankingModel | None = None) -> None:
    """Warm start: fill the given (built) models' trained parts from a job's final checkpoint; the rows
    of forgotten users (tombstones in the kept vocabularies) then hold nothing learned from them."""
    if checkpoint_path is None:
        return
    training_checkpoint(retrieval, ranking).read(checkpoint_path).expect_partial().assert_existing_objects_matched()
    for model in (retrieval, ranking):
        if model is not None:
            reset_forgotten_rows(model)


def reset_forgotten_rows(model: tf.Module) -> int:
    """Set every embedding row whose vocabulary entry is a tombstone (`trainer.forget`) to the table's OOV
    row: what the table learned from the forgotten user is gone, and a request that looks the tombstone up
    gets exactly what an unknown value gets. Returns the rows reset. Called after a warm start's restore,
    so no checkpoint of the new run holds the old rows, and before the job's final checkpoint, so the
    exported rows equal the OOV row as it was trained."""
    reset = 0
    for layer in model.submodules:
        if not isinstance(layer, CategoricalEmbedding) or not isinstance(layer.lookup, tf.keras.layers.StringLookup):
            continue
        rows = [i for i, v in enumerate(layer.lookup.get_vocabulary()) if i > 0 and is_tombstone(v)]
        if not rows:
            continue
        table = layer.embedding.embeddings
        values = table.numpy()
        values[rows] = values[0]
        table.assign(values)
        reset += len(rows)
    return reset
