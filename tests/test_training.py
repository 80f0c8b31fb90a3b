import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT, tiny_config
from trainer.config import ConfigError, config_from_dict, load_config


def _backbone_values(adapter):
    return [np.array(v.numpy()) for v in adapter.backbone.trainable_variables]


def test_fine_tuning_updates_bert_through_the_adapter(tmp_path):
    from features import generate_world, time_split
    from features.vocab import build_vocabularies
    from trainer.builders import build_retrieval, build_text_assets
    from trainer.inputs import retrieval_dataset
    from trainer.prepare import join_ad_features

    cfg = tiny_config(tmp_path, encoder={"mode": "full"}, retrieval={"epochs": 1})
    from features.history import add_history

    world = generate_world(cfg.data.synthetic)
    split = time_split(add_history(world.logs, cfg.retrieval.history_length), 0.2)
    vocab = build_vocabularies(split.train, world.catalog)
    text = build_text_assets(cfg, world.catalog, world.schema)
    trainable = {id(w) for w in text.adapter.trainable_weights}
    assert len(trainable) == len(text.adapter.backbone.trainable_variables) > 0
    before = _backbone_values(text.adapter)
    train_rows = join_ad_features(split.train, world.catalog, world.schema)
    model = build_retrieval(cfg, tf.distribute.get_strategy(), world.schema, vocab, world.catalog, text, None)
    history = model.fit(retrieval_dataset(train_rows, cfg, world.schema)[0], epochs=1, verbose=0).history
    # The pooled [CLS] projection is unused by mean pooling and stays frozen.
    pooled = {id(v.value) for v in text.adapter.backbone.get_layer("pooled_dense").variables}
    changed = [not np.allclose(b, a.numpy()) for b, a, v in zip(
        before, text.adapter.backbone.trainable_variables, text.adapter.backbone.trainable_variables, strict=True)
        if id(v.value) not in pooled]
    assert sum(changed) >= 0.9 * len(changed), f"only {sum(changed)}/{len(changed)} BERT weights moved"
    assert np.isfinite(history["loss"]).all()
    # The retrieval model's trainable weights include every BERT weight.
    model_weights = {id(w) for w in model.trainable_weights}
    assert trainable <= model_weights


def test_frozen_mode_leaves_bert_untouched(trained_tiny):
    adapter = trained_tiny.text.adapter
    assert adapter.trainable_weights == []
    assert len(adapter.non_trainable_weights) == len(adapter.backbone.variables)
    # The cached embeddings are exactly what the (unchanged) encoder computes now.
    from trainer.text_encoder import encode_packed
    again = encode_packed(adapter, {k: v[:16] for k, v in trained_tiny.text.packed_catalog.items()})
    np.testing.assert_allclose(again, trained_tiny.catalog_text_embeddings[:16], rtol=1e-5, atol=1e-5)


def test_tiny_job_learns_and_beats_popularity(trained_tiny):
    r = trained_tiny.metrics["retrieval"]
    assert r["model"]["recall@100"] > r["most_popular"]["recall@100"]
    assert trained_tiny.metrics["ranking"]["auc"] > 0.55
    run = ROOT / trained_tiny.config.training.model_dir
    assert (run / "metrics.json").exists() and (run / "checkpoints" / "checkpoint").exists()
    assert json.loads((run / "metrics.json").read_text())["retrieval"] == json.loads(json.dumps(r))


MIRRORED_SCRIPT = r"""
import json, os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from tests.conftest import tiny_config
from pathlib import Path
from trainer.strategy import make_strategy
from trainer.job import run_training
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
cfg = tiny_config(Path(sys.argv[2]), encoder={"mode": "full"}, retrieval={"epochs": 1},
                  ranking={"epochs": 1})
trained = run_training(cfg, strategy, progress=False)
var = trained.text.adapter.backbone.trainable_variables[0].value
replicas = [v.numpy() for v in var.values]
user = trained.retrieval.query_tower.embeddings.tables["user_id"].embedding.embeddings
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "mirrored": type(var).__name__,
    "bert_replicas_equal": all(bool((r == replicas[0]).all()) for r in replicas),
    "user_replicas_equal": all(bool((v.numpy() == user.values[0].numpy()).all()) for v in user.values),
    "recall100": trained.metrics["retrieval"]["model"]["recall@100"],
    "loss": trained.history["retrieval"]["loss"],
}))
"""


def test_mirrored_strategy_over_two_logical_cpus(tmp_path):
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(ROOT), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["mirrored"] == "MirroredVariable"
    assert result["bert_replicas_equal"] and result["user_replicas_equal"]
    assert all(np.isfinite(result["loss"]))


def test_config_errors_are_named_and_precise(tmp_path):
    with pytest.raises(ConfigError, match=r"retrieval: unknown key\(s\) \['epochz'\]"):
        config_from_dict({"retrieval": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"ranking.epochs: expected int, got 'three'"):
        config_from_dict({"ranking": {"epochs": "three"}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrieval: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    cfg = config_from_dict({"ranking": {"deep_units": [32, 16]}, "retrieval": {"temperature": 1}})
    assert cfg.ranking.deep_units == (32, 16) and cfg.retrieval.temperature == 1.0


def test_shipped_configs_load():
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)


def test_cli_reports_user_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", "--config", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("adrec train: error: ")
    assert "Traceback" not in proc.stderr


def test_tensorboard_logs_losses_metrics_and_learning_rate(trained_tiny):
    from trainer.report import read_history

    cfg = trained_tiny.config
    history = read_history(Path(cfg.training.model_dir))
    # the served ranking model trains for the epochs its early-stopping probe chose
    epochs = {"retrieval": cfg.retrieval.epochs, "ranking": trained_tiny.metrics["ranking"]["validation"]["epochs"]}
    for stage, section, metric in (("retrieval", cfg.retrieval, "factorized_top_k/top_100_categorical_accuracy"),
                                   ("ranking", cfg.ranking, "auc")):
        tags = history[stage]
        assert len(tags["loss"]) == epochs[stage] and metric in tags
        np.testing.assert_allclose(tags["learning_rate"], [section.learning_rate] * epochs[stage], rtol=1e-6)
