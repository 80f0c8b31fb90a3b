"""`adrec continuous`: train on each new day of logs, publish the new version only when it is no worse.

For each new day partition (`features.partitions`), in day order, the newest day is held out:
1. a candidate warm-starts from the version now served (its training run is named in the version's
   `assets.extra/continuous.json`) and trains on the `continuous.window_days` days before it;
2. the candidate, exported to a staging directory outside the served one, and the served version
   answer the same held-out requests through their SavedModels' signatures: Recall@K of the
   retrieval model over the held-out clicks, ROC AUC of the ranking model's pCTR over the
   held-out impressions;
3. the candidate is published as version N+1 (renamed into `export.export_dir`) only when neither
   metric is below the served version's by more than its margin; otherwise it moves to
   `<state_dir>/rejected/`, where no server looks. Both metric sets and the decision are in every
   servable's `assets.extra/continuous.json`, and in `<state_dir>/state.json`.

The state is written atomically before each step that changes what is served (a decision is recorded
as `pending`, then carried out, then marked done), so a loop killed at any point and started again
finishes the pending decision, skips the days it recorded, and trains the interrupted day again
(restoring its finished stages, `trainer.resume`). The first partition only trains: nothing before
it can be trained on. A day's candidate never trains on that day; it does in the next iterations.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from features.history import history_matrix
from features.partitions import PARTITION_COLUMN, Partition, list_partitions, read_window
from features.schema import FeatureSchema
from serving.contract import HISTORY, MODEL_NAMES, NEGATIVE_HISTORY, RANKING, RETRIEVAL, SIGNATURE_KEY
from serving.rollback import ROLLED_BACK_DIR, retrieval_last, served_version
from serving.versions import scan_versions
from trainer import serving_artifacts
from trainer.config import JobConfig
from trainer.export import export_all, next_version
from trainer.forget import forget_file
from trainer.metrics import auc
from trainer.privacy import job_key
from trainer.progress import log
from trainer.resume import clear_stages
from trainer.task import write_metrics

STATE_FILE = "state.json"
DECISION_FILE = "continuous.json"  # in each published or rejected version's assets.extra
EVAL_BATCH = 1024


def state_dir_of(cfg: JobConfig) -> Path:
    return Path(cfg.continuous.state_dir or Path(cfg.training.model_dir) / "continuous")


def read_state(state_dir: Path) -> dict:
    path = state_dir / STATE_FILE
    if not path.exists():
        return {"processed": {}, "pending": None, "next_version": 1}
    return json.loads(path.read_text())


def write_state(state_dir: Path, state: dict) -> None:
    write_metrics(state_dir / STATE_FILE, state)  # a temporary file renamed into place, fsynced


def read_decision(version_dir: Path) -> dict | None:
    path = version_dir / "assets.extra" / DECISION_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _used_version_ceiling(export_dir: Path) -> int:
    """Versions moved aside by a rollback keep their numbers: a later version never reuses one."""
    aside = [v for name in MODEL_NAMES for v in scan_versions(export_dir / ROLLED_BACK_DIR / name)[0]]
    return max([next_version(export_dir) - 1, *aside], default=0)


# ----- the evaluation both versions get -----

@dataclass
class Predictor:
    """One servable's signature: its input specs by name, and a call on a dict of tensors."""

    specs: dict
    call: Callable[[dict], dict]

    @classmethod
    def saved(cls, version_dir: Path) -> Predictor:
        """A SavedModel's serving signature, as a model server calls it."""
        fn = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_KEY]
        return cls(dict(fn.structured_input_signature[1]), lambda inputs: fn(**inputs))

    @classmethod
    def module(cls, module: tf.Module) -> Predictor:
        """An exportable servable before it is saved (`trainer.servables`): the same graph, in memory."""
        return cls(dict(module.serve.input_signature[0]), module.serve)


def _saved(export_dir: Path, name: str, version: int, cache: dict) -> Predictor:
    key = (str(export_dir), name, version)
    if key not in cache:
        if len(cache) >= 4:  # the served and the candidate version's two models
            cache.pop(next(iter(cache)))
        cache[key] = Predictor.saved(export_dir / name / str(version))
    return cache[key]


def _inputs(specs: dict, rows: pd.DataFrame) -> dict[str, tf.Tensor]:
    out = {}
    for name, spec in specs.items():
        if name in (HISTORY, NEGATIVE_HISTORY):
            out[name] = tf.constant(history_matrix(rows[name], spec.shape[-1]).astype(str))
        elif spec.dtype == tf.string:
            out[name] = tf.constant(rows[name].fillna("").astype(str).to_numpy())
        else:
            out[name] = tf.constant(rows[name].to_numpy().astype(spec.dtype.as_numpy_dtype))
    return out


