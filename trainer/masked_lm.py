"""Continued masked-LM pre-training of the BERT encoder on the ad text corpus (keras-hub BertMaskedLM).

A general-purpose encoder has not seen ad copy ("free shipping", brand names, product jargon).
A few epochs of masked-LM on the catalog's own texts adapt it before the two-tower training,
which matters most when the encoder stays frozen. The run is measured: masked-token accuracy on
the texts of held-out ads (the same masked batches) before and after.

Sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship no masked-LM head, so the head
starts random. It is fitted first with the encoder held fixed (`head_epochs`): the "before"
accuracy is then the stock encoder's, and the encoder is not pushed around by a random head's
gradients when its own training starts.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from trainer.config import MaskedLMConfig
from trainer.progress import fit_verbosity, log

DONE_FILE = "masked_lm.json"  # written last: the directory holds a finished run


@dataclass
class MaskedLMReport:
    train_texts: int
    holdout_texts: int
    epochs: int
    seconds: float
    holdout_accuracy_before: float
    holdout_accuracy_after: float
    holdout_loss_before: float
    holdout_loss_after: float
    train_loss: list[float]


def _preprocessor(tokenizer, sequence_length: int, cfg: MaskedLMConfig):
    return keras_hub.models.BertMaskedLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length, mask_selection_rate=cfg.mask_rate,
        mask_selection_length=max(1, math.ceil(sequence_length * cfg.mask_rate) + 1))


def continue_pretraining(backbone, tokenizer, texts: list[str], sequence_length: int, cfg: MaskedLMConfig,
                         seed: int = 0, progress: bool = True) -> MaskedLMReport:
    """Train `backbone` (in place) as a masked LM on `texts`; the head is discarded afterwards."""
    texts = sorted(set(t for t in texts if t.strip()))
    if len(texts) < 2:
        raise ValueError(f"masked-LM pre-training needs at least 2 distinct ad texts, got {len(texts)}")
    order = np.random.default_rng(seed).permutation(len(texts))
    n_holdout = max(1, int(round(len(texts) * cfg.holdout_fraction)))
    holdout = [texts[i] for i in order[:n_holdout]]
    train = [texts[i] for i in order[n_holdout:]]

    keras.utils.set_random_seed(seed)
    preprocessor = _preprocessor(tokenizer, sequence_length, cfg)
    # The held-out batches are masked once, so "before" and "after" score the same positions.
    holdout_batches = [preprocessor(tf.constant(holdout[i:i + cfg.batch_size]))
                       for i in range(0, len(holdout), cfg.batch_size)]
    train_ds = (tf.data.Dataset.from_tensor_slices(train)
                .shuffle(len(train), seed=seed, reshuffle_each_iteration=True)
                .batch(cfg.batch_size)
                .map(preprocessor, num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))

    masked_lm = keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)

    def compile_with(learning_rate: float) -> None:
        masked_lm.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])

    def score() -> tuple[float, float]:
        total = {"loss": 0.0, "accuracy": 0.0, "weight": 0.0}
        for x, y, w in holdout_batches:
            result = masked_lm.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)
            weight = float(tf.reduce_sum(w))
            total["loss"] += result["loss"] * weight
            total["accuracy"] += result["accuracy"] * weight
            total["weight"] += weight
        return total["loss"] / total["weight"], total["accuracy"] / total["weight"]

    t0 = time.time()
    trainable = {layer.name: layer.trainable for layer in backbone.layers}
    if cfg.head_epochs > 0:
        backbone.trainable = False
        # The head's own 1e-3 rate: it starts from scratch, unlike the encoder.
        compile_with(max(cfg.learning_rate, 1e-3))
        masked_lm.fit(train_ds, epochs=cfg.head_epochs, shuffle=False, verbose=fit_verbosity(progress))
        backbone.trainable = True
        for layer in backbone.layers:  # back to the caller's choice (e.g. pooled_dense stays frozen)
            layer.trainable = trainable[layer.name]
    compile_with(cfg.learning_rate)
    loss_before, accuracy_before = score()
    log(f"masked-LM pre-training on {len(train)} ad texts ({len(holdout)} held out), {cfg.epochs} epochs; "
        f"held-out masked-token accuracy before: {accuracy_before:.3f}")
    history = masked_lm.fit(train_ds, epochs=cfg.epochs, shuffle=False, verbose=fit_verbosity(progress))
    seconds = time.time() - t0
    loss_after, accuracy_after = score()
    log(f"masked-LM pre-training done in {seconds:.1f}s; held-out masked-token accuracy "
        f"{accuracy_before:.3f} -> {accuracy_after:.3f}, loss {loss_before:.3f} -> {loss_after:.3f}")
    return MaskedLMReport(train_texts=len(train), holdout_texts=len(holdout), epochs=cfg.epochs,
                          seconds=round(seconds, 1), holdout_accuracy_before=accuracy_before,
                          holdout_accuracy_after=accuracy_after, holdout_loss_before=loss_before,
                          holdout_loss_after=loss_after,
                          train_loss=[float(v) for v in history.history["loss"]])


def save_encoder(backbone, tokenizer, report: MaskedLMReport, directory: Path) -> None:
    """Save the adapted encoder as a keras-hub preset directory (usable as `encoder.preset`)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    backbone.save_to_preset(str(tmp))
    tokenizer.save_to_preset(str(tmp))
    (tmp / DONE_FILE).write_text(json.dumps(asdict(report), indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_saved_report(directory: Path) -> MaskedLMReport | None:
    """The report of a finished run saved in `directory`, or None when there is none."""
    done = Path(directory) / DONE_FILE
    if not done.is_file():
        return None
    return MaskedLMReport(**json.loads(done.read_text()))
