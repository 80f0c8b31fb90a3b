"""Job configuration: dataclasses loaded from YAML with `yaml.safe_load`, validated whole at load.

Refused at load, each error naming the file and the dotted key: a key given twice in one mapping
(`features.typed_yaml.StrictSafeLoader`, with its line), unknown keys, wrong types, non-finite
floats, a value outside its field's rule and combinations that cannot work together (both in
`trainer.config_rules`, e.g. `export.recommend_k` above `export.retrieve_n`). `apply_overrides`
sets single keys from the command line (`--set retrieval.epochs=2`), checked exactly like the file.

The config stays plain dataclasses (not pydantic models): code everywhere reads attributes, uses
`dataclasses.replace` / `asdict`, and `EvaluationConfig` extends `features.protocol.EvaluationProtocol`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from features.protocol import EvaluationProtocol
from features.synthetic import SyntheticConfig
from features.typed_yaml import coerce, read_yaml, safe_load
from trainer.config_rules import (  # noqa: F401  (BASELINES, ENCODER_MODES, _RULES: re-exported)
    _RULES,
    BASELINES,
    ENCODER_MODES,
    _check_value,
    _cross_field_problems,
    _leaves,
)


class ConfigError(ValueError):
    """A config file has an unknown key, a wrong type, or a missing path."""




@dataclass
class MaskedLMConfig:
    """Continued masked-LM pre-training of the encoder on the ad text corpus, before two-tower training."""

    epochs: int = 0  # 0 = off
    head_epochs: int = 1  # first fit only the new masked-LM head, the encoder held fixed
    mask_rate: float = 0.15  # share of word pieces selected for masking
    learning_rate: float = 5e-5
    batch_size: int = 32
    holdout_fraction: float = 0.1  # ads whose text only measures masked-token accuracy before/after


@dataclass
class EncoderConfig:
    # "minilm" (bundled), "tiny" (random, small), a keras-hub preset name, or a directory in
    # keras-hub (config.json with registered_name) or Hugging Face (config.json + vocab.txt) format
    preset: str = "minilm"
    # "frozen": embeddings computed once per ad and cached; "top_layers": the last
    # `trainable_layers` transformer layers train with the towers; "full": all of BERT trains
    mode: str = "frozen"
    trainable_layers: int = 2
    sequence_length: int = 32
    cache_dir: str = ""  # frozen mode: reuse catalog text embeddings computed earlier for the same weights and texts
    masked_lm: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    tiny_layers: int = 2
    tiny_hidden: int = 64
    tiny_heads: int = 2
    tiny_intermediate: int = 128
    tiny_vocab_size: int = 4000


@dataclass
class RetrievalConfig:
    embedding_dim: int = 64
    id_embedding_dim: int = 32
    hidden_units: int = 128
    text_dim: int = 0  # > 0, frozen encoder: the towers read this many principal components of the ad text
    temperature: float = 0.05
    learning_rate: float = 0.003
    epochs: int = 8
    batch_size: int = 512
    top_k_metrics: tuple[int, ...] = (10, 100)
    history_length: int = 20  # last N positive ad ids before the event, pooled in the query tower; 0 = off
    history_text: bool = True  # also pool the history ads' (frozen) text embeddings
    history_attention_layers: int = 0  # > 0: a transformer encoder over the recent history, next to the mean
    history_attention_length: int = 50  # the most recent entries the attention encoder reads
    history_attention_heads: int = 2
    history_attention_dim: int = 64
    full_softmax_negatives: str = "all"  # all | seen (only ads with a training positive are negatives)
    history_attention_pool: str = "mean"  # mean | mean_and_newest (also the newest entry's attended state)
    history_dropout: float = 0.0  # training: share of history entries hidden (denoising; regularises ids)
    # "in_batch": softmax over the batch's positives (TFRS Retrieval; logQ-corrected); "full_softmax": over
    # the whole catalog each step (exact, for catalogs up to `full_softmax_max_ads`)
    loss: str = "in_batch"
    full_softmax_max_ads: int = 50_000
    # full_softmax: a query's history ads are not negatives (they are the ads evaluation.exclude_seen removes)
    exclude_history_from_loss: bool = False
    logq_correction: bool = True  # in-batch softmax corrected by log(training frequency) of each candidate
    remove_accidental_hits: bool = True  # in-batch negatives with the positive's ad id are not negatives
    num_hard_negatives: int = 0  # > 0: keep only the hardest N in-batch negatives per query; 0 = all
    user_id_dropout: float = 0.0  # training: share of user ids replaced by the unknown-user bucket
    ad_id_dropout: float = 0.0  # training: share of ad ids replaced by the unknown-ad bucket (cold start)
    eval_ks: tuple[int, ...] = (10, 50, 100)  # Recall@K / NDCG@K of the offline evaluation
    baseline_epochs: int = 5
    baseline_learning_rate: float = 0.1  # Adagrad, as in the TFRS basic retrieval tutorial
    baseline_batch_size: int = 8192


@dataclass
class RankingConfig:
    embedding_dim: int = 16
    embedding_l2: float = 0.0  # L2 penalty on embedding tables (ids are many, clicks are few)
    ad_categorical_dim: int = 0  # > 0: embedding width of every ad categorical (0: ~1.6 * cardinality ** 0.56)
    cross_layers: int = 2
    cross_projection_dim: int = 0  # > 0: low-rank DCN-v2 cross weights (W = U V^T of this rank)
    architecture: str = "stacked"  # "stacked": cross -> deep; "parallel": cross || deep, concatenated
    deep_units: tuple[int, ...] = (128, 64)
    learning_rate: float = 0.002
    epochs: int = 3
    batch_size: int = 1024
    position_tower: bool = True  # shallow position tower added in training, dropped at serving
    # Context the position tower reads besides the position (when examination varies by device or
    # slot). Whatever main effect of these the tower absorbs is dropped with it at serving, so the
    # default is none: on the synthetic world device/placement in the tower cost 0.005 served AUC.
    position_tower_context: tuple[str, ...] = ()
    ctr_loss_weight: float = 1.0  # BCE(click, pCTR) over impressions
    ctcvr_loss_weight: float = 1.0  # BCE(click*conversion, pCTR*pCVR) over impressions (ESMM); 0: no CVR head
    # What the user did before the event (both computed from earlier events only, on the whole log):
    history: bool = False  # pool `history` (the retrieval side's earlier positives; needs retrieval.history_length)
    negative_history: bool = False  # pool the user's earlier non-clicks (the same length N)
    user_stats: bool = False  # the user's earlier events, clicks, and clicks among the last `recent_window`
    recent_window: int = 10
    item_stats: bool = False  # the ad's smoothed click rate and count over the training rows (out-of-fold in training)
    # Ids of users with few impressions (and users unseen in training, who share the OOV row):
    user_id_dropout: float = 0.0  # training: share of user ids looked up as unknown (trains the OOV row)
    id_frequency_l2: float = 0.0  # training: L2 on each looked-up user/ad id row, divided by its training count
    # The latest share (by time) of the training rows: a first fit on the earlier rows early-stops on
    # its gAUC (patience: training.early_stopping_patience) and the calibrator is fitted on that fit's
    # out-of-sample logits there; the served model then trains on all rows for the chosen epochs.
    # 0: one fit on all rows for `epochs`, uncalibrated.
    validation_fraction: float = 0.1
    # "beta" | "platt": smooth, strictly increasing maps; "isotonic": knots (near-flat steps); "none".
    calibration: str = "beta"
    calibration_half_life: float = 0.25  # recency weights: halve every this share of the calibration rows
    calibration_check_fraction: float = 0.5  # latest share of them the map must improve (ECE) to be applied
    calibration_knots: int = 64
    # Data with no negatives of its own (implicit labels: every row a positive): per positive, this
    # many ads drawn uniformly from the ads seen in training that the user has no positive with,
    # for training and for the held-out metrics. Such data with 0 is refused (ranking needs negatives).
    sampled_negatives: int = 4


@dataclass
class TrainingConfig:
    strategy: str = "default"  # "default" | "mirrored" | "multi_worker" | "tpu"
    tpu: str = ""  # TPU name or address for strategy "tpu" ("" = the local TPU VM)
    seed: int = 42
    early_stopping_patience: int = 2
    mixed_precision: str = "none"  # "none" | "mixed_bfloat16" | "mixed_float16" (loss scaling)
    steps_per_execution: int = 1
    jit_compile: bool = False  # XLA-compile the models' dense cores (lookups stay uncompiled)
    backup_every_steps: int = 0  # BackupAndRestore frequency in steps; 0 = every epoch
    model_dir: str = "runs/demo"


@dataclass
class ExportConfig:
    export_dir: str = "runs/demo/models"
    top_k: int = 100  # retrieval model output size
    retrieve_n: int = 100  # recommender: candidates retrieved before ranking
    recommend_k: int = 20  # recommender: ads returned per request
    objective: str = "pctr"  # recommender order: "pctr" | "ecpm" (bid x pCTR) | "cpa" (bid x pCTR x pCVR)


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" | "spec" (real logs through a YAML data spec)
    time_window: tuple[float, ...] = (0.0, 1.0)  # share of the log's time span to use, [start, end]
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    spec: str = ""  # source "spec": path of the data spec (configs/data/*.yaml), relative to the CWD
    root: str = ""  # source "spec": overrides the spec's data directory when set




@dataclass
class EvaluationConfig(EvaluationProtocol):
    """The evaluation protocol (features.protocol) and the retrieval baselines compared with the model.

    With `validation_fraction > 0` a validation split is carved from the training rows by the same
    protocol: the model early-stops on it and each baseline picks its hyperparameters on it; with
    `refit` every method then trains again on all training rows, otherwise all keep the validation
    rows out of training.
    """

    validation_fraction: float = 0.0
    baselines: tuple[str, ...] = ("most_popular", "id_only")
    refit: bool = False


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def config_from_dict(raw: dict | None, where: str = "config") -> JobConfig:
    """A JobConfig from plain YAML values, validated whole: types, every field's rule, then the
    rules across fields. Errors name `where` (the file) and the dotted key."""
    cfg = coerce(JobConfig, raw or {}, where, ConfigError)
    for dotted, value in _leaves(cfg):
        problem = _check_value(dotted, value)
        if problem:
            raise ConfigError(f"{where}.{dotted}: {problem}")
    try:
        cfg.evaluation.check()
    except ValueError as err:
        raise ConfigError(f"{where}.evaluation.{err}") from None
    for dotted, problem in _cross_field_problems(cfg):
        raise ConfigError(f"{where}.{dotted}: {problem}")
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """A config file (composed on its `base:` chain, see `read_config_file`), then `overrides`
    (`section.key=value`, see `apply_overrides`) on top."""
    cfg = config_from_dict(read_config_file(path), str(path))
    return apply_overrides(cfg, overrides)


MAX_BASE_DEPTH = 8


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The plain YAML mapping of a config file. A top-level `base: other.yaml` (relative to the file)
    is read first and this file's values are laid over it: sections merge key by key, any other
    value (lists included) replaces the base's. A chain that loops or runs deeper than
    `MAX_BASE_DEPTH` files is refused."""
    resolved = Path(path).resolve()
    if resolved in _chain:
        raise ConfigError(f"{path}.base: the chain of bases loops back to {path}")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_BASE_DEPTH} files in the chain of bases")
    raw = read_yaml(path, ConfigError, "config file")
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    raw = dict(raw)
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}.base: expected the path of another config file, got {base!r}")
    return _laid_over(read_config_file(Path(path).parent / base, (*_chain, resolved)) or {}, raw)


