"""Version directories as TensorFlow Serving reads them: names, version policies, fingerprints.

A version directory is named by a non-negative int64 in canonical decimal (`0`, `7`, `1234`).
Names TF Serving's parser would read differently or not at all (`+5`, `007`, `-1`, a number
above 2^63-1, non-ASCII digits) are ignored, so one directory never maps to two versions and
a version number always fits the int64 of `ModelSpec.version`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

INT64_MAX = 2**63 - 1
MAX_LOADED_VERSIONS = 16  # per model: each loaded version is a whole graph and session in memory
MAX_FINGERPRINT_FILES = 4096  # a SavedModel holds a handful; the bound keeps a poll cheap
_CANONICAL = re.compile(r"0|[1-9][0-9]*")


def parse_version(name: str) -> int | None:
    """The version a directory name stands for, or None when it names no version."""
    if not _CANONICAL.fullmatch(name):
        return None
    version = int(name)
    return version if version <= INT64_MAX else None


def looks_like_a_version(name: str) -> bool:
    """A name meant as a version number that `parse_version` refuses (worth a log line)."""
    digits = name[1:] if name[:1] in "+-" else name
    return digits.isnumeric() and parse_version(name) is None  # isnumeric: any Unicode digit, `²`, `四`


def scan_versions(base_path: Path) -> tuple[dict[int, Path], list[str]]:
    """The version directories under a base path, and the number-like names ignored."""
    versions, ignored = {}, []
    try:
        children = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError):
        return {}, []
    for child in children:
        if not child.is_dir():
            continue
        version = parse_version(child.name)
        if version is not None:
            versions[version] = Path(child.path)
        elif looks_like_a_version(child.name):
            ignored.append(child.name)
    return versions, sorted(ignored)


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's `model_version_policy`: `latest {num_versions}`, `specific {versions}` or `all {}`."""

    kind: str = "latest"
    num_versions: int = 1  # latest only
    versions: frozenset[int] = field(default_factory=frozenset)  # specific only

    def select(self, available: Iterable[int], usable: Callable[[int], bool] = lambda v: True) -> list[int]:
        """The versions to keep loaded, highest first, among `available` ones that are `usable`
        (`usable` is asked lazily, highest first: it may cost a look at the files)."""
        ordered = sorted(available, reverse=True)
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions and usable(v)]
        picked: list[int] = []
        for version in ordered:
            if self.kind == "latest" and len(picked) == self.num_versions:
                break
            if usable(version):
                picked.append(version)
            if len(picked) > MAX_LOADED_VERSIONS:
                raise ValueError(f"the `all` policy finds more than the {MAX_LOADED_VERSIONS} versions "
                                 "one model may keep loaded")
        return picked

    def describe(self) -> str:
        if self.kind == "specific":
            return f"specific {sorted(self.versions)}"
        return "all" if self.kind == "all" else f"latest {self.num_versions}"


def fingerprint(path: Path) -> str:
    """What a version directory holds, cheaply: every file's relative path, size and mtime (the
    first `MAX_FINGERPRINT_FILES` in walk order). A refused version is retried once it changes."""
    digest = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
                entry = f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n"
            except OSError as err:  # a dangling link or a file removed meanwhile is part of the state
                entry = f"{os.path.relpath(full, path)}\0{err.errno}\n"
            digest.update(entry.encode("utf-8", "surrogateescape"))
            count += 1
            if count >= MAX_FINGERPRINT_FILES:
                return digest.hexdigest()
    return digest.hexdigest()
