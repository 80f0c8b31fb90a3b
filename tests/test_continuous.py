"""Continuous training: day partitions, the gate that keeps a worse candidate out of the served
directory, a loop killed mid-day that resumes, and rollback as TF Serving's `latest` policy sees it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.partitions import SUCCESS, PartitionError, list_partitions, read_window, write_partitions
from serving.rollback import ROLLED_BACK_DIR, rollback
from tests.conftest import ROOT

MODELS = ("retrieval", "ranking", "recommender")


def test_partitions_are_whole_days_in_day_order(tmp_path):
    catalog = pd.DataFrame({"ad_id": ["ad1"]})
    logs = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "ad_id": ["ad1"] * 3,
                         "timestamp": [1_767_225_600 + 86400 + 5, 1_767_225_600 + 10, 1_767_225_600 + 20]})
    write_partitions(catalog, logs, tmp_path)
    (tmp_path / ".2026-01-05.parquet.tmp").write_bytes(b"half a file")  # a copy still under way
    (tmp_path / "2026-01-06").mkdir()  # a folder whose writer has not finished (no _SUCCESS)
    (tmp_path / "2026-02-30.parquet").write_bytes(b"no such day")
    (tmp_path / "notes.parquet").write_bytes(b"not a day")
    folder = tmp_path / "2026-01-03"
    folder.mkdir()
    logs.head(1).to_parquet(folder / "part-0.parquet")
    (folder / SUCCESS).touch()
    assert [p.day for p in list_partitions(tmp_path)] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    _, rows = read_window(tmp_path, list_partitions(tmp_path))
    assert rows["user_id"].tolist() == ["u2", "u3", "u1", "u1"]
    assert rows["_partition"].tolist() == ["2026-01-01", "2026-01-01", "2026-01-02", "2026-01-03"]
    logs.head(1).to_csv(tmp_path / "2026-01-02.csv", index=False)
    with pytest.raises(PartitionError, match="2026-01-02 is given twice"):
        list_partitions(tmp_path)


@pytest.fixture()
def served_dir(export_copy) -> Path:
    """The tiny job's export as version 1 of each model: a good model already served."""
    return export_copy


def _continuous(tmp_path: Path, served_dir: Path, logs_dir: Path) -> list[str]:
    args = ["continuous", "--config", str(ROOT / "configs" / "tiny.yaml"), "--logs-dir", str(logs_dir),
            "--model-dir", str(tmp_path / "run"), "--export-dir", str(served_dir), "--quiet",
            "--set", "continuous.window_days=1", "--set", "retrieval.epochs=1", "--set", "ranking.epochs=1",
            "--set", "ranking.validation_fraction=0", "--set", "evaluation.baselines=[most_popular]"]
    return args  # the gate's Recall@50: tiny.yaml's export.top_k


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.2)


def test_a_candidate_trained_on_shuffled_labels_is_rejected_and_a_killed_loop_resumes(
        trained_tiny, served_dir, tmp_path, capsys):
    from trainer.cli import main

    logs_dir = tmp_path / "logs"
    world = trained_tiny.config.data.synthetic
    from features.synthetic import generate_world

    generated = generate_world(world)
    days = (generated.logs["timestamp"] - generated.logs["timestamp"].min()) // 86400
    write_partitions(generated.catalog, generated.logs[days < 2], logs_dir)
    first = list_partitions(logs_dir)[0].path  # the candidate's only training day: its labels shuffled
    broken = pd.read_parquet(first)
    order = np.random.default_rng(0).permutation(len(broken))
    broken[["click", "conversion"]] = broken[["click", "conversion"]].to_numpy()[order]
    broken.to_parquet(first, index=False)
    args = _continuous(tmp_path, served_dir, logs_dir)
    state = tmp_path / "run" / "continuous" / "state.json"

    # Killed while it trains the candidate, once its retrieval stage is done: the first day is recorded,
    # nothing was decided.
    loop = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args, "--interval", "0.2",
                             "--max-iterations", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        done = tmp_path / "run" / "continuous" / "runs" / "2026-01-02" / "stages" / "retrieval" / "DONE.json"
        _wait_for(lambda: done.exists() or loop.poll() is not None, 300, "the candidate's retrieval stage")
    finally:
        os.killpg(loop.pid, signal.SIGKILL)
        _, loop_err = loop.communicate()
    assert loop.returncode == -signal.SIGKILL, loop_err.decode()[-3000:]
    recorded = json.loads(state.read_text())
    assert list(recorded["processed"]) == ["2026-01-01"] and recorded["pending"] is None

    assert main([*args, "--once"]) == 0
    out, err = capsys.readouterr()
    assert "stage(s) retrieval finished by an earlier run" in err  # resumed mid-day, not retrained
    assert err.count("continuous: day 2026-01-01") == 0  # the recorded day is not processed again
    decision = json.loads(out.strip().splitlines()[-1])
    assert decision["day"] == "2026-01-02" and decision["decision"] == "rejected", decision
    assert decision["served_version"] == 1 and decision["version"] == 2
    assert set(decision["metrics"]) == {"candidate", "served"}
    for side in decision["metrics"].values():
        assert set(side) == {"recall@50", "ranking_auc", "queries", "impressions"}
    # kept out of the served directory, with its decision beside it
    assert sorted(os.listdir(served_dir / "retrieval")) == ["1"]
    for name in MODELS:
        kept = tmp_path / "run" / "continuous" / "rejected" / "2" / name / "2" / "assets.extra" / "continuous.json"
        assert json.loads(kept.read_text())["decision"] == "rejected"
    final = json.loads(state.read_text())
    assert list(final["processed"]) == ["2026-01-01", "2026-01-02"] and final["next_version"] == 3
    assert not (tmp_path / "run" / "continuous" / "staging").exists()


