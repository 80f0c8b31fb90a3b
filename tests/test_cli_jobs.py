"""The job surface of the CLI: a job config for every shipped data spec, `--set` overrides checked
like the file, and `adrec train` keeping stdout for its results (logs on stderr, `--metrics-out`)."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from features.spec import load_spec
from tests.conftest import ROOT
from trainer.config import ConfigError, apply_overrides, config_from_dict, load_config

JOB_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DATA_SPECS = sorted((ROOT / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_job_config_loads_and_names_an_existing_spec(path):
    cfg = load_config(path)
    assert path.read_text().startswith("#"), f"{path.name}: no header comment saying what it trains"
    if cfg.data.source == "spec":
        spec = ROOT / cfg.data.spec  # job configs are run from the repository root
        assert spec.is_file(), f"{path.name}: data.spec {cfg.data.spec} does not exist"
        load_spec(spec)


def test_every_data_spec_has_a_job_config():
    referenced = {(ROOT / load_config(p).data.spec).resolve() for p in JOB_CONFIGS
                  if load_config(p).data.source == "spec"}
    orphans = [s.name for s in DATA_SPECS if s.resolve() not in referenced]
    assert DATA_SPECS and not orphans, f"configs/data specs no job config uses: {orphans}"


def test_overrides_set_nested_keys_type_checked_like_the_file():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    out = apply_overrides(cfg, ["retrieval.epochs=1", "encoder.masked_lm.epochs=2", "retrieval.eval_ks=[5, 10]",
                                "ranking={epochs: 4, learning_rate: 0.001}", "data.synthetic.n_users=50",
                                "training.mixed_precision=none", "retrieval.logq_correction=false"])
    assert (out.retrieval.epochs, out.encoder.masked_lm.epochs, out.retrieval.eval_ks) == (1, 2, (5, 10))
    assert (out.ranking.epochs, out.ranking.learning_rate, out.ranking.batch_size) == (4, 0.001, cfg.ranking.batch_size)
    assert out.data.synthetic.n_users == 50 and out.retrieval.logq_correction is False
    assert out.encoder.preset == "tiny" and cfg.retrieval.epochs == 2  # the rest kept; the input not mutated
    assert apply_overrides(cfg, ["retrieval.epochs=1", "retrieval.epochs=3"]).retrieval.epochs == 3  # in order
    # the same value through --set and through the file gives the same config
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["ranking"]["deep_units"] = [32, 16]
    assert apply_overrides(cfg, ["ranking.deep_units=[32, 16]"]) == config_from_dict(raw)


@pytest.mark.parametrize("item, message", [
    ("retrieval.epochz=3", "--set retrieval.epochz: unknown key 'epochz'; known keys of retrieval are ["),
    ("nope.epochs=3", "--set nope: unknown key 'nope'; known keys are ['continuous', 'data', 'encoder', "),
    ("encoder.masked_lm.epochz=1", "--set encoder.masked_lm.epochz: unknown key 'epochz'; known keys of "
                                   "encoder.masked_lm are ["),
    ("ranking={epochz: 1}", "--set ranking.epochz: unknown key 'epochz'"),
    ("retrieval.epochs=three", "--set retrieval.epochs: expected int, got 'three'"),
    ("retrieval.epochs=true", "--set retrieval.epochs: expected int, got True"),
    ("retrieval.epochs=0", "--set retrieval.epochs: expected an integer >= 1, got 0"),
    ("encoder.masked_lm.mask_rate=2", "--set encoder.masked_lm.mask_rate: expected a fraction in (0, 1), got 2"),
    ("retrieval.epochs.x=1", "--set retrieval.epochs.x: retrieval.epochs is a value, not a section"),
    ("retrieval", "--set 'retrieval': expected section.key=value, e.g. retrieval.epochs=2"),
    ("retrieval.epochs=[", "--set 'retrieval.epochs=[': the value is not valid YAML"),
    ("retrieval.epochs=!!python/object/apply:os.system [true]", "the value is not valid YAML"),
])
def test_bad_overrides_are_refused_with_the_dotted_key(item, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(load_config(ROOT / "configs" / "tiny.yaml"), [item])
    assert str(err.value).startswith(message) or message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_cli_set_errors_are_one_line_and_exit_1(tmp_path, capsys):
    from trainer.cli import main

    for command in (["train"], ["demo"], ["data", "synthetic", "--out", str(tmp_path / "w")]):
        assert main([*command, "--config", str(ROOT / "configs" / "tiny.yaml"), "--set", "ranking.epochz=2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"adrec {command[0]}: error: --set ranking.epochz: unknown key")


def test_data_synthetic_takes_overrides(tmp_path, capsys):
    from trainer.cli import main

    out = tmp_path / "world"
    assert main(["data", "synthetic", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out),
                 "--set", "data.synthetic={n_users: 40, n_ads: 30, n_impressions: 500}"]) == 0
    assert pd.read_parquet(out / "users.parquet").shape[0] == 40
    assert pd.read_parquet(out / "catalog.parquet").shape[0] == 30
    assert "wrote 30 ads, 500 impressions, 40 users" in capsys.readouterr().out


# A seconds-long world and one epoch each: this test is about where the output goes.
FAST = ["data.synthetic={n_users: 60, n_ads: 40, n_impressions: 2000}", "retrieval.epochs=1", "ranking.epochs=1",
        "evaluation.baselines=[most_popular]", "retrieval.history_length=0"]


def test_train_prints_only_the_metrics_json_on_stdout_and_logs_on_stderr(tmp_path):
    metrics_file = tmp_path / "out" / "metrics.json"
    sets = [a for s in [*FAST, f"training.model_dir={tmp_path / 'run'}"] for a in ("--set", s)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-m", "trainer.cli", "train", "--config", "configs/tiny.yaml", *sets,
                          "--no-export", "--metrics-out", str(metrics_file)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads(run.stdout)  # stdout is exactly one JSON document
    assert set(metrics) >= {"retrieval", "ranking", "train_steps"}
    assert json.loads(metrics_file.read_text()) == metrics
    assert [p.name for p in metrics_file.parent.iterdir()] == ["metrics.json"]  # no temporary file left
    assert "[adrec " in run.stderr and "data: 40 ads" in run.stderr
    assert "loss:" in run.stderr and "loss:" not in run.stdout  # Keras progress lines are logs too
    assert metrics["train_steps"]["retrieval"] >= 1


def test_metrics_out_replaces_atomically(tmp_path):
    from trainer.task import write_metrics

    path = tmp_path / "m.json"
    path.write_text("old")
    write_metrics(path, {"auc": 0.5})
    assert json.loads(path.read_text()) == {"auc": 0.5} and [p.name for p in tmp_path.iterdir()] == ["m.json"]
    with pytest.raises(TypeError):
        write_metrics(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"auc": 0.5} and [p.name for p in tmp_path.iterdir()] == ["m.json"]
