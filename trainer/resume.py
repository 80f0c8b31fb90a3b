"""What a restarted job may reuse from `training.model_dir`: finished stages and mid-stage backups, only
when they were left by a run with the same config and the same data.

A job keeps its finished stages until it has exported (or, without export, until it has trained), so a
job killed at any point after a stage finished restores that stage instead of retraining it; a job
whose export failed restores all of them and only exports.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd

from trainer.config import JobConfig, config_to_dict
from trainer.progress import log
from trainer.strategy import is_chief

FINGERPRINT = "FINGERPRINT.json"  # in <model_dir>/stages: the config and data the stages were trained on
DONE = "DONE.json"  # in <model_dir>/stages/<stage>: the stage finished; its state (steps, history)
RESUMABLE = ("stages", "backup")


def config_fingerprint(cfg: JobConfig) -> str:
    """A hash of what shapes training (not where models are written or how they are exported)."""
    raw = config_to_dict(cfg)
    raw.pop("export", None)
    raw.pop("continuous", None)  # how the loop gates versions, not how a model trains
    raw.get("training", {}).pop("model_dir", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(frames: tuple[pd.DataFrame, ...], *parts: object) -> str:
    """A hash of the job's input tables (every column, in order) and of `parts` (schema, vocabularies):
    the same config over changed data files must not reuse weights trained on the old ones."""
    digest = hashlib.sha256()
    for frame in frames:
        for name in frame.columns:
            column = frame[name]
            digest.update(f"{name}\0{column.dtype}\0{len(column)}\0".encode())
            try:
                hashed = pd.util.hash_pandas_object(column, index=False)
            except TypeError:  # cells holding lists or arrays
                hashed = pd.util.hash_pandas_object(column.map(repr), index=False)
            digest.update(hashed.to_numpy().tobytes())
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=repr).encode())
    return digest.hexdigest()


def claim_stages(model_dir: Path, cfg: JobConfig, data: str, strategy) -> list[str]:
    """Keep what an earlier run left in `model_dir` if it trained on this config and data, else drop it
    (saying why) so every stage trains afresh; record this run's fingerprints. Returns the finished
    stages this run restores instead of training."""
    wanted = {"config": config_fingerprint(cfg), "data": data}
    marker = model_dir / "stages" / FINGERPRINT
    left = [model_dir / d for d in RESUMABLE if (model_dir / d).is_dir() and any((model_dir / d).iterdir())]
    if left:
        found = _read_marker(marker)
        differs = [k for k in ("config", "data") if found.get(k) != wanted[k]]
        if differs:
            why = "recorded no fingerprint" if not found else f"trained on a different {' and '.join(differs)}"
            log(f"{model_dir}: the stages left there were {why}; training every stage afresh")
            if is_chief(strategy):
                for directory in left:
                    shutil.rmtree(directory, ignore_errors=True)
    finished = sorted(p.parent.name for p in (model_dir / "stages").glob(f"*/{DONE}"))
    if finished:
        log(f"resuming in {model_dir}: stage(s) {', '.join(finished)} finished by an earlier run with this "
            "config and data are restored, not retrained")
    if is_chief(strategy):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(wanted))
    return finished


def _read_marker(marker: Path) -> dict:
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def clear_stages(model_dir: Path, strategy) -> None:
    """The job finished (exported, when it exports): the next run with this model_dir trains afresh."""
    if is_chief(strategy):
        for directory in RESUMABLE:
            shutil.rmtree(model_dir / directory, ignore_errors=True)
