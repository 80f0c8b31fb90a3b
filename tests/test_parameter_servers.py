"""Parameter-server training (training.strategy: parameter_server): a chief, 2 workers and 2 ps tasks on
127.0.0.1 (tests/ps_cluster.py, in a process of its own) train with the embedding tables split across the
ps tasks; the export is ordinary SavedModels that the TF1 loader restores and that answer as the trained
models do."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from tests.conftest import ROOT, tiny_config
from trainer.config import ConfigError, config_to_dict, load_config


def _run_cluster_job(tmp_path: Path) -> tuple[dict, dict]:
    cfg = config_to_dict(tiny_config(
        tmp_path, retrieval={"epochs": 2}, ranking={"epochs": 3, "validation_fraction": 0},
        training={"ps_min_shard_bytes": 4096}, export={"explanations": False},
        evaluation={"baselines": ("most_popular",)}))
    config = tmp_path / "ps.yaml"
    config.write_text(yaml.safe_dump(cfg))
    metrics_file = tmp_path / "metrics.json"
    done = subprocess.run([sys.executable, "-m", "tests.ps_cluster", "--config", str(config), "--quiet",
                           "--metrics-out", str(metrics_file)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=os.environ.copy())  # the job: ~95 s at load 10 on 2 cores
    assert done.returncode == 0, done.stderr[-4000:]
    assert "exported version 1" in done.stderr
    assert "WARNING" not in done.stderr, done.stderr[-4000:]
    assert "2 worker(s) and 2 ps task(s)" in done.stderr
    return cfg, json.loads(metrics_file.read_text())


def test_parameter_servers_train_sharded_tables_and_export_ordinary_savedmodels(tmp_path):
    import tensorflow_text  # noqa: F401

    from serving.client import RecommendationClient
    from serving.process import ServerProcess
    from trainer.builders import build_ranking
    from trainer.evaluate import ad_embeddings, predict_ctr, query_embeddings
    from trainer.fit import build_model
    from trainer.inputs import query_inputs, ranking_dataset
    from trainer.report import load_job
    from trainer.serving_artifacts import as_numpy_features

    cfg, metrics = _run_cluster_job(tmp_path)
    ps = metrics["parameter_servers"]
    tables = ps["sharded_variables"]
    user_table = [shards for name, shards in tables.items()
                  if name.startswith("query_tower/") and "emb_user_id" in name]  # the retrieval model's
    assert len(user_table) == 1, sorted(tables)
    shards = user_table[0]
    assert len(shards) == 2
    assert sorted(s["device"] for s in shards) == ["/job:ps/replica:0/task:0/device:CPU:0",
                                                   "/job:ps/replica:0/task:1/device:CPU:0"]
    assert any("emb_ad_id" in name for name in tables)
    # the chief's local copies answer as the sharded models did (checked in the job, recorded here)
    assert all(d <= 1e-5 for d in ps["copy_max_abs_difference"].values()), ps["copy_max_abs_difference"]
    assert len(ps["last_step_loss_by_epoch"]["ranking"]) == 3
    assert metrics["ranking"]["auc"] > 0.55
    assert metrics["retrieval"]["model"]["recall@10"] > 2 * 10 / metrics["retrieval"]["catalog_size"]

    trained = load_job(cfg["training"]["model_dir"])  # the trained weights, from the chief's checkpoint
    schema, export_dir = trained.schema, Path(cfg["export"]["export_dir"])
    # the loss fell: the trained weights against the same model at its initial weights, on training rows
    # (the epochs' logged losses are single asynchronous steps', too noisy to compare)
    default = tf.distribute.get_strategy()
    untrained = build_ranking(trained.config, default, schema, trained.vocabularies, trained.catalog,
                              trained.catalog_text_embeddings, trained.split.train)
    batch = next(iter(ranking_dataset(trained.split.train, trained.config, schema, shuffle=False)))
    build_model(untrained, batch, default)
    before, after = (float(m.compute_loss(batch, training=False)) for m in (untrained, trained.ranking))
    assert after < 0.8 * before, (before, after)
    full_rows = sum(s["shape"][0] for s in shards)
    saved = dict(tf.train.list_variables(str(export_dir / "retrieval" / "1" / "variables" / "variables")))
    assert [full_rows, shards[0]["shape"][1]] in saved.values()  # the whole table, one variable

    rows = trained.split.test.head(6).reset_index(drop=True)
    queries = as_numpy_features(rows, query_inputs(schema, trained.config.retrieval.history_length), schema)
    ranked = rows.merge(trained.catalog[[schema.ad_id, *schema.ad_text]], on=schema.ad_id)
    ranking_feats = as_numpy_features(ranked, (*schema.query_features, *schema.ad_string_features,
                                               *schema.ad_text), schema)
    served = {}
    for name, feats in (("retrieval", queries), ("ranking", ranking_feats)):
        with tf.compat.v1.Session(graph=tf.Graph()) as sess:
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(export_dir / name / "1"))
            sig = meta.signature_def["serving_default"]
            served[name] = sess.run({k: v.name for k, v in sig.outputs.items()},
                                    {sig.inputs[k].name: v for k, v in feats.items()})
    np.testing.assert_allclose(served["ranking"]["pctr"], predict_ctr(trained.ranking, ranked, schema),
                               rtol=1e-3, atol=1e-4)
    scores = query_embeddings(trained.retrieval, rows, schema) @ ad_embeddings(
        trained.retrieval, trained.catalog, schema).T
    k = served["retrieval"]["scores"].shape[1]
    np.testing.assert_allclose(served["retrieval"]["scores"], np.sort(scores, axis=1)[:, ::-1][:, :k],
                               rtol=1e-4, atol=1e-5)

    with ServerProcess(model_config_file=export_dir / "models.config", lifetime=120) as proc:
        with RecommendationClient(proc.address) as client:
            ads = client.recommend({"user_id": "u00001", "age_bucket": "25-34", "gender": "f", "region": "r1"},
                                   {"device": "mobile", "placement": "feed", "hour": 20, "weekday": 4}, k=3)
    assert len(ads) == 3
    with pytest.raises(OSError):
        os.kill(proc.pid, 0)


@pytest.mark.parametrize("key, value", [
    ("encoder.mode", "lora"), ("training.mixed_precision", "mixed_bfloat16"), ("training.jit_compile", True),
    ("training.backup_every_steps", 4), ("ranking.item_stats", True), ("evaluation.validation_fraction", 0.1),
])
def test_what_parameter_servers_do_not_run_is_refused_before_work(key, value):
    with pytest.raises(ConfigError, match=f"'parameter_server': {key}"):
        load_config(ROOT / "configs" / "tiny.yaml", ["training.strategy=parameter_server", f"{key}={value}"])


def test_parameter_server_needs_a_cluster_with_chief_workers_and_ps(monkeypatch):
    from trainer.strategy import make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        make_strategy("parameter_server")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                                                "task": {"type": "chief", "index": 0}}))
    with pytest.raises(ValueError, match="at least one ps"):
        make_strategy("parameter_server")


def test_a_ps_task_of_the_training_command_serves_until_killed(tmp_path):
    """`python -m trainer.task` on a ps (or worker) task of TF_CONFIG starts its server instead of training."""
    from tests.processes import free_ports

    ports = free_ports(3)
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"], "ps": [f"127.0.0.1:{ports[2]}"]}
    env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "ps", "index": 0}})}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.task", "--config", str(ROOT / "configs" / "tiny.yaml"),
                             "--model-dir", str(tmp_path / "run"), "--strategy", "parameter_server", "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving at" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the ps task exited"
        assert f"ps task 0 serving at 127.0.0.1:{ports[2]}" in line
        with socket.create_connection(("127.0.0.1", ports[2]), timeout=5):
            pass  # its gRPC port accepts connections
        assert proc.poll() is None and not (tmp_path / "run").exists()  # serving, not training
    finally:
        proc.kill()
        proc.wait(30)
