"""A job's privacy settings applied: its pseudonymisation key, the pseudonymised frames, the record of both.

`job_key` finds the key (`privacy.key_file`, else the environment variable `privacy.key_env`,
else a random key written once beside the model directory); `pseudonymize_job_data` replaces
the user ids and the data spec's `pii` columns at ingest and notes in the schema what was
replaced and under which key (`key_id`, never the key). That note travels to `privacy.json` in
the model directory (warm starts check it) and to each export's metadata (the client checks it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import uuid
from pathlib import Path

import pandas as pd

from features.privacy import pseudonymize_columns
from features.schema import FeatureSchema
from serving.pseudonym import HEX_DIGITS, PREFIX, PseudonymKeyError, key_from_env, key_id, read_key_file
from trainer.config import JobConfig
from trainer.progress import log

DEFAULT_KEY_FILE = "pseudonym.key"  # beside training.model_dir when no key is configured
PRIVACY_FILE = "privacy.json"  # in training.model_dir: what was pseudonymised, under which key_id
SCHEME = f"HMAC-SHA256, {PREFIX} + {HEX_DIGITS} hex digits"


def refuse_inside_outputs(path: Path, cfg: JobConfig, what: str = "pseudonymisation key file",
                          setting: str = "privacy.key_file", error: type[ValueError] = PseudonymKeyError) -> None:
    """A key (or a list of forgotten users) inside the model or export directory would be copied, archived
    and shipped with them."""
    where = path.expanduser().resolve()
    for key, out in (("training.model_dir", cfg.training.model_dir), ("export.export_dir", cfg.export.export_dir)):
        if where.is_relative_to(Path(out).expanduser().resolve()):
            raise error(f"{what} {path} is inside {key} ({out}), which jobs copy and ship; keep it elsewhere "
                        f"({setting})")


def _create_key_file(path: Path) -> bool:
    """A random key at `path` unless one is there; True when this call wrote it. Written beside it and
    linked into place, so concurrent workers of one job never read half a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def job_key(cfg: JobConfig) -> bytes | None:
    """The job's pseudonymisation key, None when `privacy.pseudonymize` is off.

    With neither `privacy.key_file` nor the `privacy.key_env` variable set, the key is the file
    `pseudonym.key` beside `training.model_dir`, created with a random key when missing; the
    config then names it in `key_file`, so config.json says where the key is (never what it is)."""
    privacy = cfg.privacy
    if not privacy.pseudonymize:
        return None
    if privacy.key_file:
        refuse_inside_outputs(Path(privacy.key_file), cfg)
        return read_key_file(Path(privacy.key_file).expanduser())
    key = key_from_env(privacy.key_env)
    if key is not None:
        return key
    path = Path(cfg.training.model_dir).expanduser().parent / DEFAULT_KEY_FILE
    refuse_inside_outputs(path, cfg)
    if _create_key_file(path):
        log(f"privacy: no pseudonymisation key configured (privacy.key_file, ${privacy.key_env}): wrote a new random "
            f"key to {path}; keep it private, and give it to clients (--key-file, ${privacy.key_env}) so they "
            "can send user ids")
    else:
        log(f"privacy: pseudonymising with the key in {path} (privacy.key_file and ${privacy.key_env} not set)")
    privacy.key_file = str(path)
    return read_key_file(path)


def pseudonymize_job_data(cfg: JobConfig, catalog: pd.DataFrame, logs: pd.DataFrame, schema: FeatureSchema
                          ) -> tuple[pd.DataFrame, pd.DataFrame, FeatureSchema]:
    """The loaded frames with user ids and the spec's `pii` columns pseudonymised (when
    `privacy.pseudonymize`), and the schema noting it in `extra["privacy"]`."""
    pii = tuple(schema.extra.get("pii", ()))
    key = job_key(cfg)
    if key is None:
        if pii:
            log(f"warning: privacy.pseudonymize is off: user ids and the data spec's pii columns {list(pii)} "
                "are used as they are")
        note = {"pseudonymized_inputs": [], "key_id": ""}
    else:
        columns = (schema.user_id, *pii)  # pii columns are user or context columns: in the logs only
        logs = pseudonymize_columns(logs, columns, key)
        note = {"pseudonymized_inputs": list(columns), "key_id": key_id(key), "scheme": SCHEME}
    return catalog, logs, dataclasses.replace(schema, extra={**schema.extra, "privacy": note})


def privacy_note(schema: FeatureSchema) -> dict:
    return dict(schema.extra.get("privacy", {}))


def write_privacy_file(model_dir: Path, schema: FeatureSchema) -> None:
    (model_dir / PRIVACY_FILE).write_text(json.dumps(privacy_note(schema), indent=2))


def check_warm_start(warm_dir: Path, schema: FeatureSchema) -> None:
    """A warm start keeps the earlier job's vocabularies: its ids must be pseudonymised the same way,
    under the same key, or every user would fall into the OOV bucket."""
    file = Path(warm_dir) / PRIVACY_FILE
    earlier = json.loads(file.read_text()) if file.is_file() else {"pseudonymized_inputs": [], "key_id": ""}
    now = privacy_note(schema)
    for field, what in (("pseudonymized_inputs", "pseudonymised columns"), ("key_id", "pseudonymisation key")):
        if earlier.get(field) != now.get(field):
            raise PseudonymKeyError(
                f"--warm-start {warm_dir}: its {what} differ from this job's ({earlier.get(field)!r} there, "
                f"{now.get(field)!r} here); its vocabularies would not match: use the same privacy settings and key")
