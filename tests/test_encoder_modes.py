"""Encoder modes beyond frozen/full: top-N trainable layers, masked-LM adaptation, keras-hub preset dirs."""

import re

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import fewer_impressions, tiny_config
from trainer.config import ConfigError, MaskedLMConfig, config_from_dict


def _world_and_text(cfg, **kwargs):
    from features import generate_world
    from trainer.builders import build_text_assets

    world = generate_world(cfg.data.synthetic)
    return world, build_text_assets(cfg, world.catalog, world.schema, **kwargs)


@pytest.mark.parametrize("encoder, message", [
    ({"mode": "partial"}, "encoder.mode: expected one of ['frozen', 'top_layers', 'lora', 'full'], got 'partial'"),
    ({"trainable_layers": 0}, "encoder.trainable_layers: expected an integer >= 1"),
    ({"lora_rank": 0}, "encoder.lora_rank: expected an integer >= 1"),
    ({"masked_lm": {"mask_rate": 1.5}}, "encoder.masked_lm.mask_rate: expected a fraction in (0, 1)"),
    ({"masked_lm": {"epochs": -1}}, "encoder.masked_lm.epochs: expected an integer >= 0"),
])
def test_bad_encoder_settings_are_refused(encoder, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"encoder": encoder}, "job.yaml")


def test_top_layers_mode_trains_only_the_last_layers(tmp_path):
    from trainer.builders import build_retrieval, build_text_assets
    from trainer.inputs import retrieval_dataset
    from trainer.prepare import prepare_data, sampling_counts
    from trainer.text_encoder import load_backbone

    cfg = tiny_config(tmp_path, encoder={"mode": "top_layers", "trainable_layers": 1}, retrieval={"epochs": 1})
    data = prepare_data(cfg)
    catalog, schema, split, vocabularies = data.catalog, data.schema, data.split, data.vocabularies
    text = build_text_assets(cfg, catalog, schema)
    backbone = text.adapter.backbone
    trained_names = {v.path for v in backbone.trainable_variables}
    assert trained_names and all(p.startswith("transformer_layer_1/") for p in trained_names), trained_names
    assert len(text.adapter.trainable_weights) == len(trained_names)

    model = build_retrieval(cfg, tf.distribute.get_strategy(), schema, vocabularies, catalog, text, None,
                            sampling_counts(split.train, schema))
    model.fit(retrieval_dataset(split.train, cfg, schema)[0], epochs=1, verbose=0)

    initial = load_backbone(cfg.encoder, text.tokenizer.vocabulary_size(), seed=cfg.training.seed)
    before = {v.path: v.numpy() for v in initial.variables}
    moved = {v.path for v in backbone.variables if not np.allclose(before[v.path], v.numpy())}
    assert moved and all(p.startswith("transformer_layer_1/") for p in moved), sorted(moved)
    assert not any(p.startswith(("transformer_layer_0/", "token_embedding/")) for p in moved)


def test_top_layers_beyond_the_encoder_depth_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path, encoder={"mode": "top_layers", "trainable_layers": 5})
    with pytest.raises(ValueError, match="trainable_layers is 5, but the encoder has 2 transformer layers"):
        _world_and_text(cfg)


def test_masked_lm_adapts_the_encoder_and_saves_a_reusable_preset(tmp_path):
    from trainer.builders import MASKED_LM_DIR, build_text_assets
    from trainer.text_encoder import encode_packed

    cfg = tiny_config(tmp_path, encoder={"masked_lm": MaskedLMConfig(epochs=4, learning_rate=2e-3)})
    world, text = _world_and_text(cfg, model_dir=tmp_path / "run")
    report = text.masked_lm
    assert report.train_texts + report.holdout_texts == len(set(world.schema.ad_text_of(world.catalog)))
    # Held-out ads' texts, the same masked positions before and after (the head fitted first on
    # the fixed encoder): the encoder itself learned the ad language.
    assert report.holdout_loss_after < 0.92 * report.holdout_loss_before, report
    assert report.holdout_accuracy_after >= report.holdout_accuracy_before, report
    assert report.train_loss[-1] < report.train_loss[0]

    saved = tmp_path / "run" / MASKED_LM_DIR
    assert (saved / "config.json").is_file() and (saved / "assets" / "tokenizer" / "vocabulary.txt").is_file()
    sample = {k: v[:32] for k, v in text.packed_catalog.items()}
    adapted = encode_packed(text.adapter, sample)

    # A second build (restart, `adrec evaluate`) reuses the saved weights instead of training again.
    again = build_text_assets(cfg, world.catalog, world.schema, model_dir=tmp_path / "run")
    np.testing.assert_allclose(encode_packed(again.adapter, sample), adapted, rtol=1e-5, atol=1e-5)

    # The directory is a keras-hub preset: `encoder.preset: <dir>` loads the same tokenizer and encoder.
    from_dir = tiny_config(tmp_path, encoder={"preset": str(saved)})
    _, text_from_dir = _world_and_text(from_dir)
    assert text_from_dir.tokenizer.get_vocabulary() == text.tokenizer.get_vocabulary()
    np.testing.assert_array_equal(text_from_dir.packed_catalog["token_ids"], text.packed_catalog["token_ids"])
    np.testing.assert_allclose(encode_packed(text_from_dir.adapter, sample), adapted, rtol=1e-5, atol=1e-5)


