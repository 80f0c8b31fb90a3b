"""TensorFlow Serving's config files: read and write them as TF Serving does.

- `models.config`: a `ModelServerConfig` text proto (`--model_config_file`) naming every model,
  its base path, version policy (`latest`, `specific`, `all`) and version labels. Base paths
  are written as the model server container sees them (`/models/<name>`); the embedded server
  maps `/models` to the directory holding the config file (or to `models_root`), so one file
  serves both.
- `batching_parameters.txt`: `BatchingParameters` text proto (`--batching_parameters_file`).
- `monitoring.config`: `MonitoringConfig` text proto (`--monitoring_config_file`), Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.versions import INT64_MAX, MAX_LOADED_VERSIONS, VersionPolicy

MODEL_CONFIG_FILE = "models.config"
BATCHING_FILE = "batching_parameters.txt"
MONITORING_FILE = "monitoring.config"
CONTAINER_MODELS_ROOT = PurePosixPath("/models")
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


class ModelConfigError(ValueError):
    """A model config file cannot be read or names something the server cannot serve."""


@dataclass(frozen=True)
class BatchingConfig:
    """Server-side batching; field names follow TF Serving's `BatchingParameters`."""

    max_batch_size: int = 64
    batch_timeout_micros: int = 2000
    max_enqueued_batches: int = 100
    num_batch_threads: int = 2


@dataclass(frozen=True)
class ModelEntry:
    name: str
    base_path: Path
    platform: str = "tensorflow"
    policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = field(default_factory=dict)  # version_labels: label -> version


def model_server_config(names: list[str] | tuple[str, ...],
                        root: PurePosixPath = CONTAINER_MODELS_ROOT) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    for name in names:
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = str(root / name)
        entry.model_platform = "tensorflow"
        entry.model_version_policy.latest.num_versions = 1
    return config


def model_config_text(names: list[str] | tuple[str, ...], root: PurePosixPath = CONTAINER_MODELS_ROOT) -> str:
    return text_format.MessageToString(model_server_config(names, root))


def batching_parameters_text(cfg: BatchingConfig) -> str:
    # Int64Value wrappers in TF Serving's session_bundle_config.proto, hence `{ value: N }`.
    return "".join(f"{field} {{ value: {getattr(cfg, field)} }}\n" for field in
                   ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"))


def monitoring_config_text(path: str = PROMETHEUS_PATH) -> str:
    return f'prometheus_config {{\n  enable: true\n  path: "{path}"\n}}\n'


def read_model_config(path: str | Path, models_root: str | Path | None = None) -> list[ModelEntry]:
    """Parse a ModelServerConfig text proto; base paths under /models/ map to `models_root`
    (default: the config file's directory), relative ones resolve against the config's directory."""
    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(f"{path}: model config file not found")
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except text_format.ParseError as err:
        raise ModelConfigError(f"{path}: not a ModelServerConfig text proto: {err}") from err
    if not config.HasField("model_config_list") or not config.model_config_list.config:
        raise ModelConfigError(f"{path}: no model_config_list entries")
    root = Path(models_root) if models_root else path.parent
    entries = []
    for item in config.model_config_list.config:
        if not item.name or not item.base_path:
            raise ModelConfigError(f"{path}: every model needs a name and a base_path, got {item}")
        if item.model_platform not in ("", "tensorflow"):
            raise ModelConfigError(f"{path}: model {item.name!r} has platform {item.model_platform!r}; "
                                   "only 'tensorflow' is served")
        policy = _version_policy(f"{path}: model {item.name!r}", item.model_version_policy)
        labels = _version_labels(f"{path}: model {item.name!r}", item.version_labels, policy)
        base = PurePosixPath(item.base_path)
        if base.is_relative_to(CONTAINER_MODELS_ROOT):
            resolved = root / base.relative_to(CONTAINER_MODELS_ROOT)
        elif base.is_absolute():
            resolved = Path(item.base_path)
        else:
            resolved = path.parent / item.base_path
        entries.append(ModelEntry(item.name, resolved, item.model_platform or "tensorflow", policy, labels))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ModelConfigError(f"{path}: duplicate model names {names}")
    return entries


def _version_policy(where: str, proto) -> VersionPolicy:
    kind = proto.WhichOneof("policy_choice") or "latest"
    if kind == "all":
        return VersionPolicy("all")
    if kind == "latest":
        count = max(proto.latest.num_versions, 1)  # TF Serving reads 0 (unset) as 1
        if count > MAX_LOADED_VERSIONS:
            raise ModelConfigError(f"{where}: latest {{num_versions: {count}}} is more than the "
                                   f"{MAX_LOADED_VERSIONS} versions one model may keep loaded")
        return VersionPolicy("latest", count)
    versions = frozenset(proto.specific.versions)
    if not versions or len(versions) > MAX_LOADED_VERSIONS or min(versions) < 0:
        raise ModelConfigError(f"{where}: specific {{versions}} must name 1 to {MAX_LOADED_VERSIONS} "
                               f"versions >= 0, got {sorted(versions)[:MAX_LOADED_VERSIONS + 1]}")
    return VersionPolicy("specific", versions=versions)


def _version_labels(where: str, proto_map, policy: VersionPolicy) -> dict[str, int]:
    labels = dict(proto_map)
    for label, version in labels.items():
        if not label or not 0 <= version <= INT64_MAX:
            raise ModelConfigError(f"{where}: version label {label!r} -> {version}: a label must be "
                                   "non-empty and name a version >= 0")
        if policy.kind == "specific" and version not in policy.versions:
            raise ModelConfigError(f"{where}: version label {label!r} names version {version}, which "
                                   f"its policy {policy.describe()} never loads")
    return labels
