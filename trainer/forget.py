"""The right to be forgotten: the job's list of forgotten users, and what later trainings do with it.

`adrec forget` adds users to the list at `privacy.forget_file` (default `forgotten_users.jsonl`
beside `training.model_dir`, never inside the model or export directory). The list never holds a
raw id: one JSON line per user with its keyed pseudonym under the job's key (`trainer.privacy.job_key`,
the key training uses), that key's `key_id` and when it was added. It is rewritten whole and renamed
into place under a lock, so a reader sees it before or after an addition, never half of one.

Every later training reads it where the logs enter the job (`trainer.prepare.load_job_data`, right
after pseudonymisation): the users' rows are dropped before splits, vocabularies and histories are
built, so a fresh vocabulary has no entry for them and no history holds their clicks. A warm start
keeps the earlier version's vocabularies: there each forgotten pseudonym is replaced by a tombstone
(`forgotten:<position>`, a string no pseudonym or client request takes the form of), and the
tombstone's embedding rows are set to the out-of-vocabulary row (`trainer.checkpoints`), so the
new version holds neither the pseudonym nor what was learned from the user, and answers them as
an unknown user. This module reads and writes the list only (no TensorFlow: `adrec forget` is quick).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from features.vocab import Vocabularies
from serving.pseudonym import is_pseudonym, key_id, pseudonym
from trainer.config import JobConfig
from trainer.privacy import job_key, refuse_inside_outputs
from trainer.progress import log

DEFAULT_FORGET_FILE = "forgotten_users.jsonl"  # beside training.model_dir when privacy.forget_file is ""
TOMBSTONE = "forgotten:"  # + the vocabulary position: the entry that replaces a forgotten pseudonym
MAX_IDS = 100_000  # ids one `adrec forget` call takes
MAX_USERS_FILE_BYTES = 16 * 2**20
MAX_ID_CHARS = 1_000


class ForgetError(ValueError):
    """The forget request or list is unusable: bad input, or a list the job's key cannot apply."""


def forget_file(cfg: JobConfig, check: bool = True) -> Path:
    """Where the job's list of forgotten users lives (`privacy.forget_file`); `check`: refused inside the
    model or export directory, which jobs copy and ship."""
    configured = cfg.privacy.forget_file
    path = Path(configured).expanduser() if configured else \
        Path(cfg.training.model_dir).expanduser().parent / DEFAULT_FORGET_FILE
    if check:
        refuse_inside_outputs(path, cfg, "the list of forgotten users", "privacy.forget_file", ForgetError)
    return path


def is_tombstone(value) -> bool:
    return isinstance(value, str) and value.startswith(TOMBSTONE)