def _laid_over(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _laid_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def apply_overrides(cfg: JobConfig, overrides: Iterable[str]) -> JobConfig:
    """A copy of `cfg` with each `section.key=value` applied in order.

    The value is parsed with `yaml.safe_load` (`2`, `0.5`, `true`, `[10, 50]`, `{epochs: 2}`);
    keys may nest (`encoder.masked_lm.epochs=2`); a mapping onto a section sets each of its keys.
    Each value is type- and range-checked as in a config file; errors name the `--set` key.
    """
    raw = config_to_dict(cfg)
    for item in overrides:
        path, value = _parse_override(item)
        _assign(raw, JobConfig, path, value)
    return config_from_dict(raw, "--set")  # the whole again: rules across fields (errors: "--set.<key>")


def _parse_override(item: str) -> tuple[list[str], object]:
    key, sep, text = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. retrieval.epochs=2")
    try:
        return path, safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {' '.join(str(err).split())}") from err


def _assign(raw: dict, cls, path: list[str], value, done: tuple[str, ...] = ()) -> None:
    """Set `path` (below the already-walked `done`) in the plain dict `raw` of dataclass `cls`."""
    name, rest = path[0], path[1:]
    dotted = ".".join((*done, name))
    known = {f.name for f in dataclasses.fields(cls)}
    if name not in known:
        where = f" of {'.'.join(done)}" if done else ""
        raise ConfigError(f"--set {dotted}: unknown key {name!r}; known keys{where} are {sorted(known)}")
    hint = typing.get_type_hints(cls)[name]
    if rest:
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"--set {'.'.join((*done, *path))}: {dotted} is a value, not a section")
        _assign(raw[name], hint, rest, value, (*done, name))
    elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
        for key, item in value.items():
            _assign(raw[name], hint, [str(key)], item, (*done, name))
    else:
        typed = coerce(hint, value, f"--set {dotted}", ConfigError)
        problem = _check_value(dotted, typed)
        if problem:
            raise ConfigError(f"--set {dotted}: {problem}")
        raw[name] = value


def config_to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))
