"""A training job over streamed logs: trains both stages, exports servables that load the TF1 way, and
two MultiWorkerMirrored workers read disjoint files whose union is every file."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from features.synthetic import SyntheticConfig, generate_world
from features.synthetic_files import write_world
from tests.conftest import tiny_config
from tests.processes import run_workers
from trainer.config import config_to_dict

STREAM_SETTINGS = dict(
    retrieval={"history_length": 0, "epochs": 1},
    ranking={"validation_fraction": 0.0, "epochs": 1},
    evaluation={"baselines": ()},
)


def _stream_config(tmp: Path, n_files: int, hash_buckets=None, **overrides):
    world = generate_world(SyntheticConfig(n_users=150, n_advertisers=10, n_ads=60, n_impressions=4000))
    spec = write_world(world.catalog, world.logs, tmp / "data", n_files=n_files)
    data = {"source": "spec", "spec": str(spec),
            "stream": {"enabled": True, "hash_buckets": hash_buckets or {}, "shuffle_buffer": 500}}
    return tiny_config(tmp, data=data, **STREAM_SETTINGS, **overrides), world


def _tf1_run(path, feats):
    import tensorflow_text  # noqa: F401  (the TF Text ops of the ranking graph)

    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(path))
        sig = meta.signature_def["serving_default"]
        return sess.run({k: v.name for k, v in sig.outputs.items()},
                        {sig.inputs[k].name: feats[k] for k in sig.inputs})


def test_streamed_job_trains_and_exports_servables_that_load_tf1(tmp_path):
    from serving.pseudonym import pseudonym
    from trainer.privacy import job_key
    from trainer.serving_artifacts import as_numpy_features
    from trainer.task import train_and_export

    cfg, world = _stream_config(tmp_path, 3, hash_buckets={"user_id": 97})
    trained, result = train_and_export(cfg, progress=False)
    stream = trained.metrics["stream"]
    assert stream["rows"] == len(world.logs) and stream["files"] == 3
    assert stream["report"] == {"read": len(world.logs), "kept": len(world.logs), "skipped": {}}
    assert trained.metrics["train_steps"]["ranking"] == -(-len(world.logs) // cfg.ranking.batch_size)
    assert trained.vocabularies.hashed == {"user_id": 97} and trained.vocabularies["user_id"] == []
    assert trained.ranking.embeddings.tables["user_id"].embedding.input_dim == 97
    vocab = json.loads((Path(cfg.training.model_dir) / "vocabularies.json").read_text())
    assert vocab["__hash_buckets__"] == {"user_id": 97}
    schema = trained.schema
    rows = world.logs.head(16).merge(world.catalog, on=schema.ad_id)
    key = job_key(cfg)  # the served user id is the job's pseudonym
    rows[schema.user_id] = [pseudonym(u, key) for u in rows[schema.user_id]]
    names = {*schema.query_features, *schema.ad_string_features, *schema.ad_text}
    feats = as_numpy_features(rows, sorted(names), schema)
    for path in result.paths.values():
        metadata = json.loads((path / "assets.extra" / "adrec.json").read_text())
        assert metadata["hash_buckets"] == {"user_id": 97}
    scores = _tf1_run(result.paths["ranking"], feats)
    assert np.isfinite(scores["pctr"]).all() and scores["pctr"].shape == (16,)
    top = _tf1_run(result.paths["retrieval"], feats)
    assert len(top) and all(np.asarray(v).shape[0] == 16 for v in top.values())


def test_streaming_refuses_what_needs_the_whole_log(tmp_path):
    from trainer.job import run_training
    from trainer.prepare import DataError

    cfg, _ = _stream_config(tmp_path, 2)
    cfg.retrieval.history_length = 20
    with pytest.raises(DataError, match="retrieval.history_length cannot be used with data.stream.enabled"):
        run_training(cfg)
    cfg, _ = _stream_config(tmp_path, 2, hash_buckets={"category": 10})
    with pytest.raises(DataError, match="'category' is not one of the query string features"):
        run_training(cfg)
    cfg, _ = _stream_config(tmp_path, 2, hash_buckets={"user_id": 100})
    cfg.ranking.user_id_dropout = 0.5
    with pytest.raises(DataError, match="ranking.user_id_dropout 0.5 cannot be used with a hashed 'user_id'"):
        run_training(cfg)
    from trainer.streaming import refuse_unstreamable

    cfg, _ = _stream_config(tmp_path, 2)
    cfg.training = cfg.training.model_copy(update={"strategy": "parameter_server"})
    with pytest.raises(DataError, match="training.strategy 'parameter_server' cannot be used with data.stream"):
        refuse_unstreamable(cfg)


def test_two_multi_worker_processes_read_disjoint_files(tmp_path):

    cfg, _ = _stream_config(tmp_path, 5)
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    outputs = run_workers(config, 2, "--no-export")
    read = []
    for i, out in enumerate(outputs):
        line = re.search(rf"stream: worker {i} of 2 read in training: (.*)", out)
        assert line, out[-3000:]
        read.append(set(line.group(1).split(", ")))
    assert read[0] == {"part-000.parquet", "part-002.parquet", "part-004.parquet"}
    assert read[1] == {"part-001.parquet", "part-003.parquet"}
    assert "2 replica(s)" in outputs[0]
