"""The loaded models and their hot updates: TF Serving's version policies, load-then-swap.

Each model keeps the versions its policy picks (`latest {num_versions}` by default, one) loaded;
a request without a version gets the highest loaded one, and a `version_label` from the config
resolves to its version, never to another. A poller looks at each base path: a version the policy
now wants is loaded and warmed up with its own warmup requests *before* it serves, and a version
it no longer wants is unloaded only after its in-flight requests finish. A version that fails to
load or warm up is refused (logged once) and counts as absent, so the old versions keep serving;
it is tried again once its files change (a copy that was caught half-way).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from serving.config import ModelConfigError, ModelEntry
from serving.servable import Servable, ServableError
from serving.versions import MAX_LOADED_VERSIONS, fingerprint, scan_versions

log = logging.getLogger("adrec.serving")


class NotServedError(KeyError):
    """No such model, or the version asked for is not loaded (gRPC NOT_FOUND)."""


class UnknownLabelError(KeyError):
    """A `version_label` the model's config does not define (gRPC INVALID_ARGUMENT, as TF Serving)."""


@dataclass
class VersionState:
    state: str  # "LOADING" | "AVAILABLE" | "END"
    error: str = ""


@dataclass
class _Model:
    entry: ModelEntry
    loaded: dict[int, Servable] = field(default_factory=dict)
    states: dict[int, VersionState] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # version -> fingerprint of its files then
    logged: set[str] = field(default_factory=set)  # messages about the base path, each logged once


def _shown(label: str) -> str:
    return repr(label if len(label) <= 64 else label[:64] + "...")