def evaluate_servables(retrieve: Predictor, rank: Predictor, test: pd.DataFrame, catalog: pd.DataFrame,
                       schema: FeatureSchema, k: int) -> dict:
    """Recall@k of the retrieval servable over the held-out clicks (is the clicked ad among the k it
    returns) and ROC AUC of the ranking servable's pCTR over the held-out impressions."""
    text = [c for c in schema.ad_text if c not in test]
    if text:
        test = test.merge(catalog[[schema.ad_id, *text]], on=schema.ad_id, how="left")
    clicks = test[test[schema.click] > 0]
    hits = []
    for start in range(0, len(clicks), EVAL_BATCH):
        rows = clicks.iloc[start:start + EVAL_BATCH]
        top = retrieve.call(_inputs(retrieve.specs, rows))["ad_ids"].numpy()[:, :k].astype(str)
        hits.append((top == rows[schema.ad_id].astype(str).to_numpy()[:, None]).any(axis=1))
    pctr = [rank.call(_inputs(rank.specs, test.iloc[s:s + EVAL_BATCH]))["pctr"].numpy().reshape(-1)
            for s in range(0, len(test), EVAL_BATCH)]
    recall = float(np.concatenate(hits).mean()) if hits else float("nan")
    score = auc(test[schema.click].to_numpy() > 0, np.concatenate(pctr)) if pctr else float("nan")
    return {f"recall@{k}": recall, "ranking_auc": score, "queries": int(len(clicks)), "impressions": int(len(test))}


def evaluate_version(export_dir: Path, version: int, test: pd.DataFrame, catalog: pd.DataFrame,
                     schema: FeatureSchema, k: int, cache: dict | None = None) -> dict:
    """`evaluate_servables` on version `version` of the SavedModels under `export_dir`."""
    cache = {} if cache is None else cache
    retrieve, rank = (_saved(export_dir, name, version, cache) for name in (RETRIEVAL, RANKING))
    return evaluate_servables(retrieve, rank, test, catalog, schema, k)


def gate_k(cfg: JobConfig) -> int:
    return cfg.continuous.recall_k or cfg.export.top_k


def decide(candidate: dict, served: dict | None, cfg: JobConfig) -> tuple[bool, str]:
    """Publish when no metric is below the served version's by more than its margin."""
    gate = cfg.continuous
    key = f"recall@{gate_k(cfg)}"
    if any(math.isnan(candidate[m]) for m in (key, "ranking_auc")):
        return False, "the held-out day has no clicks (or no non-clicks) to judge the candidate by"
    if served is None:
        return True, "no version is served yet"
    worse = [f"{m} {candidate[m]:.4f} < served {served[m]:.4f} - {margin}"
             for m, margin in ((key, gate.recall_margin), ("ranking_auc", gate.auc_margin))
             if not math.isnan(served[m]) and candidate[m] < served[m] - margin]
    if worse:
        return False, "worse than the served version: " + "; ".join(worse)
    return True, "no worse than the served version within the margins"


# ----- one day -----

def _day_config(cfg: JobConfig, state_dir: Path, day: str) -> JobConfig:
    day_cfg = cfg.model_copy(deep=True)
    # The key `adrec train` and `adrec forget` find for the loop's config (beside its model_dir when none is
    # configured), named in the day's config before its model_dir moves: no day makes a key of its own.
    job_key(day_cfg)
    day_cfg.training.model_dir = str(state_dir / "runs" / day)
    # The loop's forget list, not one beside the day's run: `adrec forget --config` with this config finds it.
    day_cfg.privacy.forget_file = str(forget_file(cfg, check=False))
    day_cfg.data.time_window = (0.0, 1.0)
    day_cfg.evaluation = day_cfg.evaluation.model_copy(update={
        "protocol": "column", "split_column": PARTITION_COLUMN, "test_values": (day,)})
    return day_cfg


def _staged(state_dir: Path, version: int) -> Path:
    return state_dir / "staging" / str(version)


def _train_candidate(cfg: JobConfig, strategy, logs_dir: Path, state_dir: Path, window: list[Partition],
                     progress: bool, cache: dict) -> dict:
    """Train, stage and evaluate the candidate for the newest day of `window`; returns the decision record."""
    from trainer.job import run_training

    day = window[-1].day
    export_dir = Path(cfg.export.export_dir)
    served = served_version(export_dir)
    record = read_decision(export_dir / RETRIEVAL / str(served)) if served is not None else None
    warm = record.get("model_dir") if record else None
    if served is not None and (warm is None or not Path(warm).is_dir()):
        log(f"continuous: served version {served} names no training run of this loop; the candidate starts cold")
        warm = None
    day_cfg = _day_config(cfg, state_dir, day)
    log(f"continuous: day {day}: training on {', '.join(p.day for p in window[:-1])}"
        + (f", warm start from version {served}" if warm else ", from scratch"))
    trained = run_training(day_cfg, strategy, progress=progress, warm_start=warm,
                           frames=read_window(logs_dir, window), keep_stages=True)
    state = read_state(state_dir)
    version = max(state["next_version"], _used_version_ceiling(export_dir) + 1)
    staging = _staged(state_dir, version)
    shutil.rmtree(staging, ignore_errors=True)
    export_all(trained, staging, version)
    test, k = trained.split.test, gate_k(cfg)
    metrics = {"candidate": evaluate_version(staging, version, test, trained.catalog, trained.schema, k, cache)}
    if served is not None:
        metrics["served"] = evaluate_version(export_dir, served, test, trained.catalog, trained.schema, k, cache)
    blessed, reason = decide(metrics["candidate"], metrics.get("served"), cfg)
    record = {"day": day, "version": version, "decision": "published" if blessed else "rejected",
              "reason": reason, "served_version": served, "trained_on": [p.day for p in window[:-1]],
              "warm_start_version": served if warm else None, "model_dir": day_cfg.training.model_dir,
              "metrics": metrics, "decided": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "margins": {f"recall@{k}": cfg.continuous.recall_margin, "ranking_auc": cfg.continuous.auc_margin}}
    for name in MODEL_NAMES:
        (staging / name / str(version) / "assets.extra" / DECISION_FILE).write_text(json.dumps(record, indent=2))
    log(f"continuous: day {day}: version {version} {record['decision']} ({reason}); candidate {metrics['candidate']}"
        + (f", served version {served} {metrics['served']}" if served is not None else ""))
    return record


