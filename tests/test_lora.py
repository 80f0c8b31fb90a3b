"""encoder.mode lora: low-rank adapters on BERT's attention train, the pretrained weights stay, and the
exported graphs carry the merged weights (plain projections, nothing new for TF Serving)."""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import tiny_config


def _is_adapter(path: str) -> bool:
    layer, weight = path.rsplit("/", 2)[-2:]
    return layer in ("query", "value") and weight in ("lora_kernel_a", "lora_kernel_b", "bias")


def test_lora_trains_only_the_adapters_and_the_export_carries_merged_weights(tmp_path):
    import tensorflow_text  # noqa: F401

    from trainer.evaluate import predict_ctr
    from trainer.export import export_all
    from trainer.job import run_training
    from trainer.serving_artifacts import as_numpy_features
    from trainer.text_encoder import load_backbone

    cfg = tiny_config(tmp_path / "job", encoder={"mode": "lora", "lora_rank": 2},
                      retrieval={"epochs": 1}, ranking={"epochs": 1})
    trained = run_training(cfg, progress=False)
    backbone = trained.text.adapter.backbone
    trainable = list(backbone.trainable_variables)
    assert trainable and all(_is_adapter(v.path) for v in trainable), [v.path for v in trainable]
    assert len(trained.text.adapter.trainable_weights) == len(trainable)
    adapter_params = sum(int(np.prod(v.shape)) for v in trainable)
    assert adapter_params < 0.02 * sum(int(np.prod(v.shape)) for v in backbone.variables)

    initial = load_backbone(cfg.encoder, trained.text.tokenizer.vocabulary_size(), seed=cfg.training.seed)
    before = {v.path: v.numpy() for v in initial.variables}
    moved = {v.path for v in backbone.variables if v.path in before and not np.allclose(before[v.path], v.numpy())}
    assert all(p.endswith("/bias") for p in moved), sorted(moved)  # no pretrained kernel or embedding moved
    assert any(np.abs(v.numpy()).max() > 0 for v in trainable if v.path.endswith("lora_kernel_b"))  # B left zero

    schema = trained.schema
    rows = trained.split.test.head(6).merge(trained.catalog[[schema.ad_id, *schema.ad_text]], on=schema.ad_id)
    expected = predict_ctr(trained.ranking, rows, schema)  # BERT with its adapters switched on
    export = export_all(trained, tmp_path / "models")
    assert not any(getattr(layer, "lora_enabled", False) for layer in backbone._flatten_layers())
    np.testing.assert_allclose(predict_ctr(trained.ranking, rows, schema), expected, rtol=1e-4, atol=1e-6)

    feats = as_numpy_features(rows, (*schema.query_features, *schema.ad_string_features, *schema.ad_text), schema)
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as sess:  # as TF Serving loads it
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(export.paths["ranking"]))
        sig = meta.signature_def["serving_default"]
        out = sess.run(sig.outputs["pctr"].name, {sig.inputs[k].name: v for k, v in feats.items()})
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)


def test_lora_rank_beyond_the_hidden_size_is_a_clear_error(tmp_path):
    from features import generate_world
    from trainer.builders import build_text_assets

    cfg = tiny_config(tmp_path, encoder={"mode": "lora", "lora_rank": 65})
    world = generate_world(cfg.data.synthetic)
    with pytest.raises(ValueError, match="encoder.lora_rank is 65, but the encoder's hidden size is 64"):
        build_text_assets(cfg, world.catalog, world.schema)
