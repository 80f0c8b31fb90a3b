"""The training job as GPU VMs run it: multi-worker, killed and resumed, warm-started."""

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from tests.conftest import fewer_impressions, tiny_config
from tests.processes import run_workers, task
from trainer.config import config_to_dict


def _write_config(tmp: Path, name: str, **overrides) -> tuple[Path, dict]:
    cfg = config_to_dict(tiny_config(tmp / name, **overrides))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_multi_worker_mirrored_two_processes(tmp_path):
    config, cfg = _write_config(tmp_path, "mwms", retrieval={"epochs": 1}, ranking={"epochs": 1})
    outputs = run_workers(config, 2)
    digests = [[line for line in out.splitlines() if line.startswith("weights digest:")][-1] for out in outputs]
    assert digests[0] == digests[1], digests
    model_dir, export_dir = Path(cfg["training"]["model_dir"]), Path(cfg["export"]["export_dir"])
    assert (model_dir / "checkpoints" / "checkpoint").exists()
    assert sorted(p.name for p in model_dir.iterdir()) == ["checkpoints", "config.json", "logs", "metrics.json",
                                                           "privacy.json", "vocabularies.json"]
    for name in ("retrieval", "ranking", "recommender"):
        assert sorted(p.name for p in (export_dir / name).iterdir()) == ["1"]  # the chief exported once
    assert "exported version 1" in outputs[0] and "exported version" not in outputs[1]
    for stage in ("retrieval", "ranking"):  # TensorBoard events: the chief's only (tf_keras gives others a temp dir)
        assert len(list((model_dir / "logs" / stage / "train").glob("events.out.tfevents.*"))) == 1
    assert "2 replica(s)" in outputs[0]


def _run_to_end(config: Path, timeout: float = 300) -> str:
    p = task(config, "--no-export")
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def test_killed_job_resumes_without_lost_or_repeated_steps(tmp_path):
    # 5,000 impressions: 8 retrieval steps an epoch, so the kill at the first backup (step 4) is mid-epoch.
    overrides = dict(retrieval={"epochs": 4, "batch_size": 64}, ranking={"epochs": 2, "batch_size": 256},
                     training={"backup_every_steps": 4}, data=fewer_impressions(5000))
    baseline_cfg, baseline = _write_config(tmp_path, "baseline", **overrides)
    config, cfg = _write_config(tmp_path, "killed", **overrides)
    model_dir = Path(cfg["training"]["model_dir"])
    backup = model_dir / "backup"
    # The uninterrupted run goes alongside the killed one and its rerun: neither reads the other's dirs.
    uninterrupted = task(baseline_cfg, "--no-export")
    try:
        p = task(config, "--no-export")
        deadline = time.monotonic() + 240
        while not (backup.exists() and any(backup.rglob("*.index"))):
            assert p.poll() is None, "training ended before its first backup"
            assert time.monotonic() < deadline, "no backup written in time"
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
        assert p.returncode == -signal.SIGKILL
        assert not (model_dir / "metrics.json").exists()

        out = _run_to_end(config)
        baseline_out, _ = uninterrupted.communicate(timeout=300)
    finally:
        uninterrupted.kill()
    assert uninterrupted.returncode == 0, baseline_out[-3000:]
    expected = json.loads((Path(baseline["training"]["model_dir"]) / "metrics.json").read_text())["train_steps"]
    assert "resuming from the backup" in out or "stage already finished" in out, out[-2000:]
    got = json.loads((model_dir / "metrics.json").read_text())["train_steps"]
    assert got == expected
    assert not backup.exists() and not (model_dir / "stages").exists()  # cleared once the job finished


def _recall_of_export(path: Path, trained, k: int) -> float:
    from serving.servable import Servable
    from trainer.serving_artifacts import as_numpy_features

    schema = trained.schema
    test = trained.split.test[trained.split.test[schema.click] > 0]
    from trainer.inputs import query_inputs

    names = query_inputs(schema, trained.config.retrieval.history_length)
    out = Servable("retrieval", 0, path).run(as_numpy_features(test, names, schema))
    ids = test[schema.ad_id].to_numpy()
    return float(np.mean([ids[i].encode() in set(out["ad_ids"][i][:k]) for i in range(len(ids))]))


def test_warm_start_exports_next_version_that_does_better_on_new_logs(tmp_path):
    from trainer.export import export_all
    from trainer.job import run_training

    first = tiny_config(tmp_path / "v1", retrieval={"epochs": 3})
    first.data.time_window = (0.0, 0.5)
    export_dir = tmp_path / "models"
    v1 = export_all(run_training(first, progress=False), export_dir)

    second = tiny_config(tmp_path / "v2", retrieval={"epochs": 3})
    second.data.time_window = (0.5, 1.0)
    trained = run_training(second, progress=False, warm_start=first.training.model_dir)
    v2 = export_all(trained, export_dir)
    assert (v1.version, v2.version) == (1, 2)
    assert trained.metrics["warm_start"]
    saved_vocab = json.loads((Path(first.training.model_dir) / "vocabularies.json").read_text())
    assert trained.vocabularies.to_dict() == saved_vocab
    old = _recall_of_export(v1.paths["retrieval"], trained, 20)
    new = _recall_of_export(v2.paths["retrieval"], trained, 20)
    assert new > old, (old, new)