def read_users_file(path: str | Path) -> list[str]:
    """The ids in a file, one per line (blank lines skipped), at most MAX_USERS_FILE_BYTES long."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ForgetError(f"--users-file {path} does not exist") from None
    if size > MAX_USERS_FILE_BYTES:
        raise ForgetError(f"--users-file {path} has {size:,d} bytes, over the {MAX_USERS_FILE_BYTES:,d} one call "
                          "takes; split it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ForgetError(f"--users-file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_ids(ids: list[str]) -> list[str]:
    """The ids to forget, each once, refused when none, too many or too long."""
    if not ids:
        raise ForgetError("no user to forget: give --user ID or --users-file FILE")
    if len(ids) > MAX_IDS:
        raise ForgetError(f"{len(ids):,d} ids: one call takes at most {MAX_IDS:,d}; split them")
    for i, user in enumerate(ids):
        if not user:
            raise ForgetError(f"user id {i + 1} is empty")
        if len(user) > MAX_ID_CHARS:
            raise ForgetError(f"user id {i + 1} has {len(user):,d} characters, over {MAX_ID_CHARS:,d}")
    return list(dict.fromkeys(ids))


def read_forget_list(path: Path) -> list[dict]:
    """The list's entries ({"user": pseudonym, "key_id", "forgotten_at"}); none when there is no list."""
    if not path.exists():
        return []
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ForgetError(f"{path} line {n}: not JSON ({err.msg})") from None
        if not (isinstance(entry, dict) and is_pseudonym(str(entry.get("user", ""))) and entry.get("key_id")):
            raise ForgetError(f"{path} line {n}: expected {{\"user\": a pseudonym, \"key_id\": ..., "
                              f"\"forgotten_at\": ...}}, got {line[:120]!r}")
        entries.append(entry)
    return entries


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive use of the list between reading and replacing it (concurrent `adrec forget` calls)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace(path: Path, entries: list[dict]) -> None:
    """The whole list written beside `path`, flushed to disk, renamed over it: all or nothing."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # pseudonyms of people: the owner's only
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def forget_users(cfg: JobConfig, ids: Iterable[str]) -> tuple[int, int, Path]:
    """Add `ids` (raw ids or pseudonyms) to the job's list as pseudonyms under its key; (added, already
    listed, the list's path)."""
    ids = check_ids(list(ids))
    key = job_key(cfg)
    if key is None:
        raise ForgetError("privacy.pseudonymize is off: the list of forgotten users holds keyed pseudonyms, never "
                          "raw ids, so forgetting needs the job's key (turn privacy.pseudonymize on)")
    path, kid = forget_file(cfg), key_id(key)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with _locked(path):
        entries = read_forget_list(path)
        listed = {e["user"] for e in entries if e["key_id"] == kid}
        new = [p for p in dict.fromkeys(pseudonym(u, key) for u in ids) if p not in listed]
        if new:
            _replace(path, entries + [{"user": p, "key_id": kid, "forgotten_at": at} for p in new])
    log(f"forget: {len(new)} user(s) added to {path}, {len(ids) - len(new)} already there; every later training "
        "leaves their rows out and drops their embedding rows")
    return len(new), len(ids) - len(new), path


def forgotten_users(cfg: JobConfig) -> frozenset[str]:
    """The pseudonyms on the job's list, refused when the job's key cannot apply them: pseudonymisation
    off, or entries made under another key (their users' rows would not be found)."""
    path = forget_file(cfg, check=False)
    if not path.exists():  # a job that never forgot anyone: its layout is not this module's concern
        return frozenset()
    path = forget_file(cfg)
    entries = read_forget_list(path)
    if not entries:
        return frozenset()
    key = job_key(cfg)
    if key is None:
        raise ForgetError(f"{path} lists {len(entries)} forgotten user(s) as keyed pseudonyms, but "
                          "privacy.pseudonymize is off: their rows could not be found; turn it on")
    other = sorted({e["key_id"] for e in entries} - {key_id(key)})
    if other:
        raise ForgetError(f"{path}: entries made under another pseudonymisation key (key_id {', '.join(other)}; "
                          f"this job's is {key_id(key)}): their users' rows would not be found; train with that key")
    return frozenset(e["user"] for e in entries)


def drop_forgotten(logs: pd.DataFrame, user_column: str, forgotten: frozenset[str]) -> pd.DataFrame:
    """The log rows of users not on the list (their clicks leave every history with them)."""
    if not forgotten:
        return logs
    drop = logs[user_column].isin(forgotten)
    present = logs.loc[drop, user_column].nunique()
    log(f"privacy: {len(forgotten)} forgotten user(s) on the forget list; dropped {int(drop.sum()):,d} log rows of "
        f"the {present} in these logs")
    return logs[~drop].reset_index(drop=True) if drop.any() else logs


def tombstone_vocabularies(vocabularies: Vocabularies, forgotten: frozenset[str]) -> tuple[Vocabularies, int]:
    """Kept (warm start) vocabularies with each forgotten pseudonym replaced by a tombstone at its
    position (the embedding tables keep their shapes; `trainer.checkpoints` resets the rows)."""
    values: dict[str, list] = {}
    replaced = 0
    for name, vocab in vocabularies.values.items():
        out = list(vocab)
        for i, v in enumerate(out):
            if isinstance(v, str) and v in forgotten:
                out[i], replaced = f"{TOMBSTONE}{i}", replaced + 1
        values[name] = out
    return Vocabularies(values=values, hashed=dict(vocabularies.hashed)), replaced