def _carry_out(cfg: JobConfig, state_dir: Path, record: dict) -> None:
    """Move the staged version into the served directory (published) or aside (rejected). Idempotent:
    a loop killed half-way runs it again."""
    version, export_dir = record["version"], Path(cfg.export.export_dir)
    staging = _staged(state_dir, version)
    if record["decision"] == "published":
        serving_artifacts.write_server_configs(export_dir, MODEL_NAMES)
        for name in retrieval_last():  # retrieval's version is what counts as served: it goes in last
            source, target = staging / name / str(version), export_dir / name / str(version)
            if source.exists() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
        shutil.rmtree(staging, ignore_errors=True)
    elif staging.exists():
        rejected = state_dir / "rejected" / str(version)
        shutil.rmtree(rejected, ignore_errors=True)
        rejected.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, rejected)
    with contextlib.suppress(OSError):  # the staging directory, once empty
        staging.parent.rmdir()
    clear_stages(Path(record["model_dir"]), tf.distribute.get_strategy())


def _finish(cfg: JobConfig, state_dir: Path, record: dict) -> None:
    _carry_out(cfg, state_dir, record)
    state = read_state(state_dir)
    state["processed"][record["day"]] = record
    state["pending"] = None
    write_state(state_dir, state)


def process_new(cfg: JobConfig, logs_dir: Path, strategy, progress: bool = True) -> list[dict]:
    """Every partition of `logs_dir` not yet recorded in the state, oldest first; their records."""
    state_dir = state_dir_of(cfg)
    state_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(state_dir)
    if state["pending"]:  # killed after deciding: carry the decision out before anything else
        log(f"continuous: finishing the recorded decision for day {state['pending']['day']}")
        _finish(cfg, state_dir, state["pending"])
        state = read_state(state_dir)
    shutil.rmtree(state_dir / "staging", ignore_errors=True)  # candidates of a killed run, never decided
    partitions = list_partitions(logs_dir)
    out: list[dict] = []
    cache: dict[tuple, Predictor] = {}
    for i, partition in enumerate(partitions):
        if partition.day in state["processed"]:
            continue
        record: dict
        if i == 0:
            record = {"day": partition.day, "decision": "training data only",
                      "reason": "the first day: there is nothing before it to train on"}
            state["processed"][partition.day] = record
            write_state(state_dir, state)
        else:
            window = partitions[max(0, i - cfg.continuous.window_days):i + 1]
            record = _train_candidate(cfg, strategy, logs_dir, state_dir, window, progress, cache)
            state = read_state(state_dir)
            state["pending"], state["next_version"] = record, record["version"] + 1
            write_state(state_dir, state)
            _finish(cfg, state_dir, record)
            state = read_state(state_dir)
        out.append(record)
    return out


def run_loop(cfg: JobConfig, logs_dir: str | Path, once: bool = False, interval: float = 60.0,
             max_iterations: int = 0, progress: bool = True) -> list[dict]:
    """Poll `logs_dir` every `interval` seconds (after each pass over the new partitions); `once`: one
    pass; `max_iterations` > 0: at most that many passes. Returns every record made."""
    from trainer.strategy import make_strategy

    if cfg.training.strategy in ("multi_worker", "parameter_server"):
        raise ValueError("adrec continuous runs on one host (training.strategy default, mirrored or tpu)")
    if cfg.privacy.dp.enabled:
        raise ValueError("privacy.dp is not available to adrec continuous: each day warm-starts and exports the "
                         "ranking model too, outside the DP accountant (docs/training.md#differential-privacy)")
    strategy = make_strategy(cfg.training.strategy, cfg.training.tpu)
    logs_dir, records, passes = Path(logs_dir), [], 0
    while True:
        records += process_new(cfg, logs_dir, strategy, progress)
        passes += 1
        if once or (max_iterations and passes >= max_iterations):
            return records
        time.sleep(interval)