def test_rollback_serves_the_previous_version_through_the_embedded_server(served_dir, capsys):
    from serving.client import RecommendationClient
    from serving.server import EmbeddedModelServer
    from tests.test_serving_updates import CONTEXT, NO_HISTORY, USER, _models, _publish, _status
    from trainer.cli import main

    for name in MODELS:
        _publish(served_dir, name, 2)
    inputs = {**{k: [v] for k, v in {**USER, **CONTEXT}.items()}, **NO_HISTORY}
    with EmbeddedModelServer(_models(served_dir), poll_seconds=0.2) as server, \
            RecommendationClient(server.address, timeout=10) as client:
        assert client.predict_versioned(inputs)[1] == 2
        assert main(["rollback", str(served_dir)]) == 0
        assert "version 2 moved" in capsys.readouterr().out
        _wait_for(lambda: _status(server.address, "recommender") == {1: ("AVAILABLE", ""), 2: ("END", "")},
                  120, "the rollback to version 1")
        assert client.predict_versioned(inputs)[1] == 1  # a gRPC round trip answered by version 1
    assert sorted(os.listdir(served_dir / ROLLED_BACK_DIR / "ranking")) == ["2"]
    with pytest.raises(ValueError, match="only version 1"):
        rollback(served_dir)


def test_the_gate_k_cannot_exceed_what_retrieval_returns():
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="continuous.recall_k: 100 is more than export.top_k 50"):
        load_config(ROOT / "configs" / "tiny.yaml", ["continuous.recall_k=100"])


def test_a_decision_recorded_before_a_kill_is_carried_out_on_restart(served_dir, tmp_path):
    """Killed while publishing: ranking had moved in, recommender and retrieval had not."""
    from tests.conftest import tiny_config
    from trainer.continuous import process_new, read_state, write_state

    state_dir = tmp_path / "state"
    for name in MODELS:
        shutil.copytree(served_dir / name / "1", state_dir / "staging" / "2" / name / "2")
    os.replace(state_dir / "staging" / "2" / "ranking" / "2", served_dir / "ranking" / "2")
    record = {"day": "2026-01-02", "version": 2, "decision": "published", "model_dir": str(tmp_path / "runs")}
    write_state(state_dir, {"processed": {"2026-01-01": {"day": "2026-01-01"}}, "pending": record,
                            "next_version": 3})
    logs_dir = tmp_path / "logs"
    write_partitions(pd.DataFrame({"ad_id": ["ad1"]}), pd.DataFrame(
        {"ad_id": ["ad1"] * 2, "timestamp": [1_767_225_600, 1_767_225_600 + 86400]}), logs_dir)
    cfg = tiny_config(tmp_path, continuous={"state_dir": str(state_dir)}, export={"export_dir": str(served_dir)})
    assert process_new(cfg, logs_dir, strategy=None, progress=False) == []  # both days are recorded: no training
    for name in MODELS:
        assert sorted(os.listdir(served_dir / name)) == ["1", "2"], name
    state = read_state(state_dir)
    assert state["pending"] is None and state["processed"]["2026-01-02"] == record
    assert not (state_dir / "staging").exists()
