"""Keyed pseudonyms for user ids and other personal values: HMAC-SHA256 under a secret key.

One module for both sides, standard library only: training replaces the ids at ingest
(`features.privacy`), and the thin client (`serving.client`) applies the same function to the
ids a caller sends, so callers keep using their own ids and the models never hold them.

A pseudonym is "p_" + the first 32 hex digits of HMAC-SHA256(key, value as UTF-8). Without the
key nobody can compute one from an id, so the ids in a model or a log cannot be looked up from a
list of candidate ids; with the key the mapping is stable across jobs, which warm starts and
clients rely on. Values already in that form are left as they are (pseudonymising twice changes
nothing, and a caller holding pseudonyms can send them), as is "" (the value "not known").

The key comes from a file or an environment variable and is never written to any artifact:
what a job records is where the key came from and `key_id`, a keyed fingerprint that tells
whether two parties hold the same key without revealing it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from pathlib import Path

PREFIX = "p_"
HEX_DIGITS = 32  # 128 bits: collisions stay negligible for any number of users a log can hold
DEFAULT_KEY_ENV = "ADREC_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
PRIVACY_METADATA_FIELD = "privacy"  # the embedded server's GetModelMetadata field for a model's privacy block
_PSEUDONYM = re.compile(f"{PREFIX}[0-9a-f]{{{HEX_DIGITS}}}")
_KEY_ID_MESSAGE = b"adrec pseudonym key id"


class PseudonymKeyError(ValueError):
    """The pseudonymisation key is missing, empty or too short, or does not match the model's."""


def check_key(key: bytes | str, where: str) -> bytes:
    """The key as bytes, refused when shorter than MIN_KEY_BYTES; `where` names its source."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not raw:
        raise PseudonymKeyError(f"{where}: the pseudonymisation key is empty")
    if len(raw) < MIN_KEY_BYTES:
        raise PseudonymKeyError(f"{where}: the pseudonymisation key has {len(raw)} bytes; use at least "
                                f"{MIN_KEY_BYTES} random bytes (e.g. `python -c 'import secrets; "
                                "print(secrets.token_hex(32))'`)")
    return raw


def read_key_file(path: str | Path) -> bytes:
    """The key in a file: its text, surrounding whitespace (a trailing newline) removed."""
    path = Path(path)
    try:
        text = path.read_bytes().strip()
    except FileNotFoundError:
        raise PseudonymKeyError(f"pseudonymisation key file {path} does not exist") from None
    except IsADirectoryError:
        raise PseudonymKeyError(f"pseudonymisation key file {path} is a directory") from None
    return check_key(text, f"key file {path}")


def key_from_env(name: str = DEFAULT_KEY_ENV) -> bytes | None:
    """The key in environment variable `name`; None when it is not set, refused when set but empty."""
    value = os.environ.get(name)
    if value is None:
        return None
    return check_key(value.strip(), f"environment variable {name}")


def is_pseudonym(value: str) -> bool:
    return _PSEUDONYM.fullmatch(value) is not None


def pseudonym(value: str, key: bytes) -> str:
    """`value`'s pseudonym under `key` ("" and pseudonyms as they are)."""
    if value == "" or is_pseudonym(value):
        return value
    return PREFIX + hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:HEX_DIGITS]


def pseudonyms(values: Iterable[str], key: bytes) -> dict[str, str]:
    """Each distinct value -> its pseudonym: callers map whole columns through it."""
    return {v: pseudonym(v, key) for v in set(values)}


def key_id(key: bytes) -> str:
    """A fingerprint of the key (HMAC of a fixed message): equal keys, equal ids; reveals nothing of the key."""
    return hmac.new(key, _KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]