def test_mixed_bfloat16_xla_with_validation_and_early_stopping(tmp_path):
    from serving.servable import Servable
    from trainer.evaluate import predict_ctr
    from trainer.export import export_all, graph_ops
    from trainer.job import run_training
    from trainer.serving_artifacts import as_numpy_features

    cfg = tiny_config(tmp_path, retrieval={"epochs": 2}, ranking={"epochs": 2},
                      training={"mixed_precision": "mixed_bfloat16", "steps_per_execution": 2, "jit_compile": True},
                      evaluation={"validation_fraction": 0.15})
    trained = run_training(cfg, progress=False)
    assert trained.ranking.interact.jit and trained.retrieval.query_tower.core.jit
    assert trained.text.adapter.backbone.compute_dtype == "bfloat16"  # the Keras 3 encoder follows too
    assert trained.ranking.cross_layers[0].compute_dtype == "bfloat16"
    assert len(trained.metrics["ranking"]["validation"]["gauc_by_epoch"]) >= 1  # the probe's early stopping
    assert any(k.startswith("val_factorized_top_k") for k in trained.history["retrieval"])
    assert np.isfinite(trained.history["ranking"]["loss"]).all()
    assert trained.metrics["ranking"]["auc"] > 0.5
    # The export runs the same weights without XLA, so TF Serving needs no JIT.
    export = export_all(trained, tmp_path / "models")
    assert not any(op.startswith("Xla") for op in graph_ops(export.paths["ranking"]))
    schema = trained.schema
    rows = trained.split.test.head(8).merge(trained.catalog[[schema.ad_id, *schema.ad_text]], on=schema.ad_id)
    names = (*schema.query_features, *schema.ad_string_features, *schema.ad_text)
    served = Servable("ranking", 1, export.paths["ranking"]).run(as_numpy_features(rows, names, schema))
    np.testing.assert_allclose(served["pctr"], predict_ctr(trained.ranking, rows, schema), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("cluster, task, chief", [
    ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
    ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
    ({"chief": ["a:1"], "worker": ["b:1"]}, ("chief", 0), True),  # Vertex AI: workerpool0 is "chief"
    ({"chief": ["a:1"], "worker": ["b:1"]}, ("worker", 0), False),
])
def test_one_chief_per_cluster_as_tf_config_names_it(monkeypatch, cluster, task, chief):
    from trainer.strategy import is_chief

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": task[0], "index": task[1]}}))
    strategy = SimpleNamespace(cluster_resolver=SimpleNamespace(task_type=task[0], task_id=task[1]),
                               extended=SimpleNamespace(_in_multi_worker_mode=lambda: True))
    assert is_chief(strategy) is chief


def test_finished_stages_are_reused_only_with_the_same_config_and_data(tmp_path, monkeypatch):
    """A stage finished by an earlier run is restored only when the config and the data fingerprints both
    match; otherwise everything resumable is dropped, with the reason logged."""
    import trainer.resume as resume
    from trainer.resume import DONE, claim_stages

    said = []
    monkeypatch.setattr(resume, "log", said.append)
    cfg, model_dir, strategy = tiny_config(tmp_path), tmp_path / "run", SimpleNamespace()

    def finish(stage: str) -> None:
        (model_dir / "stages" / stage).mkdir(parents=True, exist_ok=True)
        (model_dir / "stages" / stage / DONE).write_text('{"steps": 1}')
        (model_dir / "backup" / "ranking").mkdir(parents=True, exist_ok=True)

    finish("retrieval")  # left by a run that recorded no fingerprint (or an older version)
    assert claim_stages(model_dir, cfg, "data-a", strategy) == []
    assert "recorded no fingerprint" in said[-1] and not (model_dir / "backup").exists()
    finish("retrieval")
    assert claim_stages(model_dir, cfg, "data-a", strategy) == ["retrieval"]
    assert "restored, not retrained" in said[-1]
    assert claim_stages(model_dir, cfg, "data-b", strategy) == []
    assert "trained on a different data;" in said[-1] and not (model_dir / "backup").exists()
    finish("ranking")
    other = tiny_config(tmp_path, retrieval={"epochs": 1})
    assert claim_stages(model_dir, other, "data-b", strategy) == []
    assert "trained on a different config;" in said[-1]
    other.export.recommend_k, other.training.model_dir = 5, str(tmp_path / "elsewhere")  # not part of training
    finish("ranking")
    assert claim_stages(model_dir, other, "data-b", strategy) == ["ranking"]


def test_data_fingerprint_sees_every_cell():
    import pandas as pd

    from trainer.resume import data_fingerprint

    frame = pd.DataFrame({"ad_id": ["a", "b"], "ts": [1.0, 2.0], "history": [["a"], []]})
    base = data_fingerprint((frame,), {"vocab": ["a", "b"]})
    changed = [frame.assign(ts=[1.0, 2.5]), frame.assign(history=[["b"], []]), frame.rename(columns={"ts": "t"}),
               frame.head(1)]
    assert all(data_fingerprint((f,), {"vocab": ["a", "b"]}) != base for f in changed)
    assert data_fingerprint((frame,), {"vocab": ["b", "a"]}) != base
    assert data_fingerprint((frame.copy(),), {"vocab": ["a", "b"]}) == base
