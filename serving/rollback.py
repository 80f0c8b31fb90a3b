"""`adrec rollback EXPORT_DIR`: serve the previous version of every model again.

The served version is moved aside, into `<export_dir>/.rolled_back/<model>/<version>`, a path that
is no model's base path. Under TF Serving's default version policy (`latest 1`, what
`models.config` asks for) the highest version directory under a base path is served, and a
version whose directory is gone is unloaded: stock TF Serving (its file-system source re-lists the
base path every `--file_system_poll_wait_seconds`) and the embedded server (`serving.registry`) both
then serve the next highest version, with no config change and no restart. Rolled-back versions
keep their numbers: the continuous loop never publishes a new version under one of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.contract import MODEL_NAMES, RETRIEVAL
from serving.versions import scan_versions

ROLLED_BACK_DIR = ".rolled_back"


def served_version(export_dir: Path) -> int | None:
    """The version the `latest 1` policy serves: the highest retrieval version (the recommender and
    ranking models are published with the same number)."""
    return max(scan_versions(Path(export_dir) / RETRIEVAL)[0], default=None)


def rollback(export_dir: str | Path) -> tuple[int, int]:
    """Move the served version of every model aside; returns (rolled back, now served)."""
    export_dir = Path(export_dir)
    served = served_version(export_dir)
    versions = sorted(scan_versions(export_dir / RETRIEVAL)[0])
    if served is None or len(versions) < 2:
        raise ValueError(f"{export_dir}: {'no version' if served is None else f'only version {served}'} of "
                         f"{RETRIEVAL} is there; rollback needs a previous version to serve")
    previous = versions[-2]
    missing = [name for name in MODEL_NAMES if not (export_dir / name / str(previous)).is_dir()]
    if missing:
        raise ValueError(f"{export_dir}: version {previous} of {missing} is missing; cannot serve it")
    moves = [(export_dir / name / str(served), export_dir / ROLLED_BACK_DIR / name / str(served))
             for name in retrieval_last()]
    for source, target in moves:
        if source.is_dir() and target.exists():
            raise ValueError(f"{target} exists: version {served} was rolled back before and published again")
    # Retrieval last: its highest version is what counts as served, so a rollback killed half-way
    # and run again moves the rest of the same version, not the one before it.
    for source, target in moves:
        if source.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    return served, previous


def retrieval_last() -> list[str]:
    """The models in the order a version is published or moved aside (see `rollback`)."""
    return [*(n for n in MODEL_NAMES if n != RETRIEVAL), RETRIEVAL]
