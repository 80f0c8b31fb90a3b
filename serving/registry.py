"""The loaded models and their hot updates: latest-version policy, load-then-swap.

A poller looks at each model's base path; when a new highest version appears it is loaded
with the TF1 loader and warmed up with its own warmup requests *before* it replaces the
serving version, and the old version is unloaded only after its in-flight requests finish.
A version that fails to load or warm up is refused (logged) and the old one keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from serving.servable import Servable, ServableError, latest_version

log = logging.getLogger("adrec.serving")


@dataclass
class VersionState:
    state: str  # "LOADING" | "AVAILABLE" | "END"
    error: str = ""


class ModelRegistry:
    """Name -> the serving (latest) version of each configured model."""

    def __init__(self, base_paths: dict[str, Path], warmup: bool = True):
        self.base_paths = {k: Path(v) for k, v in base_paths.items()}
        self.warmup = warmup
        self._lock = threading.Lock()
        self._servables: dict[str, Servable] = {}
        self._states: dict[str, dict[int, VersionState]] = {n: {} for n in self.base_paths}
        self._refused: dict[tuple[str, int], int] = {}  # (model, version) -> directory mtime_ns
        try:
            for name, path in self.base_paths.items():
                found = latest_version(path)
                if found is None:
                    raise ServableError(f"no numeric version directory under {path} for model {name!r}")
                self._servables[name] = self._load(name, *found)  # a model that cannot load fails startup
                self._states[name][found[0]] = VersionState("AVAILABLE")
        except BaseException:
            for servable in self._servables.values():
                servable.close()
            raise
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def _load(self, name: str, version: int, path: Path) -> Servable:
        servable = Servable(name, version, path)
        if self.warmup:
            try:
                count = servable.warmup()
            except ServableError:
                servable.close()
                raise
            log.info("model %s version %d: replayed %d warmup request(s)", name, version, count)
        return servable

    def get(self, name: str, version: int | None = None) -> Servable:
        with self._lock:
            return self._get(name, version)

    def _get(self, name: str, version: int | None) -> Servable:
        servable = self._servables.get(name)
        if servable is None:
            raise KeyError(f"model {name!r} is not served; served models: {sorted(self._servables)}")
        if version is not None and version != servable.version:
            raise KeyError(f"model {name!r} version {version} is not loaded "
                           f"(loaded version: {servable.version})")
        return servable

    @contextlib.contextmanager
    def acquire(self, name: str, version: int | None = None):
        """The serving version, held open for one request (a swap cannot close it meanwhile)."""
        with self._lock:
            servable = self._get(name, version)
            holder = servable.in_use()
            holder.__enter__()
        try:
            yield servable
        finally:
            holder.__exit__(None, None, None)

    def all(self) -> dict[str, Servable]:
        with self._lock:
            return dict(self._servables)

    def version_states(self, name: str) -> dict[int, VersionState]:
        with self._lock:
            if name not in self._states:
                raise KeyError(f"model {name!r} is not served; served models: {sorted(self._servables)}")
            return dict(self._states[name])

    def poll_once(self) -> list[str]:
        """Load any new latest version; returns what changed, e.g. ['recommender 1->2']."""
        changes = []
        for name, base in self.base_paths.items():
            found = latest_version(base)
            current = self.get(name)
            if found is None or found[0] == current.version:
                continue
            version, path = found
            try:
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._refused.get((name, version)) == stamp:
                continue  # already refused this exact directory
            with self._lock:
                self._states[name][version] = VersionState("LOADING")
            log.info("model %s: loading version %d from %s", name, version, path)
            try:
                new = self._load(name, version, path)
            except Exception as err:  # noqa: BLE001  (any load failure must leave the old version serving)
                self._refused[(name, version)] = stamp
                with self._lock:
                    self._states[name][version] = VersionState("END", str(err))
                log.error("model %s: refused version %d, still serving version %d: %s",
                          name, version, current.version, err)
                continue
            with self._lock:
                old = self._servables[name]
                self._servables[name] = new
                self._states[name][version] = VersionState("AVAILABLE")
                self._states[name][old.version] = VersionState("END")
            old.retire()
            log.info("model %s: now serving version %d (version %d unloads after its last request)",
                     name, version, old.version)
            changes.append(f"{name} {old.version}->{version}")
        return changes

    def start_polling(self, interval: float) -> None:
        if interval <= 0 or self._poller is not None:
            return

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                except Exception:  # noqa: BLE001  (a poll must never kill the poller)
                    log.exception("polling model base paths failed")

        self._poller = threading.Thread(target=loop, name="adrec-model-poller", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        with self._lock:
            servables = list(self._servables.values())
        for s in servables:
            s.retire()
