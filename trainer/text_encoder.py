"""The BERT text encoder: a keras-hub (Keras 3) backbone inside tf_keras models.

tf_keras does not see Keras 3 variables on its own, so `BertEncoderAdapter` reports the
backbone's variables itself; without that, fit() would silently leave BERT untrained.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from features.text import TINY, EncoderNotFoundError, resolve_preset
from trainer.config import EncoderConfig
from trainer.progress import Progress


def load_backbone(cfg: EncoderConfig, vocabulary_size: int | None = None, seed: int = 0):
    """A keras-hub BertBackbone: pretrained from a preset/directory, or tiny and random."""
    if cfg.preset == TINY:
        if vocabulary_size is None:
            raise ValueError("a tiny backbone needs the tokenizer's vocabulary size")
        import keras

        keras.utils.set_random_seed(seed)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=vocabulary_size, num_layers=cfg.tiny_layers, num_heads=cfg.tiny_heads,
            hidden_dim=cfg.tiny_hidden, intermediate_dim=cfg.tiny_intermediate,
            max_sequence_length=max(cfg.sequence_length, 16), dropout=0.0)
    else:
        try:
            backbone = keras_hub.models.BertBackbone.from_preset(resolve_preset(cfg.preset))
        except (ValueError, FileNotFoundError) as err:
            raise EncoderNotFoundError(f"cannot load text encoder {cfg.preset!r}: {err}") from err
    # Mean pooling never reads the pooled [CLS] projection; keep it out of training.
    backbone.get_layer("pooled_dense").trainable = False
    return backbone


def train_top_layers(backbone, n: int) -> None:
    """Freeze the embeddings and all but the last `n` transformer layers (encoder.mode top_layers)."""
    if not 1 <= n <= backbone.num_layers:
        raise ValueError(f"encoder.trainable_layers is {n}, but the encoder has {backbone.num_layers} "
                         "transformer layers")
    first_trained = backbone.num_layers - n
    for layer in backbone.layers:
        if layer.name.startswith("transformer_layer_"):
            layer.trainable = int(layer.name.rsplit("_", 1)[1]) >= first_trained
        elif layer.name != "pooled_dense" and layer.weights:
            layer.trainable = False  # token/position/segment embeddings and their layer norm


def enable_lora(backbone, rank: int) -> None:
    """Low-rank adapters (Hu et al. 2021) on the query and value projections of every attention layer
    (encoder.mode lora): each kernel W serves as W + (alpha / rank) A B, A and B train (B starts at
    zero, so training starts from the pretrained encoder), every other weight stays frozen apart from
    those projections' biases. keras-hub's `enable_lora` does the wiring."""
    if not 1 <= rank <= backbone.hidden_dim:
        raise ValueError(f"encoder.lora_rank is {rank}, but the encoder's hidden size is {backbone.hidden_dim}: "
                         "the rank must be between 1 and that")
    backbone.enable_lora(rank)


def merge_lora(backbone) -> int:
    """Fold each adapter into its kernel (W <- W + (alpha / rank) A B), zero B and switch the adapter
    off, so a graph traced afterwards computes plain projections with the merged weights: TF Serving
    needs nothing new, and the outputs are unchanged. Returns how many projections were merged."""
    merged = 0
    for layer in backbone._flatten_layers(include_self=False):  # the attention's nested EinsumDense layers
        if getattr(layer, "lora_enabled", False):
            layer._kernel.assign(layer.kernel)  # the `kernel` property adds the scaled A B
            layer.lora_kernel_b.assign(tf.zeros_like(layer.lora_kernel_b))
            layer.lora_enabled = False
            merged += 1
    return merged


class BertEncoderAdapter(tf.keras.layers.Layer):
    """tf_keras layer: (token_ids, padding_mask) -> mean-pooled sequence output."""

    def __init__(self, backbone, fine_tune: bool, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.fine_tune = fine_tune
        self.output_dim = backbone.hidden_dim

    def get_config(self) -> dict:
        """`fine_tune`, and the backbone's own (Keras 3) config for reference: tf_keras cannot rebuild a
        Keras 3 model, and its weights are saved through this adapter's variables, so `from_config`
        cannot rebuild the adapter (`trainer.text_encoder.load_backbone` builds the backbone)."""
        return {**super().get_config(), "fine_tune": bool(self.fine_tune), "output_dim": int(self.output_dim),
                "backbone": {"class_name": type(self.backbone).__name__, "config": self.backbone.get_config()}}

    @property
    def trainable_weights(self):
        if not (self.trainable and self.fine_tune):
            return []
        return [v.value for v in self.backbone.trainable_variables]

    @property
    def non_trainable_weights(self):
        if self.trainable and self.fine_tune:
            return [v.value for v in self.backbone.non_trainable_variables]
        return [v.value for v in self.backbone.variables]

    def call(self, token_ids, padding_mask):
        sequence = self.backbone({
            "token_ids": token_ids,
            "segment_ids": tf.zeros_like(token_ids),
            "padding_mask": padding_mask,
        })["sequence_output"]
        mask = tf.cast(padding_mask, sequence.dtype)[:, :, None]
        summed = tf.reduce_sum(sequence * mask, axis=1)
        return summed / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


def encode_packed(adapter: BertEncoderAdapter, packed: dict[str, np.ndarray],
                  batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Embed pre-tokenized texts in batches (the frozen-encoder cache)."""
    n = len(packed["token_ids"])
    out = np.zeros((n, adapter.output_dim), dtype=np.float32)

    @tf.function(reduce_retracing=True)
    def step(ids, mask):
        return adapter(ids, mask)

    with Progress("encoding ad texts", total=n, unit="texts", enabled=progress) as shown:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            out[start:stop] = step(tf.constant(packed["token_ids"][start:stop]),
                                   tf.constant(packed["padding_mask"][start:stop])).numpy()
            shown.advance(stop - start)
    return out


def encode_cached(adapter: BertEncoderAdapter, packed: dict[str, np.ndarray], cache_dir: str | Path | None,
                  progress: bool = False) -> np.ndarray:
    """`encode_packed`, reusing an earlier result from `cache_dir` when the encoder's weights, its compute
    dtype and the packed texts are byte-for-byte the same (the key is their SHA-256)."""
    if not cache_dir:
        return encode_packed(adapter, packed, progress=progress)
    digest = hashlib.sha256(keras.mixed_precision.global_policy().name.encode())
    for variable in adapter.backbone.weights:  # not the dropout RNG states, which differ per load
        if "seed_generator" not in variable.path:
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    for name in ("token_ids", "padding_mask"):
        digest.update(np.ascontiguousarray(packed[name]).tobytes())
    path = Path(cache_dir) / f"text-embeddings-{digest.hexdigest()[:32]}.npy"
    if path.is_file():
        return np.load(path)
    out = encode_packed(adapter, packed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return out