class ModelRegistry:
    """Name -> the loaded versions of each configured model (a plain path: latest version only)."""

    def __init__(self, models: Mapping[str, Path | ModelEntry], warmup: bool = True):
        self.warmup = warmup
        self._lock = threading.Lock()
        self._models = {name: _Model(m if isinstance(m, ModelEntry) else ModelEntry(name, Path(m)))
                        for name, m in models.items()}
        self.base_paths = {name: m.entry.base_path for name, m in self._models.items()}
        try:
            for name, model in self._models.items():
                self._load_at_start(name, model)  # a model that cannot load fails startup
        except BaseException:
            for model in self._models.values():
                for servable in model.loaded.values():
                    servable.close()
            raise
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def _scan(self, name: str, model: _Model) -> dict[int, Path]:
        versions, ignored = scan_versions(model.entry.base_path)
        for child in ignored:
            self._log_once(model, logging.WARNING, "model %s: ignoring %s: not a version number "
                           "(a non-negative int64 in plain decimal)", name, model.entry.base_path / child)
        return versions

    def _log_once(self, model: _Model, level: int, message: str, *args) -> None:
        text = message % args
        if text not in model.logged:
            model.logged.add(text)
            log.log(level, "%s", text)

    def _load_at_start(self, name: str, model: _Model) -> None:
        base, policy = model.entry.base_path, model.entry.policy
        try:
            wanted = policy.select(self._scan(name, model))
        except ValueError as err:
            raise ServableError(f"model {name!r} under {base}: {err}") from err
        if not wanted:
            raise ServableError(f"no version directory under {base} for model {name!r} "
                                f"(version policy: {policy.describe()})")
        for label, version in sorted(model.entry.labels.items()):
            if version not in wanted:  # TF Serving: a label may only name an available version
                raise ModelConfigError(f"model {name!r}: version label {label!r} names version {version}, which "
                                       f"is not loaded (policy {policy.describe()} loads {sorted(wanted)} from {base})")
        for version in wanted:
            model.loaded[version] = self._load(name, version, base / str(version))
            model.states[version] = VersionState("AVAILABLE")

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

    # ----- lookups (each under the lock: a swap replaces `loaded` whole) -----

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            raise NotServedError(f"model {name!r} is not served; served models: {sorted(self._models)}")
        return model

    def _version_for(self, name: str, version: int | None, label: str) -> int | None:
        model = self._model(name)
        if not label:
            return version
        if label not in model.entry.labels:
            raise UnknownLabelError(f"Unrecognized servable version label: {_shown(label)} for model {name!r}; "
                                    f"its labels: {sorted(model.entry.labels)}")
        return model.entry.labels[label]

    def _get(self, name: str, version: int | None, label: str = "") -> Servable:
        wanted = self._version_for(name, version, label)
        loaded = self._model(name).loaded
        if wanted is None:
            return loaded[max(loaded)]
        if wanted not in loaded:
            what = f"version label {_shown(label)} names version {wanted}, which" if label else f"version {wanted}"
            raise NotServedError(f"model {name!r} {what} is not loaded (loaded versions: {sorted(loaded)})")
        return loaded[wanted]

    def get(self, name: str, version: int | None = None, label: str = "") -> Servable:
        """The version a request names (by number or label), else the highest loaded one."""
        with self._lock:
            return self._get(name, version, label)

    def resolve_version(self, name: str, version: int | None = None, label: str = "") -> int | None:
        """The version number a request names, loaded or not (None: none named)."""
        with self._lock:
            return self._version_for(name, version, label)

    @contextlib.contextmanager
    def acquire(self, name: str, version: int | None = None, label: str = ""):
        """`get`, held open for one request (a swap cannot close it meanwhile)."""
        with self._lock:
            servable = self._get(name, version, label)
            holder = servable.in_use()
            holder.__enter__()
        try:
            yield servable
        finally:
            holder.__exit__(None, None, None)

    def all(self) -> dict[str, Servable]:
        """Each model's default (highest loaded) version."""
        with self._lock:
            return {name: m.loaded[max(m.loaded)] for name, m in self._models.items()}

    def loaded_versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._model(name).loaded)

    def version_states(self, name: str) -> dict[int, VersionState]:
        with self._lock:
            return dict(self._model(name).states)

    # ----- polling -----

    def poll_once(self) -> list[str]:
        """Load and unload what each policy now wants; returns what changed, e.g. ['recommender 1->2']."""
        changes = []
        for name, model in self._models.items():
            try:
                change = self._poll_model(name, model)
            except ValueError as err:  # the `all` policy found too many versions: load none of them
                self._log_once(model, logging.ERROR, "model %s: %s; loading nothing new", name, err)
                continue
            if change:
                changes.append(change)
        return changes

    def _usable(self, name: str, model: _Model, path_of: dict[int, Path]):
        def usable(version: int) -> bool:
            if version in model.loaded or version not in model.refused:
                return True
            if fingerprint(path_of[version]) == model.refused[version]:
                return False  # refused, and its files have not changed since
            del model.refused[version]
            log.info("model %s: the files of refused version %d changed; trying it again", name, version)
            return True
        return usable

    def _poll_model(self, name: str, model: _Model) -> str | None:
        available = self._scan(name, model)
        if not available:
            return None  # an emptied or missing base path unloads nothing
        usable = self._usable(name, model, available)
        kept = dict(model.loaded)
        for _ in range(MAX_LOADED_VERSIONS):  # a refusal can bring a lower version into the policy's pick
            todo = [v for v in model.entry.policy.select(available, usable) if v not in kept]
            if not todo:
                break
            for version in todo:
                servable = self._try_load(name, model, version, available[version])
                if servable is not None:
                    kept[version] = servable
        wanted = model.entry.policy.select(available, usable)
        if not wanted:
            return None  # nothing usable on disk: keep serving what is loaded
        old = sorted(model.loaded)
        dropped = [kept.pop(v) for v in list(kept) if v not in wanted]
        with self._lock:
            model.loaded = kept
            for version in kept:
                model.states[version] = VersionState("AVAILABLE")
            for servable in dropped:
                model.states[servable.version] = VersionState("END")
        for servable in dropped:
            servable.retire()
        if old == sorted(kept):
            return None
        log.info("model %s: now serving version(s) %s (unloading %s after their last request)",
                 name, sorted(kept), [s.version for s in dropped])
        return f"{name} {','.join(map(str, old))}->{','.join(map(str, sorted(kept)))}"

    def _try_load(self, name: str, model: _Model, version: int, path: Path) -> Servable | None:
        stamp = fingerprint(path)  # before loading: a copy still running changes it again
        with self._lock:
            model.states[version] = VersionState("LOADING")
        log.info("model %s: loading version %d from %s", name, version, path)
        try:
            return self._load(name, version, path)
        except Exception as err:  # noqa: BLE001  (any load failure must leave the old versions serving)
            model.refused[version] = stamp
            with self._lock:
                model.states[version] = VersionState("END", str(err))
            log.error("model %s: refused version %d, still serving version(s) %s: %s",
                      name, version, sorted(model.loaded), err)
            return None

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
            servables = [s for m in self._models.values() for s in m.loaded.values()]
        for s in servables:
            s.retire()