def test_masked_lm_reads_only_the_training_ads(tmp_path):
    cfg = tiny_config(tmp_path, encoder={"masked_lm": MaskedLMConfig(epochs=1, head_epochs=0)})
    from features import generate_world

    world = generate_world(cfg.data.synthetic)
    seen = set(world.catalog[world.schema.ad_id][:50])
    from trainer.builders import build_text_assets

    text = build_text_assets(cfg, world.catalog, world.schema, corpus_ad_ids=seen)
    distinct = len(set(world.schema.ad_text_of(world.catalog[world.catalog[world.schema.ad_id].isin(seen)])))
    assert text.masked_lm.train_texts + text.masked_lm.holdout_texts == distinct


def test_a_trainable_encoder_runs_once_per_distinct_ad_with_the_per_row_outputs_and_gradients():
    from features.text import TINY
    from trainer.config import EncoderConfig
    from trainer.text_encoder import BertEncoderAdapter, load_backbone
    from trainer.towers import CatalogText

    adapter = BertEncoderAdapter(load_backbone(EncoderConfig(preset=TINY, sequence_length=8), 50), fine_tune=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (5, 8)).astype(np.int32)
    mask = np.arange(8)[None, :] < rng.integers(2, 9, (5, 1))
    layer = CatalogText([f"ad{i}" for i in range(5)], packed_tokens={"token_ids": ids, "padding_mask": mask},
                        encoder=adapter)
    batch = tf.constant(["ad3", "ad1", "ad3", "unknown", "ad3", "ad0", "ad1"])
    seen, call = [], adapter.call
    adapter.call = lambda token_ids, padding_mask: (seen.append(int(token_ids.shape[0])),
                                                    call(token_ids, padding_mask))[1]
    weights = tf.constant(rng.normal(size=(7, adapter.output_dim)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        once = layer(batch)
        rows = layer.lookup(batch)
        per_row = adapter(tf.gather(layer.token_ids, rows), tf.gather(layer.padding_mask, rows))
        per_row = per_row * tf.cast(rows > 0, per_row.dtype)[:, None]
        losses = tf.reduce_sum(once * weights), tf.reduce_sum(per_row * weights)
    assert seen == [4, 7]  # ad3, ad1, the unknown row, ad0; then the per-row pass
    np.testing.assert_allclose(once.numpy(), per_row.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.any(once.numpy()[3])  # the unknown ad's text is a zero vector
    grads = [tape.gradient(loss, adapter.trainable_weights) for loss in losses]
    assert len(grads[0]) == len(adapter.trainable_weights) > 0
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode, encoder_rate", [("full", 1e-4), ("lora", 1e-4), ("full", 0.0)])
def test_the_encoder_steps_at_its_own_learning_rate_and_the_towers_at_theirs(tmp_path, mode, encoder_rate):
    """Adam's first step moves each weight with a gradient well above its epsilon by its learning rate:
    after one real training step the largest move among the encoder's weights is its rate, among the
    towers' the retrieval rate (100x apart). Rate 0: one optimizer, the encoder at the towers' rate."""
    from trainer.builders import build_retrieval, build_text_assets
    from trainer.fit import build_model
    from trainer.inputs import retrieval_dataset
    from trainer.prepare import prepare_data, sampling_counts

    towers_rate = 1e-2
    cfg = tiny_config(tmp_path, encoder={"mode": mode, "fine_tune_learning_rate": encoder_rate},
                      retrieval={"learning_rate": towers_rate}, data=fewer_impressions(2000))
    data = prepare_data(cfg)
    catalog, schema, split = data.catalog, data.schema, data.split
    text = build_text_assets(cfg, catalog, schema)
    strategy = tf.distribute.get_strategy()
    model = build_retrieval(cfg, strategy, schema, data.vocabularies, catalog, text, None,
                            sampling_counts(split.train, schema))
    assert (model.encoder_optimizer is None) == (encoder_rate == 0)
    batches = retrieval_dataset(split.train, cfg, schema)[0].take(1)
    build_model(model, next(iter(batches)), strategy)
    variables = model.trainable_variables
    encoder = {v.ref() for v in text.adapter.trainable_weights}
    assert encoder and len(encoder) < len(variables)
    before = [v.numpy() for v in variables]
    model.fit(batches, epochs=1, verbose=0)

    def largest_move(in_encoder: bool) -> float:
        return max(float(np.max(np.abs(v.numpy() - b))) for v, b in zip(variables, before, strict=True)
                   if (v.ref() in encoder) == in_encoder)

    expected = encoder_rate or towers_rate
    assert expected * 0.9 < largest_move(True) <= expected * 1.001
    assert towers_rate * 0.9 < largest_move(False) <= towers_rate * 1.001
    assert int(model.optimizer.iterations.numpy()) == 1
    if encoder_rate:
        assert int(model.encoder_optimizer.iterations.numpy()) == 1
        # Its state travels with the model, as the compiled optimizer's does (BackupAndRestore saves the model).
        path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
        saved = [name for name, _ in tf.train.list_variables(path)]
        slots = [n for n in saved if n.startswith("model/encoder_optimizer/_variables/")]
        assert len(slots) == 2 * len(encoder)  # Adam's two moments per encoder weight


def test_an_encoder_learning_rate_must_not_be_negative():
    with pytest.raises(ConfigError, match=re.escape("encoder.fine_tune_learning_rate")):
        config_from_dict({"encoder": {"fine_tune_learning_rate": -1e-5}}, "job.yaml")
